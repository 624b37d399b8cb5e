"""The console and signal contract (issue 17): a console that goes away (a closed pipe, /dev/full) never kills the work;
SIGHUP saves like SIGTERM; Ctrl-C at any moment, import time included, is one "interrupted:" line and exit 130; an
ASCII console or an unwritable HOME changes nothing; names from files cannot put control characters on the terminal.
Every case runs a script in a subprocess, as a user would."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors import safe_open

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "data", "sample", "train.jsonl")
SCRIPTS = ["train.py", "classify.py", "annotate.py", "evaluate.py", "report.py", "bench.py", "data/prepare.py"]
EVIL = "\x1b[2K\rok: done"   # erases the line and prints a fake success message, if printed raw


def env(**kw):
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MPLCONFIGDIR")}
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false")
    e.update({k: str(v) for k, v in kw.items()})
    return e


def train_args(out, *extra, steps=3):
    return ["--model", "tiny", "--data", SAMPLE, "--out", str(out), "--max-steps", str(steps), "--eval-data", "none",
            *map(str, extra)]


def popen(script, argv, stdout=subprocess.PIPE, **kw):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *argv], env=env(**kw), cwd=ROOT,
                            stdout=stdout, stderr=subprocess.PIPE, text=True)


def finish(p, timeout=120):
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return out, err


def saved(out):
    return all(os.path.isfile(os.path.join(str(out), f)) for f in ("model.safetensors", "state.safetensors"))


# --------------------------------------------------------------------------------------------- a console that went away

def test_broken_pipe_finishes_the_run(tmp_path):
    """`train.py ... | head -1`: the reader closes the pipe after one line; the run still trains, saves and exits 0,
    with nothing on stderr about it (no BrokenPipeError, no exit 120 from the flush at exit)."""
    out = tmp_path / "o"
    p = popen("train.py", train_args(out, steps=30))
    p.stdout.readline()
    p.stdout.close()          # as head -1 does: every later write to stdout meets a broken pipe
    _, err = finish(p)
    assert p.returncode == 0, err[-2000:]
    assert "Traceback" not in err and "BrokenPipe" not in err, err[-2000:]
    assert saved(out)


def test_dev_full_stdout_finishes_the_run(tmp_path):
    out = tmp_path / "o"
    with open("/dev/full", "w") as full:
        p = popen("train.py", train_args(out), stdout=full)
        _, err = finish(p)
    assert p.returncode == 0, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert saved(out)


# --------------------------------------------------------------------------------------------- signals

def wait_for_first_step(p, out, timeout=90):
    log_path = out / "train_log.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        if log_path.exists() and log_path.read_text(encoding="utf-8").strip():
            return
        time.sleep(0.05)
    raise AssertionError("the run ended before it could be signalled")


@pytest.mark.parametrize("sig, first_word", [(signal.SIGHUP, "stopped by SIGHUP:"), (signal.SIGINT, "interrupted:")])
def test_signal_in_training_saves_and_resumes(tmp_path, sig, first_word):
    """SIGHUP (a closed terminal, a dropped ssh) saves and stops as SIGTERM does; Ctrl-C too, with its one
    "interrupted:" line on stderr (not stdout). --resume then continues from the saved step."""
    out = tmp_path / "o"
    argv = train_args(out, "--batch-size", 4, "--schedule", "constant", "--quiet", steps=100000)
    p = popen("train.py", argv)
    wait_for_first_step(p, out)
    p.send_signal(sig)
    stdout, err = finish(p)
    assert p.returncode == 128 + sig, (p.returncode, err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(first_word), err[-2000:]
    assert first_word not in stdout
    assert saved(out)
    with safe_open(str(out / "state.safetensors"), "pt") as f:
        k = json.loads(f.metadata()["meta"])["step"]
    argv[argv.index("--max-steps") + 1] = str(k + 2)
    q = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv, "--resume"], env=env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert q.returncode == 0, q.stderr[-2000:]
    with safe_open(str(out / "state.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["meta"])["step"] == k + 2


@pytest.fixture(scope="module")
def slow_torch(tmp_path_factory):
    """A folder to put first on PYTHONPATH whose `torch` and `numpy` touch a marker file and then sleep: the
    script is then certainly inside its heavy imports when the test sends SIGINT."""
    d = tmp_path_factory.mktemp("slow")
    for name in ("torch", "numpy"):
        (d / f"{name}.py").write_text("import os, time\nopen(os.environ['MARKER'], 'w').close()\ntime.sleep(60)\n",
                                      encoding="utf-8")
    return d


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "data/prepare.py"])   # prepare imports nothing heavy
def test_ctrl_c_during_imports_is_one_line(tmp_path, slow_torch, script):
    marker = tmp_path / "importing"
    p = popen(script, ["--help"], PYTHONPATH=slow_torch, MARKER=marker)
    deadline = time.time() + 30
    while not marker.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert marker.exists(), "test set-up: the script did not reach the slow import"
    p.send_signal(signal.SIGINT)
    _, err = finish(p, timeout=30)
    assert p.returncode == 130, (p.returncode, err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted:"), err[-2000:]


@pytest.mark.parametrize("delay", [0.3, 0.8, 1.5])
def test_ctrl_c_at_any_moment_of_a_real_run(tmp_path, delay):
    """The real torch import and then training: wherever the Ctrl-C lands, one "interrupted:" line, exit 130."""
    p = popen("train.py", train_args(tmp_path / "o", "--quiet", steps=100000))
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    _, err = finish(p)
    lines = err.strip().splitlines()
    assert p.returncode == 130, (p.returncode, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("interrupted:"), err[-2000:]


# --------------------------------------------------------------------------------------------- encodings, HOME

ARABIC = "بيانات"
USER_ERRORS = {   # a user error naming an Arabic path: the one error line must print on any console
    "train.py": ["--data", f"{ARABIC}.jsonl"],
    "classify.py": ["--data", f"{ARABIC}.jsonl"],
    "annotate.py": ["--classifier", ARABIC, "--out", "x.jsonl", f"{ARABIC}.jsonl"],
    "evaluate.py": ["--model", ARABIC],
    "report.py": ["table", f"{ARABIC}.json"],
    "bench.py": ["--model", ARABIC],
    "data/prepare.py": ["--source", "maqa", "--input", f"{ARABIC}.xlsx", "--question-col", "q", "--answer-col", "a",
                        "--out", "x"],
}


@pytest.mark.parametrize("console", [dict(PYTHONIOENCODING="ascii"), dict(PYTHONIOENCODING="cp1252"),
                                     dict(LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONIOENCODING="")],
                         ids=["ascii", "cp1252", "C-locale"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_ascii_console_user_error_is_one_line(tmp_path, script, console):
    p = popen(script, USER_ERRORS[script], **console)
    _, err = finish(p)
    assert p.returncode == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err[-2000:]
    if "LC_ALL" not in console:   # the C locale decodes the Arabic argument itself as undecodable bytes (\udcd8)
        assert "\\u0628" in lines[0], err[-2000:]


def test_ascii_console_training_with_arabic_out(tmp_path):
    """A whole run into an Arabic --out folder on an ASCII console: files written (UTF-8), exit 0."""
    out = tmp_path / f"out-{ARABIC}"
    p = popen("train.py", train_args(out, steps=2), PYTHONIOENCODING="ascii")
    stdout, err = finish(p)
    assert p.returncode == 0, err[-2000:]
    assert saved(out) and "\\u0628" in stdout


# a user error after bert_score has imported matplotlib (which warns at import when its config folder cannot be made)
HOME_ERRORS = [*USER_ERRORS.items(), ("evaluate.py", ["--model", "tiny", "--data", "data/sample/test.jsonl",
                                                     "--bertscore-model", "nope", "--out", "x"])]


@pytest.mark.parametrize("script, argv", HOME_ERRORS, ids=[f"{s}-{i}" for i, (s, _) in enumerate(HOME_ERRORS)])
@pytest.mark.parametrize("home", ["missing", "readonly", "under-a-file"])   # root writes in the first two anyway
def test_unwritable_home_user_error_is_one_line(tmp_path, script, argv, home):
    h = tmp_path / "home"
    if home == "readonly":
        h.mkdir()
        h.chmod(0o555)
    if home == "under-a-file":
        (tmp_path / "file").write_text("", encoding="utf-8")
        h = tmp_path / "file" / "home"
    p = popen(script, argv, HOME=h, XDG_CONFIG_HOME="", XDG_CACHE_HOME="")
    _, err = finish(p)
    if h.is_dir():
        h.chmod(0o755)
    assert p.returncode == 2, err[-2000:]
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:"), err[-2000:]


# --------------------------------------------------------------------------------------------- names from files

def test_escape_codes_in_a_tensor_name(tmp_path):
    import torch
    from safetensors.torch import save_file
    src = tmp_path / "src"
    p = popen("train.py", train_args(src, steps=1))
    _, err = finish(p)
    assert p.returncode == 0, err[-2000:]
    from safetensors.torch import load_file
    sd = load_file(str(src / "model.safetensors"))
    sd[EVIL] = torch.zeros(1)
    save_file(sd, str(src / "model.safetensors"))
    p = popen("train.py", ["--model", str(src)] + train_args(tmp_path / "o", steps=1)[2:])
    _, err = finish(p)
    assert p.returncode == 2
    assert err.count("\n") == 1 and "\x1b" not in err and "\r" not in err and "\\x1b[2K\\rok: done" in err, repr(err)


@pytest.mark.parametrize("name", [EVIL, "a\u202eb\x85c\x7f"])
def test_control_characters_in_a_column_name(tmp_path, name):
    f = tmp_path / "bad.csv"
    f.write_text(f'question,"{name}","{name}"\nq,a,b\n', encoding="utf-8", newline="")
    p = popen("train.py", train_args(tmp_path / "o", steps=1)[:2] + ["--data", str(f), "--out", str(tmp_path / "o")])
    _, err = finish(p)
    assert p.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("error:") and "given twice" in err, repr(err)
    assert not any(ch in err for ch in "\x1b\r\u202e\x85\x7f"), repr(err)


def test_annotate_piped_into_head_exits_0(tmp_path):
    """annotate.py | head -1: its work done, the flush at exit met the closed pipe and exited 120 (now 0)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import make_classifier
    import data
    clf = make_classifier(tmp_path / "clf", list(data.SEVERITIES))
    out = tmp_path / "out.jsonl"
    p = popen("annotate.py", ["--classifier", str(clf), "--out", str(out), "--device", "cpu",
                              os.path.join(ROOT, "data", "sample", "train.jsonl")])
    p.stdout.close()   # the reader is gone before annotate's stdout (a pipe: block-buffered) is flushed at exit
    _, err = finish(p)
    assert p.returncode == 0, err[-2000:]
    assert "Traceback" not in err and "BrokenPipe" not in err, err[-2000:]
    assert out.is_file()
