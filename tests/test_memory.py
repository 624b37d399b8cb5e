"""Memory features of model.py / train.py: NF4 base weights, activation checkpointing, LoRA by HF/peft names.

References nobody here wrote: the NF4 codebook as printed in the QLoRA paper (Dettmers et al. 2023, typed out below
and quantised by a plain-Python nearest-level loop), transformers' implementations of tiny random models (what a
saved checkpoint must load into), and autograd itself (checkpointed gradients against plain ones).
"""
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

import transformers
from transformers import AutoConfig, AutoModelForCausalLM

import cli
import model as M
import hub
import lora
import nf4
from test_model import _ROPE, FAMILIES, V
from test_train import torchrun
import train

transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread")

# The 16 NF4 levels as printed in the QLoRA paper's appendix (and shipped by bitsandbytes), typed here independently.
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]

# test_model's tiny configs; LFM2 cut to one conv and one attention layer (2 layers, like the others)
HF = {k: FAMILIES[k] for k in ("gpt2", "bloom", "qwen2", "llama")}
HF["lfm2"] = dict(model_type="lfm2", vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96, block_auto_adjust_ff_dim=False,
                  layer_types=["conv", "full_attention"], max_position_embeddings=128, rope_parameters=_ROPE,
                  norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=7, pad_token_id=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """saved(fam) -> folder of a tiny random transformers model (weights scaled so that errors show), built once."""
    cache = {}

    def get(fam):
        if fam not in cache:
            kw = dict(HF[fam])
            cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
            torch.manual_seed(0)
            m = AutoModelForCausalLM.from_config(cfg)
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for name, p in m.named_parameters():
                    if p.ndim == 1 and name.endswith("weight"):
                        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
                    else:
                        p.copy_(0.3 * torch.randn(p.shape, generator=g))
            d = tmp_path_factory.mktemp(fam)
            m.save_pretrained(str(d))
            cache[fam] = str(d)
        return cache[fam]
    return get


def read_st(folder):
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def ids(B=2, T=12, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- 1. NF4

def reference_nf4(values, block=64):
    """Plain Python, straight from the paper's definition: blocks of `block` consecutive values (zero-padded), each
    divided by its absmax, each value -> index of the nearest level (first one on a tie); two codes a byte, first
    in the high nibble."""
    values = list(values) + [0.0] * (-len(values) % block)
    codes, absmax = [], []
    for s in range(0, len(values), block):
        blk = values[s:s + block]
        a = max(abs(v) for v in blk)
        absmax.append(a)
        for v in blk:
            x = v / a if a > 0 else 0.0
            dist = [abs(x - lv) for lv in PAPER_NF4]
            codes.append(dist.index(min(dist)))
    packed = [(codes[i] << 4) | codes[i + 1] for i in range(0, len(codes), 2)]
    return packed, absmax, codes


def test_nf4_levels_are_the_papers():
    assert nf4.NF4_LEVELS == tuple(PAPER_NF4)
    assert nf4.NF4_BLOCK == 64


def test_nf4_quantise_and_dequantise_match_the_hand_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 100, generator=g) * torch.tensor([0.02, 1.0, 30.0])[:, None]   # 300 weights: 5 blocks, ragged
    flat = w.view(-1)
    flat[64:128] = 0.0                                          # an all-zero block: absmax 0 must not give nan
    flat[130] = -7.5                                            # block 2's absmax is a negative value
    flat[131] = 7.5 * PAPER_NF4[12]                             # exactly on a level
    flat[256:300] /= 1000                                       # the last block: absmax exactly 1, so that ...
    flat[256] = 1.0
    flat[257] = PAPER_NF4[8] / 2                                # ... these fall exactly half-way between two levels:
    flat[258] = PAPER_NF4[6] / 2                                # a tie goes to the lower level (7, then 6)
    codes, absmax = nf4.nf4_quantize(w)
    ref_packed, ref_absmax, ref_codes = reference_nf4(flat.tolist())
    assert codes.dtype == torch.uint8 and codes.numel() == 320 // 2
    assert absmax.dtype == torch.float32 and absmax.tolist() == pytest.approx(ref_absmax, rel=0, abs=0)
    assert codes.tolist() == ref_packed
    assert ref_codes[131] == 12 and ref_codes[130] == 0 and set(ref_codes[64:128]) == {7}
    assert ref_codes[256:259] == [15, 7, 6]
    deq = nf4.nf4_dequantize(codes, absmax, (3, 100))
    want = torch.tensor([PAPER_NF4[c] * ref_absmax[i // 64] for i, c in enumerate(ref_codes)][:300]).view(3, 100)
    assert torch.allclose(deq, want.float(), rtol=1e-6, atol=0)
    assert torch.equal(deq.view(-1)[64:128], torch.zeros(64))
    # the error is at most half the widest gap between levels, times each block's absmax
    err = (deq - w).abs().view(-1)
    bound = torch.tensor([ref_absmax[i // 64] for i in range(300)]) * (PAPER_NF4[1] - PAPER_NF4[0]) / 2
    assert (err <= bound + 1e-6).all()
    assert nf4.nf4_dequantize(codes, absmax, (3, 100), torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("fam", ["gpt2", "bloom", "qwen2", "lfm2"])
def test_nf4_model_equals_model_with_dequantised_weights(fam, saved, tmp_path):
    d = saved(fam)
    q = M.Decoder.from_pretrained(d, quantize="nf4").eval()
    ref = M.Decoder.from_pretrained(d).eval()
    quantised = nf4.block_linears(ref)
    assert quantised and all(isinstance(q.get_submodule(n), nf4.NF4Linear) for n in quantised)
    assert not any(isinstance(m, torch.nn.Linear) for m in q.layers.modules()), "a block Linear was left in full width"
    assert isinstance(q.lm_head, torch.nn.Linear) and q.wte.weight.dtype == torch.float32
    assert q.num_params() == ref.num_params()
    x = ids()
    with torch.no_grad():
        exact = ref(x)
        for n in quantised:   # the codes loaded are those of the checkpoint's own tensor, quantised once
            codes, absmax = nf4.nf4_quantize(ref.get_submodule(n).weight)
            assert torch.equal(q.get_submodule(n).codes, codes) and torch.equal(q.get_submodule(n).absmax, absmax), n
        for n in quantised:   # replace each weight by its dequantised value
            ref.get_submodule(n).weight.copy_(q.get_submodule(n).dequantize())
        assert torch.equal(q(x), ref(x)), "NF4 forward differs from the dequantised-weight model"
        assert (q(x) - exact).abs().max() > 1e-3, "test set-up: the quantisation error should be visible"
    # saving writes the dequantised weights as an ordinary checkpoint, which transformers loads
    q.save_pretrained(str(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(x).logits - q(x)).abs().max() < 1e-4


def test_nf4_backward_gives_input_gradient_of_dequantised_weight():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(128, 96)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 128, generator=g))
        lin.bias.copy_(torch.randn(96, generator=g))
    q = nf4.NF4Linear.from_linear(lin)
    with torch.no_grad():
        lin.weight.copy_(q.dequantize())
    x = torch.randn(4, 5, 128, generator=g)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    gy = torch.randn(4, 5, 96, generator=g)
    (q(x1) * gy).sum().backward()
    (lin(x2) * gy).sum().backward()
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    assert q.bias.grad is None and not q.bias.requires_grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert q(x).dtype == torch.bfloat16


def test_nf4_load_quantises_tensor_by_tensor(saved, monkeypatch):
    """While loading, no full-precision weight of a block Linear is ever kept in the state being built."""
    d = saved("qwen2")
    seen = []
    real = nf4.nf4_quantize

    def spy(w, *a, **k):
        seen.append(tuple(w.shape))
        return real(w, *a, **k)
    real_load = hub._load_state

    def check(model, tensors, dtype, device, quantize=()):
        state = real_load(model, tensors, dtype, device, quantize)
        big = [k for k in state if any(k == n + ".weight" for n in quantize)]
        assert not big, f"full-width weights kept while loading: {big[:3]}"
        return state
    monkeypatch.setattr(hub, "nf4_quantize", spy)
    monkeypatch.setattr(hub, "_load_state", check)
    q = M.Decoder.from_pretrained(d, quantize="nf4")
    assert len(seen) == 2 * 4   # qkv, o, fc, proj per block
    with pytest.raises(ValueError, match="quantize"):
        M.Decoder.from_pretrained(d, quantize="int8")
    assert q.layers[0].attn.qkv.codes.numel() == (64 + 2 * 32) * 64 // 2


# ----------------------------------------------------------------------------------------------- 2. checkpointing

def _grads(m, x, y, amp=False):
    m.zero_grad(set_to_none=True)
    torch.manual_seed(123)   # the same dropout masks in both runs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = (m(x, targets=y) * torch.linspace(0.5, 1.5, x.shape[0])[:, None]).sum()
    loss.backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _saved_bytes(m, x, y):
    """Bytes autograd keeps for backward during one forward (saved_tensors_hooks sees each saved tensor)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x, targets=y).sum()
    return total[0]


@pytest.mark.parametrize("setup", ["full", "lora-dropout", "nf4-lora", "bf16-autocast"])
def test_checkpointed_gradients_equal_plain_ones(setup, saved):
    m = M.Decoder.from_pretrained(saved("qwen2"), quantize="nf4" if setup == "nf4-lora" else None)
    if setup in ("lora-dropout", "nf4-lora"):
        lora.add_lora(m, ["q_proj", "v_proj", "down_proj"], rank=4, alpha=8, dropout=0.3)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    m.train()
    x, y = ids(2, 16, 1), ids(2, 16, 2)
    y[:, :4] = -100
    plain = _grads(m, x, y, amp=setup == "bf16-autocast")
    m.grad_checkpoint = True
    ckpt = _grads(m, x, y, amp=setup == "bf16-autocast")
    assert plain.keys() == ckpt.keys() and plain
    for n in plain:
        assert torch.equal(plain[n], ckpt[n]), f"{setup}: gradient of {n} differs under checkpointing"
    # and it does keep less for backward: only each block's input instead of all its activations
    m.grad_checkpoint = False
    full = _saved_bytes(m, x, y)
    m.grad_checkpoint = True
    assert _saved_bytes(m, x, y) < 0.5 * full


# ----------------------------------------------------------------------------------------------- 3. LoRA by HF names

def test_lora_sites_by_hf_and_our_names(saved):
    q, kv, ff = 64, 32, 128
    qwen = M.Decoder.from_pretrained(saved("qwen2"))
    assert lora.lora_sites(qwen, ["q_proj", "v_proj"]) == {
        f"layers.{i}.attn.qkv": [(0, q), (q + kv, q + 2 * kv)] for i in range(2)}
    assert lora.lora_sites(qwen, ["gate_proj", "up_proj", "down_proj", "o_proj"]) == {
        **{f"layers.{i}.mlp.fc": [(0, ff), (ff, 2 * ff)] for i in range(2)},
        **{f"layers.{i}.mlp.proj": None for i in range(2)}, **{f"layers.{i}.attn.o": None for i in range(2)}}
    assert lora.lora_sites(qwen, ["qkv", "k_proj"]) == {f"layers.{i}.attn.qkv": None for i in range(2)}
    assert lora.lora_sites(qwen, ["layers.1.self_attn.k_proj"]) == {"layers.1.attn.qkv": [(q, q + kv)]}
    gpt2 = M.Decoder.from_pretrained(saved("gpt2"))
    assert lora.lora_sites(gpt2, ["c_attn", "c_proj"]) == {
        **{f"layers.{i}.attn.qkv": None for i in range(2)}, **{f"layers.{i}.attn.o": None for i in range(2)},
        **{f"layers.{i}.mlp.proj": None for i in range(2)}}
    assert lora.lora_sites(gpt2, ["attn.c_proj"]) == {f"layers.{i}.attn.o": None for i in range(2)}
    bloom = M.Decoder.from_pretrained(saved("bloom"))
    assert set(lora.lora_sites(bloom, ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"])) == {
        f"layers.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.o", "mlp.fc", "mlp.proj")}
    lfm = M.Decoder.from_pretrained(saved("lfm2"))   # layer 0 conv, layer 1 attention; d_ff 96
    assert lora.lora_sites(lfm, ["out_proj", "w1"]) == {"layers.0.conv.out_proj": None, "layers.1.attn.o": None,
                                                     "layers.0.mlp.fc": [(0, 96)], "layers.1.mlp.fc": [(0, 96)]}
    assert lora.lora_sites(lfm, ["conv.out_proj", "in_proj"]) == {"layers.0.conv.out_proj": None,
                                                              "layers.0.conv.in_proj": None}
    for fam in HF:   # every HF name of every family is in the list train.py checks names against before loading
        m = M.Decoder.from_pretrained(saved(fam))
        mods = hub.weight_map(m.cfg)
        names = {h[:-len(".weight")].rsplit(".", 1)[-1] for e in mods for h in e.hf
                 if e.ours[:-len(".weight")] in nf4.block_linears(m) and h.endswith(".weight")}
        assert names and names <= set(lora.HF_LORA_NAMES), (fam, names - set(lora.HF_LORA_NAMES))
    for bad in (["q_proj"], ["c_attn", "nonsense"]):
        with pytest.raises(ValueError, match="matches no layer of this gpt2 model"):
            lora.add_lora(gpt2, bad)


@pytest.mark.parametrize("fam,targets,changed", [
    ("qwen2", ["q_proj", "v_proj"], ["self_attn.q_proj", "self_attn.v_proj"]),
    ("llama", ["k_proj", "up_proj"], ["self_attn.k_proj", "mlp.up_proj"]),
    ("gpt2", ["c_fc"], ["mlp.c_fc"]),
])
def test_hf_name_lora_merged_save_changes_only_the_targets(fam, targets, changed, saved, tmp_path):
    d = saved(fam)
    m = M.Decoder.from_pretrained(d).eval()
    lora.add_lora(m, targets, rank=4, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    x = ids(seed=5)
    with torch.no_grad():
        unmerged = m(x)
    lora.merge_lora(m).save_pretrained(str(tmp_path))
    before = {k.removeprefix("transformer."): v for k, v in read_st(d).items()}   # gpt2 is saved without it
    after = read_st(str(tmp_path))
    assert before.keys() == after.keys()
    moved = sorted(k for k in before if not torch.equal(before[k], after[k]))
    want = sorted(f"{'h' if fam == 'gpt2' else 'model.layers'}.{i}.{c}.weight"
                  for i in range(2) for c in changed)
    assert moved == want, f"changed tensors {moved}, expected only {want}"
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(x).logits - unmerged).abs().max() < 1e-4


def test_each_slice_adapter_draws_its_own_dropout_mask():
    """q_proj and v_proj are two modules in peft, each with its own dropout; on our fused qkv they are two adapters
    of one LoRALinear and must not share a mask. With A_i = I and B_i = I, rows s:e of the output minus the base are
    scale * dropout_i(x): the zero patterns of the two ranges must differ; in eval they are both exactly x."""
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 192, bias=False)
    lin = lora.LoRALinear(base, rank=64, alpha=64, dropout=0.5, rows=[(0, 64), (128, 192)])
    with torch.no_grad():
        lin.lora_A.copy_(torch.eye(64).repeat(2, 1))
        lin.lora_B.copy_(torch.eye(64).repeat(2, 1))
    x = torch.rand(8, 64) + 0.5
    delta = lin(x) - base(x)                                            # (8, 192)
    q, v = delta[:, :64], delta[:, 128:]
    assert torch.equal(delta[:, 64:128], torch.zeros(8, 64))
    assert set(torch.unique((q == 0).float() + (q - 2 * x).abs().lt(1e-5).float()).tolist()) == {1.0}   # 0 or 2x
    assert not torch.equal(q == 0, v == 0), "the q and v adapters shared one dropout mask"
    lin.eval()
    delta = lin(x) - base(x)
    assert torch.allclose(delta[:, :64], x, atol=1e-6) and torch.allclose(delta[:, 128:], x, atol=1e-6)


def test_lora_on_nf4_merges_into_dequantised_weights(saved, tmp_path):
    d = saved("qwen2")
    m = M.Decoder.from_pretrained(d, quantize="nf4").eval()
    lora.add_lora(m, ["q_proj", "v_proj"], rank=4, alpha=8, dropout=0.0)
    assert isinstance(m.layers[0].attn.qkv.base, nf4.NF4Linear)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        f"layers.{i}.attn.qkv.lora_{ab}" for i in range(2) for ab in "AB"}
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        x = ids(seed=3)
        unmerged = m(x)
        deq = {n: m.get_submodule(n).dequantize() for n in ("layers.0.attn.o", "layers.0.mlp.fc")}
    lora.merge_lora(m).save_pretrained(str(tmp_path))
    saved_t = read_st(str(tmp_path))
    assert torch.equal(saved_t["model.layers.0.self_attn.o_proj.weight"], deq["layers.0.attn.o"])
    assert torch.equal(saved_t["model.layers.0.mlp.up_proj.weight"], deq["layers.0.mlp.fc"][128:])
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(x).logits - unmerged).abs().max() < 1e-4


# ----------------------------------------------------------------------------------------------- 4. train.py flags

def run_train(argv):
    try:
        cli.run(train.main, argv)
    except SystemExit as e:
        return e.code
    return 0


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


def read_st_file(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# ----------------------------------------------------------------------------------------------- 6. bench.py --memory

def test_bench_memory_mode_figures_add_up(tmp_path, capsys):
    import bench
    out = tmp_path / "m.json"
    r = bench.main(["--memory", "--model", "llama-2-7b", "--hidden", "128", "--layers", "2", "--batch-size", "2",
                    "--seq-len", "32", "--json", str(out)])
    assert json.load(open(out))["weights"] == r["weights"]
    w, cfg = r["weights"], M.Config.from_hf(bench.scaled_config(hub.REGISTRY["llama-2-7b"]["config"], 2, 128))
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


# ----------------------------------------------------------------------------------------------- 7. evaluate.py

def test_evaluate_quantize_nf4_generates_from_the_dequantised_model(tmp_path):
    """evaluate.py --quantize nf4: greedy answers equal those of the plain model whose block weights were replaced by
    their NF4 values, and eval.json records the setting."""
    import evaluate as E
    test = os.path.join(os.path.dirname(SAMPLE), "test.jsonl")
    out = tmp_path / "ev"
    E.main(["--model", "tiny", "--data", test, "--n", "4", "--greedy", "--max-new-tokens", "6", "--quantize", "nf4",
            "--bertscore-model", os.path.join(os.path.dirname(SAMPLE), "scorer"), "--bertscore-layer", "2",
            "--bootstrap", "0", "--batch-size", "4", "--quiet", "--out", str(out), "--device", "cpu"])
    assert json.load(open(out / "eval.json"))["generation"]["quantize"] == "nf4"
    preds = [json.loads(ln) for ln in open(out / "predictions.jsonl")]
    q, ref = M.Decoder.from_pretrained("tiny", quantize="nf4"), M.Decoder.from_pretrained("tiny").eval()
    with torch.no_grad():
        for n in nf4.block_linears(ref):
            ref.get_submodule(n).weight.copy_(q.get_submodule(n).dequantize())
    want = E.generate_answers(ref, M.load_tokenizer("tiny"), [p["question"] for p in preds], batch_size=4,
                              max_new_tokens=6, temperature=0)
    plain = E.generate_answers(M.Decoder.from_pretrained("tiny").eval(), M.load_tokenizer("tiny"),
                               [p["question"] for p in preds], batch_size=4, max_new_tokens=6, temperature=0)
    assert [p["prediction"] for p in preds] == want
    assert want != plain, "test set-up: quantising the random tiny model should change some greedy answer"


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
