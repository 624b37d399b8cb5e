"""
Severity-aware fine-tuning (arXiv 2604.06346): every answer token's cross-entropy is scaled by its example's weight

    w = a * p_nc + b * p_n + c * p_c          (soft severity probabilities from the AraBERT classifier)
    L = sum_t w_t * NLL_t / (number of loss tokens in the whole optimizer step)

so that critical questions pull harder on the gradient. --weights 1,1,1 is plain cross-entropy.

    python train.py --model tiny                                   # offline demo on data/sample (CPU, ~1 min)
    python train.py --model aragpt2-base --weights 0.5,1,1.5 --data my/train.jsonl
    python train.py --model qwen2.5-0.5b --weights strong --lora-rank 16
    torchrun --nproc_per_node=4 train.py --model aragpt2-medium --weights balanced

A flat script: data -> model -> optimizer -> loop. <out> ends up holding model.safetensors + config.json + tokenizer
(loadable by Decoder.from_pretrained and by transformers), state.safetensors (exact resume) and train_log.jsonl.
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

import data
from model import Decoder, add_lora, atomic_write, load_tokenizer, merge_lora

PRESETS = {"ce": (1.0, 1.0, 1.0), "mild": (0.75, 1.0, 1.25), "strong": (0.25, 1.0, 1.75), "balanced": (0.5, 1.0, 1.5)}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "RTX 4090": 165e12}
SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sample")


def peak_bf16(device_name):
    """Dense bf16 peak FLOP/s of a GPU by its name (PEAK_BF16 substring), None if unknown or not a GPU."""
    return next((v for k, v in PEAK_BF16.items() if device_name and k in device_name), None)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny", help="registry name (see model.REGISTRY), HF repo id, or local folder")
    p.add_argument("--data", default=os.path.join(SAMPLE, "train.jsonl"), help="training file, canonical JSONL/CSV (data/README.md)")
    p.add_argument("--eval-data", default="auto", help="held-out file for eval loss; 'auto' = test.jsonl beside --data, 'none' = no eval")
    p.add_argument("--weights", default="balanced", help="a,b,c for non-critical,neutral,critical or a preset: " + ", ".join(f"{k}={','.join(map(str, v))}" for k, v in PRESETS.items()))
    p.add_argument("--out", default=None, help="output folder (default out/<model>-<weights>)")
    p.add_argument("--epochs", type=float, default=3, help="passes over the training data")
    p.add_argument("--max-steps", type=int, default=0, help="optimizer steps; overrides --epochs when > 0")
    p.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-4 with LoRA, 5e-5 full fine-tuning, 3e-3 for a randomly initialised model)")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--schedule", choices=["linear", "cosine", "constant"], default="linear", help="decay after warm-up (to 0)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (never on norms, biases, embeddings)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global grad norm (0 = off)")
    p.add_argument("--max-len", type=int, default=512, help="truncate prompt+answer to this many tokens")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto", help="autocast dtype: auto = bf16 on CUDA, fp32 on CPU; fp16 uses a GradScaler")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--pack", action="store_true", help="padding-free: lay each step's examples (the same ones) end to "
                   "end into rows as wide as the step's longest example, attention and positions restarting at "
                   "every example; same loss, less padding. Micro-batches hold up to --batch-size rows (so fewer "
                   "than --grad-accum may run); under --compile each is one row of exactly --max-len - 1 tokens: "
                   "one shape, one compilation")
    p.add_argument("--seed", type=int, default=1337, help="seed for data order, init and dropout")
    p.add_argument("--eval-every", type=int, default=0, help="eval loss (overall and per severity) every N steps; 0 = only at the end")
    p.add_argument("--save-every", type=int, default=0, help="write a checkpoint every N steps; 0 = only at the end (and on SIGINT/SIGTERM)")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank; 0 = full fine-tuning (notebooks: 16)")
    p.add_argument("--lora-alpha", type=float, default=32, help="LoRA alpha (scale = alpha / rank)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input")
    p.add_argument("--lora-targets", default="qkv,o", help="comma-separated layer names: qkv, o, fc, proj, in_proj, out_proj")
    p.add_argument("--loss-tokens", choices=["answer", "all"], default="answer", help="answer = the paper's formula; all = the notebooks (question tokens too, never padding)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/state.safetensors")
    p.add_argument("--device", default="auto", help="cuda, cpu, cuda:1 ... (auto = cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no per-step lines (the JSONL log is still written)")
    return p.parse_args(argv)


def parse_weights(s):
    """'0.5,1,1.5' or a preset name -> (a, b, c). Raises ValueError with a one-line reason."""
    if s in PRESETS:
        return PRESETS[s]
    parts = s.split(",")
    try:
        w = tuple(float(x) for x in parts)
    except ValueError:
        raise ValueError(f"--weights: {s!r} is neither a,b,c numbers nor a preset ({', '.join(PRESETS)})") from None
    if len(w) != 3 or not all(math.isfinite(x) and x >= 0 for x in w):
        raise ValueError(f"--weights: {s!r} must be three finite non-negative numbers a,b,c")
    return w


def severity_weight(rec, abc):
    """w = a*p_nc + b*p_n + c*p_c for one record."""
    return sum(k * p for k, p in zip(abc, data.severity_probs(rec)))


def encode(records, tok, abc, max_len, loss_tokens):
    """Each record -> (input ids, loss mask, w). Text = prompt + answer + EOS; the loss mask marks the tokens whose
    prediction counts (answer + EOS by default; every token with 'all')."""
    out = []
    for r in records:
        p = tok.encode(data.format_prompt(r["question"]))
        a = tok.encode(r["answer"], special=False) + [tok.eos_id]
        ids = (p + a)[:max_len]
        keep = [loss_tokens == "all"] * len(p) + [True] * len(a)
        out.append((ids, keep[:len(ids)], severity_weight(r, abc), data.SEVERITIES.index(r["severity"])))
    return out


def collate(examples, pad_id, device):
    """Right-pad a micro-batch. x = ids[:-1], y = ids[1:] with -100 where the loss does not count (and on padding).
    Returns x (B, T), y (B, T), w (B,) and the number of padding positions."""
    T = max(len(e[0]) for e in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, (ids, keep, _, _) in enumerate(examples):
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        y[i, :n] = torch.tensor([t if k else -100 for t, k in zip(ids[1:], keep[1:])])
    w = torch.tensor([e[2] for e in examples], dtype=torch.float32)
    pads = sum(T - (len(e[0]) - 1) for e in examples)
    return x.to(device), y.to(device), w.to(device), pads


def token_weights(examples, norm="token"):
    """The weight every loss token of each example carries in the step's loss  sum(weight * NLL) / denominator.
    norm 'token' (the default): the example's severity weight w; denominator = loss tokens of the whole step.
    norm 'example' (the paper's per-instance mean): w / (the example's own number of loss tokens); denominator =
    examples in the whole step. Because this is a per-token value, it stays exact wherever the token lands: in a
    padded row or in a packed row shared with other examples (--pack)."""
    if norm not in ("token", "example"):
        raise ValueError(f"loss normalisation {norm!r}: choose token or example")
    return [e[2] if norm == "token" else e[2] / max(1, sum(e[1][1:])) for e in examples]


def pack_rows(lengths, width):
    """First-fit decreasing: example indices -> rows whose lengths sum to at most `width` (each length <= width).
    Longest first, each into the first row with room; deterministic (ties by index). Returns [[indices], ...]."""
    rows, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = next((r for r, f in enumerate(free) if f >= lengths[i]), None)
        if r is None:
            rows.append([])
            free.append(width)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= lengths[i]
    return rows


def pack_step(examples, width, max_rows, pad_id, device, norm="token", fixed=False, flops=None):
    """--pack: the examples of one step laid end to end into rows (first-fit decreasing), cut into micro-batches of
    at most max_rows rows. Each example keeps its own x = ids[:-1], y = ids[1:] (-100 where the loss does not
    count), and the model is told where each example starts (segments), so attention, positions and LFM2's conv
    restart there. The slots left at a row's end are padding (segment -1, y = -100, weight 0).
    Row width: fixed -> rows of exactly `width` tokens (one shape for --compile). Otherwise each micro-batch is as
    wide as its fullest row, and the rows are cut at whichever width W from the step's longest example up to
    `width` (the longest times 1, 2, 4 ..., each narrowed to the least width that needs no more rows) costs the
    fewest slots * flops(slot width): flops(T) = training FLOPs per token at row width T (Decoder.flops_per_token),
    or 1 (fewest slots, i.e. least padding) without it. Wider rows leave less padding but spend more on the masked
    T x T attention, which matters for tiny models only.
    Returns [(x (R, T), y (R, T), w (R, T) per-token weight (see token_weights), padding slots, seg (R, T)), ...];
    seg holds each token's index into `examples`."""
    lengths = [len(e[0]) - 1 for e in examples]
    weights = token_weights(examples, norm)
    flops = flops or (lambda T: 1.0)

    def layout(W):   # -> ([(rows, T) per micro-batch], cost); rows fullest first
        rows = pack_rows(lengths, W)
        if not fixed:   # as many rows, as narrow as FFD allows (binary search): the rows come out evenly filled
            lo, hi = max(max(lengths), -(-sum(lengths) // len(rows))), W
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if len(pack_rows(lengths, mid)) <= len(rows) else (mid + 1, hi)
            narrow = pack_rows(lengths, lo)
            rows = narrow if len(narrow) <= len(rows) else rows
        rows.sort(key=lambda r: -sum(lengths[i] for i in r))
        groups = [rows[j:j + max_rows] for j in range(0, len(rows), max_rows)]
        groups = [(g, W if fixed else sum(lengths[i] for i in g[0])) for g in groups]
        return groups, sum(len(g) * T * flops(T) for g, T in groups)

    longest = max(lengths)
    candidates = [width] if fixed else sorted({*(longest << k for k in range(12) if longest << k < width), width})
    groups, _ = min((layout(W) for W in candidates), key=lambda gc: gc[1])
    out = []
    for group, T in groups:
        x = torch.full((len(group), T), pad_id, dtype=torch.long)
        y = torch.full((len(group), T), -100, dtype=torch.long)
        w = torch.zeros((len(group), T), dtype=torch.float32)
        seg = torch.full((len(group), T), -1, dtype=torch.long)
        for b, row in enumerate(group):
            t = 0
            for i in row:
                ids, keep = examples[i][0], examples[i][1]
                n = lengths[i]
                x[b, t:t + n] = torch.tensor(ids[:-1])
                y[b, t:t + n] = torch.tensor([tk if kp else -100 for tk, kp in zip(ids[1:], keep[1:])])
                w[b, t:t + n] = weights[i]
                seg[b, t:t + n] = i
                t += n
        pads = len(group) * T - sum(lengths[i] for row in group for i in row)
        out.append((x.to(device), y.to(device), w.to(device), pads, seg.to(device)))
    return out


def step_batches(n_examples, step, per_step, seed):
    """Indices of the examples of optimizer step `step`: each epoch is a fresh seeded permutation, cut into global
    batches of per_step (the ragged tail is dropped). Pure function of (step, seed): resuming needs no data state."""
    per_epoch = n_examples // per_step
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[k * per_step:(k + 1) * per_step], epoch


def lr_at(step, total, peak, warmup, schedule):
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * frac))
    return peak * (1 - frac) if schedule == "linear" else peak


