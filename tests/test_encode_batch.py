"""train.encode tokenises in batches (tokenizers' encode_batch): the examples must be exactly those of the
one-record-at-a-time loop it replaced (written out below), for varied records: Arabic, over-long (cut at max_len),
empty answers, every loss_tokens mode, a tokenizer whose post-processor adds BOS (LFM2), chunk boundaries."""
import pytest
from tokenizers import Tokenizer as TK
from tokenizers import processors

import data
import model as M
import train


def per_record(records, tok, abc, max_len, loss_tokens):
    out = []
    for r in records:
        p = tok.encode(data.format_prompt(r["question"]))
        a = tok.encode(r["answer"], special=False) + [tok.eos_id]
        ids = (p + a)[:max_len]
        keep = [loss_tokens != "answer"] * len(p) + [True] * len(a)
        out.append((ids, keep[:len(ids)], train.severity_weight(r, abc), data.SEVERITIES.index(r["severity"])))
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
    tiny = M.load_tokenizer("tiny")
    tk = TK.from_str(tiny.tk.to_str())
    bos = tiny.bos_id if tiny.bos_id is not None else 0
    tk.post_processor = processors.TemplateProcessing(single=f"{tk.id_to_token(bos)} $A",
                                                      special_tokens=[(tk.id_to_token(bos), bos)])
    return {"tiny": tiny, "bos-adding": M.Tokenizer(tk, bos, tiny.eos_id, None)}


@pytest.mark.parametrize("name", ["tiny", "bos-adding"])
@pytest.mark.parametrize("loss_tokens", ["answer", "all"])
@pytest.mark.parametrize("max_len", [8, 64, 4096])
def test_batched_encode_gives_the_per_record_examples(name, loss_tokens, max_len):
    tok = tokenizers()[name]
    recs = records(300)
    got = train.encode(recs, tok, (0.5, 1.0, 1.5), max_len, loss_tokens)
    assert got == per_record(recs, tok, (0.5, 1.0, 1.5), max_len, loss_tokens)
    if name == "bos-adding":
        assert all(ids[0] == tok.bos_id for ids, *_ in got)            # the prompt's special token is kept


def test_chunk_boundaries_and_empty_input(monkeypatch):
    tok = tokenizers()["tiny"]
    recs = records(8192 + 7)                                            # one full chunk and a ragged one
    assert train.encode(recs, tok, (1, 1, 1), 32, "answer") == per_record(recs, tok, (1, 1, 1), 32, "answer")
    assert train.encode([], tok, (1, 1, 1), 32, "answer") == []


def test_a_tokenizer_without_the_tokenizers_object_still_works():
    tiny = tokenizers()["tiny"]

    class Plain:                                                        # only encode(): the per-text fallback
        eos_id = tiny.eos_id

        def encode(self, text, special=True):
            return tiny.encode(text, special=special)
    recs = records(40)
    assert train.encode(recs, Plain(), (1, 1, 1), 64, "answer") == per_record(recs, tiny, (1, 1, 1), 64, "answer")


def test_evaluate_prompts_are_the_per_question_ids():
    import types

    import evaluate
    tok = tokenizers()["bos-adding"]
    qs = [r["question"] for r in records(50)]
    fake = types.SimpleNamespace(cfg=types.SimpleNamespace(pos="rope"))
    for prompt in ("cue", "no-cue"):
        want = [tok.encode(data.format_prompt(q, cue=prompt == "cue")) for q in qs]
        assert evaluate.encode_prompts(fake, tok, qs, 10, prompt) == want
