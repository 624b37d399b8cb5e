"""Experiments that cannot mix, vanish or drift (issue 23), one table per kind:

  1. a folder's files belong to the tool that wrote them (train, evaluate, classify, prepare refuse another's)
  2. a report.py table cell pools runs of one experiment only; a scorer is what it is, not the path typed
  3. the sweep (scripts/ablation.sh): every flag checked first, any evaluate flag, several models, resumable
  4. --resume with a grown --max-steps says how the schedule changes
  5. the figures: results/ablation_tiny.md is a fresh run's, and its rows are the README's (docs') own
  6. a non-ASCII path under an ASCII locale, an unwritable matplotlib folder, a folder shadowing a registry name
  7. prepare.py honours --n-test; a missing --eval-data auto file is one note

Every run is the smallest there is: the embedded tiny model for 1-2 steps on data/sample, --check-args where the
refusal comes before any work. The full tiny ablation (test_figures_are_a_fresh_run) takes about a minute of CPU,
the rest well under a minute.
"""
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import classify
import evaluate as E
import hub
import outputs
import report
import train
from data import prepare

pytestmark = pytest.mark.usefixtures("threads_and_signals")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "data", "sample")
TRAIN_DATA, TEST_DATA = os.path.join(SAMPLE, "train.jsonl"), os.path.join(SAMPLE, "test.jsonl")
SCORER = ["--bertscore-model", os.path.join(SAMPLE, "scorer"), "--bertscore-layer", "2"]


