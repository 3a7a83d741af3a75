"""The training loop (accelerate), independent of where the model and the examples came from.

Inputs are a model whose trainable parameters have ``requires_grad=True`` (a LoraModel, or anything),
tokenized examples ``{"input_ids": [...], "labels": [...]}`` and a collate function. The loop is a
sequence of named steps on a ``RunState``: set up (``train.setup``), one optimizer step at a time
(``train.step``), after each step log / evaluate / checkpoint, finish (final evaluation, the last
checkpoint, the adapter and the loss plot), and on Ctrl-C a resumable checkpoint of the finished steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from lorakit.eval.loss import heldout_loss
from lorakit.train.config import TrainConfig
from lorakit.train.metrics import format_eval, plot_loss
from lorakit.train.run_precision import float32_saved
from lorakit.train.setup import Run, RunState, setup_run
from lorakit.train.state import checkpoint_dir, list_checkpoints, save_checkpoint
from lorakit.train.step import StepResult, optimizer_step


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: Optional[float]
    eval: dict = field(default_factory=dict)
    checkpoint: Optional[Path] = None
    adapter_dir: Optional[Path] = None
    loss_plot: Optional[Path] = None
    tokens: int = 0
    seconds: float = 0.0            # time in the training steps (incl. periodic evals), not the final eval
    fast_loss: bool = True
    precision: Any = None           # the PrecisionChoice the run trained in (name, dtype, setting, reason)


def train_loop(model: torch.nn.Module, train_examples: list[dict], collate: Callable[[list[dict]], dict],
               cfg: TrainConfig, output_dir: str | Path | None = None, *,
               eval_examples: Optional[list[dict]] = None,
               extra_eval: Optional[Callable[[torch.nn.Module], dict]] = None,
               resume: str | Path | None = None,
               print_fn: Callable[[str], None] = print,
               overwrite: bool = False, precision: Any = None) -> TrainResult:
    """Train ``model`` in place; write checkpoints, metrics, the adapter and the loss plot to output_dir.

    A fresh run (no ``resume``) refuses an output_dir that holds another run's outputs, unless
    ``overwrite`` (which removes them first): mixing two runs' checkpoints, adapter and metrics in one
    folder would make the old ones look like the new run's.

    ``precision``: the PrecisionChoice the model was loaded in (``train()`` passes it). Without it, an explicit
    train.precision (fp32 / bf16) puts the model in that precision first (``precision.apply_precision``);
    under auto the caller's model is trained in the dtype it has.
    """
    out = Path(output_dir or cfg.output.dir)
    run, state = setup_run(model, train_examples, collate, cfg, out, resume=resume, overwrite=overwrite,
                           eval_examples=eval_examples, extra_eval=extra_eval, print_fn=print_fn,
                           precision=precision)
    state.started = time.time()
    try:
        while state.step < run.total:
            result = optimizer_step(run, state)
            if result is not None:
                after_step(run, state, result)
        seconds = finish_training(run, state)
    except KeyboardInterrupt:
        save_interrupted(run, state)
        raise
    finally:
        run.bar.close()
        run.log.close()
    return write_outputs(run, state, seconds)


def after_step(run: Run, state: RunState, result: StepResult) -> None:
    """Log the step, and evaluate / write a checkpoint when the recipe asks for one at this step."""
    cfg, step = run.cfg, state.step
    elapsed = time.time() - state.started
    tok_s = state.tokens / elapsed if elapsed > 0 else 0.0
    if step % cfg.train.log_every == 0 or step == run.total:
        run.log.log({"step": step, "epoch": round(state.epoch + state.pos / max(len(state.order), 1), 4),
                     "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                     "tokens": state.tokens_before + state.tokens, "tokens_per_s": round(tok_s, 1),
                     "elapsed_s": round(state.seconds_before + elapsed, 2)})
    run.bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{tok_s:.0f}", lr=f"{result.lr:.2e}", refresh=False)
    run.bar.update(1)
    if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < run.total:
        state.last_eval = evaluate(run)
        if state.last_eval:
            run.log.log({"step": step, **state.last_eval}, prefix="eval/")
            run.bar.write(format_eval(step, state.last_eval))
    if cfg.output.save_every and step % cfg.output.save_every == 0:
        checkpoint(run, state)


def evaluate(run: Run) -> dict:
    """Held-out loss / perplexity and the caller's extra metrics; the training RNG stream is left untouched."""
    metrics: dict = {}
    if run.eval_examples:
        with torch.random.fork_rng(devices=[]):
            r = heldout_loss(run.model, run.eval_examples, run.collate, batch_size=run.cfg.eval.batch_size,
                             loss=run.loss_fn, device=run.device, autocast=run.accelerator.autocast)
        metrics.update(eval_loss=r["loss"], eval_perplexity=r["perplexity"], eval_tokens=r["tokens"])
    if run.extra_eval is not None:
        with torch.random.fork_rng(devices=[]):
            metrics.update(run.extra_eval(run.model))
        run.model.train()
    return metrics


