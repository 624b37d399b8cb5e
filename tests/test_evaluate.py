"""evaluate.py: BERTScore against bert-score itself, per-severity statistics, repeatable generation, the comparison
table and bad input. Offline, CPU: a tiny decoder, a tiny byte-level BPE and a tiny random BERT scorer, all built
in a temporary folder."""
import json
import os

import numpy as np
import pytest
import torch

import batching
import data
import stats
import report
import outputs
import evaluate as E
from hub import Tokenizer
from model import Config, Decoder

QA = [  # (question, answer, severity): short synthetic texts, not medical advice
    ("أشعر بألم شديد في الصدر مع تعرق", "اتصل بالإسعاف فورا", "critical"),
    ("فقد أبي الوعي فجأة", "اطلب الإسعاف الآن وتحقق من التنفس", "critical"),
    ("نزيف لا يتوقف من جرح عميق", "اضغط على الجرح واذهب إلى الطوارئ", "critical"),
    ("صعوبة شديدة في التنفس عند طفلي", "توجه إلى الطوارئ فورا", "critical"),
    ("حرارة مرتفعة منذ ثلاثة أيام", "راجع الطبيب خلال يوم", "neutral"),
    ("قيء متكرر منذ الصباح", "اشرب السوائل وراجع الطبيب إذا استمر", "neutral"),
    ("ألم مستمر في الظهر منذ أسبوع", "راجع الطبيب لتقييم الألم", "neutral"),
    ("سعال مع بلغم منذ أيام", "راجع الطبيب إذا زاد السعال", "neutral"),
    ("صداع خفيف بعد العمل", "استرح واشرب الماء", "non-critical"),
    ("زكام وسيلان في الأنف", "الراحة والسوائل تكفي غالبا", "non-critical"),
    ("هل القهوة مضرة", "باعتدال لا تضر غالبا", "non-critical"),
    ("ما المعدل الطبيعي للنبض", "بين ستين ومئة نبضة في الدقيقة", "non-critical"),
]
PROBS = {"critical": (0.1, 0.2, 0.7), "neutral": (0.2, 0.6, 0.2), "non-critical": (0.7, 0.2, 0.1)}


def records():
    return [dict(question=q, answer=a, severity=s, **dict(zip(data.PROB_FIELDS, PROBS[s]))) for q, a, s in QA]


def make_tokenizer():
    from tokenizers import Tokenizer as TK
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tk = TK(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [data.format_prompt(q) + a for q, a, _ in QA]
    tk.train_from_iterator(texts, trainer)
    return Tokenizer(tk, 0, 0, None)


def make_decoder(tok, folder, seed=0):
    cfg = Config.from_hf(dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=2, n_inner=None, n_positions=256,
                              vocab_size=tok.vocab_size, layer_norm_epsilon=1e-5, activation_function="gelu_new",
                              bos_token_id=0, eos_token_id=0, tie_word_embeddings=True))
    m = Decoder(cfg)
    m.init_weights(seed)
    with torch.no_grad():    # larger weights: varied text and logit gaps of order 1 (no near-ties for argmax)
        m.wte.weight.mul_(20)
        for p in m.layers.parameters():
            if p.ndim == 2:
                p.mul_(20)
    m.save_pretrained(folder)
    tok.save(folder)
    return folder


