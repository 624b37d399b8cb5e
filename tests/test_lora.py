"""lora.py: LoRA init, merge and trainable parameters; LoRA sites by HF/peft names; per-slice dropout; LoRA on an NF4
base; activation checkpointing (with LoRA, NF4 and bf16 autocast) gives the gradients of the plain model."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import hub
import lora
import model as M
import nf4

from conftest import HF, ids, read_st, run_train
import json
import os
import peft
import transformers
from transformers import AutoConfig, AutoModelForCausalLM
import lora as L
import shutil   # noqa: E402
import hub      # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------- 2. checkpointing

def _grads(m, x, y, amp=False):
    m.zero_grad(set_to_none=True)
    torch.manual_seed(123)   # the same dropout masks in both runs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = (m(x, targets=y) * torch.linspace(0.5, 1.5, x.shape[0])[:, None]).sum()
    loss.backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _saved_bytes(m, x, y):
    """Bytes autograd keeps for backward during one forward (saved_tensors_hooks sees each saved tensor)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x, targets=y).sum()
    return total[0]


@pytest.mark.parametrize("setup", ["full", "lora-dropout", "nf4-lora", "bf16-autocast"])
def test_checkpointed_gradients_equal_plain_ones(setup, saved):
    m = M.Decoder.from_pretrained(saved("qwen2"), quantize="nf4" if setup == "nf4-lora" else None)
    if setup in ("lora-dropout", "nf4-lora"):
        lora.add_lora(m, ["q_proj", "v_proj", "down_proj"], rank=4, alpha=8, dropout=0.3)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    m.train()
    x, y = ids(2, 16, 1), ids(2, 16, 2)
    y[:, :4] = -100
    plain = _grads(m, x, y, amp=setup == "bf16-autocast")
    m.grad_checkpoint = True
    ckpt = _grads(m, x, y, amp=setup == "bf16-autocast")
    assert plain.keys() == ckpt.keys() and plain
    for n in plain:
        assert torch.equal(plain[n], ckpt[n]), f"{setup}: gradient of {n} differs under checkpointing"
    # and it does keep less for backward: only each block's input instead of all its activations
    m.grad_checkpoint = False
    full = _saved_bytes(m, x, y)
    m.grad_checkpoint = True
    assert _saved_bytes(m, x, y) < 0.5 * full


# ----------------------------------------------------------------------------------------------- 3. LoRA by HF names

def test_lora_sites_by_hf_and_our_names(saved):
    q, kv, ff = 64, 32, 128
    qwen = M.Decoder.from_pretrained(saved("qwen2"))
    assert lora.lora_sites(qwen, ["q_proj", "v_proj"]) == {
        f"layers.{i}.attn.qkv": [(0, q), (q + kv, q + 2 * kv)] for i in range(2)}
    assert lora.lora_sites(qwen, ["gate_proj", "up_proj", "down_proj", "o_proj"]) == {
        **{f"layers.{i}.mlp.fc": [(0, ff), (ff, 2 * ff)] for i in range(2)},
        **{f"layers.{i}.mlp.proj": None for i in range(2)}, **{f"layers.{i}.attn.o": None for i in range(2)}}
    assert lora.lora_sites(qwen, ["qkv", "k_proj"]) == {f"layers.{i}.attn.qkv": None for i in range(2)}
    assert lora.lora_sites(qwen, ["layers.1.self_attn.k_proj"]) == {"layers.1.attn.qkv": [(q, q + kv)]}
    gpt2 = M.Decoder.from_pretrained(saved("gpt2"))
    assert lora.lora_sites(gpt2, ["c_attn", "c_proj"]) == {
        **{f"layers.{i}.attn.qkv": None for i in range(2)}, **{f"layers.{i}.attn.o": None for i in range(2)},
        **{f"layers.{i}.mlp.proj": None for i in range(2)}}
    assert lora.lora_sites(gpt2, ["attn.c_proj"]) == {f"layers.{i}.attn.o": None for i in range(2)}
    bloom = M.Decoder.from_pretrained(saved("bloom"))
    assert set(lora.lora_sites(bloom, ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"])) == {
        f"layers.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.o", "mlp.fc", "mlp.proj")}
    lfm = M.Decoder.from_pretrained(saved("lfm2"))   # layer 0 conv, layer 1 attention; d_ff 96
    assert lora.lora_sites(lfm, ["out_proj", "w1"]) == {"layers.0.conv.out_proj": None, "layers.1.attn.o": None,
                                                     "layers.0.mlp.fc": [(0, 96)], "layers.1.mlp.fc": [(0, 96)]}
    assert lora.lora_sites(lfm, ["conv.out_proj", "in_proj"]) == {"layers.0.conv.out_proj": None,
                                                              "layers.0.conv.in_proj": None}
    for fam in HF:   # every HF name of every family is in the list train.py checks names against before loading
        m = M.Decoder.from_pretrained(saved(fam))
        mods = hub.weight_map(m.cfg)
        names = {h[:-len(".weight")].rsplit(".", 1)[-1] for e in mods for h in e.hf
                 if e.ours[:-len(".weight")] in nf4.block_linears(m) and h.endswith(".weight")}
        assert names and names <= set(lora.HF_LORA_NAMES), (fam, names - set(lora.HF_LORA_NAMES))
    for bad in (["q_proj"], ["c_attn", "nonsense"]):
        with pytest.raises(ValueError, match="matches no layer of this gpt2 model"):
            lora.add_lora(gpt2, bad)


