"""Fine-tune the severity classifier: a small hand-written BERT encoder + a head on [CLS].

Fine-tunes any BERT checkpoint (safetensors only) on a labelled CSV/JSONL file (the paper's classifier reads the
QUESTION only), validates on a seeded stratified split, and writes a folder that annotate.py and transformers
(BertForSequenceClassification; AutoModel, hence bert-score) load: model.safetensors and config.json in HF's
names, vocab.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json, and metrics.json (accuracy,
macro-F1, per-class P/R/F1, confusion matrix, ECE on the validation split).

What a training step computes (z = logits, y = true class, n_y = training examples of class y, L = layers):
  --head          pooler: z = W tanh(P h_[CLS]) + b (BertForSequenceClassification); linear: z = W h_[CLS] + b
                  (seed 004; transformers' BertForSequenceClassification would add a pooler, so with 'linear'
                  only annotate.py and AutoModel (the encoder) read the folder as trained)
  --loss ldam     loss = CE(s * (z - m_y * onehot(y)), y), m_y = C / n_y^(1/4): C = --ldam-c when given (seed 004:
                  1), else chosen so that max_y m_y = --ldam-max-m (Cao et al. 2019's code); s = --ldam-s.
                  --boost-classes A,B treats those classes as having n_y / 10 examples, for the margins only.
                  After training, s is folded into the saved head: softmax(saved logits) = softmax(s * z).
  --ce-epochs E   plain CE for epochs 0..E-1, then --loss (seed 004's "CE for 5 epochs, then LDAM").
  --drw-epoch E   from epoch E on, class weights w_y = (1-b)/(1-b^n_y), b = --drw-beta, normalised to sum to the
                  number of classes; batch loss = sum_i w_{y_i} l_i / sum_i w_{y_i} (Cao et al.'s DRW).
  --fgm-eps e     after the clean backward, word embeddings += e * g / ||g||_2 (g their gradient, whole-matrix
                  norm); the adversarial loss is backpropagated onto the same gradients; embeddings restored.
  --llrd x        lr: head and pooler = --lr; layer i (0 = bottom) = lr * x^(L-i); embeddings = lr * x^(L+1).
  --answer-col    [CLS] Q [SEP] A [SEP] in --max-len: the answer keeps at least --min-answer-tokens (50), a
                  too-long answer keeps its first ceil(k/2) and last floor(k/2) tokens.
  schedule        AdamW; linear warmup over --warmup-frac of the steps, then linear decay to 0.
  ECE             15 equal-width bins (b/15, (b+1)/15] on the max probability,
                  sum_b |B_b|/N * |accuracy(B_b) - mean confidence(B_b)|.

Examples:
    python classify.py --model tiny --data data/sample/severity_labels.jsonl --out out/cls-tiny \\
        --epochs 8 --lr 2e-3 --batch-size 32 --max-len 128
    python classify.py --model arabertv02 --data labels.csv --epochs 3 --lr 2e-5 --out out/classifier
"""
import data   # first, and light: data.start() guards Ctrl-C and the console while the heavy imports load
data.start(__name__)
import argparse
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import _open_safetensors, resolve   # one hub download and safetensors reader, model.py's

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
SEVERITIES = tuple(data.SEVERITIES)   # default label set, in the order of the record fields p_nc, p_n, p_c


def log(msg):
    # stdout: stderr is for the one "error:" line a failed run prints (the contract); progress bars are off there
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Config and model

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
    def from_hf(cls, d, where="config.json"):
        """From a HF config.json dict: unknown keys ignored, unsupported variants and bad values refused."""
        bad = lambda key, what: data.UserError(where, f"{key}: {what}")   # noqa: E731
        if d.get("model_type", "bert") != "bert":
            raise bad("model_type", f"'{d.get('model_type')}' is not supported (BERT only)")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise bad("position_embedding_type", f"'{d['position_embedding_type']}' is not supported (absolute only)")
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise bad("is_decoder", "decoder BERTs are not supported")
        kw = {f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None}
        for k, v in kw.items():   # each value of the type of its default (classifier_dropout: a float)
            kind = type(cls.__dataclass_fields__[k].default)
            ok = (isinstance(v, str) if kind is str else isinstance(v, int) and v >= 0 if kind is int
                  else isinstance(v, (int, float)) and math.isfinite(v))
            if isinstance(v, bool) or not ok:
                raise bad(k, f"{v!r} is not a valid value")
        cfg = cls(**kw)
        if cfg.hidden_size % max(1, cfg.num_attention_heads) or not cfg.num_attention_heads:
            raise bad("hidden_size", f"{cfg.hidden_size} is not a multiple of num_attention_heads "
                                     f"{cfg.num_attention_heads}")
        if cfg.hidden_act not in ACT:
            raise bad("hidden_act", f"'{cfg.hidden_act}' is not supported ({', '.join(ACT)})")
        return cfg

    def to_hf(self):
        return dict(asdict(self), model_type="bert", position_embedding_type="absolute", is_decoder=False,
                    add_cross_attention=False, use_cache=True, tie_word_embeddings=True, dtype="float32")


