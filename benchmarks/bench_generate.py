"""Generation speed: unmerged adapter vs merged model, and mixed-adapter vs one-adapter batches.

    python benchmarks/bench_generate.py --targets all-linear --adapters 4

Greedy decoding with the KV cache, a fixed count of new tokens (min_new_tokens ==
max_new_tokens), the same left-padded real-text prompts for every variant, variants
alternating run by run. Variants:
  merged     merge_and_unload() of a copy of the adapted model (plain transformers model)
  unmerged   the LoRA model, one active adapter
  mixed      the LoRA model with --adapters adapters, adapter_names giving each row its own
Targets: unmerged >= 0.9x merged tokens/s; mixed >= 0.8x unmerged (one-adapter batch).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402


def randomize_lora(model, seed: int) -> None:
    """Non-zero B (peft-style init leaves B = 0), so each adapter really changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="all-linear")
    ap.add_argument("--adapters", type=int, default=4, help="adapters mixed in one batch")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=common.DEFAULT_MODEL)
    args = ap.parse_args(argv)

    import lorakit
    from transformers import AutoTokenizer

    common.setup_threads(args.threads)
    print(common.machine_report(args.threads))
    print(f"config: targets={args.targets} r={args.r} batch={args.batch} new tokens={args.new_tokens} "
          f"greedy, KV cache, {args.adapters} adapters in the mixed batch, {args.repeats} runs each")
    targets = "all-linear" if args.targets == "all-linear" else args.targets.split(",")
    tok = AutoTokenizer.from_pretrained(common.model_dir(args.model))
    tok.padding_side = "left"
    rows = json.loads(common.DATA.read_text())[: args.batch] if common.DATA.exists() else []
    prompts = [r["instruction"] for r in rows] or ["Tell me about LoRA."] * args.batch
    enc = tok(prompts, return_tensors="pt", padding=True)

    base = common.load_base(args.model)
    base.config.use_cache = True
    cfg = lorakit.LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=targets, task_type="CAUSAL_LM")
    lm = lorakit.get_peft_model(copy.deepcopy(base), cfg)
    names = ["default"] + [f"a{i}" for i in range(1, args.adapters)]
    for n in names[1:]:
        lm.add_adapter(n, cfg)
    randomize_lora(lm, args.seed)
    lm.set_adapter("default")
    lm.eval()
    twin = lorakit.get_peft_model(copy.deepcopy(base), cfg)   # LoraModel does not deepcopy
    twin.load_lora_state_dict(lm.lora_state_dict("default"))
    merged = twin.merge_and_unload().eval()
    del base
    rows_names = [names[i % len(names)] for i in range(args.batch)]

    kw = dict(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
              pad_token_id=tok.pad_token_id)
    variants = {
        "merged": lambda: merged.generate(**kw),
        "unmerged": lambda: lm.generate(**kw),
        "mixed": lambda: lm.generate(**kw, adapter_names=rows_names),
    }
    with torch.no_grad():
        outs = {k: f() for k, f in variants.items()}  # warmup + correctness
        same = torch.equal(outs["merged"], outs["unmerged"])
        times = {k: [] for k in variants}
        for _ in range(args.repeats):
            for k, f in variants.items():
                t = time.perf_counter(); f(); times[k].append(time.perf_counter() - t)
    tokens = args.batch * args.new_tokens
    for k in variants:
        print(f"{k:9s} {common.fmt_rate(tokens, times[k])}")
    med = {k: common.stats(v)["median"] for k, v in times.items()}
    print(f"merged and unmerged generate the same tokens: {same}")
    print(f"ratio unmerged/merged tokens/s: {med['merged'] / med['unmerged']:.3f}x (target >= 0.9)")
    print(f"ratio mixed ({args.adapters} adapters)/one-adapter tokens/s: {med['unmerged'] / med['mixed']:.3f}x "
          f"(target >= 0.8)")


if __name__ == "__main__":
    main()
