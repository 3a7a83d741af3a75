"""Model loading: the embedded SmolLM2-135M-Instruct (cached safetensors) and any transformers model."""

from lorakit.models.embedded import (
    EMBEDDED_ALIASES,
    ModelLoadError,
    cache_dir,
    embedded_cache_path,
    embedded_gguf_path,
    embedded_model_path,
    load_model_and_tokenizer,
    resolve_dtype,
    resolve_model_path,
)

__all__ = [
    "EMBEDDED_ALIASES",
    "ModelLoadError",
    "cache_dir",
    "embedded_cache_path",
    "embedded_gguf_path",
    "embedded_model_path",
    "load_model_and_tokenizer",
    "resolve_dtype",
    "resolve_model_path",
]
