"""Train (fine-tune) the severity classifier: a small hand-written BERT encoder + [CLS] head.

The paper annotates every question with a softmax over (non-critical, neutral, critical) from a
fine-tuned AraBERT that reads the QUESTION only. This script fine-tunes any BERT checkpoint
(safetensors only, never pickles, never remote code) on a labelled CSV/JSONL file, evaluates it on a
seeded stratified validation split, and writes a folder that both this code (annotate.py) and
transformers' BertForSequenceClassification / AutoModel (hence bert-score) can load:

    <out>/model.safetensors   bert.embeddings.*, bert.encoder.layer.{i}.*, bert.pooler.dense.*, classifier.*
    <out>/config.json         model_type bert, BertForSequenceClassification, id2label/label2id, ...
    <out>/vocab.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json
    <out>/metrics.json        accuracy, macro-F1, per-class P/R/F1, confusion matrix, ECE (15 bins)

Also from seed 004 (AbjadMed): LDAM loss with deferred re-weighting, FGM adversarial training,
layer-wise LR decay and head-tail truncation of question+answer inputs. Exactly what is computed
(z = logits, y = true class, n_y = training examples of class y, L = number of encoder layers):
  --loss ldam     loss = CE(s * (z - m_y * onehot(y)), y), m_y = K / n_y^(1/4) with K chosen so that
                  max_y m_y = --ldam-max-m (0.5), s = --ldam-s (30), as in Cao et al. 2019's code.
                  After training, s is multiplied into the saved classifier weight and bias, so
                  softmax(saved logits) = the trained softmax(s * z) (for annotate.py and transformers).
  --drw-epoch E   epochs 0..E-1 unweighted, epochs >= E use class weights w_y = (1-b)/(1-b^n_y),
                  b = --drw-beta, normalised to sum to the number of classes; the batch loss is then
                  sum_i w_{y_i} l_i / sum_i w_{y_i}. (Cao et al.'s LDAM-DRW. Seed 004 describes its DRW
                  as "plain CE for 5 epochs, then LDAM"; here --loss picks the loss for all epochs.)
  --fgm-eps e     after the clean backward, word_embeddings.weight += e * g / ||g||_2 (g its gradient,
                  norm over the whole matrix); the adversarial loss is backpropagated onto the same
                  gradients; the embeddings are then restored from a copy (bit-exact).
  --llrd x        lr: classifier and pooler = --lr; encoder layer i (0 = bottom) = lr * x^(L-i);
                  embeddings = lr * x^(L+1). Biases and LayerNorm weights get no weight decay.
  --answer-col    [CLS] Q [SEP] A [SEP] in --max-len: the answer keeps at least --min-answer-tokens
                  (50), a too-long answer keeps its first ceil(k/2) and last floor(k/2) tokens.
  schedule        linear warmup over --warmup-frac of the steps, then linear decay to 0; AdamW.
  ECE             15 equal-width bins (b/15, (b+1)/15] on the max probability,
                  sum_b |B_b|/N * |accuracy(B_b) - mean confidence(B_b)|.

Examples:
    python classify.py --model tiny --data data/sample/severity_labels.jsonl --out out/cls-tiny \\
        --epochs 8 --lr 2e-3 --batch-size 32 --max-len 128
    python classify.py --model arabertv02 --data labels.csv --text-col text --label-col label \\
        --epochs 3 --lr 2e-5 --out out/classifier          # then: python annotate.py ...

Importable: Bert, BertClassifier, load_tokenizer, load_classifier, predict_proba, ece, ...
"""
import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from model import atomic_write

ROOT = os.path.dirname(os.path.abspath(__file__))
SAMPLE_WORDPIECE = os.path.join(ROOT, "data", "sample", "wordpiece")

# Short names -> hub repo (or a built-in config). All are BERT-base shaped except 'tiny'.
REGISTRY = {
    "arabertv02": {"repo": "aubmindlab/bert-base-arabertv02",
                   "note": "AraBERT v0.2 base (MSA, no pre-segmentation); the paper's classifier backbone"},
    "arabertv2": {"repo": "aubmindlab/bert-base-arabertv2",
                  "note": "AraBERT v2 base; trained on Farasa-segmented text, which this script does NOT do"},
    "arbertv2": {"repo": "UBC-NLP/ARBERTv2", "note": "ARBERTv2 base (seed 004's encoder)"},
    "tiny": {"repo": None, "note": "random weights, sample WordPiece vocab; for tests and smoke runs",
             "config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "intermediate_size": 128, "max_position_embeddings": 512}},
}

# What snapshot_download may fetch: config, safetensors weights and tokenizer files. Nothing else
# (no *.bin / *.pt / *.h5 / *.msgpack, no remote code).
HUB_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", "vocab.txt", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json"]

# Default label set, in the order of the record fields p_nc, p_n, p_c.
SEVERITIES = tuple(data.SEVERITIES)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Config

@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    classifier_dropout: float | None = None

    @classmethod
    def from_hf(cls, d):
        """From a HF config.json dict (unknown keys ignored; unsupported variants rejected)."""
        if d.get("model_type", "bert") != "bert":
            raise ValueError(f"config.json: model_type: '{d.get('model_type')}' is not supported (BERT only)")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"config.json: position_embedding_type: '{d['position_embedding_type']}' "
                             "is not supported (absolute only)")
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise ValueError("config.json: is_decoder: decoder BERTs are not supported")
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d and d[f.name] is not None}
        if "classifier_dropout" in d:
            kw["classifier_dropout"] = d["classifier_dropout"]
        cfg = cls(**kw)
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"config.json: hidden_size {cfg.hidden_size} is not a multiple of "
                             f"num_attention_heads {cfg.num_attention_heads}")
        _act(cfg.hidden_act)  # fail early on an unsupported activation
        return cfg

    def to_hf(self):
        d = asdict(self)
        d.update(model_type="bert", position_embedding_type="absolute", is_decoder=False,
                 add_cross_attention=False, use_cache=True, tie_word_embeddings=True, dtype="float32")
        return d


