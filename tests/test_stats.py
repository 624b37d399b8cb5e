"""The statistics of evaluate.py pinned to exact values computed independently here: the bootstrap intervals (the
same seeded resamples, numpy's percentiles), the per-severity NLL interval (a ratio of sums, like its point
estimate), the paired sign-flip test and bootstrap of --compare, and the --table significance marks."""
import itertools
import json
import os

import numpy as np
import pytest

import stats
import report
from test_evaluate import env, expect_exit2, read_jsonl, run_eval  # noqa: F401


def resampled(n, n_boot, seed):
    """The resample indices bootstrap_ci draws: one block of n_boot x n from default_rng(seed)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def pct95(stats):
    return tuple(np.percentile(stats, [2.5, 97.5]))


def test_bootstrap_interval_is_the_95_percentile_interval_of_seeded_resamples():
    x = np.random.default_rng(7).lognormal(0, 1.5, size=37)            # skewed: the interval is not symmetric
    idx = resampled(37, 500, 3)
    want = pct95([x[row].mean() for row in idx])                         # row by row, in plain Python
    assert stats.bootstrap_ci(x, 500, 3) == pytest.approx(want, rel=1e-12)
    ninety = tuple(np.percentile([x[row].mean() for row in idx], [5, 95]))
    assert abs(want[0] - ninety[0]) > 0.01 and abs(want[1] - ninety[1]) > 0.01, "test set-up: 90% != 95%"
    # summarize: the group's mean and the same interval over the group's examples only
    sev = np.array(["critical", "neutral"] * 18 + ["critical"])
    s = stats.summarize(x, sev, 500, 3)
    crit = x[sev == "critical"]
    assert s["critical"]["mean"] == pytest.approx(crit.mean(), rel=1e-12)
    idx = resampled(len(crit), 500, 3)
    assert (s["critical"]["lo"], s["critical"]["hi"]) == pytest.approx(pct95([crit[r].mean() for r in idx]), rel=1e-12)


def test_nll_interval_is_a_ratio_of_sums_like_its_point_estimate():
    """Per-example NLL sums and answer-token counts, skewed: long answers have a low NLL per token, short ones a high
    one. The point estimate is sum(NLL) / sum(tokens); the interval must bootstrap that same statistic. The mean of
    per-example ratios is far from it here, so an interval of that other statistic would not match."""
    rng = np.random.default_rng(11)
    tokens = np.where(rng.random(40) < 0.25, 200, 4).astype(float)
    per_tok = np.where(tokens > 100, 1.0, 6.0) + rng.normal(0, 0.3, 40)
    sums = per_tok * tokens
    sev = np.array(["non-critical", "neutral", "critical", "critical"] * 10)
    s = stats.summarize(sums, sev, 400, 5, denom=tokens)
    for g in ("overall", "critical"):
        sel = np.ones(40, bool) if g == "overall" else sev == g
        x, d = sums[sel], tokens[sel]
        idx = resampled(len(x), 400, 5)
        want = pct95([x[r].sum() / d[r].sum() for r in idx])
        assert s[g]["mean"] == pytest.approx(x.sum() / d.sum(), rel=1e-12)
        assert (s[g]["lo"], s[g]["hi"]) == pytest.approx(want, rel=1e-12)
        assert s[g]["lo"] <= s[g]["mean"] <= s[g]["hi"]
        other = pct95([(x[r] / d[r]).mean() for r in idx])                # the mean of ratios: another statistic
        assert other[0] > want[1], "test set-up: the two statistics must differ"


def test_sign_flip_p_exact_by_enumeration():
    def by_hand(d):
        t = abs(sum(d))
        hits = sum(abs(sum(s * v for s, v in zip(signs, d))) >= t - 1e-9
                   for signs in itertools.product((1, -1), repeat=len(d)))
        return hits / 2 ** len(d)
    assert stats.sign_flip_p([1, 2, 3, 4, 5, 6], n_perm=10000) == 2 / 64       # only the identity and all flipped
    for d in ([1.5, -0.5, 2.0, 0.0, -1.0], [3, -3, 1, 1, 1, 1, -2], [0.2] * 3 + [-0.1] * 4):
        assert stats.sign_flip_p(d, n_perm=10000) == pytest.approx(by_hand(d), abs=1e-15)
    assert stats.sign_flip_p([1, -1, 2, -2]) == 1.0                              # sum 0: every flip is as extreme


def test_sign_flip_p_random_flips_seeded():
    v = np.random.default_rng(2).normal(0.3, 1.0, size=25)                  # 2^25 > n_perm: random flips
    signs = 2 * np.random.default_rng(9).integers(0, 2, size=(999, 25)) - 1
    t = abs(v.sum())
    hits = sum(abs(float(np.dot(row, v))) >= t - 1e-9 * np.abs(v).sum() for row in signs)
    assert stats.sign_flip_p(v, n_perm=999, seed=9) == (1 + hits) / 1000
    assert stats.sign_flip_p(np.full(25, 0.5), n_perm=999) == 1 / 1000         # nothing as extreme: never 0


def test_paired_diff_by_hand():
    rng = np.random.default_rng(4)
    a = rng.normal(60, 5, 30)
    b = a + rng.normal(0.8, 2, 30)
    got = stats.paired_diff(a, b, 300, 6, 10000)
    d = b - a
    idx = resampled(30, 300, 6)
    assert got["diff"] == pytest.approx(d.mean(), rel=1e-12)
    assert got["mean_b"] - got["mean_a"] == pytest.approx(d.mean(), rel=1e-9)
    assert (got["lo"], got["hi"]) == pytest.approx(pct95([d[r].mean() for r in idx]), rel=1e-12)
    assert got["p"] == stats.sign_flip_p(d, 10000, 6)
    # with answer-token counts: the ratio of sums, bootstrapped as that ratio
    n = rng.integers(1, 50, 30).astype(float)
    got = stats.paired_diff(a, b, 300, 6, 10000, denom=n)
    assert got["diff"] == pytest.approx((d * n).sum() / n.sum(), rel=1e-12)
    assert (got["lo"], got["hi"]) == pytest.approx(pct95([(d * n)[r].sum() / n[r].sum() for r in idx]), rel=1e-12)


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


@pytest.mark.parametrize("values, n_perm", [
    ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 10000),                      # exact branch (2^6 <= n_perm), all one sign
    ([0.3, -1.2, 2.5, 0.7, -0.4, 1.1, 0.9], 10000),                # exact branch, mixed signs
    (list(np.full(25, 0.5)), 999),                                 # sampled branch, all one sign
    (list(np.random.default_rng(4).normal(0.3, 1, 30)), 2000),     # sampled branch, mixed signs
])
def test_sign_flip_p_is_symmetric_in_the_sign(values, n_perm):
    """A degradation is as significant as the same improvement: p(-d) == p(d) on both branches (issue 18: without
    abs() on the observed sum every negative difference got p = 1)."""
    v = np.array(values)
    assert stats.sign_flip_p(-v, n_perm, seed=3) == stats.sign_flip_p(v, n_perm, seed=3) < 0.5


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04, 0.2 -> 4 x 0.01 = 0.04; 3 x 0.03 = 0.09; max(0.09, 2 x 0.04) = 0.09; max(0.09, 0.2)
    assert stats.holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2], abs=1e-15)
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])                  # capped at 1
    assert stats.holm([]) == []


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
