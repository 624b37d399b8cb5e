"""
Evaluate a causal LM on the severity-annotated test set the paper's way (arXiv 2604.06346): one evaluation run.

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
    python evaluate.py --model runs/notebook/balanced --recipe notebook      # the authors' notebooks' protocol

Outputs (written atomically, only after everything succeeded): <out>/eval.json (settings, the setting label
Base/CE/Mild/Strong/Balanced/custom read from the training run's args.json, data sha256, counts per class,
scores, and predictions_sha256) and <out>/predictions.jsonl (one line per test record and run: question, reference,
prediction, severity, per-example P/R/F1 x 100 and answer NLL). The two replace the old pair as one unit, and
report.py (table, compare) refuses a predictions.jsonl whose sha256 is not the one its eval.json records.

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
import argparse
import os
import sys
import time

import numpy as np
import torch

import batching
import card as model_card
import data
import outputs
from stats import GROUPS, METRICS, derangement, fmt_cell, score_table, summarize

ROOT = os.path.dirname(os.path.abspath(__file__))
SAMPLE_TEST = os.path.join(ROOT, "data", "sample", "test.jsonl")
DEFAULT_SCORER = "bert-base-multilingual-cased"


def get_args(argv=None):
    num = cli.number
    p = cli.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--model", default=None, help="registry name (see hub.REGISTRY), HF repo id or local folder of the "
                   "untouched base model (setting Base), or a folder train.py wrote (setting from its args.json)")
    p.add_argument("--data", default=SAMPLE_TEST, help="test file (.jsonl/.json/.csv/.tsv/.xlsx): question, answer, "
                   "severity, p_nc, p_n, p_c or their aliases (data/README.md)")
    p.add_argument("--question-col", default=None, help="question column when it is not named question (any case)")
    p.add_argument("--answer-col", default=None, help="answer (reference) column when it is not named answer (any case)")
    p.add_argument("--preprocess", choices=data.PREPROCESS, default=None, help="what the model reads (prompts, and "
                   "the answers of the NLL): none or arabert (data.arabert_preprocess); the references BERTScore "
                   "compares with stay as written. Default: the training run's --preprocess (args.json), else none")
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
    p.add_argument("--name", default=None, help="row label in report.py table (default: the base model's name: the registry "
                   "name, or args.json's model for a train.py folder)")
    p.add_argument("--setting", type=data.setting_name, default=None, metavar="{" + ",".join(data.SETTINGS) + ",custom}",
                   help="override the setting label read from args.json (a model trained elsewhere)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--check-args", action="store_true", help="check every flag and path (the model's and the "
                   "scorer's names without loading them, the data, --out) and exit: 0 and one line when all is well, "
                   "else the one error line; nothing is written or locked")
    p.add_argument("--skip-done", action="store_true", help="do nothing (exit 0, one line 'done: ...') when <out> "
                   "already holds this very run, finished: an eval.json + predictions.jsonl that match each other, "
                   "written with the same flags on the same data and, for a train.py folder, the same args.json "
                   "(scripts/ablation.sh reruns a sweep with it)")
    # the reports moved to report.py: a one-line pointer for the old spellings
    p.add_argument("--table", nargs="*", default=None, help=argparse.SUPPRESS)
    p.add_argument("--compare", nargs="*", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.name = cli.argv_text(a.name, "--name")   # an Arabic label under LC_ALL=C: recorded as typed
    for flag, cmd in (("table", "table EVAL_JSON ..."), ("compare", "compare RUN_A RUN_B --out DIR")):
        if getattr(a, flag) is not None:
            raise cli.UserError(f"--{flag}", f"moved to its own script: python report.py {cmd}")
    return a


# ----------------------------------------------------------------------------------------------------------------
# What is being evaluated


def describe_model(name_or_path):
    """(row name, setting label, train args or None). A folder with train.py's args.json is a fine-tuned run whose
    setting comes from its weights (a, b, c); anything else is an untouched base model."""
    args_file = os.path.join(name_or_path, "args.json")
    if not os.path.isfile(args_file):
        return os.path.basename(os.path.normpath(name_or_path)), "Base", None
    targs = cli.read_json(args_file, "training arguments")
    try:
        abc = targs.get("weights_abc")
        abc = data.parse_weights(str(targs.get("weights", ""))) if abc is None else tuple(float(x) for x in abc)
        if len(abc) != 3:
            raise ValueError(f"{len(abc)} values")
    except (AttributeError, TypeError, ValueError) as e:
        raise cli.UserError(args_file, f"weights: cannot read the training weights a,b,c ({e})") from None
    setting = next((data.PRESET_SETTING[k] for k, v in data.PRESETS.items()
                    if k in data.PRESET_SETTING and all(abs(x - y) < 1e-9 for x, y in zip(v, abc))), "custom")
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
    from hub import read_generation_config
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
    their masking are train.py's (batching.encode / batching.collate: prompt + answer + EOS, loss on answer + EOS)."""
    if model.cfg.pos == "learned":
        max_len = min(max_len, model.cfg.max_pos + 1)       # x = ids[:-1] must fit the positions
    ex = batching.encode(records, tok, (1.0, 1.0, 1.0), max_len, "answer")
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    device = model.wte.weight.device
    sums, counts = np.zeros(len(ex)), np.zeros(len(ex))
    order = length_order([len(e[0]) for e in ex])
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        x, y, _, _, _ = batching.collate([ex[i] for i in idx], pad, device)
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
    repos) is downloaded with SCORER_ALLOW, like hub.resolve; the folder is what bert-score then gets, so it
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


