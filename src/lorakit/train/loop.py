"""The training loop (accelerate), independent of where the model and the examples came from.

Inputs are a model whose trainable parameters have ``requires_grad=True`` (a LoraModel, or anything),
tokenized examples ``{"input_ids": [...], "labels": [...]}`` and a collate function. One optimizer step
uses ``grad_accum`` micro-batches; the loss of the step is the mean over *all* answer tokens of those
micro-batches (each micro-batch contributes its token-summed loss divided by the step's token count), so
accumulation gives the same gradient as one big batch regardless of how the tokens are spread.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from lorakit.errors import TrainingError
from lorakit.eval.loss import heldout_loss
from lorakit.data.batches import epoch_order
from lorakit.train.config import TrainConfig
from lorakit.constants import IGNORE_INDEX
from lorakit.loss.lm_loss import LossComputer, count_label_tokens
from lorakit.train.metrics import MetricsLog, plot_loss
from lorakit.train.schedule import make_scheduler, warmup_steps
from lorakit.train.state import checkpoint_dir, list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint


def move(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device``."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


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


def total_steps(cfg: TrainConfig, n_batches: int, world: int = 1) -> int:
    """Optimizer steps of the run: each takes ``grad_accum`` batches on each of ``world`` processes."""
    per_epoch = math.ceil(n_batches / (cfg.train.grad_accum * world))
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * per_epoch))


def _nan_error(step: int, what: str, last_good: Optional[Path], cfg: TrainConfig) -> TrainingError:
    kept = f"the last good checkpoint is kept at {last_good}" if last_good else "no checkpoint had been written yet"
    precision = "" if cfg.train.mixed_precision == "no" else f", train in fp32 (--set train.mixed_precision=no)"
    return TrainingError(
        f"{what} at optimizer step {step}; training stopped and {kept}. Try a lower learning rate "
        f"(train.lr is {cfg.train.lr:g}; e.g. --set train.lr={cfg.train.lr / 10:g}), gradient clipping "
        f"(--set train.max_grad_norm=1.0){precision}, or fp32 weights (--set model.dtype=float32).")


def train_loop(model: torch.nn.Module, train_examples: list[dict], collate: Callable[[list[dict]], dict],
               cfg: TrainConfig, output_dir: str | Path | None = None, *,
               eval_examples: Optional[list[dict]] = None,
               extra_eval: Optional[Callable[[torch.nn.Module], dict]] = None,
               resume: str | Path | None = None,
               print_fn: Callable[[str], None] = print,
               overwrite: bool = False) -> TrainResult:
    """Train ``model`` in place; write checkpoints, metrics, the adapter and the loss plot to output_dir.

    A fresh run (no ``resume``) refuses an output_dir that holds another run's outputs, unless
    ``overwrite`` (which removes them first): mixing two runs' checkpoints, adapter and metrics in one
    folder would make the old ones look like the new run's.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    out = Path(output_dir or cfg.output.dir)
    if not train_examples:
        raise TrainingError("no training examples; check data.train and the template's columns")
    tc = cfg.train
    use_cpu = tc.cpu or not torch.cuda.is_available()
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=tc.mixed_precision)
    device = accelerator.device
    # data parallel (accelerate launch --num_processes N): each optimizer step takes grad_accum batches on
    # every process; the main process alone writes files
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    if resume is None:
        clear_for_new_run(out, overwrite, remove=main)
        accelerator.wait_for_everyone()
    out.mkdir(parents=True, exist_ok=True)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters; wrap it with get_peft_model first")
    model.to(device)
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    lengths = [len(e["input_ids"]) for e in train_examples]
    n_batches = math.ceil(len(train_examples) / tc.batch_size)
    total = total_steps(cfg, n_batches, world)
    scheduler = make_scheduler(optimizer, total, warmup_steps(total, tc.warmup_steps, tc.warmup_ratio), tc.scheduler)
    # several processes: the loss goes through the DDP wrapper's forward (its gradient all-reduce needs it)
    loss_fn = LossComputer(raw_model if world == 1 else model, fast=tc.fast_loss)

    step, epoch, pos, order, tokens_seen, elapsed_before = 0, 0, 0, None, 0, 0.0
    last_good: Optional[Path] = None
    if resume is not None:
        ckpt = resolve_resume(resume, out)
        state = load_checkpoint(ckpt, raw_model, optimizer, scheduler)  # restores RNG last: nothing may follow
        if state["total_steps"] != total:
            raise TrainingError(f"checkpoint {ckpt} was written by a run of {state['total_steps']} steps, this "
                                f"recipe makes {total}; resume with the same train.* settings")
        step, epoch, pos, order = state["step"], state["epoch"], state["pos"], state["order"]
        if step >= total:
            raise TrainingError(f"checkpoint {ckpt} is the end of its run (step {step} of {total}): nothing to "
                                f"resume. Its adapter is in {out / 'adapter'}; to train more, start a new run "
                                f"(another output.dir, or --overwrite).")
        tokens_seen, elapsed_before = state.get("tokens", 0), state.get("seconds", 0.0)
        last_good = ckpt
        print_fn(f"resumed from {ckpt} at step {step}/{total}")
    else:
        torch.manual_seed(tc.seed + rank)  # dropout stream; the data order has its own generator
    log = (MetricsLog(out, tensorboard=cfg.output.tensorboard, resume_step=step if resume is not None else None)
           if main else _NoLog())

    def evaluate() -> dict:
        metrics: dict = {}
        if eval_examples:
            with torch.random.fork_rng(devices=[]):
                r = heldout_loss(raw_model, eval_examples, collate, batch_size=cfg.eval.batch_size, loss=loss_fn,
                                 device=device, autocast=accelerator.autocast)
            metrics.update(eval_loss=r["loss"], eval_perplexity=r["perplexity"], eval_tokens=r["tokens"])
        if extra_eval is not None:
            with torch.random.fork_rng(devices=[]):
                metrics.update(extra_eval(raw_model))
            raw_model.train()
        return metrics

    def trainer_state() -> dict:
        return {"step": step, "epoch": epoch, "pos": pos, "order": order, "total_steps": total,
                "tokens": tokens_seen + run_tokens, "seconds": elapsed_before + time.time() - t0,
                "config": cfg.to_dict()}

    model.train()
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not (tc.progress and main),
               dynamic_ncols=True)

    def checkpoint() -> Path:
        """The checkpoint of this step, written by the main process; every process gets its folder."""
        if main:
            save_checkpoint(out, step, raw_model, optimizer, scheduler, trainer_state(), cfg.output.keep_last)
        accelerator.wait_for_everyone()
        return checkpoint_dir(out, step)
    t0 = time.time()
    run_tokens = 0
    last_loss: Optional[float] = None
    last_eval: dict = {}
    saved_at = -1
    empty_groups = 0
    pending = 0         # examples of the group being trained on, not yet applied by an optimizer step
    updating = False    # inside optimizer.step(): the weights are half updated
    try:
        while step < total:
            if order is None or pos >= len(order):
                if order is not None:
                    epoch += 1
                order, pos = epoch_order(lengths, tc.batch_size, tc.seed, epoch, cfg.data.sort_by_length), 0
            group = order[pos:pos + tc.grad_accum * world]
            pos += len(group)
            pending = len(group)
            batches = [move(collate([train_examples[i] for i in idx]), device) for idx in group[rank::world]]
            # nothing to learn from a micro-batch whose rows are all prompt or padding
            passes = [b for b in batches if count_label_tokens(b["labels"])]
            n_tok = sum(count_label_tokens(b["labels"]) for b in passes)
            if world > 1:  # the step's loss is the mean over every process's answer tokens
                n_tok = int(accelerator.reduce(torch.tensor(n_tok, device=device), "sum"))
            if n_tok == 0:
                empty_groups += 1
                if empty_groups > n_batches:
                    raise TrainingError("no example has any answer token to learn from (all labels are -100); "
                                        "check the template and data.max_length")
                continue
            weights = [1.0] * len(passes)
            if world > 1 and not passes:  # every process takes part in the step's one gradient all-reduce
                spare = next(idx for idx in group
                             if any(t != IGNORE_INDEX for i in idx for t in train_examples[i]["labels"][1:]))
                passes, weights = [move(collate([train_examples[i] for i in spare]), device)], [0.0]
            step_loss = torch.zeros((), device=device)
            for k, (b, weight) in enumerate(zip(passes, weights)):
                # DDP averages gradients over processes: scale by world so the step sees the global mean
                sync = accelerator.no_sync(model) if world > 1 and k < len(passes) - 1 else contextlib.nullcontext()
                with sync:
                    with accelerator.autocast():
                        loss = loss_fn(b) / n_tok * (world * weight)
                    if not torch.isfinite(loss):
                        raise _nan_error(step + 1, f"loss became {float(loss.detach())}", last_good, cfg)
                    accelerator.backward(loss)
                if weight:
                    step_loss += loss.detach() / world
                    run_tokens += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
            if world > 1:
                step_loss = accelerator.reduce(step_loss, "sum")
            if tc.max_grad_norm is not None:
                grad_norm = float(accelerator.clip_grad_norm_(params, tc.max_grad_norm))
            else:
                grad_norm = float(torch.linalg.vector_norm(
                    torch.stack([p.grad.detach().norm() for p in params if p.grad is not None])))
            if not math.isfinite(grad_norm):
                raise _nan_error(step + 1, f"gradient norm became {grad_norm}", last_good, cfg)
            lr = scheduler.get_last_lr()[0]
            updating = True
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            pending, updating = 0, False
            last_loss = float(step_loss)
            elapsed = time.time() - t0
            tok_s = run_tokens / elapsed if elapsed > 0 else 0.0
            if step % tc.log_every == 0 or step == total:
                log.log({"step": step, "epoch": round(epoch + pos / max(len(order), 1), 4), "loss": last_loss,
                         "lr": lr, "grad_norm": grad_norm, "tokens": tokens_seen + run_tokens,
                         "tokens_per_s": round(tok_s, 1), "elapsed_s": round(elapsed_before + elapsed, 2)})
            bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tok_s:.0f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < total:
                last_eval = evaluate()
                if last_eval:
                    log.log({"step": step, **last_eval}, prefix="eval/")
                    bar.write(_format_eval(step, last_eval))
            if cfg.output.save_every and step % cfg.output.save_every == 0:
                last_good = checkpoint()
                saved_at = step
        bar.close()
        train_seconds = elapsed_before + time.time() - t0
        if eval_examples or extra_eval is not None:
            last_eval = evaluate()
            if last_eval:
                log.log({"step": step, **last_eval}, prefix="eval/")
        if saved_at != step:  # the end of the run is always resumable-from (save_every None: only here)
            last_good = checkpoint()
    except KeyboardInterrupt:
        # Ctrl-C: keep what the finished steps learnt, resumable; the interrupted group is trained again
        if step > 0 and saved_at != step and not updating and main:
            pos -= pending
            optimizer.zero_grad(set_to_none=True)
            ckpt = save_checkpoint(out, step, raw_model, optimizer, scheduler, trainer_state(), cfg.output.keep_last)
            bar.write(f"interrupted at step {step}/{total}; checkpoint written: {ckpt} (continue with --resume)")
        raise
    finally:
        bar.close()
        log.close()

    adapter_dir = None
    if hasattr(raw_model, "lora_state_dict") and hasattr(raw_model, "save_pretrained"):
        adapter_dir = out / "adapter"
        if main:
            raw_model.save_pretrained(adapter_dir)
    plot = (plot_loss(log.path, out / "loss.png", title=cfg.description) if main else out / "loss.png") \
        if cfg.output.plot else None
    accelerator.wait_for_everyone()
    return TrainResult(output_dir=out, steps=step, final_loss=last_loss, eval=last_eval,
                       checkpoint=last_good or (list_checkpoints(out) or [None])[-1], adapter_dir=adapter_dir,
                       loss_plot=plot, tokens=tokens_seen + run_tokens, seconds=train_seconds,
                       fast_loss=loss_fn.is_fast)


#: what a training run writes into its output folder (recipe.yaml is rewritten by every run)
RUN_OUTPUTS = ("adapter", "checkpoints", "metrics.jsonl", "loss.png", "tb", "merged")


def clear_for_new_run(out: Path, overwrite: bool, remove: bool = True) -> None:
    """Refuse (or with ``overwrite`` remove) another run's outputs in ``out`` before a fresh run.

    ``remove=False``: check only (the processes of a data-parallel run other than the main one).
    """
    import shutil

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
    import os

    for var in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        if os.environ.get(var, "").strip().isdigit():
            return int(os.environ[var]) == 0
    return True


class _NoLog:
    """The metrics log of a process that writes nothing (not the main one of a data-parallel run)."""

    path = None

    def log(self, record: dict, prefix: str = "") -> None:
        pass

    def close(self) -> None:
        pass


def _format_eval(step: int, metrics: dict) -> str:
    parts = [f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
             if isinstance(v, (int, float))]
    return f"[eval @ step {step}] " + " ".join(parts)
