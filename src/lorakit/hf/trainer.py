"""Using a LoraModel under HF's ``transformers.Trainer`` (and trainers built on it, such as TRL's).

The Trainer trains a LoraModel as it is: it reads the wrapped model's forward signature to keep the
dataset's columns, takes ``labels`` as the label column, and trains only the parameters that require
grad. What it cannot know is that the adapter is the thing to save: for a model that is not a
``PreTrainedModel`` it saves the whole ``state_dict`` with safetensors, which fails outright for models
with tied embeddings (GPT-2, SmolLM2, Llama-3.2...). Use ``LoraTrainer`` (or mix ``LoraTrainerMixin``
into another Trainer subclass, e.g. TRL's ``SFTTrainer``): checkpoints and ``save_model`` then write
the adapter in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``), and
``train(resume_from_checkpoint=...)`` loads it back::

    from lorakit.hf.trainer import LoraTrainer
    trainer = LoraTrainer(model=lora_model, args=args, train_dataset=ds)
    trainer.train(); trainer.save_model("out/adapter")

    class MySFTTrainer(LoraTrainerMixin, SFTTrainer): ...

``SaveAdapterCallback`` adds the adapter to the checkpoints of an unmodified Trainer (models without
tied embeddings).
"""
from __future__ import annotations

import os
from typing import Any

__all__ = ["LoraTrainer", "LoraTrainerMixin", "SaveAdapterCallback"]


def _callback_base() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover - transformers is a dependency
        return object
    return TrainerCallback


def _lora_model(model: Any):
    """The LoraModel inside Trainer / DDP / accelerate wrappers, or None."""
    from ..model import LoraModel

    inner = model
    while not isinstance(inner, LoraModel) and hasattr(inner, "module"):
        inner = inner.module
    return inner if isinstance(inner, LoraModel) else None


class LoraTrainerMixin:
    """Trainer methods that save and load the LoRA adapter instead of the whole model's state dict."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = _lora_model(self.model)
        if model is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir)
        from ..io import atomic_save_pretrained, atomic_torch_save

        tokenizer = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)
        if tokenizer is not None:
            atomic_save_pretrained(tokenizer.save_pretrained, output_dir)
        atomic_torch_save(self.args, os.path.join(output_dir, "training_args.bin"))  # as HF's Trainer writes it

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        lora = _lora_model(model if model is not None else self.model)
        if lora is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from ..peft_format import read_adapter

        _, weights = read_adapter(resume_from_checkpoint)
        lora.load_lora_state_dict(weights)  # checked key by key and shape by shape against the model


def _trainer_base() -> type:
    from transformers import Trainer

    return Trainer


class LoraTrainer(LoraTrainerMixin, _trainer_base()):
    """``transformers.Trainer`` whose checkpoints and ``save_model`` hold the LoRA adapter (PEFT format)."""


class SaveAdapterCallback(_callback_base()):
    """Write the LoRA adapter into each Trainer checkpoint folder (``<output_dir>/checkpoint-<step>``)."""

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None or not getattr(state, "is_world_process_zero", True):
            return
        inner = _lora_model(model)
        if inner is None:
            raise TypeError(f"SaveAdapterCallback needs a lorakit LoraModel under the Trainer; got {type(model).__name__}.")
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        inner.save_pretrained(folder)
