"""Helpers shared by the subcommands: loading a model with an optional adapter, device choice."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_model_args(p: argparse.ArgumentParser, model_required: bool = False, adapter: bool = True) -> None:
    p.add_argument("--model", required=model_required,
                   help="base model: local folder, hub id, or `embedded`. With --adapter it defaults to the "
                        "adapter's base_model_name_or_path.")
    if adapter:
        p.add_argument("--adapter", help="a PEFT-format adapter folder (adapter_config.json + "
                                         "adapter_model.safetensors) to apply on top of the model.")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (default auto: float32 on CPU, bfloat16 on a GPU that supports it).")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available, else cpu).")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model's own code from the hub (only for models you trust).")


def pick_device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def adapter_base(adapter_dir: str) -> str | None:
    cfg = Path(adapter_dir) / "adapter_config.json"
    if not cfg.is_file():
        from lorakit.errors import AdapterLoadError

        raise AdapterLoadError(f"{adapter_dir}: no adapter_config.json; pass the folder written by "
                               f"`lorakit train` (<output>/adapter) or save_pretrained")
    return json.loads(cfg.read_text()).get("base_model_name_or_path")


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """(model, tokenizer) from --model / --adapter; the model is in eval mode on the chosen device."""
    from lorakit.errors import ConfigError
    from lorakit.models import load_model_and_tokenizer

    adapter = getattr(args, "adapter", None)
    name = args.model or (adapter_base(adapter) if adapter else None)
    if not name:
        raise ConfigError("no model given: pass --model NAME_OR_PATH (or --adapter DIR whose adapter_config.json "
                          "names its base model)")
    device = pick_device(args.device)
    model, tokenizer = load_model_and_tokenizer(name, dtype=args.dtype, device=device,
                                                trust_remote_code=args.trust_remote_code)
    if adapter:
        from lorakit import LoraModel

        model = LoraModel.from_pretrained(model, adapter)
    model.to(device)
    model.eval()
    return model, tokenizer


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
