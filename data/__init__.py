"""The data contract: reading, validating and writing question-answer records, and the prompt template.

One canonical record is

    {"question": str, "answer": str, "severity": str, "p_nc": float, "p_n": float, "p_c": float}

where severity is one of SEVERITIES and (p_nc, p_n, p_c) is the severity classifier's softmax over
(non-critical, neutral, critical). Files may be .jsonl, .json (a list of objects), .csv or .tsv/.tab.
Every validation problem raises DataError whose text is ONE line, "<file>:<line>: <field>: <problem>",
so a script can print it as "error: " + str(e) and exit 2.

Example:
    import data
    recs = data.load_records("data/sample/train.jsonl")
    text = data.format_prompt(recs[0]["question"]) + recs[0]["answer"]   # + EOS token when training
"""
import argparse
import contextlib
import csv
import hashlib
import io
import json
import math
import os
import re
import stat
import sys
import tempfile
from pathlib import Path

SEVERITIES = ("non-critical", "neutral", "critical")  # index order = p_nc, p_n, p_c
PROB_FIELDS = ("p_nc", "p_n", "p_c")                  # same order as SEVERITIES
PROMPT_CUE = "الاجابة:"                               # "the answer:", as in the authors' notebooks
SUM_TOL = 1e-3                                        # probabilities must sum to 1 within this
# The most UTF-8 bytes one text field may hold. A real question or answer is a few hundred bytes (MAQA's longest
# answer is ~20 kB); a field past this is a broken export (a whole file pasted into one cell) and would be tokenised
# whole (a 45 MB field took 43 s and 5.3 GB) before anything else could refuse it.
MAX_FIELD_BYTES = 1 << 20


class DataError(ValueError):
    """A bad input file. str(e) is one line: "<file>:<line>: <field>: <problem>"."""

    def __init__(self, path, line, field, problem):
        problem = " ".join(str(problem).splitlines())  # always ONE line
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        super().__init__(f"{path}:{line}: {field}: {problem}")


def _key(name):
    """Normalise a column name for alias lookup: trim, lower-case, one space between words."""
    return " ".join(str(name).split()).lower()


# Column aliases -> canonical field. Keys are compared after _key(), so "Question" == "question".
# The Arabic names are the probability columns of the authors' annotated files.
FIELD_ALIASES = {
    "question": "question", "answer": "answer", "severity": "severity",
    "p_nc": "p_nc", "غير حرج": "p_nc",   # "not critical"
    "p_n": "p_n", "متوسط": "p_n",        # "medium"
    "p_c": "p_c", "حرج": "p_c",          # "critical"
}
LABEL_FIELD_ALIASES = {"text": "text", "question": "text", "label": "label", "severity": "label"}

# Severity label aliases (compared after _key() and "_" -> "-"). "moderate"/"mild"/"severe" are the
# names used by the sibling curriculum-learning paper's keyword rules.
SEVERITY_ALIASES = {
    "non-critical": "non-critical", "noncritical": "non-critical", "non critical": "non-critical",
    "mild": "non-critical", "غير حرج": "non-critical",
    "neutral": "neutral", "moderate": "neutral", "متوسط": "neutral",
    "critical": "critical", "severe": "critical", "حرج": "critical",
}


def canonical_severity(label):
    """Canonical severity name for a label or alias (any case), or None if it is not one."""
    if not isinstance(label, str):
        return None
    return SEVERITY_ALIASES.get(_key(label).replace("_", "-"))


# ----------------------------------------------------------------------------------------------
# Reading raw rows

