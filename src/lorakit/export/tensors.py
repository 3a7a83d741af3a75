"""Tensor encodings of a GGUF file: f32, f16 or q8_0, with the same per-tensor rules as llama.cpp's converter.

Vectors (norm weights, biases) stay float32: llama.cpp's kernels take them only in that form. q8_0 packs
rows in blocks of 32; a tensor whose rows are not a multiple of 32 long (a rank-8 ``lora_b``) falls back to
f16, as llama.cpp's converter does.
"""
from __future__ import annotations

from lorakit.errors import ExportError

OUTTYPES = ("f32", "f16", "q8_0")


def check_outtype(outtype: str) -> str:
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype {outtype!r} is not one lorakit writes; use one of {', '.join(OUTTYPES)}")
    return outtype


def file_type(outtype: str):
    """``general.file_type`` of a file written with ``outtype``."""
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[check_outtype(outtype)]


def encode(data, outtype: str, force_f32: bool = False):
    """``(array, quant type)`` for ``GGUFWriter.add_tensor(..., raw_dtype=type)``; ``data`` in torch's order."""
    import gguf
    import numpy as np

    Q = gguf.GGMLQuantizationType
    data = np.ascontiguousarray(data, dtype=np.float32)
    if force_f32 or data.ndim <= 1 or outtype == "f32":
        return data, Q.F32
    if outtype == "q8_0":
        try:
            return gguf.quants.quantize(data, Q.Q8_0), Q.Q8_0
        except gguf.QuantError:
            pass  # rows not a multiple of the block size: f16 below, as llama.cpp's converter does
    return data.astype(np.float16), Q.F16


def decode(array, qtype):
    """The float32 values an encoded array stands for (tests and round-trip checks)."""
    import gguf
    import numpy as np

    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.asarray(array, dtype=np.float32)
    return gguf.quants.dequantize(array, qtype).astype(np.float32)
