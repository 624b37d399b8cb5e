"""
Data-parallel training under torchrun: process-group set-up, DDP / FSDP wrapping, the gradient-sync context for
gradient accumulation, the all-reduce helpers, the decision to save or stop that every rank takes alike, the
orderly exit, and FSDP's checkpoint (gathered to and read from the single-process format of checkpoint.py).

With one process (no torchrun) every helper is a no-op, so train.py's loop reads the same either way.
"""
import torch
import torch.distributed as dist

from checkpoint import load_state, save_checkpoint
from model import Decoder


# -- FSDP: parameters, gradients and optimizer state sharded over the processes (torch.distributed.fsdp, FSDP2) ----

def shard(model, amp_dtype):
    """fully_shard each block, then the root (embeddings, final norm, head): a block's full weights exist only while
    it runs. With a bf16/fp16 autocast dtype the all-gathered weights are cast to it and gradients are reduced in
    fp32; the sharded master weights and AdamW state stay fp32. Gradients are averaged over ranks, as with DDP."""
    import warnings
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # the loss (B, T) is a view of the model's flat NLL; it is only ever used out of place (nll * w), which is
    # what FSDP's warning about in-place ops on returned views asks for
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) if amp_dtype else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def _plain_twin(model, opt):
    """An unsharded CPU Decoder and an AdamW over it with the same parameter groups (matched by name): the single-
    process objects whose state.safetensors / model.safetensors an FSDP run writes and reads, so that the checkpoint
    format is the same with and without --fsdp."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
    with torch.device("meta"):
        twin = Decoder(model.cfg)
    twin = twin.to_empty(device="cpu")
    if twin.cfg.tie:
        twin.lm_head.weight = twin.wte.weight
    named = dict(twin.named_parameters())
    twin_opt = torch.optim.AdamW([{**{k: v for k, v in g.items() if k != "params"}, "params": [named[n] for n in ns]}
                                  for g, ns in zip(opt.param_groups, groups)])
    return twin, twin_opt, groups


def fsdp_all_finite(model, device):
    """all_finite over the shards of every rank (collective: every rank gets the same answer)."""
    ok = torch.tensor([float(all(bool(torch.isfinite(p.to_local()).all()) for p in model.parameters()))],
                      device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def fsdp_save_checkpoint(out, model, opt, scaler, step, tok, args_dict, generation_config=None):
    """Collective (every rank calls it): gather the full weights and optimizer state onto rank 0's CPU, which writes
    them in the single-process format (save_checkpoint): state.safetensors + an ordinary HF checkpoint."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=o)
    osd = get_optimizer_state_dict(model, opt, options=o)
    if dist.get_rank() == 0:
        twin, twin_opt, groups = _plain_twin(model, opt)
        twin.load_state_dict(msd)
        ids = {n: i for i, n in enumerate(n for ns in groups for n in ns)}
        twin_opt.load_state_dict({"state": {ids[n]: s for n, s in osd["state"].items()},
                                  "param_groups": [{**g, "params": [ids[n] for n in ns]}
                                                   for g, ns in zip(osd["param_groups"], groups)]})
        save_checkpoint(out, twin, twin_opt, scaler, step, tok, args_dict, generation_config)
    dist.barrier()


def fsdp_load_state(path, model, opt, scaler):
    """Every rank reads the (single-process format) state into a plain twin, then hands each rank its shards."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    twin, twin_opt, groups = _plain_twin(model, opt)
    step, saved = load_state(path, twin, twin_opt, scaler)
    o = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, twin.state_dict(), options=o)
    sd = twin_opt.state_dict()
    order = [n for ns in groups for n in ns]
    set_optimizer_state_dict(model, opt, {"state": {order[i]: s for i, s in sd["state"].items()},
                                          "param_groups": [{**g, "params": ns}
                                                           for g, ns in zip(sd["param_groups"], groups)]}, options=o)
    return step, saved

