"""Setting a run up: the accelerator, AdamW and its schedule over the trainable parameters, the loss module
every process runs, and where the run starts (a fresh seed, or a checkpoint's exact state).

``Run`` is what a run works with and does not change; ``RunState`` is where it stands, everything a
checkpoint records plus this process's running totals. The loop (``train.loop``) and one optimizer step
(``train.step``) read the first and advance the second.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from lorakit.errors import TrainingError
from lorakit.loss.lm_loss import LossComputer
from lorakit.train.config import TrainConfig
from lorakit.train.metrics import MetricsLog, NullLog, logged_summary
from lorakit.train.outputs import clear_for_new_run
from lorakit.train.run_precision import checkpoint_precision, for_model, refuse_other_precision, same_on_every_process
from lorakit.train.schedule import make_scheduler, warmup_steps
from lorakit.train.state import load_checkpoint, recover_output_dir, resolve_resume


class LossModule(torch.nn.Module):
    """A batch's summed token loss as a module's forward: the one forward accelerate prepares.

    One process runs it as it is; several run it inside DDP, whose gradient all-reduce needs the loss
    to come from its wrapper's forward. The model is this module's child, so its parameters are the
    ones DDP synchronises, and every process computes the loss the same way (the fast path when the
    model allows it).
    """

    #: what accelerate reads from the model it prepares (quantized models stay where they were loaded)
    _SEEN_BY_ACCELERATE = frozenset({"is_loaded_in_4bit", "is_loaded_in_8bit", "hf_device_map"})

    def __init__(self, model: torch.nn.Module, loss_fn: LossComputer) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss_fn(batch)

    def __getattr__(self, name: str) -> Any:
        if name in LossModule._SEEN_BY_ACCELERATE:
            return getattr(super().__getattr__("model"), name)
        return super().__getattr__(name)


@dataclass
class Run:
    """What a run works with; fixed once set up."""

    cfg: TrainConfig
    out: Path
    accelerator: Any
    model: torch.nn.Module              # the caller's model: checkpoints, evaluation and the adapter use it
    loss_module: torch.nn.Module        # the prepared LossModule (inside DDP for several processes)
    loss_fn: LossComputer
    params: list
    optimizer: Any
    scheduler: Any
    examples: list
    collate: Callable[[list[dict]], dict]
    lengths: list                       # tokens of each example (the data order groups similar lengths)
    n_batches: int                      # micro-batches in an epoch, all processes together
    total: int                          # optimizer steps of the run
    eval_examples: Optional[list] = None
    extra_eval: Optional[Callable[[torch.nn.Module], dict]] = None
    log: Any = None                     # MetricsLog (main process) or NullLog
    bar: Any = None                     # the tqdm progress bar
    precision: Any = None               # the PrecisionChoice the model trains in (recorded in checkpoints)

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


@dataclass
class RunState:
    """Where a run stands: what a checkpoint records, and this process's running totals."""

    step: int = 0
    epoch: int = 0
    pos: int = 0                        # batches of the epoch's order already taken
    order: Optional[list] = None        # the epoch's batches (lists of example indices)
    tokens_before: int = 0              # tokens trained on before this run resumed
    seconds_before: float = 0.0
    tokens: int = 0                     # tokens trained on since this run started
    started: float = field(default_factory=time.time)
    last_loss: Optional[float] = None
    last_eval: dict = field(default_factory=dict)
    last_good: Optional[Path] = None    # the newest checkpoint this run wrote or resumed from
    saved_at: int = -1                  # the step of the last checkpoint this run wrote
    empty_groups: int = 0               # groups skipped for having no answer token
    pending: int = 0                    # batches of the group in training, not yet applied by a step
    updating: bool = False              # inside optimizer.step(): the weights are half updated
    at_end: bool = False                # resumed from the run's last checkpoint: only its outputs are written

    def trainer_state(self, run: Run) -> dict:
        """What a checkpoint stores besides the tensors (``trainer_state.json``)."""
        return {"step": self.step, "epoch": self.epoch, "pos": self.pos, "order": self.order,
                "total_steps": run.total, "tokens": self.tokens_before + self.tokens,
                "seconds": self.seconds_before + time.time() - self.started, "config": run.cfg.to_dict(),
                "precision": run.precision.name, "precision_reason": run.precision.describe()}


def total_steps(cfg: TrainConfig, n_batches: int, world: int = 1) -> int:
    """Optimizer steps of the run: each takes ``grad_accum`` batches on each of ``world`` processes."""
    per_epoch = math.ceil(n_batches / (cfg.train.grad_accum * world))
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * per_epoch))


