"""Using a LoraModel under HF's ``transformers.Trainer`` (and trainers built on it, such as TRL's).

The Trainer works with a LoraModel as it is: it reads the wrapped model's forward signature to keep
the dataset's columns, takes ``labels`` as the label column, and trains only the parameters that
require grad. What it cannot know is that the adapter is the thing to save: for a model that is not
a ``PreTrainedModel`` its checkpoints hold the whole ``state_dict``. Add the callback below and every
checkpoint folder also gets the adapter in PEFT's format (``adapter_config.json`` +
``adapter_model.safetensors``), loadable by lorakit, peft and vLLM::

    trainer = Trainer(model=lora_model, args=args, train_dataset=ds,
                      callbacks=[lorakit.integrations.SaveAdapterCallback()])
    trainer.train()
    lora_model.save_pretrained("out/adapter")     # the final adapter (not trainer.save_model)
"""
from __future__ import annotations

import os
from typing import Any

__all__ = ["SaveAdapterCallback"]


def _callback_base() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover - transformers is a dependency
        return object
    return TrainerCallback


class SaveAdapterCallback(_callback_base()):
    """Write the LoRA adapter into each Trainer checkpoint folder (``<output_dir>/checkpoint-<step>``)."""

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None or not getattr(state, "is_world_process_zero", True):
            return
        from .model import LoraModel

        inner = model
        while not isinstance(inner, LoraModel) and hasattr(inner, "module"):  # DDP / accelerate wrappers
            inner = inner.module
        if not isinstance(inner, LoraModel):
            raise TypeError(f"SaveAdapterCallback needs a lorakit LoraModel under the Trainer; got {type(model).__name__}.")
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        inner.save_pretrained(folder)
