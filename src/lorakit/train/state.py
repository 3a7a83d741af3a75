"""Resumable checkpoints, written atomically, read without unpickling anything.

A checkpoint is a folder ``<output>/checkpoints/step-000123/``:

    trainable.safetensors   every parameter with requires_grad (exact resume, any model)
    adapter/                the adapter in PEFT format (LoraModel.save_pretrained), for use on its own
    optimizer.pt            optimizer.state_dict(): tensors and plain numbers only (loaded weights_only=True)
    scheduler.json          scheduler.state_dict()
    rng.json, rng.safetensors   python / numpy / torch (and CUDA) RNG states
    trainer_state.json      step, epoch, position in the epoch, the epoch's shuffled batch order, config

Writing: everything goes into a fresh private temp folder next to its final place (``.tmp-step-...``),
each file synced, and the folder is renamed to ``step-NNNNNN`` last; a kill, a full disk or a read-only
folder never leaves a half-written checkpoint under a ``step-*`` name, and the earlier checkpoints stay as
they were. Leftover temp folders of a killed run are removed when the next run starts.

Reading: every file is read and checked before anything is restored (all or nothing). ``latest`` resumes
from the newest checkpoint whose files are all intact, saying which file of a newer one is damaged; a
checkpoint named on the command line is used as named or refused with the damaged file's name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from lorakit.errors import TrainingError
from lorakit.io import (TEMP_PREFIX, UnreadableFile, atomic_save_tensors, atomic_torch_save, atomic_write_json,
                        load_plain_tensors, private_temp_dir, remove_temp_dirs)
from lorakit.train.run_precision import float32_saved

STEP_PREFIX = "step-"
STATE_FILE = "trainer_state.json"
#: a checkpoint moved aside while the same step is written again; put back if the new one never arrived
ASIDE_PREFIX = ".old-"
_STATE_KEYS = {"step": int, "epoch": int, "pos": int, "total_steps": int}


class CheckpointError(TrainingError):
    """A checkpoint file is missing, damaged or refused; ``file`` names it."""

    def __init__(self, message: str, file: Path):
        super().__init__(message)
        self.file = file


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


# ---------------------------------------------------------------------------------------------- save


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """The folder of the checkpoint for ``step``."""
    return checkpoint_root(output_dir) / f"{STEP_PREFIX}{step:06d}"


def _checked_root(output_dir: str | Path) -> Path:
    """The checkpoints folder, made if needed; a link there (planted, or left by someone) is refused."""
    root = checkpoint_root(output_dir)
    if root.is_symlink():
        raise TrainingError(f"{root} is a symbolic link; lorakit writes checkpoints only into a real folder inside "
                            f"the output folder. Remove the link (or choose another output.dir).")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _write_files(folder: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, trainer_state: dict) -> None:
    atomic_save_tensors(trainable_state(model), folder / "trainable.safetensors")
    if hasattr(model, "lora_state_dict") and hasattr(model, "save_pretrained"):
        with float32_saved(model):  # the adapter as it is used alone: float32 (trainable.safetensors keeps dtypes)
            model.save_pretrained(folder / "adapter")
    atomic_torch_save(optimizer.state_dict(), folder / "optimizer.pt")
    atomic_write_json(folder / "scheduler.json", scheduler.state_dict(), indent=None)
    meta, tensors = rng_state()
    atomic_write_json(folder / "rng.json", meta, indent=None)
    atomic_save_tensors(tensors, folder / "rng.safetensors")
    # The state file goes last: its presence marks a complete checkpoint even on filesystems without rename.
    atomic_write_json(folder / STATE_FILE, trainer_state, indent=None)


def _put_in_place(tmp: Path, final: Path) -> None:
    """Rename the finished temp folder to its step name; an existing one of the same step is replaced."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is an ordinary folder
    if not final.exists():
        os.replace(tmp, final)
        return
    aside = final.parent / f"{ASIDE_PREFIX}{final.name}"
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(final, aside)  # a kill from here to the next line: the next start puts `aside` back
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


def save_checkpoint(output_dir: str | Path, step: int, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                    trainer_state: dict, keep_last: int = 0) -> Path:
    """Write the checkpoint for ``step`` atomically; returns its folder.

    A write that fails (disk full, read-only folder, ...) removes its temp folder and raises a
    TrainingError naming the newest complete checkpoint, which is untouched.
    """
    root = _checked_root(output_dir)
    final = checkpoint_dir(output_dir, step)
    tmp: Optional[Path] = None
    try:
        tmp = Path(private_temp_dir(root, final.name))
        _write_files(tmp, model, optimizer, scheduler, trainer_state)
        _put_in_place(tmp, final)
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(output_dir)
        where = f"the newest complete checkpoint, {kept[-1]}, is intact" if kept else "no earlier checkpoint exists"
        reason = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e)
        raise TrainingError(f"could not write the checkpoint of step {step} in {root} ({reason}); nothing half-"
                            f"written was left and {where}. Free some space (or make the folder writable) and "
                            f"continue with --resume.") from None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        # newer step numbers than this one belong to a continuation this run abandoned (it resumed from an
        # earlier checkpoint, e.g. past a damaged one): they go, so the pruning never keeps them over this run's
        kept = list_checkpoints(output_dir)
        newer = [p for p in kept if _step_of(p) > step]
        older = [p for p in kept if _step_of(p) <= step]
        for stale in newer + older[:-keep_last]:
            _remove_checkpoint(stale)
    return final


