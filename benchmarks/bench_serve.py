"""Serving throughput: concurrent clients over several adapters against one request at a time.

    python benchmarks/bench_serve.py                          # 1, 4 and 16 clients, 4 adapters, embedded model
    python benchmarks/bench_serve.py --quick                  # a few short requests: checks the harness runs

Starts `lorakit serve` in its own process (the real command, uvicorn and all) on the embedded model
with --adapters random adapters, then sends the same fixed list of chat requests (real instructions,
spread round-robin over the adapters, greedy, the same max_tokens) at each concurrency level with the
official openai client: 1 client is the one-at-a-time baseline, in the same run, against the same
server. Reports per level the generated tokens per second (all requests' completion tokens over the
wall time), p50/p95 request latency, and the ratio against one at a time. Goal: 16 clients over 4
adapters >= 3x the tokens/s of one at a time. Greedy replies must be identical at every level (they
are checked), so every level does the same work.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

FALLBACK_QUESTIONS = ["Name three colours.", "What is the capital of France?", "Write a haiku about tea.",
                      "Explain what a CPU does in one sentence.", "Give two tips for sleeping well.",
                      "What is 12 times 7?", "Describe a cat to someone who has never seen one.",
                      "Why is the sky blue?"]


def questions(count: int) -> list[str]:
    """``count`` instructions from alpaca_en_demo (real requests), or a built-in list when it is absent."""
    pool = FALLBACK_QUESTIONS
    if common.DATA.exists():
        rows = json.loads(common.DATA.read_text())
        pool = [f"{r['instruction']}\n{r.get('input', '')}".strip() for r in rows if len(r["instruction"]) < 300]
    return [pool[i % len(pool)] for i in range(count)]


def make_adapters(folder: Path, count: int, targets: str, r: int, model: str) -> dict[str, Path]:
    import torch

    from lorakit import LoraConfig, get_peft_model
    from lorakit.models import load_model_and_tokenizer

    out = {}
    for i in range(count):
        base, _ = load_model_and_tokenizer(model)
        torch.manual_seed(i)
        lora = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, base_model_name_or_path=model,
                                               target_modules=targets if targets == "all-linear" else targets.split(",")))
        for name, p in lora.named_parameters():
            if "lora_B" in name:  # trained adapters have non-zero B: each one changes the replies
                torch.nn.init.normal_(p, std=0.02)
        lora.save_pretrained(folder / f"a{i}")
        out[f"a{i}"] = folder / f"a{i}"
    return out


def start_server(args, adapters: dict[str, Path]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "lorakit.cli.main", "serve", "--model", args.model, "--port", "0",
           "--log-level", "warning", "--max-batch", str(max(args.concurrency)),
           "--max-queue", str(max(64, args.requests))]
    cmd += [f"--adapter={name}={path}" for name, path in adapters.items()]
    if args.device:
        cmd += ["--device", args.device]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1")
    print("server: " + " ".join(cmd[1:]), flush=True)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    for line in proc.stderr:
        found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        if found:
            return proc, f"http://127.0.0.1:{found.group(1)}"
    raise SystemExit(f"the server did not start (exit code {proc.wait()})")


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    import httpx2 as httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the server did not become ready")
        time.sleep(0.2)


def run_level(client, requests: list[tuple[str, str]], clients: int, max_tokens: int) -> dict:
    """Send every request with ``clients`` at a time; tokens/s over the wall time, latencies, the replies."""
    def one(req):
        model, question = req
        t0 = time.perf_counter()
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                           max_tokens=max_tokens, temperature=0)
        return time.perf_counter() - t0, r.usage.completion_tokens, r.choices[0].message.content

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, requests))
    wall = time.perf_counter() - start
    latencies = sorted(t for t, _, _ in results)
    tokens = sum(n for _, n, _ in results)
    return {"clients": clients, "requests": len(requests), "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "p50_s": statistics.median(latencies),
            "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
            "replies": [text for _, _, text in results]}


def report(levels: list[dict], goal_clients: int) -> None:
    base = levels[0]["tokens_per_s"]
    print(f"\n{'clients':>7} {'requests':>8} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'p50 s':>7} {'p95 s':>7} "
          f"{'x one-at-a-time':>15}")
    for lv in levels:
        print(f"{lv['clients']:>7} {lv['requests']:>8} {lv['tokens']:>7} {lv['seconds']:>8.2f} "
              f"{lv['tokens_per_s']:>9.1f} {lv['p50_s']:>7.2f} {lv['p95_s']:>7.2f} {lv['tokens_per_s'] / base:>14.2f}x")
    same = all(lv["replies"] == levels[0]["replies"] for lv in levels)
    print(f"greedy replies identical at every level: {'yes' if same else 'NO'}")
    goal = next((lv for lv in levels if lv["clients"] == goal_clients), None)
    if goal is not None and levels[0]["clients"] == 1:
        ratio = goal["tokens_per_s"] / base
        print(f"goal: {goal_clients} clients >= 3x one at a time: {ratio:.2f}x ({'met' if ratio >= 3 else 'NOT met'})")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=common.DEFAULT_MODEL)
    ap.add_argument("--adapters", type=int, default=4, help="adapters the requests are spread over")
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="comma list or all-linear")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32, help="requests per level (the same list each time)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,4,16", help="client counts; the first should be 1 (the baseline)")
    ap.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    ap.add_argument("--device", default=None, help="the server's --device (default: cuda when available)")
    ap.add_argument("--out", help="also write the results as JSON here")
    ap.add_argument("--quick", action="store_true", help="8 short requests at 1 and 4 clients")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.max_tokens, args.concurrency = 8, 8, "1,4"
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    return args


def main(argv=None) -> int:
    from openai import OpenAI

    args = parse_args(argv)
    print(common.machine_report(args.threads))
    print(f"config: model={args.model} adapters={args.adapters} targets={args.targets} r={args.r} "
          f"requests/level={args.requests} max_tokens={args.max_tokens} greedy, clients={args.concurrency}")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        adapters = make_adapters(Path(tmp), args.adapters, args.targets, args.r, args.model)
        names = list(adapters)
        requests = [(names[i % len(names)], q) for i, q in enumerate(questions(args.requests))]
        proc, url = start_server(args, adapters)
        try:
            wait_ready(url, proc)
            client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
            run_level(client, [(n, "Hello.") for n in names], 1, 2)  # warm-up: first calls on each adapter
            levels = [run_level(client, requests, c, args.max_tokens) for c in args.concurrency]
        finally:
            proc.terminate()
            proc.wait(60)
    report(levels, goal_clients=16)
    if args.out:
        Path(args.out).write_text(json.dumps([{k: v for k, v in lv.items() if k != "replies"} for lv in levels],
                                             indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
