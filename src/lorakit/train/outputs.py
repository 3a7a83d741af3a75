"""A run's output folder: what a run writes there, and which process of a data-parallel run writes it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lorakit.errors import TrainingError

#: what a training run writes into its output folder (recipe.yaml is rewritten by every run)
RUN_OUTPUTS = ("adapter", "checkpoints", "metrics.jsonl", "loss.png", "tb", "merged")


def clear_for_new_run(out: Path, overwrite: bool, remove: bool = True) -> None:
    """Refuse (or with ``overwrite`` remove) another run's outputs in ``out`` before a fresh run.

    Mixing two runs' checkpoints, adapter and metrics in one folder would make the old ones look like
    the new run's. ``remove=False``: check only (the processes of a data-parallel run other than the
    main one).
    """
    found = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if not found:
        return
    if not overwrite:
        raise TrainingError(
            f"output folder {out} already holds a run ({', '.join(found)}). Continue it with --resume, replace it "
            f"with --overwrite, or write elsewhere (--output-dir DIR / --set output.dir=DIR).")
    for name in found if remove else ():
        path = out / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def is_main_process() -> bool:
    """Is this the main process of a (possibly) data-parallel run? From the launcher's environment, so it
    can be asked before an Accelerator exists (accelerate / torchrun set RANK; MPI launchers their own)."""
    for var in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        if os.environ.get(var, "").strip().isdigit():
            return int(os.environ[var]) == 0
    return True
