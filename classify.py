"""Fine-tune the severity classifier: a small hand-written BERT encoder + a head on [CLS].

Fine-tunes any BERT checkpoint (safetensors only) on a labelled CSV/JSONL file (the paper's classifier reads the
QUESTION only), validates on a seeded stratified split, and writes a folder that annotate.py and transformers
(BertForSequenceClassification; AutoModel, hence bert-score) load: model.safetensors and config.json in HF's
names, vocab.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json, and metrics.json (accuracy,
macro-F1, per-class P/R/F1, confusion matrix, ECE on the validation split).

What a training step computes (z = logits, y = true class, n_y = training examples of class y, L = layers):
  --head          pooler: z = W tanh(P h_[CLS]) + b (BertForSequenceClassification); linear: z = W h_[CLS] + b
                  (seed 004; transformers' BertForSequenceClassification would add a pooler, so with 'linear'
                  only annotate.py and AutoModel (the encoder) read the folder as trained)
  --loss ldam     loss = CE(s * (z - m_y * onehot(y)), y), m_y = C / n_y^(1/4): C = --ldam-c when given (seed 004:
                  1), else chosen so that max_y m_y = --ldam-max-m (Cao et al. 2019's code); s = --ldam-s.
                  --boost-classes A,B treats those classes as having n_y / 10 examples, for the margins only.
                  After training, s is folded into the saved head: softmax(saved logits) = softmax(s * z).
  --ce-epochs E   plain CE for epochs 0..E-1, then --loss (seed 004's "CE for 5 epochs, then LDAM").
  --drw-epoch E   from epoch E on, class weights w_y = (1-b)/(1-b^n_y), b = --drw-beta, normalised to sum to the
                  number of classes; batch loss = sum_i w_{y_i} l_i / sum_i w_{y_i} (Cao et al.'s DRW).
  --fgm-eps e     after the clean backward, word embeddings += e * g / ||g||_2 (g their gradient, whole-matrix
                  norm); the adversarial loss is backpropagated onto the same gradients; embeddings restored.
  --llrd x        seed 004's equation 1, lr_l = lr_head * x^(L-l) for layer l = 1..L (1 = bottom): head, pooler
                  and the top layer = --lr; layer i (0 = bottom) = lr * x^(L-1-i); embeddings (l = 0) = lr * x^L.
  --answer-col    [CLS] Q [SEP] A [SEP] in --max-len: the answer keeps at least --min-answer-tokens (50), a
                  too-long answer keeps its first ceil(k/2) and last floor(k/2) tokens.
  schedule        AdamW; linear warmup over --warmup (default 10% of the steps), then linear decay to 0.
  ECE             15 equal-width bins (b/15, (b+1)/15] on the max probability,
                  sum_b |B_b|/N * |accuracy(B_b) - mean confidence(B_b)|.

Examples:
    python classify.py --model tiny --data data/sample/severity_labels.jsonl --out out/cls-tiny \\
        --epochs 8 --lr 2e-3 --batch-size 32 --max-len 128
    python classify.py --model arabertv02 --data labels.csv --epochs 3 --lr 2e-5 --out out/classifier
"""
import cli   # first, and light: cli.start() guards Ctrl-C and the console while the heavy imports load
cli.start(__name__)
import argparse
import math
import os
import re
import time

import numpy as np
import torch
import torch.nn.functional as F

from bert import (HEAD_TABLE, SAMPLE_WORDPIECE, BertClassifier, autocast, build_inputs,  # the encoder
                  collate, load_tensors, log, predict_logits, read_checkpoint, save_classifier, weight_table)
from hub import ENCODERS, load_wordpiece
import data
import outputs
import tracking

# the default --data, from the project folder wherever the script is run (as train.py's)
SAMPLE_LABELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sample", "severity_labels.jsonl")


# ----------------------------------------------------------------------------------------------------------------
# A training step, in the order it runs: the epoch's loss and class weights, the loss, FGM, the LLRD groups'
# learning rates (each checked against a hand computation in tests/test_classify.py). Its inputs come from
# bert.build_inputs, where --answer-col pairs are head-tail truncated (hub.WordPieceTokenizer.pair).

