"""Train the two small tokenizers of the sample set from its own text (deterministic).

  tokenizer.json        byte-level BPE for the tiny decoder, vocab 2048, "<|endoftext|>" = id 0
                        (bos = eos = pad, as in AraGPT2 / GPT-2). No normaliser: text round-trips
                        byte for byte (ByteLevel pre-tokenizer without a prefix space, ByteLevel decoder).
  wordpiece/            WordPiece BERT tokenizer for the tiny severity classifier, vocab 2000:
                        [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4; BertNormalizer without accent
                        stripping or lower-casing (Arabic diacritics are kept); BertPreTokenizer;
                        "[CLS] $A [SEP]" / "[CLS] $A [SEP] $B:1 [SEP]:1". Saved as tokenizer.json and
                        vocab.txt (one token per line, in id order).

The training text is every question and answer of train.jsonl / test.jsonl (inside the prompt
template, as the decoder sees them) and the severity_labels.jsonl texts. Both vocabularies are the same
on every run: the BPE trainer of `tokenizers` is deterministic for a full byte alphabet, and the
WordPiece vocabulary is learnt here with a fixed tie-break (see learn_wordpiece_vocab), then loaded
into a `tokenizers` WordPiece model. Run make_sample.py first.

Example:
    python data/sample/make_tokenizers.py
"""
import argparse
import heapq
import json
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # before importing tokenizers

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # repo root, for `import data`
import data  # noqa: E402
import outputs  # noqa: E402

EOT = "<|endoftext|>"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def corpus(folder):
    """Training lines: Q/A text as the decoder will see it (prompt template + answer) + labels."""
    lines = []
    for name in ("train.jsonl", "test.jsonl"):
        for r in data.load_records(folder / name):
            lines.append(data.format_prompt(r["question"]) + r["answer"])
    lines += [r["text"] for r in data.load_labels(folder / "severity_labels.jsonl")]
    return lines


def byte_bpe(lines, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    assert tok.token_to_id(EOT) == 0
    return tok


def learn_wordpiece_vocab(words, vocab_size, min_frequency=2):
    """WordPiece vocabulary by BPE-style merges over a word-count dict, with a fixed tie-break.

    (The `tokenizers` WordPieceTrainer numbers the "##x" pieces in hash-map order, so its vocabulary
    changes from run to run; this learner does the same job deterministically.)
    A word "abc" starts as a, ##b, ##c; the most frequent adjacent pair (ties: the smaller pair in
    string order) is merged into a new piece until the vocabulary is full or no pair occurs twice.
    """
    words_sorted = sorted(words)
    freqs = [words[w] for w in words_sorted]
    splits = [[w[0]] + ["##" + c for c in w[1:]] for w in words_sorted]
    alphabet = Counter()
    for sp, f in zip(splits, freqs):
        for sym in sp:
            alphabet[sym] += f
    vocab = BERT_SPECIALS + sorted(alphabet, key=lambda t: (-alphabet[t], t))
    known = set(vocab)
    pair_counts, where = Counter(), defaultdict(set)
    for i, (sp, f) in enumerate(zip(splits, freqs)):
        for pair in zip(sp, sp[1:]):
            pair_counts[pair] += f
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        negc, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negc:
            continue  # stale heap entry
        if -negc < min_frequency:
            break
        a, b = pair
        new = a + b[2:]  # b is never word-initial, so it always starts with "##"
        if new not in known:
            known.add(new)
            vocab.append(new)
        touched = set()
        for i in sorted(where.pop(pair)):
            sp, f = splits[i], freqs[i]
            merged, j = [], 0
            while j < len(sp):
                if j + 1 < len(sp) and sp[j] == a and sp[j + 1] == b:
                    merged.append(new)
                    j += 2
                else:
                    merged.append(sp[j])
                    j += 1
            for p in zip(sp, sp[1:]):
                pair_counts[p] -= f
                touched.add(p)
            for p in zip(merged, merged[1:]):
                pair_counts[p] += f
                where[p].add(i)
                touched.add(p)
            splits[i] = merged
        pair_counts.pop(pair, None)
        for p in sorted(touched):
            if pair_counts.get(p, 0) > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
    return vocab


def wordpiece(lines, vocab_size):
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                            strip_accents=False, lowercase=False)
    pre = pre_tokenizers.BertPreTokenizer()
    words = Counter(w for line in lines for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(line)))
    vocab = learn_wordpiece_vocab(words, vocab_size)
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(vocab)}, unk_token="[UNK]",
                                     continuing_subword_prefix="##", max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##")
    ids = [tok.token_to_id(t) for t in BERT_SPECIALS]
    assert ids == [0, 1, 2, 3, 4], ids
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


def save(tok, path):
    # Tokenizer.to_str is deterministic; write atomically so a reader never sees half a file.
    outputs.atomic_write(path, tok.to_str(pretty=True) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train the sample byte-level BPE and WordPiece tokenizers.")
    ap.add_argument("--folder", default=str(HERE), help="folder with the sample jsonl files; outputs go here")
    ap.add_argument("--bpe-vocab", type=int, default=2048, help="byte-level BPE vocabulary size")
    ap.add_argument("--wordpiece-vocab", type=int, default=2000, help="WordPiece vocabulary size")
    args = ap.parse_args(argv)
    folder = Path(args.folder)
    lines = corpus(folder)

    bpe = byte_bpe(lines, args.bpe_vocab)
    save(bpe, folder / "tokenizer.json")

    wp = wordpiece(lines, args.wordpiece_vocab)
    save(wp, folder / "wordpiece" / "tokenizer.json")
    vocab = sorted(wp.get_vocab().items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))  # dense ids, so line number = id
    outputs.atomic_write(folder / "wordpiece" / "vocab.txt", "".join(t + "\n" for t, _ in vocab))

    sample = lines[0]
    print(json.dumps({
        "bpe_vocab": bpe.get_vocab_size(), "wordpiece_vocab": wp.get_vocab_size(),
        "bpe_tokens_per_char": round(sum(len(bpe.encode(x).ids) for x in lines) / sum(map(len, lines)), 3),
        "wordpiece_unk_rate": round(sum(e.ids.count(1) for e in wp.encode_batch(lines)) /
                                    sum(len(e.ids) for e in wp.encode_batch(lines)), 4),
        "bpe_roundtrip": bpe.decode(bpe.encode(sample).ids) == sample,
    }, ensure_ascii=False))


if __name__ == "__main__":
    main()