# 'gelu' is BERT's exact erf GELU; the *_new / tanh names are the tanh fit.
ACT = {"gelu": F.gelu, "relu": F.relu, **{k: lambda x: F.gelu(x, approximate="tanh")
                                          for k in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")}}


class Block(nn.Module):
    """One post-LN BERT layer: x = norm1(x + o(attention(qkv(x)))); x = norm2(x + proj(act(fc(x))))."""

    def __init__(self, cfg):
        super().__init__()
        H = cfg.hidden_size
        self.n_head, self.p_attn = cfg.num_attention_heads, cfg.attention_probs_dropout_prob
        self.act = ACT[cfg.hidden_act]
        self.qkv, self.o = nn.Linear(H, 3 * H), nn.Linear(H, H)   # qkv = [query | key | value] rows
        self.fc, self.proj = nn.Linear(H, cfg.intermediate_size), nn.Linear(cfg.intermediate_size, H)
        self.norm1 = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x, mask):   # x (B, T, H); mask (B, 1, 1, T) bool, True = real key, or None
        B, T, H = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, H // self.n_head).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p_attn if self.training else 0.0)
        x = self.norm1(x + self.drop(self.o(y.transpose(1, 2).reshape(B, T, H))))
        return self.norm2(x + self.drop(self.proj(self.act(self.fc(x)))))


class Bert(nn.Module):
    """The encoder: model(input_ids, attention_mask=None, token_type_ids=None) -> hidden states (B, T, H).
    attention_mask (B, T): 1 = real token, 0 = padding (anywhere). pool(h) = tanh(pooler(h[:, 0])), BERT's pooler."""

    def __init__(self, cfg):
        super().__init__()
        H = cfg.hidden_size
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, H, padding_idx=cfg.pad_token_id)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, H)
        self.wtt = nn.Embedding(cfg.type_vocab_size, H)
        self.emb_norm = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.pooler = nn.Linear(H, H)
        init_weights(self, cfg.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        tt = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.drop(self.emb_norm(self.wte(input_ids) + self.wtt(tt) + self.wpe(pos)[None]))
        for block in self.layers:
            x = block(x, mask)
        return x

    def pool(self, h):   # (B, T, H) -> (B, H)
        return torch.tanh(self.pooler(h[:, 0]))

    @classmethod
    def from_pretrained(cls, name_or_path, revision=None, device=None):
        """Encoder (+ pooler) from a registry name, hub repo id or local folder of safetensors."""
        folder, _, cfg, enc, _ = read_checkpoint(name_or_path, revision)
        model = cls(cfg)
        if folder is not None:
            load_tensors(model, enc, weight_table(cfg.num_hidden_layers), folder, "bert.")
        return model.to(device) if device is not None else model


class BertClassifier(nn.Module):
    """bert -> [CLS] (through the pooler, or not with head='linear') -> dropout -> classifier: logits (B, C)."""

    def __init__(self, cfg, labels, head="pooler"):
        super().__init__()
        self.cfg, self.labels, self.head = cfg, list(labels), head
        self.bert = Bert(cfg)
        self.dropout = nn.Dropout(cfg.classifier_dropout if cfg.classifier_dropout is not None
                                  else cfg.hidden_dropout_prob)
        self.classifier = nn.Linear(cfg.hidden_size, len(self.labels))
        init_weights(self.classifier, cfg.initializer_range)
        self.meta = {}   # training facts, saved under config.json["severity_classifier"]

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        h = self.bert(input_ids, attention_mask, token_type_ids)
        return self.classifier(self.dropout(self.bert.pool(h) if self.head == "pooler" else h[:, 0]))


def init_weights(module, std):
    """BERT's init: normal(0, std) Linear/Embedding weights, zero biases and padding row (LayerNorms are built as
    identities already)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding) and m.padding_idx is not None:
            nn.init.zeros_(m.weight.data[m.padding_idx])


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: ONE table from our names to HF BertModel's, read by load_tensors and written by hf_tensors.

def weight_table(n_layers):
    """[(our name, [HF names])]; several HF names are stacked on dim 0 in ours (query | key | value -> qkv)."""
    wb = ("weight", "bias")
    t = [("wte.weight", ["embeddings.word_embeddings.weight"]),
         ("wpe.weight", ["embeddings.position_embeddings.weight"]),
         ("wtt.weight", ["embeddings.token_type_embeddings.weight"])]
    t += [(f"emb_norm.{w}", [f"embeddings.LayerNorm.{w}"]) for w in wb]
    for i in range(n_layers):
        p, h = f"layers.{i}.", f"encoder.layer.{i}."
        for w in wb:
            t += [(p + "qkv." + w, [f"{h}attention.self.{n}.{w}" for n in ("query", "key", "value")]),
                  (p + "o." + w, [h + "attention.output.dense." + w]),
                  (p + "norm1." + w, [h + "attention.output.LayerNorm." + w]),
                  (p + "fc." + w, [h + "intermediate.dense." + w]),
                  (p + "proj." + w, [h + "output.dense." + w]),
                  (p + "norm2." + w, [h + "output.LayerNorm." + w])]
    return t + [(f"pooler.{w}", [f"pooler.dense.{w}"]) for w in wb]


# Tensors a checkpoint may carry that nothing here uses: pre-training heads, and the position/token-type id
# buffers old transformers versions serialised.
IGNORED = re.compile(r"^(cls\.|.*\.position_ids$|.*embeddings\.token_type_ids$)")


def read_checkpoint(name_or_path, revision=None):
    """-> (folder, or None for the random 'tiny'; config.json dict; BertConfig; encoder tensors by HF name without
    'bert.'; head tensors 'classifier.*'). Folder and weights come through model.py's one mechanism: resolve
    (a local folder, or a hub snapshot of config, safetensors and tokenizer files only) and its safetensors reader
    (sharded or not, never a pickle). TF-era LayerNorm.gamma/beta become weight/bias."""
    entry = REGISTRY.get(name_or_path)
    if entry and entry["repo"] is None:   # tiny: built-in config, random weights, the sample vocabulary
        with open(os.path.join(SAMPLE_WORDPIECE, "vocab.txt"), encoding="utf-8") as fh:
            n = sum(1 for _ in fh)
        log(f"note: '{name_or_path}' has RANDOM weights (vocab {n} from {SAMPLE_WORDPIECE})")
        cfg_dict = dict(entry["config"], vocab_size=n, model_type="bert")
        return None, cfg_dict, BertConfig.from_hf(cfg_dict), {}, {}
    folder = resolve(name_or_path, revision, registry=REGISTRY)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise data.UserError(cfg_path, "missing (not a HF BERT checkpoint folder)")
    cfg_dict = data.read_json(cfg_path, "config")
    if not isinstance(cfg_dict, dict):
        raise data.UserError(cfg_path, "expected a JSON object")
    meta = cfg_dict.get("severity_classifier")
    if not (meta is None or (isinstance(meta, dict) and meta.get("head", "pooler") in ("pooler", "linear"))):
        raise data.UserError(cfg_path, f"severity_classifier: expected an object with head pooler or linear, "
                                       f"got {str(meta)[:60]!r}")
    cfg = BertConfig.from_hf(cfg_dict, cfg_path)
    tensors, enc, head = _open_safetensors(folder), {}, {}
    for k in tensors:
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k))
        if not IGNORED.match(name):
            (head if name.startswith("classifier.") else enc)[name.removeprefix("bert.")] = tensors.get(k)
    return folder, cfg_dict, cfg, enc, head


HEAD_TABLE = [("weight", ["classifier.weight"]), ("bias", ["classifier.bias"])]   # BertClassifier.classifier


def load_tensors(module, sd, table, where, prefix=""):
    """Copy HF-named tensors into module through a table, strictly: a missing or unexpected tensor or a shape
    mismatch is an error naming it (prefix + HF name). A checkpoint without a pooler (MLM saves) keeps a random one."""
    own = module.state_dict()
    names = {h for _, hs in table for h in hs}
    extra = [k for k in sd if k not in names]
    if extra:
        raise data.UserError(where, f"unexpected tensor '{prefix}{extra[0]}' with shape {tuple(sd[extra[0]].shape)}")
    missing = [h for _, hs in table for h in hs if h not in sd]
    if missing and all(h.startswith("pooler.") for h in missing):
        log(f"note: {where} has no pooler; bert.pooler.dense starts random")
        table = [e for e in table if not e[0].startswith("pooler.")]
    elif missing:
        raise data.UserError(where, f"missing tensor '{prefix}{missing[0]}'"
                             + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    for ours, hs in table:
        want = (own[ours].shape[0] // len(hs), *own[ours].shape[1:])
        for h in hs:
            if tuple(sd[h].shape) != want:
                raise data.UserError(where, f"tensor '{prefix}{h}': checkpoint shape {tuple(sd[h].shape)} != "
                                            f"model shape {want}")
            if not sd[h].is_floating_point():   # an int copy would load "fine" (rounded weights, no error)
                raise data.UserError(where, f"tensor '{prefix}{h}' is {sd[h].dtype}: weights must be floating point")
            if not bool(torch.isfinite(sd[h]).all()):
                raise data.UserError(where, f"tensor '{prefix}{h}' holds NaN or infinite values: corrupt weights")
        with torch.no_grad():
            own[ours].copy_(torch.cat([sd[h].float() for h in hs]))


def hf_tensors(module, table, prefix=""):
    """The table read backwards: module's tensors under their HF names (qkv split back into query, key, value)."""
    own = module.state_dict()
    return {prefix + h: part.contiguous().clone() for ours, hs in table
            for h, part in zip(hs, own[ours].detach().float().cpu().chunk(len(hs)))}


def save_classifier(model, tok, out_dir):
    """model.safetensors (HF BertForSequenceClassification names) + config.json + tokenizer files, atomically."""
    from safetensors.torch import save_file
    sd = {**hf_tensors(model.bert, weight_table(model.cfg.num_hidden_layers), "bert."),
          **hf_tensors(model.classifier, HEAD_TABLE)}
    data.atomic_write(os.path.join(out_dir, "model.safetensors"), lambda tmp: save_file(sd, tmp, {"format": "pt"}))
    labels = model.labels
    data.write_json(os.path.join(out_dir, "config.json"),
                    dict(model.cfg.to_hf(), architectures=["BertForSequenceClassification"],
                         id2label={str(i): l for i, l in enumerate(labels)},
                         label2id={l: i for i, l in enumerate(labels)}, problem_type="single_label_classification",
                         severity_classifier=dict(model.meta, head=model.head)))
    tok.save(out_dir)


def load_classifier(path, device="cpu", revision=None):
    """(model in eval mode on device, tokenizer, labels) from a classify.py folder, hub repo or registry name.
    A checkpoint without a trained head is refused, except 'tiny' (random, noted)."""
    folder, cfg_dict, cfg, enc, head = read_checkpoint(path, revision)
    id2label = cfg_dict.get("id2label")
    if head:
        if not isinstance(id2label, dict) or not all(str(i) in id2label for i in range(len(id2label))):
            raise data.UserError(path, "config.json has no usable id2label for its classifier head")
        labels = [id2label[str(i)] for i in range(len(id2label))]
    elif folder is None:
        labels = list(SEVERITIES)
        log(f"note: {path} has no classifier head; using a RANDOM {len(labels)}-class head")
    else:
        raise data.UserError(path, "no classifier head (classifier.weight); train one with classify.py")
    meta = dict(cfg_dict.get("severity_classifier") or {})
    model = BertClassifier(cfg, labels, meta.get("head", "pooler"))
    if folder is not None:
        load_tensors(model.bert, enc, weight_table(cfg.num_hidden_layers), folder, "bert.")
    if head:
        load_tensors(model.classifier, head, HEAD_TABLE, folder)
    model.meta = meta
    tok = load_tokenizer(folder if folder is not None else SAMPLE_WORDPIECE)
    if tok.vocab_size > cfg.vocab_size:   # ids past the embedding: an IndexError in the first batch (as in train)
        raise data.UserError(path, f"tokenizer has {tok.vocab_size} tokens but vocab_size is {cfg.vocab_size}")
    return model.to(device).eval(), tok, labels


# ----------------------------------------------------------------------------------------------------------------
# WordPiece tokeniser (the tokenizers library), equivalent to BertTokenizerFast

SPECIAL = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
           "mask_token": "[MASK]"}


