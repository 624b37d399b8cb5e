"""The command-line contract every script shares (train, classify, annotate, evaluate, bench, data/prepare.py).

A user's mistake (a bad flag, a bad or unreadable input file, an unusable output path, an unavailable device, a bad
record) prints ONE line "error: <where>: <what is wrong and what to do>" on stderr and exits 2, before anything is
written. Anything else is a bug and keeps its traceback. The console never stops the work (a closed pipe, a full
device, any encoding), and Ctrl-C is one "interrupted:" line and exit 130 at any moment. Every script has the shape

    import cli                                 # first, and light: guards Ctrl-C and the console while torch imports
    cli.start(__name__)
    ...
    def main(argv=None):
        return cli.run(_main, argv)            # DataError / UserError -> one line, exit 2

    def _main(argv=None):
        args = get_args(argv)                  # cli.ArgumentParser, type=cli.number(...) on every numeric flag
        cli.input_file(...); cli.output_dir(...); cli.resolve_device(...)    # every path, before any work
        with cli.for_flag("--model"):          # loaders name the file; for_flag adds the flag that named it
            ...                                # library reads go through cli.reading() / cli.read_json()

What a run writes, and how (atomically, as one unit, under a lock), is outputs.py.
"""
import argparse
import contextlib
import json
import math
import os
import stat
import sys
import tempfile
from pathlib import Path


# -- errors: a user's mistake is one line, exit 2 ------------------------------------------------------------------


class UserError(ValueError):
    """A user's mistake outside a data record. str(e) is one line: "<where>: <what>"."""

    def __init__(self, where, what):
        self.where, self.what = str(where), one_line(what)
        super().__init__(f"{self.where}: {self.what}" if self.where else self.what)


class DataError(ValueError):
    """A bad input file. str(e) is one line: "<file>:<line>: <field>: <problem>"."""

    def __init__(self, path, line, field, problem):
        problem = " ".join(str(problem).splitlines())  # always ONE line
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        super().__init__(f"{path}:{line}: {field}: {problem}")


# Control characters a name read from a file may hold (a tensor name, a column, a label): C0 (but tab and newline,
# which one_line turns into spaces), DEL, C1, and the bidi embeddings, overrides and isolates that reorder what
# follows. Shown escaped, as repr shows them, so that "\x1b[2K\rok: done" cannot erase or fake a line.
_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7f, *range(0x80, 0xa0)] if chr(c) not in "\t\n"}
_ESCAPES.update({0x0d: "\\r", 0x1b: "\\x1b"})
_ESCAPES.update({c: f"\\u{c:04x}" for c in [*range(0x202a, 0x202f), *range(0x2066, 0x206a)]})


def one_line(msg):
    """msg as ONE printable line: control characters escaped (\\x1b, \\r, \\u202e), newlines and runs of blanks
    made one space. Every error, warning and note line goes through it."""
    return " ".join(str(msg).translate(_ESCAPES).split())


def die(msg):
    """Print "error: <msg>" as one line on stderr and exit 2."""
    print(f"error: {one_line(msg)}", file=sys.stderr)
    sys.exit(2)


def notice(msg):
    """Print a warning or note ("warning: ...", "note: ...") as one line on stderr, names from files escaped."""
    print(one_line(msg), file=sys.stderr, flush=True)


# -- the run: console, signals, exit codes -------------------------------------------------------------------------


class _Console:
    """sys.stdout / sys.stderr of a script: a console that went away (a reader like `head -1` that closed the pipe, a
    closed terminal, /dev/full) never stops the work. The first failed write points the file descriptor at /dev/null,
    so that this and every later write and flush, Python's own at exit included (exit 120 otherwise), succeed and
    are dropped; progress and notes are lost, the run goes on and saves."""

    def __init__(self, stream):
        self._stream = stream

    def _drop(self):
        with contextlib.suppress(OSError, ValueError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)

    def write(self, s):
        try:
            return self._stream.write(s)
        except OSError:   # BrokenPipeError, ENOSPC, EIO (a hung-up terminal): drop it, carry on
            self._drop()
            return len(s)

    def flush(self):
        try:
            self._stream.flush()
        except OSError:
            self._drop()
            with contextlib.suppress(OSError):
                self._stream.flush()   # the buffered rest, now to /dev/null

    def __getattr__(self, name):   # isatty, fileno, encoding, buffer, ... as the real stream has them
        return getattr(self._stream, name)


