"""Tests for the data contract (data/__init__.py), data/prepare.py and the shipped sample in data/sample/.

Offline and fast: every file is built in tmp_path; no hub access.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cli
import data
import outputs

from conftest import write_csv_rows

ROOT = Path(__file__).resolve().parent.parent

SAMPLE = ROOT / "data" / "sample"
Q, A = "ما علاج الصداع؟", "الراحة وشرب الماء."
GOOD = {"question": Q, "answer": A, "severity": "neutral", "p_nc": 0.2, "p_n": 0.5, "p_c": 0.3}


# ------------------------------------------------------------------------------------------------
# helpers

def write_jsonl_rows(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
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


@pytest.mark.parametrize("generated, want", EXTRACT_CASES)
def test_answer_complete_never_changes_the_answer(generated, want):
    """Once a prefix of the generation is 'complete', every longer prefix gives the same answer as the whole text:
    stopping there loses nothing; the whole text is complete exactly when a prefix is."""
    complete = [k for k in range(len(generated) + 1) if data.answer_complete(generated[:k])]
    assert complete == list(range(complete[0], len(generated) + 1)) if complete else True, "complete stays complete"
    for k in complete:
        assert data.extract_answer(generated[:k]) == want
    assert bool(complete) == data.answer_complete(generated)
    tail = "\nسؤال آخر؟\n\nالإجابة:\nجواب"                # a new question and cue always completes it
    assert data.answer_complete(generated + tail)
    if generated not in CUT_CUE:                       # a cue cut short is one only at the very end of the text
        assert data.extract_answer(generated + tail) == want


CUT_CUE = {g for g, _ in EXTRACT_CASES if data._cut_cue(g.split("\n"), g.count("\n"))}


def test_cut_cue_cases():
    assert {c["generated"] for c in OOS_EXTRACT if c["kind"] == "cut-cue"} <= CUT_CUE


def test_format_prompt_without_cue():
    assert data.format_prompt("س", cue=False) == "\nس\n"
    assert data.format_prompt("س") == "\nس\n\n" + data.PROMPT_CUE + "\n"


def test_notebook_extraction_keeps_everything_after_the_first_cue():
    """The notebooks' `pred.split(Q, 1)[-1].split(cue, 1)[-1]` on the generated text (the prompt already cut)."""
    cases = [("\nالاجابة:\nاشرب الماء.\nسؤال؟\n\nالاجابة:\nلا", "اشرب الماء.\nسؤال؟\n\nالاجابة:\nلا"),
             ("اشرب الماء.", "اشرب الماء."),                                 # no cue: the whole text
             ("كلام الاجابة: جواب", "جواب"),
             ("\nالإجابة:\nجواب", "الإجابة:\nجواب")]                         # the exact cue only, as split() did
    for text, want in cases:
        assert data.extract_answer_notebook(text) == want


# ----------------------------------------------------------------------------------------------- 1. weights & loss

def test_parse_weights():
    assert data.parse_weights("1,1,1") == (1.0, 1.0, 1.0)
    assert data.parse_weights("0.5, 1 ,1.5") == (0.5, 1.0, 1.5)
    assert data.parse_weights("0,0,2") == (0.0, 0.0, 2.0)
    assert data.parse_weights("balanced") == (0.5, 1.0, 1.5)
    assert data.parse_weights("strong") == (0.25, 1.0, 1.75)
    assert data.parse_weights("mild") == (0.75, 1.0, 1.25)
    assert data.parse_weights("ce") == (1.0, 1.0, 1.0)
    for bad in ("0.5,1", "abc", "1,-1,2", "1,2,3,4", "", "nan,1,1", "inf,1,1", "1,,2"):
        with pytest.raises(ValueError) as e:
            data.parse_weights(bad)
        assert "\n" not in str(e.value) and "--weights" in str(e.value)


def test_severity_weight_by_hand():
    rec = {"question": "q", "answer": "a", "severity": "critical", "p_nc": 0.2, "p_n": 0.3, "p_c": 0.5}
    assert data.severity_weight(rec, (0.5, 1.0, 1.5)) == pytest.approx(0.5 * 0.2 + 1.0 * 0.3 + 1.5 * 0.5, abs=1e-12)
    assert data.severity_weight(rec, (1, 1, 1)) == pytest.approx(1.0, abs=1e-12)
    assert data.severity_weight(rec, (0.25, 1.0, 1.75)) == pytest.approx(1.225, abs=1e-12)
    one_hot = dict(rec, p_nc=0.0, p_n=0.0, p_c=1.0)
    assert data.severity_weight(one_hot, (0.5, 1.0, 1.5)) == pytest.approx(1.5, abs=1e-12)


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