def _act(name):
    """Activation by HF name. 'gelu' is the exact erf GELU (as in BERT), the *_new/tanh ones the tanh fit."""
    if name == "gelu":
        return lambda x: F.gelu(x)
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(f"config.json: hidden_act: '{name}' is not supported (gelu, gelu_new, relu)")


# ----------------------------------------------------------------------------------------------
# Model. Module names follow HF's BertModel so state_dict keys are the checkpoint's keys.

class Embeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids):
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids) \
            + self.position_embeddings(pos)[None]
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        H = cfg.hidden_size
        self.n_head, self.p = cfg.num_attention_heads, cfg.attention_probs_dropout_prob
        self.query, self.key, self.value = nn.Linear(H, H), nn.Linear(H, H), nn.Linear(H, H)

    def forward(self, x, mask):
        B, T, H = x.shape
        # (B, T, H) -> (B, n_head, T, head_dim)
        q, k, v = (lin(x).view(B, T, self.n_head, H // self.n_head).transpose(1, 2)
                   for lin in (self.query, self.key, self.value))
        # mask: (B, 1, 1, T) bool, True = key is a real token; broadcast over heads and queries
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, T, H)


class AddNorm(nn.Module):
    """dense -> dropout -> LayerNorm(residual + .) : BERT's post-LN sublayer output."""

    def __init__(self, cfg, d_in):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h, residual):
        return self.LayerNorm(residual + self.dropout(self.dense(h)))


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = AddNorm(cfg, cfg.hidden_size)

    def forward(self, x, mask):
        return self.output(self.self(x, mask), x)


class Intermediate(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = _act(cfg.hidden_act)

    def forward(self, x):
        return self.act(self.dense(x))


class Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = AddNorm(cfg, cfg.intermediate_size)

    def forward(self, x, mask):
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))


class Pooler(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, h):  # (B, T, H) -> (B, H): tanh(dense(h[:, 0])) on [CLS]
        return torch.tanh(self.dense(h[:, 0]))


def _init_weights(module, std):
    """BERT's init: normal(0, std) for Linear/Embedding weights, zero biases, LayerNorm = identity."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Bert(nn.Module):
    """BERT encoder (+ its pooler, kept here so the checkpoint layout is HF's `bert.pooler.dense`).

    model(input_ids, attention_mask=None, token_type_ids=None) -> last hidden states (B, T, H).
    attention_mask (B, T): 1/True = real token, 0 = padding (padding may be anywhere).
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.pooler = Pooler(cfg)
        _init_weights(self, cfg.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x

    @classmethod
    def from_pretrained(cls, name_or_path, revision=None, device=None):
        """Encoder (+ pooler) from a registry name, hub repo id or local folder of safetensors."""
        folder, cfg_dict = resolve_checkpoint(name_or_path, revision)
        cfg = BertConfig.from_hf(cfg_dict)
        model = cls(cfg)
        if folder is not None:
            enc, _ = split_state_dict(read_safetensors(folder), folder)
            load_encoder_state(model, enc, folder)
        return model.to(device) if device is not None else model


class BertClassifier(nn.Module):
    """HF BertForSequenceClassification layout: bert -> pooler (tanh dense on [CLS]) -> dropout -> classifier."""

    def __init__(self, cfg, labels):
        super().__init__()
        self.cfg, self.labels = cfg, list(labels)
        self.bert = Bert(cfg)
        p = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(cfg.hidden_size, len(self.labels))
        _init_weights(self.classifier, cfg.initializer_range)
        self.meta = {}  # training facts saved under config.json["severity_classifier"]

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):  # -> logits (B, C)
        h = self.bert(input_ids, attention_mask, token_type_ids)
        return self.classifier(self.dropout(self.bert.pooler(h)))


# ----------------------------------------------------------------------------------------------
# Checkpoint reading / writing

def resolve_checkpoint(name_or_path, revision=None):
    """-> (folder with safetensors or None for random 'tiny', HF config dict)."""
    if name_or_path in REGISTRY:
        entry = REGISTRY[name_or_path]
        if entry["repo"] is None:  # tiny: built-in config, random weights, the sample vocabulary
            vocab = os.path.join(SAMPLE_WORDPIECE, "vocab.txt")
            if not os.path.exists(vocab):
                raise ValueError(f"{vocab}: missing (the 'tiny' model uses the sample WordPiece vocabulary)")
            with open(vocab, encoding="utf-8") as fh:
                n = sum(1 for _ in fh)
            log(f"note: '{name_or_path}' has RANDOM weights (vocab {n} from {SAMPLE_WORDPIECE})")
            return None, dict(entry["config"], vocab_size=n, model_type="bert")
        name_or_path = entry["repo"]
    folder = _download(name_or_path, revision)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_path):
        raise ValueError(f"{cfg_path}: missing (not a HF BERT checkpoint folder)")
    with open(cfg_path, encoding="utf-8") as fh:
        return folder, json.load(fh)


def _download(name_or_path, revision=None):
    """A local folder as is; otherwise a hub repo id fetched with snapshot_download (HF_TOKEN honoured)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path) or name_or_path.startswith((".", "/")):
        raise ValueError(f"{name_or_path}: not a folder, registry name ({', '.join(REGISTRY)}) or hub repo id")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name_or_path, revision=revision, allow_patterns=HUB_PATTERNS,
                                 token=os.environ.get("HF_TOKEN") or None)
    except Exception as e:  # offline, unknown repo, gated repo without token, ...
        msg = " ".join(str(e).split())[:300]
        raise ValueError(f"{name_or_path}: download failed ({type(e).__name__}: {msg})") from None


def read_safetensors(folder):
    """All tensors of a folder's safetensors checkpoint (sharded or not) as {name: tensor}."""
    from safetensors.torch import load_file
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{folder}: no *.safetensors weights (pickled .bin checkpoints are never loaded)")
    sd = {}
    for f in files:
        sd.update(load_file(os.path.join(folder, f)))
    return sd


