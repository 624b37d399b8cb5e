"""--preprocess arabert on train.py, evaluate.py, classify.py and annotate.py (issue 24 item 4), and the references'
normalisation recorded in eval.json (item 5): one implementation (data.preprocess), applied to what a model reads,
never to the references BERTScore compares with; recorded, and refused on --resume / compare when it changes."""
import json
import os

import pytest

import annotate
import classify
import data
import evaluate as E
import outputs
import report
import train
from data import prepare

pytestmark = pytest.mark.usefixtures("threads_and_signals")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "data", "sample")
SCORER = ["--bertscore-model", os.path.join(SAMPLE, "scorer"), "--bertscore-layer", "2"]
# a text the AraBERT preprocessing changes (tashkeel, tatweel, Arabic-Indic digits, spacing around punctuation)
RAW = "عِنْدِي ألـــم منذ ٣ أيام،هل هو خطير؟"


def test_preprocess_is_arabert_preprocess_and_none_is_identity():
    assert data.preprocess(RAW, "arabert") == data.arabert_preprocess(RAW) != RAW
    assert data.preprocess(RAW, "none") == RAW
    recs = [{"question": RAW, "answer": RAW, "severity": "critical"}]
    out = data.preprocess_records(recs, "arabert")
    assert out[0]["question"] == out[0]["answer"] == data.arabert_preprocess(RAW) and recs[0]["question"] == RAW
    assert data.preprocess_records(recs, "none") is recs


def test_train_reads_preprocessed_text_and_records_it(tmp_path, monkeypatch):
    seen = []
    real = train.encode

    def spy(records, *a, **k):
        seen.append([r["question"] for r in records])
        return real(records, *a, **k)
    monkeypatch.setattr(train, "encode", spy)
    out = tmp_path / "run"
    train.main(["--model", "tiny", "--max-steps", "1", "--out", str(out), "--preprocess", "arabert", "--quiet",
                "--device", "cpu"])
    raw = [r["question"] for r in data.load_records(os.path.join(SAMPLE, "train.jsonl"))]
    assert seen[0] == [data.arabert_preprocess(q) for q in raw] and seen[0] != raw
    assert json.loads((out / "args.json").read_text(encoding="utf-8"))["preprocess"] == "arabert"
    with pytest.raises(SystemExit) as e:   # a resume that changes what the model reads changes the experiment
        train.main(["--model", "tiny", "--max-steps", "2", "--out", str(out), "--resume", "--quiet", "--device", "cpu"])
    assert e.value.code == 2


