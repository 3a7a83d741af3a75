"""SharedDropout: LoRA's dropout module; on the CPU one mask per input tensor, shared by every LoRA module reading it.

Where the dispatcher chooses torch's dropout (any device but the CPU, kernels off, torch.compile) it is
``F.dropout`` on the tensor's own device, with torch's generator there: no host RNG, no host copies.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn import functional as F

from . import dispatch, guards
from .masks import draw_keep_mask, pack_keep, torch_seed, unpack_keep

__all__ = ["SharedDropout"]


class _ApplyKeep(torch.autograd.Function):
    """x -> x * keep (no 1/(1-p) scale: callers fold it into a small product).

    Saves only the bit-packed mask (1 bit per element) for backward, where the same mask
    multiplies the incoming gradient once, after autograd has summed the gradients of all
    modules that share this dropped tensor.

    ``exclusive[0]`` stays True while every consumer of the output is one whose backward hands
    over a fresh gradient tensor (lorakit's branch kernels): the incoming gradient then belongs to
    this node alone and is masked in place, sparing a multi-MB allocation (and the page faults of
    fresh memory) per masked input, ~2% of an all-linear training step on CPU.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, exclusive: list) -> torch.Tensor:  # keep: bool, x's shape
        ctx.shape = keep.shape
        ctx.packed = pack_keep(keep) if ctx.needs_input_grad[0] else None
        ctx.exclusive = exclusive
        return mul_keep(x, keep)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        keep = unpack_keep(ctx.packed, ctx.shape)
        if ctx.exclusive[0]:
            return mul_keep_(grad, keep), None, None
        return mul_keep(grad, keep), None, None


# 16-bit floats are masked as their bits: x AND (all ones where kept, zero where dropped), twice as fast as
# torch's bf16 * uint8 loop on the CPU (which widens every element to float32 and back); kept values are
# the same bits, dropped ones +0
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _keep_bits(keep: torch.Tensor) -> torch.Tensor:
    return keep.view(torch.uint8).to(torch.int16).neg_()  # 1 -> -1 (all bits set), 0 -> 0


def mul_keep_(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x *= keep where x may be written (a contiguous CPU float tensor), else x * keep."""
    if x.device.type == "cpu" and x.is_floating_point() and x.is_contiguous() and not x.requires_grad:
        bits = _BITS.get(x.dtype)
        if bits is not None:
            x.view(bits).bitwise_and_(_keep_bits(keep))
            return x
        return x.mul_(keep.view(torch.uint8))
    return mul_keep(x, keep)


def mul_keep(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x * keep in one pass, for a CPU tensor ``x`` and its CPU bool mask (the CPU kernels' masks).

    The mask is read as uint8 (0/1, the same bytes): torch's bool*float loop is far slower than its
    vectorised uint8*float loop, which also uses every thread. 16-bit floats: a bitwise AND (``_BITS``).
    """
    if not x.is_cpu:
        raise ValueError(f"mul_keep is a CPU kernel; got a tensor on {x.device} (the dispatcher sends other "
                         f"devices to torch's dropout)")
    if x.is_floating_point():
        bits = _BITS.get(x.dtype)
        if bits is not None:
            return (x.detach().view(bits) & _keep_bits(keep)).view(x.dtype)
        return x.detach() * keep.view(torch.uint8)
    return x * keep


class SharedDropout(nn.Module):
    """Dropout whose mask is reused while the same input tensor comes again.

    q/k/v (and gate/up) read the same hidden state; one mask for them instead of one each
    keeps dropout's meaning per module (each element kept with probability 1-p, scaled by
    1/(1-p), fresh masks every forward since each forward makes new tensors) at a fraction of
    the cost. The cache is keyed on the tensor object and its in-place version counter, so a
    different or modified tensor always gets a fresh mask.

    ``forward(x)`` returns the usual ``dropout(x)``; LoRA branches call ``drop(x)``, which
    returns the unscaled ``x * mask`` and the 1/(1-p) factor to fold into the [N, r] product.
    Where ``kernels.dispatch`` chooses torch's dropout, both are ``F.dropout`` (factor 1).
    """

    def __init__(self, p: float):
        super().__init__()
        p = float(p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must lie in [0, 1], got {p}; set lora_dropout in [0, 1)")
        self.p = p
        self._key: tuple | None = None
        self._keep: torch.Tensor | None = None
        self._dropped: torch.Tensor | None = None
        self._exclusive: list = [False]

    @property
    def scale(self) -> float:
        """The factor 1/(1-p) that restores the expectation of kept elements (0 when p == 1)."""
        return 0.0 if self.p >= 1.0 else 1.0 / (1.0 - self.p)

    @property
    def active(self) -> bool:
        return self.training and self.p > 0.0

    def drop(self, x: torch.Tensor, fresh_grads: bool = False) -> tuple[torch.Tensor, float]:
        """(x * mask, 1/(1-p)) with the mask shared while ``x`` is the same unmodified tensor.

        ``fresh_grads=True`` promises that the caller only feeds the result to operations whose
        backward makes a new gradient tensor (matmuls, casts, scalings), which lets backward mask
        the summed gradient in place. Leave it False for anything else (e.g. ``dropped + y``).
        """
        if not self.active:
            return x, 1.0
        if dispatch.dropout_route(x) != dispatch.SHARED_MASK:
            return F.dropout(x, self.p, True), 1.0
        keep = self.keep_for(x)
        if self._dropped is not None:
            if not fresh_grads:
                self._exclusive[0] = False
            return self._dropped, self.scale
        exclusive = [fresh_grads]
        self._dropped, self._exclusive = _ApplyKeep.apply(x, keep, exclusive), exclusive
        return self._dropped, self.scale

    def keep_for(self, x: torch.Tensor) -> torch.Tensor:
        """The bool keep mask of ``x`` (x's shape, on the CPU), the same while ``x`` is the same tensor.

        ``drop(x)`` applies this mask; fused kernels (``kernels.siblings``) that apply it themselves take
        it from here, so every consumer of one input sees one mask however its product is computed.
        A CPU kernel: other devices take torch's dropout (``dispatch.dropout_route``).
        """
        if not x.is_cpu:
            raise ValueError(f"keep_for draws CPU masks; got a tensor on {x.device}")
        key = self._key
        if (key is not None and guards.same_tensor(x, key[0], key[1])
                and key[2] == torch.is_grad_enabled()):
            return self._keep
        seed = torch_seed("cpu")
        self._keep = torch.from_numpy(draw_keep_mask(x.numel(), self.p, seed).reshape(x.shape))
        self._key = (weakref.ref(x), guards.version(x), torch.is_grad_enabled())
        self._dropped, self._exclusive = None, [False]
        return self._keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        if dispatch.dropout_route(x) != dispatch.SHARED_MASK:
            return F.dropout(x, self.p, True)
        # dropped * scale makes a new gradient in backward; dropped itself is handed out only unscaled
        dropped, scale = self.drop(x, fresh_grads=self.scale != 1.0)
        return dropped if scale == 1.0 else dropped * scale

    def clear(self) -> None:
        """Forget the cached mask (it is also replaced by the next new input)."""
        self._key, self._keep, self._dropped, self._exclusive = None, None, None, [False]

    def __getstate__(self) -> dict:
        # the cache (a weak reference and a non-leaf activation with its graph) is per forward pass: copies
        # and pickles (copy.deepcopy, torch.save(model), a TRL reference model) start without it
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state.update(_key=None, _keep=None, _dropped=None, _exclusive=[False])
        return state

    def extra_repr(self) -> str:
        return f"p={self.p}"
