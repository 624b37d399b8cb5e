"""What a run leaves on disk, and how it is written: every file atomically (a reader never sees half a file), the
files of one result as one unit (all old or all new: a run killed while moving a unit's files in has the move
finished by the next run into that output, before it reads anything), one run per output under a lock, temporary
files of a killed run cleaned at the next start, and a write failure (a full disk) as one error line naming the file.

    outputs.lock_output(out, "--out")           # before any work: a second run into out is refused
    with outputs.unit(out, last=("manifest.json",)) as tmp:    # written into a hidden folder, then moved in
        outputs.write_jsonl(os.path.join(tmp, "train.jsonl"), rows)
"""
import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import cli
from cli import UserError


# -- one file, written whole or not at all; a failure is one line --------------------------------------------------


class WriteError(UserError):
    """An OSError while writing an output (disk full, quota, read-only, the folder removed): str(e) is one line
    "<file>: <errno text>", e.g. "out/x/model.safetensors: No space left on device". A UserError, so cli.run prints
    it as "error: ..." and exits 2, at any moment of a run (what was written before it is whole: see atomic_write)."""

    @classmethod
    def of(cls, path, e):
        """The WriteError of an OSError (or a Rust library's IO error) met while writing `path`."""
        return cls(path, _os_text(e) or str(e))


