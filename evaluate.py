"""
Evaluate a causal LM on the severity-annotated test set the paper's way (arXiv 2604.06346), and compare runs.

Protocol (the paper's, the default): prompt = data.format_prompt(question), sample 50 new tokens at temperature
0.7, keep the text after the answer cue (data.extract_answer), score against the reference answer with BERTScore
(bert-base-multilingual-cased, layer 9, no idf, no baseline rescaling), report P, R and F1 x 100 on the first
2,000 test records. Added here: the same scores per severity class with bootstrap 95% intervals, a seeded run
(--seed), a greedy run (--greedy), K sampled runs with a spread (--repeat), and the eval NLL of the reference
answers (mean answer-token NLL, overall and per class: cheap, noise-free, needs no scorer).

    python evaluate.py --model aragpt2-base --data data/maqa/test.jsonl --out runs/aragpt2-base/base
    python evaluate.py --model runs/aragpt2-base/balanced --seed 0 --repeat 3      # a folder train.py wrote
    python evaluate.py --model out/tiny-balanced --bertscore-model out/cls-tiny --bertscore-layer 2 --greedy
    python evaluate.py --table runs/aragpt2-base/*/eval.json --paper --plot runs/aragpt2-base/table.png

Outputs (written atomically, only after everything succeeded): <out>/eval.json (settings, the setting label
Base/CE/Mild/Strong/Balanced/custom read from the training run's args.json, data sha256, counts per class,
scores) and <out>/predictions.jsonl (one line per test record and run: question, reference, prediction,
severity, per-example P/R/F1 x 100 and answer NLL).

Repeatability: a sampled run draws every token from one torch.Generator seeded with --seed, over batches in a
fixed order (prompts sorted by length, longest first, ties by position), so the same command with the same seed
gives the same predictions. A different --batch-size or device changes the random stream: another sample, not a
worse one. The BERTScores of the same predictions agree to ~1e-6 between processes, not bit for bit: bert-score
batches its sentences in an order that goes through a Python set (string hashing is randomised per process).
Without --seed a seed is drawn and written to eval.json, so even the paper's unseeded protocol can be replayed.
--floor also scores each prediction against another record's reference: unrescaled BERTScore is far from 0 for
unrelated texts, and that floor is what differences between settings should be read against.

bert-score 0.3.13 on transformers 5 (two workarounds, both here, both keep bert-score's own numbers):
  - a tokenizer without a model_max_length (a bare local folder) makes bert-score's truncation overflow: it is set
    to the scorer's max_position_embeddings;
  - an empty candidate crashes it (it calls a tokenizer method transformers 5 removed); bert-score defines the
    score of an empty candidate as P = R = F1 = 0, so empty predictions get 0 and are not sent to it.
"""
import json
import os
import sys
import time

import numpy as np
import torch

import data

ROOT = os.path.dirname(os.path.abspath(__file__))
SAMPLE_TEST = os.path.join(ROOT, "data", "sample", "test.jsonl")
SETTINGS = ("Base", "CE", "Mild", "Strong", "Balanced")          # the paper's Table 2 columns
PRESET_SETTING = {"ce": "CE", "mild": "Mild", "strong": "Strong", "balanced": "Balanced"}   # train.PRESETS keys
GROUPS = ("overall",) + tuple(data.SEVERITIES)
METRICS = ("precision", "recall", "f1")
DEFAULT_SCORER = "bert-base-multilingual-cased"

# The paper's Table 2: BERTScore F1 (%), one unseeded sampled run per cell, columns = SETTINGS.
PAPER_TABLE2 = {
    "aragpt2-base": ("AraGPT2-Base", (54.04, 59.71, 59.75, 65.91, 66.14)),
    "aragpt2-medium": ("AraGPT2-Medium", (59.16, 60.14, 60.48, 60.55, 67.18)),
    "bloomz-560m": ("Bloomz-560M", (63.59, 63.65, 63.91, 63.79, 65.52)),
    "al-atlas-0.5b": ("Al-Atlas-0.5B", (61.03, 61.52, 62.03, 65.02, 66.83)),
    "gpt2-small-arabic": ("GPT2-Small-Arabic", (56.40, 58.88, 62.01, 60.92, 63.06)),
    "lfm2-350m": ("LFM2-350M", (63.34, 63.72, 65.24, 64.08, 66.60)),
    "lfm2-700m": ("LFM2-700M", (63.46, 63.88, 64.63, 64.25, 67.18)),
    "dialect-ar-gpt-2021": ("Dialect-ar-gpt-2021", (60.41, 60.73, 62.12, 60.52, 67.13)),
    "qwen2.5-0.5b": ("Qwen2.5-0.5B", (57.83, 57.96, 58.68, 65.15, 66.86)),
    "qwen3-0.6b": ("Qwen3-0.6B", (60.43, 61.40, 62.87, 62.53, 65.06)),
}


