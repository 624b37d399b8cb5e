"""model.py against transformers (the reference nobody here wrote), on tiny random models, CPU, offline.

Each family is built as a tiny random Hugging Face model whose weights are scaled (logits of order 10) and
whose norm weights and biases are perturbed away from 1 / 0, so that a wrong formula cannot hide. It is saved
with save_pretrained and loaded with model.Decoder.from_pretrained; the logits must agree to 1e-4.
"""
import json
import os
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GenerationConfig

import hub
import lora as L
import model as M

from conftest import FAMILIES, V, build_hf, max_diff, our_logits, tiny_decoder
import math

transformers.logging.set_verbosity_error()
try:  # progress bars of save_pretrained / from_pretrained
    transformers.utils.logging.disable_progress_bar()
except AttributeError:  # pragma: no cover
    pass
TOL = 1e-4     # max |logit difference| against transformers, fp32
FAMS = list(FAMILIES)


def save_hf(m, d, **kw):
    m.save_pretrained(str(d), **kw)
    return d


def load(d, **kw):
    return M.Decoder.from_pretrained(str(d), **kw).eval()


def rand_ids(B=2, T=12, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(m, ids):
    return m(ids).logits.float()


def assert_logits_close(ours, ref, tol=TOL, what=""):
    d = max_diff(ours, ref)
    assert d <= tol, f"{what} max |logit diff| = {d:.3g} > {tol:g} (logit scale {ref.abs().max().item():.3g})"


def st_path(d):
    return os.path.join(str(d), "model.safetensors")


def read_st(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def edit_config(d, fn):
    p = os.path.join(str(d), "config.json")
    with open(p) as f:
        cfg = json.load(f)
    cfg = fn(cfg) or cfg
    with open(p, "w") as f:
        json.dump(cfg, f)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """saved(fam) -> (hf_model, dir) built and saved once per module; copy the dir before editing it."""
    cache = {}

    def get(fam):
        if fam not in cache:
            m = build_hf(fam)
            d = save_hf(m, tmp_path_factory.mktemp(fam))
            cache[fam] = (m, d)
        return cache[fam]
    return get


def copy_dir(src, dst):
    shutil.copytree(str(src), str(dst))
    return dst


# ----------------------------------------------------------------------------------------------- 1. parity

@pytest.mark.parametrize("fam", FAMS)
def test_logits_match_transformers(fam, saved):
    hf, d = saved(fam)
    ours = load(d)
    assert all(p.dtype == torch.float32 for p in ours.parameters()), "fp32 checkpoint should load as fp32"
    ids = rand_ids()
    ref = hf_logits(hf, ids)
    assert ref.abs().max() > 3, "test set-up: logits too small to be a strong check"
    out = our_logits(ours, ids)
    assert out.shape == (2, 12, V)
    assert_logits_close(out, ref, what=fam)


@pytest.mark.parametrize("fam", FAMS)
def test_hidden_matches_transformers(fam, saved):
    hf, d = saved(fam)
    ours = load(d)
    ids = rand_ids(seed=3)
    with torch.no_grad():
        ref = hf.base_model(ids).last_hidden_state
        out = ours.hidden(ids)
    assert out.shape == ref.shape
    assert max_diff(out, ref) <= TOL, f"{fam}: final-normed hidden differs by {max_diff(out, ref):.3g}"


def test_bloom_non_power_of_two_heads(tmp_path):
    """ALiBi slopes have an extra rule when n_head is not a power of two (6 heads here)."""
    hf = build_hf("bloom", hidden_size=48, n_head=6)
    ours = load(save_hf(hf, tmp_path / "b6"))
    ids = rand_ids()
    assert_logits_close(our_logits(ours, ids), hf_logits(hf, ids), what="bloom 6 heads")


@pytest.mark.parametrize("fam", FAMS)
def test_left_padded_rows_match_unpadded(fam, saved):
    """model(idx, mask) with left padding: real positions give the logits of the row run alone."""
    hf, d = saved(fam)
    ours = load(d)
    ids = rand_ids(B=2, T=10, seed=5)
    n_pad = 4
    idx = ids.clone()
    idx[1, :n_pad] = 5                          # arbitrary pad id: must not matter
    mask = torch.ones_like(idx, dtype=torch.bool)
    mask[1, :n_pad] = False
    out = our_logits(ours, idx, mask)
    assert_logits_close(out[0], hf_logits(hf, ids[:1])[0], what=f"{fam} full row")
    assert_logits_close(out[1, n_pad:], hf_logits(hf, ids[1:, n_pad:])[0], what=f"{fam} left-padded row")


@pytest.mark.parametrize("fam", FAMS)
def test_right_padded_rows_match_transformers_at_every_position(fam, saved):
    """--loss-tokens padded (the notebooks' collator) trains on the padding positions too, so their logits must be
    what transformers computes there given the attention mask: padding hidden from every query, positions counting
    slots (right padding), LFM2's conv reading zeros for padding. Both rows padded, at different lengths."""
    hf, d = saved(fam)
    ours = load(d)
    ids = rand_ids(B=2, T=12, seed=7)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, 9:], mask[1, 5:] = False, False
    ids[~mask] = 3                               # the pad token (the notebooks: EOS)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long()).logits.float()
    assert_logits_close(our_logits(ours, ids, mask), ref, what=f"{fam} right-padded rows, every position")


# ----------------------------------------------------------------------------------------------- 2. layouts

def test_gpt2_legacy_layout_no_prefix_uint8_masks(tmp_path):
    """Old GPT-2 checkpoints: no `transformer.` prefix, uint8 attn.bias masks, attn.masked_bias scalars,
    and a stored lm_head.weight equal to wte."""
    hf = build_hf("gpt2")
    d = save_hf(hf, tmp_path / "g")
    sd = read_st(st_path(d))
    new = {}
    for k, v in sd.items():
        new[k[len("transformer."):] if k.startswith("transformer.") else k] = v
    n_pos, n_layer = FAMILIES["gpt2"]["n_positions"], FAMILIES["gpt2"]["n_layer"]
    for i in range(n_layer):
        new[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos, dtype=torch.uint8)).view(1, 1, n_pos, n_pos)
        new[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    new["lm_head.weight"] = new["wte.weight"].clone()
    assert not any(k.startswith("transformer.") for k in new)
    save_file(new, st_path(d), metadata={"format": "pt"})
    ours = load(d)
    ids = rand_ids()
    assert_logits_close(our_logits(ours, ids), hf_logits(hf, ids), what="gpt2 legacy layout")


def test_bloom_fp16_no_prefix_legacy_config(tmp_path):
    """bigscience layout: fp16 tensors without the prefix, config with n_embed / num_attention_heads."""
    hf = build_hf("bloom")
    with torch.no_grad():                       # the reference sees exactly the fp16-rounded values
        for p in hf.parameters():
            p.copy_(p.half().float())
    d = save_hf(hf, tmp_path / "b")
    sd = read_st(st_path(d))
    new = {k[len("transformer."):] if k.startswith("transformer.") else k: v.half() for k, v in sd.items()}
    save_file(new, st_path(d), metadata={"format": "pt"})

    def legacy(cfg):
        cfg["n_embed"] = cfg.pop("hidden_size")
        cfg["num_attention_heads"] = cfg.pop("n_head")
        cfg["seq_length"] = 2048
    edit_config(d, legacy)
    ours = load(d, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    ids = rand_ids()
    assert_logits_close(our_logits(ours, ids), hf_logits(hf, ids), what="bloom fp16 layout")


def test_qwen2_legacy_rope_theta_key(saved, tmp_path):
    """Real Qwen2.5 config.json files carry a top-level rope_theta, no rope_parameters."""
    hf, d0 = saved("qwen2")
    d = copy_dir(d0, tmp_path / "q")

    def legacy(cfg):
        cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
        cfg.pop("layer_types", None)
    edit_config(d, legacy)
    ids = rand_ids()
    assert_logits_close(our_logits(load(d), ids), hf_logits(hf, ids), what="qwen2 legacy config")


@pytest.mark.parametrize("tie", [True, False])
def test_qwen3_stored_lm_head(tie, tmp_path):
    """tie=True with a stored lm_head equal to embed_tokens; tie=False with its own, different lm_head."""
    hf = build_hf("qwen3", tie_word_embeddings=tie)
    d = save_hf(hf, tmp_path / "q3")
    sd = read_st(st_path(d))
    if tie:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
        save_file(sd, st_path(d), metadata={"format": "pt"})
    else:
        assert "lm_head.weight" in sd
        assert not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    ids = rand_ids()
    assert_logits_close(our_logits(load(d), ids), hf_logits(hf, ids), what=f"qwen3 tie={tie}")


def test_lfm2_other_layer_pattern_legacy_config(tmp_path):
    """A different conv / attention pattern, given the old way: full_attn_idxs, block_ff_dim, tie_embedding,
    top-level rope_theta."""
    types = ["full_attention", "conv", "conv", "full_attention", "conv"]
    hf = build_hf("lfm2", num_hidden_layers=5, layer_types=types, seed=4)
    d = save_hf(hf, tmp_path / "l")

    def legacy(cfg):
        cfg.pop("layer_types")
        cfg["full_attn_idxs"] = [i for i, t in enumerate(types) if t == "full_attention"]
        cfg["block_ff_dim"] = cfg.pop("intermediate_size")
        cfg["tie_embedding"] = cfg.pop("tie_word_embeddings")
        cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    edit_config(d, legacy)
    ours = load(d)
    kinds = lambda ts: ["conv" if t == "conv" else "attention" for t in ts]
    assert kinds(ours.cfg.layer_types) == kinds(types)
    ids = rand_ids()
    assert_logits_close(our_logits(ours, ids), hf_logits(hf, ids), what="lfm2 layer pattern")


@pytest.mark.parametrize("fam", ["qwen2", "gpt2"])
def test_sharded_checkpoint(fam, tmp_path):
    hf = build_hf(fam)
    d = save_hf(hf, tmp_path / "s", max_shard_size="40KB")
    files = os.listdir(d)
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert sum(f.endswith(".safetensors") for f in files) >= 3
    ids = rand_ids()
    assert_logits_close(our_logits(load(d), ids), hf_logits(hf, ids), what=f"{fam} sharded")


@pytest.mark.parametrize("fam", ["qwen3", "gpt2"])
def test_load_bf16(fam, saved):
    hf, d = saved(fam)
    ours = M.Decoder.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    ids = rand_ids()
    with torch.no_grad():
        out = ours(ids)
    ref = hf_logits(hf, ids)
    assert torch.isfinite(out.float()).all()
    # bf16 keeps ~3 significant digits: close to fp32, but not equal
    assert max_diff(out, ref) < 0.1 * ref.abs().max().item()
    # the bf16 weights are the fp32 ones rounded, nothing else
    fp32 = load(d)
    for (n1, p1), (n2, p2) in zip(fp32.named_parameters(), ours.named_parameters()):
        assert n1 == n2 and torch.equal(p1.to(torch.bfloat16), p2), n1


# ----------------------------------------------------------------------------------------------- 3. generation

def cut_at(tokens, eos):
    return tokens[:tokens.index(eos)] if eos is not None and eos in tokens else tokens


@torch.no_grad()
def hf_greedy(hf, prompt, n):
    gc = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def nocache_greedy(ours, prompt, n):
    idx = torch.tensor([prompt])
    for _ in range(n):
        nxt = ours(idx)[0, -1].argmax()
        idx = torch.cat([idx, nxt.view(1, 1)], dim=1)
    return idx[0, len(prompt):].tolist()


PROMPTS = [[11, 22, 33, 44, 55], [101, 7, 250, 9, 13, 17, 19, 23, 29], [42], [5, 6, 7]]


@pytest.mark.parametrize("fam", FAMS)
def test_greedy_generate_matches_transformers(fam, saved):
    hf, d = saved(fam)
    ours = load(d)
    n = 8
    refs = [hf_greedy(hf, p, n) for p in PROMPTS]
    assert all(len(r) == n for r in refs)
    never = V - 1  # an EOS id; rows are cut before it if it ever comes out
    out = ours.generate([list(p) for p in PROMPTS], max_new_tokens=n, temperature=0, eos_id=never)
    assert isinstance(out, list) and len(out) == len(PROMPTS)
    for p, o, r in zip(PROMPTS, out, refs):
        assert list(o) == cut_at(r, never), f"{fam}: prompt {p}: ours {o} vs transformers {r}"
        assert list(o) == cut_at(nocache_greedy(ours, p, n), never), f"{fam}: KV-cache vs no-cache, prompt {p}"
    # batch of one gives the same as inside the batch
    assert ours.generate([PROMPTS[1]], max_new_tokens=n, temperature=0, eos_id=never)[0] == out[1]


@pytest.mark.parametrize("fam", ["gpt2", "lfm2"])
def test_generate_cuts_each_row_at_eos(fam, saved):
    hf, d = saved(fam)
    ours = load(d)
    refs = [hf_greedy(hf, p, 8) for p in PROMPTS]
    eos = refs[0][3]                        # row 0 must stop after at most 3 new tokens
    out = ours.generate([list(p) for p in PROMPTS], max_new_tokens=8, temperature=0, eos_id=eos)
    for o, r in zip(out, refs):
        assert list(o) == cut_at(r, eos)
    assert len(out[0]) <= 3 and eos not in out[0]


def test_sampling_degenerate_cases_are_greedy(saved):
    hf, d = saved("qwen2")
    ours = load(d)
    greedy = ours.generate(PROMPTS, max_new_tokens=6, temperature=0, eos_id=V - 1)
    g = torch.Generator().manual_seed(0)
    assert ours.generate(PROMPTS, max_new_tokens=6, temperature=1.0, top_k=1, eos_id=V - 1, generator=g) == greedy
    assert ours.generate(PROMPTS, max_new_tokens=6, temperature=1.0, top_p=1e-6, eos_id=V - 1, generator=g) == greedy
    a = ours.generate(PROMPTS, max_new_tokens=6, temperature=1.0, eos_id=V - 1,
                      generator=torch.Generator().manual_seed(7))
    b = ours.generate(PROMPTS, max_new_tokens=6, temperature=1.0, eos_id=V - 1,
                      generator=torch.Generator().manual_seed(7))
    assert a == b, "same generator seed must give the same samples"


# ----------------------------------------------------------------------------------------------- 4. token NLL

def _chunk_kwargs(fn, small=5):
    """If token_nll exposes a chunk-size argument, make it small so the chunking is really exercised."""
    import inspect
    params = inspect.signature(fn).parameters
    return {name: small for name in params if "chunk" in name}


@pytest.mark.parametrize("fam", ["gpt2", "qwen3", "lfm2", "bloom"])
def test_token_nll_value_and_gradient(fam, saved):
    hf, d = saved(fam)
    ours = load(d)
    B, T = 2, 12
    idx = rand_ids(B, T, seed=11)
    targets = rand_ids(B, T, seed=12)
    targets[0, :3] = -100
    targets[1, 7] = -100
    kw = _chunk_kwargs(ours.token_nll)

    nll = ours.token_nll(idx, targets, **kw)
    assert nll.shape == (B, T) and nll.dtype == torch.float32
    plain = F.cross_entropy(ours(idx).float().flatten(0, 1), targets.flatten(), reduction="none",
                            ignore_index=-100).view(B, T)
    assert (nll[targets == -100] == 0).all()
    assert max_diff(nll, plain) <= 1e-5, f"{fam}: token_nll differs by {max_diff(nll, plain):.3g}"

    w = torch.rand(B, T, generator=torch.Generator().manual_seed(13))
    params = [p for p in ours.parameters() if p.requires_grad]
    g1 = torch.autograd.grad((ours.token_nll(idx, targets, **kw) * w).sum(), params)
    plain = F.cross_entropy(ours(idx).float().flatten(0, 1), targets.flatten(), reduction="none",
                            ignore_index=-100).view(B, T)
    g2 = torch.autograd.grad((plain * w).sum(), params)
    names = [n for n, p in ours.named_parameters() if p.requires_grad]
    for n, a, b in zip(names, g1, g2):
        scale = max(1.0, b.abs().max().item())
        assert max_diff(a, b) <= 1e-5 * scale, f"{fam}: grad of {n} differs by {max_diff(a, b):.3g}"


def _shrink_last_block(m):   # a block that drops a feature: the hidden states are no longer (B, T, D)
    m.layers[-1].forward = lambda x, ctx, cache=None: x[:, :, :8]


@pytest.mark.parametrize("case, call, needle", [
    ("idx not (B, T)", lambda m: m(torch.zeros(5, dtype=torch.long)), r"idx \(5,\): expected token ids \(B, T\)"),
    ("targets not idx's shape", lambda m: m(torch.zeros(2, 5, dtype=torch.long), targets=torch.zeros(2, 4, dtype=torch.long)),
     r"targets \(2, 4\): expected \(B, T\) = \(2, 5\)"),
    ("hidden not (B, T, D)", lambda m: _shrink_last_block(m) or m(torch.zeros(2, 5, dtype=torch.long)),
     r"hidden \(2, 5, 8\): expected \(B, T, D\)"),
])
def test_forward_asserts_its_shapes(case, call, needle):
    """Decoder's forward states the shapes it works in (input (B, T), hidden (B, T, D), NLL (B, T)): a wrong one is
    an AssertionError naming the shape, not an error deep inside."""
    m = M.Decoder(M.Config.from_hf(dict(hub.REGISTRY["tiny"]["config"])))
    with pytest.raises(AssertionError, match=needle):
        call(m)


def test_token_nll_left_padding(saved):
    hf, d = saved("qwen2")
    ours = load(d)
    ids = rand_ids(2, 10, seed=21)
    tg = rand_ids(2, 10, seed=22)
    idx, targets = ids.clone(), tg.clone()
    idx[1, :4], targets[1, :4] = 0, -100
    mask = torch.ones_like(idx, dtype=torch.bool)
    mask[1, :4] = False
    nll = ours.token_nll(idx, targets, mask=mask)
    alone = ours.token_nll(ids[1:, 4:], tg[1:, 4:])
    assert max_diff(nll[1, 4:], alone[0]) <= 1e-4
    assert (nll[1, :4] == 0).all()


# ----------------------------------------------------------------------------------------------- 5. errors

def _qwen2_copy(saved, tmp_path):
    return copy_dir(saved("qwen2")[1], tmp_path / "bad")


def test_error_missing_tensor(saved, tmp_path):
    d = _qwen2_copy(saved, tmp_path)
    sd = read_st(st_path(d))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, st_path(d), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape("model.layers.1.mlp.up_proj.weight")):
        M.Decoder.from_pretrained(str(d))


def test_error_unexpected_tensor(saved, tmp_path):
    d = _qwen2_copy(saved, tmp_path)
    sd = read_st(st_path(d))
    sd["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(3, 4)
    save_file(sd, st_path(d), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape("model.layers.0.mlp.extra_proj.weight")):
        M.Decoder.from_pretrained(str(d))


def _has_run(nums, seq):
    return any(nums[i:i + len(seq)] == seq for i in range(len(nums) - len(seq) + 1))


def test_error_wrong_shape(saved, tmp_path):
    d = _qwen2_copy(saved, tmp_path)
    sd = read_st(st_path(d))
    name = "model.layers.0.mlp.gate_proj.weight"
    assert tuple(sd[name].shape) == (128, 64)
    sd[name] = torch.zeros(120, 64)
    save_file(sd, st_path(d), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(name)) as ei:
        M.Decoder.from_pretrained(str(d))
    nums = [int(x) for x in re.findall(r"\d+", str(ei.value))]
    assert _has_run(nums, [128, 64]) and _has_run(nums, [120, 64]), f"both shapes expected in: {ei.value}"


def test_error_unknown_model_type(saved, tmp_path):
    d = _qwen2_copy(saved, tmp_path)
    edit_config(d, lambda c: c.update(model_type="gptj"))
    with pytest.raises(ValueError, match="gptj") as ei:
        M.Decoder.from_pretrained(str(d))
    for known in ("gpt2", "bloom", "qwen2", "qwen3", "lfm2", "llama", "mistral"):
        assert known in str(ei.value), f"supported type {known!r} not listed in: {ei.value}"


def test_error_pickle_only_checkpoint(saved, tmp_path, monkeypatch):
    hf, d0 = saved("qwen2")
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(os.path.join(str(d0), "config.json"), str(d / "config.json"))
    torch.save(hf.state_dict(), str(d / "pytorch_model.bin"))
    calls = []

    def no_pickles(*a, **k):
        calls.append(a)
        raise AssertionError("torch.load must never be called")
    monkeypatch.setattr(torch, "load", no_pickles)
    with pytest.raises((ValueError, OSError), match=r"(?i)safetensors"):
        M.Decoder.from_pretrained(str(d))
    assert not calls


# ----------------------------------------------------------------------------------------------- 7. LoRA

def _lora_targets(fam):
    """Our module names (model.LORA_TARGETS): fused qkv, attention output o, MLP fc / proj, LFM2 conv in/out."""
    return ["qkv", "o", "fc", "proj"] + (["in_proj", "out_proj"] if fam == "lfm2" else [])


@pytest.mark.parametrize("fam", ["gpt2", "qwen2", "lfm2"])
def test_lora_init_merge_and_trainable(fam, saved):
    hf, d = saved(fam)
    ours = load(d)
    ids = rand_ids()
    base = our_logits(ours, ids)
    n_before = ours.num_params()
    L.add_lora(ours, _lora_targets(fam), rank=4, alpha=8, dropout=0.0)
    ours.eval()
    lora = [(n, p) for n, p in ours.named_parameters() if "lora" in n.lower()]
    assert lora, "add_lora added no parameters with 'lora' in their name"
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in lora}, f"non-LoRA params still trainable: {trainable - {n for n, _ in lora}}"
    assert max_diff(our_logits(ours, ids), base) <= 1e-6, "LoRA must start as the identity (B = 0)"

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in lora:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    unmerged = our_logits(ours, ids)
    assert max_diff(unmerged, base) > 1e-3, "test set-up: perturbed LoRA weights should change the output"
    L.merge_lora(ours)
    merged = our_logits(ours, ids)
    # 1e-5 relative to the logit scale: folding B @ A into W reorders fp32 sums, nothing more
    tol = 1e-5 * max(1.0, unmerged.abs().max().item())
    assert max_diff(merged, unmerged) <= tol, f"merge_lora changes logits by {max_diff(merged, unmerged):.3g}"
    assert not any("lora" in n.lower() for n, _ in ours.named_parameters()), "merge_lora left LoRA params behind"
    assert ours.num_params() == n_before


# ----------------------------------------------------------------------------------------------- 8. save_pretrained

@pytest.mark.parametrize("fam", FAMS)
def test_save_pretrained_round_trip(fam, saved, tmp_path):
    hf, d = saved(fam)
    ours = load(d)
    out = tmp_path / "out"
    ours.save_pretrained(str(out))
    assert os.path.exists(st_path(out)) and os.path.exists(os.path.join(str(out), "config.json"))
    ids = rand_ids(seed=9)
    ref = hf_logits(hf, ids)
    hf2, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True, dtype=torch.float32)
    hf2.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert_logits_close(hf_logits(hf2, ids), ref, what=f"{fam} saved by us, loaded by transformers")
    assert_logits_close(our_logits(load(out), ids), ref, what=f"{fam} saved by us, loaded by us")


