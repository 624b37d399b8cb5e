"""The data contract: reading and validating question-answer records, and the prompt template.

One canonical record is

    {"question": str, "answer": str, "severity": str, "p_nc": float, "p_n": float, "p_c": float}

where severity is one of SEVERITIES and (p_nc, p_n, p_c) is the severity classifier's softmax over
(non-critical, neutral, critical). Files may be .jsonl, .json (a list of objects), .csv or .tsv/.tab.
Every validation problem raises cli.DataError whose text is ONE line, "<file>:<line>: <field>: <problem>",
so a script prints it as "error: " + str(e) and exits 2 (cli.py is the command-line contract; outputs.py
writes records: outputs.write_jsonl).

Example:
    import data
    recs = data.load_records("data/sample/train.jsonl")
    text = data.format_prompt(recs[0]["question"]) + recs[0]["answer"]   # + EOS token when training
"""
import csv
import io
import json
import math
import re
from pathlib import Path

import cli
from cli import STRICT_JSON, DataError, JSONProblem, UserError, regular_file   # the error contract: cli.py
from data.arabert import arabert_preprocess   # AraBERT v02's input preprocessing: data/arabert.py

SEVERITIES = ("non-critical", "neutral", "critical")  # index order = p_nc, p_n, p_c
PROB_FIELDS = ("p_nc", "p_n", "p_c")                  # same order as SEVERITIES
PROMPT_CUE = "الاجابة:"                               # "the answer:", as in the authors' notebooks
SUM_TOL = 1e-3                                        # probabilities must sum to 1 within this
# The most UTF-8 bytes one text field may hold. A real question or answer is a few hundred bytes (MAQA's longest
# answer is ~20 kB); a field past this is a broken export (a whole file pasted into one cell) and would be tokenised
# whole (a 45 MB field took 43 s and 5.3 GB) before anything else could refuse it.
MAX_FIELD_BYTES = 1 << 20


def column_key(name):
    """Normalise a column name for alias lookup: trim, lower-case, one space between words."""
    return " ".join(str(name).split()).lower()


# Column aliases -> canonical field. Keys are compared after column_key(), so "Question" == "question".
# The Arabic names are the probability columns of the authors' annotated files.
FIELD_ALIASES = {
    "question": "question", "answer": "answer", "severity": "severity",
    "p_nc": "p_nc", "غير حرج": "p_nc",   # "not critical"
    "p_n": "p_n", "متوسط": "p_n",        # "medium"
    "p_c": "p_c", "حرج": "p_c",          # "critical"
}
# the classifier's labelled files: the text (the question; "post" in the authors' expert-labelled .xlsx) and its label
LABEL_FIELD_ALIASES = {"text": "text", "question": "text", "post": "text", "label": "label", "severity": "label",
                       "answer": "answer"}

# Severity label aliases (compared after column_key() and "_" -> "-"). "moderate"/"mild"/"severe" are the
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
    return SEVERITY_ALIASES.get(column_key(label).replace("_", "-"))


# ----------------------------------------------------------------------------------------------
# Reading raw rows


def decode_file(path):
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


def _strict(path, line, decode, whole_file=False):
    """Run decode() (a JSON parse of text starting at `line`) and turn every way it can fail into a DataError
    naming the line: for a syntax error the decoder's own line (already counted in the whole file when
    whole_file, else counted from `line`), for anything else `line`."""
    try:
        return decode()
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno if whole_file else line + e.lineno - 1, "json", e.msg) from None
    except JSONProblem as e:
        raise DataError(path, line, e.field, e.problem) from None
    except RecursionError:
        raise DataError(path, line, "json", "nested too deeply (a record is one flat object)") from None


def json_items(path, text):
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


TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".tab", ".xlsx")   # .tab is what Harvard Dataverse serves


def _suffix(path):
    """The file's (lower-case) extension, refused unless a record reader reads it: checked before decoding, so that
    a binary file is not reported as bytes that are not UTF-8."""
    suffix = Path(path).suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(path, 1, "file", f"unsupported file type '{suffix}' (use .jsonl, .json, .csv, .tsv or .xlsx)")
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
        for lineno, obj in json_items(path, text):
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


