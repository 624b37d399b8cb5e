#!/usr/bin/env bash
# The paper's whole ablation for one model (one row of its Table 2): evaluate the untouched Base model, then
# train + evaluate with plain CE and the mild, strong and balanced severity weights, then print the comparison.
#
#   bash scripts/ablation.sh MODEL DATA_DIR OUT_ROOT [evaluate.py flags ...] [-- train.py flags ...]
#
#   bash scripts/ablation.sh tiny data/sample runs/tiny                      # offline, CPU, a few minutes
#   bash scripts/ablation.sh aragpt2-base data/maqa runs/aragpt2-base --seed 0 --repeat 3 -- --lora-rank 16
#
# DATA_DIR holds train.jsonl and test.jsonl (canonical records, see data/). Outputs:
#   OUT_ROOT/base/{eval.json,predictions.jsonl}
#   OUT_ROOT/{ce,mild,strong,balanced}/  a train.py run folder, with its eval.json + predictions.jsonl beside it
#   OUT_ROOT/table.md, OUT_ROOT/table_nll.md, OUT_ROOT/table.png
# Scorer: evaluate.py's default (bert-base-multilingual-cased, layer 9) unless BERTSCORE_MODEL (and BERTSCORE_LAYER)
# are set in the environment. For MODEL=tiny without them: data/sample/scorer at layer 2, a tiny BERT pretrained with
# masked-LM on the sample's questions and answers (data/sample/make_scorer.py; no network needed).
# PYTHON picks the interpreter (default python3).
set -euo pipefail

if [[ $# -lt 3 ]]; then
    echo "usage: bash scripts/ablation.sh MODEL DATA_DIR OUT_ROOT [evaluate.py flags ...] [-- train.py flags ...]" >&2
    exit 2
fi
model=$1 data_dir=$2 root=$3
shift 3
eval_flags=() train_flags=()
while [[ $# -gt 0 ]]; do
    if [[ $1 == -- ]]; then shift; train_flags=("$@"); break; fi
    eval_flags+=("$1"); shift
done
# One sampling seed for every setting (evaluate.py --seed 0 unless a --seed is given), so that the five evaluations
# are paired: the same test answers sampled from the same random stream, as --table's significance marks assume.
[[ " ${eval_flags[*]-} " == *" --seed "* ]] || eval_flags+=(--seed 0)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
for f in train.jsonl test.jsonl; do
    [[ -f $data_dir/$f ]] || { echo "error: $data_dir/$f:0: file: no such file" >&2; exit 2; }
done

scorer_flags=()
if [[ -z ${BERTSCORE_MODEL:-} && $model == tiny ]]; then
    BERTSCORE_MODEL=$here/data/sample/scorer BERTSCORE_LAYER=${BERTSCORE_LAYER:-2}
fi
[[ -n ${BERTSCORE_MODEL:-} ]] && scorer_flags+=(--bertscore-model "$BERTSCORE_MODEL")
[[ -n ${BERTSCORE_LAYER:-} ]] && scorer_flags+=(--bertscore-layer "$BERTSCORE_LAYER")

evaluate() {   # evaluate MODEL_OR_RUN OUT
    "$py" "$here/evaluate.py" --model "$1" --data "$data_dir/test.jsonl" --out "$2" \
        ${scorer_flags[@]+"${scorer_flags[@]}"} ${eval_flags[@]+"${eval_flags[@]}"}
}

echo "== Base: $model"
evaluate "$model" "$root/base"
for w in ce mild strong balanced; do
    echo "== train $w"
    "$py" "$here/train.py" --model "$model" --data "$data_dir/train.jsonl" --eval-data "$data_dir/test.jsonl" \
        --weights "$w" --out "$root/$w" --quiet ${train_flags[@]+"${train_flags[@]}"}
    echo "== evaluate $w"
    evaluate "$root/$w" "$root/$w"
done

evals=("$root/base/eval.json" "$root/ce/eval.json" "$root/mild/eval.json" "$root/strong/eval.json"
       "$root/balanced/eval.json")
"$py" "$here/report.py" table "${evals[@]}" --paper --plot "$root/table.png" > "$root/table.md"
"$py" "$here/report.py" table "${evals[@]}" --metric nll > "$root/table_nll.md"
cat "$root/table.md"
echo "wrote $root/table.md, $root/table_nll.md, $root/table.png"