def test_generate_stop_callback():
    m = tiny_decoder()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    run = lambda stop: m.generate(prompts, 30, 0.9, eos_id=-1, stop=stop,   # noqa: E731
                                  generator=torch.Generator().manual_seed(3))
    free = run(None)
    assert [len(r) for r in free] == [30, 30, 30]
    early = run(lambda ids: len(ids) >= 3)           # every row accepted at the first check (after 8 tokens)
    assert [len(r) for r in early] == [8, 8, 8] and [r[:8] for r in free] == early
    seen = []

    def only_first(ids):
        seen.append(len(ids))
        return ids == free[0][:len(ids)]             # accepts row 0 only
    part = run(only_first)
    assert part == free, "a stopped row keeps drawing: the other rows' samples do not change"
    assert seen[:2] == [8, 8] and 16 not in seen[:2], "asked every 8 steps, unfinished rows only"
    assert seen.count(8) == 3 and seen.count(16) == 2


def test_a_tiny_temperature_samples_the_best_token():
    """--temperature 1e-300 is a valid (finite, positive) flag: logits / T overflowed to inf and softmax gave NaN,
    a traceback in torch.multinomial. Now it samples the argmax, with top-k and top-p too."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [-5.0, -7.0, -6.0]])
    for t in (1e-300, 1e-37):   # below float32's range (0 there), and one where 300 / t overflows float32
        for kw in ({}, {"top_k": 2}, {"top_p": 0.5}):
            assert M.sample(logits * 100, t, **kw).tolist() == [1, 0], (t, kw)


# -- model.sample: the same distribution as the full-vocabulary sampler (issue 25) ---------------------------------

def reference_probs(row, temperature, top_k, top_p):
    """One row (list of floats) -> the full-vocabulary sampler's probabilities, in plain Python (float64)."""
    z = [x / temperature for x in row]
    keep = list(range(len(z)))
    if top_k:
        kth = sorted(z, reverse=True)[min(top_k, len(z)) - 1]
        keep = [i for i in keep if z[i] >= kth]
    m = max(z[i] for i in keep)
    e = {i: math.exp(z[i] - m) for i in keep}
    s = sum(e.values())
    p = {i: v / s for i, v in e.items()}
    if top_p is not None and top_p < 1.0:
        order = sorted(keep, key=lambda i: -z[i])   # stable: ties in index order, as torch's sort here
        mass, kept = 0.0, []
        for i in order:
            if mass > top_p:
                break
            kept.append(i)
            mass += p[i]
        s = sum(p[i] for i in kept)
        p = {i: p[i] / s for i in kept}
    return [p.get(i, 0.0) for i in range(len(z))]


