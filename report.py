"""
Reports over finished evaluations (eval.json + predictions.jsonl folders that evaluate.py wrote): Table-2-style
tables, and the paired comparison of two runs. Nothing is generated or scored here; every figure is read back
from the runs and tested with stats.py.

    python report.py table runs/aragpt2-base/*/eval.json --paper --plot runs/aragpt2-base/table.png
    python report.py table runs/*/*/eval.json --metric nll --holm
    python report.py compare runs/aragpt2-base/ce runs/aragpt2-base/balanced --out runs/aragpt2-base/ce-vs-balanced

table: one Markdown table per group (all answers, then each severity class), a row per model and a column per
setting (Base, CE, Mild, Strong, Balanced, or w=a,b,c). Several runs in one cell (training seeds) are shown as their
mean and spread. A cell is marked * when the paired sign-flip test against the same row's CE cell, on the same test
answers, gives p < 0.05 (uncorrected, or Holm-adjusted within each table with --holm).
compare: per example B - A in P, R, F1 and answer NLL, overall and per severity, with a 95% paired bootstrap interval
and a paired sign-flip permutation p-value; printed and written to <out>/compare.json.
"""
import cli   # first, and light: cli.start() guards Ctrl-C and the console while the heavy imports load
cli.start(__name__)

import functools
import json
import os
import sys

import numpy as np

import data
import outputs
from stats import GROUPS, METRICS, PERMUTATIONS, fmt_cell, holm_marks, paired_diff

SETTINGS = data.SETTINGS

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
    from hub import REGISTRY
    low = name.lower()
    if low in PAPER_TABLE2:
        return low
    return next((k for k in PAPER_TABLE2 if REGISTRY[k]["repo"].split("/")[-1].lower() == low), None)


