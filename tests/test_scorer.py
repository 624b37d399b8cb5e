"""The offline demo's BERTScore model, data/sample/scorer (written by data/sample/make_scorer.py): it must behave
like a BERTScore model on the sample, through evaluate.py's scoring path (bert-score loading the local folder).

The "predictions" are the test references with every third word dropped, a stand-in for a model's partial answer;
"garbage" is random WordPiece tokens of the same length. The old scorer (the tiny severity classifier at layer 2)
failed exactly here: it gave word salad ~99 F1. Also: make_scorer.py at toy size (its layout is checked against
transformers' BertForMaskedLM on every run, and the same seed writes the same bytes) and its masking."""
import json
import os
import sys

import numpy as np
import pytest
import torch

import data
import stats
import evaluate as E

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCORER = os.path.join(ROOT, "data", "sample", "scorer")
LAYER = 2                                   # the layer scripts/ablation.sh and the README use
sys.path.insert(0, os.path.join(ROOT, "data", "sample"))
import make_scorer  # noqa: E402


@pytest.fixture(scope="module")
def scored():
    refs = [r["answer"] for r in data.load_records(os.path.join(ROOT, "data", "sample", "test.jsonl"))]
    preds = [" ".join(w for i, w in enumerate(t.split()) if i % 3 != 1) for t in refs]
    shuffled = [refs[i] for i in stats.derangement(len(refs), 0)]          # every reference moved elsewhere
    from tokenizers import Tokenizer
    tk = Tokenizer.from_file(os.path.join(SCORER, "tokenizer.json"))
    g = torch.Generator().manual_seed(0)
    garbage = [tk.decode(torch.randint(5, tk.get_vocab_size(), (len(tk.encode(t).ids) - 2,), generator=g).tolist())
               for t in refs]
    scorer = E.BertScore(SCORER, LAYER, batch_size=64, device="cpu")
    f1 = lambda c, r: scorer(c, r)[:, 2] * 100  # noqa: E731
    return dict(self=f1(refs, refs), own=f1(preds, refs), shuffled=f1(preds, shuffled), garbage=f1(garbage, refs))


def test_scorer_behaves_like_bertscore(scored):
    assert np.abs(scored["self"] - 100).max() < 1e-4                  # a text against itself: 100
    own, shuffled, garbage = scored["own"], scored["shuffled"], scored["garbage"]
    assert (own > shuffled).all()                                      # every prediction prefers its own reference
    assert own.mean() - shuffled.mean() > 10
    assert garbage.mean() < shuffled.mean() < own.mean()               # word salad below both
    assert garbage.max() < own.min() and garbage.mean() < 60           # (the classifier scorer gave it ~99)


def test_scorer_folder_is_small_and_safetensors_only():
    files = sorted(os.listdir(SCORER))
    assert files == ["config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
                     "tokenizer_config.json", "vocab.txt"]
    assert sum(os.path.getsize(os.path.join(SCORER, f)) for f in files) < 4_000_000
    with open(os.path.join(SCORER, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "bert" and cfg["num_hidden_layers"] >= LAYER
    assert cfg["scorer"]["made_by"] == "data/sample/make_scorer.py"


def test_make_scorer_toy_run_is_deterministic_and_loads_in_transformers(tmp_path):
    # Toy size, a few steps: the script itself compares the saved folder with transformers' BertForMaskedLM
    # (hidden states of every layer and the MLM logits, 1e-4) and fails otherwise.
    flags = ["--steps", "4", "--batch-size", "8", "--hidden", "16", "--layers", "2", "--heads", "2", "--ffn", "32",
             "--max-len", "32", "--seed", "3"]
    for name in ("a", "b"):
        make_scorer.main([*flags, "--out", str(tmp_path / name)])
    a, b = ((tmp_path / n / "model.safetensors").read_bytes() for n in ("a", "b"))
    assert a == b
    make_scorer.main([*flags[:-1], "4", "--out", str(tmp_path / "c")])
    assert (tmp_path / "c" / "model.safetensors").read_bytes() != a


def test_make_scorer_bad_flag(capsys):
    with pytest.raises(SystemExit) as e:
        make_scorer.get_args(["--hidden", "30", "--heads", "4"])
    assert e.value.code == 2 and capsys.readouterr().err.strip() == "error: --heads 4 does not divide --hidden 30"


def test_masking():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 2000, (400, 50), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3                                        # [CLS] ... [SEP]
    ids[:200, 30:] = 0                                                  # half the rows padded after 30 tokens
    ids[:200, 29] = 3
    special = (ids == 0) | (ids == 2) | (ids == 3)
    inputs, labels = make_scorer.mask_tokens(ids, special, 0.15, 4, 2000, g)
    picked = labels != -100
    assert not (picked & special).any() and (inputs[special] == ids[special]).all()
    assert (labels[picked] == ids[picked]).all() and (inputs[~picked] == ids[~picked]).all()
    assert picked.any(1).all()                                          # every row predicts something
    share = picked.sum().item() / (~special).sum().item()
    assert 0.14 < share < 0.17
    kinds = inputs[picked]
    masked = (kinds == 4).float().mean().item()
    kept = (kinds == ids[picked]).float().mean().item()
    assert 0.77 < masked < 0.83 and 0.08 < kept < 0.12 and (kinds >= 5).logical_or(kinds == 4).all()
    one = make_scorer.mask_tokens(ids[:1, :3], special[:1, :3], 0.15, 4, 2000, g)[1]
    assert (one != -100).sum() == 1                                      # a one-token text still predicts it