def regular_file(path):
    """Refuse (DataError) a path that exists but is not a regular file: reading a FIFO waits for a writer for ever,
    a device never ends (/dev/zero) or is not data. Checked with stat (links followed) before anything opens it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return path   # missing or unreadable: the open that follows says so
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise DataError(path, 1, "file", "not a regular file (a FIFO, device or socket): give a file")
    return path


def _decode(path):
    """Read a file as UTF-8 text (a leading BOM is dropped). Bad bytes -> DataError at their line."""
    regular_file(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:   # missing, a folder, no permission: the file is the problem, say so in one line
        raise DataError(path, 1, "file", e.strerror or str(e)) from None
    if not raw.strip():
        raise DataError(path, 1, "file", "empty file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        bad = raw[e.start:e.start + 1].hex()
        # Best effort: name the field that holds the bad bytes by parsing with them escaped.
        field = "text"
        try:
            rows = _parse(path, raw.decode("utf-8-sig", errors="surrogateescape"))
            for _, row in rows:
                hit = [k for k, v in row.items() if _has_surrogate(k) or _has_surrogate(v)]
                if hit:
                    field = hit[0] if not _has_surrogate(hit[0]) else "column name"
                    break
        except (DataError, ValueError):
            pass
        raise DataError(path, line, field, f"bytes are not valid UTF-8 (0x{bad})") from None


def _has_surrogate(v):
    return isinstance(v, str) and any("\udc80" <= ch <= "\udcff" for ch in v)


class _JSONProblem(ValueError):
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
            raise _JSONProblem(k, "key given twice in one record")
        obj[k] = v
    return obj


def _constant(name):
    raise _JSONProblem("json", f"{name} is not a number (JSON has no NaN or Infinity)")


def _int(s):
    # integers too long for a float (or for int(), which refuses > 4300 digits) become inf, which every
    # numeric check then refuses as out of range; short ones stay exact ints
    return int(s) if len(s) <= 18 else float(s)


STRICT_JSON = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_constant, parse_int=_int)


def _strict(path, line, decode, whole_file=False):
    """Run decode() (a JSON parse of text starting at `line`) and turn every way it can fail into a DataError
    naming the line: for a syntax error the decoder's own line (already counted in the whole file when
    whole_file, else counted from `line`), for anything else `line`."""
    try:
        return decode()
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno if whole_file else line + e.lineno - 1, "json", e.msg) from None
    except _JSONProblem as e:
        raise DataError(path, line, e.field, e.problem) from None
    except RecursionError:
        raise DataError(path, line, "json", "nested too deeply (a record is one flat object)") from None


def _json_items(path, text):
    """Items of a JSON list as (line where the item starts, item), keeping line numbers."""
    dec = STRICT_JSON
    i, n, line, last = 0, len(text), 1, 0
    ws = " \t\r\n"

    def skip(i):
        while i < n and text[i] in ws:
            i += 1
        return i

    def lineno(i):  # incremental newline count: O(file size) overall
        nonlocal line, last
        line += text.count("\n", last, i)
        last = i
        return line

    i = skip(i)
    if i >= n or text[i] != "[":
        raise DataError(path, lineno(i), "file", "a .json file must hold a list of objects")
    i = skip(i + 1)
    items = []
    if i < n and text[i] == "]":
        return items
    while True:
        start = lineno(i)
        obj, end = _strict(path, start, lambda: dec.raw_decode(text, i), whole_file=True)
        items.append((start, obj))
        i = skip(end)
        if i < n and text[i] == ",":
            i = skip(i + 1)
        elif i < n and text[i] == "]":
            break
        else:
            raise DataError(path, lineno(i), "json", "expected ',' or ']' between list items")
    if skip(i + 1) < n:
        raise DataError(path, lineno(skip(i + 1)), "json", "extra data after the list")
    return items


TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".tab")   # .tab is what Harvard Dataverse serves


def _suffix(path):
    """The file's (lower-case) extension, refused unless a record reader reads it: checked before decoding, so that
    an .xlsx is not reported as bytes that are not UTF-8."""
    suffix = Path(path).suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(path, 1, "file", f"unsupported file type '{suffix}' (use .jsonl, .json, .csv or .tsv"
                                         + ("; data/prepare.py reads .xlsx" if suffix == ".xlsx" else "") + ")")
    return suffix


def _parse(path, text):
    """Parse decoded text into [(line, row dict)] according to the file's extension."""
    suffix = _suffix(path)
    rows = []
    if suffix == ".jsonl":
        # split on "\n" only: str.splitlines() would also split at U+2028 etc., which JSON allows
        # unescaped inside strings (and json.dumps(ensure_ascii=False) writes them raw)
        for lineno, ln in enumerate(text.split("\n"), 1):
            if not ln.strip():
                continue  # blank lines are allowed
            obj = _strict(path, lineno, lambda: STRICT_JSON.decode(ln))
            if not isinstance(obj, dict):
                raise DataError(path, lineno, "row", "expected a JSON object")
            rows.append((lineno, obj))
    elif suffix == ".json":
        for lineno, obj in _json_items(path, text):
            if not isinstance(obj, dict):
                raise DataError(path, lineno, "row", "expected a JSON object")
            rows.append((lineno, obj))
    else:   # .csv, .tsv, .tab
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="," if suffix == ".csv" else "\t")
        header, start = None, 1
        try:
            for row in reader:
                # reader.line_num is the physical line where this row ENDS (quoted fields may span
                # lines); `start` is where it began, which is the line we report.
                if not row or not any(c.strip() for c in row):
                    pass  # blank line
                elif header is None:
                    header = [c.strip() for c in row]
                    twice = [c for i, c in enumerate(header) if c in header[:i]]
                    if twice:   # dict(zip(...)) would keep the last one silently
                        raise DataError(path, start, twice[0], "column given twice in the header")
                elif len(row) != len(header):
                    raise DataError(path, start, "row", f"{len(row)} values but the header has {len(header)} columns")
                else:
                    rows.append((start, dict(zip(header, row))))
                start = reader.line_num + 1
        except csv.Error as e:
            raise DataError(path, start, "csv", str(e)) from None
    if not rows:
        raise DataError(path, 1, "file", "no records (empty file)")
    return rows


