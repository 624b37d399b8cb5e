"""One flag vocabulary and one reader across the scripts (issue 26): the same concept has the same flag in every
script that has it, old spellings still parse (hidden), --help shows a default only where there is one and the
description once, a mistyped flag gets a "did you mean", and every script reads every table format, the authors'
own layouts included, with a missing column named together with the columns found and the flag to give."""
import json
import os
import subprocess
import sys

import pytest

import annotate
import bench
import classify
import cli
import data
import evaluate
import train
from data import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARSERS = {"train": train.get_args, "classify": classify.get_args, "annotate": annotate.get_args,
           "evaluate": evaluate.get_args, "prepare": prepare.parse_args, "bench": bench.get_args}
# the vocabulary: a concept -> its one flag, in every script that has the concept
VOCABULARY = {
    "input file": ("--data", {"train", "classify", "annotate", "evaluate", "prepare"}),
    "question column": ("--question-col", {"train", "classify", "annotate", "evaluate", "prepare"}),
    "answer column": ("--answer-col", {"train", "classify", "annotate", "evaluate", "prepare"}),
    "tokens per sequence": ("--max-len", {"train", "classify", "annotate", "evaluate", "bench"}),
    "new tokens per answer": ("--max-new-tokens", {"evaluate", "bench"}),
    "warm-up": ("--warmup", {"train", "classify"}),
    "batch": ("--batch-size", {"train", "classify", "annotate", "evaluate", "bench"}),
}
OLD_NAMES = ["--text-col", "--input", "--warmup-frac", "--seq-len", "--new-tokens", "--gen-batch"]


def parser_of(get_args):
    """The ArgumentParser a script's get_args builds (captured at parse time, nothing run)."""
    seen = {}
    real = cli.ArgumentParser.parse_args

    def grab(self, *a, **k):
        seen["p"] = self
        raise SystemExit(0)
    cli.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            get_args(["--out", "x"])
    finally:
        cli.ArgumentParser.parse_args = real
    return seen["p"]


def helps(script):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120).stdout


@pytest.mark.parametrize("concept", sorted(VOCABULARY))
def test_one_flag_per_concept(concept):
    flag, scripts = VOCABULARY[concept]
    for name, get_args in PARSERS.items():
        flags = {o for a in parser_of(get_args)._actions for o in a.option_strings if a.help is not cli.argparse.SUPPRESS}
        if name in scripts:
            assert flag in flags, f"{name}.py has no {flag} ({concept})"
        assert not set(OLD_NAMES) & flags, f"{name}.py shows an old flag name: {set(OLD_NAMES) & flags}"


@pytest.mark.parametrize("script", ["train.py", "classify.py", "annotate.py", "evaluate.py", "report.py",
                                    "data/prepare.py", "bench.py"])
def test_help_shows_a_default_only_where_there_is_one(script):
    text = helps(script)
    assert "(default: None)" not in text and "(default: False)" not in text, text
    flat = " ".join(text.split())
    assert "(default: off) (default" not in flat
    for chunk in flat.split(" --")[1:]:   # one flag's help: never two defaults
        assert chunk.count("(default:") <= 1, chunk
    first = [ln for ln in text.split("\n\n") if ln.strip() and not ln.startswith("usage:")][0].strip()
    assert text.count(first) == 1, f"description printed {text.count(first)} times: {first!r}"


