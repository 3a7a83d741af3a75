"""Dry run: what a LoraConfig would do to a model, without changing the model."""
from __future__ import annotations

import dataclasses

from torch import nn

from .config import LoraConfig
from .plan import AdapterPlan, plan_adapter, plain_modules
from .targets import default_target_modules, experts_left_out
from .variants import ParamSpec, TieSpec

__all__ = ["DryRunReport", "dry_run"]


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@dataclasses.dataclass(frozen=True)
class DryRunReport:
    model_type: str | None
    default_targets: tuple[str, ...] | None
    plan: AdapterPlan
    total_params: int           # base model parameters
    base_bytes: int             # memory of the base weights as loaded

    @property
    def trainable_params(self) -> int:
        return self.plan.n_trainable

    @property
    def all_params(self) -> int:
        """Parameters after injection (base + LoRA), as print_trainable_parameters counts them."""
        return self.total_params + self.plan.n_lora_params + sum(
            _n(s) for s in self.plan.saved_shapes.values())

    def memory_estimate(self) -> dict[str, int]:
        """Bytes for weights, trainable fp32 params, their grads and AdamW's two moments.

        Activations depend on batch and sequence length and are not included.
        """
        t = self.trainable_params * 4
        return {"base_weights": self.base_bytes, "trainable": t, "gradients": t, "adamw_state": 2 * t,
                "total": self.base_bytes + 4 * t}

    def table(self) -> str:
        rows = [("module", "kind", "in", "out", "r", "alpha", "params")]
        for t in self.plan.targets:
            rows.append((t.name, t.kind, str(t.in_features), str(t.out_features), str(t.r), f"{t.alpha:g}",
                         f"{t.n_params:,d}"))
        rows += [_extra_row(e) for e in self.plan.extras]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        mem = self.memory_estimate()
        lines += [
            "",
            f"model_type: {self.model_type}   family default targets: "
            f"{list(self.default_targets) if self.default_targets else 'none'}",
            f"wrapped modules: {len(self.plan.targets)}   modules_to_save: {list(self.plan.modules_to_save) or 'none'}",
            *self._left_out(),
            f"trainable params: {self.trainable_params:,d} || all params: {self.all_params:,d} || "
            f"trainable%: {100 * self.trainable_params / max(self.all_params, 1):.4f}",
            "memory (without activations): " + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in mem.items()),
        ]
        return "\n".join(lines)


    def _left_out(self) -> list[str]:
        left = experts_left_out(self.model_type, self.plan.config.target_parameters)
        if not left:
            return []
        return [f"left out: the fused experts {list(left)} (3-D parameters, no module name reaches them); "
                f"add target_parameters={list(left)} to adapt them"]


def _extra_row(e) -> tuple[str, ...]:
    """A table row for a raw parameter, a tied head or trainable tokens (lorakit.variants)."""
    if isinstance(e, ParamSpec):
        kind = f"param x{e.experts}" if e.experts > 1 else "param"
        return (f"{e.module}.{e.param}", kind, str(e.in_features), str(e.out_features), str(e.r), f"{e.alpha:g}",
                f"{e.n_params:,d}")
    if isinstance(e, TieSpec):
        what = "tied lora" if e.kind == "lora" else "tied copy"
        return (e.head, f"{what} of {e.embedding}", str(e.in_features or ""), str(e.out_features or ""),
                str(e.r or ""), f"{e.alpha:g}" if e.r else "", f"{e.n_params:,d}")
    kind = f"tokens (tied to {e.tied_to})" if e.tied_to else "tokens"
    return (e.module, kind, f"{len(e.indices)} rows", str(e.dim), "", "", f"{e.n_params:,d}")


def _n(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def dry_run(model: nn.Module, config: LoraConfig) -> DryRunReport:
    """List what ``config`` would wrap in ``model`` (names, shapes, parameter counts); the model is untouched."""
    plan = plan_adapter(model, config)
    seen, total, nbytes = set(), 0, 0
    for _, m in plain_modules(model):
        for p in m._parameters.values():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            nbytes += p.numel() * p.element_size()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return DryRunReport(model_type, default_target_modules(model_type), plan, total, nbytes)
