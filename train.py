"""
Severity-aware fine-tuning (arXiv 2604.06346): every answer token's cross-entropy is scaled by its example's weight

    w = a * p_nc + b * p_n + c * p_c          (soft severity probabilities from the AraBERT classifier)
    L = mean over the step's examples of (1/T) sum_t w * NLL_t     (--loss-norm example, the paper's formula)
    L = sum_t w_t * NLL_t / (number of loss tokens in the whole optimizer step)      (--loss-norm token)

so that critical questions pull harder on the gradient. --weights 1,1,1 is plain cross-entropy.

    python train.py --model tiny                                   # offline demo on data/sample (CPU, ~1 min)
    python train.py --model aragpt2-base --weights 0.5,1,1.5 --data my/train.jsonl
    python train.py --model qwen2.5-0.5b --weights strong --lora-rank 16
    torchrun --nproc_per_node=4 train.py --model aragpt2-medium --weights balanced

A flat script: data -> model -> optimizer -> loop. <out> ends up holding model.safetensors + config.json + tokenizer
(loadable by Decoder.from_pretrained and by transformers), state.safetensors (exact resume) and train_log.jsonl.
"""
import data   # first, and light: data.start() guards Ctrl-C and the console while the heavy imports load
data.start(__name__)
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from model import (HF_LORA_NAMES, LORA_TARGETS, Decoder, add_lora, atomic_write, load_tokenizer, merge_lora,
                   read_generation_config)

PRESETS = {"ce": (1.0, 1.0, 1.0), "mild": (0.75, 1.0, 1.25), "strong": (0.25, 1.0, 1.75), "balanced": (0.5, 1.0, 1.5)}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "RTX 4090": 165e12}
SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sample")
# --recipe: defaults that each individual flag still overrides. paper = the paper's stated method (the parser's own
# defaults). notebook = the authors' notebooks: loss over every position of a sequence EOS-padded to 512 (labels =
# input ids), LoRA r 16 / alpha 32 / dropout 0.05, lr 2e-4, 3 epochs, batch 1 x grad-accum 8, linear decay, no warm-up
# (QLoRA: the frozen base in 4-bit NF4), LoRA on each family's notebook targets (NOTEBOOK_LORA_TARGETS). The README
# lists every difference.
RECIPES = {
    "paper": {},
    "notebook": dict(loss_tokens="padded", loss_norm="example", max_len=512, lora_rank=16, lora_alpha=32,
                     lora_dropout=0.05, lr=2e-4, epochs=3, batch_size=1, grad_accum=8, schedule="linear", warmup=0,
                     quantize="nf4", lora_targets="notebook"),
}
# --lora-targets notebook: the peft target_modules of the authors' notebooks, by model family. The notebooks record
# q_proj,v_proj for the Qwen-style models and c_attn,c_proj for GPT-2; BLOOM's and LFM2's are not recorded, so these
# take peft's own default for the family (query_key_value) and the Qwen-style q_proj,v_proj.
NOTEBOOK_LORA_TARGETS = {"gpt2": "c_attn,c_proj", "qwen2": "q_proj,v_proj", "qwen3": "q_proj,v_proj",
                         "llama": "q_proj,v_proj", "mistral": "q_proj,v_proj", "bloom": "query_key_value",
                         "lfm2": "q_proj,v_proj"}


def peak_bf16(device_name):
    """Dense bf16 peak FLOP/s of a GPU by its name (PEAK_BF16 substring), None if unknown or not a GPU."""
    return next((v for k, v in PEAK_BF16.items() if device_name and k in device_name), None)


