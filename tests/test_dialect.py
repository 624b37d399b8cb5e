"""data/prepare.py --normalize dialect (seed 003): the rules table data/dialect_rules.txt and how it is applied.

Each dialect is checked on hand-written patient questions (synthetic, not medical advice) whose MSA version was
worked out by hand from the table; the matching rules (whole words, spelling variants, longest form first, one
pass, the conjunction و) on small cases; and prepare.py end to end: questions change, answers and the split do not.
"""
import json
import re

import pytest

import data
from data import prepare

RULES = prepare.load_dialect_rules()


def nd(text):
    return prepare.normalize_dialect(text, RULES)


@pytest.mark.parametrize("dialect, question, msa", [
    ("egyptian", "عايز أعرف إزاي أخس خمسة كيلو بطريقة صحية",
     "أريد أن أعرف كيف أخس خمسة كيلو بطريقة صحية"),
    ("egyptian", "بقالي أسبوع عندي سخونية بالليل ومش قادر أنام كويس، أعمل إيه دلوقتي؟",
     "منذ أسبوع عندي حمى بالليل وغير قادر أنام جيد، أعمل ماذا الآن؟"),
    ("egyptian", "ابني عنده كحة من شوية وعايزة أعرف الدوا ده آمن؟",
     "ابني عنده سعال منذ قليل وأريد أن أعرف الدواء هذا آمن؟"),
    ("levantine", "صرلي أسبوع بحس بدوخة، شو لازم أعمل هلق؟",
     "منذ أسبوع أشعر بدوخة، ماذا لازم أعمل الآن؟"),
    ("levantine", "بدي أعرف ليش بنتي بتسعل كتير بالليل",
     "أريد أن أعرف لماذا بنتي بتسعل كثيرا بالليل"),
    ("levantine", "هاد الدوا منيح للحامل؟ وين بلاقيه؟",
     "هذا الدواء جيد للحامل؟ أين بلاقيه؟"),
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
    assert min(counts.values()) >= 15 and sum(counts.values()) == len(RULES[1])
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


def test_matching_rules():
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
])
def test_bad_tables(tmp_path, text, line, words):
    p = tmp_path / "rules.txt"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(data.DataError) as e:
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
    assert m1["dialect"]["rules_sha256"] == data.sha256(prepare.DIALECT_RULES)
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
    assert m["dialect"] == {"rules": str(table), "rules_sha256": data.sha256(table),
                            "rules_per_dialect": {"levantine": 1}, "questions_changed": 1}
    assert "ما سبب الصداع؟" in {r["question"] for r in recs} and "شلون أنام زين؟" in {r["question"] for r in recs}
