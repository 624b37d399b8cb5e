"""
What bench.py measures with, as a library (bench.py is the command; suite.py its --suite): the shapes and the two
models built from one set of random weights (ours and transformers'), the meters (time, memory, spread), the two
training and generation steps, padded against packed batches, the tables, and the 7B memory measurements.
"""
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import data
from hub import REGISTRY, memory_limit, param_count
from model import Config, Decoder
import outputs

# --shape small: any registry shape scaled down to this many layers and this width (vocabulary kept)
SMALL = dict(layers=4, hidden=256)
IMPLS = ("ours", "transformers")


# ----------------------------------------------------------------------------------------------------------------
# Shapes


def scaled_config(hf, layers=None, hidden=None):
    """A copy of an HF config dict with fewer layers and/or a narrower width. Head size is kept (heads = hidden /
    head_dim), the KV group size is kept, the MLP width scales with the hidden size (rounded to a multiple of 64)."""
    c = json.loads(json.dumps(hf))
    t = c["model_type"]
    first = lambda *keys: next(k for k in keys if c.get(k) is not None)   # noqa: E731
    if hidden:
        d_key = first("n_embd", "n_embed", "hidden_size")
        h_key = first("n_head", "num_attention_heads")
        d0, h0 = c[d_key], c[h_key]
        hd = c.get("head_dim") or d0 // h0
        if hidden % hd:
            raise cli.UserError("--hidden", f"{hidden} is not a multiple of the head size {hd}")
        heads = hidden // hd
        c[d_key], c[h_key] = hidden, heads
        if c.get("num_key_value_heads"):
            group = max(1, h0 // c["num_key_value_heads"])
            kv = max(1, heads // group)
            while heads % kv:
                kv -= 1
            c["num_key_value_heads"] = kv
        for k in ("intermediate_size", "block_ff_dim", "n_inner"):
            if c.get(k):
                c[k] = max(64, round(c[k] * hidden / d0 / 64) * 64)
    if layers:
        n0 = c[first("n_layer", "num_hidden_layers")]
        c[first("n_layer", "num_hidden_layers")] = layers
        if t == "lfm2":   # keep the first `layers` entries of the conv / attention pattern
            if c.get("layer_types"):
                c["layer_types"] = c["layer_types"][:layers]
            idxs = c.get("full_attn_idxs")
            if idxs is not None:
                c["full_attn_idxs"] = [i for i in idxs if i < layers] or [min(layers, n0) - 1]
    return c


def check_fits(cfg, device, args=None, copies=2):
    """Refuse (UserError) a shape whose fp32 copies (ours and transformers', both built on the host first; one with
    --memory) cannot fit in the host's available memory, or on the GPU; then, with `args`, a batch whose activations
    cannot fit beside them (--batch-size 1000000 tried a 32 GB allocation and died with a traceback). The parameters
    come from hub.param_count (no tensor is made). The activation figure is a lower bound, so that only what
    cannot fit at all is refused: per copy and per token, the logits (vocab_size values) and the input every block
    keeps for backward (d_model values per block), at 2 bytes each (bf16); for generation the KV cache (2 x d_model
    per block and token) and the prefill's logits."""
    n, _ = param_count(cfg)
    need = copies * 4 * n
    # both copies are built on the host first (RAM available now, swap not counted), then moved to the GPU
    free = {"host": memory_limit("cpu", swap=False)[0]}
    if device.type == "cuda":
        free["GPU"] = torch.cuda.mem_get_info(device)[0]   # free now: the other copy and the run's tensors are there
    for where, b in free.items():
        if need > b:
            raise cli.UserError("--model/--layers/--hidden", f"{n / 1e9:.2f}B parameters: ours and transformers' "
                                 f"copies need {need / 2**30:.1f} GiB in fp32, the {where} has {b / 2**30:.1f} GiB free")
    if args is None:
        return
    acts = []
    if not args.skip_train:
        acts.append(("--batch-size x --max-len", f"{args.batch_size} x {args.max_len}",
                     args.batch_size * args.max_len * (cfg.vocab_size + cfg.n_layer * cfg.d_model) * 2))
    if not args.skip_gen and not args.memory:
        P, N = args.gen_prompt_len, args.max_new_tokens
        acts.append(("--gen-batch-size x (--gen-prompt-len + --max-new-tokens)", f"{args.gen_batch_size} x {P + N}",
                     args.gen_batch_size * ((P + N) * 2 * cfg.n_layer * cfg.d_model + P * cfg.vocab_size) * 2))
    for flag, shape, act in acts:
        for where, b in free.items():   # device memory holds the activations; on CPU the host does
            if where == ("GPU" if device.type == "cuda" else "host") and need + copies * act > b:
                raise cli.UserError(flag, f"{shape} tokens: the activations alone need at least "
                                           f"{copies * act / 2**30:.1f} GiB beside {need / 2**30:.1f} GiB of weights, "
                                           f"the {where} has {b / 2**30:.1f} GiB free")


def build_models(hf_cfg, device, seed):
    """Ours with seeded random weights; transformers' loaded from what ours saved (so the weights are the same),
    with SDPA attention where transformers has it for the family, else its eager attention."""
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    ours = Decoder(Config.from_hf(hf_cfg))
    ours.init_weights(seed)
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        try:
            theirs = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa", dtype=torch.float32)
        except ValueError as e:   # BLOOM has no SDPA path in transformers: its eager attention is the baseline
            if "scaled_dot_product_attention" not in str(e):
                raise
            theirs = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32)
    for m in theirs.modules():   # some configs default to dropout 0.1 (GPT-2); ours has none
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return ours.to(device).train(), theirs.to(device).train()


# ----------------------------------------------------------------------------------------------------------------
# Measuring


def _proc_status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class Meter:
    """Peak memory of one step: CUDA allocator peak above the pre-step level, or the growth of the process's peak
    RSS (VmHWM, reset through /proc/self/clear_refs; fallback ru_maxrss, which cannot be reset)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.hwm = False                     # CPU: can the peak RSS be reset (Linux /proc)?
        self.how = "cuda max_memory_allocated"
        if not self.cuda:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                _proc_status("VmHWM")
                self.hwm = True
                self.how = "process peak RSS (VmHWM), process-wide"
            except OSError:
                self.how = "process peak RSS (ru_maxrss, never reset), process-wide"

    def _rss_peak(self):
        if self.hwm:
            return _proc_status("VmHWM")
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def start(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            if self.hwm:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.base = _proc_status("VmRSS")
            else:
                self.base = self._rss_peak()

    def stop(self):
        """Bytes the step added at its peak."""
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return max(0, self._rss_peak() - self.base)


def tensor_bytes(tensors):
    seen, n = set(), 0
    for t in tensors:
        if torch.is_tensor(t) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


def own_bytes(model, opt=None):
    """Weights (+ optimizer state) of one implementation: what it holds between steps."""
    ts = list(model.parameters()) + list(model.buffers())
    if opt is not None:
        ts += [v for st in opt.state.values() for v in st.values()]
    return tensor_bytes(ts)



def run_alternating(phase, fns, warmup, iters, device, meter, quiet=False):
    """Call each implementation's step in turn (the order swaps every round so neither always runs first).
    Returns {impl: (median seconds, max peak bytes over timed steps, every timed step's seconds)}."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times = {k: [] for k in fns}
    peaks = {k: 0 for k in fns}
    prog = cli.progress(warmup + iters, f"[{phase}]", "step", quiet)
    for i in range(warmup + iters):
        order = list(fns) if i % 2 == 0 else list(fns)[::-1]
        for k in order:
            meter.start()                                      # on CUDA it synchronises first
            t0 = time.perf_counter()
            fns[k]()
            sync()
            dt = time.perf_counter() - t0
            peak = meter.stop()
            if i >= warmup:
                times[k].append(dt)
                peaks[k] = max(peaks[k], peak)
        prog.update()
    prog.close()
    return {k: (statistics.median(times[k]), peaks[k], times[k]) for k in fns}


WIDE = 0.25   # a spread (max - min) / median above this is flagged: the median alone is not to be trusted


def spread(values, scale=1.0):
    """min / median / max (times `scale`) of a list of timings, their count, and the relative spread
    (max - min) / median."""
    v = sorted(x * scale for x in values)
    med = statistics.median(v)
    return {"min": v[0], "median": med, "max": v[-1], "n": len(v), "rel_spread": (v[-1] - v[0]) / med if med else None}


def spread_text(name, sp, unit="ms"):
    """'ours 12.3 ms (11.9-14.0, 9 steps)' plus a warning mark when the spread is wide."""
    wide = sp["rel_spread"] is not None and sp["rel_spread"] > WIDE
    return (f"{name} {sp['median']:.4g} {unit} ({sp['min']:.4g}-{sp['max']:.4g}, {sp['n']} steps"
            f"{', WIDE' if wide else ''})")


def profile(fns, n, device):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for k, fn in fns.items():
        with prof(activities=acts) as p:
            for _ in range(n):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        print(f"\n--- profile: {k}, {n} step(s), top operators by {key} ---")
        print(p.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=48))


# ----------------------------------------------------------------------------------------------------------------
# The two steps


def loss_ours(model, x, y, w, n_tok, kw=None):
    """Our training loss: per-token NLL from the model (chunked over the vocabulary), weighted per example, or per
    token for packed rows (w (R, T), kw {"segments": seg (R, T)}: batching.pack_step)."""
    nll = model(x, targets=y, **(kw or {}))                                    # (B, T) fp32, 0 where y == -100
    return (nll * (w if w.dim() == 2 else w[:, None])).sum() / n_tok


def loss_transformers(model, x, y, w, n_tok):
    """The same loss from transformers' full logits (what a user of AutoModelForCausalLM would write)."""
    logits = model(input_ids=x).logits                                         # (B, T, V)
    nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
    return (nll * w[:, None]).sum() / n_tok


def make_train_steps(ours, theirs, batch, amp, fused, compile_ours, compile_theirs):
    """Training-step closures for both: same data, same loss, each with its own AdamW. No host sync inside."""
    fns = {"ours": torch.compile(loss_ours) if compile_ours else loss_ours,
           "transformers": torch.compile(loss_transformers) if compile_theirs else loss_transformers}
    models = {"ours": ours, "transformers": theirs}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-5, weight_decay=0.0, fused=fused) for k, m in models.items()}

    def step_fn(k):
        def step():
            with amp:
                loss = fns[k](models[k], *batch)
            loss.backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
        return step
    return {k: step_fn(k) for k in IMPLS}, opts


