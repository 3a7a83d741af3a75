"""Products with the base model's frozen linear weights, through oneDNN on the CPU.

LoRA training spends most of a step in two products per frozen linear: ``x @ W.T`` forward and
``g @ W`` for the input gradient. torch runs float32 ``F.linear``/``mm`` on the CPU through MKL's
sgemm; its own oneDNN kernels (``torch.ops.mkldnn._linear_pointwise``, what torch.compile emits for
CPU linears) run the same products faster where MKL takes a generic path, as on AMD CPUs.

Same float32 arithmetic (another summation order: results agree with MKL's to float32 rounding).
The op is private to torch (``guards.onednn_linear``): it is checked once per process against
``F.linear`` before first use, and when it is missing, fails or disagrees, torch's F.linear / addmm
run instead (logged once). The products take float32 or bfloat16 (each dtype checked on its own); the
frozen products of training use it for float32 only (``FROZEN_DTYPES``: torch's own bf16 matmul was as fast
or faster on a whole step), inside lorakit's training forward (``frozen_linears``, when ``dispatch`` chooses
it) and its CPU kernels; the fused head uses it for both.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from . import guards

__all__ = ["FROZEN_DTYPES", "available", "base_linear", "add_linear_t", "frozen_linears", "usable"]

_lp = guards.onednn_linear()
# whether this torch build's op works is a fact of the process: checked once per dtype, kept for it
_checked: dict[torch.dtype, bool] = {}
#: dtypes the products here may take: float32 and bfloat16 (train.precision bf16; oneDNN runs it on AMX
#: or AVX-512 BF16 where the CPU has them), each with its own check
DTYPES = (torch.float32, torch.bfloat16)
#: dtypes whose frozen products in training (a forward, then the input gradient) run faster here than
#: through torch's own F.linear / addmm: float32 (MKL's sgemm takes a generic path on AMD CPUs). Not
#: bfloat16: torch's bf16 matmul is oneDNN already, and on an AVX-512 BF16 CPU (AMD EPYC) it ran a
#: SmolLM2-135M linear's forward + backward ~10% faster than ``_linear_pointwise``, whose accumulating
#: product (``add_linear_t``) was the slower part
FROZEN_DTYPES = (torch.float32,)
# agreement with F.linear asked of each dtype's check (relative to the products' scale)
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def available(dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN's linear exists here and agrees with ``F.linear`` in ``dtype`` (checked once per process)."""
    ok = _checked.get(dtype)
    if ok is None:
        ok = _checked[dtype] = dtype in DTYPES and _self_test(dtype)
    return ok


def _self_test(dtype: torch.dtype = torch.float32) -> bool:
    if _lp is None:
        guards.note_fallback("onednn", "torch.ops.mkldnn._linear_pointwise is not in this torch build")
        return False
    if not torch.backends.mkldnn.is_available():
        guards.note_fallback("onednn", "torch was built without oneDNN (mkldnn)")
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 37, 48, generator=g).to(dtype)
        W = torch.randn(40, 48, generator=g).to(dtype)
        b = torch.randn(40, generator=g).to(dtype)
        y = _lp(x, W, b, "none", [], "")
        gy = torch.randn(2, 37, 40, generator=g).to(dtype)
        gx = _lp(gy, W.t(), None, "none", [], "")
        acc = _lp.binary(gy.reshape(-1, 40), gx.reshape(-1, 48), W.t(), None, "add")
    except (RuntimeError, TypeError, AttributeError, NotImplementedError) as exc:  # a private op that changed
        guards.note_fallback("onednn", f"oneDNN's linear failed its check: {type(exc).__name__}: {exc}")
        return False
    ref_y, ref_gx = F.linear(x.double(), W.double(), b.double()), gy.double() @ W.double()
    tol = _TOLERANCE[dtype] * 10  # products of 48 unit normals: entries of size ~7
    if not (y.dtype == gx.dtype == acc.dtype == dtype
            and torch.allclose(y.double(), ref_y, rtol=tol, atol=tol)
            and torch.allclose(gx.double(), ref_gx, rtol=tol, atol=tol)
            and torch.allclose(acc.double(), 2 * ref_gx.reshape(-1, 48), rtol=tol, atol=tol)):
        guards.note_fallback("onednn", f"oneDNN's {dtype} linear disagrees with F.linear here")
        return False
    return True


def usable(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None) -> bool:
    """Would ``x @ W.T + b`` run through oneDNN here (float32 or bfloat16 CPU tensors of one dtype, no
    autocast, oneDNN usable for that dtype)?"""
    return (x.dtype in DTYPES and W.dtype is x.dtype and x.device.type == "cpu"
            and W.device.type == "cpu" and W.dim() == 2 and x.dim() >= 2 and x.numel() > 0
            and x.shape[-1] == W.shape[1] and not torch.is_autocast_enabled("cpu")
            and (b is None or (b.dtype is x.dtype and b.dim() == 1)) and available(x.dtype))


def base_linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, b)`` without autograd (inside a kernel's forward), through oneDNN when it fits."""
    if usable(x, W, b):
        return _lp(x.contiguous(), W, b, "none", [], "")
    return F.linear(x, W, b)


def add_linear_t(acc: torch.Tensor, g: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``acc + g @ W`` for 2-D ``acc`` [N, in], ``g`` [N, out], ``W`` [out, in]; may reuse ``acc``."""
    if usable(g, W.t(), None) and acc.dtype is g.dtype and acc.is_contiguous():
        return _lp.binary(g.contiguous(), acc, W.t(), None, "add")
    return acc.addmm_(g, W)


class _FrozenLinear(torch.autograd.Function):
    """y = x @ W.T + b with W and b frozen: backward forms only the input gradient, g @ W."""

    @staticmethod
    def forward(ctx, x, W, b):
        ctx.save_for_backward(W)
        return _lp(x.contiguous(), W, b, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        (W,) = ctx.saved_tensors
        return _lp(grad.contiguous(), W.t(), None, "none", [], ""), None, None


def _frozen(t) -> bool:
    return type(t) is nn.Parameter and not t.requires_grad


class _FrozenLinearMode(TorchFunctionMode):
    """Sends ``F.linear`` calls with a frozen float32 or bfloat16 CPU weight (and bias) to oneDNN; all else as is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2:
            x, W = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if (type(x) is torch.Tensor and _frozen(W) and (b is None or _frozen(b)) and len(kwargs) <= 1
                    and usable(x, W, b)):
                if torch.is_grad_enabled() and x.requires_grad:
                    return _FrozenLinear.apply(x, W, b)
                return _lp(x.contiguous(), W, b, "none", [], "")
        return func(*args, **kwargs)


def frozen_linears(active: bool = True):
    """A context in which the model's frozen float32 / bfloat16 CPU linears run through oneDNN (see module doc).

    ``active``: what the dispatcher chose (``Choice.frozen == "onednn"``); a no-op context when False or
    when oneDNN is not usable here.
    """
    if not (active and (available(torch.float32) or available(torch.bfloat16))):
        return contextlib.nullcontext()
    return _FrozenLinearMode()
