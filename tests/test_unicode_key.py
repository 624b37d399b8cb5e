"""Issue 24: Unicode normalisation (NFKC first, then the project's rules) in data/prepare.py's normalize_arabic and
the de-duplication key (digits and Persian ک/ی folded too).

- tests/oos/unicode_pairs.tsv (frozen, written before the key changed): pairs that must get the same key and pairs
  that must not; the key before this change got 16 of 32 right.
- camel-tools as the reference where it covers the same steps (normalize_unicode, dediac_ar, normalize_alef_ar,
  normalize_alef_maksura_ar, normalize_teh_marbuta_ar): always the golden table tests/golden/camel_normalize.jsonl
  (tests/golden/make_golden.py made it), and the package itself when it is installed (test-only:
  pip install --no-deps camel-tools==1.6.0 six==1.17.0 emoji==2.16.0)."""
import csv
import json
import os
import re

import pytest

from data import prepare

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