def get_args(argv=None):
    num = cli.number
    p = cli.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="{table,compare}", parser_class=cli.ArgumentParser)

    def common(q):
        q.add_argument("--bootstrap", type=num(int, lo=0, hi=10**7), default=1000,
                       help="bootstrap resamples for the 95%% percentile intervals (0 = none)")
        q.add_argument("--bootstrap-seed", type=num(int, lo=0, hi=2**32 - 1), default=0,
                       help="seed of the bootstrap resampling and of the random sign flips")
        q.add_argument("--permutations", type=num(int, lo=1, hi=10**7), default=PERMUTATIONS,
                       help="random sign flips of the paired permutation test (exact enumeration when 2^n is no more "
                       "than this)")
        q.add_argument("--quiet", action="store_true", help="no progress display")

    t = sub.add_parser("table", help="Table-2-style Markdown tables from eval.json files",
                       description="Table-2-style Markdown tables (a row per model, a column per setting) from eval.json files")
    t.add_argument("table", nargs="+", metavar="EVAL_JSON", help="eval.json files (or the eval folders holding them)")
    t.add_argument("--metric", choices=METRICS + ("nll", "floor"), default="f1", help="the value in the cells "
                   "(floor = F1 against shuffled references, from runs made with evaluate.py --floor)")
    t.add_argument("--paper", action="store_true", help="add the paper's Table 2 figures (BERTScore F1) for models "
                   "that are among the paper's ten")
    t.add_argument("--plot", default=None, help="also save a PNG chart to this path: one panel per group, a dot "
                   "per setting with its interval, the table's * marks drawn above their whiskers, one legend")
    t.add_argument("--holm", action="store_true", help="mark a cell when its Holm-adjusted p-value is below 0.05, "
                   "adjusted over the cells tested in the same table (all answers, or one severity class); "
                   "default: the uncorrected p-value of each cell")
    common(t)
    c = sub.add_parser("compare", help="paired comparison of two eval folders",
                       description="paired comparison of two eval folders scored on the same data with the same "
                       "scorer and protocol: per example B - A, bootstrap interval and sign-flip p-value")
    c.add_argument("compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="two eval folders (eval.json + "
                   "predictions.jsonl), or their eval.json paths")
    c.add_argument("--out", required=True, help="output folder for compare.json (locked while the run lasts)")
    common(c)
    a = p.parse_args(argv)
    if a.command == "table":
        a.table = [eval_json_path(x) for x in a.table]
    return a


# ----------------------------------------------------------------------------------------------------------------
# Reading runs: eval.json checked field by field, predictions.jsonl against its sha256


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


def load_eval(path, flag="table", predictions=True):
    """An eval.json for `table` (or `compare`), checked field by field (one UserError naming the file and field);
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
    if want is None or not os.path.isfile(pred):   # no file: compare says so when it needs it
        return
    with cli.reading(pred, "predictions"):
        got = outputs.sha256(pred)
    if got != want:
        raise cli.UserError(pred, f"does not match {path} (sha256 {got[:12]}..., eval.json records "
                                   f"{str(want)[:12]}...): the two files are from different runs; evaluate again")


PROTOCOL_KEYS = ("mode", "temperature", "top_k", "top_p", "max_new_tokens", "prompt", "postprocess", "repeat",
                 "preprocess")
PROTOCOL_DEFAULTS = {"preprocess": "none"}   # what an eval.json written before the key existed ran
SCORER_KEYS = ("model", "layer", "idf", "rescale_with_baseline", "scale")
# What one experiment is, on the training side (eval.json's model.train_args, train.py's args.json): runs of one
# table cell may differ in the seed alone. The evaluation side is check_comparable's (data, scorer, protocol, max-len).
POOL_TRAIN_KEYS = ("model", "data_sha256", "weights_abc", "loss_tokens", "loss_norm", "max_len", "recipe", "epochs",
                   "max_steps", "batch_size", "grad_accum", "world_size", "schedule", "warmup", "lr", "weight_decay",
                   "grad_clip", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "quantize", "dtype",
                   "severity_source", "preprocess", "question_col", "answer_col", "init_adapter")


def scorer_identity(ev):
    """Which scorer scored a run, by what it is, not by the text typed: the fingerprint of its files (evaluate.py
    records one: sha256 over its config, tokenizer and weights), else its resolved folder (model_path, or the typed
    model when it names a folder here), else the hub name."""
    b = ev.get("bertscore") or {}
    if b.get("fingerprint"):
        return "fingerprint " + str(b["fingerprint"])
    m = b.get("model_path") or b.get("model")
    return os.path.realpath(m) if isinstance(m, str) and os.path.isdir(m) else m


def same_scorer(a, b):
    """(same, shown_a, shown_b): by fingerprint when both runs have one, else by resolved path or hub name."""
    fa, fb = (e.get("bertscore", {}).get("fingerprint") for e in (a, b))
    if fa and fb:
        return fa == fb, f"fingerprint {fa[:12]}", f"fingerprint {fb[:12]}"
    ia, ib = (scorer_identity(dict(e, bertscore=dict(e.get("bertscore") or {}, fingerprint=None))) for e in (a, b))
    return ia == ib, ia, ib


def check_poolable(paths, evs):
    """A table cell (one row, one column) pools runs of one experiment only: two runs of a cell that differ in any
    training setting but the seed (POOL_TRAIN_KEYS: data hash, model, loss, max-len, recipe, ...) or in the
    evaluation (data hash, scorer, protocol, max-len: check_comparable) are refused, one line naming both runs and
    the field, instead of being averaged as if they were training seeds."""
    cells = {}
    for p, ev in zip(paths, evs):
        cells.setdefault((ev["model"]["name"], column_of(ev)), []).append((p, ev))
    for (r, c), runs in cells.items():
        (pa, a), rest = runs[0], runs[1:]
        ta = a["model"].get("train_args") or {}
        for pb, b in rest:
            tb = b["model"].get("train_args") or {}
            for k in POOL_TRAIN_KEYS:
                x, y = ta.get(k), tb.get(k)
                if isinstance(x, list):
                    x = tuple(x)
                if isinstance(y, list):
                    y = tuple(y)
                if x != y:
                    raise cli.UserError("table", f"{pa} and {pb} are one cell ({r} / {c}) but differ in the training "
                                                 f"{k} ({x!r} vs {y!r}): a cell pools seeds of one experiment only; "
                                                 f"label one with evaluate.py --name, or table them apart")
            if not all(isinstance(e.get(k), dict) for e in (a, b) for k in ("data", "bertscore", "generation")):
                continue   # an older eval.json without these: the significance test says what it cannot compare
            d = eval_difference(a, b)
            if d:
                raise cli.UserError("table", f"{pa} and {pb} are one cell ({r} / {c}) but differ in {d[0]} "
                                             f"({d[1]!r} vs {d[2]!r}): a cell pools seeds of one experiment only; "
                                             f"label one with evaluate.py --name, or table them apart")


def eval_json_path(path):
    """An eval folder or its eval.json -> the eval.json path."""
    return os.path.join(path, "eval.json") if os.path.isdir(path) else path


def load_examples(path):
    """(eval.json dict, per-example arrays) of one run. The arrays come from predictions.jsonl beside the eval.json:
    per test record (index order) its severity, question, reference, P, R, F1 (x100, averaged over the run's sampled
    repeats), answer NLL and answer tokens (None where an older run did not record them)."""
    ev = load_eval(eval_json_path(path), "compare", predictions=False)   # checked below, once its rows parse
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

# ----------------------------------------------------------------------------------------------------------------
# table


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
                     f"over examples, as report.py compare; k files per cell are averaged per example first, so "
                     f"the training seeds are held fixed"
                     + ("; p Holm-adjusted over the cells of each table" if adjusted else "; p not corrected for "
                        "multiple comparisons (--holm corrects within each table)")
                     + f"). Tested against CE: {len(marks)} cells, {sum(p < 0.05 for p in marks.values())} marked.")
    return "\n".join(lines) + "\n", (rows, cols, cells)


def save_plot(path, metric, rows, cols, cells, marks=None, adjusted=False):
    """A dot plot: one panel per group (all answers, then each severity class), one dot per setting (column) for each
    model (row), with the cell's interval (bootstrap) or +- std as whiskers: the scores sit in a narrow band, where
    bars cut above 0 would exaggerate the differences. marks: {(group, row, col): p} (table_significance); a cell
    with p < 0.05 against CE is drawn with "*" above its whisker, as in the table. One legend for the figure.
    Written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    marks = marks or {}
    panels = [g for g in GROUPS if cells.get(g)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.4), squeeze=False)
    used = [c for c in cols if any((r, c) in cells[g] for g in panels for r in rows)]
    width = 0.8 / max(1, len(used))
    handles = {}
    for ax, g in zip(axes[0], panels):
        for j, c in enumerate(used):
            xs, ys, lo, hi, starred = [], [], [], [], []
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
                p = marks.get((g, r, c))
                if p is not None and p < 0.05:
                    starred.append((xs[-1], ys[-1] + hi[-1]))
            if xs:
                h = ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", ms=5, capsize=3, color=f"C{j}", label=c)
                handles.setdefault(c, h)
                for x, top in starred:
                    ax.annotate("*", (x, top), xytext=(0, 1), textcoords="offset points", ha="center",
                                va="bottom", fontsize=12, color=f"C{j}")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(rows, rotation=20, ha="right")
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_title("all answers" if g == "overall" else g)
        ax.set_ylabel(METRIC_TITLE[metric])
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)   # room for the marks above the highest whisker
    note = "* p < 0.05 against CE" + (" (Holm-adjusted)" if adjusted else "") + ", paired sign-flip test"
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 6), fontsize=8,
               title=note if any(p < 0.05 for p in marks.values()) else None, title_fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    try:
        outputs.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
    return fig


