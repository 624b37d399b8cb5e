"""
LoRA: low-rank adapters on chosen linear layers (an HF/peft module name or ours), mergeable back into the weights.
Works on a full-precision or an NF4 base (nf4.NF4Linear).
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import outputs
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


# -- peft's adapter format: <dir>/adapter_config.json + adapter_model.safetensors ---------------------------------
# peft names a LoRA tensor base_model.model.<HF module path>.lora_A.weight (r, in) / .lora_B.weight (out, r), in
# nn.Linear orientation for every layer type (GPT-2's Conv1D too: fan_in_fan_out = true in the config tells peft that
# the base weight is stored (in, out)). Our fused qkv / fc are split back into their HF modules: a piece adapted by
# its own adapter (q_proj) gets its A and its rows of B; a piece under an adapter over the whole fused layer (ours:
# qkv) gets that adapter's A (the same A for q, k and v) and its rows of B, which is the same product B @ A.
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
HF_MODULE_PREFIX = {"gpt2": "transformer.", "bloom": "transformer."}   # the causal-LM classes' module paths


def _hf_modules(model):
    """{our module name: (weight-map entry, [(HF module path, (row start, row end) in our rows), ...])} for every
    block Linear of the model."""
    pre = HF_MODULE_PREFIX.get(model.cfg.family, "")
    mods = {}
    for entry in weight_map(model.cfg):
        if not entry.ours.endswith(".weight") or not entry.ours.startswith("layers."):
            continue
        rows, off = [], 0
        for name, size in zip(entry.hf, entry.sizes or [None]):
            end = None if size is None else off + size
            rows.append((pre + name[:-len(".weight")], (off, end)))
            off = end or 0
        mods[entry.ours[:-len(".weight")]] = (entry, rows)
    return mods


def _target_names(paths, all_paths):
    """peft target_modules for exactly `paths`: each module's shortest dotted suffix that names none of the other
    block Linears (peft matches a target when the module path equals it or ends with "." + it)."""
    others, names = set(all_paths) - set(paths), set()
    for p in paths:
        parts = p.split(".")
        for k in range(1, len(parts) + 1):
            t = ".".join(parts[-k:])
            if not any(o == t or o.endswith("." + t) for o in others):
                names.add(t)
                break
    return sorted(names)


def peft_state(model):
    """The adapters of a LoRA-wrapped model as peft holds them: ({peft tensor name: tensor}, target_modules, fan_in_
    fan_out). The tensors are fp32 copies on the CPU."""
    mods = _hf_modules(model)
    tensors, paths, fan = {}, [], False
    for name, m in model.named_modules():
        if not isinstance(m, LoRALinear):
            continue
        entry, pieces = mods[name]
        fan = fan or entry.kind == "T"
        A, B = m.lora_A.detach().float().cpu(), m.lora_B.detach().float().cpu()
        adapters, off = [], 0   # (our row start, end, A_i, B_i)
        for i, (s, e) in enumerate(m.rows):
            adapters.append((s, e, A[i * m.rank:(i + 1) * m.rank], B[off:off + e - s]))
            off += e - s
        for path, (ps, pe) in pieces:
            pe = m.base.out_features if pe is None else pe
            for s, e, A_i, B_i in adapters:
                if s <= ps and pe <= e:   # this piece lies under adapter i
                    B_p = B_i[ps - s:pe - s]
                    if entry.kind == "bloom":   # our [q; k; v] rows -> BLOOM's per-head interleaved rows
                        B_p = entry.to_hf(B_p)[0]
                    tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = A_i.clone()   # one copy per module
                    tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = B_p.clone()
                    paths.append(path)
    every = [p for _, pieces in mods.values() for p, _ in pieces]
    return tensors, _target_names(paths, every), fan


def lora_settings(model):
    """(rank, alpha, dropout) of the model's LoRA layers (one setting for all), or None without LoRA."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            return m.rank, m.scale * m.rank, m.dropout.p
    return None


