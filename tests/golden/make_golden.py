"""Record the reference outputs the tests compare with, once, from the reference packages (test-only, never
runtime dependencies of the project):

    pip install --no-deps arabert==1.0.1 pyarabic==0.6.15 camel-tools==1.6.0 six==1.17.0 emoji==2.16.0
    python tests/golden/make_golden.py            # rewrites tests/golden/*.jsonl

arabert_preprocess.jsonl   {"text", "want"}: ArabertPreprocessor("bert-base-arabertv02").preprocess(text)
camel_normalize.jsonl      {"text", "want"}: camel-tools' normalize_unicode -> dediac_ar -> normalize_alef_ar ->
                           normalize_alef_maksura_ar -> normalize_teh_marbuta_ar (the steps data/prepare.py's
                           normalize_arabic shares with camel-tools), on strings where no other step applies
The inputs are the lists in tests/golden/inputs.py.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import inputs  # noqa: E402


def camel_chain(text):
    from camel_tools.utils.dediac import dediac_ar
    from camel_tools.utils.normalize import (normalize_alef_ar, normalize_alef_maksura_ar, normalize_teh_marbuta_ar,
                                             normalize_unicode)
    return normalize_teh_marbuta_ar(normalize_alef_maksura_ar(normalize_alef_ar(dediac_ar(normalize_unicode(text)))))


def write(name, rows):
    with open(os.path.join(HERE, name), "w", encoding="utf-8") as fh:
        for text, want in rows:
            fh.write(json.dumps({"text": text, "want": want}, ensure_ascii=True) + "\n")
    print(f"{name}: {len(rows)} rows")


def main():
    from arabert.preprocess import ArabertPreprocessor
    pre = ArabertPreprocessor("bert-base-arabertv02")
    write("arabert_preprocess.jsonl", [(t, pre.preprocess(t)) for t in inputs.arabert_inputs()])
    write("camel_normalize.jsonl", [(t, camel_chain(t)) for t in inputs.CAMEL_INPUTS])


if __name__ == "__main__":
    main()
