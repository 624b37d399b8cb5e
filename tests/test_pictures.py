"""The pictures: report.py table's table.png (a dot plot with intervals, significance marks drawn, one legend) and
train.py's train_log.png (titled with the run's model and weights)."""
import json
import os

import matplotlib.container
import pytest

import checkpoint
import report

PNG = b"\x89PNG\r\n\x1a\n"


def cells_and_marks():
    rows, cols = ["aragpt2-base", "qwen2.5-0.5b"], ["CE", "Mild", "Balanced"]
    cells = {}
    for k, g in enumerate(("overall", "non-critical", "neutral", "critical")):
        cells[g] = {(r, c): {"mean": 60 + i + 2 * j + k, "lo": 58 + i + 2 * j + k, "hi": 63 + i + 2 * j + k, "n": 9}
                    for i, r in enumerate(rows) for j, c in enumerate(cols)}
    marks = {("overall", "aragpt2-base", "Balanced"): 0.01, ("critical", "qwen2.5-0.5b", "Mild"): 0.03,
             ("neutral", "aragpt2-base", "Mild"): 0.4}
    return rows, cols, cells, marks


def test_table_png_dots_intervals_marks_one_legend(tmp_path):
    rows, cols, cells, marks = cells_and_marks()
    path = tmp_path / "table.png"
    fig = report.save_plot(str(path), "f1", rows, cols, cells, marks)
    assert path.read_bytes().startswith(PNG)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["all answers", "non-critical", "neutral", "critical"]
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in axes)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == cols
    assert "p < 0.05" in fig.legends[0].get_title().get_text()
    for ax in axes:   # no bars: dots with whiskers, one errorbar series per setting; every whisker inside the axis
        assert not ax.patches
        assert all(isinstance(c, matplotlib.container.ErrorbarContainer) for c in ax.containers)
        assert len(ax.containers) == len(cols)
        lo, hi = ax.get_ylim()
        g = {"all answers": "overall"}.get(ax.get_title(), ax.get_title())
        assert lo <= min(d["lo"] for d in cells[g].values()) and hi >= max(d["hi"] for d in cells[g].values())
    stars = [(ax.get_title(), t.xy) for ax in axes for t in ax.texts if t.get_text() == "*"]
    assert len(stars) == 2   # p 0.01 and 0.03; 0.4 gets none
    (t1, (x1, y1)), (t2, (_, y2)) = sorted(stars)
    assert (t1, t2) == ("all answers", "critical")
    assert y1 == cells["overall"][("aragpt2-base", "Balanced")]["hi"]   # above its whisker
    assert y2 == cells["critical"][("qwen2.5-0.5b", "Mild")]["hi"]


def test_table_png_without_marks_has_no_note(tmp_path):
    rows, cols, cells, _ = cells_and_marks()
    fig = report.save_plot(str(tmp_path / "t.png"), "nll", rows, cols, cells)
    assert len(fig.legends) == 1 and fig.legends[0].get_title().get_text() == ""
    assert not [t for ax in fig.axes for t in ax.texts]


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