def test_evaluate_preprocesses_prompts_not_references(tmp_path, monkeypatch):
    prompts = []
    real = E.generate_answers

    def spy(model, tok, questions, *a, **k):
        prompts.extend(questions)
        return real(model, tok, questions, *a, **k)
    monkeypatch.setattr(E, "generate_answers", spy)
    test = os.path.join(SAMPLE, "test.jsonl")
    res = E.main(["--model", "tiny", "--data", test, "--n", "3", "--greedy", "--max-new-tokens", "3", "--quiet",
                  "--bootstrap", "0", "--out", str(tmp_path / "e"), "--preprocess", "arabert", *SCORER])
    recs = data.load_records(test)[:3]
    assert prompts == [data.arabert_preprocess(r["question"]) for r in recs]
    rows = [json.loads(x) for x in (tmp_path / "e" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["reference"] for r in rows] == [r["answer"] for r in recs]          # the doctors' text as written
    assert res["generation"]["preprocess"] == "arabert"


def test_evaluate_takes_the_training_runs_preprocess(tmp_path):
    run = tmp_path / "run"
    train.main(["--model", "tiny", "--max-steps", "1", "--out", str(run), "--preprocess", "arabert", "--quiet",
                "--device", "cpu"])
    res = E.main(["--model", str(run), "--data", os.path.join(SAMPLE, "test.jsonl"), "--n", "2", "--greedy",
                  "--max-new-tokens", "2", "--quiet", "--bootstrap", "0", "--out", str(tmp_path / "e"), *SCORER])
    assert res["generation"]["preprocess"] == "arabert"


def eval_folder(folder, preprocess, references="raw"):
    """A minimal eval folder that report.py compare reads: eval.json + predictions.jsonl of two records."""
    os.makedirs(folder)
    rows = [{"index": i, "severity": "critical", "question": "س", "reference": "ج", "prediction": "ج",
             "precision": 50.0, "recall": 50.0, "f1": 50.0 + i, "nll": 1.0, "nll_tokens": 3} for i in range(2)]
    outputs.write_jsonl(os.path.join(folder, "predictions.jsonl"), rows)
    cell = {"overall": {"mean": 50.0, "lo": None, "hi": None, "n": 2}}
    gen = {"mode": "greedy", "temperature": 0, "max_new_tokens": 3, "prompt": "p", "postprocess": "x", "repeat": 1}
    if preprocess is not None:
        gen["preprocess"] = preprocess
    ev = {"setting": "CE", "model": {"name": "m"}, "scores": {m: cell for m in ("precision", "recall", "f1")},
          "nll": cell, "data": {"sha256": "s", "n": 2, "references": references},
          "bertscore": {"model": "b", "layer": 2}, "generation": gen, "argv": {"max_len": 512},
          "predictions_sha256": outputs.sha256(os.path.join(folder, "predictions.jsonl"))}
    outputs.write_json(os.path.join(folder, "eval.json"), ev)
    return str(folder)


@pytest.mark.parametrize("a, b, needle", [
    (("none", "raw"), ("arabert", "raw"), "protocol preprocess"),
    (("none", "raw"), ("none", "orthographic"), "references"),
    ((None, "raw"), ("none", "raw"), None),            # an eval.json from before the key: it ran none
    (("none", None), ("none", "raw"), None),           # references unknown on one side: the data hash decides
])
def test_compare_refuses_runs_that_read_or_score_differently(tmp_path, capsys, a, b, needle):
    fa, fb = eval_folder(tmp_path / "a", *a), eval_folder(tmp_path / "b", *b)
    argv = ["compare", fa, fb, "--out", str(tmp_path / "c"), "--bootstrap", "0"]
    if needle is None:
        assert report.main(argv)["diff"]
        return
    with pytest.raises(SystemExit) as e:
        report.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and err.count("\n") == 1, err


def test_references_are_recorded_from_prepare_manifest(tmp_path):
    src = tmp_path / "qa.csv"
    src.write_text("question,answer\n" + "".join(f"سؤال رقم {i} عن الصُّداع؟,إجابة الطبيب رقم {i}\n" for i in range(6)),
                   encoding="utf-8")
    for how in ("none", "all"):
        out = tmp_path / how
        prepare.main(["--data", str(src), "--out", str(out), "--n-train", "3", "--n-test", "3", "--normalize",
                      "--normalize-answers", how])
        assert data.references_of(str(out / "test.jsonl")) == ("raw" if how == "none" else "orthographic")
    copy = tmp_path / "elsewhere" / "test.jsonl"
    copy.parent.mkdir()
    copy.write_bytes((tmp_path / "none" / "test.jsonl").read_bytes())
    assert data.references_of(str(copy)) is None                  # no manifest says how it was written
    (tmp_path / "none" / "test.jsonl").write_text('{"question": "x", "answer": "y"}\n', encoding="utf-8")
    assert data.references_of(str(tmp_path / "none" / "test.jsonl")) is None   # not the file the manifest recorded


def test_classify_records_preprocess_and_annotate_applies_it(tmp_path, monkeypatch):
    clf = tmp_path / "clf"
    classify.main(["--model", "tiny", "--epochs", "1", "--max-len", "32", "--device", "cpu", "--out", str(clf),
                   "--quiet", "--preprocess", "arabert"])
    cfg = json.loads((clf / "config.json").read_text(encoding="utf-8"))
    assert cfg["severity_classifier"]["preprocess"] == "arabert"
    seen = []
    real = annotate.bert.predict_proba
    monkeypatch.setattr(annotate.bert, "predict_proba", lambda m, t, texts, *a, **k: seen.extend(texts) or
                        real(m, t, texts, *a, **k))
    src = tmp_path / "qa.jsonl"
    outputs.write_jsonl(str(src), [{"question": RAW, "answer": "ج"}])
    annotate.main(["--data", str(src), "--classifier", str(clf), "--out", str(tmp_path / "a.jsonl"), "--quiet"])
    assert seen == [data.arabert_preprocess(RAW)]
    written = json.loads((tmp_path / "a.jsonl").read_text(encoding="utf-8"))
    assert written["question"] == RAW                              # the records keep the text as it was
