"""
Time our Decoder against transformers on the same random weights: the severity-weighted training step and sampling.

    python bench.py                                          # tiny shape, CPU defaults (batch 4 x 128, fp32)
    python bench.py --model qwen2.5-0.5b --shape small       # a registry shape scaled down to 4 layers x 256
    python bench.py --model aragpt2-base --compile --json out/bench-aragpt2.json     # on a GPU: bf16, batch 16 x 512
    python bench.py --lengths maqa --skip-gen                # variable lengths: padded vs packed (train.py --pack)
    python bench.py --suite all --out out/suite              # every GPU figure in one command (~8 min on one H100)
    python bench.py --suite all --smoke --out out/smoke      # the same sections at toy sizes on the CPU (CI)
    python bench.py --memory --full-depth --model llama-2-7b --batch-size 1 --full-seqs 64,128,256 --device cpu

Both models are built from one set of random weights (ours: Decoder(Config.from_hf(registry config)), saved with
save_pretrained, loaded by transformers' AutoModelForCausalLM with SDPA attention), so nothing is downloaded.
Training step = forward, the severity-weighted per-token loss  sum(w_b * nll_bt) / n_tokens,  backward, AdamW step
(fused on CUDA), zero_grad. Ours gets the per-token NLL from model(x, targets=y) (chunked over the vocabulary);
transformers' from its logits with F.cross_entropy(reduction='none'). Generation = a batch of same-length random
prompts, --max-new-tokens sampled tokens each (temperature 0.7, no top-k / top-p, EOS disabled so every row runs to the
end). The two implementations alternate step by step after a warm-up; figures are medians over --iters steps, with
their spread (min-max, a warning when it exceeds 25 % of the median: a busy machine or an unstable step).

Columns: tokens/s (training: B*T per step; generation: new tokens per second, prefill included), ms per step
(generation: per new token), peak memory (MiB, see --help of --device), MFU against the device's bf16 peak
(CUDA only), and the ratio ours / transformers of each figure (tokens/s above 1 and ms, memory below 1 favour ours).
"""
import cli   # first, and light: cli.start() guards Ctrl-C and the console while the heavy imports load
cli.start(__name__)
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from hub import REGISTRY, memory_limit, param_count
from model import Config, Decoder, peak_bf16   # peak_bf16: dense bf16 peak FLOP/s by device name (H100 / H200: 989e12)
import outputs

# --shape small: any registry shape scaled down to this many layers and this width (vocabulary kept)
SMALL = dict(layers=4, hidden=256)
IMPLS = ("ours", "transformers")


def get_args(argv=None):
    cuda = torch.cuda.is_available()
    num = cli.number
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="registry name whose config.json shape is benchmarked with random "
                   "weights: " + ", ".join(REGISTRY))
    p.add_argument("--shape", choices=["full", "small"], default="full", help="full = the registry shape; small = scaled "
                   f"down to {SMALL['layers']} layers and hidden size {SMALL['hidden']} (vocabulary and head size kept)")
    p.add_argument("--layers", type=num(int, lo=1, hi=4096), default=None, help="override the number of layers (after --shape)")
    p.add_argument("--hidden", type=num(int, lo=1, hi=1 << 17), default=None, help="override the hidden size (after --shape); heads = hidden / "
                   "head_dim, KV heads and MLP width scale along")
    p.add_argument("--batch-size", type=num(int, lo=1), default=16 if cuda else 4, help="training micro-batch (sequences)")
    p.add_argument("--max-len", type=num(int, lo=1), default=512 if cuda else 128, help="training sequence length (tokens)")
    p.add_argument("--gen-batch-size", type=num(int, lo=1), default=64 if cuda else 4, help="prompts per generate call")
    p.add_argument("--gen-prompt-len", type=num(int, lo=1), default=128 if cuda else 32, help="tokens per prompt")
    p.add_argument("--max-new-tokens", type=num(int, lo=1), default=50, help="sampled tokens per prompt (both stop exactly there)")
    p.add_argument("--warmup", type=num(int, lo=0), default=3, help="untimed steps of each implementation first (compilation, "
                   "allocator and optimizer-state warm-up)")
    p.add_argument("--iters", type=num(int, lo=1), default=10, help="timed steps of each implementation; medians are reported")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto", help="auto = bf16 on CUDA, fp32 "
                   "on CPU. Training keeps fp32 weights under autocast (as train.py); generation casts the weights")
    p.add_argument("--compile", action="store_true", help="torch.compile our training step (forward + loss, fixed "
                   "shapes) and our decode step; falls back to eager, with a warning, if compilation fails")
    p.add_argument("--compile-transformers", action="store_true", help="torch.compile transformers' forward as well "
                   "(by default the baseline is eager, as most users run it)")
    p.add_argument("--device", default="auto", help="cuda, cpu, cuda:1 ... (auto = cuda if available). Peak memory: "
                   "CUDA = max_memory_allocated during the step above what was allocated before it, plus this "
                   "implementation's own weights and optimizer state (the other model also lives on the device); "
                   "CPU = growth of the process's peak RSS during the step (VmHWM, reset before each step), plus "
                   "the same own-state bytes: process-wide and coarse (the allocator may reuse freed memory)")
    p.add_argument("--threads", type=num(int, lo=0, hi=4096), default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--lengths", choices=["fixed", "maqa", "sample"], default="fixed", help="training examples: fixed = "
                   "every row --max-len tokens (ours against transformers); maqa = a long-tailed MAQA-like length "
                   "distribution, sample = the lengths of data/sample/train.jsonl: ours padded (as train.py) against "
                   "ours packed (train.py --pack) and transformers padded, real tokens/s and padding fraction, "
                   "--batch-size examples per step, --max-len = --max-len")
    p.add_argument("--skip-train", action="store_true", help="do not time the training step")
    p.add_argument("--skip-gen", action="store_true", help="do not time generation")
    p.add_argument("--profile", type=num(int, lo=0), default=0, help="after timing, run N more steps of each implementation under "
                   "torch.profiler and print the top operators by self time")
    p.add_argument("--seed", type=num(int, lo=0, hi=2**63 - 1), default=0, help="seed for weights, data and sampling")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file (atomically)")
    p.add_argument("--memory", action="store_true", help="instead of timing against transformers: the memory of a "
                   "LoRA step on --model cut to --layers blocks at full width (default 1): block weight bytes in "
                   "fp32 / bf16 / NF4, NF4's quantisation error on them, and for bf16 and NF4 bases, with and without "
                   "--grad-checkpoint, the activation bytes kept for backward per block and the step's peak; then "
                   "the estimate for the full depth (see README, Performance)")
    p.add_argument("--suite", default=None, help="instead of one timing: the sections " + ", ".join(SECTIONS) +
                   " ('all', or a comma-separated list) with random weights from the registry configs, each under a "
                   "time budget (about 8 minutes in all on one H100), writing --out/report.json and report.md; a "
                   "section that fails (out of memory, a missing kernel) is recorded and the others run")
    p.add_argument("--out", default=None, help="with --suite: the output folder (report.json, report.md)")
    p.add_argument("--smoke", action="store_true", help="with --suite: the same sections at toy sizes (on the CPU "
                   "unless --device says otherwise), in a few minutes: what the tests run")
    p.add_argument("--full-depth", action="store_true", help="with --memory: build --model at all its blocks (one "
                   "block at a time, never in full precision), NF4 base (or --base), and time one LoRA step with "
                   "--grad-checkpoint at --batch-size x each of --full-seqs: resident weights, LoRA and AdamW bytes, "
                   "the step's peak memory (CPU: peak RSS)")
    p.add_argument("--full-seqs", default="64,128,256", help="with --memory --full-depth: sequence lengths, one step each")
    p.add_argument("--base", choices=["nf4", "bf16"], default="nf4", help="with --memory --full-depth: the frozen base")
    p.add_argument("--lora-targets", default="q_proj,v_proj", help="with --memory: the adapted layers (the notebooks')")
    p.add_argument("--lora-rank", type=num(int, lo=1, hi=65536), default=16, help="with --memory: LoRA rank (the notebooks: 16, alpha 32)")
    for old, new in (("--seq-len", "--max-len"), ("--new-tokens", "--max-new-tokens"), ("--gen-batch", "--gen-batch-size")):
        p.alias(old, new)   # the old spellings, one release (docs/contract.md: one flag vocabulary)
    args = p.parse_args(argv)
    if args.suite is None:
        p.refuse_unused(argv, {"out", "smoke"}, "without --suite")
    else:
        p.refuse_unused(argv, {"model", "shape", "layers", "hidden", "batch_size", "max_len", "gen_batch_size",
                               "gen_prompt_len", "max_new_tokens", "warmup", "iters", "dtype", "compile",
                               "compile_transformers", "lengths", "skip_train", "skip_gen", "profile", "json",
                               "memory", "lora_targets", "lora_rank", "full_depth", "full_seqs", "base"},
                        "with --suite (its sizes are fixed: see SUITE_SIZES)")
        return args
    if not args.memory:
        p.refuse_unused(argv, {"lora_targets", "lora_rank", "full_depth", "full_seqs", "base"}, "without --memory")
    elif not args.full_depth:
        p.refuse_unused(argv, {"full_seqs", "base"}, "without --full-depth")
    return args


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


