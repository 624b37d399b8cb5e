"""
Evaluate a causal LM on the severity-annotated test set the paper's way (arXiv 2604.06346), and compare runs.

Protocol (the default): prompt = data.format_prompt(question), keep the answer to this question (data.extract_answer:
the text before any new question and cue), score against the reference answer with BERTScore, report P, R and
F1 x 100 on the first 2,000 test records. The paper states the prompt, the answer cue and BERTScore F1 but no
sampling settings, no number of new tokens and no BERTScore model or layer: those defaults are the authors'
notebooks' (temperature 0.7, top-k/top-p from the model's generation_config.json, else transformers' top_k 50 and
top_p 1; 50 new tokens; bert-base-multilingual-cased layer 9, no idf, no baseline rescaling). Generation stops at
the tokenizer's EOS and at every eos_token_id of the model's generation config, as transformers' generate does. Added here: the same scores per severity class with bootstrap 95% intervals, a seeded run
(--seed), a greedy run (--greedy), K sampled runs with a spread (--repeat), and the eval NLL of the reference
answers (mean answer-token NLL, overall and per class: cheap, noise-free, needs no scorer).

    python evaluate.py --model aragpt2-base --data data/maqa/test.jsonl --out runs/aragpt2-base/base
    python evaluate.py --model runs/aragpt2-base/balanced --seed 0 --repeat 3      # a folder train.py wrote
    python evaluate.py --model out/tiny-balanced --bertscore-model out/cls-tiny --bertscore-layer 2 --greedy
    python evaluate.py --table runs/aragpt2-base/*/eval.json --paper --plot runs/aragpt2-base/table.png
    python evaluate.py --compare runs/aragpt2-base/ce runs/aragpt2-base/balanced --out runs/aragpt2-base/ce-vs-balanced
    python evaluate.py --model runs/notebook/balanced --recipe notebook      # the authors' notebooks' protocol

Outputs (written atomically, only after everything succeeded): <out>/eval.json (settings, the setting label
Base/CE/Mild/Strong/Balanced/custom read from the training run's args.json, data sha256, counts per class,
scores, and predictions_sha256) and <out>/predictions.jsonl (one line per test record and run: question, reference,
prediction, severity, per-example P/R/F1 x 100 and answer NLL). The two replace the old pair as one unit, and
--table/--compare refuse a predictions.jsonl whose sha256 is not the one its eval.json records.

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
import cli   # first, and light: cli.start() guards Ctrl-C and the console while the heavy imports load
cli.start(__name__)
import functools
import json
import os
import sys
import time

import numpy as np
import torch

import data
import outputs

ROOT = os.path.dirname(os.path.abspath(__file__))
SAMPLE_TEST = os.path.join(ROOT, "data", "sample", "test.jsonl")
SETTINGS = ("Base", "CE", "Mild", "Strong", "Balanced")          # the paper's Table 2 columns
PRESET_SETTING = {"ce": "CE", "mild": "Mild", "strong": "Strong", "balanced": "Balanced"}   # train.PRESETS keys
GROUPS = ("overall",) + tuple(data.SEVERITIES)
METRICS = ("precision", "recall", "f1")
PERMUTATIONS = 10000   # random sign flips of the paired permutation test (--permutations)
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
    num = cli.number
    p = cli.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--model", default=None, help="registry name (see model.REGISTRY), HF repo id or local folder of the "
                   "untouched base model (setting Base), or a folder train.py wrote (setting from its args.json)")
    p.add_argument("--data", default=SAMPLE_TEST, help="canonical test file (question, answer, severity, p_nc, p_n, p_c)")
    p.add_argument("--n", type=num(int, lo=1), default=2000, help="evaluate the first N records (the paper: 2,000)")
    p.add_argument("--out", default=None, help="output folder for eval.json + predictions.jsonl, replaced as one unit "
                   "and locked while the run lasts (default: the model folder if --model is a folder, else "
                   "out/eval-<model>)")
    p.add_argument("--batch-size", type=num(int, lo=1), default=64, help="prompts per generation batch (and sequences per NLL batch)")
    p.add_argument("--device", default="auto", help="cuda, cpu, cuda:1 ... (auto = cuda if available); also runs the scorer")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="weights dtype for generation and NLL: auto = bf16 on CUDA (fp16 with --recipe notebook, as the "
                   "notebooks), fp32 on CPU")
    p.add_argument("--quantize", choices=["none", "nf4"], default="none", help="nf4: hold the block weights as 4-bit "
                   "NormalFloat codes (QLoRA's NF4, absmax per 64 weights), dequantised per matmul: a 7B model in "
                   "about 3.9 GB instead of 13.5 GB (bf16); scores move slightly (quantisation error)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of the paper's sampling (deterministic)")
    p.add_argument("--temperature", type=num(float, lo=0), default=0.7, help="sampling temperature (the notebooks: 0.7; "
                   "the paper names none)")
    p.add_argument("--recipe", choices=["paper", "notebook"], default="paper", help="defaults for --prompt, --dtype "
                   "and the answer kept (each flag given still wins). Both sample as the notebooks' transformers "
                   "generate did: top_k/top_p from the model's generation_config.json (else config.json), else "
                   "transformers' defaults (top_k 50, top_p 1). paper = the paper's stated protocol: the training "
                   "prompt with the answer cue, data.extract_answer. notebook = the authors' notebooks: the cue-less "
                   "prompt \"\\n{Q}\\n\", everything after the first cue kept (data.extract_answer_notebook), fp16 on CUDA")
    p.add_argument("--prompt", choices=["cue", "no-cue"], default=None, help="generation prompt: cue = data.format_prompt "
                   "(the training prompt, ends with the answer cue); no-cue = \"\\n{Q}\\n\" (the notebooks). Default: by --recipe")
    p.add_argument("--top-k", type=num(int, lo=0), default=None, help="sample from the k most likely tokens only; 0 = off. "
                   "Default: the model's generation config, else 50 (transformers' default, as in the notebooks)")
    p.add_argument("--top-p", type=num(float, lo=0, hi=1, lo_open=True), default=None, help="nucleus sampling mass; 1 = off. Default: "
                   "the model's generation config, else 1 (transformers' default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (model.compile_decode). "
                   "Compiling several graphs (prefill, first decode steps, then dynamic shapes) takes about a minute "
                   "on a CPU, so it pays only on long runs")
    p.add_argument("--max-new-tokens", type=num(int, lo=1), default=50, help="new tokens per answer (the notebooks: 50; the paper names none)")
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
    p.add_argument("--bootstrap", type=num(int, lo=0, hi=10**7), default=1000, help="bootstrap resamples for the 95%% percentile intervals (0 = none)")
    p.add_argument("--bootstrap-seed", type=num(int, lo=0, hi=2**32 - 1), default=0, help="seed of the bootstrap resampling")
    p.add_argument("--name", default=None, help="row label in --table (default: the base model's name: the registry "
                   "name, or args.json's model for a train.py folder)")
    p.add_argument("--setting", choices=SETTINGS + ("custom",), default=None,
                   help="override the setting label read from args.json (a model trained elsewhere)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    # comparison mode
    p.add_argument("--table", nargs="+", metavar="EVAL_JSON", default=None,
                   help="print Table-2-style Markdown tables from these eval.json files instead of evaluating")
    p.add_argument("--metric", choices=METRICS + ("nll", "floor"), default=None, help="with --table: the value in the "
                   "cells (floor = F1 against shuffled references, from runs made with --floor); default f1")
    p.add_argument("--paper", action="store_true", help="with --table: add the paper's Table 2 figures (BERTScore F1) "
                   "for models that are among the paper's ten")
    p.add_argument("--plot", default=None, help="with --table: save a PNG bar chart with intervals to this path")
    p.add_argument("--holm", action="store_true", help="with --table: mark a cell when its Holm-adjusted p-value is "
                   "below 0.05, adjusted over the cells tested in the same table (all answers, or one severity "
                   "class); default: the uncorrected p-value of each cell")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), default=None,
                   help="paired comparison of two eval folders (eval.json + predictions.jsonl, or the eval.json paths) "
                   "scored on the same data with the same scorer and protocol: per example B - A in P, R, F1 and "
                   "answer NLL, overall and per severity, with a 95%% paired bootstrap interval and a paired "
                   "sign-flip permutation p-value; printed and saved to --out/compare.json")
    p.add_argument("--permutations", type=cli.number(int, lo=1, hi=10**7), default=None, help="with --compare/--table: "
                   "random sign flips of the permutation test (exact enumeration when 2^n is no more than this); "
                   f"seeded with --bootstrap-seed; default {PERMUTATIONS}")
    a = p.parse_args(argv)
    if a.table and a.compare:
        p.error("--table and --compare are two different modes: give one of them")
    mode = "table" if a.table else "compare" if a.compare else "evaluate"
    for flag in [f for f in MODE_FLAGS if f in p.given(argv)]:   # in MODE_FLAGS order: one message, always the same
        modes, why = MODE_FLAGS[flag]
        if mode not in modes:
            raise cli.UserError(f"--{flag}", why)
    return a


# The one table of which mode reads which flag (a flag not listed is read by every mode that needs it). A flag given
# to a mode that would ignore it is refused with one line, never silently dropped. Modes: evaluate (generate and score
# --model, the default), table (--table), compare (--compare).
MODE_FLAGS = {
    "out": (("evaluate", "compare"), "--table prints the table (give --plot for a PNG file)"),
    "plot": (("table",), "only with --table (a bar chart of the table's cells)"),
    "paper": (("table",), "only with --table (the paper's figures as a row of the table)"),
    "holm": (("table",), "only with --table (--compare tests one pair: nothing to correct)"),
    "metric": (("table",), "only with --table (an evaluation and --compare report every metric)"),
    "permutations": (("table", "compare"), "only with --compare or --table (the paired permutation test)"),
}


# ----------------------------------------------------------------------------------------------------------------
# What is being evaluated


def describe_model(name_or_path):
    """(row name, setting label, train args or None). A folder with train.py's args.json is a fine-tuned run whose
    setting comes from its weights (a, b, c); anything else is an untouched base model."""
    args_file = os.path.join(name_or_path, "args.json")
    if not os.path.isfile(args_file):
        return os.path.basename(os.path.normpath(name_or_path)), "Base", None
    import train
    targs = cli.read_json(args_file, "training arguments")
    try:
        abc = targs.get("weights_abc")
        abc = train.parse_weights(str(targs.get("weights", ""))) if abc is None else tuple(float(x) for x in abc)
        if len(abc) != 3:
            raise ValueError(f"{len(abc)} values")
    except (AttributeError, TypeError, ValueError) as e:
        raise cli.UserError(args_file, f"weights: cannot read the training weights a,b,c ({e})") from None
    setting = next((PRESET_SETTING[k] for k, v in train.PRESETS.items()
                    if k in PRESET_SETTING and all(abs(x - y) < 1e-9 for x, y in zip(v, abc))), "custom")
    base = str(targs.get("model") or name_or_path)
    return os.path.basename(os.path.normpath(base)), setting, dict(targs, weights_abc=list(abc))


# ----------------------------------------------------------------------------------------------------------------
# The two recipes: the paper's stated protocol and what the authors' notebooks ran

# transformers' generate fills what neither the call nor the model's generation config sets with these (its
# GenerationConfig._get_default_generation_params): the notebooks' sampling therefore used top_k 50 by default.
HF_SAMPLING_DEFAULTS = {"top_k": 50, "top_p": 1.0}
# Sampling settings a generation config may hold that model.generate does not implement, with their neutral values.
HF_UNSUPPORTED = {"repetition_penalty": 1.0, "typical_p": 1.0, "min_p": None, "no_repeat_ngram_size": 0,
                  "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "num_beams": 1}


def model_generation_config(path):
    """The generation settings a model folder ships: its generation_config.json, else the generation keys of its
    config.json (what transformers' GenerationConfig.from_model_config falls back to); {} for neither (tiny).
    Keys kept: top_k, top_p, temperature, do_sample, eos_token_id and HF_UNSUPPORTED's, None values dropped."""
    from model import read_generation_config
    keys = ("top_k", "top_p", "temperature", "do_sample", "eos_token_id") + tuple(HF_UNSUPPORTED)
    for name in ("generation_config.json", "config.json"):
        f = os.path.join(path, name) if path and os.path.isdir(path) else None
        if f and os.path.isfile(f):
            cfg = read_generation_config(f)
            got = {k: cfg[k] for k in keys if cfg.get(k) is not None}
            if got or name == "generation_config.json":
                return dict(got, source=f)
    return {}


def resolve_recipe(args, gen_cfg):
    """(prompt, top_k, top_p, notes) for a run: a flag given on the command line wins, else the default. The paper
    states no sampling settings, so both recipes sample as the notebooks' transformers generate() did: the model's
    generation config (gen_cfg), else transformers' defaults (top_k 50, top_p 1); the temperature (0.7) and
    max_new_tokens (50) were passed explicitly by the notebooks, so they come from the flags. The recipe sets the
    prompt (notebook: cue-less). notes: the config's settings that model.generate does not implement (written to
    eval.json, printed)."""
    nb = args.recipe == "notebook"
    prompt = args.prompt or ("no-cue" if nb else "cue")
    top_k, top_p = args.top_k, args.top_p
    if top_k is None:
        top_k = int(gen_cfg.get("top_k", HF_SAMPLING_DEFAULTS["top_k"]))
    if top_p is None:
        top_p = float(gen_cfg.get("top_p", HF_SAMPLING_DEFAULTS["top_p"]))
    notes = [f"{k}={gen_cfg[k]} in {gen_cfg.get('source')} is not implemented here (ignored)"
             for k, neutral in HF_UNSUPPORTED.items() if k in gen_cfg and gen_cfg[k] != neutral]
    return prompt, top_k, top_p, notes


# ----------------------------------------------------------------------------------------------------------------
# Generation and NLL


def length_order(lengths):
    """Longest first (an out-of-memory error shows up in the first batch), ties by position: a fixed order."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def encode_prompts(model, tok, questions, max_new_tokens, prompt="cue"):
    """Prompt ids per question; a prompt too long for learned positions keeps its tail (the cue stays).
    prompt: cue = data.format_prompt(q); no-cue = data.format_prompt(q, cue=False), the notebooks' "\n{Q}\n"."""
    texts = [data.format_prompt(q, cue=prompt == "cue") for q in questions]
    tk = getattr(tok, "tk", None)   # tokenizers' encode_batch: its own threads, the same ids as one encode per text
    prompts = [e.ids for e in tk.encode_batch(texts)] if tk is not None else [tok.encode(t) for t in texts]
    if model.cfg.pos == "learned":
        room = model.cfg.max_pos - max_new_tokens
        if room < 1:
            raise cli.UserError("--max-new-tokens", f"{max_new_tokens} leaves no room for a prompt in the model's "
                                                     f"{model.cfg.max_pos} positions")
        prompts = [p[-room:] for p in prompts]
    return prompts


def generate_answers(model, tok, questions, batch_size=64, max_new_tokens=50, temperature=0.7, top_k=0, top_p=1.0,
                     seed=None, progress=None, stats=None, prompt="cue", stop_at_cue=True, eos_ids=None,
                     notebook=False):
    """Answers (after data.extract_answer) in the order of `questions`, generated in length-sorted batches.
    stop_at_cue: a row stops once it has begun a new question and cue (data.answer_complete), which leaves every
    answer as it was (what follows the new cue is never kept) and saves the rest of the batch's steps.
    eos_ids: more stop tokens besides the tokenizer's EOS (the model's generation_config eos_token_id, an int or a
    list: transformers stops at each). notebook: keep the answer as the notebooks did (data.extract_answer_notebook,
    everything after the first cue), so no early stop at a new cue (the notebooks kept what follows it).
    temperature 0 = greedy; otherwise one generator seeded with `seed` drives every draw. stats (a dict), if given,
    gets "new_tokens" (generated before EOS) added."""
    prompts = encode_prompts(model, tok, questions, max_new_tokens, prompt)
    device = model.wte.weight.device
    gen = None
    if temperature > 0:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed) if seed is not None else 0)
    order = length_order([len(p) for p in prompts])
    out = [None] * len(prompts)
    extra = eos_ids if isinstance(eos_ids, (list, tuple)) else [] if eos_ids is None else [eos_ids]
    stops = list(dict.fromkeys(i for i in [tok.eos_id, *extra] if i is not None))   # in order, once each
    stop_at_cue = stop_at_cue and not notebook
    extract = data.extract_answer_notebook if notebook else data.extract_answer
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        new = model.generate([prompts[i] for i in idx], max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k or None, top_p=top_p if top_p < 1 else None,
                             eos_id=stops or None, generator=gen,
                             stop=(lambda ids: data.answer_complete(tok.decode(ids))) if stop_at_cue else None)
        for i, ids in zip(idx, new):
            out[i] = extract(tok.decode(ids))
        if stats is not None:
            stats["new_tokens"] = stats.get("new_tokens", 0) + sum(len(ids) for ids in new)
        if progress is not None:
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
        x, y, _, _, _ = train.collate([ex[i] for i in idx], pad, device)
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
        raise cli.UserError(flag, f"{name}: is a file, expected a folder or a hub name")
    elif os.path.isabs(name) or name.startswith(("./", "../", "~")) or name.count("/") > 1:
        raise cli.UserError(flag, f"{name}: no such folder")
    else:
        from huggingface_hub import snapshot_download
        try:
            folder = snapshot_download(name, allow_patterns=SCORER_ALLOW)
        except Exception:   # noqa: BLE001 - offline or hub down: an already-cached snapshot still serves
            try:
                folder = snapshot_download(name, allow_patterns=SCORER_ALLOW, local_files_only=True)
            except Exception as e:   # noqa: BLE001 - any hub failure is the user's to fix (name, network, token)
                raise cli.UserError(flag, f"{name}: not a local folder, and cannot fetch it from the hub "
                                           f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise cli.UserError(flag, f"{name}: no config.json")
    files = os.listdir(folder)
    if not any(f.endswith(".safetensors") for f in files):
        pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack"))]
        raise cli.UserError(flag, f"{name}: no .safetensors weights" + (
            f" (found {', '.join(pickles)}: pickled weights are never loaded; convert them to safetensors)"
            if pickles else ""))
    vocab = ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")
    if not any(f in files for f in vocab):   # transformers would build an EMPTY tokenizer: every token [UNK]
        raise cli.UserError(flag, f"{name}: no tokenizer files (one of {', '.join(vocab)})")
    from safetensors import safe_open
    for f in sorted(f for f in files if f.endswith(".safetensors")):   # a cut or corrupt file fails here, by name
        with cli.reading(os.path.join(folder, f), "scorer weights", "re-download or re-save the scorer"):
            with safe_open(os.path.join(folder, f), framework="pt") as h:
                for k in h.keys():   # from the header only; integer buffers (position_ids) are allowed
                    dt = h.get_slice(k).get_dtype()
                    if k.endswith((".weight", ".bias")) and not dt.startswith(("F", "BF")):
                        raise cli.UserError(flag, f"{os.path.join(folder, f)}: tensor {k} is {dt}: weights "
                                                   "must be floating point")
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
                raise cli.UserError("--bertscore-model", f"{model_type!r} is not in bert-score's layer table: give "
                                     f"--bertscore-layer (e.g. 9 for {DEFAULT_SCORER}, 17 for xlm-roberta-large)")
            layer = model2layers[model_type]
        if layer < 0:
            raise cli.UserError("--bertscore-layer", f"{layer} must be >= 0")
        folder = scorer_folder(model_type)
        cfg = cli.read_json(os.path.join(folder, "config.json"), "scorer config")
        n_layers = cfg.get("num_hidden_layers") if isinstance(cfg, dict) else None
        if isinstance(n_layers, int) and layer > n_layers:
            raise cli.UserError("--bertscore-layer", f"{layer} but {model_type} has {n_layers} layers")
        self.model_type, self.layer = model_type, layer
        from transformers.utils import logging as hf_logging
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()          # no load reports (a classifier's unused head) nor progress bars
        hf_logging.disable_progress_bar()
        from huggingface_hub.errors import StrictDataclassError   # transformers 5's config field checks
        try:
            # a local folder that holds safetensors (checked above): transformers loads those, never a pickle
            self.scorer = bert_score.BERTScorer(model_type=folder, num_layers=layer, batch_size=batch_size,
                                                idf=False, rescale_with_baseline=False, device=device)
            # one pair through tokenizer and model now: a broken vocabulary fails here, not after the generation
            self.scorer.score(["ا"], ["ا"], batch_size=1)
        except (OSError, ValueError, AssertionError, KeyError, TypeError, IndexError, StrictDataclassError) as e:
            raise cli.UserError("--bertscore-model", f"cannot load {model_type!r}: {e}") from None
        except Exception as e:   # noqa: BLE001 - the tokenizers library raises bare Exceptions (an empty vocab.txt)
            if type(e) is not Exception:
                raise
            raise cli.UserError("--bertscore-model", f"cannot load {model_type!r}'s tokenizer: {e}") from None
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


def sign_flip_p(values, n_perm=10000, seed=0):
    """Two-sided p-value of the paired sign-flip permutation test of "sum(values) is 0": under the null each
    example's difference is as likely to have the other sign, so p = P(|sum_i s_i v_i| >= |sum_i v_i|) over signs
    s_i = +-1. A ratio statistic sum(v) / sum(denom) has the same p (the denominator does not flip).

    Exact when 2^n <= n_perm: every sign vector once (the identity included). Otherwise n_perm random sign vectors,
    signs = 2 * rng.integers(0, 2, size=(n_perm, n)) - 1 with rng = np.random.default_rng(seed) drawn in one block,
    and p = (1 + hits) / (1 + n_perm), which never reports 0. Ties within 1e-9 of |sum v| count as extreme."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n == 0:
        return None
    t = abs(v.sum())
    tol = 1e-9 * max(1.0, np.abs(v).sum())
    if n <= 62 and (1 << n) <= n_perm:
        codes = np.arange(1 << n, dtype=np.int64)[:, None]                 # (2^n, 1): bit i = sign of example i
        signs = 1 - 2 * ((codes >> np.arange(n)) & 1)                       # (2^n, n) in {+1, -1}
        return float((np.abs(signs @ v) >= t - tol).mean())
    rng = np.random.default_rng(seed)
    hits = 0
    rows = max(1, (1 << 22) // n)                                           # blocks of at most ~4M signs
    for s in range(0, n_perm, rows):
        k = min(rows, n_perm - s)
        signs = 2 * rng.integers(0, 2, size=(k, n)) - 1
        hits += int((np.abs(signs @ v) >= t - tol).sum())
    return (1 + hits) / (1 + n_perm)


def paired_diff(a, b, n_boot=1000, seed=0, n_perm=10000, denom=None):
    """Paired difference B - A over the same examples: {mean_a, mean_b, diff, lo, hi, p, n}.
    Without denom: per-example d_i = b_i - a_i, diff = mean(d), its percentile bootstrap interval (bootstrap_ci,
    level 0.95) and the sign-flip p-value of d. With denom (answer tokens n_i, equal in both runs): the ratio of sums
    the eval.json NLL reports, diff = sum(n_i d_i) / sum(n_i), bootstrapped and permuted as that same statistic."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if denom is None:
        v, den = b - a, None
        ma, mb, diff = float(a.mean()), float(b.mean()), float(v.mean())
    else:
        den = np.asarray(denom, dtype=np.float64)
        v = (b - a) * den
        ma, mb = float((a * den).sum() / den.sum()), float((b * den).sum() / den.sum())
        diff = float(v.sum() / den.sum())
    lo, hi = bootstrap_ci(v, n_boot, seed, den)
    return {"mean_a": ma, "mean_b": mb, "diff": diff, "lo": lo, "hi": hi, "p": sign_flip_p(v, n_perm, seed),
            "n": int(len(v))}


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


def check_args(args):
    """Every flag and path, before any work: the model, the data, the output folder."""
    if args.model is None:
        raise cli.UserError("--model", "required (or use --table)")
    if not args.greedy and not args.temperature > 0:
        raise cli.UserError("--temperature", f"{args.temperature} must be > 0 (use --greedy for greedy decoding)")
    if args.floor and args.n < 2:
        raise cli.UserError("--floor", "needs --n >= 2")
    if args.greedy and args.repeat > 1:
        raise cli.UserError("--repeat", "greedy runs are identical; repeat sampled runs only")
    given = [f for f, v in (("--top-k", args.top_k), ("--top-p", args.top_p), ("--seed", args.seed)) if v is not None]
    if args.greedy and given:   # a sampling setting greedy decoding would ignore: the run is not what was asked
        raise cli.UserError(given[0], "a sampling setting: it has no effect with --greedy (drop one of the two)")
    cli.input_file(args.data, "--data")
    cli.output_dir(out_folder(args), "--out")
    for f in ("eval.json", "predictions.jsonl"):
        cli.output_file(os.path.join(out_folder(args), f), "--out")
    outputs.lock_output(out_folder(args), "--out")   # one run per folder (a train.py run there holds it too)
    # temp files of a killed write: no live run can own them now that we hold the lock
    outputs.clean_stale(out_folder(args), ("unit", "eval.json", "predictions.jsonl"))


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
    device = str(cli.resolve_device(args.device, "--device"))
    cuda_auto = "fp16" if args.recipe == "notebook" else "bf16"     # the notebooks generated in fp16
    dtype = args.dtype if args.dtype != "auto" else (cuda_auto if device.startswith("cuda") else "fp32")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    # find the model (a download for a hub name) before the scorer, load it after: both fail fast (model.py's
    # loaders report a missing folder, bad config, tokenizer or weights as one UserError naming the file)
    with cli.for_flag("--model"):
        path = args.model if args.model == "tiny" and not os.path.isdir(args.model) else resolve(args.model)
    # the scorer before any generation: a bad --bertscore-model fails in seconds, not after an hour
    with cli.for_flag("--bertscore-model"):
        scorer = BertScore(args.bertscore_model, args.bertscore_layer, args.bertscore_batch_size, device)
    with cli.for_flag("--model"):
        tok = load_tokenizer(path)
        model = Decoder.from_pretrained(path, dtype=torch_dtype, device=device,
                                        quantize=None if args.quantize == "none" else args.quantize).eval()
    if tok.eos_id is None:
        raise cli.UserError("--model", f"{args.model}: {tok.no_id('eos')}")
    if model.cfg.pos == "learned" and model.cfg.max_pos - args.max_new_tokens < 1:
        raise cli.UserError("--max-new-tokens", f"{args.max_new_tokens} leaves no room for a prompt in the model's "
                                                 f"{model.cfg.max_pos} positions")
    gen_cfg = model_generation_config(path)           # a bad generation_config.json fails here, before any work
    prompt, top_k, top_p, notes = resolve_recipe(args, gen_cfg)
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
    for note in notes:
        log(f"warning: {note}")
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
        prog = cli.progress(len(records), f"{tag}generate", "row", args.quiet)
        preds = generate_answers(model, tok, questions, args.batch_size, args.max_new_tokens, temperature, top_k,
                                 top_p, seed, prog, gen_stats, prompt, eos_ids=gen_cfg.get("eos_token_id"),
                                 notebook=args.recipe == "notebook")
        prog.close()
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
                         "nll": nll_sum[i] / nll_tok[i] if nll_tok[i] > 0 else None, "nll_tokens": int(nll_tok[i])})

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
        "data": {"path": args.data, "sha256": outputs.sha256(args.data), "n": len(records), "n_file": len(records_all),
                 "counts": counts},
        "generation": {"mode": "greedy" if args.greedy else "sampled", "temperature": temperature,
                       "top_k": top_k or None, "top_p": top_p if top_p < 1 else None,
                       "recipe": args.recipe, "model_generation_config": gen_cfg or None, "ignored": notes,
                       "max_new_tokens": args.max_new_tokens,
                       "prompt": "data.format_prompt" if prompt == "cue" else "data.format_prompt(cue=False)",
                       "postprocess": "data.extract_answer_notebook" if args.recipe == "notebook" else
                       "data.extract_answer", "batch_size": args.batch_size, "dtype": dtype,
                       "quantize": args.quantize, "device": device,
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
        raise cli.UserError(path, f"{where}: expected an object of group -> cell, got {type(table).__name__}")
    for g, d in table.items():
        if not isinstance(d, dict) or not _is_num(d.get("mean")):
            raise cli.UserError(path, f"{where}.{g}: expected a cell with a finite number 'mean'")
        for k in ("lo", "hi", "std"):
            if d.get(k) is not None and not _is_num(d[k]):
                raise cli.UserError(path, f"{where}.{g}.{k}: expected a number or null, got {d[k]!r}"[:200])
        n = d.get("n")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise cli.UserError(path, f"{where}.{g}.n: expected a count (an integer >= 0) or null, got {n!r}"[:200])


def load_eval(path, flag="--table", predictions=True):
    """An eval.json for --table (or --compare), checked field by field (one UserError naming the file and field);
    with predictions, also the predictions.jsonl beside it against the sha256 it records (check_predictions)."""
    cli.input_file(path, flag)
    ev = cli.read_json(path, "eval.json")
    if not isinstance(ev, dict):
        raise cli.UserError(path, "not an eval.json written by evaluate.py (expected a JSON object)")
    for key in ("setting", "model", "scores", "nll"):
        if key not in ev:
            raise cli.UserError(path, f"{key}: missing (not an eval.json written by evaluate.py)")
    if not isinstance(ev["setting"], str):
        raise cli.UserError(path, f"setting: expected text, got {type(ev['setting']).__name__}")
    m = ev["model"]
    if not isinstance(m, dict) or not isinstance(m.get("name"), str):
        raise cli.UserError(path, "model.name: expected text")
    w = m.get("weights")
    if w is not None and not (isinstance(w, list) and len(w) == 3 and all(_is_num(x) for x in w)):
        raise cli.UserError(path, "model.weights: expected three numbers or null")
    for key in ("scores", "floor"):
        if key == "floor" and ev.get("floor") is None:
            continue
        if not isinstance(ev[key], dict):
            raise cli.UserError(path, f"{key}: expected an object of metric -> groups")
        for metric, table in ev[key].items():
            _check_cells(path, f"{key}.{metric}", table)
    _check_cells(path, "nll", ev["nll"])
    if predictions:
        check_predictions(path, ev)
    return ev


def check_predictions(path, ev):
    """The predictions.jsonl beside an eval.json must be the one it was computed from: eval.json records its sha256
    ("predictions_sha256"; an older eval.json without it is taken as it is). A mismatch (a later run that failed
    half-way, a file copied in) is one UserError: its scores and the per-example rows would disagree."""
    want = ev.get("predictions_sha256")
    pred = os.path.join(os.path.dirname(os.path.abspath(path)), "predictions.jsonl")
    if want is None or not os.path.isfile(pred):   # no file: --compare says so when it needs it
        return
    with cli.reading(pred, "predictions"):
        got = outputs.sha256(pred)
    if got != want:
        raise cli.UserError(pred, f"does not match {path} (sha256 {got[:12]}..., eval.json records "
                                   f"{str(want)[:12]}...): the two files are from different runs; evaluate again")


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


def holm(ps):
    """Holm's step-down adjusted p-values, in the order given: with the m p-values sorted p_(1) <= ... <= p_(m),
    adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)). Controls the family-wise error rate at any level."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    out, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        out[i] = running
    return out


def holm_marks(marks):
    """marks {(group, row, col): p} with each group's (one table's) p-values Holm-adjusted among themselves."""
    out = {}
    for g in {k[0] for k in marks}:
        keys = [k for k in marks if k[0] == g]
        out.update(zip(keys, holm([marks[k] for k in keys])))
    return out


def build_tables(evs, metric="f1", paper=False, marks=None, adjusted=False):
    """Markdown text: one table for all test answers, then one per severity class. Rows = models, columns =
    Base, CE, Mild, Strong, Balanced (+ custom weights). Returns (text, cells) with cells[group][(row, col)].
    marks: {(group, row, col): p} from table_significance; a cell with p < 0.05 gets " *". adjusted: the marks are
    Holm-adjusted (holm_marks), which the footnote says."""
    marks = marks or {}
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
                    p = marks.get((g, r, c))
                    vals.append(fmt_cell(d, digits) + (f" (k={d['k']})" if d["k"] > 1 else "")
                                + (" *" if p is not None and p < 0.05 else ""))
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
    if marks:
        lines.append(f"*: differs from CE on the same test answers at p < 0.05 (paired sign-flip permutation test "
                     f"over examples, as evaluate.py --compare; k files per cell are averaged per example first, so "
                     f"the training seeds are held fixed"
                     + ("; p Holm-adjusted over the cells of each table" if adjusted else "; p not corrected for "
                        "multiple comparisons (--holm corrects within each table)")
                     + f"). Tested against CE: {len(marks)} cells, {sum(p < 0.05 for p in marks.values())} marked.")
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
        outputs.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)


def table_main(args):
    args.metric, args.permutations = args.metric or "f1", args.permutations or PERMUTATIONS
    if args.plot is not None:   # "" too: refused, not silently skipped
        cli.output_file(args.plot, "--plot", inputs=args.table)
    evs = [load_eval(p) for p in args.table]
    if all(cell_values(e, args.metric, "overall") is None for e in evs):   # an empty table is no answer
        raise cli.UserError("--metric", f"{args.metric}: no --table file has it"
                             + (" (evaluate.py --floor writes it)" if args.metric == "floor" else ""))
    marks, skipped = table_significance(args.table, evs, args.metric, args.bootstrap, args.bootstrap_seed,
                                        args.permutations)
    for msg in skipped:
        cli.notice(f"note: no significance mark for {msg}")   # msg names runs from files: escaped
    if args.holm:
        marks = holm_marks(marks)
    text, (rows, cols, cells) = build_tables(evs, args.metric, args.paper, marks, args.holm)
    if args.plot:
        save_plot(args.plot, args.metric, rows, cols, cells)
    print(text, end="")
    if args.plot:
        print(f"\nplot: {args.plot}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------
# Paired comparison of two runs (--compare) and the significance marks of --table

PROTOCOL_KEYS = ("mode", "temperature", "top_k", "top_p", "max_new_tokens", "prompt", "postprocess", "repeat")
SCORER_KEYS = ("model", "layer", "idf", "rescale_with_baseline", "scale")


def eval_json_path(path):
    """An eval folder or its eval.json -> the eval.json path."""
    return os.path.join(path, "eval.json") if os.path.isdir(path) else path


def load_examples(path):
    """(eval.json dict, per-example arrays) of one run. The arrays come from predictions.jsonl beside the eval.json:
    per test record (index order) its severity, question, reference, P, R, F1 (x100, averaged over the run's sampled
    repeats), answer NLL and answer tokens (None where an older run did not record them)."""
    ev = load_eval(eval_json_path(path), "--compare", predictions=False)   # checked below, once its rows parse
    for key, kind in (("data", dict), ("bertscore", dict), ("generation", dict)):
        if not isinstance(ev.get(key), kind):
            raise cli.UserError(eval_json_path(path), f"{key}: missing (an eval.json written by evaluate.py has it)")
    if not isinstance(ev["data"].get("n"), int) or isinstance(ev["data"].get("n"), bool) or ev["data"]["n"] < 1:
        raise cli.UserError(eval_json_path(path), "data.n: expected the number of test records")
    pred = os.path.join(os.path.dirname(os.path.abspath(eval_json_path(path))), "predictions.jsonl")
    if not os.path.isfile(pred):
        raise cli.UserError(pred, "no such file (the per-example scores are needed)")
    n = ev["data"]["n"]
    rows = {}
    with cli.reading(pred, "predictions"):
        with open(pred, encoding="utf-8") as f:
            lines = list(enumerate(f, 1))
    for ln, line in lines:
        if not line.strip():
            continue
        try:
            r = cli.STRICT_JSON.decode(line)
            if not all(isinstance(r[k], str) for k in ("severity", "question", "reference")) or \
                    not all(_is_num(r[m]) for m in METRICS) or isinstance(r["index"], bool) or \
                    not (r.get("nll") is None or _is_num(r["nll"])) or \
                    not (r.get("nll_tokens") is None or _is_num(r["nll_tokens"])):
                raise TypeError("wrong field types")
            rows.setdefault(int(r["index"]), []).append(r)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError) as e:
            raise cli.DataError(pred, ln, "row", f"not a predictions.jsonl row ({e})") from None
    if sorted(rows) != list(range(n)):
        raise cli.DataError(pred, 1, "index", f"expected the records 0..{n - 1} once per run")
    check_predictions(eval_json_path(path), ev)
    ex = {"path": pred, "severity": [], "question": [], "reference": []}
    cols = {m: [] for m in METRICS + ("nll", "nll_tokens")}
    for i in range(n):
        rs = rows[i]
        for k in ("severity", "question", "reference"):
            ex[k].append(rs[0][k])
        for m in METRICS:
            cols[m].append(float(np.mean([r[m] for r in rs])))
        cols["nll"].append(rs[0].get("nll"))
        cols["nll_tokens"].append(rs[0].get("nll_tokens"))
    for m in METRICS:
        ex[m] = np.array(cols[m])
    ex["nll"] = cols["nll"]
    ex["nll_tokens"] = cols["nll_tokens"]
    return ev, ex


def check_comparable(runs):
    """Refuse (ValueError) runs that were not scored on the same data with the same scorer and protocol, or whose
    answer NLL was cut at a different --max-len (eval.json's argv.max_len)."""
    (pa, a), rest = runs[0], runs[1:]
    for pb, b in rest:
        checks = [("data sha256", a["data"].get("sha256"), b["data"].get("sha256")),
                  ("number of test records", a["data"].get("n"), b["data"].get("n"))]
        checks += [(f"scorer {k}", a["bertscore"].get(k), b["bertscore"].get(k)) for k in SCORER_KEYS]
        checks += [(f"protocol {k}", a["generation"].get(k), b["generation"].get(k)) for k in PROTOCOL_KEYS]
        # the answer NLL is scored on prompt+answer cut at --max-len: a shorter cut alone moves it (issue 18)
        checks.append(("--max-len (the answer NLL's truncation)", (a.get("argv") or {}).get("max_len"),
                       (b.get("argv") or {}).get("max_len")))
        for what, x, y in checks:
            if x != y:
                raise cli.UserError("--compare", f"{pa} and {pb} differ in {what} ({x!r} vs {y!r}): a paired "
                                                  f"comparison needs the same data, scorer and protocol")


def paired_table(exa, exb, n_boot, seed, n_perm):
    """{metric: {group: paired_diff}} for P, R, F1 and answer NLL, overall and per severity. NLL: the token-weighted
    ratio of sums, sum_i n_i nll_i / sum_i n_i (eval.json's statistic), when both runs recorded equal answer-token
    counts n_i, else the mean of per-example NLL (named under 'nll_statistic'). 'nll_example_mean' always holds the
    unweighted mean of the per-example NLL differences beside it."""
    for k in ("severity", "question", "reference"):
        if exa[k] != exb[k]:
            i = next(j for j, (x, y) in enumerate(zip(exa[k], exb[k])) if x != y)
            raise cli.UserError("--compare", f"{exa['path']} and {exb['path']} differ in the {k} of record {i}")
    sev = np.asarray(exa["severity"])
    out = {}
    ok = np.array([x is not None and y is not None for x, y in zip(exa["nll"], exb["nll"])])
    tokens = exa["nll_tokens"] == exb["nll_tokens"] and None not in exa["nll_tokens"]
    for m in METRICS + ("nll",):
        out[m] = {}
        for g in GROUPS:
            sel = np.ones(len(sev), bool) if g == "overall" else sev == g
            if m == "nll":
                sel &= ok
            if not sel.any():
                continue
            if m == "nll":
                a = np.array([exa["nll"][i] for i in np.flatnonzero(sel)])
                b = np.array([exb["nll"][i] for i in np.flatnonzero(sel)])
                den = np.array([exa["nll_tokens"][i] for i in np.flatnonzero(sel)], dtype=np.float64) if tokens else None
                out[m][g] = paired_diff(a, b, n_boot, seed, n_perm, den)
                out.setdefault("nll_example_mean", {})[g] = paired_diff(a, b, n_boot, seed, n_perm)
            else:
                out[m][g] = paired_diff(exa[m][sel], exb[m][sel], n_boot, seed, n_perm)
    out["nll_statistic"] = ("token-weighted ratio of sums: sum_i n_i nll_i / sum_i n_i over the answer tokens n_i "
                            "(eval.json's NLL); nll_example_mean: the unweighted mean of per-example differences"
                            if tokens else "mean of per-example NLL (answer-token counts differ or are missing); "
                            "nll_example_mean: the same")
    return out


def compare_main(args):
    args.permutations = args.permutations or PERMUTATIONS
    if not args.out:
        raise cli.UserError("--out", "required with --compare (compare.json is written there)")
    cli.output_dir(args.out, "--out")
    cli.output_file(os.path.join(args.out, "compare.json"), "--out")
    outputs.lock_output(args.out, "--out")
    a, b = args.compare
    if os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b):   # a run against itself: nothing to test
        raise cli.UserError("--compare", f"{a} and {b} are the same run: give two different eval folders")
    (ea, xa), (eb, xb) = load_examples(args.compare[0]), load_examples(args.compare[1])
    check_comparable([(args.compare[0], ea), (args.compare[1], eb)])
    diffs = paired_table(xa, xb, args.bootstrap, args.bootstrap_seed, args.permutations)
    side = lambda ev, p: {"path": p, "name": ev["model"]["name"], "setting": ev["setting"],   # noqa: E731
                          "seeds": ev["generation"].get("seeds")}
    notes = []
    if ea["generation"].get("seeds") != eb["generation"].get("seeds"):
        notes.append("the two runs were sampled with different seeds")
    result = {"a": side(ea, args.compare[0]), "b": side(eb, args.compare[1]),
              "data": {k: ea["data"].get(k) for k in ("path", "sha256", "n", "counts")},
              "bertscore": {k: ea["bertscore"].get(k) for k in SCORER_KEYS},
              "protocol": {k: ea["generation"].get(k) for k in PROTOCOL_KEYS},
              "max_len": (ea.get("argv") or {}).get("max_len"),
              "difference": "B - A, per example, then averaged (sampled repeats averaged per example first)",
              "bootstrap": {"resamples": args.bootstrap, "seed": args.bootstrap_seed, "level": 0.95,
                            "interval": "percentile, examples resampled with replacement"},
              "permutation": {"test": "paired sign-flip, two-sided", "random_flips": args.permutations,
                              "seed": args.bootstrap_seed},
              "nll_statistic": diffs.pop("nll_statistic"), "diff": diffs, "notes": notes}
    out = os.path.join(args.out, "compare.json")
    outputs.write_json(out, result)
    print(f"B - A: {result['b']['name']} / {result['b']['setting']} minus {result['a']['name']} / "
          f"{result['a']['setting']} | n = {result['data']['n']}" + "".join(f" | note: {x}" for x in notes))
    print("| metric | group | n | A | B | B - A [95% paired bootstrap] | p (sign-flip) |")
    print("|---|---|---|---|---|---|---|")
    for m in METRICS + ("nll", "nll_example_mean"):
        dg = 3 if m.startswith("nll") else 2
        for g, d in diffs.get(m, {}).items():
            ci = f" [{d['lo']:+.{dg}f}, {d['hi']:+.{dg}f}]" if d["lo"] is not None else ""
            print(f"| {m} | {g} | {d['n']} | {d['mean_a']:.{dg}f} | {d['mean_b']:.{dg}f} | {d['diff']:+.{dg}f}{ci} | "
                  f"{d['p']:.4f} |")
    print(f"\nwrote {out}", file=sys.stderr)
    return result