def _os_text(e):
    """The errno text of a write failure: OSError's strerror, or the message inside a Rust library's IO error
    (safetensors: 'IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'); None when
    the exception is not a write failure at all."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    m = re.search(r'message: "([^"]*)"', str(e))
    if type(e).__name__ == "SafetensorError" or (type(e) is Exception and m):   # tokenizers raise bare Exceptions
        return m.group(1) if m else str(e)
    return None


def atomic_write(path, content):
    """Write a file atomically: temp file in the same folder, fsync, os.replace. A reader never sees half a file,
    and a crash leaves the old file (if any) intact. content: text (UTF-8), bytes, or a function write(tmp_path)
    that writes the temp file itself (safetensors' save_file, a tokenizer's save). The file gets the permissions of
    any new file (0666 minus the umask), not mkstemp's 0600, so others can read a model on a shared machine.
    Any OSError (a full disk, ...) removes the temp file and raises WriteError naming `path` and the errno text;
    a temp file left by a kill (".<name>.<8 random>.tmp") is removed by clean_stale at the next run's start."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        if callable(content):
            os.close(fd)
            content(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(content.encode("utf-8") if isinstance(content, str) else content)
                fh.flush()
                os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        text = _os_text(e) if isinstance(e, Exception) else None
        if text is not None:
            raise WriteError(path, text) from None
        raise


def sha256(path):
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks): what manifests and eval.json record about their input."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path, obj):
    """Write obj as indented JSON (UTF-8 Arabic kept readable) plus a newline, atomically."""
    atomic_write(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def write_jsonl(path, records):
    """Write records (dicts) as JSON lines, UTF-8 Arabic kept readable (ensure_ascii=False), atomically."""
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# -- several files as one unit, and what a killed run left ---------------------------------------------------------


# Our temporary names: atomic_write's ".<name>.<8 random>.tmp" files and unit()'s ".<name>.<8 random>.tmp" folders
# (tempfile's random part is 8 characters of [a-z0-9_]). Nothing else is ever removed by clean_stale.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


def clean_stale(folder, names):
    """Remove the temporary files and folders a killed save left in `folder` (a 7B optimizer state is ~84 GB each):
    only our own pattern, and only the temps of `names` (the files this script writes there; "unit" for unit()'s
    folders), so that another run's live temp for another output in the same folder is never touched. Call it only
    while holding the output's lock (lock_output). Returns the names removed."""
    import shutil
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for n in sorted(entries):
        m = _TEMP_NAME.match(n)
        if not m or m.group("name") not in names:
            continue
        f = os.path.join(folder, n)
        with contextlib.suppress(OSError):
            if os.path.isdir(f) and not os.path.islink(f):
                _finish_moves(folder, f)   # a unit killed while moving in: completed, so it is all new
                shutil.rmtree(f)
            else:
                os.unlink(f)
            removed.append(n)
    return removed


@contextlib.contextmanager
def unit(folder, last=()):
    """Write several files of `folder` as one unit: yields a fresh hidden temp folder inside `folder`
    (".unit.<8 random>.tmp"); write every file there (atomic_write, save_pretrained, ...). On success each file is
    moved into `folder` by os.replace, the names in `last` (the ones readers check the others against: a manifest,
    eval.json) after the rest; on any failure nothing is moved and the old files stay whole. Either way the temp
    folder is removed. The folder is (re)created if missing (e.g. deleted during a run). A WriteError names the file
    by its final path."""
    import shutil
    folder = Path(folder)
    tmp = moving = None
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(dir=folder, prefix=".unit.", suffix=".tmp")
        except OSError as e:
            raise WriteError.of(folder, e) from None
        try:
            yield tmp
        except WriteError as e:   # name the file where the user will look for it, not the temp folder
            if e.where.startswith(tmp):
                raise WriteError(folder / os.path.relpath(e.where, tmp), e.what) from None
            raise
        names = sorted(os.listdir(tmp), key=lambda n: n in last)
        # Every file is whole in tmp now. The intent is written before the first move: a kill between two moves
        # leaves a mix of old and new files, which the next run into this output completes (clean_stale ->
        # _finish_moves) before it reads anything, so the unit ends all new.
        atomic_write(os.path.join(tmp, MOVES), lambda p: Path(p).write_text(json.dumps(names), encoding="utf-8"))
        for n in names:
            try:
                _replace(os.path.join(tmp, n), folder / n, tmp)
            except OSError as e:
                moving = tmp   # kept: the next run into this output finishes these moves (clean_stale)
                raise WriteError.of(folder / n, e) from None
    finally:
        if tmp is not None and tmp != moving:
            shutil.rmtree(tmp, ignore_errors=True)


MOVES = ".moves.json"   # inside a unit's temp folder: the order its files are moved in, once all are written


def _finish_moves(folder, tmp):
    """A unit temp folder left by a killed run: if its files were all written (MOVES exists), move in the ones not
    moved yet, in the recorded order (the checked file last), so the unit is all new; otherwise nothing is moved (the
    old files were never touched) and the caller removes it."""
    try:
        names = json.loads(Path(tmp, MOVES).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    for n in names:
        src = os.path.join(tmp, n)
        if isinstance(n, str) and os.path.basename(n) == n and os.path.lexists(src):
            _replace(src, os.path.join(folder, n), tmp)


def _replace(src, dst, tmp):
    """os.replace, and for a folder of a unit (train.py's adapter/) over an existing folder: the old one is first
    moved into the unit's temp folder `tmp` (removed with it), since a folder cannot replace a non-empty one."""
    if os.path.isdir(src) and not os.path.islink(src) and os.path.isdir(dst) and not os.path.islink(dst):
        os.replace(dst, os.path.join(tmp, ".old." + os.path.basename(dst)))
    os.replace(src, dst)


# -- whose files: a script replaces only what it wrote -------------------------------------------------------------


def json_object(path):
    """The JSON object in path, or None (missing, unreadable, not JSON, not an object)."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


EVAL_FILES = ("eval.json", "predictions.jsonl")   # evaluate.py's pair (also written into a train.py run folder)


def is_eval_run(out):
    """Whether `out` holds evaluate.py's output, recognised by its own keys: its eval.json, or (the eval.json lost)
    a predictions.jsonl whose first row is one of evaluate.py's."""
    ev = json_object(os.path.join(out, "eval.json"))
    if ev is not None:
        return {"setting", "model", "generation", "bertscore", "scores"} <= set(ev)
    if os.path.lexists(os.path.join(out, "eval.json")):
        return False
    try:
        with open(os.path.join(out, "predictions.jsonl"), encoding="utf-8") as f:
            row = json.loads(f.readline())
        return isinstance(row, dict) and {"index", "question", "reference", "prediction", "f1"} <= set(row)
    except (OSError, ValueError):
        return False


def refuse_foreign(out, flag, names, ours_if, tool):
    """A folder's files belong to the tool that wrote them: one UserError, before any work and with nothing
    changed, when `out` holds files of `names` (the ones `tool` would replace or remove) but `ours_if(out)` does
    not recognise the folder as `tool`'s own output (a classifier, a downloaded model, the user's data)."""
    present = [n for n in names if os.path.lexists(os.path.join(out, n))]
    if present and not ours_if(out):
        raise UserError(flag, f"{out} holds {', '.join(present)} not written by {tool} (the folder is no {tool} "
                              f"output: another tool's, or a downloaded model's); {tool} would replace them: give "
                              f"another {flag}, or move them away")


# -- one run per output --------------------------------------------------------------------------------------------


_HELD = {}   # lock file -> (open file, folders created for it (removed when empty), (folder, its stat, mtime after))


def lock_output(path, flag, folder=True):
    """Take the lock of an output (a folder: "<path>/.lock"; a file: "<path>.lock") for the rest of the process:
    fcntl.flock, so the kernel releases it when the process dies and a leftover lock file of a killed run is simply
    taken over. Another live process holding it -> UserError "<flag>: <path> is in use by process <pid> (...)"
    (exit 2, before any work). The lock file records the holder's pid for that message, and is removed at exit
    (with the folder itself when this call created it and nothing else was written there). Idempotent."""
    import atexit
    import fcntl
    path = os.path.abspath(path)
    lock = os.path.join(path, ".lock") if folder else path + ".lock"
    if lock in _HELD:
        return lock
    created, before = None, None
    home = path if folder else os.path.dirname(path)
    if os.path.isdir(home):
        before = os.stat(home)
    else:   # the folders made here, leaf first: removed again at release when still empty
        created, up = [], home
        while not os.path.exists(up):
            created.append(up)
            up = os.path.dirname(up)
        try:
            os.makedirs(home, exist_ok=True)
        except OSError as e:
            raise WriteError.of(home, e) from None
    while True:
        try:
            fh = open(lock, "a+", encoding="utf-8")
        except OSError as e:
            raise WriteError.of(lock, e) from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            pid = fh.read().strip() or "?"
            fh.close()
            raise UserError(flag, f"{path} is in use by process {pid} (another run writes there: wait for it to "
                                  f"end, or give another {flag})") from None
        try:   # the holder before us may have removed the file between our open and our flock: lock the new one
            if os.stat(lock).st_ino == os.fstat(fh.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        fh.close()
    try:   # the pid is only for another run's message: a full disk must not keep this run from holding the lock
        os.ftruncate(fh.fileno(), 0)
        os.pwrite(fh.fileno(), f"{os.getpid()}\n".encode(), 0)   # unbuffered: nothing left to fail at close
    except OSError:
        pass
    # the folder's times as they were, and its mtime now: a run that ends without writing there puts them back
    times = (home, before, os.stat(home).st_mtime_ns) if before is not None else None
    _HELD[lock] = (fh, created, times)
    if len(_HELD) == 1:
        atexit.register(release_outputs)
        cli.at_end(release_outputs)   # and when cli.run ends: in-process callers (tests) run again
    return lock


def release_outputs():
    """Release every lock taken by lock_output (cli.run does it when the script ends; also at exit)."""
    for lock, (fh, created, times) in list(_HELD.items()):
        with contextlib.suppress(OSError):
            untouched = times is not None and os.stat(times[0]).st_mtime_ns == times[2]
            os.unlink(lock)   # while still holding it: a newcomer that opened the old file re-checks the inode
            for d in created or ():
                os.rmdir(d)   # only when empty: a run that failed before writing leaves nothing behind
            if untouched:   # nothing else was written there: the lock leaves no trace, not even in the times
                os.utime(times[0], ns=(times[1].st_atime_ns, times[1].st_mtime_ns))
        fh.close()
    _HELD.clear()
