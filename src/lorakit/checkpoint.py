"""Adapter folders in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Writes are atomic (a temp file renamed into place), so a crash never leaves a half-written
adapter that looks complete. Reads refuse pickles unless asked, and then load tensors only.
"""
from __future__ import annotations

import json
import os
import warnings
import tempfile
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import CONFIG_NAME, LoraConfig
from .errors import AdapterLoadError, ConfigError

if TYPE_CHECKING:
    from .model import LoraModel

__all__ = ["save_adapter", "read_adapter", "WEIGHTS_NAME", "PICKLE_WEIGHTS_NAME", "atomic_save_file"]

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """safetensors save through a temp file in the same folder, then rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_adapter(model: "LoraModel", directory: str | os.PathLike, adapter_name: str) -> None:
    """Write one adapter of ``model`` to ``directory`` in PEFT's format."""
    directory = os.fspath(directory)
    config = model.peft_config[adapter_name]
    plan = model._plans[adapter_name]
    if config.target_modules is None or isinstance(config.target_modules, str) and config.target_modules == "all-linear":
        # record the resolved module names, so readers without our defaults (vLLM, converters) see them
        config = config.replace(target_modules=sorted({t.name.rsplit(".", 1)[-1] for t in plan.targets}))
    if config.base_model_name_or_path is None:
        name = getattr(getattr(model.model, "config", None), "_name_or_path", None) or None
        if name:
            config = config.replace(base_model_name_or_path=name)
    # what peft writes, for readers that go by the config: saved heads chosen by the task type (SEQ_CLS's
    # classifier/score), fan_in_fan_out for Conv1D targets (GPT-2), inference_mode true on disk
    changes = {"inference_mode": True}
    if config.modules_to_save is None and plan.modules_to_save:
        changes["modules_to_save"] = sorted({p.rsplit(".", 1)[-1] for p in plan.modules_to_save})
    if not config.fan_in_fan_out and any(t.kind == "conv1d" for t in plan.targets):
        changes["fan_in_fan_out"] = True
    config = config.replace(**changes)
    weights = model.lora_state_dict(adapter_name)
    atomic_save_file(weights, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    config.save(directory)


def read_adapter(directory: str | os.PathLike, allow_pickle: bool = False) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read and check an adapter folder; raises AdapterLoadError naming the file and the problem."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise AdapterLoadError(f"adapter folder {directory} does not exist (it should hold {CONFIG_NAME} "
                               f"and {WEIGHTS_NAME}).")
    try:
        config = LoraConfig.from_pretrained(directory)
    except ConfigError as e:
        raise AdapterLoadError(f"cannot read the adapter config in {directory}: {e}") from None
    st_path = os.path.join(directory, WEIGHTS_NAME)
    bin_path = os.path.join(directory, PICKLE_WEIGHTS_NAME)
    if os.path.isfile(st_path):
        try:
            weights = load_file(st_path)
        except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
            raise AdapterLoadError(
                f"{st_path} is corrupt or truncated ({e}); save the adapter again or re-download it."
            ) from None
    elif os.path.isfile(bin_path):
        if not allow_pickle:
            raise AdapterLoadError(
                f"{directory} holds only {PICKLE_WEIGHTS_NAME}, a pickle, which can run code when loaded. "
                f"If you trust its source, pass allow_pickle=True (tensors only, weights_only=True), "
                f"or convert it to {WEIGHTS_NAME}."
            )
        try:
            weights = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
            raise AdapterLoadError(f"{bin_path} could not be read as a tensor file ({e}).") from None
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise AdapterLoadError(f"{bin_path} does not hold a dict of tensors.")
    else:
        raise AdapterLoadError(f"no adapter weights in {directory}: expected {WEIGHTS_NAME}.")
    return config, weights


def _model_key(name_or_path: str) -> str:
    """A model's name for comparison: the embedded model's aliases and cache folder are one name."""
    from .models.embedded import embedded_cache_path, is_embedded_alias

    name = name_or_path.rstrip("/")
    if is_embedded_alias(name) or os.path.abspath(os.path.expanduser(name)) == os.path.abspath(embedded_cache_path()):
        return "embedded"
    return os.path.basename(name)


def warn_if_other_base(config: LoraConfig, model, directory: str) -> None:
    """Shapes catch most mismatches; a differing recorded base-model name catches the rest (a warning:
    a local path and a hub name can mean the same model)."""
    made_for = config.base_model_name_or_path
    this = getattr(getattr(model, "config", None), "_name_or_path", None)
    if made_for and this and _model_key(made_for) != _model_key(str(this)):
        warnings.warn(
            f"adapter in {directory} was made for {made_for!r} but is loaded on {this!r}; its shapes fit, "
            f"but its weights were trained on another model.", stacklevel=3)
