"""model.load_tokenizer against transformers' tokenizers built from the same files (offline, tiny BPE)."""
import json
import os
import shutil

import pytest
from tokenizers import ByteLevelBPETokenizer

import transformers
from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

import model as M
import hub

transformers.logging.set_verbosity_error()

SPECIALS = ["<|endoftext|>", "<s>", "</s>", "<pad>"]
DIALECT_TAGS = ["[EGYPTIAN]", "[MSA]", "[LEVANTINE]", "[GULF]", "[MAGHREBI]"]

CORPUS = [
    "السلام عليكم، كيف حالك اليوم؟",
    "أعاني من ألم في الصدر منذ ١٢ ساعة، هل يجب أن أذهب إلى الطوارئ؟",
    "ازيك يا دكتور؟ عندي صداع جامد من 3 أيام ومش عارف أعمل إيه!",
    "شلونك؟ ودي أسأل عن دوا الضغط، هل آخذه قبل الأكل ولا بعده؟",
    "شنو ندير؟ واش كاين شي دوا مزيان للحمى ديال الدراري الصغار؟",
    "الطبيب قال: خذ حبتين يوميا بعد الأكل لمدة ٧ أيام.",
    "The patient was tested for COVID-19 on 2021-03-15 (PCR: negative).",
    "نسبة السكر في الدم 180 mg/dL، وهذا مرتفع قليلاً.",
    "الْحَمْدُ لِلَّهِ، الحالة مستقرة الآن.",
]
TEXTS = CORPUS[1:6] + [
    "\nما هي أعراض نقص فيتامين د؟\n\nالاجابة:\n",
    "جرعة Paracetamol هي 500 ملغ كل ٦ ساعات...  لا تتجاوز 4 غرام!",
    "عندي كحة وسخونية 😷 من امبارح",
    "كلمة غريبة: ثخخخظظظ، وأرقام ٠١٢٣٤٥٦٧٨٩ و 0123456789",
]


