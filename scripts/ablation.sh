#!/usr/bin/env bash
# The paper's ablation, one row of its Table 2 per model: evaluate the untouched Base model, then train + evaluate
# with plain CE and the mild, strong and balanced severity weights, then print one table with a row per model.
#
#   bash scripts/ablation.sh MODEL[,MODEL...] DATA_DIR OUT_ROOT [evaluate.py flags ...] [-- train.py flags ...]
#
#   bash scripts/ablation.sh tiny data/sample runs/tiny                      # offline, CPU, a few minutes
#   bash scripts/ablation.sh aragpt2-base,bloomz-560m data/maqa runs/table2 --seed 0 --repeat 3 -- --lora-rank 16
#   bash scripts/ablation.sh tiny data/sample runs/tiny-greedy --greedy      # any evaluate.py flag
#
# DATA_DIR holds train.jsonl and test.jsonl (canonical records, see data/). Outputs, per model (KEY = the model
# name's last path part):
#   OUT_ROOT/KEY/base/{eval.json,predictions.jsonl}
#   OUT_ROOT/KEY/{ce,mild,strong,balanced}/  a train.py run folder, with its eval.json + predictions.jsonl beside it
#   OUT_ROOT/table.md, OUT_ROOT/table_nll.md, OUT_ROOT/table.png: every model given, a row each
#
# Before any work, every flag is checked by train.py's and evaluate.py's own parsers and checks (--check-args), for
# every model: a typo after `--` is one error line at the start, not after the Base evaluation.
# Resumable: rerunning the same command after a crash or a kill continues where it stopped. A setting whose
# eval.json is complete and is this very run (evaluate.py --skip-done: same flags, data and model) is skipped; a
# training that has a checkpoint continues with --resume; a rerun of a finished sweep only reprints the table. The
# train.py flags a setting was trained with are kept in its folder (sweep_train_flags.txt): a rerun with other ones
# is refused, before any work, instead of mixing two experiments under one OUT_ROOT.
# On a cluster, one command per model, all with the same DATA_DIR, OUT_ROOT and flags (each node writes only its
# OUT_ROOT/KEY; the folders are locked, so two nodes never write the same one):
#   sbatch --wrap "bash scripts/ablation.sh aragpt2-base data/maqa runs/table2 --seed 0"     # ... one per model
# then, once all have ended, the same command with every model (MODEL,MODEL,...): it finds every setting done and
# writes the whole Table 2. (Each per-model command writes OUT_ROOT/table.md with its own rows only.)
#
# Sampling: every setting is sampled with seed 0 (evaluate.py --seed 0) unless --seed or --greedy is given, so that
# the five evaluations are paired (the same test answers sampled from the same random stream), as report.py table's
# significance marks assume.
# Scorer: evaluate.py's default (bert-base-multilingual-cased, layer 9) unless BERTSCORE_MODEL (and BERTSCORE_LAYER)
# are set in the environment. For MODEL=tiny without them: data/sample/scorer at layer 2, a tiny BERT pretrained with
# masked-LM on the sample's questions and answers (data/sample/make_scorer.py; no network needed).
# PYTHON picks the interpreter (default python3).
set -euo pipefail

