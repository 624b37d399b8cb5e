"""Precision and coverage of data/dialect_rules.txt, per dialect, and its changes to MSA text.

    python tests/dialect_eval.py            # prints the README's table (markdown)
    python tests/dialect_eval.py --oos      # the same on tests/oos/ (issue 24's frozen out-of-sample set)

Inputs: tests/dialect_cases.tsv (dialect, question, gold MSA) and tests/msa_sentences.txt (held-out MSA).
Words are compared as whitespace-separated tokens, input against output and input against gold, with difflib:
  - a change is one differing span of the rules' output (e.g. "عايز أعرف" -> "أريد أن أعرف");
    it is correct when the gold changes the same input words to the same words;
  - precision = correct changes / changes; coverage = dialect words (input words the gold changes) inside a
    correct change / dialect words; MSA changes = words of the MSA sentences that the rules change.
"""
import difflib
import os
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from data import prepare  # noqa: E402

CASES = os.path.join(HERE, "dialect_cases.tsv")
MSA = os.path.join(HERE, "msa_sentences.txt")
OOS = os.path.join(HERE, "oos")   # frozen out-of-sample set of issue 24 (tests/oos/README.md)
OOS_CASES = os.path.join(OOS, "dialect_cases.tsv")
OOS_MSA = {reg: os.path.join(OOS, f"msa_{reg}.txt") for reg in ("patient", "doctor", "news")}


def read_lines(path):
    with open(path, encoding="utf-8") as fh:
        return [ln.rstrip("\n") for ln in fh if ln.strip() and not ln.startswith("#")]


def cases(path=CASES):
    """[(dialect, question, gold)] of tests/dialect_cases.tsv (or another table of that format)."""
    return [tuple(ln.split("\t")) for ln in read_lines(path)]


def msa_sentences(path=MSA):
    return read_lines(path)


def changes(src, dst):
    """The changed spans src -> dst as [(i1, i2, j1, j2)] over the word lists (difflib). A span that keeps
    the number of words is split into one-word changes, so neighbouring rules are judged one by one."""
    a, b = src.split(), dst.split()
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        if i2 - i1 == j2 - j1:
            out += [(i1 + k, i1 + k + 1, j1 + k, j1 + k + 1) for k in range(i2 - i1) if a[i1 + k] != b[j1 + k]]
        else:
            out.append((i1, i2, j1, j2))
    return out


def score(question, gold, output):
    """(changes, correct changes, dialect words, dialect words normalised) of one question.
    A change of the rules is correct when its new words are where the gold has them (output and gold equal
    there); dialect words are the input words the gold changes; one is normalised when a correct change
    covers it."""
    made = changes(question, output)
    same = set()  # output word positions that match the gold
    for op, i1, i2, _, _ in difflib.SequenceMatcher(None, output.split(), gold.split(),
                                                    autojunk=False).get_opcodes():
        if op == "equal":
            same |= set(range(i1, i2))
    correct = [(i1, i2) for i1, i2, j1, j2 in made if all(j in same for j in range(j1, j2))]
    dialect_words = {i for i1, i2, _, _ in changes(question, gold) for i in range(i1, i2)}
    covered = {i for i1, i2 in correct for i in range(i1, i2)}
    return len(made), len(correct), len(dialect_words), len(covered & dialect_words)


def msa_changed(sentences, rules):
    """Words of the MSA sentences that the rules change."""
    return sum(i2 - i1 for t in sentences for i1, i2, _, _ in changes(t, prepare.normalize_dialect(t, rules)))


def measure(rules=None, case_path=CASES, msa_path=MSA):
    """{dialect: {questions, changes, correct, precision, dialect_words, normalised, coverage}},
    and the number of words of the MSA sentences the rules change."""
    rules = rules or prepare.load_dialect_rules()
    sums = defaultdict(lambda: [0, 0, 0, 0, 0])
    for dialect, q, gold in cases(case_path):
        s = sums[dialect]
        s[0] += 1
        for k, v in enumerate(score(q, gold, prepare.normalize_dialect(q, rules)), 1):
            s[k] += v
    table = {d: {"questions": s[0], "changes": s[1], "correct": s[2], "precision": s[2] / s[1] if s[1] else 1.0,
                 "dialect_words": s[3], "normalised": s[4], "coverage": s[4] / s[3] if s[3] else 1.0}
             for d, s in sums.items()}
    return table, msa_changed(msa_sentences(msa_path), rules)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    oos = "--oos" in argv
    table, n_changed = measure(case_path=OOS_CASES if oos else CASES)
    if oos:
        rules = prepare.load_dialect_rules()
    print("| dialect | questions | changes (correct / all) | precision | dialect words normalised | coverage |")
    print("|---|---|---|---|---|---|")
    for d, r in table.items():
        print(f"| {d} | {r['questions']} | {r['correct']} / {r['changes']} | {r['precision']:.0%} "
              f"| {r['normalised']} / {r['dialect_words']} | {r['coverage']:.0%} |")
    all_c = sum(r["correct"] for r in table.values()), sum(r["changes"] for r in table.values())
    all_w = sum(r["normalised"] for r in table.values()), sum(r["dialect_words"] for r in table.values())
    print(f"| all | {sum(r['questions'] for r in table.values())} | {all_c[0]} / {all_c[1]} | "
          f"{all_c[0] / max(1, all_c[1]):.1%} | {all_w[0]} / {all_w[1]} | {all_w[0] / max(1, all_w[1]):.1%} |")
    if oos:
        print("\n| MSA register | sentences | words | words changed |\n|---|---|---|---|")
        for reg, path in OOS_MSA.items():
            sents = msa_sentences(path)
            print(f"| {reg} | {len(sents)} | {sum(len(t.split()) for t in sents)} | {msa_changed(sents, rules)} |")
    else:
        words = sum(len(t.split()) for t in msa_sentences())
        print(f"\nMSA sentences: {len(msa_sentences())} ({words} words), words changed: {n_changed}")


if __name__ == "__main__":
    main()