@pytest.mark.parametrize("fam,targets,changed", [
    ("qwen2", ["q_proj", "v_proj"], ["self_attn.q_proj", "self_attn.v_proj"]),
    ("llama", ["k_proj", "up_proj"], ["self_attn.k_proj", "mlp.up_proj"]),
    ("gpt2", ["c_fc"], ["mlp.c_fc"]),
])
def test_hf_name_lora_merged_save_changes_only_the_targets(fam, targets, changed, saved, tmp_path):
    d = saved(fam)
    m = M.Decoder.from_pretrained(d).eval()
    lora.add_lora(m, targets, rank=4, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    x = ids(seed=5)
    with torch.no_grad():
        unmerged = m(x)
    lora.merge_lora(m).save_pretrained(str(tmp_path))
    before = {k.removeprefix("transformer."): v for k, v in read_st(d).items()}   # gpt2 is saved without it
    after = read_st(str(tmp_path))
    assert before.keys() == after.keys()
    moved = sorted(k for k in before if not torch.equal(before[k], after[k]))
    want = sorted(f"{'h' if fam == 'gpt2' else 'model.layers'}.{i}.{c}.weight"
                  for i in range(2) for c in changed)
    assert moved == want, f"changed tensors {moved}, expected only {want}"
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(x).logits - unmerged).abs().max() < 1e-4


def test_each_slice_adapter_draws_its_own_dropout_mask():
    """q_proj and v_proj are two modules in peft, each with its own dropout; on our fused qkv they are two adapters
    of one LoRALinear and must not share a mask. With A_i = I and B_i = I, rows s:e of the output minus the base are
    scale * dropout_i(x): the zero patterns of the two ranges must differ; in eval they are both exactly x."""
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 192, bias=False)
    lin = lora.LoRALinear(base, rank=64, alpha=64, dropout=0.5, rows=[(0, 64), (128, 192)])
    with torch.no_grad():
        lin.lora_A.copy_(torch.eye(64).repeat(2, 1))
        lin.lora_B.copy_(torch.eye(64).repeat(2, 1))
    x = torch.rand(8, 64) + 0.5
    delta = lin(x) - base(x)                                            # (8, 192)
    q, v = delta[:, :64], delta[:, 128:]
    assert torch.equal(delta[:, 64:128], torch.zeros(8, 64))
    assert set(torch.unique((q == 0).float() + (q - 2 * x).abs().lt(1e-5).float()).tolist()) == {1.0}   # 0 or 2x
    assert not torch.equal(q == 0, v == 0), "the q and v adapters shared one dropout mask"
    lin.eval()
    delta = lin(x) - base(x)
    assert torch.allclose(delta[:, :64], x, atol=1e-6) and torch.allclose(delta[:, 128:], x, atol=1e-6)


