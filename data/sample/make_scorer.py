"""Pretrain the offline demo's BERTScore model: a tiny BERT, masked-LM on the sample's own text (deterministic).

BERTScore matches every token of a candidate with its most similar token of the reference, using a BERT layer's
contextual embeddings. That only measures anything when those embeddings keep each token's identity (and some of
its context). A severity classifier does not: fine-tuning pulls every text onto its class direction, so word
salad matched a real answer at F1 ~99. Masked-LM pretraining has to tell tokens apart to predict them, which is
what the embeddings of real BERTScore models come from. This script does the same at toy scale:

  corpus      every distinct question and answer of train.jsonl and test.jsonl (the scorer may see the test
              references: it scores text, it is not the model being evaluated), one text per sequence,
              tokenised by data/sample/wordpiece as [CLS] text [SEP], at most --max-len tokens.
  model       BERT (post-LayerNorm, exact GELU, learnt absolute positions), --hidden/--layers/--heads/--ffn;
              the MLM head of BERT (dense -> GELU -> LayerNorm -> decoder tied to the word embeddings + bias).
  masking     15 % of the non-special tokens of each sequence (at least one) are predicted; of those 80 %
              become [MASK], 10 % a random token, 10 % stay, as in BERT. Fresh masks every step.
  training    AdamW (wd 0.01, none on biases / LayerNorm), linear warmup over 5 % of --steps, then linear decay
              to 0; batches of --batch-size texts drawn without replacement, reshuffled every epoch (texts of
              similar length batched together, see bucketed_order).

Everything random comes from --seed (torch generators), and the run uses --threads CPU threads, so the same torch
version writes the same weights. Output, in the Hugging Face BERT layout (safetensors only), which bert-score and
transformers' AutoModel load as a local folder:

  <out>/config.json           model_type bert, BertForMaskedLM, the sizes above, plus "scorer": how it was made
  <out>/model.safetensors     bert.embeddings.*, bert.encoder.layer.{i}.*, bert.pooler.dense.* (untrained, there
                              only so AutoModel finds every weight it expects), cls.predictions.*
  <out>/tokenizer.json, vocab.txt    copied from data/sample/wordpiece
  <out>/tokenizer_config.json, special_tokens_map.json

After saving, the folder is loaded back with transformers' BertForMaskedLM and its hidden states and MLM logits are
compared with this script's model on a batch (they must agree to 1e-4), so the layout is checked on every run.

Example (about a minute on a 2-core CPU):
    python data/sample/make_scorer.py
    python evaluate.py --model tiny --data data/sample/test.jsonl --bertscore-model data/sample/scorer \\
        --bertscore-layer 2 --out runs/tiny-base
"""
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # before importing tokenizers

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # repo root, for `import data`
import cli  # noqa: E402
import data  # noqa: E402
import outputs  # noqa: E402

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4 in data/sample/wordpiece


def get_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data-dir", default=str(HERE), help="folder with train.jsonl, test.jsonl and wordpiece/")
    p.add_argument("--out", default=str(HERE / "scorer"), help="output folder (HF BERT layout)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the batches and the masks")
    p.add_argument("--steps", type=cli.number(int, lo=1), default=500, help="optimizer steps")
    p.add_argument("--batch-size", type=cli.number(int, lo=1), default=32, help="texts per step")
    p.add_argument("--lr", type=cli.number(float, lo=0, lo_open=True), default=2e-3, help="peak learning rate")
    p.add_argument("--hidden", type=cli.number(int, lo=1), default=128, help="hidden size")
    p.add_argument("--layers", type=cli.number(int, lo=1), default=3, help="encoder layers")
    p.add_argument("--heads", type=cli.number(int, lo=1), default=4, help="attention heads (divide --hidden)")
    p.add_argument("--ffn", type=cli.number(int, lo=1), default=256, help="feed-forward (intermediate) size")
    p.add_argument("--max-len", type=cli.number(int, lo=3), default=128,
                   help="tokens per text, [CLS] and [SEP] included; also the model's max_position_embeddings")
    p.add_argument("--mask-prob", type=cli.number(float, lo=0, hi=1, lo_open=True), default=0.15,
                   help="share of the non-special tokens that are predicted")
    p.add_argument("--dropout", type=cli.number(float, lo=0, hi=1, hi_open=True), default=0.1,
                   help="dropout on embeddings, attention probabilities and sublayer outputs")
    p.add_argument("--threads", type=cli.number(int, lo=1), default=1,
                   help="CPU threads (fixed, so that a rerun writes the same weights)")
    args = p.parse_args(argv)
    if args.hidden % args.heads:
        p.error(f"--heads {args.heads} does not divide --hidden {args.hidden}")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Data


