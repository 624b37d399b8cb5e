"""Generation before/after the sampler change: bench.py's gen mode, per shape the old sampler (torch.multinomial, the
function as it was at 7f6ed3f) and the new one in turn, each run timing ours against transformers interleaved."""
import json, os, sys, torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository root
import bench, model as M
new_sample = M.sample

def old_sample(logits, temperature, top_k=None, top_p=None, generator=None):
    if temperature < torch.finfo(logits.dtype).tiny:
        return logits.argmax(-1)
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)

shapes = [(a, "small") for a in sys.argv[2].split(",")] if len(sys.argv) > 2 else [("tiny", "full"), ("aragpt2-base", "small"), ("qwen2.5-0.5b", "small"), ("qwen3-0.6b", "small"),
          ("bloomz-560m", "small"), ("lfm2-350m", "small")]
iters = sys.argv[1] if len(sys.argv) > 1 else "6"
res = {}
for name, shape in shapes:
    for tag, fn in (("before", old_sample), ("after", new_sample)):
        M.sample = fn
        rep = bench.main(["--model", name, "--shape", shape, "--skip-train", "--iters", iters, "--warmup", "1",
                          "--device", "cpu", "--quiet"])
        g = rep["gen"]
        res[f"{name} {shape} {tag}"] = {"ratio": g["ratio"]["tokens_per_s"], "range": g["ratio"].get("tokens_per_s_range"),
                                        "ours": g["ours"]["spread_ms"], "transformers": g["transformers"]["spread_ms"],
                                        "ours_tok_s": g["ours"]["tokens_per_s"], "transformers_tok_s": g["transformers"]["tokens_per_s"]}
        print("RESULT", name, shape, tag, json.dumps(res[f"{name} {shape} {tag}"]), flush=True)
json.dump(res, open(sys.argv[1] if len(sys.argv) > 1 else "gen_sampler_ab.json", "w"), indent=1)
