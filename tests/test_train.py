"""train.py: the severity-weighted loss by hand, accumulation / DDP / resume invariance, signals, bad input, outputs.

Everything runs offline on CPU on a tiny GPT-2-shaped model (32 wide, 2 layers) with a byte-level BPE tokenizer
trained here on a few dozen Arabic records (session fixture `assets`), so nothing depends on data/sample except
the one test of the embedded default. Runs that must die (SIGKILL, SIGTERM) or need two processes (DDP) are
subprocesses; the rest call train.main(argv) in-process, which is much faster.
"""
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import cli
import batching
import data
import model as M
import lora as L
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
SAMPLE_TRAIN = os.path.join(ROOT, "data", "sample", "train.jsonl")

WORDS = ("ألم صداع حرارة سعال دواء طبيب مستشفى قلب صدر ضغط سكر معدة رأس دم تنفس حساسية جلد عين أذن ظهر "
         "مفاصل نوم تعب دوخة غثيان التهاب مضاد حيوي فحص تحليل أشعة علاج راحة ماء غذاء رياضة نزيف إغماء").split()


# ----------------------------------------------------------------------------------------------- fixtures/helpers

def make_records(n, seed):
    """n canonical records: Arabic Q/A of uneven lengths, soft probabilities (3 decimals, summing to 1) whose
    dominant class cycles through the three severities."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) + "؟"
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 22)))
        x = [rng.uniform(0.05, 0.6) for _ in range(3)]
        x[i % 3] += 1.0
        s = sum(x)
        p_nc, p_n = round(x[0] / s, 3), round(x[1] / s, 3)
        p_c = round(1.0 - p_nc - p_n, 3)
        out.append(dict(question=q, answer=a, severity=data.SEVERITIES[i % 3], p_nc=p_nc, p_n=p_n, p_c=p_c))
    return out


def write_jsonl(path, recs):
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def byte_bpe(records):
    """A GPT-2-style byte-level BPE (400 tokens, <|endoftext|> = 0) trained on the records and the answer cue."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([r["question"] + "\n" + r["answer"] for r in records] + [data.PROMPT_CUE], trainer)
    return tk


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """A tiny local model folder (config.json + model.safetensors + tokenizer.json) and data files:
    data/train.jsonl (32) + data/test.jsonl (9, found by --eval-data auto), one8/train8.jsonl (8 records, no
    test.jsonl beside it: one optimizer step of 8 covers it all)."""
    root = tmp_path_factory.mktemp("train_assets")
    train_recs, test_recs, recs8 = make_records(32, 0), make_records(9, 1), make_records(8, 2)
    tk = byte_bpe(train_recs)
    assert tk.token_to_id("<|endoftext|>") == 0
    cfg = M.Config.from_hf(dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=2, n_inner=None, n_positions=256,
                                vocab_size=tk.get_vocab_size(), layer_norm_epsilon=1e-5,
                                activation_function="gelu_new", bos_token_id=0, eos_token_id=0,
                                tie_word_embeddings=True))
    m = M.Decoder(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():   # larger than the default init, perturbed norms/biases: logits far from uniform
        for name, p in m.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    mdir = root / "model"
    m.save_pretrained(str(mdir))
    tk.save(str(mdir / "tokenizer.json"))
    (root / "data").mkdir()
    (root / "one8").mkdir()
    return dict(root=root, model=str(mdir),
                train=write_jsonl(root / "data" / "train.jsonl", train_recs),
                test=write_jsonl(root / "data" / "test.jsonl", test_recs),
                train8=write_jsonl(root / "one8" / "train8.jsonl", recs8),
                train_recs=train_recs, test_recs=test_recs, recs8=recs8)


pytestmark = pytest.mark.usefixtures("threads_and_signals")


def base_args(assets, out, *extra, data_file=None, steps=3):
    return ["--model", assets["model"], "--data", data_file or assets["train"], "--out", str(out),
            "--max-steps", str(steps), "--quiet", *map(str, extra)]


def run_main(argv):
    """train.main in-process; returns the exit status (0 when it returns normally)."""
    try:
        train.main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def sub_env(**kw):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT, HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update({k: str(v) for k, v in kw.items()})
    return env


def run_sub(argv, timeout=120, **env):
    return subprocess.run([sys.executable, TRAIN, *argv], env=sub_env(**env), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def read_log(out):
    with open(os.path.join(str(out), "train_log.jsonl"), encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def step_lines(log):
    return [r for r in log if "loss" in r]


def read_st(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def state_meta(out):
    with safe_open(os.path.join(str(out), "state.safetensors"), "pt") as f:
        return json.loads(f.metadata()["meta"])


def assert_same_weights(a_dir, b_dir, atol, skip_key_bias=False):
    """model.safetensors of two runs agree to atol. skip_key_bias: leave out the key part of GPT-2's c_attn bias.
    Its true gradient is exactly zero (adding a constant to every key shifts each query's scores by a constant,
    which softmax ignores), so what it receives is rounding noise, and Adam turns noise of any size into steps of
    about lr: two summation orders (micro-batches, ranks) then disagree there by ~lr while agreeing elsewhere."""
    a, b = (read_st(os.path.join(str(d), "model.safetensors")) for d in (a_dir, b_dir))
    assert a.keys() == b.keys()
    worst, where = 0.0, None
    for k in a:
        d = (a[k] - b[k]).abs()
        if skip_key_bias and k.endswith("attn.c_attn.bias"):
            n = d.numel() // 3
            d = torch.cat([d[:n], d[2 * n:]])
        if d.max().item() > worst:
            worst, where = d.max().item(), k
    assert worst <= atol, f"model.safetensors differ by {worst:.3g} > {atol:g} (in {where})"


def weight_change(a_dir, b_dir):
    a, b = (read_st(os.path.join(str(d), "model.safetensors")) for d in (a_dir, b_dir))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def severity_w(r, abc):
    return abc[0] * r["p_nc"] + abc[1] * r["p_n"] + abc[2] * r["p_c"]


def split_tokens(tok, r):
    """(prompt ids, answer ids + EOS): the training text is format_prompt(question) + answer + EOS."""
    return tok.encode(data.format_prompt(r["question"])), tok.encode(r["answer"], special=False) + [tok.eos_id]


def example_logits(m, tok, r, loss_tokens="answer"):
    """One example run alone (no padding): the logits that predict each loss token, and those tokens."""
    p, a = split_tokens(tok, r)
    ids = p + a
    start = 1 if loss_tokens == "all" else len(p)       # first position of ids whose prediction counts
    logits = m(torch.tensor([ids[:-1]]))[0]              # logits[t] predicts ids[t + 1]
    return logits[start - 1:], torch.tensor(ids[start:])


def capture_grads(monkeypatch):
    """Record every optimizer step's gradients (before clipping) in model.parameters() order."""
    grads = []
    orig = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *a, **k):
        ps = list(parameters)
        grads.append([None if p.grad is None else p.grad.detach().clone() for p in ps])
        return orig(ps, max_norm, *a, **k)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    return grads


# ----------------------------------------------------------------------------------------------- 1. weights & loss

def test_parse_weights():
    assert data.parse_weights("1,1,1") == (1.0, 1.0, 1.0)
    assert data.parse_weights("0.5, 1 ,1.5") == (0.5, 1.0, 1.5)
    assert data.parse_weights("0,0,2") == (0.0, 0.0, 2.0)
    assert data.parse_weights("balanced") == (0.5, 1.0, 1.5)
    assert data.parse_weights("strong") == (0.25, 1.0, 1.75)
    assert data.parse_weights("mild") == (0.75, 1.0, 1.25)
    assert data.parse_weights("ce") == (1.0, 1.0, 1.0)
    for bad in ("0.5,1", "abc", "1,-1,2", "1,2,3,4", "", "nan,1,1", "inf,1,1", "1,,2"):
        with pytest.raises(ValueError) as e:
            data.parse_weights(bad)
        assert "\n" not in str(e.value) and "--weights" in str(e.value)


def test_severity_weight_by_hand():
    rec = {"question": "q", "answer": "a", "severity": "critical", "p_nc": 0.2, "p_n": 0.3, "p_c": 0.5}
    assert data.severity_weight(rec, (0.5, 1.0, 1.5)) == pytest.approx(0.5 * 0.2 + 1.0 * 0.3 + 1.5 * 0.5, abs=1e-12)
    assert data.severity_weight(rec, (1, 1, 1)) == pytest.approx(1.0, abs=1e-12)
    assert data.severity_weight(rec, (0.25, 1.0, 1.75)) == pytest.approx(1.225, abs=1e-12)
    one_hot = dict(rec, p_nc=0.0, p_n=0.0, p_c=1.0)
    assert data.severity_weight(one_hot, (0.5, 1.0, 1.5)) == pytest.approx(1.5, abs=1e-12)


def test_collate_masks_question_and_padding(assets):
    tok = M.load_tokenizer(assets["model"])
    recs = assets["recs8"][:3]
    abc = (0.5, 1.0, 1.5)
    for loss_tokens in ("answer", "all"):
        ex = batching.encode(recs, tok, abc, 512, loss_tokens)
        x, y, w, pads, kw = batching.collate(ex, tok.pad_id, "cpu")
        assert kw == {}
        lens = [len(e[0]) for e in ex]
        T = max(lens) - 1
        assert x.shape == y.shape == (3, T)
        assert pads == sum(T - (n - 1) for n in lens) and pads > 0, "test set-up: want uneven lengths"
        assert w.tolist() == pytest.approx([severity_w(r, abc) for r in recs], abs=1e-6)
        for i, r in enumerate(recs):
            p, a = split_tokens(tok, r)
            ids = p + a
            assert ex[i][0] == ids and ex[i][3] == data.SEVERITIES.index(r["severity"])
            n = len(ids) - 1
            assert x[i, :n].tolist() == ids[:-1]
            assert (x[i, n:] == tok.pad_id).all()
            assert (y[i, n:] == -100).all(), "padding must never be a target"
            if loss_tokens == "answer":   # targets ids[t+1]: counted from the first answer token on, EOS included
                want = [-100] * (len(p) - 1) + a
            else:
                want = ids[1:]
            assert y[i, :n].tolist() == want
            assert y[i, n - 1].item() == tok.eos_id
        if loss_tokens == "answer":
            assert sum((y != -100).sum(1).tolist()) == sum(len(split_tokens(tok, r)[1]) for r in recs)


def test_encode_truncates_to_max_len(assets):
    tok = M.load_tokenizer(assets["model"])
    r = assets["recs8"][0]
    p, a = split_tokens(tok, r)
    cut = len(p) + 2
    (ids, keep, _, _), = batching.encode([r], tok, (1, 1, 1), cut, "answer")
    assert ids == (p + a)[:cut] and keep == [False] * len(p) + [True, True]


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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_torchrun(argv, nproc=2):
    """train.py under torchrun with nproc CPU processes (gloo) on a free local port -> Popen (end it with reap())."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={port}", TRAIN, *map(str, argv)]
    return subprocess.Popen(cmd, env=sub_env(MASTER_PORT=port, MASTER_ADDR="127.0.0.1"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def children(pid):
    """Process ids whose parent is pid (Linux /proc): torchrun's workers, each in a session of its own."""
    kids = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:   # field 4, after the "(command)" that may hold spaces
            kids.append(int(d))
    return sorted(kids)


def reap(p):
    """After a failed or timed-out test: SIGKILL torchrun's workers, then torchrun (killed alone, it would leave the
    workers running, holding its output pipes open)."""
    if p.poll() is None:
        for pid in children(p.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.kill()
        p.communicate()


def torchrun(argv, nproc=2, timeout=300):
    """train.py under torchrun, run to the end -> CompletedProcess."""
    p = start_torchrun(argv, nproc)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        reap(p)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def test_ddp_two_processes_equal_one(assets, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ("--lr", "1e-2", "--eval-data", "none", "--weights", "balanced", "--device", "cpu",
              "--loss-norm", "token")   # test_loss_norm.py covers the default, example
    assert run_main(base_args(assets, one, "--batch-size", 8, *common, steps=3)) == 0
    p = torchrun(base_args(assets, two, "--batch-size", 4, *common, steps=3))
    assert p.returncode == 0, p.stderr[-3000:]
    l1, l2 = step_lines(read_log(one)), step_lines(read_log(two))
    assert [r["step"] for r in l2] == [1, 2, 3], "one log line per step (rank 0 only)"
    for a, b in zip(l1, l2):
        assert a["tokens"] == b["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)   # Adam would hide a scale error
    assert json.load(open(two / "args.json"))["world_size"] == 2
    assert_same_weights(one, two, atol=1e-5, skip_key_bias=True)


def test_ddp_sigterm_to_one_rank_stops_all_at_one_step(assets, tmp_path):
    """A scheduler may signal one process only: the stop is all-reduced, so both ranks stop after the same step,
    rank 0 saves it and says so, and --resume finishes the run."""
    out = tmp_path / "sig"
    args = base_args(assets, out, "--lr", "1e-3", "--schedule", "constant", "--eval-data", "none", "--batch-size", 2,
                     "--device", "cpu", steps=100000)
    p = start_torchrun(args)
    try:
        log_path, deadline = out / "train_log.jsonl", time.time() + 120
        while time.time() < deadline and p.poll() is None:
            if log_path.exists() and log_path.read_text(encoding="utf-8").strip():
                break
            time.sleep(0.05)
        workers = children(p.pid)
        assert p.poll() is None and len(workers) == 2, ("the run ended before it could be signalled", workers)
        os.kill(workers[1], signal.SIGTERM)
        stdout, err = p.communicate(timeout=120)
    finally:
        reap(p)
    # (the exit codes torchrun reports vary: once a rank has exited 143 it sends SIGTERM to the other, which may be
    # in interpreter shutdown by then)
    assert p.returncode != 0, "a signalled run does not report success"
    k = state_meta(out)["step"]
    assert f"stopped by SIGTERM: saved step {k} to" in err, (stdout[-2000:], err[-3000:])   # one line on stderr
    assert k >= 1 and [r["step"] for r in step_lines(read_log(out))] == list(range(1, k + 1))
    args[args.index("--max-steps") + 1] = str(k + 2)
    p = torchrun(args + ["--resume"])   # the same two processes (--resume refuses a change of world size)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [r["step"] for r in step_lines(read_log(out))] == list(range(1, k + 3))


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


# Every setting a resume must keep (issue 18), written out here and not read from train.RESUME_KEYS, so that a key
# dropped from there fails its row. Each row: the key, the saved value, a different value given on resume.
RESUME_CHANGES = [
    ("model", "tiny", "qwen2.5-0.5b"), ("weights_abc", [0.5, 1, 1.5], [1, 1, 1]), ("data_sha256", "aa", "bb"),
    ("loss_tokens", "answer", "all"), ("loss_norm", "example", "token"), ("seed", 0, 1), ("batch_size", 8, 4),
    ("grad_accum", 1, 2), ("world_size", 1, 2), ("max_len", 512, 256), ("schedule", "linear", "cosine"),
    ("warmup", 0, 10), ("lr", 5e-5, 1e-4), ("weight_decay", 0.01, 0.0), ("grad_clip", 1.0, 0.5),
    ("lora_rank", 16, 8), ("lora_alpha", 32, 16), ("lora_dropout", 0.05, 0.1),
    ("lora_targets", ["q_proj", "v_proj"], ["q_proj"]), ("dtype", "bf16", "fp16"), ("quantize", "none", "nf4"),
    ("question_col", None, "Post"), ("answer_col", None, "Reply"), ("preprocess", "none", "arabert"),
]


@pytest.mark.parametrize("key, saved, given", RESUME_CHANGES, ids=[r[0] for r in RESUME_CHANGES])
def test_check_resume_refuses_each_changed_key(key, saved, given):
    base = {k: v for k, v, _ in RESUME_CHANGES}
    train.check_resume("out/state.safetensors", {"args": dict(base)}, dict(base))      # unchanged: accepted
    with pytest.raises(cli.UserError) as e:
        train.check_resume("out/state.safetensors", {"args": dict(base)}, {**base, key: given})
    msg = str(e.value)
    assert str(given) in msg or isinstance(given, list)
    assert "delete" not in msg and "must not change the experiment" in msg, "an intact checkpoint is not broken"