def checkpoint(run: Run, state: RunState) -> Path:
    """The checkpoint of this step, written by the main process; every process gets its folder."""
    if run.main:
        save_checkpoint(run.out, state.step, run.model, run.optimizer, run.scheduler, state.trainer_state(run),
                        run.cfg.output.keep_last)
    run.accelerator.wait_for_everyone()
    state.last_good, state.saved_at = checkpoint_dir(run.out, state.step), state.step
    return state.last_good


def finish_training(run: Run, state: RunState) -> float:
    """The final evaluation and the run's last checkpoint; the seconds spent in training steps."""
    run.bar.close()
    seconds = state.seconds_before + time.time() - state.started
    if (run.eval_examples or run.extra_eval is not None) and not state.at_end:  # at_end: evaluated before
        state.last_eval = evaluate(run)
        if state.last_eval:
            run.log.log({"step": state.step, **state.last_eval}, prefix="eval/")
    if state.saved_at != state.step:  # the end of the run is always resumable-from (save_every None: only here)
        checkpoint(run, state)
    return seconds


def save_interrupted(run: Run, state: RunState) -> None:
    """Ctrl-C: keep what the finished steps learnt, resumable; the interrupted group is trained again."""
    if state.step > 0 and state.saved_at != state.step and not state.updating and run.main:
        state.pos -= state.pending
        run.optimizer.zero_grad(set_to_none=True)
        ckpt = save_checkpoint(run.out, state.step, run.model, run.optimizer, run.scheduler,
                               state.trainer_state(run), run.cfg.output.keep_last)
        run.bar.write(f"interrupted at step {state.step}/{run.total}; checkpoint written: {ckpt} "
                      f"(continue with --resume)")


def write_outputs(run: Run, state: RunState, seconds: float) -> TrainResult:
    """The adapter (PEFT format) and the loss plot, by the main process; what the run produced."""
    out, adapter_dir = run.out, None
    if hasattr(run.model, "lora_state_dict") and hasattr(run.model, "save_pretrained"):
        adapter_dir = out / "adapter"
        if run.main:
            with float32_saved(run.model):
                run.model.save_pretrained(adapter_dir)
    plot = None
    if run.cfg.output.plot:
        plot = plot_loss(run.log.path, out / "loss.png", title=run.cfg.description) if run.main else out / "loss.png"
    run.accelerator.wait_for_everyone()
    return TrainResult(output_dir=out, steps=state.step, final_loss=state.last_loss, eval=state.last_eval,
                       checkpoint=state.last_good or (list_checkpoints(out) or [None])[-1], adapter_dir=adapter_dir,
                       loss_plot=plot, tokens=state.tokens_before + state.tokens, seconds=seconds,
                       fast_loss=run.loss_fn.is_fast, precision=run.precision)
