"""Convert a downloaded Arabic medical Q/A corpus into the project's raw Q/A JSONL, with a seeded split.

Sources:
  maqa    MAQA (Harvard Dataverse doi:10.7910/DVN/Y2JBEZ) as downloaded: .csv, .tsv/.tab or .xlsx
          (the .xlsx is read by a small built-in reader; openpyxl is not needed). Pick the columns
          with --question-col / --answer-col (default: a column named question / answer, any case).
  apollo  FreedomIntelligence/ApolloCorpus, file train/sft/medicalPatient_ar.json: a JSON list of
          conversations [q1, a1, q2, a2, ...]; every (question, answer) turn pair becomes a record.
          --input may be a local copy; otherwise it is fetched with huggingface_hub.hf_hub_download.
  ahd     an AHD-style .csv / .xlsx with question and answer columns (same handling as maqa).

Steps: read -> (optional --normalize, Arabic normalisation) -> drop empty Q/A -> de-duplicate on the
normalised question + answer (first kept) -> seeded shuffle -> test = first --n-test, train = next
--n-train (the test set does not change when --n-train changes). With fewer rows than asked for, the
split is proportional and a note is printed.

Writes <out>/train.jsonl, <out>/test.jsonl ({"question", "answer"} records, plus severity fields when
the input had probability/severity columns) and <out>/manifest.json. annotate.py then adds p_nc, p_n,
p_c and severity. Bad input: one line "error: <file>:<line>: <field>: <problem>", exit 2, nothing written.

Example:
    python data/prepare.py --source maqa --input MAQA.xlsx --question-col q_body --answer-col a_body \\
        --normalize --out out/maqa
    python data/prepare.py --source apollo --out out/apollo --n-train 30000 --n-test 2000
"""
import argparse
import json
import random
import re
import sys
import zipfile
import xml.etree.ElementTree as ET
from pathlib import Path

if __package__ in (None, ""):  # run as `python data/prepare.py`: make `import data` work
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402

APOLLO_REPO = "FreedomIntelligence/ApolloCorpus"
APOLLO_FILE = "train/sft/medicalPatient_ar.json"

# ----------------------------------------------------------------------------------------------
# Arabic normalisation. Each rule is one line so it is easy to see (and test) what changes.

URL_RE = re.compile(r"(?:https?://|www\.)\S+")  # links: noise in social-media answers
# emoji & pictographs (incl. flags, dingbats, misc symbols), variation selector 16, zero-width joiner
EMOJI_RE = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF\uFE0F\u200D]")
# tashkeel (harakat, tanwin, shadda, sukun: U+064B-U+065F), superscript alef U+0670, Quranic marks
DIACRITICS_RE = re.compile("[\u0610-\u061A\u064B-\u065F\u0670\u06D6-\u06ED]")
TATWEEL = "\u0640"  # kashida used to stretch words: "طـــبيب" -> "طبيب"
LETTER_MAP = str.maketrans({
    "أ": "ا", "إ": "ا", "آ": "ا", "ٱ": "ا",  # alef with hamza above/below, madda, wasla -> bare alef
    "ى": "ي",                                # alef maqsura -> yaa (often written interchangeably)
    "ة": "ه",                                # taa marbuta -> haa (often written interchangeably)
})


def normalize_arabic(text):
    """Normalise Arabic text: remove URLs, emoji, diacritics and tatweel; unify alef variants,
    alef maqsura and taa marbuta; collapse all whitespace (newlines included) to single spaces."""
    text = URL_RE.sub(" ", text)
    text = EMOJI_RE.sub("", text)
    text = DIACRITICS_RE.sub("", text)
    text = text.replace(TATWEEL, "")
    text = text.translate(LETTER_MAP)
    return " ".join(text.split())


def dedup_key(q, a):
    """Two pairs are duplicates when their normalised, case-folded question and answer match."""
    return normalize_arabic(q).casefold(), normalize_arabic(a).casefold()


# ----------------------------------------------------------------------------------------------
# A tiny .xlsx reader: an .xlsx is a zip of XML parts. We need the first (or a named) worksheet,
# the shared-string table, and the cells' values as text. Tags are matched by local name so both
# the transitional and the strict OOXML namespaces work.

def _local(tag):
    return tag.rsplit("}", 1)[-1]


def _attr(el, name):
    """Attribute by local name (e.g. r:id), or None."""
    for k, v in el.attrib.items():
        if _local(k) == name:
            return v
    return None


def _col_index(ref):
    """'C12' -> 2 (0-based column)."""
    n = 0
    for ch in ref:
        if not ch.isalpha():
            break
        n = n * 26 + (ord(ch.upper()) - 64)
    return n - 1


