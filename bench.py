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
import sys
import time
from contextlib import nullcontext

import torch

from benchkit import (Meter, bench_lengths, build_models, check_fits, cpu_name, loss_ours, loss_transformers,
                      make_gen_steps, make_train_steps, memory_full_report, memory_report, own_bytes, print_table,
                      profile, run_alternating, scaled_config, spread_text, summarise)
from hub import REGISTRY
from model import Config, peak_bf16   # peak_bf16: dense bf16 peak FLOP/s by device name (H100 / H200: 989e12)
import outputs
from suite import SECTIONS, run_suite

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
    dev_name = gpu or cpu_name()
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


if __name__ == "__main__":
    main()