def get_args(argv=None):
    num = data.number
    p = data.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="registry name (see model.REGISTRY), HF repo id, or local folder")
    p.add_argument("--data", default=os.path.join(SAMPLE, "train.jsonl"), help="training file, canonical JSONL/CSV (data/README.md)")
    p.add_argument("--eval-data", default="auto", help="held-out file for eval loss; 'auto' = test.jsonl beside --data, 'none' = no eval")
    p.add_argument("--weights", default="balanced", help="a,b,c for non-critical,neutral,critical or a preset: " + ", ".join(f"{k}={','.join(map(str, v))}" for k, v in PRESETS.items()))
    p.add_argument("--out", default=None, help="output folder (default out/<model>-<weights>)")
    p.add_argument("--epochs", type=num(float, lo=0, lo_open=True), default=3, help="passes over the training data (> 0)")
    p.add_argument("--max-steps", type=num(int, lo=0), default=0, help="optimizer steps; overrides --epochs when > 0")
    p.add_argument("--batch-size", type=num(int, lo=1), default=8, help="examples per micro-batch per process")
    p.add_argument("--grad-accum", type=num(int, lo=1), default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=num(float, lo=0, hi=1e30), default=None, help="peak learning rate (default 2e-4 with LoRA, 5e-5 full fine-tuning, 3e-3 for a randomly initialised model); 0 = a dry run that measures the loss without changing the weights")
    p.add_argument("--warmup", type=num(int, lo=0), default=0, help="linear warm-up steps")
    p.add_argument("--schedule", choices=["linear", "cosine", "constant"], default="linear", help="decay after warm-up (to 0)")
    p.add_argument("--weight-decay", type=num(float, lo=0), default=0.0, help="AdamW weight decay (never on norms, biases, embeddings)")
    p.add_argument("--grad-clip", type=num(float, lo=0), default=1.0, help="clip the global grad norm (0 = off)")
    p.add_argument("--max-len", type=num(int, lo=2), default=512, help="truncate prompt+answer to this many tokens")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto", help="autocast dtype: auto = bf16 on CUDA, fp32 on CPU; fp16 uses a GradScaler")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--pack", action="store_true", help="padding-free: lay each step's examples (the same ones) end to "
                   "end into rows of up to --max-len - 1 tokens (the width with the fewest FLOPs), attention, "
                   "positions and LFM2's conv restarting at every example; same loss, less padding. Micro-batches "
                   "hold up to --batch-size rows (so fewer than --grad-accum may run); under --compile each is one "
                   "row of exactly --max-len - 1 tokens: one shape, one compilation")
    p.add_argument("--seed", type=num(int, lo=0, hi=2**31 - 1), default=1337, help="seed for data order, init and dropout")
    p.add_argument("--eval-every", type=num(int, lo=0), default=0, help="eval loss (overall and per severity) every N steps; 0 = only at the end")
    p.add_argument("--save-every", type=num(int, lo=0), default=1000, help="write a checkpoint every N steps (0 = not by steps); one is also written at the end and on SIGINT/SIGTERM")
    p.add_argument("--save-minutes", type=num(float, lo=0), default=30, help="also write a checkpoint when this many minutes have passed since the last one (0 = not by time): a kill -9 loses at most this much")
    p.add_argument("--lora-rank", type=num(int, lo=0), default=0, help="LoRA rank; 0 = full fine-tuning (notebooks: 16)")
    p.add_argument("--lora-alpha", type=num(float, lo=0, lo_open=True), default=32, help="LoRA alpha (scale = alpha / rank)")
    p.add_argument("--lora-dropout", type=num(float, lo=0, hi=1, hi_open=True), default=0.05, help="dropout on the LoRA input, in [0, 1)")
    p.add_argument("--lora-targets", default="qkv,o", help="comma-separated layers to adapt, by their HF/peft names "
                   "(q_proj,v_proj = the notebooks' Qwen/Llama setting, adapting only the q and v rows of our fused "
                   "qkv; c_attn,c_proj for GPT-2; query_key_value, dense, dense_h_to_4h, dense_4h_to_h for BLOOM; "
                   "q_proj, k_proj, v_proj, out_proj, in_proj, w1, w2, w3 for LFM2) or ours: qkv, o, fc, proj, "
                   "in_proj, out_proj; notebook = the notebooks' targets for the model's family (NOTEBOOK_LORA_TARGETS)")
    p.add_argument("--quantize", choices=["none", "nf4"], default="none", help="nf4 = QLoRA: the block weights are "
                   "held as 4-bit NormalFloat codes (absmax per 64 weights) and stay frozen; needs --lora-rank. "
                   "Embeddings, norms and head stay in the autocast dtype; the saved model is an ordinary HF checkpoint "
                   "(adapters merged into the dequantised weights)")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute each block in backward instead of keeping "
                   "its activations (same gradients, far less activation memory, about one more forward of compute)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: full fine-tuning with parameters, gradients and "
                   "optimizer state sharded over the processes (FSDP2 fully_shard per block; bf16 mixed precision "
                   "when the dtype is bf16)")
    p.add_argument("--loss-tokens", choices=["answer", "all", "padded"], default="answer", help="answer = the paper's "
                   "formula; all = question tokens too, never padding; padded = the notebooks' collator: every sequence "
                   "padded with EOS to --max-len and every position counts, padding included")
    p.add_argument("--loss-norm", choices=["example", "token"], default="example", help="example = the paper's "
                   "formula, mean over the step's examples of each example's (1/T) sum_t w*NLL_t; token = sum of w*NLL "
                   "over the step's loss tokens / their number (a long answer weighs more). Both count every "
                   "micro-batch and process of the step, so --grad-accum and DDP do not change them")
    p.add_argument("--recipe", choices=list(RECIPES), default="paper", help="defaults for the flags that differ "
                   "between the paper's stated method (paper) and the authors' notebooks (notebook: " + ", ".join(
                       f"--{k.replace('_', '-')} {v}" for k, v in RECIPES["notebook"].items()) + "); any flag given "
                   "explicitly still wins")
    p.add_argument("--resume", action="store_true", help="continue from <out>/state.safetensors (refused if the experiment changed; --max-steps / --epochs may grow)")
    p.add_argument("--device", default="auto", help="cuda, cpu, cuda:1 ... (auto = cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no per-step lines (the JSONL log is still written)")
    known, _ = p.parse_known_args(argv)         # first pass: which recipe sets the defaults
    p.set_defaults(**RECIPES[known.recipe])
    args = p.parse_args(argv)
    if args.lora_rank == 0:
        p.refuse_unused(argv, {"lora_alpha", "lora_dropout", "lora_targets"},
                        "with --lora-rank 0 (full fine-tuning): give --lora-rank to train LoRA adapters")
    return args