@torch.no_grad()
def evaluate_loss(model, examples, batch_size, pad_id, device, amp, pack_width=0):
    """Mean unweighted answer-token NLL, overall and per severity class (what the weighting should move).
    pack_width > 0: examples packed into rows of at most that many tokens (--pack, see pack_step), batch_size rows
    at a time."""
    model.eval()
    tot, cnt = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    step = batch_size * (8 if pack_width else 1)
    for i in range(0, len(examples), step):
        chunk = examples[i:i + step]
        per_ex, n = torch.zeros(len(chunk), dtype=torch.float64), torch.zeros(len(chunk), dtype=torch.float64)
        if pack_width:   # per-example sums from each token's example index
            for x, y, _, _, seg in pack_step(chunk, pack_width, batch_size, pad_id, device,
                                             flops=model.flops_per_token):
                with amp:
                    nll = model(x, targets=y, segments=seg).double().cpu()
                real = seg.cpu() >= 0
                per_ex.index_add_(0, seg.cpu()[real], nll[real])
                n.index_add_(0, seg.cpu()[real], (y.cpu()[real] != -100).double())
        else:
            x, y, _, _ = collate(chunk, pad_id, device)
            with amp:
                nll = model(x, targets=y).double().cpu()
            per_ex, n = nll.sum(1), (y != -100).sum(1).double().cpu()
        for j, e in enumerate(chunk):
            for c in (0, e[3] + 1):
                tot[c] += per_ex[j]
                cnt[c] += n[j]
    model.train()
    out = {"eval_loss": (tot[0] / cnt[0]).item()}
    out.update({f"eval_loss_{s}": (tot[i + 1] / cnt[i + 1]).item() for i, s in enumerate(data.SEVERITIES) if cnt[i + 1] > 0})
    return out


