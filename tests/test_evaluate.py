"""evaluate.py: BERTScore against bert-score itself, the demo scorer data/sample/scorer, per-severity statistics,
repeatable generation, recipes and generation settings, stopping at the cue, --quantize nf4, bad input. Offline, CPU:
a tiny decoder, a tiny byte-level BPE and a tiny random BERT scorer, all built in a temporary folder."""
import json
import os
import sys

import numpy as np
import pytest
import torch

import batching
import data
import evaluate as E
import model as M
import nf4
import report
import stats
from model import Decoder

from conftest import expect_exit2, QA, read_jsonl, run_eval


# -- BERTScore -----------------------------------------------------------------------------------------------------


def test_bertscore_equals_bert_score_package(env):
    import bert_score
    cands = ["اتصل بالإسعاف", "راجع الطبيب غدا", "اشرب الماء واسترح", "نبض القلب"]
    refs = [a for _, a, _ in QA[:4]]
    ours = E.BertScore(env["scorer"], 2, batch_size=3, device="cpu")(cands, refs)
    P, R, F = bert_score.score(cands, refs, model_type=env["scorer"], num_layers=2, idf=False)
    ref = torch.stack([P, R, F], 1).double().numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    assert not np.allclose(ref[:, 0], ref[0, 0])          # the scores differ: the comparison means something
    # another layer gives other numbers (the layer reaches bert-score)
    other = E.BertScore(env["scorer"], 1, device="cpu")(cands, refs)
    assert not np.allclose(other, ours)


def test_bertscore_empty_candidate_scores_zero(env):
    scorer = E.BertScore(env["scorer"], 2, device="cpu")
    out = scorer(["", "اتصل بالإسعاف", "   "], [QA[0][1], QA[1][1], QA[2][1]])
    assert out[0].tolist() == [0, 0, 0] and out[2].tolist() == [0, 0, 0]
    assert out[1, 2] > 0


# -- statistics ----------------------------------------------------------------------------------------------------


def test_per_severity_means_are_subset_means():
    rng = np.random.default_rng(0)
    sev = np.array(rng.choice(data.SEVERITIES, size=300))
    vals = rng.normal(50, 10, size=300) + np.select([sev == "critical", sev == "neutral"], [10, 5], 0)
    s = stats.summarize(vals, sev, n_boot=200, seed=0)
    assert s["overall"]["mean"] == pytest.approx(vals.mean())
    assert s["overall"]["n"] == 300
    for c in data.SEVERITIES:
        assert s[c]["mean"] == pytest.approx(vals[sev == c].mean())
        assert s[c]["n"] == int((sev == c).sum())
        assert s[c]["lo"] <= s[c]["mean"] <= s[c]["hi"]
    # token-weighted (ratio of sums) means, as for the NLL
    tok = rng.integers(1, 20, size=300).astype(float)
    t = stats.summarize(vals * tok, sev, n_boot=100, seed=0, denom=tok)
    assert t["critical"]["mean"] == pytest.approx((vals * tok)[sev == "critical"].sum() / tok[sev == "critical"].sum())
    assert t["critical"]["tokens"] == int(tok[sev == "critical"].sum())


def test_bootstrap_interval_contains_mean_and_narrows():
    rng = np.random.default_rng(1)
    small, big = rng.normal(0, 1, 50), rng.normal(0, 1, 5000)
    lo1, hi1 = stats.bootstrap_ci(small, 500, seed=0)
    lo2, hi2 = stats.bootstrap_ci(big, 500, seed=0)
    assert lo1 < small.mean() < hi1 and lo2 < big.mean() < hi2
    assert (hi2 - lo2) < (hi1 - lo1) / 5                      # ~ 1/sqrt(100) = 1/10 as wide
    assert stats.bootstrap_ci(small, 500, seed=0) == (lo1, hi1)  # seeded
    assert stats.bootstrap_ci([], 500) == (None, None) and stats.bootstrap_ci(small, 0) == (None, None)


# -- generation --------------------------------------------------------------------------------------------------


def test_batched_greedy_equals_one_by_one(env):
    from model import load_tokenizer
    tok, m = load_tokenizer(env["base"]), Decoder.from_pretrained(env["base"]).eval()
    qs = [q for q, _, _ in QA]
    batched = E.generate_answers(m, tok, qs, batch_size=5, max_new_tokens=12, temperature=0)
    single = [E.generate_answers(m, tok, [q], batch_size=1, max_new_tokens=12, temperature=0)[0] for q in qs]
    assert batched == single
    assert sum(len(a) for a in batched) > 0                  # something was generated