def _forget_other_precision(mixed_precision: str) -> None:
    """accelerate keeps one precision per process: a second run in the same process (a notebook, a test,
    cross-validation folds) with another train.mixed_precision would be refused by Accelerator(). The
    process-wide state (devices, distributed setup) stays; only the precision settings are reset."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", mixed_precision)) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def setup_run(model: torch.nn.Module, examples: list[dict], collate: Callable[[list[dict]], dict],
              cfg: TrainConfig, out: Path, *, resume: str | Path | None, overwrite: bool,
              eval_examples: Optional[list] = None, extra_eval: Optional[Callable] = None,
              print_fn: Callable[[str], None] = print, precision: Any = None) -> tuple[Run, RunState]:
    """Everything up to the first step: checks, accelerator, optimizer, schedule, resume, log, progress bar.
    ``precision``: the model's PrecisionChoice, if known (see ``run_precision.for_model``)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    if not examples:
        raise TrainingError("no training examples; check data.train and the template's columns")
    tc = cfg.train
    _forget_other_precision(tc.mixed_precision)
    accelerator = Accelerator(cpu=tc.cpu or not torch.cuda.is_available(), mixed_precision=tc.mixed_precision)
    # data parallel (accelerate launch --num_processes N): each optimizer step takes grad_accum batches on
    # every process; the main process alone writes files
    if accelerator.is_main_process:  # a killed run's temp leftovers go; links where outputs go are refused
        recover_output_dir(out, remove_links=overwrite and resume is None)
    if resume is None:
        clear_for_new_run(out, overwrite, remove=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    out.mkdir(parents=True, exist_ok=True)

    precision = for_model(model, cfg, precision, accelerator.device)  # before the optimizer holds the weights
    same_on_every_process(accelerator, precision)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters; wrap it with get_peft_model first")
    model.to(accelerator.device)
    if tc.loraplus_lr_ratio is None:
        optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    else:  # LoRA+: B (and DoRA magnitudes) at loraplus_lr_ratio x lr, as peft's create_loraplus_optimizer
        from lorakit.optim import create_loraplus_optimizer

        optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=tc.lr, loraplus_lr_ratio=tc.loraplus_lr_ratio,
                                              loraplus_lr_embedding=tc.loraplus_lr_embedding,
                                              loraplus_weight_decay=tc.weight_decay, betas=tuple(tc.betas))
    loss_fn = LossComputer(model, fast=tc.fast_loss)
    loss_module, optimizer = accelerator.prepare(LossModule(model, loss_fn), optimizer)
    n_batches = math.ceil(len(examples) / tc.batch_size)
    total = total_steps(cfg, n_batches, accelerator.num_processes)
    scheduler = make_scheduler(optimizer, total, warmup_steps(total, tc.warmup_steps, tc.warmup_ratio), tc.scheduler)
    run = Run(cfg=cfg, out=out, accelerator=accelerator, model=model, loss_module=loss_module, loss_fn=loss_fn,
              params=params, optimizer=optimizer, scheduler=scheduler, examples=examples, collate=collate,
              lengths=[len(e["input_ids"]) for e in examples], n_batches=n_batches, total=total,
              eval_examples=eval_examples, extra_eval=extra_eval, precision=precision)

    if resume is not None:
        state = resume_state(run, resume, print_fn)
    else:
        state = RunState()
        torch.manual_seed(tc.seed + run.rank)  # dropout stream; the data order has its own generator
    run.log = (MetricsLog(out, tensorboard=cfg.output.tensorboard,
                          resume_step=state.step if resume is not None else None) if run.main else NullLog())
    loss_module.train()
    run.bar = tqdm(total=total, initial=state.step, desc="train", unit="step",
                   disable=not (tc.progress and run.main), dynamic_ncols=True)
    return run, state


def resume_state(run: Run, resume: str | Path, print_fn: Callable[[str], None]) -> RunState:
    """Restore the model, optimizer, schedule and RNG from a checkpoint; the state to continue from."""
    ckpt = resolve_resume(resume, run.out, report=print_fn)
    written_in = checkpoint_precision(ckpt)
    if written_in is not None and written_in != run.precision.name:  # refused before anything is restored
        refuse_other_precision(written_in, run.precision, where=f"checkpoint {ckpt}")
    saved = load_checkpoint(ckpt, run.model, run.optimizer, run.scheduler)  # restores RNG last: nothing may follow
    total = run.total
    if saved["total_steps"] != total:
        raise TrainingError(f"checkpoint {ckpt} was written by a run of {saved['total_steps']} steps, this "
                            f"recipe makes {total}; resume with the same train.* settings")
    step = saved["step"]
    state = RunState(step=step, epoch=saved["epoch"], pos=saved["pos"], order=saved["order"],
                     tokens_before=saved.get("tokens", 0), seconds_before=saved.get("seconds", 0.0), last_good=ckpt)
    if step >= total:
        # killed (or stopped) after its last checkpoint: nothing to train; the run's outputs are written again
        # from that checkpoint (the adapter, and by the caller the tokenizer and the plot), as the run would have
        print_fn(f"{ckpt} is the end of its run (step {step} of {total}): nothing left to train; writing the run's "
                 f"outputs from it")
        state.at_end, state.saved_at = True, step
        state.last_loss, state.last_eval = logged_summary(run.out / "metrics.jsonl", step)
        return state
    print_fn(f"resumed from {ckpt} at step {step}/{total}")
    return state
