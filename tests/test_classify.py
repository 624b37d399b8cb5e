"""classify.py: training tricks (LDAM, DRW, FGM, LLRD), metrics, splits, training end to end, CLI."""
import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bert
import classify
import data

from conftest import ARABIC, batch, _tiny_classifier, tiny_hf, WORDPIECE

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SAMPLE_LABELS = os.path.join(ROOT, "data", "sample", "severity_labels.jsonl")


def ids_list(seqs):
    return [list(s[0]) for s in seqs]


def test_saved_classifier_loads_in_transformers(trained):
    from transformers import AutoModel, BertForSequenceClassification
    out = trained["out"]
    ours, tok, labels = bert.load_classifier(out)
    hf = BertForSequenceClassification.from_pretrained(out).eval()
    assert [hf.config.id2label[i] for i in range(len(labels))] == labels == list(data.SEVERITIES)
    seqs = bert.build_inputs(tok, ARABIC, 64)
    ids, am, tt = bert.collate(seqs, tok.pad_id, "cpu")
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=am, token_type_ids=tt).logits
        got = ours(ids, am, tt)
        enc = AutoModel.from_pretrained(out).eval()(input_ids=ids, attention_mask=am).last_hidden_state
        ours_h = ours.bert(ids, am)
    assert (got - want).abs().max() <= 1e-4
    assert (enc - ours_h)[am.bool()].abs().max() <= 1e-4
    from transformers import AutoTokenizer   # the saved tokenizer gives transformers the same ids
    assert [AutoTokenizer.from_pretrained(out)(t)["input_ids"] for t in ARABIC] == ids_list(seqs)
    with open(os.path.join(out, "config.json")) as fh:
        cfg = json.load(fh)
    assert cfg["model_type"] == "bert" and cfg["architectures"] == ["BertForSequenceClassification"]
    for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "label2id"):
        assert k in cfg
    from safetensors.torch import load_file
    keys = set(load_file(os.path.join(out, "model.safetensors")))
    assert {"bert.embeddings.word_embeddings.weight", "bert.encoder.layer.1.output.LayerNorm.bias",
            "bert.pooler.dense.weight", "classifier.weight", "classifier.bias"} <= keys
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "metrics.json"):
        assert os.path.exists(os.path.join(out, f))
    # predict_proba: rows are distributions, in input order
    p = bert.predict_proba(ours, tok, ARABIC, batch_size=2, max_len=64)
    assert p.shape == (4, 3) and np.allclose(p.sum(1), 1)
    p1 = bert.predict_proba(ours, tok, ARABIC[1:2], batch_size=2, max_len=64)
    assert np.abs(p1[0] - p[1]).max() < 1e-5


# ----------------------------------------------------------------------------------------------
# Training tricks, each against a hand computation

def test_ldam_margins_and_loss():
    counts = [100, 10, 1]
    m = classify.ldam_margins(counts, max_m=0.5)
    raw = [1 / 100 ** 0.25, 1 / 10 ** 0.25, 1.0]
    want = [0.5 * r / max(raw) for r in raw]
    assert torch.allclose(m, torch.tensor(want), atol=1e-6)
    assert abs(m.max().item() - 0.5) < 1e-7 and m[0] < m[1] < m[2]
    z = torch.tensor([[1.0, 0.2, -0.3], [0.1, 0.4, 0.3]])
    y = torch.tensor([0, 2])
    got = classify.classification_loss(z, y, "ldam", m, s=30.0)
    hand = 0.0
    for i in range(2):
        v = [30.0 * (z[i, j].item() - (want[j] if j == y[i] else 0.0)) for j in range(3)]
        hand += -(v[y[i]] - math.log(sum(math.exp(x) for x in v)))
    assert abs(got.item() - hand / 2) < 1e-4
    assert abs(classify.classification_loss(z, y).item() - F.cross_entropy(z, y).item()) < 1e-7


