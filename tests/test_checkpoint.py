"""checkpoint.py: the picture of a run (train_log.png), what a run saves and when (by steps, by time, never a
non-finite update), resume refusals, a cut log line, a corrupt resume state, the umask of the saved files."""
import json
import math
import os
import shutil
import signal

import pytest
import torch

import checkpoint
import cli
import data
import train

from conftest import assert_contract, call, snapshot

pytestmark = pytest.mark.usefixtures("threads_and_signals")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SEV = data.SEVERITIES


def test_plot_draws_exactly_the_log(tmp_path):
    recs = [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3 * s / 4} for s in range(1, 5)]
    recs.insert(2, {"step": 2, "eval_loss": 2.5, **{f"eval_loss_{s}": 2.0 + i for i, s in enumerate(SEV)}})
    recs.append({"step": 4, "eval_loss": 2.25, f"eval_loss_{SEV[0]}": 1.5})   # a class missing from this eval
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    fig = checkpoint.plot_log(log, tmp_path / "train_log.png")
    ax, ax_lr = fig.axes
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}
    assert lines["train (weighted)"] == ([1, 2, 3, 4], [2.9, 2.8, 2.7, 2.6])
    assert lines["eval, all"] == ([2, 4], [2.5, 2.25])
    assert lines[f"eval, {SEV[0]}"] == ([2, 4], [2.0, 1.5])
    assert lines[f"eval, {SEV[2]}"] == ([2], [4.0])
    (lr_line,) = ax_lr.get_lines()
    assert list(lr_line.get_ydata()) == [1e-3 * s / 4 for s in range(1, 5)]
    png = (tmp_path / "train_log.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    img = matplotlib.image.imread(tmp_path / "train_log.png")
    assert img.shape[:2] == (600, 800) and img[..., :3].std() > 0.05      # 8 x 6 in at 100 dpi, not blank
    assert sorted(os.listdir(tmp_path)) == ["train_log.jsonl", "train_log.png"]   # no temp file left


def test_training_writes_the_picture_at_each_eval_and_at_the_end(tmp_path, monkeypatch):
    calls = []
    real = checkpoint.plot_log

    def spy(log_path, png_path):
        with open(log_path) as f:
            calls.append(sum(1 for ln in f if "eval_loss" in ln))
        return real(log_path, png_path)
    monkeypatch.setattr(checkpoint, "plot_log", spy)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sample = os.path.join(ROOT, "data", "sample")
        tr, te = tmp_path / "train.jsonl", tmp_path / "test.jsonl"   # a few rows: fast
        tr.write_text("".join(open(os.path.join(sample, "train.jsonl"), encoding="utf-8").readlines()[:8]), "utf-8")
        te.write_text("".join(open(os.path.join(sample, "test.jsonl"), encoding="utf-8").readlines()[:3]), "utf-8")
        train.main(["--model", "tiny", "--data", str(tr), "--eval-data", str(te), "--max-steps", "4",
                    "--eval-every", "2", "--batch-size", "2", "--max-len", "48", "--quiet", "--out", str(tmp_path / "run")])
    finally:
        torch.set_num_threads(n)
        for s, h in handlers.items():
            signal.signal(s, h)
    assert calls == [1, 2, 2]          # after the evals at steps 2 and 4, then at the end
    assert (tmp_path / "run" / "train_log.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def env(errors_env):
    """conftest.errors_env: a tiny decoder folder, 8 training records, 4 test records, a scorer."""
    return errors_env


# ----------------------------------------------------------------------------------------------- training faults

def read_log(out):
    with open(os.path.join(str(out), "train_log.jsonl"), encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def state_step(out):
    return train.read_state_meta(os.path.join(str(out), "state.safetensors"))["step"]


def weights(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(str(folder), "model.safetensors"))


def run_train(env, out, *extra, steps=2):
    return call("train", ["--model", env["model"], "--data", env["train"], "--eval-data", "none", "--quiet",
                          "--out", str(out), "--batch-size", "4", "--max-steps", str(steps), *extra])


def test_divergence_without_a_checkpoint_says_none_was_saved(env, tmp_path):
    out = tmp_path / "out"
    code, err = run_train(env, out, "--lr", "1e30", "--grad-clip", "0", "--save-every", "0", "--save-minutes", "0",
                          steps=50)
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "non-finite" in lines[0], err
    assert "no checkpoint was saved" in lines[0], lines[0]
    assert not (out / "model.safetensors").exists() and not (out / "state.safetensors").exists()


def test_divergence_keeps_the_named_checkpoint_finite(env, tmp_path):
    """--lr 1e30: the update that makes the loss non-finite is skipped; the message names the checkpoint that
    remains and its step; that checkpoint and the resume state hold only finite numbers."""
    out = tmp_path / "out"
    code, err = run_train(env, out, "--lr", "1e30", "--grad-clip", "0", "--save-every", "1", steps=50)
    assert code == 1, err
    k = state_step(out)
    assert f"at step {k}" in err and "state.safetensors" in err, err
    assert [r["step"] for r in read_log(out)] == list(range(1, k + 1))
    assert all(torch.isfinite(v).all() for v in weights(out).values())
    from safetensors.torch import load_file
    st = load_file(str(out / "state.safetensors"))
    assert all(torch.isfinite(v).all() for k_, v in st.items() if v.is_floating_point())


def test_non_finite_gradient_is_never_applied(env, tmp_path, monkeypatch):
    """A finite loss with a NaN gradient (step 2): the weights stay those of step 1 and the run stops, status 1."""
    out = tmp_path / "out"
    orig, calls = torch.nn.utils.clip_grad_norm_, {"n": 0}

    def poisoned(parameters, max_norm, *a, **k):
        ps = list(parameters)
        calls["n"] += 1
        if calls["n"] == 2:
            ps[0].grad.fill_(float("nan"))
        return orig(ps, max_norm, *a, **k)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoned)
    code, err = run_train(env, out, "--lr", "1e-2", "--save-every", "1", steps=5)
    assert code == 1 and "gradient norm" in err and "at step 1" in err, err
    assert state_step(out) == 1


def test_resume_refuses_a_changed_experiment(env, tmp_path):
    out = tmp_path / "out"
    assert run_train(env, out, "--save-every", "1", "--lr", "1e-3")[0] == 0
    before = snapshot(out)
    changed_data = tmp_path / "d2"
    changed_data.mkdir()
    shutil.copy(env["train"], changed_data / "train.jsonl")
    with open(changed_data / "train.jsonl", "a", encoding="utf-8") as f:   # same path name, other content
        f.write(env["good"] + "\n")
    for flags, needle in ((["--weights", "ce"], "--weights"), (["--lr", "2e-3"], "--lr"), (["--seed", "1"], "--seed"),
                          (["--batch-size", "2"], "--batch-size"), (["--loss-tokens", "all"], "--loss-tokens"),
                          (["--schedule", "cosine"], "--schedule"), (["--weight-decay", "0.1"], "--weight-decay"),
                          (["--max-len", "100"], "--max-len"), (["--lora-rank", "2"], "--lora-rank")):
        code, err = run_train(env, out, "--save-every", "1", "--lr", "1e-3", "--resume", *flags, steps=4)
        assert_contract(code, err, "--resume", needle)
        assert snapshot(out) == before, flags
    code, err = call("train", ["--model", env["model"], "--data", str(changed_data / "train.jsonl"), "--eval-data",
                               "none", "--quiet", "--out", str(out), "--batch-size", "4", "--max-steps", "4",
                               "--lr", "1e-3", "--resume"])
    assert_contract(code, err, "--data")
    assert snapshot(out) == before
    code, err = run_train(env, out, "--save-every", "1", "--lr", "1e-3", "--resume", steps=1)   # fewer steps
    assert_contract(code, err, "--resume", "step 2")
    assert snapshot(out) == before
    # more steps is not a change of experiment
    assert run_train(env, out, "--save-every", "1", "--lr", "1e-3", "--resume", steps=3)[0] == 0
    assert state_step(out) == 3


def test_resume_recovers_a_cut_log_line_and_refuses_a_corrupt_state(env, tmp_path):
    out = tmp_path / "out"
    assert run_train(env, out, "--save-every", "1", "--lr", "1e-3", steps=2)[0] == 0
    with open(out / "train_log.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 3, "epoch": 0, "lo')          # what a kill -9 in the middle of a write leaves
    code, err = run_train(env, out, "--save-every", "1", "--lr", "1e-3", "--resume", steps=3)
    assert code == 0, err
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]
    st = out / "state.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    before = snapshot(out)
    code, err = run_train(env, out, "--save-every", "1", "--lr", "1e-3", "--resume", steps=4)
    assert_contract(code, err, "state.safetensors")
    assert snapshot(out) == before


def test_lr_0_is_a_dry_run(env, tmp_path):
    """--lr 0 is accepted: the loss is measured, the weights do not move."""
    out = tmp_path / "out"
    code, err = run_train(env, out, "--lr", "0", steps=2)
    assert code == 0, err
    assert all(math.isfinite(r["loss"]) for r in read_log(out))
    a, b = weights(env["model"]), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_outputs_follow_the_umask(env, tmp_path):
    """Files written atomically get 0666 minus the umask (mkstemp alone would leave them 0600)."""
    old = os.umask(0o027)
    try:
        out = tmp_path / "out"
        assert run_train(env, out, "--lr", "1e-3", steps=1)[0] == 0
        prep = tmp_path / "prep"
        assert call("prepare", ["--input", env["train"], "--out", str(prep), "--n-train", "4", "--n-test", "2"])[0] == 0
    finally:
        os.umask(old)
    files = ["model.safetensors", "config.json", "tokenizer.json", "state.safetensors", "args.json"]
    for f in [out / f for f in files] + [prep / "train.jsonl", prep / "manifest.json"]:
        assert oct(os.stat(f).st_mode & 0o777) == oct(0o640), f


def test_an_update_that_overflows_the_weights_is_never_saved(env, tmp_path):
    """Finite loss and gradient, yet AdamW's decoupled decay (lr x weight decay = 1e40) sends the weights past the
    float range in step 1: the checkpoint due at step 1 is not written, and the message says none was saved."""
    out = tmp_path / "out"
    code, err = run_train(env, out, "--lr", "1e30", "--weight-decay", "1e10", "--save-every", "1", steps=3)
    assert code == 1, err
    assert "non-finite" in err and "no checkpoint was saved" in err, err
    assert not (out / "model.safetensors").exists() and not (out / "state.safetensors").exists()


@pytest.mark.parametrize("flags,saved", [(["--save-every", "0", "--save-minutes", "1e-9"], [1, 2, 3]),
                                         (["--save-every", "2", "--save-minutes", "0"], [2, 3]),
                                         (["--save-every", "0", "--save-minutes", "0"], [3])])
def test_checkpoints_by_time_and_by_steps(env, tmp_path, monkeypatch, flags, saved):
    """--save-minutes saves when that much time has passed since the last checkpoint (here: every step),
    --save-every every N steps; the end of the run always saves."""
    steps, orig = [], train.save_checkpoint

    def spy(out, raw_model, opt, scaler, step, *a):
        steps.append(step)
        return orig(out, raw_model, opt, scaler, step, *a)
    monkeypatch.setattr(train, "save_checkpoint", spy)
    assert run_train(env, tmp_path / "out", "--lr", "1e-3", *flags, steps=3)[0] == 0
    assert steps == saved


def test_checkpoints_are_on_by_default():
    a = train.get_args([])
    assert a.save_every > 0 and 0 < a.save_minutes <= 60


# Every setting a resume must keep (issue 18), written out here and not read from train.RESUME_KEYS, so that a key
# dropped from there fails its row. Each row: the key, the saved value, a different value given on resume.
RESUME_CHANGES = [
    ("model", "tiny", "qwen2.5-0.5b"), ("weights_abc", [0.5, 1, 1.5], [1, 1, 1]), ("data_sha256", "aa", "bb"),
    ("loss_tokens", "answer", "all"), ("loss_norm", "example", "token"), ("seed", 0, 1), ("batch_size", 8, 4),
    ("grad_accum", 1, 2), ("world_size", 1, 2), ("max_len", 512, 256), ("schedule", "linear", "cosine"),
    ("warmup", 0, 10), ("lr", 5e-5, 1e-4), ("weight_decay", 0.01, 0.0), ("grad_clip", 1.0, 0.5),
    ("lora_rank", 16, 8), ("lora_alpha", 32, 16), ("lora_dropout", 0.05, 0.1),
    ("lora_targets", ["q_proj", "v_proj"], ["q_proj"]), ("dtype", "bf16", "fp16"), ("quantize", "none", "nf4"),
    ("question_col", None, "Post"), ("answer_col", None, "Reply"), ("preprocess", "none", "arabert"),
    ("severity_source", "probs", "label"),
]


@pytest.mark.parametrize("key, saved, given", RESUME_CHANGES, ids=[r[0] for r in RESUME_CHANGES])
def test_check_resume_refuses_each_changed_key(key, saved, given):
    base = {k: v for k, v, _ in RESUME_CHANGES}
    train.check_resume("out/state.safetensors", {"args": dict(base)}, dict(base))      # unchanged: accepted
    with pytest.raises(cli.UserError) as e:
        train.check_resume("out/state.safetensors", {"args": dict(base)}, {**base, key: given})
    msg = str(e.value)
    assert str(given) in msg or isinstance(given, list)
    assert "delete" not in msg and "must not change the experiment" in msg, "an intact checkpoint is not broken"


# -- the pictures: table.png and train_log.png ---------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n"


def test_train_log_png_titled_with_model_and_weights(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "loss": 3.0, "lr": 1e-3}, {"step": 2, "loss": 2.5, "lr": 5e-4},
        {"step": 2, "eval_loss": 2.7, "eval_loss_critical": 2.9}]))
    args = {"model": "qwen2.5-0.5b", "weights": "strong", "weights_abc": [1.0, 1.0, 3.0], "severity_source": "probs",
            "lora_rank": 16}
    title = checkpoint.plot_title(args)
    assert title == "qwen2.5-0.5b | weights a,b,c = 1,1,3 (strong, soft p) | LoRA r 16"
    assert "label one-hot" in checkpoint.plot_title(dict(args, severity_source="label", lora_rank=0))
    fig = checkpoint.plot_log(str(log), str(tmp_path / "train_log.png"), title)
    assert fig._suptitle is not None and fig._suptitle.get_text() == title
    assert (tmp_path / "train_log.png").read_bytes().startswith(PNG)


@pytest.mark.usefixtures("threads_and_signals")
def test_train_run_titles_its_plot(tmp_path, monkeypatch):
    """train.py's plot takes its title from the run's args.json (written with the checkpoint, before the plot)."""
    import train
    seen = []
    real = checkpoint.plot_log
    monkeypatch.setattr(checkpoint, "plot_log", lambda log, png: seen.append(real(log, png)._suptitle.get_text()))
    out = tmp_path / "run"
    sample = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample")
    try:
        train.main(["--model", "tiny", "--data", os.path.join(sample, "train.jsonl"), "--out", str(out),
                    "--max-steps", "1", "--batch-size", "4", "--weights", "mild", "--quiet"])
    except SystemExit as e:
        assert e.code == 0
    assert seen and all(t.startswith("tiny | weights a,b,c = ") and "(mild, soft p)" in t for t in seen)
    assert (out / "train_log.png").read_bytes().startswith(PNG)
