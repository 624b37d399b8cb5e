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
(loadable by Decoder.from_pretrained and by transformers), state.safetensors (exact resume), train_log.jsonl, the
model card README.md and, with LoRA, the adapters alone in peft's format in adapter/.
"""
import cli   # first, and light: cli.start() guards Ctrl-C and the console while the heavy imports load
cli.start(__name__)
import contextlib
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import torch

from checkpoint import (all_finite, append_log, base_generation_config, check_resume, claim_out, load_state, open_log,
                        read_state_meta, refuse_foreign_train, reopen_log, save_checkpoint, try_plot)
import card as model_card
import checkpoint
import data
from distributed import (agree, all_reduce_sum, fsdp_all_finite, fsdp_load_state, fsdp_save_checkpoint, grad_sync,
                         leave, shard, wrap)
from distributed import init as init_processes
from hub import check_name, hub_repo, load_tokenizer, local_folder
from lora import HF_LORA_NAMES, LORA_TARGETS, add_lora, load_adapter, read_adapter_config
from model import Decoder, peak_bf16
import outputs
import tracking
from batching import collate, encode, pack_step

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



def get_args(argv=None):
    num = cli.number
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="registry name (see hub.REGISTRY), HF repo id, or local folder")
    p.add_argument("--data", default=os.path.join(SAMPLE, "train.jsonl"), help="training file: .jsonl/.json/.csv/.tsv/.xlsx "
                   "with the canonical fields or their aliases, e.g. the authors' Question, Answer, غير حرج, متوسط, حرج "
                   "(data/README.md)")
    p.add_argument("--question-col", default=None, help="question column of --data and --eval-data when it is not "
                   "named question (any case)")
    p.add_argument("--answer-col", default=None, help="answer column when it is not named answer (any case)")
    p.add_argument("--preprocess", choices=data.PREPROCESS, default="none", help="what the model reads: none = the "
                   "text as written (the paper's notebooks); arabert = the AraBERT authors' preprocessing "
                   "(data.arabert_preprocess), applied to questions and answers")
    p.add_argument("--eval-data", default="auto", help="held-out file for eval loss; 'auto' = test.jsonl beside --data, 'none' = no eval")
    p.add_argument("--weights", default="balanced", help="a,b,c for non-critical,neutral,critical or a preset: " + ", ".join(f"{k}={','.join(map(str, v))}" for k, v in data.PRESETS.items()))
    p.add_argument("--out", default=None, help="output folder (default out/<model>-<weights>); locked while the run "
                   "lasts. Without --resume, the files of an earlier train.py or evaluate.py run there (model, state, "
                   "config, tokenizer, generation_config.json, args.json, train_log.*, eval.json, predictions.jsonl) "
                   "are removed first and named on stderr; files of those names that no train.py run wrote (a "
                   "classifier, a downloaded model) are never removed: the run is refused")
    p.add_argument("--epochs", type=num(float, lo=0, lo_open=True), default=3, help="passes over the training data (> 0)")
    p.add_argument("--max-steps", type=num(int, lo=0), default=0, help="optimizer steps; overrides --epochs when > 0")
    p.add_argument("--batch-size", type=num(int, lo=1), default=8, help="examples per micro-batch per process")
    p.add_argument("--grad-accum", type=num(int, lo=1), default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=num(float, lo=0, hi=1e30), default=None, help="peak learning rate (default 2e-4 with LoRA, 5e-5 full fine-tuning, 3e-3 for a randomly initialised model); 0 = a dry run that measures the loss without changing the weights")
    p.add_argument("--warmup", type=cli.warmup, default=0, help="linear warm-up: N steps, or a share of the run's "
                   "steps such as 10%%")
    p.add_argument("--schedule", choices=["linear", "cosine", "constant"], default="linear", help="decay after warm-up (to 0)")
    p.add_argument("--weight-decay", type=num(float, lo=0), default=0.0, help="AdamW weight decay (never on norms, biases, embeddings)")
    p.add_argument("--grad-clip", type=num(float, lo=0), default=1.0, help="clip the global grad norm (0 = off)")
    p.add_argument("--max-len", type=num(int, lo=2), default=512, help="truncate prompt+answer to this many tokens")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto", help="autocast dtype: auto = bf16 on CUDA (fp16 with --recipe notebook, as the notebooks), fp32 on CPU; "
                   "fp16 uses a GradScaler")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--pack", action="store_true", help="padding-free: lay each step's examples (the same ones) end to "
                   "end into rows of up to --max-len - 1 tokens (the width with the fewest FLOPs), attention, "
                   "positions and LFM2's conv restarting at every example; same loss, less padding. Micro-batches "
                   "hold up to --batch-size rows (so fewer than --grad-accum may run); under --compile each is one "
                   "row of exactly --max-len - 1 tokens: one shape, one compilation")
    p.add_argument("--seed", type=num(int, lo=0, hi=2**31 - 1), default=1337, help="seed for data order, init and dropout")
    p.add_argument("--eval-every", type=num(int, lo=0), default=0, help="eval loss (overall and per severity) every N steps; 0 = only at the end")
    p.add_argument("--save-every", type=num(int, lo=0), default=1000, help="write a checkpoint every N steps (0 = not by steps); one is also written at the end and on SIGINT/SIGTERM/SIGHUP")
    p.add_argument("--save-minutes", type=num(float, lo=0), default=30, help="also write a checkpoint when this many minutes have passed since the last one (0 = not by time): a kill -9 loses at most this much")
    p.add_argument("--lora-rank", type=num(int, lo=0), default=0, help="LoRA rank; 0 = full fine-tuning (notebooks: 16)")
    p.add_argument("--lora-alpha", type=num(float, lo=0, lo_open=True), default=32, help="LoRA alpha (scale = alpha / rank)")
    p.add_argument("--lora-dropout", type=num(float, lo=0, hi=1, hi_open=True), default=0.05, help="dropout on the LoRA input, in [0, 1)")
    p.add_argument("--lora-targets", default="qkv,o", help="comma-separated layers to adapt, by their HF/peft names "
                   "(q_proj,v_proj = the notebooks' Qwen/Llama setting, adapting only the q and v rows of our fused "
                   "qkv; c_attn,c_proj for GPT-2; query_key_value, dense, dense_h_to_4h, dense_4h_to_h for BLOOM; "
                   "q_proj, k_proj, v_proj, out_proj, in_proj, w1, w2, w3 for LFM2) or ours: qkv, o, fc, proj, "
                   "in_proj, out_proj; notebook = the notebooks' targets for the model's family (NOTEBOOK_LORA_TARGETS)")
    p.add_argument("--init-adapter", default=None, metavar="DIR", help="start the LoRA adapters from a peft "
                   "adapter folder (adapter_config.json + adapter_model.safetensors, e.g. an earlier run's "
                   "<out>/adapter) instead of B = 0; its r and lora_alpha must be --lora-rank and --lora-alpha and "
                   "its modules those of --lora-targets")
    p.add_argument("--severity-source", choices=["probs", "label"], default="probs", help="where w's severity "
                   "comes from: probs = the classifier's soft probabilities p_nc, p_n, p_c (the paper; annotate.py "
                   "adds them); label = one-hot from each record's severity label (w = a, b or c: the ablation), "
                   "which also trains on label-only data")
    p.add_argument("--report-to", choices=tracking.CHOICES, default="none", help=tracking.HELP)
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
    p.add_argument("--check-args", action="store_true", help="check every flag and path (the model's name without "
                   "downloading it, the data files, --out) and exit: 0 and one line when all is well, else the one "
                   "error line; nothing is written or locked (scripts/ablation.sh checks a whole sweep with it)")
    known, _ = p.parse_known_args(argv)         # first pass: which recipe sets the defaults
    p.set_defaults(**RECIPES[known.recipe])
    args = p.parse_args(argv)
    if args.lora_rank == 0:
        p.refuse_unused(argv, {"lora_alpha", "lora_dropout", "lora_targets", "init_adapter"},
                        "with --lora-rank 0 (full fine-tuning): give --lora-rank to train LoRA adapters")
    return args


# ================================ the method: weights -> per-token NLL -> normalisation -> backward ===============
# Upstream of this block: data.parse_weights reads --weights into (a, b, c); data.severity_weight gives each record
# w = a*p_nc + b*p_n + c*p_c; batching.encode tokenises (ids, loss mask, w, severity) and batching.collate /
# batching.pack_step make the micro-batches (x, y, w). What the loss does with w is here:

def loss_scale(w, n_tokens, norm, step_tokens, step_examples):
    """Per-example factor s_i (same shape as w) such that the step's loss is sum_i s_i * sum_t NLL_it, the sums
    running over every example of the optimizer step (all micro-batches, all processes).

        token:   s_i = w_i / step_tokens                      L = sum_i sum_t w_i NLL_it / N
        example: s_i = w_i / n_i / step_examples              L = mean_i (1/n_i) sum_t w_i NLL_it  (the paper)

    n_tokens (n_i): each example's loss tokens; step_tokens (N) and step_examples: the step's totals, counted over
    every micro-batch and all-reduced over processes before the first backward, so the estimator does not depend on
    how the step is split. An example without loss tokens gets 0 and is not counted in step_examples. A packed row
    (several examples in one sequence) gives each token the s_i of the example it belongs to."""
    assert w.shape == n_tokens.shape, f"w {tuple(w.shape)} != n_tokens {tuple(n_tokens.shape)}: (B,) or (R, T) both"
    if norm == "token":
        return w / step_tokens
    return torch.where(n_tokens > 0, w / n_tokens.clamp(min=1) / step_examples, torch.zeros_like(w))


def micro_step(model, x, y, kw, scale, amp, scaler, world):
    """One micro-batch of the method: the per-token NLL (B, T) (0 off the loss tokens) times the loss scale s_i
    (per example (B,), or per token (R, T) for packed rows), summed: this micro-batch's share of the step's loss L;
    then its backward. Gradients add up over the micro-batches; the caller enters the gradient-sync context
    (distributed.grad_sync). world: DDP and FSDP average gradients over the processes, so each share is multiplied
    by their number for the gradients to be those of L. scaler: fp16's GradScaler (a pass-through otherwise).
    Returns the share and the NLL per row (per example, or per token when packed), detached."""
    with amp:
        nll = model(x, targets=y, **kw)                      # (B, T) fp32, 0 where y == -100
        per_row = nll if scale.dim() == 2 else nll.sum(1)    # packed: per token; padded: per example
        part = (per_row * scale).sum()                       # this micro-batch's share of the step's loss
        scaler.scale(part * world).backward()
    return part.detach(), per_row.detach()

# ================================ end of the method ===============================================================


def step_batches(n_examples, step, per_step, seed):
    """Indices of the examples of optimizer step `step`: each epoch is a fresh seeded permutation, cut into global
    batches of per_step (the ragged tail is dropped). Pure function of (step, seed): resuming needs no data state."""
    per_epoch = n_examples // per_step
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[k * per_step:(k + 1) * per_step], epoch


def micro_batches(mine, args, pad_id, train_pad, pad_to, device, flops):
    """This rank's examples of one step -> (micro-batches, each one's loss-token counts for loss_scale, the
    examples' loss-token counts n_i on the CPU). Padded: --grad-accum micro-batches (collate), counts (B,) per
    example. --pack: the same examples packed into rows (pack_step), counts (R, T) per token."""
    if args.pack:   # the same examples, packed into rows; micro-batches of at most --batch-size rows, or
        # under --compile exactly one full-width row each: one shape, so the step compiles once (a new number
        # of rows would recompile as surely as a new width does)
        batches = pack_step(mine, args.max_len - 1, 1 if args.compile else args.batch_size, pad_id, device,
                            fixed=args.compile, flops=flops)
        n_i = torch.tensor([float(sum(e[1][1:])) for e in mine])             # each example's loss tokens
        # per token: its own example's loss-token count (0 on padding), so that loss_scale gives every token
        # the factor of the example it belongs to, whichever row it landed in
        per_ex_tok = [n_i.to(device)[b[4]["segments"].clamp(min=0)] * (b[4]["segments"] >= 0)
                      for b in batches]                                               # (R, T)
        return batches, per_ex_tok, n_i
    micro = [mine[j::args.grad_accum] for j in range(args.grad_accum)]
    batches = [collate(m, train_pad, device, pad_to) for m in micro]
    per_ex_tok = [(b[1] != -100).sum(1).float() for b in batches]               # (B,) per micro-batch
    return batches, per_ex_tok, torch.cat(per_ex_tok).cpu()


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


def progress(rec, total, eta):
    """The console line of one step (the JSONL log record rec; eta in seconds)."""
    bar = "#" * int(20 * rec["step"] / total)
    return (f"[{bar:<20}] {rec['step']}/{total} eta {int(eta) // 60}:{int(eta) % 60:02d} | loss {rec['loss']:.4f} | "
            f"nll {rec['nll']:.4f} | lr {rec['lr']:.2e} | gnorm {rec['grad_norm']:.2f} | {rec['ms']:.0f} ms | "
            f"{rec['tok_s']:,.0f} tok/s | pad {rec['pad_frac']:.0%}" + (f" | mfu {rec['mfu']:.1%}" if "mfu" in rec else ""))


def check_memory_flags(args):
    """--quantize, --grad-checkpoint, --fsdp: refuse combinations that cannot work, before any work starts."""
    if args.quantize != "none" and args.lora_rank <= 0:
        raise cli.UserError("--quantize", f"{args.quantize} freezes the base weights: train adapters on top of "
                             "them with --lora-rank (the notebooks: --lora-rank 16)")
    if args.fsdp:
        if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
            raise cli.UserError("--fsdp", "shards over several processes: launch with "
                                 "torchrun --nproc_per_node=N train.py ... (N >= 2)")
        if args.lora_rank > 0:
            raise cli.UserError("--fsdp", "is for full fine-tuning; LoRA (--lora-rank) trains so few parameters that "
                                 "plain data parallelism (torchrun without --fsdp) or --quantize nf4 is the way")
        if args.dtype == "fp16":
            raise cli.UserError("--fsdp", "--dtype fp16 needs a loss scaler for sharded gradients: use --dtype bf16")


def load_records(path, severity_source, question_col=None, answer_col=None):
    """The records of a data file (its columns as --question-col / --answer-col name them). --severity-source label:
    p_nc, p_n, p_c one-hot from each record's severity label (given, or the argmax of its probabilities), so w = a, b
    or c; label-only data is then accepted. Without it, a record without probabilities is refused with both ways out:
    annotate.py, or this flag."""
    try:
        recs = data.load_records(path, require_probs=severity_source == "probs", question_col=question_col,
                                 answer_col=answer_col)
    except data.DataError as e:
        if e.field == "p_nc" and e.problem.startswith("missing field"):
            raise data.DataError(e.path, e.line, e.field, e.problem.rstrip(")") + ", or train on the severity label "
                                 "alone: train.py --severity-source label)") from None
        raise
    if severity_source == "label":
        for r in recs:
            r.update(zip(data.PROB_FIELDS, (1.0 if s == r["severity"] else 0.0 for s in data.SEVERITIES)))
    return recs


def main(argv=None):
    """The command line under the contract: a user error is one line "error: ..." and exit status 2."""
    return cli.run(fit, argv)


def fit(argv=None):
    args = get_args(argv)
    # -- validate everything before anything is written ------------------------------------------------------------
    abc = data.parse_weights(args.weights)
    lora_targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]   # "notebook": set once loaded
    bad = [t for t in lora_targets if t.rsplit(".", 1)[-1] not in LORA_TARGETS + HF_LORA_NAMES + ("notebook",)]
    if bad or not lora_targets:
        raise cli.UserError("--lora-targets", f"{bad[0] if bad else args.lora_targets!r} is not a layer name: "
                                               f"choose from the HF/peft names {', '.join(HF_LORA_NAMES)} or ours, "
                                               f"{', '.join(LORA_TARGETS)}")
    cli.input_file(args.data, "--data")
    tracking.check(args.report_to)   # a library that is not installed: one line, before any work
    init_cfg = None
    if args.init_adapter is not None:
        if args.resume:
            raise cli.UserError("--init-adapter", "a resumed run continues from its own state: drop one of the two")
        init_cfg = read_adapter_config(args.init_adapter)
        for key, flag, ours in (("r", "--lora-rank", args.lora_rank), ("lora_alpha", "--lora-alpha", args.lora_alpha)):
            if float(init_cfg[key]) != float(ours):
                raise cli.UserError("--init-adapter", f"{args.init_adapter} has {key} {init_cfg[key]}, this run "
                                                      f"{flag} {ours:g}: give {flag} {init_cfg[key]}")
    eval_path = args.eval_data
    if eval_path == "auto":
        cand = os.path.join(os.path.dirname(os.path.abspath(args.data)), "test.jsonl")
        eval_path = cand if os.path.isfile(cand) and os.path.abspath(cand) != os.path.abspath(args.data) else "none"
        if eval_path == "none":   # said once: a run without eval loss should not look like one with 0 examples
            if os.environ.get("RANK", "0") == "0":   # stdout: stderr stays one error line if a later check fails
                print(cli.one_line(f"note: --eval-data auto: no {cand} beside --data (or it is --data itself): "
                                   f"training without eval loss (give --eval-data FILE, or --eval-data none to "
                                   f"silence this)"), flush=True)
    elif eval_path != "none":
        cli.input_file(eval_path, "--eval-data")
    out = args.out if args.out is not None else os.path.join("out", f"{os.path.basename(args.model.rstrip('/'))}-{args.weights.replace(',', '_')}")
    if args.check_args:   # what claim_out would refuse, without taking the folder
        cli.output_dir(out, "--out")
        if not args.resume and os.path.isdir(out):
            refuse_foreign_train(out)
    else:
        claim_out(out, args.model, args.resume)
    if args.device != "auto":
        cli.resolve_device(args.device, "--device")
    cols = dict(question_col=args.question_col, answer_col=args.answer_col)
    train_recs = data.preprocess_records(load_records(args.data, args.severity_source, **cols), args.preprocess)
    eval_recs = load_records(eval_path, args.severity_source, **cols) if eval_path != "none" else []
    eval_recs = data.preprocess_records(eval_recs, args.preprocess)
    card_path = os.path.join(out, checkpoint.CARD)
    if os.path.exists(card_path) and not model_card.is_ours(card_path):
        cli.notice(f"note: {card_path} is not a model card written by train.py: left as it is, no card is written")
    adapter_dir = os.path.join(out, checkpoint.ADAPTER_DIR)
    if args.lora_rank and os.path.lexists(adapter_dir) and not checkpoint.ours_only(adapter_dir, checkpoint.ADAPTER_DIR):
        raise cli.UserError("--out", f"{adapter_dir} holds files that are not a train.py adapter: this run would "
                                      "replace that folder (move it, or give another --out)")
    state_path = os.path.join(out, "state.safetensors")
    if args.resume:
        if not os.path.isfile(state_path):
            raise cli.UserError("--resume", f"{state_path}: no saved state to resume from")
        saved_meta = read_state_meta(state_path)   # a corrupt state fails here, in seconds

    if args.pack and args.loss_tokens == "padded":
        raise cli.UserError("--pack", "--loss-tokens padded (the notebook recipe) trains on every sequence padded to "
                                       "--max-len, padding included: there is nothing to pack")
    check_memory_flags(args)
    if args.check_args:
        if not (args.model == "tiny" and not local_folder(args.model)):
            with cli.for_flag("--model"):
                check_name(args.model)
        print(f"train.py: flags ok ({len(train_recs)} train / {len(eval_recs)} eval records, --out {out})")
        return None

    # -- processes, device, precision ------------------------------------------------------------------------------
    rank, world, device = init_processes(args.device)
    master = rank == 0
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    cuda_auto = "fp16" if args.recipe == "notebook" else "bf16"     # the notebooks trained in fp16
    dtype = args.dtype if args.dtype != "auto" else (cuda_auto if dev_type == "cuda" else "fp32")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[dtype]
    amp = torch.autocast(dev_type, dtype=amp_dtype) if amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler(dev_type, enabled=dtype == "fp16")
    torch.manual_seed(args.seed + rank)

    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)

    # -- model, tokenizer, data -------------------------------------------------------------------------------------
    quant = None if args.quantize == "none" else args.quantize
    with cli.for_flag("--model"):
        tok = load_tokenizer(args.model)
        gen_config = base_generation_config(args.model)
        # fp32 master weights, autocast does the rest; a quantised base is frozen whole, so its embeddings, norms
        # and head are held in the compute dtype (the 7B head and embedding: 0.5 GB in bf16 instead of 1 GB in fp32)
        model = Decoder.from_pretrained(args.model, device=device, quantize=quant,
                                        dtype=(amp_dtype if quant else None) or torch.float32)
    model.grad_checkpoint = args.grad_checkpoint
    random_init = args.model == "tiny" and not local_folder(args.model)
    if args.lora_rank > model.cfg.d_model:   # a rank above the width adds parameters and no expressiveness
        raise cli.UserError("--lora-rank", f"{args.lora_rank} exceeds the model's width {model.cfg.d_model}")
    if lora_targets == ["notebook"]:
        lora_targets = NOTEBOOK_LORA_TARGETS[model.cfg.family].split(",")
    if args.lora_rank > 0:
        wrapped = add_lora(model, lora_targets, args.lora_rank, args.lora_alpha, args.lora_dropout)
        log(f"LoRA r={args.lora_rank} alpha={args.lora_alpha} on {len(wrapped)} layers"
            + (" (NF4 base)" if quant else ""))
        if init_cfg is not None:
            load_adapter(model, args.init_adapter)
            log(f"LoRA adapters from {args.init_adapter}")
    if args.fsdp:   # before the optimizer: it must hold the sharded parameters
        shard(model, amp_dtype)
    lr = args.lr if args.lr is not None else (2e-4 if args.lora_rank else 3e-3 if random_init else 5e-5)
    if tok.eos_id is None:
        raise cli.UserError("--model", f"{args.model}: {tok.no_id('eos')}")
    pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
    if model.cfg.pos == "learned" and args.max_len > model.cfg.max_pos + 1:   # inputs are ids[:-1]
        log(f"--max-len {args.max_len} exceeds the model's {model.cfg.max_pos} positions: using {model.cfg.max_pos + 1}")
        args.max_len = model.cfg.max_pos + 1
    train_ex = encode(train_recs, tok, abc, args.max_len, args.loss_tokens, quiet=args.quiet or not master)
    eval_ex = encode(eval_recs, tok, abc, args.max_len, "answer", quiet=args.quiet or not master)
    # --loss-tokens padded: every training sequence padded to --max-len with EOS (the notebooks' pad token)
    pad_to, train_pad = (args.max_len, tok.eos_id) if args.loss_tokens == "padded" else (0, pad_id)
    # A record whose prompt alone fills --max-len keeps no answer token (with --loss-tokens answer): nothing to learn
    # from it, nothing to score. It is dropped with one note per file, not the whole dataset refused; a file left
    # without any record is refused.
    exs_kept = []
    for path, exs in ((args.data, train_ex), (eval_path, eval_ex)):
        kept = [ex for ex in exs if any(ex[1][1:])]   # keep[0] is never predicted
        if exs and not kept:
            raise cli.UserError("--max-len", f"{args.max_len} tokens keep only the prompt of every record of {path}, "
                                              "no answer token to learn from: raise --max-len")
        if len(kept) < len(exs):
            first = next(i for i, ex in enumerate(exs) if not any(ex[1][1:]))
            log(f"note: {path}: dropped {len(exs) - len(kept)} of {len(exs)} records whose prompt alone fills "
                f"--max-len {args.max_len} (the first: record {first + 1}); raise --max-len to keep them")
        exs_kept.append(kept)
    train_ex, eval_ex = exs_kept
    per_step = args.batch_size * args.grad_accum * world
    if len(train_ex) < per_step:
        # fewer examples than one optimizer step: the micro-batch shrinks to what the data fills (evaluate.py and
        # annotate.py take a small set the same way); refused only when not even one example per micro-batch is left
        small = len(train_ex) // (args.grad_accum * world)
        if small < 1:
            raise cli.UserError(args.data, f"{len(train_ex)} examples < one per micro-batch of one optimizer step "
                                            f"({args.grad_accum * world} = --grad-accum x processes)")
        log(f"note: {args.data} has {len(train_ex)} examples, fewer than one optimizer step of {per_step}: "
            f"--batch-size {args.batch_size} -> {small}")
        args.batch_size = small
        per_step = args.batch_size * args.grad_accum * world
    total = args.max_steps or max(1, int(args.epochs * (len(train_ex) // per_step)))
    warmup = cli.warmup_steps(args.warmup, total)
    w_lo, w_hi = min(e[2] for e in train_ex), max(e[2] for e in train_ex)   # the loss is a w-weighted NLL mean

    # AdamW; no weight decay on norms, biases and embeddings (anything 1-D, plus wte/wpe)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and not n.startswith(("wte", "wpe"))]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and not n.startswith(("wte", "wpe")))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                            fused=dev_type == "cuda")
    args_dict = dict(vars(args), weights_abc=abc, lr=lr, world_size=world, dtype=dtype, lora_targets=lora_targets,
                     data_sha256=outputs.sha256(args.data), total_steps=total,
                     init_adapter=os.path.abspath(args.init_adapter) if args.init_adapter else None)
    step, saved_step = 0, None
    if args.resume:
        check_resume(state_path, saved_meta, args_dict)
        if saved_meta["step"] > total:   # fewer steps than already done: not an extension of that run
            raise cli.UserError("--resume", f"the run saved in {state_path} is at step {saved_meta['step']}, past "
                                             f"the {total} steps asked for (--max-steps / --epochs may only grow)")
        step, _ = (fsdp_load_state if args.fsdp else load_state)(state_path, model, opt, scaler)
        saved_step = step
        log(f"resumed from {state_path} at step {step}")
        # a grown --max-steps/--epochs re-plans the decay over the new total from here on: said, with the lr the
        # next step gets under the saved plan and under the new one (a jump the log would otherwise show unexplained)
        sv = saved_meta["args"]
        old_total = sv.get("total_steps") or (sv.get("max_steps") or max(1, int(float(sv.get("epochs", 0)) * (
            len(train_ex) // per_step))))
        if old_total != total:   # stdout, as every note: stderr stays one error line if a later write fails
            before, after = (lr_at(step, t, lr, args.warmup, args.schedule) for t in (old_total, total))
            log(f"note: --resume: the {args.schedule} schedule is re-planned over {total} steps instead of "
                       f"{old_total}: the lr at step {step + 1} is {after:.2g} (the saved run's plan: {before:.2g})"
                       + ("" if args.schedule == "constant" or args.warmup >= total else
                          "; resume with the old --max-steps/--epochs to keep its schedule"))
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    model = wrap(model, device)   # DDP under torchrun (FSDP already sharded it); one process: as it is
    model.train()

    # -- from here on, files are written -----------------------------------------------------------------------------
    if master:
        log_path, logf = open_log(out, args.resume, step, log)
        tracker = tracking.Tracker(args.report_to, out, args_dict, resume_step=step if args.resume else None)
    command = model_card.command_line(sys.argv[1:] if argv is None else argv)
    last_eval = None
    nparams = raw_model.num_params()
    gpu = torch.cuda.get_device_name(device) if dev_type == "cuda" else None
    peak = peak_bf16(gpu)
    log(f"model {args.model}: {nparams / 1e6:.1f}M params | {len(train_ex)} train / {len(eval_ex)} eval examples | "
        f"weights a,b,c = {abc} | {total} steps of {per_step} examples | lr {lr:g} | {dtype} on {device}"
        + (f" x{world}" if world > 1 else ""))

    stop = {"sig": None}

    def on_signal(sig, frame):
        stop["sig"] = sig
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)   # a closed terminal or dropped ssh: save and stop, as for SIGTERM

    def write_log(rec):
        if master:
            append_log(logf, log_path, rec)
            tracker.log(rec["step"], rec)

    def save(step):
        """The checkpoint of this step (--out recreated if it was deleted). A failure of the first save of a new run
        leaves no log of it behind (no log without a model)."""
        nonlocal logf
        if master:
            logf = reopen_log(out, log_path, logf)
        card = None
        if master and not (os.path.exists(card_path) and not model_card.is_ours(card_path)):
            card = model_card.render(dict(args_dict, out=out, eval_path=eval_path), step, total, last_eval, command, hub_repo(args.model))
        try:
            (fsdp_save_checkpoint if args.fsdp else save_checkpoint)(out, raw_model, opt, scaler, step, tok, args_dict,
                                                                     gen_config, card)
        except outputs.WriteError:
            if master and saved_step is None and not args.resume:
                logf.close()
                for f in (log_path, os.path.join(out, "train_log.png")):
                    with contextlib.suppress(OSError):
                        os.remove(f)
            raise

    def diverged(what):
        """Stop: the bad update was not applied; name the checkpoint that remains (never a non-finite one)."""
        kept = (f"the last checkpoint is {state_path} (+ model.safetensors) at step {saved_step}" if saved_step
                else f"no checkpoint was saved in {out}")
        print(f"error: {what} at step {step + 1}: training stopped and nothing of this step was saved; {kept}. "
              f"Try a lower --lr or --grad-clip 1", file=sys.stderr, flush=True)
        leave(1)

    # ================================ the training loop: one optimizer step per turn ================================
    t_start, t_saved, tokens_seen, start_step = time.time(), time.time(), 0, step
    while step < total:
        t0 = time.time()
        # -- batch: the step's examples (a pure function of step and seed), this rank's share, its micro-batches ----
        idx, epoch = step_batches(len(train_ex), step, per_step, args.seed)
        mine = [train_ex[i] for i in idx[rank::world]]
        mine.sort(key=lambda e: len(e[0]))                    # similar lengths together: less padding
        batches, per_ex_tok, n_i = micro_batches(mine, args, pad_id, train_pad, pad_to, device,
                                                 raw_model.flops_per_token)
        # the loss denominators count the whole step: every micro-batch, every rank (loss tokens, and examples
        # that have at least one loss token)
        counts = torch.tensor([float(n_i.sum()), float((n_i > 0).sum())], device=device)
        all_reduce_sum(counts)
        n_tok, n_ex = counts[0], counts[1]
        # -- lr -------------------------------------------------------------------------------------------------------
        lr_now = lr_at(step, total, lr, warmup, args.schedule)
        for g in opt.param_groups:
            g["lr"] = lr_now
        # -- step: the method per micro-batch (gradients reduced over ranks at the last one), then clip --------------
        loss_sum, nll_sum = torch.zeros((), device=device), torch.zeros((), device=device)
        for j, (x, y, w, pads, kw) in enumerate(batches):   # kw: segments (packed rows) or mask (padded)
            scale = loss_scale(w, per_ex_tok[j], args.loss_norm, n_tok, n_ex)   # (B,), packed: (R, T) per token
            with grad_sync(model, raw_model, j == len(batches) - 1):
                part, per_row = micro_step(model, x, y, kw, scale, amp, scaler, world)
            loss_sum += part
            # the same estimator with w = 1: the unweighted NLL
            unit = loss_scale(torch.ones_like(w), per_ex_tok[j], args.loss_norm, n_tok, n_ex)
            nll_sum += (per_row * unit).sum()
        all_reduce_sum(loss_sum, nll_sum)
        loss = loss_sum.item()
        scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        if hasattr(gnorm, "full_tensor"):   # FSDP: the norm of sharded gradients is itself a DTensor
            gnorm = gnorm.full_tensor()
        # -- divergence check, around the update ---------------------------------------------------------------------
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
        # -- log ------------------------------------------------------------------------------------------------------
        if dev_type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        pad_tokens = sum(b[3] for b in batches)
        real_tokens = sum(b[0].numel() for b in batches) - pad_tokens
        tokens_seen += real_tokens * world
        tok_s = real_tokens * world / dt
        rec = {"step": step, "epoch": epoch, "loss": loss, "nll": nll_sum.item(), "lr": lr_now,
               "grad_norm": gnorm.item(), "tokens": int(n_tok.item()), "examples": int(n_ex.item()),
               "tokens_seen": tokens_seen, "ms": dt * 1000,
               "tok_s": tok_s, "pad_frac": pad_tokens / max(1, pad_tokens + real_tokens)}
        assert w_lo * rec["nll"] * (1 - 1e-4) - 1e-6 <= loss <= w_hi * rec["nll"] * (1 + 1e-4) + 1e-6, \
            f"loss {loss} is not a mean of the NLL {rec['nll']} weighted by w in [{w_lo}, {w_hi}] (loss_scale)"
        if peak:   # model FLOPs utilisation at the step's widest micro-batch
            rec["mfu"] = raw_model.flops_per_token(max(b[0].shape[1] for b in batches)) * tok_s / (peak * world)
        write_log(rec)
        if not args.quiet:
            log(progress(rec, total, (time.time() - t_start) / (step - start_step) * (total - step)))
        # -- eval -----------------------------------------------------------------------------------------------------
        evals = eval_ex and ((args.eval_every and step % args.eval_every == 0) or step == total)
        if evals:
            ev = evaluate_loss(raw_model, eval_ex, args.batch_size, pad_id, device, amp,
                               pack_width=args.max_len - 1 if args.pack else 0)
            write_log({"step": step, **ev})
            last_eval = ev
            log("eval | " + " | ".join(f"{k[5:]} {v:.4f}" for k, v in ev.items()))
        # -- save / stop: every rank takes the same decision (distributed.agree) -------------------------------------
        due = (args.save_every and step % args.save_every == 0) or \
            (args.save_minutes and time.time() - t_saved >= 60 * args.save_minutes)
        # stop["sig"] read once: a signal handled from here on counts at the next step, on every rank alike
        due, sig = agree(due, stop["sig"], device)
        last = step == total or sig is not None
        if (master or args.fsdp) and (last or due):
            save(step)   # the model first, the plot after: a plot that fails never costs the checkpoint
            saved_step, t_saved = step, time.time()
        if master and evals:
            try_plot(log_path, os.path.join(out, "train_log.png"))
        if sig is not None:   # one line on stderr; Ctrl-C's begins "interrupted:" as in every script
            if master:
                what = "interrupted" if sig == signal.SIGINT else f"stopped by {signal.Signals(sig).name}"
                cli.notice(f"{what}: saved step {step} to {out}; rerun with --resume to continue")
            leave(128 + sig)
    if master:
        logf.close()
        tracker.close()
        try_plot(log_path, os.path.join(out, "train_log.png"))
        log(f"done: {out} ({time.time() - t_start:.1f}s)")
    leave(0)


if __name__ == "__main__":
    main()
