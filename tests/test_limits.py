"""Sizes checked before anything is allocated, inputs that are not files, and valid inputs that used to be refused
(issue 17, items 6 and 8). The one-line errors of the same kinds are rows of tests/test_errors.py; here: the
estimates against what is really built, the valid cases end to end, and the timing of the refusals.
Nothing here allocates more than a few MB: oversized inputs are described (a config, a zip directory), not built."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import cli  # noqa: E402
import data  # noqa: E402
import outputs  # noqa: E402
import model as M  # noqa: E402
import hub  # noqa: E402
import nf4  # noqa: E402
import train  # noqa: E402
from data import prepare  # noqa: E402
from data import xlsx  # noqa: E402
from conftest import FAMILIES  # noqa: E402

SAMPLE = os.path.join(ROOT, "data", "sample")
pytestmark = pytest.mark.usefixtures("threads_and_signals")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    mdir = str(root / "model")
    M.Decoder.from_pretrained("tiny").save_pretrained(mdir)
    M.load_tokenizer("tiny").save(mdir)
    recs = data.load_records(os.path.join(SAMPLE, "train.jsonl"))[:8]
    tr = str(root / "train.jsonl")
    outputs.write_jsonl(tr, recs)
    return dict(root=root, model=mdir, train=tr, recs=recs)


def call(mod, argv):
    """mod.main(argv) in-process -> (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            mod.main([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0
    return code, out.getvalue(), err.getvalue()


def one_error(err, *needles):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def copy_model(env, tmp, **config):
    d = tmp / "m"
    shutil.copytree(env["model"], d)
    if config:
        c = json.loads((d / "config.json").read_text(encoding="utf-8"))
        c.update(config)
        (d / "config.json").write_text(json.dumps(c), encoding="utf-8")
    return d


def train_args(env, tmp, *extra, model=None, data_file=None):
    return ["--model", model or env["model"], "--data", data_file or env["train"], "--eval-data", "none",
            "--max-steps", "1", "--quiet", "--out", str(tmp / "out"), "--device", "cpu", *extra]


# ----------------------------------------------------------------------------------------------- 6a: the model size

def _tensor_bytes(model):
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n


HF_CONFIGS = {**FAMILIES, "qwen2 untied, biased": dict(FAMILIES["qwen2"], tie_word_embeddings=False),
              "gpt2 n_inner": dict(FAMILIES["gpt2"], n_inner=100)}


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_param_count_and_bytes_match_the_built_model(name):
    """model.param_count / weight_bytes are computed from the config alone; they must equal what Decoder builds,
    tensor for tensor: fp32, bf16 and NF4 (every family's tiny config)."""
    cfg = M.Config.from_hf(dict(HF_CONFIGS[name]))
    built = M.Decoder(cfg)
    n, parts = hub.param_count(cfg)
    assert n == built.num_params() == sum(parts.values())
    assert hub.weight_bytes(cfg) == _tensor_bytes(built)
    assert hub.weight_bytes(cfg, torch.bfloat16) == _tensor_bytes(M.Decoder(cfg).to(torch.bfloat16))
    assert hub.weight_bytes(cfg, quantize="nf4") == _tensor_bytes(nf4.quantize_nf4(built))


@pytest.mark.parametrize("name", list(hub.REGISTRY))
def test_param_count_matches_every_registry_shape(name):
    """The full-size registry shapes, built on the meta device (no memory): the same count."""
    cfg = M.Config.from_hf(dict(hub.REGISTRY[name]["config"]))
    with torch.device("meta"):
        built = M.Decoder(cfg)
    assert hub.param_count(cfg)[0] == built.num_params()


@pytest.mark.parametrize("field,value,needles", [
    ("n_layer", 100000, ["n_layer = 100000", "weights hold only"]),          # the case
    ("n_positions", 10 ** 9, ["n_positions = 1000000000", "weights hold only"]),
    ("vocab_size", 10 ** 9, ["vocab_size = 1000000000"]),
])
def test_oversized_config_is_refused_before_building(env, tmp_path, field, value, needles):
    """A config.json that describes more than its weights (or than memory) is one line naming config.json and the
    field, in well under a second of work (it ran 137 s and took 3.9 GB before the weights were found missing)."""
    d = copy_model(env, tmp_path, **{field: value})
    t0 = time.perf_counter()
    code, _, err = call(train, train_args(env, tmp_path, model=d))
    took = time.perf_counter() - t0
    assert code == 2
    one_error(err, "--model", "config.json", *needles)
    assert took < 20, took
    assert not (tmp_path / "out").exists()


def test_memory_limit_names_the_field_and_is_generous(env, monkeypatch):
    """Past the memory limit: refused with the field and the sizes; at the limit exactly: accepted."""
    cfg = hub.read_config(env["model"])
    need = hub.weight_bytes(cfg)
    monkeypatch.setattr(hub, "memory_limit", lambda device=None: (need, "available RAM"))
    hub.check_fits(cfg, "x/config.json")   # exactly fits: no refusal
    monkeypatch.setattr(hub, "memory_limit", lambda device=None: (need - 1, "available RAM"))
    with pytest.raises(cli.UserError, match=r"x/config.json: (vocab_size|n_layer|n_positions) = \d+: the model "
                                             r"would have [\d,]+ parameters, .* GiB as float32, more than"):
        hub.check_fits(cfg, "x/config.json")
    # NF4 takes fewer bytes: what does not fit in fp32 may fit quantised
    big = M.Config.from_hf(dict(FAMILIES["llama"], num_hidden_layers=64, hidden_size=256, intermediate_size=1024))
    monkeypatch.setattr(hub, "memory_limit", lambda device=None: (hub.weight_bytes(big, quantize="nf4"), "RAM"))
    hub.check_fits(big, "c", quantize="nf4")
    with pytest.raises(cli.UserError, match="num_hidden_layers = 64"):
        hub.check_fits(big, "c")


def test_memory_limit_reads_this_machine():
    b, what = hub.memory_limit("cpu")
    assert b > 1 << 26 and what


# ----------------------------------------------------------------------------------------------- 8a: token ids

@pytest.mark.parametrize("ids", [
    dict(bos_token_id=50256, eos_token_id=50256),        # transformers' GPT2Config default, smaller vocabulary
    dict(bos_token_id=-1), dict(pad_token_id=-1),       # LLaMA-1's pad_token_id -1
    dict(bos_token_id=10 ** 6, pad_token_id=10 ** 6),
])
def test_unused_token_ids_past_the_vocabulary_load(env, tmp_path, ids):
    """Accepted as transformers accepts them; an id the model has no row for is dropped where it would be used (the
    tokenizer's EOS comes from its own special tokens here), and training runs."""
    d = copy_model(env, tmp_path, **ids)
    cfg = hub.read_config(str(d))
    for k in ("bos", "eos", "pad"):
        v = getattr(cfg, f"{k}_id")
        assert v is None or 0 <= v < cfg.vocab_size
    tok = M.load_tokenizer(str(d))
    assert tok.eos_id is not None and 0 <= tok.pad_id < cfg.vocab_size
    code, _, err = call(train, train_args(env, tmp_path, model=d))
    assert code == 0, err


def test_unused_bos_id_without_a_named_token(env, tmp_path):
    """Without special_tokens_map.json the config's ids are the tokenizer's: a BOS past the vocabulary is dropped
    (nothing uses it), a pad past it falls back to EOS, and training runs."""
    d = copy_model(env, tmp_path, bos_token_id=50256, eos_token_id=0, pad_token_id=50256)
    os.unlink(d / "special_tokens_map.json")
    tok = M.load_tokenizer(str(d))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 0, 0)
    code, _, err = call(train, train_args(env, tmp_path, model=d))
    assert code == 0, err


def test_transformers_loads_the_gpt2_default_ids(env, tmp_path):
    """The reference: transformers builds a GPT-2 whose config has bos/eos 50256 and a vocabulary of 2048."""
    from transformers import GPT2LMHeadModel
    d = copy_model(env, tmp_path, bos_token_id=50256, eos_token_id=50256)
    GPT2LMHeadModel.from_pretrained(str(d))
    M.Decoder.from_pretrained(str(d))


# ----------------------------------------------------------------------------------------------- 6b: record size

def test_field_byte_limit(tmp_path):
    """A field of more than data.MAX_FIELD_BYTES UTF-8 bytes: file:line:field, before any tokenizer; at the limit:
    accepted. Counted in bytes: 2-byte Arabic letters reach it at half the characters."""
    rec = dict(data.load_records(os.path.join(SAMPLE, "train.jsonl"))[0])
    at = "ب" * (data.MAX_FIELD_BYTES // 2)
    f = tmp_path / "ok.jsonl"
    outputs.write_jsonl(f, [dict(rec, answer=at)])
    assert data.load_records(str(f))[0]["answer"] == at
    outputs.write_jsonl(f, [rec, dict(rec, question=at + "ب")])
    with pytest.raises(cli.DataError, match=rf"ok.jsonl:2: question: {data.MAX_FIELD_BYTES + 2} bytes of text; "
                                             rf"the limit is {data.MAX_FIELD_BYTES}"):
        data.load_records(str(f))
    with pytest.raises(cli.DataError, match=r":2: text: "):   # the classifier's reader too
        outputs.write_jsonl(f, [{"text": "x", "label": "critical"}, {"text": at + "ب", "label": "critical"}])
        data.load_labels(str(f))


# ----------------------------------------------------------------------------------------------- 6e: not files

@contextlib.contextmanager
def unblocked(fifo, seconds=10):
    """Fail instead of hanging when the code under test blocks on opening `fifo` for reading (a signal does not help:
    the Rust readers retry the interrupted open): after `seconds` a watchdog opens the FIFO for writing, which
    releases a blocked reader with an empty file, and the test fails on `blocked`."""
    blocked, done = [], threading.Event()

    def release():
        while not done.wait(seconds):   # again and again: a reader may open the file more than once
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)   # succeeds only when a reader is waiting
            except OSError:
                continue
            blocked.append(True)
            os.close(fd)

    watchdog = threading.Thread(target=release, daemon=True)
    watchdog.start()
    try:
        yield blocked
    finally:
        done.set()
        watchdog.join()
    assert not blocked, f"blocked on the FIFO {fifo} for {seconds} s"


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "special_tokens_map.json",
                                  "other.safetensors"])