def epoch_loss(epoch, loss, ce_epochs=0):
    """The loss of a 0-based epoch: plain 'ce' for the first ce_epochs epochs, then `loss`."""
    return "ce" if epoch < ce_epochs else loss


def ldam_margins(counts, max_m=0.5, c=None, boost=()):
    """LDAM margins m_y = C / n_y^(1/4) (Cao et al. 2019): C = c, else the largest margin is max_m. Classes in boost
    count as n_y / 10 (seed 004), classes without examples as 1."""
    n = torch.as_tensor(counts, dtype=torch.float64).clamp(min=1)
    n[list(boost)] /= 10
    m = n.pow(-0.25)
    return (m * (c if c is not None else max_m / m.max())).float()


def drw_weights(counts, beta=0.9999):
    """w_y = (1-beta)/(1-beta^n_y) (Cui et al. 2019), summing to the number of classes; empty classes count as 1."""
    n = torch.as_tensor(counts, dtype=torch.float64).clamp(min=1)
    w = (1.0 - beta) / (1.0 - torch.tensor(beta, dtype=torch.float64) ** n)
    return (w / w.sum() * len(w)).float()


def epoch_class_weights(epoch, drw_epoch, counts, beta=0.9999):
    """DRW: None (unweighted) before 0-based epoch drw_epoch (or when it is None), drw_weights after."""
    return None if drw_epoch is None or epoch < drw_epoch else drw_weights(counts, beta)


def classification_loss(logits, y, kind="ce", margins=None, s=30.0, weight=None):
    """ce: cross_entropy(z, y, weight); ldam: cross_entropy(s * (z - m_y * onehot(y)), y, weight)."""
    z = logits.float()
    if kind == "ldam":
        z = s * (z - F.one_hot(y, z.shape[1]).to(z.dtype) * margins.to(z.device)[y][:, None])
    return F.cross_entropy(z, y, weight=None if weight is None else weight.to(z.device))


def fgm_step(embedding, eps, adv_loss_fn):
    """FGM (Miyato et al. 2017), after the clean backward: weight += eps * g / ||g||_2 (whole-matrix norm), the
    adversarial loss backpropagated onto the same gradients, the weight restored bit for bit. Skipped if g is 0/inf."""
    w = embedding.weight
    norm = torch.linalg.vector_norm(w.grad.float())
    if not torch.isfinite(norm) or norm == 0:
        return
    backup = w.detach().clone()
    with torch.no_grad():
        w.add_((eps / norm) * w.grad)
    adv_loss_fn().backward()
    with torch.no_grad():
        w.copy_(backup)


def param_groups(model, lr, llrd=1.0, weight_decay=0.01):
    """AdamW groups with layer-wise LR decay (--llrd in the docstring above: seed 004's equation 1,
    lr_l = lr * llrd^(L-l) with the encoder layers numbered l = 1..L, so the top layer gets the head's rate and the
    embeddings, l = 0, get lr * llrd^L), no weight decay on biases and LayerNorms; each group carries 'name' and
    'base_lr' (its lr before the schedule)."""
    L, groups = model.cfg.num_hidden_layers, {}
    for pname, p in model.named_parameters():
        layer = re.match(r"bert\.layers\.(\d+)\.", pname)
        if layer:
            name, scale = f"layer.{layer[1]}", llrd ** (L - 1 - int(layer[1]))   # layer[1] is 0-based: l = it + 1
        elif pname.startswith(("bert.pooler.", "classifier.")):
            name, scale = "head", 1.0
        else:
            name, scale = "embeddings", llrd ** L
        nd = p.ndim < 2 or "norm" in pname
        g = groups.setdefault((name, nd), {"params": [], "lr": lr * scale, "base_lr": lr * scale,
                                           "weight_decay": 0.0 if nd else weight_decay,
                                           "name": name + ("/no_decay" if nd else "")})
        g["params"].append(p)
    return list(groups.values())


