"""
The BERT encoder of the severity classifier (classify.py trains it, annotate.py runs it), hand-written like the
decoder in model.py, with its HF weight layout, checkpoint and tokenizer I/O, and inference.

One post-LN encoder block (`Block`: fused `qkv`, then `fc` / `proj`), the encoder `Bert` (word + position +
token-type embeddings, the layers, BERT's tanh pooler) and `BertClassifier` (a head on [CLS], through the pooler or
not). A checkpoint is mapped onto our names by ONE table (`weight_table`, transformers' BertModel names), read by
`load_tensors` and written back by `hf_tensors`, so that what `save_classifier` writes loads in transformers as
BertForSequenceClassification (and as AutoModel, hence in bert-score). Weights are read from safetensors only,
through hub.py's resolve (registry name, hub repo or local folder) and safetensors reader. The tokenizer is
BERT's WordPiece (hub.load_wordpiece: the tokenizers library, from tokenizer.json or vocab.txt).

    import bert
    model, tok, labels = bert.load_classifier("out/classifier")         # a classify.py folder, hub repo or 'tiny'
    probs = bert.predict_proba(model, tok, ["..."])              # (N, C) softmax, in labels order
    encoder = bert.Bert.from_pretrained("arabertv02")             # hidden states (B, T, H)
"""
import math
import os
import re
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import data
import outputs
from hub import ENCODERS, check_size, load_wordpiece, open_safetensors, resolve   # hub.py: the encoders' registry,
# hub download, safetensors reader, size check and WordPiece tokenizer, shared with the decoder