def main(argv=None):
    """The command line under the contract: a user error is one line "error: ..." and exit status 2."""
    return cli.run(_main, argv)


def _main(argv=None):
    args = get_args(argv)
    if args.suite is not None:
        names = args.suite.split(",")
        bad = [n for n in names if n not in SECTIONS and n != "all"]
        if bad or not args.suite or ("all" in names and len(names) > 1):
            raise cli.UserError("--suite", f"{args.suite!r}: expected 'all' or a comma-separated list of "
                                           f"{', '.join(SECTIONS)}")
        if args.out is None:
            raise cli.UserError("--out", "--suite needs an output folder (--out DIR)")
        cli.output_dir(args.out, "--out")
        device = cli.resolve_device("cpu" if args.smoke and args.device == "auto" else args.device, "--device")
        if args.threads:
            torch.set_num_threads(args.threads)
        return run_suite(args, device)
    # every flag and path before any work
    if args.model not in REGISTRY:
        raise cli.UserError("--model", f"{args.model!r} is not a registry name ({', '.join(REGISTRY)})")
    if args.json is not None:   # "" too: output_file refuses an empty path
        cli.output_file(args.json, "--json")
    if args.skip_train and args.skip_gen:
        raise cli.UserError("--skip-train/--skip-gen", "both given: nothing to time")
    if args.lengths != "fixed" and args.compile:
        raise cli.UserError("--lengths with --compile", "measure the compiled packed step with train.py --pack "
                                                         "--compile (see README, Performance)")
    layers = args.layers or (SMALL["layers"] if args.shape == "small" else None)
    hidden = args.hidden or (SMALL["hidden"] if args.shape == "small" else None)
    hf_cfg = scaled_config(REGISTRY[args.model]["config"], layers, hidden)
    cfg = Config.from_hf(hf_cfg)
    if cfg.pos == "learned" and not args.skip_gen and args.gen_prompt_len + args.max_new_tokens > cfg.max_pos:
        raise cli.UserError("--gen-prompt-len + --max-new-tokens", f"{args.gen_prompt_len + args.max_new_tokens} exceed "
                                                                f"the model's {cfg.max_pos} positions")
    if cfg.pos == "learned" and not args.skip_train and args.max_len > cfg.max_pos:
        raise cli.UserError("--max-len", f"{args.max_len} exceeds the model's {cfg.max_pos} positions")
    device = cli.resolve_device(args.device, "--device")

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory and args.full_depth:
        try:
            seqs = [int(v) for v in args.full_seqs.split(",")]
        except ValueError:
            raise cli.UserError("--full-seqs", f"{args.full_seqs!r}: expected comma-separated integers") from None
        if not seqs or min(seqs) < 1:
            raise cli.UserError("--full-seqs", f"{args.full_seqs!r}: expected positive integers")
        return memory_full_report(args, device)
    if args.memory:
        # the model memory_report builds (cut to --layers, default 1, at full width) and one step of it
        check_fits(Config.from_hf(scaled_config(REGISTRY[args.model]["config"], args.layers or 1, args.hidden)),
                   device, args, copies=1)
        return memory_report(args, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    check_fits(cfg, device, args)   # before building: a shape too big is one line, not a MemoryError traceback
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[dtype]
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak_flops = peak_bf16(gpu) if dtype == "bf16" else None
    meter = Meter(device)

    print(f"[setup] building {args.model} ({args.shape}) with random weights, saving, loading into transformers ...",
          flush=True)   # stdout: stderr holds only warnings and the one "error:" line of a failed run
    ours, theirs = build_models(hf_cfg, device, args.seed)
    import transformers
    dev_name = gpu or _cpu_name()
    attn = theirs.config._attn_implementation
    report = {"model": args.model, "shape": args.shape, "config": dict(hf_cfg),
              "params": ours.num_params(), "device": dev_name, "threads": torch.get_num_threads(), "dtype": dtype,
              "compile_train": args.compile, "compile_decode": args.compile and not args.skip_gen,
              "compile_transformers": args.compile_transformers, "transformers_attention": attn,
              "torch": torch.__version__, "transformers": transformers.__version__, "memory": meter.how,
              "warmup": args.warmup, "iters": args.iters, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"{args.model} ({args.shape}): {cfg.family}, {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads "
          f"({cfg.n_kv_head} kv) x {cfg.head_dim}, d_ff {cfg.d_ff}, vocab {cfg.vocab_size}, "
          f"{ours.num_params() / 1e6:.2f}M params | {dev_name}, {torch.get_num_threads()} threads | {dtype} | "
          f"torch {torch.__version__}, transformers {transformers.__version__} ({attn} attention) | "
          f"compile: ours {args.compile}, transformers {args.compile_transformers} | "
          f"medians of {args.iters} after {args.warmup} warm-up")
    g = torch.Generator().manual_seed(args.seed + 1)

    if not args.skip_train and args.lengths != "fixed":
        r = bench_lengths(args, ours, theirs, cfg, device, amp)
        report["train_lengths"] = dict(r, kind=args.lengths, batch_size=args.batch_size, max_len=args.max_len)
        L = r["lengths"]
        print(f"\ntrain step, {args.lengths} lengths (median {L['median']:.0f}, mean {L['mean']:.0f}, max {L['max']} "
              f"tokens), {args.batch_size} examples per step, --max-len {args.max_len}; real tokens only, over all "
              f"{args.iters} timed steps (the same steps for each)")
        print(f"{'':<20} {'real tokens/s':>14} {'ms/step':>10} {'padding':>8}")
        for k in ("ours", "ours packed", "transformers"):
            name = {"ours": "ours padded", "transformers": "transformers padded"}.get(k, k)
            print(f"{name:<20} {r[k]['real_tokens_per_s']:>14,.0f} {r[k]['ms_per_step']:>10.1f} {r[k]['pad_frac']:>8.1%}")
        print(f"packed / padded {r['packed/padded']:.2f}x, packed / transformers {r['packed/transformers']:.2f}x")
        print("spread of ms/step (median, min-max; the steps differ in length): "
              + "; ".join(spread_text(k, r[k]["spread_ms"]) for k in ("ours", "ours packed", "transformers")))
    elif not args.skip_train:
        B, T = args.batch_size, args.max_len
        ids = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
        x, y = ids[:, :-1].clone(), ids[:, 1:].clone()
        y[:, : T // 4] = -100                                  # a prompt whose tokens carry no loss, as in train.py
        w = 0.5 + torch.rand(B, generator=g)                   # severity weights in [0.5, 1.5)
        n_tok = (y != -100).sum().float()
        batch = tuple(t.to(device) for t in (x, y, w, n_tok))
        # same weights -> same loss: a check that the comparison is fair (and that the weights really are shared)
        with torch.no_grad(), amp:
            l_ours, l_hf = loss_ours(ours, *batch).item(), loss_transformers(theirs, *batch).item()
        print(f"same weights, same batch: loss ours {l_ours:.5f} vs transformers {l_hf:.5f}")
        if abs(l_ours - l_hf) > (1e-4 if dtype == "fp32" else 2e-2) * abs(l_hf):
            print("warning: the two losses differ: the comparison is not like for like", file=sys.stderr)
        report["train_loss_check"] = {"ours": l_ours, "transformers": l_hf}
        steps, opts = make_train_steps(ours, theirs, batch, amp, device.type == "cuda", args.compile,
                                       args.compile_transformers)
        try:
            res = run_alternating("train", steps, args.warmup, args.iters, device, meter, args.quiet)
        except Exception as e:   # noqa: BLE001 - a compile failure must not lose the eager figures
            if not args.compile:
                raise
            print(f"warning: compiled training step failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                  "timing eager instead", file=sys.stderr)
            steps, opts = make_train_steps(ours, theirs, batch, amp, device.type == "cuda", False, False)
            report["compile_train"] = False
            res = run_alternating("train", steps, args.warmup, args.iters, device, meter, args.quiet)
        own = {"ours": own_bytes(ours, opts["ours"]), "transformers": own_bytes(theirs, opts["transformers"])}
        s = summarise(res, {k: B * T for k in IMPLS}, 1, ours.flops_per_token(T), peak_flops, own)
        report["train"] = dict(s, batch_size=B, seq_len=T, flops_per_token=ours.flops_per_token(T))
        print_table(f"train step: batch {B} x {T} tokens, weighted per-token CE, AdamW"
                    f"{' (fused)' if device.type == 'cuda' else ''}", s)
        if args.profile:
            profile(steps, args.profile, device)
        for o in opts.values():   # free the optimizer state before generation
            o.state.clear()
        del steps, opts

    if not args.skip_gen:
        gen_dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        ours.eval().to(gen_dt)
        theirs.eval().to(gen_dt)
        for p in list(ours.parameters()) + list(theirs.parameters()):
            p.grad = None
        if args.compile:
            ours.compile_decode()
        Bg, P, N = args.gen_batch_size, args.gen_prompt_len, args.max_new_tokens
        prompts = torch.randint(1, cfg.vocab_size, (Bg, P), generator=g).to(device)
        steps, counts = make_gen_steps(ours, theirs, prompts, N, args.seed)
        try:
            res = run_alternating("generate", steps, args.warmup, args.iters, device, meter, args.quiet)
        except Exception as e:   # noqa: BLE001 - compiling the decode step is best effort
            if not args.compile:
                raise
            print(f"warning: compiled decode step failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                  "timing eager generation instead", file=sys.stderr)
            del ours.hidden                                    # back to the class's (eager) method
            report["compile_decode"] = False
            res = run_alternating("generate", steps, args.warmup, args.iters, device, meter, args.quiet)
        if counts["ours"] != counts["transformers"] or counts["ours"] != Bg * N:
            print(f"warning: new tokens differ: ours {counts['ours']}, transformers {counts['transformers']}, "
                  f"expected {Bg * N}", file=sys.stderr)
        ctx = P + N // 2      # average context length of a decode step, for the attention FLOPs
        fwd_flops = ours.flops_per_token(ctx) / 3
        own = {"ours": own_bytes(ours), "transformers": own_bytes(theirs)}
        s = summarise(res, counts, N, fwd_flops, peak_flops, own)
        report["gen"] = dict(s, gen_batch=Bg, prompt_len=P, new_tokens=N)
        print_table(f"generate: {Bg} prompts x {P} tokens, {N} new tokens each, sampled (T=0.7); "
                    f"ms/step = per new token", s)
        if args.profile:
            profile(steps, args.profile, device)

    print(f"\npeak MiB = own weights{' + optimizer state' if not args.skip_train else ''} + the step's peak growth "
          f"({meter.how}); MFU only on CUDA with bf16" + (f" (peak {peak_flops / 1e12:.0f} TFLOP/s)" if peak_flops else ""))
    if args.json:
        outputs.write_json(args.json, report)
        print(f"wrote {args.json}", file=sys.stderr)
    return report


# ----------------------------------------------------------------------------------------------------------------
# --memory: what a LoRA step on a 7B model needs, measured on a depth-cut model at full width

GiB = 1024 ** 3


def _storages(tensors):
    """{storage pointer: bytes} of tensors (views of one storage count once)."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if torch.is_tensor(t)}


def _trim():
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
              "config": dict(hf_cfg), "device": _cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
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
        _trim()   # hand freed heap pages back to the OS, so that the step's RSS growth is its own
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
        _trim()
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
        _trim()
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
        _trim()
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
    _trim()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def memory_full_report(args, device):
    """--memory --full-depth: --model at all its blocks, NF4 base (bf16 with --base bf16), LoRA, --grad-checkpoint
    steps at --batch-size x each of --full-seqs; prints and returns qlora_measure's figures."""
    hf_cfg = scaled_config(REGISTRY[args.model]["config"], args.layers, args.hidden)
    seqs = [int(v) for v in args.full_seqs.split(",")]
    shapes = [(args.batch_size, t) for t in seqs]
    dev_name = _cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device)
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


# ----------------------------------------------------------------------------------------------------------------
# --suite: every GPU figure in one command (and --smoke: the same sections at toy sizes on the CPU)

SECTIONS = ("parity", "train", "packing", "generation", "qlora_7b", "fp16_recipe", "compile")
PARITY_MODELS = {"gpt2": "aragpt2-base", "bloom": "bloomz-560m", "qwen2": "qwen2.5-0.5b", "qwen3": "qwen3-0.6b",
                 "lfm2": "lfm2-350m", "llama": "llama-2-7b", "mistral": "mistral-7b-instruct-v0.2"}
TRAIN_MODELS = ("aragpt2-base", "qwen2.5-0.5b", "lfm2-350m")
# Sizes. full: one H100/H200, the whole suite in about 8 minutes; smoke: the same code on 2 CPU cores in ~2 minutes.
# layers/hidden None = the registry shape. budget = seconds per section: a section checks its deadline between its
# units (models, shapes) and cuts what is left; an alarm at budget + SUITE_GRACE stops one that hangs.
SUITE_SIZES = {
    "full": dict(parity=dict(layers=2, hidden=256, batch=2, seq=64),
                 train=dict(layers=None, hidden=None, batch=16, seq=512, warmup=3, iters=10, compile=TRAIN_MODELS),
                 packing=dict(model="qwen2.5-0.5b", layers=None, hidden=None, batch=16, seq=512, warmup=2, iters=8),
                 generation=dict(model="qwen2.5-0.5b", layers=None, hidden=None, batch=64, prompt=128, new=50,
                                 warmup=2, iters=5, compile=True),
                 qlora_7b=dict(layers=None, hidden=None, shapes=[(8, 512)], bf16=True),
                 fp16_recipe=dict(model="qwen2.5-0.5b", layers=None, hidden=None, steps=6, accum=8, seq=512),
                 budget=dict(parity=40, train=190, packing=40, generation=90, qlora_7b=75, fp16_recipe=30, compile=5)),
    "smoke": dict(parity=dict(layers=1, hidden=64, batch=2, seq=16),
                  train=dict(layers=1, hidden=64, batch=2, seq=32, warmup=1, iters=3, compile=("aragpt2-base",)),
                  packing=dict(model="tiny", layers=None, hidden=None, batch=4, seq=64, warmup=1, iters=3),
                  generation=dict(model="qwen2.5-0.5b", layers=1, hidden=64, batch=4, prompt=8, new=6,
                                  warmup=1, iters=3, compile=True),
                  qlora_7b=dict(layers=2, hidden=256, shapes=[(1, 32)], bf16=True),
                  fp16_recipe=dict(model="qwen2.5-0.5b", layers=1, hidden=64, steps=3, accum=2, seq=16),
                  budget=dict(parity=60, train=90, packing=30, generation=45, qlora_7b=30, fp16_recipe=45, compile=5)),
}
SUITE_GRACE = 60


class SectionTimeout(Exception):
    pass


class Suite:
    """What every section gets: the device, the sizes, the section's deadline, and the other sections' results."""

    def __init__(self, device, smoke, seed, quiet):
        self.device, self.smoke, self.seed, self.quiet = device, smoke, seed, quiet
        self.sizes = SUITE_SIZES["smoke" if smoke else "full"]
        self.cuda = device.type == "cuda"
        self.gpu = torch.cuda.get_device_name(device) if self.cuda else None
        self.peak = peak_bf16(self.gpu)
        self.results = {}
        self.deadline = None
        self.partial = None   # the running section's figures so far

    def left(self):
        return self.deadline - time.monotonic()

    def over(self):
        return time.monotonic() > self.deadline

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def amp(self, dtype=torch.bfloat16):
        return torch.autocast(self.device.type, dtype=dtype)

    def free(self):
        import gc
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        _trim()

    def log(self, msg):
        print(msg, flush=True)


def run_section(name, fn, suite, budget):
    """fn(suite) -> dict of figures, under a deadline of `budget` seconds (the section cuts its remaining units
    itself: it lists them under "cut") and an alarm at budget + SUITE_GRACE. Returns the section's record:
    status ok | cut | failed, seconds, budget_s, and the figures; an exception (CUDA out of memory, a missing kernel,
    a compile error) is recorded with its type and first line instead of ending the suite."""
    import signal
    suite.deadline = time.monotonic() + budget
    suite.partial = None
    rec = {"budget_s": budget}
    t0 = time.perf_counter()

    def alarm(signum, frame):
        raise SectionTimeout(f"ran past its budget of {budget} s + {SUITE_GRACE} s grace: stopped")
    has_alarm = hasattr(signal, "SIGALRM")
    if has_alarm:
        old = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, budget + SUITE_GRACE)
    try:
        out = fn(suite)
        rec.update(out)
        rec["status"] = "cut" if out.get("cut") else "ok"
    except Exception as e:   # noqa: BLE001 - one section failing must not cost the others
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        rec.update(suite.partial or {})   # the figures measured before the failure
        rec.update(status="failed", error=f"{type(e).__name__}: {msg}")
        suite.log(f"[{name}] failed: {rec['error']}")
    finally:
        if has_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        try:
            suite.free()
            if suite.cuda:
                torch.cuda.reset_peak_memory_stats(suite.device)
        except Exception:   # noqa: BLE001 - a broken CUDA context: the next section records its own failure
            pass
    rec["seconds"] = time.perf_counter() - t0
    return rec


def small_config(name, layers, hidden):
    """scaled_config of a registry shape, the width raised where needed to at least two heads of the family's head
    size (Qwen3's is 128: a 64-wide toy would have none)."""
    hf = REGISTRY[name]["config"]
    if hidden:
        c = Config.from_hf(dict(hf))
        hidden = max(hidden, 2 * c.head_dim)
    return scaled_config(hf, layers, hidden)


def _batch(vocab, B, T, g, device):
    ids = torch.randint(0, vocab, (B, T + 1), generator=g)
    x, y = ids[:, :-1].clone(), ids[:, 1:].clone()
    y[:, : T // 4] = -100
    w = 0.5 + torch.rand(B, generator=g)
    n_tok = (y != -100).sum().float()
    return tuple(t.to(device) for t in (x, y, w, n_tok))


def section_parity(S):
    """Every family at a small config of its registry shape (vocabulary and head size kept): ours against
    transformers on the same weights, on the device: max |logit diff| in fp32 and under bf16 autocast, and both
    losses (weighted per-token CE)."""
    z = S.sizes["parity"]
    out, cut = {"layers": z["layers"], "hidden": z["hidden"], "batch": z["batch"], "seq": z["seq"], "families": {}}, []
    S.partial = out   # what run_section keeps if the section is stopped or fails half-way
    for fam, name in PARITY_MODELS.items():
        if S.over():
            cut.append(fam)
            continue
        hf = small_config(name, z["layers"], z["hidden"])
        ours, theirs = build_models(hf, S.device, S.seed)
        ours.eval(), theirs.eval()
        g = torch.Generator().manual_seed(S.seed + 1)
        x, y, w, n_tok = _batch(ours.cfg.vocab_size, z["batch"], z["seq"], g, S.device)
        r = {"model": name, "attention": theirs.config._attn_implementation}
        with torch.no_grad():
            for tag, ctx in (("fp32", nullcontext()), ("bf16", S.amp())):
                with ctx:
                    a = ours(x).float()
                    b = theirs(input_ids=x).logits.float()
                    r[f"max_abs_logit_diff_{tag}"] = (a - b).abs().max().item()
                    r[f"logit_scale_{tag}"] = b.abs().max().item()
                    r[f"loss_ours_{tag}"] = loss_ours(ours, x, y, w, n_tok).item()
                    r[f"loss_transformers_{tag}"] = loss_transformers(theirs, x, y, w, n_tok).item()
        r["ok"] = (r["max_abs_logit_diff_fp32"] <= 1e-3 * max(1.0, r["logit_scale_fp32"])
                   and abs(r["loss_ours_fp32"] - r["loss_transformers_fp32"]) <= 1e-4 * abs(r["loss_transformers_fp32"]))
        out["families"][fam] = r
        S.log(f"[parity] {fam} ({name}): |logit diff| fp32 {r['max_abs_logit_diff_fp32']:.2e}, bf16 "
              f"{r['max_abs_logit_diff_bf16']:.2e}; loss fp32 {r['loss_ours_fp32']:.5f} / {r['loss_transformers_fp32']:.5f}")
        del ours, theirs
        S.free()
    if cut:
        out["cut"] = cut
    return out


def _timed_pair(S, steps, warmup, iters, meter, phase):
    return run_alternating(phase, steps, warmup, iters, S.device, meter, True)


def section_train(S):
    """The training step (bench's default mode) at batch x seq in bf16 autocast, each model ours vs transformers
    interleaved in one process: eager, then our step compiled (transformers eager, as most users run it)."""
    z = S.sizes["train"]
    meter = Meter(S.device)
    out, cut = {"batch": z["batch"], "seq": z["seq"], "dtype": "bf16", "warmup": z["warmup"], "iters": z["iters"],
                "memory": meter.how, "models": {}}, []
    S.partial = out   # what run_section keeps if the section is stopped or fails half-way
    B, T = z["batch"], z["seq"]
    for name in TRAIN_MODELS:
        if S.over():
            cut.append(name)
            continue
        hf = small_config(name, z["layers"], z["hidden"])
        ours, theirs = build_models(hf, S.device, S.seed)
        g = torch.Generator().manual_seed(S.seed + 1)
        batch = _batch(ours.cfg.vocab_size, B, T, g, S.device)
        fpt = ours.flops_per_token(T)
        rec = {"params": ours.num_params(), "flops_per_token": fpt}
        for mode in ("eager", "compile"):
            if mode == "compile" and name not in z["compile"]:
                continue
            if S.over():
                cut.append(f"{name} {mode}")
                continue
            steps, opts = make_train_steps(ours, theirs, batch, S.amp(), S.cuda, mode == "compile", False)
            first = None
            if mode == "compile":   # the first compiled call compiles: timed alone
                if S.cuda:
                    torch._dynamo.reset()
                S.sync()
                t0 = time.perf_counter()
                steps["ours"]()
                S.sync()
                first = time.perf_counter() - t0
            res = _timed_pair(S, steps, z["warmup"], z["iters"], meter, f"train {name} {mode}")
            own = {"ours": own_bytes(ours, opts["ours"]), "transformers": own_bytes(theirs, opts["transformers"])}
            s = summarise(res, {k: B * T for k in IMPLS}, 1, fpt, S.peak, own)
            if first is not None:
                s["first_step_s"] = first
            rec[mode] = s
            S.log(f"[train] {name} {mode}: ours {s['ours']['tokens_per_s']:,.0f} tok/s, transformers "
                  f"{s['transformers']['tokens_per_s']:,.0f} tok/s ({s['ratio']['tokens_per_s']:.2f}x); "
                  + spread_text("ours", s["ours"]["spread_ms"]))
            for o in opts.values():
                o.state.clear()
            del steps, opts
            S.free()
        out["models"][name] = rec
        del ours, theirs, batch
        S.free()
        if S.cuda:
            torch._dynamo.reset()
    if cut:
        out["cut"] = cut
    return out


def section_packing(S):
    """MAQA-like lengths (bench --lengths maqa): ours padded, ours packed (train.py --pack) and transformers padded
    on the same steps, real tokens/s and padding."""
    import types
    z = S.sizes["packing"]
    hf = small_config(z["model"], z["layers"], z["hidden"])
    ours, theirs = build_models(hf, S.device, S.seed)
    args = types.SimpleNamespace(lengths="maqa", warmup=z["warmup"], iters=z["iters"], batch_size=z["batch"],
                                 max_len=z["seq"], seed=S.seed, quiet=True)
    r = bench_lengths(args, ours, theirs, ours.cfg, S.device, S.amp())
    r.update(model=z["model"], batch=z["batch"], max_len=z["seq"], dtype="bf16")
    S.log(f"[packing] {z['model']}: packed / padded {r['packed/padded']:.2f}x, padding "
          f"{r['ours']['pad_frac']:.1%} -> {r['ours packed']['pad_frac']:.1%}")
    return r


def section_generation(S):
    """Sampled generation (bench's gen mode): batch x prompt tokens, `new` sampled tokens each, ours vs transformers'
    generate in bf16 (CUDA; fp32 on the CPU), eager, then our decode step compiled."""
    z = S.sizes["generation"]
    hf = small_config(z["model"], z["layers"], z["hidden"])
    ours, theirs = build_models(hf, S.device, S.seed)
    dt = torch.bfloat16 if S.cuda else torch.float32
    ours.eval().to(dt)
    theirs.eval().to(dt)
    Bg, P, N = z["batch"], z["prompt"], z["new"]
    g = torch.Generator().manual_seed(S.seed + 1)
    prompts = torch.randint(1, ours.cfg.vocab_size, (Bg, P), generator=g).to(S.device)
    meter = Meter(S.device)
    out, cut = {"model": z["model"], "batch": Bg, "prompt_len": P, "new_tokens": N, "dtype": str(dt)[6:]}, []
    S.partial = out   # what run_section keeps if the section is stopped or fails half-way
    fwd = ours.flops_per_token(P + N // 2) / 3
    for mode in ("eager", "compile"):
        if mode == "compile" and not z["compile"]:
            continue
        if S.over():
            cut.append(mode)
            continue
        if mode == "compile":
            ours.compile_decode()
        steps, counts = make_gen_steps(ours, theirs, prompts, N, S.seed)
        first = None
        if mode == "compile":
            S.sync()
            t0 = time.perf_counter()
            steps["ours"]()
            S.sync()
            first = time.perf_counter() - t0
        res = _timed_pair(S, steps, z["warmup"], z["iters"], meter, f"generate {mode}")
        s = summarise(res, counts, N, fwd, S.peak, {"ours": own_bytes(ours), "transformers": own_bytes(theirs)})
        s["tokens_match"] = counts["ours"] == counts["transformers"] == Bg * N
        if first is not None:
            s["first_call_s"] = first
        out[mode] = s
        S.log(f"[generation] {mode}: ours {s['ours']['tokens_per_s']:,.0f} tok/s, transformers "
              f"{s['transformers']['tokens_per_s']:,.0f} ({s['ratio']['tokens_per_s']:.2f}x); "
              + spread_text("ours", s["ours"]["spread_ms"]))
    if "hidden" in ours.__dict__:
        del ours.hidden
    if cut:
        out["cut"] = cut
    return out


def section_qlora_7b(S):
    """Llama-2-7B's shape at its full depth (32 blocks; smoke: fewer and narrower), NF4 base, LoRA r 16 on
    q_proj,v_proj, --grad-checkpoint: one warm-up step then one timed step per shape; then the same on a bf16 base
    if it fits in what is left (of memory and of the budget)."""
    z = S.sizes["qlora_7b"]
    hf = small_config("llama-2-7b", z["layers"], z["hidden"])
    out, cut = {"model": "llama-2-7b", "claim": "NF4 + --grad-checkpoint at 8 x 512 within 16 GB"}, []
    S.partial = out   # what run_section keeps if the section is stopped or fails half-way
    for base in ("nf4", "bf16"):
        if base == "bf16" and not z["bf16"]:
            continue
        if S.over():
            cut.append(f"{base} base")
            continue
        try:
            r = qlora_measure(hf, S.device, z["shapes"], base=base, seed=S.seed, deadline=S.deadline,
                              log=lambda m: S.log("[qlora_7b]" + m))
        except torch.cuda.OutOfMemoryError as e:
            out[base] = {"status": "out of memory", "error": str(e).splitlines()[0][:300]}
            S.free()
            continue
        for st in r["steps"]:
            st["within_16GB"] = st["peak_bytes"] <= 16e9
            st["peak_GiB"] = st["peak_bytes"] / GiB
        if r["skipped"]:
            cut += [f"{base} {s}" for s in r["skipped"]]
        out[base] = r
        S.free()
    if cut:
        out["cut"] = cut
    return out


def section_fp16_recipe(S):
    """A few optimizer steps of the notebook recipe's mechanics in fp16: NF4 base, LoRA r 16 (q_proj,v_proj), every
    position of a sequence padded to `seq` a target, batch 1 x grad-accum `accum`, fp16 autocast with a GradScaler
    (unscale, clip 1.0, step, update, as train.py). Records the loss scale after each step and which steps the
    scaler skipped (an inf/NaN gradient: the scale drops and the weights stay)."""
    from lora import add_lora
    from nf4 import quantize_nf4
    z = S.sizes["fp16_recipe"]
    hf = small_config(z["model"], z["layers"], z["hidden"])
    torch.manual_seed(S.seed)
    with torch.device("meta"):
        m = Decoder(Config.from_hf(hf))
    m = m.to_empty(device=S.device)
    if m.cfg.tie:
        m.lm_head.weight = m.wte.weight
    m.init_weights(S.seed)
    m = m.to(torch.float16)
    quantize_nf4(m)
    add_lora(m, ["q_proj", "v_proj"], 16, 32, 0.05)
    m.train()
    lora = [p for p in m.parameters() if p.requires_grad]
    for p in lora:   # the adapters stay fp32 (as peft's with autocast); the frozen base is fp16 / NF4
        p.data = p.data.float()
    opt = torch.optim.AdamW(lora, lr=2e-4, fused=S.cuda)
    scaler = torch.amp.GradScaler(S.device.type)
    g = torch.Generator().manual_seed(S.seed + 1)
    V, T = m.cfg.vocab_size, z["seq"]
    out = {"model": z["model"], "accum": z["accum"], "seq": T, "steps": [], "scale_start": scaler.get_scale()}
    S.partial = out   # what run_section keeps if the section is stopped or fails half-way
    cut, times = [], []
    for step in range(z["steps"]):
        if S.over():
            cut.append(f"steps {step + 1}-{z['steps']}")
            break
        t0 = time.perf_counter()
        loss_sum = 0.0
        for _ in range(z["accum"]):
            n = int(torch.randint(T // 8, T, (1,), generator=g))
            ids = torch.full((1, T + 1), m.cfg.eos_id if m.cfg.eos_id is not None else 0, dtype=torch.long)
            ids[0, :n] = torch.randint(1, V, (n,), generator=g)
            x, y = ids[:, :-1].to(S.device), ids[:, 1:].to(S.device)     # labels = input ids, padding included
            with S.amp(torch.float16):
                loss = m(x, targets=y).mean() / z["accum"]
            scaler.scale(loss).backward()
            loss_sum += loss.item()
        before = scaler.get_scale()
        scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(lora, 1.0).item()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        S.sync()
        times.append(time.perf_counter() - t0)
        after = scaler.get_scale()
        out["steps"].append({"loss": loss_sum, "grad_norm": gnorm, "scale": after, "skipped": after < before,
                             "seconds": times[-1]})
    out["scale_changes"] = sum(1 for a, b in zip([out["scale_start"]] + [s["scale"] for s in out["steps"]],
                                                  [s["scale"] for s in out["steps"]]) if a != b)
    out["skipped_steps"] = [i + 1 for i, s in enumerate(out["steps"]) if s["skipped"]]
    out["finite_losses"] = all(math.isfinite(s["loss"]) for s in out["steps"])
    if times:
        out["spread_ms"] = spread(times, 1000)
        out["tokens_per_s"] = z["accum"] * T / statistics.median(times)
    S.log(f"[fp16_recipe] {len(out['steps'])} steps, scale {out['scale_start']:g} -> "
          f"{out['steps'][-1]['scale'] if out['steps'] else '-'}, skipped {out['skipped_steps'] or 'none'}")
    del m, opt
    if cut:
        out["cut"] = cut
    return out


def section_compile(S):
    """Compiled against eager, from the train and generation sections: our step's median ms eager and compiled, the
    speed-up, and the compile time (the first compiled call minus an eager step)."""
    out = {"train": {}, "decode": None}
    tr = S.results.get("train", {})
    for name, rec in (tr.get("models") or {}).items():
        if "eager" in rec and "compile" in rec:
            e, c = rec["eager"]["ours"], rec["compile"]["ours"]
            out["train"][name] = {"eager_ms": e["ms_per_step"], "compiled_ms": c["ms_per_step"],
                                  "speedup": e["ms_per_step"] / c["ms_per_step"],
                                  "compile_s": rec["compile"]["first_step_s"] - e["ms_per_step"] / 1000,
                                  "spread_ms_eager": e["spread_ms"], "spread_ms_compiled": c["spread_ms"]}
    gen = S.results.get("generation", {})
    if "eager" in gen and "compile" in gen:
        e, c = gen["eager"]["ours"], gen["compile"]["ours"]
        out["decode"] = {"eager_ms_per_token": e["ms_per_step"], "compiled_ms_per_token": c["ms_per_step"],
                         "speedup": e["ms_per_step"] / c["ms_per_step"],
                         "first_call_s": gen["compile"]["first_call_s"],
                         "spread_ms_eager": e["spread_ms"], "spread_ms_compiled": c["spread_ms"]}
    if not out["train"] and out["decode"] is None:
        raise RuntimeError("no compiled figure: the train and generation sections ran no compiled step (failed or cut)")
    return out


SECTION_FNS = {"parity": section_parity, "train": section_train, "packing": section_packing,
               "generation": section_generation, "qlora_7b": section_qlora_7b, "fp16_recipe": section_fp16_recipe,
               "compile": section_compile}


def run_suite(args, device):
    """--suite: the sections in order, each under its budget; DIR/report.json and DIR/report.md (atomically, after
    every section, so a killed run leaves what it measured)."""
    import transformers
    transformers.logging.set_verbosity_error()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    names = SECTIONS if args.suite == "all" else tuple(n for n in SECTIONS if n in args.suite.split(","))
    S = Suite(device, args.smoke, args.seed, args.quiet)
    budgets = dict(S.sizes["budget"])
    meta = {"device": S.gpu or _cpu_name(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "threads": torch.get_num_threads(), "smoke": args.smoke,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": list(names), "budget_s": budgets,
            "wide_spread_threshold": WIDE, "command": "python bench.py " + " ".join(sys.argv[1:])}
    report = {"meta": meta}
    print(f"[suite] {', '.join(names)} | {meta['device']} | torch {meta['torch']}, transformers "
          f"{meta['transformers']} | {'smoke (toy sizes)' if args.smoke else 'full sizes'} | budget "
          f"{sum(budgets[n] for n in names)} s", flush=True)
    t0 = time.perf_counter()
    for name in names:
        S.log(f"[{name}] start (budget {budgets[name]} s)")
        rec = run_section(name, SECTION_FNS[name], S, budgets[name])
        S.results[name] = rec
        report[name] = rec
        S.log(f"[{name}] {rec['status']} in {rec['seconds']:.1f} s" + (f": cut {rec['cut']}" if rec.get("cut") else ""))
        meta["seconds"] = time.perf_counter() - t0
        write_reports(args.out, report)
    print(f"[suite] done in {meta['seconds']:.0f} s: " + ", ".join(f"{n} {report[n]['status']}" for n in names))
    print(f"wrote {os.path.join(args.out, 'report.json')} and report.md", file=sys.stderr)
    return report


def write_reports(out_dir, report):
    outputs.write_json(os.path.join(out_dir, "report.json"), report)
    outputs.atomic_write(os.path.join(out_dir, "report.md"), report_md(report))


def _f(v, fmt=",.0f"):
    return "-" if v is None else format(v, fmt)


def _sp(sp):
    if not sp:
        return "-"
    return f"{sp['median']:.4g} ({sp['min']:.4g}-{sp['max']:.4g})"


def _warn_spreads(lines, where, *named):
    for name, sp in named:
        if sp and sp.get("rel_spread") is not None and sp["rel_spread"] > WIDE:
            lines.append(f"\n**warning:** {where}, {name}: wide spread, min {sp['min']:.4g} / median {sp['median']:.4g} "
                         f"/ max {sp['max']:.4g} ms over {sp['n']} steps ({sp['rel_spread']:.0%} of the median): the "
                         "median is not to be trusted.")


def report_md(rep):
    """report.json as Markdown: one section each, medians with (min-max) over the timed steps, a warning line
    where a spread is wide."""
    m = rep["meta"]
    L = [f"# bench.py --suite{' (smoke: toy sizes)' if m['smoke'] else ''}", "",
         f"{m['device']} | torch {m['torch']} (CUDA {m['cuda']}) | transformers {m['transformers']} | "
         f"{m['threads']} CPU threads | {m['date']} | {m.get('seconds', 0):.0f} s in all", "",
         f"`{m['command']}`", "",
         f"Timings are medians, with (min-max) over the timed steps. A spread above {m['wide_spread_threshold']:.0%} "
         "of the median is flagged.", ""]
    for name in m["sections"]:
        r = rep.get(name)
        if r is None:
            continue
        L += [f"## {name}", "", f"status: **{r['status']}** in {r['seconds']:.1f} s (budget {r['budget_s']} s)"]
        if r.get("error"):
            L.append(f"\nerror: `{r['error']}`")
        if r.get("cut"):
            L.append(f"\ncut (over budget): {', '.join(map(str, r['cut']))}")
        L.append("")
        try:
            L += _md_section(name, r)
        except Exception as e:   # noqa: BLE001 - a missing figure must not lose the report
            L.append(f"(no table: {type(e).__name__}: {e})")
        L.append("")
    return "\n".join(L) + "\n"


def _md_section(name, r):
    L = []
    if r["status"] == "failed":
        return L
    if name == "parity":
        L += ["| family | model | attention | max abs logit diff fp32 | bf16 | loss ours / transformers fp32 | bf16 |",
              "|---|---|---|---|---|---|---|"]
        for fam, x in r["families"].items():
            L.append(f"| {fam} | {x['model']} | {x['attention']} | {x['max_abs_logit_diff_fp32']:.2e} | "
                     f"{x['max_abs_logit_diff_bf16']:.2e} | {x['loss_ours_fp32']:.5f} / {x['loss_transformers_fp32']:.5f}"
                     f" | {x['loss_ours_bf16']:.4f} / {x['loss_transformers_bf16']:.4f} |")
    elif name in ("train", "generation"):
        what = "new tokens" if name == "generation" else "tokens"
        L += [f"| model | mode | impl | {what}/s | ms/step (min-max) | peak MiB | MFU |", "|---|---|---|---|---|---|---|"]
        items = r["models"].items() if name == "train" else [(r["model"], r)]
        warn = []
        for model, rec in items:
            for mode in ("eager", "compile"):
                s = rec.get(mode)
                if not s:
                    continue
                for k in IMPLS:
                    x = s[k]
                    mfu = f"{x['mfu']:.1%}" if x.get("mfu") is not None else "-"
                    L.append(f"| {model} | {mode} | {k} | {_f(x['tokens_per_s'])} | {_sp(x.get('spread_ms'))} | "
                             f"{_f(x['peak_mem_mib'])} | {mfu} |")
                    _warn_spreads(warn, f"{model} {mode}", (k, x.get("spread_ms")))
                lo, hi = s["ratio"].get("tokens_per_s_range", (None, None))
                L.append(f"| {model} | {mode} | ours / transformers | {s['ratio']['tokens_per_s']:.2f}x"
                         + (f" ({lo:.2f}-{hi:.2f})" if lo else "") + f" | | {_f(s['ratio']['peak_mem_mib'], '.2f')}x | |")
        L += warn
    elif name == "packing":
        L += ["| impl | real tokens/s | ms/step (min-max) | padding |", "|---|---|---|---|"]
        warn = []
        for k in ("ours", "ours packed", "transformers"):
            x = r[k]
            L.append(f"| {k} | {_f(x['real_tokens_per_s'])} | {_sp(x['spread_ms'])} | {x['pad_frac']:.1%} |")
            _warn_spreads(warn, "packing", (k, x["spread_ms"]))
        L += ["", f"packed / padded {r['packed/padded']:.2f}x; packed / transformers {r['packed/transformers']:.2f}x "
                  f"({r['model']}, {r['batch']} examples per step, --max-len {r['max_len']}; step lengths differ, so "
                  "the spread is partly the data's)"]
        L += warn
    elif name == "qlora_7b":
        L += ["| base | layers x d_model | resident weights GiB | LoRA params | AdamW state MiB | batch x seq | s/step |"
              " tokens/s | peak GiB | within 16 GB |", "|---|---|---|---|---|---|---|---|---|---|"]
        for base in ("nf4", "bf16"):
            x = r.get(base)
            if not x:
                continue
            if "steps" not in x:
                L.append(f"| {base} | {x.get('status')}: {x.get('error', '')} |||||||||")
                continue
            for st in x["steps"]:
                L.append(f"| {base} | {x['layers']} x {x['d_model']} | {x['resident_bytes'] / GiB:.2f} | "
                         f"{x['lora']['params']:,} | {x['optimizer_state_bytes'] / 2**20:.1f} | {st['batch']} x "
                         f"{st['seq']} | {st['seconds']:.2f} | {_f(st['tokens_per_s'])} | {st['peak_GiB']:.2f} | "
                         f"{'yes' if st['within_16GB'] else 'no'} |")
        L += ["", "peak: " + (r.get("nf4") or {}).get("memory", "")]
    elif name == "fp16_recipe":
        L += ["| step | loss | grad norm | scale after | skipped | s |", "|---|---|---|---|---|---|"]
        for i, st in enumerate(r["steps"], 1):
            L.append(f"| {i} | {st['loss']:.4f} | {st['grad_norm']:.3g} | {st['scale']:g} | {st['skipped']} | "
                     f"{st['seconds']:.2f} |")
        L += ["", f"scale {r['scale_start']:g} at the start, {r['scale_changes']} change(s), skipped steps: "
                  f"{r['skipped_steps'] or 'none'}, losses finite: {r['finite_losses']}; "
                  f"{_f(r.get('tokens_per_s'))} tokens/s, ms/step {_sp(r.get('spread_ms'))}"]
        _warn_spreads(L, "fp16_recipe", ("step", r.get("spread_ms")))
    elif name == "compile":
        L += ["| what | eager ms (min-max) | compiled ms (min-max) | speed-up | compile s |", "|---|---|---|---|---|"]
        for model, x in r["train"].items():
            L.append(f"| train step, {model} | {_sp(x['spread_ms_eager'])} | {_sp(x['spread_ms_compiled'])} | "
                     f"{x['speedup']:.2f}x | {x['compile_s']:.1f} |")
        if r.get("decode"):
            x = r["decode"]
            L.append(f"| decode step (per new token) | {_sp(x['spread_ms_eager'])} | {_sp(x['spread_ms_compiled'])} | "
                     f"{x['speedup']:.2f}x | {x['first_call_s']:.1f} (first call) |")
    return L


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU ({line.split(':', 1)[1].strip()}, {os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU ({os.cpu_count()} cores)"


if __name__ == "__main__":
    main()