def test_ldam_margins_seed_004():
    """C given directly (no rescaling) and targeted boosting: n_y -> n_y / 10 for the named classes' margins only."""
    counts = [600, 600, 7]
    m = classify.ldam_margins(counts, c=1.0)
    assert torch.allclose(m, torch.tensor([600 ** -0.25, 600 ** -0.25, 7 ** -0.25]), atol=1e-7)
    m = classify.ldam_margins(counts, c=1.0, boost=[1])
    assert torch.allclose(m, torch.tensor([600 ** -0.25, 60 ** -0.25, 7 ** -0.25]), atol=1e-7)
    m = classify.ldam_margins(counts, max_m=0.5, boost=[1])   # Cao et al.'s rescaling, boost applied first
    raw = [600 ** -0.25, 60 ** -0.25, 7 ** -0.25]
    assert torch.allclose(m, torch.tensor([0.5 * r / max(raw) for r in raw]), atol=1e-7)
    # s = 1 is seed 004's equation (3): -log(e^(z_y - m_y) / (e^(z_y - m_y) + sum_j e^z_j))
    z, y = torch.tensor([[0.3, -0.2, 0.9]]), torch.tensor([1])
    mm = classify.ldam_margins(counts, c=1.0)
    num = math.exp(-0.2 - mm[1].item())
    hand = -math.log(num / (num + math.exp(0.3) + math.exp(0.9)))
    assert abs(classify.classification_loss(z, y, "ldam", mm, s=1.0).item() - hand) < 1e-6
    # the CE-then-LDAM schedule
    assert [classify.epoch_loss(e, "ldam", 2) for e in range(4)] == ["ce", "ce", "ldam", "ldam"]
    assert [classify.epoch_loss(e, "ldam", 0) for e in range(2)] == ["ldam", "ldam"]


def test_drw_weights_and_switch():
    counts = [50, 20, 5]
    beta = 0.9999
    raw = [(1 - beta) / (1 - beta ** n) for n in counts]
    want = [3 * r / sum(raw) for r in raw]
    w = classify.drw_weights(counts, beta)
    assert torch.allclose(w, torch.tensor(want, dtype=torch.float32), rtol=1e-5)
    assert abs(w.sum().item() - 3) < 1e-5 and w[2] > w[1] > w[0]
    # the switch: no weights before --drw-epoch, weights from it on; off when not given
    assert classify.epoch_class_weights(0, 2, counts, beta) is None
    assert classify.epoch_class_weights(1, 2, counts, beta) is None
    assert torch.equal(classify.epoch_class_weights(2, 2, counts, beta), w)
    assert torch.equal(classify.epoch_class_weights(5, 2, counts, beta), w)
    assert classify.epoch_class_weights(5, None, counts, beta) is None
    # weighted loss = sum_i w_{y_i} l_i / sum_i w_{y_i}
    z = torch.tensor([[1.0, 0.2, -0.3], [0.1, 0.4, 0.3], [0.0, 0.0, 1.0]])
    y = torch.tensor([0, 2, 2])
    li = [-F.log_softmax(z[i], -1)[y[i]].item() for i in range(3)]
    hand = sum(want[y[i]] * li[i] for i in range(3)) / sum(want[y[i]] for i in range(3))
    assert abs(classify.classification_loss(z, y, weight=w).item() - hand) < 1e-5


@pytest.mark.parametrize("ids,mask,needle", [
    (torch.ones(5, dtype=torch.long), None, "input_ids (5,), expected (B, T)"),
    (torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), "attention_mask must be (B, T) = (2, 5)"),
    (torch.ones(2, 5, dtype=torch.long), torch.ones(5, dtype=torch.long), "attention_mask must be (B, T) = (2, 5)"),
], ids=["1-D input", "mask too short", "1-D mask"])
def test_encoder_shape_asserts(ids, mask, needle):
    """The encoder's shape invariants fail as an assert naming the shape, not deep inside attention."""
    model = _tiny_classifier().eval()
    with pytest.raises(AssertionError, match=re.escape(needle)):
        model(ids, mask)
    assert model(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)).shape == (2, 3)