def call(main, argv, capsys):
    """(exit status, stdout, stderr) of a script's main run in-process."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def run(cmd, env=None, cwd=ROOT, timeout=600):
    """(exit status, stdout, stderr) of a command in a subprocess, offline, one thread."""
    e = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHON=sys.executable, **(env or {}))
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=e, cwd=cwd, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def snapshot(folder):
    """{name: sha256} of every file in a folder (what "changes nothing" compares)."""
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, n))}


def plant(folder, files):
    os.makedirs(folder, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(text)


# ----------------------------------------------------------------------------------------------- 1. whose files

CLASSIFIER = {"model.safetensors": "bert weights", "config.json": '{"model_type": "bert"}', "vocab.txt": "[PAD]\n",
              "metrics.json": json.dumps({"val": {}, "labels": ["a"], "majority_class": "a"})}
DOWNLOADED = {"model.safetensors": "gpt2 weights", "config.json": '{"model_type": "gpt2"}', "tokenizer.json": "{}"}
OTHER_EVAL = {"eval.json": '{"mine": 1}', "predictions.jsonl": '{"x": 1}\n'}
TRAIN_RUN = {"args.json": json.dumps({"model": "tiny", "weights_abc": [1, 1, 1], "data_sha256": "0" * 64}),
             "model.safetensors": "gpt2 weights", "config.json": '{"model_type": "gpt2"}'}
PREPARED = {"train.jsonl": '{"question": "q", "answer": "a"}\n', "manifest.json": json.dumps({"source": "maqa", "input_sha256": "0"})}
ANNOTATED = {"train.jsonl": '{"question": "q", "answer": "a", "severity": "critical"}\n'}

OWNERSHIP_CASES = [
    # (script, files already in the folder, argv after --out DIR, refused)
    ("train", CLASSIFIER, ["--max-steps", 1], True),     # a classify.py folder: the half-BERT half-GPT-2
    ("train", DOWNLOADED, ["--max-steps", 1], True),     # a downloaded model
    ("train", OTHER_EVAL, ["--max-steps", 1], True),     # an eval.json evaluate.py did not write
    ("train", TRAIN_RUN, ["--max-steps", 1, "--check-args"], False),   # an earlier train.py run: replaced as today
    ("evaluate", OTHER_EVAL, ["--model", "tiny", "--n", 2] + SCORER, True),
    ("classify", TRAIN_RUN, ["--data", os.path.join(SAMPLE, "severity_labels.jsonl"), "--model", "tiny"], True),
    ("classify", DOWNLOADED, ["--data", os.path.join(SAMPLE, "severity_labels.jsonl"), "--model", "tiny"], True),
    ("prepare", ANNOTATED, ["--input", TRAIN_DATA, "--n-train", 4, "--n-test", 2], True),   # the user's data
    ("prepare", PREPARED, ["--input", TRAIN_DATA, "--n-train", 4, "--n-test", 2], False),  # its own: replaced
]
MAINS = {"train": train.main, "evaluate": E.main, "classify": classify.main, "prepare": prepare.main}


@pytest.mark.parametrize("script,files,argv,refused", OWNERSHIP_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(OWNERSHIP_CASES)])
def test_a_folder_belongs_to_the_tool_that_wrote_it(tmp_path, capsys, script, files, argv, refused):
    out = tmp_path / "out"
    plant(out, files)
    before = snapshot(out)
    code, _, err = call(MAINS[script], ["--out", out] + argv, capsys)
    if refused:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --out: ") and "not written by" in err, err
        assert snapshot(out) == before and sorted(os.listdir(out)) == sorted(files)   # nothing changed or added
    else:
        assert code == 0, err


# ----------------------------------------------------------------------------------------------- 2. table cells


def fake_eval(folder, seed=1337, data_sha="d" * 64, test_sha="t" * 64, scorer="scorer", top_k=50, mean=42.0,
              fingerprint=None, setting="Balanced"):
    """A minimal eval.json of evaluate.py's shape (no predictions.jsonl: the table's marks need none to refuse)."""
    os.makedirs(folder, exist_ok=True)
    targs = {"model": "tiny", "data_sha256": data_sha, "weights_abc": [0.5, 1, 2], "seed": seed, "max_len": 512,
             "loss_tokens": "answer", "loss_norm": "example", "recipe": "paper"}
    cell = {"mean": mean, "lo": mean - 1, "hi": mean + 1, "n": 58}
    ev = {"setting": setting, "model": {"name": "tiny", "weights": [0.5, 1, 2], "train_args": targs},
          "data": {"sha256": test_sha, "n": 58}, "scores": {"f1": {"overall": cell}}, "nll": {"overall": cell},
          "bertscore": {"model": scorer, "layer": 2, "idf": False, "rescale_with_baseline": False, "scale": 100,
                        **({"fingerprint": fingerprint} if fingerprint else {})},
          "generation": {"mode": "sampled", "temperature": 0.7, "top_k": top_k, "top_p": None, "max_new_tokens": 50,
                         "prompt": "data.format_prompt", "postprocess": "data.extract_answer", "repeat": 1},
          "argv": {"max_len": 512}}
    with open(os.path.join(folder, "eval.json"), "w", encoding="utf-8") as f:
        json.dump(ev, f)
    return os.path.join(folder, "eval.json")


POOL_CASES = [
    # (what the second run of the cell changes, refused with this field in the message, or None: pooled, k=2)
    (dict(seed=7), None),                                # a training seed: what a cell pools
    (dict(data_sha="e" * 64), "data_sha256"),            # the ablation + other-data balanced run
    (dict(test_sha="u" * 64), "data sha256"),            # scored on other test data
    (dict(top_k=0), "protocol top_k"),                   # other sampling settings
    (dict(scorer="other-scorer"), "scorer model"),       # another scorer
]


@pytest.mark.parametrize("change,field", POOL_CASES, ids=[next(iter(c)) for c, _ in POOL_CASES])
def test_a_cell_pools_one_experiment_only(tmp_path, capsys, change, field):
    a = fake_eval(tmp_path / "a", scorer=str(tmp_path))
    b = fake_eval(tmp_path / "b", **dict(dict(scorer=str(tmp_path)), **change))
    code, out, err = call(report.main, ["table", a, b], capsys)
    if field is None:
        assert code == 0 and "(k=2)" in out, err
    else:
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and f"{a} and {b}" in lines[0] and field in lines[0], err


def test_a_scorer_is_what_it_is_not_the_path_typed(tmp_path, monkeypatch):
    """The same scorer folder typed relative and absolute is one scorer (compare and the table's marks); the
    fingerprint evaluate.py now records decides when both runs have one, whatever the folder was called."""
    (tmp_path / "scorer").mkdir()
    monkeypatch.chdir(tmp_path)
    rel = json.load(open(fake_eval(tmp_path / "a", scorer="scorer")))
    ab = json.load(open(fake_eval(tmp_path / "b", scorer=str(tmp_path / "scorer"))))
    report.check_comparable([("a", rel), ("b", ab)])   # no error: one scorer
    moved = json.load(open(fake_eval(tmp_path / "c", scorer="/elsewhere/copy", fingerprint="f" * 64)))
    same = json.load(open(fake_eval(tmp_path / "d", scorer="scorer", fingerprint="f" * 64)))
    report.check_comparable([("c", moved), ("d", same)])
    other = json.load(open(fake_eval(tmp_path / "e", scorer="scorer", fingerprint="0" * 64)))
    with pytest.raises(ValueError, match="scorer model"):
        report.check_comparable([("d", same), ("e", other)])
    # and evaluate.py records the resolved folder and the fingerprint
    assert E.scorer_fingerprint(os.path.join(SAMPLE, "scorer")) == E.scorer_fingerprint(
        os.path.relpath(os.path.join(SAMPLE, "scorer")))


# ----------------------------------------------------------------------------------------------- 3. the sweep

ABLATION = os.path.join(ROOT, "scripts", "ablation.sh")

SWEEP_REFUSALS = [
    # (arguments after MODEL DATA_DIR OUT_ROOT, a piece of the one error line)
    (["--", "--max-stepz", "1"], "unrecognized arguments: --max-stepz"),   # a train.py typo after --
    (["--temprature", "1"], "unrecognized arguments: --temprature"),       # an evaluate.py typo
    (["--", "--lora-rank", "-1"], "--lora-rank"),                          # a bad train.py value
    (["--greedy", "--top-k", "5"], "--top-k"),                              # evaluate.py's own refusal, first
    (["--", "--weights", "ce"], "--weights"),                              # the sweep sets it
]


@pytest.mark.parametrize("extra,msg", SWEEP_REFUSALS, ids=[e[-2] for e, _ in SWEEP_REFUSALS])
def test_the_sweep_checks_every_flag_before_any_work(tmp_path, extra, msg):
    code, out, err = run(["bash", ABLATION, "tiny", SAMPLE, tmp_path / "runs"] + extra, timeout=120)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], (out, err)
    assert not (tmp_path / "runs").exists() and "==" not in out   # nothing evaluated, nothing written


def test_the_sweep_takes_greedy_and_several_models_and_resumes(tmp_path):
    """--greedy works (no --seed added); two models give one table with a row each; a rerun of a finished sweep
    only reprints the table; a lost eval.json is evaluated again without retraining; a changed train flag is
    refused before any work."""
    made = tmp_path / "made"   # a second "model": a plain local model folder (tiny's weights, saved by train.py)
    code, _, err = run([sys.executable, os.path.join(ROOT, "train.py"), "--model", "tiny", "--out", made,
                        "--max-steps", 1, "--lr", 0, "--quiet", "--eval-data", "none"])
    assert code == 0, err
    other = tmp_path / "tiny2"
    other.mkdir()
    for f in os.listdir(made):   # the model and tokenizer only: a base model, not a train.py run
        if f.endswith((".safetensors", ".json")) and f not in ("state.safetensors", "args.json"):
            shutil.copy(made / f, other / f)
    root = tmp_path / "runs"
    argv = ["bash", ABLATION, f"tiny,{other}", SAMPLE, root, "--greedy", "--n", 4, "--", "--max-steps", 1]
    env = {"BERTSCORE_MODEL": os.path.join(SAMPLE, "scorer"), "BERTSCORE_LAYER": "2"}   # offline, for tiny2 too
    code, out, err = run(argv, env=env)
    assert code == 0, err
    table = (root / "table.md").read_text(encoding="utf-8")
    rows = [ln for ln in table.split("### ")[1].splitlines() if ln.startswith("| tiny")]
    assert len(rows) == 2 and all(ln.count(" - ") == 0 for ln in rows), table   # a full row per model
    assert json.load(open(root / "tiny" / "ce" / "eval.json"))["generation"]["mode"] == "greedy"
    code, out2, err = run(argv, env=env)                                            # finished: only the table again
    assert code == 0 and not re.search(r"== \S+: train", out2) and sum("done" in ln for ln in out2.splitlines()) == 10, out2
    assert (root / "table.md").read_text(encoding="utf-8") == table
    os.remove(root / "tiny" / "mild" / "eval.json")                       # a lost evaluation
    code, out3, err = run(argv, env=env)
    assert code == 0 and "resuming" in out3 and ": train ce" not in out3, out3
    code, out4, err = run(argv[:-1] + [2], env=env)                                 # another experiment: refused first
    assert code == 2 and "sweep_train_flags" not in err and "use another OUT_ROOT" in err and "==" not in out4, err


# ----------------------------------------------------------------------------------------------- 4. resume


def test_a_grown_max_steps_says_how_the_schedule_changes(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--model", "tiny", "--out", out, "--quiet", "--eval-data", "none"]
    assert call(train.main, base + ["--max-steps", 2], capsys)[0] == 0
    code, out, err = call(train.main, base + ["--max-steps", 4, "--resume"], capsys)
    notes = [ln for ln in out.splitlines() if "re-planned" in ln]
    assert code == 0 and len(notes) == 1 and "re-planned" not in err, out
    # linear decay, peak 3e-3: step 3 of 2 planned is 0 (the old plan's end), of 4 planned 1.5e-3
    assert "over 4 steps instead of 2" in notes[0] and "step 3 is 0.0015" in notes[0] and "plan: 0)" in notes[0]
    code, out, err = call(train.main, base + ["--max-steps", 4, "--resume"], capsys)   # same total: no note
    assert code == 0 and "re-planned" not in out + err


# ----------------------------------------------------------------------------------------------- 5. figures

FIGURES = os.path.join(ROOT, "results", "ablation_tiny.md")


def figure_rows(path):
    """The table rows of a results file's "## Figures" section (headers and rules excluded): the ones the docs show."""
    text = open(path, encoding="utf-8").read().split("## Figures", 1)[1].split("\n## ", 1)[0]
    return [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith(("| tiny, data", "| group"))]


def all_rows(path):
    """Every line of a results file but its Timing line (what a fresh run must give again)."""
    return [ln for ln in open(path, encoding="utf-8").read().splitlines() if not ln.startswith("Timing:")]


def test_every_figure_row_is_in_the_docs():
    """Each figure row that scripts/figures.sh wrote appears verbatim in README.md or a docs/*.md file."""
    docs = [os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "docs", "*.md"))
    text = "\n".join(open(f, encoding="utf-8").read() for f in docs)
    rows = figure_rows(FIGURES)
    assert len(rows) >= 8
    missing = [r for r in rows if r not in text]
    assert not missing, f"not in README.md or docs/*.md (rerun scripts/figures.sh and copy them): {missing}"