# -- checkpoint: one safetensors file holds every tensor (model, optimizer, RNG); its metadata holds the rest --------

def save_state(path, model, opt, scaler, step, args_dict):
    from safetensors.torch import save_file
    t = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    sd = opt.state_dict()
    for pid, st in sd["state"].items():
        for k, v in st.items():
            t[f"opt.{pid}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    t["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        t["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"step": step, "param_groups": sd["param_groups"], "args": args_dict,
            "scaler": scaler.state_dict() if scaler.is_enabled() else None}
    seen, uniq = {}, {}
    for k, v in t.items():   # tied weights share storage; safetensors refuses aliases, so store one copy
        key = (v.data_ptr(), v.shape) if v.numel() else (k,)
        if key in seen:
            meta.setdefault("aliases", {})[k] = seen[key]
        else:
            seen[key], uniq[k] = k, v
    atomic_write(path, lambda p: save_file(uniq, p, metadata={"meta": json.dumps(meta)}))


def load_state(path, model, opt, scaler):
    from safetensors import safe_open
    with safe_open(path, framework="pt", device="cpu") as f:
        meta = json.loads(f.metadata()["meta"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    for k, src in meta.get("aliases", {}).items():
        t[k] = t[src]
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    state = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(t["rng.cpu"])
    if "rng.cuda" in t and torch.cuda.is_available():
        torch.cuda.set_rng_state(t["rng.cuda"])
    if meta["scaler"] and scaler.is_enabled():
        scaler.load_state_dict(meta["scaler"])
    return meta["step"], meta["args"]


def save_checkpoint(out, raw_model, opt, scaler, step, tok, args_dict):
    """<out>/state.safetensors (resume) and <out>/model.safetensors + config.json + tokenizer (LoRA merged)."""
    save_state(os.path.join(out, "state.safetensors"), raw_model, opt, scaler, step, args_dict)
    if any("lora_" in n for n, _ in raw_model.named_parameters()):
        import copy
        export = merge_lora(copy.deepcopy(raw_model))
    else:
        export = raw_model
    export.save_pretrained(out)
    tok.save(out)


def main(argv=None):
    args = get_args(argv)
    # -- validate everything before anything is written ------------------------------------------------------------
    try:
        abc = parse_weights(args.weights)
        for flag in ("batch_size", "grad_accum", "max_len"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')}: must be >= 1")
        train_recs = data.load_records(args.data)
        eval_path = args.eval_data
        if eval_path == "auto":
            cand = os.path.join(os.path.dirname(os.path.abspath(args.data)), "test.jsonl")
            eval_path = cand if os.path.isfile(cand) and os.path.abspath(cand) != os.path.abspath(args.data) else "none"
        eval_recs = data.load_records(eval_path) if eval_path != "none" else []
    except (ValueError, FileNotFoundError) as e:   # data.DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    # -- processes, device, precision ------------------------------------------------------------------------------
    ddp = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    master = rank == 0
    if args.device == "auto":
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    else:
        device = args.device
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if dev_type == "cuda" else "fp32")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[dtype]
    amp = torch.autocast(dev_type, dtype=amp_dtype) if amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler(dev_type, enabled=dtype == "fp16")
    torch.manual_seed(args.seed + rank)

    out = args.out or os.path.join("out", f"{os.path.basename(args.model.rstrip('/'))}-{args.weights.replace(',', '_')}")
    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)

    # -- model, tokenizer, data -------------------------------------------------------------------------------------
    tok = load_tokenizer(args.model)
    model = Decoder.from_pretrained(args.model, device=device)     # fp32 master weights; autocast does the rest
    random_init = args.model == "tiny" and not os.path.isdir(args.model)
    if args.lora_rank > 0:
        wrapped = add_lora(model, args.lora_targets.split(","), args.lora_rank, args.lora_alpha, args.lora_dropout)
        log(f"LoRA r={args.lora_rank} alpha={args.lora_alpha} on {len(wrapped)} layers")
    lr = args.lr if args.lr is not None else (2e-4 if args.lora_rank else 3e-3 if random_init else 5e-5)
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
    if model.cfg.pos == "learned" and args.max_len > model.cfg.max_pos + 1:   # inputs are ids[:-1]
        log(f"--max-len {args.max_len} exceeds the model's {model.cfg.max_pos} positions: using {model.cfg.max_pos + 1}")
        args.max_len = model.cfg.max_pos + 1
    train_ex = encode(train_recs, tok, abc, args.max_len, args.loss_tokens)
    eval_ex = encode(eval_recs, tok, abc, args.max_len, "answer")
    per_step = args.batch_size * args.grad_accum * world
    if len(train_ex) < per_step:
        print(f"error: {args.data}: {len(train_ex)} examples < one optimizer step ({per_step})", file=sys.stderr)
        sys.exit(2)
    total = args.max_steps or max(1, int(args.epochs * (len(train_ex) // per_step)))

    # AdamW; no weight decay on norms, biases and embeddings (anything 1-D, plus wte/wpe)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and not n.startswith(("wte", "wpe"))]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and not n.startswith(("wte", "wpe")))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                            fused=dev_type == "cuda")
    step = 0
    state_path = os.path.join(out, "state.safetensors")
    if args.resume:
        if not os.path.isfile(state_path):
            print(f"error: {state_path}: --resume but no saved state", file=sys.stderr)
            sys.exit(2)
        step, saved = load_state(state_path, model, opt, scaler)
        for k in ("batch_size", "grad_accum", "world_size", "seed", "loss_tokens", "max_len"):
            now = world if k == "world_size" else getattr(args, k)
            if saved.get(k) != now:   # the data order and the loss depend on these: a resume must not change them
                print(f"error: {state_path}: --resume with {k}={now} but the saved run used {saved.get(k)}", file=sys.stderr)
                sys.exit(2)
        log(f"resumed from {state_path} at step {step}")
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if dev_type == "cuda" else None)
    model.train()

    args_dict = dict(vars(args), weights_abc=abc, lr=lr, world_size=world)
    if master:
        os.makedirs(out, exist_ok=True)
        log_path = os.path.join(out, "train_log.jsonl")
        if args.resume and os.path.isfile(log_path):   # drop log lines past the resumed step
            with open(log_path, encoding="utf-8") as f:
                kept = [ln for ln in f if json.loads(ln).get("step", 0) <= step]
            data.atomic_write(log_path, "".join(kept))
        elif not args.resume and os.path.isfile(log_path):
            os.remove(log_path)
        logf = open(log_path, "a", encoding="utf-8")
        data.atomic_write(os.path.join(out, "args.json"), json.dumps(args_dict, indent=2, ensure_ascii=False))
    nparams = raw_model.num_params()
    gpu = torch.cuda.get_device_name(device) if dev_type == "cuda" else None
    peak = peak_bf16(gpu)
    log(f"model {args.model}: {nparams / 1e6:.1f}M params | {len(train_ex)} train / {len(eval_ex)} eval examples | "
        f"weights a,b,c = {abc} | {total} steps of {per_step} examples | lr {lr:g} | {dtype} on {device}"
        + (f" x{world}" if ddp else ""))

    stop = {"sig": None}

    def on_signal(sig, frame):
        stop["sig"] = sig
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def write_log(rec):
        if master:
            logf.write(json.dumps(rec) + "\n")
            logf.flush()

    crash_at = int(os.environ.get("TRAIN_CRASH_AT_STEP", "0"))   # tests only: die hard (SIGKILL) after this step
    t_start, tokens_seen, start_step = time.time(), 0, step
    while step < total:
        t0 = time.time()
        idx, epoch = step_batches(len(train_ex), step, per_step, args.seed)
        mine = [train_ex[i] for i in idx[rank::world]]
        mine.sort(key=lambda e: len(e[0]))                    # similar lengths together: less padding
        if args.pack:   # the same examples, packed into rows; micro-batches of at most --batch-size rows, or
            # under --compile exactly one full-width row each: one shape, so the step compiles once (the chunked
            # loss loops over B*T rows, so a new number of rows would mean a new graph as surely as a new width)
            batches = pack_step(mine, args.max_len - 1, 1 if args.compile else args.batch_size, pad_id, device,
                                fixed=args.compile, flops=raw_model.flops_per_token)
        else:
            micro = [mine[j::args.grad_accum] for j in range(args.grad_accum)]
            batches = [collate(m, pad_id, device) for m in micro]
        # the loss denominator counts loss tokens of the whole step: every micro-batch, every rank
        n_tok = torch.tensor(float(sum((b[1] != -100).sum().item() for b in batches)), device=device)
        if ddp:
            dist.all_reduce(n_tok)
        lr_now = lr_at(step, total, lr, args.warmup, args.schedule)
        for g in opt.param_groups:
            g["lr"] = lr_now
        loss_sum = torch.zeros((), device=device)
        nll_sum = torch.zeros((), device=device)
        real_tokens, pad_tokens = 0, 0
        for j, (x, y, w, pads, *seg) in enumerate(batches):     # seg: packed rows only
            sync = not ddp or j == len(batches) - 1
            with (nullcontext() if sync else model.no_sync()), amp:
                nll = model(x, targets=y, **({"segments": seg[0]} if seg else {}))   # (B, T) fp32, 0 where y == -100
                weighted = (nll * (w if w.dim() == 2 else w[:, None])).sum()       # w: per token (packed) or per row
                # DDP averages gradients over ranks: multiply by world so the sum over ranks is what we divide
                scaler.scale(weighted * world / n_tok).backward()
            loss_sum += weighted.detach()
            nll_sum += nll.detach().sum()
            real_tokens += x.numel() - pads
            pad_tokens += pads
        if ddp:
            dist.all_reduce(loss_sum)
            dist.all_reduce(nll_sum)
        loss = (loss_sum / n_tok).item()
        if not math.isfinite(loss):
            print(f"error: non-finite loss {loss} at step {step}; stopping. The last good checkpoint in {out} is kept.",
                  file=sys.stderr)
            sys.exit(1)
        scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        step += 1
        if dev_type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        tokens_seen += real_tokens * world
        tok_s = real_tokens * world / dt
        T = max(b[0].shape[1] for b in batches)
        mfu = raw_model.flops_per_token(T) * tok_s / (peak * world) if peak else None
        rec = {"step": step, "epoch": epoch, "loss": loss, "nll": (nll_sum / n_tok).item(), "lr": lr_now,
               "grad_norm": gnorm.item(), "tokens": int(n_tok.item()), "tokens_seen": tokens_seen, "ms": dt * 1000,
               "tok_s": tok_s, "pad_frac": pad_tokens / max(1, pad_tokens + real_tokens)}
        if mfu is not None:
            rec["mfu"] = mfu
        write_log(rec)
        if not args.quiet:
            eta = (time.time() - t_start) / (step - start_step) * (total - step)
            bar = "#" * int(20 * step / total)
            log(f"[{bar:<20}] {step}/{total} eta {int(eta) // 60}:{int(eta) % 60:02d} | loss {loss:.4f} | "
                f"nll {rec['nll']:.4f} | lr {lr_now:.2e} | gnorm {rec['grad_norm']:.2f} | {dt * 1000:.0f} ms | "
                f"{tok_s:,.0f} tok/s | pad {rec['pad_frac']:.0%}" + (f" | mfu {mfu:.1%}" if mfu is not None else ""))
        if eval_ex and ((args.eval_every and step % args.eval_every == 0) or step == total):
            ev = evaluate_loss(raw_model, eval_ex, args.batch_size, pad_id, device, amp,
                               pack_width=args.max_len - 1 if args.pack else 0)
            write_log({"step": step, **ev})
            log("eval | " + " | ".join(f"{k[5:]} {v:.4f}" for k, v in ev.items()))
        last = step == total or stop["sig"] is not None
        if master and (last or (args.save_every and step % args.save_every == 0)):
            save_checkpoint(out, raw_model, opt, scaler, step, tok, args_dict)
        if crash_at and step == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if stop["sig"] is not None:
            log(f"signal {stop['sig']}: saved step {step} to {out}; rerun with --resume to continue")
            if ddp:
                dist.destroy_process_group()
            sys.exit(128 + stop["sig"])
    if master:
        logf.close()
        log(f"done: {out} ({time.time() - t_start:.1f}s)")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
