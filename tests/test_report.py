"""report.py over finished runs: table (rows, columns, seeds, significance marks, Holm) and compare; each command
refuses the flags it does not read."""
import json
import os

import numpy as np
import pytest

import evaluate as E
import report
import stats

from conftest import expect_exit2, pct95, read_jsonl, resampled, run_eval
import matplotlib.container


# -- --compare and --table on real eval folders -----------------------------------------------------------------


def test_compare_two_runs(env, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    fast = ("--n", "9", "--max-new-tokens", "8")
    run_eval(env, a, "--seed", "0", "--bootstrap", "200", *fast)
    run_eval(env, b, "--seed", "0", "--bootstrap", "200", "--model", env["run"], *fast)
    out = tmp_path / "cmp"
    res = report.main(["compare", str(a), str(b / "eval.json"), "--out", str(out), "--bootstrap", "200",
                  "--bootstrap-seed", "1", "--permutations", "5000"])
    saved = json.load(open(out / "compare.json", encoding="utf-8"))
    assert saved["diff"] == json.loads(json.dumps(res["diff"]))
    ra, rb = read_jsonl(a / "predictions.jsonl"), read_jsonl(b / "predictions.jsonl")
    d = np.array([y["f1"] - x["f1"] for x, y in zip(ra, rb)])
    crit = np.array([x["severity"] == "critical" for x in ra])
    for g, sel in (("overall", np.ones(len(d), bool)), ("critical", crit)):
        got = res["diff"]["f1"][g]
        assert got["diff"] == pytest.approx(d[sel].mean(), rel=1e-9)
        idx = resampled(int(sel.sum()), 200, 1)
        assert (got["lo"], got["hi"]) == pytest.approx(pct95([d[sel][r].mean() for r in idx]), rel=1e-9)
        assert got["p"] == pytest.approx(stats.sign_flip_p(d[sel], 5000, 1), abs=1e-15)
    # NLL: the ratio of sums over answer tokens, as eval.json's own NLL
    tok = np.array([x["nll_tokens"] for x in ra], float)
    dn = np.array([y["nll"] - x["nll"] for x, y in zip(ra, rb)])
    assert res["diff"]["nll"]["overall"]["diff"] == pytest.approx((dn * tok).sum() / tok.sum(), rel=1e-9)
    assert res["diff"]["nll_example_mean"]["overall"]["diff"] == pytest.approx(dn.mean(), rel=1e-9)
    assert saved["nll_statistic"].startswith("token-weighted ratio of sums")
    ea = json.load(open(a / "eval.json", encoding="utf-8"))
    assert res["diff"]["nll"]["overall"]["mean_a"] == pytest.approx(ea["nll"]["overall"]["mean"], rel=1e-9)
    assert "| f1 | overall |" in capsys.readouterr().out

    # refusals: different data, scorer or protocol -> one line, exit 2, nothing written
    for key, sub, val, needle in (("data", "sha256", "0" * 64, "data sha256"), ("bertscore", "layer", 1, "scorer layer"),
                                  ("generation", "top_k", 7, "protocol top_k"), ("argv", "max_len", 40, "--max-len")):
        c = tmp_path / f"bad-{sub}"
        c.mkdir()
        ev = json.load(open(b / "eval.json", encoding="utf-8"))
        ev[key][sub] = val
        (c / "eval.json").write_text(json.dumps(ev), encoding="utf-8")
        (c / "predictions.jsonl").write_bytes((b / "predictions.jsonl").read_bytes())
        expect_exit2(capsys, ["compare", str(a), str(c), "--out", str(tmp_path / "never")], needle, main=report.main)
    c = tmp_path / "bad-rows"
    c.mkdir()
    (c / "eval.json").write_bytes((b / "eval.json").read_bytes())
    expect_exit2(capsys, ["compare", str(a), str(c), "--out", str(tmp_path / "never")], "predictions.jsonl",
                 "no such file", main=report.main)
    (c / "predictions.jsonl").write_text('{"index": 0, "f1": 1}\n', encoding="utf-8")
    expect_exit2(capsys, ["compare", str(a), str(c), "--out", str(tmp_path / "never")], "predictions.jsonl:1: row", main=report.main)
    assert not (tmp_path / "never").exists()


def fake_run(folder, setting, f1s, sev, name="m"):
    """An eval folder: eval.json (the keys --table and --compare read) + predictions.jsonl with these F1 values."""
    os.makedirs(folder, exist_ok=True)
    cell = {"mean": float(np.mean(f1s)), "lo": None, "hi": None, "n": len(f1s)}
    ev = {"setting": setting, "model": {"name": name, "weights": None},
          "data": {"sha256": "x", "n": len(f1s)}, "bertscore": {"model": "s", "layer": 2},
          "generation": {"mode": "sampled", "seeds": [0], "repeat": 1},
          "scores": {m: {g: cell for g in stats.GROUPS} for m in stats.METRICS}, "nll": {g: cell for g in stats.GROUPS}}
    with open(os.path.join(folder, "eval.json"), "w", encoding="utf-8") as f:
        json.dump(ev, f)
    with open(os.path.join(folder, "predictions.jsonl"), "w", encoding="utf-8") as f:
        for i, (v, s) in enumerate(zip(f1s, sev)):
            f.write(json.dumps({"index": i, "seed": 0, "question": f"q{i}", "reference": f"r{i}", "severity": s,
                                "precision": v, "recall": v, "f1": v, "nll": 2.0, "nll_tokens": 5}) + "\n")
    return os.path.join(folder, "eval.json")


def test_table_marks_cells_that_differ_from_ce(tmp_path, capsys):
    """Balanced = CE + 3 on every answer (6 per class: exact p = 2 / 2^6 = 0.031, marked); Mild = CE +- 1
    alternately (a zero sum in every group: p = 1, not marked). Marks come from the paired test, not from the
    widths of the cells' own intervals (which overlap here: the answers' spread is 10)."""
    rng = np.random.default_rng(0)
    ce = rng.normal(50, 10, 18)
    sev = ["critical", "neutral", "non-critical"] * 6
    files = [fake_run(tmp_path / "ce", "CE", ce, sev), fake_run(tmp_path / "bal", "Balanced", ce + 3, sev),
             fake_run(tmp_path / "mild", "Mild", ce + np.tile([1, -1], 9), sev)]
    report.main(["table", *files, "--bootstrap", "0"])
    lines = capsys.readouterr().out.splitlines()
    m = f"{ce.mean():.2f}"
    assert f"| m | - | {m} | {ce.mean():.2f} | - | {ce.mean() + 3:.2f} * |" in lines
    crit = lines.index("### BERTScore F1 (x100), severity class: critical")
    row = lines[crit + 4]
    assert row.endswith(" * |") and row.count("*") == 1
    assert any("Tested against CE: 8 cells" in ln for ln in lines)


def test_table_marks_a_worse_setting_and_holm_corrects(tmp_path, capsys):
    """Strong = CE - 3 on every answer is marked like Balanced = CE + 3 (6 per class: exact p = 2 / 64 = 0.031 each).
    With --holm the two cells of each class's table get 2 x 0.031 = 0.0625: unmarked; overall (18 answers, p about
    1e-4, doubled) stays marked."""
    rng = np.random.default_rng(0)
    ce = rng.normal(50, 10, 18)
    sev = ["critical", "neutral", "non-critical"] * 6
    files = [fake_run(tmp_path / "ce", "CE", ce, sev), fake_run(tmp_path / "bal", "Balanced", ce + 3, sev),
             fake_run(tmp_path / "strong", "Strong", ce - 3, sev)]
    report.main(["table", *files, "--bootstrap", "0"])
    lines = capsys.readouterr().out.splitlines()
    crit = lines.index("### BERTScore F1 (x100), severity class: critical")
    assert lines[crit + 4].count(" *") == 2, "the worse setting is marked too"
    assert f"| {ce.mean() - 3:.2f} * | {ce.mean() + 3:.2f} * |" in lines[3 + 1]
    assert any("not corrected" in ln for ln in lines)
    report.main(["table", *files, "--bootstrap", "0", "--holm"])
    lines = capsys.readouterr().out.splitlines()
    crit = lines.index("### BERTScore F1 (x100), severity class: critical")
    assert " *" not in lines[crit + 4]
    assert f"| {ce.mean() - 3:.2f} * | {ce.mean() + 3:.2f} * |" in lines[3 + 1]
    assert any("Holm-adjusted" in ln and "6 marked" not in ln and "2 marked" in ln for ln in lines)


# -- comparison table --------------------------------------------------------------------------------------------


def fake_eval(path, name, setting, f1, weights=None):
    cell = lambda m: {"mean": m, "lo": m - 1, "hi": m + 1, "n": 10}   # noqa: E731
    ev = {"setting": setting, "model": {"name": name, "weights": weights},
          "data": {"counts": {"overall": 10, "non-critical": 4, "neutral": 3, "critical": 3}},
          "scores": {m: {"overall": cell(f1), "non-critical": cell(f1 - 2), "neutral": cell(f1 + 1),
                         "critical": cell(f1 + 3)} for m in stats.METRICS},
          "nll": {g: cell(2.5) for g in stats.GROUPS}}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(ev, f)
    return str(path)


def test_table_rows_and_columns(tmp_path, capsys):
    files = [fake_eval(tmp_path / "a" / "eval.json", "aragpt2-base", "Base", 54.0),
             fake_eval(tmp_path / "b" / "eval.json", "aragpt2-base", "Balanced", 66.5),
             fake_eval(tmp_path / "c" / "eval.json", "tiny", "CE", 30.25)]
    plot = tmp_path / "plots" / "t.png"
    report.main(["table", *files, "--paper", "--plot", str(plot)])
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = "| model | Base | CE | Mild | Strong | Balanced |"
    assert lines.count(header) == 4                          # all answers + three severity classes
    assert "| aragpt2-base | 54.00 [53.00, 55.00] | - | - | - | 66.50 [65.50, 67.50] |" in lines
    assert "| tiny | - | 30.25 [29.25, 31.25] | - | - | - |" in lines
    assert "| AraGPT2-Base (paper) | 54.04 | 59.71 | 59.75 | 65.91 | 66.14 |" in lines
    crit = lines.index("### BERTScore F1 (x100), severity class: critical")
    assert lines[crit + 4] == "| aragpt2-base | 57.00 [56.00, 58.00] | - | - | - | 69.50 [68.50, 70.50] |"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_aggregates_seeds_and_custom_weights(tmp_path, capsys):
    files = [fake_eval(tmp_path / f"s{i}" / "eval.json", "tiny", "CE", v) for i, v in enumerate((10.0, 12.0, 14.0))]
    files.append(fake_eval(tmp_path / "w" / "eval.json", "tiny", "custom", 11.0, weights=[0.3, 1, 2]))
    report.main(["table", *files, "--paper"])
    lines = capsys.readouterr().out.splitlines()
    assert "| Qwen3-0.6B | 60.43 | 61.40 | 62.87 | 62.53 | 65.06 |" in lines   # no paper row for tiny: whole table
    assert "| model | Base | CE | Mild | Strong | Balanced | w=0.3,1,2 |" in lines
    assert "| tiny | - | 12.00 ± 2.00 (k=3) | - | - | - | 11.00 [10.00, 12.00] |" in lines


def test_paper_rows_by_registry_name_or_repo_id():
    assert report.paper_key("aragpt2-base") == "aragpt2-base"
    assert report.paper_key("Qwen2.5-0.5B") == "qwen2.5-0.5b"          # args.json model = "Qwen/Qwen2.5-0.5B"
    assert report.paper_key("bloomz-560m") == "bloomz-560m"
    assert report.paper_key("tiny") is None and report.paper_key("bloom-560m") is None


# Each command reads its own flags only: a flag of another command is argparse's one-line error, exit 2.
COMMAND_ARGV = {"evaluate": (lambda a: E.main(a), ["--model", "tiny"]),
                "table": (lambda a: report.main(a), ["table", "a/eval.json"]),
                "compare": (lambda a: report.main(a), ["compare", "a", "b", "--out", "o"])}
FLAG_VALUE = {"plot": ["--plot", "p.png"], "paper": ["--paper"], "holm": ["--holm"], "metric": ["--metric", "f1"],
              "out": ["--out", "o"], "greedy": ["--greedy"], "n": ["--n", "3"]}
READ_BY = {"plot": {"table"}, "paper": {"table"}, "holm": {"table"}, "metric": {"table"}, "out": {"evaluate", "compare"},
           "greedy": {"evaluate"}, "n": {"evaluate"}}


@pytest.mark.parametrize("flag", sorted(FLAG_VALUE))
@pytest.mark.parametrize("command", sorted(COMMAND_ARGV))
def test_each_command_refuses_flags_it_does_not_read(flag, command, capsys):
    """A flag given to a command that does not read it is refused in one line naming it, never silently dropped."""
    if command in READ_BY[flag]:
        return
    main, argv = COMMAND_ARGV[command]
    with pytest.raises(SystemExit) as e:
        main(argv + FLAG_VALUE[flag])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err and FLAG_VALUE[flag][0] in err, err


# -- the pictures: table.png and train_log.png ---------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n"


def cells_and_marks():
    rows, cols = ["aragpt2-base", "qwen2.5-0.5b"], ["CE", "Mild", "Balanced"]
    cells = {}
    for k, g in enumerate(("overall", "non-critical", "neutral", "critical")):
        cells[g] = {(r, c): {"mean": 60 + i + 2 * j + k, "lo": 58 + i + 2 * j + k, "hi": 63 + i + 2 * j + k, "n": 9}
                    for i, r in enumerate(rows) for j, c in enumerate(cols)}
    marks = {("overall", "aragpt2-base", "Balanced"): 0.01, ("critical", "qwen2.5-0.5b", "Mild"): 0.03,
             ("neutral", "aragpt2-base", "Mild"): 0.4}
    return rows, cols, cells, marks


def test_table_png_dots_intervals_marks_one_legend(tmp_path):
    rows, cols, cells, marks = cells_and_marks()
    path = tmp_path / "table.png"
    fig = report.save_plot(str(path), "f1", rows, cols, cells, marks)
    assert path.read_bytes().startswith(PNG)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["all answers", "non-critical", "neutral", "critical"]
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in axes)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == cols
    assert "p < 0.05" in fig.legends[0].get_title().get_text()
    for ax in axes:   # no bars: dots with whiskers, one errorbar series per setting; every whisker inside the axis
        assert not ax.patches
        assert all(isinstance(c, matplotlib.container.ErrorbarContainer) for c in ax.containers)
        assert len(ax.containers) == len(cols)
        lo, hi = ax.get_ylim()
        g = {"all answers": "overall"}.get(ax.get_title(), ax.get_title())
        assert lo <= min(d["lo"] for d in cells[g].values()) and hi >= max(d["hi"] for d in cells[g].values())
    stars = [(ax.get_title(), t.xy) for ax in axes for t in ax.texts if t.get_text() == "*"]
    assert len(stars) == 2   # p 0.01 and 0.03; 0.4 gets none
    (t1, (x1, y1)), (t2, (_, y2)) = sorted(stars)
    assert (t1, t2) == ("all answers", "critical")
    assert y1 == cells["overall"][("aragpt2-base", "Balanced")]["hi"]   # above its whisker
    assert y2 == cells["critical"][("qwen2.5-0.5b", "Mild")]["hi"]


def test_table_png_without_marks_has_no_note(tmp_path):
    rows, cols, cells, _ = cells_and_marks()
    fig = report.save_plot(str(tmp_path / "t.png"), "nll", rows, cols, cells)
    assert len(fig.legends) == 1 and fig.legends[0].get_title().get_text() == ""
    assert not [t for ax in fig.axes for t in ax.texts]