def scorer_fingerprint(folder):
    """sha256 over the scorer's config.json, tokenizer files and safetensors weights (name and content, sorted):
    one scorer however its folder was named (about a second for a 700 MB model)."""
    import hashlib
    h = hashlib.sha256()
    names = sorted(f for f in os.listdir(folder) if f == "config.json" or f.endswith(".safetensors")
                   or f in ("tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model",
                            "spiece.model"))
    for f in names:
        with cli.reading(os.path.join(folder, f), "scorer file"):
            h.update(f.encode() + b"\0" + outputs.sha256(os.path.join(folder, f)).encode())
    return h.hexdigest()


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
        # what the scorer is, for report.py: the folder resolved (a relative and an absolute path are one scorer)
        # and a fingerprint of its files, so that two runs compare by content, never by the text typed
        self.model_path = os.path.realpath(folder) if os.path.isdir(model_type) else model_type
        self.fingerprint = scorer_fingerprint(folder)
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
# Evaluation


def check_args(args, lock=True):
    """Every flag and path, before any work: the model, the data, the output folder (locked unless lock=False:
    --check-args)."""
    if args.model is None:
        raise cli.UserError("--model", "required (tables and comparisons of finished runs: report.py)")
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
    if not lock:
        if os.path.isdir(out_folder(args)):
            outputs.refuse_foreign(out_folder(args), "--out", outputs.EVAL_FILES, outputs.is_eval_run, "evaluate.py")
        return
    outputs.lock_output(out_folder(args), "--out")   # one run per folder (a train.py run there holds it too)
    # temp files of a killed write: no live run can own them now that we hold the lock
    outputs.clean_stale(out_folder(args), ("unit", "eval.json", "predictions.jsonl"))
    # an eval.json / predictions.jsonl there that evaluate.py did not write is someone else's: never replaced
    outputs.refuse_foreign(out_folder(args), "--out", outputs.EVAL_FILES, outputs.is_eval_run, "evaluate.py")


# Flags that do not change what a run computes: a finished run with other values of these is the same run.
SAME_RUN_IGNORED = ("quiet", "check_args", "skip_done", "compile", "bertscore_batch_size")


def finished_run(args):
    """<out>/eval.json when <out> already holds this very run, finished (--skip-done), else None: evaluate.py's
    eval.json whose predictions.jsonl matches its sha256, with the same flags (SAME_RUN_IGNORED aside), the same
    data (sha256) and, for a train.py folder, the same args.json (a model retrained since is another run)."""
    import json
    out = out_folder(args)
    f, pred = os.path.join(out, "eval.json"), os.path.join(out, "predictions.jsonl")
    ev = outputs.json_object(f)
    if ev is None or not outputs.is_eval_run(out) or not os.path.isfile(pred) or not os.path.isfile(args.data):
        return None
    now = json.loads(json.dumps(vars(args)))
    saved = ev.get("argv") if isinstance(ev.get("argv"), dict) else {}
    if any(saved.get(k) != v for k, v in now.items() if k not in SAME_RUN_IGNORED):
        return None
    if not isinstance(ev.get("data"), dict) or ev["data"].get("sha256") != outputs.sha256(args.data):
        return None
    if not isinstance(ev.get("model"), dict) or describe_model(args.model)[2] != ev["model"].get("train_args"):
        return None
    return f if ev.get("predictions_sha256") == outputs.sha256(pred) else None


def check_only(args):
    """--check-args: check_args without the lock, plus the model's and the scorer's names (no download, no load)."""
    from hub import check_name, local_folder
    check_args(args, lock=False)
    if not (args.model == "tiny" and not local_folder(args.model)) and not os.path.isfile(
            os.path.join(args.model, "args.json")):
        with cli.for_flag("--model"):
            check_name(args.model)
    if args.bertscore_layer is None:   # what BertScore refuses first, without loading bert-score's model
        from bert_score.utils import model2layers
        if args.bertscore_model not in model2layers:
            raise cli.UserError("--bertscore-model", f"{args.bertscore_model!r} is not in bert-score's layer table: "
                                                     f"give --bertscore-layer")
    elif os.path.exists(args.bertscore_model) or args.bertscore_model.startswith(("./", "../", "/", "~")):
        scorer_folder(args.bertscore_model)
    data.load_records(args.data)
    print(f"evaluate.py: flags ok (--out {out_folder(args)})")


def out_folder(args):
    return args.out if args.out is not None else (args.model if os.path.isdir(args.model) else
                        os.path.join("out", f"eval-{os.path.basename(os.path.normpath(args.model))}"))