COMBOS = [(t, k, p) for t in (0.3, 0.7, 1.0, 1.7) for k in (None, 1, 5, 40) for p in (None, 0.5, 0.9, 1.0)]


@pytest.mark.parametrize("temperature,top_k,top_p", COMBOS)
def test_filtered_probs_match_the_definition(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(int(temperature * 10) * 1000 + (top_k or 0) * 10 + int((top_p or 0) * 10))
    logits = torch.randn(6, 97, generator=g) * 3
    logits[0, :10] = 2.5                      # ties at the k-th value: all of them are kept, as before
    logits[1] = logits[1].round()             # many ties (bf16-like logits)
    got = M.filtered_probs(logits, temperature, top_k, top_p)
    for b in range(logits.shape[0]):
        if b < 2 and top_p is not None and top_p < 1.0:
            continue   # ties at the top-p boundary: which of them is kept depends on sort order, before as now
        ref = reference_probs(logits[b].tolist(), temperature, top_k, top_p)
        assert max(abs(x - y) for x, y in zip(got[b].tolist(), ref)) < 1e-5, b
        assert [x > 0 for x in got[b].tolist()] == [x > 0 for x in ref], b   # the same support exactly


def test_inverse_cdf_picks_the_token_whose_interval_holds_u():
    """Deterministic: with the uniform u known, the token is the first whose running sum exceeds u * total."""
    logits = torch.log(torch.tensor([[0.1, 0.0, 0.2, 0.3, 0.0, 0.4]]).clamp(min=1e-30))
    probs = M.filtered_probs(logits, 1.0)
    cdf = probs.double().cumsum(-1)[0].tolist()
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        state = g.get_state()
        tok = M.sample(logits, 1.0, generator=g).item()
        g2 = torch.Generator()
        g2.set_state(state)
        u = torch.rand(1, 1, dtype=torch.float64, generator=g2).item() * cdf[-1]
        assert tok == next(i for i, c in enumerate(cdf) if c > u)
        assert probs[0, tok] > 1e-20                     # a zero-probability token is never drawn


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, None, None), (1.0, 5, None), (0.7, 50, 0.9),
                                                     (1.3, None, 0.8), (0.5, 3, 0.95)])
