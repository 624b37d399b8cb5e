"""
What a training run leaves in --out, and how it resumes.

  state.safetensors     every tensor of the run (model, AdamW, RNG) in one file; its metadata holds step, param
                        groups, GradScaler and args (save_state / read_state_meta / load_state)
  model.safetensors ... the HF export: config.json, tokenizer, generation_config.json, args.json (save_checkpoint,
                        written as one unit, the resume state last)
  README.md, adapter/   the model card (card.py) and, with LoRA, the adapters in peft's format (lora.save_adapter),
                        in the same unit
  train_log.jsonl/.png  the log (read_log_lines on resume) and its picture (plot_log)

check_resume refuses a resume that would change the experiment (RESUME_KEYS); remove_earlier_run clears what an
earlier run left before a new one starts.
"""
import contextlib
import json
import os
import shutil

import torch

import cli
import data
import outputs
import card as model_card
from hub import hub_repo, local_folder, read_generation_config
from lora import merge_lora, save_adapter


def plot_log(log_path, png_path, title=None):
    """<out>/train_log.png from train_log.jsonl: training loss and eval loss (overall and per severity) against steps,
    and the learning rate below; title: the run's model and weights (default: plot_title of the args.json beside
    the log, once the run's first checkpoint wrote it). Written atomically, with matplotlib's Agg canvas (no display, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    with open(log_path, encoding="utf-8") as f:
        recs = [json.loads(ln) for ln in f if ln.strip()]
    train_recs = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval_loss" in r]
    args_file = os.path.join(os.path.dirname(log_path), "args.json")
    if title is None and os.path.isfile(args_file):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            with open(args_file, encoding="utf-8") as f:
                title = plot_title(json.load(f))
    fig = Figure(figsize=(8, 6), dpi=100, layout="constrained")
    ax, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    if title:
        fig.suptitle(title, fontsize=10)
    ax.plot([r["step"] for r in train_recs], [r["loss"] for r in train_recs], lw=0.8, color="0.6", label="train (weighted)")
    for key, style in [("eval_loss", dict(color="k", lw=2, label="eval, all"))] + [
            (f"eval_loss_{s}", dict(lw=1.2, ls="--", label=f"eval, {s}")) for s in data.SEVERITIES]:
        pts = [(r["step"], r[key]) for r in evals if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, **style)
    ax.set_ylabel("loss (nats / answer token)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax_lr.plot([r["step"] for r in train_recs], [r["lr"] for r in train_recs], color="tab:blue")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)
    canvas = FigureCanvasAgg(fig)
    outputs.atomic_write(png_path, lambda tmp: canvas.print_png(tmp))
    return fig



# -- checkpoint: one safetensors file holds every tensor (model, optimizer, RNG); its metadata holds the rest --------

def save_state(path, model, opt, scaler, step, args_dict):
    from safetensors.torch import save_file
    t = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    sd = opt.state_dict()
    for pid, st in sd["state"].items():
        for k, v in st.items():
            t[f"opt.{pid}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    t["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        t["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"step": step, "param_groups": sd["param_groups"], "args": args_dict,
            "scaler": scaler.state_dict() if scaler.is_enabled() else None}
    seen, uniq = {}, {}
    for k, v in t.items():   # tied weights share storage; safetensors refuses aliases, so store one copy
        key = (v.data_ptr(), v.shape) if v.numel() else (k,)
        if key in seen:
            meta.setdefault("aliases", {})[k] = seen[key]
        else:
            seen[key], uniq[k] = k, v
    outputs.atomic_write(path, lambda p: save_file(uniq, p, metadata={"meta": json.dumps(meta)}))


# What a resume must not change: the data order, the loss, the optimizer and the schedule depend on these. The number
# of steps (--max-steps / --epochs) may grow; --eval-*, --save-*, --device, --quiet and --compile do not alter the run.
RESUME_KEYS = ("model", "weights_abc", "data_sha256", "loss_tokens", "loss_norm", "seed", "batch_size", "grad_accum", "world_size",
               "max_len", "schedule", "warmup", "lr", "weight_decay", "grad_clip", "lora_rank", "lora_alpha",
               "lora_dropout", "lora_targets", "dtype", "quantize", "question_col", "answer_col", "preprocess",
               "severity_source")
STATE_HINT = "delete it to start over, or resume from a copy that is intact"


def read_state_meta(path):
    """The metadata of a resume state (step, args, ...), or ONE UserError naming the file when it is corrupt."""
    from safetensors import safe_open
    with cli.reading(path, "resume state", STATE_HINT):
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = (f.metadata() or {}).get("meta")
    try:
        meta = json.loads(meta)
        if not isinstance(meta.get("step"), int) or not isinstance(meta.get("args"), dict):
            raise ValueError("no step or args")
    except (TypeError, ValueError, AttributeError):
        raise cli.UserError(path, f"not a resume state written by train.py (metadata unreadable); {STATE_HINT}") from None
    return meta


def check_resume(path, meta, args_dict):
    """Refuse a resume that would change the experiment (see RESUME_KEYS)."""
    saved = meta["args"]
    for k in RESUME_KEYS:
        if k not in saved:   # a state from an older train.py that did not record this setting
            continue
        a, b = saved[k], args_dict[k]
        if k == "lora_targets" and isinstance(a, str):   # older states kept the flag's text
            a = [t.strip() for t in a.split(",") if t.strip()]
        if k == "dtype" and a == "auto":                   # older states kept the flag, not what it resolved to
            continue
        if isinstance(a, list):
            a = tuple(a)
        if isinstance(b, list):
            b = tuple(b)
        if a != b:
            flag = {"weights_abc": "--weights", "data_sha256": "--data (its content)",
                    "world_size": "the number of processes"}.get(k, "--" + k.replace("_", "-"))
            raise cli.UserError("--resume", f"{flag} is {b} but the run saved in {path} used {a}: a resume must not "
                                             f"change the experiment; use another --out for a new run")


def load_state(path, model, opt, scaler):
    from safetensors import safe_open
    meta = read_state_meta(path)
    with cli.reading(path, "resume state", STATE_HINT):
        with safe_open(path, framework="pt", device="cpu") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
    for k, src in meta.get("aliases", {}).items():
        t[k] = t[src]
    try:
        model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        state = {}
        for k, v in t.items():
            if k.startswith("opt."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        torch.set_rng_state(t["rng.cpu"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise cli.UserError(path, f"does not fit this model and optimizer ({str(e).splitlines()[0][:200]}); "
                                   f"{STATE_HINT}") from None
    if "rng.cuda" in t and torch.cuda.is_available():
        torch.cuda.set_rng_state(t["rng.cuda"])
    if meta["scaler"] and scaler.is_enabled():
        scaler.load_state_dict(meta["scaler"])
    return meta["step"], meta["args"]


def base_generation_config(model_name):
    """The text of the base model's generation_config.json (its sampling settings, e.g. Qwen3's top_k/top_p), or
    None when it has none (tiny, a folder without one). hub.resolve's download already fetches it."""
    if model_name == "tiny" and not local_folder(model_name):
        return None
    from hub import resolve
    f = os.path.join(resolve(model_name), "generation_config.json")
    if not os.path.isfile(f):
        return None
    read_generation_config(f)   # copied as it is into every checkpoint: refuse a broken one before any work
    with open(f, encoding="utf-8-sig") as fh:
        return fh.read()


