"""
Data-parallel training under torchrun: process-group set-up, DDP / FSDP wrapping, the gradient-sync context for
gradient accumulation, the all-reduce helpers, the decision to save or stop that every rank takes alike, the
orderly exit, and FSDP's checkpoint (gathered to and read from the single-process format of checkpoint.py).

With one process (no torchrun) every helper is a no-op, so train.py's loop reads the same either way.
"""
import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist

import outputs
from checkpoint import load_state, save_checkpoint
from model import Decoder


def active():
    """True when this process is one of several under torchrun (the process group is up)."""
    return dist.is_available() and dist.is_initialized()


def init(device_flag):
    """Join torchrun's process group when launched with WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU) and choose this
    process's device: --device as given, or auto = cuda:LOCAL_RANK (one GPU per process) when CUDA is there, else
    cpu. Returns (rank, world, device); (0, 1, device) for a single process."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() and device_flag != "cpu" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)
    if device_flag == "auto":
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    else:
        device = device_flag
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    return rank, world, device


def sharded(model):
    """True when shard() has split the model over the processes (--fsdp)."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def wrap(model, device):
    """DDP around the (compiled) model when there are several processes and FSDP does not already shard it: its
    backward averages the gradients over ranks. One process: the model as it is."""
    if not active() or sharded(getattr(model, "_orig_mod", model)):
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()]
                                                     if device.startswith("cuda") else None)


def grad_sync(model, raw_model, sync):
    """The context for one micro-batch's backward under gradient accumulation: gradients are reduced over the ranks
    only when sync (the step's last micro-batch); before that each rank accumulates its own. DDP: no_sync();
    FSDP: set_requires_gradient_sync, set here before the backward. One process: nothing to do."""
    if sharded(raw_model):   # FSDP's no_sync: reduce-scatter the gradients on the last micro-batch only
        raw_model.set_requires_gradient_sync(sync)
        return nullcontext()
    if sync or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return nullcontext()
    return model.no_sync()


def all_reduce_sum(*tensors):
    """Sum each tensor over the ranks, in place (the step's loss-token and example counts, its loss sums)."""
    if active():
        for t in tensors:
            dist.all_reduce(t)


def agree(due, sig, device):
    """The save/stop decision every rank takes alike: rank 0's clock for saving (an FSDP save is collective), any
    rank's signal for stopping (so that no rank waits in an all-reduce for one that has left). The MAX all-reduce
    of (rank 0's due, each rank's signal). Returns (due, sig)."""
    if not active():
        return due, sig
    flags = torch.tensor([float(bool(due) and dist.get_rank() == 0), float(sig or 0)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0].item()), (int(flags[1].item()) or None)


def leave(code):
    """All ranks leave together: gloo torn down by a rank that is done while rank 0 still saves the checkpoint
    aborts the process (SIGABRT, "terminate called without an active exception"; 1 run in 15 under load).
    Then a torchrun worker ends at once, its output flushed and every file already written and closed: the
    interpreter's own teardown, which destroys DDP's reducer and the gloo objects it holds in no set order, still
    aborted about 1 run in 60 under load. One process: sys.exit(code) when code is not 0."""
    if active():
        dist.barrier()
        dist.destroy_process_group()
        outputs.release_outputs()   # os._exit skips atexit: remove rank 0's lock file here
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


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


def fsdp_save_checkpoint(out, model, opt, scaler, step, tok, args_dict, generation_config=None, card=None):
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
        save_checkpoint(out, twin, twin_opt, scaler, step, tok, args_dict, generation_config, card=card)
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