def load_texts(data_dir):
    """Distinct questions and answers of train.jsonl + test.jsonl, in file order (answers shared by question
    variants appear once)."""
    texts, seen = [], set()
    for name in ("train.jsonl", "test.jsonl"):
        for r in data.load_records(cli.input_file(os.path.join(data_dir, name), "--data-dir")):
            for t in (r["question"], r["answer"]):
                if t not in seen:
                    seen.add(t)
                    texts.append(t)
    return texts


def mask_tokens(ids, special, mask_prob, mask_id, vocab_size, gen):
    """BERT's masking. ids (B, T) -> (inputs (B, T), labels (B, T) with -100 where nothing is predicted).
    special (B, T) bool marks [CLS]/[SEP]/[PAD], which are never predicted. Each sequence predicts at least one
    token, so short texts still contribute."""
    r = torch.rand(ids.shape, generator=gen)
    r[special] = 2.0                                                   # never chosen
    pick = r < mask_prob
    first = r.argmin(1)                                                # the lowest draw of each row is always picked
    pick[torch.arange(len(ids)), first] = True
    labels = torch.where(pick, ids, torch.full_like(ids, -100))
    how = torch.rand(ids.shape, generator=gen)
    rand_ids = torch.randint(len(SPECIALS), vocab_size, ids.shape, generator=gen)  # never a special token
    inputs = torch.where(pick & (how < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(pick & (how >= 0.8) & (how < 0.9), rand_ids, inputs)
    return inputs, labels


# ----------------------------------------------------------------------------------------------------------------
# Model: BERT with torch's post-LN encoder layer (x = LN(x + attn(x)); x = LN(x + ffn(x)), as in BERT), exported
# under Hugging Face's BertForMaskedLM names by hf_state_dict().


class TinyBert(nn.Module):
    def __init__(self, vocab_size, hidden, layers, heads, ffn, max_len, dropout):
        super().__init__()
        self.word = nn.Embedding(vocab_size, hidden, padding_idx=0)
        self.pos = nn.Embedding(max_len, hidden)
        self.token_types = nn.Parameter(torch.zeros(2, hidden))       # token types: only type 0 is ever used
        self.emb_ln = nn.LayerNorm(hidden, eps=1e-12)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(hidden, heads, ffn, dropout, activation="gelu", layer_norm_eps=1e-12,
                                       batch_first=True, norm_first=False) for _ in range(layers))
        self.pooler = nn.Linear(hidden, hidden)                        # untrained: kept for AutoModel's layout
        self.head_dense = nn.Linear(hidden, hidden)                    # MLM head; its decoder is self.word.weight
        self.head_ln = nn.LayerNorm(hidden, eps=1e-12)
        self.head_bias = nn.Parameter(torch.zeros(vocab_size))
        for m in self.modules():                                       # BERT's init: N(0, 0.02), zero biases
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for layer in self.layers:                                      # the attention's packed q/k/v projection
            nn.init.normal_(layer.self_attn.in_proj_weight, 0.0, 0.02)
            nn.init.zeros_(layer.self_attn.in_proj_bias)
        nn.init.normal_(self.token_types, 0.0, 0.02)
        with torch.no_grad():
            self.word.weight[0].zero_()

    def forward(self, ids, pad):
        """ids (B, T), pad (B, T) bool (True = padding) -> hidden states of every layer [(B, T, H)] * (L + 1)."""
        T = ids.shape[1]
        x = self.word(ids) + self.pos.weight[:T][None] + self.token_types[0]
        x = self.drop(self.emb_ln(x))
        hs = [x]
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=pad)
            hs.append(x)
        return hs

    def mlm_logits(self, h):
        """(..., H) -> (..., V)"""
        return self.head_ln(F.gelu(self.head_dense(h))) @ self.word.weight.T + self.head_bias

    def hf_state_dict(self):
        """This model's weights under BertForMaskedLM's names (the decoder is tied to the word embeddings, so it is
        not stored; transformers re-ties it)."""
        sd, H = {}, self.word.weight.shape[1]
        e = "bert.embeddings."
        sd[e + "word_embeddings.weight"] = self.word.weight
        sd[e + "position_embeddings.weight"] = self.pos.weight
        sd[e + "token_type_embeddings.weight"] = self.token_types
        sd[e + "LayerNorm.weight"], sd[e + "LayerNorm.bias"] = self.emb_ln.weight, self.emb_ln.bias
        for i, layer in enumerate(self.layers):
            p, a = f"bert.encoder.layer.{i}.", layer.self_attn
            for j, name in enumerate(("query", "key", "value")):     # in_proj packs q, k, v rows: (3H, H)
                sd[p + f"attention.self.{name}.weight"] = a.in_proj_weight[j * H:(j + 1) * H]
                sd[p + f"attention.self.{name}.bias"] = a.in_proj_bias[j * H:(j + 1) * H]
            pairs = {"attention.output.dense": a.out_proj, "attention.output.LayerNorm": layer.norm1,
                     "intermediate.dense": layer.linear1, "output.dense": layer.linear2,
                     "output.LayerNorm": layer.norm2}
            for name, m in pairs.items():
                sd[p + name + ".weight"], sd[p + name + ".bias"] = m.weight, m.bias
        sd["bert.pooler.dense.weight"], sd["bert.pooler.dense.bias"] = self.pooler.weight, self.pooler.bias
        c = "cls.predictions."
        sd[c + "transform.dense.weight"], sd[c + "transform.dense.bias"] = self.head_dense.weight, self.head_dense.bias
        sd[c + "transform.LayerNorm.weight"] = self.head_ln.weight
        sd[c + "transform.LayerNorm.bias"] = self.head_ln.bias
        sd[c + "bias"] = self.head_bias
        return {k: v.detach().float().contiguous().clone() for k, v in sd.items()}


