"""batching.py: encode and collate (question and padding masked), packing (pack_rows, segment positions, pack_step)
and packed rows against each example run alone (transformers and our unpacked forward)."""
import pytest
import torch

import batching
import data
import hub
import model as M

from conftest import build_hf, FAMILIES, severity_w, split_tokens
from tokenizers import Tokenizer as TK
from tokenizers import processors

pytestmark = pytest.mark.usefixtures("threads_and_signals")


def test_collate_masks_question_and_padding(assets):
    tok = hub.load_tokenizer(assets["model"])
    recs = assets["recs8"][:3]
    abc = (0.5, 1.0, 1.5)
    for loss_tokens in ("answer", "all"):
        ex = batching.encode(recs, tok, abc, 512, loss_tokens)
        x, y, w, pads, kw = batching.collate(ex, tok.pad_id, "cpu")
        assert kw == {}
        lens = [len(e[0]) for e in ex]
        T = max(lens) - 1
        assert x.shape == y.shape == (3, T)
        assert pads == sum(T - (n - 1) for n in lens) and pads > 0, "test set-up: want uneven lengths"
        assert w.tolist() == pytest.approx([severity_w(r, abc) for r in recs], abs=1e-6)
        for i, r in enumerate(recs):
            p, a = split_tokens(tok, r)
            ids = p + a
            assert ex[i][0] == ids and ex[i][3] == data.SEVERITIES.index(r["severity"])
            n = len(ids) - 1
            assert x[i, :n].tolist() == ids[:-1]
            assert (x[i, n:] == tok.pad_id).all()
            assert (y[i, n:] == -100).all(), "padding must never be a target"
            if loss_tokens == "answer":   # targets ids[t+1]: counted from the first answer token on, EOS included
                want = [-100] * (len(p) - 1) + a
            else:
                want = ids[1:]
            assert y[i, :n].tolist() == want
            assert y[i, n - 1].item() == tok.eos_id
        if loss_tokens == "answer":
            assert sum((y != -100).sum(1).tolist()) == sum(len(split_tokens(tok, r)[1]) for r in recs)


def test_encode_truncates_to_max_len(assets):
    tok = hub.load_tokenizer(assets["model"])
    r = assets["recs8"][0]
    p, a = split_tokens(tok, r)
    cut = len(p) + 2
    (ids, keep, _, _), = batching.encode([r], tok, (1, 1, 1), cut, "answer")
    assert ids == (p + a)[:cut] and keep == [False] * len(p) + [True, True]

FAMS = ("gpt2", "bloom", "qwen2", "qwen3", "lfm2", "llama")
TOL = 1e-5


# ----------------------------------------------------------------------------------------------- packing itself

def test_pack_rows_first_fit_decreasing_by_hand():
    # longest first: 9 -> row 0; 7 -> row 1; 5 -> row 2; 3 -> row 1 (first with room: 10-7=3); 2 -> row 2
    assert batching.pack_rows([5, 9, 3, 7, 2], 10) == [[1], [3, 2], [0, 4]]
    assert batching.pack_rows([4, 4, 4], 12) == [[0, 1, 2]]
    assert batching.pack_rows([3], 3) == [[0]]


def test_segment_positions_by_hand():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [5, 5, 5, 5, 5, 3, 3, -1]])
    want = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 0, 1, 0]])
    assert torch.equal(M.segment_positions(seg), want)