def lr_mult(step, total, warmup):
    """Linear warmup from 0 over `warmup` steps, then linear decay to 0 at `total`."""
    return (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


# ----------------------------------------------------------------------------------------------------------------
# Metrics

def ece(probs, y, n_bins=15):
    """Expected calibration error on the max probability, equal-width bins b = (b/n, (b+1)/n] (a confidence on an
    edge belongs to the bin below it): sum_b |B_b|/N * |accuracy(B_b) - mean confidence(B_b)|."""
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y)
    conf, right = probs.max(1), probs.argmax(1) == y
    b = np.searchsorted(np.arange(1, n_bins + 1) / n_bins, conf, side="left").clip(0, n_bins - 1)
    return float(sum((b == k).mean() * abs(right[b == k].mean() - conf[b == k].mean())
                     for k in np.unique(b)))


def classification_metrics(probs, y, labels):
    """accuracy, macro-F1, per-class precision/recall/F1/support, confusion (rows true, cols predicted), ECE."""
    probs, y = np.asarray(probs), np.asarray(y)
    pred = probs.argmax(1)
    cm = np.zeros((len(labels), len(labels)), dtype=int)
    np.add.at(cm, (y, pred), 1)
    per = {}
    for c, name in enumerate(labels):
        tp, n_pred, n_true = cm[c, c], cm[:, c].sum(), cm[c, :].sum()
        p, r = (tp / n_pred if n_pred else 0.0), (tp / n_true if n_true else 0.0)
        per[name] = {"precision": float(p), "recall": float(r), "f1": float(2 * p * r / (p + r)) if p + r else 0.0,
                     "support": int(n_true)}
    return {"n": int(len(y)), "accuracy": float((pred == y).mean()) if len(y) else 0.0,
            "macro_f1": float(np.mean([v["f1"] for v in per.values()])),
            "per_class": per, "confusion": cm.tolist(), "ece": ece(probs, y) if len(y) else 0.0}