def evaluate(args):
    """Everything but the writing: returns (eval.json dict, prediction rows)."""
    from hub import load_tokenizer, local_folder, resolve
    from model import Decoder
    t_start = time.time()
    check_args(args)
    records_all = data.load_records(args.data, question_col=args.question_col, answer_col=args.answer_col)
    records = records_all[:args.n]
    name, setting, targs = describe_model(args.model)
    device = str(cli.resolve_device(args.device, "--device"))
    cuda_auto = "fp16" if args.recipe == "notebook" else "bf16"     # the notebooks generated in fp16
    dtype = args.dtype if args.dtype != "auto" else (cuda_auto if device.startswith("cuda") else "fp32")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    # find the model (a download for a hub name) before the scorer, load it after: both fail fast (model.py's
    # loaders report a missing folder, bad config, tokenizer or weights as one UserError naming the file)
    with cli.for_flag("--model"):
        path = args.model if args.model == "tiny" and not local_folder(args.model) else resolve(args.model)
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
    preprocess = args.preprocess or (targs or {}).get("preprocess", "none")
    model_records = data.preprocess_records(records, preprocess)     # what the model reads
    questions = [r["question"] for r in model_records]
    refs = [r["answer"] for r in records]                             # the references as written
    sev = [r["severity"] for r in records]
    counts = {"overall": len(records), **{s: sev.count(s) for s in data.SEVERITIES}}
    log(f"{args.model} ({setting}) on {len(records)} of {len(records_all)} records of {args.data} | "
        + ", ".join(f"{s} {counts[s]}" for s in data.SEVERITIES) + f" | {dtype} on {device}")

    # eval NLL of the reference answers: seed-free, computed once
    t0 = time.time()
    nll_sum, nll_tok = answer_nll(model, tok, model_records, args.batch_size, args.max_len)
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

    data_sha = outputs.sha256(args.data)
    result = {
        "setting": args.setting or setting,
        "model": {"path": args.model, "name": args.name or name, "params": model.num_params(),
                  "family": model.cfg.family,
                  "weights": targs["weights_abc"] if targs else None, "train_args": targs},
        "data": {"path": args.data, "sha256": data_sha, "n": len(records), "n_file": len(records_all),
                 "counts": counts, "references": data.references_of(args.data, data_sha)},
        "generation": {"mode": "greedy" if args.greedy else "sampled", "temperature": temperature,
                       "top_k": top_k or None, "top_p": top_p if top_p < 1 else None,
                       "recipe": args.recipe, "model_generation_config": gen_cfg or None, "ignored": notes,
                       "max_new_tokens": args.max_new_tokens,
                       "prompt": "data.format_prompt" if prompt == "cue" else "data.format_prompt(cue=False)",
                       "postprocess": "data.extract_answer_notebook" if args.recipe == "notebook" else
                       "data.extract_answer", "batch_size": args.batch_size, "dtype": dtype,
                       "quantize": args.quantize, "device": device, "preprocess": preprocess,
                       "seeds": seeds, "repeat": len(seeds)},
        "bertscore": {"model": scorer.model_type, "model_path": scorer.model_path,
                      "fingerprint": scorer.fingerprint, "layer": scorer.layer, "idf": False, "rescale_with_baseline": False,
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


def read_card(path):
    with cli.reading(path, "model card"):
        with open(path, encoding="utf-8") as f:
            return f.read()


def main(argv=None):
    """The command line under the contract: a user error is one line "error: ..." and exit status 2."""
    return cli.run(_main, argv)


def _main(argv=None):
    args = get_args(argv)
    if args.skip_done:
        done = finished_run(args)
        if done:
            print(f"done: {done} is this run, finished (same flags, data and model): skipped (--skip-done)")
            return None
    if args.check_args:
        return check_only(args)
    result, rows = evaluate(args)      # checks every flag and path (--out included) before any work
    out = out_folder(args)
    result["out"] = out
    # the model card of the train.py run scored (<model>/README.md, card.py): its scores are added there
    card_path = os.path.join(args.model, "README.md") if os.path.isdir(args.model) else None
    card_path = card_path if card_path and model_card.is_ours(card_path) else None
    in_out = card_path is not None and os.path.isdir(out) and os.path.samefile(out, args.model)
    # one unit: both files or neither replace the old ones, eval.json (which names the predictions' sha256) last
    with outputs.unit(out, last=("eval.json",)) as tmp:
        outputs.write_jsonl(os.path.join(tmp, "predictions.jsonl"), rows)
        result["predictions_sha256"] = outputs.sha256(os.path.join(tmp, "predictions.jsonl"))
        outputs.write_json(os.path.join(tmp, "eval.json"), result)
        if in_out:   # the card with the scores, in the same unit
            outputs.atomic_write(os.path.join(tmp, "README.md"), model_card.with_scores(read_card(card_path), result))
    if card_path and not in_out:
        outputs.atomic_write(card_path, model_card.with_scores(read_card(card_path), result))
    print_summary(result)
    print(f"\nwrote {os.path.join(out, 'eval.json')} and predictions.jsonl ({result['timing']['total_s']:.0f} s)",
          file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