def read_rows(path, sheet=None):
    """Raw rows of a .jsonl / .json / .csv / .tsv / .xlsx file as [(line number, row dict)], 1-based lines: the one
    reader of every script.

    For CSV the header is line 1 and a row's number is the physical line where it starts; for .xlsx the worksheet's
    row number (the first sheet, or `sheet` by name or 1-based number; data/xlsx.py).
    UTF-8 is enforced (DataError names the line with the bad bytes); an empty file is a DataError.
    """
    if _suffix(path) == ".xlsx":
        from data.xlsx import read_xlsx   # openpyxl only when an .xlsx is read
        return read_xlsx(path, sheet)
    return _parse(path, decode_file(path))


def read_table(path, columns, aliases=None, sheet=None):
    """read_rows with the columns the user named renamed to their canonical field, for every script that reads
    columns. columns = {canonical: (column name or None = found by alias, flag)}, e.g. {"question": (None,
    "--question-col")}; aliases: column_key -> canonical (default FIELD_ALIASES). Refused with the columns found
    and the flag to give: a named column that is not there, or a canonical field that no column
    supplies, both at the first record's line. A named column wins: other columns that alias the same field are dropped, so none is seen twice."""
    aliases = FIELD_ALIASES if aliases is None else aliases
    rows = read_rows(path, sheet)
    at, first = rows[0]   # the first record's line: where a missing column first shows
    found = ", ".join(str(k) for k in first) or "none"
    named = {}
    for canon, (col, flag) in columns.items():
        if col is not None:   # as written, else the one column equal to it in case and spacing ("Question")
            same = [k for k in first if k == col] or [k for k in first if column_key(k) == column_key(col)]
            if len(same) != 1:
                raise DataError(path, at, col, f"no such column (columns found: {found}); check {flag}")
            named[canon] = same[0]
    for canon, (col, flag) in columns.items():   # a column named for one field cannot supply another
        if col is None and not any(aliases.get(column_key(k)) == canon for k in first if k not in named.values()):
            raise DataError(path, at, canon, f"missing field: no '{canon}' column (columns found: {found}); name it with "
                                             f"{flag}")
    if not named:
        return rows
    out = []
    for line, row in rows:
        picked = {}
        for canon, col in named.items():
            if col not in row:   # JSON rows need not share the first row's keys
                raise DataError(path, line, col, f"missing column (columns: {', '.join(map(str, row))})")
            picked[canon] = row[col]
        rest = {k: v for k, v in row.items() if k not in named.values() and aliases.get(column_key(k)) not in picked}
        out.append((line, {**rest, **picked}))
    return out


# ----------------------------------------------------------------------------------------------
# Validation

def canonical_fields(path, line, row, aliases):
    """Map a row's keys through `aliases` -> {canonical: (column as written, value)}."""
    out = {}
    for k, v in row.items():
        canon = aliases.get(column_key(k))
        if canon is None:
            continue  # unknown columns are ignored
        if canon in out:
            raise DataError(path, line, canon, f"given twice (as '{out[canon][0]}' and '{k}')")
        out[canon] = (k, v)
    return out


def _col(col, canon):
    """How to name a column in a message: as written, plus the canonical name for Arabic aliases."""
    return col if column_key(col) == canon else f"{col} ({canon})"


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
    f = canonical_fields(path, line, row, FIELD_ALIASES)
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


def shown(items, desc, quiet=False):
    """Yield items, with a progress bar (cli.progress: a terminal's stderr) while a large list is worked through
    (PROGRESS_MIN items or more, not with quiet): 200,000 records take tens of seconds to read and tokenise."""
    if quiet or len(items) < PROGRESS_MIN:
        yield from items
        return
    with cli.progress(len(items), desc, "rec") as bar:
        for i, item in enumerate(items, 1):
            yield item
            if i % 1000 == 0 or i == len(items):
                bar.update(i - bar.n)


def _read_shown(path, question_col=None, answer_col=None, columns=None, aliases=None):
    """read_table(path) with the --question-col / --answer-col names (or other `columns`), shown while validated."""
    cols = columns or {"question": (question_col, "--question-col"), "answer": (answer_col, "--answer-col")}
    return shown(read_table(path, cols, aliases), f"reading {Path(path).name}")