def special_names(cfg):
    return {k: (v.get("content", d) if isinstance(v, dict) else v) for k, d in SPECIAL.items()
            for v in [cfg.get(k, d)]}


class WordPieceTokenizer:
    """A tokenizers.Tokenizer plus the special ids. encode(texts) -> id lists without special tokens;
    single() / pair() add [CLS]/[SEP] and truncate; save(folder) writes the four tokenizer files."""

    def __init__(self, tk, config, vocab_text=None):
        self.tk, self.config, self.vocab_text = tk, dict(config), vocab_text   # vocab.txt copied verbatim on save
        self.names = special_names(config)
        for k in ("pad_token", "cls_token", "sep_token"):
            if tk.token_to_id(self.names[k]) is None:
                raise data.UserError("tokenizer", f"{self.names[k]}: not in the vocabulary")
        self.pad_id, self.cls_id, self.sep_id = (tk.token_to_id(self.names[k]) for k in ("pad_token", "cls_token",
                                                                                          "sep_token"))
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)

    def encode(self, texts):
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def single(self, ids, max_len):
        """[CLS] text [SEP], the text's head kept. -> (ids, token_type_ids)."""
        out = [self.cls_id] + ids[:max(0, max_len - 2)] + [self.sep_id]
        return out, [0] * len(out)

    def pair(self, q, a, max_len, min_answer=50):
        """[CLS] Q [SEP] A [SEP] in max_len (head-tail truncation, seed 004). If it does not fit, the answer keeps
        max(min_answer, room left by the question) tokens (min_answer at most half the budget, so the question never
        vanishes), the question its head in the rest; a longer answer keeps its first ceil(n/2) and last floor(n/2)
        tokens of that share. token_type_ids: 0 for [CLS] Q [SEP], 1 for A [SEP]."""
        budget = max_len - 3
        if budget < 2:
            raise data.UserError("--max-len", f"{max_len} is too small for a question+answer pair")
        if len(q) + len(a) > budget:
            a_keep = min(len(a), max(min(min_answer, budget // 2), budget - len(q)))
            q = q[:budget - a_keep]
            if len(a) > a_keep:
                tail = a_keep // 2
                a = a[:a_keep - tail] + (a[len(a) - tail:] if tail else [])
        return [self.cls_id] + q + [self.sep_id] + a + [self.sep_id], [0] * (len(q) + 2) + [1] * (len(a) + 1)

    def save(self, folder):
        vocab = self.vocab_text
        if vocab is None:   # from tokenizer.json only: vocab.txt rebuilt from the WordPiece vocabulary
            vocab = "".join(t + "\n" for t, _ in sorted(self.tk.get_vocab(False).items(), key=lambda kv: kv[1]))
        data.atomic_write(os.path.join(folder, "vocab.txt"), vocab)
        data.atomic_write(os.path.join(folder, "tokenizer.json"), lambda tmp: self.tk.save(tmp))
        c, mml = self.config, self.config.get("model_max_length")
        data.write_json(os.path.join(folder, "tokenizer_config.json"), {
            "tokenizer_class": "BertTokenizer", "do_lower_case": bool(c.get("do_lower_case", False)),
            "strip_accents": c.get("strip_accents"), "tokenize_chinese_chars": c.get("tokenize_chinese_chars", True),
            "model_max_length": int(mml) if isinstance(mml, (int, float)) and 0 < mml < 1e6 else 512, **self.names})
        data.write_json(os.path.join(folder, "special_tokens_map.json"), dict(self.names))


def load_tokenizer(folder):
    """WordPiece tokeniser from tokenizer.json (preferred) or vocab.txt in folder. Lower-casing follows
    tokenizer_config.json's do_lower_case (default False: Arabic), strip_accents too (None = as lowercase, as in
    BERT). From vocab.txt the pipeline is BERT's: BertNormalizer -> BertPreTokenizer -> WordPiece('##', [UNK],
    100 chars per word), special tokens never split."""
    from tokenizers import Tokenizer, normalizers
    from tokenizers.implementations import BertWordPieceTokenizer
    p_cfg, p_json, p_vocab = (os.path.join(folder, f) for f in ("tokenizer_config.json", "tokenizer.json",
                                                                 "vocab.txt"))
    cfg = data.read_json(p_cfg, "tokenizer config") if os.path.isfile(p_cfg) else {}
    if not isinstance(cfg, dict):
        raise data.UserError(p_cfg, "expected a JSON object")
    vocab_text = None
    if os.path.isfile(p_vocab):
        with data.reading(p_vocab, "vocab.txt"), open(p_vocab, encoding="utf-8", newline="") as fh:
            vocab_text = fh.read()
    if os.path.isfile(p_json):
        with data.reading(p_json, "tokenizer.json"):
            tk = Tokenizer.from_file(p_json)
        norm = json.loads(tk.to_str()).get("normalizer") or {}
        if norm.get("type") == "BertNormalizer":   # tokenizer_config.json's casing wins, as in transformers
            if "do_lower_case" not in cfg:
                cfg = dict(cfg, do_lower_case=bool(norm.get("lowercase")), strip_accents=norm.get("strip_accents"))
            elif (norm.get("lowercase") != bool(cfg["do_lower_case"])
                  or norm.get("strip_accents") != cfg.get("strip_accents", norm.get("strip_accents"))):
                tk.normalizer = normalizers.BertNormalizer(
                    handle_chinese_chars=cfg.get("tokenize_chinese_chars", norm.get("handle_chinese_chars", True)),
                    strip_accents=cfg.get("strip_accents"), lowercase=bool(cfg["do_lower_case"]))
        # as transformers does: the special tokens are never split, even when the file does not list them
        tk.add_special_tokens([n for n in special_names(cfg).values() if tk.token_to_id(n) is not None])
    elif vocab_text is not None:   # BERT's own pipeline, as the tokenizers library assembles it from a vocabulary
        vocab = {t.rstrip("\r"): i for i, t in enumerate(vocab_text.removesuffix("\n").split("\n"))}
        names = special_names(cfg)
        missing = [names[k] for k in ("pad_token", "cls_token", "sep_token") if names[k] not in vocab]
        if missing:
            raise data.UserError(p_vocab, f"{missing[0]}: not in the vocabulary")
        tk = BertWordPieceTokenizer(vocab, **names, handle_chinese_chars=cfg.get("tokenize_chinese_chars", True),
                                    strip_accents=cfg.get("strip_accents"), lowercase=bool(cfg.get("do_lower_case")))
        extra = cfg.get("additional_special_tokens") or cfg.get("extra_special_tokens") or []
        extra = [t.get("content") if isinstance(t, dict) else t for t in extra] if isinstance(extra, list) else []
        tk.add_special_tokens([n for n in extra if n in vocab])
    else:
        raise data.UserError(folder, "no tokenizer.json or vocab.txt")
    return WordPieceTokenizer(tk, dict({"do_lower_case": False}, **cfg), vocab_text)


# ----------------------------------------------------------------------------------------------------------------
# Inputs, batches, inference

def build_inputs(tok, texts, max_len, answers=None, min_answer=50):
    """Token sequences [(ids, token_type_ids)]: [CLS] text [SEP], or head-tail [CLS] Q [SEP] A [SEP]."""
    q = tok.encode(texts)
    if answers is None:
        return [tok.single(x, max_len) for x in q]
    return [tok.pair(x, a, max_len, min_answer) for x, a in zip(q, tok.encode(answers))]


def collate(seqs, pad_id, device):
    """[(ids, token_types)] -> input_ids, attention_mask, token_type_ids, each (B, T), right-padded."""
    T = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    tt, am = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (a, b) in enumerate(seqs):
        ids[i, :len(a)], tt[i, :len(b)], am[i, :len(a)] = torch.tensor(a), torch.tensor(b), 1
    return ids.to(device), am.to(device), tt.to(device)


def autocast(device):
    cuda = torch.device(device).type == "cuda"
    return torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda)


@torch.inference_mode()
def predict_logits(model, seqs, batch_size=64, progress=None):
    """Logits (N, C) float32, batches sorted by length (little padding), rows in input order."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    out = torch.empty((len(seqs), len(model.labels)), dtype=torch.float32)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        with autocast(device):
            out[idx] = model(*collate([seqs[i] for i in idx], model.cfg.pad_token_id, device)).float().cpu()
        if progress is not None:
            progress.update(len(idx))
    return out


def predict_proba(model, tok, texts, batch_size=64, max_len=512, answers=None, progress=None):
    """Softmax probabilities (N, C) float64 numpy in model.labels order, for raw questions (or question+answer
    pairs, head-tail truncated, when answers is given). progress: anything with update(n), e.g. a tqdm bar."""
    seqs = build_inputs(tok, texts, max_len, answers, model.meta.get("min_answer_tokens", 50))
    return torch.softmax(predict_logits(model, seqs, batch_size, progress).double(), dim=-1).numpy()


# ----------------------------------------------------------------------------------------------------------------
# A training step, in the order it runs: the epoch's loss and class weights, the loss, FGM, the LLRD groups'
# learning rates (each checked against a hand computation in tests/test_classify.py)

def epoch_loss(epoch, loss, ce_epochs=0):
    """The loss of a 0-based epoch: plain 'ce' for the first ce_epochs epochs, then `loss`."""
    return "ce" if epoch < ce_epochs else loss


def ldam_margins(counts, max_m=0.5, c=None, boost=()):
    """LDAM margins m_y = C / n_y^(1/4) (Cao et al. 2019): C = c, else the largest margin is max_m. Classes in boost
    count as n_y / 10 (seed 004), classes without examples as 1."""
    n = torch.as_tensor(counts, dtype=torch.float64).clamp(min=1)
    n[list(boost)] /= 10
    m = n.pow(-0.25)
    return (m * (c if c is not None else max_m / m.max())).float()


def drw_weights(counts, beta=0.9999):
    """w_y = (1-beta)/(1-beta^n_y) (Cui et al. 2019), summing to the number of classes; empty classes count as 1."""
    n = torch.as_tensor(counts, dtype=torch.float64).clamp(min=1)
    w = (1.0 - beta) / (1.0 - torch.tensor(beta, dtype=torch.float64) ** n)
    return (w / w.sum() * len(w)).float()


def epoch_class_weights(epoch, drw_epoch, counts, beta=0.9999):
    """DRW: None (unweighted) before 0-based epoch drw_epoch (or when it is None), drw_weights after."""
    return None if drw_epoch is None or epoch < drw_epoch else drw_weights(counts, beta)


def classification_loss(logits, y, kind="ce", margins=None, s=30.0, weight=None):
    """ce: cross_entropy(z, y, weight); ldam: cross_entropy(s * (z - m_y * onehot(y)), y, weight)."""
    z = logits.float()
    if kind == "ldam":
        z = s * (z - F.one_hot(y, z.shape[1]).to(z.dtype) * margins.to(z.device)[y][:, None])
    return F.cross_entropy(z, y, weight=None if weight is None else weight.to(z.device))


def fgm_step(embedding, eps, adv_loss_fn):
    """FGM (Miyato et al. 2017), after the clean backward: weight += eps * g / ||g||_2 (whole-matrix norm), the
    adversarial loss backpropagated onto the same gradients, the weight restored bit for bit. Skipped if g is 0/inf."""
    w = embedding.weight
    norm = torch.linalg.vector_norm(w.grad.float())
    if not torch.isfinite(norm) or norm == 0:
        return
    backup = w.detach().clone()
    with torch.no_grad():
        w.add_((eps / norm) * w.grad)
    adv_loss_fn().backward()
    with torch.no_grad():
        w.copy_(backup)


def param_groups(model, lr, llrd=1.0, weight_decay=0.01):
    """AdamW groups with layer-wise LR decay (--llrd in the docstring above), no weight decay on biases and
    LayerNorms; each group carries 'name' and 'base_lr' (its lr before the schedule)."""
    L, groups = model.cfg.num_hidden_layers, {}
    for pname, p in model.named_parameters():
        layer = re.match(r"bert\.layers\.(\d+)\.", pname)
        if layer:
            name, scale = f"layer.{layer[1]}", llrd ** (L - int(layer[1]))
        elif pname.startswith(("bert.pooler.", "classifier.")):
            name, scale = "head", 1.0
        else:
            name, scale = "embeddings", llrd ** (L + 1)
        nd = p.ndim < 2 or "norm" in pname
        g = groups.setdefault((name, nd), {"params": [], "lr": lr * scale, "base_lr": lr * scale,
                                           "weight_decay": 0.0 if nd else weight_decay,
                                           "name": name + ("/no_decay" if nd else "")})
        g["params"].append(p)
    return list(groups.values())


def lr_mult(step, total, warmup):
    """Linear warmup from 0 over `warmup` steps, then linear decay to 0 at `total`."""
    return (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


# ----------------------------------------------------------------------------------------------------------------
# Metrics

def ece(probs, y, n_bins=15):
    """Expected calibration error on the max probability, equal-width bins b = (b/n, (b+1)/n] (a confidence on an
    edge belongs to the bin below it): sum_b |B_b|/N * |accuracy(B_b) - mean confidence(B_b)|."""
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y)
    conf, right = probs.max(1), probs.argmax(1) == y
    b = np.searchsorted(np.arange(1, n_bins + 1) / n_bins, conf, side="left").clip(0, n_bins - 1)
    return float(sum((b == k).mean() * abs(right[b == k].mean() - conf[b == k].mean())
                     for k in np.unique(b)))


def classification_metrics(probs, y, labels):
    """accuracy, macro-F1, per-class precision/recall/F1/support, confusion (rows true, cols predicted), ECE."""
    probs, y = np.asarray(probs), np.asarray(y)
    pred = probs.argmax(1)
    cm = np.zeros((len(labels), len(labels)), dtype=int)
    np.add.at(cm, (y, pred), 1)
    per = {}
    for c, name in enumerate(labels):
        tp, n_pred, n_true = cm[c, c], cm[:, c].sum(), cm[c, :].sum()
        p, r = (tp / n_pred if n_pred else 0.0), (tp / n_true if n_true else 0.0)
        per[name] = {"precision": float(p), "recall": float(r), "f1": float(2 * p * r / (p + r)) if p + r else 0.0,
                     "support": int(n_true)}
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
    lines += [s + (f"  (majority-class baseline {majority:.4f})" if majority is not None else ""),
              "confusion matrix (rows = true, columns = predicted):", " " * w + "".join(f"{l[:10]:>12}" for l in labels)]
    lines += [f"{l:<{w}}" + "".join(f"{x:>12d}" for x in row) for l, row in zip(labels, m["confusion"])]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Data

def get_col(row, col):
    """A row's value by column name, exact first, then case/space-insensitively; KeyError if absent."""
    if col in row:
        return row[col]
    match = [v for c, v in row.items() if data._key(c) == data._key(col)]
    if not match:
        raise KeyError(col)
    return match[0]


def read_labelled(path, text_col, label_col, answer_col=None, labels=None):
    """-> (texts, answers or None, y (list[int]), labels). Without labels the label set is the three severities
    when every label is one (aliases such as mild/severe or the Arabic names accepted), else the sorted set found.
    One-line DataError on any bad row."""
    texts, answers, raw = [], [] if answer_col else None, []
    for line, row in data.read_rows(path):
        for col, field, out in ((text_col, "text", texts), (answer_col, "answer", answers)):
            if col is None:
                continue
            try:
                v = get_col(row, col)
            except KeyError:
                raise data.DataError(path, line, col, f"missing column (the {field} column; see --{field}-col)") from None
            if not isinstance(v, str) or not v.strip():
                raise data.DataError(path, line, col, "empty" if isinstance(v, str) else f"expected text, got {v!r}")
            out.append(v.strip())
        try:
            v = get_col(row, label_col)
        except KeyError:
            raise data.DataError(path, line, label_col, "missing column (see --label-col)") from None
        if isinstance(v, bool) or v is None or (isinstance(v, float) and not v.is_integer()):
            raise data.DataError(path, line, label_col, f"bad label {v!r}")
        v = str(int(v)) if isinstance(v, (int, float)) else str(v).strip()
        if not v:
            raise data.DataError(path, line, label_col, "empty label")
        raw.append((line, v))
    if not labels and all(data.canonical_severity(v) for _, v in raw):
        labels, raw = list(SEVERITIES), [(line, data.canonical_severity(v)) for line, v in raw]
    labels = labels or sorted({v for _, v in raw})
    for line, v in raw:
        if v not in labels:   # only with --labels
            raise data.DataError(path, line, label_col, f"unknown label '{v}' (--labels: {', '.join(labels)})")
    y = [labels.index(v) for _, v in raw]
    if len(set(y)) < 2:
        raise data.DataError(path, raw[0][0], label_col, f"need at least 2 classes, found only '{labels[y[0]]}'")
    return texts, answers, y, list(labels)


def stratified_split(y, val_frac, seed):
    """Seeded stratified split -> (train indices, val indices). Each class gives round(n_c * val_frac) examples to
    validation (at least 1 when it has >= 2 and val_frac > 0; never all of them)."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    tr, va = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        k = min(int(round(len(idx) * val_frac)), len(idx) - 1)
        if val_frac > 0 and len(idx) >= 2:
            k = max(k, 1)
        va += idx[:k].tolist()
        tr += idx[k:].tolist()
    return sorted(tr), sorted(va)


# ----------------------------------------------------------------------------------------------------------------
# Main

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's layout (the epilog) and shows every flag's default."""


def get_args(argv=None):
    num, pos = data.number, dict(lo=0, lo_open=True)
    p = data.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=HelpFormatter)
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
    p.add_argument("--head", choices=["pooler", "linear"], default="pooler",
                   help="pooler: BertForSequenceClassification's tanh pooler then a linear layer; linear: a linear "
                        "layer on the [CLS] state (seed 004)")
    p.add_argument("--val-frac", type=num(float, lo=0, hi=1, hi_open=True), default=0.1,
                   help="fraction held out (stratified, seeded) for validation")
    p.add_argument("--epochs", type=num(int, lo=1), default=3, help="training epochs")
    p.add_argument("--max-steps", type=num(int, lo=0), default=0,
                   help="optimizer steps; overrides --epochs when > 0 (seed 004: 8000)")
    p.add_argument("--batch-size", type=num(int, lo=1), default=32, help="training batch size")
    p.add_argument("--eval-batch-size", type=num(int, lo=1), default=128, help="batch size for validation")
    p.add_argument("--lr", type=num(float, **pos, hi=1e30), default=2e-5, help="peak learning rate (of the head with --llrd)")
    p.add_argument("--weight-decay", type=num(float, lo=0), default=0.01,
                   help="AdamW weight decay (not on biases/LayerNorm)")
    p.add_argument("--warmup-frac", type=num(float, lo=0, hi=1), default=0.1,
                   help="fraction of steps of linear warmup, then linear decay")
    p.add_argument("--grad-clip", type=num(float, lo=0), default=1.0, help="clip the gradient norm to this (0 = off)")
    p.add_argument("--max-len", type=num(int, lo=3), default=512, help="max tokens per input incl. [CLS]/[SEP]")
    p.add_argument("--min-answer-tokens", type=num(int, lo=0), default=50,
                   help="with --answer-col: tokens kept for the answer at least (seed 004: 50)")
    p.add_argument("--seed", type=num(int, lo=0), default=42, help="seed for init, split and shuffling")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto = cuda if available)")
    p.add_argument("--loss", choices=["ce", "ldam"], default="ce",
                   help="ce, or ldam: cross_entropy(s*(z - m_y onehot)), m_y = C/n_y^(1/4)")
    p.add_argument("--ldam-c", type=num(float, **pos), default=None,
                   help="LDAM: C of m_y = C/n_y^(1/4), given directly (seed 004: 1); default: scale to --ldam-max-m")
    p.add_argument("--ldam-max-m", type=num(float, **pos), default=0.5,
                   help="LDAM without --ldam-c: C chosen so the rarest class's margin is this (Cao et al.)")
    p.add_argument("--ldam-s", type=num(float, **pos), default=30.0,
                   help="LDAM: logit scale s (seed 004's formula: 1); folded into the saved classifier")
    p.add_argument("--boost-classes", default=None,
                   help="LDAM: comma-separated classes whose margin uses n_y/10 (seed 004's targeted margin boosting)")
    p.add_argument("--ce-epochs", type=num(int, lo=0), default=0,
                   help="train with plain CE for this many epochs, then with --loss (seed 004: 5)")
    p.add_argument("--drw-epoch", type=num(int, lo=0), default=None,
                   help="deferred re-weighting: from this 0-based epoch on, class weights (1-beta)/(1-beta^n_y) "
                        "normalised to sum to n_classes (default: off)")
    p.add_argument("--drw-beta", type=num(float, lo=0, hi=1, hi_open=True), default=0.9999,
                   help="DRW: beta of the effective number")
    p.add_argument("--fgm-eps", type=num(float, lo=0), default=0.0,
                   help="FGM adversarial training on the word embeddings with this epsilon (seed 004: 0.2; 0 = off)")
    p.add_argument("--llrd", type=num(float, lo=0, hi=1, lo_open=True), default=1.0,
                   help="layer-wise LR decay factor xi: head/pooler lr, layer i lr*xi^(L-i), embeddings "
                        "lr*xi^(L+1) (seed 004: 0.9; 1 = off)")
    p.add_argument("--keep-best", action="store_true",
                   help="save the epoch with the best validation macro-F1 instead of the last one")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.loss == "ce" and (a.ce_epochs or a.boost_classes or a.ldam_c is not None):
        p.error("--ce-epochs, --boost-classes and --ldam-c need --loss ldam")
    if len({a.text_col, a.label_col, a.answer_col} - {None}) < 2 + (a.answer_col is not None):
        p.error("--text-col, --label-col and --answer-col must name different columns")
    if a.keep_best and a.val_frac == 0:
        p.error("--keep-best needs a validation split (--val-frac > 0)")
    for flag, e in (("--drw-epoch", a.drw_epoch), ("--ce-epochs", a.ce_epochs or None)):   # epochs count from 0
        if e is not None and not a.max_steps and e >= a.epochs:   # the switch would never come: a silent no-op
            p.error(f"{flag} {e}: the run has only --epochs {a.epochs} (epochs 0..{a.epochs - 1}), so it would do nothing")
    if a.labels is not None and not split_list(a.labels):
        p.error("--labels: empty list (leave the flag out for the default classes)")
    return a


