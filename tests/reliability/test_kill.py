"""kill -9 during `lorakit train`, then `--resume`: the run ends with the adapter an uninterrupted run writes,
byte for byte, and with no temp leftovers; a kill after the last checkpoint still gets its adapter, tokenizer
and loss plot. The killed run is a subprocess (tests/reliability/kill_worker.py kills itself with SIGKILL at
the named point); the reference run and the resumes run in-process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import ROOT, adapter_bytes, run_cli, write_recipe

WORKER = Path(__file__).with_name("kill_worker.py")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The killed runs use one thread (their environment); so do the in-process runs compared with them: with
    every kernel off (LORAKIT_KERNELS=0) BLAS sums in another order on two threads, and bytes would differ."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir, one_thread):
    """The uninterrupted run's adapter files."""
    folder = tmp_path_factory.mktemp("kill_ref")
    recipe = write_recipe(folder, model_dir, folder / "out")
    from lorakit.cli.main import main

    assert main(["train", str(recipe)]) == 0
    return adapter_bytes(folder / "out")


def _killed(point: str, recipe: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(WORKER), point, "train", str(recipe)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}: {proc.stderr[-3000:]}"


def _temp_leftovers(out: Path) -> list[str]:
    return [str(p.relative_to(out)) for p in out.rglob("*") if p.name.startswith((".tmp-", ".old-"))]


@pytest.mark.parametrize("point, leftover", [
    # mid-checkpoint-write: step 4's optimizer state is in its temp folder, the folder not yet renamed
    ("in-checkpoint:4:optimizer.pt", True),
    # after the last checkpoint (step 6), before the final adapter, tokenizer and plot
    ("before-outputs", False),
])
def test_killed_run_resumes_to_the_same_adapter(tmp_path, model_dir, reference, capsys, point, leftover):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, model_dir, out)
    _killed(point, recipe)
    assert not (out / "adapter").exists()
    assert bool(_temp_leftovers(out)) == leftover
    rc, stdout, err = run_cli(["train", recipe, "--resume"], capsys)
    assert rc == 0, err[-2000:]
    assert adapter_bytes(out) == reference
    assert (out / "adapter" / "tokenizer_config.json").is_file() and (out / "loss.png").is_file()
    assert _temp_leftovers(out) == []  # the killed run's temp folder was removed at the start


@pytest.mark.slow
@pytest.mark.parametrize("point", ["after-step:3", "in-checkpoint:6:trainer_state.json", "in-adapter"])
def test_more_kill_points_resume_to_the_same_adapter(tmp_path, model_dir, reference, capsys, point):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, model_dir, out)
    _killed(point, recipe)
    rc, stdout, err = run_cli(["train", recipe, "--resume"], capsys)
    assert rc == 0, err[-2000:]
    assert adapter_bytes(out) == reference
    assert _temp_leftovers(out) == []
