"""
Hugging Face checkpoints, for the decoder (model.py) and the encoder (bert.py) alike: the registry of short names,
config.json reading and size checks, the safetensors reader, each family's tensor name map, hub downloads
(safetensors, configs and tokenizers only: never a pickle, never remote code) and the tokenizers.

    load_decoder(Decoder, "aragpt2-base")      # what Decoder.from_pretrained calls
    save_decoder(model, "out/run")             # what Decoder.save_pretrained calls
    load_tokenizer("aragpt2-base")
"""
import json
import math
import os
import sys

import torch

import cli
import outputs
from cli import UserError
from model import Config
from nf4 import NF4_BLOCK, NF4Linear, block_linears, nf4_quantize, quantize_nf4, replace_module

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

# The encoders (bert.py, the severity classifier): short name -> hub repo (or a built-in config). All are BERT-base
# shaped except 'tiny'.
ENCODERS = {
    "arabertv02": {"repo": "aubmindlab/bert-base-arabertv02",
                   "note": "AraBERT v0.2 base (MSA, no pre-segmentation); the paper's classifier backbone"},
    "arabertv2": {"repo": "aubmindlab/bert-base-arabertv2",
                  "note": "AraBERT v2 base; trained on Farasa-segmented text, which this script does NOT do"},
    "arbertv2": {"repo": "UBC-NLP/ARBERTv2", "note": "ARBERTv2 base (seed 004's encoder)"},
    "tiny": {"repo": None, "note": "random weights, sample WordPiece vocab; for tests and smoke runs",
             "config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "intermediate_size": 128, "max_position_embeddings": 512}},
}

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


def weight_map(cfg):
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


def memory_limit(device=None, swap=True):
    """(bytes, what) the loaded weights can use at most: the device's total memory on CUDA, else the RAM available now
    plus free swap (MemAvailable of /proc/meminfo; without swap with swap=False; the physical size where that cannot
    be read)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(dev.index if dev.index is not None else torch.cuda.current_device())
        return props.total_memory, f"memory of {dev}"
    try:
        with open("/proc/meminfo") as fh:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in fh if ln.split()[1:2]}
        if not swap:
            return info["MemAvailable"], "available RAM"
        return info["MemAvailable"] + info.get("SwapFree", 0), "available RAM (+ free swap)"
    except (OSError, KeyError, ValueError, IndexError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"


def check_size(cfg_file, key, value, n, need, device=None, stored=None, kind="model", as_what="float32"):
    """The one size check of every loader (decoder and encoder), BEFORE any module is made: refuse (one UserError
    naming config.json and the field `key` = `value` that makes the model big) n parameters when the weights files
    hold fewer than half as many (`stored`, counted from their headers: not the same model), or `need` bytes of
    weights beyond memory_limit(device). Generous on purpose: only what cannot fit at all is refused."""
    if stored is not None and n > 2 * stored:   # a tensor or two missing: _load_state names it, more precisely
        raise UserError(cfg_file, f"{key} = {value}: config.json describes {n:,} parameters but the weights hold "
                                  f"only {stored:,}: the config and the weights do not belong together")
    limit, what = memory_limit(device)
    if need > limit:
        raise UserError(cfg_file, f"{key} = {value}: the {kind} would have {n:,} parameters, {need / 2**30:.1f} GiB "
                                  f"as {as_what}, more than the {limit / 2**30:.1f} GiB {what}")


def check_fits(cfg, cfg_file, dtype=torch.float32, device=None, quantize=None, stored=None):
    """check_size for a decoder config (a config with n_layer 100000 ran 137 s and took 3.9 GB before the weights were
    found missing): its parameters and weight bytes (param_count, weight_bytes), named by the field that dominates."""
    n, parts = param_count(cfg)
    part = max(parts, key=parts.get)
    key = _SIZE_KEYS[part].get(cfg.family, {"layers": "num_hidden_layers", "vocab": "vocab_size",
                                            "positions": "max_position_embeddings"}[part])
    value = {"layers": cfg.n_layer, "vocab": cfg.vocab_size, "positions": cfg.max_pos}[part]
    as_what = "NF4" if quantize == "nf4" else str(dtype).replace("torch.", "")
    check_size(cfg_file, key, value, n, weight_bytes(cfg, dtype, quantize), device, stored, "model", as_what)


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
    for entry in weight_map(cfg):
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


_SHADOW_SAID = set()


def local_folder(name, registry=None):
    """Whether a model name means the folder of that name in the working directory. A folder that shadows a
    registry name (tiny, aragpt2-base) is taken only when it is a model folder (config.json); otherwise the
    registry's model is. Either way stdout says once which was meant (a note, not a warning: stderr stays one
    error line when a later check fails)."""
    registry = REGISTRY if registry is None else registry
    if not os.path.isdir(name):
        return False
    if name not in registry:
        return True
    model_folder = os.path.isfile(os.path.join(name, "config.json"))
    if name not in _SHADOW_SAID:
        _SHADOW_SAID.add(name)
        print(f"note: {cli.one_line(name)}: " + (
            f"the model folder {os.path.abspath(name)} is used, not the registry's {name} (rename the folder, or "
            f"run elsewhere, to get the registry's)" if model_folder else
            f"the registry's {name} is used; the folder {os.path.abspath(name)} here is no model folder (no "
            f"config.json)"), flush=True)
    return model_folder


def check_name(name_or_path, registry=None):
    """The hub repo a model name stands for, checked without the network (a registry name, an HF repo id "org/name"),
    or one UserError: a path that is no folder, a name that is none of these. A local model folder -> None. (tiny,
    which has no repo, is for the callers to take first.)"""
    registry = REGISTRY if registry is None else registry
    if local_folder(name_or_path, registry):
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise UserError(name_or_path, "no config.json: not a model folder")
        return None
    repo = registry[name_or_path]["repo"] if name_or_path in registry else name_or_path
    first = name_or_path.split("/")[0]
    looks_local = (os.path.isabs(name_or_path) or name_or_path.startswith(("./", "../", "~")) or name_or_path.count("/") > 1
                   or (name_or_path not in registry and first and os.path.isdir(first)))
    if looks_local:
        raise UserError(name_or_path, "no such folder")
    if repo is None or "/" not in repo and name_or_path not in registry:
        raise UserError(name_or_path, f"neither a folder, a registry name ({', '.join(registry)}) nor an HF repo id")
    return repo


def resolve(name_or_path, revision=None, registry=None):
    """Local folder as is; registry short name or HF repo id -> snapshot (safetensors, config, tokenizer only).
    registry: the short names to know (default: this file's REGISTRY; bert.py passes its encoders')."""
    registry = REGISTRY if registry is None else registry
    if local_folder(name_or_path, registry):
        cli.utf8_path(name_or_path, "")   # safetensors cannot open it, the JSON outputs cannot record it
        return name_or_path
    if os.path.exists(name_or_path) and name_or_path not in registry:
        raise UserError(name_or_path, "is a file: expected a model folder (config.json + safetensors), a registry "
                                      "name or an HF repo id")
    repo = check_name(name_or_path, registry)
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
    if name_or_path == "tiny" and not local_folder(name_or_path):
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
                v = token_name(c.get(f"{k}_token"))
                if isinstance(v, str):
                    names[k] = v
    return names


def token_name(v):
    """A special token as tokenizer_config.json / special_tokens_map.json give it: a string, or an AddedToken object
    {"content": ...}. The same rule for the decoder's and the encoder's tokenizers."""
    return v.get("content") if isinstance(v, dict) else v


# ----------------------------------------------------------------------------------------------------------------
# WordPiece (the encoders): BERT's tokenizer, from tokenizer.json or vocab.txt


SPECIAL = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
           "mask_token": "[MASK]"}


def special_names(cfg):
    """{"pad_token": "[PAD]", ...}: tokenizer_config.json's names (a string or an AddedToken object), BERT's default
    where a name is missing or not a string (null: transformers' 'no such token'; ours need [PAD], [CLS], [SEP])."""
    def name(v, default):
        v = token_name(v)
        return v if isinstance(v, str) else default
    return {k: name(cfg.get(k), d) for k, d in SPECIAL.items()}


class WordPieceTokenizer:
    """A tokenizers.Tokenizer plus the special ids. encode(texts) -> id lists without special tokens;
    single() / pair() add [CLS]/[SEP] and truncate; save(folder) writes the four tokenizer files."""

    def __init__(self, tk, config, vocab_text=None):
        self.tk, self.config, self.vocab_text = tk, dict(config), vocab_text   # vocab.txt copied verbatim on save
        self.names = special_names(config)
        for k in ("pad_token", "cls_token", "sep_token"):
            if tk.token_to_id(self.names[k]) is None:
                raise UserError("tokenizer", f"{self.names[k]}: not in the vocabulary")
        self.pad_id, self.cls_id, self.sep_id = (tk.token_to_id(self.names[k]) for k in ("pad_token", "cls_token",
                                                                                          "sep_token"))
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)

    def encode(self, texts):
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def single(self, ids, max_len):
        """[CLS] text [SEP], the text's head kept. -> (ids, token_type_ids)."""
        out = [self.cls_id] + ids[:max(0, max_len - 2)] + [self.sep_id]
        return out, [0] * len(out)

    def pair(self, q, a, max_len, min_answer=50):
        """[CLS] Q [SEP] A [SEP] in max_len (head-tail truncation, seed 004). If it does not fit, the answer keeps
        max(min_answer, room left by the question) tokens (min_answer at most half the budget, so the question never
        vanishes), the question its head in the rest; a longer answer keeps its first ceil(n/2) and last floor(n/2)
        tokens of that share. token_type_ids: 0 for [CLS] Q [SEP], 1 for A [SEP]."""
        budget = max_len - 3
        if budget < 2:
            raise UserError("--max-len", f"{max_len} is too small for a question+answer pair")
        if len(q) + len(a) > budget:
            a_keep = min(len(a), max(min(min_answer, budget // 2), budget - len(q)))
            q = q[:budget - a_keep]
            if len(a) > a_keep:
                tail = a_keep // 2
                a = a[:a_keep - tail] + (a[len(a) - tail:] if tail else [])
        return [self.cls_id] + q + [self.sep_id] + a + [self.sep_id], [0] * (len(q) + 2) + [1] * (len(a) + 1)

    def save(self, folder):
        vocab = self.vocab_text
        if vocab is None:   # from tokenizer.json only: vocab.txt rebuilt from the WordPiece vocabulary
            vocab = "".join(t + "\n" for t, _ in sorted(self.tk.get_vocab(False).items(), key=lambda kv: kv[1]))
        outputs.atomic_write(os.path.join(folder, "vocab.txt"), vocab)
        outputs.atomic_write(os.path.join(folder, "tokenizer.json"), lambda tmp: self.tk.save(tmp))
        c, mml = self.config, self.config.get("model_max_length")
        outputs.write_json(os.path.join(folder, "tokenizer_config.json"), {
            "tokenizer_class": "BertTokenizer", "do_lower_case": bool(c.get("do_lower_case", False)),
            "strip_accents": c.get("strip_accents"), "tokenize_chinese_chars": c.get("tokenize_chinese_chars", True),
            "model_max_length": int(mml) if isinstance(mml, (int, float)) and 0 < mml < 1e6 else 512, **self.names})
        outputs.write_json(os.path.join(folder, "special_tokens_map.json"), dict(self.names))


def load_wordpiece(folder):
    """WordPiece tokeniser from tokenizer.json (preferred) or vocab.txt in folder. Lower-casing follows
    tokenizer_config.json's do_lower_case (default False: Arabic), strip_accents too (None = as lowercase, as in
    BERT). From vocab.txt the pipeline is BERT's: BertNormalizer -> BertPreTokenizer -> WordPiece('##', [UNK],
    100 chars per word), special tokens never split."""
    from tokenizers import Tokenizer, normalizers
    from tokenizers.implementations import BertWordPieceTokenizer
    p_cfg, p_json, p_vocab = (os.path.join(folder, f) for f in ("tokenizer_config.json", "tokenizer.json",
                                                                 "vocab.txt"))
    cfg = cli.read_json(p_cfg, "tokenizer config") if os.path.isfile(p_cfg) else {}
    if not isinstance(cfg, dict):
        raise UserError(p_cfg, "expected a JSON object")
    vocab_text = None
    if os.path.isfile(p_vocab):
        with cli.reading(p_vocab, "vocab.txt"), open(p_vocab, encoding="utf-8", newline="") as fh:
            vocab_text = fh.read()
    if os.path.isfile(p_json):
        with cli.reading(p_json, "tokenizer.json"):
            tk = Tokenizer.from_file(p_json)
        norm = json.loads(tk.to_str()).get("normalizer") or {}
        if norm.get("type") == "BertNormalizer":   # tokenizer_config.json's casing wins, as in transformers
            if "do_lower_case" not in cfg:
                cfg = dict(cfg, do_lower_case=bool(norm.get("lowercase")), strip_accents=norm.get("strip_accents"))
            elif (norm.get("lowercase") != bool(cfg["do_lower_case"])
                  or norm.get("strip_accents") != cfg.get("strip_accents", norm.get("strip_accents"))):
                tk.normalizer = normalizers.BertNormalizer(
                    handle_chinese_chars=cfg.get("tokenize_chinese_chars", norm.get("handle_chinese_chars", True)),
                    strip_accents=cfg.get("strip_accents"), lowercase=bool(cfg["do_lower_case"]))
        # as transformers does: the special tokens are never split, even when the file does not list them
        tk.add_special_tokens([n for n in special_names(cfg).values() if tk.token_to_id(n) is not None])
    elif vocab_text is not None:   # BERT's own pipeline, as the tokenizers library assembles it from a vocabulary
        vocab = {t.rstrip("\r"): i for i, t in enumerate(vocab_text.removesuffix("\n").split("\n"))}
        names = special_names(cfg)
        missing = [names[k] for k in ("pad_token", "cls_token", "sep_token") if names[k] not in vocab]
        if missing:
            raise UserError(p_vocab, f"{missing[0]}: not in the vocabulary")
        tk = BertWordPieceTokenizer(vocab, **names, handle_chinese_chars=cfg.get("tokenize_chinese_chars", True),
                                    strip_accents=cfg.get("strip_accents"), lowercase=bool(cfg.get("do_lower_case")))
        extra = cfg.get("additional_special_tokens") or cfg.get("extra_special_tokens") or []
        extra = [t.get("content") if isinstance(t, dict) else t for t in extra] if isinstance(extra, list) else []
        tk.add_special_tokens([n for n in extra if n in vocab])
    else:
        raise UserError(folder, "no tokenizer.json or vocab.txt")
    return WordPieceTokenizer(tk, dict({"do_lower_case": False}, **cfg), vocab_text)


# ----------------------------------------------------------------------------------------------------------------
# The decoder: read and write a model folder


def load_decoder(cls, name_or_path, dtype=None, device=None, revision=None, quantize=None):
    """Decoder.from_pretrained: a registry short name, an HF repo id, or a local folder (config.json + safetensors),
    read through weight_map. `cls` is model.Decoder (or a subclass). See Decoder.from_pretrained for the arguments."""
    dtype = dtype or torch.float32
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize={quantize!r}: supported are None and 'nf4'")
    if name_or_path == "tiny" and not local_folder(name_or_path):
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
            replace_module(model, name, lambda lin: NF4Linear(lin.in_features, lin.out_features, lin.bias is not None,
                                                              dtype=dtype))
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie:
        model.lm_head.weight = model.wte.weight
    return model.to(device=device)


def save_decoder(model, out_dir):
    """Decoder.save_pretrained: model.safetensors + config.json in the HF layout of its family (transformers loads
    them)."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    for name, m in model.named_modules():   # NF4 layers are written dequantised, in the model's dtype
        if isinstance(m, NF4Linear):
            ours[name + ".weight"] = m.dequantize(model.wte.weight.dtype)
    hf = {}
    for entry in weight_map(model.cfg):
        if entry.ours not in ours:
            raise ValueError(f"save_pretrained: {entry.ours} not found (merge_lora before saving)")
        for name, t in zip(entry.hf, entry.to_hf(ours[entry.ours])):
            hf[name] = t.contiguous().cpu()
    cfg = model.cfg.to_hf()
    cfg["torch_dtype"] = str(model.wte.weight.dtype).replace("torch.", "")
    outputs.atomic_write(os.path.join(out_dir, "model.safetensors"), lambda p: save_file(hf, p, metadata={"format": "pt"}))
    outputs.write_json(os.path.join(out_dir, "config.json"), cfg)


def hub_repo(name_or_path):
    """The hub repo id a --model names (a registry name's repo, or an HF repo id as given), or None for a local
    folder or the offline tiny model: what a model card's base_model can link to."""
    if os.path.isdir(name_or_path):
        return None
    if name_or_path in REGISTRY:
        return REGISTRY[name_or_path]["repo"]
    return name_or_path if name_or_path.count("/") == 1 else None