def read_rows(path):
    """Raw rows of a .jsonl / .json / .csv / .tsv file as [(line number, row dict)], 1-based lines.

    For CSV the header is line 1 and a row's number is the physical line where it starts.
    UTF-8 is enforced (DataError names the line with the bad bytes); an empty file is a DataError.
    """
    _suffix(path)
    return _parse(path, _decode(path))


# ----------------------------------------------------------------------------------------------
# Validation

def _canonical_fields(path, line, row, aliases):
    """Map a row's keys through `aliases` -> {canonical: (column as written, value)}."""
    out = {}
    for k, v in row.items():
        canon = aliases.get(_key(k))
        if canon is None:
            continue  # unknown columns are ignored
        if canon in out:
            raise DataError(path, line, canon, f"given twice (as '{out[canon][0]}' and '{k}')")
        out[canon] = (k, v)
    return out


def _col(col, canon):
    """How to name a column in a message: as written, plus the canonical name for Arabic aliases."""
    return col if _key(col) == canon else f"{col} ({canon})"


def _text(path, line, f, canon):
    if canon not in f:
        raise DataError(path, line, canon, "missing field")
    col, v = f[canon]
    if not isinstance(v, str):
        raise DataError(path, line, _col(col, canon), f"expected text, got {type(v).__name__}")
    if not v.strip():
        raise DataError(path, line, _col(col, canon), "empty")
    check_field_size(path, line, _col(col, canon), v)
    bad = next((ch for ch in v if "\ud800" <= ch <= "\udfff"), None)
    if bad is not None:   # a lone surrogate (JSON "\ud800"): not a character, cannot be encoded or tokenized
        raise DataError(path, line, _col(col, canon), f"lone surrogate \\u{ord(bad):04x} is not valid Unicode text")
    return v.strip()


def check_field_size(path, line, field, v):
    """DataError when text v is longer than MAX_FIELD_BYTES in UTF-8: before any tokenizer sees it."""
    size = len(v.encode("utf-8", "surrogatepass")) if len(v) > MAX_FIELD_BYTES // 4 else 0   # <= 4 bytes a char
    if size > MAX_FIELD_BYTES:
        raise DataError(path, line, field, f"{size} bytes of text; the limit is {MAX_FIELD_BYTES} bytes per field "
                                           "(a broken export?)")


