"""train.py --loss-norm and --loss-tokens padded, against hand computations.

example (the paper's formula): L = mean over the step's examples of (1/n_i) sum_t w_i NLL_it
token:                         L = sum_i sum_t w_i NLL_it / N          (N = loss tokens of the step)
padded (the notebooks' collator): every sequence padded with EOS to --max-len, every position a target.

The fixtures and helpers are test_train.py's (a tiny GPT-2 and Arabic records built in the session).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import model as M
import train
from test_train import (assets, assert_same_weights, base_args, capture_grads,  # noqa: F401
                        example_logits, read_log, run_main, severity_w, split_tokens, step_lines, torchrun)

pytestmark = pytest.mark.usefixtures("threads_and_signals")

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


def test_example_norm_ddp_two_processes_equal_one(assets, tmp_path):
    """2 processes x (2 micro-batches of 2) against 1 process x 1 batch of 8: the per-example denominators are
    all-reduced, so the steps agree."""
    one, two = tmp_path / "one", tmp_path / "two"
    # lr 1e-3: an element whose gradient cancels to ~1e-8 (Adam's eps) turns summation-order rounding into a step
    # difference proportional to lr (4e-5 at lr 1e-2 here, for a loss and grad norm that agree to 1e-6)
    common = ("--lr", "1e-3", "--eval-data", "none", "--weights", "balanced", "--device", "cpu",
              "--loss-norm", "example")
    assert run_main(base_args(assets, one, "--batch-size", 8, *common, steps=2)) == 0
    p = torchrun(base_args(assets, two, "--batch-size", 2, "--grad-accum", 2, *common, steps=2))
    assert p.returncode == 0, p.stderr[-3000:]
    l1, l2 = step_lines(read_log(one)), step_lines(read_log(two))
    assert len(l1) == len(l2) == 2
    for a, b in zip(l1, l2):
        assert a["examples"] == b["examples"] == 8
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert_same_weights(one, two, atol=1e-5, skip_key_bias=True)


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