def load_records(path, require_probs=True, question_col=None, answer_col=None):
    """Canonical, validated records {question, answer, severity, p_nc, p_n, p_c} from a file (any of
    TABLE_SUFFIXES; question_col / answer_col name the columns when their names are not among the aliases).

    require_probs=False accepts rows that have a severity label but no probabilities and gives
    them one-hot probabilities (useful for hand-labelled data; the loss then sees hard weights).
    """
    return [parse_record(path, ln, row, require_probs=require_probs)
            for ln, row in _read_shown(path, question_col, answer_col)]


def load_qa(path, question_col=None, answer_col=None):
    """Validated question/answer records for annotation: {question, answer} plus any severity
    fields the file already has (validated the same way). Used by annotate.py on prepare.py output."""
    return [parse_record(path, ln, row, require_probs=False, require_severity=False)
            for ln, row in _read_shown(path, question_col, answer_col)]


def load_labels(path):
    """Labelled texts for the severity classifier: [{"text": str, "label": str}] with canonical labels.
    Accepts text/question and label/severity columns (any case) and the severity label aliases."""
    out = []
    cols = {"text": (None, "--question-col"), "label": (None, "--label-col")}
    for ln, row in _read_shown(path, columns=cols, aliases=LABEL_FIELD_ALIASES):
        f = canonical_fields(path, ln, row, LABEL_FIELD_ALIASES)
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
# The prompt template (the ONE place it lives). Training text = format_prompt(q) + answer + EOS;
# the loss covers the answer (and EOS); generation starts from format_prompt(q).

def format_prompt(question, cue=True):
    """"\\n{question}\\n\\nالاجابة:\\n" -- the answer follows the cue. cue=False: "\\n{question}\\n", the
    generation prompt of the authors' notebooks (evaluate.py --recipe notebook), which left the cue out."""
    return f"\n{question}\n\n{PROMPT_CUE}\n" if cue else f"\n{question}\n"


# The cue as a model may write it: any alef/hamza form (الاجابة / الإجابة / الأجابة / الآجابة), final ة or ه,
# diacritics or tatweel between the letters, spaces before or after the colon, or the English "Answer:". Inside a
# line the colon is required: the word alone ("الإجابة على سؤالك ...") is part of an answer, never a cue; the word
# alone on a whole line is a cue (_CUE_ALONE_RE), and so are the labels ج: / جواب: / الجواب: opening a line.
_MARKS = "[\u0640\u064B-\u065F\u0670]*"                  # tatweel, harakat, superscript alef
_CUE_WORD = _MARKS.join(["ا", "ل", "[اأإآ]", "ج", "ا", "ب", "[ةه]"]) + _MARKS
_CUE_RE = re.compile(r"(?<!\w)(?:" + _CUE_WORD + r"|answer)[ \t]*[:：]", re.IGNORECASE)
_LINE_CUE_RE = re.compile(r"[ \t]*(?:ج|جواب|الجواب)[ \t]*[:：]")           # an answer label opening a line
_CUE_ALONE_RE = re.compile(r"[ \t]*(?:" + _CUE_WORD + r"|answer)[ \t]*$", re.IGNORECASE)
# The whole cues a generation cut short may end in (a prefix of 3+ letters of one of them, after a blank line).
_CUE_FORMS = [f"ال{a}جاب{t}:" for a in "اأإآ" for t in "ةه"] + ["answer:"]
# A new question's label opening a line: السؤال: / سؤال: / س: / Question: / Q: (or السؤال alone on a line).
_QLABEL_RE = re.compile(r"[ \t]*(?:(?:ال)?سؤال|س|question|q)[ \t]*[:：]", re.IGNORECASE)
_QLABEL_ALONE_RE = re.compile(r"[ \t]*(?:ال)?سؤال[ \t]*$")
# A greeting opening a later line is a new patient question ("السلام عليكم، عندي ..."), once the answer has said
# more than greetings: a doctor's answer that opens with greeting lines ("السلام عليكم\nأهلا بك\n...") keeps them.
_GREETING_RE = re.compile(r"[ \t]*(?:السلام عليكم|سلام عليكم|مرحبا|مرحبًا|مرحباً|أهلا|اهلا|صباح الخير|مساء الخير"
                          r"|يا دكتور|يا دكتورة|دكتور[ \t]*[،,]|دكتورة[ \t]*[،,]|hello|hi|dear doctor)(?=[\s،,.!:؛])",
                          re.IGNORECASE)
