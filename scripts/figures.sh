#!/usr/bin/env bash
# Regenerate the figures of README.md and results/*.md that a deterministic command produces, from a fresh run.
#
#   bash scripts/figures.sh              # the tiny ablation (about 2 min of CPU on 2 cores)
#   bash scripts/figures.sh all          # also the offline demonstration and the classifier (about 10 min more)
#   bash scripts/figures.sh extra        # those two only
#
# ablation: `bash scripts/ablation.sh tiny data/sample RUNS` (training seed 1337, sampling seed 0: deterministic)
#   -> results/ablation_tiny.md (the README's table, one row per group, and the cells with their intervals) and
#      results/ablation_tiny.png (the table's plot)
# Every figure row of results/ablation_tiny.md must appear verbatim in README.md or in a docs/*.md file:
# tests/test_experiments.py runs this script and fails when a fresh run or the docs differ from it.
# all, in addition:
#   demo: results/offline_demo.md's commands (CE and balanced, 3 training seeds, --seed 0 --repeat 3 --floor, the
#         tables and the paired comparisons) -> results/offline_demo_tables.md, as report.py prints them
#   classifier: the README's offline classifier run (classify.py ... --seed 0) -> results/classifier_tiny.md
#
# FIGURES_OUT: where the results files go (default results/; the test writes elsewhere and compares).
# FIGURES_RUNS: the run folder (default: a fresh temporary folder, removed at the end: figures come from a fresh run,
# never from a resumed or an older one). PYTHON picks the interpreter (default python3).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
out=${FIGURES_OUT:-$here/results}
if [[ -n ${FIGURES_RUNS:-} ]]; then
    runs=$FIGURES_RUNS
else
    runs=$(mktemp -d "${TMPDIR:-/tmp}/figures.XXXXXXXX")
    trap 'rm -rf "$runs"' EXIT
fi
mkdir -p "$out"

cpu=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | sed 's/.*: //' || echo "?")
machine="$(nproc) cores of ${cpu:-?}, torch $("$py" -c 'import torch; print(torch.__version__)')"
mode=${1:-ablation}
case $mode in ablation|all|extra) ;; *) echo "error: $mode: expected ablation, all or extra" >&2; exit 2;; esac

if [[ $mode != extra ]]; then
t0=$(date +%s)
load0=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo "?")
PYTHON=$py bash "$here/scripts/ablation.sh" tiny "$here/data/sample" "$runs" > "$runs/ablation.log" 2>&1 || {
    tail -5 "$runs/ablation.log" >&2; exit 2; }
t1=$(date +%s)
load1=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo "?")
timing="Timing: $(date -u +%Y-%m-%d) UTC, $((t1 - t0)) s wall for \`bash scripts/ablation.sh tiny data/sample runs/tiny\` on $machine, load average $load0 at the start, $load1 at the end (shared machine)."

"$py" - "$runs" "$out/ablation_tiny.md" "$timing" "$here" <<'EOF'
import os
import sys

runs, dest, timing, here = sys.argv[1:5]
sys.path.insert(0, here)
import outputs   # noqa: E402
import report    # noqa: E402
from stats import GROUPS, fmt_cell   # noqa: E402

paths = [os.path.join(runs, "tiny", w, "eval.json") for w in ("base", "ce", "mild", "strong", "balanced")]
evs = [report.load_eval(p) for p in paths]
short, full = [], []
for metric, title, digits in (("f1", "BERTScore F1", 2), ("nll", "answer NLL", 3)):
    # report.py table's own defaults: the marks are the ones runs/tiny/table.md prints
    marks, _ = report.table_significance(paths, evs, metric, 1000, 0, report.PERMUTATIONS)
    _, (_, _, cells) = report.build_tables(evs, metric, marks=marks)
    for g in GROUPS:
        group = "all answers" if g == "overall" else g
        vals, ints = [], []
        for c in report.SETTINGS:
            d, p = cells[g][("tiny", c)], marks.get((g, "tiny", c))
            star = " *" if p is not None and p < 0.05 else ""
            vals.append(f"{d['mean']:.{digits}f}{star}")
            ints.append(fmt_cell(d, digits) + star)
        short.append(f"| {title}, {group} | " + " | ".join(vals) + " |")
        full.append((metric, f"| {group} | " + " | ".join(ints) + " |"))