def test_draws_have_the_full_vocabulary_samplers_frequencies(temperature, top_k, top_p):
    """200,000 draws of one row (in one batch) by ours and by torch.multinomial over the reference probabilities:
    both frequency vectors within sampling noise of the probabilities (chi-square, 1e-6 false-alarm level), and no
    token outside the support."""
    g = torch.Generator().manual_seed(11)
    V, N = 64, 200_000
    row = torch.randn(1, V, generator=g) * 2
    ref = torch.tensor(reference_probs(row[0].tolist(), temperature, top_k, top_p), dtype=torch.float64)
    ours = M.sample(row.expand(N, V).contiguous(), temperature, top_k, top_p, generator=g)
    theirs = torch.multinomial(ref.float().expand(N, V), 1, replacement=True, generator=g).squeeze(1)
    support = ref > 0
    df = int(support.sum()) - 1
    # chi-square critical value at p = 1e-6 (Wilson-Hilferty approximation), df >= 1
    crit = df * (1 - 2 / (9 * df) + 4.753424 * math.sqrt(2 / (9 * df))) ** 3 if df else 0.0
    for name, draws in (("ours", ours), ("multinomial", theirs)):
        counts = torch.bincount(draws, minlength=V).double()
        assert counts[~support].sum() == 0, name
        if df:
            exp = ref[support] * N
            chi2 = ((counts[support] - exp) ** 2 / exp).sum().item()
            assert chi2 < crit, (name, chi2, crit)


def test_same_seed_same_tokens_and_greedy_limits():
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(0))
    a = M.sample(logits, 0.7, 50, 0.9, generator=torch.Generator().manual_seed(5))
    b = M.sample(logits, 0.7, 50, 0.9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.dtype == torch.long and a.shape == (8,)
    assert torch.equal(M.sample(logits, 0.0), logits.argmax(-1))
    assert torch.equal(M.sample(logits, 1.0, top_k=1), logits.argmax(-1))
    one_hot = torch.full((2, 5), float("-inf"))
    one_hot[0, 4] = one_hot[1, 0] = 0.0                   # all the mass on one token, -inf elsewhere
    for _ in range(50):
        assert M.sample(one_hot, 1.0).tolist() == [4, 0]