def make_gen_steps(ours, theirs, ids, new_tokens, seed):
    from transformers import GenerationConfig
    rows, P = ids.tolist(), ids.shape[1]
    # explicit top_k=0 / top_p=1 (unset values would be filled from the defaults: top_k=50) and no EOS anywhere
    # (the model's generation config carries one), so both sample from the full softmax for exactly new_tokens
    gcfg = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    theirs.generation_config = gcfg
    theirs.config.eos_token_id = None
    mask = torch.ones_like(ids)
    counts = {}

    def ours_gen():
        torch.manual_seed(seed)
        out = ours.generate(rows, max_new_tokens=new_tokens, temperature=0.7, eos_id=-1)
        counts["ours"] = sum(len(r) for r in out)

    def theirs_gen():
        torch.manual_seed(seed)
        out = theirs.generate(input_ids=ids, attention_mask=mask, generation_config=gcfg)
        counts["transformers"] = (out.shape[1] - P) * out.shape[0]

    return {"ours": ours_gen, "transformers": theirs_gen}, counts


# ----------------------------------------------------------------------------------------------------------------
# Variable lengths: padded against packed (--lengths maqa | sample)


@functools.cache
def sample_lengths():
    """(prompt tokens, total tokens) of every data/sample training pair through the tiny tokenizer (read once)."""
    from hub import load_tokenizer
    tok = load_tokenizer("tiny")
    recs = data.load_records(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sample", "train.jsonl"))
    out = []
    for r in recs:
        p = len(tok.encode(data.format_prompt(r["question"])))
        out.append((p, p + len(tok.encode(r["answer"], special=False)) + 1))   # + EOS
    return out


def example_lengths(kind, n, max_len, seed):
    """n (prompt tokens, total tokens) pairs, total <= max_len.
    maqa: MAQA's doctors' answers run from a few words to several hundred. Modelled as log-normal token counts:
    question median 40 (sigma 0.6), answer median 60 (sigma 1.0, so a tenth of the answers exceed 215 tokens and
    one in a hundred 615), plus EOS, truncated at max_len like train.py's encode.
    sample: data/sample/train.jsonl through the tiny tokenizer and data.format_prompt, drawn with replacement."""
    g = torch.Generator().manual_seed(seed)
    if kind == "maqa":
        q = torch.exp(torch.randn(n, generator=g) * 0.6 + torch.log(torch.tensor(40.0))).round().clamp(min=3)
        a = torch.exp(torch.randn(n, generator=g) * 1.0 + torch.log(torch.tensor(60.0))).round().clamp(min=1)
        pairs = [(int(qi), int(qi + ai + 1)) for qi, ai in zip(q, a)]
    else:
        enc = sample_lengths()
        pairs = [enc[i] for i in torch.randint(0, len(enc), (n,), generator=g).tolist()]
    return [(min(p, max_len - 1), min(t, max_len)) for p, t in pairs]


def length_steps(kind, n_steps, batch, max_len, vocab, seed):
    """n_steps steps of `batch` examples in train.py's encoded form (ids, loss mask, w, severity): random ids with
    the distribution's lengths, loss on the answer tokens, w in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed + 2)
    steps = []
    for s in range(n_steps):
        ex = []
        for p, t in example_lengths(kind, batch, max_len, seed + 100 * s):
            ids = torch.randint(1, vocab, (t,), generator=g).tolist()
            ex.append((ids, [False] * p + [True] * (t - p), 0.5 + torch.rand(1, generator=g).item(), 0))
        ex.sort(key=lambda e: len(e[0]))                                  # train.py sorts a step by length
        steps.append(ex)
    return steps


def bench_lengths(args, ours, theirs, cfg, device, amp):
    """Ours padded / ours packed / transformers padded on the same steps of variable-length examples, alternating.
    Every implementation runs the whole train.py step: batching on the host, forward, weighted loss, backward,
    AdamW. Returns {impl: {real_tokens_per_s, ms_per_step, pad_frac}} and the ratios packed / padded."""
    from batching import collate, pack_step
    K = args.warmup + args.iters
    steps = length_steps(args.lengths, K, args.batch_size, args.max_len, cfg.vocab_size, args.seed)
    fused = device.type == "cuda"
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-5, weight_decay=0.0, fused=fused)
            for k, m in (("ours", ours), ("transformers", theirs))}
    opts["ours packed"] = opts["ours"]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def run(impl, ex):
        """One step; returns (real tokens, padding slots)."""
        if impl == "ours packed":
            batches = pack_step(ex, args.max_len - 1, args.batch_size, 0, device, flops=ours.flops_per_token)
        else:
            batches = [collate(ex, 0, device)]
        n_tok = sum((b[1] != -100).sum() for b in batches).float()
        real = pads = 0
        for x, y, w, p, kw in batches:
            with amp:
                if impl == "transformers":
                    loss = loss_transformers(theirs, x, y, w, n_tok)
                else:
                    loss = loss_ours(ours, x, y, w, n_tok, kw)
            loss.backward()
            real, pads = real + x.numel() - p, pads + p
        opts[impl].step()
        opts[impl].zero_grad(set_to_none=True)
        return real, pads

    impls = ("ours", "ours packed", "transformers")
    tot = {k: [0.0, 0, 0] for k in impls}                                 # seconds, real tokens, padding slots
    per = {k: [] for k in impls}                                          # each timed step's seconds
    prog = cli.progress(K, f"[train {args.lengths}]", "step", args.quiet)
    for i, ex in enumerate(steps):
        for k in (impls if i % 2 == 0 else impls[::-1]):
            sync()
            t0 = time.perf_counter()
            real, pads = run(k, ex)
            sync()
            if i >= args.warmup:
                per[k].append(time.perf_counter() - t0)
                tot[k][0] += per[k][-1]
                tot[k][1] += real
                tot[k][2] += pads
        prog.update()
    prog.close()
    out = {k: {"real_tokens_per_s": r / sec, "ms_per_step": sec * 1000 / args.iters, "pad_frac": p / (r + p),
               "real_tokens": r}
           for k, (sec, r, p) in tot.items()}
    for k in impls:   # the steps differ in length: the spread is of the step times, not of a repeated step
        out[k]["spread_ms"] = spread(per[k], 1000)
    out["packed/padded"] = out["ours packed"]["real_tokens_per_s"] / out["ours"]["real_tokens_per_s"]
    out["packed/transformers"] = out["ours packed"]["real_tokens_per_s"] / out["transformers"]["real_tokens_per_s"]
    lens = [len(e[0]) for st in steps for e in st]
    out["lengths"] = {"median": statistics.median(lens), "max": max(lens), "mean": statistics.fmean(lens)}
    return out


# ----------------------------------------------------------------------------------------------------------------
# Report


def fmt_row(name, r):
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
    return f"{name:<14} {r['tokens_per_s']:>12,.0f} {r['ms_per_step']:>11.2f} {r['peak_mem_mib']:>10.1f} {mfu:>7}"


def fmt_ratio(r):
    mfu = f"{r['mfu']:.2f}x" if r.get("mfu") is not None else "-"
    return (f"{'ours/transf.':<14} {r['tokens_per_s']:>11.2f}x {r['ms_per_step']:>10.2f}x "
            f"{r['peak_mem_mib']:>9.2f}x {mfu:>7}")


def summarise(res, tokens, steps, flops_per_token, peak_flops, own):
    """res {impl: (median s, peak growth bytes)}, tokens {impl: tokens per call}, steps = steps per call (1 for
    training, new tokens for generation) -> figures per implementation and their ratios ours / transformers."""
    out = {}
    for k, (sec, growth, *times) in res.items():
        tps = tokens[k] / sec
        out[k] = {"tokens_per_s": tps, "ms_per_step": sec * 1000 / steps,
                  "peak_mem_mib": (growth + own[k]) / 2 ** 20,
                  "mfu": flops_per_token * tps / peak_flops if peak_flops else None}
        if times:   # per-step ms over the timed calls, and tokens/s at the fastest / slowest of them
            out[k]["spread_ms"] = spread(times[0], 1000 / steps)
            out[k]["spread_tokens_per_s"] = {"min": tokens[k] / max(times[0]), "max": tokens[k] / min(times[0])}
    a, b = out["ours"], out["transformers"]
    out["ratio"] = {m: (a[m] / b[m] if a[m] is not None and b[m] else None) for m in FIGS}
    if "spread_ms" in a and "spread_ms" in b:   # the ratio's range: ours' slowest over theirs' fastest and back
        out["ratio"]["tokens_per_s_range"] = [b["spread_ms"]["min"] / a["spread_ms"]["max"],
                                              b["spread_ms"]["max"] / a["spread_ms"]["min"]]
    return out


FIGS = ("tokens_per_s", "ms_per_step", "peak_mem_mib", "mfu")


def print_table(title, s):
    print(f"\n{title}")
    print(f"{'':<14} {'tokens/s':>12} {'ms/step':>11} {'peak MiB':>10} {'MFU':>7}")
    print(fmt_row("ours", s["ours"]))
    print(fmt_row("transformers", s["transformers"]))
    print(fmt_ratio(s["ratio"]))
    if "spread_ms" in s["ours"]:
        lo, hi = s["ratio"].get("tokens_per_s_range", (None, None))
        print("spread of ms/step (median, min-max): " + "; ".join(spread_text(k, s[k]["spread_ms"]) for k in IMPLS)
              + (f"; tokens/s ratio between {lo:.2f}x and {hi:.2f}x" if lo else ""))
        wide = [k for k in IMPLS if (s[k]["spread_ms"]["rel_spread"] or 0) > WIDE]
        if wide:
            print(f"warning: wide spread ({', '.join(wide)}: max - min over {WIDE:.0%} of the median): the machine "
                  "was busy or the step is unstable; the ratio is not to be trusted", file=sys.stderr)



# ----------------------------------------------------------------------------------------------------------------
# --memory: what a LoRA step on a 7B model needs, measured on a depth-cut model at full width

GiB = 1024 ** 3


def _storages(tensors):
    """{storage pointer: bytes} of tensors (views of one storage count once)."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if torch.is_tensor(t)}


def trim_memory():
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def saved_activation_bytes(model, step_forward):
    """Run step_forward() (a forward pass) and count the bytes autograd keeps for backward, per block and outside the
    blocks (embedding, final norm, head and loss), excluding the weights themselves (resident anyway). Each storage
    counts once. A checkpointed block keeps only its input, which checkpoint() holds without autograd's saved-tensor
    hooks: those are added from the blocks' input shapes."""
    own = set(_storages(list(model.parameters()) + list(model.buffers())))
    where, per = ["other"], {}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own and ptr not in seen:
            seen[ptr] = where[0]
            per[where[0]] = per.get(where[0], 0) + t.untyped_storage().nbytes()
        return t
    hooks, inputs = [], {}
    for i, block in enumerate(model.layers):
        def pre(mod, a, i=i):
            where[0] = f"block{i}"
            inputs[i] = a[0].numel() * a[0].element_size()
        hooks += [block.register_forward_pre_hook(pre),
                  block.register_forward_hook(lambda *a: where.__setitem__(0, "other"))]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step_forward()
    for h in hooks:
        h.remove()
    if model.grad_checkpoint:
        for i, b in inputs.items():
            per[f"block{i}"] = per.get(f"block{i}", 0) + b
    blocks = [per.get(f"block{i}", 0) for i in range(len(model.layers))]
    return out, blocks, per.get("other", 0)


def memory_report(args, device):
    """Measure, print and return the figures of README's Performance section (weights, NF4 error, step memory)."""
    import copy
    from lora import add_lora
    from nf4 import block_linears, nf4_dequantize, nf4_quantize, quantize_nf4
    full_hf = REGISTRY[args.model]["config"]
    cut = args.layers or 1
    hf_cfg = scaled_config(full_hf, cut, args.hidden)
    cfg = Config.from_hf(hf_cfg)
    L_full = Config.from_hf(dict(full_hf)).n_layer
    scale = L_full / cut
    B, T = args.batch_size, args.max_len
    meter = Meter(device)
    report = {"mode": "memory", "model": args.model, "layers_measured": cut, "layers_full": L_full,
              "config": dict(hf_cfg), "device": cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "batch_size": B, "seq_len": T,
              "lora": {"targets": args.lora_targets, "rank": args.lora_rank, "alpha": 2 * args.lora_rank},
              "memory": meter.how, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"{args.model} cut to {cut} of {L_full} blocks at full width (d_model {cfg.d_model}, d_ff {cfg.d_ff}, "
          f"vocab {cfg.vocab_size}) | {report['device']}, {torch.get_num_threads()} threads | torch {torch.__version__}",
          flush=True)

    # 1. block weights in fp32 / bf16 / NF4, and NF4's error on them (random N(0, 0.02) weights, init_weights)
    with torch.device("meta"):
        model = Decoder(cfg)
    model = model.to_empty(device=device)
    if cfg.tie:
        model.lm_head.weight = model.wte.weight
    model.init_weights(args.seed)
    block_params = list(model.layers.parameters())
    n_block = sum(p.numel() for p in block_params)
    fp32_b = tensor_bytes(block_params)
    nf4_b, se, sw, worst = 0, 0.0, 0.0, 0.0
    quantised = set(block_linears(model))
    for name in quantised:
        lin = model.get_submodule(name)
        codes, absmax = nf4_quantize(lin.weight)
        nf4_b += tensor_bytes([codes, absmax]) + (lin.bias.numel() * 2 if lin.bias is not None else 0)
        deq = nf4_dequantize(codes, absmax, tuple(lin.weight.shape))
        err = deq - lin.weight.detach()
        se += err.double().pow(2).sum().item()
        sw += lin.weight.detach().double().pow(2).sum().item()
        worst = max(worst, (err.abs().reshape(-1) / absmax.repeat_interleave(64)[:err.numel()]).max().item())
        del codes, absmax, deq, err
    other_in_blocks = sum(p.numel() for n, p in model.layers.named_parameters()
                          if not any(f"layers.{n}".startswith(q + ".") for q in quantised))   # norms, conv kernels
    nf4_b += other_in_blocks * 2
    rest = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("layers."))
    w = {"params_per_block": n_block // cut, "fp32": fp32_b / cut, "bf16": n_block * 2 / cut, "nf4": nf4_b / cut,
         "rest_params": rest, "rest_bf16": rest * 2}
    w["full_depth_GiB"] = {k: (w[k] * L_full + w["rest_bf16"]) / GiB for k in ("fp32", "bf16", "nf4")}
    w["bits_per_weight_nf4"] = 8 * nf4_b / n_block
    w["nf4_rel_rms_error"] = math.sqrt(se / sw)
    w["nf4_max_error_over_absmax"] = worst
    report["weights"] = w
    print(f"\nblock weights, per block ({w['params_per_block'] / 1e6:.1f}M params): fp32 {w['fp32'] / 2**20:.0f} MiB | "
          f"bf16 {w['bf16'] / 2**20:.0f} MiB | NF4 {w['nf4'] / 2**20:.0f} MiB ({w['bits_per_weight_nf4']:.3f} bits/weight)")
    print(f"x {L_full} blocks + embeddings/norm/head in bf16 ({rest / 1e6:.0f}M params, {rest * 2 / GiB:.2f} GiB): "
          + " | ".join(f"{k} {v:.2f} GiB" for k, v in w["full_depth_GiB"].items()))
    print(f"NF4 error on these N(0, 0.02) weights: relative RMS {w['nf4_rel_rms_error']:.4f}, "
          f"max |error| / block absmax {worst:.4f}")

    # 2. one LoRA step (forward, weighted loss, backward, AdamW) per setting, bf16 autocast as on a GPU
    model = model.to(torch.bfloat16)
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    x, y = ids[:, :-1].to(device), ids[:, 1:].clone().to(device)
    y[:, : T // 4] = -100
    wts = (0.5 + torch.rand(B, generator=g)).to(device)
    n_tok = (y != -100).sum().float()
    report["steps"] = []
    print(f"\nLoRA step, batch {B} x {T}, {args.lora_targets} r={args.lora_rank}, bf16 autocast, base frozen:")
    print(f"{'base':<5} {'ckpt':<5} {'weights MiB':>11} {'LoRA+Adam MiB':>13} {'saved/block MiB':>15} "
          f"{'saved other MiB':>15} {'step peak MiB':>13} {'s/step':>7}")
    for quant, ckpt in (("bf16", False), ("bf16", True), ("nf4", False), ("nf4", True)):
        m = copy.deepcopy(model)
        if quant == "nf4":
            quantize_nf4(m)
        add_lora(m, args.lora_targets.split(","), args.lora_rank, 2 * args.lora_rank, 0.05)
        m.grad_checkpoint = ckpt
        m.train()
        lora = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(lora, lr=1e-4)
        resident = own_bytes(m)
        trim_memory()   # hand freed heap pages back to the OS, so that the step's RSS growth is its own
        meter.start()
        t0 = time.time()

        def fwd():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return (m(x, targets=y) * wts[:, None]).sum() / n_tok
        loss, blocks, other = saved_activation_bytes(m, fwd)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        peak = meter.stop()
        dt = time.time() - t0
        lora_b = tensor_bytes(lora) * 4   # parameter + gradient + Adam's two moments, all fp32
        r = {"base": quant, "grad_checkpoint": ckpt, "weights_bytes": resident, "lora_bytes": lora_b,
             "lora_params": sum(p.numel() for p in lora), "saved_per_block": sum(blocks) / cut,
             "saved_other": other, "step_peak_growth": peak, "seconds": dt, "loss": loss.item()}
        # transient = what the step's peak held beyond the kept activations and the LoRA state (recomputed block,
        # activation gradients, dequantised matrices, a logits chunk)
        r["transient"] = max(0, peak - sum(blocks) - other - lora_b * 3 // 4)
        # full depth: the measured blocks' share x L_full, the rest once
        r["full_depth_estimate_GiB"] = (w[quant if quant == "nf4" else "bf16"] * L_full + w["rest_bf16"] + lora_b * scale
                                        + r["saved_per_block"] * L_full + other + r["transient"]) / GiB
        report["steps"].append(r)
        print(f"{quant:<5} {str(ckpt):<5} {resident / 2**20:>11.0f} {lora_b / 2**20:>13.1f} "
              f"{r['saved_per_block'] / 2**20:>15.0f} {other / 2**20:>15.0f} {peak / 2**20:>13.0f} {dt:>7.1f}",
              flush=True)
        del m, opt, loss, lora
    print(f"\nestimated peak of the same step on the full {L_full}-block model (weights + LoRA state + {L_full} x kept "
          f"activations + head/loss activations + the measured transient), GiB:")
    for r in report["steps"]:
        e = r["full_depth_estimate_GiB"]
        verdict = lambda cap: "fits" if e + 1.5 <= cap else "tight" if e <= cap else "no"   # noqa: E731
        print(f"  {r['base']:<5} {'--grad-checkpoint' if r['grad_checkpoint'] else '':<18} {e:6.1f}   "
              f"16 GiB: {verdict(16)}   24 GiB: {verdict(24)}")
    print(f"\npeak = growth of the process's peak RSS during the step ({meter.how}); saved = bytes autograd keeps "
          "for backward (saved_tensors_hooks), weights excluded; tight = fits with less than 1.5 GiB to spare for "
          "the CUDA context and allocator fragmentation")
    if args.json:
        outputs.write_json(args.json, report)
        print(f"wrote {args.json}", file=sys.stderr)
    return report


def build_full_depth(hf_cfg, device, base="nf4", seed=0):
    """The decoder of `hf_cfg` at its full depth with random weights, built one block at a time so that no
    full-precision copy of the model ever exists: each block is materialised in fp32 (N(0, 0.02) matrices, zero
    biases, unit norms, as init_weights; one seeded generator per block), cast to bf16 and, with base="nf4", its
    Linears replaced by NF4Linear (quantised on `device`). Embeddings, final norm and head in bf16. For Llama-2-7B
    the largest transient is one fp32 block (772 MiB)."""
    from nf4 import NF4Linear
    cfg = Config.from_hf(hf_cfg)
    with torch.device("meta"):
        m = Decoder(cfg)

    def fill(mod, gen):
        with torch.no_grad():
            for name, p in mod.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif p.ndim == 1:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=gen)

    def gen_for(i):
        return torch.Generator(device=device).manual_seed(seed * 1000 + i)
    for i, block in enumerate(m.layers):
        block.to_empty(device=device)
        fill(block, gen_for(i))
        block.to(torch.bfloat16)
        if base == "nf4":
            for name, lin in [(n, x) for n, x in block.named_modules() if isinstance(x, nn.Linear)]:
                parent, child = name.rsplit(".", 1) if "." in name else ("", name)
                setattr(block.get_submodule(parent) if parent else block, child, NF4Linear.from_linear(lin))
                del lin
        trim_memory()
    for name, mod in m.named_children():
        if name != "layers":
            mod.to_empty(device=device)
            fill(mod, gen_for(10_000 + len(name)))
            mod.to(torch.bfloat16)
    if cfg.tie:
        m.lm_head.weight = m.wte.weight
    return m


def _rss():
    try:
        return _proc_status("VmRSS")
    except (OSError, KeyError):
        return None


def qlora_measure(hf_cfg, device, shapes, targets="q_proj,v_proj", rank=16, base="nf4", ckpt=True, seed=0,
                  deadline=None, log=print):
    """Build `hf_cfg` at full depth (build_full_depth), add LoRA, and run one LoRA step (forward under bf16 autocast,
    severity-weighted loss, backward, AdamW on the adapters) per (batch, seq) in `shapes`; the first shape is also
    run once untimed first (AdamW's state and the allocator warm up). Returns the figures: resident bytes of the
    quantised weights, LoRA parameters and optimizer state; per shape the step's seconds, tokens/s and peak memory
    (CUDA: max_memory_allocated / reserved, absolute; CPU: the process's peak RSS (VmHWM) during the step, absolute,
    and its growth over the RSS before it). Shapes past `deadline` (time.monotonic()) are skipped and listed."""
    from lora import add_lora
    t0 = time.perf_counter()
    rss0 = _rss() if device.type == "cpu" else None
    m = build_full_depth(hf_cfg, device, base, seed)
    cfg = m.cfg
    build_s = time.perf_counter() - t0
    quant = [x for x in m.modules() if type(x).__name__ == "NF4Linear"]
    out = {"base": base, "grad_checkpoint": ckpt, "layers": cfg.n_layer, "d_model": cfg.d_model, "d_ff": cfg.d_ff,
           "vocab": cfg.vocab_size, "params": m.num_params(), "build_s": build_s,
           "quantised_weight_bytes": tensor_bytes([t for q in quant for t in (q.codes, q.absmax)]),
           "block_bytes": tensor_bytes(list(m.layers.parameters()) + list(m.layers.buffers())),
           "resident_bytes": own_bytes(m)}
    out["other_bytes"] = out["resident_bytes"] - out["block_bytes"]   # embeddings, final norm, head (bf16)
    if device.type == "cpu":
        trim_memory()
        out["rss_after_build"] = _rss()
        out["rss_before_build"] = rss0
    add_lora(m, targets.split(","), rank, 2 * rank, 0.05)
    m.grad_checkpoint = ckpt
    m.train()
    lora = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(lora, lr=1e-4, fused=device.type == "cuda")
    out["lora"] = {"targets": targets, "rank": rank, "params": sum(p.numel() for p in lora),
                   "param_bytes": tensor_bytes(lora)}
    out["memory"] = ("cuda max_memory_allocated during the step, absolute (weights, LoRA and AdamW state included)"
                     if device.type == "cuda" else "process peak RSS (VmHWM) during the step, absolute")
    g = torch.Generator().manual_seed(seed + 1)
    out["steps"], out["skipped"] = [], []
    plan = [(shapes[0], True)] + [(s, False) for s in shapes]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for (B, T), warm in plan:
        if deadline is not None and time.monotonic() > deadline:
            out["skipped"].append(f"{B} x {T}" + (" (warm-up)" if warm else ""))
            continue
        ids = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
        x, y = ids[:, :-1].to(device), ids[:, 1:].clone().to(device)
        y[:, : T // 4] = -100
        w = (0.5 + torch.rand(B, generator=g)).to(device)
        n_tok = (y != -100).sum().float()
        trim_memory()
        if device.type == "cuda":
            sync()
            torch.cuda.reset_peak_memory_stats(device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else _rss()
        t1 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = (m(x, targets=y) * w[:, None]).sum() / n_tok
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t1
        r = {"batch": B, "seq": T, "seconds": dt, "tokens_per_s": B * T / dt, "loss": loss.item(), "warmup": warm,
             "before_bytes": before}
        if device.type == "cuda":
            r["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
            r["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
            r["peak_bytes"] = r["peak_allocated_bytes"]
        else:
            r["peak_bytes"] = _proc_status("VmHWM")
            r["growth_bytes"] = r["peak_bytes"] - before
        if not warm:
            out["steps"].append(r)
        else:
            out["warmup_step"] = r
        log(f"  {base} {'ckpt' if ckpt else 'no ckpt'} {B} x {T}{' (warm-up)' if warm else ''}: {dt:.1f} s, "
            f"{B * T / dt:,.1f} tok/s, peak {r['peak_bytes'] / GiB:.2f} GiB")
        del loss, x, y
    out["optimizer_state_bytes"] = tensor_bytes([v for st in opt.state.values() for v in st.values()])
    out["lora"]["grad_bytes"] = out["lora"]["param_bytes"]   # one fp32 gradient per adapter parameter (set to None
    # between steps: it exists during backward and the AdamW step only)
    del m, opt, lora
    trim_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def memory_full_report(args, device):
    """--memory --full-depth: --model at all its blocks, NF4 base (bf16 with --base bf16), LoRA, --grad-checkpoint
    steps at --batch-size x each of --full-seqs; prints and returns qlora_measure's figures."""
    hf_cfg = scaled_config(REGISTRY[args.model]["config"], args.layers, args.hidden)
    seqs = [int(v) for v in args.full_seqs.split(",")]
    shapes = [(args.batch_size, t) for t in seqs]
    dev_name = cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"{args.model} at full depth ({Config.from_hf(hf_cfg).n_layer} blocks), {args.base} base, LoRA "
          f"{args.lora_targets} r {args.lora_rank}, --grad-checkpoint, steps at {', '.join(f'{b} x {t}' for b, t in shapes)}"
          f" | {dev_name}, {torch.get_num_threads()} threads | torch {torch.__version__}", flush=True)
    r = qlora_measure(hf_cfg, device, shapes, args.lora_targets, args.lora_rank, args.base, True, args.seed,
                      log=lambda s: print(s, flush=True))
    r.update(mode="memory-full-depth", model=args.model, device=dev_name, threads=torch.get_num_threads(),
             torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S"), config=dict(hf_cfg))
    print(f"\nweights resident: {r['resident_bytes'] / GiB:.2f} GiB ({r['quantised_weight_bytes'] / GiB:.2f} GiB of "
          f"NF4 codes + absmax, {r['other_bytes'] / GiB:.2f} GiB embeddings/norm/head in bf16); LoRA "
          f"{r['lora']['params']:,} params, {r['lora']['param_bytes'] / 2**20:.1f} MiB, AdamW state "
          f"{r['optimizer_state_bytes'] / 2**20:.1f} MiB")
    if r.get("rss_after_build"):
        print(f"process RSS after the build: {r['rss_after_build'] / GiB:.2f} GiB")
    for st in r["steps"]:
        print(f"step {st['batch']} x {st['seq']}: {st['seconds']:.1f} s, peak RSS {st['peak_bytes'] / GiB:.2f} GiB "
              f"(+{st.get('growth_bytes', 0) / 2**20:.0f} MiB over the {st['before_bytes'] / GiB:.2f} GiB before it)")
    if args.json:
        outputs.write_json(args.json, r)
        print(f"wrote {args.json}", file=sys.stderr)
    return r


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU ({line.split(':', 1)[1].strip()}, {os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU ({os.cpu_count()} cores)"