def save_checkpoint(out, raw_model, opt, scaler, step, tok, args_dict, generation_config=None, card=None):
    """<out>/state.safetensors (resume) and <out>/model.safetensors + config.json + tokenizer (LoRA merged), plus the
    base model's generation_config.json when it has one (text), so the fine-tuned folder samples as its base does,
    and args.json; with LoRA also the adapters alone in peft's format in <out>/adapter/ (lora.save_adapter); card:
    the text of <out>/README.md (card.render), or None. Written as one unit (outputs.unit): every file into a hidden
    temp folder first, then moved in, the resume state last; a failure (a full disk: outputs.WriteError) leaves the previous checkpoint whole. <out> is
    recreated if it was deleted during the run."""
    with outputs.unit(out, last=("state.safetensors",)) as tmp:
        save_state(os.path.join(tmp, "state.safetensors"), raw_model, opt, scaler, step, args_dict)
        if any("lora_" in n for n, _ in raw_model.named_parameters()):
            import copy
            export = merge_lora(copy.deepcopy(raw_model))
            model_arg = args_dict["model"]
            save_adapter(raw_model, os.path.join(tmp, ADAPTER_DIR),
                         base_model=os.path.abspath(model_arg) if os.path.isdir(model_arg) else hub_repo(model_arg))
        else:
            export = raw_model
        export.save_pretrained(tmp)
        tok.save(tmp)
        if generation_config is not None:
            outputs.atomic_write(os.path.join(tmp, "generation_config.json"), generation_config)
        outputs.write_json(os.path.join(tmp, "args.json"), args_dict)
        if card is not None:
            outputs.atomic_write(os.path.join(tmp, CARD), card)


