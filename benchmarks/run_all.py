"""Run every benchmark of the results table in benchmarks/README.md, one after another.

    python benchmarks/run_all.py            # all rows
    python benchmarks/run_all.py --quick    # fewer steps, to check the harness runs

Each script prints the machine, its exact command and its ratios against peft; this driver
only runs them in sequence (each in a fresh process, so RSS and thread settings stay clean).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

ROWS = [
    # (target, script, args, extra args for --quick)
    ("1 all-linear, dropout 0.1: speed, dropout cost, the floor", "bench_train.py",
     ["--targets", "all-linear", "--variants", "lorakit:0.1,lorakit:0.0,peft:0.1,peft:0.0,floor:0", "--steps", "4"],
     ["--steps", "1"]),
    ("2 q,v, dropout 0.1: speed + share of peak", "bench_train.py",
     ["--targets", "q_proj,v_proj", "--variants", "lorakit:0.1,peft:0.1,peft:0.0", "--steps", "3", "--flops"],
     ["--steps", "1"]),
    ("3 job b end to end vs peft's example loop", "bench_job_b.py", ["--variants", "lorakit,peft"],
     ["--epochs", "1", "--repeats", "1"]),
    ("4 all-linear, dropout 0.1: peak RSS", "bench_memory.py", ["--targets", "all-linear", "--dropout", "0.1"],
     ["--steps", "1"]),
    ("5 generation: unmerged vs merged, mixed adapters", "bench_generate.py", ["--targets", "all-linear", "--repeats", "5"],
     ["--repeats", "1"]),
    ("6 serving: 16 clients over 4 adapters vs one request at a time", "bench_serve.py", [], ["--quick"]),
    ("7 DoRA all-linear, dropout 0.1: lorakit DoRA vs lorakit LoRA vs peft DoRA", "bench_dora.py",
     ["--targets", "all-linear", "--dropout", "0.1", "--steps", "6"], ["--steps", "1"]),
    ("8 LoRA+ vs plain LoRA on job b's data: loss after the same steps", "bench_loraplus.py", ["--ratios", "1,16"],
     ["--epochs", "1"]),
    ("9 precision (issue 16): lorakit auto vs fp32 vs peft's bf16 options; loss, peak RSS, job b accuracy",
     "bench_precision.py", [], ["--steps", "1", "--loss-steps", "5", "--job-b-epochs", "1"]),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    failed = []
    for title, script, extra, quick in ROWS:
        if args.quick:
            extra = extra + quick  # a later flag wins in argparse
        cmd = [sys.executable, str(HERE / script), *extra]
        print(f"\n=== target {title}", flush=True)
        if subprocess.run(cmd, check=False).returncode:
            failed.append(title)
    if failed:
        print(f"\nfailed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
