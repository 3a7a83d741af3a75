"""Loading a float32 checkpoint straight into a bfloat16 / float16 model, one tensor at a time.

transformers' own loader, asked for a half-precision model from float32 files, maps the whole float32
file and converts it, so its peak memory is the float32 file plus the half model (the embedded
SmolLM2-135M: ~1.15 GB for a 0.27 GB model), more than loading it in float32. Here each tensor is read
from the file in 1 MiB pieces into its half-precision place (no float32 copy of a whole tensor, no file
mapping), and transformers builds the model from that state dict (key names, tied weights, buffers as
usual). The peak is the half model plus a piece.

Only the plain case takes this path: a local folder of safetensors files, a model class transformers
knows for the config (no remote code), nothing kept in float32 by the class, no quantization; anything
else returns None and the caller uses ``from_pretrained``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Optional

_FILE_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_PIECE = 1 << 20  # values per read


def _files(folder: Path) -> Optional[list[Path]]:
    """The folder's safetensors weight files (one, or the shards its index names); None when there are none."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        files = [folder / n for n in names]
        return files if files and all(f.is_file() for f in files) else None
    single = folder / "model.safetensors"
    return [single] if single.is_file() else None


def _header(fh: Any) -> tuple[dict, int]:
    size = struct.unpack("<Q", fh.read(8))[0]
    header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def _read_into(fh: Any, start: int, entry: dict, dtype: Any):
    """One tensor of the file, converted to ``dtype`` piece by piece."""
    import torch

    source = getattr(torch, _FILE_DTYPES[entry["dtype"]])
    out = torch.empty(entry["shape"], dtype=dtype)
    flat, piece = out.view(-1), torch.empty(min(_PIECE, max(out.numel(), 1)), dtype=source)
    fh.seek(start + entry["data_offsets"][0])
    done = 0
    while done < flat.numel():
        n = min(piece.numel(), flat.numel() - done)
        if fh.readinto(memoryview(piece[:n].view(torch.uint8).numpy())) != n * piece.element_size():
            raise OSError(f"{fh.name} ends inside a tensor")
        flat[done:done + n].copy_(piece[:n])
        done += n
    return out


def half_state_dict(files: list[Path], dtype: Any) -> Optional[dict]:
    """Every tensor of ``files`` in ``dtype``; None when a tensor is not a float of a known kind."""
    state = {}
    for path in files:
        with open(path, "rb") as fh:
            header, start = _header(fh)
            if any(e.get("dtype") not in _FILE_DTYPES for e in header.values()):
                return None
            for key, entry in header.items():
                state[key] = _read_into(fh, start, entry, dtype)
    return state


def _model_class(auto_class: Any, config: Any) -> Any:
    cls = auto_class._model_mapping.get(type(config), None) if hasattr(auto_class, "_model_mapping") else None
    if cls is None or getattr(cls, "_keep_in_fp32_modules", None) or getattr(cls, "_keep_in_fp32_modules_strict", None):
        return None
    return cls


def load_half(auto_class: Any, path: str, dtype: Any, trust_remote_code: bool, model_kwargs: dict) -> Any:
    """The model at ``path`` in ``dtype`` (bfloat16 / float16) read tensor by tensor, or None where this path
    does not apply (see the module doc); errors reading the files also give None (``from_pretrained`` then
    reports them)."""
    import torch
    from transformers import AutoConfig, GenerationConfig

    folder = Path(path).expanduser()
    if dtype not in (torch.bfloat16, torch.float16) or model_kwargs or trust_remote_code or not folder.is_dir():
        return None
    files = _files(folder)
    if files is None:
        return None
    try:
        config = AutoConfig.from_pretrained(folder)
        cls = _model_class(auto_class, config)
        state = half_state_dict(files, dtype) if cls is not None else None
    except (OSError, ValueError, KeyError, TypeError, struct.error, RuntimeError):
        return None
    if state is None:
        return None
    model = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    del state
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.config._name_or_path = str(path)
    model.eval()
    return model
