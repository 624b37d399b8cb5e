"""lora.py: LoRA init, merge and trainable parameters; LoRA sites by HF/peft names; per-slice dropout; LoRA on an NF4
base; activation checkpointing (with LoRA, NF4 and bf16 autocast) gives the gradients of the plain model."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import hub
import lora
import model as M
import nf4

from conftest import HF, ids, read_st

pytestmark = pytest.mark.usefixtures("one_thread")


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
