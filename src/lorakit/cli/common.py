"""Helpers shared by the subcommands: loading a model with an optional adapter, device choice, and the
checks of user input that run before any slow model load (devices, model folders, output folders)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Iterable


def add_model_args(p: argparse.ArgumentParser, model_required: bool = False, adapter: bool = True,
                   precision: bool = True) -> None:
    """--model, --adapter, --dtype, --device, --trust-remote-code and (``precision``) --precision."""
    p.add_argument("--model", required=model_required,
                   help="base model: local folder, hub id, or `embedded`. With --adapter it defaults to the "
                        "adapter's base_model_name_or_path.")
    if adapter:
        p.add_argument("--adapter", help="a PEFT-format adapter folder (adapter_config.json + "
                                         "adapter_model.safetensors) to apply on top of the model.")
    if not precision:
        p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="weights dtype (default auto: float32 on CPU, bfloat16 on a GPU that supports it).")
    else:
        p.add_argument("--precision", default=None, metavar="auto|fp32|bf16",
                       help="arithmetic, as train.precision: bf16 = weights and activations in bfloat16 (adapters "
                            "float32), fp32 = float32; auto (default) = the choice training makes (on a CPU measured "
                            "once per machine, on a GPU bf16 where supported).")
        p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                       help="weights dtype, overriding --precision (default: follow --precision).")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available, else cpu).")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model's own code from the hub (only for models you trust).")


_DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device(device: str) -> str:
    """``device`` if this machine can run on it; otherwise a ConfigError saying what to pass instead."""
    import torch

    from lorakit.errors import ConfigError

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N "
                          "(or leave --device out: cuda when available, else cpu)") from None
    if dev.type not in _DEVICE_TYPES:
        raise ConfigError(f"--device {device!r}: lorakit runs on cpu, cuda[:N] or mps; use one of those "
                          "(or leave --device out)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)")
            raise ConfigError(f"--device {device}: {why}; use --device cpu (or leave --device out)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s), numbered 0 to "
                              f"{count - 1}; pick one of those")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"--device {device}: MPS (Apple GPU) is not available here; use --device cpu")
    return device


def pick_device(device: str | None) -> str:
    if device:
        return check_device(device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def read_adapter_config(adapter_dir: str | os.PathLike) -> Any:
    """The LoraConfig of an adapter folder; AdapterLoadError (naming the file) when it is missing or bad."""
    from lorakit.config import CONFIG_NAME, LoraConfig
    from lorakit.errors import AdapterLoadError, ConfigError

    path = Path(adapter_dir)
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise AdapterLoadError(f"adapter folder {adapter_dir} {what}; pass the folder written by `lorakit train` "
                               f"(<output>/adapter) or save_pretrained, holding {CONFIG_NAME} and "
                               f"adapter_model.safetensors")
    if not (path / CONFIG_NAME).is_file():
        raise AdapterLoadError(f"{adapter_dir}: no {CONFIG_NAME}; pass the folder written by `lorakit train` "
                               f"(<output>/adapter) or save_pretrained")
    try:
        return LoraConfig.from_pretrained(path)
    except ConfigError as e:
        raise AdapterLoadError(f"cannot read the adapter config in {adapter_dir}: {e}") from None


def adapter_base(adapter_dir: str) -> str | None:
    return read_adapter_config(adapter_dir).base_model_name_or_path


def check_model_source(name: str, option: str = "--model") -> None:
    """A model named by a path that exists must be a transformers model folder (config.json); say what
    it is instead (a file, an empty folder, an adapter folder). Hub ids and `embedded` pass through."""
    from lorakit.errors import ModelLoadError
    from lorakit.models.embedded import is_embedded_alias

    if not name or is_embedded_alias(name):
        return
    path = Path(name).expanduser()
    if not path.exists():
        return  # a hub id, or a missing path (the loader says so)
    if not path.is_dir():
        raise ModelLoadError(f"{option} {name} is a file, not a model folder; pass the folder that holds the "
                             f"model's config.json and weights (or a hub id, or `embedded`)")
    if (path / "config.json").is_file():
        return
    if (path / "adapter_config.json").is_file():
        raise ModelLoadError(f"{option} {name} is a LoRA adapter folder, not a base model; pass it as "
                             f"--adapter {name} (its adapter_config.json names the base model), with --model "
                             f"BASE for another base")
    content = sorted(p.name for p in path.iterdir())[:8]
    raise ModelLoadError(f"{option} {name} is not a model folder: it has no config.json "
                         f"({'it is empty' if not content else 'it holds ' + ', '.join(content)}); pass the "
                         f"folder written by save_pretrained, a hub id, or `embedded`")


def load_model_checked(name: str, **kw: Any) -> tuple[Any, Any]:
    """``load_model_and_tokenizer`` with the folder checked first, and a loader failure on a local folder
    (a broken config.json or tokenizer) reported as a ModelLoadError naming the folder."""
    from lorakit.errors import LoraError, ModelLoadError
    from lorakit.models import load_model_and_tokenizer

    check_model_source(name)
    try:
        return load_model_and_tokenizer(name, **kw)
    except LoraError:
        raise
    except (OSError, ValueError) as e:
        if not Path(name).expanduser().exists():
            raise
        raise ModelLoadError(f"cannot load a model from {name}: {type(e).__name__}: {str(e).strip()[:400]}; "
                             f"check that the folder holds a complete model (config.json, weights, "
                             f"tokenizer files)") from None


def load_model(args: argparse.Namespace, workload: str = "train") -> tuple[Any, Any]:
    """(model, tokenizer) from --model / --adapter; the model is in eval mode on the chosen device. An adapter
    folder's chat template (``chat_template.jinja``, written by training) replaces the base model's.
    ``workload``: "generate" for commands that decode a token at a time (precision auto measures that)."""
    name = check_model_inputs(args)
    adapter = getattr(args, "adapter", None)
    device = pick_device(args.device)
    model, tokenizer = load_model_checked(name, dtype=load_dtype(args, name, device, workload), device=device,
                                          trust_remote_code=args.trust_remote_code)
    if adapter:
        from lorakit import LoraModel
        from lorakit.data.chat_template import load_chat_template

        model = LoraModel.from_pretrained(model, adapter)
        template = load_chat_template(adapter)  # the template the adapter was trained with, before the base's
        if template is not None:
            tokenizer.chat_template = template
    model.to(device)
    model.eval()
    return model, tokenizer


def load_dtype(args: argparse.Namespace, name: str, device: str, workload: str = "train") -> Any:
    """The dtype to load ``name`` in: --dtype when given, else --precision's choice for ``workload`` (announced
    on stderr, once). Commands without --precision (merge) load in --dtype."""
    if not hasattr(args, "precision"):
        return args.dtype
    import sys

    from lorakit.models.precision import check_precision_option, precision_for
    from lorakit.precision import announce

    choice = precision_for(name, check_precision_option(args.precision or "auto"), device, dtype=args.dtype,
                           trust_remote_code=args.trust_remote_code, dtype_source="--dtype", workload=workload)
    announce(choice, lambda line: print(line, file=sys.stderr))
    return choice.dtype


def check_model_inputs(args: argparse.Namespace) -> str:
    """Everything `load_model` needs, checked without loading anything: the device, --precision, the adapter
    folder (config readable, weights present), and the model name. Returns the model name."""
    from lorakit.errors import AdapterLoadError, ConfigError

    if getattr(args, "device", None):
        check_device(args.device)
    if getattr(args, "precision", None) is not None:
        from lorakit.models.precision import check_precision_option

        args.precision = check_precision_option(args.precision)
    adapter = getattr(args, "adapter", None)
    if adapter:
        cfg = read_adapter_config(adapter)
        if not any((Path(adapter) / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
            raise AdapterLoadError(f"no adapter weights in {adapter}: expected adapter_model.safetensors.")
    name = args.model or (cfg.base_model_name_or_path if adapter else None)
    if not name:
        if adapter:
            raise ConfigError(f"no model given and {adapter}/adapter_config.json names no base model "
                              f"(base_model_name_or_path); pass --model NAME_OR_PATH")
        raise ConfigError("no model given: pass --model NAME_OR_PATH (or --adapter DIR whose adapter_config.json "
                          "names its base model)")
    check_model_source(name)
    return name


def check_output_dir(path: str | os.PathLike, option: str) -> Path:
    """Fail early, with the reason, when ``path`` cannot become a folder we write into: a part of it is a
    file, or its nearest existing folder is not writable. Creates nothing (a probe folder is removed)."""
    import tempfile

    from lorakit.errors import ConfigError

    if not str(path).strip():
        raise ConfigError(f"{option} is empty; give the path of the folder to write to")
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{option} {path} is a file, not a folder; choose a folder path")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe != out and not probe.is_dir():
        raise ConfigError(f"{option} {path}: {probe} is a file, so no folder can be made under it; "
                          f"choose another path")
    try:
        tmp = tempfile.mkdtemp(prefix=".lorakit-write-test-", dir=probe)
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot write in {probe} ({e.strerror or e}); choose a folder you "
                          f"can write to") from None
    os.rmdir(tmp)
    return out


def load_recipe_checked(recipe: str, overrides: Iterable[str], source: str = "--set") -> Any:
    """``load_recipe``, with an error caused by the command line (a --set, or an option that sets a recipe
    key) reported against ``source`` instead of the recipe file."""
    from lorakit.errors import ConfigError
    from lorakit.train.config import apply_overrides
    from lorakit.train.recipe import load_recipe

    overrides = list(overrides)
    try:
        apply_overrides({}, overrides)  # KEY=VALUE form, known key, value of the key's type
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    try:
        return load_recipe(recipe, overrides)
    except ConfigError as e:
        if overrides:
            try:
                load_recipe(recipe, [])
            except ConfigError:
                raise e from None  # the recipe itself is wrong (or both are)
            from lorakit.recipes import resolve_recipe

            msg = str(e).removeprefix(f"{resolve_recipe(recipe)}: ")
            raise ConfigError(f"{source}: {msg}") from None
        raise


def generate_text(model: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int, temperature: float,
                  top_p: float, stream: bool = False) -> str:
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    kw: dict = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id)
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kw.update(do_sample=False)
    if stream:
        from transformers import TextStreamer

        kw["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    seq = out.sequences if hasattr(out, "sequences") else out
    return tokenizer.decode(seq[0, ids.shape[1]:], skip_special_tokens=True)


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"most tokens to generate (default {max_new_tokens}).")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 (default) = greedy decoding.")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling cut-off when temperature > 0.")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling.")


def check_sampling_args(args: argparse.Namespace) -> None:
    """--max-new-tokens, --temperature, --top-p and --seed, checked before any model load (ConfigError)."""
    import math

    from lorakit.errors import ConfigError

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}; e.g. --max-new-tokens 64")
    t = args.temperature
    if not math.isfinite(t) or t < 0:
        raise ConfigError(f"--temperature must be a finite number >= 0 (0 = greedy decoding, e.g. 0.7 to sample), "
                          f"got {t}")
    p = args.top_p
    if not math.isfinite(p) or not 0 < p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1] (the share of probability mass kept when sampling, e.g. 0.9), "
                          f"got {p}")
    if not -2**63 <= args.seed < 2**64:
        raise ConfigError(f"--seed must fit in 64 bits (e.g. --seed 0), got {args.seed}")


def tolerant_stdin() -> None:
    """Text typed or piped in that is not valid UTF-8 becomes U+FFFD characters, not a decoding error."""
    import sys

    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if callable(reconfigure):
        reconfigure(errors="replace")