def _blank(v):
    return v is None or (isinstance(v, str) and not v.strip())


def _probs(path, line, f):
    """(p_nc, p_n, p_c) from a row, None when none of the three is given; validated."""
    given = {c: f[c] for c in PROB_FIELDS if c in f and not _blank(f[c][1])}  # a blank cell = not given
    if not given:
        return None
    ps = []
    for c in PROB_FIELDS:
        if c not in given:
            raise DataError(path, line, c, "missing field" if c not in f else "empty value")
        col, v = given[c]
        name = _col(col, c)
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise DataError(path, line, name, f"not a number ({v!r})")
        try:
            p = float(v)
        except (ValueError, OverflowError):
            raise DataError(path, line, name, f"not a number ({str(v)[:40]!r})") from None
        if not math.isfinite(p):
            raise DataError(path, line, name, f"not a finite number ({str(v)[:40]})")
        if not (0.0 <= p <= 1.0):
            raise DataError(path, line, name, f"probability {str(v)[:40]} is outside [0, 1]")
        ps.append(p)
    s = math.fsum(ps)
    if abs(s - 1.0) > SUM_TOL:
        raise DataError(path, line, "p_nc+p_n+p_c", f"probabilities sum to {s:.4f}, not 1 (tolerance {SUM_TOL})")
    return tuple(ps)


def parse_record(path, line, row, require_probs=True, require_severity=True):
    """Validate one raw row -> canonical dict (question, answer, then severity fields when present).

    require_probs: probabilities must be given; otherwise a given severity gets one-hot probabilities.
    require_severity: severity or probabilities must be given; if False, rows may be plain Q/A.
    Severity missing but probabilities given -> severity = argmax (first maximum, SEVERITIES order,
    like torch.argmax). Both given -> the given label is kept even if it is not the argmax (ties).
    """
    f = _canonical_fields(path, line, row, FIELD_ALIASES)
    rec = {"question": _text(path, line, f, "question"), "answer": _text(path, line, f, "answer")}
    probs = _probs(path, line, f)
    sev = None
    if "severity" in f and not _blank(f["severity"][1]):  # a blank cell = not given
        col, v = f["severity"]
        sev = canonical_severity(v)
        if sev is None:
            raise DataError(path, line, _col(col, "severity"),
                            f"unknown severity label {v!r} (expected one of {', '.join(SEVERITIES)})")
    if probs is None:
        if require_probs:
            raise DataError(path, line, "p_nc", "missing field (probabilities p_nc, p_n, p_c are required; "
                                                "annotate.py adds them)")
        if sev is not None:
            probs = tuple(1.0 if s == sev else 0.0 for s in SEVERITIES)  # one-hot from the label
        elif require_severity:
            raise DataError(path, line, "severity", "missing field (give severity or p_nc, p_n, p_c)")
    if probs is not None:
        if sev is None:
            sev = SEVERITIES[max(range(3), key=lambda i: (probs[i], -i))]
        rec["severity"] = sev
        rec.update(zip(PROB_FIELDS, probs))
    elif sev is not None:
        rec["severity"] = sev
    return rec


PROGRESS_MIN = 10000   # records: a smaller file is read in about a second, a bar would only flicker


def _shown(path, rows):
    """Yield rows, with a progress bar on a terminal's stderr while a large file (PROGRESS_MIN rows or more) is
    validated: 200,000 records take tens of seconds to read and tokenise."""
    if len(rows) < PROGRESS_MIN:
        yield from rows
        return
    with progress(len(rows), f"reading {Path(path).name}", "rec") as bar:
        for i, row in enumerate(rows, 1):
            yield row
            if i % 1000 == 0 or i == len(rows):
                bar.update(i - bar.n)


