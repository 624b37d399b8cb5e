"""Shared pytest set-up: make the repository root importable and keep every test offline."""
import contextlib
import importlib
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import traceback

import numpy as np
import pytest
import torch
from safetensors import safe_open

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The tests never reach the Hugging Face hub; fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import bert  # noqa: E402
import hub  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
import evaluate as E  # noqa: E402
import model as M  # noqa: E402
import outputs  # noqa: E402
import train  # noqa: E402
from hub import Tokenizer  # noqa: E402
from model import Config, Decoder  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is fastest and does not stall on a busy 2-core box. Modules opt in with
    pytestmark = pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def threads_and_signals():
    """One intra-op thread (2 shared cores: more threads are slower, and results stay comparable with the
    OMP_NUM_THREADS=1 subprocesses), and the SIGINT/SIGTERM handlers that train.main installs restored afterwards.
    Modules that call the scripts' main() in-process opt in with
    pytestmark = pytest.mark.usefixtures("threads_and_signals")."""
    n = torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    for s, h in handlers.items():
        signal.signal(s, h)


def pytest_configure(config):
    config.addinivalue_line("markers", "pack_assets: the test's `assets` fixture is the packing set (pack_assets)")


# ----------------------------------------------------------------------------------------------- decoders (tiny HF configs)

V = 300        # vocab of every tiny model
THETA = 1000.0  # a non-default RoPE base, so a loader that ignores the config's value is caught

_ROPE = {"rope_type": "default", "rope_theta": THETA}
FAMILIES = {
    "gpt2": dict(model_type="gpt2", vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, n_inner=None,
                 activation_function="gelu_new", bos_token_id=0, eos_token_id=0),
    "bloom": dict(model_type="bloom", vocab_size=V, hidden_size=64, n_layer=2, n_head=4,
                  bos_token_id=1, eos_token_id=2, pad_token_id=3),
    "qwen2": dict(model_type="qwen2", vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128, rope_parameters=_ROPE,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False),
    "qwen3": dict(model_type="qwen3", vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, intermediate_size=128, max_position_embeddings=128,
                  rope_parameters=_ROPE, rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False),
    # intermediate 128 with auto-adjust and multiple_of 32: int(2*128/3) = 85 -> 96 (the real 350M rule)
    "lfm2": dict(model_type="lfm2", vocab_size=V, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, block_multiple_of=32, block_auto_adjust_ff_dim=True,
                 layer_types=["conv", "full_attention", "conv", "full_attention"], max_position_embeddings=128,
                 rope_parameters=_ROPE, norm_eps=1e-5, tie_word_embeddings=True,
                 bos_token_id=1, eos_token_id=7, pad_token_id=0),
    "llama": dict(model_type="llama", vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128, rope_parameters=_ROPE,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "mistral": dict(model_type="mistral", vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128, rope_parameters=_ROPE,
                    rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None,
                    bos_token_id=1, eos_token_id=2),
}


def build_hf(fam, seed=0, std=0.3, **overrides):
    """A tiny random transformers model of `fam`, eval mode, fp32, with weights that make wrong maths visible."""
    from transformers import AutoConfig, AutoModelForCausalLM
    kw = dict(FAMILIES[fam])
    kw.update(overrides)
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):       # every 1-D weight here is a norm weight
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return m.eval()

# The 16 NF4 levels as printed in the QLoRA paper's appendix (and shipped by bitsandbytes), typed here independently.
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]

