"""hub.py: tokenizers (hub.load_tokenizer) against transformers' tokenizers built from the same files (offline, tiny
BPE), the registry (names, parameter counts on the meta device), sharded hub snapshots."""
import json
import os
import shutil

import pytest
from tokenizers import ByteLevelBPETokenizer
import transformers
from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast
import torch

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


# ----------------------------------------------------------------------------------------------- 6. registry

REGISTRY_NAMES = ["aragpt2-base", "aragpt2-medium", "bloomz-560m", "al-atlas-0.5b", "gpt2-small-arabic",
                  "lfm2-350m", "lfm2-700m", "dialect-ar-gpt-2021", "qwen2.5-0.5b", "qwen3-0.6b",
                  "mistral-7b-instruct-v0.2", "llama-2-7b", "gpt2-medium", "bloom-560m", "tiny"]
PAPER_PARAMS = {
    "aragpt2-base": 134_994_432, "aragpt2-medium": 368_896_000, "bloomz-560m": 559_214_592,
    "al-atlas-0.5b": 494_032_768, "gpt2-small-arabic": 124_439_808, "lfm2-350m": 354_483_968,
    "lfm2-700m": 742_489_344, "dialect-ar-gpt-2021": 368_901_120, "qwen2.5-0.5b": 494_032_768,
    "qwen3-0.6b": 596_049_920,
}


def test_registry_names():
    missing = [n for n in REGISTRY_NAMES if n not in hub.REGISTRY]
    assert not missing, f"registry lacks {missing}"
    for name, entry in hub.REGISTRY.items():
        for key in ("repo", "family", "params", "note", "config"):
            assert key in entry, f"REGISTRY[{name!r}] has no {key!r}"


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_registry_param_counts_on_meta(name):
    with torch.device("meta"):
        m = M.Decoder(M.Config.from_hf(hub.REGISTRY[name]["config"]))
    assert m.num_params() == PAPER_PARAMS[name]


def test_tiny_offline_random_init():
    m = M.Decoder.from_pretrained("tiny").eval()
    idx = torch.randint(0, m.cfg.vocab_size, (2, 8))
    with torch.no_grad():
        out = m(idx)
    assert out.shape == (2, 8, m.cfg.vocab_size)
    assert torch.isfinite(out).all()
    new = m.generate([[1, 2, 3]], max_new_tokens=4, temperature=0, eos_id=None)
    assert len(new) == 1 and len(new[0]) <= 4


@pytest.mark.usefixtures("threads_and_signals")
def test_index_shards_are_checked_by_name_not_by_link_target(tmp_path):
    """A hub snapshot's shards are links into the cache's blobs/ folder: they load. A shard NAMED outside the folder
    ("../x") is refused (tested through train.py in the table)."""
    from safetensors.torch import load_file, save_file
    m = M.Decoder.from_pretrained("tiny")
    m.save_pretrained(str(tmp_path / "src"))
    sd = load_file(str(tmp_path / "src" / "model.safetensors"))
    keys = sorted(sd)
    (tmp_path / "blobs").mkdir()
    snap = tmp_path / "snap"
    snap.mkdir()
    shards = {"model-1.safetensors": keys[:len(keys) // 2], "model-2.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / "blobs" / name))
        os.symlink(tmp_path / "blobs" / name, snap / name)
    shutil.copy(tmp_path / "src" / "config.json", snap / "config.json")
    (snap / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, ks in shards.items() for k in ks}}), encoding="utf-8")
    loaded = M.Decoder.from_pretrained(str(snap)).state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in m.state_dict().items())