def test_seeded_sampled_and_greedy_runs_repeat(env, tmp_path):
    a = run_eval(env, tmp_path / "a", "--seed", "3", "--max-new-tokens", "10")
    b = run_eval(env, tmp_path / "b", "--seed", "3", "--max-new-tokens", "10")
    c = run_eval(env, tmp_path / "c", "--seed", "4", "--max-new-tokens", "10")
    pa, pb, pc = (read_jsonl(tmp_path / x / "predictions.jsonl") for x in "abc")
    assert [r["prediction"] for r in pa] == [r["prediction"] for r in pb]
    assert [r["prediction"] for r in pa] != [r["prediction"] for r in pc]   # the seed matters
    assert a["scores"] == b["scores"] and c["scores"] != a["scores"]
    g1 = run_eval(env, tmp_path / "g1", "--greedy", "--max-new-tokens", "10")
    g2 = run_eval(env, tmp_path / "g2", "--greedy", "--max-new-tokens", "10", "--batch-size", "3")
    assert [r["prediction"] for r in read_jsonl(tmp_path / "g1" / "predictions.jsonl")] == \
           [r["prediction"] for r in read_jsonl(tmp_path / "g2" / "predictions.jsonl")]
    assert g1["generation"]["mode"] == "greedy" and g1["scores"] == g2["scores"]


def test_eval_json_and_predictions(env, tmp_path):
    ev = run_eval(env, tmp_path / "e", "--seed", "0", "--max-new-tokens", "8", "--n", "10", "--repeat", "2", "--floor")
    on_disk = json.load(open(tmp_path / "e" / "eval.json", encoding="utf-8"))
    assert on_disk["setting"] == "Base" and on_disk["model"]["name"] == "base"
    assert on_disk["data"]["n"] == 10 and on_disk["data"]["n_file"] == 12
    assert on_disk["data"]["counts"] == {"overall": 10, "non-critical": 2, "neutral": 4, "critical": 4}
    import hashlib
    assert on_disk["data"]["sha256"] == hashlib.sha256(open(env["test"], "rb").read()).hexdigest()
    assert on_disk["generation"]["seeds"] == [0, 1]
    preds = read_jsonl(tmp_path / "e" / "predictions.jsonl")
    assert len(preds) == 20 and {p["seed"] for p in preds} == {0, 1}
    assert set(preds[0]) >= {"question", "reference", "prediction", "severity", "precision", "recall", "f1", "nll"}
    # run scores are the means of the per-example F1; the headline is the mean over runs, std across them
    for k, seed in enumerate((0, 1)):
        f1 = [p["f1"] for p in preds if p["seed"] == seed]
        assert ev["runs"][k]["scores"]["f1"]["overall"]["mean"] == pytest.approx(np.mean(f1))
        crit = [p["f1"] for p in preds if p["seed"] == seed and p["severity"] == "critical"]
        assert ev["runs"][k]["scores"]["f1"]["critical"]["mean"] == pytest.approx(np.mean(crit))
    run_means = [r["scores"]["f1"]["overall"]["mean"] for r in ev["runs"]]
    assert ev["scores"]["f1"]["overall"]["mean"] == pytest.approx(np.mean(run_means))
    assert ev["scores"]["f1"]["overall"]["std"] == pytest.approx(np.std(run_means, ddof=1))
    # --floor: every prediction against another record's reference, per run, combined like the scores
    assert ev["floor"]["f1"]["overall"]["mean"] == pytest.approx(np.mean([r["floor"]["f1"]["overall"]["mean"]
                                                                          for r in ev["runs"]]))
    perm = stats.derangement(10, 0)
    assert sorted(perm) == list(range(10)) and all(p != i for i, p in enumerate(perm))
    # the eval NLL: token-weighted mean of the per-example NLL, same as train.py's eval loss
    import train
    from model import load_tokenizer
    tok, m = load_tokenizer(env["base"]), Decoder.from_pretrained(env["base"]).eval()
    recs = data.load_records(env["test"])[:10]
    ref = train.evaluate_loss(m, batching.encode(recs, tok, (1, 1, 1), 512, "answer"), 4, 0, "cpu",
                              torch.autocast("cpu", enabled=False))
    assert on_disk["nll"]["overall"]["mean"] == pytest.approx(ref["eval_loss"], rel=1e-5)
    assert on_disk["nll"]["critical"]["mean"] == pytest.approx(ref["eval_loss_critical"], rel=1e-5)