# test_model's tiny configs; LFM2 cut to one conv and one attention layer (2 layers, like the others)
HF = {k: FAMILIES[k] for k in ("gpt2", "bloom", "qwen2", "llama")}
HF["lfm2"] = dict(model_type="lfm2", vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96, block_auto_adjust_ff_dim=False,
                  layer_types=["conv", "full_attention"], max_position_embeddings=128, rope_parameters=_ROPE,
                  norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=7, pad_token_id=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """saved(fam) -> folder of a tiny random transformers model (weights scaled so that errors show), built once."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cache = {}

    def get(fam):
        if fam not in cache:
            kw = dict(HF[fam])
            cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
            torch.manual_seed(0)
            m = AutoModelForCausalLM.from_config(cfg)
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for name, p in m.named_parameters():
                    if p.ndim == 1 and name.endswith("weight"):
                        p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
                    else:
                        p.copy_(0.3 * torch.randn(p.shape, generator=g))
            d = tmp_path_factory.mktemp(fam)
            m.save_pretrained(str(d))
            cache[fam] = str(d)
        return cache[fam]
    return get


def ids(B=2, T=12, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def run_train(argv):
    """cli.run(train.main, argv) -> exit status."""
    try:
        cli.run(train.main, argv)
    except SystemExit as e:
        return e.code
    return 0


def read_st_file(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def load(d, **kw):
    return M.Decoder.from_pretrained(str(d), **kw).eval()


def rand_ids(B=2, T=12, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def our_logits(m, ids, mask=None):
    return (m(ids) if mask is None else m(ids, mask)).float()


def max_diff(a, b):
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a.float() - b.float()).abs().max().item()


def tiny_decoder():
    cfg = Config.from_hf(dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=2, n_inner=None, n_positions=128,
                              vocab_size=50, layer_norm_epsilon=1e-5, activation_function="gelu_new",
                              bos_token_id=0, eos_token_id=0, tie_word_embeddings=True))
    m = Decoder(cfg)
    m.init_weights(0)
    return m.eval()


# ----------------------------------------------------------------------------------------------- train.py: records, tiny model
TRAIN = os.path.join(ROOT, "train.py")

WORDS = ("ألم صداع حرارة سعال دواء طبيب مستشفى قلب صدر ضغط سكر معدة رأس دم تنفس حساسية جلد عين أذن ظهر "
         "مفاصل نوم تعب دوخة غثيان التهاب مضاد حيوي فحص تحليل أشعة علاج راحة ماء غذاء رياضة نزيف إغماء").split()


def make_records(n, seed):
    """n canonical records: Arabic Q/A of uneven lengths, soft probabilities (3 decimals, summing to 1) whose
    dominant class cycles through the three severities."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) + "؟"
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 22)))
        x = [rng.uniform(0.05, 0.6) for _ in range(3)]
        x[i % 3] += 1.0
        s = sum(x)
        p_nc, p_n = round(x[0] / s, 3), round(x[1] / s, 3)
        p_c = round(1.0 - p_nc - p_n, 3)
        out.append(dict(question=q, answer=a, severity=data.SEVERITIES[i % 3], p_nc=p_nc, p_n=p_n, p_c=p_c))
    return out


