"""annotate.py: six-field records, resumable chunked output, label maps, bad input."""
import csv
import json
import os

import numpy as np
import pytest

import annotate
import bert
import data

from conftest import make_classifier

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SAMPLE_QA = os.path.join(ROOT, "data", "sample", "test.jsonl")


@pytest.fixture(scope="module")
def clf(tmp_path_factory, one_thread):
    return make_classifier(tmp_path_factory.mktemp("clf") / "c", list(data.SEVERITIES))


@pytest.fixture(scope="module")
def qa_csv(tmp_path_factory):
    """A raw CSV with Question/Answer columns (aliases) and an extra column, from the sample."""
    recs = data.load_records(SAMPLE_QA)
    path = tmp_path_factory.mktemp("qa") / "raw.csv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "Question", "Answer"])
        for i, r in enumerate((recs * 3)[:45]):
            w.writerow([i, r["question"], r["answer"]])
    return str(path)


def run(*args):
    return annotate.main([str(a) for a in args] + ["--device", "cpu"])


def test_records_are_valid_and_in_order(tmp_path, clf, capsys):
    out = tmp_path / "a.jsonl"
    counts = run(SAMPLE_QA, "--classifier", clf, "--out", out, "--batch-size", 5, "--chunk-size", 16)
    recs = data.load_records(str(out))
    src = data.load_records(SAMPLE_QA)
    assert [(r["question"], r["answer"]) for r in recs] == [(r["question"], r["answer"]) for r in src]
    assert all(list(r) == ["question", "answer", "severity", "p_nc", "p_n", "p_c"] for r in
               map(json.loads, open(out, encoding="utf-8")))
    p = np.array([[r["p_nc"], r["p_n"], r["p_c"]] for r in recs])
    assert np.abs(p.sum(1) - 1).max() < 1e-5
    assert [r["severity"] for r in recs] == [data.SEVERITIES[i] for i in p.argmax(1)]
    assert sum(counts.values()) == len(recs) and len(set(r["severity"] for r in recs)) >= 2
    # the same numbers as the classifier's own predict_proba on the questions
    model, tok, labels = bert.load_classifier(clf)
    want = bert.predict_proba(model, tok, [r["question"] for r in src], 64, 96)
    assert np.abs(want - p).max() < 1e-5
    assert "severity distribution" in capsys.readouterr().out
    assert not os.path.exists(str(out) + ".partial") and not os.path.exists(str(out) + ".partial.json")


def test_interrupted_then_resumed_is_byte_identical(tmp_path, clf, qa_csv, capsys):
    full = tmp_path / "full.jsonl"
    run(qa_csv, "--classifier", clf, "--out", full, "--chunk-size", 7, "--batch-size", 3)
    out = tmp_path / "resumed.jsonl"
    cmd = [qa_csv, "--classifier", clf, "--out", out, "--chunk-size", 7, "--batch-size", 3]
    assert run(*cmd, "--stop-after", 2) is None
    partial, sidecar = str(out) + ".partial", str(out) + ".partial.json"
    assert not out.exists() and os.path.exists(partial)
    state = json.load(open(sidecar))
    assert state["rows_done"] == 14 and os.path.getsize(partial) == state["bytes"]
    assert len(open(partial, encoding="utf-8").readlines()) == 14
    run(*cmd, "--stop-after", 1)                 # one more chunk
    assert json.load(open(sidecar))["rows_done"] == 21
    with open(partial, "ab") as fh:              # a crash in the middle of writing the next chunk
        fh.write('{"question": "نصف سطر'.encode("utf-8"))
    run(*cmd)
    assert out.read_bytes() == full.read_bytes()
    assert len(out.read_text(encoding="utf-8").splitlines()) == 45
    assert not os.path.exists(partial) and not os.path.exists(sidecar)
    assert "resuming" in capsys.readouterr().err
    # a partial file from different settings is not reused
    run(*cmd, "--stop-after", 1)
    run(qa_csv, "--classifier", clf, "--out", out, "--chunk-size", 5, "--batch-size", 3)
    assert "different run" in capsys.readouterr().err
    assert [json.loads(l)["question"] for l in open(out, encoding="utf-8")] == \
        [json.loads(l)["question"] for l in open(full, encoding="utf-8")]


