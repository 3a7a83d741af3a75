"""Peak memory (ru_maxrss) of training, lorakit vs peft, each in its own subprocess.

    python benchmarks/bench_memory.py --targets all-linear --dropout 0.1

A process's peak RSS only grows, so each implementation runs in a fresh child process that
loads the model, wraps it, and trains --steps steps on the same real-text batches as
bench_train.py. Reported: peak RSS, the RSS after loading+wrapping (the part both share), and
the ratio of peaks and of the training part (peak - after-load).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def child(args) -> None:
    import torch
    common.setup_threads(args.threads)
    targets = "all-linear" if args.targets == "all-linear" else args.targets.split(",")
    base = common.load_base(args.model)
    batches = common.text_batches(args.model, args.batch, args.seq, args.steps, args.seed)
    model = common.wrap(args.child, base, targets, args.r, args.alpha, args.dropout, args.seed)
    del base
    import gc
    gc.collect()
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    loaded = current_rss_mb()
    for i, ids in enumerate(batches):
        torch.manual_seed(args.seed + i)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(json.dumps({"impl": args.child, "peak_mb": rss_mb(), "after_load_mb": loaded}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="all-linear")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--ours", default="lorakit", help="lorakit or handwrap")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=common.DEFAULT_MODEL)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    print(common.machine_report(args.threads))
    print(f"config: targets={args.targets} dropout={args.dropout} r={args.r} alpha={args.alpha} "
          f"batch={args.batch} seq={args.seq} AdamW fp32, {args.steps} steps, one subprocess each")
    res = {}
    for impl in (args.ours, "peft"):
        cmd = [sys.executable, __file__, "--child", impl] + [
            a for a in sys.argv[1:] if not a.startswith("--child")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode:
            sys.stderr.write(out.stderr[-3000:])
            raise SystemExit(f"{impl} child failed (exit {out.returncode})")
        res[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        r = res[impl]
        print(f"{impl:10s} peak RSS {r['peak_mb']:8.0f} MB  after load+wrap {r['after_load_mb']:8.0f} MB  "
              f"training part {r['peak_mb'] - r['after_load_mb']:8.0f} MB")
    a, b = res[args.ours], res["peft"]
    print(f"ratio {args.ours}/peft peak RSS: {a['peak_mb'] / b['peak_mb']:.3f}x; training part: "
          f"{(a['peak_mb'] - a['after_load_mb']) / (b['peak_mb'] - b['after_load_mb']):.3f}x")


if __name__ == "__main__":
    main()