# What a new run (no --resume) removes from its --out at the start: every file an earlier train.py or evaluate.py
# run wrote there (only when the folder is such a run: claim_out refuses files of these names that another tool
# wrote, e.g. a classifier's model.safetensors and config.json). Kept, they would describe another model (evaluate --table would report the old scores under the
# new run). Nothing else in the folder is touched.
EARLIER_RUN_FILES = ("model.safetensors", "state.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                     "special_tokens_map.json", "args.json", "train_log.jsonl", "train_log.png", "eval.json",
                     "predictions.jsonl", "README.md", "adapter", "tensorboard")
ADAPTER_DIR, CARD = "adapter", "README.md"   # <out>/adapter/ (peft's files, LoRA runs), <out>/README.md (model card)
TB_FILES = "events.out.tfevents."            # what <out>/tensorboard/ holds (tracking.py)


def is_train_run(out):
    """Whether `out` holds a train.py run, recognised by its own files: an args.json with train.py's keys, a
    state.safetensors whose metadata train.py wrote, or (a run killed before its first checkpoint) only a
    train_log.jsonl of train.py's records."""
    a = outputs.json_object(os.path.join(out, "args.json"))
    if a is not None and {"weights_abc", "data_sha256", "model"} <= set(a):
        return True
    state = os.path.join(out, "state.safetensors")
    if os.path.isfile(state):
        try:
            read_state_meta(state)
            return True
        except cli.UserError:
            pass
    log = os.path.join(out, "train_log.jsonl")
    if os.path.isfile(log) and not any(os.path.lexists(os.path.join(out, n)) for n in
                                       ("model.safetensors", "config.json", "args.json", "state.safetensors")):
        try:
            with open(log, encoding="utf-8", errors="replace") as f:
                first = f.readline()
            return not first.strip() or "step" in json.loads(first)
        except (OSError, ValueError, TypeError):
            return False
    return False


def refuse_foreign_train(out):
    """train.py without --resume: the folder's EARLIER_RUN_FILES must be an earlier train.py run's (and an
    evaluate.py eval.json + predictions.jsonl), else nothing is touched and the run is refused. Only what
    remove_earlier_run would remove counts: a README.md that is not our card, and the adapter/ and tensorboard/
    folders (removed only when they hold our own files alone), are left as they are, so they are no conflict."""
    card = os.path.join(out, CARD)
    kept = {ADAPTER_DIR, "tensorboard"} | ({CARD} if os.path.exists(card) and not model_card.is_ours(card) else set())
    train_files = tuple(n for n in EARLIER_RUN_FILES if n not in outputs.EVAL_FILES and n not in kept)
    outputs.refuse_foreign(out, "--out", train_files, is_train_run, "train.py")
    outputs.refuse_foreign(out, "--out", outputs.EVAL_FILES, outputs.is_eval_run, "evaluate.py")


def remove_earlier_run(out):
    """Remove EARLIER_RUN_FILES from out; returns the names removed (said on stderr by the caller)."""
    gone = []
    for name in EARLIER_RUN_FILES:
        f = os.path.join(out, name)
        if name == CARD and not model_card.is_ours(f):   # a README.md of the user's is never touched
            continue
        if name in (ADAPTER_DIR, "tensorboard") and os.path.isdir(f) and not os.path.islink(f):
            if ours_only(f, name):   # our adapter / event files alone; a folder holding anything else stays
                try:
                    shutil.rmtree(f)
                except OSError as e:
                    raise outputs.WriteError(f, f"cannot remove this folder of an earlier run: "
                                                f"{e.strerror or e}") from None
                gone.append(name + "/")
            continue
        if os.path.isfile(f) or os.path.islink(f):
            try:
                os.remove(f)
            except OSError as e:
                raise outputs.WriteError(f, f"cannot remove this file of an earlier run: {e.strerror or e}") from None
            gone.append(name)
    return gone


