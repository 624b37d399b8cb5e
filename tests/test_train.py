"""train.py: the severity-weighted loss by hand, accumulation / DDP / resume invariance, signals, bad input, outputs.

Everything runs offline on CPU on a tiny GPT-2-shaped model (32 wide, 2 layers) with a byte-level BPE tokenizer
trained here on a few dozen Arabic records (session fixture `assets`), so nothing depends on data/sample except
the one test of the embedded default. Runs that must die (SIGKILL, SIGTERM) or need two processes (DDP) are
subprocesses; the rest call train.main(argv) in-process, which is much faster.

Also: --loss-norm and --loss-tokens padded against hand computations, --pack against padded batches, --recipe,
the NF4/LoRA memory flags.
"""
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import batching
import data
import lora as L
import lora
import model as M
import train

from conftest import (assert_same_weights, base_args, capture_grads, example_logits, HF, read_log, read_st,
    read_st_file, run_main, run_train, severity_w, split_tokens, state_meta, step_lines, sub_env, TRAIN, _weights,
    WORDS, write_jsonl)

pytestmark = pytest.mark.usefixtures("threads_and_signals")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_TRAIN = os.path.join(ROOT, "data", "sample", "train.jsonl")


def run_sub(argv, timeout=120, **env):
    return subprocess.run([sys.executable, TRAIN, *argv], env=sub_env(**env), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def weight_change(a_dir, b_dir):
    a, b = (read_st(os.path.join(str(d), "model.safetensors")) for d in (a_dir, b_dir))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _step1(assets, tmp_path, monkeypatch, weights, loss_tokens="answer", grad_accum=2):
    """One optimizer step over all 8 records of train8.jsonl; returns (first log line, gradients)."""
    grads = capture_grads(monkeypatch)
    out = tmp_path / f"o-{weights}-{loss_tokens}-{grad_accum}"
    rc = run_main(base_args(assets, out, "--weights", weights, "--batch-size", 8 // grad_accum, "--grad-accum",
                            grad_accum, "--loss-tokens", loss_tokens, "--eval-data", "none",
                            "--loss-norm", "token",   # these tests pin the token-level formula (test_loss_norm.py: example)
                            data_file=assets["train8"], steps=1))
    assert rc == 0
    log = step_lines(read_log(out))
    assert len(log) == 1 and len(grads) == 1
    return log[0], grads[0]


@pytest.mark.parametrize("loss_tokens", ["answer", "all"])
def test_loss_equals_hand_computation(assets, tmp_path, monkeypatch, loss_tokens):
    """L = sum_i w_i * sum_t nll_it / N (N = loss tokens of the step), each NLL from the logits in plain Python."""
    abc = (0.25, 1.0, 1.75)
    rec, _ = _step1(assets, tmp_path, monkeypatch, "0.25,1,1.75", loss_tokens)
    m, tok = M.Decoder.from_pretrained(assets["model"]).eval(), M.load_tokenizer(assets["model"])
    num, plain, N = 0.0, 0.0, 0
    with torch.no_grad():
        for r in assets["recs8"]:
            logits, targets = example_logits(m, tok, r, loss_tokens)
            w = severity_w(r, abc)
            for row, t in zip(logits.tolist(), targets.tolist()):
                mx = max(row)
                nll = mx + math.log(sum(math.exp(v - mx) for v in row)) - row[t]
                num += w * nll
                plain += nll
                N += 1
    assert rec["tokens"] == N
    assert rec["loss"] == pytest.approx(num / N, rel=1e-5)
    assert rec["nll"] == pytest.approx(plain / N, rel=1e-5)
    assert abs(rec["loss"] - rec["nll"]) > 1e-3, "test set-up: weights should move the loss"


def test_ce_weights_give_plain_cross_entropy(assets, tmp_path, monkeypatch):
    rec, _ = _step1(assets, tmp_path, monkeypatch, "1,1,1")
    m, tok = M.Decoder.from_pretrained(assets["model"]).eval(), M.load_tokenizer(assets["model"])
    with torch.no_grad():
        pairs = [example_logits(m, tok, r) for r in assets["recs8"]]
        ce = F.cross_entropy(torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])).item()
    assert rec["loss"] == pytest.approx(ce, rel=1e-5)
    assert rec["nll"] == pytest.approx(ce, rel=1e-5)


