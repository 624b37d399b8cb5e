"""Annotate question/answer records with severity probabilities from the severity classifier.

Reads a canonical or raw Q/A file (.jsonl/.json/.csv/.tsv; question/answer columns with aliases such
as Question/Answer), runs the classifier written by classify.py on the QUESTION text only (as the
paper does), and writes canonical six-field records in input order:

    {"question", "answer", "severity", "p_nc", "p_n", "p_c"}     (severity = argmax of the three)

Batched and sorted by length inside fixed chunks of rows; each finished chunk is appended to
<out>.partial and recorded in <out>.partial.json, so an interrupted run (Ctrl-C, crash, lost machine)
continues where it stopped when the same command is run again. The final file appears atomically
(os.replace) only when every row is done. Prints the severity distribution at the end.

Classifiers whose classes are named differently are mapped with --label-map: 'auto' (default)
understands non-critical/neutral/critical, mild/moderate/severe and the Arabic غير حرج/متوسط/حرج;
or give 'src=dst,...' (several classes may map to one severity: their probabilities are added).

Example:
    python annotate.py --data out/maqa/train.jsonl --classifier out/classifier --out out/maqa/train.annotated.jsonl
"""
import cli   # first, and light: cli.start() guards Ctrl-C and the console while the heavy imports load
cli.start(__name__)
import argparse
import json
import os
import sys

import numpy as np
import torch

import data
import outputs
import bert

SEVERITIES, PROB_FIELDS = data.SEVERITIES, data.PROB_FIELDS   # one definition of each, in data
PAPER_DISTRIBUTION = (46, 30, 24)  # % non-critical / neutral / critical after annotation in the paper
DECIMALS = 6                         # probabilities are rounded to this many decimals in the output


def get_args(argv=None):
    num = cli.number
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__)
    p.add_argument("--data", dest="input", default=None, help="Q/A file to annotate (.jsonl/.json/.csv/.tsv/.xlsx)")
    p.add_argument("input_positional", nargs="?", default=None, metavar="DATA", help=argparse.SUPPRESS)   # old spelling
    p.add_argument("--out", required=True, help="output .jsonl (canonical six-field records)")
    p.add_argument("--classifier", default=os.path.join("out", "classifier"),
                   help="folder written by classify.py, hub repo id of a BERT classifier, or a registry name "
                        "('tiny' = random head, for smoke tests)")
    p.add_argument("--revision", default=None, help="hub revision when --classifier is a repo id")
    p.add_argument("--label-map", default="auto",
                   help="classifier class -> severity: auto (severity names and their aliases), arabic "
                        "(غير حرج/متوسط/حرج), mild-moderate-severe, or 'src=dst,...' (dst: non-critical, neutral, "
                        "critical; several classes may map to one severity, probabilities added)")
    p.add_argument("--question-col", default=None, help="question column when it is not named question (any case)")
    p.add_argument("--answer-col", default=None, help="answer column when it is not named answer (any case)")
    p.add_argument("--preprocess", choices=data.PREPROCESS, default=None, help="what the classifier reads: none or "
                   "arabert (data.arabert_preprocess); the written records keep the text as it was. Default: what "
                   "classify.py trained it with (its config.json), else none")
    p.add_argument("--batch-size", type=num(int, lo=1), default=64, help="questions per forward pass")
    p.add_argument("--max-len", type=num(int, lo=3), default=None,
                   help="max tokens per question incl. [CLS]/[SEP], >= 3 (default: the classifier's training --max-len)")
    p.add_argument("--chunk-size", type=num(int, lo=1), default=4096,
                   help="rows per resumable chunk (sorted by length inside a chunk); keep it the same when resuming")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto = cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--limit", type=num(int, lo=1), default=None, help="annotate only the first N rows (>= 1)")
    p.add_argument("--stop-after", type=num(int, lo=1), default=None,
                   help="debug: stop after this many chunks in this run, as if interrupted (rerun to resume)")
    args = p.parse_args(argv)
    if args.input is not None and args.input_positional is not None:
        p.error("give the input once: --data FILE (the positional FILE is its old spelling)")
    args.input = args.input if args.input is not None else args.input_positional
    if args.input is None:
        p.error("the following arguments are required: --data")
    return args


# ----------------------------------------------------------------------------------------------
# Label mapping

# Built-in maps (also what 'auto' understands, through data.canonical_severity).
PRESETS = {
    "arabic": "غير حرج=non-critical,متوسط=neutral,حرج=critical",  # the authors' column names
    "mild-moderate-severe": "mild=non-critical,moderate=neutral,severe=critical",  # sibling paper's names
}


