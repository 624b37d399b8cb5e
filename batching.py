"""
Batching for the decoder: records -> token ids (encode), then micro-batches, padded (collate) or packed into rows
without padding (pack_rows, pack_step: --pack). Each token of a packed row is tagged with the index of the example it
belongs to (segments), so attention, positions and the loss restart at every example.
"""
import torch

import cli
import data


def encode(records, tok, abc, max_len, loss_tokens, quiet=True):
    """Each record -> (input ids, loss mask, w, severity class). Text = prompt + answer + EOS, truncated to max_len
    tokens from the end (the prompt is kept first, the answer cut); the loss mask marks the tokens whose prediction
    counts (answer + EOS by default; every token with 'all' and 'padded'; the padding that 'padded' adds is collate's
    work). Tokenised in chunks through the tokenizers library's encode_batch (its own threads; the same ids as one
    encode per text): 200,000 records took ~42 s one at a time. A progress bar for large sets unless quiet."""
    tk = getattr(tok, "tk", None)
    if tk is not None:
        batch = getattr(tk, "encode_batch_fast", tk.encode_batch)   # _fast (tokenizers 0.21+): no offsets, same ids
        def ids(texts, special):
            return [e.ids for e in batch(texts, add_special_tokens=special)]
    else:   # a tokenizer without the tokenizers object: one text at a time
        def ids(texts, special):
            return [tok.encode(t, special=special) for t in texts]
    out, chunk = [], 8192
    bar = cli.progress(len(records), "tokenising", "rec", quiet or len(records) < data.PROGRESS_MIN)
    for s in range(0, len(records), chunk):
        part = records[s:s + chunk]
        prompts = ids([data.format_prompt(r["question"]) for r in part], True)
        answers = ids([r["answer"] for r in part], False)
        for r, p, a in zip(part, prompts, answers):
            a = a + [tok.eos_id]
            ids_ = (p + a)[:max_len]
            keep = [loss_tokens != "answer"] * len(p) + [True] * len(a)
            out.append((ids_, keep[:len(ids_)], data.severity_weight(r, abc), data.SEVERITIES.index(r["severity"])))
        bar.update(len(part))
    bar.close()
    return out


def collate(examples, pad_id, device, pad_to=0):
    """Right-pad a micro-batch. x = ids[:-1], y = ids[1:] with -100 where the loss does not count (and on padding).
    Returns x (B, T), y (B, T), w (B,), the number of padding positions, and the model's keyword arguments ({}).
    pad_to > 0 is the notebooks' collator (--loss-tokens padded): every sequence padded with pad_id to pad_to
    tokens and every position a target, padding included (labels = input ids), while transformers' attention mask
    hid the padding from every query: mask (B, T), True on real tokens, goes to the model."""
    T = max(pad_to, max(len(e[0]) for e in examples)) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, (ids, keep, _, _) in enumerate(examples):
        if pad_to:   # the padding becomes part of the sequence: input and target like any token
            ids, keep = ids + [pad_id] * (T + 1 - len(ids)), keep + [True] * (T + 1 - len(keep))
        n = len(ids) - 1
        x[i, :n] = torch.tensor(ids[:-1])
        y[i, :n] = torch.tensor([t if k else -100 for t, k in zip(ids[1:], keep[1:])])
    w = torch.tensor([e[2] for e in examples], dtype=torch.float32)
    real = torch.arange(T)[None] < torch.tensor([len(e[0]) - (0 if pad_to else 1) for e in examples])[:, None]
    kw = {"mask": real.to(device)} if pad_to else {}                  # real (B, T): x holds a real token there
    return x.to(device), y.to(device), w.to(device), int((~real).sum()), kw


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
