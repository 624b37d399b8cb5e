"""
bench.py --suite: every GPU figure in one command (and --smoke: the same sections at toy sizes on the CPU). A library:
the sections, their sizes and time budgets, and the reports (report.json, report.md); bench.py parses the flags.
"""
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch

from benchkit import (GiB, WIDE, Meter, bench_lengths, build_models, cpu_name, loss_ours, loss_transformers,
                      make_gen_steps, make_train_steps, own_bytes, qlora_measure, run_alternating, scaled_config,
                      spread, spread_text, summarise, trim_memory)
from hub import REGISTRY
from model import Config, Decoder, peak_bf16   # peak_bf16: dense bf16 peak FLOP/s by device name (H100 / H200: 989e12)
import outputs

# --shape small: any registry shape scaled down to this many layers and this width (vocabulary kept)
SMALL = dict(layers=4, hidden=256)
IMPLS = ("ours", "transformers")


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
        trim_memory()

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
    meta = {"device": S.gpu or cpu_name(), "torch": torch.__version__, "transformers": transformers.__version__,
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