def _interrupted_while_starting(sig, frame):
    sys.stderr.write("interrupted: stopped while starting; nothing was written\n")
    sys.stderr.flush()
    os._exit(130)


def start(name):
    """Called at the very top of every script, before its heavy imports (torch takes a second or more):

    - Ctrl-C from here until cli.run begins is one line "interrupted: ..." and exit 130, not a KeyboardInterrupt
      traceback from inside torch's import;
    - stdout and stderr never raise on encoding (an ASCII or cp1252 console shows Arabic as \\u0627...; files are
      always written UTF-8) and never kill the run when they go away (see _Console);
    - matplotlib gets a writable cache folder when HOME is not writable (else it warns at import, and a user error
      is three lines instead of one).

    Does nothing when the script is imported as a module (name != "__main__"), e.g. by tests or by bench.py."""
    if name != "__main__":
        return
    import signal
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_while_starting)
    console()
    # an MPLCONFIGDIR that is set but unwritable (a read-only or unwritable HOME's copy, a file) warns the same two
    # lines as an unwritable HOME: both get the temp folder
    mpl = os.environ.get("MPLCONFIGDIR")
    if not (_creatable(mpl) if mpl else all(_creatable(d) for d in _matplotlib_folders())):
        import atexit
        import shutil
        os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="matplotlib-")
        atexit.register(shutil.rmtree, os.environ["MPLCONFIGDIR"], True)


def _matplotlib_folders():
    """Where matplotlib keeps its config and its font cache when MPLCONFIGDIR is not set (XDG, as on Linux)."""
    home = os.path.expanduser("~")
    return [os.path.join(os.environ.get(var) or os.path.join(home, default), "matplotlib")
            for var, default in (("XDG_CONFIG_HOME", ".config"), ("XDG_CACHE_HOME", ".cache"))]


def _creatable(folder):
    """Whether `folder` is a writable folder or could be made: its nearest existing ancestor is a writable folder."""
    while not os.path.lexists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    return os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)


