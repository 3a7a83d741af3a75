"""Initialisations that read the base weight (``init_lora_weights``, peft's spellings and math).

For a linear layer with base weight W [out, in] (Conv1D stores [in, out]; it is read and written
transposed), rank r and scale s, A [r, in] and B [out, r] become:

* ``"pissa"`` (Meng et al. 2024): from the SVD W = U S V^T, B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T,
  so that s B A is W's top-r part, and the base becomes the residual W_res = W - s B A. The model's
  output is unchanged; training moves the principal directions. ``"pissa_niter_N"`` uses
  ``torch.svd_lowrank(W, r, niter=N)`` instead (randomised: it draws from torch's generator).
* ``"olora"`` (Büyükakyüz 2024): from the QR decomposition W = Q R, B = Q[:, :r], A = R[:r], W_res = W - s B A.
* ``"orthogonal"``: A and B from the two halves of one random orthogonal r x r matrix, so B A = 0 and the
  base is left alone (r must be even).
* ``"loftq"`` (Li et al. 2023): T times, quantize the residual W - B A to NF4 (4 bits) or int8 and take
  the rank-r SVD of W - dequant(Q) as B A (B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T, no scale, as peft);
  the base becomes dequant(Q). Quantizing with bitsandbytes on the CPU (>= 0.45) gives the NF4 values
  a 4-bit load of that base will hold.

These inits change the base weights, so an adapter trained from them fits only the changed base. Saving
with ``path_initial_model_for_weight_conversion`` (``lorakit.init_conversion``) turns it into a plain
LoRA of rank 2r for the unmodified base. Embedding layers keep the standard init, as in peft.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import LoraError
from ..hf.quant import is_quantized_weight

__all__ = ["BASE_CHANGING_INITS", "changes_base", "init_from_base", "loftq_pair", "svd_factors"]

#: init_lora_weights values that rewrite the base weight (``pissa_niter_N`` counts as "pissa")
BASE_CHANGING_INITS = ("pissa", "olora", "loftq")


def changes_base(init) -> bool:
    return isinstance(init, str) and init.split("_niter_")[0] in BASE_CHANGING_INITS


def _base_matrix(layer, init: str) -> torch.Tensor:
    """The base weight as float32 [out, in]."""
    w = layer.base_layer.weight
    if is_quantized_weight(w):
        raise LoraError(f"init_lora_weights={init!r} reads the base weights, which are quantized here; "
                        f"load the base in full precision (float32/bf16), initialise, then save the changed base "
                        f"and quantize it (for LoftQ: init_lora_weights='loftq' quantizes the base itself).")
    w = w.detach().float()
    return w.t() if getattr(layer, "fan_in_fan_out", False) else w


def _write_base(layer, w: torch.Tensor) -> None:
    weight = layer.base_layer.weight
    w = w.t() if getattr(layer, "fan_in_fan_out", False) else w
    with torch.no_grad():
        weight.data = w.to(weight.dtype).contiguous()


def _set_pair(layer, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    with torch.no_grad():
        a.data = A.to(a.dtype).contiguous()
        b.data = B.to(b.dtype).contiguous()


def _pissa(W: torch.Tensor, r: int, scale: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    if init == "pissa":
        V, S, Uh = torch.linalg.svd(W, full_matrices=False)
        Vr, Sr, Uhr = V[:, :r], S[:r] / scale, Uh[:r]
    else:
        Vr, Sr, Ur = torch.svd_lowrank(W, r, niter=int(init.split("_niter_")[1]))
        Sr, Uhr = Sr / scale, Ur.t()
    root = torch.diag(torch.sqrt(Sr))
    return root @ Uhr, Vr @ root


def _orthogonal(layer, name: str, r: int) -> None:
    Q, _ = torch.linalg.qr(torch.randn(r, r))
    q_odd, q_even = Q[0::2, :], Q[1::2, :]  # orthogonal rows: B A = (.. q_even)(q_odd^T ..) = 0
    A = torch.randn(layer.in_features, r // 2).mm(q_odd).T / 10.0
    B = torch.randn(r // 2, layer.out_features).T.mm(q_even) / 10.0
    _set_pair(layer, name, A, B)


def _quantize_roundtrip(w: torch.Tensor, bits: int) -> torch.Tensor:
    """dequant(quant(w)) through bitsandbytes' own parameter classes, as peft's LoftQ (4-bit NF4, block 64,
    no double quantisation; or int8 row-wise), on the CPU."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise LoraError("init_lora_weights='loftq' quantizes with bitsandbytes: pip install 'lorakit[qlora]' "
                        "(or pip install bitsandbytes).") from None
    w = w.cpu()
    if bits == 4:
        q = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
        return bnb.functional.dequantize_4bit(q.data, q.quant_state).float()
    q = bnb.nn.Int8Params(w, requires_grad=False).to("cpu")
    return bnb.functional.int8_vectorwise_dequant(q.data, q.SCB).float()


def svd_factors(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    L = U @ torch.sqrt(torch.diag(S)[:, :r])
    R = torch.sqrt(torch.diag(S)[:r, :]) @ Vh
    return L, R


@torch.no_grad()
def loftq_pair(W: torch.Tensor, bits: int, r: int, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dequantized base, A, B) of LoftQ for a float32 [out, in] weight (peft's ``loftq_init``)."""
    res = W.clone()
    for i in range(iters):
        dequantized = _quantize_roundtrip(res, bits)
        L, R = svd_factors(W - dequantized, r)
        if i + 1 < iters:
            res = W - L @ R
    return dequantized, R, L


def init_from_base(layer: nn.Module, name: str, config) -> None:
    """Apply ``config.init_lora_weights`` to adapter ``name`` of a freshly created LoRA layer, if it reads
    the base weight (see the module docstring); the standard inits were applied at creation."""
    init = config.init_lora_weights
    if not isinstance(init, str) or init == "gaussian" or not hasattr(layer, "lora_A") or name not in layer.lora_A:
        return  # embeddings (and raw parameters, refused at planning) keep the standard init, as in peft
    r, scale = layer.r[name], layer.scaling[name]
    if init == "orthogonal":
        _orthogonal(layer, name, r)
        return _after(layer, name)
    W = _base_matrix(layer, init)
    if r > min(W.shape):
        raise LoraError(f"init_lora_weights={init!r} needs r <= min(out, in) = {min(W.shape)} for a layer of shape "
                        f"{tuple(W.shape)}; got r={r}. Use a smaller r (rank_pattern) for it.")
    if init == "loftq":
        base, A, B = loftq_pair(W, config.loftq_config["loftq_bits"], r, config.loftq_config["loftq_iter"])
        _set_pair(layer, name, A, B)
        _write_base(layer, base)
        return _after(layer, name)
    if init == "olora":
        Q, R = torch.linalg.qr(W)
        A, B = R[:r], Q[:, :r]
    else:
        A, B = _pissa(W, r, scale, init)
    _set_pair(layer, name, A, B)
    _write_base(layer, W - scale * B @ A)
    _after(layer, name)


def _after(layer, name: str) -> None:
    """DoRA's magnitude starts at the norm of the initialised W + s B A (peft initialises DoRA after these)."""
    if name in getattr(layer, "lora_magnitude_vector", ()):
        layer._init_magnitude(name, layer.lora_A[name].weight.dtype)
