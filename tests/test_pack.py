"""--pack (padding-free training): packed rows give the same per-token NLL, the same logged losses and the same
trained weights as padded batches, for every family, with LoRA and with --grad-accum > 1.

The reference for a packed row is each of its examples run alone, by transformers (a tiny random checkpoint of
each family, built as in test_model.py) and by our own unpacked forward. The training checks run train.main
in-process on tiny checkpoints of each family with a byte-level BPE tokenizer trained here.
"""
import json
import os

import pytest
import torch

import model as M
import hub
import batching
import train
from test_model import FAMILIES, build_hf
from test_train import make_records, write_jsonl

FAMS = ("gpt2", "bloom", "qwen2", "qwen3", "lfm2", "llama")
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("threads_and_signals")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A BPE tokenizer trained on the records, data files, and a tiny checkpoint folder per family (lazily)."""
    from test_train import byte_bpe
    root = tmp_path_factory.mktemp("pack_assets")
    recs, test = make_records(24, 5), make_records(6, 6)
    tk = byte_bpe(recs)
    (root / "data").mkdir()
    out = dict(root=root, train=write_jsonl(root / "data" / "train.jsonl", recs),
               test=write_jsonl(root / "data" / "test.jsonl", test), vocab=tk.get_vocab_size(), tk=tk, dirs={})

    def folder(fam):
        if fam not in out["dirs"]:
            extra = dict(n_positions=128) if fam == "gpt2" else {}
            hf = build_hf(fam, vocab_size=tk.get_vocab_size(), std=0.15, bos_token_id=0, eos_token_id=0, **extra)
            d = root / fam
            hf.save_pretrained(str(d))
            tk.save(str(d / "tokenizer.json"))
            out["dirs"][fam] = str(d)
        return out["dirs"][fam]
    out["folder"] = folder
    return out


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


# ----------------------------------------------------------------------------------------------- training

def _run(assets, fam, out, *extra):
    argv = ["--model", assets["folder"](fam), "--data", assets["train"], "--eval-data", assets["test"],
            "--out", str(out), "--max-steps", "3", "--batch-size", "4", "--max-len", "128", "--quiet",
            "--warmup", "0", "--schedule", "constant", *map(str, extra)]
    train.main(argv)
    with open(os.path.join(str(out), "train_log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    return [r for r in log if "loss" in r], [r for r in log if "eval_loss" in r]


def _weights(folder):
    return {k: v.clone() for k, v in M.Decoder.from_pretrained(str(folder)).state_dict().items()}


def _assert_same_run(a, b):
    (steps_a, ev_a), (steps_b, ev_b) = a, b
    assert len(steps_a) == len(steps_b) == 3
    for ra, rb in zip(steps_a, steps_b):
        assert ra["tokens"] == rb["tokens"] and ra["tokens_seen"] == rb["tokens_seen"]   # the same examples
        for k in ("loss", "nll", "grad_norm"):
            assert abs(ra[k] - rb[k]) <= TOL * max(1.0, abs(ra[k])), (k, ra[k], rb[k])
    assert abs(ev_a[-1]["eval_loss"] - ev_b[-1]["eval_loss"]) <= TOL * abs(ev_a[-1]["eval_loss"])
    return steps_a, steps_b


@pytest.mark.parametrize("fam", FAMS)
def test_lr0_losses_equal_packed_and_padded(assets, tmp_path, fam):
    """--lr 0, --grad-accum 2, both --loss-norm: every step's logged loss (and unweighted NLL, grad norm, eval loss)
    is the padded run's to 1e-5, and the packed run logs less padding for the same real tokens."""
    losses = {}
    for norm in ("token", "example"):
        extra = ["--lr", 0, "--grad-accum", 2, "--loss-norm", norm]
        pad = _run(assets, fam, tmp_path / f"pad-{norm}", *extra)
        pack = _run(assets, fam, tmp_path / f"pack-{norm}", *extra, "--pack")
        steps_pad, steps_pack = _assert_same_run(pad, pack)
        for a, b in zip(steps_pack, steps_pad):   # same real tokens (checked above) in fewer slots
            assert a["pad_frac"] < b["pad_frac"] - 0.05
        losses[norm] = [r["loss"] for r in steps_pack]
    assert all(abs(a - b) > 1e-3 for a, b in zip(losses["token"], losses["example"]))   # two different estimators


def _capture_grads(monkeypatch):
    """Every optimizer step's gradients (before clipping), in parameter order."""
    grads, orig = [], torch.nn.utils.clip_grad_norm_

    def spy(parameters, *a, **k):
        ps = list(parameters)
        grads.append([p.grad.detach().clone() for p in ps if p.grad is not None])
        return orig(ps, *a, **k)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    return grads


@pytest.mark.parametrize("fam,lora", [("gpt2", 0), ("bloom", 4), ("qwen2", 0), ("qwen3", 4), ("lfm2", 4),
                                      ("lfm2", 0), ("llama", 4)])
