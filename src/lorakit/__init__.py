"""lorakit: LoRA fine-tuning for transformer language models.

Public API (imported lazily, so ``import lorakit`` is cheap)::

    from lorakit import LoraConfig, TaskType, get_peft_model, LoraModel
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "LoraConfig": "config",
    "TaskType": "config",
    "LoraModel": "model",
    "PeftModel": "model",
    "get_peft_model": "model",
    "get_peft_model_state_dict": "hf.peft_api",
    "set_peft_model_state_dict": "hf.peft_api",
    "dry_run": "dryrun",
    "create_loraplus_optimizer": "optim",
    "DryRunReport": "dryrun",
    "default_target_modules": "targets",
    "DEFAULT_TARGET_MODULES": "targets",
    "LoraError": "errors",
    "ConfigError": "errors",
    "TargetError": "errors",
    "AdapterLoadError": "errors",
    "DataError": "errors",
    "ModelLoadError": "errors",
    "TrainingError": "errors",
    "bnb_4bit_config": "hf.quant",
    "replace_lora_weights_loftq": "loftq",
    "prepare_for_kbit_training": "hf.quant",
    "prepare_model_for_kbit_training": "hf.quant",
    "PrecisionChoice": "precision",
    "choose_precision": "precision",
    "apply_precision": "precision",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .config import LoraConfig, TaskType
    from .dryrun import DryRunReport, dry_run
    from .optim import create_loraplus_optimizer
    from .errors import (AdapterLoadError, ConfigError, DataError, LoraError, ModelLoadError, TargetError,
                         TrainingError)
    from .hf.peft_api import get_peft_model_state_dict, set_peft_model_state_dict
    from .model import LoraModel, PeftModel, get_peft_model
    from .hf.quant import bnb_4bit_config, prepare_for_kbit_training, prepare_model_for_kbit_training
    from .loftq import replace_lora_weights_loftq
    from .targets import DEFAULT_TARGET_MODULES, default_target_modules


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
