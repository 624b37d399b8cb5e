"""Tests for the data contract (data/__init__.py), data/prepare.py and the shipped sample in data/sample/.

Offline and fast: every file is built in tmp_path; no hub access.
"""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
import data  # noqa: E402
import outputs  # noqa: E402
from data import prepare  # noqa: E402
from data import xlsx  # noqa: E402

SAMPLE = ROOT / "data" / "sample"
Q, A = "ما علاج الصداع؟", "الراحة وشرب الماء."
GOOD = {"question": Q, "answer": A, "severity": "neutral", "p_nc": 0.2, "p_n": 0.5, "p_c": 0.3}


# ------------------------------------------------------------------------------------------------
# helpers

def write_jsonl_rows(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv_rows(path, header, rows):
    import csv
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def expect_error(fn, path, line, field, *words):
    """fn() raises DataError whose one-line text starts with '<path>:<line>: <field>: '."""
    with pytest.raises(cli.DataError) as ei:
        fn()
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}:{line}: {field}: "), msg
    for w in words:
        assert w in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------
# validation: one line naming file, line and field; JSONL (bad row on line 2) and CSV (line 3)

BAD_ROWS = [
    # (case id, change to GOOD, field, words expected in the message)
    ("missing_question", {"question": None}, "question", ["missing field"]),
    ("missing_answer", {"answer": None}, "answer", ["missing field"]),
    ("prob_above_1", {"p_c": 1.5, "p_n": -0.7}, "p_n", ["outside [0, 1]"]),
    ("prob_negative", {"p_nc": -0.1, "p_n": 0.8}, "p_nc", ["outside [0, 1]"]),
    ("prob_not_number", {"p_n": "abc"}, "p_n", ["not a number"]),
    ("sum_not_1", {"p_nc": 0.5, "p_n": 0.5, "p_c": 0.5}, "p_nc+p_n+p_c", ["sum", "1.5000"]),
    ("empty_question", {"question": "   "}, "question", ["empty"]),
    ("empty_answer", {"answer": ""}, "answer", ["empty"]),
    ("unknown_severity", {"severity": "urgent"}, "severity", ["unknown severity label", "urgent"]),
    ("missing_one_prob", {"p_c": None}, "p_c", ["missing field"]),
]


