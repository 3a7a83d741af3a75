"""Which arithmetic a run uses: ``train.precision`` = ``auto`` | ``fp32`` | ``bf16``.

bf16 means: the frozen base model stored in bfloat16 (half the memory) and activations in bfloat16;
the LoRA weights, their gradients and the optimizer state in float32; the loss and softmax accumulated
in float32. Saved adapters and merged models stay float32.

``auto`` picks the faster of the two for the machine at hand, because neither is fastest everywhere:
on a CPU without bf16 instructions a bf16 product is ~3x slower than float32; with AVX-512 BF16 it is
~2x faster, with AMX ~5x. On the CPU it therefore measures, once per machine: a bf16 and a float32
product at the model's linear shapes (forward and input-gradient layouts; a quarter of a second), the
result cached per CPU model, flags and torch version in ``precision.json`` of lorakit's
cache (``$LORAKIT_CACHE``, default ``~/.cache/lorakit``). A CPU that lacks bf16 instructions gets float32 without
measuring. On CUDA, bf16 where the GPU supports it. The choice is printed once (``announce``).
"""
from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .constants import cache_root
from .errors import ConfigError
from .io import atomic_write_json
from .kernels import onednn

__all__ = ["PRECISIONS", "PrecisionChoice", "announce", "apply_precision", "choose_precision", "cpu_facts",
           "measure_products", "normalize_precision", "precision_name", "shapes_of", "PRECISION_DTYPES"]

PRECISIONS = ("auto", "fp32", "bf16")
_ALIASES = {"auto": "auto", "fp32": "fp32", "float32": "fp32", "float": "fp32", "32": "fp32",
            "bf16": "bf16", "bfloat16": "bf16"}
#: each precision's dtype; fp16 only where a dtype asks for it (model.dtype, --dtype): auto never picks it
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: the two auto measures and chooses between
_DTYPES = {name: PRECISION_DTYPES[name] for name in ("fp32", "bf16")}
#: bf16 is chosen when its products are at least this much faster: the rest of a step (norms, softmax,
#: casts) gains less than the products, and a tie is not worth the rounding
MIN_SPEEDUP = 1.15
#: CPU flags (x86 /proc/cpuinfo "flags", aarch64 "Features") of instructions that compute in bf16
BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
#: tokens per measured product: a few milliseconds however wide the model (see _tokens)
_FLOPS_PER_PRODUCT = 5e8
_GENERIC_SHAPES = [(1024, 1024), (1024, 4096), (4096, 1024)]


@dataclass(frozen=True)
class PrecisionChoice:
    """The arithmetic of a run: ``name`` "fp32" | "bf16", the base's dtype, and why."""

    name: str
    dtype: torch.dtype
    setting: str
    reason: str

    def describe(self) -> str:
        return f"precision: {self.name} ({self.setting}: {self.reason})"


def precision_name(dtype: torch.dtype) -> str:
    """The precision a dtype computes in ("fp32" | "bf16" | "fp16"; another dtype: its own name)."""
    return next((name for name, d in PRECISION_DTYPES.items() if d is dtype), str(dtype).removeprefix("torch."))


def normalize_precision(setting: Any) -> str:
    """``setting`` as one of PRECISIONS (also accepts float32 / bfloat16); a clear error otherwise."""
    key = str(getattr(setting, "value", setting)).strip().lower().removeprefix("torch.")
    if key not in _ALIASES:
        raise ConfigError(f"unknown precision {setting!r}. Fix: use one of {', '.join(PRECISIONS)} "
                          f"(auto measures which is faster on this machine).")
    return _ALIASES[key]


# -- the CPU -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CpuFacts:
    model: str
    flags: frozenset

    @property
    def bf16_instructions(self) -> tuple[str, ...]:
        return tuple(f for f in BF16_FLAGS if f in self.flags)