def test_real_steps_same_weights_packed_and_padded(assets, tmp_path, monkeypatch, fam, lora):
    """Three real AdamW steps (--grad-accum 2; LoRA or full fine-tuning): every step's gradients, losses and the
    final weights agree to 1e-5. The lr is small because AdamW divides by sqrt(v): an entry whose gradient is
    near rounding level moves by ~lr either way, so two summation orders may part by a fraction of lr there."""
    extra = ["--lr", 1e-4, "--grad-accum", 2] + (["--lora-rank", lora, "--lora-dropout", 0] if lora else [])
    grads = _capture_grads(monkeypatch)
    _assert_same_run(_run(assets, fam, tmp_path / "pad", *extra), _run(assets, fam, tmp_path / "pack", *extra, "--pack"))
    assert len(grads) == 6 and len(grads[0]) == len(grads[3]) > 0
    for ga, gb in zip(grads[:3], grads[3:]):
        for a, b in zip(ga, gb):
            assert (a - b).abs().max().item() <= TOL
    a, b = _weights(tmp_path / "pad"), _weights(tmp_path / "pack")
    start = _weights(assets["folder"](fam))
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 2e-4      # the steps did change the weights
    cfg = M.Decoder.from_pretrained(assets["folder"](fam)).cfg
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    for k in a:
        if k.endswith("attn.qkv.bias"):   # the key bias has an exactly zero gradient (softmax ignores a constant
            a[k][q:q + kv] = b[k][q:q + kv] = 0    # shift): AdamW turns its 1e-9 rounding noise into lr-sized steps
        assert (a[k] - b[k]).abs().max().item() <= TOL, (k, (a[k] - b[k]).abs().max().item())


def test_ddp_two_processes_packed_equal_one_padded(assets, tmp_path):
    """torchrun, 2 CPU processes (gloo), --pack: each rank packs its half of the step into its own number of rows
    (one synced backward each); the losses, grad norms and weights equal one padded process with the whole step."""
    from test_train import torchrun
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--model", assets["folder"]("lfm2"), "--data", assets["train"], "--eval-data", "none", "--max-steps", "3",
              "--max-len", "128", "--lr", "1e-4", "--device", "cpu", "--quiet", "--warmup", "0", "--schedule", "constant"]
    train.main(common + ["--out", str(one), "--batch-size", "8"])
    p = torchrun([*common, "--out", two, "--batch-size", 4, "--pack"])
    assert p.returncode == 0, p.stderr[-3000:]
    logs = []
    for d in (one, two):
        with open(os.path.join(str(d), "train_log.jsonl")) as f:
            logs.append([json.loads(line) for line in f if "loss" in line])
    assert len(logs[0]) == len(logs[1]) == 3
    for a, b in zip(*logs):
        assert a["tokens"] == b["tokens"] and a["examples"] == b["examples"]
        for k in ("loss", "nll", "grad_norm"):
            assert abs(a[k] - b[k]) <= TOL * max(1.0, abs(a[k])), (k, a[k], b[k])
    wa, wb = _weights(one), _weights(two)
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() <= TOL, k


# ----------------------------------------------------------------------------------------------- normalisations

@pytest.mark.parametrize("norm", ["token", "example"])
def test_both_loss_normalisations_exact_under_packing(assets, norm):
    """train.loss_scale given each token its own example's loss-token count (what train.py does with --pack):
    packed rows give the step's loss of the hand formula from each example run alone (token: sum w*nll / all loss
    tokens; example: mean over examples of w * own mean NLL), and so does the padded batch."""
    import data
    fam = "lfm2"                                                 # the conv makes packing the most delicate
    m = M.Decoder.from_pretrained(assets["folder"](fam)).eval()
    tok = M.load_tokenizer(assets["folder"](fam))
    ex = batching.encode(data.load_records(assets["train"])[:10], tok, (0.5, 1.0, 1.5), 48, "answer")
    per_sum, per_n = [], []
    with torch.no_grad():
        for e in ex:                                             # each example alone, no padding at all
            x, y, _, _, _ = batching.collate([e], tok.pad_id, "cpu")
            per_sum.append(m(x, targets=y).sum().item())
            per_n.append(int((y != -100).sum()))
        if norm == "token":
            want = sum(e[2] * s for e, s in zip(ex, per_sum)) / sum(per_n)
        else:
            want = sum(e[2] * s / n for e, s, n in zip(ex, per_sum, per_n)) / len(ex)
        N, E = torch.tensor(float(sum(per_n))), torch.tensor(float(len(ex)))
        x, y, w, _, _ = batching.collate(ex, tok.pad_id, "cpu")    # one padded batch, per-example factors
        padded = (m(x, targets=y).sum(1) * train.loss_scale(w, (y != -100).sum(1).float(), norm, N, E)).sum().item()
        n_i = torch.tensor([float(n) for n in per_n])
        packed = 0.0
        for x, y, w, _, kw in batching.pack_step(ex, 47, 2, tok.pad_id, "cpu"):
            seg = kw["segments"]
            n_tok = n_i[seg.clamp(min=0)] * (seg >= 0)          # per token: its example's count, 0 on padding
            packed += (m(x, targets=y, segments=seg) * train.loss_scale(w, n_tok, norm, N, E)).sum().item()
    assert abs(padded - want) <= 1e-5 * abs(want)
    assert abs(packed - want) <= 1e-5 * abs(want)
    token = sum(e[2] * s for e, s in zip(ex, per_sum)) / sum(per_n)
    example = sum(e[2] * s / n for e, s, n in zip(ex, per_sum, per_n)) / len(ex)
    assert abs(token - example) > 1e-3                          # the two really differ on these lengths