def test_doubling_weights_doubles_loss_and_gradient(assets, tmp_path, monkeypatch):
    r1, g1 = _step1(assets, tmp_path, monkeypatch, "1,1,1")
    r2, g2 = _step1(assets, tmp_path, monkeypatch, "2,2,2")
    assert r2["loss"] == pytest.approx(2 * r1["loss"], rel=1e-6)
    assert r2["nll"] == pytest.approx(r1["nll"], rel=1e-6)
    assert r2["grad_norm"] == pytest.approx(2 * r1["grad_norm"], rel=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, 2 * a, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("loss_tokens", ["answer", "all"])
def test_gradient_is_sum_of_per_example_gradients_times_w(assets, tmp_path, monkeypatch, loss_tokens):
    """grad L = sum_i w_i * grad(sum_t nll_it) / N, each example's gradient computed alone without padding: every
    example is scaled by its own w, padding and (by default) question tokens contribute nothing."""
    abc = (0.25, 1.0, 1.75)
    _, got = _step1(assets, tmp_path, monkeypatch, "0.25,1,1.75", loss_tokens)
    m, tok = M.Decoder.from_pretrained(assets["model"]), M.load_tokenizer(assets["model"])
    params = list(m.parameters())
    N = sum(len(example_logits(m, tok, r, loss_tokens)[1]) for r in assets["recs8"])
    ref = [torch.zeros_like(p) for p in params]
    ws = []
    for r in assets["recs8"]:
        logits, targets = example_logits(m, tok, r, loss_tokens)
        g = torch.autograd.grad(F.cross_entropy(logits, targets, reduction="sum"), params)
        w = severity_w(r, abc)
        ws.append(w)
        for acc, gi in zip(ref, g):
            acc += w * gi / N
    assert max(ws) - min(ws) > 0.3, "test set-up: weights should differ between examples"
    assert len(got) == len(ref)
    for name_p, a, b in zip([n for n, _ in m.named_parameters()], got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7, msg=lambda s: f"{name_p}: {s}")
    if loss_tokens == "answer":   # and the unweighted mean differs: the weights really are per example
        flat = lambda gs: torch.cat([x.flatten() for x in gs])  # noqa: E731
        mean_w = sum(ws) / len(ws)
        unif = [torch.zeros_like(p) for p in params]
        for r in assets["recs8"]:
            logits, targets = example_logits(m, tok, r)
            for acc, gi in zip(unif, torch.autograd.grad(F.cross_entropy(logits, targets, reduction="sum"), params)):
                acc += mean_w * gi / N
        assert (flat(got) - flat(unif)).abs().max() > 1e-3 * flat(got).abs().max()


def test_step_batches_and_lr_schedule():
    seen = []
    for s in range(4):                       # 4 steps of 8 from 35 examples: one epoch, ragged tail of 3 dropped
        idx, ep = train.step_batches(35, s, 8, 7)
        assert ep == 0 and len(idx) == 8
        seen += idx
        assert train.step_batches(35, s, 8, 7) == (idx, ep), "must be a pure function of (step, seed)"
    assert len(set(seen)) == 32 and set(seen) <= set(range(35))
    nxt, ep = train.step_batches(35, 4, 8, 7)
    assert ep == 1 and len(nxt) == 8
    assert train.step_batches(35, 0, 8, 8)[0] != train.step_batches(35, 0, 8, 7)[0]
    peak = 1e-3
    assert train.lr_at(0, 10, peak, 2, "linear") == pytest.approx(peak / 2)
    assert train.lr_at(1, 10, peak, 2, "linear") == pytest.approx(peak)
    assert train.lr_at(2, 10, peak, 2, "linear") == pytest.approx(peak)
    assert train.lr_at(6, 10, peak, 2, "linear") == pytest.approx(peak / 2)
    assert train.lr_at(0, 10, peak, 0, "cosine") == pytest.approx(peak)
    assert train.lr_at(5, 10, peak, 0, "cosine") == pytest.approx(peak / 2)
    assert train.lr_at(9, 10, peak, 0, "constant") == pytest.approx(peak)


# ----------------------------------------------------------------------------------------------- 2. invariances

def test_grad_accumulation_equals_one_big_batch(assets, tmp_path):
    a, b = tmp_path / "accum", tmp_path / "big"
    common = ("--lr", "1e-2", "--eval-data", "none", "--weights", "strong",
              "--loss-norm", "token")   # test_loss_norm.py covers the default, example
    assert run_main(base_args(assets, a, "--batch-size", 2, "--grad-accum", 4, *common, steps=4)) == 0
    assert run_main(base_args(assets, b, "--batch-size", 8, "--grad-accum", 1, *common, steps=4)) == 0
    la, lb = step_lines(read_log(a)), step_lines(read_log(b))
    assert [r["step"] for r in la] == [r["step"] for r in lb] == [1, 2, 3, 4]
    for ra, rb in zip(la, lb):
        assert ra["tokens"] == rb["tokens"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6, abs=1e-6)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5)   # Adam would hide a scale error
    assert weight_change(a, assets["model"]) > 1e-3, "test set-up: training should move the weights"
    assert_same_weights(a, b, atol=1e-6, skip_key_bias=True)


def kill_when_saved(argv, out, timeout=120):
    """Start train.py, wait until its first checkpoint (<out>/state.safetensors) appears, then SIGKILL it from outside,
    as an OOM killer or a preemption would. Returns the finished Popen."""
    state = os.path.join(str(out), "state.safetensors")
    p = subprocess.Popen([sys.executable, TRAIN, *argv], env=sub_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and p.poll() is None and not os.path.exists(state):
            time.sleep(0.001)
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p


@pytest.mark.parametrize("lora", [0, 4])
def test_resume_after_kill_equals_uninterrupted(assets, tmp_path, lora):
    """kill -9 right after the first periodic checkpoint (step 3 of 40); --resume then ends exactly where the
    uninterrupted run ends (fp32 CPU, 1e-6), with each step logged once."""
    args = ("--lr", "1e-2", "--eval-data", "none", "--batch-size", 4, "--save-every", 3, "--lora-rank", lora)
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_main(base_args(assets, full, *args, steps=40)) == 0
    p = kill_when_saved(base_args(assets, cut, *args, steps=40), cut)
    assert p.returncode == -signal.SIGKILL, ("the run ended before it could be killed", p.returncode, p.stderr[-2000:])
    k = state_meta(cut)["step"]
    assert k % 3 == 0 and 3 <= k < 40, k
    assert run_main(base_args(assets, cut, *args, "--resume", steps=40)) == 0
    assert state_meta(cut)["step"] == 40
    lf, lc = step_lines(read_log(full)), step_lines(read_log(cut))
    assert [r["step"] for r in lc] == list(range(1, 41)), "the log after resume: each step once, in order"
    for a, b in zip(lf, lc):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-6)
    assert weight_change(full, assets["model"]) > 1e-3, "test set-up: training should move the weights"
    assert_same_weights(full, cut, atol=1e-6)