def cpu_facts(cpuinfo: str | None = None) -> CpuFacts:
    """The CPU's model name and flags (from /proc/cpuinfo where there is one)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    model, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return CpuFacts(model=model or platform.processor() or platform.machine() or "unknown", flags=frozenset(flags))


# -- the model's shapes --------------------------------------------------------------------------

def shapes_of(model_or_config: Any) -> list[tuple[int, int]]:
    """(in_features, out_features) of the model's block linears, most work first (at most 4 distinct); from
    an nn.Module (its nn.Linear / Conv1D layers) or a transformers config (hidden / intermediate sizes).
    The LM head (a vocabulary-wide product) is left out: the fused loss runs it on the answer tokens only,
    and at the few tokens a quick measurement can afford its timing says little."""
    if not isinstance(model_or_config, nn.Module):
        return _config_shapes(model_or_config)
    vocab = getattr(getattr(model_or_config, "config", None), "vocab_size", None)
    work: dict[tuple[int, int], int] = {}
    for module in model_or_config.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, nn.Linear):
            shape = (module.in_features, module.out_features)
        elif type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2:
            shape = (w.shape[0], w.shape[1])
        else:
            continue
        if vocab in shape:
            continue
        work[shape] = work.get(shape, 0) + shape[0] * shape[1]
    ranked = sorted(work, key=work.get, reverse=True)
    return ranked[:4] or list(_GENERIC_SHAPES)


def _config_shapes(config: Any) -> list[tuple[int, int]]:
    get = (lambda k: config.get(k)) if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    text = get("text_config")
    if text is not None and get("hidden_size") is None:
        return _config_shapes(text)
    hidden = next((get(k) for k in ("hidden_size", "n_embd", "d_model", "dim") if isinstance(get(k), int)), None)
    if not hidden:
        return list(_GENERIC_SHAPES)
    inner = next((get(k) for k in ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "hidden_dim")
                  if isinstance(get(k), int)), None) or 4 * hidden
    return [(hidden, inner), (inner, hidden), (hidden, hidden)]


# -- measuring -----------------------------------------------------------------------------------

def _tokens(shapes: Iterable[tuple[int, int]]) -> int:
    widest = max(i * o for i, o in shapes)
    return int(max(128, min(512, _FLOPS_PER_PRODUCT / (2 * widest))))


#: what a run mostly does: "train" (products over a batch of tokens, forward and input gradient) or
#: "generate" (one token at a time: products of one row, forward only, where a small model's bf16 product
#: can lose to float32's on fixed costs while a large one's wins on halved weight traffic)
WORKLOADS = ("train", "generate")
#: rows per product of a generation step, and how many products one timing repeats (a single row is ~us)
_DECODE_ROWS, _DECODE_REPEAT = 1, 16


def measure_products(shapes: list[tuple[int, int]], rounds: int = 7, workload: str = "train") -> dict[str, float]:
    """Seconds for one pass of the products a ``workload`` step runs per linear at ``shapes`` (training:
    ``x @ W.T`` and the input gradient ``g @ W`` over a batch; generation: ``x @ W.T`` of one row), in float32
    and in bfloat16, through the path the run takes (oneDNN where it is usable, else torch). The two dtypes
    are timed in alternation, ``rounds`` times, and each keeps its fastest round: a burst of other work on
    the machine slows one round of both, not one dtype."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ratio per core; a round on one thread is rarely hit by other work
    try:
        return _timed(_runs(shapes, workload), rounds)
    finally:
        torch.set_num_threads(threads)


def _runs(shapes: list[tuple[int, int]], workload: str) -> dict[str, list]:
    """Per dtype, one callable per shape running that shape's products."""
    train = workload == "train"
    n = _tokens(shapes) if train else _DECODE_ROWS
    g = torch.Generator().manual_seed(0)
    runs: dict[str, list] = {name: [] for name in _DTYPES}
    for fan_in, fan_out in shapes:
        x, W, grad = (torch.randn(n, fan_in, generator=g), torch.randn(fan_out, fan_in, generator=g),
                      torch.randn(n, fan_out, generator=g))
        for name, dtype in _DTYPES.items():
            xd, Wd, gd = x.to(dtype), W.to(dtype), grad.to(dtype)
            if train:
                runs[name].append(lambda xd=xd, Wd=Wd, gd=gd: (onednn.base_linear(xd, Wd), onednn.base_linear(gd, Wd.t())))
            else:
                runs[name].append(lambda xd=xd, Wd=Wd: [torch.nn.functional.linear(xd, Wd) for _ in range(_DECODE_REPEAT)])
    return runs


