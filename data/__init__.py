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
import sys
import tempfile
from pathlib import Path

SEVERITIES = ("non-critical", "neutral", "critical")  # index order = p_nc, p_n, p_c
PROB_FIELDS = ("p_nc", "p_n", "p_c")                  # same order as SEVERITIES
PROMPT_CUE = "الاجابة:"                               # "the answer:", as in the authors' notebooks
SUM_TOL = 1e-3                                        # probabilities must sum to 1 within this


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

def _decode(path):
    """Read a file as UTF-8 text (a leading BOM is dropped). Bad bytes -> DataError at their line."""
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
    bad = next((ch for ch in v if "\ud800" <= ch <= "\udfff"), None)
    if bad is not None:   # a lone surrogate (JSON "\ud800"): not a character, cannot be encoded or tokenized
        raise DataError(path, line, _col(col, canon), f"lone surrogate \\u{ord(bad):04x} is not valid Unicode text")
    return v.strip()


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


def load_records(path, require_probs=True):
    """Canonical, validated records {question, answer, severity, p_nc, p_n, p_c} from a file.

    require_probs=False accepts rows that have a severity label but no probabilities and gives
    them one-hot probabilities (useful for hand-labelled data; the loss then sees hard weights).
    """
    return [parse_record(path, ln, row, require_probs=require_probs) for ln, row in read_rows(path)]


def load_qa(path):
    """Validated question/answer records for annotation: {question, answer} plus any severity
    fields the file already has (validated the same way). Used by annotate.py on prepare.py output."""
    return [parse_record(path, ln, row, require_probs=False, require_severity=False)
            for ln, row in read_rows(path)]


def load_labels(path):
    """Labelled texts for the severity classifier: [{"text": str, "label": str}] with canonical labels.
    Accepts text/question and label/severity columns (any case) and the severity label aliases."""
    out = []
    for ln, row in read_rows(path):
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

def atomic_write(path, content):
    """Write a file atomically: temp file in the same folder, fsync, os.replace. A reader never sees half a file,
    and a crash leaves the old file (if any) intact. content: text (UTF-8), bytes, or a function write(tmp_path)
    that writes the temp file itself (safetensors' save_file, a tokenizer's save). The file gets the permissions of
    any new file (0666 minus the umask), not mkstemp's 0600, so others can read a model on a shared machine."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


def extract_answer(generated_text):
    """The answer the model gave to THIS question, from the text it generated after the prompt, stripped.

    The prompt already ends with the cue, so a model that goes on after its answer writes the training template
    again: "<answer>\n<new question>\n\nالاجابة:\n<an invented answer>...". The answer ends where that new
    question begins: at the last line break before the next cue (the new question is the line above it), or at the
    cue itself when no line break comes before it. No cue at all: the whole text. A cue at the very start (a
    prompt without the cue, the notebooks' "\n{Q}\n", lets the model write this question's cue itself) belongs to
    this question and is skipped.

        extract_answer("الراحة.\n\nعندي صداع؟\n\nالاجابة:\nراجع الطبيب") == "الراحة."
    """
    before, cue, _ = _after_own_cue(generated_text).partition(PROMPT_CUE)
    if cue:                                           # a new question/answer pair begins: cut before its question
        head = before.rstrip()
        cut = head.rfind("\n")                       # the line break that opens the new question
        before = head[:cut] if cut >= 0 else head
    return before.strip()


def answer_complete(generated_text):
    """True once extract_answer(generated_text) can no longer change: the model has begun a new question and cue
    (a cue after this question's own). Generation may stop there (evaluate.py asks this every 8 tokens)."""
    return PROMPT_CUE in _after_own_cue(generated_text)


def _after_own_cue(text):
    """The generated text without a cue at its very start: that one is this question's own (a cue-less prompt)."""
    stripped = text.lstrip()
    return stripped[len(PROMPT_CUE):] if stripped.startswith(PROMPT_CUE) else text


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
        raise UserError(flag, f"{path}: is a directory, not a file" if os.path.isdir(path) else f"{path}: not a file")
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
