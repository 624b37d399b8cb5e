"""--report-to (tracking.py) on train.py and classify.py: TensorBoard event files under <out>/tensorboard/ with the
scalars of train_log.jsonl, read back with tensorboard's own reader; wandb through a fake module (init(config=...),
log()); a library that is not installed is one line, exit 2, before any work."""
import json
import os
import sys
import types

import pytest

import classify
import train
import tracking

pytestmark = pytest.mark.usefixtures("threads_and_signals")
SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample")


def run(main, argv):
    try:
        main(argv)
    except SystemExit as e:
        return e.code
    return 0


def tiny(out, *extra):
    return ["--model", "tiny", "--data", os.path.join(SAMPLE, "train.jsonl"), "--out", str(out), "--max-steps", "3",
            "--batch-size", "4", "--eval-every", "2", "--quiet", *extra]


def cls_argv(out, *extra):
    return ["--model", "tiny", "--data", os.path.join(SAMPLE, "severity_labels.jsonl"), "--out", str(out),
            "--epochs", "2", "--max-steps", "4", "--batch-size", "8", "--quiet", *extra]


def read_events(folder):
    """{tag: [(step, value), ...]} from the TensorBoard event files of a folder, by tensorboard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_tensorboard_has_the_scalars_of_the_log(tmp_path):
    out = tmp_path / "run"
    assert run(train.main, tiny(out, "--report-to", "tensorboard")) == 0
    log = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    ev = read_events(out / "tensorboard")
    for key in ("loss", "nll", "lr", "grad_norm", "tok_s", "eval_loss", "eval_loss_critical", "eval_loss_neutral",
                "eval_loss_non-critical"):
        want = [(r["step"], r[key]) for r in log if key in r]
        assert [s for s, _ in ev[key]] == [s for s, _ in want], key
        assert all(abs(v - w) <= 1e-6 * max(1, abs(w)) for (_, v), (_, w) in zip(ev[key], want)), key   # float32
    print("tensorboard read back:", {k: ev[k] for k in ("loss", "eval_loss_critical")})


def test_tensorboard_new_run_clears_old_events(tmp_path):
    out = tmp_path / "run"
    assert run(train.main, tiny(out, "--report-to", "tensorboard")) == 0
    assert run(train.main, tiny(out, "--report-to", "tensorboard", "--seed", "3")) == 0
    assert len(os.listdir(out / "tensorboard")) == 1
    assert run(train.main, tiny(out)) == 0   # a run without it removes the earlier run's events
    assert not (out / "tensorboard").exists()


def test_classify_tensorboard(tmp_path):
    out = tmp_path / "cls"
    assert run(classify.main, cls_argv(out, "--report-to", "tensorboard")) == 0
    ev = read_events(out / "tensorboard")
    metrics = json.loads((out / "metrics.json").read_text())
    assert [v for _, v in ev["train_loss"]] == pytest.approx([e["train_loss"] for e in metrics["epochs"]], rel=1e-6)


class FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logs, self.finished = [], [], 0

    def init(self, **kw):
        self.inits.append(kw)
        fake = self

        class Run:
            def log(self, vals, step=None):
                fake.logs.append((step, vals))

            def finish(self):
                fake.finished += 1
        return Run()


@pytest.mark.parametrize("script", ["train", "classify"])
def test_wandb_gets_config_and_scalars(script, tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    main, argv = (train.main, tiny(out, "--report-to", "wandb")) if script == "train" else \
        (classify.main, cls_argv(out, "--report-to", "wandb"))
    assert run(main, argv) == 0
    assert len(fake.inits) == 1 and fake.finished == 1
    config = fake.inits[0]["config"]
    assert config["report_to"] == "wandb" and config["out"] == str(out)
    if script == "train":
        assert config["weights_abc"] == (0.5, 1.0, 1.5) and "data_sha256" in config
        log = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
        assert [(s, v.get("loss", v.get("eval_loss"))) for s, v in fake.logs] == \
            [(r["step"], r.get("loss", r.get("eval_loss"))) for r in log]
    else:
        assert [v["train_loss"] for _, v in fake.logs] == [e["train_loss"] for e in
                                                          json.loads((out / "metrics.json").read_text())["epochs"]]


@pytest.mark.parametrize("script", ["train", "classify"])
@pytest.mark.parametrize("kind", ["wandb", "tensorboard"])
def test_missing_library_is_one_line_before_any_work(script, kind, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)   # None in sys.modules: import raises ImportError
    if kind == "tensorboard":
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    main, argv = (train.main, tiny(out, "--report-to", kind)) if script == "train" else \
        (classify.main, cls_argv(out, "--report-to", kind))
    capsys.readouterr()
    assert run(main, argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == [f"error: --report-to: {kind} is not installed: {tracking.INSTALL[kind]}, or leave out --report-to"]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("script", [train, classify])
def test_report_to_has_help(script, capsys):
    with pytest.raises(SystemExit):
        script.get_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--report-to {none,tensorboard,wandb}" in text and "pip install tensorboard" in text


def test_wandb_init_failure_is_one_line(tmp_path, monkeypatch, capsys):
    fake = FakeWandb()

    def init(**kw):
        raise RuntimeError("api key not configured\nmore text")
    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    capsys.readouterr()
    assert run(train.main, tiny(tmp_path / "run", "--report-to", "wandb")) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == ["error: --report-to: wandb.init failed: api key not configured (wandb login, or "
                   "WANDB_MODE=offline)"]