def _examples(n=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = int(torch.randint(3, 30, (1,), generator=g))
        ids = torch.randint(1, 300, (L,), generator=g).tolist()
        keep = [j >= L // 3 for j in range(L)]
        out.append((ids, keep, 0.5 + 0.1 * i, i % 3))
    return out


@pytest.mark.parametrize("fixed", [False, True])
def test_pack_step_lays_out_every_example_once(fixed):
    ex = _examples()
    width, max_rows = 40, 2
    batches = batching.pack_step(ex, width, max_rows, pad_id=7, device="cpu", fixed=fixed)
    seen = []
    for x, y, w, pads, kw in batches:
        seg = kw["segments"]
        assert x.shape[0] <= max_rows and x.shape == y.shape == w.shape == seg.shape
        if fixed:
            assert x.shape[1] == width                          # one shape for --compile
        assert pads == int((seg == -1).sum())
        for row in range(x.shape[0]):
            ids = seg[row].unique_consecutive().tolist()
            if ids[-1] == -1:                                   # padding only at the row's end
                ids = ids[:-1]
                assert (x[row][seg[row] == -1] == 7).all() and (y[row][seg[row] == -1] == -100).all()
            for i in ids:
                at = seg[row] == i
                e = ex[i]
                assert x[row][at].tolist() == e[0][:-1]
                assert y[row][at].tolist() == [t if k else -100 for t, k in zip(e[0][1:], e[1][1:])]
                assert torch.all(w[row][at] == e[2])
                seen.append(i)
    assert sorted(seen) == list(range(len(ex)))


def test_pack_step_row_width_policy():
    """Without a cost model the rows are as wide as allowed (least padding); with one where attention dominates
    (a tiny model) they stay as narrow as the longest example; with one where it does not, they go wide."""
    ex = _examples(16, 3)
    longest = max(len(e[0]) - 1 for e in ex)
    real = sum(len(e[0]) - 1 for e in ex)
    widths = lambda bs: {x.shape[1] for x, *_ in bs}                                    # noqa: E731
    pad = lambda bs: sum(b[3] for b in bs) / (sum(b[3] for b in bs) + real)            # noqa: E731
    wide = batching.pack_step(ex, 200, 16, 0, "cpu")
    assert max(widths(wide)) > 2 * longest and pad(wide) < 0.05
    narrow = batching.pack_step(ex, 200, 16, 0, "cpu", flops=lambda T: 1.0 + T)           # attention-bound
    assert widths(narrow) <= set(range(longest + 1)) and max(widths(narrow)) == longest
    big = batching.pack_step(ex, 200, 16, 0, "cpu", flops=lambda T: 1e6 + T)              # matmul-bound
    assert max(widths(big)) > 2 * longest and pad(big) < 0.05


# ----------------------------------------------------------------------------------------------- the model

@pytest.mark.parametrize("fam", FAMS)
def test_packed_row_equals_each_example_alone_against_transformers(fam, tmp_path):
    """One row holding four examples and trailing padding: the logits of each example equal transformers' logits
    of that example run alone, and our own unpacked logits. Catches attention across the boundary, positions
    that do not restart (RoPE, GPT-2's wpe, ALiBi), and LFM2's conv reading the previous example."""
    hf = build_hf(fam, **(dict(n_positions=64) if fam == "gpt2" else {}))
    hf.save_pretrained(str(tmp_path))
    ours = M.Decoder.from_pretrained(str(tmp_path)).eval()
    V = FAMILIES[fam]["vocab_size"]
    g = torch.Generator().manual_seed(1)
    lens = [5, 9, 2, 7]
    exs = [torch.randint(0, V, (n,), generator=g) for n in lens]
    row = torch.cat(exs + [torch.zeros(4, dtype=torch.long)])[None]
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)] + [torch.full((4,), -1)])[None]
    with torch.no_grad():
        packed = ours(row, segments=seg)[0, :sum(lens)]
        alone = torch.cat([ours(e[None])[0] for e in exs])
        ref = torch.cat([hf(e[None]).logits[0] for e in exs])
    assert (packed - ref).abs().max().item() < 1e-4, "packed vs transformers"
    assert (packed - alone).abs().max().item() < 1e-4, "packed vs unpacked"
    # the per-token NLL path (what training uses) agrees as well, 0 on padding
    y = torch.cat([torch.roll(e, -1) for e in exs] + [torch.full((4,), -100)])[None]
    with torch.no_grad():
        nll = ours(row, targets=y, segments=seg)
    want = torch.nn.functional.cross_entropy(ref, y[0, :sum(lens)], reduction="none")
    assert (nll[0, :sum(lens)] - want).abs().max().item() < 1e-4
    assert torch.all(nll[0, sum(lens):] == 0)


def test_segments_refuse_mask_or_cache():
    m = M.Decoder(M.Config.from_hf(dict(hub.REGISTRY["tiny"]["config"])))
    x = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="segments"):
        m(x, mask=torch.ones(1, 4, dtype=torch.bool), segments=torch.zeros(1, 4, dtype=torch.long))