def parse_label_map(spec):
    """'src=dst,...' (or a PRESETS name) -> {src: severity}; None for 'auto'. Checked before the classifier loads."""
    spec = PRESETS.get(spec, spec)
    if spec in (None, "", "auto"):
        return None
    mapping = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        src, eq, dst = part.partition("=")
        src, dst = src.strip(), dst.strip()
        if not eq or not src:
            raise cli.UserError("--label-map", f"'{part.strip()}' is not src=dst")
        sev = dst if dst in SEVERITIES else data.canonical_severity(dst)
        if sev is None:
            raise cli.UserError("--label-map", f"'{dst}' is not a severity ({', '.join(SEVERITIES)})")
        mapping[src] = sev
    return mapping


def label_matrix(spec, labels):
    """(C, 3) 0/1 matrix M with M[c, s] = 1 when classifier class c counts as severity s;
    severity probabilities = probs @ M. spec: 'auto', a PRESETS name, or 'src=dst,...'.
    Every class must map to exactly one severity; several classes may share one."""
    given = parse_label_map(spec)
    if given is None:
        mapping = {l: data.canonical_severity(l) for l in labels}
        bad = [l for l, s in mapping.items() if s is None]
        if bad:
            raise cli.UserError("--label-map", f"classifier class '{bad[0]}' is not a severity name; "
                                                f"give --label-map 'src=dst,...' (classes: {', '.join(labels)})")
    else:
        mapping = given
        for src in mapping:
            if src not in labels:
                raise cli.UserError("--label-map", f"'{src}' is not a class of the classifier ({', '.join(labels)})")
        missing = [l for l in labels if l not in mapping]
        if missing:
            raise cli.UserError("--label-map", f"classifier class '{missing[0]}' is not mapped")
    M = np.zeros((len(labels), len(SEVERITIES)))
    for c, l in enumerate(labels):
        M[c, SEVERITIES.index(mapping[l])] = 1.0
    unused = [s for s, n in zip(SEVERITIES, M.sum(0)) if n == 0]
    if unused:
        cli.notice(f"warning: no classifier class maps to {', '.join(unused)} (probability 0)")
    return M


# ----------------------------------------------------------------------------------------------
# Input

def read_questions(path, question_col=None, answer_col=None):
    """Validated {question, answer} dicts (data.read_table + data.parse_record: any table file, aliases, UTF-8,
    non-empty text), with the columns --question-col / --answer-col name."""
    cols = {"question": (question_col, "--question-col"), "answer": (answer_col, "--answer-col")}
    recs = []
    for line, row in data.read_table(path, cols):
        # existing severity fields are replaced, so they are neither validated nor kept
        row = {k: v for k, v in row.items()
               if data.FIELD_ALIASES.get(data.column_key(k)) not in ("severity",) + PROB_FIELDS}
        recs.append(data.parse_record(path, line, row, require_probs=False, require_severity=False))
    return recs


def _stamp(name):
    """Identity of a classifier: for a local folder its weights' size + mtime, else the name."""
    f = os.path.join(name, "model.safetensors")
    if os.path.isfile(f):
        st = os.stat(f)
        return [os.path.abspath(name), st.st_size, st.st_mtime_ns]
    return [name]


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    """The command line under the contract: a user error is one line "error: ..." and exit status 2."""
    return cli.run(_main, argv)


def _main(argv=None):
    try:   # inside cli.run, so that this message (not cli.run's general one) tells what was kept
        return annotate(get_args(argv))
    except KeyboardInterrupt:
        print(("\n" if sys.stderr.isatty() else "") + "interrupted: finished chunks are kept in the .partial file; "
              "run the same command to resume", file=sys.stderr)
        sys.exit(130)


def load_classifier(args, device):
    """bert.load_classifier at the boundary: its errors name the flag and say what to do."""
    with cli.for_flag("--classifier"), cli.reading(args.classifier, "classifier", "train one with classify.py"):
        return bert.load_classifier(args.classifier, device, args.revision)