def test_figures_are_a_fresh_run(tmp_path):
    """scripts/figures.sh from scratch gives results/ablation_tiny.md's figures, row for row."""
    code, out, err = run(["bash", os.path.join(ROOT, "scripts", "figures.sh")], env={"FIGURES_OUT": str(tmp_path)},
                         timeout=1800)
    assert code == 0, err
    assert all_rows(tmp_path / "ablation_tiny.md") == all_rows(FIGURES)


# ----------------------------------------------------------------------------------------------- 6. three faults

ASCII = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}


@pytest.mark.parametrize("script,argv", [
    ("train.py", ["--model", "tiny", "--max-steps", 1]),
    ("evaluate.py", ["--model", "tiny", "--n", 2] + SCORER),
], ids=["train", "evaluate"])
def test_a_name_the_locale_cannot_spell_is_refused_before_work(tmp_path, script, argv):
    out = tmp_path / "مخرج"
    code, _, err = run([sys.executable, os.path.join(ROOT, script), "--out", out] + argv, env=ASCII, timeout=120)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "locale's encoding" in lines[0] and "Traceback" not in err, err
    assert os.listdir(tmp_path) == []   # no half-written folder


def test_an_arabic_name_is_recorded_as_typed_under_an_ascii_locale(tmp_path):
    code, _, err = run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--model", "tiny", "--n", 2, "--greedy",
                        "--name", "نموذج", "--out", tmp_path / "ev", "--quiet"] + SCORER, env=ASCII, timeout=300)
    assert code == 0, err
    assert json.load(open(tmp_path / "ev" / "eval.json", encoding="utf-8"))["model"]["name"] == "نموذج"


