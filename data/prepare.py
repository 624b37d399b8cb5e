"""Convert a downloaded Arabic medical Q/A corpus into the project's raw Q/A JSONL, with a seeded split.

Sources:
  maqa    MAQA (Harvard Dataverse doi:10.7910/DVN/Y2JBEZ) as downloaded: .csv, .tsv/.tab or .xlsx
          (the .xlsx is streamed with openpyxl's read-only mode). Pick the columns
          with --question-col / --answer-col (default: a column named question / answer, any case).
  apollo  FreedomIntelligence/ApolloCorpus, file train/sft/medicalPatient_ar.json: a JSON list of
          conversations [q1, a1, q2, a2, ...]; every (question, answer) turn pair becomes a record.
          --input may be a local copy; otherwise it is fetched with huggingface_hub.hf_hub_download.
  ahd     an AHD-style .csv / .xlsx with question and answer columns (same handling as maqa).

Steps: read -> (optional --normalize [orthographic], Arabic normalisation) -> drop empty Q/A -> de-duplicate
on the normalised question + answer (first kept) -> (optional --normalize dialect: dialect words of the
questions -> MSA, data/dialect_rules.txt) -> seeded shuffle -> test = first --n-test, train = next
--n-train (the test set does not change when --n-train changes). With fewer rows than asked for, an
explicit --n-test is kept exactly and training takes the rest; with the default --n-test the split is
proportional. A note is printed either way.

Writes <out>/train.jsonl, <out>/test.jsonl ({"question", "answer"} records, plus severity fields when
the input had probability/severity columns) and <out>/manifest.json. annotate.py then adds p_nc, p_n,
p_c and severity. Bad input: one line "error: <file>:<line>: <field>: <problem>", exit 2, nothing written.

Example:
    python data/prepare.py --source maqa --input MAQA.xlsx --question-col q_body --answer-col a_body \\
        --normalize --out out/maqa
    python data/prepare.py --source apollo --out out/apollo --n-train 30000 --n-test 2000
"""
import argparse
import os
import random
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python data/prepare.py`: make `import data` work
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cli  # noqa: E402

cli.start(__name__)   # Ctrl-C while starting, a safe console, matplotlib's cache (see cli.start)
import data  # noqa: E402
import outputs  # noqa: E402

APOLLO_REPO = "FreedomIntelligence/ApolloCorpus"
APOLLO_FILE = "train/sft/medicalPatient_ar.json"

# ----------------------------------------------------------------------------------------------
# Arabic normalisation. Each rule is one line so it is easy to see (and test) what changes.

URL_RE = re.compile(r"(?:https?://|www\.)\S+")  # links: noise in social-media answers
# emoji & pictographs (incl. flags, dingbats, misc symbols), variation selector 16, zero-width joiner
EMOJI_RE = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF\uFE0F\u200D]")
# tashkeel (harakat, tanwin, shadda, sukun: U+064B-U+065F), superscript alef U+0670, Quranic marks
DIACRITICS_RE = re.compile("[\u0610-\u061A\u064B-\u065F\u0670\u06D6-\u06ED]")
# Invisible format characters: bidi marks and isolates (LRM, RLM, ALM, LRE..RLO, LRI..PDI), zero-width space,
# ZWNJ/ZWJ, the BOM (zero-width no-break space) and the soft hyphen. They change no letter a reader sees, yet
# "صداع" and "صداع" + RLM are different strings: copies of one pair pasted from chat apps or the web survived
# de-duplication and put test questions' twins into train.jsonl. ZWNJ and ZWJ are removed too: in Arabic they
# only steer the joining of glyphs (shaping), never the word (Persian and Urdu, where ZWNJ separates morphemes,
# are not this corpus).
INVISIBLE_RE = re.compile("[\u00AD\u061C\u200B-\u200F\u202A-\u202E\u2060\u2066-\u2069\uFEFF]")
TATWEEL = "\u0640"  # kashida used to stretch words: "طـــبيب" -> "طبيب"
LETTER_MAP = str.maketrans({
    "أ": "ا", "إ": "ا", "آ": "ا", "ٱ": "ا",  # alef with hamza above/below, madda, wasla -> bare alef
    "ى": "ي",                                # alef maqsura -> yaa (often written interchangeably)
    "ة": "ه",                                # taa marbuta -> haa (often written interchangeably)
})


def normalize_arabic(text):
    """Normalise Arabic text: remove URLs, emoji, invisible format characters (INVISIBLE_RE), diacritics and
    tatweel; unify alef variants, alef maqsura and taa marbuta; collapse all whitespace (newlines included) to
    single spaces."""
    text = URL_RE.sub(" ", text)
    text = INVISIBLE_RE.sub("", text)   # first: an RLM inside a link or emoji sequence must not split it
    text = EMOJI_RE.sub("", text)
    text = DIACRITICS_RE.sub("", text)
    text = text.replace(TATWEEL, "")
    text = text.translate(LETTER_MAP)
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------------
# Dialect normalisation (seed 003): frequent Egyptian, Levantine, Gulf and Maghrebi words -> MSA, from a
# plain-text table, one rule per line (data/dialect_rules.txt says how a rule matches). Applied to the
# QUESTIONS only: they are the patients' words, in every dialect; the answers are the references that
# BERTScore compares with, written by doctors mostly in MSA, and rewriting them would change the target
# and make scores with and without the rules incomparable.

DIALECT_RULES = Path(__file__).resolve().parent / "dialect_rules.txt"
MARKS = r"[\u0610-\u061A\u064B-\u065F\u0670\u06D6-\u06ED\u0640]*"  # tashkeel + tatweel, skipped in a match
FOLD_CLASS = {"ا": "اأإآٱ", "ي": "يى", "ه": "هة"}  # a folded letter matches any spelling normalize_arabic folds
STEM = r"[\u0621-\u064A](?:" + MARKS + r"[\u0621-\u064A])+"  # the * of a prefix rule: two letters or more
WORD_END_RE = re.compile(r"[\u0621-\u064A\u0610-\u061A\u064B-\u065F\u0670\u06D6-\u06ED\u0640]+$")
WORD_START_RE = re.compile(r"^[\u0621-\u064A\u0610-\u061A\u064B-\u065F\u0670\u06D6-\u06ED\u0640]+")
CONDITIONS = ("not prev", "not next", "prev", "next")  # longest first: "not prev:" also ends in "prev:"


def _parse_condition(path, n, text):
    """'prev: w1 w2' / 'next: ...' / 'not prev: ...' / 'not next: ...' -> (kind, [folded words]).
    A word may end in * (any word with that beginning); <start> / <end>: no word before / after in the
    same clause (start or end of the text, or punctuation in between)."""
    kind, colon, words = text.partition(":")
    kind = " ".join(kind.split())
    words = [w if w in ("<start>", "<end>") else normalize_arabic(w) for w in words.split()]
    if not colon or kind not in CONDITIONS or not words:
        raise cli.DataError(path, n, "rule", f"expected a condition 'prev: words', 'next: words', 'not prev: "
                                              f"words' or 'not next: words', got {text.strip()!r}")
    return kind, words


def load_dialect_rules(path=DIALECT_RULES):
    """Read a rules table -> (compiled regex, [(form, [(MSA, conditions)...])...], {dialect: number of rules}).

    Lines: "[dialect]" starts a section, "#" starts a comment, a rule is "form = MSA" (spelling variants
    fold: أ إ آ ٱ ا, ى ي, ة ه) or "form | form == MSA" (exactly the spellings written), optionally followed
    by "if cond; cond" (see _parse_condition). One * in a form stands for a stem of 2+ letters, copied to
    the * of the MSA side. A form may have several rules, each with conditions, tried in file order; a form
    that already has a rule without conditions cannot get another (it would never fire): an error."""
    path = cli.input_file(str(path), "--dialect-rules")
    with cli.for_flag("--dialect-rules"), cli.reading(path, "dialect rules"), open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    forms, index, counts, dialect = [], {}, {}, None  # index: (exact?, spelling key) -> position in forms
    for n, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]") and line[1:-1].strip():
            dialect = line[1:-1].strip()
            counts.setdefault(dialect, 0)
            continue
        if dialect is None:
            raise cli.DataError(path, n, "rule", "a rule before the first [dialect] line")
        exact = "==" in line
        left, eq, right = line.partition("==" if exact else "=")
        msa, _, cond_text = right.partition(" if ")
        msa = " ".join(msa.split())
        if not eq or not left.strip() or not msa or "=" in right:
            raise cli.DataError(path, n, "rule", f"expected 'dialect form = MSA form', got {line!r}")
        conds = [_parse_condition(path, n, c) for c in cond_text.split(";")] if cond_text.strip() else []
        spellings = [" ".join(s.split()) for s in left.split("|")]
        if len(spellings) > 1 and not exact:
            raise cli.DataError(path, n, "rule", "several spellings 'a | b' need '==' (exact spellings)")
        for form in spellings:
            key = DIACRITICS_RE.sub("", form).replace(TATWEEL, "") if exact else normalize_arabic(form)
            if not re.fullmatch(r"[\u0621-\u064A*]+( [\u0621-\u064A]+)*", key) or key.count("*") > 1 \
                    or key.strip("*") == "":
                raise cli.DataError(path, n, "rule", f"the dialect form {form!r} is not Arabic words")
            if ("*" in key) != ("*" in msa):
                raise cli.DataError(path, n, "rule", "a * in the form needs one in the MSA form, and back")
            if (not exact, normalize_arabic(key)) in index:   # an exact spelling a folded form already covers
                key_at = index[(not exact, normalize_arabic(key))]
                raise cli.DataError(path, n, "rule", f"{form!r} repeats the form of line {forms[key_at][3]}")
            at = index.setdefault((exact, normalize_arabic(key) if not exact else key), len(forms))
            if at == len(forms):
                forms.append((key, exact, [], n))
            elif any(not c for _, c in forms[at][2]):
                raise cli.DataError(path, n, "rule", f"{form!r} repeats the form of line {forms[at][3]}, "
                                                      "which has no condition")
            forms[at][2].append((msa, conds))
        counts[dialect] += 1
    if not forms:
        raise cli.DataError(path, 1, "rule", "no rules")

    # One alternation, a named group per form, longest first (prefix rules last): at a given place the regex
    # takes the first form that matches. Tashkeel/tatweel may follow any letter, a space is any whitespace;
    # a folded letter matches its spelling variants, an exact form only the letters written.
    def form_regex(i, key, exact):
        words = [MARKS.join(f"(?P<s{i}>{STEM})" if c == "*" else
                            f"[{FOLD_CLASS[c]}]" if c in FOLD_CLASS and not exact else c for c in w)
                 for w in key.split(" ")]
        return r"\s+".join(words)
    order = sorted(range(len(forms)), key=lambda i: ("*" in forms[i][0], -len(forms[i][0]), forms[i][0]))
    alternation = "|".join(f"(?P<f{i}>{form_regex(i, forms[i][0], forms[i][1])})" for i in order)
    # The conjunction و is optional and lazy (??): a form that itself starts with و (ودي, وايد) is tried first.
    regex = re.compile(rf"(?<!\w)(?P<conj>و{MARKS})??(?:{alternation}){MARKS}(?!\w)")
    return regex, [(key, rules) for key, _, rules, _ in forms], counts


def _holds(cond, before, after):
    """Does one condition of a rule hold, given the text before and after the matched form?"""
    kind, words = cond
    side = before if kind.endswith("prev") else after
    side = side.rstrip() if kind.endswith("prev") else side.lstrip()
    m = (WORD_END_RE.search if kind.endswith("prev") else WORD_START_RE.match)(side)
    edge = "<start>" if kind.endswith("prev") else "<end>"
    word = normalize_arabic(m.group()) if m else edge  # punctuation, a digit or nothing: the clause's edge
    hit = any(word == w or (w.endswith("*") and word != edge and word.startswith(w[:-1])) for w in words)
    return hit != kind.startswith("not")


def normalize_dialect(text, rules):
    """Replace every dialect form of `rules` (from load_dialect_rules) in text by its MSA form, in one pass;
    an attached conjunction و is kept. Conditions look at the neighbouring words as written (the text before any
    rewriting); a form whose rules all have a condition that fails stays as written. Everything else is left
    exactly as written."""
    regex, forms, _ = rules

    def msa_for(i, before, after):
        for msa, conds in forms[i][1]:
            if all(_holds(c, before, after) for c in conds):
                return msa
        return None

    def replace(m):
        i = int(m.lastgroup[1:])
        # a neighbouring word is within 80 characters (no Arabic word is longer): no copy of a long text per match
        before, after = m.string[max(0, m.start() - 80):m.start()], m.string[m.end():m.end() + 80]
        msa = msa_for(i, before, after)
        if msa is None:
            return m.group()
        if "*" in msa:  # a prefix rule: the stem as written
            msa = msa.replace("*", m.group(f"s{i}"))
        return (m.group("conj") or "") + msa
    return regex.sub(replace, text)


def dedup_key(q, a):
    """Two pairs are duplicates when their normalised, case-folded question and answer match."""
    return normalize_arabic(q).casefold(), normalize_arabic(a).casefold()


# ----------------------------------------------------------------------------------------------
# .xlsx through openpyxl in read-only mode: the worksheet's rows are streamed from the zip (MAQA has >400k rows),
# never loaded whole. Only the shared-string table is held in memory, as Excel itself needs it. A sheet without a
# <dimension> element (Excel always writes one) is also read through once when the workbook is opened, so a
# malformed one is reported then, without a row number.

def _text(v):
    return "" if v is None else str(v)


# Limits on the XML inside an .xlsx, checked from the zip's directory before anything is inflated (a 0.8 MB file
# holding 200 MB of sheet XML took 95 s and 1.2 GB to parse). They are Apache POI's zip-bomb defaults: a part may
# inflate to at most XLSX_MAX_RATIO times its compressed size (real sheet XML compresses 5-20x; the ratio is only
# applied past XLSX_RATIO_FROM, as a tiny part of repeated cells can compress further) and to at most
# XLSX_MAX_PART bytes. Rows past Excel's own last row (1,048,576) are refused as malformed.
XLSX_MAX_RATIO = 100
XLSX_RATIO_FROM = 10 << 20
XLSX_MAX_PART = 4 << 30
XLSX_MAX_ROWS = 1048576


def _check_xlsx_sizes(path):
    """DataError when a part of the .xlsx zip would inflate past the limits above (a zip bomb, or not a real
    spreadsheet); a file that is not a zip is left to openpyxl's own message."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            parts = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return
    for p in parts:
        ratio = p.file_size / max(1, p.compress_size)
        if p.file_size > XLSX_MAX_PART or (p.file_size > XLSX_RATIO_FROM and ratio > XLSX_MAX_RATIO):
            raise cli.DataError(path, 1, p.filename,
                                 f"{p.compress_size} bytes inflate to {p.file_size} ({ratio:.0f}x): past the limits "
                                 f"of {XLSX_MAX_RATIO}x and {XLSX_MAX_PART} bytes per part (a zip bomb?); "
                                 "re-save it as .csv")


def read_xlsx(path, sheet=None):
    """Rows of one worksheet (the first, or --sheet by name or 1-based number) as [(row number, {header: text})];
    the first non-blank row is the header. A malformed file is a one-line DataError naming the file (and row).
    The zip's sizes are checked first (_check_xlsx_sizes); the sheet's <dimension> tag is not trusted (a stale one
    made openpyxl's read-only mode stop at the row it names: 20 of 200 rows, silently), every row is read."""
    import openpyxl
    cli.regular_file(path)
    _check_xlsx_sizes(path)
    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as e:   # not a zip, missing parts, malformed XML; openpyxl raises many kinds
        raise cli.DataError(path, 1, "file",
                             f"not a valid .xlsx file ({type(e).__name__}: {cli.one_line(e)[:200]})") from None
    try:
        names = wb.sheetnames
        if not names:
            raise cli.DataError(path, 1, "sheet", "the workbook has no worksheets")
        match = [n for i, n in enumerate(names) if sheet is None or n == sheet or str(i + 1) == str(sheet)]
        if not match:
            raise cli.DataError(path, 1, "sheet", f"no sheet {sheet!r} (sheets: {', '.join(names)})")
        rows, header, line = [], None, 0
        try:
            ws = wb[match[0]]
            ws.reset_dimensions()   # read to the last <row>, not to the row the <dimension> tag names
            for line, values in enumerate(ws.iter_rows(values_only=True), 1):
                if line > XLSX_MAX_ROWS:
                    raise cli.DataError(path, line, f"sheet {match[0]}", f"more than {XLSX_MAX_ROWS} rows "
                                                                           "(Excel's limit): malformed worksheet")
                vals = [_text(v) for v in values]
                if not any(v.strip() for v in vals):
                    continue
                if header is None:
                    header = [v.strip() for v in vals]
                    twice = [h for i, h in enumerate(header) if h and h in header[:i]]
                    if twice:   # the dict below would keep the last one silently (as data.read_rows refuses for CSV)
                        raise cli.DataError(path, line, twice[0], "column given twice in the header")
                else:
                    rows.append((line, {h: vals[i] if i < len(vals) else "" for i, h in enumerate(header)}))
        except cli.DataError:
            raise
        except IndexError:   # a cell pointing past the shared-string table
            raise cli.DataError(path, line + 1, f"sheet {match[0]}", "shared-string index out of range") from None
        except Exception as e:   # truncated or malformed worksheet XML (ElementTree / lxml parse errors)
            raise cli.DataError(path, line + 1, f"sheet {match[0]}",
                                 f"malformed worksheet ({type(e).__name__}: {cli.one_line(e)[:200]})") from None
    finally:
        wb.close()
    if not rows:
        raise cli.DataError(path, 1, "file", "no records (empty sheet)")
    return rows


# ----------------------------------------------------------------------------------------------
# Sources -> list of (line, {"question", "answer", ...}) raw rows

def read_table(path, qcol, acol, sheet):
    """Rows of a CSV/TSV/JSONL/JSON/XLSX file with the chosen question/answer columns renamed."""
    rows = read_xlsx(path, sheet) if Path(path).suffix.lower() == ".xlsx" else data.read_rows(path)
    # Say early (at the header, line 1) when no question/answer column can be found.
    first = rows[0][1]
    for canon, col, flag in (("question", qcol, "--question-col"), ("answer", acol, "--answer-col")):
        if col is None and not any(data.FIELD_ALIASES.get(data.column_key(k)) == canon for k in first):
            raise cli.DataError(path, 1, canon, f"no '{canon}' column (columns: {', '.join(map(str, first))}); "
                                                 f"name it with {flag}")
    out = []
    for line, row in rows:
        # Explicit columns win; other columns that also look like question/answer are dropped so
        # the canonicaliser does not see a field twice.
        picked = {}
        for canon, col in (("question", qcol), ("answer", acol)):
            if col is None:
                continue
            if col not in row:
                raise cli.DataError(path, line, col, f"column not found (columns: {', '.join(map(str, row))})")
            picked[canon] = row[col]
        rest = {k: v for k, v in row.items()
                if k not in (qcol, acol) and not (data.FIELD_ALIASES.get(data.column_key(k)) in picked)}
        out.append((line, {**rest, **picked}))
    return out


def read_apollo(path):
    """ApolloCorpus conversations [q1, a1, q2, a2, ...] -> (line, {question, answer}) per turn pair.
    A trailing unpaired turn is dropped (counted). Items that are objects are read as rows."""
    items = data.json_items(path, data.decode_file(path))
    out, unpaired = [], 0
    for line, conv in items:
        if isinstance(conv, dict):
            out.append((line, conv))
            continue
        if not isinstance(conv, list) or not all(isinstance(t, str) for t in conv):
            raise cli.DataError(path, line, "conversation", "expected a list of strings [q1, a1, q2, a2, ...]")
        for j in range(0, len(conv) - 1, 2):
            out.append((line, {"question": conv[j], "answer": conv[j + 1]}))
        unpaired += len(conv) % 2
    return out, unpaired


def fetch_apollo(filename, revision):
    """Download a file of the ApolloCorpus dataset repo from the Hugging Face hub (cached)."""
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(APOLLO_REPO, filename, repo_type="dataset", revision=revision)
    except Exception as e:  # offline, missing file, ...: report as bad input, one line
        raise cli.DataError(f"hf://datasets/{APOLLO_REPO}/{filename}", 1, "download",
                             f"{type(e).__name__}: {e}") from None


def split_sizes(n, n_train, n_test, exact_test=False):
    """(train, test) sizes: as asked when there are enough rows. Fewer: with an explicit --n-test (exact_test) the
    test split is exactly --n-test and training takes the rest (the user sized the test set on purpose; refused when
    nothing would be left to train on: a train size of 0); with the default --n-test both are proportional."""
    if n >= n_train + n_test:
        return n_train, n_test, False
    if exact_test:   # nothing left to train on: 0, which the caller refuses as too few for the split
        return max(0, min(n_train, n - n_test)), min(n_test, n), True
    test = round(n * n_test / max(1, n_train + n_test))
    if n_test > 0 and n >= 2:
        test = max(1, test)  # keep at least one test row
    return n - test, test, True


# ----------------------------------------------------------------------------------------------

def parse_args(argv):
    num = cli.number
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--source", choices=("maqa", "apollo", "ahd"), default="maqa",
                   help="corpus the input comes from (decides how it is read); default maqa")
    p.add_argument("--input", default=None,
                   help="input file (.csv/.tsv/.tab/.xlsx/.jsonl/.json); for apollo optional: when it is "
                        f"not a local file it names the file in the hub repo (default {APOLLO_FILE})")
    p.add_argument("--out", required=True, help="output folder for train.jsonl, test.jsonl, manifest.json")
    p.add_argument("--question-col", default=None,
                   help="name of the question column (default: a column named 'question', any case)")
    p.add_argument("--answer-col", default=None,
                   help="name of the answer column (default: a column named 'answer', any case)")
    p.add_argument("--sheet", default=None, help="xlsx only: worksheet name or 1-based number (default: first)")
    p.add_argument("--normalize", nargs="*", choices=("orthographic", "dialect"), default=None,
                   help="normalisation steps for the written text; the bare flag means orthographic. "
                        "orthographic: URLs, emoji, invisible marks (RLM, ZWNJ, ...), diacritics, tatweel removed; "
                        "alef/yaa/taa-marbuta unified; "
                        "whitespace collapsed (questions and answers). dialect: the dialect words of "
                        "--dialect-rules replaced by MSA (questions only). Both: --normalize orthographic dialect")
    p.add_argument("--dialect-rules", default=None,
                   help="rules table of --normalize dialect, one 'dialect form = MSA form' per line "
                        "(default: data/dialect_rules.txt)")
    p.add_argument("--seed", type=num(int, lo=0), default=1234, help="seed of the shuffle before the split")
    p.add_argument("--n-train", type=num(int, lo=0), default=30000, help="training pairs to keep (paper: 30,000)")
    p.add_argument("--n-test", type=num(int, lo=0), default=2000, help="test pairs to keep (paper: 2,000)")
    p.add_argument("--revision", default=None, help="apollo only: hub revision (commit) to download")
    args = p.parse_args(argv)
    # an explicit --n-test is honoured exactly even on small data (split_sizes); the default one is scaled down
    args.n_test_given = any(str(a) == "--n-test" or str(a).startswith("--n-test=")
                            for a in (sys.argv[1:] if argv is None else argv))
    if args.n_train == 0 and args.n_test == 0:
        p.error("--n-train and --n-test are both 0: nothing to write")
    if args.source != "apollo" and args.input is None:
        p.error(f"--input is required for --source {args.source}")
    args.normalize = ["orthographic"] if args.normalize == [] else (args.normalize or [])  # bare flag: as before
    # a flag that would be ignored is refused: the user meant something this run would not do
    if args.sheet is not None and not str(args.input or "").lower().endswith(".xlsx"):
        p.error("--sheet applies to an .xlsx --input only")
    if args.dialect_rules is not None and "dialect" not in args.normalize:
        p.error("--dialect-rules needs --normalize dialect")
    if args.question_col is not None and args.question_col == args.answer_col:
        p.error(f"--question-col and --answer-col both name '{args.question_col}'")
    if args.revision is not None and args.source != "apollo":
        p.error("--revision applies to --source apollo only")
    return args


def check_paths(args):
    """Input and every output path, before anything is read or written (nothing is replaced on a bad path)."""
    if args.source != "apollo" or (args.input is not None and Path(args.input).exists()):
        cli.input_file(args.input, "--input")
    cli.output_dir(args.out, "--out")
    for f in ("train.jsonl", "test.jsonl", "manifest.json"):
        cli.output_file(str(Path(args.out) / f), "--out", inputs=[args.input])
    outputs.lock_output(args.out, "--out")   # one run per folder; a folder created for the lock goes if nothing is written
    outputs.clean_stale(args.out, ("unit", "train.jsonl", "test.jsonl", "manifest.json"))   # a killed write's


def prepare(args):
    """Do the work; returns the manifest. Raises cli.DataError on bad input before writing anything."""
    unpaired = 0
    rules_file = args.dialect_rules or DIALECT_RULES
    rules = load_dialect_rules(rules_file) if "dialect" in args.normalize else None  # before any work
    if args.source == "apollo":
        # A local file is used as is; otherwise --input (default: the MAQA-derived file) names the
        # file inside the hub dataset repo.
        local = args.input is not None and Path(args.input).is_file()
        name = args.input or APOLLO_FILE
        path = args.input if local else fetch_apollo(name, args.revision)
        origin = str(args.input) if local else f"hf://datasets/{APOLLO_REPO}/{name}@{args.revision or 'main'}"
        rows, unpaired = read_apollo(path)
    else:
        path = origin = args.input
        rows = read_table(path, args.question_col, args.answer_col, args.sheet)

    recs, seen, n_empty, n_dup, n_dialect = [], set(), 0, 0, 0
    for line, row in rows:
        rec = {k: v for k, v in row.items()}
        # Empty Q/A are dropped (counted), not errors: scraped corpora have some. Everything else
        # (missing column, bad probabilities, unknown severity) is validated by the data contract.
        f = data.canonical_fields(path, line, rec, data.FIELD_ALIASES)
        q, a = (f.get(c, (None, None))[1] for c in ("question", "answer"))
        if "orthographic" in args.normalize:
            q, a = (normalize_arabic(x) if isinstance(x, str) else x for x in (q, a))
        if isinstance(q, str) and isinstance(a, str) and (not q.strip() or not a.strip()):
            n_empty += 1
            continue
        if "question" in f:
            rec[f["question"][0]] = q
        if "answer" in f:
            rec[f["answer"][0]] = a
        out = data.parse_record(path, line, rec, require_probs=False, require_severity=False)
        key = dedup_key(out["question"], out["answer"])
        if key in seen:
            n_dup += 1
            continue
        seen.add(key)
        if rules is not None:  # after de-duplication: the same pairs and split with and without the rules
            q = normalize_dialect(out["question"], rules)
            q = normalize_arabic(q) if "orthographic" in args.normalize else q  # the MSA side is spelled too
            n_dialect += q != out["question"]
            out["question"] = q
        recs.append(out)

    n_train, n_test, proportional = split_sizes(len(recs), args.n_train, args.n_test, args.n_test_given)
    if (args.n_train and not n_train) or (args.n_test and not n_test):   # an empty split no later script can use
        raise cli.UserError("--input", f"{origin}: only {len(recs)} usable pairs after cleaning ({len(rows)} rows "
                                        f"read, {n_empty} empty, {n_dup} duplicates): too few for "
                                        f"{'a training and a test split' if args.n_train and args.n_test else 'a split'}")
    if proportional:
        how = "--n-test kept, training takes the rest" if args.n_test_given else "split proportionally"
        print(f"note: only {len(recs)} pairs after cleaning (asked for {args.n_train} + {args.n_test}); "
              f"{how}: {n_train} train / {n_test} test", file=sys.stderr)
    order = list(range(len(recs)))
    random.Random(args.seed).shuffle(order)
    test = [recs[i] for i in order[:n_test]]
    train = [recs[i] for i in order[n_test:n_test + n_train]]
    manifest = {
        "source": args.source,
        "input": origin,
        "input_sha256": outputs.sha256(path),
        "columns": {"question": args.question_col, "answer": args.answer_col},
        "sheet": args.sheet,
        "rows_read": len(rows),
        "dropped_empty": n_empty,
        "dropped_unpaired_turns": unpaired,
        "duplicates_removed": n_dup,
        "rows_after_dedup": len(recs),
        "has_severity": any("severity" in r for r in recs),
        "normalize": "orthographic" in args.normalize,
        "dialect": None if rules is None else {
            "rules": args.dialect_rules or "data/dialect_rules.txt", "rules_sha256": outputs.sha256(rules_file),
            "rules_per_dialect": rules[2], "questions_changed": n_dialect},
        "seed": args.seed,
        "requested": {"n_train": args.n_train, "n_test": args.n_test},
        "proportional_split": proportional,
        "n_train": len(train),
        "n_test": len(test),
        "unused": len(recs) - len(train) - len(test),
    }
    # a train.jsonl / test.jsonl there that prepare.py did not write (annotated data, the user's own) is never
    # replaced: refused here, after the input's own errors and before anything is written
    outputs.refuse_foreign(args.out, "--out", ("train.jsonl", "test.jsonl", "manifest.json"), lambda d: {
        "source", "input_sha256"} <= set(outputs.json_object(os.path.join(d, "manifest.json")) or {}), "prepare.py")
    # one unit: the three files are written into a hidden temp folder, then moved in (manifest.json last, with the
    # sha256 of the two others): a failure (a full disk) leaves the previous split whole, never half of each
    with outputs.unit(args.out, last=("manifest.json",)) as tmp:
        outputs.write_jsonl(Path(tmp) / "train.jsonl", train)
        outputs.write_jsonl(Path(tmp) / "test.jsonl", test)
        manifest["sha256"] = {f: outputs.sha256(Path(tmp) / f) for f in ("train.jsonl", "test.jsonl")}
        outputs.write_json(Path(tmp) / "manifest.json", manifest)
    return manifest


def main(argv=None):
    """The command line under the contract: a user error is one line "error: ..." and exit status 2."""
    return cli.run(_main, argv)


def _main(argv=None):
    args = parse_args(argv)
    check_paths(args)
    m = prepare(args)
    print(f"{m['rows_read']} rows read, {m['dropped_empty']} empty dropped, {m['duplicates_removed']} duplicates "
          f"removed -> {m['n_train']} train / {m['n_test']} test in {args.out}")
    return m


if __name__ == "__main__":
    main()
