"""Real-world faults on the outputs (issue 17): a full disk at any file of a multi-file output, two runs into one
output, temporary files left by a killed save, eval.json and predictions.jsonl from different runs, a new training
run into an evaluated folder, --out deleted during training, a plot that cannot be written.

A full disk is simulated in-process and deterministically: os.fsync (which every output write goes through before
its rename) raises ENOSPC for the one file named in the table row. The runs are the smallest there are: the embedded
tiny model for 1-3 steps on data/sample, the sample's BERTScore model, two prepared splits of the sample.
"""
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

import annotate
import checkpoint
import classify
import data
import report
import outputs
import evaluate as E
import train
from data import prepare

pytestmark = pytest.mark.usefixtures("threads_and_signals")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "data", "sample")
TRAIN_DATA, TEST_DATA = os.path.join(SAMPLE, "train.jsonl"), os.path.join(SAMPLE, "test.jsonl")
LABELS = os.path.join(SAMPLE, "severity_labels.jsonl")
NOSPACE = os.strerror(errno.ENOSPC)   # "No space left on device"
TEMP = re.compile(r"^\..*\.tmp$")


def call(main, argv, capsys):
    """(exit status, stderr) of a script's main run in-process."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def disk_full(monkeypatch, name):
    """The disk is full when `name` is written: os.fsync of that file (or of its atomic-write temp) raises ENOSPC."""
    real = os.fsync

    def fsync(fd):
        base = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if base == name or base.startswith(f".{name}."):
            raise OSError(errno.ENOSPC, NOSPACE)
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


def snapshot(folder):
    """{relative path: sha256} of every file under folder (hidden ones included)."""
    out = {}
    for dp, _, fns in os.walk(folder):
        for n in fns:
            p = os.path.join(dp, n)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def leftovers(folder):
    """Temp files/folders and lock files left anywhere under folder."""
    return [os.path.join(dp, n) for dp, dns, fns in os.walk(folder) for n in dns + fns
            if TEMP.match(n) or n.endswith(".lock")]


def one_error(code, err, *needles):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in err, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def train_argv(out, steps=2, *extra):
    return ["--model", "tiny", "--data", TRAIN_DATA, "--out", out, "--max-steps", steps, "--batch-size", "2",
            "--quiet", *extra]


def eval_argv(model, out):
    return ["--model", model, "--data", TEST_DATA, "--out", out, "--bertscore-model", os.path.join(SAMPLE, "scorer"),
            "--bertscore-layer", "1", "--greedy", "--n", "3", "--bootstrap", "0", "--max-new-tokens", "2", "--quiet"]


def prep_argv(out, seed):
    return ["--input", TRAIN_DATA, "--out", out, "--n-train", "20", "--n-test", "10", "--seed", seed]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step tiny training run (a model folder evaluate.py can read)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train.main([str(a) for a in train_argv(out)])
    return out


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, trained):
    out = tmp_path_factory.mktemp("evaluated") / "ev"
    E.main([str(a) for a in eval_argv(trained, out)])
    return out


# -- a full disk at any file of a multi-file output: the old outputs stay whole, one error line, no temp left ------

def _prepare_old(tmp, capsys):
    out = tmp / "split"
    assert call(prepare.main, prep_argv(out, 1), capsys)[0] == 0
    return out, prep_argv(out, 2), prepare.main


def _train_old(tmp, capsys):   # a checkpoint at step 2, resumed to step 3: the save of step 3 fails
    out = tmp / "run"
    assert call(train.main, train_argv(out, 2), capsys)[0] == 0
    return out, train_argv(out, 3, "--resume"), train.main


def _eval_old(tmp, capsys, trained=None):
    out = tmp / "ev"
    assert call(E.main, eval_argv(trained, out), capsys)[0] == 0
    return out, eval_argv(trained, out) + ["--max-new-tokens", "3"], E.main


DISK_FULL = [   # (id, set-up of the old outputs, the file at which the disk is full)
    ("prepare train.jsonl", _prepare_old, "train.jsonl"),
    ("prepare test.jsonl", _prepare_old, "test.jsonl"),
    ("prepare manifest.json", _prepare_old, "manifest.json"),
    ("train resume state", _train_old, "state.safetensors"),
    ("train resume model", _train_old, "model.safetensors"),
    ("train resume tokenizer", _train_old, "tokenizer.json"),
    ("train resume args.json", _train_old, "args.json"),
    ("evaluate predictions", _eval_old, "predictions.jsonl"),
    ("evaluate eval.json", _eval_old, "eval.json"),
]


@pytest.mark.parametrize("case,setup,name", DISK_FULL, ids=[c[0] for c in DISK_FULL])
def test_disk_full_keeps_the_old_outputs_whole(tmp_path, capsys, monkeypatch, trained, case, setup, name):
    out, argv, main = setup(tmp_path, capsys, trained) if setup is _eval_old else setup(tmp_path, capsys)
    before = snapshot(out)
    old_log = (out / "train_log.jsonl").read_text() if (out / "train_log.jsonl").exists() else None
    disk_full(monkeypatch, name)
    code, err = call(main, argv, capsys)
    one_error(code, err, f"{os.path.join(out, name)}: {NOSPACE}")
    monkeypatch.undo()
    after = snapshot(out)
    if "train_log.jsonl" in before:   # the log goes on past the checkpoint (a resume drops what is past it)
        assert (out / "train_log.jsonl").read_text().startswith(old_log)
        before.pop("train_log.jsonl"), after.pop("train_log.jsonl")
    assert after == before, "the old outputs changed"
    assert leftovers(out) == []
    if setup is _prepare_old:   # the old manifest still matches the old files
        m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        assert m["sha256"] == {f: outputs.sha256(out / f) for f in ("train.jsonl", "test.jsonl")}
    if setup is _eval_old:      # and the old pair still reads
        assert call(report.main, ["table", out / "eval.json"], capsys)[0] == 0


FIRST_SAVE = [   # (id, script, argv, the file at which the disk is full): nothing of the failed run stays behind
    ("train first save", train.main, lambda o: train_argv(o, 2), "model.safetensors"),
    ("train first save, state", train.main, lambda o: train_argv(o, 2), "state.safetensors"),
    ("classify", classify.main, lambda o: ["--model", "tiny", "--data", LABELS, "--epochs", "1", "--batch-size", "16",
                                           "--max-len", "32", "--device", "cpu", "--out", o, "--quiet"],
     "model.safetensors"),
    ("prepare", prepare.main, lambda o: prep_argv(o, 1), "test.jsonl"),
]


@pytest.mark.parametrize("case,main,argv,name", FIRST_SAVE, ids=[c[0] for c in FIRST_SAVE])
def test_disk_full_at_the_first_save_leaves_nothing(tmp_path, capsys, monkeypatch, case, main, argv, name):
    out = tmp_path / "new"
    disk_full(monkeypatch, name)
    one_error(*call(main, argv(out), capsys), f"{name}: {NOSPACE}")
    # no args.json, log or plot without a model; no empty folder; no temp file
    assert not out.exists(), sorted(os.listdir(out))
    assert os.listdir(tmp_path) == []


def test_disk_full_in_annotate_names_the_partial_file(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ann.jsonl"
    disk_full(monkeypatch, "ann.jsonl.partial")
    one_error(*call(annotate.main, [TEST_DATA, "--classifier", "tiny", "--out", out, "--device", "cpu", "--quiet"],
                    capsys), f"{out}.partial: {NOSPACE}")
    assert not out.exists() and leftovers(tmp_path) == []


# -- one run per output ------------------------------------------------------------------------------------------

HOLD = ("import sys, time, outputs; outputs.lock_output(sys.argv[1], '--out', folder=sys.argv[2] == 'dir'); "
        "print('ready', flush=True); time.sleep(300)")

LOCKED = [   # (id, script, argv(output path), the output locked, folder or file)
    ("train", train.main, lambda o: train_argv(o), "dir"),
    ("train resume", train.main, lambda o: train_argv(o, 2, "--resume"), "dir"),
    ("evaluate", E.main, lambda o: eval_argv("tiny", o), "dir"),
    ("classify", classify.main, lambda o: ["--model", "tiny", "--data", LABELS, "--epochs", "1", "--device", "cpu",
                                           "--out", o], "dir"),
    ("prepare", prepare.main, lambda o: prep_argv(o, 1), "dir"),
    ("annotate", annotate.main, lambda o: [TEST_DATA, "--classifier", "tiny", "--out", str(o) + ".jsonl",
                                           "--device", "cpu"], "file"),
]


@pytest.mark.parametrize("case,main,argv,kind", LOCKED, ids=[c[0] for c in LOCKED])
def test_second_run_into_one_output_is_refused(tmp_path, capsys, trained, case, main, argv, kind):
    out = tmp_path / "out"
    if case == "train resume":   # a resumable run is there
        shutil.copytree(trained, out)
    target = str(out) + ".jsonl" if kind == "file" else str(out)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, target, kind], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        before = snapshot(tmp_path)
        one_error(*call(main, argv(out), capsys), "--out", f"{os.path.abspath(target)} is in use by process "
                                                           f"{holder.pid}")
        assert snapshot(tmp_path) == before, "the refused run wrote something"
    finally:
        holder.kill()
        holder.wait()
    # the holder died without cleaning up: its lock file is left, and is simply taken over
    lock = os.path.join(target, ".lock") if kind == "dir" else target + ".lock"
    assert open(lock).read().strip() == str(holder.pid)
    taken = outputs.lock_output(target, "--out", folder=kind == "dir")
    try:
        assert open(taken).read().strip() == str(os.getpid())
    finally:
        outputs.release_outputs()
    assert not os.path.exists(lock)


def test_two_annotate_processes_cannot_both_run(tmp_path):
    """The issue's case: annotate's "rerun to resume" while the first still runs. The second is refused at once."""
    out = tmp_path / "ann.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(ROOT, "annotate.py"), TEST_DATA, "--classifier", "tiny", "--out", str(out),
           "--device", "cpu", "--quiet"]
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), "file"], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    one_error(p.returncode, p.stderr, f"is in use by process {holder.pid}")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)   # the lock is taken over
    assert p.returncode == 0, p.stderr
    assert len(out.read_text(encoding="utf-8").splitlines()) == len(data.load_records(TEST_DATA))


# -- temp files of a killed save are removed at the next start (ours only) ---------------------------------------

STALE = [   # (id, script, argv(out), temps of ours planted in out, out is a file)
    ("train", train.main, lambda o: train_argv(o, 1), [".state.safetensors.ab12cd34.tmp", ".unit.zz_9yy8x.tmp/"]),
    ("prepare", prepare.main, lambda o: prep_argv(o, 1), [".train.jsonl.k2j3h4g5.tmp", ".unit.a1b2c3d4.tmp/"]),
    ("evaluate", E.main, lambda o: eval_argv("tiny", o), [".predictions.jsonl.q1w2e3r4.tmp"]),
]
NOT_OURS = ["notes.tmp", ".notes.tmp", ".mine.ab12cd34.tmp", "keep.txt"]   # never touched


@pytest.mark.parametrize("case,main,argv,ours", STALE, ids=[c[0] for c in STALE])
def test_stale_temp_files_are_cleaned(tmp_path, capsys, case, main, argv, ours):
    out = tmp_path / "out"
    out.mkdir()
    for n in ours + NOT_OURS:
        if n.endswith("/"):
            (out / n).mkdir()
            (out / n / "state.safetensors").write_bytes(b"x" * 1000)
        else:
            (out / n).write_bytes(b"x" * 1000)
    code, err = call(main, argv(out), capsys)
    assert code == 0, err
    left = set(os.listdir(out))
    assert not left & {n.rstrip("/") for n in ours}, left
    assert set(NOT_OURS) <= left


def test_stale_annotate_temps_are_cleaned(tmp_path, capsys):
    out = tmp_path / "ann.jsonl"
    ours = [".ann.jsonl.partial.json.ab12cd34.tmp", ".ann.jsonl.zzzz1111.tmp"]
    other = [".other.jsonl.ab12cd34.tmp"]   # another output's temp in the same folder: maybe a live run's
    for n in ours + other:
        (tmp_path / n).write_text("x")
    assert call(annotate.main, [TEST_DATA, "--classifier", "tiny", "--out", out, "--device", "cpu", "--quiet"],
                capsys)[0] == 0
    assert sorted(os.listdir(tmp_path)) == sorted(["ann.jsonl"] + other)


# -- eval.json and predictions.jsonl belong together ------------------------------------------------------------

MISMATCH = [   # (id, how the predictions are changed, the reading command)
    ("table, a row changed", "edit", lambda ev, other: ["table", ev / "eval.json"]),
    ("table, a later run's file", "replace", lambda ev, other: ["table", ev / "eval.json"]),
    ("compare", "edit", lambda ev, other: ["compare", ev, other, "--out", ev.parent / "cmp"]),
]


@pytest.mark.parametrize("case,how,argv", MISMATCH, ids=[c[0] for c in MISMATCH])
def test_predictions_that_do_not_match_eval_json_are_refused(tmp_path, capsys, evaluated, case, how, argv):
    ev, other = tmp_path / "ev", tmp_path / "other"
    shutil.copytree(evaluated, ev)
    shutil.copytree(evaluated, other)
    pred = ev / "predictions.jsonl"
    assert json.loads((ev / "eval.json").read_text(encoding="utf-8"))["predictions_sha256"] == outputs.sha256(pred)
    assert call(report.main, argv(ev, other), capsys)[0] == 0   # the pair as written reads
    rows = pred.read_text(encoding="utf-8").splitlines()
    if how == "edit":
        r = json.loads(rows[0])
        r["prediction"] = r["prediction"] + " x"
        rows[0] = json.dumps(r, ensure_ascii=False)
    else:
        rows = rows[::-1]
    pred.write_text("\n".join(rows) + "\n", encoding="utf-8")
    one_error(*call(report.main, argv(ev, other), capsys), f"{pred}: does not match", "different runs")


# -- a new training run into a folder holding an earlier run ----------------------------------------------------

def test_new_run_removes_the_earlier_runs_files(tmp_path, capsys, trained, evaluated):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    for f in ("eval.json", "predictions.jsonl"):
        shutil.copy(evaluated / f, out / f)
    (out / "generation_config.json").write_text('{"do_sample": true}', encoding="utf-8")
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    code, err = call(train.main, train_argv(out, 1), capsys)
    assert code == 0, err
    note = [ln for ln in err.splitlines() if "removed the earlier run's" in ln]
    assert len(note) == 1 and all(f in note[0] for f in ("eval.json", "predictions.jsonl", "generation_config.json",
                                                         "model.safetensors", "args.json")), err
    assert not any((out / f).exists() for f in ("eval.json", "predictions.jsonl", "generation_config.json"))
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert json.loads((out / "args.json").read_text())["max_steps"] == 1
    # --resume keeps them (the run goes on)
    for f in ("eval.json", "predictions.jsonl"):
        shutil.copy(evaluated / f, out / f)
    assert call(train.main, train_argv(out, 2, "--resume"), capsys)[0] == 0
    assert (out / "eval.json").exists()


# -- --out deleted during training; a plot that fails ----------------------------------------------------------

def test_out_deleted_during_training_still_saves(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = train.evaluate_loss

    def evaluate_loss(*a, **kw):   # the first eval: someone removes the folder
        shutil.rmtree(out, ignore_errors=True)
        return real(*a, **kw)
    monkeypatch.setattr(train, "evaluate_loss", evaluate_loss)
    code, err = call(train.main, train_argv(out, 3, "--eval-every", "1"), capsys)
    assert code == 0, err
    assert "was deleted during the run" in err
    from model import Decoder
    Decoder.from_pretrained(str(out))
    steps = [json.loads(ln)["step"] for ln in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 1, 2, 2, 3, 3]   # the log written back whole (train + eval line per step)
    assert (out / "args.json").exists() and (out / "state.safetensors").exists()


def test_a_plot_that_fails_never_costs_the_model(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"

    def plot_log(log_path, png_path):
        raise OSError(errno.ENOSPC, NOSPACE)
    monkeypatch.setattr(checkpoint, "plot_log", plot_log)
    code, err = call(train.main, train_argv(out, 2, "--eval-every", "1"), capsys)
    assert code == 0, err
    assert f"note: {os.path.join(out, 'train_log.png')} not written: {NOSPACE}" in err
    assert (out / "model.safetensors").exists() and (out / "state.safetensors").exists()


# -- the helpers themselves --------------------------------------------------------------------------------------

def test_unit_moves_all_or_nothing(tmp_path):
    (tmp_path / "a").write_text("old a")
    (tmp_path / "b").write_text("old b")
    with pytest.raises(RuntimeError):
        with outputs.unit(tmp_path) as tmp:
            outputs.atomic_write(os.path.join(tmp, "a"), "new a")
            raise RuntimeError("killed half-way")
    assert (tmp_path / "a").read_text() == "old a" and sorted(os.listdir(tmp_path)) == ["a", "b"]
    with outputs.unit(tmp_path / "gone", last=("b",)) as tmp:   # a missing folder is created
        outputs.atomic_write(os.path.join(tmp, "b"), "new b")
        outputs.atomic_write(os.path.join(tmp, "a"), "new a")
    assert sorted(os.listdir(tmp_path / "gone")) == ["a", "b"]


class SafetensorError(Exception):   # the name safetensors' Rust errors carry (its IO errors hold the errno text)
    pass


def _save_file(p):
    from safetensors.torch import save_file
    import torch
    save_file({"w": torch.zeros(4)}, p)


def _rust_io_error(p):
    raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                          '"No space left on device" })')


def _tokenizers_io_error(p):   # the tokenizers library raises bare Exceptions
    raise Exception('No space left on device (os error 28): Os { code: 28, kind: StorageFull, message: '
                    '"No space left on device" }')


ATOMIC = [   # (id, content, fail at fsync): every way a write can fail -> WriteError "<file>: <errno text>"
    ("text", "نص\n", True),
    ("bytes", b"\x00\x01", True),
    ("safetensors", _save_file, True),
    ("safetensors IO error", _rust_io_error, False),
    ("tokenizers IO error", _tokenizers_io_error, False),
]


@pytest.mark.parametrize("case,content,at_fsync", ATOMIC, ids=[c[0] for c in ATOMIC])
def test_atomic_write_failure_is_one_write_error(tmp_path, monkeypatch, case, content, at_fsync):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    if at_fsync:
        disk_full(monkeypatch, "f.bin")
    with pytest.raises(outputs.WriteError) as e:
        outputs.atomic_write(target, content)
    assert str(e.value) == f"{target}: {NOSPACE}"
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]



def test_resume_with_no_byte_writable_is_one_line(tmp_path, trained):
    """A resume where not one byte can be written any more (RLIMIT_FSIZE 0 in the child: every write past 0 bytes
    fails, as on a full disk): the lock file cannot take the pid, the save cannot happen. One error line naming a
    file, exit 2, the previous checkpoint untouched (the lock's pid write was an OSError traceback at the start)."""
    import resource
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    before = outputs.sha256(out / "model.safetensors"), outputs.sha256(out / "state.safetensors")

    def no_bytes():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # the write fails with EFBIG instead of killing the child
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    p = subprocess.run([sys.executable, "train.py", *map(str, train_argv(out, 4, "--resume"))], cwd=ROOT,
                       capture_output=True, text=True, preexec_fn=no_bytes, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(out) in errors[0], p.stderr
    assert (outputs.sha256(out / "model.safetensors"), outputs.sha256(out / "state.safetensors")) == before