# A line that is only a salutation: a greeting and the usual words around it.
_SALUTATION_RE = re.compile(r"(?:[\s،,.!:؛]|السلام|سلام|عليكم|ورحمة|رحمة|الله|وبركاته|مرحبا|مرحبًا|مرحباً|أهلا|اهلا"
                            r"|وسهلا|وسهلاً|بك|بكم|بكِ|صباح|مساء|الخير|النور|يا|أخي|اخي|أختي|اختي|الكريم|الكريمة"
                            r"|عزيزي|عزيزتي|السائل|السائلة|hello|hi|dear)*", re.IGNORECASE)
# A line that continues a new question upwards: a patient's first-person opener or a question word (after an
# optional و / ف), not ending a sentence with "." / "!" / ":".
_QUESTION_LINE_RE = re.compile(r"[ \t]*[وف]?(?:عندي|لدي|أعاني|اعاني|أشعر|اشعر|ابني|ابنتي|بنتي|طفلي|زوجتي|زوجي"
                               r"|أمي|امي|أبي|ابي|أنا|انا|عمري|هل|ما|ماذا|كيف|لماذا|متى|أين|كم)(?!\w)")
# The doctor's own question to the patient ("هل تعاني من حمى؟", "منذ متى بدأ الألم لديك؟") is part of the answer:
# a question sentence addressed to "you" and saying nothing in the first person.
_TO_PATIENT_RE = re.compile(r"(?<!\w)(?:لديك|عندك|عمرك|معك|حالتك|طفلك|ابنك|ابنتك|وزنك|ضغطك|أنت|انت|لديكم|عندكم)(?!\w)"
                            r"|(?<!\w)هل[ \t]+(?:تعاني|تعانين|تتناول|تتناولين|تشعر|تشعرين|تأخذ|تاخذ|تستخدم|تدخن|تمارس"
                            r"|لاحظت|جربت|أجريت|اجريت|راجعت|قمت|سبق)(?!\w)|^[ \t]*منذ متى(?!\w)")
_FIRST_PERSON_RE = re.compile(r"(?<!\w)(?:عندي|لدي|أعاني|اعاني|أشعر|اشعر|ابني|ابنتي|بنتي|طفلي|زوجتي|زوجي|أنا|انا"
                              r"|عمري|يمكنني|أستطيع|استطيع|لي)(?!\w)")
# Words that may open a generation before this question's own cue ("إليك الإجابة: ...", "Here is the answer:").
_LEAD_IN_RE = re.compile(r"[ \t]*(?:(?:حسنا|حسناً|بالتأكيد|طيب)[ \t]*[،,]?[ \t]*)?(?:إليك|اليك|إليكم|اليكم|ها هي|هاهي"
                         r"|هذه هي|وهذه|هذه|فيما يلي|here is|here's)[ \t]+(?:the[ \t]+)?(?=" + _CUE_WORD
                         + r"|answer)", re.IGNORECASE)
_QUESTION_END = ("?", "؟")


