"""DoRA's training step: lorakit DoRA vs lorakit plain LoRA vs peft DoRA, alternating step by step in one process.

    python benchmarks/bench_dora.py                                   # all-linear, dropout 0.1 (issue 14's goal)
    python benchmarks/bench_dora.py --variants lorakit-dora,peft-dora --steps 8
    python benchmarks/bench_dora.py --steps 1 --warmup 0 --seq 32 --batch 2   # smoke run

Goal: lorakit's DoRA >= 1.3x peft's DoRA tokens/s on the embedded SmolLM2-135M, every linear layer
adapted, LoRA dropout 0.1. Every variant wraps a deep copy of one base model, starts from the same
LoRA weights (A copied from the first variant; B = 0, so every magnitude starts at ||W||), trains with
AdamW on the same real-text batches, and is timed over the same steps, interleaved so machine noise hits
all alike. With dropout, DoRA multiplies the dropped input by the base weight once more (peft's
definition, which lorakit computes too): the step costs more than plain LoRA's in both libraries.
The first losses agree across variants (B = 0 makes every adapter the identity at step 0); later ones
differ only by the dropout masks each library draws.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402

VARIANTS = ("lorakit-dora", "lorakit-lora", "peft-dora", "peft-lora")


def wrap(variant: str, base, targets, r: int, alpha: int, dropout: float, seed: int):
    """``variant`` = IMPL-KIND (lorakit|peft, dora|lora) around a deep copy of ``base``."""
    impl, kind = variant.split("-")
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    kw = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM",
              use_dora=kind == "dora")
    if impl == "peft":
        from peft import LoraConfig, get_peft_model
        return get_peft_model(model, LoraConfig(**kw))
    import lorakit
    return lorakit.get_peft_model(model, lorakit.LoraConfig(**kw))


def report(runs: list[dict], tokens: int) -> None:
    med, cpu = common.print_step_report(runs, tokens, 14)
    pairs = [("lorakit-dora", "peft-dora", "goal >= 1.3x"), ("lorakit-dora", "lorakit-lora", "DoRA's price in lorakit"),
             ("peft-dora", "peft-lora", "DoRA's price in peft")]
    for a, b, note in pairs:
        if a in med and b in med:
            print(f"ratio {a} / {b}: {med[b] / med[a]:.3f}x throughput (wall), {cpu[b] / cpu[a]:.3f}x (cpu time)"
                  f"   ({note})")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="all-linear", help="all-linear or comma-separated module names")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--variants", default="lorakit-dora,lorakit-lora,peft-dora", help=f"comma list from {VARIANTS}")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=common.DEFAULT_MODEL)
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = sorted(set(variants) - set(VARIANTS))
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}; choose from {VARIANTS}")

    common.setup_threads(args.threads)
    print(common.machine_report(args.threads))
    targets = "all-linear" if args.targets == "all-linear" else args.targets.split(",")
    print(f"config: targets={args.targets} r={args.r} alpha={args.alpha} dropout={args.dropout} batch={args.batch} "
          f"seq={args.seq} AdamW lr 1e-4 fp32, seed {args.seed}, {args.warmup} warmup + {args.steps} timed steps")
    base = common.load_base(args.model)
    batches = common.text_batches(args.model, args.batch, args.seq, args.warmup + args.steps, args.seed)
    runs = []
    for name in variants:
        model = wrap(name, base, targets, args.r, args.alpha, args.dropout, args.seed)
        if runs:
            common.copy_lora_weights(runs[0]["model"], model)
        model.train()
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
        runs.append({"name": name, "model": model, "opt": opt, "times": [], "cpu": [], "losses": []})
    del base
    common.alternate_steps(runs, batches, args.warmup, args.seed)
    report(runs, args.batch * args.seq)


if __name__ == "__main__":
    main()