def load_records(path, require_probs=True):
    """Canonical, validated records {question, answer, severity, p_nc, p_n, p_c} from a file.

    require_probs=False accepts rows that have a severity label but no probabilities and gives
    them one-hot probabilities (useful for hand-labelled data; the loss then sees hard weights).
    """
    return [parse_record(path, ln, row, require_probs=require_probs) for ln, row in _shown(path, read_rows(path))]


def load_qa(path):
    """Validated question/answer records for annotation: {question, answer} plus any severity
    fields the file already has (validated the same way). Used by annotate.py on prepare.py output."""
    return [parse_record(path, ln, row, require_probs=False, require_severity=False)
            for ln, row in _shown(path, read_rows(path))]


def load_labels(path):
    """Labelled texts for the severity classifier: [{"text": str, "label": str}] with canonical labels.
    Accepts text/question and label/severity columns (any case) and the severity label aliases."""
    out = []
    for ln, row in _shown(path, read_rows(path)):
        f = _canonical_fields(path, ln, row, LABEL_FIELD_ALIASES)
        text = _text(path, ln, f, "text")
        if "label" not in f:
            raise DataError(path, ln, "label", "missing field")
        col, v = f["label"]
        label = canonical_severity(v)
        if label is None:
            raise DataError(path, ln, _col(col, "label"),
                            f"unknown severity label {v!r} (expected one of {', '.join(SEVERITIES)})")
        out.append({"text": text, "label": label})
    return out


def severity_probs(record):
    """(p_nc, p_n, p_c) of a canonical record, in SEVERITIES order."""
    return tuple(float(record[k]) for k in PROB_FIELDS)


# ----------------------------------------------------------------------------------------------
# Writing

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
    tmp = None
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(dir=folder, prefix=".unit.", suffix=".tmp")
        except OSError as e:
            raise WriteError(folder, e.strerror or str(e)) from None
        try:
            yield tmp
        except WriteError as e:   # name the file where the user will look for it, not the temp folder
            if e.where.startswith(tmp):
                raise WriteError(folder / os.path.relpath(e.where, tmp), e.what) from None
            raise
        names = sorted(os.listdir(tmp), key=lambda n: n in last)
        for n in names:
            try:
                os.replace(os.path.join(tmp, n), folder / n)
            except OSError as e:
                raise WriteError(folder / n, e.strerror or str(e)) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


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
            raise WriteError(home, e.strerror or str(e)) from None
    while True:
        try:
            fh = open(lock, "a+", encoding="utf-8")
        except OSError as e:
            raise WriteError(lock, e.strerror or str(e)) from None
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
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    # the folder's times as they were, and its mtime now: a run that ends without writing there puts them back
    times = (home, before, os.stat(home).st_mtime_ns) if before is not None else None
    _HELD[lock] = (fh, created, times)
    if len(_HELD) == 1:
        atexit.register(release_outputs)
    return lock


def release_outputs():
    """Release every lock taken by lock_output (data.run does it when the script ends; also at exit)."""
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


def sha256(path):
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks): what manifests and eval.json record about their input."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def progress(total, desc, unit, quiet=False, initial=0):
    """The one progress display of every script: a tqdm bar on stderr with rate and ETA, silent when stderr is not a
    terminal (tqdm's disable=None) or with --quiet. Use as a context manager or close() it."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=True if quiet else None)


def write_json(path, obj):
    """Write obj as indented JSON (UTF-8 Arabic kept readable) plus a newline, atomically."""
    atomic_write(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def write_jsonl(path, records):
    """Write records (dicts) as JSON lines, UTF-8 Arabic kept readable (ensure_ascii=False), atomically."""
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# ----------------------------------------------------------------------------------------------
# The prompt template (the ONE place it lives). Training text = format_prompt(q) + answer + EOS;
# the loss covers the answer (and EOS); generation starts from format_prompt(q).

def format_prompt(question, cue=True):
    """"\\n{question}\\n\\nالاجابة:\\n" -- the answer follows the cue. cue=False: "\\n{question}\\n", the
    generation prompt of the authors' notebooks (evaluate.py --recipe notebook), which left the cue out."""
    return f"\n{question}\n\n{PROMPT_CUE}\n" if cue else f"\n{question}\n"


