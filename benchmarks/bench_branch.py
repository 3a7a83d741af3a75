"""Micro-benchmark of the LoRA branch alone: lorakit's lora_delta vs peft's per-module form.

    python benchmarks/bench_branch.py --tokens 1024 --dropout 0.1

One SmolLM2 decoder layer's LoRA branches (q/k/v read one input, o its own, gate/up one,
down its own), forward + backward, each added into a stand-in for its base layer's output
(the base GEMMs left out). peft's form: per module result + lora_B(lora_A(nn.Dropout(p)(x))) *
scaling, as in peft.tuners.lora.Linear.forward; lorakit's: ``lora_add``, as its layers call it.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import common  # noqa: E402
from lorakit.kernels import SharedDropout, lora_add  # noqa: E402

# (input group, in, out) for SmolLM2-135M
MODULES = [("attn_in", 576, 576), ("attn_in", 576, 192), ("attn_in", 576, 192), ("o_in", 576, 576),
           ("mlp_in", 576, 1536), ("mlp_in", 576, 1536), ("down_in", 1536, 576)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    common.setup_threads(args.threads)
    print(common.machine_report(args.threads))
    s = 32 / args.r
    A = [nn.Parameter(torch.randn(args.r, i) / math.sqrt(i)) for _, i, _ in MODULES]
    B = [nn.Parameter(torch.randn(o, args.r) * 0.01) for _, _, o in MODULES]
    drop_ours = SharedDropout(args.dropout).train()
    drops_peft = [nn.Dropout(args.dropout).train() for _ in MODULES]

    def inputs():
        dims = {g: i for g, i, _ in MODULES}
        return {g: torch.randn(args.tokens, d, requires_grad=True) for g, d in dims.items()}

    def base_outputs(xs):  # what a frozen base layer hands on: a fresh tensor on the autograd path
        return [xs[g][..., :1].expand(-1, o) * 1.0 for g, _, o in MODULES]

    def ours(xs):
        return [lora_add(y, xs[g], A[k], B[k], s, drop_ours, True)
                for k, ((g, _, _), y) in enumerate(zip(MODULES, base_outputs(xs)))]

    def peft(xs):
        return [y + nn.functional.linear(nn.functional.linear(drops_peft[k](xs[g]), A[k]), B[k]) * s
                for k, ((g, _, _), y) in enumerate(zip(MODULES, base_outputs(xs)))]

    times = {"lorakit": [], "peft": []}
    for rep in range(args.repeats + 2):
        for name, fn in (("lorakit", ours), ("peft", peft)):
            xs = inputs()
            grads = [torch.ones(args.tokens, o) for _, _, o in MODULES]
            t = time.perf_counter()
            torch.autograd.backward(fn(xs), grads)
            if rep >= 2:
                times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        print(f"{name:8s} fwd+bwd of one layer's 7 branches: median {1e3 * statistics.median(ts):.2f} ms "
              f"(min {1e3 * min(ts):.2f}, max {1e3 * max(ts):.2f}, n={len(ts)})")
    print(f"ratio peft/lorakit time: {statistics.median(times['peft']) / statistics.median(times['lorakit']):.2f}x")


if __name__ == "__main__":
    main()
