"""data/prepare.py: corpus preparation end to end (csv, json, xlsx, normalisation, split), the .xlsx reader in
openpyxl's read-only (streaming) mode, and --normalize dialect (seed 003): the rules table data/dialect_rules.txt.

Dialect: each dialect is checked on hand-written patient questions (synthetic, not medical advice) whose MSA version
was worked out by hand; tests/dialect_cases.tsv adds per-dialect questions with a gold MSA version, scored by
tests/dialect_eval.py (every change must be right; coverage has a floor); tests/msa_sentences.txt is held-out
MSA medical text that must come out unchanged; the wrong mappings of issue 18 are regression cases; the matching
rules (whole words, spelling variants, exact spellings, conditions, prefix rules, longest form first, one pass,
the conjunction و) on small cases; and prepare.py end to end: questions change, answers and the split do not.
"""
import gc
import json
import re
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import pytest

import cli
import data
import dialect_eval
import outputs
from data import prepare
from data import xlsx

from conftest import write_csv_rows
import csv
import os

ROOT = Path(__file__).resolve().parent.parent


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

QUESTION, ANSWER = "سؤال رقم {} عن الصداع والحمى؟", "جواب رقم {}: الراحة والسوائل ومراجعة الطبيب."


def write_sheet(path, n, blank_every=0):
    """A real workbook written by openpyxl (streaming writer): an 'Info' sheet, then 'QA' with a header and n rows."""
    import openpyxl
    wb = openpyxl.Workbook(write_only=True)
    info = wb.create_sheet("Info")
    info.append(["note"])
    info.append(["not this sheet"])
    ws = wb.create_sheet("QA")
    ws.append(["id", "question", "answer"])
    for i in range(n):
        if blank_every and i % blank_every == 0:
            ws.append([])
        ws.append([i, QUESTION.format(i), ANSWER.format(i)])
    wb.save(path)
    return path