def annotate(args):
    # every flag and path before any work; nothing is written before the first chunk is done
    cli.input_file(args.input, "--data")
    if os.path.exists(args.out) and os.path.samefile(args.input, args.out):   # the input would be replaced
        raise cli.UserError("--out", f"{args.out} is the input file: give another output path")
    for f in (args.out, args.out + ".partial", args.out + ".partial.json"):
        cli.output_file(f, "--out")
    if not args.out.lower().endswith(".jsonl"):   # JSON lines under another name: train.py would read .json as a
        raise cli.UserError("--out", f"{args.out}: annotate.py writes JSON lines: name the file .jsonl")   # list
    # one process per output ("<out>.lock"): the resume below trusts the partial file, which a second process
    # appending to the same file would corrupt; then the temp files of a killed write of ours are removed
    outputs.lock_output(args.out, "--out", folder=False)
    outputs.clean_stale(os.path.dirname(os.path.abspath(args.out)),
                     [os.path.basename(args.out + end) for end in ("", ".partial", ".partial.json")])
    device = str(cli.resolve_device(args.device, "--device"))
    parse_label_map(args.label_map)
    recs = read_questions(args.input, args.question_col, args.answer_col)
    if args.limit is not None:
        recs = recs[:args.limit]
    model, tok, labels = load_classifier(args, device)
    M = label_matrix(args.label_map, labels)
    if model.meta.get("input") == "question+answer":
        print("warning: this classifier was trained on question+answer pairs; annotate.py feeds questions only",
              file=sys.stderr)
    max_len = min(args.max_len or int(model.meta.get("max_len", 512)), model.cfg.max_position_embeddings)
    preprocess = args.preprocess or model.meta.get("preprocess", "none")   # as the classifier was trained
    if max_len < 3:
        raise cli.UserError("--max-len", f"{max_len} is too small (the classifier's limit is "
                                          f"{model.cfg.max_position_embeddings}; [CLS] and [SEP] take 2)")

    out = args.out
    partial, sidecar = out + ".partial", out + ".partial.json"
    fingerprint = {"input": os.path.abspath(args.input), "input_sha256": outputs.sha256(args.input),
                   "n_rows": len(recs), "classifier": _stamp(args.classifier), "revision": args.revision,
                   "label_map": M.tolist(),
                   "max_len": max_len, "batch_size": args.batch_size, "chunk_size": args.chunk_size,
                   "device": torch.device(device).type, "decimals": DECIMALS,
                   "question_col": args.question_col, "answer_col": args.answer_col, "preprocess": preprocess}

    # Resume: trust the partial file up to the byte count the sidecar recorded after the last
    # complete chunk (anything after it is from a chunk that was cut off).
    done, nbytes = 0, 0
    if os.path.exists(sidecar) and os.path.exists(partial):
        try:
            with open(sidecar, encoding="utf-8") as fh:
                state = json.load(fh)
        except (OSError, ValueError):
            state = {}
        if state.get("fingerprint") == fingerprint and os.path.getsize(partial) >= state.get("bytes", -1) >= 0:
            done, nbytes = int(state["rows_done"]), int(state["bytes"])
            print(f"resuming {partial}: {done}/{len(recs)} rows already done", file=sys.stderr)
        else:
            cli.notice(f"note: {partial} is from a different run (input, classifier or settings changed); "
                       "starting over")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    try:
        with open(partial, "r+b" if done else "wb") as fh:
            fh.truncate(nbytes)
    except OSError as e:
        raise outputs.WriteError.of(partial, e) from None

    bar = cli.progress(len(recs), "annotate", "row", args.quiet, initial=done)
    chunks = 0
    while done < len(recs):
        chunk = recs[done:done + args.chunk_size]
        probs = bert.predict_proba(model, tok, [data.preprocess(r["question"], preprocess) for r in chunk],
                                   args.batch_size, max_len, progress=bar) @ M
        lines = []
        for r, p in zip(chunk, probs):
            p = [round(float(x), DECIMALS) for x in p]
            sev = SEVERITIES[int(np.argmax(p))]  # argmax of the written values (first maximum on ties)
            lines.append(json.dumps({"question": r["question"], "answer": r["answer"], "severity": sev,
                                     **dict(zip(PROB_FIELDS, p))}, ensure_ascii=False) + "\n")
        try:   # a full disk: one line, exit 2; the sidecar still says how far the partial file is whole (resume)
            with open(partial, "ab") as fh:
                fh.write("".join(lines).encode("utf-8"))
                fh.flush()
                os.fsync(fh.fileno())
                nbytes = fh.tell()
        except OSError as e:
            raise outputs.WriteError.of(partial, e) from None
        done += len(chunk)
        outputs.write_json(sidecar, {"rows_done": done, "bytes": nbytes, "fingerprint": fingerprint})
        chunks += 1
        if args.stop_after is not None and chunks >= args.stop_after and done < len(recs):
            bar.close()
            print(f"stopped after {chunks} chunk(s) ({done}/{len(recs)} rows) as asked by --stop-after; "
                  f"run the same command again to resume", file=sys.stderr)
            return None
    bar.close()
    try:
        os.replace(partial, out)
        os.remove(sidecar)
    except OSError as e:
        raise outputs.WriteError.of(out, e) from None

    counts = {s: 0 for s in SEVERITIES}
    with open(out, encoding="utf-8") as fh:
        for line in fh:
            counts[json.loads(line)["severity"]] += 1
    n = max(1, sum(counts.values()))
    print(f"wrote {out}: {sum(counts.values())} records")
    print("severity distribution: " + " | ".join(f"{s} {100 * c / n:.1f}% ({c})" for s, c in counts.items())
          + "   (paper: " + " / ".join(f"{x}" for x in PAPER_DISTRIBUTION) + " %)")
    return counts


if __name__ == "__main__":
    main()
