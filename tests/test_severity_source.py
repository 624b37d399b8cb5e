"""--severity-source label (train.py): the ablation of one-hot weights from the severity label (w = a, b or c)
beside the paper's soft probabilities; recorded in args.json, refused on --resume when it changes; label-only data
without it is refused with both hints (annotate.py, or this flag)."""
import json
import os

import pytest

import data
import train

pytestmark = pytest.mark.usefixtures("threads_and_signals")
SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample")


def run(argv):
    try:
        train.main(argv)
    except SystemExit as e:
        return e.code
    return 0


def tiny(out, data_file, *extra):
    return ["--model", "tiny", "--data", str(data_file), "--eval-data", "none", "--out", str(out), "--max-steps", "2",
            "--batch-size", "4", "--weights", "0.5,1,2", "--quiet", *extra]


@pytest.fixture()
def files(tmp_path):
    recs = data.load_records(os.path.join(SAMPLE, "train.jsonl"))[:24]
    soft = tmp_path / "soft.jsonl"
    labels = tmp_path / "labels.jsonl"
    soft.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    labels.write_text("".join(json.dumps({k: r[k] for k in ("question", "answer", "severity")}, ensure_ascii=False)
                              + "\n" for r in recs), encoding="utf-8")
    return recs, soft, labels


def test_label_weights_are_one_hot(files):
    recs, soft, labels = files
    abc = (0.5, 1.0, 2.0)
    by_label = train.load_records(str(soft), "label")
    assert [data.severity_weight(r, abc) for r in by_label] == [abc[data.SEVERITIES.index(r["severity"])] for r in recs]
    assert train.load_records(str(labels), "label") == by_label          # label-only data: the same weights
    soft_w = [data.severity_weight(r, abc) for r in train.load_records(str(soft), "probs")]
    assert soft_w == [data.severity_weight(r, abc) for r in recs] and soft_w != [data.severity_weight(r, abc)
                                                                                 for r in by_label]


def test_label_only_data_refused_without_the_flag(files, tmp_path, capsys):
    _, _, labels = files
    out = tmp_path / "out"
    capsys.readouterr()
    assert run(tiny(out, labels)) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: {labels}:1: p_nc: missing field")
    assert "annotate.py adds them" in err[0] and "--severity-source label" in err[0]
    assert not out.exists() or not any(out.iterdir())
    assert run(tiny(out, labels, "--severity-source", "label")) == 0
    args = json.loads((out / "args.json").read_text())
    assert args["severity_source"] == "label"
    assert "| severity source | label |" in (out / "README.md").read_text()


def test_the_loss_sees_the_label_weights(files, tmp_path):
    """--lr 0 over the same examples: the weighted loss differs between the two sources, the NLL does not."""
    _, soft, _ = files
    logs = {}
    for src in ("probs", "label"):
        out = tmp_path / src
        assert run(tiny(out, soft, "--severity-source", src, "--lr", "0")) == 0
        logs[src] = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["nll"] for r in logs["probs"]] == pytest.approx([r["nll"] for r in logs["label"]], rel=1e-6)
    assert all(abs(a["loss"] - b["loss"]) > 1e-4 for a, b in zip(logs["probs"], logs["label"]))


def test_resume_refuses_a_changed_source(files, tmp_path, capsys):
    _, soft, _ = files
    out = tmp_path / "out"
    assert run(tiny(out, soft, "--severity-source", "label")) == 0
    capsys.readouterr()
    assert run(tiny(out, soft, "--resume", "--max-steps", "3")) == 2
    err = capsys.readouterr().err
    assert "--severity-source is probs but the run saved in" in err and "used label" in err
    assert run(tiny(out, soft, "--resume", "--severity-source", "label", "--max-steps", "3")) == 0
