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
    # (target, script, args)
    ("1 all-linear, dropout 0.1: speed", "bench_train.py", ["--targets", "all-linear", "--dropout", "0.1"]),
    ("2 q,v, dropout 0.1: speed + share of peak", "bench_train.py",
     ["--targets", "q_proj,v_proj", "--dropout", "0.1", "--flops"]),
    ("4 all-linear, dropout 0.1: peak RSS", "bench_memory.py", ["--targets", "all-linear", "--dropout", "0.1"]),
    ("5 generation: unmerged vs merged, mixed adapters", "bench_generate.py", ["--targets", "all-linear"]),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    failed = []
    for title, script, extra in ROWS:
        if args.quick:
            extra = extra + (["--steps", "2"] if script != "bench_generate.py" else ["--repeats", "1"])
        cmd = [sys.executable, str(HERE / script), *extra]
        print(f"\n=== target {title}", flush=True)
        if subprocess.run(cmd, check=False).returncode:
            failed.append(title)
    if failed:
        print(f"\nfailed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