def parse_weights(s):
    """'0.5,1,1.5' or a preset name -> (a, b, c). Raises ValueError with a one-line reason."""
    if s in PRESETS:
        return PRESETS[s]
    parts = s.split(",")
    try:
        w = tuple(float(x) for x in parts)
    except ValueError:
        raise data.UserError("--weights", f"{s!r} is neither a,b,c numbers nor a preset ({', '.join(PRESETS)})") from None
    if len(w) != 3 or not all(math.isfinite(x) and x >= 0 for x in w):
        raise data.UserError("--weights", f"{s!r} must be three finite non-negative numbers a,b,c")
    if not any(w):
        raise data.UserError("--weights", f"{s!r}: all three are 0, so every example has weight 0 and nothing is learned")
    return w


def severity_weight(rec, abc):
    """w = a*p_nc + b*p_n + c*p_c for one record."""
    return sum(k * p for k, p in zip(abc, data.severity_probs(rec)))


def encode(records, tok, abc, max_len, loss_tokens):
    """Each record -> (input ids, loss mask, w, severity class). Text = prompt + answer + EOS; the loss mask marks the
    tokens whose prediction counts (answer + EOS by default; every token with 'all' and 'padded'; the padding that
    'padded' adds is collate's work)."""
    out = []
    for r in records:
        p = tok.encode(data.format_prompt(r["question"]))
        a = tok.encode(r["answer"], special=False) + [tok.eos_id]
        ids = (p + a)[:max_len]
        keep = [loss_tokens != "answer"] * len(p) + [True] * len(a)
        out.append((ids, keep[:len(ids)], severity_weight(r, abc), data.SEVERITIES.index(r["severity"])))
    return out


def loss_scale(w, n_tokens, norm, step_tokens, step_examples):
    """Per-example factor s_i (same shape as w) such that the step's loss is sum_i s_i * sum_t NLL_it, the sums
    running over every example of the optimizer step (all micro-batches, all processes).

        token:   s_i = w_i / step_tokens                      L = sum_i sum_t w_i NLL_it / N
        example: s_i = w_i / n_i / step_examples              L = mean_i (1/n_i) sum_t w_i NLL_it  (the paper)

    n_tokens (n_i): each example's loss tokens; step_tokens (N) and step_examples: the step's totals, counted over
    every micro-batch and all-reduced over processes before the first backward, so the estimator does not depend on
    how the step is split. An example without loss tokens gets 0 and is not counted in step_examples. A packed row
    (several examples in one sequence) gives each token the s_i of the example it belongs to."""
    if norm == "token":
        return w / step_tokens
    return torch.where(n_tokens > 0, w / n_tokens.clamp(min=1) / step_examples, torch.zeros_like(w))


def collate(examples, pad_id, device, pad_to=0):
    """Right-pad a micro-batch. x = ids[:-1], y = ids[1:] with -100 where the loss does not count (and on padding).
    Returns x (B, T), y (B, T), w (B,), the number of padding positions, and the model's keyword arguments ({}).
    pad_to > 0 is the notebooks' collator (--loss-tokens padded): every sequence padded with pad_id to pad_to
    tokens and every position a target, padding included (labels = input ids), while transformers' attention mask
    hid the padding from every query: mask (B, T), True on real tokens, goes to the model."""
    T = max(pad_to, max(len(e[0]) for e in examples)) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, (ids, keep, _, _) in enumerate(examples):
        if pad_to:   # the padding becomes part of the sequence: input and target like any token
            ids, keep = ids + [pad_id] * (T + 1 - len(ids)), keep + [True] * (T + 1 - len(keep))
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        y[i, :n] = torch.tensor([t if k else -100 for t, k in zip(ids[1:], keep[1:])])
    w = torch.tensor([e[2] for e in examples], dtype=torch.float32)
    real = torch.arange(T)[None] < torch.tensor([len(e[0]) - (0 if pad_to else 1) for e in examples])[:, None]
    kw = {"mask": real.to(device)} if pad_to else {}                  # real (B, T): x holds a real token there
    return x.to(device), y.to(device), w.to(device), int((~real).sum()), kw


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