def test_fgm_gradient_and_restore():
    model = _tiny_classifier()
    ids, am, tt = batch(vocab=50, T=9)
    y = torch.tensor([0, 2, 1])

    def loss_fn():
        return F.cross_entropy(model(ids, am, tt), y)
    emb = model.bert.wte
    w0 = emb.weight.detach().clone()
    loss_fn().backward()
    clean = {n: p.grad.clone() for n, p in model.named_parameters()}
    g = emb.weight.grad.clone()
    classify.fgm_step(emb, 0.5, loss_fn)
    assert torch.equal(emb.weight.detach(), w0)        # restored bit for bit
    # by hand: a copy with the perturbed embeddings, its gradient
    twin = _tiny_classifier()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        twin.bert.wte.weight.add_(0.5 * g / g.norm())
    F.cross_entropy(twin(ids, am, tt), y).backward()
    adv = dict(twin.named_parameters())
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, clean[n] + adv[n].grad, atol=1e-6), n
    assert any((adv[n].grad.abs() > 0).any() for n in adv)


def test_llrd_param_groups():
    model = _tiny_classifier()
    groups = classify.param_groups(model, lr=1e-3, llrd=0.5, weight_decay=0.01)
    lr_of = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in lr_of
            lr_of[id(p)] = (g["lr"], g["weight_decay"])
    # seed 004's equation 1, lr_l = lr_head * 0.5^(L-l), L = 2, by hand: top layer (l = 2) 1e-3, bottom layer
    # (l = 1) 5e-4, embeddings (l = 0) 2.5e-4, pooler and classifier 1e-3
    want_of = {"layers.1": 1e-3, "layers.0": 5e-4, "embeddings": 2.5e-4, "head": 1e-3}
    for n, p in model.named_parameters():
        if n.startswith(("bert.wte.", "bert.wpe.", "bert.wtt.", "bert.emb_norm.")):
            want = want_of["embeddings"]
        elif n.startswith("bert.layers."):
            want = want_of["layers." + n.split(".")[2]]
        else:
            assert n.startswith(("bert.pooler.", "classifier.")), n
            want = want_of["head"]                        # pooler and classifier
        lr, wd = lr_of[id(p)]
        assert abs(lr - want) < 1e-15, n
        assert wd == (0.0 if (p.ndim < 2 or "norm" in n) else 0.01), n
    assert len(lr_of) == len(list(model.parameters()))
    assert {g["name"].split("/")[0] for g in groups} == {"embeddings", "layer.0", "layer.1", "head"}
    # schedule: linear warmup then linear decay
    mults = [classify.lr_mult(s, 10, 2) for s in range(10)]
    assert mults[:3] == [0.5, 1.0, 1.0] and abs(mults[-1] - 1 / 8) < 1e-12 and mults == sorted(mults[:2]) + sorted(mults[2:], reverse=True)


# ----------------------------------------------------------------------------------------------
# Metrics

def test_ece_and_metrics_by_hand():
    probs = np.array([[0.9, 0.05, 0.05],   # conf .9 bin 13, correct
                      [0.5, 0.3, 0.2],     # conf .5 bin 7, wrong
                      [0.2, 0.7, 0.1],     # conf .7 bin 10, correct
                      [0.1, 0.2, 0.7],     # conf .7 bin 10, wrong
                      [0.45, 0.1, 0.45]])  # conf .45 bin 6, argmax 0, wrong
    y = np.array([0, 1, 1, 1, 2])
    hand = (1 / 5) * abs(1 - 0.9) + (1 / 5) * abs(0 - 0.5) + (2 / 5) * abs(0.5 - 0.7) + (1 / 5) * abs(0 - 0.45)
    assert abs(classify.ece(probs, y) - hand) < 1e-12
    m = classify.classification_metrics(probs, y, ["a", "b", "c"])
    assert m["confusion"] == [[1, 0, 0], [1, 1, 1], [1, 0, 0]]
    assert m["accuracy"] == pytest.approx(2 / 5)
    f1_a = 2 * (1 / 3) * 1 / (1 / 3 + 1)
    f1_b = 2 * 1 * (1 / 3) / (1 + 1 / 3)
    assert m["per_class"]["a"]["f1"] == pytest.approx(f1_a)
    assert m["per_class"]["b"]["f1"] == pytest.approx(f1_b)
    assert m["per_class"]["c"]["f1"] == 0.0
    assert m["macro_f1"] == pytest.approx((f1_a + f1_b) / 3)