def table_significance(paths, evs, metric, n_boot, seed, n_perm):
    """{(group, row, column): p} for each cell of the table whose row also has a CE cell: the paired sign-flip
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


def table_main(args):
    if args.plot is not None:   # "" too: refused, not silently skipped
        cli.output_file(args.plot, "--plot", inputs=args.table)
    evs = [load_eval(p) for p in args.table]
    check_poolable(args.table, evs)   # before any test: a cell that mixes experiments is no answer
    if all(cell_values(e, args.metric, "overall") is None for e in evs):   # an empty table is no answer
        raise cli.UserError("--metric", f"{args.metric}: none of the eval.json files has it"
                             + (" (evaluate.py --floor writes it)" if args.metric == "floor" else ""))
    marks, skipped = table_significance(args.table, evs, args.metric, args.bootstrap, args.bootstrap_seed,
                                        args.permutations)
    for msg in skipped:
        cli.notice(f"note: no significance mark for {msg}")   # msg names runs from files: escaped
    if args.holm:
        marks = holm_marks(marks)
    text, (rows, cols, cells) = build_tables(evs, args.metric, args.paper, marks, args.holm)
    if args.plot:
        save_plot(args.plot, args.metric, rows, cols, cells, marks, args.holm)
    print(text, end="")
    if args.plot:
        print(f"\nplot: {args.plot}", file=sys.stderr)

# ----------------------------------------------------------------------------------------------------------------
# compare


def eval_difference(a, b):
    """The first way two eval.json were not scored alike, as (what, a's value, b's value), or None: the data
    (the references' normalisation, sha256, records), the scorer (what it is: same_scorer; layer, idf, rescaling), the protocol (mode, sampling
    settings, new tokens, prompt, post-processing, repeats) or the answer NLL's --max-len (eval.json's argv)."""
    ra, rb = a["data"].get("references"), b["data"].get("references")   # None: nothing recorded (the hash decides)
    checks = [("references (raw or normalised answers)", ra, rb if None not in (ra, rb) else ra),
              ("data sha256", a["data"].get("sha256"), b["data"].get("sha256")),
              ("number of test records", a["data"].get("n"), b["data"].get("n"))]
    same, ia, ib = same_scorer(a, b)   # by what the scorer is, never by the path as typed
    checks.append(("scorer model", ia, ia if same else ib))
    checks += [(f"scorer {k}", a["bertscore"].get(k), b["bertscore"].get(k)) for k in SCORER_KEYS[1:]]
    checks += [(f"protocol {k}", a["generation"].get(k, PROTOCOL_DEFAULTS.get(k)),
                b["generation"].get(k, PROTOCOL_DEFAULTS.get(k))) for k in PROTOCOL_KEYS]
    # the answer NLL is scored on prompt+answer cut at --max-len: a shorter cut alone moves it (issue 18)
    checks.append(("--max-len (the answer NLL's truncation)", (a.get("argv") or {}).get("max_len"),
                   (b.get("argv") or {}).get("max_len")))
    return next(((what, x, y) for what, x, y in checks if x != y), None)


def check_comparable(runs):
    """Refuse (UserError, a ValueError) runs that were not scored on the same data with the same scorer and
    protocol, or whose answer NLL was cut at a different --max-len (eval_difference)."""
    (pa, a), rest = runs[0], runs[1:]
    for pb, b in rest:
        d = eval_difference(a, b)
        if d:
            raise cli.UserError("compare", f"{pa} and {pb} differ in {d[0]} ({d[1]!r} vs {d[2]!r}): a paired "
                                              f"comparison needs the same data, scorer and protocol")


def paired_table(exa, exb, n_boot, seed, n_perm):
    """{metric: {group: paired_diff}} for P, R, F1 and answer NLL, overall and per severity. NLL: the token-weighted
    ratio of sums, sum_i n_i nll_i / sum_i n_i (eval.json's statistic), when both runs recorded equal answer-token
    counts n_i, else the mean of per-example NLL (named under 'nll_statistic'). 'nll_example_mean' always holds the
    unweighted mean of the per-example NLL differences beside it."""
    for k in ("severity", "question", "reference"):
        if exa[k] != exb[k]:
            i = next(j for j, (x, y) in enumerate(zip(exa[k], exb[k])) if x != y)
            raise cli.UserError("compare", f"{exa['path']} and {exb['path']} differ in the {k} of record {i}")
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
    cli.output_dir(args.out, "--out")
    cli.output_file(os.path.join(args.out, "compare.json"), "--out")
    outputs.lock_output(args.out, "--out")
    a, b = args.compare
    if os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b):   # a run against itself: nothing to test
        raise cli.UserError("compare", f"{a} and {b} are the same run: give two different eval folders")
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


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    """The command line under the contract: a user error is one line "error: ..." and exit status 2."""
    return cli.run(_main, argv)


def _main(argv=None):
    args = get_args(argv)
    return table_main(args) if args.command == "table" else compare_main(args)


if __name__ == "__main__":
    main()