def test_fifo_in_a_model_folder_is_refused(env, tmp_path, name):
    d = copy_model(env, tmp_path)
    if name != "other.safetensors":
        os.unlink(d / name)
    else:
        os.unlink(d / "model.safetensors")   # the folder scan: any *.safetensors
    os.mkfifo(d / name)
    # a subprocess with a time limit: a reader blocked on the FIFO inside Rust (safetensors, tokenizers) holds the GIL,
    # so nothing in this process could end the wait
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *map(str, train_args(env, tmp_path, model=d))],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 2
    one_error(p.stderr, "--model", name, "not a regular file")


@pytest.mark.parametrize("path", ["fifo", "/dev/zero"])
def test_fifo_or_device_as_data_is_refused(env, tmp_path, path):
    if path == "fifo":
        path = str(tmp_path / "data.jsonl")
        os.mkfifo(path)
    with unblocked(path):
        code, _, err = call(train, train_args(env, tmp_path, data_file=path))
        assert code == 2
        one_error(err, "--data", "not a regular file")
        with pytest.raises(cli.DataError, match="not a regular file"):   # the readers themselves, too
            data.decode_file(path)
        with pytest.raises(cli.DataError, match="not a regular file"):
            xlsx.read_xlsx(path)


# ----------------------------------------------------------------------------------------------- 6c/8b: .xlsx

