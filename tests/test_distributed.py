"""distributed.py through train.py under torchrun (2 CPU processes, gloo): DDP equals one process (also with
--loss-norm example and --pack), SIGTERM to one rank stops all, FSDP equals one process and resumes."""
import json
import os
import signal
import time

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import train

from conftest import (assert_same_weights, base_args, children, read_log, read_st_file, reap, run_main, run_train,
    start_torchrun, state_meta, step_lines, torchrun, _weights)

pytestmark = pytest.mark.usefixtures("threads_and_signals")


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
TOL = 1e-5


@pytest.mark.pack_assets
def test_ddp_two_processes_packed_equal_one_padded(assets, tmp_path):
    """torchrun, 2 CPU processes (gloo), --pack: each rank packs its half of the step into its own number of rows
    (one synced backward each); the losses, grad norms and weights equal one padded process with the whole step."""
    from conftest import torchrun
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--model", assets["folder"]("lfm2"), "--data", assets["train"], "--eval-data", "none", "--max-steps", "3",
              "--max-len", "128", "--lr", "1e-4", "--device", "cpu", "--quiet", "--warmup", "0", "--schedule", "constant"]
    train.main(common + ["--out", str(one), "--batch-size", "8"])
    p = torchrun([*common, "--out", two, "--batch-size", 4, "--pack"])
    assert p.returncode == 0, p.stderr[-3000:]
    logs = []
    for d in (one, two):
        with open(os.path.join(str(d), "train_log.jsonl")) as f:
            logs.append([json.loads(line) for line in f if "loss" in line])
    assert len(logs[0]) == len(logs[1]) == 3
    for a, b in zip(*logs):
        assert a["tokens"] == b["tokens"] and a["examples"] == b["examples"]
        for k in ("loss", "nll", "grad_norm"):
            assert abs(a[k] - b[k]) <= TOL * max(1.0, abs(a[k])), (k, a[k], b[k])
    wa, wb = _weights(one), _weights(two)
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() <= TOL, k

transformers.logging.set_verbosity_error()


SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample", "train.jsonl")


# ----------------------------------------------------------------------------------------------- 5. FSDP (gloo, CPU)

def test_fsdp_two_processes_equal_one_and_resume(tmp_path):
    """torch 2.13's FSDP2 runs on CPU with gloo. 2 sharded processes x batch 4 for 2 steps, then resumed to step 4
    (constant lr, so the stop changes no schedule), = 1 process x batch 8 for 4 steps: losses, gradient norms, weights
    and optimizer state, in the same checkpoint layout. Were the sharded optimizer state lost or misassigned on
    resume, step 4's loss and every weight would move by about lr. --grad-checkpoint rides along."""
    common = ["--model", "tiny", "--data", SAMPLE, "--eval-data", "none", "--quiet", "--device", "cpu",
              "--lr", "1e-3", "--schedule", "constant", "--max-len", "48"]
    one, cut = tmp_path / "one", tmp_path / "cut"
    assert run_train(common + ["--batch-size", "8", "--max-steps", "4", "--out", str(one)]) == 0
    fsdp = common + ["--batch-size", "4", "--fsdp", "--grad-checkpoint"]
    p = torchrun(fsdp + ["--max-steps", "2", "--out", cut])
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.load(open(cut / "args.json"))["world_size"] == 2
    assert [json.loads(ln)["step"] for ln in open(cut / "train_log.jsonl")] == [1, 2]
    p = torchrun(fsdp + ["--max-steps", "4", "--resume", "--out", cut])
    assert p.returncode == 0, p.stderr[-3000:]
    l1, l2 = ([json.loads(ln) for ln in open(d / "train_log.jsonl")] for d in (one, cut))
    assert [r["step"] for r in l2] == [1, 2, 3, 4]
    for a, b in zip(l1, l2):
        assert a["tokens"] == b["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    # Weights and optimizer state: Adam turns the rounding noise of a coordinate whose true gradient is ~0 (the key
    # part of the qkv bias, dead units) into steps of up to lr, so a few coordinates may differ by up to lr while all
    # others agree to 1e-6. A real error (lost or misassigned optimizer state, a wrong loss scale) moves most of them.
    for name in ("model", "state"):
        s1, s2 = (read_st_file(d / f"{name}.safetensors") for d in (one, cut))
        assert s1.keys() == s2.keys(), f"{name}.safetensors: FSDP wrote another layout"
        diff = torch.cat([(s1[k].float() - s2[k].float()).abs().view(-1) for k in s1 if not k.startswith("rng")])
        off = (diff > 1e-6).sum().item()
        assert off <= 1e-3 * diff.numel(), f"{name}.safetensors: {off} of {diff.numel()} values differ by > 1e-6"
        assert diff.max() <= 1e-3, f"{name}.safetensors: FSDP and one process differ by {diff.max():.3g} > lr"
    hf = AutoModelForCausalLM.from_pretrained(str(cut), dtype=torch.float32)
    assert hf.config.model_type == "gpt2"
