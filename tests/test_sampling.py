"""model.sample draws by inverse CDF (one uniform per row) instead of torch.multinomial (one exponential per
vocabulary entry): it must sample the same distribution as the full-vocabulary sampler it replaced, for every
temperature / top_k / top_p. References: a plain-Python filter written here from the definitions (top-k keeps every
logit >= the k-th largest; top-p keeps the smallest prefix of the sorted probabilities whose mass reaches top_p), and
torch.multinomial itself, whose draws are compared with ours by frequency."""
import math

import pytest
import torch

import model as M


def reference_probs(row, temperature, top_k, top_p):
    """One row (list of floats) -> the full-vocabulary sampler's probabilities, in plain Python (float64)."""
    z = [x / temperature for x in row]
    keep = list(range(len(z)))
    if top_k:
        kth = sorted(z, reverse=True)[min(top_k, len(z)) - 1]
        keep = [i for i in keep if z[i] >= kth]
    m = max(z[i] for i in keep)
    e = {i: math.exp(z[i] - m) for i in keep}
    s = sum(e.values())
    p = {i: v / s for i, v in e.items()}
    if top_p is not None and top_p < 1.0:
        order = sorted(keep, key=lambda i: -z[i])   # stable: ties in index order, as torch's sort here
        mass, kept = 0.0, []
        for i in order:
            if mass > top_p:
                break
            kept.append(i)
            mass += p[i]
        s = sum(p[i] for i in kept)
        p = {i: p[i] / s for i in kept}
    return [p.get(i, 0.0) for i in range(len(z))]


COMBOS = [(t, k, p) for t in (0.3, 0.7, 1.0, 1.7) for k in (None, 1, 5, 40) for p in (None, 0.5, 0.9, 1.0)]


@pytest.mark.parametrize("temperature,top_k,top_p", COMBOS)
def test_filtered_probs_match_the_definition(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(int(temperature * 10) * 1000 + (top_k or 0) * 10 + int((top_p or 0) * 10))
    logits = torch.randn(6, 97, generator=g) * 3
    logits[0, :10] = 2.5                      # ties at the k-th value: all of them are kept, as before
    logits[1] = logits[1].round()             # many ties (bf16-like logits)
    got = M.filtered_probs(logits, temperature, top_k, top_p)
    for b in range(logits.shape[0]):
        if b < 2 and top_p is not None and top_p < 1.0:
            continue   # ties at the top-p boundary: which of them is kept depends on sort order, before as now
        ref = reference_probs(logits[b].tolist(), temperature, top_k, top_p)
        assert max(abs(x - y) for x, y in zip(got[b].tolist(), ref)) < 1e-5, b
        assert [x > 0 for x in got[b].tolist()] == [x > 0 for x in ref], b   # the same support exactly


def test_inverse_cdf_picks_the_token_whose_interval_holds_u():
    """Deterministic: with the uniform u known, the token is the first whose running sum exceeds u * total."""
    logits = torch.log(torch.tensor([[0.1, 0.0, 0.2, 0.3, 0.0, 0.4]]).clamp(min=1e-30))
    probs = M.filtered_probs(logits, 1.0)
    cdf = probs.double().cumsum(-1)[0].tolist()
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        state = g.get_state()
        tok = M.sample(logits, 1.0, generator=g).item()
        g2 = torch.Generator()
        g2.set_state(state)
        u = torch.rand(1, 1, dtype=torch.float64, generator=g2).item() * cdf[-1]
        assert tok == next(i for i, c in enumerate(cdf) if c > u)
        assert probs[0, tok] > 1e-20                     # a zero-probability token is never drawn


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, None, None), (1.0, 5, None), (0.7, 50, 0.9),
                                                     (1.3, None, 0.8), (0.5, 3, 0.95)])
def test_draws_have_the_full_vocabulary_samplers_frequencies(temperature, top_k, top_p):
    """200,000 draws of one row (in one batch) by ours and by torch.multinomial over the reference probabilities:
    both frequency vectors within sampling noise of the probabilities (chi-square, 1e-6 false-alarm level), and no
    token outside the support."""
    g = torch.Generator().manual_seed(11)
    V, N = 64, 200_000
    row = torch.randn(1, V, generator=g) * 2
    ref = torch.tensor(reference_probs(row[0].tolist(), temperature, top_k, top_p), dtype=torch.float64)
    ours = M.sample(row.expand(N, V).contiguous(), temperature, top_k, top_p, generator=g)
    theirs = torch.multinomial(ref.float().expand(N, V), 1, replacement=True, generator=g).squeeze(1)
    support = ref > 0
    df = int(support.sum()) - 1
    # chi-square critical value at p = 1e-6 (Wilson-Hilferty approximation), df >= 1
    crit = df * (1 - 2 / (9 * df) + 4.753424 * math.sqrt(2 / (9 * df))) ** 3 if df else 0.0
    for name, draws in (("ours", ours), ("multinomial", theirs)):
        counts = torch.bincount(draws, minlength=V).double()
        assert counts[~support].sum() == 0, name
        if df:
            exp = ref[support] * N
            chi2 = ((counts[support] - exp) ** 2 / exp).sum().item()
            assert chi2 < crit, (name, chi2, crit)


def test_same_seed_same_tokens_and_greedy_limits():
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(0))
    a = M.sample(logits, 0.7, 50, 0.9, generator=torch.Generator().manual_seed(5))
    b = M.sample(logits, 0.7, 50, 0.9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.dtype == torch.long and a.shape == (8,)
    assert torch.equal(M.sample(logits, 0.0), logits.argmax(-1))
    assert torch.equal(M.sample(logits, 1.0, top_k=1), logits.argmax(-1))
    one_hot = torch.full((2, 5), float("-inf"))
    one_hot[0, 4] = one_hot[1, 0] = 0.0                   # all the mass on one token, -inf elsewhere
    for _ in range(50):
        assert M.sample(one_hot, 1.0).tolist() == [4, 0]