def test_lora_on_nf4_merges_into_dequantised_weights(saved, tmp_path):
    d = saved("qwen2")
    m = M.Decoder.from_pretrained(d, quantize="nf4").eval()
    lora.add_lora(m, ["q_proj", "v_proj"], rank=4, alpha=8, dropout=0.0)
    assert isinstance(m.layers[0].attn.qkv.base, nf4.NF4Linear)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        f"layers.{i}.attn.qkv.lora_{ab}" for i in range(2) for ab in "AB"}
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        x = ids(seed=3)
        unmerged = m(x)
        deq = {n: m.get_submodule(n).dequantize() for n in ("layers.0.attn.o", "layers.0.mlp.fc")}
    lora.merge_lora(m).save_pretrained(str(tmp_path))
    saved_t = read_st(str(tmp_path))
    assert torch.equal(saved_t["model.layers.0.self_attn.o_proj.weight"], deq["layers.0.attn.o"])
    assert torch.equal(saved_t["model.layers.0.mlp.up_proj.weight"], deq["layers.0.mlp.fc"][128:])
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(x).logits - unmerged).abs().max() < 1e-4


# -- adapters in peft's format (lora.save_adapter / load_adapter, train.py <out>/adapter, --init-adapter) ----------

transformers.logging.set_verbosity_error()


V = 300