def test_setting_read_from_train_args(env, tmp_path):
    ev = E.main(["--model", env["run"], "--data", env["test"], "--out", str(tmp_path / "r"), "--greedy", "--n", "3",
                 "--max-new-tokens", "4", "--bertscore-model", env["scorer"], "--bertscore-layer", "1",
                 "--bootstrap", "0", "--quiet"])
    assert ev["setting"] == "Balanced" and ev["model"]["name"] == "tinytest"
    assert ev["model"]["weights"] == [0.5, 1.0, 1.5]
    assert ev["scores"]["f1"]["overall"]["lo"] is None       # --bootstrap 0: no interval


def test_bad_input_exit_2(env, tmp_path, capsys):
    out = tmp_path / "never"
    common = ["--model", env["base"], "--out", str(out), "--bertscore-model", env["scorer"], "--bertscore-layer", "2"]
    expect_exit2(capsys, ["--data", str(tmp_path / "missing.jsonl"), *common], "missing.jsonl", "no such file")
    no_answers = tmp_path / "noans.jsonl"
    no_answers.write_text(json.dumps({"question": "سؤال", "severity": "critical", "p_nc": 0.1, "p_n": 0.2,
                                      "p_c": 0.7}, ensure_ascii=False) + "\n", encoding="utf-8")
    expect_exit2(capsys, ["--data", str(no_answers), *common], "noans.jsonl:1: answer")
    expect_exit2(capsys, ["--model", env["base"], "--data", env["test"], "--out", str(out),
                          "--bertscore-model", env["scorer"]], "--bertscore-layer")
    expect_exit2(capsys, ["--data", env["test"], *common[:-1], "7"], "has 3 layers")
    expect_exit2(capsys, ["--data", env["test"], *common, "--n", "0"], "--n")
    expect_exit2(capsys, ["--data", env["test"], "--model", str(tmp_path / "nomodel"), *common[2:]], "--model")
    expect_exit2(capsys, ["--data", env["test"], *common, "--bogus"], "unrecognized")
    expect_exit2(capsys, ["table", str(tmp_path / "none.json")], "none.json", main=report.main)
    expect_exit2(capsys, ["--table", str(tmp_path / "none.json")], "--table", "python report.py table")   # moved
    expect_exit2(capsys, ["--compare", "a", "b"], "--compare", "python report.py compare")
    assert not out.exists()                                  # nothing written

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


@pytest.mark.usefixtures("one_thread")
def test_scorer_behaves_like_bertscore(scored):
    assert np.abs(scored["self"] - 100).max() < 1e-4                  # a text against itself: 100
    own, shuffled, garbage = scored["own"], scored["shuffled"], scored["garbage"]
    assert (own > shuffled).all()                                      # every prediction prefers its own reference
    assert own.mean() - shuffled.mean() > 10
    assert garbage.mean() < shuffled.mean() < own.mean()               # word salad below both
    assert garbage.max() < own.min() and garbage.mean() < 60           # (the classifier scorer gave it ~99)


