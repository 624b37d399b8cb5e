"""The paper's and the notebooks' recipes, flag by flag: train.py --recipe, evaluate.py --recipe/--prompt/--top-k/
--top-p, the base model's generation_config.json carried into train.py's output folder and read back by
evaluate.py. Fixtures: test_train.py's tiny model + records, test_evaluate.py's tiny decoder + scorer."""
import json
import os

import pytest
import torch

import data
import evaluate as E
import model as M
import train
from test_evaluate import env, read_jsonl, run_eval  # noqa: F401
from test_train import assets, base_args, run_main  # noqa: F401

pytestmark = pytest.mark.usefixtures("threads_and_signals")


def test_train_recipe_sets_defaults_and_flags_still_win():
    paper = train.get_args([])
    assert (paper.loss_tokens, paper.loss_norm, paper.lora_rank, paper.batch_size, paper.grad_accum) == \
        ("answer", "example", 0, 8, 1)
    nb = train.get_args(["--recipe", "notebook"])
    assert (nb.loss_tokens, nb.max_len, nb.lora_rank, nb.lora_alpha, nb.lora_dropout, nb.lr, nb.epochs,
            nb.batch_size, nb.grad_accum, nb.schedule, nb.warmup, nb.quantize, nb.lora_targets) == \
        ("padded", 512, 16, 32, 0.05, 2e-4, 3, 1, 8, "linear", 0, "nf4", "notebook")
    assert (paper.quantize, paper.lora_targets) == ("none", "qkv,o")
    mixed = train.get_args(["--recipe", "notebook", "--lr", "1e-3", "--loss-tokens", "all", "--batch-size", "4"])
    assert (mixed.lr, mixed.loss_tokens, mixed.batch_size, mixed.grad_accum) == (1e-3, "all", 4, 8)


def test_train_carries_the_base_generation_config(assets, tmp_path):
    """A base folder with a generation_config.json (Qwen3-like sampling settings): train.py's output folder holds
    the same file, byte for byte; without one, none is invented."""
    base = tmp_path / "base"
    base.mkdir()
    for f in os.listdir(assets["model"]):
        (base / f).write_bytes(open(os.path.join(assets["model"], f), "rb").read())
    text = json.dumps({"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "eos_token_id": 0})
    (base / "generation_config.json").write_text(text, encoding="utf-8")
    out, plain = tmp_path / "out", tmp_path / "plain"
    common = ("--eval-data", "none", "--batch-size", "8")
    args = base_args(assets, out, *common, steps=1)
    args[args.index("--model") + 1] = str(base)
    assert run_main(args) == 0
    assert (out / "generation_config.json").read_text(encoding="utf-8") == text
    assert run_main(base_args(assets, plain, *common, steps=1)) == 0
    assert not (plain / "generation_config.json").exists()


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


def test_format_prompt_without_cue():
    assert data.format_prompt("س", cue=False) == "\nس\n"
    assert data.format_prompt("س") == "\nس\n\n" + data.PROMPT_CUE + "\n"


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


def test_train_notebook_recipe_uses_nf4_and_the_family_lora_targets(tmp_path):
    """--recipe notebook is QLoRA on the notebooks' targets: a GPT-2-family model gets c_attn,c_proj (the notebooks'
    peft target_modules) on a 4-bit NF4 base; an explicit --lora-targets still wins."""
    out = tmp_path / "nb"
    train.main(["--recipe", "notebook", "--model", "tiny", "--max-steps", "1", "--max-len", "48", "--quiet",
                "--out", str(out)])
    a = json.loads((out / "args.json").read_text())
    assert (a["quantize"], a["lora_targets"], a["lora_rank"]) == ("nf4", ["c_attn", "c_proj"], 16)
    assert train.NOTEBOOK_LORA_TARGETS["qwen2"] == "q_proj,v_proj"
    out2 = tmp_path / "nb2"
    train.main(["--recipe", "notebook", "--model", "tiny", "--max-steps", "1", "--max-len", "48", "--quiet",
                "--lora-targets", "qkv", "--out", str(out2)])
    assert json.loads((out2 / "args.json").read_text())["lora_targets"] == ["qkv"]


def test_notebook_extraction_keeps_everything_after_the_first_cue():
    """The notebooks' `pred.split(Q, 1)[-1].split(cue, 1)[-1]` on the generated text (the prompt already cut)."""
    cases = [("\nالاجابة:\nاشرب الماء.\nسؤال؟\n\nالاجابة:\nلا", "اشرب الماء.\nسؤال؟\n\nالاجابة:\nلا"),
             ("اشرب الماء.", "اشرب الماء."),                                 # no cue: the whole text
             ("كلام الاجابة: جواب", "جواب"),
             ("\nالإجابة:\nجواب", "الإجابة:\nجواب")]                         # the exact cue only, as split() did
    for text, want in cases:
        assert data.extract_answer_notebook(text) == want


def test_generation_stops_at_every_eos_id_of_the_generation_config(env, tmp_path, monkeypatch):
    """model.generate with a list of eos ids cuts each row at the first of any of them (two for Qwen3); evaluate
    passes the tokenizer's EOS plus generation_config.json's eos_token_id (an int or a list) for both recipes;
    --recipe notebook keeps the notebooks' answer and never stops early at a cue."""
    from test_answer_stop import tiny_decoder
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