def test_a_mistyped_flag_gets_a_did_you_mean(capsys):
    with pytest.raises(SystemExit) as e:
        train.get_args(["--max-lenn", "64"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == "error: unrecognized arguments: --max-lenn 64 (did you mean --max-len?)"
    with pytest.raises(SystemExit):
        train.get_args(["--zzzzzz"])
    assert "did you mean" not in capsys.readouterr().err   # nothing close: no guess


def test_old_spellings_still_parse_as_the_new_flag():
    a = classify.get_args(["--text-col", "Post", "--warmup-frac", "0.25"])
    assert a.question_col == "Post" and a.warmup == "25%" and cli.warmup_steps(a.warmup, 100) == 25
    assert classify.get_args([]).warmup == "10%" and cli.warmup_steps("10%", 8000) == 800
    assert prepare.parse_args(["--input", "x.csv", "--out", "o"]).input == "x.csv"
    assert annotate.get_args(["x.jsonl", "--out", "o.jsonl"]).input == "x.jsonl"
    assert annotate.get_args(["--data", "x.jsonl", "--out", "o.jsonl"]).input == "x.jsonl"
    assert train.get_args(["--warmup", "5%"]).warmup == "5%" and train.get_args(["--warmup", "7"]).warmup == 7
    b = bench.get_args(["--seq-len", "64", "--new-tokens", "9", "--gen-batch", "3"])
    assert (b.max_len, b.max_new_tokens, b.gen_batch_size) == (64, 9, 3)


@pytest.mark.parametrize("bad", ["-1", "101%", "x%", "1.5"])
def test_warmup_refuses_what_is_neither_steps_nor_a_share(bad, capsys):
    with pytest.raises(SystemExit):
        train.get_args(["--warmup", bad])
    assert capsys.readouterr().err.startswith("error: argument --warmup")


def test_presets_and_settings_in_any_case():
    assert data.parse_weights("Balanced") == data.parse_weights("balanced") == (0.5, 1.0, 1.5)
    assert evaluate.get_args(["--setting", "balanced"]).setting == "Balanced"
    assert evaluate.get_args(["--setting", "CUSTOM"]).setting == "custom"


def write_xlsx(path, rows):
    import openpyxl
    wb = openpyxl.Workbook()
    for r in rows:
        wb.active.append(r)
    wb.save(path)
    return str(path)


def test_the_authors_expert_labels_xlsx_straight_into_the_classifier(tmp_path):
    """Columns ID, Post, Type, Severity, Diagnosis, Plan; Arabic labels: read as text + canonical severity."""
    f = write_xlsx(tmp_path / "labels.xlsx", [
        ["ID", "Post", "Type", "Severity", "Diagnosis", "Plan"],
        [1, "ألم شديد في الصدر منذ ساعة", "x", "حرج", "d", "p"],
        [2, "حكة خفيفة في اليد", "x", "غير حرج", "d", "p"],
        [3, "صداع متكرر في المساء", "x", "متوسط", "d", "p"]])
    texts, answers, y, labels = classify.read_labelled(f)
    assert labels == list(data.SEVERITIES) and y == [2, 0, 1] and texts[0] == "ألم شديد في الصدر منذ ساعة"
    assert answers is None


def test_the_authors_annotated_xlsx_straight_into_training(tmp_path):
    f = write_xlsx(tmp_path / "annotated.xlsx", [
        ["Question", "Answer", "غير حرج", "متوسط", "حرج"],
        ["ما علاج الصداع؟", "الراحة وشرب الماء.", 0.7, 0.2, 0.1],
        ["ألم في الصدر", "راجع الطوارئ فورا.", 0.05, 0.15, 0.8]])
    recs = data.load_records(f)
    assert [r["severity"] for r in recs] == ["non-critical", "critical"] and recs[1]["p_c"] == pytest.approx(0.8)


CSV_WRONG = "q,a,p_nc,p_n,p_c\nسؤال,جواب,0.2,0.3,0.5\n"


@pytest.mark.parametrize("reader, flag", [
    (lambda f: data.load_records(f), "--question-col"),
    (lambda f: annotate.read_questions(f), "--question-col"),
    (lambda f: classify.read_labelled(f), "--question-col"),
])
def test_a_missing_column_lists_the_columns_found_and_the_flag(tmp_path, reader, flag):
    f = tmp_path / "d.csv"
    f.write_text(CSV_WRONG, encoding="utf-8")
    with pytest.raises(cli.DataError) as e:
        reader(str(f))
    msg = str(e.value)
    assert msg.startswith(f"{f}:2: ") and "columns found: q, a, p_nc, p_n, p_c" in msg and flag in msg, msg


def test_named_columns_are_read_by_every_script(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text(CSV_WRONG, encoding="utf-8")
    assert data.load_records(str(f), question_col="q", answer_col="a")[0]["question"] == "سؤال"
    assert data.load_records(str(f), question_col="Q", answer_col="A")[0]["answer"] == "جواب"   # any case
    with pytest.raises(cli.DataError, match="no such column .*check --question-col"):
        data.load_records(str(f), question_col="question_text", answer_col="a")


def test_classify_resolves_its_default_data_from_the_project_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = classify.get_args([])
    assert os.path.isabs(a.data) and os.path.isfile(a.data)


def test_a_random_encoder_gets_a_from_scratch_lr(tmp_path):
    out = tmp_path / "clf"
    classify.main(["--model", "tiny", "--epochs", "1", "--max-len", "32", "--device", "cpu", "--out", str(out),
                   "--quiet"])
    args = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["args"]
    assert args["lr"] == 1e-3 and args["warmup"] == "10%"