def ours_only(folder, name):
    """True when folder holds only what train.py writes there: peft's two adapter files, or TensorBoard events."""
    from lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    try:
        files = os.listdir(folder)
    except OSError:
        return False
    if name == ADAPTER_DIR:
        return set(files) <= {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    return all(f.startswith(TB_FILES) for f in files)


def plot_title(args_dict):
    """train_log.png's title: the run's model, its weights a,b,c and how w is drawn (and LoRA when it applies)."""
    a, b, c = args_dict["weights_abc"]
    src = "label one-hot" if args_dict.get("severity_source") == "label" else "soft p"
    lora = f" | LoRA r {args_dict['lora_rank']}" if args_dict.get("lora_rank") else ""
    return f"{args_dict['model']} | weights a,b,c = {a:g},{b:g},{c:g} ({args_dict.get('weights')}, {src}){lora}"


def try_plot(log_path, png_path):
    """plot_log, whose failure (the folder deleted, a full disk) is a note: it never stops a run or costs a save."""
    try:
        plot_log(log_path, png_path)
    except (OSError, ValueError) as e:   # outputs.WriteError is a ValueError; json's errors too
        cli.notice(f"note: {png_path} not written: {e.strerror if isinstance(e, OSError) else e}")


def all_finite(model):
    """True when every trainable parameter is finite (what a checkpoint must hold; frozen ones cannot change).
    One device sync."""
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters() if p.requires_grad]).all())


def read_log_lines(log_path, step):
    """Lines of train_log.jsonl up to `step`, for a resume. A line cut off by a kill (the last one) is dropped."""
    kept, dropped = [], 0
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for ln in f:
            try:
                rec = json.loads(ln)
                if not isinstance(rec, dict):
                    raise ValueError
            except ValueError:
                dropped += 1
                continue
            if rec.get("step", 0) <= step:
                kept.append(ln if ln.endswith("\n") else ln + "\n")
    return kept, dropped



def claim_out(out, model_name, resume=False):
    """Check --out and take it for this run: refused when it is the --model folder (its weights would be
    overwritten), and without --resume when it holds files of the same names that train.py did not write
    (refuse_foreign_train). Rank 0 locks it (one run per --out; under torchrun for every rank) and removes the temp
    files of a killed save, safe once the lock is held."""
    cli.output_dir(out, "--out")
    if os.path.isdir(model_name) and os.path.isdir(out) and os.path.samefile(model_name, out):
        raise cli.UserError("--out", f"{out} is the --model folder: its weights would be overwritten (give another "
                                      "--out)")
    if os.environ.get("RANK", "0") == "0":   # one run per --out; under torchrun rank 0 holds it for every rank
        outputs.lock_output(out, "--out")
        # temp files of a killed save: safe to remove now that we hold the lock
        stale = outputs.clean_stale(out, ("unit",) + EARLIER_RUN_FILES)
        if stale:
            cli.notice(f"note: {out}: removed {len(stale)} temporary file(s) left by an interrupted save")
    if not resume and os.path.isdir(out):
        refuse_foreign_train(out)


def open_log(out, resume, step, log):
    """<out>/train_log.jsonl opened for appending, <out> created. --resume: the lines past the resumed `step` are
    dropped (and a line cut off by a kill, said through log); a new run first removes the files of an earlier run
    (EARLIER_RUN_FILES, named on stderr). args.json is written with each checkpoint (save_checkpoint): never beside
    a folder without a model. Returns (path, file)."""
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, "train_log.jsonl")
    if resume and os.path.isfile(log_path):   # drop log lines past the resumed step (and a line cut by a kill)
        kept, dropped = read_log_lines(log_path, step)
        if dropped:
            log(f"note: {log_path}: dropped {dropped} unreadable line(s) (cut off when the run was killed)")
        outputs.atomic_write(log_path, "".join(kept))
    elif not resume:
        gone = remove_earlier_run(out)
        if gone:
            cli.notice(f"note: --out {out}: a new run (no --resume): removed the earlier run's {', '.join(gone)}")
    try:
        logf = open(log_path, "a", encoding="utf-8")
    except OSError as e:
        raise outputs.WriteError.of(log_path, e) from None
    return log_path, logf


def append_log(logf, log_path, rec):
    """One record as one line of train_log.jsonl, flushed."""
    try:
        logf.write(json.dumps(rec) + "\n")
        logf.flush()
    except OSError as e:   # a full disk: one line, exit 2; the last checkpoint stays whole
        raise outputs.WriteError.of(log_path, e) from None


def reopen_log(out, log_path, logf):
    """--out deleted during the run: recreated, with the log written back from the handle still open on the deleted
    file. Returns the file to append to from now on (logf itself when nothing was deleted)."""
    if os.path.isfile(log_path):
        return logf
    cli.notice(f"note: {out} was deleted during the run: recreating it")
    try:
        os.makedirs(out, exist_ok=True)
        with contextlib.suppress(OSError):   # Linux: the deleted file is still readable through our handle
            shutil.copyfile(f"/proc/self/fd/{logf.fileno()}", log_path)
        logf.close()
        return open(log_path, "a", encoding="utf-8")
    except OSError as e:
        raise outputs.WriteError.of(log_path, e) from None
