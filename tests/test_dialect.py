"""data/prepare.py --normalize dialect (seed 003): the rules table data/dialect_rules.txt and how it is applied.

Each dialect is checked on hand-written patient questions (synthetic, not medical advice) whose MSA version was
worked out by hand; tests/dialect_cases.tsv adds per-dialect questions with a gold MSA version, scored by
tests/dialect_eval.py (every change must be right; coverage has a floor); tests/msa_sentences.txt is held-out
MSA medical text that must come out unchanged; the wrong mappings of issue 18 are regression cases; the matching
rules (whole words, spelling variants, exact spellings, conditions, prefix rules, longest form first, one pass,
the conjunction و) on small cases; and prepare.py end to end: questions change, answers and the split do not.
"""
import json
import re

import pytest

import cli
import data
import outputs
import dialect_eval
from data import prepare

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
