"""
--report-to {none,tensorboard,wandb} (train.py, classify.py): the run's scalars also go to TensorBoard event files
(<out>/tensorboard/) or to Weights & Biases (the run's args as its config). Neither library is a runtime
requirement (requirements.txt lists tensorboard only as the tests' reader): each is imported only when asked for,
and check() turns a missing one into one line, before any work.
"""
import math
import os

import cli

CHOICES = ("none", "tensorboard", "wandb")
HELP = ("also send the logged scalars to tensorboard (event files in <out>/tensorboard/: tensorboard --logdir <out>) "
        "or wandb (the run's args as its config; project from WANDB_PROJECT, default 'severity-aware'); each is imported "
        "only when asked for (pip install tensorboard / wandb); none = the JSONL log only")
TB_DIR = "tensorboard"
INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb (then wandb login)"}


def check(kind, flag="--report-to"):
    """Import the library `kind` asks for (nothing for none); a missing one is one UserError."""
    if kind == "none":
        return None
    try:
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter   # needs the tensorboard package
            return SummaryWriter
        import wandb
        return wandb
    except ImportError:
        raise cli.UserError(flag, f"{kind} is not installed: {INSTALL[kind]}, or leave out {flag}") from None


def scalars(rec):
    """The finite numbers of a log record, its step left out (bools too)."""
    return {k: float(v) for k, v in rec.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


class Tracker:
    """log(step, rec) sends a log record's scalars; close() at the end. kind none: does nothing."""

    def __init__(self, kind, out, config, resume_step=None, name=None):
        self.kind, self.writer, self.run = kind, None, None
        lib = check(kind)
        if kind == "tensorboard":
            # purge_step: on --resume, events past the resumed step (written before the kill) are dropped
            self.writer = lib(log_dir=os.path.join(out, TB_DIR), purge_step=resume_step)
        elif kind == "wandb":
            try:   # not logged in, no network: one line, not wandb's traceback
                self.run = lib.init(project=os.environ.get("WANDB_PROJECT", "severity-aware"), name=name or
                                    os.path.basename(os.path.normpath(out)), config=config, dir=out,
                                    resume="allow" if resume_step else None)
            except Exception as e:
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise cli.UserError("--report-to", f"wandb.init failed: {why} (wandb login, or WANDB_MODE=offline)") \
                    from None

    def log(self, step, rec):
        vals = scalars(rec)
        if self.writer is not None:
            for k, v in vals.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        elif self.run is not None:
            self.run.log(vals, step=step)

    def close(self):
        if self.writer is not None:
            self.writer.close()
        elif self.run is not None:
            self.run.finish()