def make_scorer(folder, layers=3, texts=None):
    """A tiny random BERT (transformers) with a character WordPiece vocabulary over `texts` (default: QA's): bert-score
    loads it as a local folder."""
    from transformers import BertConfig, BertModel
    texts = texts if texts is not None else [q + a for q, a, _ in QA]
    chars = sorted({c for t in texts for c in t if not c.isspace()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": False, "model_max_length": 128}, f)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    test = str(root / "test.jsonl")
    outputs.write_jsonl(test, records())
    tok = make_tokenizer()
    base = make_decoder(tok, str(root / "base"))
    run = make_decoder(tok, str(root / "run"), seed=1)
    with open(os.path.join(run, "args.json"), "w", encoding="utf-8") as f:
        json.dump({"model": "tinytest", "weights": "balanced", "weights_abc": [0.5, 1.0, 1.5], "seed": 1}, f)
    scorer = make_scorer(str(root / "scorer"))
    return dict(root=root, test=test, base=base, run=run, scorer=scorer)


def run_eval(env, out, *extra):
    argv = ["--model", env["base"], "--data", env["test"], "--out", str(out), "--bertscore-model", env["scorer"],
            "--bertscore-layer", "2", "--bootstrap", "50", "--batch-size", "5", "--quiet", *extra]
    return E.main(argv)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(ln) for ln in f]


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


# -- comparison table --------------------------------------------------------------------------------------------


def fake_eval(path, name, setting, f1, weights=None):
    cell = lambda m: {"mean": m, "lo": m - 1, "hi": m + 1, "n": 10}   # noqa: E731
    ev = {"setting": setting, "model": {"name": name, "weights": weights},
          "data": {"counts": {"overall": 10, "non-critical": 4, "neutral": 3, "critical": 3}},
          "scores": {m: {"overall": cell(f1), "non-critical": cell(f1 - 2), "neutral": cell(f1 + 1),
                         "critical": cell(f1 + 3)} for m in stats.METRICS},
          "nll": {g: cell(2.5) for g in stats.GROUPS}}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(ev, f)
    return str(path)


def test_table_rows_and_columns(tmp_path, capsys):
    files = [fake_eval(tmp_path / "a" / "eval.json", "aragpt2-base", "Base", 54.0),
             fake_eval(tmp_path / "b" / "eval.json", "aragpt2-base", "Balanced", 66.5),
             fake_eval(tmp_path / "c" / "eval.json", "tiny", "CE", 30.25)]
    plot = tmp_path / "plots" / "t.png"
    report.main(["table", *files, "--paper", "--plot", str(plot)])
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = "| model | Base | CE | Mild | Strong | Balanced |"
    assert lines.count(header) == 4                          # all answers + three severity classes
    assert "| aragpt2-base | 54.00 [53.00, 55.00] | - | - | - | 66.50 [65.50, 67.50] |" in lines
    assert "| tiny | - | 30.25 [29.25, 31.25] | - | - | - |" in lines
    assert "| AraGPT2-Base (paper) | 54.04 | 59.71 | 59.75 | 65.91 | 66.14 |" in lines
    crit = lines.index("### BERTScore F1 (x100), severity class: critical")
    assert lines[crit + 4] == "| aragpt2-base | 57.00 [56.00, 58.00] | - | - | - | 69.50 [68.50, 70.50] |"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_aggregates_seeds_and_custom_weights(tmp_path, capsys):
    files = [fake_eval(tmp_path / f"s{i}" / "eval.json", "tiny", "CE", v) for i, v in enumerate((10.0, 12.0, 14.0))]
    files.append(fake_eval(tmp_path / "w" / "eval.json", "tiny", "custom", 11.0, weights=[0.3, 1, 2]))
    report.main(["table", *files, "--paper"])
    lines = capsys.readouterr().out.splitlines()
    assert "| Qwen3-0.6B | 60.43 | 61.40 | 62.87 | 62.53 | 65.06 |" in lines   # no paper row for tiny: whole table
    assert "| model | Base | CE | Mild | Strong | Balanced | w=0.3,1,2 |" in lines
    assert "| tiny | - | 12.00 ± 2.00 (k=3) | - | - | - | 11.00 [10.00, 12.00] |" in lines


# -- bad input ---------------------------------------------------------------------------------------------------


def expect_exit2(capsys, argv, *needles, main=None):
    with pytest.raises(SystemExit) as e:
        (main or E.main)(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, err
    return err


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


def test_paper_rows_by_registry_name_or_repo_id():
    assert report.paper_key("aragpt2-base") == "aragpt2-base"
    assert report.paper_key("Qwen2.5-0.5B") == "qwen2.5-0.5b"          # args.json model = "Qwen/Qwen2.5-0.5B"
    assert report.paper_key("bloomz-560m") == "bloomz-560m"
    assert report.paper_key("tiny") is None and report.paper_key("bloom-560m") is None


# Each command reads its own flags only: a flag of another command is argparse's one-line error, exit 2.
COMMAND_ARGV = {"evaluate": (lambda a: E.main(a), ["--model", "tiny"]),
                "table": (lambda a: report.main(a), ["table", "a/eval.json"]),
                "compare": (lambda a: report.main(a), ["compare", "a", "b", "--out", "o"])}
FLAG_VALUE = {"plot": ["--plot", "p.png"], "paper": ["--paper"], "holm": ["--holm"], "metric": ["--metric", "f1"],
              "out": ["--out", "o"], "greedy": ["--greedy"], "n": ["--n", "3"]}
READ_BY = {"plot": {"table"}, "paper": {"table"}, "holm": {"table"}, "metric": {"table"}, "out": {"evaluate", "compare"},
           "greedy": {"evaluate"}, "n": {"evaluate"}}


@pytest.mark.parametrize("flag", sorted(FLAG_VALUE))
@pytest.mark.parametrize("command", sorted(COMMAND_ARGV))
def test_each_command_refuses_flags_it_does_not_read(flag, command, capsys):
    """A flag given to a command that does not read it is refused in one line naming it, never silently dropped."""
    if command in READ_BY[flag]:
        return
    main, argv = COMMAND_ARGV[command]
    with pytest.raises(SystemExit) as e:
        main(argv + FLAG_VALUE[flag])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err and FLAG_VALUE[flag][0] in err, err


