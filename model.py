"""
The decoder: one hand-written architecture for every causal LM of the paper (arXiv 2604.06346) and its sibling
(seed 003). Standard library and torch only, so it can be read (and copied out) on its own.

Families: gpt2 (AraGPT2, GPT2-Small-Arabic, Dialect-ar-gpt-2021), bloom (Bloomz-560M), qwen2 (Qwen2.5, Al-Atlas),
qwen3, lfm2 (LiquidAI hybrid conv/attention), and llama / mistral (= qwen2 without biases).

All families run through the same modules in one canonical layout:
  - attention keeps q, k and v in one fused projection `qkv` with [q | k | v] blocks (GQA: k, v narrower);
  - the MLP is `fc` then `proj`; for SwiGLU families `fc` holds [gate | up] fused;
  - the final norm is `norm_f`, the head is `lm_head` (tied to `wte` when the config says so).
Each family's checkpoint is mapped onto that layout by an explicit table (hub.py's `weight_map`), the same table in
both directions: `Decoder.from_pretrained` reads HF safetensors through it, `save_pretrained` writes them back, so
that transformers can load what we save. Around this file: hub.py (registry, config.json, safetensors, the hub,
tokenizers), nf4.py (4-bit base weights), lora.py (adapters).

    from model import Decoder, load_tokenizer
    model = Decoder.from_pretrained("aragpt2-base")          # registry name, HF repo id, or local folder
    tok = load_tokenizer("aragpt2-base")
    logits = model(idx)                                     # (B, T, vocab)
    nll = model.token_nll(idx, targets)                     # (B, T) fp32, chunked over the vocabulary
    new = model.generate([tok.encode("...")], max_new_tokens=50)
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

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
        # a quantised Linear (nf4.NF4Linear, quantized = True) holds codes, not parameters: count its weights
        return n + sum(m.in_features * m.out_features for m in self.modules() if getattr(m, "quantized", False))

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 * (matmul params, lm_head included) + attention scores 12 * L_attn * nh*hd * T."""
        cfg = self.cfg
        n_mat = sum(m.in_features * m.out_features for m in self.modules()
                    if (isinstance(m, nn.Linear) or getattr(m, "quantized", False)) and m is not self.lm_head)
        n_mat += cfg.vocab_size * cfg.d_model
        n_attn = sum(1 for l in self.layers if l.kind == "attn")
        return 6 * n_mat + 12 * n_attn * cfg.n_head * cfg.head_dim * seq_len

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=None, device=None, revision=None, quantize=None):
        """Load from a registry short name, an HF repo id, or a local folder (config.json + safetensors).
        dtype defaults to fp32 (master weights for training); pass torch.bfloat16 for inference.
        quantize="nf4": every Linear inside the blocks becomes a frozen NF4Linear (nf4.py), quantised tensor by tensor
        as it is read (peak memory near the 4-bit size); embeddings, norms, biases and the head stay in `dtype`.
        The reading itself (name map, shape checks, size checks, the hub) is hub.py's load_decoder."""
        import hub
        return hub.load_decoder(cls, name_or_path, dtype=dtype, device=device, revision=revision, quantize=quantize)

    def save_pretrained(self, out_dir):
        """Write model.safetensors + config.json in the HF layout of this family (transformers can load them)."""
        import hub
        hub.save_decoder(self, out_dir)


def load_tokenizer(name_or_path, revision=None):
    """The model's tokenizer (hub.py's load_tokenizer; kept here so that `from model import load_tokenizer` works)."""
    import hub
    return hub.load_tokenizer(name_or_path, revision)


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



# Dense bf16 peak FLOP/s by device name (substring match), for MFU = flops_per_token * tokens/s / peak
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "RTX 4090": 165e12}


def peak_bf16(device_name):
    """Dense bf16 peak FLOP/s of a GPU by its name (PEAK_BF16 substring), None if unknown or not a GPU."""
    return next((v for k, v in PEAK_BF16.items() if device_name and k in device_name), None)