@pytest.mark.usefixtures("one_thread")
def test_scorer_folder_is_small_and_safetensors_only():
    files = sorted(os.listdir(SCORER))
    assert files == ["config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
                     "tokenizer_config.json", "vocab.txt"]
    assert sum(os.path.getsize(os.path.join(SCORER, f)) for f in files) < 4_000_000
    with open(os.path.join(SCORER, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "bert" and cfg["num_hidden_layers"] >= LAYER
    assert cfg["scorer"]["made_by"] == "data/sample/make_scorer.py"


@pytest.mark.usefixtures("one_thread")
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


@pytest.mark.usefixtures("one_thread")
def test_make_scorer_bad_flag(capsys):
    with pytest.raises(SystemExit) as e:
        make_scorer.get_args(["--hidden", "30", "--heads", "4"])
    assert e.value.code == 2 and capsys.readouterr().err.strip() == "error: --heads 4 does not divide --hidden 30"


@pytest.mark.usefixtures("one_thread")
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


@pytest.mark.usefixtures("threads_and_signals")
def test_resolve_recipe_flag_by_flag(tmp_path):
    ns = lambda **kw: E.get_args(["--model", "x", *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in kw.items()), [])])  # noqa: E731
    # the paper names no sampling settings: both recipes sample as the notebooks' transformers did (issue 18)
    assert E.resolve_recipe(ns(), {})[:3] == ("cue", 50, 1.0)                                 # transformers' defaults
    assert E.resolve_recipe(ns(recipe="notebook"), {})[:3] == ("no-cue", 50, 1.0)             # transformers' defaults
    qwen3 = {"top_k": 20, "top_p": 0.95, "temperature": 0.6, "source": "g.json"}
    assert E.resolve_recipe(ns(recipe="notebook"), qwen3)[:3] == ("no-cue", 20, 0.95)         # the model's own
    assert E.resolve_recipe(ns(recipe="paper"), qwen3)[:3] == ("cue", 20, 0.95)               # the model's own too
    assert E.resolve_recipe(ns(recipe="paper", top_k=0), qwen3)[:3] == ("cue", 0, 0.95)       # 0 = off, by flag
    assert E.resolve_recipe(ns(recipe="notebook", top_k=5, prompt="cue"), qwen3)[:3] == ("cue", 5, 0.95)
    notes = E.resolve_recipe(ns(recipe="notebook"), dict(qwen3, repetition_penalty=1.2))[3]
    assert len(notes) == 1 and "repetition_penalty=1.2" in notes[0]
    # the model's generation config: generation_config.json first, else config.json's generation keys
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "top_k": 7}), encoding="utf-8")
    assert E.model_generation_config(str(tmp_path))["top_k"] == 7
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 0.9}), encoding="utf-8")
    got = E.model_generation_config(str(tmp_path))
    assert got["top_p"] == 0.9 and "top_k" not in got
    assert E.model_generation_config("tiny") == {}


@pytest.mark.usefixtures("threads_and_signals")
def test_notebook_eval_samples_with_the_models_settings(env, tmp_path):
    """--recipe notebook on a folder whose generation_config.json says top_k 3: the run samples from the top 3
    after the cue-less prompt (the same predictions as generate_answers called with exactly those settings), and
    eval.json says so. Without the file it is transformers' top_k 50."""
    folder = tmp_path / "m"
    folder.mkdir()
    for f in os.listdir(env["base"]):
        (folder / f).write_bytes(open(os.path.join(env["base"], f), "rb").read())
    (folder / "generation_config.json").write_text(json.dumps({"top_k": 3}), encoding="utf-8")
    argv = ["--model", str(folder), "--data", env["test"], "--bertscore-model", env["scorer"], "--bertscore-layer",
            "2", "--bootstrap", "0", "--batch-size", "5", "--quiet", "--seed", "4", "--recipe", "notebook"]
    res = E.main(argv + ["--out", str(tmp_path / "e1")])
    g = res["generation"]
    assert (g["recipe"], g["top_k"], g["top_p"], g["prompt"]) == ("notebook", 3, None, "data.format_prompt(cue=False)")
    tok, m = M.load_tokenizer(str(folder)), M.Decoder.from_pretrained(str(folder)).eval()
    qs = [r["question"] for r in data.load_records(env["test"])]
    want = E.generate_answers(m, tok, qs, 5, 50, 0.7, 3, 1.0, 4, prompt="no-cue")
    assert [r["prediction"] for r in read_jsonl(tmp_path / "e1" / "predictions.jsonl")] == want
    assert E.encode_prompts(m, tok, qs, 50, "no-cue") == [tok.encode("\n" + q + "\n") for q in qs]
    assert want != E.generate_answers(m, tok, qs, 5, 50, 0.7, 3, 1.0, 4, prompt="cue"), "the prompt must matter"
    assert want != E.generate_answers(m, tok, qs, 5, 50, 0.7, 0, 1.0, 4, prompt="no-cue"), "top_k must matter"
    (folder / "generation_config.json").unlink()
    assert E.main(argv + ["--out", str(tmp_path / "e2")])["generation"]["top_k"] == 50


