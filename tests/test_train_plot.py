"""train.py's picture of a run: <out>/train_log.png, drawn from train_log.jsonl at each eval and at the end."""
import json
import os
import signal
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402

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