head = "| Base | CE | Mild | Strong | Balanced |"
text = ["# The tiny ablation (written by scripts/figures.sh: do not edit)", "",
        "`bash scripts/ablation.sh tiny data/sample runs/tiny`: one training seed (1337) per setting, one sampled run",
        "per setting with sampling seed 0, the offline scorer (data/sample/scorer, layer 2). `*`: differs from CE at",
        "p < 0.05 (paired sign-flip test, uncorrected). The plot: results/ablation_tiny.png.", "",
        timing, "", "## Figures", "",
        "| tiny, data/sample " + head, "|---|---|---|---|---|---|", *short, "",
        "## The cells with their intervals (results/offline_demo.md shows them)", "",
        "BERTScore F1 (x100), mean [95 % bootstrap interval]:", "", "| group " + head, "|---|---|---|---|---|---|",
        *[r for m, r in full if m == "f1"], "",
        "Answer NLL (nats/token), mean [95 % bootstrap interval]:", "", "| group " + head, "|---|---|---|---|---|---|",
        *[r for m, r in full if m == "nll"], ""]
outputs.atomic_write(dest, "\n".join(text))
EOF
cp "$runs/table.png" "$out/.ablation_tiny.png.tmp" && mv "$out/.ablation_tiny.png.tmp" "$out/ablation_tiny.png"
echo "wrote $out/ablation_tiny.md, $out/ablation_tiny.png ($((t1 - t0)) s)"
fi
[[ $mode != ablation ]] || exit 0

# -- the offline demonstration: results/offline_demo.md's commands, as they are there --------------------------
demo=$runs/demo
scorer=(--bertscore-model "$here/data/sample/scorer" --bertscore-layer 2)
t0=$(date +%s)
for w in ce balanced; do for s in 1 2 3; do
    "$py" "$here/train.py" --model tiny --weights $w --seed $s --out "$demo/$w-s$s" --quiet > /dev/null
    "$py" "$here/evaluate.py" --model "$demo/$w-s$s" "${scorer[@]}" --seed 0 --repeat 3 --floor --quiet > /dev/null
done; done
evs=("$demo"/ce-s*/eval.json "$demo"/balanced-s*/eval.json)
{
    echo "# The offline demonstration's tables (written by scripts/figures.sh all: do not edit)"
    echo
    echo "Timing: $(date -u +%Y-%m-%d) UTC, $(( $(date +%s) - t0 )) s wall for the 6 trainings and evaluations on $machine, load average $(cut -d' ' -f1 /proc/loadavg) at the end."
    echo
    for metric in nll f1 floor; do
        echo "## report.py table --metric $metric"; echo
        "$py" "$here/report.py" table "${evs[@]}" --metric $metric --quiet
        echo
    done
    for s in 1 2 3; do
        echo "## report.py compare ce-s$s balanced-s$s"; echo
        "$py" "$here/report.py" compare "$demo/ce-s$s" "$demo/balanced-s$s" --out "$demo/compare-s$s" --quiet 2>/dev/null
        echo
    done
} > "$out/.offline_demo_tables.md.tmp"
mv "$out/.offline_demo_tables.md.tmp" "$out/offline_demo_tables.md"
echo "wrote $out/offline_demo_tables.md"

# -- the classifier: the README's offline chain ------------------------------------------------------------------
"$py" "$here/classify.py" --data "$here/data/sample/severity_labels.jsonl" --model tiny --out "$runs/clf" \
    --epochs 6 --lr 2e-3 --batch-size 16 --max-len 64 --seed 0 > "$runs/clf.log" 2>&1
"$py" - "$runs/clf/metrics.json" "$out/classifier_tiny.md" "$here" <<'EOF2'
import json
import sys

src, dest, here = sys.argv[1:4]
sys.path.insert(0, here)
import outputs   # noqa: E402

m = json.load(open(src, encoding="utf-8"))
v = m["val"]
outputs.atomic_write(dest, "\n".join([
    "# The offline classifier (written by scripts/figures.sh all: do not edit)", "",
    "`python classify.py --data data/sample/severity_labels.jsonl --model tiny --out out/clf --epochs 6 --lr 2e-3 "
    "--batch-size 16 --max-len 64 --seed 0`", "", "## Figures", "",
    "| validation accuracy | majority-class baseline | macro-F1 | ECE | n |", "|---|---|---|---|---|",
    f"| {v['accuracy']:.3f} | {m['majority_baseline_accuracy']:.3f} | {v['macro_f1']:.2f} | {v['ece']:.3f} | {v['n']} |",
    ""]))
EOF2
echo "wrote $out/classifier_tiny.md"