def _train(add_prefix_space):
    tk = ByteLevelBPETokenizer(add_prefix_space=add_prefix_space)
    tk.train_from_iterator(CORPUS * 10, vocab_size=420, min_frequency=2, special_tokens=SPECIALS,
                           show_progress=False)
    return tk


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """json: tokenizer.json only; json_sp: add_prefix_space=True (the AraGPT2 setting); vm: vocab.json + merges.txt
    + added_tokens.json + special_tokens_map.json, laid out like monsoon-nlp/dialect-ar-gpt-2021."""
    root = tmp_path_factory.mktemp("tok")
    out = {}
    tk = _train(False)
    out["json"] = root / "json"
    out["json"].mkdir()
    tk.save(str(out["json"] / "tokenizer.json"))

    out["json_sp"] = root / "json_sp"
    out["json_sp"].mkdir()
    _train(True).save(str(out["json_sp"] / "tokenizer.json"))

    out["vm"] = root / "vm"
    out["vm"].mkdir()
    tk._tokenizer.model.save(str(out["vm"]))     # vocab.json + merges.txt
    v = tk.get_vocab_size()
    with open(out["vm"] / "added_tokens.json", "w") as f:
        json.dump({t: v + i for i, t in enumerate(DIALECT_TAGS)}, f)
    with open(out["vm"] / "special_tokens_map.json", "w") as f:
        json.dump({k: "<|endoftext|>" for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, f)
    out["base_vocab"] = v
    return out


def _hf_ids(ref, text):
    return ref(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("which", ["json", "json_sp"])
def test_tokenizer_json_matches_transformers(dirs, which):
    ours = M.load_tokenizer(str(dirs[which]))
    ref = PreTrainedTokenizerFast(tokenizer_file=str(dirs[which] / "tokenizer.json"))
    for text in TEXTS:
        assert ours.encode(text) == _hf_ids(ref, text), text
    assert ours.vocab_size == len(ref)


def test_vocab_merges_added_tokens_match_transformers(dirs):
    d = dirs["vm"]
    ours = M.load_tokenizer(str(d))
    ref = GPT2TokenizerFast.from_pretrained(str(d))
    assert os.path.exists(d / "vocab.json") and not os.path.exists(d / "tokenizer.json")
    texts = TEXTS + [tag + " " + t for tag, t in zip(DIALECT_TAGS, TEXTS)]
    for text in texts:
        assert ours.encode(text) == _hf_ids(ref, text), text
    v = dirs["base_vocab"]
    for i, tag in enumerate(DIALECT_TAGS):
        assert ours.encode(tag + " ازيك")[0] == v + i
    assert ours.vocab_size == len(ref) == v + len(DIALECT_TAGS)


def test_vocab_merges_same_ids_as_tokenizer_json(dirs):
    """The same BPE through either file format gives the same ids (no tags involved)."""
    a, b = M.load_tokenizer(str(dirs["json"])), M.load_tokenizer(str(dirs["vm"]))
    for text in TEXTS:
        assert a.encode(text) == b.encode(text)


def test_eos_string_in_text_is_one_token(dirs):
    """transformers treats "<|endoftext|>" in vocab.json as a special token: one id, not its bytes."""
    ours = M.load_tokenizer(str(dirs["vm"]))
    ref = GPT2TokenizerFast.from_pretrained(str(dirs["vm"]))
    text = "سؤال<|endoftext|>جواب"
    assert _hf_ids(ref, text).count(0) == 1
    assert ours.encode(text) == _hf_ids(ref, text)


@pytest.mark.parametrize("which", ["json", "json_sp", "vm"])
def test_decode_encode_round_trip(dirs, which):
    ours = M.load_tokenizer(str(dirs[which]))
    if which == "vm":
        ref = GPT2TokenizerFast.from_pretrained(str(dirs[which]))
    else:
        ref = PreTrainedTokenizerFast(tokenizer_file=str(dirs[which] / "tokenizer.json"))
    texts = TEXTS + (["[GULF] شلونك؟"] if which == "vm" else [])
    for text in texts:
        ids = ours.encode(text)
        assert all(isinstance(i, int) for i in ids)
        assert ours.decode(ids) == ref.decode(ids)
        if which == "json_sp":   # add_prefix_space=True (AraGPT2): the added leading space comes back, as in HF
            assert ours.decode(ids) == (text if text.startswith(" ") else " " + text)
        else:
            assert ours.decode(ids) == text


def test_special_ids_from_special_tokens_map(dirs, tmp_path):
    ours = M.load_tokenizer(str(dirs["vm"]))
    ref = GPT2TokenizerFast.from_pretrained(str(dirs["vm"]))
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id) == (0, 0, 0)

    # the dict form real repos use (LFM2, Qwen): {"bos_token": {"content": "<s>", ...}}
    d = tmp_path / "sp"
    shutil.copytree(str(dirs["json"]), str(d))
    tok = lambda s: {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    with open(d / "special_tokens_map.json", "w") as f:
        json.dump({"bos_token": tok("<s>"), "eos_token": tok("</s>"), "pad_token": "<pad>"}, f)
    ours = M.load_tokenizer(str(d))
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 3)


def test_special_ids_from_config(dirs, tmp_path):
    d = tmp_path / "cfg"
    shutil.copytree(str(dirs["json"]), str(d))
    with open(d / "config.json", "w") as f:
        json.dump({"model_type": "bloom", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}, f)
    ours = M.load_tokenizer(str(d))
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 3)


def test_save_round_trip(dirs, tmp_path):
    ours = M.load_tokenizer(str(dirs["vm"]))
    out = tmp_path / "saved"
    ours.save(str(out))
    again = M.load_tokenizer(str(out))
    texts = TEXTS + ["[EGYPTIAN] ازيك يا دكتور"]
    for text in texts:
        assert again.encode(text) == ours.encode(text)
    assert (again.bos_id, again.eos_id, again.pad_id, again.vocab_size) == (
        ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size)


def test_tiny_tokenizer_fits_tiny_model():
    tok = M.load_tokenizer("tiny")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 0, 0)
    cfg = M.Config.from_hf(hub.REGISTRY["tiny"]["config"])
    assert tok.vocab_size <= cfg.vocab_size
    ids = tok.encode(TEXTS[0])
    assert ids and max(ids) < cfg.vocab_size
    assert tok.decode(ids) == TEXTS[0]