def test_ece_bins_are_open_below_closed_above():
    """Confidences exactly on the edges b/15 belong to the bin below: bins (b/15, (b+1)/15]. An independent
    computation over the bins; moving the edges to [b/15, (b+1)/15) merges 7/15 with 0.5 and changes ECE."""
    rows = [([7 / 15, 4 / 15, 4 / 15], 0),      # on the edge 7/15: bin 6, right
            ([0.5, 0.25, 0.25], 1),             # bin 7, wrong
            ([1.0, 0.0, 0.0], 0),               # on the top edge: bin 14, right
            ([2 / 15, 12 / 15, 1 / 15], 1),     # on the edge 12/15: bin 11, right
            ([0.2, 0.79, 0.01], 0),             # 0.79: bin 11, wrong
            ([0.1, 0.1, 0.8], 2)]               # 0.8: bin 11, right
    probs, y = np.array([r for r, _ in rows]), np.array([c for _, c in rows])
    conf, right = probs.max(1), probs.argmax(1) == y
    want = 0.0
    for b in range(15):
        inb = [(c, r) for c, r in zip(conf.tolist(), right.tolist()) if b / 15 < c <= (b + 1) / 15]
        if inb:
            want += len(inb) / len(rows) * abs(sum(r for _, r in inb) / len(inb) - sum(c for c, _ in inb) / len(inb))
    assert classify.ece(probs, y) == pytest.approx(want, abs=1e-12)
    # the same by hand: {7/15 right}, {0.5 wrong}, {1.0 right}, {12/15 right, 0.79 wrong, 0.8 right}
    c12 = [12 / 15, 0.79, 0.8]
    hand = (abs(1 - 7 / 15) + abs(0 - 0.5) + abs(1 - 1.0) + 3 * abs(2 / 3 - sum(c12) / 3)) / 6
    assert classify.ece(probs, y) == pytest.approx(hand, abs=1e-12)


def test_stratified_split_is_seeded_and_stratified():
    y = [0] * 50 + [1] * 30 + [2] * 20
    tr, va = classify.stratified_split(y, 0.2, seed=3)
    assert sorted(tr + va) == list(range(100))
    assert np.bincount(np.array(y)[va]).tolist() == [10, 6, 4]
    assert classify.stratified_split(y, 0.2, seed=3) == (tr, va) != classify.stratified_split(y, 0.2, seed=4)


def test_label_sets(tmp_path):
    """Severity labels (aliases, any case) -> the three severities in their order; any other labels -> sorted;
    --labels -> that order; integer labels are names; the column names match case-insensitively."""
    f = tmp_path / "l.jsonl"

    def read(labels_in, labels_arg=None):
        f.write_text("".join(json.dumps({"Text": f"q{i}", "LABEL": v}, ensure_ascii=False) + "\n"
                             for i, v in enumerate(labels_in)), encoding="utf-8")
        texts, answers, y, labels = classify.read_labelled(str(f), "text", "label", None, labels_arg)
        assert texts == [f"q{i}" for i in range(len(labels_in))] and answers is None
        return y, labels
    assert read(["Severe", "mild", "حرج", "neutral"]) == ([2, 0, 2, 1], list(data.SEVERITIES))
    assert read(["dental", "cardio", "dental", "skin"]) == ([1, 0, 1, 2], ["cardio", "dental", "skin"])
    assert read(["dental", "cardio"], ["dental", "cardio"]) == ([0, 1], ["dental", "cardio"])
    assert read([3, 1, 3]) == ([1, 0, 1], ["1", "3"])

# ----------------------------------------------------------------------------------------------
# Training end to end and the command line