def write_jsonl(path, recs):
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def byte_bpe(records):
    """A GPT-2-style byte-level BPE (400 tokens, <|endoftext|> = 0) trained on the records and the answer cue."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([r["question"] + "\n" + r["answer"] for r in records] + [data.PROMPT_CUE], trainer)
    return tk


@pytest.fixture(scope="session")
def train_assets(tmp_path_factory):
    """A tiny local model folder (config.json + model.safetensors + tokenizer.json) and data files:
    data/train.jsonl (32) + data/test.jsonl (9, found by --eval-data auto), one8/train8.jsonl (8 records, no
    test.jsonl beside it: one optimizer step of 8 covers it all)."""
    root = tmp_path_factory.mktemp("train_assets")
    train_recs, test_recs, recs8 = make_records(32, 0), make_records(9, 1), make_records(8, 2)
    tk = byte_bpe(train_recs)
    assert tk.token_to_id("<|endoftext|>") == 0
    cfg = M.Config.from_hf(dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=2, n_inner=None, n_positions=256,
                                vocab_size=tk.get_vocab_size(), layer_norm_epsilon=1e-5,
                                activation_function="gelu_new", bos_token_id=0, eos_token_id=0,
                                tie_word_embeddings=True))
    m = M.Decoder(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():   # larger than the default init, perturbed norms/biases: logits far from uniform
        for name, p in m.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    mdir = root / "model"
    m.save_pretrained(str(mdir))
    tk.save(str(mdir / "tokenizer.json"))
    (root / "data").mkdir()
    (root / "one8").mkdir()
    return dict(root=root, model=str(mdir),
                train=write_jsonl(root / "data" / "train.jsonl", train_recs),
                test=write_jsonl(root / "data" / "test.jsonl", test_recs),
                train8=write_jsonl(root / "one8" / "train8.jsonl", recs8),
                train_recs=train_recs, test_recs=test_recs, recs8=recs8)


@pytest.fixture(scope="module")
def pack_assets(tmp_path_factory):
    """A BPE tokenizer trained on the records, data files, and a tiny checkpoint folder per family (lazily)."""
    root = tmp_path_factory.mktemp("pack_assets")
    recs, test = make_records(24, 5), make_records(6, 6)
    tk = byte_bpe(recs)
    (root / "data").mkdir()
    out = dict(root=root, train=write_jsonl(root / "data" / "train.jsonl", recs),
               test=write_jsonl(root / "data" / "test.jsonl", test), vocab=tk.get_vocab_size(), tk=tk, dirs={})

    def folder(fam):
        if fam not in out["dirs"]:
            extra = dict(n_positions=128) if fam == "gpt2" else {}
            hf = build_hf(fam, vocab_size=tk.get_vocab_size(), std=0.15, bos_token_id=0, eos_token_id=0, **extra)
            d = root / fam
            hf.save_pretrained(str(d))
            tk.save(str(d / "tokenizer.json"))
            out["dirs"][fam] = str(d)
        return out["dirs"][fam]
    out["folder"] = folder
    return out


@pytest.fixture
def assets(request):
    """train_assets; a test marked pack_assets gets pack_assets (two fixture sets share the name in the moved tests)."""
    return request.getfixturevalue("pack_assets" if request.node.get_closest_marker("pack_assets") else "train_assets")


def _weights(folder):
    return {k: v.clone() for k, v in M.Decoder.from_pretrained(str(folder)).state_dict().items()}


def base_args(assets, out, *extra, data_file=None, steps=3):
    return ["--model", assets["model"], "--data", data_file or assets["train"], "--out", str(out),
            "--max-steps", str(steps), "--quiet", *map(str, extra)]


def run_main(argv):
    """train.main in-process; returns the exit status (0 when it returns normally)."""
    try:
        train.main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def sub_env(**kw):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT, HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update({k: str(v) for k, v in kw.items()})
    return env


def read_log(out):
    with open(os.path.join(str(out), "train_log.jsonl"), encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def step_lines(log):
    return [r for r in log if "loss" in r]


def read_st(path):
    """A safetensors file, or a folder's model.safetensors, as {name: tensor}."""
    if os.path.isdir(str(path)):
        path = os.path.join(str(path), "model.safetensors")
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def state_meta(out):
    with safe_open(os.path.join(str(out), "state.safetensors"), "pt") as f:
        return json.loads(f.metadata()["meta"])


def assert_same_weights(a_dir, b_dir, atol, skip_key_bias=False):
    """model.safetensors of two runs agree to atol. skip_key_bias: leave out the key part of GPT-2's c_attn bias.
    Its true gradient is exactly zero (adding a constant to every key shifts each query's scores by a constant,
    which softmax ignores), so what it receives is rounding noise, and Adam turns noise of any size into steps of
    about lr: two summation orders (micro-batches, ranks) then disagree there by ~lr while agreeing elsewhere."""
    a, b = (read_st(os.path.join(str(d), "model.safetensors")) for d in (a_dir, b_dir))
    assert a.keys() == b.keys()
    worst, where = 0.0, None
    for k in a:
        d = (a[k] - b[k]).abs()
        if skip_key_bias and k.endswith("attn.c_attn.bias"):
            n = d.numel() // 3
            d = torch.cat([d[:n], d[2 * n:]])
        if d.max().item() > worst:
            worst, where = d.max().item(), k
    assert worst <= atol, f"model.safetensors differ by {worst:.3g} > {atol:g} (in {where})"


