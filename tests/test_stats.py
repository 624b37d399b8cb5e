"""The statistics of evaluate.py pinned to exact values computed independently here: the bootstrap intervals (the
same seeded resamples, numpy's percentiles), the per-severity NLL interval (a ratio of sums, like its point
estimate), the paired sign-flip test, the paired bootstrap difference and Holm's correction."""
import itertools

import numpy as np
import pytest

import stats

from conftest import pct95, resampled


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