def console():
    """Make the process's own stdout and stderr safe (see start); a stream someone else replaced (a test's capture)
    is left alone. Idempotent."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and stream is getattr(sys, f"__{name}__"):
            with contextlib.suppress(AttributeError, ValueError, OSError):
                stream.reconfigure(errors="backslashreplace")
            setattr(sys, name, _Console(stream))


def run(main, argv=None):
    """Run a script's main(argv) under the contract: DataError / UserError -> one line, exit 2; Ctrl-C -> one
    line, exit 130 (a script with its own Ctrl-C handling, train.py and annotate.py, catches it first)."""
    import signal
    console()
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:   # start-up is over: Ctrl-C is
        signal.signal(signal.SIGINT, signal.default_int_handler)          # KeyboardInterrupt again, handled below
    try:
        return main(argv)
    except (DataError, UserError) as e:
        die(e)
    except KeyboardInterrupt:   # Ctrl-C is the user's choice, not a bug: one line, no traceback, 128 + SIGINT
        # the newline only after a terminal's "^C"; in a log the line stays the one line
        print(("\n" if sys.stderr.isatty() else "") + "interrupted: stopped before the end (every output file is "
              "written whole or not at all)", file=sys.stderr)
        sys.exit(130)
    finally:
        for fn in _AT_END:   # e.g. outputs.release_outputs: the output locks of this run
            fn()


_AT_END = []   # what run() calls when the script's main ends, however it ends (at_end)


def at_end(fn):
    """Call fn() whenever run() ends (a library's clean-up, e.g. outputs' locks), once per run, in order given.
    Registering the same function again changes nothing. Keeps this module free of imports of its users."""
    if fn not in _AT_END:
        _AT_END.append(fn)


def progress(total, desc, unit, quiet=False, initial=0):
    """The one progress display of every script: a tqdm bar on stderr with rate and ETA, silent when stderr is not a
    terminal (tqdm's disable=None) or with --quiet. Use as a context manager or close() it."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=True if quiet else None)


# -- flags ---------------------------------------------------------------------------------------------------------


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help of every script: the description and epilog keep their layout (docstrings), and a flag's help ends
    with "(default: X)" only where there is a default to show (not None, not an off switch) and its help text does
    not already say it."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if (d is None or d is False or d is argparse.SUPPRESS or not action.option_strings or "default" in h.lower()
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return h
        return h + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the contract: a usage error is ONE line on stderr (no usage dump), exit 2, with a "did you
    mean" for a mistyped flag. --help: one description (an epilog that repeats it is cut to the rest), defaults
    shown where there is one (HelpFormatter)."""

    def __init__(self, *a, **kw):
        kw["formatter_class"] = HelpFormatter
        desc, epi = kw.get("description"), kw.get("epilog")
        if desc and epi and epi.strip().startswith(desc.strip()):   # a docstring given whole as the epilog
            kw["epilog"] = epi.strip()[len(desc.strip()):].strip("\n") or None
        super().__init__(*a, **kw)

    def error(self, message):
        die(message + self._did_you_mean(message))

    def _did_you_mean(self, message):
        """' (did you mean --max-len?)' for an unrecognized flag close to a known one (difflib), else ''."""
        import difflib
        if not message.startswith("unrecognized arguments: "):
            return ""
        known = [o for a in self._actions for o in a.option_strings if a.help is not argparse.SUPPRESS]
        for word in message.split(": ", 1)[1].split():
            flag = word.split("=", 1)[0]
            if flag.startswith("--"):
                close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
                if close:
                    return f" (did you mean {close[0]}?)"
        return ""

    def alias(self, old, new):
        """Keep an old spelling of a flag working, hidden from --help: `old` parses exactly as the flag `new` (same
        dest, type, choices). The project's one vocabulary is in docs/contract.md; old names live one release."""
        target = next(a for a in self._actions if new in a.option_strings)
        kw = dict(dest=target.dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS)
        if isinstance(target, argparse._StoreTrueAction):
            return self.add_argument(old, action="store_true", **kw)
        return self.add_argument(old, type=target.type, choices=target.choices, nargs=target.nargs,
                                 metavar=target.metavar, **kw)

    def given(self, argv=None):
        """The dests of the flags given on the command line itself (a default or a recipe's default is not given):
        parsed again over a namespace that already holds a marker for every dest, so argparse fills in no default."""
        unset = object()
        ns, _ = self.parse_known_args(argv, argparse.Namespace(**{a.dest: unset for a in self._actions}))
        return {k for k, v in vars(ns).items() if v is not unset}

    def refuse_unused(self, argv, unused, why):
        """One line, exit 2, for the first flag of `unused` (dests) that was given although `why` (a mode) ignores it."""
        given = self.given(argv) & set(unused)
        hit = [a for a in self._actions if a.dest in given]
        if hit:
            raise UserError(hit[0].option_strings[0], f"is ignored {why}")


def warmup(s):
    """An argparse type for --warmup (train.py and classify.py): N steps ("100") or a share of the run's optimizer
    steps ("10%"). Returns the int, or the normalised percentage text; warmup_steps turns either into steps."""
    text = s.strip()
    if text.endswith("%"):
        try:
            v = float(text[:-1])
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is neither a number of steps nor a percentage like 10%") from None
        if not (math.isfinite(v) and 0 <= v <= 100):
            raise argparse.ArgumentTypeError(f"{s} must be between 0% and 100% of the steps")
        return f"{v:g}%"
    return number(int, lo=0)(text)


def warmup_steps(value, total):
    """--warmup as steps of a run of `total` optimizer steps: N as given, P% as round(P/100 * total)."""
    if isinstance(value, str):
        return int(round(float(value[:-1]) / 100 * total))
    return value


def _range_text(lo, hi, lo_open, hi_open):
    # integers exactly: "4294967296 must be <= 4.29497e+09" reads as if the value were allowed
    fmt = lambda v: str(v) if isinstance(v, int) else f"{v:g}"   # noqa: E731
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {fmt(lo)}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {fmt(hi)}")
    return " and ".join(parts)


INT64_MAX = 2 ** 63 - 1


FLOAT32_MAX = 3.4028234663852886e38


def number(kind=float, lo=None, hi=None, lo_open=False, hi_open=False):
    """An argparse type: a finite number of `kind` (float or int) in [lo, hi] (open ends with lo_open/hi_open).
    Example: p.add_argument("--lr", type=cli.number(float, lo=0)) refuses -1, nan, inf and 1e999."""
    def parse(s):
        try:
            v = kind(s)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{s!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
        if kind is float and abs(v) > FLOAT32_MAX:   # torch computes in float32: such a value overflows there
            raise argparse.ArgumentTypeError(f"{s} is too large (the limit is {FLOAT32_MAX:g}, the largest float32)")
        if kind is int and abs(v) > INT64_MAX:   # no count, size or seed here needs more; torch would overflow
            raise argparse.ArgumentTypeError(f"{s[:30]}{'...' if len(s) > 30 else ''} is too large (the limit is 2**63 - 1)")
        if ((lo is not None and (v < lo or (lo_open and v == lo)))
                or (hi is not None and (v > hi or (hi_open and v == hi)))):
            raise argparse.ArgumentTypeError(f"{s} must be {_range_text(lo, hi, lo_open, hi_open)}")
        return v
    parse.__name__ = kind.__name__   # argparse names the type in its messages
    return parse


# -- paths, checked before any work --------------------------------------------------------------------------------


def utf8_path(path, flag):
    """Refuse a path whose bytes are not UTF-8 (a Latin-1 file name reaches Python as lone surrogates): every script
    records its paths in JSON (args.json, eval.json, manifests), which cannot hold it, and failed after writing.
    Also refused, before any work: a non-ASCII name under a locale whose encoding cannot spell it (LC_ALL=C with
    PYTHONUTF8=0: the name reaches Python as surrogate escapes, which the JSON outputs and the Rust libraries,
    safetensors and tokenizers, cannot encode; the run ended in a traceback with half-written folders)."""
    try:
        text = os.fsencode(str(path)).decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(flag, f"{os.fsencode(str(path))!r}: the path is not UTF-8: rename it") from None
    if text != str(path):
        raise UserError(flag, f"{text}: the locale's encoding ({sys.getfilesystemencoding()}) cannot spell this "
                              f"name: run under a UTF-8 locale (LC_ALL=C.UTF-8, or PYTHONUTF8=1), or use an ASCII "
                              f"name")


def argv_text(value, flag):
    """A text flag that is no path (a row label): under a locale that cannot spell it (LC_ALL=C, PYTHONUTF8=0) it
    arrives as surrogate escapes of its UTF-8 bytes; decoded back, so that eval.json records it as it was typed."""
    if value is None:
        return None
    try:
        return os.fsencode(value).decode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        raise UserError(flag, f"{value.encode('utf-8', 'backslashreplace').decode()}: not UTF-8 text") from None


def input_file(path, flag):
    """Refuse (UserError) an input path that does not exist, is not a file or cannot be read."""
    utf8_path(path, flag)
    if not os.path.exists(path):
        if os.path.islink(path):   # "no such file" would send the user looking for a file that is listed right there
            raise UserError(flag, f"{path}: a broken symbolic link or a link loop (to {os.readlink(path)})")
        raise UserError(flag, f"{path}: no such file")
    if not os.path.isfile(path):
        raise UserError(flag, f"{path}: is a directory, not a file" if os.path.isdir(path)
                        else f"{path}: not a regular file (a FIFO, device or socket): give a file")
    if not os.access(path, os.R_OK):
        raise UserError(flag, f"{path}: not readable (check its permissions)")
    return path


def regular_file(path, record=True):
    """Refuse a path that exists but is not a regular file: reading a FIFO waits for a writer for ever, a device never
    ends (/dev/zero) or is not data. Checked with stat (links followed) before anything opens it. record: a data file
    (DataError, as the record readers raise), else a model's file (UserError, which cli.for_flag prefixes with the
    flag)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return path   # missing or unreadable: the open that follows says so
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        what = "not a regular file (a FIFO, device or socket): give a file"
        raise DataError(path, 1, "file", what) if record else UserError(path, what)
    return path


def output_dir(path, flag, inputs=()):
    """Refuse (UserError) an output folder that could not be created or written: an existing file, a parent that
    is a file, a folder without write permission, or one of the `inputs` folders (a model folder the run reads
    would be overwritten). Creates nothing."""
    if not str(path).strip():
        raise UserError(flag, "empty path")
    utf8_path(path, flag)
    p = Path(path).absolute()
    # os.path's tests, not Path's: these say False (not raise) for a name the file system cannot hold
    if os.path.islink(p) and not os.path.exists(p):
        raise UserError(flag, f"{path}: a broken symbolic link (to {os.readlink(p)})")
    if os.path.exists(p):
        if not os.path.isdir(p):
            raise UserError(flag, f"{path}: exists and is not a folder")
        if not os.access(p, os.W_OK | os.X_OK) or not _can_create_in(p):
            raise UserError(flag, f"{path}: folder is not writable")
        same = next((i for i in inputs if i and os.path.isdir(i) and os.path.samefile(p, i)), None)
        if same is not None:
            raise UserError(flag, f"{path} is the input folder {same}: its files would be overwritten (give another "
                                  "output folder)")
        return path
    parent = p.parent
    while not os.path.exists(parent):
        if os.path.islink(parent):   # a broken link on the way: makedirs would fail on it
            raise UserError(flag, f"{path}: cannot create it, {parent} is a broken symbolic link")
        parent = parent.parent
    if not os.path.isdir(parent):
        raise UserError(flag, f"{path}: cannot create it, {parent} is a file")
    _check_names(p.relative_to(parent).parts, parent, path, flag)
    if not os.access(parent, os.W_OK | os.X_OK) or not _can_create_in(parent):
        raise UserError(flag, f"{path}: cannot create it, {parent} is not writable")
    return path


def _check_names(names, folder, path, flag, extra=0):
    """Refuse a file or folder name longer than the file system allows (255 bytes on most), counting `extra`
    bytes for the temporary name an atomic write uses beside it."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for n in names:
        if len(os.fsencode(n)) + extra > limit:
            raise UserError(flag, f"{path}: the name {n[:40]}... is too long ({len(os.fsencode(n))} bytes; this "
                                  f"file system allows {limit - extra})")


def _can_create_in(folder):
    """Whether a folder can really be created inside `folder`: os.access is not enough (root passes it everywhere,
    and /proc, /sys or a read-only bind mount refuse what it allows). Probes with a hidden folder made and removed
    at once, then puts the folder's times back, so that nothing visible changes."""
    try:
        st = os.stat(folder)
        probe = tempfile.mkdtemp(dir=folder, prefix=".probe-")
    except OSError:
        return False
    os.rmdir(probe)
    with contextlib.suppress(OSError):   # not the owner: the times may stay changed; harmless
        os.utime(folder, ns=(st.st_atime_ns, st.st_mtime_ns))
    return True


def output_file(path, flag, inputs=()):
    """Refuse (UserError) an output file path that could not be written atomically (folder not creatable or
    writable, the path is a folder, a device or FIFO, a broken link) or that is one of the `inputs` (the run would
    replace what it reads). Creates nothing."""
    if not str(path).strip():
        raise UserError(flag, "empty path")
    utf8_path(path, flag)
    if os.path.isdir(path):
        raise UserError(flag, f"{path}: is a folder, expected a file path")
    if os.path.islink(path) and not os.path.exists(path):
        raise UserError(flag, f"{path}: a broken symbolic link (to {os.readlink(path)})")
    if os.path.exists(path) and not os.path.isfile(path):   # os.replace would put a plain file in place of /dev/null
        raise UserError(flag, f"{path}: exists and is not a regular file (a device, FIFO or socket): give a file path")
    same = next((i for i in inputs if i and os.path.isfile(path) and os.path.isfile(i) and os.path.samefile(path, i)), None)
    if same is not None:
        raise UserError(flag, f"{path} is the input file {same}: give another output path")
    folder = os.path.dirname(os.path.abspath(path))
    output_dir(folder, flag)
    # atomic_write's temporary file is ".<name>.<8 random>.tmp" beside it: 14 bytes more than the name
    _check_names([os.path.basename(path)], folder if os.path.isdir(folder) else "/", path, flag, extra=14)
    return path


def resolve_device(name, flag="--device"):
    """'auto' -> cuda if available else cpu; anything else must be a device torch knows and this machine has."""
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(flag, f"{name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(flag, f"{name}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(flag, f"{name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(flag, f"{name}: MPS is not available on this machine (use --device cpu)")
    elif dev.type not in ("cpu", "mps"):
        raise UserError(flag, f"{name!r}: unsupported device type (use auto, cpu, cuda or cuda:N)")
    return dev


# -- reading what the user gave: library errors become one line naming the file ------------------------------------


class JSONProblem(ValueError):
    """Raised inside the decoder's hooks: a JSON value no record may hold (the field is named when known)."""

    def __init__(self, field, problem):
        self.field, self.problem = field, problem
        super().__init__(problem)


def _pairs(pairs):
    """object_pairs_hook: refuse a key given twice (json would keep the last one silently, so a record could
    change severity unseen)."""
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise JSONProblem(k, "key given twice in one record")
        obj[k] = v
    return obj


def _constant(name):
    raise JSONProblem("json", f"{name} is not a number (JSON has no NaN or Infinity)")


def _int(s):
    # integers too long for a float (or for int(), which refuses > 4300 digits) become inf, which every
    # numeric check then refuses as out of range; short ones stay exact ints
    return int(s) if len(s) <= 18 else float(s)


STRICT_JSON = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_constant, parse_int=_int)


@contextlib.contextmanager
def reading(path, what="file", hint=""):
    """The boundary around a library call that reads a file the user gave (json, safetensors, tokenizers, open):
    the library's own errors become ONE UserError naming the file, with `hint` (what to do) appended.
    Anything else (a bug) passes through with its traceback.

        with cli.reading(cfg_file, "config"):
            cfg = json.load(open(cfg_file))"""
    hint = f"; {hint}" if hint else ""
    try:
        yield
    except (UserError, DataError):
        raise
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}", f"{what} is not valid JSON ({e.msg}){hint}") from None
    except JSONProblem as e:
        raise UserError(path, f"{what}: {e.field}: {e.problem}{hint}") from None
    except UnicodeDecodeError:
        raise UserError(path, f"{what} is not UTF-8 text{hint}") from None
    except RecursionError:
        raise UserError(path, f"{what} is nested too deeply{hint}") from None
    except OSError as e:
        raise UserError(path, f"cannot read {what}: {e.strerror or e}{hint}") from None
    except Exception as e:   # noqa: BLE001 - only the two kinds below; anything else is re-raised
        if type(e).__name__ == "SafetensorError":        # safetensors: truncated, corrupt, not safetensors at all
            raise UserError(path, f"not a valid safetensors file ({e}){hint}") from None
        if type(e) is Exception:                        # the tokenizers library raises bare Exceptions
            raise UserError(path, f"cannot read {what} ({e}){hint}") from None
        raise


def read_json(path, what="JSON file", hint=""):
    """A JSON file the user gave (config.json, args.json, eval.json, ...): the parsed value, or ONE UserError
    naming the file (missing, unreadable, not UTF-8, not JSON, a key given twice, nested too deeply)."""
    with reading(path, what, hint):
        if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):   # a FIFO would block open
            raise UserError(path, f"{what} is not a regular file (a FIFO, device or socket)")
        with open(path, "rb") as fh:
            return STRICT_JSON.decode(fh.read().decode("utf-8-sig"))


@contextlib.contextmanager
def for_flag(flag):
    """Prefix the flag to a UserError raised inside (a loader that knows the file but not which flag named it):
    "error: --model: out/x/config.json: not valid JSON ...". """
    try:
        yield
    except UserError as e:
        if e.where.startswith("--"):   # already names a flag
            raise
        raise UserError(f"{flag}: {e.where}" if e.where else flag, e.what) from None