def severity_w(r, abc):
    return abc[0] * r["p_nc"] + abc[1] * r["p_n"] + abc[2] * r["p_c"]


def split_tokens(tok, r):
    """(prompt ids, answer ids + EOS): the training text is format_prompt(question) + answer + EOS."""
    return tok.encode(data.format_prompt(r["question"])), tok.encode(r["answer"], special=False) + [tok.eos_id]


def example_logits(m, tok, r, loss_tokens="answer"):
    """One example run alone (no padding): the logits that predict each loss token, and those tokens."""
    p, a = split_tokens(tok, r)
    ids = p + a
    start = 1 if loss_tokens == "all" else len(p)       # first position of ids whose prediction counts
    logits = m(torch.tensor([ids[:-1]]))[0]              # logits[t] predicts ids[t + 1]
    return logits[start - 1:], torch.tensor(ids[start:])


def capture_grads(monkeypatch):
    """Record every optimizer step's gradients (before clipping) in model.parameters() order."""
    grads = []
    orig = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *a, **k):
        ps = list(parameters)
        grads.append([None if p.grad is None else p.grad.detach().clone() for p in ps])
        return orig(ps, max_norm, *a, **k)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    return grads


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_torchrun(argv, nproc=2):
    """train.py under torchrun with nproc CPU processes (gloo) on a free local port -> Popen (end it with reap())."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={port}", TRAIN, *map(str, argv)]
    return subprocess.Popen(cmd, env=sub_env(MASTER_PORT=port, MASTER_ADDR="127.0.0.1"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def children(pid):
    """Process ids whose parent is pid (Linux /proc): torchrun's workers, each in a session of its own."""
    kids = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:   # field 4, after the "(command)" that may hold spaces
            kids.append(int(d))
    return sorted(kids)