def bucketed_order(seqs, batch_size, gen, window=16):
    """A random order of all sequences in which each run of `window` batches is sorted by length: batches of
    similar lengths waste less compute on padding, and every epoch still sees every text once."""
    order = torch.randperm(len(seqs), generator=gen).tolist()
    w = batch_size * window
    return [i for s in range(0, len(order), w) for i in sorted(order[s:s + w], key=lambda i: len(seqs[i]))]


def batch_of(seqs, idx):
    """Right-padded (ids (B, T), pad (B, T) bool) of the sequences at idx."""
    T = max(len(seqs[i]) for i in idx)
    ids = torch.zeros(len(idx), T, dtype=torch.long)
    for r, i in enumerate(idx):
        ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
    return ids, ids == 0


# ----------------------------------------------------------------------------------------------------------------


def save(model, args, tk_dir, out, info):
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    sd = model.hf_state_dict()
    outputs.atomic_write(str(out / "model.safetensors"), lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    cfg = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": model.word.weight.shape[0],
           "hidden_size": args.hidden, "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
           "intermediate_size": args.ffn, "hidden_act": "gelu", "hidden_dropout_prob": args.dropout,
           "attention_probs_dropout_prob": args.dropout, "max_position_embeddings": args.max_len,
           "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
           "position_embedding_type": "absolute", "tie_word_embeddings": True, "scorer": info}
    dump = lambda obj: json.dumps(obj, ensure_ascii=False, indent=2) + "\n"  # noqa: E731
    outputs.atomic_write(out / "config.json", dump(cfg))
    for f in ("tokenizer.json", "vocab.txt"):
        shutil.copyfile(tk_dir / f, out / f)
    names = dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), SPECIALS))
    outputs.atomic_write(out / "tokenizer_config.json", dump({
        "tokenizer_class": "BertTokenizer", "do_lower_case": False, "strip_accents": False,
        "tokenize_chinese_chars": True, "model_max_length": args.max_len, **names}))
    outputs.atomic_write(out / "special_tokens_map.json", dump(names))


