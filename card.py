"""
<out>/README.md: the model card of a train.py run, as the Hugging Face hub shows it (YAML front matter that
huggingface_hub.ModelCard.load reads, then Markdown). train.py writes it with every checkpoint (the same unit);
evaluate.py adds its scores to the card of the run it scored (add_scores). A card carries MARK, so a new run
replaces only a card that a run wrote, never a README.md of the user's.
"""
import json
import os
import shlex

import data

MARK = "<!-- model card written by train.py (severity-aware fine-tuning): a new run into this folder replaces it -->"
EVAL_BEGIN, EVAL_END = "<!-- evaluate.py scores: begin -->", "<!-- evaluate.py scores: end -->"
TAGS = ("severity-aware", "arabic", "medical")


def is_ours(path):
    """True when the file at path is a card written here (carries MARK)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return MARK in f.read(64 * 1024)
    except OSError:
        return False


def _yaml_str(s):
    return json.dumps(str(s), ensure_ascii=False)   # a JSON string is a YAML flow scalar


def _num(x):
    return f"{x:g}" if isinstance(x, float) else str(x)


def render(args, step, total, eval_loss=None, command=None, base_model=None):
    """The card's text. args: the run's args.json dict; eval_loss: train.evaluate_loss's dict at `step` (or None);
    base_model: the base's hub repo id (front matter base_model), None for a local folder or a random init."""
    lora = args.get("lora_rank", 0) > 0
    front = ["---", "library_name: transformers"]
    if base_model:
        front.append(f"base_model: {_yaml_str(base_model)}")
    front += ["pipeline_tag: text-generation", "tags:"] + [f"- {t}" for t in TAGS + (("lora",) if lora else ())]
    front += ["---", ""]
    a, b, c = args["weights_abc"]
    name = os.path.basename(os.path.normpath(args.get("out") or "model"))
    body = [MARK, "", f"# {name}", "",
            f"Severity-aware fine-tuning (arXiv 2604.06346) of `{args['model']}`: each answer token's cross-entropy "
            f"is scaled by its example's weight w = {_num(a)}·p_nc + {_num(b)}·p_n + {_num(c)}·p_c"
            + (" (one-hot p from the severity label)" if args.get("severity_source") == "label"
               else " (soft severity probabilities)") + ".", ""]
    if lora:
        body += ["The merged model is in this folder (loads in transformers); the adapters alone, in peft's format, "
                 "are in `adapter/` (`peft.PeftModel.from_pretrained(base, \"<this folder>/adapter\")`).", ""]
    if command:
        body += ["## Command", "", "```", command, "```", ""]
    rows = [("weights a, b, c", f"{_num(a)}, {_num(b)}, {_num(c)} (--weights {args.get('weights')})"),
            ("severity source", args.get("severity_source", "probs")),
            ("loss tokens", args.get("loss_tokens")), ("loss normalisation", args.get("loss_norm")),
            ("steps", f"{step} of {total}"), ("batch", f"{args.get('batch_size')} x grad-accum "
                                                      f"{args.get('grad_accum')} x {args.get('world_size', 1)} processes"),
            ("lr", f"{args.get('lr'):g} ({args.get('schedule')}, warm-up {args.get('warmup')})"),
            ("max length", args.get("max_len")), ("dtype", args.get("dtype")), ("seed", args.get("seed"))]
    if lora:
        rows += [("LoRA", f"r {args['lora_rank']}, alpha {_num(args['lora_alpha'])}, dropout "
                          f"{_num(args['lora_dropout'])}, targets {', '.join(args['lora_targets'])}"),
                 ("quantize", args.get("quantize"))]
    rows += [("data", f"`{args.get('data')}`"), ("data sha256", f"`{args.get('data_sha256')}`")]
    body += ["## Training", "", "| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    if eval_loss:
        groups = [("all", "eval_loss")] + [(s, f"eval_loss_{s}") for s in data.SEVERITIES]
        body += [f"## Eval loss at step {step}", "",
                 f"Mean answer-token NLL (nats, unweighted) on `{args.get('eval_path', args.get('eval_data'))}`.", "",
                 "| " + " | ".join(g for g, _ in groups) + " |", "|" + "---|" * len(groups),
                 "| " + " | ".join(f"{eval_loss[k]:.4f}" if k in eval_loss else "-" for _, k in groups) + " |", ""]
    return "\n".join(front + body)


def command_line(argv):
    """The run's command as one shell line."""
    return "python train.py " + " ".join(shlex.quote(a) for a in argv)


def with_scores(text, result):
    """The card text with evaluate.py's row for this result (its setting and data) added or replaced, in one table
    between EVAL_BEGIN and EVAL_END (F1 with its 95% interval, answer NLL)."""
    from stats import GROUPS, fmt_cell
    f1, nll = result["scores"]["f1"], result.get("nll") or {}
    key = f"| {result['setting']} | `{result['data']['path']}` |"
    row = (key + f" {result['data']['n']} | {result['generation']['mode']} | "
           + " | ".join(fmt_cell(f1[g], 2) if g in f1 else "-" for g in GROUPS)
           + f" | {fmt_cell(nll['overall'], 3) if 'overall' in nll else '-'} |")
    head = ["## Evaluation (evaluate.py)", "", "BERTScore F1 x 100 by severity group [95% bootstrap interval]; answer "
            "NLL (nats per token) overall.", "",
            "| setting | data | n | decoding | " + " | ".join(f"F1 {g}" for g in GROUPS) + " | NLL |",
            "|" + "---|" * (5 + len(GROUPS))]
    if EVAL_BEGIN in text and EVAL_END in text:
        before, rest = text.split(EVAL_BEGIN, 1)
        block, after = rest.split(EVAL_END, 1)
        rows = [ln for ln in block.splitlines()[len(head) + 1:] if ln.startswith("| ") and not ln.startswith(key)]
    else:
        before, after, rows = text.rstrip("\n") + "\n\n", "\n", []
    return before + EVAL_BEGIN + "\n" + "\n".join(head + rows + [row]) + "\n" + EVAL_END + after
