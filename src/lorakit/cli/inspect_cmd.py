"""lorakit inspect [ADAPTER_DIR] [--model M] | --model M [--targets ...] [--r 8]"""

from __future__ import annotations

import argparse

from lorakit.config import LORA_DEFAULTS  # the dry run's r and alpha: LoraConfig's defaults

HELP = "dry run on a model (what LoRA would wrap) or describe / check a saved adapter"
DESCRIPTION = """Three uses:

  lorakit inspect --model M [--targets q_proj v_proj] [--r R] [--alpha A]
      dry run: the modules LoRA would wrap, the family's default targets, trainable parameters and a
      memory estimate. The model is loaded but not changed.
  lorakit inspect ADAPTER_DIR
      what a saved adapter holds: its config and its tensors, checked against each other (the weights
      file is readable, every LoRA tensor has the config's rank r).
  lorakit inspect ADAPTER_DIR --model M
      the same, then the adapter is loaded onto M to check that it fits (names and shapes).
  lorakit inspect ADAPTER_DIR --check llama.cpp|vllm|ollama
      what that runtime would refuse (modules_to_save, DoRA, a rank above vLLM's default 16, ...) or compute
      differently from lorakit (rsLoRA / alpha_pattern / rank_pattern scales), and the fix for each."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter_dir", nargs="?", help="a saved adapter folder to describe.")
    p.add_argument("--model", help="model to dry-run on (or, with ADAPTER_DIR, to check the adapter against): "
                                   "local folder, hub id, or `embedded`.")
    p.add_argument("--targets", nargs="+", help="dry run: target module names, a regex, or all-linear "
                                                "(default: the family's default).")
    p.add_argument("--r", type=int, default=None, help=f"dry run: LoRA rank (default {LORA_DEFAULTS['r']}).")
    p.add_argument("--alpha", type=float, default=None,
                   help=f"dry run: LoRA alpha (default {LORA_DEFAULTS['lora_alpha']:g}).")
    p.add_argument("--check", choices=("llama.cpp", "vllm", "ollama"),
                   help="with ADAPTER_DIR: what that runtime would refuse or compute differently from lorakit "
                        "(exit status 1 when it refuses the adapter); --model names the base if not the adapter's.")
    p.add_argument("--precision", default=None, metavar="auto|fp32|bf16",
                   help="dry run: the training precision whose memory to estimate (default auto: what `lorakit "
                        "train` would choose here); the base is loaded in it.")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code from the hub.")


def _lora_rank_errors(config, weights: dict) -> list[str]:
    """Tensors whose LoRA rank differs from the config's r (or its rank_pattern entry for that module)."""
    from lorakit.targets import pattern_value

    bad = []
    params = {p.rpartition(".")[0] for p in (config.target_parameters or ())}
    for name, t in weights.items():
        parts = name.split(".")
        kind = next((p for p in parts if p in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")), None)
        if kind is None or t.dim() < 2:
            continue
        module = ".".join(parts[:parts.index(kind)]).removeprefix("base_model.model.")
        plain = module.replace(".base_layer", "")
        if any(plain == p or plain.endswith("." + p) for p in params):
            continue  # a raw parameter's pair has r rows per expert (layers/param.py); loading checks its shapes
        want = pattern_value(config.rank_pattern or {}, module, config.r)
        # lora_A / lora_embedding_A: (r, in...); lora_B / lora_embedding_B: (out, r, ...)
        got = t.shape[0] if kind.endswith("A") else t.shape[1]
        if got != want:
            bad.append(f"{name} {tuple(t.shape)} has rank {got}" + (f" (rank_pattern: {want})" if want != config.r
                                                                      else ""))
    return bad


def _describe_adapter(path: str):
    """Print the adapter's config and tensors; AdapterLoadError when it is incomplete or inconsistent."""
    from lorakit.peft_format import read_adapter
    from lorakit.cli.common import read_adapter_config
    from lorakit.errors import AdapterLoadError

    read_adapter_config(path)  # clear error when it is not an adapter folder
    config, weights = read_adapter(path)  # the same checks (and messages) as generate / merge
    for k in ("base_model_name_or_path", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias"):
        v = getattr(config, k, None)
        v = getattr(v, "value", v)
        print(f"{k}: {sorted(v) if isinstance(v, (set, frozenset)) else list(v) if isinstance(v, tuple) else v}")
    if config.rank_pattern:
        print(f"rank_pattern: {dict(config.rank_pattern)}")
    for k, off in (("init_lora_weights", True), ("target_parameters", None), ("trainable_token_indices", None),
                   ("ensure_weight_tying", False)):
        v = getattr(config, k, off)
        if v != off:
            print(f"{k}: {list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, dict) else v}")
    names = list(weights)
    total = sum(t.numel() for t in weights.values())
    print(f"tensors: {len(names)}, parameters: {total:,d}")
    for name in names[:6]:
        print(f"  {name}  {tuple(weights[name].shape)}")
    if len(names) > 6:
        print(f"  ... {len(names) - 6} more")
    if not any(("lora_" in n) for n in names):
        raise AdapterLoadError(f"{path}/adapter_model.safetensors holds no LoRA tensor (lora_A / lora_B); "
                               f"it is not a LoRA adapter; save it again")
    bad = _lora_rank_errors(config, weights)
    if bad:
        more = f" ... ({len(bad)} in all)" if len(bad) > 3 else ""
        raise AdapterLoadError(f"{path}: adapter_config.json says r={config.r} but the tensors have another "
                               f"rank: {'; '.join(bad[:3])}{more}. The config and the weights come from "
                               f"different adapters; save the adapter again")
    return config


def run(args: argparse.Namespace) -> int:
    from lorakit.errors import ConfigError

    if args.adapter_dir:
        dry = [f for f, v in (("--targets", args.targets), ("--r", args.r), ("--alpha", args.alpha)) if v is not None]
        if dry:
            raise ConfigError(f"{', '.join(dry)}: only for the dry run (`inspect --model M`); an adapter's "
                              f"targets, r and alpha come from its adapter_config.json. Drop "
                              f"{', '.join(dry)}, or drop ADAPTER_DIR for a dry run")
        _describe_adapter(args.adapter_dir)
        if args.check:
            return _runtime_check(args)
        if not args.model:
            return 0
        return _check_against_model(args)
    if args.check:
        raise ConfigError(f"--check {args.check} checks a saved adapter: pass its folder, lorakit inspect ADAPTER_DIR "
                          f"--check {args.check}")
    if not args.model:
        raise ConfigError("inspect needs --model M (dry run) or an ADAPTER_DIR to describe")
    r = LORA_DEFAULTS["r"] if args.r is None else args.r
    alpha = LORA_DEFAULTS["lora_alpha"] if args.alpha is None else args.alpha
    if r < 1:
        raise ConfigError(f"--r must be >= 1, got {r}")
    from lorakit import LoraConfig, TaskType, dry_run
    from lorakit.cli.common import load_dtype, load_model_checked
    from lorakit.models.precision import check_precision_option

    args.precision = check_precision_option(args.precision or "auto")
    args.dtype = None
    model, _ = load_model_checked(args.model, dtype=load_dtype(args, args.model, "cpu"),
                                  trust_remote_code=args.trust_remote_code)
    targets = args.targets
    if targets and len(targets) == 1 and (targets[0] == "all-linear" or any(c in targets[0] for c in "*^$|")):
        targets = targets[0]
    cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=alpha, target_modules=targets)
    print(dry_run(model, cfg).table())
    return 0


def _check_against_model(args: argparse.Namespace) -> int:
    """Load the adapter onto --model: AdapterLoadError (names, shapes) when it does not fit."""
    from lorakit import LoraModel
    from lorakit.cli.common import load_model_checked

    model, _ = load_model_checked(args.model, trust_remote_code=args.trust_remote_code)
    lora = LoraModel.from_pretrained(model, args.adapter_dir)
    n_layers = sum(1 for _ in lora.lora_layers())
    print(f"check: the adapter loads on {args.model} ({n_layers} LoRA layers; every tensor's name and shape fit)")
    return 0


def _runtime_check(args: argparse.Namespace) -> int:
    """Print what --check's runtime would refuse or compute differently (lorakit.export.checks)."""
    from lorakit.export.checks import check_adapter

    findings = check_adapter(args.adapter_dir, args.check, args.model, args.trust_remote_code)
    print(f"check {args.check}:")
    for finding in findings or []:
        print(finding.line())
    if not any(f.level != "ok" for f in findings):
        print(f"  nothing {args.check} refuses or computes differently")
    return 1 if any(f.level == "refuses" for f in findings) else 0
