"""One optimizer step: the next group of batches, their gradients, the update.

A step takes ``grad_accum`` micro-batches on each of ``world`` processes. Its loss is the mean over *all*
answer tokens of those batches: each contributes its token-summed loss divided by the step's token
count (over every process), so accumulation, and data parallelism, give the gradient of one big batch
however the tokens are spread. One process and many run the same code; with one, the all-reduces and
``no_sync`` do nothing.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch

from lorakit.constants import IGNORE_INDEX
from lorakit.data.batches import epoch_order
from lorakit.errors import TrainingError
from lorakit.loss.lm_loss import count_label_tokens
from lorakit.train.setup import Run, RunState


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step reports (the metrics line and the progress bar show it)."""

    loss: float
    grad_norm: float
    lr: float


def move(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device``."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def nan_error(step: int, what: str, run: Run, state: RunState) -> TrainingError:
    """The error that stops a run whose loss or gradient stopped being finite, with what to try."""
    cfg, last_good = run.cfg, state.last_good
    kept = f"the last good checkpoint is kept at {last_good}" if last_good else "no checkpoint had been written yet"
    precision = "" if cfg.train.mixed_precision == "no" else ", train in fp32 (--set train.mixed_precision=no)"
    return TrainingError(
        f"{what} at optimizer step {step}; training stopped and {kept}. Try a lower learning rate "
        f"(train.lr is {cfg.train.lr:g}; e.g. --set train.lr={cfg.train.lr / 10:g}), gradient clipping "
        f"(--set train.max_grad_norm=1.0){precision}, or float32 weights (--set train.precision=fp32).")


def next_group(run: Run, state: RunState) -> list[list[int]]:
    """The batches (lists of example indices) of the next step, all processes' together; a new epoch's
    order when this one is used up."""
    tc = run.cfg.train
    if state.order is None or state.pos >= len(state.order):
        if state.order is not None:
            state.epoch += 1
        state.order, state.pos = epoch_order(run.lengths, tc.batch_size, tc.seed, state.epoch,
                                             run.cfg.data.sort_by_length), 0
    group = state.order[state.pos:state.pos + tc.grad_accum * run.world]
    state.pos += len(group)
    state.pending = len(group)
    return group


def micro_batches(run: Run, group: list[list[int]]) -> tuple[list[dict], list[float], int]:
    """(this process's batches, their weights, the step's answer tokens over all processes).

    A batch whose rows are all prompt or padding has nothing to learn from and is left out. A process
    left with no batch still takes part in the step's one gradient all-reduce, with a pass of weight 0.
    """
    def batch(idx: list[int]) -> dict:
        return move(run.collate([run.examples[i] for i in idx]), run.device)

    passes = [b for b in map(batch, group[run.rank::run.world]) if count_label_tokens(b["labels"])]
    n_tok = sum(count_label_tokens(b["labels"]) for b in passes)
    n_tok = int(run.accelerator.reduce(torch.tensor(n_tok, device=run.device), "sum"))
    weights = [1.0] * len(passes)
    if n_tok and not passes:
        spare = next(idx for idx in group
                     if any(t != IGNORE_INDEX for i in idx for t in run.examples[i]["labels"][1:]))
        passes, weights = [batch(spare)], [0.0]
    return passes, weights, n_tok


def accumulate(run: Run, state: RunState, passes: list[dict], weights: list[float], n_tok: int) -> torch.Tensor:
    """Forward and backward every pass of the step; the step's loss (mean over its answer tokens)."""
    world = run.world
    step_loss = torch.zeros((), device=run.device)
    for k, (b, weight) in enumerate(zip(passes, weights)):
        # gradients are all-reduced once, after the step's last pass
        sync = run.accelerator.no_sync(run.loss_module) if k < len(passes) - 1 else contextlib.nullcontext()
        with sync:
            with run.accelerator.autocast():
                # DDP averages gradients over processes: scale by world so the step sees the global mean
                loss = run.loss_module(b) / n_tok * (world * weight)
            if not torch.isfinite(loss):
                raise nan_error(state.step + 1, f"loss became {float(loss.detach())}", run, state)
            run.accelerator.backward(loss)
        if weight:
            step_loss += loss.detach() / world
            state.tokens += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
    return run.accelerator.reduce(step_loss, "sum")


def gradient_norm(run: Run, state: RunState) -> float:
    """The gradients' norm, clipped to ``train.max_grad_norm`` when set; stops the run when not finite."""
    if run.cfg.train.max_grad_norm is not None:
        norm = float(run.accelerator.clip_grad_norm_(run.params, run.cfg.train.max_grad_norm))
    else:
        norm = float(torch.linalg.vector_norm(
            torch.stack([p.grad.detach().norm() for p in run.params if p.grad is not None])))
    if not math.isfinite(norm):
        raise nan_error(state.step + 1, f"gradient norm became {norm}", run, state)
    return norm


def optimizer_step(run: Run, state: RunState) -> Optional[StepResult]:
    """Train on the next group of batches and update the weights; None when the group had no answer
    token (nothing learned; the caller goes on with the next)."""
    passes, weights, n_tok = micro_batches(run, next_group(run, state))
    if n_tok == 0:
        state.empty_groups += 1
        if state.empty_groups > run.n_batches:
            raise TrainingError("no example has any answer token to learn from (all labels are -100); "
                                "check the template and data.max_length")
        return None
    step_loss = accumulate(run, state, passes, weights, n_tok)
    grad_norm = gradient_norm(run, state)
    lr = run.scheduler.get_last_lr()[0]
    state.updating = True
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.pending, state.updating = 0, False
    state.last_loss = float(step_loss)
    return StepResult(loss=state.last_loss, grad_norm=grad_norm, lr=lr)
