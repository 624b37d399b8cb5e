"""
--pack: the batch code for padding-free training. pack_rows lays examples end to end into rows (first-fit
decreasing); pack_step turns one optimizer step's examples into micro-batches of such rows, each token tagged with
the index of the example it belongs to (segments), so attention, positions and the loss restart at every example.
train.collate is the padded counterpart.
"""
import torch


def pack_rows(lengths, width):
    """First-fit decreasing: example indices -> rows whose lengths sum to at most `width` (each length <= width).
    Longest first, each into the first row with room; deterministic (ties by index). Returns [[indices], ...]."""
    rows, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = next((r for r, f in enumerate(free) if f >= lengths[i]), None)
        if r is None:
            rows.append([])
            free.append(width)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= lengths[i]
    return rows


def pack_step(examples, width, max_rows, pad_id, device, fixed=False, flops=None):
    """--pack: the examples of one step laid end to end into rows (first-fit decreasing), cut into micro-batches of
    at most max_rows rows. Each example keeps its own x = ids[:-1], y = ids[1:] (-100 where the loss does not
    count), and the model is told where each example starts (segments), so attention, positions and LFM2's conv
    restart there. The slots left at a row's end are padding (segment -1, y = -100, weight 0).
    Row width: fixed -> rows of exactly `width` tokens (one shape for --compile). Otherwise each micro-batch is as
    wide as its fullest row, and the rows are cut at whichever width W from the step's longest example up to
    `width` (the longest times 1, 2, 4 ..., each narrowed to the least width that needs no more rows) costs the
    fewest slots * flops(slot width): flops(T) = training FLOPs per token at row width T (Decoder.flops_per_token),
    or 1 (fewest slots, i.e. least padding) without it. Wider rows leave less padding but spend more on the masked
    T x T attention, which matters for tiny models only.
    Returns [(x (R, T), y (R, T), w (R, T) each token's severity weight, padding slots, {"segments": seg}), ...]:
    the model's keyword arguments, seg (R, T) each token's index into `examples` (see loss_scale for how the loss
    normalisations use it)."""
    lengths = [len(e[0]) - 1 for e in examples]
    flops = flops or (lambda T: 1.0)

    def layout(W):   # -> ([(rows, T) per micro-batch], cost); rows fullest first
        rows = pack_rows(lengths, W)
        if not fixed:   # as many rows, as narrow as FFD allows (binary search): the rows come out evenly filled
            lo, hi = max(max(lengths), -(-sum(lengths) // len(rows))), W
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if len(pack_rows(lengths, mid)) <= len(rows) else (mid + 1, hi)
            narrow = pack_rows(lengths, lo)
            rows = narrow if len(narrow) <= len(rows) else rows
        rows.sort(key=lambda r: -sum(lengths[i] for i in r))
        groups = [rows[j:j + max_rows] for j in range(0, len(rows), max_rows)]
        groups = [(g, W if fixed else sum(lengths[i] for i in g[0])) for g in groups]
        return groups, sum(len(g) * T * flops(T) for g, T in groups)

    longest = max(lengths)
    candidates = [width] if fixed else sorted({*(longest << k for k in range(12) if longest << k < width), width})
    groups, _ = min((layout(W) for W in candidates), key=lambda gc: gc[1])
    out = []
    for group, T in groups:
        x = torch.full((len(group), T), pad_id, dtype=torch.long)
        y = torch.full((len(group), T), -100, dtype=torch.long)
        w = torch.zeros((len(group), T), dtype=torch.float32)
        seg = torch.full((len(group), T), -1, dtype=torch.long)
        for b, row in enumerate(group):
            t = 0
            for i in row:
                ids, keep = examples[i][0], examples[i][1]
                n = lengths[i]
                x[b, t:t + n] = torch.tensor(ids[:-1])
                y[b, t:t + n] = torch.tensor([tk if kp else -100 for tk, kp in zip(ids[1:], keep[1:])])
                w[b, t:t + n] = examples[i][2]
                seg[b, t:t + n] = i
                t += n
        pads = len(group) * T - sum(lengths[i] for row in group for i in row)
        out.append((x.to(device), y.to(device), w.to(device), pads, {"segments": seg.to(device)}))
    return out