@pytest.mark.parametrize("case,change,field,words", BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_jsonl_errors(tmp_path, case, change, field, words):
    bad = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    p = write_jsonl_rows(tmp_path / "d.jsonl", [GOOD, bad])
    expect_error(lambda: data.load_records(p), p, 2, field, *words)


@pytest.mark.parametrize("case,change,field,words", BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_csv_errors(tmp_path, case, change, field, words):
    bad = {**GOOD, **change}
    header = [k for k in GOOD if bad[k] is not None]
    rows = [[GOOD[k] for k in header], [bad[k] for k in header]]
    p = write_csv_rows(tmp_path / "d.csv", header, rows)
    # a missing column is missing from every row: reported at the first data row (line 2)
    line = 2 if None in bad.values() else 3
    expect_error(lambda: data.load_records(p), p, line, field, *words)


def test_csv_line_numbers_count_physical_lines(tmp_path):
    # The first data row has an answer spanning three physical lines (quoted), so the bad row
    # after it starts on line 5, not on line 3.
    p = tmp_path / "m.csv"
    p.write_text('question,answer,p_nc,p_n,p_c\n'
                 f'{Q},"سطر أول\nسطر ثان\nسطر ثالث",0.2,0.5,0.3\n'
                 f'{Q},{A},0.2,0.5,0.9\n', encoding="utf-8")
    expect_error(lambda: data.load_records(p), p, 5, "p_nc+p_n+p_c")
    # and the multi-line answer itself is read intact
    p.write_text(p.read_text(encoding="utf-8").replace("0.9", "0.3"), encoding="utf-8")
    assert data.load_records(p)[0]["answer"] == "سطر أول\nسطر ثان\nسطر ثالث"


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_non_utf8_bytes_name_their_line(tmp_path, fmt):
    p = tmp_path / f"bad.{fmt}"
    good = json.dumps(GOOD, ensure_ascii=False).encode()
    if fmt == "jsonl":
        body = good + b"\n" + good + b"\n" + good.replace(A.encode(), b"bad \xff\xfe bytes") + b"\n"
        line = 3
    else:
        body = ("question,answer,p_nc,p_n,p_c\n" f"{Q},{A},0.2,0.5,0.3\n").encode() + \
               Q.encode() + b",bad \xff bytes,0.2,0.5,0.3\n"
        line = 3
    p.write_bytes(body)
    expect_error(lambda: data.read_rows(p), p, line, "answer", "UTF-8", "0xff")
    expect_error(lambda: data.load_records(p), p, line, "answer", "UTF-8")


@pytest.mark.parametrize("name,content", [("e.jsonl", b""), ("e.csv", b"  \n\n"), ("e.json", b""),
                                          ("h.csv", b"question,answer\n"), ("l.json", b"[]")])
def test_empty_file(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content)
    msg = expect_error(lambda: data.load_records(p), p, 1, "file")
    assert "empty" in msg


def test_json_list_reports_item_line(tmp_path):
    p = tmp_path / "d.json"
    bad = {**GOOD, "severity": "سيء"}
    p.write_text("[\n" + json.dumps(GOOD, ensure_ascii=False) + ",\n\n" +
                 json.dumps(bad, ensure_ascii=False, indent=1) + "\n]\n", encoding="utf-8")
    expect_error(lambda: data.load_records(p), p, 4, "severity", "سيء")
    p.write_text('[{"question": "q", "answer": "a", "severity": "critical"}, 3]', encoding="utf-8")
    expect_error(lambda: data.read_rows(p), p, 1, "row", "JSON object")


def test_bad_json_line_and_unknown_extension(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(GOOD) + "\n{not json\n", encoding="utf-8")
    expect_error(lambda: data.read_rows(p), p, 2, "json")
    t = tmp_path / "d.txt"
    t.write_text("x", encoding="utf-8")
    expect_error(lambda: data.read_rows(t), t, 1, "file", "unsupported")


def test_probabilities_required_unless_asked(tmp_path):
    p = write_jsonl_rows(tmp_path / "d.jsonl", [{"question": Q, "answer": A, "severity": "حرج"}])
    expect_error(lambda: data.load_records(p), p, 1, "p_nc", "missing field")
    (r,) = data.load_records(p, require_probs=False)
    assert r["severity"] == "critical" and data.severity_probs(r) == (0.0, 0.0, 1.0)
    q = write_jsonl_rows(tmp_path / "q.jsonl", [{"question": Q, "answer": A}])
    expect_error(lambda: data.load_records(q, require_probs=False), q, 1, "severity", "missing field")
    assert data.load_qa(q) == [{"question": Q, "answer": A}]


# ------------------------------------------------------------------------------------------------
# aliases and argmax

def test_arabic_and_capitalised_columns(tmp_path):
    p = write_csv_rows(tmp_path / "a.csv", ["Question", "Answer", "غير حرج", "متوسط", "حرج"],
                       [[Q, A, "0.1", "0.2", "0.7"], [Q + "؟", A, "0.6", "0.3", "0.1"],
                        [Q + "!", A, "0.25", "0.5", "0.25"]])
    recs = data.load_records(p)
    assert [r["severity"] for r in recs] == ["critical", "non-critical", "neutral"]  # argmax
    assert list(recs[0]) == ["question", "answer", "severity", "p_nc", "p_n", "p_c"]
    assert data.severity_probs(recs[0]) == (0.1, 0.2, 0.7)
    # a bad value in an Arabic column is reported under its own name plus the canonical one
    p2 = write_csv_rows(tmp_path / "b.csv", ["QUESTION", "answer", "غير حرج", "متوسط", "حرج"],
                        [[Q, A, "0.1", "0.2", "x"]])
    expect_error(lambda: data.load_records(p2), p2, 2, "حرج (p_c)", "not a number")


def test_argmax_tie_takes_first_in_severity_order(tmp_path):
    p = write_jsonl_rows(tmp_path / "t.jsonl", [{"question": Q, "answer": A, "p_nc": 0.4, "p_n": 0.4, "p_c": 0.2},
                                                {"question": Q, "answer": A, "p_nc": 0.2, "p_n": 0.4, "p_c": 0.4}])
    assert [r["severity"] for r in data.load_records(p)] == ["non-critical", "neutral"]


@pytest.mark.parametrize("label,canon", [("Critical", "critical"), ("حرج", "critical"), ("متوسط", "neutral"),
                                         ("NEUTRAL", "neutral"), ("غير حرج", "non-critical"),
                                         ("non_critical", "non-critical"), ("Non-Critical", "non-critical"),
                                         (" non critical ", "non-critical")])
def test_severity_label_aliases(tmp_path, label, canon):
    p = write_jsonl_rows(tmp_path / "s.jsonl", [{"question": Q, "answer": A, "Severity": label,
                                                 "p_nc": 0.2, "p_n": 0.3, "p_c": 0.5}])
    assert data.load_records(p)[0]["severity"] == canon  # the given label is kept over the argmax


def test_same_field_twice_is_an_error(tmp_path):
    p = write_jsonl_rows(tmp_path / "d.jsonl", [{**GOOD, "Question": "x"}])
    expect_error(lambda: data.load_records(p), p, 1, "question", "twice")


def test_bom_is_dropped_and_labels_load(tmp_path):
    p = tmp_path / "l.csv"
    p.write_bytes("\ufefftext,label\nسؤال,حرج\nسؤال آخر,non_critical\n".encode("utf-8"))
    assert data.load_labels(p) == [{"text": "سؤال", "label": "critical"},
                                   {"text": "سؤال آخر", "label": "non-critical"}]


# ------------------------------------------------------------------------------------------------
# writing, prompt template

def test_write_jsonl_atomic_and_roundtrip(tmp_path):
    out = tmp_path / "sub" / "o.jsonl"
    recs = [GOOD, {**GOOD, "question": "سؤال\nبسطرين", "severity": "critical", "p_nc": 0.1, "p_n": 0.1, "p_c": 0.8}]
    outputs.write_jsonl(out, recs)
    assert data.load_records(out) == [{**r, "question": r["question"].strip()} for r in recs]
    assert "ما علاج" in out.read_text(encoding="utf-8")  # Arabic kept readable, not \u-escaped
    assert os.listdir(out.parent) == ["o.jsonl"]  # no temp file left
    # a failure while serialising leaves the old file untouched and no temp file behind
    before = out.read_bytes()
    with pytest.raises(TypeError):
        outputs.write_jsonl(out, [GOOD, {"question": object()}])
    assert out.read_bytes() == before
    assert os.listdir(out.parent) == ["o.jsonl"]


def test_jsonl_lines_split_on_newline_only(tmp_path):
    # U+2028 / U+0085 are line breaks for str.splitlines() but legal raw characters in JSON strings
    recs = [{**GOOD, "answer": "سطر\u2028فاصل\u0085آخر"}, GOOD]
    out = tmp_path / "u.jsonl"
    outputs.write_jsonl(out, recs)
    assert data.load_records(out) == recs
    out.write_bytes(out.read_bytes().replace(b"\n", b"\r\n"))  # Windows line ends
    assert data.load_records(out) == recs


def test_prompt_template():
    assert data.PROMPT_CUE == "الاجابة:"
    assert data.format_prompt("س") == "\nس\n\nالاجابة:\n"


# Hand-written generations (the text a model writes after the prompt, which ends with the cue) -> the answer to
# THIS question. A model that goes on after its answer writes the template again: a new question, then a cue.
EXTRACT_CASES = [
    ("الراحة والسوائل.", "الراحة والسوائل."),                                     # just the answer (EOS ended it)
    ("  جواب بلا علامة \n", "جواب بلا علامة"),                                   # the cue never appears
    ("الراحة والسوائل.\n\nعندي صداع؟\n\nالاجابة:\nراجع الطبيب", "الراحة والسوائل."),  # the example
    ("سطر أول.\nسطر ثان.\nسؤال جديد؟\n\nالاجابة:\nجواب آخر", "سطر أول.\nسطر ثان."),   # a two-line answer
    ("\nسؤال جديد؟\n\nالاجابة:\nجواب مخترع", ""),                               # empty answer, then a new pair
    ("", ""),                                                                    # nothing generated (EOS first)
    ("كلام الاجابة: الجواب الاجابة: المزيد", "كلام"),                             # no line break: cut at the cue
    ("\nالاجابة:\nاشرب الماء.\nسؤال؟\n\nالاجابة:\nلا", "اشرب الماء."),          # cue-less prompt: own cue first
    ("\nالاجابة:\n", ""),                                                       # cue-less prompt, empty answer
    # issue 18: the cue as models write it
    ("اشرب الماء.\nعندي حمى\nالإجابة:\nخذ دواء", "اشرب الماء."),                   # hamza under alef
    ("اشرب الماء.\nعندي حمى\nالأجابة:\nخذ دواء", "اشرب الماء."),                   # hamza over alef
    ("اشرب الماء.\nعندي حمى\nالإِجَابَةُ:\nخذ دواء", "اشرب الماء."),               # diacritics
    ("اشرب الماء.\nعندي حمى\nالاجـــابة:\nخذ دواء", "اشرب الماء."),              # tatweel
    ("اشرب الماء.\nعندي حمى\nالاجابة :\nخذ دواء", "اشرب الماء."),                 # a space before the colon
    ("اشرب الماء.\nعندي حمى\nالاجابة :خذ دواء", "اشرب الماء."),                   # spaces around the colon
    ("اشرب الماء.\nI have a fever\nAnswer:\ntake a pill", "اشرب الماء."),        # the English cue
    ("اشرب الماء.\nanswer : rest", "اشرب الماء."),                                # English, lower case, spaced
    # where the new question starts
    ("اشرب الماء.\nعندي صداع منذ يومين\nفما السبب؟\n\nالاجابة:\nقلة النوم",     # two lines, ? on the second:
     "اشرب الماء."),              # its first line goes too (a first-person opener, no final "."; issue 24)
    ("اشرب الماء.\nثم نم جيدا.\nفما السبب؟\n\nالاجابة:\nقلة النوم",                # ... but not an answer line
     "اشرب الماء.\nثم نم جيدا."),
    ("اشرب الماء.\nما سبب الحمى؟\nوهل هي خطيرة\nالاجابة:\nلا", "اشرب الماء."),   # two lines, ? on the first
    ("اشرب الماء.\nعندي صداع؟ الاجابة: راجع الطبيب", "اشرب الماء."),              # question and cue on one line
    ("اشرب الماء. عندي صداع؟ الاجابة: راجع الطبيب", "اشرب الماء."),               # ... on the answer's own line
    ("الإجابة على سؤالك هي الراحة.\nوالاجابة عن الثاني نعم", "الإجابة على سؤالك هي الراحة.\nوالاجابة عن الثاني نعم"),
    ("اشرب الماء.\nهل القهوة مضرة؟\n", "اشرب الماء."),                           # trailing question, no cue
    ("اشرب الماء.\nهل القهوة مضرة؟", "اشرب الماء."),                             # ... EOS right after it
    ("هل لديك حمى؟ إذا نعم فراجع الطبيب.", "هل لديك حمى؟ إذا نعم فراجع الطبيب."),    # a question in the first line
    ("\nالإجابة :\nاشرب الماء.\nسؤال؟\nAnswer:\nلا", "اشرب الماء."),             # own cue in another form
    # issue 24 (more in tests/oos/extract_cases.jsonl)
    ("اشرب الماء.\nالسؤال\nعندي صداع\nالاجابة:\nراجع الطبيب", "اشرب الماء."),     # a question label alone
    ("Drink water.\nI have a cold\n\nAnsw", "Drink water."),                       # the English cue cut short
    ("اشرب الماء.\n\nالالتهاب يزول", "اشرب الماء.\n\nالالتهاب يزول"),            # not a cue's beginning
    ("اشرب الماء.\nهل تسبب القهوة الأرق؟\n", "اشرب الماء."),                   # not addressed to the patient
    ("اشرب الماء.\nهل لديك حرارة؟ عندي سؤال آخر؟\n", "اشرب الماء."),          # first person: a new question
    ("\nالإجابة\nاشرب الماء.\nسؤال؟\n", "اشرب الماء."),                         # own cue without its colon
    ("السلام عليكم\nأهلا بك، الصداع سببه التوتر.\nمرحبا دكتور، عندي سؤال", "السلام عليكم\nأهلا بك، الصداع سببه التوتر."),
]




def oos_extract_cases():
    """tests/oos/extract_cases.jsonl: fresh generations of issue 24's failing kinds (a cue without its colon, a cue
    after other words, greeting-opened and multi-line new questions, a cut cue, question labels, س:/ج:, the doctor's
    follow-up question), written before the rule changed (22 of 30 wrong then); frozen."""
    path = Path(__file__).resolve().parent / "oos" / "extract_cases.jsonl"
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


OOS_EXTRACT = oos_extract_cases()
EXTRACT_CASES += [(c["generated"], c["want"]) for c in OOS_EXTRACT]


@pytest.mark.parametrize("generated, want", EXTRACT_CASES)
def test_extract_answer_keeps_this_questions_answer(generated, want):
    assert data.extract_answer(generated) == want


def test_oos_extract_kinds():
    kinds = {c["kind"] for c in OOS_EXTRACT}
    assert kinds >= {"cue-no-colon", "cue-after-words", "greeting-question", "two-line-question", "cut-cue",
                     "question-label", "s-j-labels", "follow-up"} and len(OOS_EXTRACT) >= 30


@pytest.mark.parametrize("generated", [c["generated"] for c in OOS_EXTRACT])
def test_notebook_rule_unchanged(generated):
    # --recipe notebook keeps the authors' rule: everything after the first exact cue, else the whole text
    assert data.extract_answer_notebook(generated) == generated.split(data.PROMPT_CUE, 1)[-1].strip()


# ------------------------------------------------------------------------------------------------
# prepare.py

def run_prepare(args, capsys=None):
    prepare.main([str(a) for a in args])
    return capsys.readouterr() if capsys else None


def read_out(out):
    tr = data.load_qa(out / "train.jsonl")
    te = data.load_qa(out / "test.jsonl")
    return tr, te, json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def qa_csv(tmp_path):
    rows = [
        ["ما سبب الصداع؟", "قلة النوم."],
        ["ما سبب الصداع؟", "قلة النوم."],                    # exact duplicate
        ["مَا سَبَبُ الصُّدَاعِ؟", "قلة   النوم."],             # duplicate after normalisation
        ["هل القهوة مضرة؟", ""],                              # empty answer: dropped
        ["   ", "جواب"],                                       # empty question: dropped
        ["إبني عنده حمى", "راجع الطبيب https://example.com/x 😀"],
        ["طـــبيب الأسنان متى؟", "كل ستة أشهر"],
        ["سؤال خامس", "جواب خامس"],
        ["سؤال سادس", "جواب سادس"],
        ["سؤال سابع", "جواب سابع"],
    ]
    return write_csv_rows(tmp_path / "maqa.csv", ["Question", "Answer"], rows)


def test_prepare_csv_end_to_end(tmp_path, capsys):
    src = qa_csv(tmp_path)
    out = tmp_path / "out"
    run_prepare(["--input", src, "--out", out, "--n-train", 4, "--n-test", 2, "--seed", 3])
    tr, te, m = read_out(out)
    assert (m["rows_read"], m["dropped_empty"], m["duplicates_removed"], m["rows_after_dedup"]) == (10, 2, 2, 6)
    assert (len(tr), len(te), m["n_train"], m["n_test"], m["unused"]) == (4, 2, 4, 2, 0)
    assert m["proportional_split"] is False and m["normalize"] is False and m["seed"] == 3
    import hashlib
    assert m["input_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert all(set(r) == {"question", "answer"} for r in tr + te)
    assert len({r["question"] for r in tr + te}) == 6  # train and test are disjoint
    # without --normalize the text is written as given (stripped)
    assert "طـــبيب الأسنان متى؟" in {r["question"] for r in tr + te}
    # same seed -> byte-identical files; the test set does not depend on --n-train
    out2 = tmp_path / "out2"
    run_prepare(["--input", src, "--out", out2, "--n-train", 4, "--n-test", 2, "--seed", 3])
    for f in ("train.jsonl", "test.jsonl", "manifest.json"):
        assert (out / f).read_bytes() == (out2 / f).read_bytes()
    out3 = tmp_path / "out3"
    run_prepare(["--input", src, "--out", out3, "--n-train", 2, "--n-test", 2, "--seed", 3])
    assert (out3 / "test.jsonl").read_bytes() == (out / "test.jsonl").read_bytes()
    assert read_out(out3)[2]["unused"] == 2


def test_prepare_normalize_and_proportional_split(tmp_path, capsys):
    src = qa_csv(tmp_path)
    out = tmp_path / "out"
    err = run_prepare(["--input", src, "--out", out, "--normalize"], capsys).err  # default 30000 / 2000
    tr, te, m = read_out(out)
    assert "only 6 pairs" in err and m["proportional_split"] is True and m["normalize"] is True
    assert len(tr) + len(te) == 6 and len(te) == 1  # 6 * 2000/32000 rounds to 0 -> at least 1
    texts = {r["question"]: r["answer"] for r in tr + te}
    assert "ابني عنده حمي" in texts                  # alef/yaa unified in the questions
    assert "طبيب الاسنان متي؟" in texts               # tatweel removed, alef with hamza -> alef
    # issue 24: the answers stay the doctors' text unless --normalize-answers asks (the first copy of a duplicate)
    assert texts["ابني عنده حمي"] == "راجع الطبيب https://example.com/x 😀" and texts["ما سبب الصداع؟"] == "قلة النوم."
    assert m["normalize_answers"] == "none" and m["answers"] == {"train": "raw", "test": "raw"}


@pytest.mark.parametrize("choice, train_norm, test_norm", [("train", True, False), ("all", True, True)])
def test_prepare_normalize_answers(tmp_path, choice, train_norm, test_norm):
    src = qa_csv(tmp_path)
    base, out = tmp_path / "base", tmp_path / "out"
    run_prepare(["--input", src, "--out", base, "--n-train", 4, "--n-test", 2, "--normalize"])
    run_prepare(["--input", src, "--out", out, "--n-train", 4, "--n-test", 2, "--normalize",
                 "--normalize-answers", choice])
    (tr0, te0, m0), (tr, te, m) = read_out(base), read_out(out)
    # the same pairs in the same split, the same questions; only the answers differ, in the files asked for
    assert [r["question"] for r in tr + te] == [r["question"] for r in tr0 + te0]
    norm = prepare.normalize_arabic
    assert [r["answer"] for r in tr] == [norm(r["answer"]) if train_norm else r["answer"] for r in tr0]
    assert [r["answer"] for r in te] == [norm(r["answer"]) if test_norm else r["answer"] for r in te0]
    assert any(r["answer"] != prepare.normalize_arabic(r["answer"]) for r in tr0 + te0)
    assert m["normalize_answers"] == choice
    assert m["answers"] == {"train": "orthographic", "test": "orthographic" if test_norm else "raw"}
    assert m0["answers"] == {"train": "raw", "test": "raw"}


def test_prepare_normalize_answers_needs_orthographic(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        run_prepare(["--input", qa_csv(tmp_path), "--out", out, "--normalize-answers", "train"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--normalize-answers train needs --normalize orthographic" in err and not out.exists()


def test_normalize_rules():
    n = prepare.normalize_arabic
    assert n("مَرْحَبًا") == "مرحبا"                 # tashkeel and tanwin
    assert n("جمـــيل") == "جميل"                  # tatweel
    assert n("أإآٱ") == "اااا"                     # alef variants
    assert n("على") == "علي" and n("مدرسة") == "مدرسه"
    assert n("انظر www.x.org و http://a.b/c?d=1 هنا") == "انظر و هنا"
    assert n("شكرا 🙏🏽 ❤️ جدا") == "شكرا جدا"
    assert n("  سطر\n\tثان  ") == "سطر ثان"


def test_prepare_apollo_shaped_json(tmp_path):
    convs = [["س1", "ج1", "س2", "ج2"], ["س3", "ج3", "س4"], ["س1", "ج1"]]
    src = tmp_path / "medicalPatient_ar.json"
    src.write_text(json.dumps(convs, ensure_ascii=False, indent=1), encoding="utf-8")
    out = tmp_path / "out"
    prepare.main(["--source", "apollo", "--input", str(src), "--out", str(out), "--n-train", "2", "--n-test", "1"])
    tr, te, m = read_out(out)
    assert m["source"] == "apollo" and m["rows_read"] == 4 and m["dropped_unpaired_turns"] == 1
    assert m["duplicates_removed"] == 1 and len(tr) == 2 and len(te) == 1
    assert {(r["question"], r["answer"]) for r in tr + te} == {("س1", "ج1"), ("س2", "ج2"), ("س3", "ج3")}
    # a conversation that is not a list of strings is bad input, reported at its line
    src.write_text('[\n["q", "a"],\n["q", 3]\n]', encoding="utf-8")
    with pytest.raises(cli.DataError, match=r":3: conversation: "):
        prepare.prepare(prepare.parse_args(["--source", "apollo", "--input", str(src), "--out", str(tmp_path / "x")]))


def make_xlsx(path, rows):
    """A minimal .xlsx: row 1 header; strings alternate between shared and inline cells."""
    shared, sheet_rows = [], []
    for r, row in enumerate(rows, 1):
        cells = []
        for c, val in enumerate(row):
            ref = f"{'ABCDEFGH'[c]}{r}"
            if isinstance(val, (int, float)):
                cells.append(f'<c r="{ref}"><v>{val}</v></c>')
            elif (r + c) % 2:
                shared.append(val)
                cells.append(f'<c r="{ref}" t="s"><v>{len(shared) - 1}</v></c>')
            else:
                cells.append(f'<c r="{ref}" t="inlineStr"><is><t>{val}</t></is></c>')
        sheet_rows.append(f'<row r="{r}">{"".join(cells)}</row>')
    ns = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
    rns = 'xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships"'
    with zipfile.ZipFile(path, "w") as z:
        ct = "application/vnd.openxmlformats-officedocument.spreadsheetml."
        z.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/'
                   'package/2006/content-types">'
                   f'<Override PartName="/xl/workbook.xml" ContentType="{ct}sheet.main+xml"/>'
                   f'<Override PartName="/xl/worksheets/sheet1.xml" ContentType="{ct}worksheet+xml"/>'
                   f'<Override PartName="/xl/worksheets/sheet2.xml" ContentType="{ct}worksheet+xml"/>'
                   f'<Override PartName="/xl/sharedStrings.xml" ContentType="{ct}sharedStrings+xml"/></Types>')
        z.writestr("xl/workbook.xml", f'<?xml version="1.0"?><workbook {ns} {rns}><sheets>'
                   '<sheet name="Info" sheetId="1" r:id="rId2"/><sheet name="QA" sheetId="2" r:id="rId1"/>'
                   '</sheets></workbook>')
        z.writestr("xl/_rels/workbook.xml.rels", '<?xml version="1.0"?><Relationships xmlns="http://schemas.'
                   'openxmlformats.org/package/2006/relationships">'
                   '<Relationship Id="rId1" Type="worksheet" Target="worksheets/sheet1.xml"/>'
                   '<Relationship Id="rId2" Type="worksheet" Target="/xl/worksheets/sheet2.xml"/>'
                   '</Relationships>')
        z.writestr("xl/sharedStrings.xml", f'<?xml version="1.0"?><sst {ns}>' +
                   "".join(f"<si><r><t>{s[:2]}</t></r><r><t>{s[2:]}</t></r></si>" for s in shared) + "</sst>")
        z.writestr("xl/worksheets/sheet1.xml", f'<?xml version="1.0"?><worksheet {ns}><sheetData>'
                   + "".join(sheet_rows) + "</sheetData></worksheet>")
        z.writestr("xl/worksheets/sheet2.xml", f'<?xml version="1.0"?><worksheet {ns}><sheetData>'
                   '<row r="1"><c r="A1" t="inlineStr"><is><t>not this sheet</t></is></c></row>'
                   "</sheetData></worksheet>")
    return path


def test_prepare_xlsx_with_named_columns(tmp_path):
    rows = [["id", "نص السؤال", "نص الجواب"],
            [1, "ما هو السكري؟", "ارتفاع سكر الدم."],
            [2, "هل الرياضة مفيدة؟", "نعم باعتدال."],
            [3, "ما هو السكري؟", "ارتفاع سكر الدم."],
            [4, "سؤال رابع", "جواب رابع"]]
    src = make_xlsx(tmp_path / "maqa.xlsx", rows)
    assert xlsx.read_xlsx(src, "QA")[0] == (2, {"id": "1", "نص السؤال": "ما هو السكري؟", "نص الجواب": "ارتفاع سكر الدم."})
    out = tmp_path / "out"
    prepare.main(["--input", str(src), "--sheet", "QA", "--question-col", "نص السؤال", "--answer-col", "نص الجواب",
                  "--out", str(out), "--n-train", "2", "--n-test", "1"])
    tr, te, m = read_out(out)
    assert m["rows_read"] == 4 and m["duplicates_removed"] == 1 and (len(tr), len(te)) == (2, 1)
    assert {r["question"] for r in tr + te} == {"ما هو السكري؟", "هل الرياضة مفيدة؟", "سؤال رابع"}


def test_prepare_keeps_probability_columns(tmp_path):
    src = write_csv_rows(tmp_path / "ann.csv", ["Question", "Answer", "غير حرج", "متوسط", "حرج"],
                         [["س1", "ج1", "0.1", "0.2", "0.7"], ["س2", "ج2", "0.6", "0.3", "0.1"]])
    out = tmp_path / "out"
    prepare.main(["--input", str(src), "--out", str(out), "--n-train", "1", "--n-test", "1"])
    recs = data.load_records(out / "train.jsonl") + data.load_records(out / "test.jsonl")
    assert sorted(r["severity"] for r in recs) == ["critical", "non-critical"]
    assert json.loads((out / "manifest.json").read_text())["has_severity"] is True


@pytest.mark.parametrize("case", ["bad_prob", "missing_column", "no_file", "not_xlsx"])
def test_prepare_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, case):
    out = tmp_path / "out"
    if case == "bad_prob":
        src = write_csv_rows(tmp_path / "b.csv", ["question", "answer", "p_nc", "p_n", "p_c"],
                             [["س", "ج", "0.2", "0.5", "0.3"], ["س2", "ج2", "0.2", "0.5", "1.3"]])
        args, where = ["--input", src], f"{src}:3: p_c: "
    elif case == "missing_column":
        src = write_csv_rows(tmp_path / "b.csv", ["q", "a"], [["س", "ج"]])
        args, where = ["--input", src], f"{src}:2: question: "   # at the first record (was the header line)
    elif case == "no_file":
        src = tmp_path / "nope.csv"
        args, where = ["--input", src], f"--data: {src}: no such file"   # --input is --data's old spelling
    else:
        src = tmp_path / "b.xlsx"
        src.write_bytes(b"not a zip")
        args, where = ["--input", src], f"{src}:1: file: "
    with pytest.raises(SystemExit) as ei:
        run_prepare(args + ["--out", out])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: " + where), err
    assert not out.exists() or not any(out.iterdir())


def test_prepare_runs_as_a_script(tmp_path):
    # `python data/prepare.py` (not -m) must find the data package; bad input -> status 2, one line
    src = write_csv_rows(tmp_path / "b.csv", ["question", "answer", "severity"], [["س", "ج", "bogus"]])
    r = subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py"), "--input", str(src),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith(f"error: {src}:2: severity: "), r.stderr
    assert r.stderr.count("\n") == 1
    h = subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py"), "--help"],
                       capture_output=True, text=True, timeout=60)
    assert h.returncode == 0 and "--question-col" in h.stdout and "--normalize" in h.stdout


# ------------------------------------------------------------------------------------------------
# the shipped sample

def test_sample_qa_set():
    tr = data.load_records(SAMPLE / "train.jsonl")
    te = data.load_records(SAMPLE / "test.jsonl")
    recs = tr + te
    assert len(recs) >= 300 and len(tr) >= 250 and len(te) >= 50
    sev = [r["severity"] for r in recs]
    assert set(sev) == set(data.SEVERITIES)
    share = {s: sev.count(s) / len(sev) for s in data.SEVERITIES}
    assert 0.35 < share["non-critical"] < 0.55 and 0.2 < share["neutral"] < 0.4 and 0.15 < share["critical"] < 0.35
    for r in recs:
        p = data.severity_probs(r)
        assert abs(sum(p) - 1) < 1e-9 and all(round(x, 4) == x for x in p)
        assert max(p) < 1 and p[data.SEVERITIES.index(r["severity"])] == max(p)  # soft, label highest
    assert len({(r["question"], r["answer"]) for r in recs}) == len(recs)
    assert not {r["question"] for r in tr} & {r["question"] for r in te}


def test_sample_severity_labels():
    labs = data.load_labels(SAMPLE / "severity_labels.jsonl")
    assert len(labs) >= 400 and {r["label"] for r in labs} == set(data.SEVERITIES)
    qa_questions = {r["question"] for r in data.load_records(SAMPLE / "train.jsonl")}
    assert len({r["text"] for r in labs} - qa_questions) >= 100  # includes texts outside the Q/A set


def test_sample_files_match_their_generators(tmp_path):
    """The committed files are exactly what the seeded generator scripts write."""
    subprocess.run([sys.executable, str(SAMPLE / "make_sample.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    for f in ("train.jsonl", "test.jsonl", "severity_labels.jsonl", "stats.json"):
        assert (tmp_path / f).read_bytes() == (SAMPLE / f).read_bytes(), f
    subprocess.run([sys.executable, str(SAMPLE / "make_tokenizers.py"), "--folder", str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    assert (tmp_path / "wordpiece/vocab.txt").read_bytes() == (SAMPLE / "wordpiece/vocab.txt").read_bytes()
    # tokenizer.json layout may differ between `tokenizers` versions: compare what they do instead
    from tokenizers import Tokenizer
    text = (SAMPLE / "test.jsonl").read_text(encoding="utf-8")
    for f in ("tokenizer.json", "wordpiece/tokenizer.json"):
        new, old = (Tokenizer.from_file(str(d / f)) for d in (tmp_path, SAMPLE))
        assert new.get_vocab() == old.get_vocab(), f
        assert new.encode(text).ids == old.encode(text).ids, f


def test_sample_tokenizers():
    from tokenizers import Tokenizer
    for f in ("tokenizer.json", "wordpiece/tokenizer.json", "wordpiece/vocab.txt"):
        assert (SAMPLE / f).stat().st_size < 300_000
    bpe = Tokenizer.from_file(str(SAMPLE / "tokenizer.json"))
    assert bpe.get_vocab_size() == 2048 and bpe.token_to_id("<|endoftext|>") == 0
    text = data.format_prompt("عندي صداع منذ يومين 🙂") + "راجع الطبيب. English 123"
    ids = bpe.encode(text).ids
    assert 0 not in ids and bpe.decode(ids) == text  # byte-level: any text round-trips exactly
    assert len(ids) < len(text.encode("utf-8")) / 2  # it learnt Arabic merges

    wp = Tokenizer.from_file(str(SAMPLE / "wordpiece" / "tokenizer.json"))
    assert wp.get_vocab_size() == 2000
    assert [wp.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    vocab = (SAMPLE / "wordpiece" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 2000 and all(wp.token_to_id(t) == i for i, t in enumerate(vocab))
    e = wp.encode("ألم في الصدر", "هل هو خطير؟")
    assert e.ids[0] == 2 and e.ids.count(3) == 2 and e.ids[-1] == 3
    assert e.type_ids[-1] == 1 and e.type_ids[0] == 0
    assert 1 not in e.ids  # no [UNK] for ordinary Arabic text
    assert "ٌ" in wp.normalizer.normalize_str("طبيبٌ")  # diacritics kept (no accent stripping)
