"""
One hand-written decoder for every causal LM of the paper (arXiv 2604.06346) and its sibling (seed 003).

Families: gpt2 (AraGPT2, GPT2-Small-Arabic, Dialect-ar-gpt-2021), bloom (Bloomz-560M), qwen2 (Qwen2.5, Al-Atlas),
qwen3, lfm2 (LiquidAI hybrid conv/attention), and llama / mistral (= qwen2 without biases).

All families run through the same modules in one canonical layout:
  - attention keeps q, k and v in one fused projection `qkv` with [q | k | v] blocks (GQA: k, v narrower);
  - the MLP is `fc` then `proj`; for SwiGLU families `fc` holds [gate | up] fused;
  - the final norm is `norm_f`, the head is `lm_head` (tied to `wte` when the config says so).
Each family's checkpoint is mapped onto that layout by an explicit table (see `_weight_map`), the same table in
both directions: `from_pretrained` reads HF safetensors through it, `save_pretrained` writes them back, so that
transformers can load what we save.

    from model import Decoder, load_tokenizer
    model = Decoder.from_pretrained("aragpt2-base")          # registry name, HF repo id, or local folder
    tok = load_tokenizer("aragpt2-base")
    logits = model(idx)                                     # (B, T, vocab)
    nll = model.token_nll(idx, targets)                     # (B, T) fp32, chunked over the vocabulary
    new = model.generate([tok.encode("...")], max_new_tokens=50)
"""
import math
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import cli
import outputs
from cli import UserError

HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------------------------
# Registry: short name -> HF repo, family, size, and the HF config (so shapes are known without any download).


def _gpt2(d, L, H, vocab, bos=0, eos=0, n_pos=1024):
    return dict(model_type="gpt2", n_embd=d, n_layer=L, n_head=H, n_inner=None, n_positions=n_pos,
                vocab_size=vocab, layer_norm_epsilon=1e-5, activation_function="gelu_new",
                bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=True)


def _qwen(model_type, d, L, H, KV, ff, vocab, eps, theta, max_pos, bos, eos, head_dim=None, tie=True, bias=None):
    cfg = dict(model_type=model_type, hidden_size=d, num_hidden_layers=L, num_attention_heads=H,
               num_key_value_heads=KV, intermediate_size=ff, vocab_size=vocab, rms_norm_eps=eps, rope_theta=theta,
               max_position_embeddings=max_pos, hidden_act="silu", tie_word_embeddings=tie,
               bos_token_id=bos, eos_token_id=eos)
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    if bias is not None:
        cfg["attention_bias"] = bias
    return cfg


def _bloom():
    return dict(model_type="bloom", n_embed=1024, n_layer=24, num_attention_heads=16, vocab_size=250880,
                layer_norm_epsilon=1e-5, apply_residual_connection_post_layernorm=False, bos_token_id=1,
                eos_token_id=2, pad_token_id=3, tie_word_embeddings=True)


def _lfm2(d, H, block_ff):
    return dict(model_type="lfm2", hidden_size=d, num_hidden_layers=16, num_attention_heads=H, num_key_value_heads=8,
                block_ff_dim=block_ff, block_auto_adjust_ff_dim=True, block_ffn_dim_multiplier=1.0,
                block_multiple_of=256, conv_L_cache=3, conv_bias=False, norm_eps=1e-5, rope_theta=1e6,
                max_position_embeddings=128000, vocab_size=65536, bos_token_id=1, eos_token_id=7, pad_token_id=0,
                tie_word_embeddings=True, full_attn_idxs=[2, 5, 8, 10, 12, 14])


REGISTRY = {
    # the ten models of the paper
    "aragpt2-base": dict(repo="aubmindlab/aragpt2-base", family="gpt2", params="135M", note="",
                         config=_gpt2(768, 12, 12, 64000)),
    "aragpt2-medium": dict(repo="aubmindlab/aragpt2-medium", family="gpt2", params="369M", note="",
                           config=_gpt2(1024, 24, 16, 64000)),
    "bloomz-560m": dict(repo="bigscience/bloomz-560m", family="bloom", params="559M", note="fp16 on disk",
                        config=_bloom()),
    "al-atlas-0.5b": dict(repo="atlasia/Al-Atlas-0.5B", family="qwen2", params="494M",
                          note="gated: needs HF_TOKEN; shape assumed = Qwen2.5-0.5B",
                          config=_qwen("qwen2", 896, 24, 14, 2, 4864, 151936, 1e-6, 1e6, 32768, 151643, 151643)),
    "gpt2-small-arabic": dict(repo="akhooli/gpt2-small-arabic", family="gpt2", params="124M",
                              note="no tokenizer.json (vocab.json + merges.txt)",
                              config=_gpt2(768, 12, 12, 50257, bos=50256, eos=50256)),
    "lfm2-350m": dict(repo="LiquidAI/LFM2-350M", family="lfm2", params="354M", note="10 conv + 6 attention layers",
                      config=_lfm2(1024, 16, 6656)),
    "lfm2-700m": dict(repo="LiquidAI/LFM2-700M", family="lfm2", params="742M", note="10 conv + 6 attention layers",
                      config=_lfm2(1536, 24, 10240)),
    "dialect-ar-gpt-2021": dict(repo="monsoon-nlp/dialect-ar-gpt-2021", family="gpt2", params="369M",
                                note="AraGPT2-medium + 5 dialect tokens; no tokenizer.json",
                                config=_gpt2(1024, 24, 16, 64005)),
    "qwen2.5-0.5b": dict(repo="Qwen/Qwen2.5-0.5B", family="qwen2", params="494M", note="base checkpoint",
                         config=_qwen("qwen2", 896, 24, 14, 2, 4864, 151936, 1e-6, 1e6, 32768, 151643, 151643)),
    "qwen3-0.6b": dict(repo="Qwen/Qwen3-0.6B", family="qwen3", params="596M", note="head_dim 128, q/k norm",
                       config=_qwen("qwen3", 1024, 28, 16, 8, 3072, 151936, 1e-6, 1e6, 40960, 151643, 151645,
                                    head_dim=128, bias=False)),
    # seed 003 (LoRA fine-tuning)
    "mistral-7b-instruct-v0.2": dict(repo="mistralai/Mistral-7B-Instruct-v0.2", family="mistral", params="7.2B",
                                     note="gated: needs HF_TOKEN",
                                     config=_qwen("mistral", 4096, 32, 32, 8, 14336, 32000, 1e-5, 1e6, 32768, 1, 2,
                                                  tie=False)),
    "llama-2-7b": dict(repo="meta-llama/Llama-2-7b-hf", family="llama", params="6.7B", note="gated: needs HF_TOKEN",
                       config=_qwen("llama", 4096, 32, 32, 32, 11008, 32000, 1e-5, 1e4, 4096, 1, 2, tie=False)),
    "gpt2-medium": dict(repo="openai-community/gpt2-medium", family="gpt2", params="355M", note="English GPT-2",
                        config=_gpt2(1024, 24, 16, 50257, bos=50256, eos=50256)),
    "bloom-560m": dict(repo="bigscience/bloom-560m", family="bloom", params="559M", note="", config=_bloom()),
    # offline demos and tests: random weights, the sample's byte-level BPE tokenizer
    "tiny": dict(repo=None, family="gpt2", params="0.26M", note="offline: random weights, data/sample/tokenizer.json",
                 config=_gpt2(64, 2, 4, 2048, n_pos=512)),
}
TINY_TOKENIZER = os.path.join(HERE, "data", "sample", "tokenizer.json")
FAMILIES = ("gpt2", "bloom", "qwen2", "qwen3", "lfm2", "llama", "mistral")

# ----------------------------------------------------------------------------------------------------------------
# Normalised config