FAMILIES = {
    "gpt2": dict(model_type="gpt2", vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                 activation_function="gelu_new", bos_token_id=0, eos_token_id=0),
    "qwen2": dict(model_type="qwen2", vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, use_sliding_window=False),
    "llama": dict(model_type="llama", vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "bloom": dict(model_type="bloom", vocab_size=V, hidden_size=32, n_layer=2, n_head=4,
                  bos_token_id=1, eos_token_id=2, pad_token_id=3),
}


# (family, --lora-targets, the target_modules peft must get)
CASES = [("gpt2", ["c_attn", "c_proj"], ["c_attn", "c_proj"]),
         ("gpt2", ["attn.c_proj", "c_fc"], ["attn.c_proj", "c_fc"]),
         ("qwen2", ["q_proj", "v_proj"], ["q_proj", "v_proj"]),
         ("qwen2", ["qkv", "fc", "o"], ["gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
         ("llama", ["q_proj", "v_proj", "down_proj"], ["down_proj", "q_proj", "v_proj"]),
         ("bloom", ["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h", "query_key_value"])]


def build_hf(fam, seed=0):
    kw = dict(FAMILIES[fam])
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return m.eval()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    made = {}

    def get(fam):
        if fam not in made:
            d = tmp_path_factory.mktemp(fam)
            build_hf(fam).save_pretrained(str(d))
            made[fam] = str(d)
        return made[fam]
    return get


def adapted(base_dir, targets, seed=0, rank=4, alpha=8):
    ours = M.Decoder.from_pretrained(base_dir)
    L.add_lora(ours, targets, rank=rank, alpha=alpha, dropout=0.1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():   # B = 0 at init: perturb both, so that every piece of every adapter shows
        for n, p in ours.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return ours.eval()


IDS = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("fam,targets,expect", CASES, ids=[f"{c[0]}-{'+'.join(c[1])}" for c in CASES])
def test_peft_loads_our_adapter_as_the_merged_model(fam, targets, expect, bases, tmp_path):
    base_dir = bases(fam)
    ours = adapted(base_dir, targets)
    L.save_adapter(ours, str(tmp_path / "adapter"), base_model=base_dir)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == expect
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["task_type"]) == (4, 8, 0.1, "CAUSAL_LM")
    assert cfg["fan_in_fan_out"] == (fam == "gpt2") and cfg["use_rslora"] is False
    assert cfg["base_model_name_or_path"] == base_dir
    with torch.no_grad():
        unmerged = ours(IDS).float()
        L.merge_lora(ours)
        merged = ours(IDS).float()
        pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(tmp_path / "adapter"))
        pm.eval()
        theirs = pm(IDS).logits.float()
        plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()(IDS).logits.float()
    assert (theirs - plain).abs().max() > 1e-2, "test set-up: the adapter should change the logits"
    d = (theirs - merged).abs().max().item()
    print(f"{fam} {targets}: max |logit diff| peft vs merged = {d:.2e}")
    assert d <= 1e-4 * max(1.0, merged.abs().max().item()), f"peft vs our merged model: max |logit diff| {d:.3g}"
    assert (unmerged - merged).abs().max().item() <= 1e-4 * max(1.0, merged.abs().max().item())
    # every saved tensor is named as peft names it, with no adapter name
    n_loaded = sum(1 for n, _ in pm.named_parameters() if "lora_" in n)
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == n_loaded and all(k.startswith("base_model.model.") and ".default." not in k for k in saved)


@pytest.mark.parametrize("fam,targets", [("gpt2", ["c_attn", "c_proj"]), ("qwen2", ["q_proj", "v_proj"]),
                                         ("bloom", ["query_key_value"])])
def test_load_adapter_round_trip(fam, targets, bases, tmp_path):
    """load_adapter is peft_state's inverse: a model initialised from the saved adapter holds the same LoRA
    tensors (so --init-adapter starts where the adapter ends)."""
    base_dir = bases(fam)
    ours = adapted(base_dir, targets, seed=3)
    L.save_adapter(ours, str(tmp_path), base_model=None)
    fresh = M.Decoder.from_pretrained(base_dir)
    L.add_lora(fresh, targets, rank=4, alpha=8, dropout=0.0)
    L.load_adapter(fresh, str(tmp_path))
    a = {n: p for n, p in ours.named_parameters() if "lora_" in n}
    b = {n: p for n, p in fresh.named_parameters() if "lora_" in n}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_adapter_refuses_other_targets(bases, tmp_path):
    import cli
    base_dir = bases("qwen2")
    L.save_adapter(adapted(base_dir, ["q_proj", "v_proj"]), str(tmp_path))
    other = M.Decoder.from_pretrained(base_dir)
    L.add_lora(other, ["q_proj"], rank=4, alpha=8, dropout=0.0)
    with pytest.raises(cli.UserError, match="other modules than --lora-targets"):
        L.load_adapter(other, str(tmp_path))
    shared = M.Decoder.from_pretrained(base_dir)   # ours: one A over the whole qkv; the file has three
    L.add_lora(shared, ["qkv"], rank=4, alpha=8, dropout=0.0)
    L.save_adapter(adapted(base_dir, ["q_proj", "k_proj", "v_proj"]), str(tmp_path / "three"))
    with pytest.raises(cli.UserError, match="its own lora_A"):
        L.load_adapter(shared, str(tmp_path / "three"))


SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The offline tiny GPT-2 (random weights, the sample's tokenizer) as a local model folder: a transformers base."""
    d = tmp_path_factory.mktemp("tiny_base")
    M.Decoder.from_pretrained("tiny").save_pretrained(str(d))
    shutil.copy(hub.TINY_TOKENIZER, d / "tokenizer.json")
    return str(d)


def train_argv(base, out, *extra):
    return ["--model", base, "--data", os.path.join(SAMPLE, "train.jsonl"), "--eval-data", "none", "--out", str(out),
            "--max-steps", "2", "--batch-size", "4", "--lr", "0.05", "--quiet", *extra]


@pytest.mark.usefixtures("threads_and_signals")
@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_train_writes_peft_adapter(tiny_folder, tmp_path, quantize):
    out = tmp_path / "run"
    assert run_train(train_argv(tiny_folder, out, "--lora-rank", "4", "--lora-alpha", "8", "--lora-targets",
                                "c_attn,c_proj", "--quantize", quantize)) == 0
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == os.path.abspath(tiny_folder) and cfg["target_modules"] == ["c_attn", "c_proj"]
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 8, 0.05)
    ids = torch.randint(0, 2048, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()(ids).logits   # <out> is still a model folder
        base = AutoModelForCausalLM.from_pretrained(tiny_folder)
        if quantize == "nf4":   # the merged model is the dequantised NF4 base + B @ A: compare on that base
            nf4_base = M.Decoder.from_pretrained(tiny_folder, quantize="nf4")
            nf4_base.save_pretrained(str(tmp_path / "nf4_base"))
            base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "nf4_base"))
        pm = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        theirs = pm(ids).logits
    d = (theirs - merged).abs().max().item()
    print(f"train.py tiny gpt2 {quantize}: max |logit diff| peft vs merged <out> = {d:.2e}")
    assert d <= 1e-4 * max(1.0, merged.abs().max().item())
    assert (merged - AutoModelForCausalLM.from_pretrained(tiny_folder).eval()(ids).logits).abs().max() > 1e-3


@pytest.mark.usefixtures("threads_and_signals")
def test_init_adapter_starts_from_the_adapter(tiny_folder, tmp_path, capsys):
    first = tmp_path / "first"
    lora = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "c_attn"]
    assert run_train(train_argv(tiny_folder, first, *lora)) == 0
    second = tmp_path / "second"   # --lr 0: the adapters stay as loaded, so the merged model is the first one's
    assert run_train(train_argv(tiny_folder, second, *lora, "--init-adapter", str(first / "adapter"),
                                "--lr", "0")) == 0
    from safetensors.torch import load_file
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (first, second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((second / "args.json").read_text())["init_adapter"] == os.path.abspath(first / "adapter")
    capsys.readouterr()
    for extra, needle in ((["--lora-rank", "8", "--lora-targets", "c_attn"], "has r 4"),
                          (["--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "c_attn,c_fc"],
                           "other modules than --lora-targets"),
                          ([], "--init-adapter")):
        bad = tmp_path / "bad"
        assert run_train(train_argv(tiny_folder, bad, *extra, "--init-adapter", str(first / "adapter"))) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("note")]
        assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
        assert not (bad / "model.safetensors").exists()


@pytest.mark.usefixtures("threads_and_signals")
def test_new_run_replaces_our_adapter_never_a_foreign_folder(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    lora = ["--lora-rank", "4", "--lora-targets", "c_attn"]
    assert run_train(train_argv(tiny_folder, out, *lora)) == 0
    assert run_train(train_argv(tiny_folder, out, *lora, "--seed", "2")) == 0   # the adapter folder replaced whole
    assert sorted(os.listdir(out / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not [n for n in os.listdir(out) if n.startswith(".")]   # no unit temp left (".lock" is gone at exit)
    assert run_train(train_argv(tiny_folder, out)) == 0            # full fine-tuning: the old adapter is removed
    assert not (out / "adapter").exists()
    (out / "adapter").mkdir()
    (out / "adapter" / "mine.txt").write_text("keep")
    capsys.readouterr()
    assert run_train(train_argv(tiny_folder, out, *lora)) == 2
    assert "not a train.py adapter" in capsys.readouterr().err
    assert (out / "adapter" / "mine.txt").read_text() == "keep"


def test_unit_moves_a_folder_over_the_old_one_and_finishes_after_a_kill(tmp_path):
    """outputs.unit with a folder in it (adapter/): the new folder replaces the old one whole; a unit killed after
    its move list was written is finished by the next clean_stale, folder included."""
    import outputs
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "old.txt").write_text("old")
    with outputs.unit(str(out), last=("state.safetensors",)) as tmp:
        os.makedirs(os.path.join(tmp, "adapter"))
        outputs.atomic_write(os.path.join(tmp, "adapter", "adapter_config.json"), "{}")
        outputs.atomic_write(os.path.join(tmp, "state.safetensors"), "s")
    assert sorted(os.listdir(out / "adapter")) == ["adapter_config.json"]
    assert sorted(os.listdir(out)) == ["adapter", "state.safetensors"]
    # killed between writing the move list and the moves: the next run finishes them
    tmp = out / ".unit.abcd1234.tmp"
    (tmp / "adapter").mkdir(parents=True)
    (tmp / "adapter" / "adapter_model.safetensors").write_text("new")
    (tmp / "state.safetensors").write_text("s2")
    (tmp / outputs.MOVES).write_text(json.dumps(["adapter", "state.safetensors"]))
    assert outputs.clean_stale(str(out), ("unit",)) == [".unit.abcd1234.tmp"]
    assert sorted(os.listdir(out / "adapter")) == ["adapter_model.safetensors"]
    assert (out / "state.safetensors").read_text() == "s2" and sorted(os.listdir(out)) == ["adapter", "state.safetensors"]