@pytest.mark.usefixtures("threads_and_signals")
def test_generation_stops_at_every_eos_id_of_the_generation_config(env, tmp_path, monkeypatch):
    """model.generate with a list of eos ids cuts each row at the first of any of them (two for Qwen3); evaluate
    passes the tokenizer's EOS plus generation_config.json's eos_token_id (an int or a list) for both recipes;
    --recipe notebook keeps the notebooks' answer and never stops early at a cue."""
    from conftest import tiny_decoder
    m = tiny_decoder()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    run = lambda eos: m.generate(prompts, 30, 1.0, eos_id=eos, generator=torch.Generator().manual_seed(3))  # noqa: E731
    free = run(-1)
    a, b = free[0][4], free[1][6]                      # two tokens the rows drew
    got = run([a, b])
    for row, full in zip(got, free):
        cut = next((j for j, x in enumerate(full) if x in (a, b)), len(full))
        assert row == full[:cut]
    assert len(got[0]) <= 4 and len(got[1]) <= 6
    assert run(a) == [r[:r.index(a)] if a in r else r for r in free]   # one int as before
    assert run([-1]) == free

    seen = []
    real = M.Decoder.generate
    monkeypatch.setattr(M.Decoder, "generate", lambda self, *x, **kw: seen.append(kw) or real(self, *x, **kw))
    folder = tmp_path / "m"
    folder.mkdir()
    for f in os.listdir(env["base"]):
        (folder / f).write_bytes(open(os.path.join(env["base"], f), "rb").read())
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}), encoding="utf-8")
    argv = ["--model", str(folder), "--data", env["test"], "--bertscore-model", env["scorer"], "--bertscore-layer",
            "2", "--bootstrap", "0", "--batch-size", "5", "--quiet", "--seed", "4", "--n", "5"]
    tok = M.load_tokenizer(str(folder))
    for recipe in ("paper", "notebook"):
        seen.clear()
        res = E.main(argv + ["--recipe", recipe, "--out", str(tmp_path / recipe)])
        assert seen and all(kw["eos_id"] == [tok.eos_id, 7, 9] for kw in seen)
        assert res["generation"]["dtype"] == "fp32"                      # CPU stays fp32 under either recipe
        nb = recipe == "notebook"
        assert all((kw["stop"] is None) == nb for kw in seen)
        assert res["generation"]["postprocess"] == ("data.extract_answer_notebook" if nb else "data.extract_answer")


def test_generate_answers_stops_at_the_cue(env, monkeypatch):
    """evaluate.generate_answers asks data.answer_complete about each row's decoded text: a text that is complete
    from the start stops every row after 8 tokens; stop_at_cue=False never asks."""
    from model import load_tokenizer
    tok, m = load_tokenizer(env["base"]), Decoder.from_pretrained(env["base"]).eval()
    qs = ["سؤال أول", "سؤال ثان أطول قليلا"]
    asked = []
    monkeypatch.setattr(data, "answer_complete", lambda text: asked.append(text) or True)
    stats = {}
    E.generate_answers(m, tok, qs, 2, 40, 0.7, 0, 1.0, 1, stats=stats)
    assert len(asked) == 2 and stats["new_tokens"] <= 16
    asked.clear()
    E.generate_answers(m, tok, qs, 2, 40, 0.7, 0, 1.0, 1, stop_at_cue=False)
    assert asked == []


SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample", "train.jsonl")


# ----------------------------------------------------------------------------------------------- 7. evaluate.py

@pytest.mark.usefixtures("one_thread")
def test_evaluate_quantize_nf4_generates_from_the_dequantised_model(tmp_path):
    """evaluate.py --quantize nf4: greedy answers equal those of the plain model whose block weights were replaced by
    their NF4 values, and eval.json records the setting."""
    import evaluate as E
    test = os.path.join(os.path.dirname(SAMPLE), "test.jsonl")
    out = tmp_path / "ev"
    E.main(["--model", "tiny", "--data", test, "--n", "4", "--greedy", "--max-new-tokens", "6", "--quantize", "nf4",
            "--bertscore-model", os.path.join(os.path.dirname(SAMPLE), "scorer"), "--bertscore-layer", "2",
            "--bootstrap", "0", "--batch-size", "4", "--quiet", "--out", str(out), "--device", "cpu"])
    assert json.load(open(out / "eval.json"))["generation"]["quantize"] == "nf4"
    preds = [json.loads(ln) for ln in open(out / "predictions.jsonl")]
    q, ref = M.Decoder.from_pretrained("tiny", quantize="nf4"), M.Decoder.from_pretrained("tiny").eval()
    with torch.no_grad():
        for n in nf4.block_linears(ref):
            ref.get_submodule(n).weight.copy_(q.get_submodule(n).dequantize())
    want = E.generate_answers(ref, M.load_tokenizer("tiny"), [p["question"] for p in preds], batch_size=4,
                              max_new_tokens=6, temperature=0)
    plain = E.generate_answers(M.Decoder.from_pretrained("tiny").eval(), M.load_tokenizer("tiny"),
                               [p["question"] for p in preds], batch_size=4, max_new_tokens=6, temperature=0)
    assert [p["prediction"] for p in preds] == want
    assert want != plain, "test set-up: quantising the random tiny model should change some greedy answer"