def format_metrics(m, labels, majority=None):
    w = max(12, max(len(l) for l in labels) + 2)
    lines = [f"{'class':<{w}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for l in labels:
        v = m["per_class"][l]
        lines.append(f"{l:<{w}}{v['precision']:>10.3f}{v['recall']:>10.3f}{v['f1']:>10.3f}{v['support']:>10d}")
    s = f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  ECE(15 bins) {m['ece']:.4f}  n={m['n']}"
    lines += [s + (f"  (majority-class baseline {majority:.4f})" if majority is not None else ""),
              "confusion matrix (rows = true, columns = predicted):", " " * w + "".join(f"{l[:10]:>12}" for l in labels)]
    lines += [f"{l:<{w}}" + "".join(f"{x:>12d}" for x in row) for l, row in zip(labels, m["confusion"])]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Data

def read_labelled(path, question_col=None, label_col=None, answer_col=None, labels=None):
    """-> (texts, answers or None, y (list[int]), labels). Columns: the ones named, else found by their canonical
    names and aliases (text / question / post, label / severity; data.read_table), in any file every script reads
    (.jsonl/.json/.csv/.tsv/.xlsx). Without labels the label set is the three severities when every label is one
    (aliases such as mild/severe or the Arabic names accepted), else the sorted set found. One-line DataError on any
    bad row."""
    cols = {"text": (question_col, "--question-col"), "label": (label_col, "--label-col")}
    if answer_col is not None:
        cols["answer"] = (answer_col, "--answer-col")
    texts, answers, raw = [], [] if answer_col else None, []
    for line, row in data.read_table(path, cols, data.LABEL_FIELD_ALIASES):
        f = data.canonical_fields(path, line, row, data.LABEL_FIELD_ALIASES)
        for field, flag, out in (("text", "--question-col", texts), ("answer", "--answer-col", answers)):
            if out is None:
                continue
            if field not in f:   # a later JSON row without it
                raise cli.DataError(path, line, field, f"missing column (the {field} column; see {flag})")
            col, v = f[field]
            if not isinstance(v, str) or not v.strip():
                raise cli.DataError(path, line, col, "empty" if isinstance(v, str) else f"expected text, got {v!r}")
            data.check_field_size(path, line, col, v)   # before the tokenizer (data.MAX_FIELD_BYTES)
            out.append(v.strip())
        if "label" not in f:
            raise cli.DataError(path, line, "label", "missing column (see --label-col)")
        label_col, v = f["label"]
        if isinstance(v, bool) or v is None or (isinstance(v, float) and not v.is_integer()):
            raise cli.DataError(path, line, label_col, f"bad label {v!r}")
        v = str(int(v)) if isinstance(v, (int, float)) else str(v).strip()
        if not v:
            raise cli.DataError(path, line, label_col, "empty label")
        raw.append((line, v))
    if not labels and all(data.canonical_severity(v) for _, v in raw):
        labels, raw = list(data.SEVERITIES), [(line, data.canonical_severity(v)) for line, v in raw]
    labels = labels or sorted({v for _, v in raw})
    for line, v in raw:
        if v not in labels:   # only with --labels
            raise cli.DataError(path, line, label_col, f"unknown label '{v}' (--labels: {', '.join(labels)})")
    y = [labels.index(v) for _, v in raw]
    if len(set(y)) < 2:
        raise cli.DataError(path, raw[0][0], label_col, f"need at least 2 classes, found only '{labels[y[0]]}'")
    return texts, answers, y, list(labels)


def stratified_split(y, val_frac, seed):
    """Seeded stratified split -> (train indices, val indices). Each class gives round(n_c * val_frac) examples to
    validation (at least 1 when it has >= 2 and val_frac > 0; never all of them)."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    tr, va = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        k = min(int(round(len(idx) * val_frac)), len(idx) - 1)
        if val_frac > 0 and len(idx) >= 2:
            k = max(k, 1)
        va += idx[:k].tolist()
        tr += idx[k:].tolist()
    return sorted(tr), sorted(va)


# ----------------------------------------------------------------------------------------------------------------
# Main

def get_args(argv=None):
    num, pos = cli.number, dict(lo=0, lo_open=True)
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__)
    p.add_argument("--data", default=SAMPLE_LABELS, help="labelled training file (.jsonl/.json/.csv/.tsv/.xlsx)")
    p.add_argument("--question-col", default=None, help="column with the text to classify (the question); default: "
                   "the column named text, question or post (any case)")
    p.add_argument("--label-col", default=None, help="column with the class label; default: the column named label "
                   "or severity (any case)")
    p.add_argument("--answer-col", default=None,
                   help="optional answer column: input becomes [CLS] Q [SEP] A [SEP] with head-tail truncation")
    p.add_argument("--preprocess", choices=data.PREPROCESS, default="none", help="what the encoder reads: none = the "
                   "text as written (the paper's notebooks); arabert = the AraBERT authors' preprocessing "
                   "(data.arabert_preprocess), recorded in the classifier so that annotate.py applies it too")
    p.add_argument("--labels", default=None,
                   help="comma-separated class list in output order (labels outside it are an error); default: "
                        "non-critical,neutral,critical when every label is a severity (or alias), else sorted")
    p.add_argument("--model", default="arabertv02",
                   help=f"encoder: registry name ({', '.join(ENCODERS)}), hub repo id or local folder")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of --model")
    p.add_argument("--out", default=os.path.join("out", "classifier"), help="output folder")
    p.add_argument("--head", choices=["pooler", "linear"], default="pooler",
                   help="pooler: BertForSequenceClassification's tanh pooler then a linear layer; linear: a linear "
                        "layer on the [CLS] state (seed 004)")
    p.add_argument("--val-frac", type=num(float, lo=0, hi=1, hi_open=True), default=0.1,
                   help="fraction held out (stratified, seeded) for validation")
    p.add_argument("--epochs", type=num(int, lo=1), default=3, help="training epochs")
    p.add_argument("--max-steps", type=num(int, lo=0), default=0,
                   help="optimizer steps; overrides --epochs when > 0 (seed 004: 8000)")
    p.add_argument("--batch-size", type=num(int, lo=1), default=32, help="training batch size")
    p.add_argument("--eval-batch-size", type=num(int, lo=1), default=128, help="batch size for validation")
    p.add_argument("--lr", type=num(float, **pos, hi=1e30), default=None, help="peak learning rate (of the head with "
                   "--llrd); default 2e-5 to fine-tune a pretrained encoder, 1e-3 for a randomly initialised one "
                   "(tiny), as train.py picks a from-scratch rate for a random decoder")
    p.add_argument("--weight-decay", type=num(float, lo=0), default=0.01,
                   help="AdamW weight decay (not on biases/LayerNorm)")
    p.add_argument("--warmup", type=cli.warmup, default="10%", help="linear warm-up (then linear decay): N steps, "
                   "or a share of the run's steps such as 10%%")
    p.add_argument("--warmup-frac", dest="warmup", default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                   type=lambda s: f"{num(float, lo=0, hi=1)(s) * 100:g}%")   # the old spelling, a fraction
    p.add_argument("--grad-clip", type=num(float, lo=0), default=1.0, help="clip the gradient norm to this (0 = off)")
    p.add_argument("--max-len", type=num(int, lo=3), default=512, help="max tokens per input incl. [CLS]/[SEP]")
    p.add_argument("--min-answer-tokens", type=num(int, lo=0), default=50,
                   help="with --answer-col: tokens kept for the answer at least (seed 004: 50)")
    p.add_argument("--seed", type=num(int, lo=0), default=42, help="seed for init, split and shuffling")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto = cuda if available)")
    p.add_argument("--loss", choices=["ce", "ldam"], default="ce",
                   help="ce, or ldam: cross_entropy(s*(z - m_y onehot)), m_y = C/n_y^(1/4)")
    p.add_argument("--ldam-c", type=num(float, **pos), default=None,
                   help="LDAM: C of m_y = C/n_y^(1/4), given directly (seed 004: 1); default: scale to --ldam-max-m")
    p.add_argument("--ldam-max-m", type=num(float, **pos), default=0.5,
                   help="LDAM without --ldam-c: C chosen so the rarest class's margin is this (Cao et al.)")
    p.add_argument("--ldam-s", type=num(float, **pos), default=30.0,
                   help="LDAM: logit scale s (seed 004's formula: 1); folded into the saved classifier")
    p.add_argument("--boost-classes", default=None,
                   help="LDAM: comma-separated classes whose margin uses n_y/10 (seed 004's targeted margin boosting)")
    p.add_argument("--ce-epochs", type=num(int, lo=0), default=0,
                   help="train with plain CE for this many epochs, then with --loss (seed 004: 5)")
    p.add_argument("--drw-epoch", type=num(int, lo=0), default=None,
                   help="deferred re-weighting: from this 0-based epoch on, class weights (1-beta)/(1-beta^n_y) "
                        "normalised to sum to n_classes (default: off)")
    p.add_argument("--drw-beta", type=num(float, lo=0, hi=1, hi_open=True), default=0.9999,
                   help="DRW: beta of the effective number")
    p.add_argument("--fgm-eps", type=num(float, lo=0), default=0.0,
                   help="FGM adversarial training on the word embeddings with this epsilon (seed 004: 0.2; 0 = off)")
    p.add_argument("--llrd", type=num(float, lo=0, hi=1, lo_open=True), default=1.0,
                   help="layer-wise LR decay factor xi, seed 004's equation 1: head, pooler and top layer lr, "
                        "layer i (0 = bottom) lr*xi^(L-1-i), embeddings lr*xi^L (seed 004: 0.9; 1 = off)")
    p.add_argument("--keep-best", action="store_true",
                   help="save the epoch with the best validation macro-F1 instead of the last one")
    p.add_argument("--report-to", choices=tracking.CHOICES, default="none", help=tracking.HELP.replace(
                   "the JSONL log only", "the console and metrics.json only"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.alias("--text-col", "--question-col")   # the old spelling, one release
    a = p.parse_args(argv)
    if a.loss == "ce" and (a.ce_epochs or a.boost_classes or a.ldam_c is not None):
        p.error("--ce-epochs, --boost-classes and --ldam-c need --loss ldam")
    named = [x for x in (a.question_col, a.label_col, a.answer_col) if x is not None]
    if len(set(named)) < len(named):
        p.error("--question-col, --label-col and --answer-col must name different columns")
    if a.keep_best and a.val_frac == 0:
        p.error("--keep-best needs a validation split (--val-frac > 0)")
    for flag, e in (("--drw-epoch", a.drw_epoch), ("--ce-epochs", a.ce_epochs or None)):   # epochs count from 0
        if e is not None and not a.max_steps and e >= a.epochs:   # the switch would never come: a silent no-op
            p.error(f"{flag} {e}: the run has only --epochs {a.epochs} (epochs 0..{a.epochs - 1}), so it would do nothing")
    if a.labels is not None and not split_list(a.labels):
        p.error("--labels: empty list (leave the flag out for the default classes)")
    return a


def split_list(s):
    return [x.strip() for x in s.split(",") if x.strip()] if s else []


def train(argv=None):
    # -- everything a user can get wrong is checked before any work and before anything is written --------------
    args = get_args(argv)
    t_start = time.time()
    device = cli.resolve_device(args.device)
    cli.input_file(args.data, "--data")
    tracking.check(args.report_to)   # a library that is not installed: one line, before any work
    cli.output_dir(args.out, "--out", inputs=[args.model])
    outputs.lock_output(args.out, "--out")   # one run per folder; a folder created for the lock goes if nothing is saved
    outputs.clean_stale(args.out, ("unit", "model.safetensors", "config.json", "vocab.txt", "tokenizer.json",
                                "tokenizer_config.json", "special_tokens_map.json", "metrics.json"))   # a killed save's
    # the files a classifier replaces, in a folder that is no classifier (a train.py run, a downloaded model): refused
    outputs.refuse_foreign(args.out, "--out", ("model.safetensors", "config.json", "vocab.txt", "tokenizer.json",
                                               "tokenizer_config.json", "special_tokens_map.json", "metrics.json"),
                           lambda d: {"val", "labels", "majority_class"} <= set(
                               outputs.json_object(os.path.join(d, "metrics.json")) or {}), "classify.py")
    labels_arg = split_list(args.labels) or None
    if labels_arg and len(set(labels_arg)) != len(labels_arg):
        raise cli.UserError("--labels", f"duplicate class names in '{args.labels}'")
    texts, answers, y, labels = read_labelled(args.data, args.question_col, args.label_col, args.answer_col, labels_arg)
    texts = [data.preprocess(t, args.preprocess) for t in texts]
    answers = None if answers is None else [data.preprocess(t, args.preprocess) for t in answers]
    boost = split_list(args.boost_classes)
    for c in boost:
        if c not in labels:
            raise cli.UserError("--boost-classes", f"'{c}' is not a class ({', '.join(labels)})")
    folder, cfg_dict, cfg, enc, head = read_checkpoint(args.model, args.revision)   # a corrupt file fails here
    if args.max_len > cfg.max_position_embeddings:
        raise cli.UserError("--max-len", f"{args.max_len} exceeds the model's max_position_embeddings "
                                          f"{cfg.max_position_embeddings}")
    tok = load_wordpiece(folder if folder is not None else SAMPLE_WORDPIECE)
    if tok.vocab_size > cfg.vocab_size:
        raise cli.UserError(args.model, f"tokenizer has {tok.vocab_size} tokens but vocab_size is {cfg.vocab_size}")

    # -- data: a seeded stratified split, inputs tokenised once --------------------------------------------------
    C, y = len(labels), np.asarray(y)
    tr, va = stratified_split(y, args.val_frac, args.seed)
    counts = np.bincount(y[tr], minlength=C)
    for c in np.flatnonzero(counts == 0):
        log(f"warning: class '{labels[c]}' has no training examples")
    log(f"data: {len(y)} rows, {len(tr)} train / {len(va)} val; train counts "
        + ", ".join(f"{l}={n}" for l, n in zip(labels, counts)))
    seqs = build_inputs(tok, texts, args.max_len, answers, args.min_answer_tokens)
    n_trunc = sum(len(s[0]) >= args.max_len for s in seqs)
    if n_trunc:
        log(f"note: {n_trunc} of {len(seqs)} inputs reach --max-len {args.max_len} (truncated)")
    val_seqs = [seqs[i] for i in va]
    majority_class = int(counts.argmax())
    majority = float((y[va] == majority_class).mean()) if va else None

    # -- model: the checkpoint's encoder, a fresh head (or the checkpoint's own when its labels match) -----------
    torch.manual_seed(args.seed)
    model = BertClassifier(cfg, labels, args.head)
    if folder is not None:
        load_tensors(model.bert, enc, weight_table(cfg.num_hidden_layers), folder, "bert.")
        old = cfg_dict.get("id2label") or {}
        same_head = (cfg_dict.get("severity_classifier") or {}).get("head", "pooler") == args.head
        if head and same_head and [old.get(str(i)) for i in range(len(old))] == labels:
            load_tensors(model.classifier, head, HEAD_TABLE, folder)
            log(f"note: continuing from {args.model}'s classifier head (same labels and --head)")
    model.to(device)
    log(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on {device}")

    # -- optimizer, schedule, losses -------------------------------------------------------------------------------
    if args.lr is None:   # fine-tuning rate for pretrained weights; a random encoder learns nothing at 2e-5
        args.lr = 2e-5 if folder is not None else 1e-3
    opt = torch.optim.AdamW(param_groups(model, args.lr, args.llrd, args.weight_decay), lr=args.lr,
                            betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda")
    steps_per_epoch = math.ceil(len(tr) / args.batch_size)
    total = args.max_steps or steps_per_epoch * args.epochs
    n_epochs = math.ceil(total / steps_per_epoch)
    warmup = cli.warmup_steps(args.warmup, total)
    margins = ldam_margins(counts, args.ldam_max_m, args.ldam_c, [labels.index(c) for c in boost])
    if args.loss == "ldam":
        log("LDAM margins: " + ", ".join(f"{l}={m:.3f}" for l, m in zip(labels, margins.tolist())))
    y_t, gen = torch.as_tensor(y), torch.Generator().manual_seed(args.seed)

    def evaluate(scale):   # validation metrics of softmax(scale * logits)
        if not va:
            return None
        probs = torch.softmax(predict_logits(model, val_seqs, args.eval_batch_size).double() * scale, -1).numpy()
        return classification_metrics(probs, y[va], labels)

    # -- the loop: one epoch = one seeded permutation of the training rows; validation after each -----------------
    history, best, step, scale = [], None, 0, 1.0
    tracker = tracking.Tracker(args.report_to, args.out, vars(args))
    for epoch in range(n_epochs):
        model.train()
        kind = epoch_loss(epoch, args.loss, args.ce_epochs)
        scale = args.ldam_s if kind == "ldam" else 1.0
        weight = epoch_class_weights(epoch, args.drw_epoch, counts, args.drw_beta)
        if epoch == args.drw_epoch:
            log("DRW class weights: " + ", ".join(f"{l}={w:.3f}" for l, w in zip(labels, weight.tolist())))
        if args.loss != "ce" and epoch == args.ce_epochs and epoch > 0:
            log(f"epoch {epoch + 1}: switching from ce to {args.loss}")
        perm = torch.randperm(len(tr), generator=gen).tolist()
        n_steps = min(steps_per_epoch, total - step)
        bar = cli.progress(n_steps, f"epoch {epoch + 1}/{n_epochs}", "step", args.quiet)
        loss_sum, n_seen = 0.0, 0
        for b in range(n_steps):
            idx = [tr[i] for i in perm[b * args.batch_size:(b + 1) * args.batch_size]]
            ids, am, tt = collate([seqs[i] for i in idx], cfg.pad_token_id, device)
            yb = y_t[idx].to(device)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_mult(step, total, warmup)

            def loss_fn():
                with autocast(device):
                    logits = model(ids, am, tt)
                return classification_loss(logits, yb, kind, margins, args.ldam_s, weight)

            loss = loss_fn()
            loss_v = loss.item()
            if not math.isfinite(loss_v):
                raise cli.UserError("--lr", f"the loss is {loss_v} at step {step + 1}; try a lower --lr")
            loss.backward()
            if args.fgm_eps > 0:
                fgm_step(model.bert.wte, args.fgm_eps, loss_fn)
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            loss_sum, n_seen = loss_sum + loss_v * len(idx), n_seen + len(idx)
            bar.set_postfix_str(f"loss {loss_sum / n_seen:.4f} lr {opt.param_groups[0]['lr']:.2e}", refresh=False)
            bar.update(1)
        bar.close()
        rec = {"epoch": epoch + 1, "objective": kind, "train_loss": loss_sum / n_seen, "steps": step}
        met = evaluate(scale)
        if met is not None:
            rec.update(val_accuracy=met["accuracy"], val_macro_f1=met["macro_f1"], val_ece=met["ece"])
            if args.keep_best and (best is None or met["macro_f1"] > best["f1"]):
                best = {"f1": met["macro_f1"], "epoch": epoch + 1, "scale": scale,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        history.append(rec)
        tracker.log(step, rec)
        log(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))

    tracker.close()
    if best is not None:
        model.load_state_dict(best["state"])
        scale = best["scale"]
        log(f"keeping epoch {best['epoch']} (best validation macro-F1 {best['f1']:.4f})")
    # LDAM trains softmax(s * z): fold s into the head so that the saved logits are the trained ones (annotate.py
    # and transformers both take softmax(logits)).
    with torch.no_grad():
        model.classifier.weight.mul_(scale)
        model.classifier.bias.mul_(scale)

    # -- save: the model folder, then metrics.json (both atomic) -------------------------------------------------
    bad = next((n for n, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:   # a finite loss, then an update past the float range (--lr or --weight-decay far too large)
        raise cli.UserError("--lr", f"the updates made the weights non-finite ({bad}); nothing was saved: try a lower "
                                     "--lr or --weight-decay")
    met = evaluate(1.0)
    model.meta = {"trained_with": "classify.py", "input": "question+answer" if answers is not None else "text",
                  "max_len": args.max_len, "min_answer_tokens": args.min_answer_tokens, "loss": args.loss,
                  "logit_scale_folded": scale, "base_model": args.model, "labels": labels,
                  "preprocess": args.preprocess}
    metrics = {"val": met, "majority_baseline_accuracy": majority, "majority_class": labels[majority_class],
               "labels": labels, "n_train": len(tr), "n_val": len(va), "train_counts": counts.tolist(),
               "epochs": history, "best_epoch": best["epoch"] if best else n_epochs, "steps": step,
               "seconds": round(time.time() - t_start, 1), "args": vars(args)}
    # one unit (outputs.unit): a failure (a full disk) leaves the previous classifier whole, or no folder at all
    with outputs.unit(args.out, last=("metrics.json",)) as tmp:
        save_classifier(model.cpu(), tok, tmp)
        outputs.write_json(os.path.join(tmp, "metrics.json"), metrics)
    if met is not None:
        print(f"validation ({len(va)} examples), epoch {metrics['best_epoch']}:")
        print(format_metrics(met, labels, majority))
    print(f"saved {args.out} ({metrics['seconds']:.0f} s)")
    return metrics


def main(argv=None):
    """train(argv) under the command-line contract: a user's mistake is one line 'error: ...' and exit 2."""
    return cli.run(train, argv)


if __name__ == "__main__":
    main()