def save_adapter(model, out_dir, base_model=None):
    """<out_dir>/adapter_config.json + adapter_model.safetensors in peft's format (task CAUSAL_LM, scaling =
    lora_alpha / r, no rsLoRA, no bias, no DoRA), loadable by peft.PeftModel.from_pretrained(<transformers base>,
    out_dir). base_model: the base's hub repo id or folder (base_model_name_or_path), or None."""
    from safetensors.torch import save_file
    r, alpha, dropout = lora_settings(model)
    tensors, targets, fan = peft_state(model)
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
           "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets,
           "fan_in_fan_out": fan, "bias": "none", "use_rslora": False, "use_dora": False, "modules_to_save": None,
           "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
           "rank_pattern": {}, "alpha_pattern": {}}
    os.makedirs(out_dir, exist_ok=True)
    outputs.atomic_write(os.path.join(out_dir, ADAPTER_WEIGHTS),
                         lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    outputs.atomic_write(os.path.join(out_dir, ADAPTER_CONFIG), json.dumps(cfg, indent=2) + "\n")


def read_adapter_config(adapter_dir, flag="--init-adapter"):
    """adapter_config.json of a peft LoRA adapter folder, checked for what load_adapter can take; one UserError."""
    f = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(f) or not os.path.isfile(os.path.join(adapter_dir, ADAPTER_WEIGHTS)):
        raise UserError(flag, f"{adapter_dir}: not a peft adapter folder (needs {ADAPTER_CONFIG} and "
                              f"{ADAPTER_WEIGHTS})")
    cfg = cli.read_json(f, "adapter config")
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise UserError(f, "not a LoRA adapter (peft_type must be LORA)")
    for k, ok in (("use_rslora", False), ("use_dora", False), ("bias", "none")):
        if cfg.get(k, ok) != ok:
            raise UserError(f, f"{k} = {cfg.get(k)!r}: only plain LoRA ({k} = {ok!r}) can start a run here")
    for k in ("rank_pattern", "alpha_pattern"):
        if cfg.get(k):
            raise UserError(f, f"{k} is set: only one rank and alpha for every layer can start a run here")
    if not isinstance(cfg.get("r"), int) or cfg["r"] < 1 or not isinstance(cfg.get("lora_alpha"), (int, float)):
        raise UserError(f, "r and lora_alpha must be numbers")
    return cfg


def load_adapter(model, adapter_dir, flag="--init-adapter"):
    """Copy a peft adapter's tensors into the model's LoRALinear layers (the inverse of peft_state); refused, one
    UserError, when the adapter's modules are not exactly the model's LoRA layers or a fused layer's pieces carry
    different A's where ours has one."""
    from safetensors.torch import load_file
    f = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    with cli.reading(f, "adapter weights", "give a folder written by peft or train.py"):
        theirs = load_file(f)
    theirs = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
              for k, v in theirs.items()}
    ours, _, _ = peft_state(model)
    if set(ours) != set(theirs):
        extra, missing = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
        raise UserError(flag, f"{adapter_dir} adapts other modules than --lora-targets here"
                              + (f" (it has {extra[0][len(PEFT_PREFIX):]}" if extra else " (")
                              + (f"{', ' if extra else ''}lacks {missing[0][len(PEFT_PREFIX):]}" if missing else "")
                              + "): give the adapter's target_modules as --lora-targets")
    for k, v in theirs.items():
        if v.shape != ours[k].shape:
            raise UserError(flag, f"{adapter_dir}: {k} is {tuple(v.shape)}, this model's is {tuple(ours[k].shape)}")
    mods = _hf_modules(model)
    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, LoRALinear):
                continue
            entry, pieces = mods[name]
            off = 0
            for i, (s, e) in enumerate(m.rows):
                A_i = None
                for path, (ps, pe) in pieces:
                    pe = m.base.out_features if pe is None else pe
                    if not (s <= ps and pe <= e):
                        continue
                    A_p = theirs[f"{PEFT_PREFIX}{path}.lora_A.weight"]
                    B_p = theirs[f"{PEFT_PREFIX}{path}.lora_B.weight"]
                    if entry.kind == "bloom":
                        B_p = entry.to_ours([B_p])
                    if A_i is not None and not torch.equal(A_i, A_p):
                        raise UserError(flag, f"{adapter_dir}: {path} has its own lora_A where our {name} shares "
                                              "one: give the HF module names (q_proj, ...) as --lora-targets")
                    A_i = A_p
                    m.lora_B[off + ps - s:off + pe - s].copy_(B_p)
                m.lora_A[i * m.rank:(i + 1) * m.rank].copy_(A_i)
                off += e - s
