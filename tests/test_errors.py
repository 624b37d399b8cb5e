"""The command-line contract of every script (README "Bad input"), table-driven.

Each case runs one script's real command line -- main(argv), i.e. argparse and everything after it -- and asserts
what the user must see: exit status 2, exactly one stderr line starting with "error:", no traceback, and nothing
written (the case's folder is byte-for-byte what it was before). Most cases run in-process (one pytest process,
many cases: cheap); a few go through a real `python script.py` subprocess. Divergence, resume refusals, a cut log
line, a corrupt resume state, the umask and --lr 0: tests/test_checkpoint.py.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

import annotate
import bench
import classify
import cli
import data
import evaluate
import report
import train
from data import prepare

from conftest import assert_contract, call, snapshot

pytestmark = pytest.mark.usefixtures("threads_and_signals")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SAMPLE = os.path.join(ROOT, "data", "sample")
SCRIPTS = {"train": train, "annotate": annotate, "evaluate": evaluate, "report": report, "prepare": prepare,
           "bench": bench, "classify": classify}
PATHS = {"train": "train.py", "annotate": "annotate.py", "evaluate": "evaluate.py", "report": "report.py",
         "prepare": "data/prepare.py", "bench": "bench.py", "classify": "classify.py"}
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def env(errors_env):
    """conftest.errors_env: a tiny decoder folder, 8 training records, 4 test records, a scorer."""
    return errors_env


# ----------------------------------------------------------------------------------------------- bad files

def jsonl(tmp, name, *lines):
    p = tmp / name
    p.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
    return str(p)


def bad_record(env, tmp, kind):
    """A .jsonl whose line 2 is bad in one way; the first line is a good record."""
    g = env["good"]
    rec = json.loads(g)
    line2 = {
        "duplicate key": g[:-1] + ', "severity": "neutral"}',
        "huge integer": json.dumps({**rec, "p_c": 10 ** 400}),
        "deep nesting": '{"question": ' + "[" * 200000 + "]" * 200000 + "}",
        "lone surrogate": g.replace('"question": "', '"question": "\\ud800', 1),
        "NaN": json.dumps({**rec, "p_c": float("nan")}),
        "1e999": json.dumps(rec).replace(json.dumps(rec["p_c"]), "1e999", 1),
    }[kind]
    return jsonl(tmp, "bad.jsonl", g, line2)


def model_variant(env, tmp, kind):
    """A copy of the tiny model folder, broken in one way."""
    d = tmp / "m"
    shutil.copytree(env["model"], d)
    st = d / "model.safetensors"
    if kind == "truncated safetensors":
        b = st.read_bytes()
        st.write_bytes(b[:len(b) // 2])
    elif kind == "garbage safetensors":
        st.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    elif kind == "only pytorch_model.bin":
        st.rename(d / "pytorch_model.bin")
    elif kind == "config not JSON":
        (d / "config.json").write_text("{model_type: gpt2", encoding="utf-8")
    elif kind == "config wrong types":
        _set_config(d, n_embd="wide")
    elif kind == "tokenizer not a tokenizer":
        (d / "tokenizer.json").write_text('{"hello": "world"}', encoding="utf-8")
    elif kind == "args.json not JSON":   # a folder train.py wrote, whose args.json was cut
        (d / "args.json").write_text('{"weights": "balanced", ', encoding="utf-8")
    elif kind in ("int64 tensors", "nan tensor"):
        _edit_tensors(st, kind)
    elif kind == "tokenizer of another model":   # one token more than the embedding has rows
        t = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
        t["added_tokens"].append({"id": 10 ** 5, "content": "<|another model|>", "single_word": False, "lstrip": False,
                                  "rstrip": False, "normalized": False, "special": True})
        (d / "tokenizer.json").write_text(json.dumps(t), encoding="utf-8")
    elif kind in ("n_head 0", "eos past the vocabulary"):
        _set_config(d, **({"n_head": 0} if kind == "n_head 0" else {"eos_token_id": 10 ** 6}))
        if kind == "eos past the vocabulary":   # the config's id is then the only EOS: refused where it is used
            (d / "special_tokens_map.json").unlink()
    elif kind == "shard outside folder":
        outside = tmp / "elsewhere.safetensors"
        st.rename(outside)
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"wte.weight": "../elsewhere.safetensors"}}), encoding="utf-8")
    return str(d)


def model_file(env, tmp, name, text, **config):
    """A copy of the tiny model folder with file `name` written as `text` (None: no change), config.json keys set."""
    d = tmp / "m"
    shutil.copytree(env["model"], d)
    if text is not None:
        (d / name).write_text(text, encoding="utf-8")
    if config:
        _set_config(d, **config)
    return str(d)


def _set_config(folder, **keys):
    """config.json of a copied folder with `keys` set."""
    f = folder / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text(encoding="utf-8")), **keys}), encoding="utf-8")


def _edit_tensors(st, kind):
    """Rewrite a safetensors file with every tensor int64, or with its first tensor all NaN."""
    from safetensors.torch import load_file, save_file
    sd = load_file(str(st))
    if kind == "int64 tensors":
        sd = {k: v.to(torch.int64) for k, v in sd.items()}
    else:
        k = sorted(sd)[0]
        sd[k] = torch.full_like(sd[k], float("nan"))
    save_file(sd, str(st), {"format": "pt"})


def scorer_variant(env, tmp, kind):
    d = tmp / "scorer"
    shutil.copytree(env["scorer"], d)
    st = d / "model.safetensors"
    if kind == "classifier, int64 tensors":   # a classifier folder (head + id2label), its tensors integer
        from safetensors.torch import load_file, save_file
        sd = load_file(str(st))
        sd.update({"classifier.weight": torch.zeros(3, 32), "classifier.bias": torch.zeros(3)})
        save_file(sd, str(st), {"format": "pt"})
        _edit_tensors(st, "int64 tensors")
        _set_config(d, id2label=dict(enumerate(data.SEVERITIES)))
    elif kind in ("int64 tensors", "nan tensor"):
        _edit_tensors(st, kind)
    elif kind == "no tokenizer files":
        (d / "vocab.txt").unlink()
    elif kind == "empty vocab.txt":
        (d / "vocab.txt").write_text("", encoding="utf-8")
    elif kind == "config wrong types":
        _set_config(d, hidden_size="wide")
    elif kind == "severity_classifier not an object":
        _set_config(d, severity_classifier="ab")
    elif kind == "tokenizer_config a list":
        (d / "tokenizer_config.json").write_text("[1, 2]", encoding="utf-8")
    elif kind == "only pytorch_model.bin":
        st.rename(d / "pytorch_model.bin")
    elif kind == "truncated safetensors":
        b = st.read_bytes()
        st.write_bytes(b[:len(b) // 3])
    return str(d)


def xlsx(tmp, kind):
    """A .xlsx written by openpyxl, then broken: the sheet XML cut in half, or a shared-string index past the end."""
    import openpyxl
    src, dst = tmp / "ok.xlsx", tmp / "bad.xlsx"
    wb = openpyxl.Workbook()
    ws = wb.active
    head = ["question", "answer", "answer"] if kind == "column twice" else ["question", "answer"]
    for row in (head, ["ما هو السكري؟", "ارتفاع سكر الدم."], ["سؤال", "جواب"]):
        ws.append(row)
    wb.save(src)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            b = zin.read(item.filename)
            if item.filename == "xl/worksheets/sheet1.xml" and kind != "column twice":
                if kind == "truncated sheet XML":
                    b = b[:len(b) // 2]
                else:   # cell A2 becomes a shared-string reference far past the shared strings (there are none)
                    b, n = re.subn(rb'<c r="A2" t="(?:s|inlineStr|str)">.*?</c>', b'<c r="A2" t="s"><v>999</v></c>', b,
                                   count=1)
                    assert n == 1, "test set-up: no cell A2 to break"
            zout.writestr(item, b)
    os.remove(src)
    return str(dst)


def eval_json(tmp, kind):
    ev = {"setting": "Base", "model": {"name": "m", "weights": None},
          "scores": {"f1": {"overall": {"mean": 60.0, "lo": 59.0, "hi": 61.0, "n": 4}}},
          "nll": {"overall": {"mean": 2.0, "lo": 1.9, "hi": 2.1, "n": 4}}}
    p = tmp / "eval.json"
    if kind == "wrong types":
        ev["scores"]["f1"]["overall"]["mean"] = "sixty"
    elif kind == "setting a number":
        ev["setting"] = 3
    elif kind == "scores a list":
        ev["scores"] = [1, 2]
    elif kind == "n a string":
        ev["scores"]["f1"]["overall"]["n"] = "four"
    p.write_text("{not json" if kind == "not JSON" else json.dumps(ev), encoding="utf-8")
    return str(p)


def eval_run(tmp, name, bad_row=False, predictions=True):
    """An eval folder for --compare: eval.json + predictions.jsonl of 2 records (record 1's f1 a string if bad_row)."""
    d = tmp / name
    d.mkdir()
    cell = {"mean": 60.0, "lo": 59.0, "hi": 61.0, "n": 2}
    ev = {"setting": "CE", "model": {"name": "m", "weights": [1, 1, 1]}, "scores": {"f1": {"overall": cell}},
          "nll": {"overall": cell}, "data": {"n": 2, "sha256": "x"}, "bertscore": {}, "generation": {}}
    (d / "eval.json").write_text(json.dumps(ev), encoding="utf-8")
    rows = [{"index": i, "seed": 0, "question": "س", "reference": "ج", "prediction": "ج", "severity": "critical",
             "precision": 60.0, "recall": 60.0, "f1": "sixty" if bad_row and i == 1 else 60.0, "nll": 2.0,
             "nll_tokens": 3} for i in range(2)]
    if predictions:
        (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(d)


def a_file(tmp, name="file.txt"):
    p = tmp / name
    p.write_text("keep me\n", encoding="utf-8")
    return str(p)


def a_dir(tmp, name="somedir"):
    p = tmp / name
    p.mkdir(exist_ok=True)
    return str(p)


# ----------------------------------------------------------------------------------------------- the table
# (id, script, argv(env, tmp) -> list, needles in the error line). tmp is the case's own folder: outputs go there,
# bad inputs are made there, and it must be unchanged by the run.

def T(env, tmp, *extra, model=None, data_file=None):
    return ["--model", model or env["model"], "--data", data_file or env["train"], "--eval-data", "none",
            "--max-steps", "1", "--quiet", "--out", str(tmp / "out"), *extra]


def A(env, tmp, *extra, inp=None, clf="tiny"):
    return [inp or env["test"], "--classifier", clf, "--out", str(tmp / "ann.jsonl"), "--device", "cpu", *extra]


def E(env, tmp, *extra, model=None, scorer=None):
    return ["--model", model or env["model"], "--data", env["test"], "--out", str(tmp / "ev"), "--bertscore-model",
            scorer or env["scorer"], "--bertscore-layer", "1", "--greedy", "--n", "2", "--bootstrap", "0",
            "--max-new-tokens", "2", "--quiet", *extra]


def P(env, tmp, *extra, inp=None):
    return ["--data", inp or env["train"], "--out", str(tmp / "prep"), "--n-train", "4", "--n-test", "2", *extra]


def B(env, tmp, *extra):
    return ["--model", "tiny", "--shape", "small", "--iters", "1", "--warmup", "0", "--batch-size", "1",
            "--seq-len", "8", "--gen-batch", "1", "--gen-prompt-len", "4", "--new-tokens", "2", *extra]


def C(env, tmp, *extra, model="tiny", data_file=None):
    return ["--model", model, "--data", data_file or env["labels"], "--out", str(tmp / "clf"), "--epochs", "1",
            "--max-len", "64", "--device", "cpu", *extra]


CASES = [
    # -- train.py: flags
    ("train lr -1", "train", lambda e, t: T(e, t, "--lr", "-1"), ["--lr"]),
    ("train lr nan", "train", lambda e, t: T(e, t, "--lr", "nan"), ["--lr"]),
    ("train lr inf", "train", lambda e, t: T(e, t, "--lr", "inf"), ["--lr"]),
    ("train epochs nan", "train", lambda e, t: T(e, t, "--epochs", "nan"), ["--epochs"]),
    ("train epochs 0", "train", lambda e, t: T(e, t, "--epochs", "0", "--max-steps", "0"), ["--epochs"]),
    ("train max-steps -5", "train", lambda e, t: T(e, t, "--max-steps", "-5"), ["--max-steps"]),
    ("train max-steps 1.5", "train", lambda e, t: T(e, t, "--max-steps", "1.5"), ["--max-steps"]),
    ("train weight-decay -1", "train", lambda e, t: T(e, t, "--weight-decay", "-1"), ["--weight-decay"]),
    ("train weights 0,0,0", "train", lambda e, t: T(e, t, "--weights", "0,0,0"), ["--weights"]),
    ("train weights two values", "train", lambda e, t: T(e, t, "--weights", "1,2"), ["--weights"]),
    ("train weights nan", "train", lambda e, t: T(e, t, "--weights", "nan,1,1"), ["--weights"]),
    ("train lora-dropout 2", "train", lambda e, t: T(e, t, "--lora-rank", "4", "--lora-dropout", "2"), ["--lora-dropout"]),
    ("train lora-dropout 1", "train", lambda e, t: T(e, t, "--lora-rank", "4", "--lora-dropout", "1"), ["--lora-dropout"]),
    ("train lora-alpha without rank", "train", lambda e, t: T(e, t, "--lora-alpha", "16"), ["--lora-alpha", "ignored"]),
    ("train lora-targets, rank 0", "train", lambda e, t: T(e, t, "--lora-rank", "0", "--lora-targets=q_proj"),
     ["--lora-targets", "ignored"]),
    ("train pack with padded loss", "train", lambda e, t: T(e, t, "--pack", "--loss-tokens", "padded"), ["--pack"]),
    ("train lora-target unknown", "train", lambda e, t: T(e, t, "--lora-rank", "4", "--lora-targets", "qkv,attn"),
     ["--lora-targets", "attn"]),
    ("train lora-alpha 0", "train", lambda e, t: T(e, t, "--lora-rank", "4", "--lora-alpha", "0"), ["--lora-alpha"]),
    ("train batch-size 0", "train", lambda e, t: T(e, t, "--batch-size", "0"), ["--batch-size"]),
    ("train grad-clip nan", "train", lambda e, t: T(e, t, "--grad-clip", "nan"), ["--grad-clip"]),
    ("train warmup -1", "train", lambda e, t: T(e, t, "--warmup", "-1"), ["--warmup"]),
    ("train seed -1", "train", lambda e, t: T(e, t, "--seed", "-1"), ["--seed"]),
    ("train max-steps 10**400", "train", lambda e, t: T(e, t, "--max-steps", "1" + "0" * 400), ["--max-steps"]),
    ("train seed huge", "train", lambda e, t: T(e, t, "--seed", "9" * 40), ["--seed"]),
    ("train save-minutes -1", "train", lambda e, t: T(e, t, "--save-minutes", "-1"), ["--save-minutes"]),
    ("train max-len 1", "train", lambda e, t: T(e, t, "--max-len", "1"), ["--max-len"]),
    ("train max-len too small for the prompt", "train", lambda e, t: T(e, t, "--max-len", "4"), ["--max-len"]),
    ("train unknown flag", "train", lambda e, t: T(e, t, "--lr-peak", "1"), ["--lr-peak"]),
    ("train lora-rank above the width", "train", lambda e, t: T(e, t, "--lora-rank", "100000"), ["--lora-rank"]),
    ("train out empty", "train", lambda e, t: T(e, t)[:-2] + ["--out", ""], ["--out"]),
    ("train device mps", "train", lambda e, t: T(e, t, "--device", "mps"), ["--device"]),
    ("train device bogus", "train", lambda e, t: T(e, t, "--device", "tpu7"), ["--device"]),
    ("train grad-accum -1", "train", lambda e, t: T(e, t, "--grad-accum", "-1"), ["--grad-accum"]),
    # -- train.py: paths
    ("train data is a directory", "train", lambda e, t: T(e, t, data_file=a_dir(t)), ["--data", "directory"]),
    ("train data missing", "train", lambda e, t: T(e, t, data_file=str(t / "nope.jsonl")), ["--data", "nope.jsonl"]),
    ("train eval-data is a directory", "train", lambda e, t: T(e, t)[:-2] + ["--eval-data", a_dir(t), "--out", str(t / "o")],
     ["--eval-data"]),
    ("train out is a file", "train", lambda e, t: T(e, t)[:-2] + ["--out", a_file(t)], ["--out"]),
    ("train out under a file", "train", lambda e, t: T(e, t)[:-2] + ["--out", os.path.join(a_file(t), "sub")], ["--out"]),
    ("train resume without state", "train", lambda e, t: T(e, t, "--resume"), ["--resume"]),
    # -- train.py: the model folder
    ("train model missing folder", "train", lambda e, t: T(e, t, model=str(t / "no_model")), ["--model", "no_model"]),
    ("train model missing relative folder", "train", lambda e, t: T(e, t, model="./no/such/model"), ["--model"]),
    ("train model is a file", "train", lambda e, t: T(e, t, model=a_file(t)), ["--model"]),
    ("train model truncated safetensors", "train", lambda e, t: T(e, t, model=model_variant(e, t, "truncated safetensors")),
     ["model.safetensors"]),
    ("train model garbage safetensors", "train", lambda e, t: T(e, t, model=model_variant(e, t, "garbage safetensors")),
     ["model.safetensors"]),
    ("train model only pytorch_model.bin", "train",
     lambda e, t: T(e, t, model=model_variant(e, t, "only pytorch_model.bin")), ["pytorch_model.bin"]),
    ("train model config not JSON", "train", lambda e, t: T(e, t, model=model_variant(e, t, "config not JSON")),
     ["config.json"]),
    ("train model config wrong types", "train", lambda e, t: T(e, t, model=model_variant(e, t, "config wrong types")),
     ["config.json"]),
    ("train model tokenizer not a tokenizer", "train",
     lambda e, t: T(e, t, model=model_variant(e, t, "tokenizer not a tokenizer")), ["tokenizer.json"]),
    ("train model shard outside folder", "train",
     lambda e, t: T(e, t, model=model_variant(e, t, "shard outside folder")), ["outside"]),
    # -- train.py: data records (file:line:field)
    ("train data duplicate key", "train", lambda e, t: T(e, t, data_file=bad_record(e, t, "duplicate key")),
     ["bad.jsonl:2:", "severity"]),
    ("train data huge integer", "train", lambda e, t: T(e, t, data_file=bad_record(e, t, "huge integer")),
     ["bad.jsonl:2:", "p_c"]),
    ("train data 1e999", "train", lambda e, t: T(e, t, data_file=bad_record(e, t, "1e999")), ["bad.jsonl:2:", "p_c"]),
    ("train data NaN", "train", lambda e, t: T(e, t, data_file=bad_record(e, t, "NaN")), ["bad.jsonl:2:"]),
    ("train data deep nesting", "train", lambda e, t: T(e, t, data_file=bad_record(e, t, "deep nesting")),
     ["bad.jsonl:2:"]),
    ("train data lone surrogate", "train", lambda e, t: T(e, t, data_file=bad_record(e, t, "lone surrogate")),
     ["bad.jsonl:2:", "question"]),
    ("train data duplicate CSV column", "train",
     lambda e, t: T(e, t, data_file=str((t / "d.csv").write_text("question,answer,answer\nq,a,b\n") and t / "d.csv")),
     ["d.csv:1:", "answer"]),

    # -- annotate.py
    ("annotate limit 0", "annotate", lambda e, t: A(e, t, "--limit", "0"), ["--limit"]),
    ("annotate batch-size 0", "annotate", lambda e, t: A(e, t, "--batch-size", "0"), ["--batch-size"]),
    ("annotate max-len 2", "annotate", lambda e, t: A(e, t, "--max-len", "2"), ["--max-len"]),
    ("annotate out is a directory", "annotate", lambda e, t: A(e, t)[:4] + [a_dir(t), "--device", "cpu"], ["--out"]),
    ("annotate out under a file", "annotate",
     lambda e, t: A(e, t)[:4] + [os.path.join(a_file(t), "x.jsonl"), "--device", "cpu"], ["--out"]),
    ("annotate out empty", "annotate", lambda e, t: A(e, t)[:4] + ["", "--device", "cpu"], ["--out"]),
    ("annotate input missing", "annotate", lambda e, t: A(e, t, inp=str(t / "nope.jsonl")), ["nope.jsonl"]),
    ("annotate input is a directory", "annotate", lambda e, t: A(e, t, inp=a_dir(t)), ["directory"]),
    ("annotate input lone surrogate", "annotate", lambda e, t: A(e, t, inp=bad_record(e, t, "lone surrogate")),
     ["bad.jsonl:2:", "question"]),
    ("annotate input duplicate key", "annotate", lambda e, t: A(e, t, inp=bad_record(e, t, "duplicate key")),
     ["bad.jsonl:2:"]),
    ("annotate classifier missing folder", "annotate", lambda e, t: A(e, t, clf=str(t / "no_clf")), ["no_clf"]),
    ("annotate classifier truncated safetensors", "annotate",
     lambda e, t: A(e, t, clf=scorer_variant(e, t, "truncated safetensors")), ["--classifier", "safetensors"]),
    ("annotate classifier only pytorch_model.bin", "annotate",
     lambda e, t: A(e, t, clf=scorer_variant(e, t, "only pytorch_model.bin")), ["--classifier"]),
    ("annotate label-map not a severity", "annotate", lambda e, t: A(e, t, "--label-map", "x=y"), ["--label-map"]),
    ("annotate label-map not src=dst", "annotate", lambda e, t: A(e, t, "--label-map", "critical"), ["--label-map"]),
    ("annotate device bogus", "annotate", lambda e, t: A(e, t)[:-2] + ["--device", "tpu7"], ["--device"]),

    # -- evaluate.py
    ("evaluate out is a file", "evaluate", lambda e, t: E(e, t, "--out", a_file(t)), ["--out"]),
    ("evaluate out under a file", "evaluate", lambda e, t: E(e, t, "--out", os.path.join(a_file(t), "ev")), ["--out"]),
    ("evaluate out empty", "evaluate", lambda e, t: E(e, t, "--out", ""), ["--out"]),
    ("evaluate n 0", "evaluate", lambda e, t: E(e, t, "--n", "0"), ["--n"]),
    ("evaluate temperature nan", "evaluate", lambda e, t: E(e, t, "--temperature", "nan"), ["--temperature"]),
    ("evaluate top-p 2", "evaluate", lambda e, t: E(e, t, "--top-p", "2"), ["--top-p"]),
    ("evaluate bootstrap -1", "evaluate", lambda e, t: E(e, t, "--bootstrap", "-1"), ["--bootstrap"]),
    ("evaluate data is a directory", "evaluate", lambda e, t: E(e, t, "--data", a_dir(t)), ["--data"]),
    ("evaluate model missing", "evaluate", lambda e, t: E(e, t, model=str(t / "no_model")), ["--model"]),
    ("evaluate model truncated safetensors", "evaluate",
     lambda e, t: E(e, t, model=model_variant(e, t, "truncated safetensors")), ["--model", "model.safetensors"]),
    ("evaluate scorer only pytorch_model.bin", "evaluate",
     lambda e, t: E(e, t, scorer=scorer_variant(e, t, "only pytorch_model.bin")), ["--bertscore-model", "safetensors"]),
    ("evaluate scorer missing folder", "evaluate", lambda e, t: E(e, t, scorer=str(t / "no_scorer")),
     ["--bertscore-model"]),
    ("evaluate scorer truncated safetensors", "evaluate",
     lambda e, t: E(e, t, scorer=scorer_variant(e, t, "truncated safetensors")), ["--bertscore-model"]),
    ("evaluate plot without table", "evaluate", lambda e, t: E(e, t, "--plot", str(t / "p.png")), ["--plot"]),
    ("report table wrong types", "report", lambda e, t: ["table", eval_json(t, "wrong types")], ["eval.json", "mean"]),
    ("report table setting a number", "report", lambda e, t: ["table", eval_json(t, "setting a number")],
     ["setting"]),
    ("report table scores a list", "report", lambda e, t: ["table", eval_json(t, "scores a list")], ["scores"]),
    ("report table not JSON", "report", lambda e, t: ["table", eval_json(t, "not JSON")], ["eval.json"]),
    ("report table missing file", "report", lambda e, t: ["table", str(t / "none.json")], ["none.json"]),
    ("report table plot under a file", "report",
     lambda e, t: ["table", eval_json(t, "ok"), "--plot", os.path.join(a_file(t), "p.png")], ["--plot"]),
    ("report compare without out", "report", lambda e, t: ["compare", eval_run(t, "a"), eval_run(t, "b")],
     ["--out"]),
    ("report compare out is a file", "report",
     lambda e, t: ["compare", eval_run(t, "a"), eval_run(t, "b"), "--out", a_file(t)], ["--out"]),
    ("report compare missing run", "report",
     lambda e, t: ["compare", eval_run(t, "a"), str(t / "nope"), "--out", str(t / "cmp")], ["compare", "nope"]),
    ("report compare no predictions", "report",
     lambda e, t: ["compare", eval_run(t, "a"), eval_run(t, "b", predictions=False), "--out", str(t / "cmp")],
     ["predictions.jsonl"]),
    ("report compare row of wrong types", "report",
     lambda e, t: ["compare", eval_run(t, "a"), eval_run(t, "b", bad_row=True), "--out", str(t / "cmp")],
     ["predictions.jsonl:2"]),
    ("report permutations 0", "report", lambda e, t: ["compare", eval_run(t, "a"), eval_run(t, "b"), "--out",
                                                          str(t / "cmp"), "--permutations", "0"], ["--permutations"]),
    ("evaluate args.json not JSON", "evaluate", lambda e, t: E(e, t, model=model_variant(e, t, "args.json not JSON")),
     ["args.json"]),
    ("evaluate device bogus", "evaluate", lambda e, t: E(e, t, "--device", "tpu7"), ["--device"]),

    # -- data/prepare.py
    ("prepare out is a file", "prepare", lambda e, t: P(e, t, "--out", a_file(t)), ["--out"]),
    ("prepare out/test.jsonl is a directory", "prepare",
     lambda e, t: P(e, t, "--out", str(t)) if a_dir(t, "test.jsonl") else None, ["--out", "test.jsonl"]),
    ("prepare out empty", "prepare", lambda e, t: P(e, t, "--out", ""), ["--out"]),
    ("prepare bad input keeps the previous outputs", "prepare",
     lambda e, t: P(e, t, "--out", str(t / "prev"), inp=bad_record(e, t, "huge integer"))
     if [a_file(t / "prev" if a_dir(t, "prev") else t, f) for f in ("train.jsonl", "test.jsonl", "manifest.json")]
     else None, ["bad.jsonl:2:"]),
    ("prepare dialect-rules is a directory", "prepare",
     lambda e, t: P(e, t, "--normalize", "dialect", "--dialect-rules", a_dir(t)), ["--dialect-rules"]),
    ("prepare dialect-rules malformed", "prepare",
     lambda e, t: P(e, t, "--normalize", "dialect", "--dialect-rules", jsonl(t, "rules.txt", "[egy]", "no equals sign")),
     ["rules.txt:2:"]),
    ("prepare input is a directory", "prepare", lambda e, t: P(e, t, inp=a_dir(t)), ["--data"]),
    ("prepare n-train -1", "prepare", lambda e, t: P(e, t, "--n-train", "-1"), ["--n-train"]),
    ("prepare seed nan", "prepare", lambda e, t: P(e, t, "--seed", "nan"), ["--seed"]),
    ("prepare input lone surrogate", "prepare", lambda e, t: P(e, t, inp=bad_record(e, t, "lone surrogate")),
     ["bad.jsonl:2:"]),
    ("prepare input duplicate key", "prepare", lambda e, t: P(e, t, inp=bad_record(e, t, "duplicate key")),
     ["bad.jsonl:2:"]),
    ("prepare xlsx truncated sheet XML", "prepare", lambda e, t: P(e, t, inp=xlsx(t, "truncated sheet XML")),
     ["bad.xlsx"]),
    ("prepare xlsx shared string out of range", "prepare",
     lambda e, t: P(e, t, inp=xlsx(t, "shared string out of range")), ["bad.xlsx"]),

    # -- bench.py
    ("bench threads -1", "bench", lambda e, t: B(e, t, "--threads", "-1"), ["--threads"]),
    ("bench threads 10**6", "bench", lambda e, t: B(e, t, "--threads", "1000000"), ["--threads"]),
    ("bench iters 0", "bench", lambda e, t: B(e, t, "--iters", "0"), ["--iters"]),
    ("bench lora-rank without memory", "bench", lambda e, t: B(e, t, "--lora-rank", "8"), ["--lora-rank", "--memory"]),
    ("bench batch-size nan", "bench", lambda e, t: B(e, t, "--batch-size", "nan"), ["--batch-size"]),
    ("bench json is a directory", "bench", lambda e, t: B(e, t, "--json", a_dir(t)), ["--json"]),
    ("bench json under a file", "bench", lambda e, t: B(e, t, "--json", os.path.join(a_file(t), "b.json")), ["--json"]),
    ("bench model unknown", "bench", lambda e, t: B(e, t, "--model", "gpt-17"), ["--model"]),
    ("bench device bogus", "bench", lambda e, t: B(e, t, "--device", "tpu7"), ["--device"]),

    # -- classify.py (rewritten by another branch; these describe the same contract)
    ("classify lr -1", "classify", lambda e, t: C(e, t, "--lr", "-1"), ["--lr"]),
    ("classify epochs 0", "classify", lambda e, t: C(e, t, "--epochs", "0"), ["--epochs"]),
    ("classify lr nan", "classify", lambda e, t: C(e, t, "--lr", "nan"), ["--lr"]),
    ("classify val-frac 2", "classify", lambda e, t: C(e, t, "--val-frac", "2"), ["--val-frac"]),
    ("classify batch-size 0", "classify", lambda e, t: C(e, t, "--batch-size", "0"), ["--batch-size"]),
    ("classify data is a directory", "classify", lambda e, t: C(e, t, data_file=a_dir(t)), ["somedir", "irectory"]),
    ("classify data missing", "classify", lambda e, t: C(e, t, data_file=str(t / "nope.jsonl")), ["nope.jsonl"]),
    ("classify data duplicate key", "classify",
     lambda e, t: C(e, t, data_file=jsonl(t, "bad.jsonl", '{"text": "س", "label": "critical"}',
                                          '{"text": "س", "label": "critical", "label": "neutral"}')), ["bad.jsonl:2:"]),
    ("classify out is a file", "classify", lambda e, t: C(e, t, "--out", a_file(t)), ["--out"]),
    ("classify model truncated safetensors", "classify",
     lambda e, t: C(e, t, model=scorer_variant(e, t, "truncated safetensors")), ["model.safetensors"]),
    ("classify model only pytorch_model.bin", "classify",
     lambda e, t: C(e, t, model=scorer_variant(e, t, "only pytorch_model.bin")), ["safetensors"]),
    ("classify model missing folder", "classify", lambda e, t: C(e, t, model=str(t / "no_model")), ["no_model"]),

    # -- found by the red-team pass (helper "redteam"): one row per kind
    ("train out under /proc", "train", lambda e, t: T(e, t)[:-2] + ["--out", "/proc/no_such_run"], ["--out", "/proc"]),
    ("train model config n_head 0", "train", lambda e, t: T(e, t, model=model_variant(e, t, "n_head 0")),
     ["config.json"]),
    ("train model config eos past the vocabulary", "train",
     lambda e, t: T(e, t, model=model_variant(e, t, "eos past the vocabulary")), ["config.json", "eos_token_id"]),
    ("evaluate model config eos past the vocabulary", "evaluate",
     lambda e, t: E(e, t, model=model_variant(e, t, "eos past the vocabulary")), ["--model", "eos_token_id", "EOS"]),
    ("train model int64 tensors", "train", lambda e, t: T(e, t, model=model_variant(e, t, "int64 tensors")),
     ["--model", "int64"]),
    ("train model NaN tensor", "train", lambda e, t: T(e, t, model=model_variant(e, t, "nan tensor")),
     ["--model", "NaN"]),
    ("classify model int64 tensors", "classify", lambda e, t: C(e, t, model=scorer_variant(e, t, "int64 tensors")),
     ["int64"]),
    ("classify model NaN tensor", "classify", lambda e, t: C(e, t, model=scorer_variant(e, t, "nan tensor")), ["NaN"]),
    ("classify max-len above the model, after the data line", "classify", lambda e, t: C(e, t, "--max-len", "100000"),
     ["--max-len"]),
    ("classify keep-best without validation", "classify", lambda e, t: C(e, t, "--keep-best", "--val-frac", "0"),
     ["--keep-best"]),
    ("classify labels empty", "classify", lambda e, t: C(e, t, "--labels", ""), ["--labels"]),
    ("classify out under /proc", "classify", lambda e, t: C(e, t, "--out", "/proc/no_such_clf"), ["--out"]),
    ("annotate classifier severity_classifier not an object", "annotate",
     lambda e, t: A(e, t, clf=scorer_variant(e, t, "severity_classifier not an object")),
     ["--classifier", "severity_classifier"]),
    ("classify model tokenizer_config a list", "classify",
     lambda e, t: C(e, t, model=scorer_variant(e, t, "tokenizer_config a list")), ["tokenizer_config"]),
    ("classify model severity_classifier not an object", "classify",
     lambda e, t: C(e, t, model=scorer_variant(e, t, "severity_classifier not an object")), ["severity_classifier"]),
    ("annotate classifier int64 tensors", "annotate", lambda e, t: A(e, t, clf=scorer_variant(e, t, "classifier, int64 tensors")),
     ["--classifier", "int64"]),
    ("annotate out under /proc", "annotate", lambda e, t: A(e, t)[:4] + ["/proc/x.jsonl", "--device", "cpu"], ["--out"]),
    ("evaluate scorer without tokenizer files", "evaluate",
     lambda e, t: E(e, t, scorer=scorer_variant(e, t, "no tokenizer files")), ["--bertscore-model", "tokenizer"]),
    ("evaluate model int64 tensors", "evaluate", lambda e, t: E(e, t, model=model_variant(e, t, "int64 tensors")),
     ["--model", "int64"]),
    ("evaluate out under /proc", "evaluate", lambda e, t: E(e, t, "--out", "/proc/no_such_eval"), ["--out"]),
    ("evaluate table moved to report.py", "evaluate",
     lambda e, t: ["--table", eval_json(t, "ok"), "--compare", eval_run(t, "a"), eval_run(t, "b"), "--out", str(t / "c")],
     ["--table", "report.py table"]),
    ("report table n not a count", "report", lambda e, t: ["table", eval_json(t, "n a string")], ["n"]),
    ("report table metric no file has", "report", lambda e, t: ["table", eval_json(t, "ok"), "--metric", "floor"],
     ["--metric", "floor"]),
    ("report table plot under /proc", "report", lambda e, t: ["table", eval_json(t, "ok"), "--plot", "/proc/p.png"],
     ["--plot"]),
    ("prepare sheet without xlsx", "prepare", lambda e, t: P(e, t, "--sheet", "2"), ["--sheet"]),
    ("prepare dialect-rules without dialect", "prepare",
     lambda e, t: P(e, t, "--dialect-rules", jsonl(t, "rules.txt", "[egy]")), ["--dialect-rules"]),
    ("prepare revision without apollo", "prepare", lambda e, t: P(e, t, "--revision", "abc"), ["--revision"]),
    ("prepare too few pairs for the split", "prepare", lambda e, t: P(e, t, inp=jsonl(t, "one.jsonl", e["good"])),
     ["--data", "too few"]),
    ("prepare out under /proc", "prepare", lambda e, t: P(e, t, "--out", "/proc/no_such_prep"), ["--out"]),
    ("bench json empty", "bench", lambda e, t: B(e, t, "--json", ""), ["--json"]),
    ("bench json under /proc", "bench", lambda e, t: B(e, t, "--json", "/proc/b.json"), ["--json"]),
    ("bench lora-rank -1", "bench", lambda e, t: B(e, t, "--lora-rank", "-1"), ["--lora-rank"]),
    ("train out name too long", "train", lambda e, t: T(e, t)[:-2] + ["--out", str(t / ("a" * 300))], ["--out", "too long"]),
    ("train out a broken symlink", "train",
     lambda e, t: T(e, t)[:-2] + ["--out", str(t / "link")] if os.symlink(t / "nowhere" / "x", t / "link") is None
     else None, ["--out", "broken"]),
    ("annotate out name too long for its temp file", "annotate",
     lambda e, t: A(e, t)[:4] + [str(t / ("a" * 245)), "--device", "cpu"], ["--out", "too long"]),
    ("annotate out is the input", "annotate",
     lambda e, t: (lambda p: A(e, t, inp=p)[:4] + [p, "--device", "cpu"])(jsonl(t, "in.jsonl", e["good"])),
     ["--out", "input"]),
    ("train model tokenizer of another model", "train",
     lambda e, t: T(e, t, model=model_variant(e, t, "tokenizer of another model")), ["--model", "vocab_size"]),
    ("evaluate model tokenizer of another model", "evaluate",
     lambda e, t: E(e, t, model=model_variant(e, t, "tokenizer of another model")), ["--model", "vocab_size"]),
    ("evaluate scorer int64 tensors", "evaluate", lambda e, t: E(e, t, scorer=scorer_variant(e, t, "int64 tensors")),
     ["--bertscore-model", "I64"]),
    ("evaluate scorer empty vocab.txt", "evaluate", lambda e, t: E(e, t, scorer=scorer_variant(e, t, "empty vocab.txt")),
     ["--bertscore-model"]),
    ("evaluate scorer config wrong types", "evaluate",
     lambda e, t: E(e, t, scorer=scorer_variant(e, t, "config wrong types")), ["--bertscore-model", "hidden_size"]),
    ("train seed above its range names the bound exactly", "train", lambda e, t: T(e, t, "--seed", str(2 ** 32)),
     ["--seed", "<= 2147483647"]),
    ("evaluate metric without table", "evaluate", lambda e, t: E(e, t, "--metric", "nll"), ["--metric"]),
    ("evaluate permutations without compare", "evaluate", lambda e, t: E(e, t, "--permutations", "5"),
     ["--permutations"]),
    ("evaluate permutations at its default without compare", "evaluate", lambda e, t: E(e, t, "--permutations", "10000"),
     ["--permutations"]),
    ("report metric with compare", "report", lambda e, t: ["compare", eval_run(t, "a"), eval_run(t, "b"), "--out",
                                                               str(t / "cmp"), "--metric", "f1"], ["--metric"]),
    ("report table with out", "report", lambda e, t: ["table", eval_json(t, "ok"), "--out", str(t / "x")], ["--out"]),
    ("train out is the model folder", "train", lambda e, t: (lambda m: T(e, t, model=m)[:-2] + ["--out", m])(
        model_variant(e, t, "copy")), ["--out", "--model"]),
    ("prepare question and answer the same column", "prepare",
     lambda e, t: P(e, t, "--question-col", "question", "--answer-col", "question"), ["--question-col"]),
    ("classify text and label the same column", "classify", lambda e, t: C(e, t, "--text-col", "label"),
     ["label", "--label-col"]),
    ("bench shape too big for memory", "bench", lambda e, t: B(e, t, "--hidden", str(1 << 17), "--layers", "4096"),
     ["--hidden"]),

    # -- issue 17, sizes checked before allocating and inputs that are not files (more in tests/test_limits.py)
    ("bench batch-size too big for memory", "bench", lambda e, t: B(e, t, "--batch-size", "1000000"), ["--batch-size"]),
    ("bench gen-batch too big for memory", "bench", lambda e, t: B(e, t, "--gen-batch", str(10 ** 9)), ["--gen-batch"]),
    ("bench memory batch-size too big", "bench", lambda e, t: B(e, t, "--memory", "--batch-size", str(10 ** 9))[2:],
     ["--batch-size"]),
    ("train record field over the byte limit", "train", lambda e, t: T(e, t, data_file=jsonl(
        t, "big.jsonl", e["good"], json.dumps({**json.loads(e["good"]), "answer": "x" * (data.MAX_FIELD_BYTES + 1)}))),
     ["big.jsonl:2: answer:", "limit"]),
    ("classify data field over the byte limit", "classify", lambda e, t: C(e, t, data_file=jsonl(
        t, "big.jsonl", json.dumps({"text": "ب" * (data.MAX_FIELD_BYTES // 2 + 1), "label": "critical"}))),
     ["big.jsonl:1: text:", "limit"]),
    ("evaluate model config n_layer 100000", "evaluate",
     lambda e, t: E(e, t, model=model_file(e, t, "", None, n_layer=100000)), ["--model", "config.json", "n_layer"]),
    ("train data /dev/zero", "train", lambda e, t: T(e, t, data_file="/dev/zero"), ["--data", "not a regular file"]),
    ("annotate input /dev/zero", "annotate", lambda e, t: A(e, t, inp="/dev/zero"), ["/dev/zero", "not a regular"]),
    ("classify data /dev/zero", "classify", lambda e, t: C(e, t, data_file="/dev/zero"), ["/dev/zero", "not a regular"]),
    ("prepare input /dev/zero", "prepare", lambda e, t: P(e, t, inp="/dev/zero"), ["/dev/zero", "not a regular"]),

    # -- found by the third red-team pass (helper "redteam3")
    ("train model config tie_word_embeddings a string", "train",
     lambda e, t: T(e, t, model=model_file(e, t, "", None, tie_word_embeddings="false")), ["config.json", "tie_word"]),
    ("train model config rope_theta -1", "train", lambda e, t: T(e, t, model=model_file(e, t, "", None, model_type="llama",
     hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2, rope_theta=-1)),
     ["config.json", "rope_theta"]),
    ("train model generation_config empty", "train",
     lambda e, t: T(e, t, model=model_file(e, t, "generation_config.json", "")), ["--model", "generation_config.json"]),
    ("train model generation_config a list", "train",
     lambda e, t: T(e, t, model=model_file(e, t, "generation_config.json", "[]")), ["--model", "generation_config.json"]),
    ("evaluate model generation_config top_k a string", "evaluate",
     lambda e, t: E(e, t, "--recipe", "notebook", model=model_file(e, t, "generation_config.json", '{"top_k": "x"}')),
     ["generation_config.json", "top_k"]),
    ("evaluate model generation_config do_sample a string", "evaluate",
     lambda e, t: E(e, t, model=model_file(e, t, "generation_config.json", '{"do_sample": "false"}')),
     ["generation_config.json", "do_sample"]),
    ("train data a symbolic link loop", "train",
     lambda e, t: T(e, t, data_file=str(t / "l.jsonl")) if os.symlink(t / "l.jsonl", t / "l.jsonl") is None else None,
     ["--data", "link loop"]),
    ("classify drw-epoch past the last epoch", "classify", lambda e, t: C(e, t, "--drw-epoch", "1"), ["--drw-epoch"]),
    ("classify ce-epochs past the last epoch", "classify", lambda e, t: C(e, t, "--loss", "ldam", "--ce-epochs", "1"),
     ["--ce-epochs"]),
    ("train lr 1e38 (AdamW's first step, lr / 0.1, overflows float32)", "train", lambda e, t: T(e, t, "--lr", "1e38"), ["--lr"]),
    ("classify lr 1e38", "classify", lambda e, t: C(e, t, "--lr", "1e38"), ["--lr"]),
    ("train save-minutes past float32", "train", lambda e, t: T(e, t, "--save-minutes", "1e300"), ["--save-minutes", "float32"]),
    ("classify lr 1e30 and weight-decay 1e10 make the weights non-finite", "classify",
     lambda e, t: C(e, t, "--lr", "1e30", "--weight-decay", "1e10", "--max-steps", "1"), ["non-finite", "nothing was saved"]),
    ("bench json is a FIFO (os.replace would put a file in its place, as it did to /dev/null)", "bench",
     lambda e, t: B(e, t, "--json", str(t / "fifo")) if os.mkfifo(t / "fifo") is None else None, ["--json", "FIFO"]),
    ("bench json a broken symlink", "bench",
     lambda e, t: B(e, t, "--json", str(t / "l.json")) if os.symlink(t / "no" / "x", t / "l.json") is None else None,
     ["--json", "broken"]),
    ("report table plot is the eval.json it reads", "report",
     lambda e, t: (lambda p: ["table", p, "--plot", p])(eval_json(t, "ok")), ["--plot", "input"]),
    ("report table plot empty", "report", lambda e, t: ["table", eval_json(t, "ok"), "--plot", ""], ["--plot"]),
    ("report compare a run with itself", "report",
     lambda e, t: (lambda a: ["compare", a, a + "/", "--out", str(t / "c")])(eval_run(t, "a")), ["compare", "same"]),
    ("evaluate bootstrap 2**40", "evaluate", lambda e, t: E(e, t, "--bootstrap", str(2 ** 40)), ["--bootstrap"]),
    ("prepare out holds the input as train.jsonl", "prepare",
     lambda e, t: P(e, t, "--out", str(t / "dd"), inp=shutil.copy(e["train"], a_dir(t, "dd") + "/train.jsonl")),
     ["--out", "input"]),
    ("classify out is the model folder", "classify",
     lambda e, t: (lambda d: C(e, t, "--out", d, model=d))(str(shutil.copytree(e["scorer"], t / "enc"))), ["--out", "input"]),
    ("prepare xlsx column given twice", "prepare", lambda e, t: P(e, t, inp=xlsx(t, "column twice")), ["bad.xlsx:1:", "answer"]),
    ("train out a name that is not UTF-8 (wrote files, then a traceback)", "train",
     lambda e, t: T(e, t)[:-2] + ["--out", str(t / "o\udcff")], ["--out", "not UTF-8"]),
    ("train data a name that is not UTF-8", "train",
     lambda e, t: T(e, t, data_file=shutil.copy(e["train"], str(t / "d\udcff.jsonl"))), ["--data", "not UTF-8"]),
    ("evaluate model a folder name that is not UTF-8", "evaluate",
     lambda e, t: E(e, t, model=str(shutil.copytree(e["model"], str(t / "m\udcff")))), ["--model", "not UTF-8"]),
    ("bench json a name that is not UTF-8", "bench", lambda e, t: B(e, t, "--json", str(t / "b\udcff.json")),
     ["--json", "not UTF-8"]),
    ("evaluate top-k with greedy (ignored)", "evaluate", lambda e, t: E(e, t, "--top-k", "5"), ["--top-k", "--greedy"]),
    ("evaluate seed with greedy (ignored)", "evaluate", lambda e, t: E(e, t, "--seed", "3"), ["--seed", "--greedy"]),
    ("annotate out named .json (JSON lines a .json reader refuses)", "annotate",
     lambda e, t: A(e, t)[:4] + [str(t / "ann.json"), "--device", "cpu"], ["--out", ".jsonl"]),
    ("train data an .xlsx with a column twice", "train", lambda e, t: T(e, t, data_file=xlsx(t, "column twice")),
     ["bad.xlsx:1:", "answer", "given twice"]),
]
if not CUDA:   # a machine without CUDA: --device cuda is the user's mistake
    CASES += [(f"{s} device cuda", s, f, ["--device"]) for s, f in (
        ("train", lambda e, t: T(e, t, "--device", "cuda")), ("annotate", lambda e, t: A(e, t)[:-2] + ["--device", "cuda"]),
        ("evaluate", lambda e, t: E(e, t, "--device", "cuda")), ("bench", lambda e, t: B(e, t, "--device", "cuda")),
        ("classify", lambda e, t: C(e, t)[:-2] + ["--device", "cuda"]))]


@pytest.mark.parametrize("name,script,argv,needles", CASES, ids=[c[0] for c in CASES])
def test_contract(env, tmp_path, monkeypatch, name, script, argv, needles):
    case = tmp_path / "case"
    case.mkdir()
    monkeypatch.chdir(case)   # default output folders (out/...) land in the snapshot too
    args = argv(env, case)
    before = snapshot(case)
    code, err = call(script, args)
    assert_contract(code, err, *needles)
    assert snapshot(case) == before, "the failed run wrote something"


def test_the_table_covers_every_script():
    assert {c[1] for c in CASES} == set(SCRIPTS)
    assert len(CASES) >= 150


@pytest.mark.parametrize("script,argv", [("classify", lambda e, t: C(e, t)), ("evaluate", lambda e, t: E(e, t)),
                                         ("prepare", lambda e, t: P(e, t)),
                                         ("bench", lambda e, t: B(e, t, "--json", str(t / "b.json")))],
                         ids=["classify", "evaluate", "prepare", "bench"])
def test_ctrl_c_is_one_line_and_status_130(env, tmp_path, monkeypatch, script, argv):
    """Ctrl-C (KeyboardInterrupt) while a script runs: one 'interrupted' line, status 130, no traceback, nothing
    written. (train.py saves a checkpoint on SIGINT, annotate.py keeps its .partial file: their own tests.)"""
    case = tmp_path / "case"
    case.mkdir()
    monkeypatch.chdir(case)
    args = argv(env, case)
    before = snapshot(case)

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "output_dir", interrupted)   # every script checks an output path early
    code, err = call(script, args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 130 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("interrupted"), err
    assert snapshot(case) == before


# ----------------------------------------------------------------------------------------------- real processes

SUBPROCESS_CASES = [   # the same contract through `python <script>` (entry point, imports, stderr as a user sees it)
    ("train", lambda e, t: T(e, t, "--lr", "nan"), "--lr"),
    ("report", lambda e, t: ["table", eval_json(t, "wrong types")], "eval.json"),
    ("prepare", lambda e, t: P(e, t, "--out", a_file(t)), "--out"),
    ("bench", lambda e, t: B(e, t, "--threads", "-1"), "--threads"),
    ("annotate", lambda e, t: A(e, t, "--limit", "0"), "--limit"),
]


@pytest.mark.parametrize("script,argv,needle", SUBPROCESS_CASES, ids=[f"{s}-{n}" for s, _, n in SUBPROCESS_CASES])
def test_contract_in_a_subprocess(env, tmp_path, script, argv, needle):
    case = tmp_path / "case"
    case.mkdir()
    args = [str(a) for a in argv(env, case)]
    before = snapshot(case)
    env_vars = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    p = subprocess.run([sys.executable, os.path.join(ROOT, PATHS[script]), *args], capture_output=True, text=True,
                       cwd=str(case), env=env_vars, timeout=120)
    assert_contract(p.returncode, p.stderr, needle)
    assert snapshot(case) == before
