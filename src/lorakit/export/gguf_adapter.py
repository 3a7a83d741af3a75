"""A PEFT-format adapter as a GGUF LoRA adapter, the file llama.cpp loads with ``--lora``.

The file holds, per wrapped module, ``<llama.cpp tensor name>.lora_a`` (A, ggml shape [in, r]) and
``.lora_b`` (B, [r, out]), plus ``general.type=adapter``, ``adapter.type=lora`` and one
``adapter.lora.alpha``. llama.cpp scales each pair by ``alpha / r`` with r read from the pair's own shape,
so a per-module rank (rank_pattern) needs nothing; any other scale (rsLoRA's ``alpha / sqrt(r)``, an
alpha_pattern entry) is folded into B: ``B' = B * scaling / (alpha / r)``, which leaves ``scaling * B @ A``
unchanged. Query/key pairs of Llama models get B's rows permuted as llama.cpp's weights are (see arch.py).

An embedding LoRA is written as llama.cpp's converter writes one: ``token_embd.lora_a`` holds A transposed
(one row of r numbers per token, read with get_rows) and ``lora_b`` holds B.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import ExportError
from lorakit.export import arch
from lorakit.export.source import AdapterSource, LoraPair
from lorakit.export.tensors import encode, file_type


@dataclasses.dataclass(frozen=True)
class AdapterTensors:
    """What goes into the file: llama.cpp name -> float tensor (torch order), the alpha, and what was folded."""

    tensors: dict[str, torch.Tensor]
    alpha: float
    folded: tuple[str, ...]


def merge_advice(what: str) -> str:
    return (f"{what} Fix: export the merged model instead (`lorakit export --to gguf-merged`, or `--to ollama "
            f"--merged`), which folds everything into the weights")


def adapter_tensors(source: AdapterSource, base_config: Any) -> AdapterTensors:
    """The adapter's pairs under llama.cpp's names with scales folded; ExportError for what llama.cpp lacks."""
    if getattr(source.config, "use_dora", False):
        raise ExportError(merge_advice(
            f"{source.path} is a DoRA adapter (use_dora): each row of its weights is rescaled to a trained "
            f"magnitude, which a llama.cpp LoRA adapter cannot express."))
    if source.extra:
        shown = ", ".join(source.extra[:4]) + (f", ... ({len(source.extra)} in all)" if len(source.extra) > 4 else "")
        raise ExportError(merge_advice(
            f"{source.path} also holds whole tensors ({shown}): modules_to_save copies or trained biases. A llama.cpp "
            f"LoRA adapter holds only low-rank pairs, so it would silently run without them."))
    spec = arch.arch_spec(base_config, "export --to gguf")
    names = arch.tensor_map(base_config, spec)
    tied = bool(getattr(base_config, "tie_word_embeddings", False))
    alpha = float(source.config.lora_alpha)
    out: dict[str, torch.Tensor] = {}
    folded = []
    for pair in source.pairs:
        name = _target_name(pair, names, tied, source.path)
        B = pair.B
        factor = pair.scaling / (alpha / pair.rank)
        if factor != 1.0:
            B = B * factor
            folded.append(pair.module)
        n_head = arch.qk_heads(spec, base_config, pair.module)
        if n_head is not None:
            B = arch.permute_rows(B, n_head)
        out[name + ".lora_a"] = pair.A.t().contiguous() if pair.embedding else pair.A
        out[name + ".lora_b"] = B
    return AdapterTensors(out, alpha, tuple(folded))


def _target_name(pair: LoraPair, names, tied: bool, path: str) -> str:
    name = arch.gguf_name(names, pair.module + ".weight")
    if name is None:
        raise ExportError(merge_advice(f"{path}: the adapter wraps {pair.module}, which has no llama.cpp "
                                       f"counterpart to apply a LoRA pair to."))
    if tied and name == "output.weight":
        raise ExportError(merge_advice(
            f"{path}: the adapter wraps the output head {pair.module}, but this model ties it to the token "
            f"embedding, and llama.cpp has no separate head tensor to apply the pair to."))
    if tied and pair.embedding:
        # llama.cpp finds a LoRA pair by tensor name, and a tied model's head *is* token_embd: the pair made
        # for the input lookup is also applied, with the wrong shapes, to the output product (llama.cpp aborts).
        raise ExportError(merge_advice(
            f"{path}: the adapter wraps the token embedding {pair.module} of a model whose output head is tied "
            f"to it; llama.cpp would apply the embedding's pair to the head as well."))
    return name


def build_writer(tensors: AdapterTensors, gguf_arch: str, outtype: str, name: str):
    """A filled ``gguf.GGUFWriter`` for the adapter file."""
    import gguf

    writer = gguf.GGUFWriter(path=None, arch=gguf_arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, tensors.alpha)
    writer.add_name(name)
    writer.add_file_type(file_type(outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for tname, t in tensors.tensors.items():
        data, qtype = encode(t.detach().cpu().numpy(), outtype)
        writer.add_tensor(tname, data, raw_dtype=qtype)
    return writer


def export_adapter(source: AdapterSource, base_config: Any, out: Path, outtype: str) -> AdapterTensors:
    """Write ``source`` as a GGUF LoRA adapter at ``out`` (atomically); returns what was written."""
    from lorakit.export.files import write_gguf

    tensors = adapter_tensors(source, base_config)
    spec = arch.arch_spec(base_config, "export --to gguf")
    writer = build_writer(tensors, spec.gguf_arch, outtype, Path(source.path).resolve().name)
    write_gguf(writer, out, progress=False)
    return tensors
