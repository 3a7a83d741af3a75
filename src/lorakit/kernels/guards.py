"""The private torch APIs the kernels read, each behind one guard with a public fallback; the log of fallbacks.

Each ``_lookup_*`` reads one private name from torch and returns None when this torch has no such
name; the module keeps the result (looked up once at import) and the function below it says what
the kernels do without it. Tests take a name away (``monkeypatch``) and check the fallback.

    torch.ops.mkldnn._linear_pointwise                   oneDNN's linear: F.linear / addmm (MKL) instead
    torch._C._autograd._top_saved_tensors_default_hooks  "are saved-tensor hooks on?": unknown = yes,
                                                          so the sibling kernel stays off
    torch.nn.modules.module._global_forward_hooks        "global module hooks?": unknown = yes,
    torch.nn.modules.module._global_forward_pre_hooks     so every LoRA layer takes the reference path
    torch.ops.aten._log_softmax.out                       torch.log_softmax into a new tensor
    nn.Module's _parameters, _forward_hooks, _forward_pre_hooks (read from the instance, once per LoRA
    layer call, where ``module.weight`` costs a Python __getattr__): ``module.weight`` / unknown = hooked
    Tensor._version (in-place version counter: "is this still the tensor I saw?"): unknown = never the same,
                                                          so nothing cached per input is reused
    Tensor._base ("is this tensor a view?"): unknown = a view, so nothing is written in place
"""
from __future__ import annotations

import logging

import torch
from torch.nn.modules import module as _module

__all__ = ["global_module_hooks", "is_view", "layer_facts", "log_softmax_into", "module_hooks", "module_weight",
           "note_fallback", "onednn_linear", "saved_tensor_hooks", "version"]

log = logging.getLogger("lorakit.kernels")

# which fallbacks were logged: once per (kernel, reason) for the process, as the log itself is per process
_said: set[tuple[str, str]] = set()


def note_fallback(kernel: str, reason: str) -> None:
    """Log, once per process and reason, that ``kernel`` is not used and why."""
    key = (kernel, reason)
    if key not in _said:
        _said.add(key)
        log.warning("lorakit kernel %r is off, the reference path runs instead: %s", kernel, reason)


def _lookup_onednn_linear():
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):  # no mkldnn namespace or no such op in this build
        return None


def _lookup_top_hooks():
    return getattr(getattr(torch._C, "_autograd", None), "_top_saved_tensors_default_hooks", None)


def _lookup_global_hooks():
    hooks = getattr(_module, "_global_forward_hooks", None)
    pre = getattr(_module, "_global_forward_pre_hooks", None)
    return None if hooks is None or pre is None else (hooks, pre)


def _lookup_log_softmax_out():
    try:
        return torch.ops.aten._log_softmax.out
    except (AttributeError, RuntimeError):
        return None


def _lookup_tensor_attr(name: str) -> bool:
    return hasattr(torch.zeros(1).view(1), name)


_ONEDNN_LINEAR = _lookup_onednn_linear()
_TOP_HOOKS = _lookup_top_hooks()
_GLOBAL_HOOKS = _lookup_global_hooks()  # torch mutates these two dicts in place: holding them is enough
_LOG_SOFTMAX_OUT = _lookup_log_softmax_out()
_HAS_VERSION = _lookup_tensor_attr("_version")
_HAS_BASE = _lookup_tensor_attr("_base")


def onednn_linear():
    """oneDNN's linear op, or None (the caller then uses torch's F.linear)."""
    return _ONEDNN_LINEAR


def saved_tensor_hooks() -> bool:
    """Are saved-tensor hooks active (non-reentrant checkpointing, offloading)? True when torch cannot say."""
    if _TOP_HOOKS is None:
        note_fallback("siblings", "this torch has no _top_saved_tensors_default_hooks to tell whether "
                                  "saved-tensor hooks are active")
        return True
    try:
        return _TOP_HOOKS(False) is not None
    except (RuntimeError, TypeError) as exc:  # the private signature changed
        note_fallback("siblings", f"_top_saved_tensors_default_hooks failed: {exc}")
        return True


def global_module_hooks() -> bool:
    """Are global module forward (pre-)hooks registered? True when torch cannot say."""
    if _GLOBAL_HOOKS is None:
        note_fallback("lora-linear", "this torch has no _global_forward_hooks to tell whether global module "
                                     "hooks are registered")
        return True
    return bool(_GLOBAL_HOOKS[0] or _GLOBAL_HOOKS[1])


def module_weight(module: torch.nn.Module) -> torch.Tensor:
    """``module.weight``, read from the module's parameter table when it is there (no __getattr__ call)."""
    params = module.__dict__.get("_parameters")
    weight = params.get("weight") if params is not None else None
    return weight if weight is not None else module.weight


def module_hooks(module: torch.nn.Module) -> bool:
    """Has ``module`` forward (pre-)hooks or a replaced forward, or are global module hooks registered?
    True when torch's module keeps its hooks under other names (cannot tell)."""
    d = module.__dict__
    hooks, pre = d.get("_forward_hooks"), d.get("_forward_pre_hooks")
    if hooks is None or pre is None:
        note_fallback("lora-linear", "nn.Module keeps no _forward_hooks / _forward_pre_hooks here to tell "
                                     "whether a layer is hooked")
        return True
    return bool(hooks or pre) or "forward" in d or global_module_hooks()


def layer_facts(module: torch.nn.Module) -> tuple[torch.Tensor, bool]:
    """``(module_weight(module), module_hooks(module))`` in one call (once per LoRA layer call)."""
    d = module.__dict__
    params, hooks, pre = d.get("_parameters"), d.get("_forward_hooks"), d.get("_forward_pre_hooks")
    weight = params.get("weight") if params is not None else None
    if weight is None or hooks is None or pre is None:
        return module_weight(module), module_hooks(module)
    g = _GLOBAL_HOOKS
    return weight, bool(hooks or pre or "forward" in d or g is None or g[0] or g[1]) and module_hooks(module)


def version(t: torch.Tensor) -> int | None:
    """``t``'s in-place version counter, or None when torch cannot say (then compare nothing as equal)."""
    return t._version if _HAS_VERSION else None


def same_tensor(t: torch.Tensor, ref, seen_version: int | None) -> bool:
    """Is ``t`` the tensor ``ref`` (a weak reference) pointed to, unmodified since its version was ``seen_version``?"""
    return ref() is t and seen_version is not None and seen_version == version(t)


def is_view(t: torch.Tensor) -> bool:
    """Does ``t`` share another tensor's storage as a view? True when torch cannot say."""
    return t._base is not None if _HAS_BASE else True


def log_softmax_into(logits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits, 1)`` written into ``out`` when torch lets us, else a new tensor."""
    if _LOG_SOFTMAX_OUT is not None:
        return _LOG_SOFTMAX_OUT(logits, 1, False, out=out)
    return torch.log_softmax(logits, 1)
