"""A run's precision (train.precision, model.dtype): chosen once, before the base is loaded, on the device the
run will use; kept by a resume; recorded in the run's checkpoints; and the saved adapters kept float32.

- ``resolve_precision(cfg)``: what ``train()`` loads the base in (see ``models.precision.precision_for``).
  ``train.mixed_precision`` (autocast) under precision auto keeps the weights float32 (autocast is over
  float32 weights). A resume under precision auto continues in the checkpoint's precision; an explicit
  setting that differs from the checkpoint's is refused (the run would change arithmetic halfway).
- ``for_model(model, cfg, given)``: the precision ``train_loop`` trains a model in. A model from ``train()``
  comes with its choice; a caller's own model is put in an explicit train.precision (fp32 / bf16), and kept
  as it is under auto.
- ``float32_saved(model)``: trainable weights outside the LoRA adapters (trained biases, modules_to_save)
  compute in the base's dtype; while an adapter is saved they are float32, so saved adapters are float32.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from lorakit.errors import TrainingError
from lorakit.models.precision import model_precision, precision_for
from lorakit.precision import PRECISION_DTYPES, PrecisionChoice, apply_precision, choose_precision, shapes_of
from lorakit.train.config import TrainConfig

def run_device(cfg: TrainConfig) -> str:
    """The device type a run of ``cfg`` trains on (as its Accelerator picks it)."""
    return "cpu" if cfg.train.cpu or not torch.cuda.is_available() else "cuda"


def checkpoint_precision(ckpt: str | Path) -> Optional[str]:
    """The precision a checkpoint was written in (its trainer_state.json); None for one written before runs
    recorded it (those were float32 unless model.dtype said otherwise)."""
    try:
        state = json.loads((Path(ckpt) / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = state.get("precision") if isinstance(state, dict) else None
    return value if isinstance(value, str) else None


def resolve_precision(cfg: TrainConfig, *, checkpoint: Optional[str] = None, measure: Any = None) -> PrecisionChoice:
    """The precision ``train()`` loads the base in; ``checkpoint``: the precision of the checkpoint the run
    resumes. ``measure``: replaces auto's measurement (tests)."""
    tc, dtype = cfg.train, cfg.model.dtype
    if tc.precision == "auto" and dtype == "auto" and checkpoint in PRECISION_DTYPES:
        return PrecisionChoice(checkpoint, PRECISION_DTYPES[checkpoint], "auto",
                               "the precision of the checkpoint this run resumes (chosen when the run started)")
    if tc.precision == "auto" and dtype == "auto" and tc.mixed_precision != "no":
        choice = PrecisionChoice("fp32", torch.float32, "auto",
                                 f"train.mixed_precision {tc.mixed_precision} autocasts over float32 weights")
    else:
        choice = precision_for(cfg.model.name, tc.precision, run_device(cfg), dtype=None if dtype == "auto" else dtype,
                               trust_remote_code=cfg.model.trust_remote_code, measure=measure)
    if checkpoint is not None and checkpoint != choice.name:
        refuse_other_precision(checkpoint, choice)
    return choice


def refuse_other_precision(checkpoint: str, choice: PrecisionChoice, where: str = "the checkpoint") -> None:
    raise TrainingError(
        f"{where} was written by a run in precision {checkpoint}, but this run is set to {choice.name} "
        f"({choice.setting}: {choice.reason}); a resumed run continues in its checkpoint's arithmetic. Fix: resume "
        f"with the settings that wrote it (--set train.precision=auto follows the checkpoint; drop a model.dtype "
        f"that differs), or start a new run with --overwrite.")


def for_model(model: torch.nn.Module, cfg: TrainConfig, given: Optional[PrecisionChoice], device: Any) -> PrecisionChoice:
    """The precision ``model`` trains in (see the module doc); applied to it where train.precision asks."""
    if given is not None:
        return given
    current = model_precision(model)
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if cfg.train.precision != "auto" and not quantized:
        choice = choose_precision(cfg.train.precision, device, shapes_of(model))
        if current != choice.name:
            apply_precision(model, choice)
        return choice
    return PrecisionChoice(current, PRECISION_DTYPES.get(current, torch.float32), cfg.train.precision,
                           "the model's own dtype (a model given to train_loop is trained as it is under auto)")


def same_on_every_process(accelerator: Any, choice: PrecisionChoice) -> None:
    """A data-parallel run trains in one precision: auto chooses per process (each measures), so processes that
    chose differently are refused, with the fix, before the first step."""
    if accelerator.num_processes <= 1:
        return
    from accelerate.utils import gather_object

    names = gather_object([choice.name])
    if len(set(names)) > 1:
        raise TrainingError(f"the processes of this data-parallel run chose different precisions ({', '.join(names)}) "
                            f"under train.precision {choice.setting}; set one for all of them: --precision fp32 or "
                            f"--precision bf16 (--set train.precision=...)")


@contextlib.contextmanager
def float32_saved(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, the model's trainable half-precision weights are float32 (exactly: a bf16 / fp16
    value widens without rounding), then back; wraps ``save_pretrained`` so saved adapters are float32."""
    widened = []
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            widened.append((p, p.dtype))
            p.data = p.data.float()
    try:
        yield
    finally:
        for p, dtype in widened:
            p.data = p.data.to(dtype)
