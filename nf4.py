"""
NF4: 4-bit NormalFloat base weights (QLoRA, Dettmers et al. 2023), in plain PyTorch (torch only).

`quantize_nf4(model)` turns every Linear inside the blocks into a frozen NF4Linear; hub.load_decoder does the same
tensor by tensor while reading (quantize="nf4"), so the full-precision model never exists in memory.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

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

    quantized = True   # how model.py counts its weights (num_params, flops_per_token) without importing this file

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
        replace_module(model, name, NF4Linear.from_linear)
    return model


def replace_module(model, name, make):
    """Put make(old module) in place of the submodule called `name` (e.g. "layers.0.attn.qkv")."""
    parent, child = name.rsplit(".", 1)
    mod = model.get_submodule(parent)
    setattr(mod, child, make(getattr(mod, child)))