def _timed(runs: dict[str, list], rounds: int) -> dict[str, float]:
    best = {name: [float("inf")] * len(r) for name, r in runs.items()}
    for round_ in range(rounds + 1):  # round 0 warms up (oneDNN builds its kernels on first use)
        for name in runs:
            for k, run in enumerate(runs[name]):
                t = time.perf_counter()
                run()
                if round_:
                    best[name][k] = min(best[name][k], time.perf_counter() - t)
    return {name: sum(times) for name, times in best.items()}


# -- the cache -----------------------------------------------------------------------------------

#: where the measurements are kept when no cache_dir is given (None: lorakit's cache root); the test suite
#: points it at a folder of its own, so a run of the tests never leaves a choice behind for real runs
CACHE_DIR: Path | None = None


def cache_file(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or CACHE_DIR or cache_root()) / "precision.json"


def _cache_key(cpu: CpuFacts, shapes: list[tuple[int, int]], workload: str) -> str:
    return (f"{cpu.model} | {' '.join(cpu.bf16_instructions) or 'no-bf16'} | torch {torch.__version__} | "
            f"{workload} | {' '.join(f'{i}x{o}' for i, o in shapes)}")


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: measured again and rewritten
    return data if isinstance(data, dict) else {}


def _measured(cpu: CpuFacts, shapes: list[tuple[int, int]], measure, cache_dir, workload: str) -> tuple[dict, bool]:
    """(seconds per dtype, whether they came from the cache)."""
    path, key = cache_file(cache_dir), _cache_key(cpu, shapes, workload)
    cached = _read_cache(path).get(key)
    if isinstance(cached, dict) and all(isinstance(cached.get(k), (int, float)) and cached[k] > 0 for k in _DTYPES):
        return {k: float(cached[k]) for k in _DTYPES}, True
    seconds = measure(shapes) if workload == "train" else measure(shapes, workload=workload)
    data = _read_cache(path)
    data[key] = {**{k: float(seconds[k]) for k in _DTYPES}, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, data)
    except OSError:
        pass  # a read-only home: measured again next time, nothing else changes
    return seconds, False


# -- the choice ----------------------------------------------------------------------------------

def choose_precision(setting: Any = "auto", device: Any = "cpu", shapes: list[tuple[int, int]] | None = None, *,
                     measure: Callable[..., dict] | None = None, cache_dir: str | os.PathLike | None = None,
                     cpuinfo: str | None = None, workload: str = "train") -> PrecisionChoice:
    """The precision of a run on ``device`` for ``setting`` (see the module doc); ``shapes``: the model's
    linears (``shapes_of``); ``workload``: "train" (training, evaluation) or "generate" (generation, chat,
    serving: one token at a time). ``measure`` / ``cpuinfo`` replace the measurement and /proc/cpuinfo (tests)."""
    setting = normalize_precision(setting)
    if workload not in WORKLOADS:
        raise ConfigError(f"unknown workload {workload!r}. Fix: use one of {', '.join(WORKLOADS)}.")
    kind = torch.device(device).type if not isinstance(device, torch.device) else device.type
    if kind == "cuda":
        return _cuda_choice(setting)
    if setting != "auto":
        return _asked(setting, kind, cpuinfo)
    if kind != "cpu":
        return PrecisionChoice("fp32", torch.float32, setting, f"float32 on {kind} (ask for bf16 with precision: bf16)")
    cpu = cpu_facts(cpuinfo)
    if not cpu.bf16_instructions:
        return PrecisionChoice("fp32", torch.float32, setting,
                               f"{cpu.model} has no bf16 instructions (amx_bf16, avx512_bf16): bf16 would be slower")
    shapes = list(shapes or _GENERIC_SHAPES)
    seconds, cached = _measured(cpu, shapes, measure or measure_products, cache_dir, workload)
    speedup = seconds["fp32"] / seconds["bf16"]
    what = "bf16 products" if workload == "train" else "bf16 one-token products"
    how = f"{what} {speedup:.2f}x the speed of float32 on {cpu.model} ({', '.join(cpu.bf16_instructions)})"
    how += ", measured earlier" if cached else ", measured now"
    if speedup >= MIN_SPEEDUP:
        return PrecisionChoice("bf16", torch.bfloat16, setting, how)
    return PrecisionChoice("fp32", torch.float32, setting, f"{how}; bf16 needs {MIN_SPEEDUP}x to be worth it")