def pack_step(examples, width, max_rows, pad_id, device, fixed=False, flops=None):
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
    Returns [(x (R, T), y (R, T), w (R, T) each token's severity weight, padding slots, {"segments": seg}), ...]:
    the model's keyword arguments, seg (R, T) each token's index into `examples` (see loss_scale for how the loss
    normalisations use it)."""
    lengths = [len(e[0]) - 1 for e in examples]
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
                w[b, t:t + n] = examples[i][2]
                seg[b, t:t + n] = i
                t += n
        pads = len(group) * T - sum(lengths[i] for row in group for i in row)
        out.append((x.to(device), y.to(device), w.to(device), pads, {"segments": seg.to(device)}))
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
            for x, y, _, _, kw in pack_step(chunk, pack_width, batch_size, pad_id, device,
                                            flops=model.flops_per_token):
                with amp:
                    nll = model(x, targets=y, **kw).double().cpu()
                seg = kw["segments"]
                real = seg.cpu() >= 0
                per_ex.index_add_(0, seg.cpu()[real], nll[real])
                n.index_add_(0, seg.cpu()[real], (y.cpu()[real] != -100).double())
        else:
            x, y, _, _, _ = collate(chunk, pad_id, device)
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


def plot_log(log_path, png_path):
    """<out>/train_log.png from train_log.jsonl: training loss and eval loss (overall and per severity) against steps,
    and the learning rate below. Written atomically, with matplotlib's Agg canvas (no display, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    with open(log_path, encoding="utf-8") as f:
        recs = [json.loads(ln) for ln in f if ln.strip()]
    train_recs = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval_loss" in r]
    fig = Figure(figsize=(8, 6), dpi=100, layout="constrained")
    ax, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    ax.plot([r["step"] for r in train_recs], [r["loss"] for r in train_recs], lw=0.8, color="0.6", label="train (weighted)")
    for key, style in [("eval_loss", dict(color="k", lw=2, label="eval, all"))] + [
            (f"eval_loss_{s}", dict(lw=1.2, ls="--", label=f"eval, {s}")) for s in data.SEVERITIES]:
        pts = [(r["step"], r[key]) for r in evals if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, **style)
    ax.set_ylabel("loss (nats / answer token)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax_lr.plot([r["step"] for r in train_recs], [r["lr"] for r in train_recs], color="tab:blue")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)
    canvas = FigureCanvasAgg(fig)
    data.atomic_write(png_path, lambda tmp: canvas.print_png(tmp))
    return fig


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


# What a resume must not change: the data order, the loss, the optimizer and the schedule depend on these. The number
# of steps (--max-steps / --epochs) may grow; --eval-*, --save-*, --device, --quiet and --compile do not alter the run.
RESUME_KEYS = ("model", "weights_abc", "data_sha256", "loss_tokens", "loss_norm", "seed", "batch_size", "grad_accum", "world_size",
               "max_len", "schedule", "warmup", "lr", "weight_decay", "grad_clip", "lora_rank", "lora_alpha",
               "lora_dropout", "lora_targets", "dtype")
STATE_HINT = "delete it to start over, or resume from a copy that is intact"


def read_state_meta(path):
    """The metadata of a resume state (step, args, ...), or ONE UserError naming the file when it is corrupt."""
    from safetensors import safe_open
    with data.reading(path, "resume state", STATE_HINT):
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = (f.metadata() or {}).get("meta")
    try:
        meta = json.loads(meta)
        if not isinstance(meta.get("step"), int) or not isinstance(meta.get("args"), dict):
            raise ValueError("no step or args")
    except (TypeError, ValueError, AttributeError):
        raise data.UserError(path, f"not a resume state written by train.py (metadata unreadable); {STATE_HINT}") from None
    return meta


def check_resume(path, meta, args_dict):
    """Refuse a resume that would change the experiment (see RESUME_KEYS)."""
    saved = meta["args"]
    for k in RESUME_KEYS:
        if k not in saved:   # a state from an older train.py that did not record this setting
            continue
        a, b = saved[k], args_dict[k]
        if k == "lora_targets" and isinstance(a, str):   # older states kept the flag's text
            a = [t.strip() for t in a.split(",") if t.strip()]
        if k == "dtype" and a == "auto":                   # older states kept the flag, not what it resolved to
            continue
        if isinstance(a, list):
            a = tuple(a)
        if isinstance(b, list):
            b = tuple(b)
        if a != b:
            flag = {"weights_abc": "--weights", "data_sha256": "--data (its content)",
                    "world_size": "the number of processes"}.get(k, "--" + k.replace("_", "-"))
            raise data.UserError("--resume", f"{flag} is {b} but the run saved in {path} used {a}: a resume must not "
                                             f"change the experiment; use another --out for a new run")


def load_state(path, model, opt, scaler):
    from safetensors import safe_open
    meta = read_state_meta(path)
    with data.reading(path, "resume state", STATE_HINT):
        with safe_open(path, framework="pt", device="cpu") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
    for k, src in meta.get("aliases", {}).items():
        t[k] = t[src]
    try:
        model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        state = {}
        for k, v in t.items():
            if k.startswith("opt."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        torch.set_rng_state(t["rng.cpu"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise data.UserError(path, f"does not fit this model and optimizer ({str(e).splitlines()[0][:200]}); "
                                   f"{STATE_HINT}") from None
    if "rng.cuda" in t and torch.cuda.is_available():
        torch.cuda.set_rng_state(t["rng.cuda"])
    if meta["scaler"] and scaler.is_enabled():
        scaler.load_state_dict(meta["scaler"])
    return meta["step"], meta["args"]


def base_generation_config(model_name):
    """The text of the base model's generation_config.json (its sampling settings, e.g. Qwen3's top_k/top_p), or
    None when it has none (tiny, a folder without one). model.resolve's download already fetches it."""
    if model_name == "tiny" and not os.path.isdir(model_name):
        return None
    from model import resolve
    f = os.path.join(resolve(model_name), "generation_config.json")
    if not os.path.isfile(f):
        return None
    read_generation_config(f)   # copied as it is into every checkpoint: refuse a broken one before any work
    with open(f, encoding="utf-8-sig") as fh:
        return fh.read()


def save_checkpoint(out, raw_model, opt, scaler, step, tok, args_dict, generation_config=None):
    """<out>/state.safetensors (resume) and <out>/model.safetensors + config.json + tokenizer (LoRA merged), plus the
    base model's generation_config.json when it has one (text), so the fine-tuned folder samples as its base does."""
    save_state(os.path.join(out, "state.safetensors"), raw_model, opt, scaler, step, args_dict)
    if any("lora_" in n for n, _ in raw_model.named_parameters()):
        import copy
        export = merge_lora(copy.deepcopy(raw_model))
    else:
        export = raw_model
    export.save_pretrained(out)
    tok.save(out)
    if generation_config is not None:
        data.atomic_write(os.path.join(out, "generation_config.json"), generation_config)


def all_finite(model):
    """True when every trainable parameter is finite (what a checkpoint must hold; frozen ones cannot change).
    One device sync."""
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters() if p.requires_grad]).all())


def read_log_lines(log_path, step):
    """Lines of train_log.jsonl up to `step`, for a resume. A line cut off by a kill (the last one) is dropped."""
    kept, dropped = [], 0
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for ln in f:
            try:
                rec = json.loads(ln)
                if not isinstance(rec, dict):
                    raise ValueError
            except ValueError:
                dropped += 1
                continue
            if rec.get("step", 0) <= step:
                kept.append(ln if ln.endswith("\n") else ln + "\n")
    return kept, dropped


# -- FSDP: parameters, gradients and optimizer state sharded over the processes (torch.distributed.fsdp, FSDP2) ----

def shard(model, amp_dtype):
    """fully_shard each block, then the root (embeddings, final norm, head): a block's full weights exist only while
    it runs. With a bf16/fp16 autocast dtype the all-gathered weights are cast to it and gradients are reduced in
    fp32; the sharded master weights and AdamW state stay fp32. Gradients are averaged over ranks, as with DDP."""
    import warnings
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # the loss (B, T) is a view of the model's flat NLL; it is only ever used out of place (nll * w), which is
    # what FSDP's warning about in-place ops on returned views asks for
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) if amp_dtype else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def _plain_twin(model, opt):
    """An unsharded CPU Decoder and an AdamW over it with the same parameter groups (matched by name): the single-
    process objects whose state.safetensors / model.safetensors an FSDP run writes and reads, so that the checkpoint
    format is the same with and without --fsdp."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
    with torch.device("meta"):
        twin = Decoder(model.cfg)
    twin = twin.to_empty(device="cpu")
    if twin.cfg.tie:
        twin.lm_head.weight = twin.wte.weight
    named = dict(twin.named_parameters())
    twin_opt = torch.optim.AdamW([{**{k: v for k, v in g.items() if k != "params"}, "params": [named[n] for n in ns]}
                                  for g, ns in zip(opt.param_groups, groups)])
    return twin, twin_opt, groups


def fsdp_all_finite(model, device):
    """all_finite over the shards of every rank (collective: every rank gets the same answer)."""
    ok = torch.tensor([float(all(bool(torch.isfinite(p.to_local()).all()) for p in model.parameters()))],
                      device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def fsdp_save_checkpoint(out, model, opt, scaler, step, tok, args_dict, generation_config=None):
    """Collective (every rank calls it): gather the full weights and optimizer state onto rank 0's CPU, which writes
    them in the single-process format (save_checkpoint): state.safetensors + an ordinary HF checkpoint."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=o)
    osd = get_optimizer_state_dict(model, opt, options=o)
    if dist.get_rank() == 0:
        twin, twin_opt, groups = _plain_twin(model, opt)
        twin.load_state_dict(msd)
        ids = {n: i for i, n in enumerate(n for ns in groups for n in ns)}
        twin_opt.load_state_dict({"state": {ids[n]: s for n, s in osd["state"].items()},
                                  "param_groups": [{**g, "params": [ids[n] for n in ns]}
                                                   for g, ns in zip(osd["param_groups"], groups)]})
        save_checkpoint(out, twin, twin_opt, scaler, step, tok, args_dict, generation_config)
    dist.barrier()


def fsdp_load_state(path, model, opt, scaler):
    """Every rank reads the (single-process format) state into a plain twin, then hands each rank its shards."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    twin, twin_opt, groups = _plain_twin(model, opt)
    step, saved = load_state(path, twin, twin_opt, scaler)
    o = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, twin.state_dict(), options=o)
    sd = twin_opt.state_dict()
    order = [n for ns in groups for n in ns]
    set_optimizer_state_dict(model, opt, {"state": {order[i]: s for i, s in sd["state"].items()},
                                          "param_groups": [{**g, "params": ns}
                                                           for g, ns in zip(sd["param_groups"], groups)]}, options=o)
    return step, saved


def check_memory_flags(args):
    """--quantize, --grad-checkpoint, --fsdp: refuse combinations that cannot work, before any work starts."""
    if args.quantize != "none" and args.lora_rank <= 0:
        raise data.UserError("--quantize", f"{args.quantize} freezes the base weights: train adapters on top of "
                             "them with --lora-rank (the notebooks: --lora-rank 16)")
    if args.fsdp:
        if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
            raise data.UserError("--fsdp", "shards over several processes: launch with "
                                 "torchrun --nproc_per_node=N train.py ... (N >= 2)")
        if args.lora_rank > 0:
            raise data.UserError("--fsdp", "is for full fine-tuning; LoRA (--lora-rank) trains so few parameters that "
                                 "plain data parallelism (torchrun without --fsdp) or --quantize nf4 is the way")
        if args.dtype == "fp16":
            raise data.UserError("--fsdp", "--dtype fp16 needs a loss scaler for sharded gradients: use --dtype bf16")


def main(argv=None):
    """The command line under the contract: a user error is one line "error: ..." and exit status 2."""
    return data.run(fit, argv)


def fit(argv=None):
    args = get_args(argv)
    # -- validate everything before anything is written ------------------------------------------------------------
    abc = parse_weights(args.weights)
    lora_targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]   # "notebook": set once loaded
    bad = [t for t in lora_targets if t.rsplit(".", 1)[-1] not in LORA_TARGETS + HF_LORA_NAMES + ("notebook",)]
    if bad or not lora_targets:
        raise data.UserError("--lora-targets", f"{bad[0] if bad else args.lora_targets!r} is not a layer name: "
                                               f"choose from the HF/peft names {', '.join(HF_LORA_NAMES)} or ours, "
                                               f"{', '.join(LORA_TARGETS)}")
    data.input_file(args.data, "--data")
    eval_path = args.eval_data
    if eval_path == "auto":
        cand = os.path.join(os.path.dirname(os.path.abspath(args.data)), "test.jsonl")
        eval_path = cand if os.path.isfile(cand) and os.path.abspath(cand) != os.path.abspath(args.data) else "none"
    elif eval_path != "none":
        data.input_file(eval_path, "--eval-data")
    out = args.out if args.out is not None else os.path.join("out", f"{os.path.basename(args.model.rstrip('/'))}-{args.weights.replace(',', '_')}")
    data.output_dir(out, "--out")
    if os.path.isdir(args.model) and os.path.isdir(out) and os.path.samefile(args.model, out):
        raise data.UserError("--out", f"{out} is the --model folder: its weights would be overwritten (give another "
                                      "--out)")
    if args.device != "auto":
        data.resolve_device(args.device, "--device")
    train_recs = data.load_records(args.data)
    eval_recs = data.load_records(eval_path) if eval_path != "none" else []
    state_path = os.path.join(out, "state.safetensors")
    if args.resume:
        if not os.path.isfile(state_path):
            raise data.UserError("--resume", f"{state_path}: no saved state to resume from")
        saved_meta = read_state_meta(state_path)   # a corrupt state fails here, in seconds

    if args.pack and args.loss_tokens == "padded":
        raise data.UserError("--pack", "--loss-tokens padded (the notebook recipe) trains on every sequence padded to "
                                       "--max-len, padding included: there is nothing to pack")
    check_memory_flags(args)

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

    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)

    # -- model, tokenizer, data -------------------------------------------------------------------------------------
    quant = None if args.quantize == "none" else args.quantize
    with data.for_flag("--model"):
        tok = load_tokenizer(args.model)
        gen_config = base_generation_config(args.model)
        # fp32 master weights, autocast does the rest; a quantised base is frozen whole, so its embeddings, norms
        # and head are held in the compute dtype (the 7B head and embedding: 0.5 GB in bf16 instead of 1 GB in fp32)
        model = Decoder.from_pretrained(args.model, device=device, quantize=quant,
                                        dtype=(amp_dtype if quant else None) or torch.float32)
    model.grad_checkpoint = args.grad_checkpoint
    random_init = args.model == "tiny" and not os.path.isdir(args.model)
    if args.lora_rank > model.cfg.d_model:   # a rank above the width adds parameters and no expressiveness
        raise data.UserError("--lora-rank", f"{args.lora_rank} exceeds the model's width {model.cfg.d_model}")
    if lora_targets == ["notebook"]:
        lora_targets = NOTEBOOK_LORA_TARGETS[model.cfg.family].split(",")
    if args.lora_rank > 0:
        wrapped = add_lora(model, lora_targets, args.lora_rank, args.lora_alpha, args.lora_dropout)
        log(f"LoRA r={args.lora_rank} alpha={args.lora_alpha} on {len(wrapped)} layers"
            + (" (NF4 base)" if quant else ""))
    if args.fsdp:   # before the optimizer: it must hold the sharded parameters
        shard(model, amp_dtype)
    lr = args.lr if args.lr is not None else (2e-4 if args.lora_rank else 3e-3 if random_init else 5e-5)
    if tok.eos_id is None:
        raise data.UserError("--model", f"{args.model}: the tokenizer has no EOS token (set eos_token_id in config.json)")
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
    if model.cfg.pos == "learned" and args.max_len > model.cfg.max_pos + 1:   # inputs are ids[:-1]
        log(f"--max-len {args.max_len} exceeds the model's {model.cfg.max_pos} positions: using {model.cfg.max_pos + 1}")
        args.max_len = model.cfg.max_pos + 1
    train_ex = encode(train_recs, tok, abc, args.max_len, args.loss_tokens)
    eval_ex = encode(eval_recs, tok, abc, args.max_len, "answer")
    # --loss-tokens padded: every training sequence padded to --max-len with EOS (the notebooks' pad token)
    pad_to, train_pad = (args.max_len, tok.eos_id) if args.loss_tokens == "padded" else (0, pad_id)
    for path, exs in ((args.data, train_ex), (eval_path, eval_ex)):
        for i, (ids, keep, _, _) in enumerate(exs):
            if not any(keep[1:]):   # keep[0] is never predicted
                raise data.UserError("--max-len", f"{args.max_len} tokens keep only the prompt of record {i + 1} of "
                                                  f"{path}, no answer token to learn from: raise --max-len")
    per_step = args.batch_size * args.grad_accum * world
    if len(train_ex) < per_step:
        raise data.UserError(args.data, f"{len(train_ex)} examples < one optimizer step ({per_step} = --batch-size x "
                                        f"--grad-accum x processes)")
    total = args.max_steps or max(1, int(args.epochs * (len(train_ex) // per_step)))

    # AdamW; no weight decay on norms, biases and embeddings (anything 1-D, plus wte/wpe)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and not n.startswith(("wte", "wpe"))]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and not n.startswith(("wte", "wpe")))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                            fused=dev_type == "cuda")
    args_dict = dict(vars(args), weights_abc=abc, lr=lr, world_size=world, dtype=dtype, lora_targets=lora_targets,
                     data_sha256=data.sha256(args.data))
    step, saved_step = 0, None
    if args.resume:
        check_resume(state_path, saved_meta, args_dict)
        if saved_meta["step"] > total:   # fewer steps than already done: not an extension of that run
            raise data.UserError("--resume", f"the run saved in {state_path} is at step {saved_meta['step']}, past "
                                             f"the {total} steps asked for (--max-steps / --epochs may only grow)")
        step, _ = (fsdp_load_state if args.fsdp else load_state)(state_path, model, opt, scaler)
        saved_step = step
        log(f"resumed from {state_path} at step {step}")
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if ddp and not args.fsdp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if dev_type == "cuda" else None)
    model.train()

    # -- from here on, files are written -----------------------------------------------------------------------------
    if master:
        os.makedirs(out, exist_ok=True)
        log_path = os.path.join(out, "train_log.jsonl")
        if args.resume and os.path.isfile(log_path):   # drop log lines past the resumed step (and a line cut by a kill)
            kept, dropped = read_log_lines(log_path, step)
            if dropped:
                log(f"note: {log_path}: dropped {dropped} unreadable line(s) (cut off when the run was killed)")
            data.atomic_write(log_path, "".join(kept))
        elif not args.resume and os.path.isfile(log_path):
            os.remove(log_path)
        logf = open(log_path, "a", encoding="utf-8")
        data.write_json(os.path.join(out, "args.json"), args_dict)
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
    signal.signal(signal.SIGHUP, on_signal)   # a closed terminal or dropped ssh: save and stop, as for SIGTERM

    def write_log(rec):
        if master:
            logf.write(json.dumps(rec) + "\n")
            logf.flush()

    def leave(code):
        """All ranks leave together: gloo torn down by a rank that is done while rank 0 still saves the checkpoint
        aborts the process (SIGABRT, "terminate called without an active exception"; 1 run in 15 under load).
        Then a torchrun worker ends at once, its output flushed and every file already written and closed: the
        interpreter's own teardown, which destroys DDP's reducer and the gloo objects it holds in no set order, still
        aborted about 1 run in 60 under load."""
        if ddp:
            dist.barrier()
            dist.destroy_process_group()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        if code:
            sys.exit(code)

    def diverged(what):
        """Stop: the bad update was not applied; name the checkpoint that remains (never a non-finite one)."""
        kept = (f"the last checkpoint is {state_path} (+ model.safetensors) at step {saved_step}" if saved_step
                else f"no checkpoint was saved in {out}")
        print(f"error: {what} at step {step + 1}: training stopped and nothing of this step was saved; {kept}. "
              f"Try a lower --lr or --grad-clip 1", file=sys.stderr, flush=True)
        leave(1)

    t_start, tokens_seen, start_step = time.time(), 0, step
    t_saved = time.time()
    while step < total:
        t0 = time.time()
        idx, epoch = step_batches(len(train_ex), step, per_step, args.seed)
        mine = [train_ex[i] for i in idx[rank::world]]
        mine.sort(key=lambda e: len(e[0]))                    # similar lengths together: less padding
        if args.pack:   # the same examples, packed into rows; micro-batches of at most --batch-size rows, or
            # under --compile exactly one full-width row each: one shape, so the step compiles once (a new number
            # of rows would recompile as surely as a new width does)
            batches = pack_step(mine, args.max_len - 1, 1 if args.compile else args.batch_size, pad_id, device,
                                fixed=args.compile, flops=raw_model.flops_per_token)
            n_i = torch.tensor([float(sum(e[1][1:])) for e in mine])             # each example's loss tokens
            # per token: its own example's loss-token count (0 on padding), so that loss_scale gives every token
            # the factor of the example it belongs to, whichever row it landed in
            per_ex_tok = [n_i.to(device)[b[4]["segments"].clamp(min=0)] * (b[4]["segments"] >= 0)
                          for b in batches]                                               # (R, T)
        else:
            micro = [mine[j::args.grad_accum] for j in range(args.grad_accum)]
            batches = [collate(m, train_pad, device, pad_to) for m in micro]
            per_ex_tok = [(b[1] != -100).sum(1).float() for b in batches]               # (B,) per micro-batch
            n_i = torch.cat(per_ex_tok).cpu()
        # the loss denominators count the whole step: every micro-batch, every rank (loss tokens, and examples
        # that have at least one loss token)
        counts = torch.tensor([float(n_i.sum()), float((n_i > 0).sum())], device=device)
        if ddp:
            dist.all_reduce(counts)
        n_tok, n_ex = counts[0], counts[1]
        lr_now = lr_at(step, total, lr, args.warmup, args.schedule)
        for g in opt.param_groups:
            g["lr"] = lr_now
        loss_sum = torch.zeros((), device=device)
        nll_sum = torch.zeros((), device=device)
        real_tokens, pad_tokens = 0, 0
        for j, (x, y, w, pads, kw) in enumerate(batches):   # kw: segments (packed rows) or mask (padded)
            sync = not ddp or j == len(batches) - 1
            scale = loss_scale(w, per_ex_tok[j], args.loss_norm, n_tok, n_ex)   # (B,), packed: (R, T) per token
            if args.fsdp:   # FSDP's no_sync: reduce-scatter the gradients on the last micro-batch only
                raw_model.set_requires_gradient_sync(sync)
            with (nullcontext() if sync or args.fsdp else model.no_sync()), amp:
                nll = model(x, targets=y, **kw)                      # (B, T) fp32, 0 where y == -100
                per_row = nll if scale.dim() == 2 else nll.sum(1)    # packed: per token; padded: per example
                part = (per_row * scale).sum()                       # this micro-batch's share of the step's loss
                # DDP averages gradients over ranks: multiply by world so the sum over ranks is what we divide
                scaler.scale(part * world).backward()
            loss_sum += part.detach()
            # the same estimator with w = 1: the unweighted NLL
            unit = loss_scale(torch.ones_like(w), per_ex_tok[j], args.loss_norm, n_tok, n_ex)
            nll_sum += (per_row.detach() * unit).sum()
            real_tokens += x.numel() - pads
            pad_tokens += pads
        if ddp:
            dist.all_reduce(loss_sum)
            dist.all_reduce(nll_sum)
        loss = loss_sum.item()
        scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        if hasattr(gnorm, "full_tensor"):   # FSDP: the norm of sharded gradients is itself a DTensor
            gnorm = gnorm.full_tensor()
        # a non-finite loss or gradient never reaches the weights. With fp16 the GradScaler skips an overflowing step
        # itself (and lowers its scale): that is routine, not divergence; a non-finite loss is.
        if not math.isfinite(loss) or (not scaler.is_enabled() and not math.isfinite(gnorm.item())):
            opt.zero_grad(set_to_none=True)
            diverged(f"non-finite loss {loss}" if not math.isfinite(loss) else f"non-finite gradient norm {gnorm.item()}")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        # finite loss and gradient, yet an update can still overflow (a huge --lr, or lr x weight decay): stop before
        # such weights can be saved. Every rank holds the same weights (FSDP: the check is all-reduced over the
        # shards), so all ranks stop together.
        if not (fsdp_all_finite(raw_model, device) if args.fsdp else all_finite(raw_model)):
            diverged("the update made weights non-finite")
        step += 1
        if dev_type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        tokens_seen += real_tokens * world
        tok_s = real_tokens * world / dt
        T = max(b[0].shape[1] for b in batches)
        mfu = raw_model.flops_per_token(T) * tok_s / (peak * world) if peak else None
        rec = {"step": step, "epoch": epoch, "loss": loss, "nll": nll_sum.item(), "lr": lr_now,
               "grad_norm": gnorm.item(), "tokens": int(n_tok.item()), "examples": int(n_ex.item()),
               "tokens_seen": tokens_seen, "ms": dt * 1000,
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
            if master:
                plot_log(log_path, os.path.join(out, "train_log.png"))
        due = (args.save_every and step % args.save_every == 0) or \
            (args.save_minutes and time.time() - t_saved >= 60 * args.save_minutes)
        sig = stop["sig"]   # read once: a signal handled from here on counts at the next step, on every rank alike
        if ddp:   # every rank takes the same decisions: rank 0's clock for saving (an FSDP save is collective), any
            # rank's signal for stopping (so that no rank waits in an all-reduce for one that has left)
            flags = torch.tensor([float(bool(due) and master), float(sig or 0)], device=device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            due, sig = bool(flags[0].item()), (int(flags[1].item()) or None)
        last = step == total or sig is not None
        if (master or args.fsdp) and (last or due):
            if args.fsdp:
                fsdp_save_checkpoint(out, raw_model, opt, scaler, step, tok, args_dict, gen_config)
            else:
                save_checkpoint(out, raw_model, opt, scaler, step, tok, args_dict, gen_config)
            saved_step, t_saved = step, time.time()
        if sig is not None:   # one line on stderr; Ctrl-C's begins "interrupted:" as in every script
            if master:
                what = "interrupted" if sig == signal.SIGINT else f"stopped by {signal.Signals(sig).name}"
                data.notice(f"{what}: saved step {step} to {out}; rerun with --resume to continue")
            leave(128 + sig)
    if master:
        logf.close()
        plot_log(log_path, os.path.join(out, "train_log.png"))
        log(f"done: {out} ({time.time() - t_start:.1f}s)")
    leave(0)


if __name__ == "__main__":
    main()
