"""Metrics sinks: JSON lines (the record), TensorBoard events (optional), and the loss-curve PNG."""

from __future__ import annotations

import json
import math
import os
import textwrap
from pathlib import Path
from typing import Any

from lorakit.io import atomic_savefig, atomic_write_text


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, output_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # Lines written after the checkpoint we resume from describe steps that will be redone.
            kept = [line for line in read_metrics(self.path) if line.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None and (self.path.exists() or self.path.is_symlink()):
            self.path.unlink()
        # appended line by line (a torn last line is skipped when read); never through a link
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tb"), purge_step=resume_step)

    def log(self, record: dict[str, Any], prefix: str = "") -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{prefix}{k}", v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class NullLog:
    """The metrics log of a process that writes nothing (not the main one of a data-parallel run)."""

    path = None

    def log(self, record: dict[str, Any], prefix: str = "") -> None:
        pass

    def close(self) -> None:
        pass


def format_eval(step: int, metrics: dict[str, Any]) -> str:
    """One line for the progress bar: ``[eval @ step 10] eval_loss=1.2345 ...``."""
    parts = [f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
             if isinstance(v, (int, float))]
    return f"[eval @ step {step}] " + " ".join(parts)


def read_metrics(path: str | Path) -> list[dict]:
    out = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line from a crash
            if isinstance(row, dict):
                out.append(row)
    return out


def plot_loss(metrics_path: str | Path, out_png: str | Path, title: str = "") -> Path | None:
    """Training loss per step (and held-out loss where measured) -> PNG. None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    held = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r and math.isfinite(r["eval_loss"])]
    if not train and not held:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over answer tokens)")
    ax.set_title(textwrap.fill(title or "lorakit training", 70), fontsize=10)  # long recipe titles wrap, not clip
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        atomic_savefig(fig, out_png)
    finally:
        plt.close(fig)
    return Path(out_png)


def logged_summary(path: str | Path, step: int) -> tuple[float | None, dict[str, Any]]:
    """(the last training loss logged up to ``step``, the evaluation logged at ``step``) from a metrics file:
    what a run resumed at its end reports, having nothing left to train."""
    rows = read_metrics(path) if Path(path).is_file() else []
    losses = [r["loss"] for r in rows if "loss" in r and r.get("step", 0) <= step]
    evals = [r for r in rows if any(k.startswith("eval_") for k in r) and r.get("step") == step]
    last_eval = {k: v for k, v in evals[-1].items() if k != "step"} if evals else {}
    return (losses[-1] if losses else None), last_eval