# The cue as a model may write it: any alef/hamza form (الاجابة / الإجابة / الأجابة / الآجابة), final ة or ه,
# diacritics or tatweel between the letters, spaces before or after the colon, or the English "Answer:". The colon
# is required: the word alone ("الإجابة على سؤالك ...") is part of an answer, never a cue.
_MARKS = "[\u0640\u064B-\u065F\u0670]*"                  # tatweel, harakat, superscript alef
_CUE_RE = re.compile(r"(?<!\w)(?:" + _MARKS.join(["ا", "ل", "[اأإآ]", "ج", "ا", "ب", "[ةه]"]) + _MARKS
                     + r"|answer)[ \t]*[:：]", re.IGNORECASE)
_QUESTION_END = ("?", "؟")


def extract_answer(generated_text):
    """The answer the model gave to THIS question, from the text it generated after the prompt, stripped.

    The prompt already ends with the cue, so a model that goes on after its answer writes the training template
    again: "<answer>\n<new question>\n\nالاجابة:\n<an invented answer>...". The rule, on the lines of the text
    (blank lines skipped; the first line is always this question's answer):
    - a new question starts at the first later line that is followed by a cue (the cue in any form, see _CUE_RE)
      or that is a question sentence (ends with ? or ؟); everything from that line on is dropped, so a new
      question spread over two lines goes whole, and a trailing new question without a cue goes too;
    - a cue inside a later line: that line is the new question with its cue, dropped whole;
    - a cue inside the first line: the answer ends at the cue, less a question sentence just before it;
    - the first line may be empty: "\nسؤال؟\n\nالاجابة:..." is an empty answer;
    - a cue at the very start (a prompt without the cue, the notebooks' "\n{Q}\n", lets the model write this
      question's cue itself) belongs to this question and is skipped.

        extract_answer("الراحة.\n\nعندي صداع؟\n\nالاجابة:\nراجع الطبيب") == "الراحة."
    """
    return _cut(_after_own_cue(generated_text))[0].strip()


def extract_answer_notebook(generated_text):
    """The authors' notebooks' rule (evaluate.py --recipe notebook): `pred.split(Q, 1)[-1].split(cue, 1)[-1]`,
    i.e. everything after the first exact cue "الاجابة:" (the whole text when there is none), a second invented
    question and answer included; stripped. The generated text here excludes the prompt, so the split on Q is
    already done."""
    return generated_text.split(PROMPT_CUE, 1)[-1].strip()


def answer_complete(generated_text):
    """True once extract_answer(generated_text) can no longer change, whatever text follows: a cue after this
    question's own, or a finished later line (a line break after it) that is a question sentence. Generation may
    stop there (evaluate.py asks this every 8 tokens)."""
    return _cut(_after_own_cue(generated_text))[1]


def _after_own_cue(text):
    """The generated text without a cue at its very start: that one is this question's own (a cue-less prompt)."""
    stripped = text.lstrip()
    m = _CUE_RE.match(stripped)
    return stripped[m.end():].lstrip(" \t").removeprefix("\n") if m else text