@dataclass
class Config:
    family: str
    vocab_size: int
    d_model: int
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    d_ff: int                      # width of the MLP hidden layer (per branch for SwiGLU)
    norm: str                      # "layernorm" | "rmsnorm"
    norm_eps: float
    pos: str                       # "learned" | "rope" | "alibi"
    max_pos: int
    rope_theta: float = 10000.0
    act: str = "gelu_tanh"         # "gelu_tanh" | "gelu" | "swiglu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False          # RMSNorm over head_dim on q and k before RoPE (qwen3, lfm2)
    emb_norm: bool = False         # LayerNorm right after the token embedding (bloom)
    layer_types: tuple = ()        # per layer "attn" | "conv" (lfm2); empty = all attention
    conv_kernel: int = 3
    tie: bool = True
    bos_id: int = None
    eos_id: int = None
    pad_id: int = None
    hf: dict = field(default_factory=dict, repr=False)   # the original config.json, written back on save

    @staticmethod
    def from_hf(hf):
        """Normalise an HF config.json dict; every alias the ten checkpoints use is handled here."""
        t = hf.get("model_type")
        if t not in FAMILIES:
            raise ValueError(f"unknown model_type {t!r}: supported are {', '.join(FAMILIES)}")
        g = lambda *keys, default=None: next((hf[k] for k in keys if hf.get(k) is not None), default)  # noqa: E731
        eos = g("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
        common = dict(family=t, vocab_size=hf["vocab_size"], bos_id=g("bos_token_id"), eos_id=eos,
                      pad_id=g("pad_token_id"), tie=bool(g("tie_word_embeddings", "tie_embedding", default=True)),
                      hf=dict(hf))
        if t == "gpt2":
            for k in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
                if hf.get(k):
                    raise ValueError(f"gpt2 config: {k}=true is not supported")
            d, H = hf["n_embd"], hf["n_head"]
            act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(
                hf.get("activation_function", "gelu_new"))
            if act is None:
                raise ValueError(f"gpt2 config: activation_function {hf['activation_function']!r} not supported")
            return Config(d_model=d, n_layer=hf["n_layer"], n_head=H, n_kv_head=H, head_dim=d // H,
                          d_ff=hf.get("n_inner") or 4 * d, norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                          pos="learned", max_pos=hf.get("n_positions", 1024), act=act, qkv_bias=True, o_bias=True,
                          mlp_bias=True, **common)
        if t == "bloom":
            if hf.get("apply_residual_connection_post_layernorm"):
                raise ValueError("bloom config: apply_residual_connection_post_layernorm=true is not supported")
            d, H = g("hidden_size", "n_embed"), g("n_head", "num_attention_heads")
            return Config(d_model=d, n_layer=g("n_layer", "num_hidden_layers"), n_head=H, n_kv_head=H,
                          head_dim=d // H, d_ff=4 * d, norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                          pos="alibi", max_pos=g("seq_length", default=2048), act="gelu_tanh", qkv_bias=True,
                          o_bias=True, mlp_bias=True, emb_norm=True, **common)
        # the Llama-style families: RMSNorm, RoPE, GQA, SwiGLU
        rp = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or {}
        if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
            raise ValueError(f"{t} config: rope_scaling {scaling} is not supported")
        d, H = hf["hidden_size"], hf["num_attention_heads"]
        KV = g("num_key_value_heads", default=H)
        theta = float(rp.get("rope_theta") or hf.get("rope_theta") or 10000.0)
        if t == "lfm2":
            ff = g("block_ff_dim", "intermediate_size")
            if hf.get("block_auto_adjust_ff_dim", True):   # transformers' Lfm2MLP rule (loader re-reads w1's shape)
                ff = int(2 * ff / 3)
                mult = hf.get("block_ffn_dim_multiplier")
                if mult is not None:
                    m = hf.get("block_multiple_of", 256)
                    ff = m * ((int(mult * ff) + m - 1) // m)
            types = hf.get("layer_types")
            if types is None:
                idxs = hf.get("full_attn_idxs")
                idxs = range(hf["num_hidden_layers"]) if idxs is None else idxs
                types = ["full_attention" if i in idxs else "conv" for i in range(hf["num_hidden_layers"])]
            types = tuple("attn" if x in ("full_attention", "attention", "attn") else "conv" for x in types)
            if hf.get("conv_bias"):
                raise ValueError("lfm2 config: conv_bias=true is not supported")
            return Config(d_model=d, n_layer=hf["num_hidden_layers"], n_head=H, n_kv_head=KV,
                          head_dim=g("head_dim", default=d // H), d_ff=ff, norm="rmsnorm",
                          norm_eps=g("norm_eps", default=1e-5), pos="rope", max_pos=g("max_position_embeddings",
                                                                                    default=128000),
                          rope_theta=theta, act="swiglu", qk_norm=True, layer_types=types,
                          conv_kernel=g("conv_L_cache", default=3), **common)
        if hf.get("mlp_bias"):
            raise ValueError(f"{t} config: mlp_bias=true is not supported")
        return Config(d_model=d, n_layer=hf["num_hidden_layers"], n_head=H, n_kv_head=KV,
                      head_dim=g("head_dim", default=d // H), d_ff=hf["intermediate_size"], norm="rmsnorm",
                      norm_eps=g("rms_norm_eps", default=1e-6), pos="rope",
                      max_pos=g("max_position_embeddings", default=4096), rope_theta=theta, act="swiglu",
                      qkv_bias=bool(hf.get("attention_bias", t == "qwen2")), o_bias=False,
                      qk_norm=(t == "qwen3"), **common)

    def to_hf(self):
        """The config.json to save: the original one, made explicit where our loader derived a value."""
        hf = dict(self.hf, model_type=self.family, vocab_size=self.vocab_size, tie_word_embeddings=self.tie)
        if self.family == "lfm2":   # write the effective FFN width so every reader agrees on it
            hf.pop("block_ff_dim", None)
            hf.update(intermediate_size=self.d_ff, block_auto_adjust_ff_dim=False,
                      layer_types=["full_attention" if x == "attn" else "conv" for x in self.layer_types])
            hf.pop("full_attn_idxs", None)
            hf.pop("tie_embedding", None)
        arch = {"gpt2": "GPT2LMHeadModel", "bloom": "BloomForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "lfm2": "Lfm2ForCausalLM", "llama": "LlamaForCausalLM",
                "mistral": "MistralForCausalLM"}[self.family]
        hf["architectures"] = [arch]
        return hf


# ----------------------------------------------------------------------------------------------------------------
# NF4: 4-bit NormalFloat base weights (QLoRA, Dettmers et al. 2023), in plain PyTorch

# The 16 NF4 levels of the QLoRA paper: quantiles of N(0, 1) rescaled to [-1, 1], with an exact 0.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
NF4_BLOCK = 64   # weights sharing one absmax


def nf4_quantize(w, block=NF4_BLOCK):
    """Weight matrix (out, in), row-major -> (codes, absmax). The flattened matrix is cut into blocks of `block`
    consecutive weights (the last block zero-padded); each block is divided by its absmax (kept in fp32) and every
    value is replaced by the index of the nearest NF4 level (a tie goes to the lower level). Two 4-bit codes per
    byte, the first in the high nibble: codes (ceil(n / block) * block / 2,) uint8, absmax (ceil(n / block),) fp32.
    Done in slices of blocks so that quantising a 7B tensor never holds more than a few MB of fp32 temporaries."""
    flat = w.detach().reshape(-1)
    nb = -(-flat.numel() // block)
    levels = torch.tensor(NF4_LEVELS, device=w.device)
    mids = (levels[1:] + levels[:-1]) / 2                                   # (15,) decision thresholds
    codes = torch.empty(nb * block // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(nb, dtype=torch.float32, device=w.device)
    step = 1 << 14                                                          # blocks per slice
    for s in range(0, nb, step):
        e = min(s + step, nb)
        x = flat[s * block:e * block].float()
        if x.numel() < (e - s) * block:                                     # the ragged last block
            x = F.pad(x, (0, (e - s) * block - x.numel()))
        x = x.view(e - s, block)
        a = x.abs().amax(dim=1)                                             # (blocks,)
        absmax[s:e] = a
        q = torch.bucketize(x / torch.where(a > 0, a, 1.0)[:, None], mids)  # (blocks, block) in 0..15, ties low
        q = q.to(torch.uint8).view(-1, 2)
        codes[s * block // 2:e * block // 2] = (q[:, 0] << 4) | q[:, 1]
    return codes, absmax


_NF4_PAIRS = {}   # device -> (256, 2) fp32 table, built once: nf4_dequantize runs in every NF4 forward and backward


def _nf4_pairs(device):
    """The byte -> (high-nibble level, low-nibble level) table on `device` (one host-to-device copy per device)."""
    if device not in _NF4_PAIRS:
        levels = torch.tensor(NF4_LEVELS, device=device)
        _NF4_PAIRS[device] = torch.stack((levels.repeat_interleave(16), levels.repeat(16)), dim=1)
    return _NF4_PAIRS[device]


def nf4_dequantize(codes, absmax, shape, dtype=torch.float32, block=NF4_BLOCK):
    """(codes, absmax) -> the weight matrix of `shape` in `dtype` (level * absmax computed in fp32, rounded once).
    Filled in slices of 16M weights, so that beyond the result only a slice's fp32 values and byte indices exist:
    for Llama-2-7B's fused gate|up (90M weights) in bf16, 180 MB of result and ~128 MB of temporaries."""
    pairs = _nf4_pairs(codes.device)                                                # (256, 2): byte -> its 2 levels
    nb = absmax.numel()
    out = torch.empty(nb * block, dtype=dtype, device=codes.device)
    step = 1 << 18                                                                  # blocks per slice
    for s in range(0, nb, step):
        e = min(s + step, nb)
        lv = F.embedding(codes[s * block // 2:e * block // 2].long(), pairs)         # (bytes, 2) fp32 levels
        out[s * block:e * block] = (lv.view(-1, block) * absmax[s:e, None]).view(-1)
    return out[:math.prod(shape)].view(shape)


class _NF4Linear(torch.autograd.Function):
    """y = x @ W.T + b with W rebuilt from its NF4 codes in forward and again in backward: only the 4-bit codes are
    kept for backward, never a dequantised copy (that would cost the bf16 size of the layer per layer). W is frozen:
    no gradient for it; b gets one if it asks for it."""

    @staticmethod
    def forward(ctx, x, codes, absmax, bias, shape):
        W = nf4_dequantize(codes, absmax, shape, x.dtype)
        ctx.save_for_backward(codes, absmax)
        ctx.shape, ctx.has_bias = shape, bias is not None
        return F.linear(x, W, bias)

    @staticmethod
    def backward(ctx, grad):
        codes, absmax = ctx.saved_tensors
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = grad @ nf4_dequantize(codes, absmax, ctx.shape, grad.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            gb = grad.reshape(-1, grad.shape[-1]).sum(0)
        return gx, None, None, gb, None


class NF4Linear(nn.Module):
    """A frozen nn.Linear whose weight (out, in) is held as NF4 codes + fp32 absmax per block of 64 (buffers
    `codes`, `absmax`); the bias, if any, stays a (frozen) parameter in the compute dtype. The forward dequantises
    into the input's dtype (the autocast dtype under autocast) for each matmul."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = dtype or torch.get_default_dtype()   # what a merge or a save turns it back into
        nb = -(-in_features * out_features // NF4_BLOCK)
        self.register_buffer("codes", torch.zeros(nb * NF4_BLOCK // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(nb, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, lin):
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, device="meta", dtype=lin.weight.dtype)
        q.codes, q.absmax = nf4_quantize(lin.weight)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        return q

    def dequantize(self, dtype=torch.float32):
        return nf4_dequantize(self.codes, self.absmax, (self.out_features, self.in_features), dtype)

    def forward(self, x):
        if torch.is_autocast_enabled(x.device.type):   # dequantise straight into the autocast dtype
            x = x.to(torch.get_autocast_dtype(x.device.type))
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            return _NF4Linear.apply(x, self.codes, self.absmax, bias, (self.out_features, self.in_features))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, nf4"


def block_linears(model):
    """Names of every nn.Linear inside the blocks (attention, MLP, LFM2 conv projections): what NF4 quantises."""
    return [f"layers.{n}" for n, m in model.layers.named_modules() if isinstance(m, nn.Linear)]


def quantize_nf4(model):
    """Replace every nn.Linear inside the blocks by an NF4Linear (in place); returns the model."""
    for name in block_linears(model):
        _replace(model, name, NF4Linear.from_linear)
    return model


def _replace(model, name, make):
    """Put make(old module) in place of the submodule called `name` (e.g. "layers.0.attn.qkv")."""
    parent, child = name.rsplit(".", 1)
    mod = model.get_submodule(parent)
    setattr(mod, child, make(getattr(mod, child)))


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """w * normalise(x) with the normalisation in fp32 and the weight applied after the cast back (HF order)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def make_norm(cfg, dim):
    return nn.LayerNorm(dim, eps=cfg.norm_eps) if cfg.norm == "layernorm" else RMSNorm(dim, cfg.norm_eps)


def rope(x, cos, sin):
    """Rotate-half RoPE (HF/NeoX convention). x (B, nh, T, hd); cos, sin (B, 1, T, hd)."""
    h = x.shape[-1] // 2
    rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return x * cos + rot * sin


def alibi_slopes(n_head):
    """BLOOM's per-head ALiBi slopes: a geometric series, with extra odd powers when n_head is not a power of 2."""
    p = 2 ** math.floor(math.log2(n_head))
    base = 2.0 ** (-(2.0 ** -(math.log2(p) - 3)))
    slopes = [base ** k for k in range(1, p + 1)]
    if p < n_head:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * p) - 3)))
        slopes += [extra ** k for k in range(1, 2 * (n_head - p), 2)]
    return torch.tensor(slopes)


def segment_positions(segments):
    """Packed rows: (B, T) example ids, each example's tokens contiguous -> (B, T) position of every token within
    its own example (0 at each example's first token). No host sync, fixed shapes (fine under torch.compile)."""
    T = segments.shape[1]
    t = torch.arange(T, device=segments.device).expand_as(segments)               # (B, T) slot index
    first = torch.ones_like(segments, dtype=torch.bool)
    first[:, 1:] = segments[:, 1:] != segments[:, :-1]                             # an example starts here
    return t - torch.where(first, t, 0).cummax(-1).values                         # slot - slot of its start


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (self.nh + 2 * self.nkv) * self.hd, bias=cfg.qkv_bias)
        self.o = nn.Linear(self.nh * self.hd, cfg.d_model, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.hd, cfg.norm_eps), RMSNorm(self.hd, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, ctx, cache=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q, k, v = (t.view(B, T, -1, self.hd) for t in (q, k, v))          # (B, T, heads, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                   # (B, heads, T, hd)
        if ctx.cos is not None:
            q, k = rope(q, ctx.cos, ctx.sin), rope(k, ctx.cos, ctx.sin)
        if cache is not None:   # static cache: write this step's keys/values at their slots, attend over all slots
            cache.k[:, :, ctx.start:ctx.start + T] = k
            cache.v[:, :, ctx.start:ctx.start + T] = v
            k, v = cache.k, cache.v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.attn_mask, is_causal=ctx.attn_mask is None,
                                           enable_gqa=self.nkv != self.nh)
        return self.o(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class ShortConv(nn.Module):
    """LFM2's gated short convolution: (B, C, x) = in_proj(h); y = causal depthwise conv(B*x); out = out_proj(C*y)."""

    def __init__(self, cfg):
        super().__init__()
        d, self.L = cfg.d_model, cfg.conv_kernel
        self.in_proj = nn.Linear(d, 3 * d, bias=False)
        self.weight = nn.Parameter(torch.empty(d, 1, self.L))               # depthwise kernel, no bias
        self.out_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, ctx, cache=None):
        T = x.shape[1]
        if ctx.mask is not None:   # padding enters as zeros (as in transformers): it cannot leak into the conv, and
            x = x * ctx.mask[:, ctx.start:ctx.start + T, None].to(x.dtype)  # its own output is 0 (c = 0 there)
        b, c, h = self.in_proj(x).chunk(3, dim=-1)
        bx = (b * h).transpose(1, 2)                                        # (B, d, T)
        if ctx.segments is not None:
            # packed rows: tap j of the kernel reads the input L-1-j slots back; where that slot lies before the
            # token's own example starts, it reads a zero instead (as if each example were zero-padded on its
            # own), so no example sees the previous one. L is 3: the (B, d, T, L) windows are cheap.
            win = F.pad(bx, (self.L - 1, 0)).unfold(-1, self.L, 1)          # (B, d, T, L)
            back = torch.arange(self.L - 1, -1, -1, device=bx.device)       # (L,) how far back each tap reads
            ok = (ctx.pos[:, None, :, None] >= back).to(bx.dtype)           # (B, 1, T, L)
            y = (win * ok * self.weight[:, 0][None, :, None, :]).sum(-1)       # (B, d, T)
            return self.out_proj(c * y.transpose(1, 2))
        if cache is not None and ctx.start > 0:                             # decode: window = last L-1 inputs + new
            window = torch.cat([cache.conv, bx], dim=-1)                    # (B, d, L-1+T)
            y = F.conv1d(window, self.weight, groups=bx.shape[1])           # (B, d, T)
        else:
            y = F.conv1d(F.pad(bx, (self.L - 1, 0)), self.weight, groups=bx.shape[1])
            window = F.pad(bx, (self.L - 1, 0))
        if cache is not None:
            cache.conv = window[..., -(self.L - 1):]
        return self.out_proj(c * y.transpose(1, 2))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.act = cfg.act
        width = 2 * cfg.d_ff if cfg.act == "swiglu" else cfg.d_ff          # SwiGLU: fc = [gate | up]
        self.fc = nn.Linear(cfg.d_model, width, bias=cfg.mlp_bias)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x):
        h = self.fc(x)
        if self.act == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh" if self.act == "gelu_tanh" else "none")
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, cfg, kind):
        super().__init__()
        self.kind = kind
        self.norm1, self.norm2 = make_norm(cfg, cfg.d_model), make_norm(cfg, cfg.d_model)
        if kind == "attn":
            self.attn = Attention(cfg)
        else:
            self.conv = ShortConv(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, ctx, cache=None):
        mixer = self.attn if self.kind == "attn" else self.conv
        x = x + mixer(self.norm1(x), ctx, cache)
        return x + self.mlp(self.norm2(x))


class _Ctx:
    """What every layer of one forward call shares: positions' cos/sin, the attention mask, the padding mask."""

    def __init__(self, cos=None, sin=None, attn_mask=None, mask=None, start=0, segments=None):
        self.cos, self.sin, self.attn_mask, self.mask, self.start = cos, sin, attn_mask, mask, start
        self.segments = segments                   # (B, T) example ids of packed rows, else None


class _Cache:
    def __init__(self, k=None, v=None):
        self.k, self.v, self.conv = k, v, None


class _ChunkedNLL(torch.autograd.Function):
    """Per-token NLL of h @ W.T without ever holding (N, vocab) fp32 logits for all N rows at once.
    h (N, d), W (V, d), targets (N,) with -100 = ignore. Returns (N,) fp32.

    Rows go in equal chunks; each chunk's (c, V) fp32 logits live in one buffer that is turned into exp(z - max)
    in place (fresh (c, V) temporaries cost more than the arithmetic on a CPU). Backward needs
    D = softmax - onehot per chunk: the last chunk's D is kept from forward (with one chunk, nothing is recomputed),
    the others are recomputed from h, W and the saved logsumexp. The upstream gradient g (N,) is applied to the
    small operands: dh = g * (D @ W), dW = D.T @ (g * h), never to the (c, V) matrix."""

    @staticmethod
    def forward(ctx, h, W, targets, chunk, keep_last):
        N = h.shape[0]
        n_chunks = max(1, -(-N // chunk))
        chunk = -(-N // n_chunks)                                              # equal chunks: no ragged tail
        nll = torch.empty(N, dtype=torch.float32, device=h.device)
        lse = torch.empty(N, dtype=torch.float32, device=h.device)
        valid = targets != -100
        tgt = targets.clamp(min=0)
        last = None
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            z = (h[s:e] @ W.T).float()                                          # (c, V) fp32: the only big buffer
            picked = z.gather(1, tgt[s:e, None]).squeeze(1)                     # (c,) logit of the target
            m = z.amax(dim=-1, keepdim=True)                                    # (c, 1)
            tot = z.sub_(m).exp_().sum(dim=-1, keepdim=True)                    # z is now exp(logits - max)
            lse[s:e] = (m + tot.log()).squeeze(1)
            nll[s:e] = torch.where(valid[s:e], lse[s:e] - picked, 0.0)
            if keep_last and e == N:                                            # D = softmax - onehot, kept
                z.div_(tot).scatter_add_(1, tgt[s:e, None], torch.full_like(picked[:, None], -1.0))
                last = z.to(h.dtype)
        ctx.save_for_backward(h, W, tgt, valid, lse, last)
        ctx.chunk = chunk
        return nll

    @staticmethod
    def backward(ctx, grad):
        h, W, tgt, valid, lse, last = ctx.saved_tensors
        N, chunk = h.shape[0], ctx.chunk
        need_h, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gh = torch.empty_like(h) if need_h else None
        gW = None
        g = (grad.float() * valid)[:, None]                                     # (N, 1); 0 on ignored rows
        starts = list(range(0, N, chunk))
        for s in reversed(starts):                                              # last chunk first: D is at hand
            e = min(s + chunk, N)
            if s == starts[-1] and last is not None:
                D = last
            else:
                z = (h[s:e] @ W.T).float()
                z.sub_(lse[s:e, None]).exp_()
                z.scatter_add_(1, tgt[s:e, None], torch.full_like(z[:, :1], -1.0))
                D = z.to(h.dtype)                                               # (c, V) softmax - onehot
            if need_h:
                gh[s:e] = (g[s:e] * (D @ W).float()).to(h.dtype)                # (c, d)
            if need_W:
                part = (D.T @ (g[s:e] * h[s:e].float()).to(h.dtype)).float()    # (V, d)
                gW = part if gW is None else gW.add_(part)
        return gh, (gW.to(W.dtype) if gW is not None else None), None, None, None


# ----------------------------------------------------------------------------------------------------------------
# The decoder


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        kinds = cfg.layer_types or ("attn",) * cfg.n_layer
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos == "learned":
            self.wpe = nn.Embedding(cfg.max_pos, cfg.d_model)
        if cfg.emb_norm:
            self.emb_norm = make_norm(cfg, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, k) for k in kinds)
        self.norm_f = make_norm(cfg, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie:
            self.lm_head.weight = self.wte.weight
        self.grad_checkpoint = False   # True: recompute each block in backward (train.py --grad-checkpoint)
        if self.wte.weight.device.type != "meta":
            self.init_weights()

    def init_weights(self, seed=0):
        """Random init (GPT-2 style): N(0, 0.02) matrices, zero biases, unit norms. Seeded: same model every time."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("bias"):
                    p.zero_()
                elif p.ndim == 1:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)

    # -- the forward pass ------------------------------------------------------------------------------------------

    def _context(self, T, mask, start, S, device, dtype, segments=None):
        """Positions and masks for tokens in slots [start, start+T) attending to keys in slots [0, S).
        segments (B, T): packed rows, several examples end to end (see hidden)."""
        cfg = self.cfg
        if segments is not None:   # packed: positions restart at 0 for each example (RoPE, GPT-2's wpe, ALiBi).
            # GPT-2's learned positions need it exactly; RoPE and ALiBi see only distances within an example, so
            # for them it keeps the angles those of the padded run (the same rounding in bf16, not larger ones)
            pos = segment_positions(segments)                                              # (B, T)
        elif mask is None:
            pos = torch.arange(start, start + T, device=device)[None]                      # (1, T)
        else:   # a real token's position counts only the real tokens before it (left padding); a padding slot
            # keeps its slot index, as in transformers' training forward (right padding, --loss-tokens padded)
            pos = torch.where(mask, mask.long().cumsum(-1) - 1, torch.arange(mask.shape[1], device=device))
            pos = pos[:, start:start + T]                                                   # (B, T)
        ctx = _Ctx(mask=mask, start=start, segments=segments)
        ctx.pos = pos
        if cfg.pos == "rope":
            inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim)
            freqs = pos[..., None].float() * inv                                            # (B, T, hd/2)
            emb = torch.cat([freqs, freqs], dim=-1)[:, None]                                # (B, 1, T, hd)
            ctx.cos, ctx.sin = emb.cos().to(dtype), emb.sin().to(dtype)
        need_mask = mask is not None or cfg.pos == "alibi" or S != T or segments is not None
        if need_mask:
            qslot = torch.arange(start, start + T, device=device)[:, None]
            kslot = torch.arange(S, device=device)[None]
            allowed = (kslot <= qslot)[None]                                                # (1, T, S) causal
            if mask is not None:   # a padded key is never seen, by any query (as transformers' attention mask);
                # a query with no real key up to it (left padding) sees itself, so that no row is empty
                allowed = allowed & mask[:, None, :S]                                       # (B, T, S)
                allowed = allowed | ((kslot == qslot)[None] & ~allowed.any(-1, keepdim=True))
            if segments is not None:
                # Packed rows, every family: one block-diagonal causal mask through SDPA, so a token sees only
                # its own example. Why this and not FlexAttention or variable-length attention: it is the one
                # mechanism that runs the same on CPU and CUDA, eager and compiled, and takes BLOOM's ALiBi as
                # the additive bias it already is (flash varlen takes no bias, FlexAttention needs compiling
                # and a CUDA/Triton backend to pay off). What it costs: attention still spends T x T per row
                # (masked), the MLPs and projections -- most of the FLOPs at 512 tokens -- spend nothing on
                # padding. Pad slots at a row's end form their own segment and see only themselves and pads.
                allowed = allowed & (segments[:, :, None] == segments[:, None, :])         # (B, T, T)
            bias = torch.zeros(allowed.shape, device=device, dtype=dtype).masked_fill(~allowed, float("-inf"))
            bias = bias[:, None]                                                            # (B|1, 1, T, S)
            if cfg.pos == "alibi":   # slope_h * (pos_key - pos_query); HF adds slope_h * pos_key (same softmax)
                kpos = (mask.long().cumsum(-1) - 1)[:, :S] if mask is not None else kslot
                kpos = pos if segments is not None else kpos    # packed: distances within each example
                rel = (kpos[:, None, :] - pos[:, :, None]).to(torch.float32)               # (B|1, T, S)
                slopes = alibi_slopes(cfg.n_head).to(device)[None, :, None, None]
                bias = bias + (slopes * rel[:, None]).to(dtype)                             # (B|1, nh, T, S)
            ctx.attn_mask = bias
        return ctx

    def hidden(self, idx, mask=None, cache=None, start=0, segments=None):
        """Final-normed hidden states (B, T, d). mask (B, S) bool, True = real token; cache for generation.
        segments (B, T) int: packed rows (training), the id of the example each token belongs to, each example's
        tokens contiguous; tokens attend only within their example, positions and LFM2's conv restart per
        example. Not combined with mask or cache."""
        B, T = idx.shape
        if segments is not None and (mask is not None or cache is not None):
            raise ValueError("segments (packed rows) cannot be combined with a padding mask or a KV cache")
        x = self.wte(idx)
        S = cache[0].size if cache is not None else T
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        ctx = self._context(T, mask, start, S, idx.device, dt, segments)
        if self.cfg.pos == "learned":
            if start + T > self.cfg.max_pos:   # checked on shapes: no host sync
                raise ValueError(f"sequence of {start + T} tokens exceeds max positions {self.cfg.max_pos}")
            x = x + self.wpe(ctx.pos)
        if self.cfg.emb_norm:
            x = self.emb_norm(x)
        for i, layer in enumerate(self.layers):
            if self.grad_checkpoint and cache is None and torch.is_grad_enabled():
                # keep only the block's input; its activations are recomputed in backward (same RNG, same values)
                x = torch.utils.checkpoint.checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx, cache[i] if cache is not None else None)
        assert x.shape == (B, T, self.cfg.d_model), f"hidden {tuple(x.shape)}: expected (B, T, D)"
        return self.norm_f(x)

    def forward(self, idx, mask=None, targets=None, segments=None):
        """Logits (B, T, vocab) in the model's dtype (or autocast dtype); with targets, the per-token NLL (B, T) fp32
        instead (see token_nll). The loss goes through forward so that DDP's hooks see it. segments: packed rows
        (see hidden)."""
        assert idx.dim() == 2, f"idx {tuple(idx.shape)}: expected token ids (B, T)"
        if targets is not None:
            return self.token_nll(idx, targets, mask, segments=segments)
        logits = self.lm_head(self.hidden(idx, mask, segments=segments))
        assert logits.shape[:2] == idx.shape, f"logits {tuple(logits.shape)}: expected (B, T, V), idx (B, T)"
        return logits

    def token_nll(self, idx, targets, mask=None, chunk_tokens=None, segments=None):
        """Unreduced NLL (B, T) in fp32, 0 where targets == -100, computed in row chunks so that full-vocabulary fp32
        logits are never held for every token (16 x 512 tokens x 151,936 x 4 bytes would be 5 GB)."""
        assert targets.shape == idx.shape, f"targets {tuple(targets.shape)}: expected (B, T) = {tuple(idx.shape)}"
        h = self.hidden(idx, mask, segments=segments)
        B, T, d = h.shape
        W = self.lm_head.weight
        if torch.is_autocast_enabled(h.device.type):    # run the head in the autocast dtype, as nn.Linear would
            dt = torch.get_autocast_dtype(h.device.type)
            h, W = h.to(dt), W.to(dt)
        else:
            W = W.to(h.dtype)
        chunk = chunk_tokens or max(64, (1 << 27) // self.cfg.vocab_size)   # ~512 MB of fp32 logits per chunk
        with torch.autocast(h.device.type, enabled=False):
            keep = torch.is_grad_enabled() and (h.requires_grad or W.requires_grad)   # eval: no D to keep
            nll = _ChunkedNLL.apply(h.reshape(B * T, d), W, targets.reshape(B * T), chunk, keep)
        return nll.view(B, T)

    # -- generation -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens=50, temperature=0.7, top_k=None, top_p=None, eos_id=None,
                 generator=None, stop=None):
        """Sample (or greedy when temperature == 0) up to max_new_tokens after each prompt.
        prompts: list of token-id lists of any lengths (left-padded here). Returns the new tokens of each row,
        cut before its first EOS (eos_id None = the model's; a negative eos_id = none, every row runs to the end; a
        list of ids = stop at any of them, as transformers does with generation_config's eos_token_id list).
        A static KV cache (and LFM2's conv state) holds the prefix.
        stop: optional callable(new token ids of a row so far) -> bool, asked every 8 steps about unfinished rows (e.g.
        "the text now holds a stop string"); a row it accepts counts as finished, like one that wrote EOS, and the
        batch ends once every row is. Rows keep the tokens they drew (the caller cuts at the stop string); every row
        still draws at every step, so stopping changes no other row's sample."""
        cfg, device = self.cfg, self.wte.weight.device
        eos_id = cfg.eos_id if eos_id is None else eos_id
        eos = [eos_id] if isinstance(eos_id, int) else list(eos_id or [])
        eos = [i for i in eos if i >= 0]                               # eos_id -1: no EOS, run to the end
        eos_id = eos or None
        B, P = len(prompts), max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0:
            raise ValueError("generate: empty prompt")
        S = P + max_new_tokens
        if cfg.pos == "learned" and S > cfg.max_pos:
            raise ValueError(f"generate: {S} tokens exceed the model's {cfg.max_pos} positions")
        idx = torch.zeros(B, P, dtype=torch.long, device=device)
        mask = torch.zeros(B, S, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            idx[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, P - len(p):] = True
        mask[:, P:] = True                                             # generated tokens are always real
        dtype = self.wte.weight.dtype
        cache = [_Cache(torch.zeros(B, cfg.n_kv_head, S, cfg.head_dim, device=device, dtype=dtype),
                        torch.zeros(B, cfg.n_kv_head, S, cfg.head_dim, device=device, dtype=dtype))
                 if l.kind == "attn" else _Cache() for l in self.layers]
        for c in cache:
            c.size = S
        logits = self.lm_head(self.hidden(idx, mask, cache, 0)[:, -1]).float()   # (B, V)
        out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        eos_t = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        n = 0
        for t in range(max_new_tokens):
            nxt = sample(logits, temperature, top_k, top_p, generator)
            out[:, t] = nxt
            n = t + 1
            if eos_id is not None:
                done |= torch.isin(nxt, eos_t)
            if stop is not None and t % 8 == 7:
                so_far = out[:, :n].tolist()
                hit = [not d and stop(r) for d, r in zip(done.tolist(), so_far)]   # a row with EOS is done
                done |= torch.tensor(hit, dtype=torch.bool, device=device)
            if (eos_id is not None or stop is not None) and t % 8 == 7 and bool(done.all()):
                break                                                  # a host sync only every 8 steps
            if t + 1 < max_new_tokens:
                logits = self.lm_head(self.hidden(nxt[:, None], mask, cache, P + t)[:, -1]).float()
        rows = out[:, :n].tolist()
        if eos_id is not None:
            rows = [r[:next((j for j, x in enumerate(r) if x in eos), len(r))] for r in rows]
        return rows

    def compile_decode(self):
        """torch.compile the layer stack (hidden) that prefill and every decode step of generate run. The first
        decode positions compile once each; after that the cache slot is a dynamic integer and every step reuses
        one graph (prompts of new lengths add a prefill graph, then shapes go dynamic). Returns self."""
        self.hidden = torch.compile(self.hidden)
        return self

    # -- bookkeeping ------------------------------------------------------------------------------------------------

    def num_params(self):
        n = sum(p.numel() for p in self.parameters())   # parameters() yields a tied weight once
        return n + sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, NF4Linear))

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 * (matmul params, lm_head included) + attention scores 12 * L_attn * nh*hd * T."""
        cfg = self.cfg
        n_mat = sum(m.in_features * m.out_features for m in self.modules()
                    if isinstance(m, (nn.Linear, NF4Linear)) and m is not self.lm_head)
        n_mat += cfg.vocab_size * cfg.d_model
        n_attn = sum(1 for l in self.layers if l.kind == "attn")
        return 6 * n_mat + 12 * n_attn * cfg.n_head * cfg.head_dim * seq_len

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=None, device=None, revision=None, quantize=None):
        """Load from a registry short name, an HF repo id, or a local folder (config.json + safetensors).
        dtype defaults to fp32 (master weights for training); pass torch.bfloat16 for inference.
        quantize="nf4": every Linear inside the blocks becomes a frozen NF4Linear, quantised tensor by tensor as it
        is read (peak memory near the 4-bit size); embeddings, norms, biases and the head stay in `dtype`."""
        dtype = dtype or torch.float32
        if quantize not in (None, "nf4"):
            raise ValueError(f"quantize={quantize!r}: supported are None and 'nf4'")
        if name_or_path == "tiny" and not os.path.isdir(name_or_path):
            # a note, not a warning: stdout, so that stderr stays one "error:" line if a later check fails
            print("tiny: no weights exist for this configuration; using random weights (seed 0)", flush=True)
            cfg = Config.from_hf(dict(REGISTRY["tiny"]["config"]))
            model = cls(cfg).to(device=device, dtype=dtype)
            return quantize_nf4(model) if quantize else model
        path = resolve(name_or_path, revision)
        cfg = read_config(path)
        tensors = open_safetensors(path)
        if cfg.family == "lfm2":   # the FFN width is whatever w1 says (configs disagree on how to derive it)
            w1 = next((k for k in tensors if k.endswith("feed_forward.w1.weight")), None)
            if w1 is not None:
                cfg.d_ff = tensors.shape(w1)[0]
        check_fits(cfg, os.path.join(path, "config.json"), dtype, device, quantize,
                   stored=sum(math.prod(tensors.shape(k)) for k in tensors))
        with torch.device("meta"):
            model = cls(cfg)
        quant = set(block_linears(model)) if quantize else set()
        state = _load_state(model, tensors, dtype, device, quant)
        for name in quant:   # the meta Linears give way to meta NF4Linears; load_state_dict assigns the codes
            with torch.device("meta"):
                _replace(model, name, lambda lin: NF4Linear(lin.in_features, lin.out_features, lin.bias is not None,
                                                            dtype=dtype))
        model.load_state_dict(state, strict=True, assign=True)
        if cfg.tie:
            model.lm_head.weight = model.wte.weight
        return model.to(device=device)

    def save_pretrained(self, out_dir):
        """Write model.safetensors + config.json in the HF layout of this family (transformers can load them)."""
        from safetensors.torch import save_file
        os.makedirs(out_dir, exist_ok=True)
        ours = {k: v.detach() for k, v in self.state_dict().items()}
        for name, m in self.named_modules():   # NF4 layers are written dequantised, in the model's dtype
            if isinstance(m, NF4Linear):
                ours[name + ".weight"] = m.dequantize(self.wte.weight.dtype)
        hf = {}
        for entry in _weight_map(self.cfg):
            if entry.ours not in ours:
                raise ValueError(f"save_pretrained: {entry.ours} not found (merge_lora before saving)")
            for name, t in zip(entry.hf, entry.to_hf(ours[entry.ours])):
                hf[name] = t.contiguous().cpu()
        cfg = self.cfg.to_hf()
        cfg["torch_dtype"] = str(self.wte.weight.dtype).replace("torch.", "")
        outputs.atomic_write(os.path.join(out_dir, "model.safetensors"), lambda p: save_file(hf, p, metadata={"format": "pt"}))
        outputs.write_json(os.path.join(out_dir, "config.json"), cfg)


def sample(logits, temperature, top_k=None, top_p=None, generator=None):
    """logits (B, V) fp32 -> next token (B,). temperature 0 = greedy; top-k then top-p filtering.
    The draw is by inverse CDF: one uniform per row against the float64 running sum of the filtered probabilities
    (searchsorted). That is the distribution torch.multinomial samples, but multinomial draws one exponential per
    vocabulary entry (a row of 152K random numbers per step, a third of a small model's CPU decode step); this
    draws one number per row. Same generator seed -> same tokens, though not the tokens multinomial drew."""
    if temperature < torch.finfo(logits.dtype).tiny:   # 0, or so small it is 0 in the logits' dtype: the greedy limit
        return logits.argmax(-1)
    probs = filtered_probs(logits, temperature, top_k, top_p)                           # (B, V) fp32, rows sum to 1
    cdf = probs.double().cumsum(-1)                                                     # (B, V) float64
    u = torch.rand(cdf.shape[0], 1, dtype=torch.float64, device=cdf.device, generator=generator) * cdf[:, -1:]
    # first index whose running sum exceeds u: a token of probability 0 adds nothing to the sum, so it is never the
    # first to exceed; u = total (rand * total rounded up) would fall off the end: it takes the last token with mass
    idx = torch.searchsorted(cdf, u, right=True)                                        # (B, 1)
    last = (cdf < cdf[:, -1:]).sum(-1, keepdim=True)                                    # last index with mass
    return torch.minimum(idx, last).squeeze(1)


def filtered_probs(logits, temperature, top_k=None, top_p=None):
    """logits (B, V), temperature > 0 -> the probabilities sample() draws from (B, V) fp32: softmax(logits / T)
    restricted to the top_k largest (ties with the k-th kept) and then to the smallest set whose mass reaches
    top_p, renormalised."""
    # the maximum subtracted first: a tiny temperature (1e-40) then sends the best logit to 0 and the rest to -inf,
    # never inf - inf = NaN; softmax is unchanged by the shift
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p                 # keep the smallest set whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits.softmax(-1)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint layouts. One entry = one of our tensors <- one or more HF tensors, with the transform between them.


class _Entry:
    def __init__(self, ours, hf, kind="copy", sizes=None, n_head=None):
        self.ours, self.hf, self.kind, self.sizes, self.n_head = ours, hf if isinstance(hf, list) else [hf], kind, sizes, n_head

    def to_ours(self, parts):
        if self.kind == "copy":
            return parts[0]
        if self.kind == "T":                       # GPT-2 Conv1D stores W as [in, out]
            return parts[0].t()
        if self.kind == "cat":                     # separate q, k, v (or gate, up) -> one fused projection
            return torch.cat(parts, dim=0)
        if self.kind == "bloom":                   # per-head interleaved [nh, 3, hd] -> blocks [3, nh, hd]
            t = parts[0]
            return t.view(self.n_head, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
        raise AssertionError(self.kind)

    def to_hf(self, t):
        if self.kind == "copy":
            return [t]
        if self.kind == "T":
            return [t.t()]
        if self.kind == "cat":
            return list(t.split(self.sizes, dim=0))
        if self.kind == "bloom":
            return [t.view(3, self.n_head, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)]
        raise AssertionError(self.kind)

    def hf_shapes(self, shape):
        if self.kind == "T":
            return [tuple(reversed(shape))]
        if self.kind == "cat":
            return [(s, *shape[1:]) for s in self.sizes]
        return [tuple(shape)]


def _weight_map(cfg):
    """The explicit name map of each family (HF names without the optional `transformer.` prefix for gpt2/bloom)."""
    E = _Entry
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    wb = ("weight", "bias")
    m = []
    if cfg.family == "gpt2":
        m += [E("wte.weight", "wte.weight"), E("wpe.weight", "wpe.weight")]
        for i in range(cfg.n_layer):
            p, h = f"layers.{i}.", f"h.{i}."
            m += [E(p + "norm1." + w, h + "ln_1." + w) for w in wb]
            m += [E(p + "attn.qkv.weight", h + "attn.c_attn.weight", "T"), E(p + "attn.qkv.bias", h + "attn.c_attn.bias")]
            m += [E(p + "attn.o.weight", h + "attn.c_proj.weight", "T"), E(p + "attn.o.bias", h + "attn.c_proj.bias")]
            m += [E(p + "norm2." + w, h + "ln_2." + w) for w in wb]
            m += [E(p + "mlp.fc.weight", h + "mlp.c_fc.weight", "T"), E(p + "mlp.fc.bias", h + "mlp.c_fc.bias")]
            m += [E(p + "mlp.proj.weight", h + "mlp.c_proj.weight", "T"), E(p + "mlp.proj.bias", h + "mlp.c_proj.bias")]
        m += [E("norm_f." + w, "ln_f." + w) for w in wb]
    elif cfg.family == "bloom":
        m += [E("wte.weight", "word_embeddings.weight")]
        m += [E("emb_norm." + w, "word_embeddings_layernorm." + w) for w in wb]
        for i in range(cfg.n_layer):
            p, h = f"layers.{i}.", f"h.{i}."
            m += [E(p + "norm1." + w, h + "input_layernorm." + w) for w in wb]
            m += [E(p + "attn.qkv." + w, h + "self_attention.query_key_value." + w, "bloom", n_head=cfg.n_head) for w in wb]
            m += [E(p + "attn.o." + w, h + "self_attention.dense." + w) for w in wb]
            m += [E(p + "norm2." + w, h + "post_attention_layernorm." + w) for w in wb]
            m += [E(p + "mlp.fc." + w, h + "mlp.dense_h_to_4h." + w) for w in wb]
            m += [E(p + "mlp.proj." + w, h + "mlp.dense_4h_to_h." + w) for w in wb]
        m += [E("norm_f." + w, "ln_f." + w) for w in wb]
    else:   # qwen2, qwen3, llama, mistral, lfm2: the `model.` layout
        lfm = cfg.family == "lfm2"
        m += [E("wte.weight", "model.embed_tokens.weight")]
        for i, kind in enumerate(cfg.layer_types or ("attn",) * cfg.n_layer):
            p, h = f"layers.{i}.", f"model.layers.{i}."
            m += [E(p + "norm1.weight", h + ("operator_norm.weight" if lfm else "input_layernorm.weight")),
                  E(p + "norm2.weight", h + ("ffn_norm.weight" if lfm else "post_attention_layernorm.weight"))]
            if kind == "attn":
                a = h + "self_attn."
                m += [E(p + "attn.qkv.weight", [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"], "cat",
                        [q, kv, kv])]
                if cfg.qkv_bias:
                    m += [E(p + "attn.qkv.bias", [a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"], "cat",
                            [q, kv, kv])]
                if cfg.qk_norm:
                    qn, kn = ("q_layernorm", "k_layernorm") if lfm else ("q_norm", "k_norm")
                    m += [E(p + "attn.q_norm.weight", a + qn + ".weight"), E(p + "attn.k_norm.weight", a + kn + ".weight")]
                m += [E(p + "attn.o.weight", a + ("out_proj.weight" if lfm else "o_proj.weight"))]
            else:
                m += [E(p + "conv.in_proj.weight", h + "conv.in_proj.weight"),
                      E(p + "conv.weight", h + "conv.conv.weight"),
                      E(p + "conv.out_proj.weight", h + "conv.out_proj.weight")]
            f, (g, u, d) = (h + "feed_forward.", ("w1", "w3", "w2")) if lfm else (h + "mlp.", ("gate_proj", "up_proj", "down_proj"))
            m += [E(p + "mlp.fc.weight", [f + g + ".weight", f + u + ".weight"], "cat", [cfg.d_ff, cfg.d_ff]),
                  E(p + "mlp.proj.weight", f + d + ".weight")]
        m += [E("norm_f.weight", "model.embedding_norm.weight" if lfm else "model.norm.weight")]
    if not cfg.tie:
        m += [E("lm_head.weight", "lm_head.weight")]
    return m


def read_config(path):
    """Config of a model folder from its config.json; a missing, unreadable or unusable config is ONE UserError
    naming the file (the scripts print it as "error: ..." and exit 2)."""
    cfg_file = os.path.join(path, "config.json")
    cli.regular_file(cfg_file, record=False)
    if not os.path.isfile(cfg_file):
        raise UserError(path, "no config.json: not a model folder")
    hf = cli.read_json(cfg_file, "config")
    if not isinstance(hf, dict):
        raise UserError(cfg_file, "config must be a JSON object")
    try:
        cfg = Config.from_hf(hf)
    except KeyError as e:
        raise UserError(cfg_file, f"missing field {e.args[0]!r}") from None
    except (TypeError, ValueError, IndexError, ArithmeticError) as e:   # n_head 0: d // H
        raise UserError(cfg_file, f"unusable config ({e})") from None
    for k in ("vocab_size", "d_model", "n_layer", "n_head", "n_kv_head", "head_dim", "d_ff", "max_pos"):
        v = getattr(cfg, k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(cfg_file, f"{k} = {v!r}: expected a positive integer")
    if not (isinstance(cfg.norm_eps, (int, float)) and cfg.norm_eps > 0):
        raise UserError(cfg_file, f"norm epsilon {cfg.norm_eps!r}: expected a positive number")
    if not (math.isfinite(cfg.rope_theta) and cfg.rope_theta > 0):   # a negative base makes every rotation NaN
        raise UserError(cfg_file, f"rope_theta {cfg.rope_theta!r}: expected a positive number")
    tie = next((hf[k] for k in ("tie_word_embeddings", "tie_embedding") if hf.get(k) is not None), True)
    if not isinstance(tie, bool):   # bool("false") is True: a string would silently tie the output head
        raise UserError(cfg_file, f"tie_word_embeddings = {tie!r}: expected true or false")
    for k in ("bos", "eos", "pad"):
        # A token id the weights have no row for is not refused here: transformers loads such configs (GPT2Config's
        # default bos/eos 50256 with a smaller vocabulary, LLaMA's pad_token_id -1), and the model itself never
        # indexes with them. It is dropped (None) so nothing uses it by mistake; where a script needs the id (EOS,
        # padding) the tokenizer's ids are checked at that place (load_tokenizer, train.py, evaluate.py).
        v = getattr(cfg, f"{k}_id")
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < cfg.vocab_size):
            setattr(cfg, f"{k}_id", None)
    return cfg


def _token_ids(v):
    """An eos_token_id value transformers accepts: a non-negative int or a list of them."""
    ids = v if isinstance(v, list) else [v]
    return all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)


# The config.json key that names each size, per family (for the message when the model cannot fit)
_SIZE_KEYS = {"layers": {"gpt2": "n_layer", "bloom": "n_layer"}, "vocab": {}, "positions": {"gpt2": "n_positions"}}


def _block_linears(cfg):
    """[(weights of one Linear, how many blocks hold it)] for the Linears inside the blocks, as Decoder builds them:
    the MLP's two in every block, the attention's qkv and o, or LFM2's conv in_proj and out_proj. What NF4 quantises."""
    d, hd = cfg.d_model, cfg.head_dim
    width = 2 * cfg.d_ff if cfg.act == "swiglu" else cfg.d_ff             # swiglu: gate and up in one matrix
    kinds = cfg.layer_types or ("attn",) * cfg.n_layer
    n_attn = sum(1 for k in kinds if k == "attn")
    n_conv = len(kinds) - n_attn
    return [(d * width, len(kinds)), (cfg.d_ff * d, len(kinds)),
            (d * (cfg.n_head + 2 * cfg.n_kv_head) * hd, n_attn), (cfg.n_head * hd * d, n_attn),
            (d * 3 * d, n_conv), (d * d, n_conv)]


def param_count(cfg):
    """Parameters the Decoder built from cfg has (a tied head counted once), computed from the config alone, tensor
    by tensor as Decoder builds them: checked before anything is allocated. Returns (total, {part: count}) with the
    parts "vocab" (embedding + untied head), "positions" (learned position table) and "layers" (the blocks and
    norms), so a message can name the field that makes a model too big."""
    d, hd = cfg.d_model, cfg.head_dim
    norm = 2 * d if cfg.norm == "layernorm" else d            # LayerNorm: weight + bias; RMSNorm: weight
    kinds = cfg.layer_types or ("attn",) * cfg.n_layer
    n_attn = sum(1 for k in kinds if k == "attn")
    width = 2 * cfg.d_ff if cfg.act == "swiglu" else cfg.d_ff
    qkv = (cfg.n_head + 2 * cfg.n_kv_head) * hd
    # beside the Linears' weights: biases, norms, qk-norm and LFM2's depthwise conv kernel
    attn_rest = cfg.qkv_bias * qkv + cfg.o_bias * d + cfg.qk_norm * 2 * hd
    per_block = 2 * norm + cfg.mlp_bias * (width + d)
    layers = (sum(m * c for m, c in _block_linears(cfg)) + n_attn * attn_rest
              + (len(kinds) - n_attn) * d * cfg.conv_kernel + len(kinds) * per_block)
    layers += norm + cfg.emb_norm * norm                      # final norm, bloom's embedding norm
    parts = {"vocab": cfg.vocab_size * d * (1 if cfg.tie else 2),
             "positions": cfg.max_pos * d if cfg.pos == "learned" else 0, "layers": layers}
    return sum(parts.values()), parts


def weight_bytes(cfg, dtype=torch.float32, quantize=None):
    """Bytes the built model's parameters and buffers take: every tensor in `dtype`, except with quantize="nf4" the
    block Linears' weights, which take 4 bits per weight plus one fp32 absmax per NF4_BLOCK (padded to whole
    blocks), as NF4Linear holds them."""
    n, _ = param_count(cfg)
    size = torch.empty((), dtype=dtype).element_size()
    if quantize != "nf4":
        return n * size
    quant = _block_linears(cfg)
    q_params = sum(m * c for m, c in quant)
    q_bytes = sum((-(-m // NF4_BLOCK)) * (NF4_BLOCK // 2 + 4) * c for m, c in quant)
    return (n - q_params) * size + q_bytes


def memory_limit(device=None):
    """(bytes, what) the loaded weights can use at most: the device's total memory on CUDA, else the RAM available now
    plus free swap (MemAvailable of /proc/meminfo; the physical size where that cannot be read)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(dev.index if dev.index is not None else torch.cuda.current_device())
        return props.total_memory, f"memory of {dev}"
    try:
        with open("/proc/meminfo") as fh:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in fh if ln.split()[1:2]}
        return info["MemAvailable"] + info.get("SwapFree", 0), "available RAM (+ free swap)"
    except (OSError, KeyError, ValueError, IndexError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"


def check_fits(cfg, cfg_file, dtype=torch.float32, device=None, quantize=None, stored=None):
    """Refuse (one UserError naming config.json and the size field) a config whose model cannot be built here, BEFORE
    any module is made (a config with n_layer 100000 ran 137 s and took 3.9 GB before the weights were found
    missing): more than twice the parameters the weights files hold (`stored`, counted from their headers: not the
    same model), or weights larger than memory_limit(device). Generous on purpose: only what cannot fit at all is refused."""
    n, parts = param_count(cfg)
    part = max(parts, key=parts.get)
    key = _SIZE_KEYS[part].get(cfg.family, {"layers": "num_hidden_layers", "vocab": "vocab_size",
                                            "positions": "max_position_embeddings"}[part])
    value = {"layers": cfg.n_layer, "vocab": cfg.vocab_size, "positions": cfg.max_pos}[part]
    if stored is not None and n > 2 * stored:   # a tensor or two missing: _load_state names it, more precisely
        raise UserError(cfg_file, f"{key} = {value}: config.json describes {n:,} parameters but the weights hold "
                                  f"only {stored:,}: the config and the weights do not belong together")
    need = weight_bytes(cfg, dtype, quantize)
    limit, what = memory_limit(device)
    if need > limit:
        as_what = "NF4" if quantize == "nf4" else str(dtype).replace("torch.", "")
        raise UserError(cfg_file, f"{key} = {value}: the model would have {n:,} parameters, {need / 2**30:.1f} GiB as "
                                  f"{as_what}, more than the {limit / 2**30:.1f} GiB {what}")


def read_generation_config(path):
    """A model folder's generation_config.json (or config.json), parsed: ONE UserError naming the file when it is not
    a JSON object or a sampling setting has the wrong type (top_k "x" would fail in the middle of an evaluation;
    do_sample "false" would read as true). Only the keys a sampler reads are checked; the rest pass through."""
    cfg = cli.read_json(path, os.path.basename(path))
    if not isinstance(cfg, dict):
        raise UserError(path, "must be a JSON object")
    for k, v in cfg.items():
        if v is None:
            continue
        num = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = {"top_k": num and v >= 0 and v == int(v), "top_p": num and 0 < v <= 1, "temperature": num and v >= 0,
              "do_sample": isinstance(v, bool), "repetition_penalty": num and v > 0, "typical_p": num and 0 < v <= 1,
              "min_p": num and 0 <= v <= 1, "no_repeat_ngram_size": num and v >= 0, "epsilon_cutoff": num and v >= 0,
              "eta_cutoff": num and v >= 0, "num_beams": num and v >= 1,
              "eos_token_id": _token_ids(v)}.get(k, True)
        if not ok:
            raise UserError(path, f"{k} = {v!r}: not a valid sampling setting")
    return cfg


class _Tensors:
    """Lazy view over one or several safetensors files: names -> (file, name as stored)."""

    def __init__(self, files, folder):
        from safetensors import safe_open
        self.handles, self.where, self.name = [], {}, folder
        for f in files:
            with cli.reading(f, "weights", "re-download or re-save the model"):
                h = safe_open(f, framework="pt", device="cpu")
                self.handles.append(h)
                for k in h.keys():
                    self.where[k] = (h, k, f)

    def __iter__(self):
        return iter(self.where)

    def __contains__(self, k):
        return k in self.where

    def shape(self, k):
        h, name, f = self.where[k]
        with cli.reading(f, "weights", "re-download or re-save the model"):
            return tuple(h.get_slice(name).get_shape())

    def get(self, k):
        h, name, f = self.where[k]
        with cli.reading(f, "weights", "re-download or re-save the model"):
            return h.get_tensor(name)


def open_safetensors(path):
    """The safetensors weights of a model folder (sharded through model.safetensors.index.json, or not), as a lazy
    name -> tensor view; a folder with only pickled weights is refused. Shared with bert.py."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        wm = cli.read_json(index, "index")
        wm = wm.get("weight_map") if isinstance(wm, dict) else None
        if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
            raise UserError(index, "weight_map: expected an object of tensor name -> shard file")
        # the names are checked, not where links lead: a hub snapshot's files are links into the cache's blobs/
        root = os.path.abspath(path)
        files = []
        for x in sorted(set(wm.values())):
            f = os.path.normpath(os.path.join(root, x))
            if os.path.isabs(x) or os.path.commonpath([root, f]) != root:   # "/etc/...", "../other/x.safetensors"
                raise UserError(index, f"shard {x!r} lies outside the model folder: refused")
            if not f.endswith(".safetensors"):
                raise UserError(index, f"shard {x!r} is not a .safetensors file: only safetensors are loaded")
            if not os.path.isfile(cli.regular_file(f, record=False)):
                raise UserError(index, f"shard {x!r} is missing from {path}")
            files.append(f)
    elif os.path.lexists(cli.regular_file(os.path.join(path, "model.safetensors"), record=False)):
        files = [os.path.join(path, "model.safetensors")]   # not train.py's state.safetensors beside it
    else:
        files = sorted(cli.regular_file(os.path.join(path, x), record=False)
                       for x in os.listdir(path) if x.endswith(".safetensors"))
    if not files:
        pickles = [x for x in os.listdir(path) if x.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        hint = f" (found {', '.join(pickles)}: pickled weights are never loaded; convert them to safetensors)" if pickles else ""
        raise UserError(path, f"no .safetensors weights{hint}")
    return _Tensors(files, path)


def _load_state(model, tensors, dtype, device, quantize=()):
    """Read every tensor the map names, check its shape, transform it into our layout. Fails loudly on any mismatch.
    `quantize`: names of Linear modules whose weight is stored as NF4 (`<name>.codes`, `<name>.absmax`), quantised
    from fp32 as soon as it is read, so only one full-precision tensor is alive at a time."""
    cfg = model.cfg
    ours = {k: v.shape for k, v in model.state_dict().items()}
    # gpt2 / bloom checkpoints exist with and without the `transformer.` prefix: strip it once, here
    strip = cfg.family in ("gpt2", "bloom")
    names = {}
    for k in tensors:
        bare = k[len("transformer."):] if strip and k.startswith("transformer.") else k
        names[bare] = k
    skip = [n for n in names if n.endswith((".attn.bias", ".attn.masked_bias"))]   # GPT-2's uint8 causal masks
    for n in skip:
        names.pop(n)
    state, used = {}, set()
    for entry in _weight_map(cfg):
        parts = []
        mod = entry.ours[:-len(".weight")] if entry.ours.endswith(".weight") else None
        q = mod in quantize
        for hf_name, want in zip(entry.hf, entry.hf_shapes(ours[entry.ours])):
            if hf_name not in names:
                raise UserError(tensors.name, f"missing tensor {hf_name} in the weights (needed for {entry.ours})")
            got = tensors.shape(names[hf_name])
            if tuple(got) != tuple(want):
                raise UserError(tensors.name, f"tensor {hf_name}: the weights have shape {tuple(got)}, config.json "
                                              f"says {tuple(want)}")
            t = tensors.get(names[hf_name])
            if not t.is_floating_point():   # an int copy would load "fine" (rounded weights, no error)
                raise UserError(tensors.name, f"tensor {hf_name} is {t.dtype}: weights must be floating point")
            parts.append(t.to(torch.float32 if q else dtype))
            used.add(hf_name)
        w = entry.to_ours(parts).to(device)
        if not bool(torch.isfinite(w).all()):   # checked on the device: one pass, cheap next to the read
            raise UserError(tensors.name, f"tensor {entry.hf[0]} holds NaN or infinite values: the weights are "
                                          "corrupt (re-download or re-save the model)")
        if q:
            state[mod + ".codes"], state[mod + ".absmax"] = nf4_quantize(w)
        else:
            state[entry.ours] = w.contiguous()
    if cfg.tie:
        state["lm_head.weight"] = state["wte.weight"]
        if "lm_head.weight" in names:   # some repos store the tied head too; it must be the embedding
            used.add("lm_head.weight")
            if not torch.equal(tensors.get(names["lm_head.weight"]).to(dtype), state["wte.weight"].cpu()):
                print("warning: config ties lm_head to the embedding but the stored lm_head.weight differs; "
                      "using the embedding (as transformers does)", file=sys.stderr)
    extra = sorted(set(names) - used)
    if extra:
        raise UserError(tensors.name, f"unexpected tensor {extra[0]} in the weights ({len(extra)} unexpected in all)")
    return state


# ----------------------------------------------------------------------------------------------------------------
# Resolving names, downloading, tokenizers

ALLOW = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
         "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
         "vocab.txt"]   # vocab.txt: BERT's WordPiece vocabulary (bert.py resolves its encoders here too)


def resolve(name_or_path, revision=None, registry=None):
    """Local folder as is; registry short name or HF repo id -> snapshot (safetensors, config, tokenizer only).
    registry: the short names to know (default: this file's REGISTRY; bert.py passes its encoders')."""
    registry = REGISTRY if registry is None else registry
    if os.path.isdir(name_or_path):
        cli.utf8_path(name_or_path, "")   # safetensors cannot open it, the JSON outputs cannot record it
        return name_or_path
    if os.path.exists(name_or_path):
        raise UserError(name_or_path, "is a file: expected a model folder (config.json + safetensors), a registry "
                                      "name or an HF repo id")
    repo = registry[name_or_path]["repo"] if name_or_path in registry else name_or_path
    first = name_or_path.split("/")[0]
    looks_local = (os.path.isabs(name_or_path) or name_or_path.startswith(("./", "../", "~")) or name_or_path.count("/") > 1
                   or (name_or_path not in registry and first and os.path.isdir(first)))
    if looks_local:
        raise UserError(name_or_path, "no such folder")
    if repo is None or "/" not in repo and name_or_path not in registry:
        raise UserError(name_or_path, f"neither a folder, a registry name ({', '.join(registry)}) nor an HF repo id")
    from huggingface_hub import snapshot_download
    kw = dict(revision=revision, allow_patterns=ALLOW, token=os.environ.get("HF_TOKEN"))
    try:
        return snapshot_download(repo, **kw)
    except Exception as e:   # offline or hub down: an already-cached snapshot still loads
        try:
            return snapshot_download(repo, local_files_only=True, **kw)
        except Exception:
            gated = " (gated: accept its conditions on the hub and set HF_TOKEN)" if "gated" in registry.get(
                name_or_path, {}).get("note", "") else ""
            raise UserError(name_or_path, f"not a local folder, and cannot fetch {repo} from the hub{gated}: "
                                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special ids the model needs (bos, eos, pad; pad falls back to eos)."""

    def __init__(self, tk, bos_id=None, eos_id=None, pad_id=None):
        self.tk, self.bos_id, self.eos_id = tk, bos_id, eos_id
        self.pad_id = pad_id if pad_id is not None else eos_id
        self.vocab_size = tk.get_vocab_size()
        self.dropped = {}   # "bos"|"eos"|"pad" -> why config.json's id was not usable (load_tokenizer fills it)

    def no_id(self, k):
        """Why the tokenizer has no `k` ("eos", ...) token: for the one-line error of a script that needs it."""
        return f"the tokenizer has no {k.upper()} token ({self.dropped[k]})" if k in self.dropped else \
            f"the tokenizer has no {k.upper()} token (set {k}_token_id in config.json)"

    def encode(self, text, special=True):
        """Token ids; special=True lets the tokenizer's post-processor add what it adds (LFM2: BOS)."""
        return self.tk.encode(text, add_special_tokens=special).ids

    def decode(self, ids):
        return self.tk.decode(ids, skip_special_tokens=True)

    def save(self, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        outputs.atomic_write(os.path.join(out_dir, "tokenizer.json"), lambda p: self.tk.save(p))
        specials = {k: self.tk.id_to_token(i) for k, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id),
                                                            ("pad_token", self.pad_id)) if i is not None}
        outputs.write_json(os.path.join(out_dir, "special_tokens_map.json"), specials)


def load_tokenizer(name_or_path, revision=None):
    """From tokenizer.json, else byte-level BPE from vocab.json + merges.txt (+ added_tokens.json).
    Special ids: special_tokens_map.json / tokenizer_config.json names, else config.json ids."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as TK
    from tokenizers import decoders, models, pre_tokenizers, processors
    if name_or_path == "tiny" and not os.path.isdir(name_or_path):
        tk = TK.from_file(TINY_TOKENIZER)
        c = REGISTRY["tiny"]["config"]
        return Tokenizer(tk, c["bos_token_id"], c["eos_token_id"], None)
    path = resolve(name_or_path, revision)
    j = lambda n: os.path.join(path, n)  # noqa: E731
    for n in ("tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json", "config.json",
              "tokenizer_config.json", "special_tokens_map.json"):
        cli.regular_file(j(n), record=False)
    if os.path.isfile(j("tokenizer.json")):
        with cli.reading(j("tokenizer.json"), "tokenizer", "expected a tokenizer.json saved by the tokenizers library"):
            tk = TK.from_file(j("tokenizer.json"))
    elif os.path.isfile(j("vocab.json")) and os.path.isfile(j("merges.txt")):
        with cli.reading(f"{j('vocab.json')} + merges.txt", "tokenizer (byte-level BPE)"):
            tk = TK(models.BPE.from_file(j("vocab.json"), j("merges.txt")))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
        if os.path.isfile(j("added_tokens.json")):
            added = cli.read_json(j("added_tokens.json"), "added tokens")
            if not isinstance(added, dict) or not all(isinstance(v, int) for v in added.values()):
                raise UserError(j("added_tokens.json"), "expected an object of token -> id")
            for tok, want in sorted(added.items(), key=lambda kv: kv[1]):
                tk.add_tokens([AddedToken(tok, special=False, normalized=False)])
                if tk.token_to_id(tok) != want:
                    raise UserError(j("added_tokens.json"), f"token {tok!r} got id {tk.token_to_id(tok)}, "
                                                            f"file says {want}")
    else:
        raise UserError(path, "no tokenizer.json nor vocab.json + merges.txt")
    names = _special_names(path)
    if not os.path.isfile(j("tokenizer.json")):   # special tokens must stay one token, as in transformers
        specials = [n for n in {*names.values(), "<|endoftext|>"} if tk.token_to_id(n) is not None]
        tk.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in sorted(specials)])
    ids, V = {}, None
    if os.path.isfile(j("config.json")):
        c = cli.read_json(j("config.json"), "config")
        c = c if isinstance(c, dict) else {}
        for k in ("bos", "eos", "pad"):
            v = c.get(f"{k}_token_id")
            ids[k] = v[0] if isinstance(v, list) else v
        V = c.get("vocab_size")
    for k, name in names.items():   # names beat config ids
        if tk.token_to_id(name) is not None:
            ids[k] = tk.token_to_id(name)
    if isinstance(V, int) and not isinstance(V, bool):
        # a tokenizer from another model gives ids past the embedding: an IndexError deep in the first forward
        top = max(tk.get_vocab(with_added_tokens=True).values(), default=-1)
        if top >= V:
            raise UserError(path, f"the tokenizer has token id {top} but config.json's vocab_size is {V}: the "
                                  "tokenizer and the weights do not belong together")
    dropped = {}
    for k, v in ids.items():
        # An id with no row in the embedding is dropped, not refused: transformers loads such configs (GPT2Config's
        # default bos/eos 50256 with a smaller vocabulary). A pad id then falls back to EOS; a script that needs
        # an EOS (train.py, evaluate.py) refuses there, with this reason (Tokenizer.no_id).
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0
                              or (isinstance(V, int) and not isinstance(V, bool) and v >= V)):
            dropped[k] = f"config.json's {k}_token_id {v!r} is not a token id of this model (vocab_size {V})"
            ids[k] = None
    tok = Tokenizer(tk, ids.get("bos"), ids.get("eos"), ids.get("pad"))
    tok.dropped = dropped
    return tok


def _special_names(path):
    """{"bos"|"eos"|"pad": token string} from tokenizer_config.json, then special_tokens_map.json (later wins)."""
    names = {}
    for fname in ("tokenizer_config.json", "special_tokens_map.json"):
        p = os.path.join(path, fname)
        if os.path.isfile(p):
            c = cli.read_json(p, fname)
            if not isinstance(c, dict):
                raise UserError(p, "expected a JSON object")
            for k in ("bos", "eos", "pad"):
                v = c.get(f"{k}_token")
                v = v.get("content") if isinstance(v, dict) else v
                if isinstance(v, str):
                    names[k] = v
    return names


# ----------------------------------------------------------------------------------------------------------------
# LoRA: low-rank adapters on chosen linear layers, mergeable back into the weights


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B(A(dropout(x))). A ~ kaiming-uniform, B = 0, so the model starts unchanged.

    `rows` = [(start, end), ...]: output row ranges of the base, each with its own rank-r adapter (B_i A_i); default
    one range covering every row. This is how an HF name such as q_proj adapts only the q rows of our fused qkv.
    The adapters are stacked: lora_A (k*r, in) holds A_1..A_k, lora_B (sum of range widths, r) holds B_1..B_k.
    Each adapter draws its own dropout mask on the input, as peft does for q_proj and v_proj (two modules there).
    The base may be an nn.Linear or a frozen NF4Linear."""

    def __init__(self, base, rank, alpha, dropout, rows=None):
        super().__init__()
        self.base, self.scale, self.rank = base, alpha / rank, rank
        self.rows = list(rows) if rows is not None else [(0, base.out_features)]
        dev = (base.weight if isinstance(base, nn.Linear) else base.absmax).device
        width = sum(e - s for s, e in self.rows)
        self.lora_A = nn.Parameter(torch.empty(rank * len(self.rows), base.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(width, rank, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        y = self.base(x)                                                      # (..., out)
        if self.training and self.dropout.p > 0 and len(self.rows) > 1:      # a mask per adapter
            a = torch.cat([F.linear(self.dropout(x), A.to(x.dtype)) for A in self.lora_A.split(self.rank)], -1)
        else:
            a = F.linear(self.dropout(x), self.lora_A.to(x.dtype))            # (..., k*r)
        if self.rows == [(0, self.base.out_features)]:
            return y + self.scale * F.linear(a, self.lora_B.to(x.dtype))
        pieces, at, off = [], 0, 0                                            # y's columns, cut at the ranges
        for i, (s, e) in enumerate(self.rows):                                # only these rows move
            B = self.lora_B[off:off + e - s].to(y.dtype)                      # (e - s, r)
            pieces += [y[..., at:s], y[..., s:e] + self.scale * F.linear(a[..., i * self.rank:(i + 1) * self.rank]
                                                                         .to(y.dtype), B)]
            at, off = e, off + e - s
        return torch.cat(pieces + [y[..., at:]], dim=-1)

    def merged(self):
        """The base with every adapter folded in (W[s:e] += scale * B_i @ A_i, fp32 sums); an NF4 base comes back
        as an ordinary nn.Linear in its compute dtype (dequantised, then merged in fp32)."""
        base = self.base
        with torch.no_grad():
            if isinstance(base, NF4Linear):
                W = base.dequantize(torch.float32)
                lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=W.device,
                                dtype=base.compute_dtype)
                if base.bias is not None:
                    lin.bias.copy_(base.bias)
                base = lin
            else:
                W = base.weight
            off = 0
            for i, (s, e) in enumerate(self.rows):
                A = self.lora_A[i * self.rank:(i + 1) * self.rank].float()
                B = self.lora_B[off:off + e - s].float()
                W[s:e] += (self.scale * B @ A).to(W.dtype)
                off += e - s
            if base is not self.base:
                base.weight.copy_(W)
        return base


LORA_TARGETS = ("qkv", "o", "fc", "proj", "in_proj", "out_proj")
# the HF/peft module names of the block Linears of every family (which of them a model has: lora_sites)
HF_LORA_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",   # qwen, llama, mistral
                 "c_attn", "c_proj", "c_fc",                                                    # gpt2
                 "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h",                  # bloom
                 "out_proj", "in_proj", "w1", "w2", "w3")                                       # lfm2


def lora_sites(model, targets):
    """Resolve LoRA target names to {our module name: [(row start, row end), ...] or None (= all rows)}.

    A target is an HF/peft module name, matched as peft does (the module path equals it or ends with "." + it),
    through this family's weight map: q_proj / k_proj / v_proj are row ranges of our fused qkv, gate_proj / up_proj
    (LFM2: w1 / w3) row ranges of fc; c_attn, query_key_value, o_proj, dense, down_proj, w2, ... whole modules.
    Otherwise it is one of our names (LORA_TARGETS), matched on the last part of our module name. An HF name wins
    where both exist: for LFM2, out_proj means both self_attn.out_proj and conv.out_proj, as in peft
    (conv.out_proj alone: "conv.out_proj"). Every target must match at least one layer."""
    linears = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear)) and n.startswith("layers.")}
    hf_mods = {}   # HF module name -> (our module name, row range or None)
    for entry in _weight_map(model.cfg):
        mod = entry.ours[:-len(".weight")]
        if not entry.ours.endswith(".weight") or mod not in linears:
            continue
        if entry.kind == "cat":
            off = 0
            for name, size in zip(entry.hf, entry.sizes):
                hf_mods[name[:-len(".weight")]] = (mod, (off, off + size))
                off += size
        else:
            hf_mods[entry.hf[0][:-len(".weight")]] = (mod, None)
    sites = {}
    for t in targets:
        hits = [v for k, v in hf_mods.items() if k == t or k.endswith("." + t)]
        if not hits and t in LORA_TARGETS:
            hits = [(n, None) for n in sorted(linears) if n.rsplit(".", 1)[-1] == t]
        if not hits:
            known = sorted({k.rsplit(".", 1)[-1] for k in hf_mods})
            raise UserError("--lora-targets", f"LoRA target {t!r} matches no layer of this {model.cfg.family} model: "
                            f"its HF names are {', '.join(known)}; ours are {', '.join(LORA_TARGETS)}")
        for mod, rows in hits:
            if rows is None or sites.get(mod, ()) is None:
                sites[mod] = None
            else:
                sites.setdefault(mod, []).append(rows)
    return {m: (None if r is None else sorted(set(r))) for m, r in sites.items()}


def add_lora(model, targets=("qkv", "o"), rank=16, alpha=32, dropout=0.05):
    """Wrap the layers that `targets` name (HF/peft names or ours, see lora_sites) in LoRALinear; freeze everything
    else. Returns the wrapped module names."""
    sites = lora_sites(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name in [n for n, _ in model.named_modules() if n in sites]:   # in module order
        _replace(model, name, lambda lin: LoRALinear(lin, rank, alpha, dropout, sites[name]))
        wrapped.append(name)
    return wrapped


def merge_lora(model):
    """Fold every adapter into its base weight (W += scale * B @ A) and unwrap it; all parameters trainable again."""
    for mod in list(model.modules()):
        for child, sub in list(mod.named_children()):
            if isinstance(sub, LoRALinear):
                setattr(mod, child, sub.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model