def _sheet(path, n):
    import openpyxl
    wb = openpyxl.Workbook(write_only=True)
    ws = wb.create_sheet("QA")
    ws.append(["question", "answer"])
    for i in range(n):
        ws.append([f"سؤال {i}؟", f"جواب {i}."])
    wb.save(path)
    return path


def _rewrite(src, dst, name, fn):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            b = zin.read(item.filename)
            zout.writestr(item.filename, fn(b) if item.filename == name else b)
    return dst


def test_stale_dimension_tag_keeps_every_row(tmp_path):
    """A <dimension> that names fewer rows than the sheet has (a file edited by a tool that did not update it):
    all 200 rows are read, not 20."""
    good = _sheet(tmp_path / "good.xlsx", 200)
    stale = _rewrite(good, tmp_path / "stale.xlsx", "xl/worksheets/sheet1.xml",
                     lambda b: b.replace(b"<sheetData>", b'<dimension ref="A1:B21"/><sheetData>', 1))
    rows = xlsx.read_xlsx(str(stale))
    assert len(rows) == 200 and rows[-1][1]["question"] == "سؤال 199؟"


def test_xlsx_bomb_is_refused_from_the_zip_directory(tmp_path):
    """A sheet that inflates more than XLSX_MAX_RATIO times past XLSX_RATIO_FROM bytes: refused from the sizes in the
    zip's directory, before any XML is parsed (the issue's 0.8 MB file of 200 MB XML took 95 s and 1.2 GB)."""
    good = _sheet(tmp_path / "good.xlsx", 3)
    pad = b"<!--" + b" " * (xlsx.XLSX_RATIO_FROM + 1) + b"-->"   # 10 MB of spaces: deflates ~1000x
    bomb = _rewrite(good, tmp_path / "bomb.xlsx", "xl/worksheets/sheet1.xml", lambda b: b.replace(b"<sheetData>",
                                                                                                     pad + b"<sheetData>", 1))
    assert os.path.getsize(bomb) < 100_000
    t0 = time.perf_counter()
    with pytest.raises(cli.DataError, match=r"bomb.xlsx:1: xl/worksheets/sheet1.xml: \d+ bytes inflate to \d+"):
        xlsx.read_xlsx(str(bomb))
    assert time.perf_counter() - t0 < 1
    code, _, err = call(prepare, ["--input", bomb, "--out", tmp_path / "o"])
    assert code == 2
    one_error(err, "bomb.xlsx:1", "zip bomb")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------- 8c: invisible marks