def test_packed_rows_under_compile_make_one_graph():
    """train.py --pack --compile feeds one full-width row per micro-batch: every step has the same shape, so the
    model compiles once (dynamo's frame counter; the eager backend keeps the test fast). Rows narrowed to each
    step's content (fixed=False, the eager default) compile again for each new width: checked once by hand."""
    fixed = True
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    m = M.Decoder(M.Config.from_hf(dict(FAMILIES["lfm2"])))
    counter = CompileCounter()
    cm = torch.compile(m, backend=counter)
    for seed in range(3):
        for x, y, _, _, kw in batching.pack_step(_examples(6, seed), 63, 1, 0, "cpu", fixed=fixed):
            cm(x, targets=y, **kw)
    assert counter.frame_count == 1, counter.frame_count
    torch._dynamo.reset()


# -- batching.encode through encode_batch: the per-record ids (issue 25) -------------------------------------------

def per_record(records, tok, abc, max_len, loss_tokens):
    out = []
    for r in records:
        p = tok.encode(data.format_prompt(r["question"]))
        a = tok.encode(r["answer"], special=False) + [tok.eos_id]
        ids = (p + a)[:max_len]
        keep = [loss_tokens != "answer"] * len(p) + [True] * len(a)
        out.append((ids, keep[:len(ids)], data.severity_weight(r, abc), data.SEVERITIES.index(r["severity"])))
    return out


def records(n):
    words = ["الطبيب", "ألم في الصدر", "هل يجب أن أذهب إلى المستشفى؟", "Paracetamol 500mg", "٣ مرات يوميا", "\n",
             "  ", "é", "🙂", "ننصح بمراجعة الطبيب، والله أعلم."]
    out = []
    for i in range(n):
        q = " ".join(words[(i + j) % len(words)] for j in range(1 + i % 7))
        a = "" if i % 5 == 0 else " ".join(words[(i * 3 + j) % len(words)] for j in range((i * 13) % 90))
        sev = data.SEVERITIES[i % 3]
        out.append({"question": q, "answer": a, "severity": sev, "p_nc": 0.2, "p_n": 0.3, "p_c": 0.5})
    return out


def tokenizers():
    tiny = hub.load_tokenizer("tiny")
    tk = TK.from_str(tiny.tk.to_str())
    bos = tiny.bos_id if tiny.bos_id is not None else 0
    tk.post_processor = processors.TemplateProcessing(single=f"{tk.id_to_token(bos)} $A",
                                                      special_tokens=[(tk.id_to_token(bos), bos)])
    return {"tiny": tiny, "bos-adding": hub.Tokenizer(tk, bos, tiny.eos_id, None)}


@pytest.mark.parametrize("name", ["tiny", "bos-adding"])
@pytest.mark.parametrize("loss_tokens", ["answer", "all"])
@pytest.mark.parametrize("max_len", [8, 64, 4096])
def test_batched_encode_gives_the_per_record_examples(name, loss_tokens, max_len):
    tok = tokenizers()[name]
    recs = records(300)
    got = batching.encode(recs, tok, (0.5, 1.0, 1.5), max_len, loss_tokens)
    assert got == per_record(recs, tok, (0.5, 1.0, 1.5), max_len, loss_tokens)
    if name == "bos-adding":
        assert all(ids[0] == tok.bos_id for ids, *_ in got)            # the prompt's special token is kept


def test_chunk_boundaries_and_empty_input(monkeypatch):
    tok = tokenizers()["tiny"]
    recs = records(8192 + 7)                                            # one full chunk and a ragged one
    assert batching.encode(recs, tok, (1, 1, 1), 32, "answer") == per_record(recs, tok, (1, 1, 1), 32, "answer")
    assert batching.encode([], tok, (1, 1, 1), 32, "answer") == []


def test_a_tokenizer_without_the_tokenizers_object_still_works():
    tiny = tokenizers()["tiny"]

    class Plain:                                                        # only encode(): the per-text fallback
        eos_id = tiny.eos_id

        def encode(self, text, special=True):
            return tiny.encode(text, special=special)
    recs = records(40)
    assert batching.encode(recs, Plain(), (1, 1, 1), 64, "answer") == per_record(recs, tiny, (1, 1, 1), 64, "answer")


def test_evaluate_prompts_are_the_per_question_ids():
    import types

    import evaluate
    tok = tokenizers()["bos-adding"]
    qs = [r["question"] for r in records(50)]
    fake = types.SimpleNamespace(cfg=types.SimpleNamespace(pos="rope"))
    for prompt in ("cue", "no-cue"):
        want = [tok.encode(data.format_prompt(q, cue=prompt == "cue")) for q in qs]
        assert evaluate.encode_prompts(fake, tok, qs, 10, prompt) == want
