"""Resumable checkpoints, written atomically, read without unpickling anything.

A checkpoint is a folder ``<output>/checkpoints/step-000123/``:

    trainable.safetensors   every parameter with requires_grad (exact resume, any model)
    adapter/                the adapter in PEFT format (LoraModel.save_pretrained), for use on its own
    optimizer.pt            optimizer.state_dict(): tensors and plain numbers only (loaded weights_only=True)
    scheduler.json          scheduler.state_dict()
    rng.json, rng.safetensors   python / numpy / torch (and CUDA) RNG states
    trainer_state.json      step, epoch, position in the epoch, the epoch's shuffled batch order, config

It is written into a temporary folder next to its final place and renamed, so a crash never leaves a
half-written checkpoint under a ``step-*`` name.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit.errors import TrainingError

STEP_PREFIX = "step-"
STATE_FILE = "trainer_state.json"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------- RNG


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(internal), gauss],
            "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    return meta, tensors


def set_rng_state(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------- save / load


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """The folder of the checkpoint for ``step``."""
    return checkpoint_root(output_dir) / f"{STEP_PREFIX}{step:06d}"


def save_checkpoint(output_dir: str | Path, step: int, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                    trainer_state: dict, keep_last: int = 0) -> Path:
    """Write the checkpoint for ``step`` atomically; returns its folder."""
    from safetensors.torch import save_file

    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(output_dir, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    if hasattr(model, "lora_state_dict") and hasattr(model, "save_pretrained"):
        model.save_pretrained(tmp / "adapter")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    meta, tensors = rng_state()
    (tmp / "rng.json").write_text(json.dumps(meta))
    save_file(tensors, str(tmp / "rng.safetensors"))
    # The state file goes last: its presence marks a complete checkpoint even on filesystems without rename.
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state))
    if final.exists():
        old = root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    if keep_last > 0:
        for stale in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def resolve_resume(resume: str | Path, output_dir: str | Path) -> Path:
    """``latest`` -> the newest checkpoint under output_dir; a path -> that checkpoint (or the newest inside it)."""
    if str(resume) == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise TrainingError(f"--resume latest: no checkpoint under {checkpoint_root(output_dir)}; "
                                f"train without --resume, or pass a checkpoint folder")
        return found[-1]
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    inner = list_checkpoints(path) or list_checkpoints(path.parent if path.name == "checkpoints" else path)
    if inner:
        return inner[-1]
    raise TrainingError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE}) and no checkpoints inside; "
                        f"pass e.g. {checkpoint_root(output_dir)}/{STEP_PREFIX}000100 or `latest`")


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> dict:
    """Restore model (trainable params), optimizer, scheduler and RNG; return the trainer state."""
    from safetensors.torch import load_file

    path = Path(path)
    saved = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(saved) != expected:
        missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
        raise TrainingError(f"checkpoint {path} does not match this model's trainable parameters "
                            f"(missing {missing[:3]}, unexpected {extra[:3]}); resume with the same recipe "
                            f"(model, lora.*) that wrote it")
    with torch.no_grad():
        for name, value in saved.items():
            if params[name].shape != value.shape:
                raise TrainingError(f"checkpoint {path}: {name} has shape {tuple(value.shape)}, the model "
                                    f"{tuple(params[name].shape)}; resume with the recipe that wrote it")
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    set_rng_state(json.loads((path / "rng.json").read_text()), load_file(str(path / "rng.safetensors")))
    return json.loads((path / STATE_FILE).read_text())
