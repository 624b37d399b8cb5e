"""
LoRA: low-rank adapters on chosen linear layers (an HF/peft module name or ours), mergeable back into the weights.
Works on a full-precision or an NF4 base (nf4.NF4Linear).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import UserError
from hub import weight_map
from nf4 import NF4Linear, replace_module


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
    for entry in weight_map(model.cfg):
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
        replace_module(model, name, lambda lin: LoRALinear(lin, rank, alpha, dropout, sites[name]))
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