def rewrite_part(src, dst, name, fn):
    """Copy a zip, passing one part's bytes through fn."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            b = zin.read(item.filename)
            zout.writestr(item, fn(b) if item.filename == name else b)
    return dst


def test_rows_columns_and_sheets(tmp_path):
    src = write_sheet(tmp_path / "a.xlsx", 5, blank_every=2)
    rows = xlsx.read_xlsx(src, "QA")
    # header on row 1; blank rows are skipped but keep their place in the numbering
    assert [r[0] for r in rows] == [3, 4, 6, 7, 9]
    assert rows[0][1] == {"id": "0", "question": QUESTION.format(0), "answer": ANSWER.format(0)}
    assert xlsx.read_xlsx(src, "2") == rows
    assert xlsx.read_xlsx(src) == [(2, {"note": "not this sheet"})]   # default: the first sheet
    with pytest.raises(cli.DataError, match=r":1: sheet: no sheet 'Nope' \(sheets: Info, QA\)"):
        xlsx.read_xlsx(src, "Nope")


@pytest.mark.parametrize("case", ["not_zip", "truncated", "truncated_no_dimension", "shared_string"])
def test_malformed_workbooks_are_one_line_errors(tmp_path, capsys, case):
    good = write_sheet(tmp_path / "good.xlsx", 50)
    bad = tmp_path / "bad.xlsx"
    if case == "not_zip":
        bad.write_bytes(b"PK\x03\x04 this is not really a zip")
        where = f"{bad}:1: file: not a valid .xlsx file"
    elif case == "truncated":   # the QA sheet's XML cut off in row 31; with <dimension>, as Excel writes it
        def cut(b):
            b = b.replace(b"<sheetData>", b'<dimension ref="A1:C51"/><sheetData>')
            return b[:b.index(b'<row r="31"') + 40]
        rewrite_part(good, bad, "xl/worksheets/sheet2.xml", cut)
        where = f"{bad}:31: sheet QA: malformed worksheet (ParseError"
    elif case == "truncated_no_dimension":   # openpyxl reads such a sheet through once on opening: no row number
        rewrite_part(good, bad, "xl/worksheets/sheet2.xml", lambda b: b[:b.index(b'<row r="31"') + 40])
        where = f"{bad}:1: file: not a valid .xlsx file (ParseError"
    else:                       # row 12's question points past the end of the shared-string table
        def point_out(b):
            return re.sub(rb'<c r="B12".*?</c>', b'<c r="B12" t="s"><v>99999</v></c>', b)
        rewrite_part(good, bad, "xl/worksheets/sheet2.xml", point_out)
        where = f"{bad}:12: sheet QA: shared-string index out of range"
    with pytest.raises(SystemExit) as e:
        prepare.main(["--input", str(bad), "--sheet", "QA", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: " + where), err
    assert not (tmp_path / "out").exists()


def test_sheet_is_streamed_not_loaded_whole(tmp_path):
    """While reading, Python holds little more than the rows it returns (openpyxl's read-only mode). Loading the
    workbook whole (read_only=False) peaks at about 2.7x the result on this sheet; streaming at about 1.3x.
    Measured once on 400,000 rows: see README (data/prepare.py)."""
    src = write_sheet(tmp_path / "big.xlsx", 3000)
    gc.collect()
    tracemalloc.start()
    try:
        rows = xlsx.read_xlsx(src, "QA")
        gc.collect()
        result, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(rows) == 3000 and rows[-1] == (3001, {"id": "2999", "question": QUESTION.format(2999),
                                                     "answer": ANSWER.format(2999)})
    assert peak < 1.8 * result, (peak, result)

RULES = prepare.load_dialect_rules()


def nd(text):
    return prepare.normalize_dialect(text, RULES)


@pytest.mark.parametrize("dialect, question, msa", [
    ("egyptian", "عايز أعرف إزاي أخس خمسة كيلو بطريقة صحية",
     "أريد أن أعرف كيف أخس خمسة كيلو بطريقة صحية"),
    ("egyptian", "بقالي أسبوع عندي سخونية بالليل ومش قادر أنام كويس، أعمل إيه دلوقتي؟",
     "منذ أسبوع عندي حمى بالليل وليس قادر أنام جيد، أعمل ماذا الآن؟"),
    ("egyptian", "ابني عنده كحة من شوية وعايزة أعرف الدوا ده آمن؟",
     "ابني عنده كحة منذ قليل وأريد أن أعرف الدواء هذا آمن؟"),       # كحة is MSA too (issue 24)
    ("levantine", "صرلي أسبوع بحس بدوخة، شو لازم أعمل هلق؟",
     "منذ أسبوع أشعر بدوخة، ماذا لازم أعمل الآن؟"),
    ("levantine", "بدي أعرف ليش بنتي بتسعل كتير بالليل",
     "أريد أن أعرف لماذا بنتي تسعل كثيرا بالليل"),
    ("levantine", "هاد الدوا منيح للحامل؟ وين بلاقيه؟",
     "هذا الدواء جيد للحامل؟ أين أجده؟"),
    ("gulf", "شلون أعرف إذا الحرارة وايد عالية عند ولدي؟",
     "كيف أعرف إذا الحرارة كثيرا عالية عند ولدي؟"),
    ("gulf", "أبي أسأل: طحت أمس وركبتي تعورني، أبغى دواء للألم",
     "أريد أن أسأل: سقطت أمس وركبتي تؤلمني، أريد دواء للألم"),
    ("gulf", "أبي عنده سكر وأبوي الثاني ضغط، شلون نتصرف؟",          # MSA أبي ("my father") is kept
     "أبي عنده سكر وأبي الثاني ضغط، كيف نتصرف؟"),
    ("maghrebi", "واش كاين دوا مزيان للسعال؟",
     "هل يوجد دواء جيد للسعال؟"),
    ("maghrebi", "دابا كنحس بالدوخة بزاف، علاش؟ كيفاش نتصرف؟",
     "الآن أشعر بالدوخة كثيرا، لماذا؟ كيف نتصرف؟"),
    ("maghrebi", "شحال من حبة نقدر ناخد فالنهار؟ بغيت نعرف",
     "كم من حبة نقدر ناخد فالنهار؟ أريد أن أعرف"),
])
def test_patient_questions_per_dialect(dialect, question, msa):
    assert dialect in RULES[2]
    assert nd(question) == msa


def test_table_covers_four_dialects():
    counts = RULES[2]
    assert set(counts) == {"egyptian", "levantine", "gulf", "maghrebi"}
    assert min(counts.values()) >= 15 and sum(counts.values()) >= len(RULES[1])  # a form may have several rules
    # the examples of seed 003's brief, one per dialect word
    for word, msa in [("ازاي", "كيف"), ("عايز", "أريد"), ("دلوقتي", "الآن"), ("شو", "ماذا"), ("هلق", "الآن"),
                      ("بدي", "أريد"), ("شلون", "كيف"), ("وايد", "كثيرا"), ("واش", "هل"), ("بزاف", "كثيرا"),
                      ("دابا", "الآن")]:
        assert nd(word) == msa


def test_msa_text_of_the_sample_is_left_alone():
    # Every answer and every MSA question of data/sample (hand-written MSA): no rule may fire on them.
    dialect_qs = set(re.findall(r'"(?:eg|lv|gu):([^"]+)"',
                                open("data/sample/make_sample.py", encoding="utf-8").read()))
    texts = [t for f in ("train", "test") for r in data.load_records(f"data/sample/{f}.jsonl")
             for t in (r["answer"], r["question"]) if t not in dialect_qs]
    assert len(texts) > 600
    assert [t for t in texts if nd(t) != t] == []
    # ... while most of its dialect questions have at least one rule
    assert sum(nd(q) != q for q in dialect_qs) >= 40


def test_held_out_msa_is_left_alone():
    # >= 200 MSA medical sentences written for this test, with the MSA words the old rules broke (أية, آية,
    # زين, حدا, بحس, الحين, هادي, بدى, أوى, دوى, توا, مليح, ترجيع ...): not one word may change.
    sentences = dialect_eval.msa_sentences()
    assert len(sentences) >= 200 and len(set(sentences)) == len(sentences)
    assert [(t, nd(t)) for t in sentences if nd(t) != t] == []
    assert dialect_eval.measure(RULES)[1] == 0


def test_dialect_cases_precision_and_coverage():
    # Every change the rules make in tests/dialect_cases.tsv is the gold's; coverage has a floor per dialect
    # (the figures of the README's table come from `python tests/dialect_eval.py`).
    table, _ = dialect_eval.measure(RULES)
    assert set(table) == {"egyptian", "levantine", "gulf", "maghrebi"}
    for d, r in table.items():
        assert r["questions"] >= 10, d
        assert r["correct"] == r["changes"] > 0, (d, r)
        assert r["coverage"] >= 0.6, (d, r)
    wrong = [(q, nd(q), g) for _, q, g in dialect_eval.cases()
             if dialect_eval.score(q, g, nd(q))[0] != dialect_eval.score(q, g, nd(q))[1]]
    assert wrong == []


def test_out_of_sample_msa_is_left_alone():
    # issue 24: tests/oos (frozen before the rules changed): MSA of three registers; today's rules changed 15 / 7 / 4
    # words of the patient / doctor / news sentences before the change, now none
    for reg, path in dialect_eval.OOS_MSA.items():
        sentences = dialect_eval.msa_sentences(path)
        assert len(sentences) >= 60, reg
        assert [(t, nd(t)) for t in sentences if nd(t) != t] == [], reg


def test_out_of_sample_dialect_precision_and_coverage():
    # issue 24: 30 fresh questions per dialect with a gold MSA version (tests/oos/dialect_cases.tsv, frozen); before
    # the change precision was 94.5 % and coverage 46.8 % (egyptian 47, levantine 42, gulf 44, maghrebi 53 %)
    table, _ = dialect_eval.measure(RULES, case_path=dialect_eval.OOS_CASES)
    assert set(table) == {"egyptian", "levantine", "gulf", "maghrebi"}
    for d, r in table.items():
        assert r["questions"] >= 30, d
        assert r["precision"] >= 0.95, (d, r)
        assert r["coverage"] >= 0.6, (d, r)
    assert sum(r["normalised"] for r in table.values()) / sum(r["dialect_words"] for r in table.values()) >= 0.65


@pytest.mark.parametrize("text", [
    # issue 24's kinds of MSA words that a dialect form also spells
    "أشعر بدوار بين الحين والآخر",                   # a time expression, not Gulf "now"
    "أصبت بجرح بيميني", "شعرت بتحسن بتكويني", "بتخميني للأعراض",   # bi- + a possessed noun keeps its preposition
    "قدم لي أبي نصيحة", "طلب أبي استشارة طبية",        # "my father", not Gulf "I want"
    "الدكتور هادي الشمري", "أكد الدكتور هادي العمري",  # a name, not "this"
    "أعمل في بقالة صغيرة", "حصلت على منيحة دراسية",    # MSA nouns that a dialect word spells after the ة/ه fold
    "أوي إلى فراشي مبكرا",                             # a verb, not the intensifier
    "نقص فيتامين دي", "عندي كحة جافة", "تآكل الأسنان", "بأكل الخضار",
    "خذ خمسة مللي كل ست ساعات", "الجرعة 5 ملي لتر", "زين للناس حب الشهوات", "صورة في بعدين", "ولات حين مناص",
    "رأيته ماشيا في الممر", "شاهد عيان", "الزي الطبي", "بلا وصفة طبية", "حق المريض",
])
def test_issue24_msa_words(text):
    assert nd(text) == text


def test_no_prefix_rule_in_the_table():
    # issue 24: a b-/k- prefix rule (بي*ني) strips the preposition of MSA nouns (بيميني); the verbs are listed instead
    assert [key for key, _ in RULES[1] if "*" in key] == []


@pytest.mark.parametrize("text, msa", [
    ("بقالي أسبوع تعبان", "منذ أسبوع تعبان"), ("هادي الحبوب آمنة؟", "هذه الحبوب آمنة؟"),
    ("أبي نصيحة يا دكتور", "أريد نصيحة يا دكتور"), ("الحين وش أسوي؟", "الآن ماذا أفعل؟"),
    ("بطني بتوجعني أوي", "بطني تؤلمني جدا"), ("الدوا ده بيتعبني", "الدواء هذا يتعبني"),
    ("الحباية دي منيحة", "الحبة هذه جيدة"), ("الدوا كيقلقني", "الدواء يقلقني"),
    ("ابني ما بدو ياكل شي", "ابني لا يريد يأكل شيئا"), ("ملي كنفيق راسي تقيل", "عندما أستيقظ رأسي تقيل"),
])
def test_issue24_dialect_words(text, msa):
    assert nd(text) == msa


def test_dialect_eval_scores():
    # the scorer itself: a wrong change lowers precision, a missed word lowers coverage
    assert dialect_eval.score("عايز أعرف ليه", "أريد أن أعرف لماذا", "أريد أن أعرف لماذا") == (2, 2, 2, 2)
    assert dialect_eval.score("عايز أعرف ليه", "أريد أن أعرف لماذا", "أريد أن أعرف ليه") == (1, 1, 2, 1)
    assert dialect_eval.score("الدوا ده ليه اعراض", "الدواء هذا له اعراض", "الدواء هذا لماذا اعراض") == (3, 2, 3, 2)


@pytest.mark.parametrize("text, msa", [
    # issue 18: spelling variants folded into a rule turned MSA words into dialect ones
    ("هل توجد أية أعراض جانبية؟", "هل توجد أية أعراض جانبية؟"),        # أية (any) is not إيه (what)
    ("قرأت آية الكرسي", "قرأت آية الكرسي"),                              # آية (a verse, a name)
    ("أية أعراض تظهر أولا؟", "أية أعراض تظهر أولا؟"),                    # even where إيه would fire
    ("آية عندها حرارة", "آية عندها حرارة"), ("إيه الأعراض؟", "ماذا الأعراض؟"),
    ("ابنتي آية عندها حرارة", "ابنتي آية عندها حرارة"),
    ("زين طفل يشكو من ألم في الأذن", "زين طفل يشكو من ألم في الأذن"),    # the name زين
    ("وضع الطبيب حدا للألم", "وضع الطبيب حدا للألم"),                    # حدا (a limit)
    ("يتمتع الطبيب بحس عال بالمسؤولية", "يتمتع الطبيب بحس عال بالمسؤولية"),  # بحس (with a sense)
    # ... and rules that changed the meaning
    ("الدوا ده ليه اعراض", "الدواء هذا له اعراض"),                        # Egyptian ليه "has", not "why"
    ("بعمل رياضة عشان أخس", "بعمل رياضة لكي أخس"),                        # عشان "in order to", not لأن
    ("عشان أنا عندي سكر", "لأن أنا عندي سكر"),                           # ... and "because" where it is
    ("الجرح بدها خياطة؟", "الجرح بدها خياطة؟"),                           # Levantine بدها "it needs", not تريد
    ("ودي الحبوب آخدها إمتى؟", "ودي الحبوب آخدها متى؟"),                 # ودي "and this" stays, not أود
    ("أروح لدكتور إيه؟", "أروح لدكتور إيه؟"),                             # "which doctor", not دكتور ماذا
    ("مش بنام كويس", "لا أنام جيد"),                                     # مش before a verb: لا, not غير
    ("الدورة مش منتظمة", "الدورة ليس منتظمة"),
    # missed words and prefixes
    ("امبارح بطني بيوجعني", "أمس بطني يؤلمني"),
    ("صارلي يومين تعبان بس الحرارة نزلت", "منذ يومين تعبان بس الحرارة نزلت"),
    ("بس الحرارة نزلت", "بس الحرارة نزلت"),                              # بس ("but" / "only"): left as written
    ("ولدي يعوره بطنه", "ولدي يؤلمه بطنه"),
    ("وش السبب؟", "ماذا السبب؟"), ("الحين وش أسوي؟", "الآن ماذا أفعل؟"),
    ("منذ ذلك الحين", "منذ ذلك الحين"),                                  # MSA الحين (that time)
    ("هادي الحبوب آمنة؟", "هذه الحبوب آمنة؟"), ("هادي طفل هادئ", "هادي طفل هادئ"),
    ("راسي كيضرني، خاصني نعرف", "رأسي يؤلمني، يجب علي نعرف"),
    ("الدوا كيقلقني", "الدواء يقلقني"), ("بيتعبني", "يتعبني"), ("بيني وبينه", "بيني وبينه"),
    ("رح يخف الوجع؟", "سوف يخف الوجع؟"), ("رح إلى الطبيب", "رح إلى الطبيب"),
])
def test_issue18_regressions(text, msa):
    assert nd(text) == msa


def test_rule_format(tmp_path):
    p = tmp_path / "rules.txt"
    p.write_text("[x]\n"
                 "ايه | إيه == ماذا  if prev: <start> اعمل   # exact spellings, a condition\n"
                 "ليه = له  if prev: ده\n"
                 "ليه = لماذا  if next: <end>\n"
                 "حدا = أحد  if prev: في; not next: به\n"
                 "بي*ني = ي*ني\n", encoding="utf-8")
    rules = prepare.load_dialect_rules(p)
    assert rules[2] == {"x": 5}
    f = lambda t: prepare.normalize_dialect(t, rules)  # noqa: E731
    assert f("إيه ده؟ اعمل ايه") == "ماذا ده؟ اعمل ماذا" and f("أية آية اية") == "أية آية اية"
    assert f("طب إيه") == "طب إيه"                                     # no condition holds: as written
    assert f("ده ليه اعراض، ليه؟") == "ده له اعراض، لماذا؟" and f("ليه اعراض") == "ليه اعراض"
    assert f("في حدا؟ في حدا به") == "في أحد؟ في حدا به"              # both conditions must hold
    assert f("بيوجعني بيني وبيوجعني") == "يوجعني بيني ويوجعني"          # stem copied, 2+ letters, و kept


    assert nd("مشمش وشوربة وتشوف ودهون") == "مشمش وشوربة وتشوف ودهون"   # never inside a longer word
    assert nd("عايز اعرف") == "أريد أن أعرف" and nd("عايز  \n أعرف") == "أريد أن أعرف"  # longest first, any spacing
    assert nd("إِزَّاي") == "كيف" and nd("عايـــز") == "أريد"           # tashkeel and tatweel ignored
    assert nd("عايزة") == nd("عايزه") == "أريد" and nd("إمتى") == nd("امتي") == "متى"  # ة/ه, أ/ا, ى/ي
    assert nd("وعايز وبزاف") == "وأريد وكثيرا"                          # the conjunction و is kept
    assert nd("وايد ودي أعرف") == "كثيرا أود أن أعرف"                   # و that belongs to the form is not split off
    assert nd("شو؟ (شو) شو.") == "ماذا؟ (ماذا) ماذا."                    # punctuation is a boundary
    assert nd("ما عندي شيء") == "ما عندي شيء"


def test_one_pass_and_custom_table(tmp_path):
    p = tmp_path / "rules.txt"
    p.write_text("# test\n[x]\nابي = بدي   # chains are not followed\nبدي = أريد\n\n[y]\nكتير اوي = جدا جدا\n",
                 encoding="utf-8")
    rules = prepare.load_dialect_rules(p)
    assert rules[2] == {"x": 2, "y": 1}
    assert prepare.normalize_dialect("ابي بدي كتير   اوي", rules) == "بدي أريد جدا جدا"


@pytest.mark.parametrize("text, line, words", [
    ("ازاي = كيف\n", 1, "before the first [dialect]"),
    ("[e]\nازاي كيف\n", 2, "expected 'dialect form = MSA form'"),
    ("[e]\nازاي =\n", 2, "expected"),
    ("[e]\nok = كيف\n", 2, "is not Arabic words"),
    ("[e]\nعايزة = أريد\n# x\nعايزه = أريد\n", 4, "repeats the form of line 2"),   # equal up to ة/ه
    ("[e]\n# nothing\n", 1, "no rules"),
    ("[e]\nليه = له if prev ده\n", 2, "expected a condition"),
    ("[e]\nليه = له if after: ده\n", 2, "expected a condition"),
    ("[e]\nليه | ليه = له\n", 2, "need '=='"),
    ("[e]\nبي*ني = يني\n", 2, "a * in the form"),
    ("[e]\nليه = لماذا\nليه = له if prev: ده\n", 3, "which has no condition"),
    ("[e]\nايه | إيه == ماذا\nايه = ماذا\n", 3, "repeats the form of line 2"),
])
def test_bad_tables(tmp_path, text, line, words):
    p = tmp_path / "rules.txt"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(cli.DataError) as e:
        prepare.load_dialect_rules(p)
    assert str(e.value).startswith(f"{p}:{line}: rule: ") and words in str(e.value)


def qa_rows(tmp_path):
    rows = [["عايز أعرف إزاي أخس", "الرياضة والأكل الصحي."],
            ["أريد أن أعرف كيف أخس", "الرياضة والأكل الصحي."],   # the same pair once the rules ran: both kept
            ["شو سبب الصداع؟", "قلة النوم أو التوتر."],
            ["واش كاين دوا؟ عايز أعرف", "اسأل الصيدلي، عايز الطبيب يشوفك."],  # answers are never rewritten
            ["ما سبب الحمى؟", "عدوى في أغلب الأحوال."],
            ["شلون أنام زين؟", "نم في موعد ثابت."]]
    import csv
    src = tmp_path / "qa.csv"
    with open(src, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([["question", "answer"]] + rows)
    return src


def run(tmp_path, name, *flags):
    out = tmp_path / name
    prepare.main(["--input", str(qa_rows(tmp_path)), "--out", str(out), "--n-train", "4", "--n-test", "2",
                  "--seed", "5", *flags])
    recs = [json.loads(ln) for f in ("test.jsonl", "train.jsonl")
            for ln in (out / f).read_text(encoding="utf-8").splitlines()]
    return recs, json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def test_prepare_dialect_end_to_end(tmp_path):
    plain, m0 = run(tmp_path, "plain")
    dial, m1 = run(tmp_path, "dialect", "--normalize", "dialect")
    both, m2 = run(tmp_path, "both", "--normalize", "orthographic", "dialect")
    assert m0["dialect"] is None and m0["normalize"] is False
    # the same pairs in the same order (the split does not depend on the rules); only questions differ
    assert [r["answer"] for r in dial] == [r["answer"] for r in plain]
    assert [nd(r["question"]) for r in plain] == [r["question"] for r in dial]
    assert "اسأل الصيدلي، عايز الطبيب يشوفك." in {r["answer"] for r in dial}
    assert {r["question"] for r in dial} >= {"أريد أن أعرف كيف أخس", "ماذا سبب الصداع؟", "هل يوجد دواء؟ أريد أن أعرف"}
    assert m1["normalize"] is False and m1["dialect"]["questions_changed"] == 4
    assert m1["dialect"]["rules_sha256"] == outputs.sha256(prepare.DIALECT_RULES)
    assert m1["dialect"]["rules"] == "data/dialect_rules.txt"
    assert m1["dialect"]["rules_per_dialect"] == RULES[2]
    # with orthographic too, the MSA replacements are spelled like the rest (أ -> ا, ة -> ه ...)
    assert m2["normalize"] is True and "اريد ان اعرف كيف اخس" in {r["question"] for r in both}
    assert [r["question"] for r in both] == [prepare.normalize_arabic(r["question"]) for r in dial]


def test_prepare_dialect_bad_input(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        prepare.main(["--input", str(qa_rows(tmp_path)), "--out", str(out), "--normalize", "dialect",
                      "--dialect-rules", str(tmp_path / "missing.txt")])
    assert e.value.code == 2 and not out.exists()
    assert capsys.readouterr().err == f"error: --dialect-rules: {tmp_path / 'missing.txt'}: no such file\n"
    with pytest.raises(SystemExit) as e:
        prepare.main(["--input", str(qa_rows(tmp_path)), "--out", str(out), "--normalize", "slang"])
    assert e.value.code == 2 and "slang" in capsys.readouterr().err and not out.exists()


def test_prepare_custom_table(tmp_path):
    table = tmp_path / "mine.txt"
    table.write_text("[levantine]\nشو = ما\n", encoding="utf-8")
    recs, m = run(tmp_path, "custom", "--normalize", "dialect", "--dialect-rules", str(table))
    assert m["dialect"] == {"rules": str(table), "rules_sha256": outputs.sha256(table),
                            "rules_per_dialect": {"levantine": 1}, "questions_changed": 1}
    assert "ما سبب الصداع؟" in {r["question"] for r in recs} and "شلون أنام زين؟" in {r["question"] for r in recs}


# -- the de-duplication key and NFKC (issue 24) --------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))


def unicode_pairs():
    rows = []
    with open(os.path.join(HERE, "oos", "unicode_pairs.tsv"), encoding="utf-8") as fh:
        for ln in fh:
            if ln.strip() and not ln.startswith("#"):
                kind, a, b, what = ln.rstrip("\n").split("\t")
                dec = lambda s: re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), s)  # noqa: E731
                rows.append((kind, dec(a), dec(b), what))
    return rows


PAIRS = unicode_pairs()


@pytest.mark.parametrize("kind, a, b, what", PAIRS, ids=[p[3] for p in PAIRS])
def test_key_pairs(kind, a, b, what):
    assert kind in ("same", "differ")
    key = prepare.dedup_key
    same = key(a, "x") == key(b, "x") and key("x", a) == key("x", b)
    assert same == (kind == "same"), what


def test_pairs_cover_the_issue():
    assert len(PAIRS) >= 28 and sum(k == "differ" for k, *_ in PAIRS) >= 6


def test_unicode_fold_and_normalize():
    n = prepare.normalize_arabic
    assert n("مو\u0654لم") == "مؤلم" and n("بيي\u0654ة") == "بيئه"       # decomposed hamza kept as the letter
    assert n("\uFEFB \uFDF2 \uFDFA") == "لا الله صلي الله عليه وسلم"     # ligatures
    assert n("\uFDFD") == "بسم الله الرحمن الرحيم"                      # no NFKC form: spelled out
    assert n("\uFEB9\uFEA9\uFE8D\uFEC9 \uFF13\uFF18") == "صداع 38"       # presentation forms, fullwidth digits
    assert n("٣٨ کحة") == "٣٨ کحه"        # the text keeps its digits and letters; only the key folds them
    assert prepare.text_key("٣٨ ۳۸ کحة یوم ABC") == "38 38 كحه يوم abc"


def camel_golden():
    with open(os.path.join(HERE, "golden", "camel_normalize.jsonl"), encoding="utf-8") as fh:
        return [json.loads(ln) for ln in fh]


def test_camel_golden():
    rows = camel_golden()
    assert len(rows) >= 40
    bad = [(r["text"], prepare.normalize_arabic(r["text"]), r["want"]) for r in rows
           if prepare.normalize_arabic(r["text"]) != " ".join(r["want"].split())]
    assert bad == []


def test_against_camel_tools():
    pytest.importorskip("camel_tools.utils.dediac")
    import sys
    sys.path.insert(0, os.path.join(HERE, "golden"))
    import inputs
    import make_golden
    texts = inputs.CAMEL_INPUTS + [a for _, a, b, _ in PAIRS if "\u0640" not in a and "\u200f" not in a]
    assert [(t, prepare.normalize_arabic(t)) for t in texts
            if prepare.normalize_arabic(t) != " ".join(make_golden.camel_chain(t).split())] == []


def test_prepare_merges_unicode_twins(tmp_path):
    src = tmp_path / "qa.csv"
    rows = [["هل الدواء مؤلم؟", "الجرعة ٥٠٠ ملغ"], ["هل الدواء مو\u0654لم؟", "الجرعة 500 ملغ"],
            ["\uFEFB أستطيع النوم", "کحة"], ["لا أستطيع النوم", "كحة"], ["سؤال", "جواب"], ["سؤال آخر", "جواب آخر"]]
    with open(src, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([["question", "answer"]] + rows)
    out = tmp_path / "out"
    prepare.main(["--input", str(src), "--out", str(out), "--n-train", "2", "--n-test", "2"])
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert m["duplicates_removed"] == 2 and m["rows_after_dedup"] == 4