# Tensors a BERT checkpoint may carry that the encoder does not use: pre-training heads (MLM/NSP),
# and position/token-type id buffers that old versions of transformers serialised.
_IGNORED = re.compile(r"^(cls\.|.*\.position_ids$|.*embeddings\.token_type_ids$)")


def split_state_dict(sd, where):
    """-> (encoder tensors without the 'bert.' prefix, head tensors 'classifier.*'). TF-era names
    LayerNorm.gamma/beta are renamed to weight/bias; unknown tensors are left in for the strict check."""
    enc, head = {}, {}
    for k, v in sd.items():
        k2 = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k))
        if _IGNORED.match(k2):
            continue
        if k2.startswith("classifier."):
            head[k2] = v
        else:
            enc[k2[5:] if k2.startswith("bert.") else k2] = v
    return enc, head


def load_encoder_state(model, sd, where):
    """Copy tensors into a Bert strictly: unexpected/missing tensors or shape mismatches raise,
    naming the tensor (and both shapes). A checkpoint without a pooler keeps a random one (noted)."""
    own = model.state_dict()
    for k, v in sd.items():
        if k not in own:
            raise ValueError(f"{where}: unexpected tensor 'bert.{k}' with shape {tuple(v.shape)}")
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{where}: tensor 'bert.{k}': checkpoint shape {tuple(v.shape)} != "
                             f"model shape {tuple(own[k].shape)}")
    missing = [k for k in own if k not in sd]
    if missing and all(k.startswith("pooler.") for k in missing):
        log(f"note: {where} has no pooler; bert.pooler.dense starts random")
    elif missing:
        k = missing[0]
        raise ValueError(f"{where}: missing tensor 'bert.{k}' (model shape {tuple(own[k].shape)})"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v.to(own[k].dtype))


def _write_json(path, obj):
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, ensure_ascii=False, indent=2)
            fh.write("\n")
    atomic_write(path, w)


def save_classifier(model, tok, out_dir):
    """model.safetensors (HF BertForSequenceClassification names) + config.json + tokenizer files."""
    from safetensors.torch import save_file
    sd = {"bert." + k: v.detach().float().cpu().contiguous().clone() for k, v in model.bert.state_dict().items()}
    sd.update({"classifier." + k: v.detach().float().cpu().contiguous().clone()
               for k, v in model.classifier.state_dict().items()})
    atomic_write(os.path.join(out_dir, "model.safetensors"), lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    cfg = model.cfg.to_hf()
    cfg.update(architectures=["BertForSequenceClassification"],
               id2label={str(i): l for i, l in enumerate(model.labels)},
               label2id={l: i for i, l in enumerate(model.labels)},
               problem_type="single_label_classification",
               severity_classifier=model.meta)
    _write_json(os.path.join(out_dir, "config.json"), cfg)
    tok.save(out_dir)


def load_classifier(path, device="cpu", revision=None, allow_random_head=None):
    """(model in eval mode on device, tokenizer, labels) from a classify.py folder, hub repo or
    registry name. A checkpoint without a trained head is refused, except 'tiny' (random, noted)."""
    if allow_random_head is None:
        allow_random_head = path == "tiny"
    folder, cfg_dict = resolve_checkpoint(path, revision)
    cfg = BertConfig.from_hf(cfg_dict)
    id2label = cfg_dict.get("id2label")
    head = {}
    if folder is not None:
        enc, head = split_state_dict(read_safetensors(folder), folder)
    if head:
        if not id2label:
            raise ValueError(f"{path}: config.json has no id2label for its classifier head")
        labels = [id2label[str(i)] if str(i) in id2label else id2label[i] for i in range(len(id2label))]
    elif allow_random_head:
        labels = list(SEVERITIES)
        log(f"note: {path} has no classifier head; using a RANDOM {len(labels)}-class head")
    else:
        raise ValueError(f"{path}: no classifier head (classifier.weight); train one with classify.py")
    model = BertClassifier(cfg, labels)
    if folder is not None:
        load_encoder_state(model.bert, enc, folder)
    if head:
        load_head_state(model, head, folder)
    model.meta = dict(cfg_dict.get("severity_classifier") or {})
    tok = load_tokenizer(folder if folder is not None else SAMPLE_WORDPIECE)
    return model.to(device).eval(), tok, labels


def load_head_state(model, head, where):
    own = model.classifier.state_dict()
    for k in own:
        v = head.get("classifier." + k)
        if v is None:
            raise ValueError(f"{where}: missing tensor 'classifier.{k}' (model shape {tuple(own[k].shape)})")
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{where}: tensor 'classifier.{k}': checkpoint shape {tuple(v.shape)} != "
                             f"model shape {tuple(own[k].shape)}")
    extra = sorted(set(head) - {"classifier." + k for k in own})
    if extra:
        raise ValueError(f"{where}: unexpected tensor '{extra[0]}' with shape {tuple(head[extra[0]].shape)}")
    with torch.no_grad():
        for k in own:
            own[k].copy_(head["classifier." + k].float())


# ----------------------------------------------------------------------------------------------
# WordPiece tokeniser (tokenizers library), equivalent to BertTokenizerFast

SPECIAL = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
           "mask_token": "[MASK]"}


def _tok_name(cfg, key):
    v = cfg.get(key, SPECIAL[key])
    return v.get("content", SPECIAL[key]) if isinstance(v, dict) else v