def test_no_matplotlib_warning_before_the_error_line(tmp_path):
    (tmp_path / "file").write_text("x")
    code, _, err = run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--model", "tiny", "--n", 2,
                        "--bertscore-model", "/no/such/scorer", "--out", tmp_path / "ev"],
                       env={"MPLCONFIGDIR": str(tmp_path / "file" / "mpl"), "HOME": str(tmp_path / "file")},
                       timeout=300)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: --bertscore-model"), err


SHADOW_CASES = [
    # (folder in the working directory, is it a model folder, what the note says is used)
    ("tiny", False, "the registry's tiny is used"),
    ("aragpt2-base", False, "the registry's aragpt2-base is used"),
    ("tiny", True, "is used, not the registry's tiny"),
]


@pytest.mark.parametrize("name,model_folder,said", SHADOW_CASES, ids=[f"{n}-{m}" for n, m, _ in SHADOW_CASES])
def test_a_local_folder_shadows_a_registry_name_only_as_a_model_folder(tmp_path, monkeypatch, capsys, name,
                                                                     model_folder, said):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "_SHADOW_SAID", set())
    (tmp_path / name).mkdir()
    if model_folder:
        (tmp_path / name / "config.json").write_text("{}")
    assert hub.local_folder(name) is model_folder
    out = capsys.readouterr().out
    assert said in out and out.count("note:") == 1, out
    if not model_folder and name != "tiny":
        assert hub.check_name(name) == hub.REGISTRY[name]["repo"]   # the registry's, not "no config.json"