TRAIN_ARGS = ["--model", "tiny", "--epochs", "6", "--lr", "2e-3", "--batch-size", "16", "--max-len", "64",
              "--val-frac", "0.2", "--seed", "0", "--device", "cpu", "--warmup-frac", "0.1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    out = str(tmp_path_factory.mktemp("cls") / "model")
    metrics = classify.main(TRAIN_ARGS + ["--data", SAMPLE_LABELS, "--out", out])
    return {"out": out, "metrics": metrics}


def test_tiny_classifier_beats_majority(trained, capsys):
    m = trained["metrics"]
    with open(os.path.join(trained["out"], "metrics.json")) as fh:
        saved = json.load(fh)
    assert saved["val"]["accuracy"] == m["val"]["accuracy"]
    val = m["val"]
    print(f"tiny classifier: val accuracy {val['accuracy']:.3f} macro-F1 {val['macro_f1']:.3f} "
          f"vs majority {m['majority_baseline_accuracy']:.3f} (n_val {m['n_val']}, {m['seconds']} s)")
    # 8 seeds measured: 0.65-0.76 against 0.44 (451 labelled questions, 91 for validation)
    assert val["accuracy"] > m["majority_baseline_accuracy"] + 0.05
    assert set(val["per_class"]) == set(data.SEVERITIES)
    assert np.array(val["confusion"]).sum() == m["n_val"]
    assert 0 <= val["ece"] <= 1


def test_tricks_run_end_to_end(tmp_path):
    """LDAM + DRW + FGM + LLRD + question/answer input: trains, saves, and the folded LDAM scale
    makes the saved logits' softmax the probabilities the metrics were computed with."""
    rows = [json.loads(l) for l in open(SAMPLE_LABELS, encoding="utf-8") if l.strip()][:60]
    src = tmp_path / "qa.jsonl"
    src.write_text("".join(json.dumps({"q": r["text"], "a": r["text"][::-1], "y": r["label"]},
                                      ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "m"
    m = classify.main(["--model", "tiny", "--data", str(src), "--text-col", "q", "--answer-col", "a",
                       "--label-col", "y", "--epochs", "2", "--batch-size", "16", "--lr", "1e-3", "--max-len", "64",
                       "--loss", "ldam", "--drw-epoch", "1", "--fgm-eps", "0.2", "--llrd", "0.9", "--device", "cpu",
                       "--out", str(out)])
    assert len(m["epochs"]) == 2 and all(math.isfinite(e["train_loss"]) for e in m["epochs"])
    model, tok, labels = bert.load_classifier(str(out))
    assert model.meta["input"] == "question+answer" and model.meta["logit_scale_folded"] == 30.0
    val_idx = classify.stratified_split([labels.index(r["label"]) for r in rows], 0.1, 42)[1]
    p = bert.predict_proba(model, tok, [rows[i]["text"] for i in val_idx], 128, 64,
                           answers=[rows[i]["text"][::-1] for i in val_idx])
    # the last epoch was validated in the loop on softmax(30 * z); the saved model must give the same numbers
    # by itself, which it only does when s = 30 was folded into its head
    got = classify.ece(p, [labels.index(rows[i]["label"]) for i in val_idx])
    assert abs(got - m["epochs"][-1]["val_ece"]) < 1e-6 and abs(got - m["val"]["ece"]) < 1e-6
    assert m["val"]["accuracy"] == m["epochs"][-1]["val_accuracy"]


def test_seed_004_recipe_end_to_end(tmp_path):
    """Linear head on [CLS], CE for the first epoch then LDAM with C = 1 and s = 1, a boosted class, --max-steps:
    the schedule switches, training stops at the step asked for, and the saved folder predicts what was measured."""
    out = tmp_path / "m"
    m = classify.main(["--model", "tiny", "--data", SAMPLE_LABELS, "--head", "linear", "--loss", "ldam",
                       "--ldam-c", "1", "--ldam-s", "1", "--ce-epochs", "1", "--boost-classes", "critical",
                       "--max-steps", "7", "--batch-size", "128", "--lr", "1e-3", "--max-len", "32",
                       "--device", "cpu", "--quiet", "--out", str(out)])
    # 406 training rows in batches of 128: 4 steps per epoch, so step 7 ends inside the second epoch
    assert m["steps"] == 7 and [e["steps"] for e in m["epochs"]] == [4, 7]
    assert [e["objective"] for e in m["epochs"]] == ["ce", "ldam"]
    model, tok, labels = bert.load_classifier(str(out))
    assert model.head == "linear" and model.meta["logit_scale_folded"] == 1.0
    rows = [json.loads(l) for l in open(SAMPLE_LABELS, encoding="utf-8") if l.strip()]
    y = [labels.index(r["label"]) for r in rows]
    va = classify.stratified_split(y, 0.1, 42)[1]
    p = bert.predict_proba(model, tok, [rows[i]["text"] for i in va], 64, 32)
    assert abs(classify.ece(p, np.array(y)[va]) - m["epochs"][-1]["val_ece"]) < 1e-6
    # the linear head reads the [CLS] state directly (no pooler)
    ids, am, tt = bert.collate(bert.build_inputs(tok, ARABIC, 32), tok.pad_id, "cpu")
    with torch.no_grad():
        want = F.linear(model.bert(ids, am, tt)[:, 0], model.classifier.weight, model.classifier.bias)
        assert torch.allclose(model(ids, am, tt), want, atol=1e-6)


def test_progress_bar_only_on_a_terminal(tmp_path, monkeypatch):
    """tqdm draws a bar with rate and ETA when stderr is a terminal; nothing with --quiet or when piped."""
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    args = ["--model", "tiny", "--max-steps", "3", "--batch-size", "64", "--max-len", "16", "--device", "cpu",
            "--out", str(tmp_path / "m")]
    for extra, tty, shown in (([], True, True), (["--quiet"], True, False), ([], False, False)):
        err = Terminal() if tty else io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        classify.main(args + extra)
        text = err.getvalue()
        assert ("epoch 1/1" in text and "3/3" in text and "step/s" in text and "<00:00" in text) == shown, text


def _run_cli(tmp_path, capsys, *args):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        classify.main(list(args) + ["--model", "tiny", "--epochs", "1", "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert not out.exists()
    return err[0]


def test_bad_input_exits_2(tmp_path, capsys):
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "سؤال", "label": "critical"}\n{"body": "سؤال", "label": "neutral"}\n',
                 encoding="utf-8")   # "question" is an alias of text now; a row with neither is refused
    msg = _run_cli(tmp_path, capsys, "--data", str(f))
    assert msg.startswith("error: ") and f"{f}:2: text: missing column" in msg
    f.write_text('{"text": "سؤال", "label": "critical"}\n{"text": "سؤال آخر", "label": "urgent"}\n',
                 encoding="utf-8")
    msg = _run_cli(tmp_path, capsys, "--data", str(f), "--labels", "non-critical,neutral,critical")
    assert f"{f}:2: label: unknown label 'urgent'" in msg
    f.write_text("", encoding="utf-8")
    msg = _run_cli(tmp_path, capsys, "--data", str(f))
    assert msg.startswith(f"error: {f}:1:")
    g = tmp_path / "x.csv"
    g.write_text("text,label\nسؤال,critical\n", encoding="utf-8")
    msg = _run_cli(tmp_path, capsys, "--data", str(g))
    assert "at least 2 classes" in msg


def test_bad_checkpoint_or_flags_exit_2(tmp_path, capsys):
    """A broken config.json, a bad value in it, a truncated weights file and seed 004's flags used wrongly: one line
    naming the file (or flag), exit 2, nothing written."""
    _, path = tiny_hf(tmp_path)
    capsys.readouterr()   # transformers' own save messages
    cfg = (path / "config.json").read_text()
    for name, edit, needle in (
            ("notjson", lambda d: (d / "config.json").write_text("{bad"), "config.json:1: config is not valid JSON"),
            ("badvalue", lambda d: (d / "config.json").write_text(cfg.replace('"hidden_size": 32', '"hidden_size": "32"')),
             "config.json: hidden_size: '32' is not a valid value"),
            ("roberta", lambda d: (d / "config.json").write_text(cfg.replace('"model_type": "bert"', '"model_type": "x"')),
             "config.json: model_type: 'x' is not supported"),
            ("cut", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:3000]),
             "model.safetensors: not a valid safetensors file")):
        d = tmp_path / name
        d.mkdir()
        for f in ("config.json", "model.safetensors"):
            (d / f).write_bytes((path / f).read_bytes())
        for f in ("vocab.txt", "tokenizer.json"):
            (d / f).write_bytes(open(os.path.join(WORDPIECE, f), "rb").read())
        edit(d)
        with pytest.raises(SystemExit) as e:
            classify.main(["--model", str(d), "--data", SAMPLE_LABELS, "--max-len", "64", "--device", "cpu",
                           "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
        assert not (tmp_path / "out").exists()
    msg = _run_cli(tmp_path, capsys, "--data", SAMPLE_LABELS, "--loss", "ldam", "--boost-classes", "urgent")
    assert "--boost-classes: 'urgent' is not a class" in msg
    msg = _run_cli(tmp_path, capsys, "--data", SAMPLE_LABELS, "--ce-epochs", "2")
    assert "need --loss ldam" in msg