def split_list(s):
    return [x.strip() for x in s.split(",") if x.strip()] if s else []


def train(argv=None):
    # -- everything a user can get wrong is checked before any work and before anything is written --------------
    args = get_args(argv)
    t_start = time.time()
    device = data.resolve_device(args.device)
    data.input_file(args.data, "--data")
    data.output_dir(args.out, "--out", inputs=[args.model])
    labels_arg = split_list(args.labels) or None
    if labels_arg and len(set(labels_arg)) != len(labels_arg):
        raise data.UserError("--labels", f"duplicate class names in '{args.labels}'")
    texts, answers, y, labels = read_labelled(args.data, args.text_col, args.label_col, args.answer_col, labels_arg)
    boost = split_list(args.boost_classes)
    for c in boost:
        if c not in labels:
            raise data.UserError("--boost-classes", f"'{c}' is not a class ({', '.join(labels)})")
    folder, cfg_dict, cfg, enc, head = read_checkpoint(args.model, args.revision)   # a corrupt file fails here
    if args.max_len > cfg.max_position_embeddings:
        raise data.UserError("--max-len", f"{args.max_len} exceeds the model's max_position_embeddings "
                                          f"{cfg.max_position_embeddings}")
    tok = load_tokenizer(folder if folder is not None else SAMPLE_WORDPIECE)
    if tok.vocab_size > cfg.vocab_size:
        raise data.UserError(args.model, f"tokenizer has {tok.vocab_size} tokens but vocab_size is {cfg.vocab_size}")

    # -- data: a seeded stratified split, inputs tokenised once --------------------------------------------------
    C, y = len(labels), np.asarray(y)
    tr, va = stratified_split(y, args.val_frac, args.seed)
    counts = np.bincount(y[tr], minlength=C)
    for c in np.flatnonzero(counts == 0):
        log(f"warning: class '{labels[c]}' has no training examples")
    log(f"data: {len(y)} rows, {len(tr)} train / {len(va)} val; train counts "
        + ", ".join(f"{l}={n}" for l, n in zip(labels, counts)))
    seqs = build_inputs(tok, texts, args.max_len, answers, args.min_answer_tokens)
    n_trunc = sum(len(s[0]) >= args.max_len for s in seqs)
    if n_trunc:
        log(f"note: {n_trunc} of {len(seqs)} inputs reach --max-len {args.max_len} (truncated)")
    val_seqs = [seqs[i] for i in va]
    majority_class = int(counts.argmax())
    majority = float((y[va] == majority_class).mean()) if va else None

    # -- model: the checkpoint's encoder, a fresh head (or the checkpoint's own when its labels match) -----------
    torch.manual_seed(args.seed)
    model = BertClassifier(cfg, labels, args.head)
    if folder is not None:
        load_tensors(model.bert, enc, weight_table(cfg.num_hidden_layers), folder, "bert.")
        old = cfg_dict.get("id2label") or {}
        same_head = (cfg_dict.get("severity_classifier") or {}).get("head", "pooler") == args.head
        if head and same_head and [old.get(str(i)) for i in range(len(old))] == labels:
            load_tensors(model.classifier, head, HEAD_TABLE, folder)
            log(f"note: continuing from {args.model}'s classifier head (same labels and --head)")
    model.to(device)
    log(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on {device}")

    # -- optimizer, schedule, losses -------------------------------------------------------------------------------
    opt = torch.optim.AdamW(param_groups(model, args.lr, args.llrd, args.weight_decay), lr=args.lr,
                            betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda")
    steps_per_epoch = math.ceil(len(tr) / args.batch_size)
    total = args.max_steps or steps_per_epoch * args.epochs
    n_epochs = math.ceil(total / steps_per_epoch)
    warmup = int(round(args.warmup_frac * total))
    margins = ldam_margins(counts, args.ldam_max_m, args.ldam_c, [labels.index(c) for c in boost])
    if args.loss == "ldam":
        log("LDAM margins: " + ", ".join(f"{l}={m:.3f}" for l, m in zip(labels, margins.tolist())))
    y_t, gen = torch.as_tensor(y), torch.Generator().manual_seed(args.seed)

    def evaluate(scale):   # validation metrics of softmax(scale * logits)
        if not va:
            return None
        probs = torch.softmax(predict_logits(model, val_seqs, args.eval_batch_size).double() * scale, -1).numpy()
        return classification_metrics(probs, y[va], labels)

    # -- the loop: one epoch = one seeded permutation of the training rows; validation after each -----------------
    history, best, step, scale = [], None, 0, 1.0
    for epoch in range(n_epochs):
        model.train()
        kind = epoch_loss(epoch, args.loss, args.ce_epochs)
        scale = args.ldam_s if kind == "ldam" else 1.0
        weight = epoch_class_weights(epoch, args.drw_epoch, counts, args.drw_beta)
        if epoch == args.drw_epoch:
            log("DRW class weights: " + ", ".join(f"{l}={w:.3f}" for l, w in zip(labels, weight.tolist())))
        if args.loss != "ce" and epoch == args.ce_epochs and epoch > 0:
            log(f"epoch {epoch + 1}: switching from ce to {args.loss}")
        perm = torch.randperm(len(tr), generator=gen).tolist()
        n_steps = min(steps_per_epoch, total - step)
        bar = data.progress(n_steps, f"epoch {epoch + 1}/{n_epochs}", "step", args.quiet)
        loss_sum, n_seen = 0.0, 0
        for b in range(n_steps):
            idx = [tr[i] for i in perm[b * args.batch_size:(b + 1) * args.batch_size]]
            ids, am, tt = collate([seqs[i] for i in idx], cfg.pad_token_id, device)
            yb = y_t[idx].to(device)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_mult(step, total, warmup)

            def loss_fn():
                with autocast(device):
                    logits = model(ids, am, tt)
                return classification_loss(logits, yb, kind, margins, args.ldam_s, weight)

            loss = loss_fn()
            loss_v = loss.item()
            if not math.isfinite(loss_v):
                raise data.UserError("--lr", f"the loss is {loss_v} at step {step + 1}; try a lower --lr")
            loss.backward()
            if args.fgm_eps > 0:
                fgm_step(model.bert.wte, args.fgm_eps, loss_fn)
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            loss_sum, n_seen = loss_sum + loss_v * len(idx), n_seen + len(idx)
            bar.set_postfix_str(f"loss {loss_sum / n_seen:.4f} lr {opt.param_groups[0]['lr']:.2e}", refresh=False)
            bar.update(1)
        bar.close()
        rec = {"epoch": epoch + 1, "objective": kind, "train_loss": loss_sum / n_seen, "steps": step}
        met = evaluate(scale)
        if met is not None:
            rec.update(val_accuracy=met["accuracy"], val_macro_f1=met["macro_f1"], val_ece=met["ece"])
            if args.keep_best and (best is None or met["macro_f1"] > best["f1"]):
                best = {"f1": met["macro_f1"], "epoch": epoch + 1, "scale": scale,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        history.append(rec)
        log(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))

    if best is not None:
        model.load_state_dict(best["state"])
        scale = best["scale"]
        log(f"keeping epoch {best['epoch']} (best validation macro-F1 {best['f1']:.4f})")
    # LDAM trains softmax(s * z): fold s into the head so that the saved logits are the trained ones (annotate.py
    # and transformers both take softmax(logits)).
    with torch.no_grad():
        model.classifier.weight.mul_(scale)
        model.classifier.bias.mul_(scale)

    # -- save: the model folder, then metrics.json (both atomic) -------------------------------------------------
    bad = next((n for n, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:   # a finite loss, then an update past the float range (--lr or --weight-decay far too large)
        raise data.UserError("--lr", f"the updates made the weights non-finite ({bad}); nothing was saved: try a lower "
                                     "--lr or --weight-decay")
    met = evaluate(1.0)
    model.meta = {"trained_with": "classify.py", "input": "question+answer" if answers is not None else "text",
                  "max_len": args.max_len, "min_answer_tokens": args.min_answer_tokens, "loss": args.loss,
                  "logit_scale_folded": scale, "base_model": args.model, "labels": labels}
    metrics = {"val": met, "majority_baseline_accuracy": majority, "majority_class": labels[majority_class],
               "labels": labels, "n_train": len(tr), "n_val": len(va), "train_counts": counts.tolist(),
               "epochs": history, "best_epoch": best["epoch"] if best else n_epochs, "steps": step,
               "seconds": round(time.time() - t_start, 1), "args": vars(args)}
    save_classifier(model.cpu(), tok, args.out)
    data.write_json(os.path.join(args.out, "metrics.json"), metrics)
    if met is not None:
        print(f"validation ({len(va)} examples), epoch {metrics['best_epoch']}:")
        print(format_metrics(met, labels, majority))
    print(f"saved {args.out} ({metrics['seconds']:.0f} s)")
    return metrics


def main(argv=None):
    """train(argv) under the command-line contract: a user's mistake is one line 'error: ...' and exit 2."""
    return data.run(train, argv)


if __name__ == "__main__":
    main()
