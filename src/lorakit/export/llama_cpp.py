"""Run an exported GGUF file in llama.cpp (through llama-cpp-python) with lorakit's own ids and evaluators.

``LlamaCppModel`` takes token ids, not text, so a comparison with lorakit sees the same input on both sides;
its ``generate`` has the transformers signature that ``lorakit.eval.classification_eval`` calls, so an
exported model is scored by the very code that scores the PEFT adapter. llama-cpp-python is optional
(``pip install 'lorakit[gguf-check]'``); without it a clear error says so.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from lorakit.errors import ExportError

INSTALL_HINT = ("llama-cpp-python is not installed; install it with pip install 'lorakit[gguf-check]' (it compiles "
                "llama.cpp, which takes minutes)")


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(INSTALL_HINT) from None
    return llama_cpp


class LlamaCppModel:
    """A GGUF model (and optionally a GGUF LoRA adapter) loaded in llama.cpp, fed token ids."""

    def __init__(self, model: str | Path, lora: str | Path | None = None, n_ctx: int = 512, n_threads: int = 2,
                 f32_cache: bool = False):
        """``f32_cache``: keep the attention keys and values in float32 (llama.cpp's default is float16), for
        comparisons down to float32 rounding."""
        llama_cpp = import_llama_cpp()
        cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
        self.llm = llama_cpp.Llama(model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=n_ctx,
                                   logits_all=True, verbose=False, n_threads=n_threads, seed=0, **cache)
        self.training = False

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokenization of ``text`` (special tokens parsed, no BOS added)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def logits(self, ids: Sequence[int]):
        """Next-token logits at every position of ``ids`` (numpy, len(ids) x vocab)."""
        import numpy as np

        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

    def greedy(self, ids: Sequence[int], max_new_tokens: int, eos: int | None) -> list[int]:
        import numpy as np

        self.llm.reset()
        self.llm.eval(list(ids))
        new: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            new.append(token)
            if token == eos:
                break
            self.llm.eval([token])
        return new

    def generate(self, input_ids: Any, attention_mask: Any = None, max_new_tokens: int = 16,
                 eos_token_id: int | None = None, pad_token_id: int | None = None, **_: Any):
        """transformers-style greedy generation of a left-padded batch: the prompt ids, then the new ids
        (rows padded with ``pad_token_id`` to one length)."""
        import torch

        rows = []
        for i, row in enumerate(input_ids.tolist()):
            keep = attention_mask[i].tolist() if attention_mask is not None else [1] * len(row)
            prompt = [t for t, m in zip(row, keep) if m]
            rows.append(row + self.greedy(prompt, max_new_tokens, eos_token_id))
        width = max(len(r) for r in rows)
        pad = pad_token_id if pad_token_id is not None else (eos_token_id or 0)
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows])

    def eval(self) -> "LlamaCppModel":
        return self

    def close(self) -> None:
        """Free llama.cpp's model now (rather than at interpreter exit, where the binding's cleanup can fail)."""
        self.llm.close()