def read_xlsx(path, sheet=None):
    """Rows of one worksheet as [(row number, {header: text})]; row 1 is the header."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise data.DataError(path, 1, "file", "not a valid .xlsx file (not a zip archive)") from None
    with zf:
        names = set(zf.namelist())
        try:
            wb = ET.fromstring(zf.read("xl/workbook.xml"))
            rels = ET.fromstring(zf.read("xl/_rels/workbook.xml.rels"))
        except (KeyError, ET.ParseError):
            raise data.DataError(path, 1, "file", "not a valid .xlsx file (no workbook)") from None
        sheets = [(s.get("name"), _attr(s, "id")) for s in wb.iter() if _local(s.tag) == "sheet"]
        if not sheets:
            raise data.DataError(path, 1, "sheet", "the workbook has no worksheets")
        if sheet is None:
            rid = sheets[0][1]
        else:
            match = [r for i, (n, r) in enumerate(sheets) if n == sheet or str(i + 1) == str(sheet)]
            if not match:
                raise data.DataError(path, 1, "sheet", f"no sheet {sheet!r} (sheets: {', '.join(n for n, _ in sheets)})")
            rid = match[0]
        target = next((r.get("Target") for r in rels.iter() if r.get("Id") == rid), None)
        if target is None:
            raise data.DataError(path, 1, "sheet", "worksheet part not found in the workbook")
        part = target.lstrip("/") if target.startswith("/") else "xl/" + target
        # Shared strings: a cell of type "s" holds an index into this list. A string may be split
        # into rich-text runs, so join every <t> under each <si>.
        shared = []
        if "xl/sharedStrings.xml" in names:
            for si in ET.fromstring(zf.read("xl/sharedStrings.xml")):
                if _local(si.tag) == "si":
                    shared.append("".join(t.text or "" for t in si.iter() if _local(t.tag) == "t"))
        rows, header = [], None
        with zf.open(part) as fh:
            for _, el in ET.iterparse(fh):  # streamed: MAQA has >400k rows
                if _local(el.tag) != "row":
                    continue
                rnum, vals = int(el.get("r") or len(rows) + 2), {}
                for i, c in enumerate(x for x in el if _local(x.tag) == "c"):
                    ctype, ref = c.get("t", "n"), c.get("r")
                    col = _col_index(ref) if ref else i
                    if ctype == "inlineStr":
                        val = "".join(t.text or "" for t in c.iter() if _local(t.tag) == "t")
                    else:
                        v = next((x.text or "" for x in c if _local(x.tag) == "v"), "")
                        val = shared[int(v)] if ctype == "s" and v else v
                    vals[col] = val
                el.clear()
                if header is None:
                    if any(v.strip() for v in vals.values()):
                        header = {i: v.strip() for i, v in vals.items()}
                elif any(v.strip() for v in vals.values()):
                    rows.append((rnum, {h: vals.get(i, "") for i, h in header.items()}))
    if not rows:
        raise data.DataError(path, 1, "file", "no records (empty sheet)")
    return rows


# ----------------------------------------------------------------------------------------------
# Sources -> list of (line, {"question", "answer", ...}) raw rows

def read_table(path, qcol, acol, sheet):
    """Rows of a CSV/TSV/JSONL/JSON/XLSX file with the chosen question/answer columns renamed."""
    rows = read_xlsx(path, sheet) if Path(path).suffix.lower() == ".xlsx" else data.read_rows(path)
    # Say early (at the header, line 1) when no question/answer column can be found.
    first = rows[0][1]
    for canon, col, flag in (("question", qcol, "--question-col"), ("answer", acol, "--answer-col")):
        if col is None and not any(data.FIELD_ALIASES.get(data._key(k)) == canon for k in first):
            raise data.DataError(path, 1, canon, f"no '{canon}' column (columns: {', '.join(map(str, first))}); "
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
                raise data.DataError(path, line, col, f"column not found (columns: {', '.join(map(str, row))})")
            picked[canon] = row[col]
        rest = {k: v for k, v in row.items()
                if k not in (qcol, acol) and not (data.FIELD_ALIASES.get(data._key(k)) in picked)}
        out.append((line, {**rest, **picked}))
    return out


def read_apollo(path):
    """ApolloCorpus conversations [q1, a1, q2, a2, ...] -> (line, {question, answer}) per turn pair.
    A trailing unpaired turn is dropped (counted). Items that are objects are read as rows."""
    items = data._json_items(path, data._decode(path))
    out, unpaired = [], 0
    for line, conv in items:
        if isinstance(conv, dict):
            out.append((line, conv))
            continue
        if not isinstance(conv, list) or not all(isinstance(t, str) for t in conv):
            raise data.DataError(path, line, "conversation", "expected a list of strings [q1, a1, q2, a2, ...]")
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
        raise data.DataError(f"hf://datasets/{APOLLO_REPO}/{filename}", 1, "download",
                             f"{type(e).__name__}: {e}") from None


def split_sizes(n, n_train, n_test):
    """(train, test) sizes: as asked when there are enough rows, else proportional."""
    if n >= n_train + n_test:
        return n_train, n_test, False
    test = round(n * n_test / max(1, n_train + n_test))
    if n_test > 0 and n >= 2:
        test = max(1, test)  # keep at least one test row
    return n - test, test, True


# ----------------------------------------------------------------------------------------------

def parse_args(argv):
    num = data.number
    p = data.ArgumentParser(description=__doc__.split("\n\n")[0],
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
    p.add_argument("--normalize", action="store_true",
                   help="apply Arabic normalisation to the written text (URLs, emoji, diacritics, tatweel "
                        "removed; alef/yaa/taa-marbuta unified; whitespace collapsed)")
    p.add_argument("--seed", type=num(int, lo=0), default=1234, help="seed of the shuffle before the split")
    p.add_argument("--n-train", type=num(int, lo=0), default=30000, help="training pairs to keep (paper: 30,000)")
    p.add_argument("--n-test", type=num(int, lo=0), default=2000, help="test pairs to keep (paper: 2,000)")
    p.add_argument("--revision", default=None, help="apollo only: hub revision (commit) to download")
    args = p.parse_args(argv)
    if args.n_train == 0 and args.n_test == 0:
        p.error("--n-train and --n-test are both 0: nothing to write")
    if args.source != "apollo" and args.input is None:
        p.error(f"--input is required for --source {args.source}")
    return args


def check_paths(args):
    """Input and every output path, before anything is read or written (nothing is replaced on a bad path)."""
    if args.source != "apollo" or (args.input is not None and Path(args.input).exists()):
        data.input_file(args.input, "--input")
    data.output_dir(args.out, "--out")
    for f in ("train.jsonl", "test.jsonl", "manifest.json"):
        data.output_file(str(Path(args.out) / f), "--out")


def prepare(args):
    """Do the work; returns the manifest. Raises data.DataError on bad input before writing anything."""
    unpaired = 0
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

    recs, seen, n_empty, n_dup = [], set(), 0, 0
    for line, row in rows:
        rec = {k: v for k, v in row.items()}
        # Empty Q/A are dropped (counted), not errors: scraped corpora have some. Everything else
        # (missing column, bad probabilities, unknown severity) is validated by the data contract.
        f = data._canonical_fields(path, line, rec, data.FIELD_ALIASES)
        q, a = (f.get(c, (None, None))[1] for c in ("question", "answer"))
        if args.normalize:
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
        recs.append(out)

    n_train, n_test, proportional = split_sizes(len(recs), args.n_train, args.n_test)
    if proportional:
        print(f"note: only {len(recs)} pairs after cleaning (asked for {args.n_train} + {args.n_test}); "
              f"split proportionally: {n_train} train / {n_test} test", file=sys.stderr)
    order = list(range(len(recs)))
    random.Random(args.seed).shuffle(order)
    test = [recs[i] for i in order[:n_test]]
    train = [recs[i] for i in order[n_test:n_test + n_train]]
    manifest = {
        "source": args.source,
        "input": origin,
        "input_sha256": data.sha256(path),
        "columns": {"question": args.question_col, "answer": args.answer_col},
        "sheet": args.sheet,
        "rows_read": len(rows),
        "dropped_empty": n_empty,
        "dropped_unpaired_turns": unpaired,
        "duplicates_removed": n_dup,
        "rows_after_dedup": len(recs),
        "has_severity": any("severity" in r for r in recs),
        "normalize": args.normalize,
        "seed": args.seed,
        "requested": {"n_train": args.n_train, "n_test": args.n_test},
        "proportional_split": proportional,
        "n_train": len(train),
        "n_test": len(test),
        "unused": len(recs) - len(train) - len(test),
    }
    out = Path(args.out)
    data.write_jsonl(out / "train.jsonl", train)
    data.write_jsonl(out / "test.jsonl", test)
    data.atomic_write(out / "manifest.json", json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")
    return manifest


def main(argv=None):
    """The command line under the contract: a user error is one line "error: ..." and exit status 2."""
    return data.run(_main, argv)


def _main(argv=None):
    args = parse_args(argv)
    check_paths(args)
    m = prepare(args)
    print(f"{m['rows_read']} rows read, {m['dropped_empty']} empty dropped, {m['duplicates_removed']} duplicates "
          f"removed -> {m['n_train']} train / {m['n_test']} test in {args.out}")
    return m


if __name__ == "__main__":
    main()