def test_sigterm_saves_and_resume_finishes(assets, tmp_path):
    out = tmp_path / "term"
    args = base_args(assets, out, "--lr", "1e-3", "--schedule", "constant", "--eval-data", "none",
                     "--batch-size", 4, steps=100000)
    p = subprocess.Popen([sys.executable, TRAIN, *args], env=sub_env(), cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        log_path = out / "train_log.jsonl"
        deadline = time.time() + 90
        while time.time() < deadline and p.poll() is None:
            if log_path.exists() and log_path.read_text(encoding="utf-8").strip():
                break
            time.sleep(0.05)
        assert p.poll() is None, "the run ended before it could be signalled"
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 128 + signal.SIGTERM, (p.returncode, err[-2000:])
    assert (out / "state.safetensors").is_file() and (out / "model.safetensors").is_file()
    k = state_meta(out)["step"]
    steps = [r["step"] for r in step_lines(read_log(out))]
    assert k >= 1 and steps == list(range(1, k + 1)), "saved at the last logged step"
    args[args.index("--max-steps") + 1] = str(k + 2)
    assert run_main(args + ["--resume"]) == 0
    assert state_meta(out)["step"] == k + 2
    assert [r["step"] for r in step_lines(read_log(out))] == list(range(1, k + 3))


# ----------------------------------------------------------------------------------------------- 3. bad input

def _bad_rows(assets):
    good = assets["recs8"]

    def rows(i, **change):
        rs = [dict(r) for r in good]
        rs[i].update(change)
        for k, v in list(rs[i].items()):
            if v is None:
                del rs[i][k]
        return rs
    return {   # name -> (records, line, field)
        "missing field": (rows(2, answer=None), 3, "answer"),
        "probability outside [0,1]": (rows(4, p_nc=-0.2, p_n=0.2, p_c=1.0), 5, "p_nc"),
        "probabilities do not sum to 1": (rows(1, p_nc=0.5, p_n=0.4, p_c=0.3), 2, "p_nc+p_n+p_c"),
        "empty question": (rows(5, question="   "), 6, "question"),
    }


BAD_CASES = ["missing field", "probability outside [0,1]", "probabilities do not sum to 1", "empty question",
             "non-UTF-8 bytes"]


def _assert_one_error_line(err, *needles):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"want exactly one non-empty stderr line, got: {err!r}"
    assert lines[0].startswith("error:"), lines[0]
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


def _assert_nothing_written(out):
    assert not out.exists() or not any(out.iterdir()), f"output folder not empty: {list(out.iterdir())}"


@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("which", ["train", "eval"])
def test_bad_data_exit_2_one_line_nothing_written(assets, tmp_path, capsys, case, which):
    bad = tmp_path / "bad.jsonl"
    if case == "non-UTF-8 bytes":
        write_jsonl(bad, assets["recs8"])
        lines = bad.read_bytes().split(b"\n")
        q = json.dumps(assets["recs8"][3]["question"], ensure_ascii=False).encode()
        lines[3] = lines[3].replace(q, q[:-1] + b"\xff\xfe" + q[-1:])
        bad.write_bytes(b"\n".join(lines))
        line, field = 4, "question"
    else:
        recs, line, field = _bad_rows(assets)[case]
        write_jsonl(bad, recs)
    out = tmp_path / "out"
    files = ["--data", str(bad), "--eval-data", "none"] if which == "train" else \
        ["--data", assets["train8"], "--eval-data", str(bad)]
    argv = ["--model", assets["model"], *files, "--out", str(out), "--max-steps", "1", "--quiet"]
    capsys.readouterr()
    assert run_main(argv) == 2
    _assert_one_error_line(capsys.readouterr().err, str(bad), f":{line}:", f" {field}:")
    _assert_nothing_written(out)


@pytest.mark.parametrize("value", ["0.5,1", "abc", "1,-1,2"])
def test_bad_weights_exit_2(assets, tmp_path, capsys, value):
    out = tmp_path / "out"
    capsys.readouterr()
    assert run_main(base_args(assets, out, "--weights", value, steps=1)) == 2
    _assert_one_error_line(capsys.readouterr().err, "--weights", repr(value))
    _assert_nothing_written(out)


def test_bad_inputs_in_a_subprocess(assets, tmp_path):
    """The same contract seen from outside, through the real entry point: status 2, one 'error:' line naming
    file, line and field, nothing written."""
    out = tmp_path / "out"
    bad = write_jsonl(tmp_path / "bad.jsonl", [dict(assets["recs8"][0])] + [
        {k: v for k, v in r.items() if k != "question"} for r in assets["recs8"][1:2]])
    p = run_sub(base_args(assets, out, steps=1, data_file=bad))
    assert p.returncode == 2
    _assert_one_error_line(p.stderr, f"{bad}:2:", "question")
    _assert_nothing_written(out)


@pytest.mark.parametrize("flags", [("--batch-size", "0"), ("--grad-accum", "0"), ("--grad-accum", "9")])
def test_bad_batch_settings_exit_2(assets, tmp_path, capsys, flags):
    """--grad-accum 9 with 8 records: not even one example per micro-batch of one optimizer step. (--batch-size 9
    trains with a smaller batch: tests/test_limits.py)"""
    out = tmp_path / "out"
    capsys.readouterr()
    assert run_main(base_args(assets, out, *flags, "--eval-data", "none", data_file=assets["train8"], steps=1)) == 2
    _assert_one_error_line(capsys.readouterr().err, flags[0] if flags[1] == "0" else assets["train8"])
    _assert_nothing_written(out)


def test_example_longer_than_model_positions(assets, tmp_path, capsys):
    """The fixture model has 256 learned positions; the default --max-len is 512. A long example must either be
    cut to what the model can take (and train) or be refused up front (status 2, one line, nothing written),
    never crash mid-run with a traceback."""
    recs = [dict(r) for r in assets["recs8"]]
    rng = random.Random(5)
    recs[5]["answer"] = " ".join(rng.choice(WORDS) for _ in range(400))   # well over 256 tokens
    long_file = write_jsonl(tmp_path / "long.jsonl", recs)
    tok = M.load_tokenizer(assets["model"])
    assert sum(map(len, split_tokens(tok, recs[5]))) > 300, "test set-up: the example should be too long"
    out = tmp_path / "out"
    capsys.readouterr()
    rc = run_main(base_args(assets, out, "--eval-data", "none", data_file=long_file, steps=1))
    err = capsys.readouterr().err
    if rc == 2:
        _assert_one_error_line(err)
        _assert_nothing_written(out)
    else:
        assert rc == 0 and [r["step"] for r in step_lines(read_log(out))] == [1]


def test_missing_data_file_exit_2(assets, tmp_path, capsys):
    out = tmp_path / "out"
    missing = str(tmp_path / "nope.jsonl")
    capsys.readouterr()
    assert run_main(base_args(assets, out, data_file=missing, steps=1)) == 2
    _assert_one_error_line(capsys.readouterr().err, missing)
    _assert_nothing_written(out)


# ----------------------------------------------------------------------------------------------- 4. outputs

def _trained_model(assets, out, lora=0):
    """Rebuild the trained model from <out>/state.safetensors (what training held in memory at the end)."""
    m = M.Decoder.from_pretrained(assets["model"])
    if lora:
        L.add_lora(m, ["qkv", "o"], lora, 32, 0.05)
    with safe_open(os.path.join(str(out), "state.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    for k, src in meta.get("aliases", {}).items():
        t[k] = t[src]
    m.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")}, strict=True)
    if m.cfg.tie:
        assert m.lm_head.weight is m.wte.weight
    return m.eval()


@pytest.mark.parametrize("lora", [0, 4])
def test_output_folder_loads_here_and_in_transformers(assets, tmp_path, lora):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "out"
    assert run_main(base_args(assets, out, "--lr", "1e-2", "--eval-data", "none", "--lora-rank", lora, steps=3)) == 0
    for f in ("model.safetensors", "config.json", "tokenizer.json", "state.safetensors", "train_log.jsonl"):
        assert (out / f).is_file(), f
    saved = read_st(out / "model.safetensors")
    assert not any("lora" in k for k in saved), "the exported model must be merged"
    trained = _trained_model(assets, out, lora)
    if lora:
        assert any("lora_B" in n for n, _ in trained.named_parameters())
    tok = M.load_tokenizer(str(out))
    assert tok.eos_id == 0
    r = assets["recs8"][0]
    row = torch.tensor(tok.encode(data.format_prompt(r["question"]) + r["answer"]))
    ids = torch.stack([row, row.flip(0)])
    init = M.Decoder.from_pretrained(assets["model"]).eval()
    loaded = M.Decoder.from_pretrained(str(out)).eval()
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        ref = trained(ids)
        assert (ref - init(ids)).abs().max() > 1e-2, "test set-up: training should change the logits"
        torch.testing.assert_close(loaded(ids), ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(hf(ids).logits, ref, rtol=0, atol=1e-4)
    if lora:   # only the adapted layers (qkv, o) moved; embeddings, MLPs and norms are frozen
        before = read_st(os.path.join(assets["model"], "model.safetensors"))
        for k, v in saved.items():
            moved = (v - before[k]).abs().max().item() > 0
            assert moved == (".attn.c_attn.weight" in k or ".attn.c_proj.weight" in k), k


def test_train_log_records(assets, tmp_path):
    """One line per step (step, loss, lr, tokens, ...) and eval lines every --eval-every steps and at the end, with
    the overall and per-severity eval loss = mean unweighted answer-token NLL of the saved model at the end."""
    out = tmp_path / "out"
    total, warm, lr = 6, 2, 1e-2
    assert run_main(base_args(assets, out, "--lr", lr, "--warmup", warm, "--eval-every", 4, "--batch-size", 4,
                              steps=total)) == 0   # --eval-data auto: data/test.jsonl beside data/train.jsonl
    log = read_log(out)
    steps = [r for r in log if "loss" in r]
    evals = [r for r in log if "eval_loss" in r]
    assert len(steps) + len(evals) == len(log)
    assert [r["step"] for r in steps] == list(range(1, total + 1))
    tok = M.load_tokenizer(assets["model"])
    for r in steps:
        assert isinstance(r["tokens"], int) and r["tokens"] > 0
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["lr"] == pytest.approx(train.lr_at(r["step"] - 1, total, lr, warm, "linear"), rel=1e-9)
        idx, _ = train.step_batches(len(assets["train_recs"]), r["step"] - 1, 4, 1337)
        assert r["tokens"] == sum(len(split_tokens(tok, assets["train_recs"][i])[1]) for i in idx)
    assert steps[0]["lr"] == pytest.approx(lr / 2)
    assert [r["step"] for r in evals] == [4, 6]
    keys = {"eval_loss"} | {f"eval_loss_{s}" for s in data.SEVERITIES}
    for r in evals:
        assert keys <= set(r), r
        assert all(math.isfinite(r[k]) for k in keys)
    # the final eval by hand, from the saved model
    m = M.Decoder.from_pretrained(str(out)).eval()
    tot, cnt = [0.0] * 4, [0] * 4
    with torch.no_grad():
        for rec in assets["test_recs"]:
            logits, targets = example_logits(m, tok, rec)
            s = F.cross_entropy(logits, targets, reduction="sum").item()
            for c in (0, data.SEVERITIES.index(rec["severity"]) + 1):
                tot[c] += s
                cnt[c] += len(targets)
    assert evals[-1]["eval_loss"] == pytest.approx(tot[0] / cnt[0], rel=1e-5)
    for i, s in enumerate(data.SEVERITIES):
        assert evals[-1][f"eval_loss_{s}"] == pytest.approx(tot[i + 1] / cnt[i + 1], rel=1e-5)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(assets, tmp_path, capsys):
    out = tmp_path / "out"
    capsys.readouterr()
    rc = run_main(base_args(assets, out, "--lr", "1e30", "--grad-clip", "0", "--save-every", 1, "--eval-data", "none",
                            steps=50))
    err = capsys.readouterr().err
    assert rc == 1
    _assert_one_error_line(err, "non-finite")
    done = [r["step"] for r in step_lines(read_log(out))]
    assert done and done == list(range(1, len(done) + 1))
    assert all(math.isfinite(r["loss"]) for r in step_lines(read_log(out)))
    assert state_meta(out)["step"] == done[-1], "the checkpoint is the last step that completed"
    assert all(torch.isfinite(v).all() for v in read_st(out / "model.safetensors").values())


def test_non_finite_loss_mid_run_via_monkeypatch(assets, tmp_path, capsys, monkeypatch):
    """A NaN in step 3's forward: exit 1, 'non-finite' on stderr, the step-2 checkpoint untouched."""
    out = tmp_path / "out"
    calls = {"n": 0}
    orig = M.Decoder.forward

    def poisoned(self, idx, mask=None, targets=None):
        y = orig(self, idx, mask, targets)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 3:
                y = y * float("nan")
        return y
    monkeypatch.setattr(M.Decoder, "forward", poisoned)
    capsys.readouterr()
    rc = run_main(base_args(assets, out, "--save-every", 1, "--eval-data", "none", "--batch-size", 4, steps=10))
    assert rc == 1
    _assert_one_error_line(capsys.readouterr().err, "non-finite")
    assert [r["step"] for r in step_lines(read_log(out))] == [1, 2]
    assert state_meta(out)["step"] == 2


# ----------------------------------------------------------------------------------------------- 5. the default

def test_embedded_default_tiny_runs_offline_and_learns(tmp_path):
    if not os.path.isfile(SAMPLE_TRAIN):
        pytest.skip("data/sample/train.jsonl is absent (made by data/sample/make_sample.py)")
    out = tmp_path / "tiny"
    p = run_sub(["--model", "tiny", "--max-steps", "30", "--out", str(out), "--quiet"], timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    losses = [r["loss"] for r in step_lines(read_log(out))]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    for f in ("model.safetensors", "config.json", "tokenizer.json", "state.safetensors"):
        assert (out / f).is_file(), f
    assert state_meta(out)["step"] == 30
    m = M.Decoder.from_pretrained(str(out))
    assert m.cfg.vocab_size >= M.load_tokenizer(str(out)).vocab_size

ABC = (0.25, 1.0, 1.75)


def py_nll(logits, targets):
    """Per-token NLL in plain Python (log-sum-exp by hand), not through torch's cross-entropy."""
    out = []
    for row, t in zip(logits.tolist(), targets.tolist()):
        mx = max(row)
        out.append(mx + math.log(sum(math.exp(v - mx) for v in row)) - row[t])
    return out


def test_loss_scale_by_hand():
    w = torch.tensor([0.5, 1.5, 1.0, 2.0])
    n = torch.tensor([4.0, 1.0, 0.0, 5.0])            # the third example has no loss token (truncated away)
    tok = train.loss_scale(w, n, "token", torch.tensor(10.0), torch.tensor(3.0))
    assert tok.tolist() == pytest.approx([0.05, 0.15, 0.1, 0.2])
    ex = train.loss_scale(w, n, "example", torch.tensor(10.0), torch.tensor(3.0))
    assert ex.tolist() == pytest.approx([0.5 / 4 / 3, 1.5 / 1 / 3, 0.0, 2.0 / 5 / 3])


def one_step(assets, tmp_path, monkeypatch, *flags, grad_accum=2, tag="x"):
    grads = capture_grads(monkeypatch)
    out = tmp_path / tag
    rc = run_main(base_args(assets, out, "--weights", ",".join(map(str, ABC)), "--batch-size", 8 // grad_accum,
                            "--grad-accum", grad_accum, "--eval-data", "none", *flags,
                            data_file=assets["train8"], steps=1))
    assert rc == 0
    (rec,) = step_lines(read_log(out))
    return rec, grads[0]


def test_example_norm_loss_and_gradient_by_hand(assets, tmp_path, monkeypatch):
    """One step over the 8 records (2 micro-batches of 4): the loss is the mean of the examples' own means of
    w * NLL, the unweighted nll the mean of their mean NLL, and the gradient sum_i w_i / n_i / 8 * grad sum_t NLL_it,
    each example run alone without padding. Token-level normalisation gives another value (set-up check)."""
    rec, got = one_step(assets, tmp_path, monkeypatch, "--loss-norm", "example")
    m, tok = M.Decoder.from_pretrained(assets["model"]), M.load_tokenizer(assets["model"])
    params = list(m.parameters())
    recs = assets["recs8"]
    per_ex_loss, per_ex_nll, tok_num, tok_den = [], [], 0.0, 0
    ref = [torch.zeros_like(p) for p in params]
    for r in recs:
        logits, targets = example_logits(m, tok, r)
        nll = py_nll(logits.detach(), targets)
        w = severity_w(r, ABC)
        per_ex_loss.append(w * sum(nll) / len(nll))
        per_ex_nll.append(sum(nll) / len(nll))
        tok_num += w * sum(nll)
        tok_den += len(nll)
        g = torch.autograd.grad(F.cross_entropy(logits, targets, reduction="sum"), params)
        for acc, gi in zip(ref, g):
            acc += w / len(nll) / len(recs) * gi
    assert rec["examples"] == 8 and rec["tokens"] == tok_den
    assert rec["loss"] == pytest.approx(sum(per_ex_loss) / 8, rel=1e-5)
    assert rec["nll"] == pytest.approx(sum(per_ex_nll) / 8, rel=1e-5)
    assert abs(rec["loss"] - tok_num / tok_den) > 1e-3, "test set-up: the two normalisations should differ here"
    for (name, _), a, b in zip(m.named_parameters(), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7, msg=lambda s: f"{name}: {s}")


def test_token_norm_still_the_token_mean(assets, tmp_path, monkeypatch):
    rec, _ = one_step(assets, tmp_path, monkeypatch, "--loss-norm", "token")
    m, tok = M.Decoder.from_pretrained(assets["model"]).eval(), M.load_tokenizer(assets["model"])
    num = den = 0.0
    with torch.no_grad():
        for r in assets["recs8"]:
            nll = py_nll(*example_logits(m, tok, r))
            num += severity_w(r, ABC) * sum(nll)
            den += len(nll)
    assert rec["loss"] == pytest.approx(num / den, rel=1e-5)


def test_example_norm_invariant_to_grad_accum(assets, tmp_path):
    a, b = tmp_path / "accum", tmp_path / "big"
    common = ("--lr", "1e-2", "--eval-data", "none", "--weights", "strong", "--loss-norm", "example")
    assert run_main(base_args(assets, a, "--batch-size", 2, "--grad-accum", 4, *common, steps=3)) == 0
    assert run_main(base_args(assets, b, "--batch-size", 8, "--grad-accum", 1, *common, steps=3)) == 0
    la, lb = step_lines(read_log(a)), step_lines(read_log(b))
    for ra, rb in zip(la, lb):
        assert ra["examples"] == rb["examples"] == 8
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6, abs=1e-6)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5)
    assert_same_weights(a, b, atol=1e-6, skip_key_bias=True)


def test_padded_loss_covers_every_position_as_the_notebooks(assets, tmp_path, monkeypatch):
    """--loss-tokens padded --max-len 80: each sequence is padded with EOS to 80 tokens and all 79 targets count,
    question and padding included, with the padding hidden by the attention mask: what the notebooks' Trainer
    computed, here transformers itself on each example (input_ids, attention_mask, labels = input_ids). With equal
    lengths, the loss is the mean over examples of w * that loss. pad_frac reports the padding honestly."""
    from transformers import AutoModelForCausalLM
    L = 80
    rec, _ = one_step(assets, tmp_path, monkeypatch, "--loss-tokens", "padded", "--max-len", L, tag="pad")
    hf, tok = AutoModelForCausalLM.from_pretrained(assets["model"]).eval(), M.load_tokenizer(assets["model"])
    want, longest, pads = 0.0, 0, 0
    with torch.no_grad():
        for r in assets["recs8"]:
            p, a = split_tokens(tok, r)
            ids = (p + a)[:L]
            longest, pads = max(longest, len(ids)), pads + L - 1 - len(ids)   # padding among the 79 inputs
            am = torch.tensor([1] * len(ids) + [0] * (L - len(ids)))
            ids = torch.tensor(ids + [tok.eos_id] * (L - len(ids)))
            loss = hf(input_ids=ids[None], attention_mask=am[None], labels=ids[None]).loss   # mean over 79
            want += severity_w(r, ABC) * loss.item() / 8
    assert longest < L - 1, "test set-up: padding should be present"
    assert rec["tokens"] == 8 * (L - 1) and rec["examples"] == 8
    assert rec["pad_frac"] == pytest.approx(pads / (8 * (L - 1)), abs=1e-12)
    assert rec["loss"] == pytest.approx(want, rel=1e-5)

FAMS = ("gpt2", "bloom", "qwen2", "qwen3", "lfm2", "llama")
TOL = 1e-5


# ----------------------------------------------------------------------------------------------- training

def _run(assets, fam, out, *extra):
    argv = ["--model", assets["folder"](fam), "--data", assets["train"], "--eval-data", assets["test"],
            "--out", str(out), "--max-steps", "3", "--batch-size", "4", "--max-len", "128", "--quiet",
            "--warmup", "0", "--schedule", "constant", *map(str, extra)]
    train.main(argv)
    with open(os.path.join(str(out), "train_log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    return [r for r in log if "loss" in r], [r for r in log if "eval_loss" in r]


def _assert_same_run(a, b):
    (steps_a, ev_a), (steps_b, ev_b) = a, b
    assert len(steps_a) == len(steps_b) == 3
    for ra, rb in zip(steps_a, steps_b):
        assert ra["tokens"] == rb["tokens"] and ra["tokens_seen"] == rb["tokens_seen"]   # the same examples
        for k in ("loss", "nll", "grad_norm"):
            assert abs(ra[k] - rb[k]) <= TOL * max(1.0, abs(ra[k])), (k, ra[k], rb[k])
    assert abs(ev_a[-1]["eval_loss"] - ev_b[-1]["eval_loss"]) <= TOL * abs(ev_a[-1]["eval_loss"])
    return steps_a, steps_b


@pytest.mark.pack_assets
@pytest.mark.parametrize("fam", FAMS)
def test_lr0_losses_equal_packed_and_padded(assets, tmp_path, fam):
    """--lr 0, --grad-accum 2, both --loss-norm: every step's logged loss (and unweighted NLL, grad norm, eval loss)
    is the padded run's to 1e-5, and the packed run logs less padding for the same real tokens."""
    losses = {}
    for norm in ("token", "example"):
        extra = ["--lr", 0, "--grad-accum", 2, "--loss-norm", norm]
        pad = _run(assets, fam, tmp_path / f"pad-{norm}", *extra)
        pack = _run(assets, fam, tmp_path / f"pack-{norm}", *extra, "--pack")
        steps_pad, steps_pack = _assert_same_run(pad, pack)
        for a, b in zip(steps_pack, steps_pad):   # same real tokens (checked above) in fewer slots
            assert a["pad_frac"] < b["pad_frac"] - 0.05
        losses[norm] = [r["loss"] for r in steps_pack]
    assert all(abs(a - b) > 1e-3 for a, b in zip(losses["token"], losses["example"]))   # two different estimators


def _capture_grads(monkeypatch):
    """Every optimizer step's gradients (before clipping), in parameter order."""
    grads, orig = [], torch.nn.utils.clip_grad_norm_

    def spy(parameters, *a, **k):
        ps = list(parameters)
        grads.append([p.grad.detach().clone() for p in ps if p.grad is not None])
        return orig(ps, *a, **k)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    return grads


@pytest.mark.pack_assets
@pytest.mark.parametrize("fam,lora", [("gpt2", 0), ("bloom", 4), ("qwen2", 0), ("qwen3", 4), ("lfm2", 4),
                                      ("lfm2", 0), ("llama", 4)])
def test_real_steps_same_weights_packed_and_padded(assets, tmp_path, monkeypatch, fam, lora):
    """Three real AdamW steps (--grad-accum 2; LoRA or full fine-tuning): every step's gradients, losses and the
    final weights agree to 1e-5. The lr is small because AdamW divides by sqrt(v): an entry whose gradient is
    near rounding level moves by ~lr either way, so two summation orders may part by a fraction of lr there."""
    extra = ["--lr", 1e-4, "--grad-accum", 2] + (["--lora-rank", lora, "--lora-dropout", 0] if lora else [])
    grads = _capture_grads(monkeypatch)
    _assert_same_run(_run(assets, fam, tmp_path / "pad", *extra), _run(assets, fam, tmp_path / "pack", *extra, "--pack"))
    assert len(grads) == 6 and len(grads[0]) == len(grads[3]) > 0
    for ga, gb in zip(grads[:3], grads[3:]):
        for a, b in zip(ga, gb):
            assert (a - b).abs().max().item() <= TOL
    a, b = _weights(tmp_path / "pad"), _weights(tmp_path / "pack")
    start = _weights(assets["folder"](fam))
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 2e-4      # the steps did change the weights
    cfg = M.Decoder.from_pretrained(assets["folder"](fam)).cfg
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    for k in a:
        if k.endswith("attn.qkv.bias"):   # the key bias has an exactly zero gradient (softmax ignores a constant
            a[k][q:q + kv] = b[k][q:q + kv] = 0    # shift): AdamW turns its 1e-9 rounding noise into lr-sized steps
        assert (a[k] - b[k]).abs().max().item() <= TOL, (k, (a[k] - b[k]).abs().max().item())


# ----------------------------------------------------------------------------------------------- normalisations

@pytest.mark.pack_assets
@pytest.mark.parametrize("norm", ["token", "example"])
def test_both_loss_normalisations_exact_under_packing(assets, norm):
    """train.loss_scale given each token its own example's loss-token count (what train.py does with --pack):
    packed rows give the step's loss of the hand formula from each example run alone (token: sum w*nll / all loss
    tokens; example: mean over examples of w * own mean NLL), and so does the padded batch."""
    import data
    fam = "lfm2"                                                 # the conv makes packing the most delicate
    m = M.Decoder.from_pretrained(assets["folder"](fam)).eval()
    tok = M.load_tokenizer(assets["folder"](fam))
    ex = batching.encode(data.load_records(assets["train"])[:10], tok, (0.5, 1.0, 1.5), 48, "answer")
    per_sum, per_n = [], []
    with torch.no_grad():
        for e in ex:                                             # each example alone, no padding at all
            x, y, _, _, _ = batching.collate([e], tok.pad_id, "cpu")
            per_sum.append(m(x, targets=y).sum().item())
            per_n.append(int((y != -100).sum()))
        if norm == "token":
            want = sum(e[2] * s for e, s in zip(ex, per_sum)) / sum(per_n)
        else:
            want = sum(e[2] * s / n for e, s, n in zip(ex, per_sum, per_n)) / len(ex)
        N, E = torch.tensor(float(sum(per_n))), torch.tensor(float(len(ex)))
        x, y, w, _, _ = batching.collate(ex, tok.pad_id, "cpu")    # one padded batch, per-example factors
        padded = (m(x, targets=y).sum(1) * train.loss_scale(w, (y != -100).sum(1).float(), norm, N, E)).sum().item()
        n_i = torch.tensor([float(n) for n in per_n])
        packed = 0.0
        for x, y, w, _, kw in batching.pack_step(ex, 47, 2, tok.pad_id, "cpu"):
            seg = kw["segments"]
            n_tok = n_i[seg.clamp(min=0)] * (seg >= 0)          # per token: its example's count, 0 on padding
            packed += (m(x, targets=y, segments=seg) * train.loss_scale(w, n_tok, norm, N, E)).sum().item()
    assert abs(padded - want) <= 1e-5 * abs(want)
    assert abs(packed - want) <= 1e-5 * abs(want)
    token = sum(e[2] * s for e, s in zip(ex, per_sum)) / sum(per_n)
    example = sum(e[2] * s / n for e, s, n in zip(ex, per_sum, per_n)) / len(ex)
    assert abs(token - example) > 1e-3                          # the two really differ on these lengths


def test_train_recipe_sets_defaults_and_flags_still_win():
    paper = train.get_args([])
    assert (paper.loss_tokens, paper.loss_norm, paper.lora_rank, paper.batch_size, paper.grad_accum) == \
        ("answer", "example", 0, 8, 1)
    nb = train.get_args(["--recipe", "notebook"])
    assert (nb.loss_tokens, nb.max_len, nb.lora_rank, nb.lora_alpha, nb.lora_dropout, nb.lr, nb.epochs,
            nb.batch_size, nb.grad_accum, nb.schedule, nb.warmup, nb.quantize, nb.lora_targets) == \
        ("padded", 512, 16, 32, 0.05, 2e-4, 3, 1, 8, "linear", 0, "nf4", "notebook")
    assert (paper.quantize, paper.lora_targets) == ("none", "qkv,o")
    mixed = train.get_args(["--recipe", "notebook", "--lr", "1e-3", "--loss-tokens", "all", "--batch-size", "4"])
    assert (mixed.lr, mixed.loss_tokens, mixed.batch_size, mixed.grad_accum) == (1e-3, "all", 4, 8)


def test_train_carries_the_base_generation_config(assets, tmp_path):
    """A base folder with a generation_config.json (Qwen3-like sampling settings): train.py's output folder holds
    the same file, byte for byte; without one, none is invented."""
    base = tmp_path / "base"
    base.mkdir()
    for f in os.listdir(assets["model"]):
        (base / f).write_bytes(open(os.path.join(assets["model"], f), "rb").read())
    text = json.dumps({"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "eos_token_id": 0})
    (base / "generation_config.json").write_text(text, encoding="utf-8")
    out, plain = tmp_path / "out", tmp_path / "plain"
    common = ("--eval-data", "none", "--batch-size", "8")
    args = base_args(assets, out, *common, steps=1)
    args[args.index("--model") + 1] = str(base)
    assert run_main(args) == 0
    assert (out / "generation_config.json").read_text(encoding="utf-8") == text
    assert run_main(base_args(assets, plain, *common, steps=1)) == 0
    assert not (plain / "generation_config.json").exists()


def test_train_notebook_recipe_uses_nf4_and_the_family_lora_targets(tmp_path):
    """--recipe notebook is QLoRA on the notebooks' targets: a GPT-2-family model gets c_attn,c_proj (the notebooks'
    peft target_modules) on a 4-bit NF4 base; an explicit --lora-targets still wins."""
    out = tmp_path / "nb"
    train.main(["--recipe", "notebook", "--model", "tiny", "--max-steps", "1", "--max-len", "48", "--quiet",
                "--out", str(out)])
    a = json.loads((out / "args.json").read_text())
    assert (a["quantize"], a["lora_targets"], a["lora_rank"]) == ("nf4", ["c_attn", "c_proj"], 16)
    assert train.NOTEBOOK_LORA_TARGETS["qwen2"] == "q_proj,v_proj"
    out2 = tmp_path / "nb2"
    train.main(["--recipe", "notebook", "--model", "tiny", "--max-steps", "1", "--max-len", "48", "--quiet",
                "--lora-targets", "qkv", "--out", str(out2)])
    assert json.loads((out2 / "args.json").read_text())["lora_targets"] == ["qkv"]

transformers.logging.set_verbosity_error()


SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample", "train.jsonl")


@pytest.mark.parametrize("argv,env,msg", [
    (["--quantize", "nf4"], {}, "error: --quantize: nf4 freezes the base weights"),
    (["--fsdp"], {}, "error: --fsdp: shards over several processes"),
    (["--fsdp", "--lora-rank", "4"], {"RANK": "0", "WORLD_SIZE": "2"}, "error: --fsdp: is for full fine-tuning"),
    (["--fsdp", "--dtype", "fp16"], {"RANK": "0", "WORLD_SIZE": "2"}, "error: --fsdp: --dtype fp16"),
    (["--lora-rank", "4", "--lora-targets", "q_proj"], {}, "error: --lora-targets: LoRA target 'q_proj' matches no"),
    (["--lora-rank", "4", "--lora-targets", "c_attn,qproj"], {}, "error: --lora-targets: 'qproj' is not a layer name"),
])
def test_memory_flags_refused_in_one_line(argv, env, msg, tmp_path, capsys, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    assert run_train(["--data", SAMPLE, "--out", str(out), "--max-steps", "1", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(msg), err
    assert not out.exists(), "nothing may be written before the flags are checked"


def test_train_nf4_lora_checkpointed_equals_plain_and_saves_hf(tmp_path, monkeypatch):
    """--quantize nf4 --lora-rank --grad-checkpoint on a qwen2 folder: the same losses and gradient norms as without
    --grad-checkpoint, checkpoint() really called, and the output folder loads in transformers."""
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model_dir = str(tmp_path / "base")   # a qwen2-shaped model speaking the sample's 2,048-token tokenizer
    cfg = M.Config.from_hf(dict(HF["qwen2"], vocab_size=2048, bos_token_id=0, eos_token_id=0))
    torch.manual_seed(0)
    M.Decoder(cfg).save_pretrained(model_dir)
    shutil.copy(os.path.join(os.path.dirname(SAMPLE), "tokenizer.json"), model_dir)
    d = model_dir
    common = ["--model", model_dir, "--data", SAMPLE, "--eval-data", "none", "--max-steps", "2", "--quiet",
              "--batch-size", "2", "--max-len", "24", "--loss-tokens", "all", "--quantize", "nf4", "--lora-rank", "4",
              "--lora-targets", "q_proj,v_proj", "--lr", "1e-2"]
    assert run_train(common + ["--out", str(tmp_path / "a")]) == 0
    assert not calls
    assert run_train(common + ["--out", str(tmp_path / "b"), "--grad-checkpoint"]) == 0
    assert len(calls) == 2 * 2   # 2 blocks x 2 steps
    la = [json.loads(ln) for ln in open(tmp_path / "a" / "train_log.jsonl")]
    lb = [json.loads(ln) for ln in open(tmp_path / "b" / "train_log.jsonl")]
    assert [(r["loss"], r["grad_norm"]) for r in la] == [(r["loss"], r["grad_norm"]) for r in lb]
    before, after = read_st(d), read_st(str(tmp_path / "b"))
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert "model.layers.0.self_attn.q_proj.weight" in moved and "model.embed_tokens.weight" not in moved
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "b"), dtype=torch.float32)
    assert hf.config.model_type == "qwen2"


def test_train_nf4_lora_resume_equals_uninterrupted(tmp_path):
    """A QLoRA run (codes and absmax in state.safetensors) stopped at step 2 and resumed to 4 ends bit-identical to
    the uninterrupted run (constant lr: the stop changes no schedule)."""
    common = ["--model", "tiny", "--data", SAMPLE, "--eval-data", "none", "--quiet", "--batch-size", "4",
              "--max-len", "48", "--quantize", "nf4", "--lora-rank", "4", "--lora-targets", "c_attn,c_proj",
              "--lr", "1e-2", "--schedule", "constant", "--grad-checkpoint"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_train(common + ["--max-steps", "4", "--out", str(a)]) == 0
    assert run_train(common + ["--max-steps", "2", "--out", str(b)]) == 0
    assert run_train(common + ["--max-steps", "4", "--out", str(b), "--resume"]) == 0
    sa, sb = read_st_file(a / "state.safetensors"), read_st_file(b / "state.safetensors")
    assert any(k.endswith(".codes") for k in sa) and any("lora_B" in k for k in sa)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert read_st_file(a / "model.safetensors").keys() == read_st_file(b / "model.safetensors").keys()


# -- --severity-source label ---------------------------------------------------------------------------------------

SAMPLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample")


def tiny(out, data_file, *extra):
    return ["--model", "tiny", "--data", str(data_file), "--eval-data", "none", "--out", str(out), "--max-steps", "2",
            "--batch-size", "4", "--weights", "0.5,1,2", "--quiet", *extra]


@pytest.fixture()
def files(tmp_path):
    recs = data.load_records(os.path.join(SAMPLE_DIR, "train.jsonl"))[:24]
    soft = tmp_path / "soft.jsonl"
    labels = tmp_path / "labels.jsonl"
    soft.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    labels.write_text("".join(json.dumps({k: r[k] for k in ("question", "answer", "severity")}, ensure_ascii=False)
                              + "\n" for r in recs), encoding="utf-8")
    return recs, soft, labels


def test_label_weights_are_one_hot(files):
    recs, soft, labels = files
    abc = (0.5, 1.0, 2.0)
    by_label = train.load_records(str(soft), "label")
    assert [data.severity_weight(r, abc) for r in by_label] == [abc[data.SEVERITIES.index(r["severity"])] for r in recs]
    assert train.load_records(str(labels), "label") == by_label          # label-only data: the same weights
    soft_w = [data.severity_weight(r, abc) for r in train.load_records(str(soft), "probs")]
    assert soft_w == [data.severity_weight(r, abc) for r in recs] and soft_w != [data.severity_weight(r, abc)
                                                                                 for r in by_label]


def test_label_only_data_refused_without_the_flag(files, tmp_path, capsys):
    _, _, labels = files
    out = tmp_path / "out"
    capsys.readouterr()
    assert run_train(tiny(out, labels)) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: {labels}:1: p_nc: missing field")
    assert "annotate.py adds them" in err[0] and "--severity-source label" in err[0]
    assert not out.exists() or not any(out.iterdir())
    assert run_train(tiny(out, labels, "--severity-source", "label")) == 0
    args = json.loads((out / "args.json").read_text())
    assert args["severity_source"] == "label"
    assert "| severity source | label |" in (out / "README.md").read_text()


def test_the_loss_sees_the_label_weights(files, tmp_path):
    """--lr 0 over the same examples: the weighted loss differs between the two sources, the NLL does not."""
    _, soft, _ = files
    logs = {}
    for src in ("probs", "label"):
        out = tmp_path / src
        assert run_train(tiny(out, soft, "--severity-source", src, "--lr", "0")) == 0
        logs[src] = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["nll"] for r in logs["probs"]] == pytest.approx([r["nll"] for r in logs["label"]], rel=1e-6)
    assert all(abs(a["loss"] - b["loss"]) > 1e-4 for a, b in zip(logs["probs"], logs["label"]))


def test_resume_refuses_a_changed_source(files, tmp_path, capsys):
    _, soft, _ = files
    out = tmp_path / "out"
    assert run_train(tiny(out, soft, "--severity-source", "label")) == 0
    capsys.readouterr()
    assert run_train(tiny(out, soft, "--resume", "--max-steps", "3")) == 2
    err = capsys.readouterr().err
    assert "--severity-source is probs but the run saved in" in err and "used label" in err
    assert run_train(tiny(out, soft, "--resume", "--severity-source", "label", "--max-steps", "3")) == 0