ROOT = os.path.dirname(os.path.abspath(__file__))
SAMPLE_WORDPIECE = os.path.join(ROOT, "data", "sample", "wordpiece")



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
        bad = lambda key, what: cli.UserError(where, f"{key}: {what}")   # noqa: E731
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
        assert input_ids.ndim == 2, f"input_ids {tuple(input_ids.shape)}, expected (B, T)"
        B, T = input_ids.shape
        assert attention_mask is None or attention_mask.shape == (B, T), f"attention_mask must be (B, T) = {(B, T)}"
        tt = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.drop(self.emb_norm(self.wte(input_ids) + self.wtt(tt) + self.wpe(pos)[None]))
        for block in self.layers:
            x = block(x, mask)
        assert x.shape == (B, T, self.cfg.hidden_size), f"hidden {tuple(x.shape)}, expected (B, T, H)"
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
        logits = self.classifier(self.dropout(self.bert.pool(h) if self.head == "pooler" else h[:, 0]))
        assert logits.shape == (h.shape[0], len(self.labels)), f"logits {tuple(logits.shape)}, expected (B, C)"
        return logits


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
    'bert.'; head tensors 'classifier.*'). Folder and weights come through hub.py's one mechanism: resolve
    (a local folder, or a hub snapshot of config, safetensors and tokenizer files only) and its safetensors reader
    (sharded or not, never a pickle). TF-era LayerNorm.gamma/beta become weight/bias."""
    entry = ENCODERS.get(name_or_path)
    if entry and entry["repo"] is None:   # tiny: built-in config, random weights, the sample vocabulary
        with open(os.path.join(SAMPLE_WORDPIECE, "vocab.txt"), encoding="utf-8") as fh:
            n = sum(1 for _ in fh)
        log(f"note: '{name_or_path}' has RANDOM weights (vocab {n} from {SAMPLE_WORDPIECE})")
        cfg_dict = dict(entry["config"], vocab_size=n, model_type="bert")
        return None, cfg_dict, BertConfig.from_hf(cfg_dict), {}, {}
    folder = resolve(name_or_path, revision, registry=ENCODERS)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise cli.UserError(cfg_path, "missing (not a HF BERT checkpoint folder)")
    cfg_dict = cli.read_json(cfg_path, "config")
    if not isinstance(cfg_dict, dict):
        raise cli.UserError(cfg_path, "expected a JSON object")
    meta = cfg_dict.get("severity_classifier")
    if not (meta is None or (isinstance(meta, dict) and meta.get("head", "pooler") in ("pooler", "linear"))):
        raise cli.UserError(cfg_path, f"severity_classifier: expected an object with head pooler or linear, "
                                       f"got {str(meta)[:60]!r}")
    cfg = BertConfig.from_hf(cfg_dict, cfg_path)
    tensors, enc, head = open_safetensors(folder), {}, {}
    check_fits(cfg, cfg_path, stored=sum(math.prod(tensors.shape(k)) for k in tensors))
    for k in tensors:
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k))
        if not IGNORED.match(name):
            (head if name.startswith("classifier.") else enc)[name.removeprefix("bert.")] = tensors.get(k)
    return folder, cfg_dict, cfg, enc, head


def param_count(cfg):
    """Parameters of Bert(cfg) (encoder + pooler, no classifier head), from the config alone, tensor by tensor as
    Bert builds them. -> (total, {config.json field: the parameters it scales})."""
    H, inter = cfg.hidden_size, cfg.intermediate_size
    layer = (3 * H * H + 3 * H) + (H * H + H) + (H * inter + inter) + (inter * H + H) + 2 * (2 * H)  # qkv o fc proj, 2 LN
    parts = {"vocab_size": cfg.vocab_size * H, "max_position_embeddings": cfg.max_position_embeddings * H,
             "type_vocab_size": cfg.type_vocab_size * H, "num_hidden_layers": cfg.num_hidden_layers * layer}
    return sum(parts.values()) + 2 * H + H * H + H, parts   # + embedding LayerNorm, pooler


def check_fits(cfg, cfg_file, stored):
    """hub.check_size for an encoder config: its parameters (param_count) as float32, named by the field that
    dominates."""
    n, parts = param_count(cfg)
    key = max(parts, key=parts.get)
    check_size(cfg_file, key, getattr(cfg, key), n, 4 * n, "cpu", stored, "encoder", "float32")


HEAD_TABLE = [("weight", ["classifier.weight"]), ("bias", ["classifier.bias"])]   # BertClassifier.classifier


def load_tensors(module, sd, table, where, prefix=""):
    """Copy HF-named tensors into module through a table, strictly: a missing or unexpected tensor or a shape
    mismatch is an error naming it (prefix + HF name). A checkpoint without a pooler (MLM saves) keeps a random one."""
    own = module.state_dict()
    names = {h for _, hs in table for h in hs}
    extra = [k for k in sd if k not in names]
    if extra:
        raise cli.UserError(where, f"unexpected tensor '{prefix}{extra[0]}' with shape {tuple(sd[extra[0]].shape)}")
    missing = [h for _, hs in table for h in hs if h not in sd]
    if missing and all(h.startswith("pooler.") for h in missing):
        log(f"note: {where} has no pooler; bert.pooler.dense starts random")
        table = [e for e in table if not e[0].startswith("pooler.")]
    elif missing:
        raise cli.UserError(where, f"missing tensor '{prefix}{missing[0]}'"
                             + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    for ours, hs in table:
        want = (own[ours].shape[0] // len(hs), *own[ours].shape[1:])
        for h in hs:
            if tuple(sd[h].shape) != want:
                raise cli.UserError(where, f"tensor '{prefix}{h}': checkpoint shape {tuple(sd[h].shape)} != "
                                            f"model shape {want}")
            if not sd[h].is_floating_point():   # an int copy would load "fine" (rounded weights, no error)
                raise cli.UserError(where, f"tensor '{prefix}{h}' is {sd[h].dtype}: weights must be floating point")
            if not bool(torch.isfinite(sd[h]).all()):
                raise cli.UserError(where, f"tensor '{prefix}{h}' holds NaN or infinite values: corrupt weights")
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
    outputs.atomic_write(os.path.join(out_dir, "model.safetensors"), lambda tmp: save_file(sd, tmp, {"format": "pt"}))
    labels = model.labels
    outputs.write_json(os.path.join(out_dir, "config.json"),
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
            raise cli.UserError(path, "config.json has no usable id2label for its classifier head")
        labels = [id2label[str(i)] for i in range(len(id2label))]
    elif folder is None:
        labels = list(data.SEVERITIES)
        log(f"note: {path} has no classifier head; using a RANDOM {len(labels)}-class head")
    else:
        raise cli.UserError(path, "no classifier head (classifier.weight); train one with classify.py")
    meta = dict(cfg_dict.get("severity_classifier") or {})
    model = BertClassifier(cfg, labels, meta.get("head", "pooler"))
    if folder is not None:
        load_tensors(model.bert, enc, weight_table(cfg.num_hidden_layers), folder, "bert.")
    if head:
        load_tensors(model.classifier, head, HEAD_TABLE, folder)
    model.meta = meta
    tok = load_wordpiece(folder if folder is not None else SAMPLE_WORDPIECE)
    if tok.vocab_size > cfg.vocab_size:   # ids past the embedding: an IndexError in the first batch (as in train)
        raise cli.UserError(path, f"tokenizer has {tok.vocab_size} tokens but vocab_size is {cfg.vocab_size}")
    return model.to(device).eval(), tok, labels


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