def reap(p):
    """After a failed or timed-out test: SIGKILL torchrun's workers, then torchrun (killed alone, it would leave the
    workers running, holding its output pipes open)."""
    if p.poll() is None:
        for pid in children(p.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.kill()
        p.communicate()


def torchrun(argv, nproc=2, timeout=300):
    """train.py under torchrun, run to the end -> CompletedProcess."""
    p = start_torchrun(argv, nproc)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        reap(p)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


# ----------------------------------------------------------------------------------------------- evaluate.py: tiny decoder, scorer

QA = [  # (question, answer, severity): short synthetic texts, not medical advice
    ("أشعر بألم شديد في الصدر مع تعرق", "اتصل بالإسعاف فورا", "critical"),
    ("فقد أبي الوعي فجأة", "اطلب الإسعاف الآن وتحقق من التنفس", "critical"),
    ("نزيف لا يتوقف من جرح عميق", "اضغط على الجرح واذهب إلى الطوارئ", "critical"),
    ("صعوبة شديدة في التنفس عند طفلي", "توجه إلى الطوارئ فورا", "critical"),
    ("حرارة مرتفعة منذ ثلاثة أيام", "راجع الطبيب خلال يوم", "neutral"),
    ("قيء متكرر منذ الصباح", "اشرب السوائل وراجع الطبيب إذا استمر", "neutral"),
    ("ألم مستمر في الظهر منذ أسبوع", "راجع الطبيب لتقييم الألم", "neutral"),
    ("سعال مع بلغم منذ أيام", "راجع الطبيب إذا زاد السعال", "neutral"),
    ("صداع خفيف بعد العمل", "استرح واشرب الماء", "non-critical"),
    ("زكام وسيلان في الأنف", "الراحة والسوائل تكفي غالبا", "non-critical"),
    ("هل القهوة مضرة", "باعتدال لا تضر غالبا", "non-critical"),
    ("ما المعدل الطبيعي للنبض", "بين ستين ومئة نبضة في الدقيقة", "non-critical"),
]
PROBS = {"critical": (0.1, 0.2, 0.7), "neutral": (0.2, 0.6, 0.2), "non-critical": (0.7, 0.2, 0.1)}


def records():
    return [dict(question=q, answer=a, severity=s, **dict(zip(data.PROB_FIELDS, PROBS[s]))) for q, a, s in QA]


def make_tokenizer():
    from tokenizers import Tokenizer as TK
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tk = TK(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [data.format_prompt(q) + a for q, a, _ in QA]
    tk.train_from_iterator(texts, trainer)
    return Tokenizer(tk, 0, 0, None)


def make_decoder(tok, folder, seed=0):
    cfg = Config.from_hf(dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=2, n_inner=None, n_positions=256,
                              vocab_size=tok.vocab_size, layer_norm_epsilon=1e-5, activation_function="gelu_new",
                              bos_token_id=0, eos_token_id=0, tie_word_embeddings=True))
    m = Decoder(cfg)
    m.init_weights(seed)
    with torch.no_grad():    # larger weights: varied text and logit gaps of order 1 (no near-ties for argmax)
        m.wte.weight.mul_(20)
        for p in m.layers.parameters():
            if p.ndim == 2:
                p.mul_(20)
    m.save_pretrained(folder)
    tok.save(folder)
    return folder


def make_scorer(folder, layers=3, texts=None):
    """A tiny random BERT (transformers) with a character WordPiece vocabulary over `texts` (default: QA's): bert-score
    loads it as a local folder."""
    from transformers import BertConfig, BertModel
    texts = texts if texts is not None else [q + a for q, a, _ in QA]
    chars = sorted({c for t in texts for c in t if not c.isspace()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": False, "model_max_length": 128}, f)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    test = str(root / "test.jsonl")
    outputs.write_jsonl(test, records())
    tok = make_tokenizer()
    base = make_decoder(tok, str(root / "base"))
    run = make_decoder(tok, str(root / "run"), seed=1)
    with open(os.path.join(run, "args.json"), "w", encoding="utf-8") as f:
        json.dump({"model": "tinytest", "weights": "balanced", "weights_abc": [0.5, 1.0, 1.5], "seed": 1}, f)
    scorer = make_scorer(str(root / "scorer"))
    return dict(root=root, test=test, base=base, run=run, scorer=scorer)


def run_eval(env, out, *extra):
    argv = ["--model", env["base"], "--data", env["test"], "--out", str(out), "--bertscore-model", env["scorer"],
            "--bertscore-layer", "2", "--bootstrap", "50", "--batch-size", "5", "--quiet", *extra]
    return E.main(argv)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(ln) for ln in f]


def expect_exit2(capsys, argv, *needles, main=None):
    with pytest.raises(SystemExit) as e:
        (main or E.main)(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, err
    return err


def resampled(n, n_boot, seed):
    """The resample indices bootstrap_ci draws: one block of n_boot x n from default_rng(seed)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def pct95(stats):
    return tuple(np.percentile(stats, [2.5, 97.5]))


# ----------------------------------------------------------------------------------------------- data, classify/annotate


def write_csv_rows(path, header, rows):
    import csv
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path
WORDPIECE = os.path.join(ROOT, "data", "sample", "wordpiece")


def make_classifier(folder, labels, seed=0):
    """A tiny random classifier folder in classify.py's output layout (no training needed here)."""
    torch.manual_seed(seed)
    cfg = bert.BertConfig(vocab_size=hub.load_wordpiece(WORDPIECE).vocab_size, hidden_size=32,
                          num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                          max_position_embeddings=128, initializer_range=0.2)
    model = bert.BertClassifier(cfg, labels)
    with torch.no_grad():  # large random weights, so the questions get different, confident predictions
        model.bert.wte.weight.normal_(0, 1.0)
        model.bert.pooler.weight.normal_(0, 0.5)
        model.classifier.weight.normal_(0, 2.0)
    model.meta = {"trained_with": "test", "input": "text", "max_len": 96}
    bert.save_classifier(model, hub.load_wordpiece(WORDPIECE), str(folder))
    return str(folder)

ARABIC = ["أشعر بألم ضاغط في وسط صدري ينتشر إلى ذراعي اليسرى منذ نصف ساعة. ماذا أفعل؟",
          "طفلي عمره ثلاثة أسابيع وحرارته 38.3 درجة، ويرضع أقل من المعتاد!!",
          "هل شرب فنجانين من القهوة يوميًا يضر القلب؟ (سؤال عام) [CLS] xyzzy ABC",
          "eg:ابني عنده سنتين وبياكل قليل جدًا ومش بيحب الخضار، أعمل إيه؟ 😀"]


def tiny_hf(tmp_path, name="hf", cls=None, **kw):
    """A random transformers BERT (LayerNorms perturbed so they are not identities) saved as safetensors."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, max_position_embeddings=64, type_vocab_size=2, **kw)
    m = (cls or BertModel)(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "LayerNorm" in n:
                p.add_(0.3 * torch.randn_like(p))
    m.save_pretrained(tmp_path / name, safe_serialization=True)
    return m, tmp_path / name


def batch(vocab=99, B=3, T=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    am = torch.ones_like(ids)
    am[1, 7:] = 0
    am[2, 3:] = 0          # heavy padding in one row
    ids[am == 0] = 0
    tt = torch.zeros_like(ids)
    tt[0, 5:] = 1
    return ids, am, tt


def _tiny_classifier(seed=0):
    torch.manual_seed(seed)
    cfg = bert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=24, max_position_embeddings=32,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return bert.BertClassifier(cfg, ["a", "b", "c"])


# ----------------------------------------------------------------------------------------------- the scripts' contract (test_errors)

SAMPLE = os.path.join(ROOT, "data", "sample")


def _bert_folder(folder):
    """A tiny random BERT over the sample's characters (test_evaluate.make_scorer): a valid scorer for evaluate.py
    and the shape of a classifier folder for corrupting."""
    texts = [r["question"] + r["answer"] for r in data.load_records(os.path.join(SAMPLE, "test.jsonl"))]
    return make_scorer(folder, layers=2, texts=texts)


@pytest.fixture(scope="module")
def errors_env(tmp_path_factory):
    """Read-only inputs shared by all cases: a tiny decoder folder, 8 training records, 4 test records, a scorer."""
    root = tmp_path_factory.mktemp("errors_env")
    mdir = str(root / "model")
    M.Decoder.from_pretrained("tiny").save_pretrained(mdir)
    M.load_tokenizer("tiny").save(mdir)
    recs = data.load_records(os.path.join(SAMPLE, "train.jsonl"))
    (root / "d").mkdir()
    tr, te = str(root / "d" / "train.jsonl"), str(root / "d" / "test.jsonl")
    outputs.write_jsonl(tr, recs[:8])
    outputs.write_jsonl(te, data.load_records(os.path.join(SAMPLE, "test.jsonl"))[:4])
    good = json.dumps(recs[0], ensure_ascii=False)
    return dict(root=root, model=mdir, train=tr, test=te, recs=recs[:8], good=good,
                scorer=_bert_folder(str(root / "scorer")), labels=os.path.join(SAMPLE, "severity_labels.jsonl"))


SCRIPT_MODULES = {"train": "train", "annotate": "annotate", "evaluate": "evaluate", "report": "report",
                  "prepare": "data.prepare", "bench": "bench", "classify": "classify"}


def call(script, argv):
    """script.main(argv) in-process -> (exit status, stderr). An exception that escapes is a traceback: returned as
    status 'traceback' with the formatted traceback as stderr, so the table reports it like any other failure."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            importlib.import_module(SCRIPT_MODULES[script]).main([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:   # noqa: BLE001 - exactly what the contract forbids; reported, not raised
            return "traceback", err.getvalue() + traceback.format_exc()
    return code, err.getvalue()


def snapshot(folder):
    """Every path under folder with its size, mtime and mode: 'nothing written' = equal snapshots."""
    out = {}
    for dp, dns, fns in os.walk(folder):
        for n in dns + fns:
            p = os.path.join(dp, n)
            st = os.lstat(p)
            out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def assert_contract(code, err, *needles):
    assert code == 2, f"exit status {code!r}, want 2; stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"want exactly one stderr line, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
