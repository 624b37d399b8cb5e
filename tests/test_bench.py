"""bench.py: runs end to end and reports every figure; the losses it compares are the same loss; the compiled
training step equals the eager one; chunked token_nll equals full-logits cross-entropy. CPU, offline, no timing
asserts (timings are whatever the machine gives)."""
import json
import math
import os
import subprocess
import time
import sys

import pytest
import torch

import bench
import benchkit
import suite
import hub
import model as M

from conftest import PAPER_NF4

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_RUN = ["--iters", "2", "--warmup", "1", "--batch-size", "2", "--seq-len", "32", "--gen-batch", "2",
             "--gen-prompt-len", "8", "--new-tokens", "5", "--device", "cpu"]
FIGURES = ("tokens_per_s", "ms_per_step", "peak_mem_mib")


def tiny():
    return M.Decoder(M.Config.from_hf(dict(hub.REGISTRY["tiny"]["config"])))


def batch(cfg, B=2, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    x, y = ids[:, :-1].clone(), ids[:, 1:].clone()
    y[:, :5] = -100
    y[1, -3:] = -100
    w = 0.5 + torch.rand(B, generator=g)
    return x, y, w, (y != -100).sum().float()


def test_end_to_end_tiny_prints_every_column_and_writes_json(tmp_path):
    out = tmp_path / "sub" / "bench.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([sys.executable, "bench.py", "--model", "tiny", *SMALL_RUN, "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout
    assert "train step" in text and "generate" in text
    # two tables, each with the header, both implementations and the ratio row
    headers = [ln.split() for ln in text.splitlines() if "tokens/s" in ln and "peak MiB" in ln]
    assert headers == [["tokens/s", "ms/step", "peak", "MiB", "MFU"]] * 2, headers
    for row in ("ours ", "transformers ", "ours/transf."):
        assert sum(line.startswith(row) for line in text.splitlines()) == 2, row
    assert "[train]" not in r.stderr and "[generate]" not in r.stderr  # no progress bar when stderr is not a terminal

    rep = json.loads(out.read_text())
    assert not [p for p in os.listdir(out.parent) if p != "bench.json"], "temp file left behind"
    for phase in ("train", "gen"):
        for impl in ("ours", "transformers"):
            for k in FIGURES:
                v = rep[phase][impl][k]
                assert isinstance(v, float) and math.isfinite(v) and v > 0, (phase, impl, k, v)
            assert rep[phase][impl]["mfu"] is None                     # CPU: no MFU
        for k in FIGURES:
            want = rep[phase]["ours"][k] / rep[phase]["transformers"][k]
            assert rep[phase]["ratio"][k] == pytest.approx(want)
    assert rep["train"]["batch_size"] == 2 and rep["train"]["seq_len"] == 32
    assert rep["gen"]["gen_batch"] == 2 and rep["gen"]["new_tokens"] == 5
    # the same weights in both: the two losses on the same batch agree
    chk = rep["train_loss_check"]
    assert chk["ours"] == pytest.approx(chk["transformers"], rel=1e-5)
    assert "warning: new tokens differ" not in r.stderr                # both generated exactly 2 x 5 tokens
    assert "warning: the two losses differ" not in r.stderr
    assert "compiled" not in r.stderr                                  # no compile fallback (none was asked for)


def test_skip_flags_and_bad_input(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        bench.main(["--model", "no-such-model"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --model")
    with pytest.raises(SystemExit) as e:
        bench.main(["--model", "tiny", "--gen-prompt-len", "500", "--new-tokens", "50", "--skip-train"])
    assert e.value.code == 2 and "positions" in capsys.readouterr().err
    rep = bench.main(["--model", "tiny", *SMALL_RUN, "--skip-gen", "--json", str(tmp_path / "b.json")])
    assert "train" in rep and "gen" not in rep
    assert json.loads((tmp_path / "b.json").read_text())["train"]["ours"]["tokens_per_s"] > 0


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen3-0.6b", "lfm2-350m", "bloomz-560m", "aragpt2-base",
                                  "mistral-7b-instruct-v0.2"])
def test_small_shape_is_consistent_with_transformers(name):
    """--shape small scales a registry config to 4 layers x 256; transformers must read it as the same model."""
    from transformers import AutoConfig, AutoModelForCausalLM
    hf = benchkit.scaled_config(hub.REGISTRY[name]["config"], layers=4, hidden=256)
    cfg = M.Config.from_hf(hf)
    assert cfg.n_layer == 4 and cfg.d_model == 256 and cfg.vocab_size == hub.REGISTRY[name]["config"]["vocab_size"]
    assert cfg.n_head * cfg.head_dim == 256
    assert cfg.n_head % cfg.n_kv_head == 0
    with torch.device("meta"):
        ours = M.Decoder(cfg)
        c = dict(cfg.to_hf())
        theirs = AutoModelForCausalLM.from_config(AutoConfig.for_model(c.pop("model_type"), **c))
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert ours.num_params() == n_theirs


def test_bench_losses_are_the_same_loss():
    """loss_ours (chunked NLL inside the model) and loss_transformers (full logits + F.cross_entropy) agree in value
    and gradient on one model, so the benchmark compares equal work."""
    m = tiny()
    x, y, w, n = batch(m.cfg)

    class Wrap(torch.nn.Module):                                        # transformers-style call: .logits
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return type("Out", (), {"logits": self.inner(input_ids)})()

    params = list(m.parameters())
    a = benchkit.loss_ours(m, x, y, w, n)
    ga = torch.autograd.grad(a, params)
    b = benchkit.loss_transformers(Wrap(m), x, y, w, n)
    gb = torch.autograd.grad(b, params)
    assert abs(a.item() - b.item()) <= 1e-5 * abs(b.item())
    for p, u, v in zip(params, ga, gb):
        assert (u - v).abs().max().item() <= 1e-5 * max(1.0, v.abs().max().item())


@pytest.mark.parametrize("chunk", [7, 48, None])
def test_chunked_token_nll_equals_full_logits_ce(chunk):
    """Chunked NLL (7 and 48 rows: several chunks, ragged last one; None: the default, one chunk here) against
    plain full-vocabulary cross-entropy, weighted per example as train.py does: value and every gradient."""
    import torch.nn.functional as F
    m = tiny()
    with torch.no_grad():                                               # a non-trivial head: logits of order 1
        m.wte.weight.mul_(20)
    x, y, w, n = batch(m.cfg, B=3, T=16, seed=3)
    params = list(m.parameters())
    nll = m.token_nll(x, y, chunk_tokens=chunk)
    full = F.cross_entropy(m(x).float().flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
    assert (nll[y == -100] == 0).all()
    assert (nll - full).abs().max().item() <= 1e-5 * max(1.0, full.abs().max().item())
    ga = torch.autograd.grad((nll * w[:, None]).sum() / n, params)
    gb = torch.autograd.grad((full * w[:, None]).sum() / n, params)
    for (name, _), u, v in zip(m.named_parameters(), ga, gb):
        assert (u - v).abs().max().item() <= 1e-5 * max(1.0, v.abs().max().item()), name


def test_compiled_training_step_equals_eager():
    """torch.compile of our loss (the --compile path of bench.py, and what train.py --compile runs) gives the same
    loss and gradients as eager on the tiny shape. Takes ~20 s on 2 CPU cores (cold inductor cache)."""
    m = tiny().train()
    x, y, w, n = batch(m.cfg, B=2, T=32, seed=5)
    params = list(m.parameters())
    eager = benchkit.loss_ours(m, x, y, w, n)
    g_eager = torch.autograd.grad(eager, params)
    torch._dynamo.reset()
    compiled = torch.compile(benchkit.loss_ours)(m, x, y, w, n)
    g_comp = torch.autograd.grad(compiled, params)
    assert abs(compiled.item() - eager.item()) <= 1e-5 * abs(eager.item())
    for (name, _), u, v in zip(m.named_parameters(), g_comp, g_eager):
        assert (u - v).abs().max().item() <= 1e-5 * max(1.0, v.abs().max().item()), name


def test_bloom_baseline_falls_back_to_eager_attention():
    """transformers has no SDPA path for BLOOM: the baseline is built with its eager attention instead of failing,
    and it still holds our weights (same logits)."""
    hf = benchkit.scaled_config(hub.REGISTRY["bloomz-560m"]["config"], layers=1, hidden=64)
    ours, theirs = benchkit.build_models(hf, torch.device("cpu"), seed=0)
    assert theirs.config._attn_implementation == "eager"
    x = torch.randint(0, hf["vocab_size"], (2, 12))
    with torch.no_grad():
        diff = (ours(x) - theirs(input_ids=x).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_compiled_decode_generates_what_eager_generates():
    """model.compile_decode (bench.py --compile, evaluate.py --compile): greedy tokens equal eager ones, for a batch
    of prompts of different lengths (left padding, a mask) and the decode positions after them."""
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14]]
    eager = tiny().eval().generate(prompts, max_new_tokens=12, temperature=0.0, eos_id=-1)
    torch._dynamo.reset()
    compiled = tiny().eval().compile_decode().generate(prompts, max_new_tokens=12, temperature=0.0, eos_id=-1)
    assert compiled == eager
    assert [len(r) for r in compiled] == [12, 12, 12]


def test_lengths_sample_runs_in_process(capsys):
    """--lengths (padded vs packed vs transformers) end to end on the tiny model: it crashed with a NameError
    (a progress class removed elsewhere) and nothing ran it."""
    bench.main(["--model", "tiny", "--shape", "small", "--lengths", "sample", "--iters", "1", "--warmup", "0",
                "--batch-size", "2", "--seq-len", "32", "--skip-gen", "--quiet"])
    out = capsys.readouterr().out
    assert "packed / padded" in out and "real tokens/s" in out


# ----------------------------------------------------------------------------------------------- 6. bench.py --memory

@pytest.mark.usefixtures("one_thread")
def test_bench_memory_mode_figures_add_up(tmp_path, capsys):
    import bench
    out = tmp_path / "m.json"
    r = bench.main(["--memory", "--model", "llama-2-7b", "--hidden", "128", "--layers", "2", "--batch-size", "2",
                    "--seq-len", "32", "--json", str(out)])
    assert json.load(open(out))["weights"] == r["weights"]
    w, cfg = r["weights"], M.Config.from_hf(benchkit.scaled_config(hub.REGISTRY["llama-2-7b"]["config"], 2, 128))
    d, ff, q, kv = cfg.d_model, cfg.d_ff, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    n_lin = d * (q + 2 * kv) + q * d + d * 2 * ff + ff * d              # qkv, o, fc, proj of one block
    assert w["params_per_block"] == n_lin + 2 * d                      # + two RMSNorm weights
    assert w["fp32"] == 4 * w["params_per_block"] and w["bf16"] == 2 * w["params_per_block"]
    assert w["nf4"] == n_lin // 2 + n_lin // 64 * 4 + 2 * d * 2       # codes, fp32 absmax per 64, bf16 norms
    assert w["full_depth_GiB"]["nf4"] == pytest.approx((32 * w["nf4"] + w["rest_bf16"]) / 2 ** 30)
    assert 0.05 < w["nf4_rel_rms_error"] < 0.15                        # NF4 on Gaussian weights: about 9 %
    assert w["nf4_max_error_over_absmax"] <= (PAPER_NF4[1] - PAPER_NF4[0]) / 2 + 1e-6
    steps = {(s["base"], s["grad_checkpoint"]): s for s in r["steps"]}
    assert set(steps) == {("bf16", False), ("bf16", True), ("nf4", False), ("nf4", True)}
    for base in ("bf16", "nf4"):   # a checkpointed block keeps exactly its bf16 input (2 x 32 x d)
        assert steps[base, True]["saved_per_block"] == 2 * 32 * d * 2
        assert steps[base, False]["saved_per_block"] > 5 * steps[base, True]["saved_per_block"]
    assert steps["nf4", False]["weights_bytes"] < steps["bf16", False]["weights_bytes"]
    assert steps["bf16", False]["loss"] == pytest.approx(steps["bf16", True]["loss"], rel=1e-6)
    assert "16 GiB" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- --suite

def _figures(x):
    """Every number in a nested record (bools excluded)."""
    if isinstance(x, dict):
        return [v for y in x.values() for v in _figures(y)]
    if isinstance(x, list):
        return [v for y in x for v in _figures(y)]
    return [x] if isinstance(x, (int, float)) and not isinstance(x, bool) else []


def test_suite_smoke_writes_every_section_with_figures(tmp_path):
    """python bench.py --suite all --smoke --out DIR (what CI runs, ~2 minutes on 2 cores): every section present in
    report.json, none failed, each with finite timing figures, their spread, the device and versions; report.md
    has a heading per section. The sizes are toys: only presence and sanity are checked, never speed."""
    out = tmp_path / "suite"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([sys.executable, "bench.py", "--suite", "all", "--smoke", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    rep = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]          # no temp file left
    meta = rep["meta"]
    assert meta["smoke"] is True and meta["torch"] == torch.__version__ and meta["transformers"]
    assert meta["device"].startswith("CPU")
    for name in suite.SECTIONS:
        sec = rep[name]
        assert sec["status"] in ("ok", "cut"), (name, sec.get("error"))
        nums = _figures({k: v for k, v in sec.items() if k not in ("budget_s", "seconds")})
        assert nums and all(math.isfinite(v) for v in nums), name
        assert f"## {name}" in md
        assert sec["seconds"] <= sec["budget_s"] + suite.SUITE_GRACE
    for fam in suite.PARITY_MODELS:                                     # every family, equal in fp32
        if fam in rep["parity"].get("cut", []):
            continue
        p = rep["parity"]["families"][fam]
        assert p["ok"] and p["max_abs_logit_diff_fp32"] < 1e-3, (fam, p)
        assert p["loss_ours_bf16"] == pytest.approx(p["loss_transformers_bf16"], rel=2e-2)
    cut = rep["train"].get("cut", [])                                  # a slow machine may cut the last models
    assert "aragpt2-base" in rep["train"]["models"]
    for model in [m for m in suite.TRAIN_MODELS if m not in cut]:
        s = rep["train"]["models"][model]["eager"]
        for impl in ("ours", "transformers"):
            sp = s[impl]["spread_ms"]
            assert 0 < sp["min"] <= sp["median"] <= sp["max"] and sp["n"] == 3
    assert "compile" in rep["train"]["models"]["aragpt2-base"]
    assert rep["compile"]["train"]["aragpt2-base"]["compile_s"] > 0 and rep["compile"]["decode"] is not None
    assert rep["generation"]["eager"]["tokens_match"] and rep["generation"]["compile"]["tokens_match"]
    q = rep["qlora_7b"]
    assert q["nf4"]["layers"] == 2 and q["nf4"]["steps"][0]["peak_bytes"] > 0 and q["bf16"]["steps"]
    assert q["nf4"]["quantised_weight_bytes"] < q["bf16"]["block_bytes"] / 3              # 4.5 bits against 16
    f = rep["fp16_recipe"]
    assert f["finite_losses"] and len(f["steps"]) == 3 and f["scale_start"] > 0
    assert rep["packing"]["ours packed"]["real_tokens_per_s"] > 0
    assert r.stdout.count("[suite] done") == 1


def test_suite_section_failure_and_budget_are_recorded():
    """run_section: an exception (here a fake CUDA OOM) becomes status failed with its first line; a section that
    hangs past budget + grace is stopped by the alarm and recorded; one that cuts its own units says cut."""
    S = suite.Suite(torch.device("cpu"), True, 0, True)

    def oom(S):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore text")
    rec = suite.run_section("x", oom, S, 5)
    assert rec["status"] == "failed" and rec["error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB"

    def cuts(S):
        done = []
        for unit in ("a", "b"):
            if S.over():
                return {"done": done, "cut": [unit]}
            done.append(unit)
            time.sleep(0.3)
        return {"done": done}
    rec = suite.run_section("y", cuts, S, 0.1)
    assert rec["status"] == "cut" and rec["cut"] == ["b"] and rec["done"] == ["a"]
    old = suite.SUITE_GRACE
    suite.SUITE_GRACE = 0.2
    try:
        rec = suite.run_section("z", lambda S: time.sleep(5) or {}, S, 0.1)
    finally:
        suite.SUITE_GRACE = old
    assert rec["status"] == "failed" and "SectionTimeout" in rec["error"] and rec["seconds"] < 2
    md = suite.report_md({"meta": {"smoke": True, "device": "CPU", "torch": "t", "cuda": None, "transformers": "x",
                                   "threads": 1, "date": "d", "seconds": 1, "command": "c", "sections": ["z"],
                                   "wide_spread_threshold": 0.25}, "z": rec})
    assert "## z" in md and "SectionTimeout" in md


def test_suite_flags_are_checked_before_work(capsys, tmp_path):
    for argv, flag in ((["--suite", "all"], "--out"), (["--suite", "nope", "--out", str(tmp_path)], "--suite"),
                       (["--suite", "all", "--model", "tiny", "--out", str(tmp_path)], "--model"),
                       (["--smoke"], "--smoke"),
                       (["--suite", "all", "--out", str(tmp_path / "f" / "x")], "--out")):
        if flag == "--out" and len(argv) > 2:
            (tmp_path / "f").write_text("a file")
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {flag}"), (argv, err)
    assert not (tmp_path / "report.json").exists()


def test_spread_figures():
    sp = benchkit.spread([0.010, 0.012, 0.030], 1000)
    assert sp == {"min": 10.0, "median": 12.0, "max": 30.0, "n": 3, "rel_spread": pytest.approx(20 / 12)}
    assert "WIDE" in benchkit.spread_text("ours", sp) and "WIDE" not in benchkit.spread_text("ours", benchkit.spread([1, 1.1]))