usage="usage: bash scripts/ablation.sh MODEL[,MODEL...] DATA_DIR OUT_ROOT [evaluate.py flags ...] [-- train.py flags ...]"
if [[ $# -lt 3 ]]; then
    echo "$usage" >&2
    exit 2
fi
IFS=, read -ra models <<< "$1"
data_dir=$2 root=$3
shift 3
eval_flags=() train_flags=()
while [[ $# -gt 0 ]]; do
    if [[ $1 == -- ]]; then shift; train_flags=("$@"); break; fi
    eval_flags+=("$1"); shift
done
[[ ${#models[@]} -gt 0 ]] || { echo "error: MODEL: empty (give MODEL or MODEL,MODEL,...)" >&2; exit 2; }
has() {   # has FLAG ARGS...: FLAG given (as FLAG VALUE or FLAG=VALUE)
    local f=$1; shift
    for a in "$@"; do [[ $a == "$f" || $a == "$f="* ]] && return 0; done
    return 1
}
if ! has --seed ${eval_flags[@]+"${eval_flags[@]}"} && ! has --greedy ${eval_flags[@]+"${eval_flags[@]}"}; then
    eval_flags+=(--seed 0)
fi
for f in --model --data --out --check-args --skip-done; do   # the sweep sets these itself
    if has "$f" ${eval_flags[@]+"${eval_flags[@]}"} || has "$f" ${train_flags[@]+"${train_flags[@]}"}; then
        echo "error: $f: set by the sweep for every run (give it as an argument: MODEL DATA_DIR OUT_ROOT)" >&2
        exit 2
    fi
done
if has --weights ${train_flags[@]+"${train_flags[@]}"} || has --resume ${train_flags[@]+"${train_flags[@]}"}; then
    echo "error: --weights/--resume: set by the sweep (the five settings; a rerun resumes by itself)" >&2
    exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
for f in train.jsonl test.jsonl; do
    [[ -f $data_dir/$f ]] || { echo "error: $data_dir/$f:0: file: no such file" >&2; exit 2; }
done
settings=(ce mild strong balanced)
keys=()
for m in "${models[@]}"; do
    k=$(basename "${m%/}")
    for seen in ${keys[@]+"${keys[@]}"}; do
        [[ $seen != "$k" ]] || { echo "error: MODEL: two models share the folder name $k" >&2; exit 2; }
    done
    keys+=("$k")
done

scorer_flags() {   # scorer_flags MODEL: the --bertscore-* flags for this model
    local bm=${BERTSCORE_MODEL:-} bl=${BERTSCORE_LAYER:-}
    if [[ -z $bm && $1 == tiny ]]; then bm=$here/data/sample/scorer bl=${bl:-2}; fi
    [[ -z $bm ]] || printf '%s\n' --bertscore-model "$bm"
    [[ -z $bl ]] || printf '%s\n' --bertscore-layer "$bl"
}
evaluate() {   # evaluate BASE_MODEL MODEL_OR_RUN OUT [extra flags]
    local base=$1 what=$2 out=$3 sf=()
    shift 3
    mapfile -t sf < <(scorer_flags "$base")
    "$py" "$here/evaluate.py" --model "$what" --data "$data_dir/test.jsonl" --out "$out" \
        ${sf[@]+"${sf[@]}"} ${eval_flags[@]+"${eval_flags[@]}"} "$@"
}
train() {   # train MODEL SETTING OUT [extra flags]
    local m=$1 w=$2 out=$3
    shift 3
    "$py" "$here/train.py" --model "$m" --data "$data_dir/train.jsonl" --eval-data "$data_dir/test.jsonl" \
        --weights "$w" --out "$out" --quiet ${train_flags[@]+"${train_flags[@]}"} "$@"
}
flags_text=$(printf '%q ' ${train_flags[@]+"${train_flags[@]}"})

# -- 1. every flag of every run, before any work ---------------------------------------------------------------
for i in "${!models[@]}"; do
    m=${models[$i]} k=${keys[$i]}
    evaluate "$m" "$m" "$root/$k/base" --check-args > /dev/null
    train "$m" balanced "$root/$k/balanced" --check-args > /dev/null
    for w in "${settings[@]}"; do
        rec=$root/$k/$w/sweep_train_flags.txt
        if [[ -f $rec && $(cat "$rec") != "$flags_text" ]]; then
            echo "error: $root/$k/$w: trained with the train.py flags '$(cat "$rec")', this sweep gives" \
                 "'$flags_text': use another OUT_ROOT (or remove $root/$k/$w)" >&2
            exit 2
        fi
    done
done

# -- 2. the runs: each skipped when done, a training resumed when it has a checkpoint ---------------------------
for i in "${!models[@]}"; do
    m=${models[$i]} k=${keys[$i]}
    echo "== $k: Base"
    evaluate "$m" "$m" "$root/$k/base" --skip-done
    for w in "${settings[@]}"; do
        dir=$root/$k/$w
        if [[ -f $dir/eval.json ]] && [[ $(evaluate "$m" "$dir" "$dir" --skip-done --check-args) == done:* ]]; then
            echo "== $k: $w: done ($dir/eval.json)"
            continue
        fi
        mkdir -p "$dir"
        printf '%s' "$flags_text" > "$dir/.sweep_train_flags.tmp" && mv "$dir/.sweep_train_flags.tmp" "$dir/sweep_train_flags.txt"
        if [[ -f $dir/state.safetensors ]]; then
            echo "== $k: train $w (resuming $dir)"
            train "$m" "$w" "$dir" --resume
        else
            echo "== $k: train $w"
            train "$m" "$w" "$dir"
        fi
        echo "== $k: evaluate $w"
        evaluate "$m" "$dir" "$dir"
    done
done

# -- 3. one Table 2: a row per model ------------------------------------------------------------------------------
evals=()
for k in "${keys[@]}"; do
    for w in base "${settings[@]}"; do evals+=("$root/$k/$w/eval.json"); done
done
"$py" "$here/report.py" table "${evals[@]}" --paper --plot "$root/table.png" > "$root/.table.md.tmp"
mv "$root/.table.md.tmp" "$root/table.md"
"$py" "$here/report.py" table "${evals[@]}" --metric nll > "$root/.table_nll.md.tmp"
mv "$root/.table_nll.md.tmp" "$root/table_nll.md"
cat "$root/table.md"
echo "wrote $root/table.md, $root/table_nll.md, $root/table.png"