class WordPieceTokenizer:
    """A tokenizers.Tokenizer plus the special ids and the input builders used here.

    encode(texts) -> list of id lists WITHOUT special tokens; single()/pair() add [CLS]/[SEP] and
    truncate. save(folder) writes vocab.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json.
    """

    def __init__(self, tk, config, vocab_lines=None):
        self.tk, self.config = tk, dict(config)
        self.vocab_lines = vocab_lines  # original vocab.txt content, copied verbatim on save
        self.names = {k: _tok_name(config, k) for k in SPECIAL}
        ids = {k: tk.token_to_id(n) for k, n in self.names.items()}
        for k in ("pad_token", "cls_token", "sep_token"):
            if ids[k] is None:
                raise ValueError(f"tokenizer: {self.names[k]}: not in the vocabulary")
        self.pad_id, self.cls_id, self.sep_id = ids["pad_token"], ids["cls_token"], ids["sep_token"]
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)

    def encode(self, texts):
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def single(self, ids, max_len):
        """[CLS] text [SEP], the text's head kept. -> (ids, token_type_ids)."""
        out = [self.cls_id] + ids[:max(0, max_len - 2)] + [self.sep_id]
        return out, [0] * len(out)

    def pair(self, q, a, max_len, min_answer=50):
        """[CLS] Q [SEP] A [SEP] in max_len (head-tail truncation, seed 004).

        If it does not fit: the answer keeps max(min_answer, room left by the question) tokens
        (min_answer capped at half the budget so the question never vanishes), the question keeps
        its head in the rest; an answer longer than its share keeps its first ceil(n/2) and last
        floor(n/2) tokens of that share. token_type_ids: 0 for [CLS] Q [SEP], 1 for A [SEP].
        """
        budget = max_len - 3
        if budget < 2:
            raise ValueError(f"--max-len {max_len} is too small for a question+answer pair")
        if len(q) + len(a) > budget:
            a_keep = min(len(a), max(min(min_answer, budget // 2), budget - len(q)))
            q = q[:budget - a_keep]
            if len(a) > a_keep:
                tail = a_keep // 2
                a = a[:a_keep - tail] + (a[len(a) - tail:] if tail else [])
        ids = [self.cls_id] + q + [self.sep_id] + a + [self.sep_id]
        return ids, [0] * (len(q) + 2) + [1] * (len(a) + 1)

    def save(self, folder):
        vocab = self.vocab_lines
        if vocab is None:  # tokenizer.json only: rebuild vocab.txt from the WordPiece vocabulary
            v = self.tk.get_vocab(with_added_tokens=False)
            vocab = "".join(t + "\n" for t, _ in sorted(v.items(), key=lambda kv: kv[1]))

        def w_text(text):
            def w(tmp):
                with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
                    fh.write(text)
            return w
        atomic_write(os.path.join(folder, "vocab.txt"), w_text(vocab))
        atomic_write(os.path.join(folder, "tokenizer.json"), lambda tmp: self.tk.save(tmp))
        mml = self.config.get("model_max_length")
        mml = int(mml) if isinstance(mml, (int, float)) and 0 < mml < 1e6 else 512
        cfg = {"tokenizer_class": "BertTokenizer", "do_lower_case": bool(self.config.get("do_lower_case", False)),
               "strip_accents": self.config.get("strip_accents"),
               "tokenize_chinese_chars": self.config.get("tokenize_chinese_chars", True), "model_max_length": mml,
               **self.names}
        _write_json(os.path.join(folder, "tokenizer_config.json"), cfg)
        _write_json(os.path.join(folder, "special_tokens_map.json"), dict(self.names))


def _bert_normalizer(cfg):
    from tokenizers import normalizers
    return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=cfg.get("tokenize_chinese_chars", True),
                                      strip_accents=cfg.get("strip_accents"),
                                      lowercase=bool(cfg.get("do_lower_case", False)))


def load_tokenizer(folder):
    """WordPiece tokeniser from tokenizer.json (preferred) or vocab.txt in folder.

    Lower-casing follows tokenizer_config.json's do_lower_case when given, else False (Arabic);
    strip_accents follows the config too (None = same as lowercase, as in BERT: lower-casing BERTs
    also drop Arabic diacritics). From vocab.txt the pipeline is BERT's: BertNormalizer ->
    BertPreTokenizer -> WordPiece('##', [UNK], 100 chars max per word), special tokens unsplit.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    cfg = {}
    p_cfg = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(p_cfg):
        with open(p_cfg, encoding="utf-8") as fh:
            cfg = json.load(fh)
    p_json, p_vocab = os.path.join(folder, "tokenizer.json"), os.path.join(folder, "vocab.txt")
    vocab_lines = None
    if os.path.exists(p_vocab):
        with open(p_vocab, encoding="utf-8", newline="") as fh:
            vocab_lines = fh.read()
    if os.path.exists(p_json):
        tk = Tokenizer.from_file(p_json)
        norm = json.loads(tk.to_str()).get("normalizer") or {}
        if "do_lower_case" in cfg and norm.get("type") == "BertNormalizer" and (
                norm.get("lowercase") != bool(cfg["do_lower_case"])
                or norm.get("strip_accents") != cfg.get("strip_accents", norm.get("strip_accents"))):
            tk.normalizer = _bert_normalizer(dict({"tokenize_chinese_chars": norm.get("handle_chinese_chars", True)},
                                                  **cfg))
        if "do_lower_case" not in cfg and norm.get("type") == "BertNormalizer":
            cfg = dict(cfg, do_lower_case=bool(norm.get("lowercase")), strip_accents=norm.get("strip_accents"))
        # as transformers does: the special tokens are never split, even when the file does not list them
        names = {k: _tok_name(cfg, k) for k in SPECIAL}
        tk.add_special_tokens([n for n in names.values() if tk.token_to_id(n) is not None])
    elif vocab_lines is not None:
        vocab = {}
        for i, line in enumerate(vocab_lines.split("\n")[:-1] if vocab_lines.endswith("\n")
                                 else vocab_lines.split("\n")):
            vocab[line.rstrip("\r")] = i
        names = {k: _tok_name(cfg, k) for k in SPECIAL}
        tk = Tokenizer(WordPiece(vocab, unk_token=names["unk_token"], max_input_chars_per_word=100))
        tk.normalizer = _bert_normalizer(cfg)
        tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tk.decoder = decoders.WordPiece(prefix="##")
        extra = cfg.get("additional_special_tokens") or cfg.get("extra_special_tokens") or []
        extra = [t.get("content") if isinstance(t, dict) else t for t in extra] if isinstance(extra, list) else []
        tk.add_special_tokens([n for n in list(names.values()) + extra if n in vocab])
        cls_, sep_ = names["cls_token"], names["sep_token"]
        if cls_ in vocab and sep_ in vocab:
            tk.post_processor = processors.TemplateProcessing(
                single=f"{cls_}:0 $A:0 {sep_}:0", pair=f"{cls_}:0 $A:0 {sep_}:0 $B:1 {sep_}:1",
                special_tokens=[(cls_, vocab[cls_]), (sep_, vocab[sep_])])
    else:
        raise ValueError(f"{folder}: no tokenizer.json or vocab.txt")
    cfg.setdefault("do_lower_case", False)
    return WordPieceTokenizer(tk, cfg, vocab_lines)


# ----------------------------------------------------------------------------------------------
# Batching, inference, metrics

def collate(seqs, pad_id, device):
    """[(ids, token_types)] -> (input_ids, attention_mask, token_type_ids), right-padded (B, T)."""
    T = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    tt = torch.zeros((len(seqs), T), dtype=torch.long)
    am = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (a, b) in enumerate(seqs):
        ids[i, :len(a)] = torch.tensor(a)
        tt[i, :len(b)] = torch.tensor(b)
        am[i, :len(a)] = 1
    return ids.to(device), am.to(device), tt.to(device)


def build_inputs(tok, texts, max_len, answers=None, min_answer=50):
    """Token sequences [(ids, token_type_ids)]: [CLS] text [SEP], or head-tail [CLS] Q [SEP] A [SEP]."""
    q = tok.encode(texts)
    if answers is None:
        return [tok.single(x, max_len) for x in q]
    a = tok.encode(answers)
    return [tok.pair(x, y, max_len, min_answer) for x, y in zip(q, a)]


def _autocast(device):
    dev = torch.device(device)
    return torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)


@torch.inference_mode()
def predict_logits(model, seqs, batch_size=64, progress=None):
    """Logits (N, C) float32 for token sequences; batches sorted by length (little padding),
    results returned in input order."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    out = torch.empty((len(seqs), len(model.labels)), dtype=torch.float32)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, am, tt = collate([seqs[i] for i in idx], model.cfg.pad_token_id, device)
        with _autocast(device):
            logits = model(ids, am, tt)
        out[idx] = logits.float().cpu()
        if progress is not None:
            progress.update(len(idx))
    return out


def predict_proba(model, tok, texts, batch_size=64, max_len=512, answers=None, progress=None):
    """Softmax probabilities (N, C) as float64 numpy, in model.labels order, for raw texts
    (question only, or question+answer pairs with head-tail truncation when answers is given)."""
    seqs = build_inputs(tok, texts, max_len, answers, model.meta.get("min_answer_tokens", 50))
    logits = predict_logits(model, seqs, batch_size, progress)
    return torch.softmax(logits.double(), dim=-1).numpy()


def ece(probs, y, n_bins=15):
    """Expected calibration error: bins of equal width on the max probability, bin b = (b/n, (b+1)/n];
    ECE = sum_b |B_b|/N * |accuracy(B_b) - mean confidence(B_b)|."""
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y)
    conf, pred = probs.max(1), probs.argmax(1)
    b = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    total = 0.0
    for k in range(n_bins):
        m = b == k
        if m.any():
            total += m.mean() * abs((pred[m] == y[m]).mean() - conf[m].mean())
    return float(total)


def classification_metrics(probs, y, labels):
    """accuracy, macro-F1, per-class precision/recall/F1/support, confusion (rows true, cols predicted), ECE."""
    probs, y = np.asarray(probs), np.asarray(y)
    C = len(labels)
    pred = probs.argmax(1)
    cm = np.zeros((C, C), dtype=int)
    np.add.at(cm, (y, pred), 1)
    per = {}
    for c, name in enumerate(labels):
        tp, n_pred, n_true = cm[c, c], cm[:, c].sum(), cm[c, :].sum()
        p = tp / n_pred if n_pred else 0.0
        r = tp / n_true if n_true else 0.0
        per[name] = {"precision": float(p), "recall": float(r),
                     "f1": float(2 * p * r / (p + r)) if p + r else 0.0, "support": int(n_true)}
    return {"n": int(len(y)), "accuracy": float((pred == y).mean()) if len(y) else 0.0,
            "macro_f1": float(np.mean([v["f1"] for v in per.values()])),
            "per_class": per, "confusion": cm.tolist(), "ece": ece(probs, y) if len(y) else 0.0}


def format_metrics(m, labels, majority=None):
    w = max(12, max(len(l) for l in labels) + 2)
    lines = [f"{'class':<{w}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for l in labels:
        v = m["per_class"][l]
        lines.append(f"{l:<{w}}{v['precision']:>10.3f}{v['recall']:>10.3f}{v['f1']:>10.3f}{v['support']:>10d}")
    s = f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  ECE(15 bins) {m['ece']:.4f}  n={m['n']}"
    if majority is not None:
        s += f"  (majority-class baseline {majority:.4f})"
    lines += [s, "confusion matrix (rows = true, columns = predicted):",
              " " * w + "".join(f"{l[:10]:>12}" for l in labels)]
    for l, row in zip(labels, m["confusion"]):
        lines.append(f"{l:<{w}}" + "".join(f"{x:>12d}" for x in row))
    return "\n".join(lines)


class Progress:
    """A one-line progress display with rate and ETA on stderr (throttled to ~2 updates/s)."""

    def __init__(self, total, desc="", unit="it", start=0):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.n0 = start
        self.t0 = self.last = time.time()
        self.tty = sys.stderr.isatty()

    def update(self, k=1, extra=""):
        self.n += k
        now = time.time()
        if now - self.last >= (0.5 if self.tty else 10.0) or self.n >= self.total:
            self.last = now
            self._show(now, extra)

    def _show(self, now, extra=""):
        el = now - self.t0
        rate = (self.n - self.n0) / el if el > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.n / self.total if self.total else 100.0
        msg = (f"{self.desc} {self.n}/{self.total} ({pct:.0f}%) {rate:.1f} {self.unit}/s "
               f"elapsed {_hms(el)} ETA {_hms(eta)} {extra}")
        print(("\r" + msg) if self.tty else msg, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self):
        if self.tty:
            print(file=sys.stderr, flush=True)


def _hms(s):
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


# ----------------------------------------------------------------------------------------------
# Training pieces (each tested against a hand computation)

def ldam_margins(counts, max_m=0.5):
    """LDAM margins (Cao et al. 2019): m_y = C / n_y^(1/4), C chosen so the largest margin (the
    rarest class) is max_m. Classes with no examples count as 1."""
    n = torch.as_tensor(counts, dtype=torch.float64).clamp(min=1)
    m = n.pow(-0.25)
    return (m * (max_m / m.max())).float()


def drw_weights(counts, beta=0.9999):
    """Class-balanced weights from the effective number (Cui et al. 2019): w_y = (1-beta)/(1-beta^n_y),
    normalised to sum to the number of classes. Classes with no examples count as 1."""
    n = torch.as_tensor(counts, dtype=torch.float64).clamp(min=1)
    w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    return (w / w.sum() * len(w)).float()


def epoch_class_weights(epoch, drw_epoch, counts, beta=0.9999):
    """The DRW switch: None (unweighted) before 0-based epoch `drw_epoch` or when it is None,
    drw_weights(counts, beta) from that epoch on (as in the LDAM paper's LDAM-DRW schedule)."""
    if drw_epoch is None or epoch < drw_epoch:
        return None
    return drw_weights(counts, beta)


def classification_loss(logits, y, kind="ce", margins=None, s=30.0, weight=None):
    """ce:   cross_entropy(z, y, weight)
    ldam: cross_entropy(s * (z - m_y * onehot(y)), y, weight)   (margin on the true class only).
    With weight, the mean is weighted: sum_i w_{y_i} l_i / sum_i w_{y_i} (PyTorch's convention)."""
    logits = logits.float()
    if kind == "ldam":
        logits = s * (logits - F.one_hot(y, logits.shape[1]).to(logits.dtype) * margins.to(logits.device)[y][:, None])
    return F.cross_entropy(logits, y, weight=None if weight is None else weight.to(logits.device))


def fgm_step(embedding, eps, adv_loss_fn):
    """FGM (Miyato et al. 2017) on an embedding matrix, after the clean backward:
    r = eps * g / ||g||_2 (g = its gradient, whole-matrix norm); weight += r; adv_loss_fn().backward()
    (gradients accumulate onto the clean ones); weight restored bit-exactly from a copy.
    Returns the adversarial loss, or None when the gradient is missing, zero or non-finite."""
    w = embedding.weight
    if w.grad is None or eps <= 0:
        return None
    norm = torch.linalg.vector_norm(w.grad.float())
    if not torch.isfinite(norm) or norm == 0:
        return None
    backup = w.detach().clone()
    try:
        with torch.no_grad():
            w.add_((eps / norm) * w.grad)
        loss = adv_loss_fn()
        loss.backward()
    finally:
        with torch.no_grad():
            w.copy_(backup)
    return loss.detach()


def param_groups(model, lr, llrd=1.0, weight_decay=0.01):
    """AdamW groups with layer-wise LR decay (Howard & Ruder 2018; seed 004's eta_l = eta_head * xi^(L-l)):
    classifier + pooler: lr;  encoder layer i (0 = bottom, L-1 = top): lr * llrd^(L - i);
    embeddings: lr * llrd^(L + 1). llrd = 1 gives one lr everywhere. Biases and LayerNorm weights
    get no weight decay. Every group carries 'base_lr' (the lr before the schedule) and 'name'."""
    L = model.cfg.num_hidden_layers
    groups = {}

    def add(name, p, scale, pname):
        nd = p.ndim < 2 or "LayerNorm" in pname  # biases, LayerNorm: no weight decay
        key = (name, nd)
        if key not in groups:
            groups[key] = {"params": [], "lr": lr * scale, "base_lr": lr * scale,
                           "weight_decay": 0.0 if nd else weight_decay, "name": name + ("/no_decay" if nd else "")}
        groups[key]["params"].append(p)

    for pname, p in model.named_parameters():
        if pname.startswith("bert.embeddings."):
            add("embeddings", p, llrd ** (L + 1), pname)
        elif pname.startswith("bert.encoder.layer."):
            i = int(pname.split(".")[3])
            add(f"layer.{i}", p, llrd ** (L - i), pname)
        elif pname.startswith(("bert.pooler.", "classifier.")):
            add("head", p, 1.0, pname)
        else:
            raise ValueError(f"param_groups: unexpected parameter {pname}")
    return list(groups.values())


def lr_mult(step, total, warmup):
    """Linear warmup from 0 over `warmup` steps, then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


# ----------------------------------------------------------------------------------------------
# Data

def _get(row, col):
    """A row's value by column name, exact first, then case/space-insensitively; KeyError if absent."""
    if col in row:
        return row[col]
    k = " ".join(col.split()).lower()
    for c, v in row.items():
        if " ".join(str(c).split()).lower() == k:
            return v
    raise KeyError(col)


def read_labelled(path, text_col, label_col, answer_col=None, labels=None):
    """-> (texts, answers or None, y (list[int]), labels). Without --labels the label set is the
    three severities when every label is one (aliases such as mild/moderate/severe or the Arabic names
    accepted), else the sorted set of labels found. One-line DataError on any bad row."""
    rows = data.read_rows(path)
    texts, answers, raw = [], [] if answer_col else None, []
    for line, row in rows:
        for col, field in ((text_col, "text"), (answer_col, "answer")):
            if col is None:
                continue
            try:
                v = _get(row, col)
            except KeyError:
                raise data.DataError(path, line, col, f"missing column (the {field} column; see --{field}-col)") from None
            if not isinstance(v, str) or not v.strip():
                raise data.DataError(path, line, col, "empty" if isinstance(v, str) else f"expected text, got {v!r}")
            (texts if field == "text" else answers).append(v.strip())
        try:
            v = _get(row, label_col)
        except KeyError:
            raise data.DataError(path, line, label_col, "missing column (see --label-col)") from None
        if isinstance(v, bool) or v is None or (isinstance(v, float) and not v.is_integer()):
            raise data.DataError(path, line, label_col, f"bad label {v!r}")
        v = str(int(v)) if isinstance(v, (int, float)) else str(v).strip()
        if not v:
            raise data.DataError(path, line, label_col, "empty label")
        raw.append((line, v))
    if labels:
        index = {l: i for i, l in enumerate(labels)}
        for line, v in raw:
            if v not in index:
                raise data.DataError(path, line, label_col, f"unknown label '{v}' (--labels: {', '.join(labels)})")
        y = [index[v] for _, v in raw]
    elif all(data.canonical_severity(v) for _, v in raw):
        labels = list(SEVERITIES)
        y = [labels.index(data.canonical_severity(v)) for _, v in raw]
    else:
        labels = sorted({v for _, v in raw})
        y = [labels.index(v) for _, v in raw]
    present = sorted(set(y))
    if len(present) < 2:
        raise data.DataError(path, raw[0][0], label_col,
                             f"need at least 2 classes, found only '{labels[present[0]]}'")
    return texts, answers, y, list(labels)


def stratified_split(y, val_frac, seed):
    """Seeded stratified split -> (train indices, val indices). Each class gives round(n_c * val_frac)
    examples to validation (at least 1 when it has >= 2 and val_frac > 0; never all of them)."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    tr, va = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        k = int(round(len(idx) * val_frac))
        if val_frac > 0 and len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        else:
            k = min(k, len(idx) - 1)
        va += idx[:k].tolist()
        tr += idx[k:].tolist()
    return sorted(tr), sorted(va)


# ----------------------------------------------------------------------------------------------
# Main

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", default=os.path.join("data", "sample", "severity_labels.jsonl"),
                   help="labelled training file (.jsonl/.json/.csv/.tsv)")
    p.add_argument("--text-col", default="text", help="column with the text to classify (the question)")
    p.add_argument("--label-col", default="label", help="column with the class label")
    p.add_argument("--answer-col", default=None,
                   help="optional answer column: input becomes [CLS] Q [SEP] A [SEP] with head-tail truncation")
    p.add_argument("--labels", default=None,
                   help="comma-separated class list in output order (labels outside it are an error); default: "
                        "non-critical,neutral,critical when every label is a severity (or alias), else sorted")
    p.add_argument("--model", default="arabertv02",
                   help=f"encoder: registry name ({', '.join(REGISTRY)}), hub repo id or local folder")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of --model")
    p.add_argument("--out", default=os.path.join("out", "classifier"), help="output folder")
    p.add_argument("--val-frac", type=float, default=0.1, help="fraction held out (stratified, seeded) for validation")
    p.add_argument("--epochs", type=int, default=3, help="training epochs")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size")
    p.add_argument("--eval-batch-size", type=int, default=128, help="batch size for validation")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (of the head when --llrd < 1)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases/LayerNorm)")
    p.add_argument("--warmup-frac", type=float, default=0.1, help="fraction of steps of linear warmup, then linear decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0 = off)")
    p.add_argument("--max-len", type=int, default=512, help="max tokens per input incl. [CLS]/[SEP]")
    p.add_argument("--min-answer-tokens", type=int, default=50,
                   help="with --answer-col: tokens kept for the answer at least (seed 004: 50)")
    p.add_argument("--seed", type=int, default=42, help="seed for init, split and shuffling")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto = cuda if available)")
    p.add_argument("--loss", choices=["ce", "ldam"], default="ce",
                   help="ce, or ldam: cross_entropy(s*(z - m_y onehot)), m_y = C/n_y^(1/4) scaled to --ldam-max-m")
    p.add_argument("--ldam-max-m", type=float, default=0.5, help="LDAM: margin of the rarest class")
    p.add_argument("--ldam-s", type=float, default=30.0,
                   help="LDAM: logit scale s; folded into the saved classifier so its softmax is the trained one")
    p.add_argument("--drw-epoch", type=int, default=None,
                   help="deferred re-weighting: from this 0-based epoch on (i.e. after this many epochs), class "
                        "weights (1-beta)/(1-beta^n_y) normalised to sum to n_classes (default: off)")
    p.add_argument("--drw-beta", type=float, default=0.9999, help="DRW: beta of the effective number")
    p.add_argument("--fgm-eps", type=float, default=0.0,
                   help="FGM adversarial training on the word embeddings with this epsilon (seed 004: 0.2; 0 = off)")
    p.add_argument("--llrd", type=float, default=1.0,
                   help="layer-wise LR decay factor xi: head/pooler lr, layer i lr*xi^(L-i), embeddings "
                        "lr*xi^(L+1) (seed 004: 0.9; 1 = off)")
    p.add_argument("--keep-best", action="store_true",
                   help="save the epoch with the best validation macro-F1 instead of the last one")
    a = p.parse_args(argv)
    if not 0 <= a.val_frac < 1:
        p.error("--val-frac must be in [0, 1)")
    for k in ("epochs", "batch_size", "eval_batch_size", "max_len"):
        if getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if a.max_len < 3:
        p.error("--max-len must be >= 3")
    return a


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    return name


def evaluate(model, seqs, y, labels, batch_size, scale=1.0):
    if not len(y):
        return None, None
    logits = predict_logits(model, seqs, batch_size) * scale
    probs = torch.softmax(logits.double(), -1).numpy()
    return classification_metrics(probs, np.asarray(y), labels), probs


def main(argv=None):
    args = get_args(argv)
    try:
        return train(args)
    except (data.DataError, ValueError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # missing input file, unreadable folder, ...
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)


def train(args):
    t_start = time.time()
    device = resolve_device(args.device)
    labels_arg = [l.strip() for l in args.labels.split(",") if l.strip()] if args.labels else None
    if labels_arg is not None and len(set(labels_arg)) != len(labels_arg):
        raise ValueError(f"--labels: duplicate class names in '{args.labels}'")
    texts, answers, y, labels = read_labelled(args.data, args.text_col, args.label_col, args.answer_col, labels_arg)
    C = len(labels)
    tr, va = stratified_split(y, args.val_frac, args.seed)
    y_np = np.asarray(y)
    counts = np.bincount(y_np[tr], minlength=C)
    for c in np.flatnonzero(counts == 0):
        log(f"warning: class '{labels[c]}' has no training examples")
    log(f"data: {len(y)} rows, {len(tr)} train / {len(va)} val; train counts "
        + ", ".join(f"{l}={n}" for l, n in zip(labels, counts)))

    # Model: encoder from the checkpoint, a fresh head (or the checkpoint's own when its labels match).
    torch.manual_seed(args.seed)
    folder, cfg_dict = resolve_checkpoint(args.model, args.revision)
    cfg = BertConfig.from_hf(cfg_dict)
    if args.max_len > cfg.max_position_embeddings:
        raise ValueError(f"--max-len {args.max_len} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    model = BertClassifier(cfg, labels)
    tok = load_tokenizer(folder if folder is not None else SAMPLE_WORDPIECE)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}")
    if folder is not None:
        enc, head = split_state_dict(read_safetensors(folder), folder)
        load_encoder_state(model.bert, enc, folder)
        old = cfg_dict.get("id2label") or {}
        if head and [old.get(str(i)) for i in range(len(old))] == labels:
            load_head_state(model, head, folder)
            log(f"note: continuing from {args.model}'s classifier head (same labels)")
    model.to(device)
    log(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) on {device}")

    # Inputs, tokenised once.
    seqs = build_inputs(tok, texts, args.max_len, answers, args.min_answer_tokens)
    n_trunc = sum(len(s[0]) >= args.max_len for s in seqs)
    if n_trunc:
        log(f"note: {n_trunc} of {len(seqs)} inputs reach --max-len {args.max_len} (truncated)")

    groups = param_groups(model, args.lr, args.llrd, args.weight_decay)
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                            fused=torch.device(device).type == "cuda")
    steps_per_epoch = math.ceil(len(tr) / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = int(round(args.warmup_frac * total))
    margins = ldam_margins(counts, args.ldam_max_m) if args.loss == "ldam" else None
    scale = args.ldam_s if args.loss == "ldam" else 1.0
    y_t = torch.as_tensor(y_np)
    gen = torch.Generator().manual_seed(args.seed)
    majority = float((y_np[va] == np.bincount(y_np[tr], minlength=C).argmax()).mean()) if va else None

    history, best, step = [], None, 0
    for epoch in range(args.epochs):
        model.train()
        weight = epoch_class_weights(epoch, args.drw_epoch, counts, args.drw_beta)
        if weight is not None and (epoch == args.drw_epoch or epoch == 0):
            log("DRW class weights: " + ", ".join(f"{l}={w:.3f}" for l, w in zip(labels, weight.tolist())))
        perm = torch.randperm(len(tr), generator=gen).tolist()
        bar = Progress(steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}", "step")
        loss_sum, n_seen = 0.0, 0
        for b in range(steps_per_epoch):
            idx = [tr[i] for i in perm[b * args.batch_size:(b + 1) * args.batch_size]]
            ids, am, tt = collate([seqs[i] for i in idx], cfg.pad_token_id, device)
            yb = y_t[idx].to(device)
            m = lr_mult(step, total, warmup)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * m

            def loss_fn():
                with _autocast(device):
                    logits = model(ids, am, tt)
                return classification_loss(logits, yb, args.loss, margins, args.ldam_s, weight)

            loss = loss_fn()
            loss_v = loss.item()
            if not math.isfinite(loss_v):
                raise ValueError(f"training: loss is {loss_v} at step {step + 1} (try a lower --lr)")
            loss.backward()
            if args.fgm_eps > 0:
                fgm_step(model.bert.embeddings.word_embeddings, args.fgm_eps, loss_fn)
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            loss_sum += loss_v * len(idx)
            n_seen += len(idx)
            bar.update(1, f"loss {loss_sum / n_seen:.4f} lr {opt.param_groups[0]['lr']:.2e}")
        bar.close()
        rec = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, n_seen)}
        met, _ = evaluate(model, [seqs[i] for i in va], y_np[va], labels, args.eval_batch_size, scale)
        if met is not None:
            rec.update(val_accuracy=met["accuracy"], val_macro_f1=met["macro_f1"], val_ece=met["ece"])
            if args.keep_best and (best is None or met["macro_f1"] > best[0]):
                best = (met["macro_f1"], epoch + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
        history.append(rec)
        log(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))

    if best is not None:
        model.load_state_dict(best[2])
        log(f"keeping epoch {best[1]} (best validation macro-F1 {best[0]:.4f})")
    # LDAM trains softmax(s * z): fold s into the head so the saved logits are the trained ones
    # (annotate.py and transformers both just take softmax(logits)).
    if scale != 1.0:
        with torch.no_grad():
            model.classifier.weight.mul_(scale)
            model.classifier.bias.mul_(scale)
    met, _ = evaluate(model, [seqs[i] for i in va], y_np[va], labels, args.eval_batch_size)
    model.meta = {"trained_with": "classify.py", "input": "question+answer" if answers is not None else "text",
                  "max_len": args.max_len, "min_answer_tokens": args.min_answer_tokens, "loss": args.loss,
                  "logit_scale_folded": scale, "base_model": args.model, "labels": labels}
    metrics = {"val": met, "majority_baseline_accuracy": majority,
               "majority_class": labels[int(np.bincount(y_np[tr], minlength=C).argmax())],
               "labels": labels, "n_train": len(tr), "n_val": len(va), "train_counts": counts.tolist(),
               "epochs": history, "best_epoch": best[1] if best else args.epochs,
               "seconds": round(time.time() - t_start, 1), "args": vars(args)}
    save_classifier(model.cpu(), tok, args.out)
    _write_json(os.path.join(args.out, "metrics.json"), metrics)
    if met is not None:
        print(f"validation ({len(va)} examples), epoch {metrics['best_epoch']}:")
        print(format_metrics(met, labels, majority))
    print(f"saved {args.out} ({metrics['seconds']:.0f} s)")
    return metrics


if __name__ == "__main__":
    main()