INVISIBLE = ["\u200f", "\u200e", "\u200c", "\u200d", "\u200b", "\u2066", "\u2067", "\u2068", "\u2069", "\u202a",
             "\u202b", "\u202c", "\u202d", "\u202e", "\u061c", "\ufeff", "\u00ad"]


@pytest.mark.parametrize("ch", INVISIBLE, ids=[f"U+{ord(c):04X}" for c in INVISIBLE])
def test_normalize_arabic_removes_invisible_marks(ch):
    word = "صداع شديد"
    assert prepare.normalize_arabic(f"{ch}ص{ch}داع {ch}شديد{ch}") == word
    assert prepare.dedup_key(f"ص{ch}داع", "x") == prepare.dedup_key("صداع", "x")


def test_invisible_variants_collapse_end_to_end(tmp_path):
    """40 pairs x 4 invisible variants (RLM, ZWNJ, RLI...PDI, BOM + soft hyphen) through data/prepare.py: 40 pairs
    remain, and no test question has a twin in train.jsonl (compared after normalisation)."""
    variants = [lambda s: s, lambda s: "\u200f" + s, lambda s: s.replace(" ", " \u200c", 1),
                lambda s: "\u2067" + s + "\u2069", lambda s: s[:2] + "\ufeff\u00ad" + s[2:]]
    rows = []
    for i in range(40):
        q, a = f"عندي صداع منذ {i} يوما ما العلاج", f"الراحة والسوائل {i} مرات"
        for v in variants[:4] if i % 2 else variants[1:]:
            rows.append({"question": v(q), "answer": v(a)})
    src = tmp_path / "in.jsonl"
    outputs.write_jsonl(src, rows)
    code, out, err = call(prepare, ["--input", src, "--out", tmp_path / "o", "--n-train", "30", "--n-test", "10"])
    assert code == 0, err
    tr = data.read_rows(str(tmp_path / "o" / "train.jsonl"))
    te = data.read_rows(str(tmp_path / "o" / "test.jsonl"))
    assert len(tr) + len(te) == 40
    norm = lambda rs: {prepare.normalize_arabic(r["question"]) for _, r in rs}   # noqa: E731
    assert not norm(tr) & norm(te)


# ----------------------------------------------------------------------------------------------- 8d/8e: train.py

def test_record_longer_than_max_len_is_dropped_with_a_note(env, tmp_path):
    """One record whose question alone fills --max-len: dropped, counted once on stdout; the rest trains."""
    recs = [dict(r) for r in env["recs"]]
    recs[3]["question"] = " ".join(["صداع"] * 300)
    f = tmp_path / "long.jsonl"
    outputs.write_jsonl(f, recs)
    code, out, err = call(train, train_args(env, tmp_path, "--max-len", "64", "--batch-size", "7", data_file=f))
    assert code == 0, err
    notes = [ln for ln in out.splitlines() if "dropped" in ln]
    assert len(notes) == 1 and "dropped 1 of 8 records" in notes[0] and "record 4" in notes[0], out


def test_dataset_smaller_than_the_batch_trains_with_a_note(env, tmp_path):
    code, out, err = call(train, train_args(env, tmp_path, "--batch-size", "9"))
    assert code == 0, err
    notes = [ln for ln in out.splitlines() if "--batch-size 9 -> 8" in ln]
    assert len(notes) == 1, out
    assert json.loads((tmp_path / "out" / "args.json").read_text(encoding="utf-8"))["batch_size"] == 8


# ----------------------------------------------------------------------------------------------- 6f: progress

def test_progress_on_large_files_only(tmp_path, monkeypatch):
    """A bar (cli.progress) while PROGRESS_MIN or more records are validated, and none for small files."""
    shown = []

    class Bar:
        n = 0

        def __init__(self, total, desc, unit, quiet=False):
            shown.append((total, desc))

        def update(self, k):
            self.n += k

        def __enter__(self):
            return self

        def __exit__(self, *a):
            shown.append(("done", self.n))

    monkeypatch.setattr(cli, "progress", Bar)
    rec = data.load_records(os.path.join(SAMPLE, "train.jsonl"))[0]
    f = tmp_path / "big.jsonl"
    outputs.write_jsonl(f, [rec] * data.PROGRESS_MIN)
    assert len(data.load_records(str(f))) == data.PROGRESS_MIN
    assert shown == [(data.PROGRESS_MIN, "reading big.jsonl"), ("done", data.PROGRESS_MIN)]
    shown.clear()
    outputs.write_jsonl(f, [rec] * 10)
    data.load_records(str(f))
    assert shown == []
