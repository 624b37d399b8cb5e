"""Convert a downloaded Arabic medical Q/A corpus into the project's raw Q/A JSONL, with a seeded split.

Sources:
  maqa    MAQA (Harvard Dataverse doi:10.7910/DVN/Y2JBEZ) as downloaded: .csv, .tsv/.tab or .xlsx
          (the .xlsx is streamed with openpyxl's read-only mode). Pick the columns
          with --question-col / --answer-col (default: a column named question / answer, any case).
  apollo  FreedomIntelligence/ApolloCorpus, file train/sft/medicalPatient_ar.json: a JSON list of
          conversations [q1, a1, q2, a2, ...]; every (question, answer) turn pair becomes a record.
          --data may be a local copy; otherwise it is fetched with huggingface_hub.hf_hub_download.
  ahd     an AHD-style .csv / .xlsx with question and answer columns (same handling as maqa).

Steps: read -> (optional --normalize [orthographic], Arabic normalisation of the questions) -> drop empty Q/A ->
de-duplicate on the normalised question + answer (first kept) -> (optional --normalize dialect: dialect words of the
questions -> MSA, data/dialect_rules.txt) -> seeded shuffle -> test = first --n-test, train = next
--n-train (the test set does not change when --n-train changes) -> (optional --normalize-answers train|all:
the answers of train.jsonl, or of both files, normalised too). With fewer rows than asked for, an explicit
--n-test is kept exactly and training takes the rest; with the default --n-test the split is proportional. A note
is printed either way. The answers of test.jsonl are the references that score the model: they stay the doctors'
text (as the paper scored it) unless --normalize-answers all.

Writes <out>/train.jsonl, <out>/test.jsonl ({"question", "answer"} records, plus severity fields when
the input had probability/severity columns) and <out>/manifest.json. annotate.py then adds p_nc, p_n,
p_c and severity. Bad input: one line "error: <file>:<line>: <field>: <problem>", exit 2, nothing written.

Example:
    python data/prepare.py --source maqa --data MAQA.xlsx --question-col q_body --answer-col a_body --out out/maqa
    python data/prepare.py --source apollo --out out/apollo --n-train 30000 --n-test 2000
"""
import os
import random
import re
import sys
import unicodedata
from pathlib import Path

if __package__ in (None, ""):  # run as `python data/prepare.py`: make `import data` work
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cli  # noqa: E402

cli.start(__name__)   # Ctrl-C while starting, a safe console, matplotlib's cache (see cli.start)
import data  # noqa: E402
import outputs  # noqa: E402

APOLLO_REPO = "FreedomIntelligence/ApolloCorpus"
APOLLO_FILE = "train/sft/medicalPatient_ar.json"
ANSWER_CHOICES = ("none", "train", "all")   # --normalize-answers

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


# Ligatures that Unicode gives no compatibility decomposition (NFKC leaves them), spelled out; ﷼ is listed because
# its NFKC form is spelled with the Persian yeh.
LIGATURES = str.maketrans({"\uFDFD": "بسم الله الرحمن الرحيم", "\uFDFC": "ريال"})


def unicode_fold(text):
    """Unicode normalisation before any rule of the project: NFKC (compatibility composition). One spelling per
    character: a decomposed hamza or madda (و + U+0654) becomes the precomposed letter (ؤ), presentation forms and
    ligatures (ﻻ, ﷲ, ﷺ, isolated/initial/final letter forms) become the letters, fullwidth and other compatibility
    digits ASCII digits, a no-break space a space. (camel-tools' normalize_unicode is this step; tests/golden.)"""
    return unicodedata.normalize("NFKC", text.translate(LIGATURES))


def normalize_arabic(text):
    """Normalise Arabic text: Unicode NFKC first (unicode_fold), then remove URLs, emoji, invisible format characters
    (INVISIBLE_RE), diacritics and tatweel; unify alef variants, alef maqsura and taa marbuta; collapse all
    whitespace (newlines included) to single spaces."""
    text = unicode_fold(text)
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


# The de-duplication key folds more than the text's normalisation: every decimal digit to its ASCII digit
# (Arabic-Indic ٠-٩, Persian ۰-۹; NFKC already did the fullwidth and other compatibility ones) and the Persian
# letters that stand in for Arabic ones in typed Arabic (keheh ک -> ك, Farsi yeh ی -> ي, and their ﮎ-style forms
# after NFKC). "٣٨" and "38", "کحة" and "كحة" are one text to a reader.
KEY_MAP = str.maketrans({**{chr(0x0660 + i): str(i) for i in range(10)}, **{chr(0x06F0 + i): str(i) for i in range(10)},
                         "\u06A9": "\u0643", "\u06CC": "\u064A"})