def check_with_transformers(model, out, seqs):
    """Load the folder with transformers and compare every layer's hidden states and the MLM logits."""
    from transformers import BertForMaskedLM
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()                                   # no load report, no progress bar
    hf_logging.disable_progress_bar()
    try:
        ref = BertForMaskedLM.from_pretrained(str(out)).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    model.eval()
    ids, pad = batch_of(seqs, range(min(8, len(seqs))))
    with torch.no_grad():
        ours = model(ids, pad)
        theirs = ref(input_ids=ids, attention_mask=(~pad).long(), output_hidden_states=True)
        real = ~pad                                                    # padded positions are not compared
        diff = max((a - b)[real].abs().max().item() for a, b in zip(ours, theirs.hidden_states))
        diff = max(diff, (model.mlm_logits(ours[-1]) - theirs.logits)[real].abs().max().item())
    if diff > 1e-4:
        raise SystemExit(f"error: {out}: transformers' BertForMaskedLM differs from this model by {diff:.2e}")
    return diff


def main(argv=None):
    args = get_args(argv)
    torch.set_num_threads(args.threads)
    from tokenizers import Tokenizer
    tk_dir = Path(args.data_dir) / "wordpiece"
    tk = Tokenizer.from_file(str(cli.input_file(str(tk_dir / "tokenizer.json"), "--data-dir")))
    if [tk.token_to_id(t) for t in SPECIALS] != list(range(len(SPECIALS))):
        raise cli.UserError(str(tk_dir), f"expected the special tokens {SPECIALS} as ids 0..4")
    out = Path(cli.output_dir(args.out, "--out"))
    texts = load_texts(args.data_dir)
    tk.enable_truncation(args.max_len)
    seqs = [e.ids for e in tk.encode_batch(texts)]                     # [CLS] text [SEP], <= --max-len
    V = tk.get_vocab_size()
    print(f"{len(texts)} texts, {sum(map(len, seqs))} tokens, vocab {V}")

    torch.manual_seed(args.seed)
    model = TinyBert(V, args.hidden, args.layers, args.heads, args.ffn, args.max_len, args.dropout)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.ndim == 2]             # matrices and embeddings
    no_decay = [p for p in model.parameters() if p.ndim != 2]          # biases, LayerNorm
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (args.steps - s) / (args.steps - warmup)))
    gen = torch.Generator().manual_seed(args.seed)
    order, pos, t0, losses = [], 0, time.time(), []
    model.train()
    for step in range(args.steps):
        if pos + args.batch_size > len(order):                         # new epoch: reshuffle
            order, pos = bucketed_order(seqs, args.batch_size, gen), 0
        idx = order[pos:pos + args.batch_size]
        pos += args.batch_size
        ids, pad = batch_of(seqs, idx)
        special = pad | (ids == 2) | (ids == 3)
        inputs, labels = mask_tokens(ids, special, args.mask_prob, 4, V, gen)
        h = model(inputs, pad)[-1]                                     # (B, T, H)
        picked = labels != -100                                        # only predicted positions need logits
        loss = F.cross_entropy(model.mlm_logits(h[picked]), labels[picked])   # (N, H) -> (N, V) vs (N,)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps}  mlm loss {sum(losses[-100:]) / len(losses[-100:]):.3f}  "
                  f"{time.time() - t0:.0f}s", flush=True)
    seconds = time.time() - t0
    info = {"made_by": "data/sample/make_scorer.py", "seed": args.seed, "steps": args.steps,
            "batch_size": args.batch_size, "lr": args.lr, "mask_prob": args.mask_prob, "texts": len(texts),
            "parameters": n_params, "mlm_loss_first_100": round(sum(losses[:100]) / len(losses[:100]), 4),
            "mlm_loss_last_100": round(sum(losses[-100:]) / len(losses[-100:]), 4),
            "torch": torch.__version__, "threads": args.threads}
    save(model, args, tk_dir, out, info)
    diff = check_with_transformers(model, out, seqs)
    print(f"{n_params:,} parameters, {seconds:.0f}s; transformers' BertForMaskedLM agrees to {diff:.1e}; "
          f"wrote {out}")


if __name__ == "__main__":
    cli.run(main)