def _step_of(path: Path) -> int:
    return int(path.name[len(STEP_PREFIX):])


def _remove_checkpoint(path: Path) -> None:
    """Rename first (one atomic step: it stops being a checkpoint), then delete: a kill halfway through a
    delete never leaves a half-deleted folder under a step name."""
    doomed = path.parent / f"{TEMP_PREFIX}deleted-{path.name}"
    try:
        os.replace(path, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


#: names a run writes inside its output folder; a link at any of them would send the writes elsewhere
_RUN_NAMES = ("adapter", "checkpoints", "merged", "tb", "metrics.jsonl", "loss.png", "recipe.yaml")


def refuse_links(output_dir: str | Path, remove: bool = False) -> None:
    """A symbolic link where a run writes (``out/adapter``, ``out/checkpoints``, ...) is refused, or with
    ``remove`` (a run told to replace the folder's old outputs) the link itself is removed, never its target."""
    out = Path(output_dir)
    links = [out / n for n in _RUN_NAMES if (out / n).is_symlink()]
    if links and not remove:
        raise TrainingError(f"{', '.join(map(str, links))}: a symbolic link where the run writes its outputs; lorakit "
                            f"writes only inside the output folder. Remove the link, pass --overwrite to replace "
                            f"it, or choose another output folder.")
    for link in links:
        link.unlink()


def recover_output_dir(output_dir: str | Path, remove_links: bool = False) -> list[str]:
    """At the start of a run: refuse (or remove) links where the run writes (``refuse_links``), remove the temp
    files and folders a killed run left in the output folder, its adapter folder and its checkpoints folder,
    and put back a checkpoint that was moved aside to be replaced by a newer copy of the same step that never
    arrived. Returns what was removed."""
    out = Path(output_dir)
    refuse_links(out, remove=remove_links)
    removed = []
    for folder in (out, out / "adapter", checkpoint_root(out)):
        if folder.is_dir() and not folder.is_symlink():
            removed += remove_temp_dirs(folder)
    root = checkpoint_root(out)
    if root.is_dir() and not root.is_symlink():
        for aside in root.glob(f"{ASIDE_PREFIX}{STEP_PREFIX}*"):
            final = root / aside.name[len(ASIDE_PREFIX):]
            if final.exists():
                shutil.rmtree(aside, ignore_errors=True)
                removed.append(str(aside))
            else:
                os.replace(aside, final)
    return removed


# ---------------------------------------------------------------------------------------------- read


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints (folders named step-N holding a trainer state), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit()
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=_step_of)


@dataclasses.dataclass
class CheckpointData:
    """Everything a checkpoint holds, read and checked; nothing restored yet."""

    path: Path
    trainable: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng_meta: dict
    rng_tensors: dict[str, torch.Tensor]
    state: dict


def _damaged(path: Path, name: str, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path}: {name} is damaged ({why})", path / name)