def text_key(text):
    """One text's de-duplication key: normalize_arabic (NFKC, then the project's rules), digits and Persian
    letters folded (KEY_MAP), case-folded."""
    return normalize_arabic(text).translate(KEY_MAP).casefold()


def dedup_key(q, a):
    """Two pairs are duplicates when their keys (text_key: normalised, digits and Persian letters folded,
    case-folded) of question and answer match."""
    return text_key(q), text_key(a)


# ----------------------------------------------------------------------------------------------
# Sources -> list of (line, {"question", "answer", ...}) raw rows

def read_table(path, qcol, acol, sheet):
    """Rows of a CSV/TSV/JSONL/JSON/XLSX file with the chosen question/answer columns renamed (data.read_table)."""
    return data.read_table(path, {"question": (qcol, "--question-col"), "answer": (acol, "--answer-col")}, sheet=sheet)


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
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--source", choices=("maqa", "apollo", "ahd"), default="maqa",
                   help="corpus the input comes from (decides how it is read); default maqa")
    p.add_argument("--data", dest="input", default=None,
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
                        "orthographic: Unicode NFKC; URLs, emoji, invisible marks (RLM, ZWNJ, ...), diacritics, "
                        "tatweel removed; alef/yaa/taa-marbuta unified; whitespace collapsed (questions; answers only with "
                        "--normalize-answers). dialect: the dialect words of "
                        "--dialect-rules replaced by MSA (questions only). Both: --normalize orthographic dialect")
    p.add_argument("--normalize-answers", choices=ANSWER_CHOICES, default="none",
                   help="which answers --normalize orthographic also rewrites: none (default: the doctors' text "
                        "as the paper scored it), train (train.jsonl's answers, what the model learns to write; the "
                        "test references stay raw), all (the test references too: scores are then not comparable "
                        "with raw-reference runs)")
    p.add_argument("--dialect-rules", default=None,
                   help="rules table of --normalize dialect, one 'dialect form = MSA form' per line "
                        "(default: data/dialect_rules.txt)")
    p.add_argument("--seed", type=num(int, lo=0), default=1234, help="seed of the shuffle before the split")
    p.add_argument("--n-train", type=num(int, lo=0), default=30000, help="training pairs to keep (paper: 30,000)")
    p.add_argument("--n-test", type=num(int, lo=0), default=2000, help="test pairs to keep (paper: 2,000)")
    p.add_argument("--revision", default=None, help="apollo only: hub revision (commit) to download")
    p.alias("--input", "--data")   # the old spelling, one release
    args = p.parse_args(argv)
    # an explicit --n-test is honoured exactly even on small data (split_sizes); the default one is scaled down
    args.n_test_given = any(str(a) == "--n-test" or str(a).startswith("--n-test=")
                            for a in (sys.argv[1:] if argv is None else argv))
    if args.n_train == 0 and args.n_test == 0:
        p.error("--n-train and --n-test are both 0: nothing to write")
    if args.source != "apollo" and args.input is None:
        p.error(f"--data is required for --source {args.source}")
    args.normalize = ["orthographic"] if args.normalize == [] else (args.normalize or [])  # bare flag: as before
    # a flag that would be ignored is refused: the user meant something this run would not do
    if args.sheet is not None and not str(args.input or "").lower().endswith(".xlsx"):
        p.error("--sheet applies to an .xlsx --data only")
    if args.normalize_answers != "none" and "orthographic" not in args.normalize:
        p.error(f"--normalize-answers {args.normalize_answers} needs --normalize orthographic")
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
        cli.input_file(args.input, "--data")
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
        # A local file is used as is; otherwise --data (default: the MAQA-derived file) names the
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
        # the answer is normalised here only to decide emptiness and duplicates: the same pairs and split whatever
        # --normalize-answers says; it is rewritten (or not) after the split
        ortho = "orthographic" in args.normalize
        if ortho:
            q = normalize_arabic(q) if isinstance(q, str) else q
        a_seen = normalize_arabic(a) if ortho and isinstance(a, str) else a
        if isinstance(q, str) and isinstance(a, str) and (not q.strip() or not a_seen.strip()):
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
        raise cli.UserError("--data", f"{origin}: only {len(recs)} usable pairs after cleaning ({len(rows)} rows "
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
    for split, on in ((train, ("train", "all")), (test, ("all",))):
        if args.normalize_answers in on:
            for r in split:
                r["answer"] = normalize_arabic(r["answer"])
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
        "normalize": "orthographic" in args.normalize,        # the questions
        "normalize_answers": args.normalize_answers,
        # what the answers of each file are: "raw" (the doctors' text) or "orthographic"; test's are the references
        # that score the model, and runs scored against differently normalised references are not comparable
        "answers": {"train": "orthographic" if args.normalize_answers in ("train", "all") else "raw",
                    "test": "orthographic" if args.normalize_answers == "all" else "raw"},
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