def paper_key(name):
    """The PAPER_TABLE2 key of a row name: a registry name, or the last part of its HF repo id (any case)."""
    from model import REGISTRY
    low = name.lower()
    if low in PAPER_TABLE2:
        return low
    return next((k for k in PAPER_TABLE2 if REGISTRY[k]["repo"].split("/")[-1].lower() == low), None)


def get_args(argv=None):
    num = data.number
    p = data.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--model", default=None, help="registry name (see model.REGISTRY), HF repo id or local folder of the "
                   "untouched base model (setting Base), or a folder train.py wrote (setting from its args.json)")
    p.add_argument("--data", default=SAMPLE_TEST, help="canonical test file (question, answer, severity, p_nc, p_n, p_c)")
    p.add_argument("--n", type=num(int, lo=1), default=2000, help="evaluate the first N records (the paper: 2,000)")
    p.add_argument("--out", default=None, help="output folder for eval.json + predictions.jsonl (default: the model "
                   "folder if --model is a folder, else out/eval-<model>)")
    p.add_argument("--batch-size", type=num(int, lo=1), default=64, help="prompts per generation batch (and sequences per NLL batch)")
    p.add_argument("--device", default="auto", help="cuda, cpu, cuda:1 ... (auto = cuda if available); also runs the scorer")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="weights dtype for generation and NLL: auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of the paper's sampling (deterministic)")
    p.add_argument("--temperature", type=num(float, lo=0), default=0.7, help="sampling temperature (the paper: 0.7)")
    p.add_argument("--top-k", type=num(int, lo=0), default=0, help="sample from the k most likely tokens only; 0 = off. The paper's "
                   "notebooks called transformers' generate, whose default generation config uses top_k=50")
    p.add_argument("--top-p", type=num(float, lo=0, hi=1, lo_open=True), default=1.0, help="nucleus sampling mass; 1 = off")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (model.compile_decode). "
                   "Compiling several graphs (prefill, first decode steps, then dynamic shapes) takes about a minute "
                   "on a CPU, so it pays only on long runs")
    p.add_argument("--max-new-tokens", type=num(int, lo=1), default=50, help="new tokens per answer (the paper: 50)")
    p.add_argument("--seed", type=num(int, lo=0, hi=2**63 - 1 - 10**6), default=None, help="seed of the sampling generator (run k of --repeat uses seed+k); "
                   "default: drawn at random and written to eval.json")
    p.add_argument("--repeat", type=num(int, lo=1), default=1, help="K sampled runs with seeds seed..seed+K-1, reported as mean and "
                   "std across runs plus each run's scores")
    p.add_argument("--max-len", type=num(int, lo=2), default=512, help="prompt+answer tokens kept for the eval NLL (as train.py)")
    p.add_argument("--bertscore-model", default=DEFAULT_SCORER, help="bert-score model: a name bert-score knows, an HF "
                   "repo id, or a local folder (e.g. a classifier classify.py saved)")
    p.add_argument("--bertscore-layer", type=num(int, lo=0), default=None, help="layer whose embeddings are matched (default: "
                   "bert-score's table, e.g. 9 for bert-base-multilingual-cased, 17 for xlm-roberta-large); "
                   "required for any model not in that table (AraBERT, local folders)")
    p.add_argument("--floor", action="store_true", help="also score every prediction against another record's "
                   "reference (a seeded derangement): the score of an unrelated pair, the floor that F1 differences "
                   "should be read against (BERTScore without rescaling is far from 0 for unrelated texts)")
    p.add_argument("--bertscore-batch-size", type=num(int, lo=1), default=64, help="sentences per bert-score batch")
    p.add_argument("--bootstrap", type=num(int, lo=0), default=1000, help="bootstrap resamples for the 95%% percentile intervals (0 = none)")
    p.add_argument("--bootstrap-seed", type=num(int, lo=0, hi=2**32 - 1), default=0, help="seed of the bootstrap resampling")
    p.add_argument("--name", default=None, help="row label in --table (default: the base model's name: the registry "
                   "name, or args.json's model for a train.py folder)")
    p.add_argument("--setting", choices=SETTINGS + ("custom",), default=None,
                   help="override the setting label read from args.json (a model trained elsewhere)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    # comparison mode
    p.add_argument("--table", nargs="+", metavar="EVAL_JSON", default=None,
                   help="print Table-2-style Markdown tables from these eval.json files instead of evaluating")
    p.add_argument("--metric", choices=METRICS + ("nll", "floor"), default="f1", help="with --table: the value in the "
                   "cells (floor = F1 against shuffled references, from runs made with --floor)")
    p.add_argument("--paper", action="store_true", help="with --table: add the paper's Table 2 figures (BERTScore F1) "
                   "for models that are among the paper's ten")
    p.add_argument("--plot", default=None, help="with --table: save a PNG bar chart with intervals to this path")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# What is being evaluated


def describe_model(name_or_path):
    """(row name, setting label, train args or None). A folder with train.py's args.json is a fine-tuned run whose
    setting comes from its weights (a, b, c); anything else is an untouched base model."""
    args_file = os.path.join(name_or_path, "args.json")
    if not os.path.isfile(args_file):
        return os.path.basename(os.path.normpath(name_or_path)), "Base", None
    import train
    targs = data.read_json(args_file, "training arguments")
    try:
        abc = targs.get("weights_abc")
        abc = train.parse_weights(str(targs.get("weights", ""))) if abc is None else tuple(float(x) for x in abc)
        if len(abc) != 3:
            raise ValueError(f"{len(abc)} values")
    except (AttributeError, TypeError, ValueError) as e:
        raise data.UserError(args_file, f"weights: cannot read the training weights a,b,c ({e})") from None
    setting = next((PRESET_SETTING[k] for k, v in train.PRESETS.items()
                    if k in PRESET_SETTING and all(abs(x - y) < 1e-9 for x, y in zip(v, abc))), "custom")
    base = str(targs.get("model") or name_or_path)
    return os.path.basename(os.path.normpath(base)), setting, dict(targs, weights_abc=list(abc))


class Progress:
    """A small progress line with ETA on stderr (redrawn in place on a terminal, every ~10% otherwise)."""

    def __init__(self, total, desc, quiet=False):
        self.total, self.desc, self.quiet = max(1, total), desc, quiet
        self.done, self.t0, self.shown = 0, time.time(), -1
        self.tty = sys.stderr.isatty()

    def update(self, k):
        self.done += k
        if self.quiet:
            return
        frac = self.done / self.total
        if not self.tty and int(frac * 10) == self.shown and self.done < self.total:
            return
        self.shown = int(frac * 10)
        el = time.time() - self.t0
        eta = el / frac * (1 - frac) if frac > 0 else 0
        line = f"{self.desc} {self.done}/{self.total} [{'#' * int(20 * frac):<20}] {el:.0f}s elapsed, eta {eta:.0f}s"
        print(("\r" + line) if self.tty else line, end="" if self.tty and self.done < self.total else "\n",
              file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Generation and NLL


def length_order(lengths):
    """Longest first (an out-of-memory error shows up in the first batch), ties by position: a fixed order."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def encode_prompts(model, tok, questions, max_new_tokens):
    """Prompt ids per question; a prompt too long for learned positions keeps its tail (the cue stays)."""
    prompts = [tok.encode(data.format_prompt(q)) for q in questions]
    if model.cfg.pos == "learned":
        room = model.cfg.max_pos - max_new_tokens
        if room < 1:
            raise data.UserError("--max-new-tokens", f"{max_new_tokens} leaves no room for a prompt in the model's "
                                                     f"{model.cfg.max_pos} positions")
        prompts = [p[-room:] for p in prompts]
    return prompts


def generate_answers(model, tok, questions, batch_size=64, max_new_tokens=50, temperature=0.7, top_k=0, top_p=1.0,
                     seed=None, progress=None, stats=None):
    """Answers (after data.extract_answer) in the order of `questions`, generated in length-sorted batches.
    temperature 0 = greedy; otherwise one generator seeded with `seed` drives every draw. stats (a dict), if given,
    gets "new_tokens" (generated before EOS) added."""
    prompts = encode_prompts(model, tok, questions, max_new_tokens)
    device = model.wte.weight.device
    gen = None
    if temperature > 0:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed) if seed is not None else 0)
    order = length_order([len(p) for p in prompts])
    out = [None] * len(prompts)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        new = model.generate([prompts[i] for i in idx], max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k or None, top_p=top_p if top_p < 1 else None, eos_id=tok.eos_id, generator=gen)
        for i, ids in zip(idx, new):
            out[i] = data.extract_answer(tok.decode(ids))
        if stats is not None:
            stats["new_tokens"] = stats.get("new_tokens", 0) + sum(len(ids) for ids in new)
        if progress:
            progress.update(len(idx))
    return out


@torch.no_grad()
def answer_nll(model, tok, records, batch_size=64, max_len=512):
    """Per-example (sum of answer-token NLL, number of answer tokens), float64 numpy arrays. The answer tokens and
    their masking are train.py's (train.encode / train.collate: prompt + answer + EOS, loss on answer + EOS)."""
    import train
    if model.cfg.pos == "learned":
        max_len = min(max_len, model.cfg.max_pos + 1)       # x = ids[:-1] must fit the positions
    ex = train.encode(records, tok, (1.0, 1.0, 1.0), max_len, "answer")
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    device = model.wte.weight.device
    sums, counts = np.zeros(len(ex)), np.zeros(len(ex))
    order = length_order([len(e[0]) for e in ex])
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        x, y, _, _ = train.collate([ex[i] for i in idx], pad, device)
        nll = model(x, targets=y).double()                   # (B, T) fp32 -> fp64, 0 where y == -100
        sums[idx] = nll.sum(1).cpu().numpy()
        counts[idx] = (y != -100).sum(1).cpu().numpy()
    return sums, counts


# ----------------------------------------------------------------------------------------------------------------
# BERTScore


# what a hub scorer may bring: config, safetensors weights and tokenizer files; never a pickle, never code
SCORER_ALLOW = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model",
                "spiece.model", "added_tokens.json"]


def scorer_folder(name):
    """A local folder with the scorer's config.json and safetensors weights. A hub name (bert-score's names are hub
    repos) is downloaded with SCORER_ALLOW, like model.resolve; the folder is what bert-score then gets, so it
    cannot fall back to a pickled pytorch_model.bin. Refused (UserError) otherwise."""
    flag = "--bertscore-model"
    if os.path.isdir(name):
        folder = name
    elif os.path.exists(name):
        raise data.UserError(flag, f"{name}: is a file, expected a folder or a hub name")
    elif os.path.isabs(name) or name.startswith(("./", "../", "~")) or name.count("/") > 1:
        raise data.UserError(flag, f"{name}: no such folder")
    else:
        from huggingface_hub import snapshot_download
        try:
            folder = snapshot_download(name, allow_patterns=SCORER_ALLOW)
        except Exception:   # noqa: BLE001 - offline or hub down: an already-cached snapshot still serves
            try:
                folder = snapshot_download(name, allow_patterns=SCORER_ALLOW, local_files_only=True)
            except Exception as e:   # noqa: BLE001 - any hub failure is the user's to fix (name, network, token)
                raise data.UserError(flag, f"{name}: not a local folder, and cannot fetch it from the hub "
                                           f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise data.UserError(flag, f"{name}: no config.json")
    files = os.listdir(folder)
    if not any(f.endswith(".safetensors") for f in files):
        pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack"))]
        raise data.UserError(flag, f"{name}: no .safetensors weights" + (
            f" (found {', '.join(pickles)}: pickled weights are never loaded; convert them to safetensors)"
            if pickles else ""))
    from safetensors import safe_open
    for f in sorted(f for f in files if f.endswith(".safetensors")):   # a cut or corrupt file fails here, by name
        with data.reading(os.path.join(folder, f), "scorer weights", "re-download or re-save the scorer"):
            with safe_open(os.path.join(folder, f), framework="pt") as h:
                h.keys()
    return folder


class BertScore:
    """bert-score's BERTScorer (model loaded once), no idf, no rescaling; __call__ -> (N, 3) P, R, F1 in [0, 1].

    Equals bert_score.score(cands, refs, model_type=..., num_layers=...) on non-empty candidates; an empty
    candidate scores 0, bert-score's own rule (see the module docstring for why it is not sent to bert-score)."""

    def __init__(self, model_type=DEFAULT_SCORER, layer=None, batch_size=64, device="cpu"):
        import bert_score
        from bert_score.utils import model2layers
        if layer is None:
            if model_type not in model2layers:
                raise data.UserError("--bertscore-model", f"{model_type!r} is not in bert-score's layer table: give "
                                     f"--bertscore-layer (e.g. 9 for {DEFAULT_SCORER}, 17 for xlm-roberta-large)")
            layer = model2layers[model_type]
        if layer < 0:
            raise data.UserError("--bertscore-layer", f"{layer} must be >= 0")
        folder = scorer_folder(model_type)
        cfg = data.read_json(os.path.join(folder, "config.json"), "scorer config")
        n_layers = cfg.get("num_hidden_layers") if isinstance(cfg, dict) else None
        if isinstance(n_layers, int) and layer > n_layers:
            raise data.UserError("--bertscore-layer", f"{layer} but {model_type} has {n_layers} layers")
        self.model_type, self.layer = model_type, layer
        from transformers.utils import logging as hf_logging
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()          # no load reports (a classifier's unused head) nor progress bars
        hf_logging.disable_progress_bar()
        try:
            # a local folder that holds safetensors (checked above): transformers loads those, never a pickle
            self.scorer = bert_score.BERTScorer(model_type=folder, num_layers=layer, batch_size=batch_size,
                                                idf=False, rescale_with_baseline=False, device=device)
        except (OSError, ValueError, AssertionError, KeyError) as e:   # transformers' loaders: bad or missing files
            raise data.UserError("--bertscore-model", f"cannot load {model_type!r}: {e}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
        tk = self.scorer._tokenizer          # BERTScorer has no public accessor
        if not tk.model_max_length or tk.model_max_length > 100_000:   # transformers' "unset" sentinel is ~1e30
            cfg = self.scorer._model.config
            tk.model_max_length = int(getattr(cfg, "max_position_embeddings", 512) or 512)
        from importlib.metadata import version     # bert_score.__version__ of 0.3.13 still says 0.3.12
        self.versions = {"bert_score": version("bert-score"), "transformers": version("transformers")}

    def __call__(self, cands, refs):
        out = np.zeros((len(cands), 3))
        keep = [i for i, c in enumerate(cands) if c.strip()]
        if keep:
            P, R, F = self.scorer.score([cands[i] for i in keep], [refs[i] for i in keep])
            out[keep] = torch.stack([P, R, F], 1).double().numpy()
        return out


# ----------------------------------------------------------------------------------------------------------------
# Statistics


def bootstrap_ci(values, n_boot=1000, seed=0, denom=None, level=0.95):
    """Percentile interval of the mean of `values` (or of sum(values) / sum(denom), a ratio of sums, when denom is
    given) over n_boot resamples of the examples with replacement. (None, None) without data or resamples."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0 or n_boot <= 0:
        return None, None
    d = None if denom is None else np.asarray(denom, dtype=np.float64)
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    rows = max(1, (1 << 22) // n)                          # resample in blocks: at most ~4M indices at once
    for s in range(0, n_boot, rows):
        k = min(rows, n_boot - s)
        idx = rng.integers(0, n, size=(k, n))
        stats[s:s + k] = x[idx].mean(1) if d is None else x[idx].sum(1) / d[idx].sum(1)
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(stats, [a, 100 - a])
    return float(lo), float(hi)


def summarize(values, severities, n_boot=1000, seed=0, denom=None):
    """{group: {mean, lo, hi, n}} for 'overall' and each severity class present. mean = mean of values over the
    group's examples (or sum(values) / sum(denom) with denom: a token-weighted mean)."""
    values = np.asarray(values, dtype=np.float64)
    sev = np.asarray(severities)
    out = {}
    for g in GROUPS:
        sel = np.ones(len(values), bool) if g == "overall" else sev == g
        if denom is not None:
            sel &= np.asarray(denom) > 0
        if not sel.any():
            continue
        v = values[sel]
        d = None if denom is None else np.asarray(denom, dtype=np.float64)[sel]
        mean = float(v.mean()) if d is None else float(v.sum() / d.sum())
        lo, hi = bootstrap_ci(v, n_boot, seed, d)
        out[g] = {"mean": mean, "lo": lo, "hi": hi, "n": int(sel.sum())}
        if d is not None:
            out[g]["tokens"] = int(d.sum())
    return out


def derangement(n, seed):
    """A seeded permutation of range(n) with no fixed point (n >= 2): a cyclic shift of a random order."""
    order = np.random.default_rng(seed).permutation(n)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = np.roll(order, 1)
    return perm.tolist()


def score_table(prf, severities, n_boot, seed):
    """P, R, F1 (x 100) summaries from an (N, 3) array in [0, 1]."""
    return {m: summarize(prf[:, j] * 100, severities, n_boot, seed) for j, m in enumerate(METRICS)}


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


def check_args(args):
    """Every flag and path, before any work: the model, the data, the output folder."""
    if args.model is None:
        raise data.UserError("--model", "required (or use --table)")
    if args.plot or args.paper:
        raise data.UserError("--plot/--paper", "only with --table")
    if not args.greedy and not args.temperature > 0:
        raise data.UserError("--temperature", f"{args.temperature} must be > 0 (use --greedy for greedy decoding)")
    if args.floor and args.n < 2:
        raise data.UserError("--floor", "needs --n >= 2")
    if args.greedy and args.repeat > 1:
        raise data.UserError("--repeat", "greedy runs are identical; repeat sampled runs only")
    data.input_file(args.data, "--data")
    data.output_dir(out_folder(args), "--out")
    for f in ("eval.json", "predictions.jsonl"):
        data.output_file(os.path.join(out_folder(args), f), "--out")


def out_folder(args):
    return args.out if args.out is not None else (args.model if os.path.isdir(args.model) else
                        os.path.join("out", f"eval-{os.path.basename(os.path.normpath(args.model))}"))


def evaluate(args):
    """Everything but the writing: returns (eval.json dict, prediction rows)."""
    from model import Decoder, load_tokenizer, resolve
    t_start = time.time()
    check_args(args)
    records_all = data.load_records(args.data)
    records = records_all[:args.n]
    name, setting, targs = describe_model(args.model)
    device = str(data.resolve_device(args.device, "--device"))
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    # find the model (a download for a hub name) before the scorer, load it after: both fail fast (model.py's
    # loaders report a missing folder, bad config, tokenizer or weights as one UserError naming the file)
    with data.for_flag("--model"):
        path = args.model if args.model == "tiny" and not os.path.isdir(args.model) else resolve(args.model)
    # the scorer before any generation: a bad --bertscore-model fails in seconds, not after an hour
    with data.for_flag("--bertscore-model"):
        scorer = BertScore(args.bertscore_model, args.bertscore_layer, args.bertscore_batch_size, device)
    with data.for_flag("--model"):
        tok = load_tokenizer(path)
        model = Decoder.from_pretrained(path, dtype=torch_dtype, device=device).eval()
    if tok.eos_id is None:
        raise data.UserError("--model", f"{args.model}: the tokenizer has no EOS token")
    if model.cfg.pos == "learned" and model.cfg.max_pos - args.max_new_tokens < 1:
        raise data.UserError("--max-new-tokens", f"{args.max_new_tokens} leaves no room for a prompt in the model's "
                                                 f"{model.cfg.max_pos} positions")
    if args.compile:
        model.compile_decode()
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    questions = [r["question"] for r in records]
    refs = [r["answer"] for r in records]
    sev = [r["severity"] for r in records]
    counts = {"overall": len(records), **{s: sev.count(s) for s in data.SEVERITIES}}
    log(f"{args.model} ({setting}) on {len(records)} of {len(records_all)} records of {args.data} | "
        + ", ".join(f"{s} {counts[s]}" for s in data.SEVERITIES) + f" | {dtype} on {device}")

    # eval NLL of the reference answers: seed-free, computed once
    t0 = time.time()
    nll_sum, nll_tok = answer_nll(model, tok, records, args.batch_size, args.max_len)
    nll = summarize(nll_sum, sev, args.bootstrap, args.bootstrap_seed, denom=nll_tok)
    t_nll = time.time() - t0

    temperature = 0.0 if args.greedy else args.temperature
    if args.greedy:
        seeds = [None]
    else:
        base = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") % (1 << 31)
        seeds = [base + k for k in range(args.repeat)]
    runs, rows, per_run, per_run_floor = [], [], [], []
    t_gen = t_score = 0.0
    gen_stats = {"new_tokens": 0}
    for k, seed in enumerate(seeds):
        t0 = time.time()
        tag = f"run {k + 1}/{len(seeds)} " if len(seeds) > 1 else ""
        prog = Progress(len(records), f"{tag}generate", args.quiet)
        preds = generate_answers(model, tok, questions, args.batch_size, args.max_new_tokens, temperature, args.top_k,
                                 args.top_p, seed, prog, gen_stats)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t_gen += time.time() - t0
        t0 = time.time()
        log(f"{tag}bertscore ({scorer.model_type}, layer {scorer.layer}) on {len(preds)} pairs")
        prf = scorer(preds, refs)
        t_score += time.time() - t0
        per_run.append(prf)
        empty = sum(1 for p in preds if not p.strip())
        runs.append({"seed": seed, "empty_predictions": empty,
                     "scores": score_table(prf, sev, args.bootstrap, args.bootstrap_seed)})
        if args.floor:   # the same predictions against unrelated references: what a wrong answer scores
            perm = derangement(len(refs), args.bootstrap_seed)
            per_run_floor.append(scorer(preds, [refs[j] for j in perm]))
            runs[-1]["floor"] = score_table(per_run_floor[-1], sev, args.bootstrap, args.bootstrap_seed)
        for i, r in enumerate(records):
            rows.append({"index": i, "seed": seed, "question": r["question"], "reference": r["answer"],
                         "prediction": preds[i], "severity": r["severity"], "precision": 100 * prf[i, 0],
                         "recall": 100 * prf[i, 1], "f1": 100 * prf[i, 2],
                         "nll": nll_sum[i] / nll_tok[i] if nll_tok[i] > 0 else None})

    def combine(arrays, key):
        """One run: its table. K runs: the mean over runs, interval = bootstrap of each example's K-run average,
        std = spread of the K run means (each run's own mean listed under 'runs')."""
        if len(runs) == 1:
            return runs[0][key]
        table = score_table(np.mean(arrays, 0), sev, args.bootstrap, args.bootstrap_seed)
        for m in METRICS:
            for g, d in table[m].items():
                d["std"] = float(np.std([r[key][m][g]["mean"] for r in runs], ddof=1))
                d["runs"] = [r[key][m][g]["mean"] for r in runs]
        return table
    scores = combine(per_run, "scores")
    floor = combine(per_run_floor, "floor") if args.floor else None

    result = {
        "setting": args.setting or setting,
        "model": {"path": args.model, "name": args.name or name, "params": model.num_params(),
                  "family": model.cfg.family,
                  "weights": targs["weights_abc"] if targs else None, "train_args": targs},
        "data": {"path": args.data, "sha256": data.sha256(args.data), "n": len(records), "n_file": len(records_all),
                 "counts": counts},
        "generation": {"mode": "greedy" if args.greedy else "sampled", "temperature": temperature,
                       "top_k": args.top_k or None, "top_p": args.top_p if args.top_p < 1 else None,
                       "max_new_tokens": args.max_new_tokens, "prompt": "data.format_prompt", "postprocess":
                       "data.extract_answer", "batch_size": args.batch_size, "dtype": dtype, "device": device,
                       "seeds": seeds, "repeat": len(seeds)},
        "bertscore": {"model": scorer.model_type, "layer": scorer.layer, "idf": False, "rescale_with_baseline": False,
                      "scale": 100, **scorer.versions},
        "bootstrap": {"resamples": args.bootstrap, "seed": args.bootstrap_seed, "level": 0.95,
                      "interval": "percentile"},
        "scores": scores,
        "floor": floor,
        "nll": nll,
        "runs": runs,
        "timing": {"total_s": time.time() - t_start, "nll_s": t_nll, "generate_s": t_gen, "bertscore_s": t_score,
                   "new_tokens": gen_stats["new_tokens"],
                   "new_tokens_per_s": gen_stats["new_tokens"] / t_gen if t_gen > 0 else None},
        "argv": vars(args),
    }
    return result, rows


def print_summary(result):
    s, nll = result["scores"], result["nll"]
    rep = result["generation"]["repeat"]
    print(f"\n{result['model']['name']} / {result['setting']} | {result['generation']['mode']}"
          + (f" x{rep} runs (mean, std across runs)" if rep > 1 else "") + f" | n = {result['data']['n']}")
    fl = result.get("floor")
    print("| group | n | BERTScore P | BERTScore R | BERTScore F1 |" + (" F1, shuffled references |" if fl else "")
          + " answer NLL |")
    print("|---|---|---|---|---|" + ("---|" if fl else "") + "---|")
    for g in GROUPS:
        if g not in s["f1"]:
            continue
        cells = [fmt_cell(s[m][g], 2) for m in METRICS] + ([fmt_cell(fl["f1"][g], 2)] if fl else [])
        print(f"| {g} | {s['f1'][g]['n']} | " + " | ".join(cells) + f" | {fmt_cell(nll[g], 3) if g in nll else '-'} |")


# ----------------------------------------------------------------------------------------------------------------
# Comparison table


def fmt_cell(d, digits=2):
    if d.get("std") is not None:
        return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"
    if d.get("lo") is not None:
        return f"{d['mean']:.{digits}f} [{d['lo']:.{digits}f}, {d['hi']:.{digits}f}]"
    return f"{d['mean']:.{digits}f}"


def _is_num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)


def _check_cells(path, where, table):
    """A {group: cell} dict of an eval.json: each cell has a finite mean and numbers (or null) for lo/hi/std."""
    if not isinstance(table, dict):
        raise data.UserError(path, f"{where}: expected an object of group -> cell, got {type(table).__name__}")
    for g, d in table.items():
        if not isinstance(d, dict) or not _is_num(d.get("mean")):
            raise data.UserError(path, f"{where}.{g}: expected a cell with a finite number 'mean'")
        for k in ("lo", "hi", "std"):
            if d.get(k) is not None and not _is_num(d[k]):
                raise data.UserError(path, f"{where}.{g}.{k}: expected a number or null, got {d[k]!r}"[:200])


def load_eval(path):
    """An eval.json for --table, checked field by field (one UserError naming the file and the field)."""
    data.input_file(path, "--table")
    ev = data.read_json(path, "eval.json")
    if not isinstance(ev, dict):
        raise data.UserError(path, "not an eval.json written by evaluate.py (expected a JSON object)")
    for key in ("setting", "model", "scores", "nll"):
        if key not in ev:
            raise data.UserError(path, f"{key}: missing (not an eval.json written by evaluate.py)")
    if not isinstance(ev["setting"], str):
        raise data.UserError(path, f"setting: expected text, got {type(ev['setting']).__name__}")
    m = ev["model"]
    if not isinstance(m, dict) or not isinstance(m.get("name"), str):
        raise data.UserError(path, "model.name: expected text")
    w = m.get("weights")
    if w is not None and not (isinstance(w, list) and len(w) == 3 and all(_is_num(x) for x in w)):
        raise data.UserError(path, "model.weights: expected three numbers or null")
    for key in ("scores", "floor"):
        if key == "floor" and ev.get("floor") is None:
            continue
        if not isinstance(ev[key], dict):
            raise data.UserError(path, f"{key}: expected an object of metric -> groups")
        for metric, table in ev[key].items():
            _check_cells(path, f"{key}.{metric}", table)
    _check_cells(path, "nll", ev["nll"])
    return ev


def column_of(ev):
    if ev["setting"] != "custom":
        return ev["setting"]
    w = ev["model"].get("weights")
    return "w=" + ",".join(f"{x:g}" for x in w) if w else "custom"


def cell_values(ev, metric, group):
    """The cell dict of one eval.json, or None if the group is absent."""
    if metric == "nll":
        src = ev["nll"]
    elif metric == "floor":
        src = (ev.get("floor") or {}).get("f1", {})
    else:
        src = ev["scores"].get(metric, {})
    return src.get(group)


def aggregate(evs, metric, group):
    """One cell from the eval.json files of one (model, setting): a single file as is; several (training seeds)
    -> mean and std (ddof 1) of their means, with k."""
    ds = [d for d in (cell_values(e, metric, group) for e in evs) if d is not None]
    if not ds:
        return None
    if len(ds) == 1:
        return dict(ds[0], k=1)
    ms = [d["mean"] for d in ds]
    return {"mean": float(np.mean(ms)), "std": float(np.std(ms, ddof=1)), "k": len(ds), "values": ms}


METRIC_TITLE = {"f1": "BERTScore F1 (x100)", "precision": "BERTScore precision (x100)",
                "recall": "BERTScore recall (x100)", "nll": "answer NLL (nats/token, lower is better)",
                "floor": "BERTScore F1 (x100) against shuffled references (--floor)"}


def build_tables(evs, metric="f1", paper=False):
    """Markdown text: one table for all test answers, then one per severity class. Rows = models, columns =
    Base, CE, Mild, Strong, Balanced (+ custom weights). Returns (text, cells) with cells[group][(row, col)]."""
    rows, cols = [], list(SETTINGS)
    groups = {}
    for ev in evs:
        r, c = ev["model"]["name"], column_of(ev)
        if r not in rows:
            rows.append(r)
        if c not in cols:
            cols.append(c)
        groups.setdefault((r, c), []).append(ev)
    digits = 3 if metric == "nll" else 2
    cells, lines = {}, []
    for g in GROUPS:
        cells[g] = {k: v for k, v in ((k, aggregate(e, metric, g)) for k, e in groups.items()) if v is not None}
        if not cells[g]:
            continue
        title = "all test answers" if g == "overall" else f"severity class: {g}"
        lines += [f"### {METRIC_TITLE[metric]}, {title}", "", "| model | " + " | ".join(cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for r in rows:
            vals = []
            for c in cols:
                d = cells[g].get((r, c))
                if d is None:
                    vals.append("-")
                else:
                    vals.append(fmt_cell(d, digits) + (f" (k={d['k']})" if d["k"] > 1 else ""))
            lines.append(f"| {r} | " + " | ".join(vals) + " |")
            if paper and g == "overall" and metric == "f1" and paper_key(r):
                pname, pv = PAPER_TABLE2[paper_key(r)]
                lines.append(f"| {pname} (paper) | " + " | ".join(f"{x:.2f}" for x in pv)
                             + " | -" * (len(cols) - len(SETTINGS)) + " |")
        lines.append("")
    if paper:
        if metric != "f1":
            lines += ["(--paper: the paper reports BERTScore F1 only; use --metric f1)", ""]
        elif not any(paper_key(r) for r in rows):     # none of ours is one of the ten: show the whole table
            lines += [f"### The paper's Table 2 for reference (BERTScore F1 %, one unseeded sampled run each; none "
                      f"of {', '.join(rows)} is among its models)", "", "| model | " + " | ".join(SETTINGS) + " |",
                      "|---|" + "---|" * len(SETTINGS)]
            lines += [f"| {pname} | " + " | ".join(f"{x:.2f}" for x in pv) + " |" for pname, pv in PAPER_TABLE2.values()]
            lines.append("")
    lines.append("Cells: mean [95% bootstrap interval] for one run; mean ± std across sampled runs (--repeat) or "
                 "across k eval.json files of the same model and setting (e.g. training seeds).")
    return "\n".join(lines) + "\n", (rows, cols, cells)


def save_plot(path, metric, rows, cols, cells):
    """Grouped bars: one panel per group (all answers, then each severity class), bars = settings, whiskers = the
    cell's interval (bootstrap) or +- std. Written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [g for g in GROUPS if cells.get(g)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    used = [c for c in cols if any((r, c) in cells[g] for g in panels for r in rows)]
    width = 0.8 / max(1, len(used))
    for ax, g in zip(axes[0], panels):
        for j, c in enumerate(used):
            xs, ys, lo, hi = [], [], [], []
            for i, r in enumerate(rows):
                d = cells[g].get((r, c))
                if d is None:
                    continue
                xs.append(i + (j - (len(used) - 1) / 2) * width)
                ys.append(d["mean"])
                if d.get("std") is not None:
                    lo.append(d["std"])
                    hi.append(d["std"])
                elif d.get("lo") is not None:
                    lo.append(d["mean"] - d["lo"])
                    hi.append(d["hi"] - d["mean"])
                else:
                    lo.append(0.0)
                    hi.append(0.0)
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=c)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(rows, rotation=20, ha="right")
        ax.set_title("all answers" if g == "overall" else g)
        ax.set_ylabel(METRIC_TITLE[metric])
        if metric != "nll":   # BERTScores sit in a narrow band: start the axis below the lowest whisker
            low = [d["lo"] if d.get("lo") is not None and d.get("std") is None else d["mean"] - (d.get("std") or 0)
                   for d in cells[g].values()]
            high = [d["hi"] if d.get("hi") is not None and d.get("std") is None else d["mean"] + (d.get("std") or 0)
                    for d in cells[g].values()]
            ax.set_ylim(max(0, min(low) - 5), min(100, max(high) + 5))
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    try:
        data.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)


def table_main(args):
    if args.plot:
        data.output_file(args.plot, "--plot")
    evs = [load_eval(p) for p in args.table]
    text, (rows, cols, cells) = build_tables(evs, args.metric, args.paper)
    if args.plot:
        save_plot(args.plot, args.metric, rows, cols, cells)
    print(text, end="")
    if args.plot:
        print(f"\nplot: {args.plot}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    """The command line under the contract: a user error is one line "error: ..." and exit status 2."""
    return data.run(_main, argv)


def _main(argv=None):
    args = get_args(argv)
    if args.table:
        return table_main(args)
    result, rows = evaluate(args)      # checks every flag and path (--out included) before any work
    out = out_folder(args)
    result["out"] = out
    data.write_jsonl(os.path.join(out, "predictions.jsonl"), rows)
    data.atomic_write(os.path.join(out, "eval.json"), json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print_summary(result)
    print(f"\nwrote {os.path.join(out, 'eval.json')} and predictions.jsonl ({result['timing']['total_s']:.0f} s)",
          file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
