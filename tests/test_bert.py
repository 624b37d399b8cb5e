"""bert.py: the BERT encoder against transformers, checkpoint layout and loader, the WordPiece tokeniser, hub
downloads, size checks of an encoder config."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import bert
import hub
import cli

from conftest import ARABIC, batch, _tiny_classifier, tiny_hf, WORDPIECE

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# Encoder and checkpoints

def test_encoder_matches_transformers(tmp_path):
    ref, path = tiny_hf(tmp_path)
    ours = bert.Bert.from_pretrained(str(path)).eval()
    ids, am, tt = batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=am, token_type_ids=tt).last_hidden_state
        got = ours(ids, am, tt)
        want0 = ref(input_ids=ids, attention_mask=am).last_hidden_state  # token types default to 0
        got0 = ours(ids, am)
    assert got.shape == (3, 11, 32)
    real = am.bool()
    assert (got - want)[real].abs().max() <= 1e-4
    assert (got0 - want0)[real].abs().max() <= 1e-4
    # padding really is masked: changing padded ids does not change the real positions
    ids2 = ids.clone()
    ids2[am == 0] = 7
    with torch.no_grad():
        got2 = ours(ids2, am, tt)
    assert (got2 - got)[real].abs().max() <= 1e-5


def test_load_with_prefix_and_head_matches_transformers(tmp_path):
    """A BertForSequenceClassification checkpoint ('bert.' prefix + classifier) loads with its head."""
    from transformers import BertForSequenceClassification
    ref, path = tiny_hf(tmp_path, "cls", BertForSequenceClassification, num_labels=3,
                        id2label={0: "non-critical", 1: "neutral", 2: "critical"},
                        label2id={"non-critical": 0, "neutral": 1, "critical": 2})
    with pytest.raises(ValueError, match="no tokenizer"):   # no tokenizer files in a bare save
        bert.load_classifier(str(path))
    model_bert = bert.Bert.from_pretrained(str(path)).eval()
    ids, am, tt = batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=am, token_type_ids=tt).logits
        h = model_bert(ids, am, tt)
        got = F.linear(model_bert.pool(h), ref.classifier.weight, ref.classifier.bias)
    assert (got - want).abs().max() <= 1e-4


def test_masked_lm_checkpoint_loads(tmp_path, capsys):
    """A BertForMaskedLM save (how most hub BERTs ship): 'bert.' prefix, MLM head, no pooler."""
    from transformers import BertForMaskedLM
    ref, path = tiny_hf(tmp_path, "mlm", BertForMaskedLM)
    ours = bert.Bert.from_pretrained(str(path)).eval()
    assert "no pooler" in capsys.readouterr().out
    ids, am, tt = batch()
    with torch.no_grad():
        want = ref.bert(input_ids=ids, attention_mask=am, token_type_ids=tt).last_hidden_state
        got = ours(ids, am, tt)
    assert (got - want)[am.bool()].abs().max() <= 1e-4


def _edit_checkpoint(src, dst, fn):
    from safetensors.torch import load_file, save_file
    os.makedirs(dst, exist_ok=True)
    sd = load_file(os.path.join(src, "model.safetensors"))
    fn(sd)
    save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as fh:
        cfg = fh.read()
    with open(os.path.join(dst, "config.json"), "w") as fh:
        fh.write(cfg)


def test_loader_is_strict(tmp_path):
    _, path = tiny_hf(tmp_path)
    k = "encoder.layer.1.attention.self.key.weight"

    _edit_checkpoint(path, tmp_path / "shape", lambda sd: sd.__setitem__(k, torch.zeros(32, 31)))
    with pytest.raises(ValueError) as e:
        bert.Bert.from_pretrained(str(tmp_path / "shape"))
    assert k in str(e.value) and "(32, 31)" in str(e.value) and "(32, 32)" in str(e.value)

    _edit_checkpoint(path, tmp_path / "missing", lambda sd: sd.pop(k))
    with pytest.raises(ValueError, match="missing tensor 'bert.encoder.layer.1.attention.self.key.weight'"):
        bert.Bert.from_pretrained(str(tmp_path / "missing"))

    _edit_checkpoint(path, tmp_path / "extra", lambda sd: sd.__setitem__("encoder.layer.1.foo", torch.zeros(2)))
    with pytest.raises(ValueError, match="unexpected tensor 'bert.encoder.layer.1.foo'"):
        bert.Bert.from_pretrained(str(tmp_path / "extra"))

    # pre-training heads and TF-era gamma/beta names are fine
    def tf_names(sd):
        sd["cls.predictions.bias"] = torch.zeros(99)
        sd["embeddings.LayerNorm.gamma"] = sd.pop("embeddings.LayerNorm.weight")
        sd["embeddings.LayerNorm.beta"] = sd.pop("embeddings.LayerNorm.bias")
    _edit_checkpoint(path, tmp_path / "tf", tf_names)
    a = bert.Bert.from_pretrained(str(tmp_path / "tf")).state_dict()
    b = bert.Bert.from_pretrained(str(path)).state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)

    os.remove(tmp_path / "tf" / "model.safetensors")
    (tmp_path / "tf" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="no .safetensors weights \\(found pytorch_model.bin"):
        bert.Bert.from_pretrained(str(tmp_path / "tf"))


def test_save_then_transformers_gives_the_same_logits(tmp_path):
    """The weight table read backwards: what save_classifier writes, transformers' BertForSequenceClassification
    computes exactly as the model in memory did (q, k and v split back in the right order)."""
    from transformers import BertForSequenceClassification
    model = _tiny_classifier(seed=3).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))        # nothing left at its init value (LayerNorms, biases)
    bert.save_classifier(model, hub.load_wordpiece(WORDPIECE), str(tmp_path / "m"))
    hf = BertForSequenceClassification.from_pretrained(str(tmp_path / "m")).eval()
    ids, am, tt = batch(vocab=50, T=9)
    with torch.no_grad():
        assert (hf(input_ids=ids, attention_mask=am, token_type_ids=tt).logits - model(ids, am, tt)).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------
# Tokeniser

def test_tokenizer_matches_transformers(tmp_path):
    from transformers import BertTokenizerFast
    vocab_only = tmp_path / "vocab_only"
    vocab_only.mkdir()
    (vocab_only / "vocab.txt").write_text(open(os.path.join(WORDPIECE, "vocab.txt"), encoding="utf-8").read(),
                                          encoding="utf-8")
    from_vocab = hub.load_wordpiece(str(vocab_only))
    from_json = hub.load_wordpiece(WORDPIECE)
    hf = BertTokenizerFast.from_pretrained(str(vocab_only), do_lower_case=False)
    want = [hf(t)["input_ids"] for t in ARABIC]
    for tok in (from_vocab, from_json):
        got = [tok.single(x, 10_000)[0] for x in tok.encode(ARABIC)]
        assert got == want
    assert any(len(set(w) - {from_vocab.cls_id, from_vocab.sep_id}) > 3 for w in want)
    # pair encoding = [CLS] Q [SEP] A [SEP] with token types, as transformers does it
    e = hf(ARABIC[0], ARABIC[1])
    q, a = from_vocab.encode(ARABIC[:2])
    assert from_vocab.pair(q, a, 10_000) == (e["input_ids"], e["token_type_ids"])
    # do_lower_case from tokenizer_config.json is honoured (Latin letters are lower-cased)
    (vocab_only / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    low = hub.load_wordpiece(str(vocab_only))
    hf_low = BertTokenizerFast.from_pretrained(str(vocab_only))  # reads do_lower_case from the config
    assert [low.single(x, 10_000)[0] for x in low.encode(ARABIC)] == [hf_low(t)["input_ids"] for t in ARABIC]
    # save -> load round trip keeps the ids
    from_vocab.save(str(tmp_path / "saved"))
    again = hub.load_wordpiece(str(tmp_path / "saved"))
    assert again.encode(ARABIC) == from_vocab.encode(ARABIC)


def test_tokenizer_config_casing_overrides_tokenizer_json(tmp_path):
    """A tokenizer.json whose BertNormalizer keeps case and accents, with a tokenizer_config.json that says
    do_lower_case (and strip_accents or not): we tokenise as transformers' BertTokenizerFast does for that folder."""
    from tokenizers.implementations import BertWordPieceTokenizer
    from transformers import BertTokenizerFast
    words = ["hello", "world", "cafe", "café", "Hello", "CAFÉ", "ça", "va"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + sorted(set("".join(words)))
    vocab = {t: i for i, t in enumerate(vocab)}
    texts = ["Hello WORLD, CAFÉ ça va", "hello café Ça"]
    seen = []
    for i, extra in enumerate(({"do_lower_case": True}, {"do_lower_case": True, "strip_accents": False},
                               {"do_lower_case": False})):
        d = tmp_path / f"t{i}"
        d.mkdir()
        BertWordPieceTokenizer(vocab, lowercase=False, strip_accents=False).save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", **extra}))
        ours = hub.load_wordpiece(str(d))
        want = [BertTokenizerFast.from_pretrained(str(d))(t)["input_ids"] for t in texts]
        assert [ours.single(x, 100)[0] for x in ours.encode(texts)] == want, extra
        seen.append(want)
    assert seen[0] != seen[1] != seen[2] != seen[0]   # the three settings really tokenise differently

def test_head_tail_truncation():
    tok = hub.load_wordpiece(WORDPIECE)
    q, a = list(range(100, 400)), list(range(1000, 1600))   # 300 question tokens, 600 answer tokens

    def parts(ids, tt):
        first_sep = ids.index(tok.sep_id)
        return ids[1:first_sep], ids[first_sep + 1:-1], tt
    # fits: untouched
    ids, tt = tok.pair(q[:10], a[:20], 512)
    assert parts(ids, tt)[:2] == (q[:10], a[:20]) and tt == [0] * 12 + [1] * 21
    # long question, long answer: answer keeps 50 tokens (25 head + 25 tail), question fills the rest
    ids, tt = tok.pair(q + q, a, 128)
    qq, aa, _ = parts(ids, tt)
    assert len(ids) == 128 and len(aa) == 50 and len(qq) == 128 - 3 - 50
    assert aa == a[:25] + a[-25:] and qq == (q + q)[:75]
    # short question, long answer: answer gets all the room, first and last halves
    ids, tt = tok.pair(q[:20], a, 512)
    qq, aa, _ = parts(ids, tt)
    assert len(ids) == 512 and qq == q[:20] and len(aa) == 489
    assert aa == a[:245] + a[-244:]
    # short answer, long question: the whole answer is kept
    ids, tt = tok.pair(q + q, a[:30], 128)
    qq, aa, _ = parts(ids, tt)
    assert aa == a[:30] and len(qq) == 128 - 3 - 30
    # single text: head kept
    ids, tt = tok.single(q, 64)
    assert len(ids) == 64 and ids[1:-1] == q[:62] and ids[0] == tok.cls_id and ids[-1] == tok.sep_id


def test_hub_download_is_restricted(monkeypatch, tmp_path):
    """Registry names resolve to repos; only config, safetensors and tokenizer files are asked for,
    with --revision and HF_TOKEN passed on; a failed download is a one-line ValueError."""
    import huggingface_hub
    seen = {}
    _, path = tiny_hf(tmp_path)

    def fake(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        return str(path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    bert.Bert.from_pretrained("arbertv2", revision="abc123")
    assert seen["repo_id"] == "UBC-NLP/ARBERTv2" and seen["revision"] == "abc123" and seen["token"] == "hf_test"
    pats = seen["allow_patterns"]
    assert "*.safetensors" in pats and "config.json" in pats and "vocab.txt" in pats
    assert not any(p.endswith((".bin", ".py", ".pt", ".h5", ".msgpack", "*")) for p in pats)
    assert hub.ENCODERS["arabertv02"]["repo"] == "aubmindlab/bert-base-arabertv02"

    def offline(repo_id, **kw):
        raise OSError("no network")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ValueError, match="someone/missing: not a local folder, and cannot fetch someone/missing"):
        bert.Bert.from_pretrained("someone/missing")


def test_tokenizer_config_null_special_names_take_berts(tmp_path):
    """tokenizer_config.json with "pad_token": null (or a non-string) loads with BERT's default name, as transformers'
    BertTokenizerFast does for the [PAD]/[CLS]/[SEP] of its vocabulary; it was a TypeError traceback."""
    from transformers import BertTokenizerFast
    d = tmp_path / "null"
    d.mkdir()
    (d / "vocab.txt").write_text(open(os.path.join(WORDPIECE, "vocab.txt"), encoding="utf-8").read(), encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps({"pad_token": None, "cls_token": 5, "do_lower_case": False}))
    tok = hub.load_wordpiece(str(d))
    hf = BertTokenizerFast.from_pretrained(str(d), do_lower_case=False, pad_token="[PAD]", cls_token="[CLS]")
    assert (tok.pad_id, tok.cls_id) == (hf.convert_tokens_to_ids("[PAD]"), hf.convert_tokens_to_ids("[CLS]"))
    assert [tok.single(x, 10_000)[0] for x in tok.encode(ARABIC)] == [hf(t)["input_ids"] for t in ARABIC]


@pytest.mark.parametrize("kw", [{}, {"num_hidden_layers": 3, "intermediate_size": 20, "type_vocab_size": 3}])
def test_encoder_param_count_from_config_equals_built(kw):
    """bert.param_count, from the config alone, equals the parameters of the Bert it describes (the size check
    before building relies on it)."""
    cfg = bert.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=kw.get("num_hidden_layers", 2),
                          num_attention_heads=4, intermediate_size=kw.get("intermediate_size", 37),
                          max_position_embeddings=64, type_vocab_size=kw.get("type_vocab_size", 2))
    assert bert.param_count(cfg)[0] == sum(p.numel() for p in bert.Bert(cfg).parameters())


@pytest.mark.parametrize("field,value", [("num_hidden_layers", 100000), ("vocab_size", 10**9),
                                         ("max_position_embeddings", 10**9)])
def test_oversized_encoder_config_refused_before_building(tmp_path, field, value):
    """A config.json describing far more than its weights (num_hidden_layers 100000) is one UserError naming
    config.json and the field, before any module is allocated (it ran for minutes and GBs before)."""
    _, path = tiny_hf(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(cfg, **{field: value})))
    with pytest.raises(cli.UserError, match=rf"config\.json: {field} = {value}: .* parameters"):
        bert.Bert.from_pretrained(str(path))
