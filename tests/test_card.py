"""<out>/README.md, the model card of a train.py run (card.py): huggingface_hub.ModelCard reads its front matter;
the body holds the command, the weights, the loss settings, the data's sha256, the steps and the final eval loss;
evaluate.py adds its scores to it; a README.md of the user's is never replaced."""
import json
import os

import pytest
from huggingface_hub import ModelCard

import card
import evaluate as E

from conftest import run_train

pytestmark = pytest.mark.usefixtures("threads_and_signals")
SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample")


def tiny(out, *extra):
    return ["--model", "tiny", "--data", os.path.join(SAMPLE, "train.jsonl"), "--out", str(out), "--max-steps", "2",
            "--batch-size", "4", "--quiet", *extra]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "run"
    argv = tiny(out, "--weights", "0.5,1,2", "--lora-rank", "4", "--lora-targets", "c_attn")
    assert run_train(argv) == 0
    return out, argv


def test_card_reads_as_the_hub_reads_it(lora_run):
    out, argv = lora_run
    mc = ModelCard.load(str(out / "README.md"))
    meta = mc.data.to_dict()
    assert meta["library_name"] == "transformers" and "base_model" not in meta   # tiny: no hub base
    assert meta["tags"] == ["severity-aware", "arabic", "medical", "lora"]
    args = json.loads((out / "args.json").read_text())
    evals = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines() if "eval_loss" in ln]
    text = mc.text
    assert "python train.py " + " ".join(argv) in text
    assert "| weights a, b, c | 0.5, 1, 2 (--weights 0.5,1,2) |" in text
    assert "| loss tokens | answer |" in text and "| loss normalisation | example |" in text
    assert "| severity source | probs |" in text and "| steps | 2 of 2 |" in text
    assert args["data_sha256"] in text and "LoRA | r 4, alpha 32" in text
    ev = evals[-1]
    assert "| " + " | ".join(f"{ev[k]:.4f}" for k in ("eval_loss", "eval_loss_non-critical", "eval_loss_neutral",
                                                         "eval_loss_critical")) + " |" in text
    assert os.path.join(SAMPLE, "test.jsonl") in text   # --eval-data auto, resolved


def test_base_model_of_a_hub_model():
    args = dict(model="aragpt2-base", weights="strong", weights_abc=[1.0, 1.0, 3.0], lora_rank=0, lr=5e-5,
                data="d.jsonl", data_sha256="0" * 64)
    mc = ModelCard(card.render(args, 10, 10, None, "python train.py --model aragpt2-base", "aubmindlab/aragpt2-base"))
    assert mc.data.base_model == "aubmindlab/aragpt2-base" and "lora" not in mc.data.tags


def test_new_run_replaces_our_card_never_the_users(lora_run, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(tiny(out, "--lora-rank", "4")) == 0
    assert run_train(tiny(out)) == 0                       # full fine-tuning into the same folder: a new card
    assert "lora" not in ModelCard.load(str(out / "README.md")).data.tags
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("# my notes\n")
    capsys.readouterr()
    assert run_train(tiny(mine)) == 0
    assert (mine / "README.md").read_text() == "# my notes\n"
    assert "is not a model card written by train.py" in capsys.readouterr().err
    assert (mine / "model.safetensors").exists()


def fake_result(setting, f1):
    groups = {g: {"mean": f1 + i, "lo": f1 + i - 1, "hi": f1 + i + 1, "n": 3}
              for i, g in enumerate(("overall", "non-critical", "neutral", "critical"))}
    return {"setting": setting, "data": {"path": "test.jsonl", "n": 12}, "generation": {"mode": "greedy"},
            "scores": {"f1": groups}, "nll": {"overall": {"mean": 2.5, "lo": 2.4, "hi": 2.6, "n": 12}},
            "timing": {"total_s": 1.0}, "model": {"name": "m"}}


def test_with_scores_adds_and_replaces_rows():
    text = card.with_scores("---\nlibrary_name: transformers\n---\nbody\n", fake_result("Balanced", 60.0))
    text = card.with_scores(text, fake_result("CE", 50.0))
    text = card.with_scores(text, fake_result("Balanced", 70.0))   # the same setting and data: replaced
    rows = [ln for ln in text.splitlines() if ln.startswith("| Balanced") or ln.startswith("| CE")]
    assert len(rows) == 2 and "70.00 [69.00, 71.00]" in rows[1] and "50.00" in rows[0]
    assert text.count(card.EVAL_BEGIN) == 1 and ModelCard(text).data.library_name == "transformers"


def test_evaluate_adds_its_scores_to_the_card(lora_run, tmp_path, monkeypatch):
    out, _ = lora_run
    before = (out / "README.md").read_text()
    monkeypatch.setattr(E, "evaluate", lambda args: (fake_result("Balanced", 61.0), [{"id": 0}]))
    monkeypatch.setattr(E, "print_summary", lambda result: None)
    E._main(["--model", str(out), "--data", os.path.join(SAMPLE, "test.jsonl")])   # eval.json beside the model
    after = ModelCard.load(str(out / "README.md"))
    assert after.text.startswith(ModelCard(before).text.rstrip("\n")) and "61.00 [60.00, 62.00]" in after.text
    assert (out / "eval.json").exists()
    other = tmp_path / "scores"                                   # --out elsewhere: the model's card still gets them
    monkeypatch.setattr(E, "evaluate", lambda args: (fake_result("CE", 40.0), [{"id": 0}]))
    E._main(["--model", str(out), "--data", os.path.join(SAMPLE, "test.jsonl"), "--out", str(other)])
    assert "40.00" in (out / "README.md").read_text() and not (other / "README.md").exists()