def _read_json(path: Path, name: str) -> Any:
    try:
        return json.loads((path / name).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _damaged(path, name, "missing") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _damaged(path, name, f"{type(e).__name__}: {str(e)[:160]}") from None


def _read_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not (path / name).is_file():
        raise _damaged(path, name, "missing")
    try:
        return load_file(str(path / name))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _damaged(path, name, f"{type(e).__name__}: {str(e)[:160]}") from None


def _check_state(path: Path, state: Any) -> dict:
    if not isinstance(state, dict):
        raise _damaged(path, STATE_FILE, f"a JSON object expected, found {type(state).__name__}")
    for key, tp in _STATE_KEYS.items():
        if not isinstance(state.get(key), tp) or isinstance(state.get(key), bool) or state[key] < 0:
            raise _damaged(path, STATE_FILE, f"{key!r} is {state.get(key)!r}, not a count")
    if state.get("order") is not None and not isinstance(state["order"], list):
        raise _damaged(path, STATE_FILE, "'order' is not a list of batches")
    return state


def read_checkpoint(path: str | Path) -> CheckpointData:
    """Read and check every file of a checkpoint; CheckpointError names the first missing or damaged one."""
    path = Path(path)
    state = _check_state(path, _read_json(path, STATE_FILE))
    trainable = _read_tensors(path, "trainable.safetensors")
    if not (path / "optimizer.pt").is_file():
        raise _damaged(path, "optimizer.pt", "missing")
    try:
        optimizer = load_plain_tensors(path / "optimizer.pt")
    except UnreadableFile as e:
        raise CheckpointError(f"checkpoint {path}: optimizer.pt {e}", path / "optimizer.pt") from None
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= set(optimizer):
        raise _damaged(path, "optimizer.pt", "not an optimizer state (no 'state' / 'param_groups')")
    scheduler = _read_json(path, "scheduler.json")
    if not isinstance(scheduler, dict):
        raise _damaged(path, "scheduler.json", f"a JSON object expected, found {type(scheduler).__name__}")
    rng_meta = _read_json(path, "rng.json")
    if not isinstance(rng_meta, dict) or not {"python", "numpy"} <= set(rng_meta):
        raise _damaged(path, "rng.json", "no python / numpy random states")
    rng_tensors = _read_tensors(path, "rng.safetensors")
    _check_rng(path, rng_meta, rng_tensors)
    return CheckpointData(path, trainable, optimizer, scheduler, rng_meta, rng_tensors, state)


def _check_rng(path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Try the saved random states (then put the current ones back), so a bad one is found before any restore."""
    if "torch_cpu" not in tensors:
        raise _damaged(path, "rng.safetensors", "no torch_cpu random state")
    now = rng_state()
    try:
        set_rng_state(meta, tensors)
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
        raise _damaged(path, "rng.json", f"not a random state: {type(e).__name__}: {str(e)[:160]}") from None
    finally:
        set_rng_state(*now)


_last_read: Optional[CheckpointData] = None  # resolve_resume's read, reused by the load that follows it


def resolve_resume(resume: str | Path, output_dir: str | Path,
                   report: Optional[Callable[[str], None]] = None) -> Path:
    """The checkpoint to resume from, its files all checked.

    ``latest`` (or a run's output folder, or its checkpoints folder): the newest intact checkpoint; a newer
    damaged one is reported (``report``, default stderr) naming the damaged file, and skipped. A checkpoint
    folder: that one, or a CheckpointError naming its damaged file.
    """
    global _last_read
    report = report or (lambda msg: print(msg, file=sys.stderr))
    if not isinstance(resume, (str, os.PathLike)) or not str(resume).strip():
        raise TrainingError(f"resume must be `latest` or a checkpoint folder; got {resume!r}")
    path = Path(resume) if str(resume) != "latest" else None
    if path is not None and (path / STATE_FILE).is_file():
        _last_read = read_checkpoint(path)
        return path
    if path is None:
        found, where = list_checkpoints(output_dir), checkpoint_root(output_dir)
    else:
        found = list_checkpoints(path) or list_checkpoints(path.parent if path.name == "checkpoints" else path)
        where = path
    if not found:
        if path is None:
            raise TrainingError(f"--resume latest: no checkpoint under {where} (a run stopped before its first "
                                f"checkpoint has nothing to resume); start the run again with --overwrite, or pass "
                                f"a checkpoint folder")
        raise TrainingError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE}) and no checkpoints "
                            f"inside; pass e.g. {checkpoint_root(output_dir)}/{STEP_PREFIX}000100 or `latest`")
    for ckpt in reversed(found):
        try:
            _last_read = read_checkpoint(ckpt)
        except CheckpointError as e:
            report(f"warning: {e}; it is skipped")
            continue
        if ckpt != found[-1]:
            report(f"resuming from {ckpt.name}, the newest intact checkpoint")
        return ckpt
    raise TrainingError(f"no intact checkpoint under {where}: every one has a damaged file (see the warnings "
                        f"above); start a new run with --overwrite")


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> dict:
    """Restore model (trainable params), optimizer, scheduler and RNG; return the trainer state.

    Everything is read and checked against the model first; a refused checkpoint changes nothing."""
    global _last_read
    path = Path(path)
    data = _last_read if _last_read is not None and _last_read.path == path else read_checkpoint(path)
    _last_read = None
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(data.trainable) != expected:
        missing, extra = sorted(expected - set(data.trainable)), sorted(set(data.trainable) - expected)
        raise TrainingError(f"checkpoint {path} does not match this model's trainable parameters "
                            f"(missing {missing[:3]}, unexpected {extra[:3]}); resume with the same recipe "
                            f"(model, lora.*) that wrote it")
    for name, value in data.trainable.items():
        if params[name].shape != value.shape:
            raise TrainingError(f"checkpoint {path}: {name} has shape {tuple(value.shape)}, the model "
                                f"{tuple(params[name].shape)}; resume with the recipe that wrote it")
    try:
        optimizer.load_state_dict(data.optimizer)
        scheduler.load_state_dict(data.scheduler)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise TrainingError(f"checkpoint {path}: its optimizer / scheduler state does not fit this run "
                            f"({type(e).__name__}: {str(e)[:160]}); resume with the recipe that wrote it") from None
    with torch.no_grad():
        for name, value in data.trainable.items():
            params[name].copy_(value)
    set_rng_state(data.rng_meta, data.rng_tensors)  # checked when read
    return data.state
