"""data.arabert_preprocess: equal to the arabert package's ArabertPreprocessor("bert-base-arabertv02").preprocess.

Always against the golden table tests/golden/arabert_preprocess.jsonl (325 strings: punctuation spacing, Arabic-Indic
digits, letter repetition, tashkeel, tatweel, emoji, English, URLs, e-mails, mentions, HTML, mixed), recorded with
the command in tests/golden/make_golden.py; and against the package itself when it is installed (a test-only
reference: pip install --no-deps arabert==1.0.1 pyarabic==0.6.15)."""
import json
import os
import random

import pytest

import data

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "arabert_preprocess.jsonl")


def golden():
    with open(GOLDEN, encoding="utf-8") as fh:
        return [json.loads(ln) for ln in fh]


def test_golden_table():
    rows = golden()
    assert len(rows) >= 200
    assert [(r["text"], data.arabert_preprocess(r["text"])) for r in rows
            if data.arabert_preprocess(r["text"]) != r["want"]] == []


def test_golden_inputs_are_the_listed_ones():
    # the table was made from tests/golden/inputs.py (so it can be recorded again with the same inputs)
    import sys
    sys.path.insert(0, os.path.dirname(GOLDEN))
    import inputs
    assert [r["text"] for r in golden()] == inputs.arabert_inputs()


@pytest.mark.parametrize("text, want", [
    ("ما سبب الصداع؟", "ما سبب الصداع ؟"),
    ("الجرعة ٥٠٠ملغ", "الجرعة 500 ملغ"),
    ("مممممتاز جداااا", "ممتاز جداا"),
    ("الطَّبِيبُ طـــيب", "الطبيب طيب"),
    ("شكرا 😀 https://x.com/a", "شكرا [رابط]"),
    ("راسلني a@b.org و @dr", "راسلني [رابط] و [مستخدم]"),   # as the package: the link rule comes first
    ("اكتب إلى a_b@c", "اكتب إلى [بريد]"),
    ("الضغط 120/80", "الضغط 120 - 80"),
    ("&amp; <b>نص</b>", "نص"),                                 # & is outside the alphabet
])
def test_steps(text, want):
    assert data.arabert_preprocess(text) == want


def test_against_the_package():
    pre = pytest.importorskip("arabert.preprocess").ArabertPreprocessor("bert-base-arabertv02")
    texts = [r["text"] for r in golden()]
    pool = list("ابتثجحخدذرزسشصضطظعغفقكلمنهويىةءأإآؤئ ًٌٍَُِّْـٰٔ٠١٢٣٤٥٦٧٨٩0123456789abcXYZ.,:;!?؟،؛-_/\\#$%&*()[]"
                "{}<>\"'«»“”…–—~^|+=\n\t😀❤️ﻻﷲ۱ک٪·") + ["http://", "www.", ".com", "&amp;", "<br />", "@x", "a@b.c"]
    rnd = random.Random(7)
    texts += ["".join(rnd.choice(pool) for _ in range(rnd.randint(0, 25))) for _ in range(3000)]
    assert [(t, data.arabert_preprocess(t), pre.preprocess(t)) for t in texts
            if data.arabert_preprocess(t) != pre.preprocess(t)] == []
