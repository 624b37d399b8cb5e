"""
.xlsx through openpyxl in read-only mode, for every script's reader (data.read_rows): the worksheet's rows are
streamed from the zip (MAQA has >400k rows), never loaded whole. Only the shared-string table is held in memory, as
Excel itself needs it. A sheet without a <dimension> element (Excel always writes one) is also read through once when
the workbook is opened, so a malformed one is reported then, without a row number.
"""
import cli


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