def _cuda_choice(setting: str) -> PrecisionChoice:
    supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if setting == "fp32":
        return PrecisionChoice("fp32", torch.float32, setting, "asked for")
    if supported:
        return PrecisionChoice("bf16", torch.bfloat16, setting, "asked for" if setting == "bf16" else "the GPU supports bf16")
    if setting == "bf16":
        raise ConfigError("precision bf16 was asked for, but this GPU does not support bfloat16. "
                          "Fix: use precision fp32 (or auto).")
    return PrecisionChoice("fp32", torch.float32, setting, "the GPU does not support bf16")


def _asked(setting: str, kind: str, cpuinfo: str | None) -> PrecisionChoice:
    reason = "asked for"
    if setting == "bf16" and kind == "cpu" and not cpu_facts(cpuinfo).bf16_instructions:
        reason += "; this CPU has no bf16 instructions, so expect it to be slower than fp32 (use auto)"
    return PrecisionChoice(setting, _DTYPES[setting], setting, reason)


_announced: set[str] = set()


def announce(choice: PrecisionChoice, print_fn: Callable[[str], None] = print) -> None:
    """Print the choice once per process (a second run with the same choice says nothing)."""
    line = choice.describe()
    if line not in _announced:
        _announced.add(line)
        print_fn(line)


# -- applying it ---------------------------------------------------------------------------------

def _adapter_parameters(model: nn.Module) -> set[int]:
    """ids of the LoRA adapters' own parameters (A, B, embedding A/B, DoRA magnitudes): kept float32."""
    from .layers.base import LoraLayer

    keep: set[int] = set()
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.adapter_names:
                keep.update(id(p) for p in module.adapter_parameters(name))
    return keep


def _kept_float32(model: nn.Module) -> set[int]:
    """ids of the parameters transformers keeps float32 in a half-precision model (a class's
    ``_keep_in_fp32_modules``, e.g. T5's ``wo``: matched by module name, as transformers matches them)."""
    keep: set[int] = set()
    for module in model.modules():
        names = getattr(module, "_keep_in_fp32_modules", None) or ()
        if names and not isinstance(names, str):
            keep.update(id(p) for n, p in module.named_parameters() if any(k in n.split(".") for k in names))
    return keep


def apply_precision(model: nn.Module, choice: PrecisionChoice | str) -> nn.Module:
    """``model`` in ``choice``'s arithmetic, in place: every floating-point parameter in its dtype except
    the LoRA adapters' own (float32 in bf16: their gradients and optimizer state with them), as if the base
    had been loaded in that dtype before adding the adapters (modules transformers keeps float32 in a
    half-precision model stay float32, as ``from_pretrained`` keeps them). Buffers keep theirs (rotary frequencies stay
    float32, as transformers keeps them). Quantized (4/8-bit) weights are left as they are."""
    if isinstance(choice, str):
        choice = choose_precision(choice, next((p.device for p in model.parameters()), "cpu"), shapes_of(model))
    keep = _adapter_parameters(model) | (_kept_float32(model) if choice.dtype is not torch.float32 else set())
    for param in model.parameters():
        if not param.is_floating_point():
            continue  # quantized storage (bitsandbytes keeps 4-bit weights in uint8)
        dtype = torch.float32 if id(param) in keep else choice.dtype
        if param.dtype != dtype:
            param.data = param.data.to(dtype)
            param.grad = None  # a gradient of the old dtype would not fit (call this before the optimizer exists)
    return model
