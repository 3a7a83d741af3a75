"""Training throughput, lorakit vs peft, alternating step by step in one process.

    python benchmarks/bench_train.py --targets all-linear --dropout 0.1
    python benchmarks/bench_train.py --targets q_proj,v_proj --dropout 0.1 --flops

Variants are IMPL:DROPOUT; by default ours at --dropout, ours at dropout 0 (the price of
dropout) and peft at --dropout. Every variant wraps a deep copy of one base model, starts from
the same LoRA weights (copied from the first variant), trains on the same real-text batches
with AdamW, and is timed over the same steps, interleaved so machine noise hits all alike.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402


def step_flops(cfg, batch: int, seq: int, targets, r: int) -> float:
    """Useful matmul FLOPs of one training step with frozen base weights and LoRA on ``targets``.

    Useful: the seq - 1 positions of a row that have a next-token label (the last position predicts
    nothing and, causally, feeds nothing; lorakit's fused loss skips it, peft computes it).

    Frozen linear: forward 2*N*in*out, backward only grad_x, 2*N*in*out. LoRA on [in->out]:
    forward 2*N*r*(in+out), backward grad_A, grad_B and grad_x: 4*N*r*(in+out).
    Attention (QK^T and PV over the full T x T, as the kernels compute): forward 4*B*H*T^2*d,
    backward twice that. lm_head (tied, frozen): forward + grad_x.
    """
    seq = seq - 1
    n = batch * seq
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    shapes = {"q_proj": (h, hq * d), "k_proj": (h, hkv * d), "v_proj": (h, hkv * d), "o_proj": (hq * d, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    names = common.LLAMA_LINEAR if targets == "all-linear" else targets
    per_layer = 0.0
    for name, (fin, fout) in shapes.items():
        per_layer += 4 * n * fin * fout
        if name in names:
            per_layer += 6 * n * r * (fin + fout)
    per_layer += 12 * batch * hq * seq * seq * d
    return cfg.num_hidden_layers * per_layer + 4 * n * h * cfg.vocab_size


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="all-linear", help="all-linear or comma-separated module names")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--variants", default=None,
                    help="comma list of IMPL:DROPOUT (impl: lorakit, peft, handwrap; floor:0 = the frozen model "
                         "with no LoRA, backward through every layer, the model's own loss)")
    ap.add_argument("--ours", default="lorakit", help="implementation standing for lorakit (lorakit or handwrap)")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=common.DEFAULT_MODEL)
    ap.add_argument("--flops", action="store_true", help="also report the share of the fp32 matmul peak")
    args = ap.parse_args(argv)

    common.setup_threads(args.threads)
    print(common.machine_report(args.threads))
    targets = "all-linear" if args.targets == "all-linear" else args.targets.split(",")
    if args.variants:
        variants = [(v.split(":")[0], float(v.split(":")[1])) for v in args.variants.split(",")]
    else:
        variants = [(args.ours, args.dropout)] + ([(args.ours, 0.0)] if args.dropout > 0 else []) + [("peft", args.dropout)]
    print(f"config: targets={args.targets} r={args.r} alpha={args.alpha} batch={args.batch} seq={args.seq} "
          f"AdamW fp32, seed {args.seed}, {args.warmup} warmup + {args.steps} timed steps per variant")

    base = common.load_base(args.model)
    batches = common.text_batches(args.model, args.batch, args.seq, args.warmup + args.steps, args.seed)
    runs = []
    for impl, p in variants:
        model = common.wrap(impl, base, targets, args.r, args.alpha, p, args.seed)
        if runs and impl != "floor":
            common.copy_lora_weights(runs[0]["model"], model)
        model.train()
        params = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None  # floor: nothing to train
        runs.append({"name": f"{impl}:dropout={p}", "model": model, "opt": opt, "times": [], "cpu": [], "losses": []})
    del base

    common.alternate_steps(runs, batches, args.warmup, args.seed)
    tokens = args.batch * args.seq
    med, cpu = common.print_step_report(runs, tokens, 24)
    first = runs[0]["name"]
    for run in runs[1:]:
        n = run["name"]
        print(f"ratio {first} / {n}: {med[n] / med[first]:.3f}x throughput (wall), {cpu[n] / cpu[first]:.3f}x (cpu time)")
    if args.flops:
        cfg = runs[0]["model"].config if hasattr(runs[0]["model"], "config") else None
        flops = step_flops(cfg, args.batch, args.seq, targets, args.r)
        peak = common.matmul_peak_flops(args.threads)
        print(f"\nstep matmul FLOPs {flops / 1e9:.1f} GFLOP; fp32 mm peak {peak / 1e9:.1f} GFLOP/s "
              f"(2048^3, the faster of torch.mm and oneDNN, best of 10, {args.threads} threads)")
        for run in runs:
            print(f"{run['name']:24s} {flops / med[run['name']] / 1e9:6.1f} GFLOP/s = "
                  f"{100 * flops / med[run['name']] / peak:.1f}% of peak")


if __name__ == "__main__":
    main()
