"""
The statistics of the evaluation and the reports, in one place (numpy only): percentile bootstrap intervals, the
per-severity summaries of evaluate.py, the paired sign-flip permutation test and paired bootstrap of
`report.py compare`, Holm's step-down adjustment of `report.py table --holm`, and how a cell is written.
"""
import numpy as np

import data

GROUPS = ("overall",) + tuple(data.SEVERITIES)
METRICS = ("precision", "recall", "f1")
PERMUTATIONS = 10000   # random sign flips of the paired permutation test (--permutations)


def bootstrap_ci(values, n_boot=1000, seed=0, denom=None, level=0.95):
    """Percentile interval of the mean of `values` (or of sum(values) / sum(denom), a ratio of sums, when denom is
    given) over n_boot resamples of the examples with replacement. (None, None) without data or resamples."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0 or n_boot <= 0:
        return None, None
    d = None if denom is None else np.asarray(denom, dtype=np.float64)
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    rows = max(1, (1 << 22) // n)                          # resample in blocks: at most ~4M indices at once
    for s in range(0, n_boot, rows):
        k = min(rows, n_boot - s)
        idx = rng.integers(0, n, size=(k, n))
        stats[s:s + k] = x[idx].mean(1) if d is None else x[idx].sum(1) / d[idx].sum(1)
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(stats, [a, 100 - a])
    return float(lo), float(hi)


def summarize(values, severities, n_boot=1000, seed=0, denom=None):
    """{group: {mean, lo, hi, n}} for 'overall' and each severity class present. mean = mean of values over the
    group's examples (or sum(values) / sum(denom) with denom: a token-weighted mean)."""
    values = np.asarray(values, dtype=np.float64)
    sev = np.asarray(severities)
    out = {}
    for g in GROUPS:
        sel = np.ones(len(values), bool) if g == "overall" else sev == g
        if denom is not None:
            sel &= np.asarray(denom) > 0
        if not sel.any():
            continue
        v = values[sel]
        d = None if denom is None else np.asarray(denom, dtype=np.float64)[sel]
        mean = float(v.mean()) if d is None else float(v.sum() / d.sum())
        lo, hi = bootstrap_ci(v, n_boot, seed, d)
        out[g] = {"mean": mean, "lo": lo, "hi": hi, "n": int(sel.sum())}
        if d is not None:
            out[g]["tokens"] = int(d.sum())
    return out


def derangement(n, seed):
    """A seeded permutation of range(n) with no fixed point (n >= 2): a cyclic shift of a random order."""
    order = np.random.default_rng(seed).permutation(n)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = np.roll(order, 1)
    return perm.tolist()


def score_table(prf, severities, n_boot, seed):
    """P, R, F1 (x 100) summaries from an (N, 3) array in [0, 1]."""
    return {m: summarize(prf[:, j] * 100, severities, n_boot, seed) for j, m in enumerate(METRICS)}


def sign_flip_p(values, n_perm=10000, seed=0):
    """Two-sided p-value of the paired sign-flip permutation test of "sum(values) is 0": under the null each
    example's difference is as likely to have the other sign, so p = P(|sum_i s_i v_i| >= |sum_i v_i|) over signs
    s_i = +-1. A ratio statistic sum(v) / sum(denom) has the same p (the denominator does not flip).

    Exact when 2^n <= n_perm: every sign vector once (the identity included). Otherwise n_perm random sign vectors,
    signs = 2 * rng.integers(0, 2, size=(n_perm, n)) - 1 with rng = np.random.default_rng(seed) drawn in one block,
    and p = (1 + hits) / (1 + n_perm), which never reports 0. Ties within 1e-9 of |sum v| count as extreme."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n == 0:
        return None
    t = abs(v.sum())
    tol = 1e-9 * max(1.0, np.abs(v).sum())
    if n <= 62 and (1 << n) <= n_perm:
        codes = np.arange(1 << n, dtype=np.int64)[:, None]                 # (2^n, 1): bit i = sign of example i
        signs = 1 - 2 * ((codes >> np.arange(n)) & 1)                       # (2^n, n) in {+1, -1}
        return float((np.abs(signs @ v) >= t - tol).mean())
    rng = np.random.default_rng(seed)
    hits = 0
    rows = max(1, (1 << 22) // n)                                           # blocks of at most ~4M signs
    for s in range(0, n_perm, rows):
        k = min(rows, n_perm - s)
        signs = 2 * rng.integers(0, 2, size=(k, n)) - 1
        hits += int((np.abs(signs @ v) >= t - tol).sum())
    return (1 + hits) / (1 + n_perm)


def paired_diff(a, b, n_boot=1000, seed=0, n_perm=10000, denom=None):
    """Paired difference B - A over the same examples: {mean_a, mean_b, diff, lo, hi, p, n}.
    Without denom: per-example d_i = b_i - a_i, diff = mean(d), its percentile bootstrap interval (bootstrap_ci,
    level 0.95) and the sign-flip p-value of d. With denom (answer tokens n_i, equal in both runs): the ratio of sums
    the eval.json NLL reports, diff = sum(n_i d_i) / sum(n_i), bootstrapped and permuted as that same statistic."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if denom is None:
        v, den = b - a, None
        ma, mb, diff = float(a.mean()), float(b.mean()), float(v.mean())
    else:
        den = np.asarray(denom, dtype=np.float64)
        v = (b - a) * den
        ma, mb = float((a * den).sum() / den.sum()), float((b * den).sum() / den.sum())
        diff = float(v.sum() / den.sum())
    lo, hi = bootstrap_ci(v, n_boot, seed, den)
    return {"mean_a": ma, "mean_b": mb, "diff": diff, "lo": lo, "hi": hi, "p": sign_flip_p(v, n_perm, seed),
            "n": int(len(v))}


def holm(ps):
    """Holm's step-down adjusted p-values, in the order given: with the m p-values sorted p_(1) <= ... <= p_(m),
    adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)). Controls the family-wise error rate at any level."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    out, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        out[i] = running
    return out


def holm_marks(marks):
    """marks {(group, row, col): p} with each group's (one table's) p-values Holm-adjusted among themselves."""
    out = {}
    for g in {k[0] for k in marks}:
        keys = [k for k in marks if k[0] == g]
        out.update(zip(keys, holm([marks[k] for k in keys])))
    return out


def fmt_cell(d, digits=2):
    if d.get("std") is not None:
        return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"
    if d.get("lo") is not None:
        return f"{d['mean']:.{digits}f} [{d['lo']:.{digits}f}, {d['hi']:.{digits}f}]"
    return f"{d['mean']:.{digits}f}"
