"""Run `lorakit ARGS...` and kill this very process with SIGKILL (kill -9) at a chosen point.

    python kill_worker.py POINT train RECIPE [--resume ...]

POINT is one of
    after-step:N                  just after optimizer step N (between steps)
    in-checkpoint:N:FILE          inside step N's checkpoint write, just after FILE was written in its temp folder
    before-outputs                after the run's last checkpoint, before the final adapter / tokenizer / plot
    in-adapter                    inside the final adapter's write: the weights' temp file written, not renamed

The kill is the real thing (no cleanup handler runs); the test then resumes the run and compares the
adapter with an uninterrupted run's.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _after_step(n: int) -> None:
    import lorakit.train.loop as loop

    original = loop.optimizer_step

    def step(run, state):
        result = original(run, state)
        if state.step == n:
            die()
        return result

    loop.optimizer_step = step


def _in_checkpoint(n: int, name: str) -> None:
    import lorakit.train.state as state_mod

    def hit(path) -> None:
        path = Path(path)
        if path.name == name and f"step-{n:06d}" in path.parent.name:
            die()

    tensors, torch_save, write_json = (state_mod.atomic_save_tensors, state_mod.atomic_torch_save,
                                       state_mod.atomic_write_json)
    state_mod.atomic_save_tensors = lambda t, path, *a, **k: (tensors(t, path, *a, **k), hit(path))
    state_mod.atomic_torch_save = lambda obj, path: (torch_save(obj, path), hit(path))
    state_mod.atomic_write_json = lambda path, data, *a, **k: (write_json(path, data, *a, **k), hit(path))


def _before_outputs() -> None:
    import lorakit.train.loop as loop

    loop.write_outputs = lambda *a, **k: die()


def _in_adapter() -> None:
    import lorakit.peft_format as peft_format

    original = peft_format.save_safetensors

    def save(tensors, path, *a, **k):
        original(tensors, path, *a, **k)
        if "checkpoints" not in Path(path).parts and Path(path).parent.name == "adapter":
            die()

    peft_format.save_safetensors = save


def install(point: str) -> None:
    kind, _, arg = point.partition(":")
    if kind == "after-step":
        _after_step(int(arg))
    elif kind == "in-checkpoint":
        n, name = arg.split(":")
        _in_checkpoint(int(n), name)
    elif kind == "before-outputs":
        _before_outputs()
    elif kind == "in-adapter":
        _in_adapter()
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    install(sys.argv[1])
    from lorakit.cli.main import main

    code = main(sys.argv[2:])
    print(f"kill_worker: the run ended (exit {code}) without reaching {sys.argv[1]}", file=sys.stderr)
    sys.exit(97)