def table_significance(paths, evs, metric, n_boot, seed, n_perm):
    """{(group, row, column): p} for each cell of --table whose row also has a CE cell: the paired sign-flip
    p-value of the cell against CE on the same test answers. Several eval.json in one cell (training seeds): their
    per-example scores are averaged first, so the seeds are treated as fixed. Cells whose predictions.jsonl is
    missing, or whose runs are not comparable, are left out and listed in the second return value."""
    if metric not in METRICS + ("nll",):
        return {}, []
    cells = {}
    for p, ev in zip(paths, evs):
        cells.setdefault((ev["model"]["name"], column_of(ev)), []).append(p)

    @functools.cache   # a row's CE cell is compared with every other column: read its files once
    def merged(ps):
        loaded = [load_examples(p) for p in ps]
        check_comparable(list(zip(ps, [e for e, _ in loaded])))
        exs = [x for _, x in loaded]
        out = dict(exs[0])
        for m in METRICS:
            out[m] = np.mean([x[m] for x in exs], 0)
        nll = [[x["nll"][i] for x in exs] for i in range(len(exs[0]["nll"]))]
        out["nll"] = [None if None in v else float(np.mean(v)) for v in nll]
        if any(x["nll_tokens"] != exs[0]["nll_tokens"] for x in exs):
            out["nll_tokens"] = [None] * len(nll)
        return out, loaded[0][0]

    marks, skipped = {}, []
    for (r, c), ps in cells.items():
        if c == "CE" or (r, "CE") not in cells:
            continue
        try:
            (xa, ea), (xb, eb) = merged(tuple(cells[(r, "CE")])), merged(tuple(ps))
            check_comparable([(cells[(r, "CE")][0], ea), (ps[0], eb)])
            diffs = paired_table(xa, xb, n_boot, seed, n_perm)
        except ValueError as e:
            skipped.append(f"{r} / {c}: {e}")
            continue
        for g, d in diffs[metric].items():
            marks[(g, r, c)] = d["p"]
    return marks, skipped


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    """The command line under the contract: a user error is one line "error: ..." and exit status 2."""
    return cli.run(_main, argv)


def _main(argv=None):
    args = get_args(argv)
    if args.table:
        return table_main(args)
    if args.compare:
        return compare_main(args)
    result, rows = evaluate(args)      # checks every flag and path (--out included) before any work
    out = out_folder(args)
    result["out"] = out
    # one unit: both files or neither replace the old ones, eval.json (which names the predictions' sha256) last
    with outputs.unit(out, last=("eval.json",)) as tmp:
        outputs.write_jsonl(os.path.join(tmp, "predictions.jsonl"), rows)
        result["predictions_sha256"] = outputs.sha256(os.path.join(tmp, "predictions.jsonl"))
        outputs.write_json(os.path.join(tmp, "eval.json"), result)
    print_summary(result)
    print(f"\nwrote {os.path.join(out, 'eval.json')} and predictions.jsonl ({result['timing']['total_s']:.0f} s)",
          file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