def _cut(text):
    """(answer, final) by extract_answer's rule; final: no continuation of text can change the answer."""
    lines = text.split("\n")
    starts, pos = [], 0
    for line in lines:
        starts.append(pos)
        pos += len(line) + 1
    filled = [i for i, line in enumerate(lines) if line.strip()]
    cue = _CUE_RE.search(text)
    cue_line = text.count("\n", 0, cue.start()) if cue else len(lines)
    for i in filled:
        if i == 0:                                    # the first line is this question's answer
            continue
        if i > cue_line:
            break
        finished = i < len(lines) - 1                 # a line break follows: the line cannot grow any more
        line = lines[i].strip()
        if i == cue_line or line.endswith(_QUESTION_END) and finished:
            return text[:starts[i]], True
        nxt = [j for j in filled if j > i]
        if cue and (nxt[0] if nxt else cue_line) >= cue_line and not text[starts[cue_line]:cue.start()].strip():
            return text[:starts[i]], True             # the line directly above a cue that opens its line
        if line.endswith(_QUESTION_END) and not finished:
            return text[:starts[i]], False            # a trailing question sentence (it may still go on)
    if cue:                                           # the cue inside the first line
        before = text[:cue.start()].rstrip()
        if before.endswith(_QUESTION_END):            # "... عندي صداع؟ الاجابة:" -- drop that question sentence
            ends = [before.rfind(c, 0, len(before) - 1) for c in ".!?؟\n"]
            before = before[:max(ends) + 1]
        return before, True
    return text, False


# ----------------------------------------------------------------------------------------------
# The command-line contract, shared by every script (train, classify, annotate, evaluate, prepare, bench):
# a user's mistake (bad flag, bad or unreadable input file, unusable output path, unavailable device) prints
# ONE line "error: <where>: <what is wrong and what to do>" on stderr and exits 2, before anything is written.
# Anything else is a bug and keeps its traceback. Every script has the same shape:
#
#     def main(argv=None):
#         return data.run(_main, argv)          # DataError / UserError -> one line, exit 2
#
#     def _main(argv=None):
#         args = get_args(argv)                  # data.ArgumentParser, type=data.number(...) on every numeric flag
#         data.input_file(...); data.output_dir(...); data.resolve_device(...)    # every path, before any work
#         with data.for_flag("--model"):         # loaders name the file; for_flag adds the flag that named it
#             ...                                # library reads go through data.reading() / data.read_json()

class UserError(ValueError):
    """A user's mistake outside a data record. str(e) is one line: "<where>: <what>"."""

    def __init__(self, where, what):
        self.where, self.what = str(where), one_line(what)
        super().__init__(f"{self.where}: {self.what}" if self.where else self.what)


class WriteError(UserError):
    """An OSError while writing an output (disk full, quota, read-only, the folder removed): str(e) is one line
    "<file>: <errno text>", e.g. "out/x/model.safetensors: No space left on device". A UserError, so data.run prints
    it as "error: ..." and exits 2, at any moment of a run (what was written before it is whole: see atomic_write)."""


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

    - Ctrl-C from here until data.run begins is one line "interrupted: ..." and exit 130, not a KeyboardInterrupt
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
    if "MPLCONFIGDIR" not in os.environ and not all(_creatable(d) for d in _matplotlib_folders()):
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
        release_outputs()   # the output locks of this run (lock_output); in-process callers (tests) run again


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the contract: a usage error is ONE line on stderr (no usage dump), exit 2.
    Defaults are shown in --help."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*a, **kw)

    def error(self, message):
        die(message)

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
    Example: p.add_argument("--lr", type=data.number(float, lo=0)) refuses -1, nan, inf and 1e999."""
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


def utf8_path(path, flag):
    """Refuse a path whose bytes are not UTF-8 (a Latin-1 file name reaches Python as lone surrogates): every script
    records its paths in JSON (args.json, eval.json, manifests), which cannot hold it, and failed after writing."""
    try:
        os.fsencode(str(path)).decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(flag, f"{os.fsencode(str(path))!r}: the path is not UTF-8: rename it") from None


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


@contextlib.contextmanager
def reading(path, what="file", hint=""):
    """The boundary around a library call that reads a file the user gave (json, safetensors, tokenizers, open):
    the library's own errors become ONE UserError naming the file, with `hint` (what to do) appended.
    Anything else (a bug) passes through with its traceback.

        with data.reading(cfg_file, "config"):
            cfg = json.load(open(cfg_file))"""
    hint = f"; {hint}" if hint else ""
    try:
        yield
    except (UserError, DataError):
        raise
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}", f"{what} is not valid JSON ({e.msg}){hint}") from None
    except _JSONProblem as e:
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
