"""Shared pieces of the benchmark scripts: machine report, model/data, LoRA wrapping, timing.

Every script prints the machine and its exact command, runs lorakit and peft alternating in
one process on copies of the same base model with the same data, config and seed, and reports
median/min/max over the timed steps plus the ratio lorakit/peft.
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_en_demo.json"
DEFAULT_MODEL = "embedded"  # SmolLM2-135M-Instruct, the cached safetensors copy of the GGUF
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def machine_report(threads: int) -> str:
    flags = set()
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    simd = " ".join(sorted(f for f in flags if f.startswith(("avx", "fma", "amx", "sse4"))))
    return (f"machine: {model}; {os.cpu_count()} cores; torch {torch.__version__} threads={threads}; "
            f"python {platform.python_version()}\ncpu flags: {simd or '?'}\n"
            f"command: {shlex.join([sys.executable, *sys.argv])}")


def setup_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1) if torch.get_num_interop_threads() != 1 else None


def model_dir(name: str) -> str:
    """A model folder for ``name``: 'embedded' (converted once, then cached) or any path/hub id."""
    from lorakit.models import resolve_model_path
    return resolve_model_path(name)


def load_base(model_path: str = DEFAULT_MODEL):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir(model_path), dtype=torch.float32)
    model.config.use_cache = False
    return model


def text_batches(model_path: str, batch: int, seq: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` [batch, seq] token-id tensors from real text (alpaca_en_demo), cycled if short."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir(model_path))
    if DATA.exists():
        rows = json.loads(DATA.read_text())
        text = "\n\n".join(f"{r['instruction']}\n{r.get('input', '')}\n{r['output']}" for r in rows)
        ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    else:  # keep the benchmark runnable without the shared data folder
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, tok.vocab_size, (batch * seq * count,), generator=g)
    need = batch * seq
    out = []
    for i in range(count):
        start = (i * need) % max(1, ids.numel() - need)
        out.append(ids[start:start + need].view(batch, seq).clone())
    return out


def wrap(impl: str, base, targets: list[str] | str, r: int, alpha: int, dropout: float, seed: int):
    """A LoRA model around a deep copy of ``base`` with ``impl`` in {lorakit, peft, handwrap, floor}."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    if impl == "peft":
        from peft import LoraConfig, get_peft_model
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                target_modules=targets, task_type="CAUSAL_LM"))
    if impl == "lorakit":
        import lorakit
        return lorakit.get_peft_model(model, lorakit.LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM"))
    if impl == "floor":
        # no LoRA at all: the frozen model, its input embeddings made to require grad so backward still
        # runs through every layer (grad_x of every frozen linear), with the model's own loss. What any
        # LoRA library wrapping this model pays before its own work; lorakit can go below it only by
        # computing the loss fused (lorakit.loss.lm_loss).
        for p in model.parameters():
            p.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda mod, args, out: out.requires_grad_())
        return model
    if impl == "handwrap":
        from handwrap import hand_wrap
        return hand_wrap(model, targets, r, alpha, dropout)
    raise SystemExit(f"unknown impl {impl!r}; use lorakit, peft, floor or handwrap")


def copy_lora_weights(src, dst) -> int:
    """Copy LoRA A/B from ``src`` to ``dst`` by module path, so both start from equal weights."""
    def ab(model):
        found = {}
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_A" in name or "lora_B" in name):
                mod = name.split(".lora_")[0].replace("base_model.model.", "").replace("model.model.", "model.")
                kind = "A" if "lora_A" in name else "B"
                found[(mod.split("model.", 1)[-1], kind)] = p
        return found
    s, d = ab(src), ab(dst)
    n = 0
    with torch.no_grad():
        for k, p in d.items():
            if k in s and s[k].shape == p.shape:
                p.copy_(s[k]); n += 1
    return n


def stats(ts: list[float]) -> dict:
    return {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "n": len(ts)}


def fmt_rate(tokens: int, ts: list[float]) -> str:
    s = stats(ts)
    return (f"{tokens / s['median']:8.1f} tok/s median  (min {tokens / s['max']:.1f}, max {tokens / s['min']:.1f}; "
            f"step {1e3 * s['median']:.0f} ms over {s['n']} steps)")


def matmul_peak_flops(threads: int, size: int = 2048, reps: int = 10) -> float:
    """fp32 FLOP/s of a large matrix product on this machine: the best of ``reps`` runs of torch.mm
    (MKL) and of oneDNN's linear (which lorakit uses for frozen weights), whichever is faster."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    runs = [lambda: torch.mm(a, b)]
    lp = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if lp is not None and torch.backends.mkldnn.is_available():
        runs.append(lambda: lp(a, b, None, "none", [], ""))
    best = math.inf
    for run in runs:
        run()
        for _ in range(reps):
            t = time.perf_counter(); run(); best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best


def alternate_steps(runs: list[dict], batches: list[torch.Tensor], warmup: int, seed: int) -> None:
    """One training step of every run per batch, in turn (the same seed for each), timing wall and process
    CPU time after ``warmup`` batches. A run: {"model", "opt" (None: nothing to train), "times", "cpu", "losses"},
    optionally "autocast": a dtype the forward runs under (``torch.autocast("cpu", dtype=...)``)."""
    import contextlib
    import time

    for i, ids in enumerate(batches):
        for run in runs:
            torch.manual_seed(seed + i)
            cast = run.get("autocast")
            ctx = torch.autocast("cpu", dtype=cast) if cast is not None else contextlib.nullcontext()
            t, c = time.perf_counter(), time.process_time()
            with ctx:
                loss = run["model"](input_ids=ids, labels=ids).loss
            loss.backward()
            if run["opt"] is not None:
                run["opt"].step()
                run["opt"].zero_grad(set_to_none=True)
            dt, dc = time.perf_counter() - t, time.process_time() - c
            run["losses"].append(loss.item())
            if i >= warmup:
                run["times"].append(dt)
                run["cpu"].append(dc)


def print_step_report(runs: list[dict], tokens: int, width: int) -> tuple[dict, dict]:
    """Print each run's tokens/s, first losses and CPU time per step; return (median wall, median CPU) by name."""
    print()
    for run in runs:
        print(f"{run['name']:{width}s} {fmt_rate(tokens, run['times'])}  "
              f"losses {' '.join(f'{x:.4f}' for x in run['losses'][:3])}")
    print("process CPU time per step (all threads; less sensitive to other load on the machine):")
    for run in runs:
        s = stats(run["cpu"])
        print(f"{run['name']:{width}s} cpu {1e3 * s['median']:.0f} ms median (min {1e3 * s['min']:.0f}, "
              f"max {1e3 * s['max']:.0f})")
    return ({run["name"]: stats(run["times"])["median"] for run in runs},
            {run["name"]: stats(run["cpu"])["median"] for run in runs})
