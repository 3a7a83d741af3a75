"""Data-parallel training (accelerate launch --num_processes N): two CPU processes over gloo.

Two processes with batch_size B and grad_accum 1 must train exactly as one process with batch_size B
and grad_accum 2 (the same global batches, the loss a mean over all their answer tokens), each process
on its own half of every step's batches, with identical weights on both at the end.
"""
from __future__ import annotations

import json
import os
from collections import Counter
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit import kernels

WORKER = Path(__file__).with_name("dp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, world: int, batch_size: int, grad_accum: int, steps: int) -> None:
    out.mkdir(parents=True)
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port, ACCELERATE_USE_CPU="true")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out), str(batch_size), str(grad_accum),
                                       str(steps)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        logs = [p.communicate(timeout=240)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]


# batch 3: 8 batches an epoch, 4 whole steps; batch 5: 5 batches, so every third step one process has
# no batch of its own and joins the gradient all-reduce with a pass that adds nothing
@pytest.mark.parametrize("batch_size,steps", [(3, 5), (5, 6)])
def test_two_processes_train_as_one_process_with_twice_the_accumulation(tmp_path, batch_size, steps):
    _run(tmp_path / "dp", world=2, batch_size=batch_size, grad_accum=1, steps=steps)
    _run(tmp_path / "single", world=1, batch_size=batch_size, grad_accum=2, steps=steps)
    w0, w1 = load_file(tmp_path / "dp" / "rank0.safetensors"), load_file(tmp_path / "dp" / "rank1.safetensors")
    ref = load_file(tmp_path / "single" / "rank0.safetensors")
    for key in ref:
        torch.testing.assert_close(w0[key], w1[key], rtol=0, atol=0)       # one model on both processes
        torch.testing.assert_close(w0[key], ref[key], rtol=1e-4, atol=1e-6)  # the same training as one process
    r0, r1 = (json.loads((tmp_path / "dp" / f"rank{r}.json").read_text()) for r in (0, 1))
    single = json.loads((tmp_path / "single" / "rank0.json").read_text())
    assert r0["steps"] == r1["steps"] == single["steps"] == steps
    assert r0["loss"] == pytest.approx(single["loss"], rel=1e-4)
    # one loss path for one process and many: the fast loss (head at answer positions only) in both, where
    # kernels run (LORAKIT_KERNELS reaches the workers)
    assert r0["fast_loss"] == r1["fast_loss"] == single["fast_loss"] == kernels.enabled
    # the two processes split the single run's batches between them (plus one do-nothing pass for each
    # step that had a batch for one process only); each trained on half of them
    both = Counter(map(tuple, r0["seen"] + r1["seen"]))
    ref_seen = Counter(map(tuple, single["seen"]))
    per_epoch = -(-24 // batch_size)
    spares = sum(1 for step in range(steps) if per_epoch % 2 and step % ((per_epoch + 1) // 2) == per_epoch // 2)
    assert not ref_seen - both and sum((both - ref_seen).values()) == spares
    assert abs(len(r0["seen"]) - len(r1["seen"])) <= spares
    # only the main process wrote the run's files, once
    assert (tmp_path / "dp" / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_main_process_is_read_from_the_launchers_environment(monkeypatch):
    from lorakit.train.outputs import is_main_process

    for var in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert is_main_process()
    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    assert not is_main_process()
