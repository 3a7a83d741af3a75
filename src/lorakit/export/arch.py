"""What llama.cpp calls a transformers model's parts: its architecture name and its tensor names.

Names come from the ``gguf`` package's map (the one llama.cpp's own converter uses): ``model.layers.3.
self_attn.q_proj.weight`` is ``blk.3.attn_q.weight`` for every architecture gguf knows. What the map does not
say is the converter's per-architecture handling, so only architectures whose handling is written here are
exported; others are refused by name instead of producing a file llama.cpp would misread.

llama.cpp's Llama code expects the rows of the query and key projections in another order than
transformers (rotary halves interleaved per head, ``convert_hf_to_gguf``'s ``LlamaModel.permute``). The
same row order applies to anything added to those weights: a LoRA delta ``B @ A`` has its rows in ``B``,
so ``B``'s rows are permuted and ``A`` is left alone.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from lorakit.errors import ExportError


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """How one transformers ``model_type`` is written for llama.cpp."""

    #: llama.cpp's architecture name (``general.architecture``), a key of ``gguf.MODEL_ARCH_NAMES`` values
    gguf_arch: str
    #: q_proj / k_proj rows are reordered for llama.cpp's rotary layout (see the module docstring)
    permute_qk: bool


#: transformers model_type -> how llama.cpp holds it. Mistral checkpoints are Llama to llama.cpp's converter.
SUPPORTED: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", permute_qk=True),
    "mistral": ArchSpec("llama", permute_qk=True),
}


def arch_spec(config: Any, what: str) -> ArchSpec:
    """The ArchSpec of a transformers config, or ExportError naming the supported families."""
    model_type = getattr(config, "model_type", None)
    spec = SUPPORTED.get(str(model_type))
    if spec is None:
        raise ExportError(
            f"{what}: the base model is a {model_type!r} model; lorakit writes llama.cpp files for the "
            f"{' and '.join(sorted(SUPPORTED))} families only (their tensor layout is checked against llama.cpp). "
            f"Fix: `lorakit merge` the adapter and convert the merged folder with llama.cpp's "
            f"convert_hf_to_gguf.py, which knows more architectures")
    return spec


def tensor_map(config: Any, spec: ArchSpec):
    """gguf's name map for ``spec`` and the model's layer count."""
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == spec.gguf_arch)
    return gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))


def gguf_name(names, hf_name: str) -> str | None:
    """llama.cpp's name of a transformers parameter (``...weight`` / ``...bias``), or None when unmapped."""
    return names.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def head_counts(config: Any) -> tuple[int, int]:
    """(attention heads, key/value heads) of a config."""
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    return n_head, n_kv


def qk_heads(spec: ArchSpec, config: Any, module: str) -> int | None:
    """The head count to permute ``module``'s output rows by (q_proj: heads, k_proj: kv heads), else None."""
    if not spec.permute_qk:
        return None
    n_head, n_kv = head_counts(config)
    leaf = module.rsplit(".", 1)[-1]
    return {"q_proj": n_head, "k_proj": n_kv}.get(leaf)


def permute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the first dimension per head from transformers' rotary layout to llama.cpp's:
    within each head, rows (first half, second half) become interleaved pairs."""
    rows = t.shape[0]
    if rows % (2 * n_head):
        raise ExportError(f"cannot reorder {rows} rows into {n_head} heads of rotary pairs; the adapter does "
                          f"not fit this base model")
    return t.reshape(n_head, 2, rows // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
