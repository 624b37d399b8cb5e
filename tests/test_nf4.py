"""nf4.py: NF4 base weights against the QLoRA paper's codebook (typed out in conftest.PAPER_NF4, quantised by a
plain-Python nearest-level loop) and against the model with dequantised weights; loading quantises tensor by tensor."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import hub
import model as M
import nf4

from conftest import ids, PAPER_NF4

pytestmark = pytest.mark.usefixtures("one_thread")


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