def extract_answer(generated_text):
    """The answer the model gave to THIS question, from the text it generated after the prompt, stripped.

    The prompt already ends with the cue, so a model that goes on after its answer writes the training template
    again: "<answer>\n<new question>\n\nالاجابة:\n<an invented answer>...". The rule, on the lines of the text
    (blank lines skipped; the first line is always this question's answer):
    - a new question starts at the first later line that
      - holds a cue (any form, see _CUE_RE), is an answer label (ج:, جواب:) or the cue word alone on its line, or
        is a cue cut short at the end of the text after a blank line ("\n\nالاجا"): a cue opening its line makes
        the line above it the new question; a cue inside a line drops that line whole;
      - opens with a question label (السؤال:, سؤال:, س:, Question:) or with a greeting (السلام عليكم، مرحبا، ...);
      - is a question sentence (ends with ? or ؟), unless it is the doctor's question to the patient (addressed to
        "you", nothing in the first person: "هل تعاني من حمى؟"), which is part of the answer;
      everything from that line on is dropped; above a cue or a question sentence the new question also takes the
      lines that look like its own (a first-person opener or a question word, no final "." / "!" / ":", or a
      question sentence): a new question over two or more lines goes whole;
    - a cue inside the first line: the answer ends at the cue, less a question sentence just before it;
    - the first line may be empty: "\nسؤال؟\n\nالاجابة:..." is an empty answer;
    - a cue at the very start (a prompt without the cue, the notebooks' "\n{Q}\n", lets the model write this
      question's cue itself), also after a lead-in ("إليك الإجابة:", "Here is the answer:") or as ج:, belongs to
      this question and is skipped.

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
    question's own, a question label or greeting opening a later line, or a finished later line (a line break after
    it) that is a new question sentence. Generation may stop there (evaluate.py asks this every 8 tokens)."""
    return _cut(_after_own_cue(generated_text))[1]


def _after_own_cue(text):
    """The generated text without a cue at its very start (after a lead-in such as "إليك الإجابة:", or ج:, or the
    cue word alone on the first line): that one is this question's own (a cue-less prompt)."""
    stripped = text.lstrip()
    lead = _LEAD_IN_RE.match(stripped)
    at = lead.end() if lead else 0
    m = _CUE_RE.match(stripped, at) or (None if lead else _LINE_CUE_RE.match(stripped))
    if m is None and not lead:
        first, nl, _ = stripped.partition("\n")
        m = _CUE_ALONE_RE.match(first) if nl else None
        if m:
            return stripped[len(first) + 1:]
    return stripped[m.end():].lstrip(" \t").removeprefix("\n") if m else text


def _to_patient(line):
    """A question sentence that is the doctor's question to the patient (kept in the answer)."""
    return bool(_TO_PATIENT_RE.search(line)) and not _FIRST_PERSON_RE.search(line)


def _cut_cue(lines, i):
    """The last line, after a blank line, is a cue cut short ("الاجا", "Answ"): 3+ letters, a prefix of a cue."""
    if i != len(lines) - 1 or i < 2 or lines[i - 1].strip():
        return False
    word = re.sub(_MARKS, "", lines[i]).replace(" ", "").replace("\t", "").lower()
    return len(word) >= 3 and any(form.startswith(word) for form in _CUE_FORMS)


def _cut(text):
    """(answer, final) by extract_answer's rule; final: no continuation of text can change the answer."""
    lines = text.split("\n")
    starts, pos = [], 0
    for line in lines:
        starts.append(pos)
        pos += len(line) + 1
    filled = [i for i, line in enumerate(lines) if line.strip()]

    def question_above(i):
        """The first line of the new question that ends at line i: lines above it that look like its own."""
        while True:
            above = [j for j in filled if 1 <= j < i]
            if not above:
                return i
            line = lines[above[-1]].strip()
            if _to_patient(line) or not (line.endswith(_QUESTION_END) or _QUESTION_LINE_RE.match(line)
                                         and not line.endswith((".", "!", ":"))):
                return i
            i = above[-1]

    first_cue = _CUE_RE.search(lines[0])
    for i in filled:
        if first_cue:
            break
        if i == 0:                                    # the first line is this question's answer
            continue
        line, finished = lines[i], i < len(lines) - 1   # finished: a line break follows, it cannot grow any more
        cut = not finished and _cut_cue(lines, i)
        cue = _CUE_RE.search(line)
        if cue or _LINE_CUE_RE.match(line) or (finished and _CUE_ALONE_RE.match(line)) or cut:
            opens = not cue or not line[:cue.start()].strip()
            above = [j for j in filled if 1 <= j < i]
            return text[:starts[question_above(above[-1] if opens and above else i)]], not cut
        greeting = _GREETING_RE.match(line + ("\n" if finished else ""))
        if greeting and all(_SALUTATION_RE.fullmatch(lines[j]) for j in filled if j < i):
            greeting = None                           # the answer's own salutation lines ("السلام عليكم\nأهلا بك")
        if _QLABEL_RE.match(line) or (finished and _QLABEL_ALONE_RE.match(line)) or greeting:
            return text[:starts[i]], True
        if line.strip().endswith(_QUESTION_END) and not _to_patient(line):
            return text[:starts[question_above(i)]], finished   # unfinished: a trailing question that may go on
    if first_cue:                                     # the cue inside the first line
        before = text[:first_cue.start()].rstrip()
        if before.endswith(_QUESTION_END):            # "... عندي صداع؟ الاجابة:" -- drop that question sentence
            ends = [before.rfind(c, 0, len(before) - 1) for c in ".!?؟\n"]
            before = before[:max(ends) + 1]
        return before, True
    return text, False