# ----------------------------------------------------------------------------------------------- 7. prepare, eval


def rows_file(tmp_path, n):
    src = tmp_path / "in.jsonl"
    outputs.write_jsonl(src, [{"question": f"سؤال رقم {i} عن الصداع", "answer": f"جواب {i}"} for i in range(n)])
    return src


SPLIT_CASES = [
    # (rows, argv, (train, test)) or an error piece
    (30, ["--n-test", 5], (25, 5)),                      # the case: was 29 / 1
    (30, ["--n-test", 5, "--n-train", 10], (10, 5)),     # enough rows: as asked
    (30, ["--n-test=7", "--n-train", 100], (23, 7)),
    (30, [], (28, 2)),                                   # default --n-test: proportional, as before
    (30, ["--n-test", 30], "too few for a training and a test split"),   # nothing left to train on
]


@pytest.mark.parametrize("n,argv,want", SPLIT_CASES, ids=[" ".join(map(str, a)) or "default" for _, a, _ in SPLIT_CASES])
def test_prepare_honours_n_test(tmp_path, capsys, n, argv, want):
    out = tmp_path / "out"
    code, _, err = call(prepare.main, ["--input", rows_file(tmp_path, n), "--out", out] + argv, capsys)
    if isinstance(want, str):
        assert code == 2 and want in err and not out.exists(), err
        return
    assert code == 0, err
    got = tuple(sum(1 for _ in open(out / f, encoding="utf-8")) for f in ("train.jsonl", "test.jsonl"))
    assert got == want


def test_a_missing_auto_eval_file_is_one_note(tmp_path, capsys):
    shutil.copy(TRAIN_DATA, tmp_path / "train.jsonl")   # no test.jsonl beside it
    code, out, err = call(train.main, ["--model", "tiny", "--data", tmp_path / "train.jsonl", "--out",
                                       tmp_path / "run", "--check-args"], capsys)
    notes = [ln for ln in out.splitlines() if ln.startswith("note: --eval-data auto")]
    assert code == 0 and len(notes) == 1 and "without eval loss" in notes[0] and "0 eval" in out, (out, err)
