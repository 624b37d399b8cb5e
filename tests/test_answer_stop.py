"""Stopping a generated row once it begins a new question: data.answer_complete against data.extract_answer, and
model.generate's stop callback (rows stop early; no other row's sample changes)."""
import pytest
import torch

import data
import evaluate as E
from model import Config, Decoder
from test_data import EXTRACT_CASES, OOS_EXTRACT
from test_evaluate import env  # noqa: F401


@pytest.mark.parametrize("generated, want", EXTRACT_CASES)
def test_answer_complete_never_changes_the_answer(generated, want):
    """Once a prefix of the generation is 'complete', every longer prefix gives the same answer as the whole text:
    stopping there loses nothing; the whole text is complete exactly when a prefix is."""
    complete = [k for k in range(len(generated) + 1) if data.answer_complete(generated[:k])]
    assert complete == list(range(complete[0], len(generated) + 1)) if complete else True, "complete stays complete"
    for k in complete:
        assert data.extract_answer(generated[:k]) == want
    assert bool(complete) == data.answer_complete(generated)
    tail = "\nسؤال آخر؟\n\nالإجابة:\nجواب"                # a new question and cue always completes it
    assert data.answer_complete(generated + tail)
    if generated not in CUT_CUE:                       # a cue cut short is one only at the very end of the text
        assert data.extract_answer(generated + tail) == want


CUT_CUE = {g for g, _ in EXTRACT_CASES if data._cut_cue(g.split("\n"), g.count("\n"))}


def test_cut_cue_cases():
    assert {c["generated"] for c in OOS_EXTRACT if c["kind"] == "cut-cue"} <= CUT_CUE


def tiny_decoder():
    cfg = Config.from_hf(dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=2, n_inner=None, n_positions=128,
                              vocab_size=50, layer_norm_epsilon=1e-5, activation_function="gelu_new",
                              bos_token_id=0, eos_token_id=0, tie_word_embeddings=True))
    m = Decoder(cfg)
    m.init_weights(0)
    return m.eval()


def test_generate_stop_callback():
    m = tiny_decoder()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    run = lambda stop: m.generate(prompts, 30, 0.9, eos_id=-1, stop=stop,   # noqa: E731
                                  generator=torch.Generator().manual_seed(3))
    free = run(None)
    assert [len(r) for r in free] == [30, 30, 30]
    early = run(lambda ids: len(ids) >= 3)           # every row accepted at the first check (after 8 tokens)
    assert [len(r) for r in early] == [8, 8, 8] and [r[:8] for r in free] == early
    seen = []

    def only_first(ids):
        seen.append(len(ids))
        return ids == free[0][:len(ids)]             # accepts row 0 only
    part = run(only_first)
    assert part == free, "a stopped row keeps drawing: the other rows' samples do not change"
    assert seen[:2] == [8, 8] and 16 not in seen[:2], "asked every 8 steps, unfinished rows only"
    assert seen.count(8) == 3 and seen.count(16) == 2


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