def test_label_maps(tmp_path, qa_csv):
    ref = tmp_path / "ref.jsonl"
    run(qa_csv, "--classifier", make_classifier(tmp_path / "en", list(data.SEVERITIES), seed=1), "--out", ref)
    base = [json.loads(l) for l in open(ref, encoding="utf-8")]
    # the same weights with the classes renamed and reordered: auto map (Arabic, mild/moderate/severe)
    for names in (["حرج", "متوسط", "غير حرج"], ["severe", "moderate", "mild"]):
        folder = make_classifier(tmp_path / names[0], list(data.SEVERITIES), seed=1)
        from safetensors.torch import load_file, save_file
        f = os.path.join(folder, "model.safetensors")
        sd = load_file(f)
        sd["classifier.weight"] = sd["classifier.weight"].flip(0).contiguous()
        sd["classifier.bias"] = sd["classifier.bias"].flip(0).contiguous()
        save_file(sd, f, metadata={"format": "pt"})
        cfg = json.load(open(os.path.join(folder, "config.json"), encoding="utf-8"))
        cfg["id2label"] = {str(i): n for i, n in enumerate(names)}
        cfg["label2id"] = {n: i for i, n in enumerate(names)}
        json.dump(cfg, open(os.path.join(folder, "config.json"), "w", encoding="utf-8"), ensure_ascii=False)
        out = tmp_path / f"{len(names[0])}.jsonl"
        run(qa_csv, "--classifier", folder, "--out", out)
        assert [json.loads(l) for l in open(out, encoding="utf-8")] == base
        preset = "arabic" if names[0] == "حرج" else "mild-moderate-severe"
        run(qa_csv, "--classifier", folder, "--out", out, "--label-map", preset)
        assert [json.loads(l) for l in open(out, encoding="utf-8")] == base
    # explicit src=dst map
    folder = make_classifier(tmp_path / "abc", ["a", "b", "c"], seed=1)
    out = tmp_path / "abc.jsonl"
    run(qa_csv, "--classifier", folder, "--out", out, "--label-map", "a=non-critical,b=neutral,c=critical")
    assert [json.loads(l) for l in open(out, encoding="utf-8")] == base
    # several classes onto one severity: probabilities add up
    out2 = tmp_path / "abc2.jsonl"
    run(qa_csv, "--classifier", folder, "--out", out2, "--label-map", "a=non-critical,b=critical,c=critical")
    for r, b in zip(map(json.loads, open(out2, encoding="utf-8")), base):
        assert r["p_n"] == 0 and abs(r["p_c"] - (b["p_n"] + b["p_c"])) < 2e-6
    # unmapped class -> exit 2, nothing written
    with pytest.raises(SystemExit) as e:
        run(qa_csv, "--classifier", folder, "--out", tmp_path / "no.jsonl")
    assert e.value.code == 2 and not (tmp_path / "no.jsonl").exists()


def test_label_matrix():
    M = annotate.label_matrix("x=critical, y=mild ,z=neutral", ["x", "y", "z"])
    assert M.tolist() == [[0, 0, 1], [1, 0, 0], [0, 1, 0]]
    for bad in ("x=critical", "x=urgent,y=neutral,z=neutral", "w=critical,x=critical,y=neutral,z=neutral", "x"):
        with pytest.raises(ValueError, match="--label-map"):
            annotate.label_matrix(bad, ["x", "y", "z"])


def test_bad_input_exits_2(tmp_path, clf, capsys):
    f = tmp_path / "bad.csv"
    f.write_text("Question,reply\nما هذا؟,لا شيء\n", encoding="utf-8")
    out = tmp_path / "o.jsonl"
    for content, needle in (("Question,reply\nما هذا؟,لا شيء\n", f"{f}:2: answer: missing field"),
                            ("question,answer\nما هذا؟,\n", f"{f}:2: answer: empty"),
                            ("", f"{f}:1: file:")):
        f.write_text(content, encoding="utf-8")
        with pytest.raises(SystemExit) as e:
            run(f, "--classifier", clf, "--out", out)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
        assert not out.exists() and not os.path.exists(str(out) + ".partial")
    with pytest.raises(SystemExit) as e:
        run(SAMPLE_QA, "--classifier", tmp_path / "nowhere", "--out", out)
    assert e.value.code == 2 and not out.exists()