# ----------------------------------------------------------------------------------------------------------------
# Severity weights: --weights a,b,c (or a preset) and each record's w = a*p_nc + b*p_n + c*p_c

# The paper's settings (Table 2 columns besides Base): CE = plain cross-entropy, then three severity weightings
PRESETS = {"ce": (1.0, 1.0, 1.0), "mild": (0.75, 1.0, 1.25), "strong": (0.25, 1.0, 1.75), "balanced": (0.5, 1.0, 1.5)}
SETTINGS = ("Base", "CE", "Mild", "Strong", "Balanced")          # the paper's Table 2 columns (Base = not fine-tuned)
PRESET_SETTING = {"ce": "CE", "mild": "Mild", "strong": "Strong", "balanced": "Balanced"}   # PRESETS key -> column


def parse_weights(s):
    """'0.5,1,1.5' or a preset name (any case: balanced, Balanced) -> (a, b, c). One-line UserError otherwise."""
    if s.strip().lower() in PRESETS:
        return PRESETS[s.strip().lower()]
    parts = s.split(",")
    try:
        w = tuple(float(x) for x in parts)
    except ValueError:
        raise UserError("--weights", f"{s!r} is neither a,b,c numbers nor a preset ({', '.join(PRESETS)})") from None
    if len(w) != 3 or not all(math.isfinite(x) and x >= 0 for x in w):
        raise UserError("--weights", f"{s!r} must be three finite non-negative numbers a,b,c")
    if not any(w):
        raise UserError("--weights", f"{s!r}: all three are 0, so every example has weight 0 and nothing is learned")
    return w


def severity_weight(rec, abc):
    """w = a*p_nc + b*p_n + c*p_c for one record."""
    return sum(k * p for k, p in zip(abc, severity_probs(rec)))


def setting_name(s):
    """An argparse type for a Table 2 column name in any case ("balanced" -> "Balanced"; "custom" stays)."""
    import argparse
    names = {x.lower(): x for x in SETTINGS + ("custom",)}
    if s.strip().lower() not in names:
        raise argparse.ArgumentTypeError(f"invalid choice: {s!r} (choose from {', '.join(names.values())})")
    return names[s.strip().lower()]


# ----------------------------------------------------------------------------------------------------------------
# --preprocess: what the model reads, in every script (train, evaluate, classify, annotate). Off by default, as in
# the paper's notebooks; "arabert" is the AraBERT authors' recommended input preprocessing (data/arabert.py).

PREPROCESS = ("none", "arabert")


def preprocess(text, how):
    """The text a model reads under --preprocess `how`: as written ("none") or arabert_preprocess(text)."""
    return arabert_preprocess(text) if how == "arabert" else text


def preprocess_records(records, how, fields=("question", "answer")):
    """Canonical records with `fields` preprocessed (new dicts; the input records are not changed)."""
    if how == "none":
        return records
    return [{**r, **{f: preprocess(r[f], how) for f in fields if f in r}} for r in records]


def references_of(path, sha256=None):
    """How the answers of a test file were written, for eval.json: "raw" (the doctors' text) or "orthographic"
    (prepare.py --normalize-answers all), read from the manifest.json prepare.py left beside it when that manifest
    records this very file (its sha256: pass the one already computed); None when nothing says (an annotated copy
    elsewhere, a file of your own)."""
    import outputs
    try:
        man = json.loads(Path(path).with_name("manifest.json").read_text(encoding="utf-8"))
        want = man["sha256"][Path(path).name]
        got = sha256 or outputs.sha256(path)
        return man["answers"]["test" if Path(path).name == "test.jsonl" else "train"] if got == want else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
