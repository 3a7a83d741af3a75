"""A transformers model (an adapter merged in, or none) as one GGUF model file that llama.cpp runs alone.

Written as llama.cpp's ``convert_hf_to_gguf.py`` writes the same model: the hyperparameters under
``<arch>.*`` keys, the tokenizer (vocab.py), the chat template, and every weight under its llama.cpp name,
query/key rows reordered for llama.cpp's rotary layout (arch.py). A tied output head is not written (llama.cpp
reuses ``token_embd``). Rotary scaling other than none, linear and Llama 3's is refused, as are weights with
no llama.cpp name: a file llama.cpp cannot run correctly is never written.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import torch

from lorakit.errors import ExportError
from lorakit.export import arch
from lorakit.export.tensors import encode, file_type

_WHAT = "export --to gguf-merged"


def rope_settings(config: Any) -> dict:
    """The rotary settings of a config as one dict (transformers 5 ``rope_parameters`` or older fields)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def add_hparams(writer: Any, config: Any) -> None:
    """The model's hyperparameters under llama.cpp's keys (``llama.block_count``, ...)."""
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_feed_forward_length(int(config.intermediate_size))
    n_head, n_kv = arch.head_counts(config)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    rope = rope_settings(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    kind = str(rope["rope_type"]).lower()
    if kind == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind not in ("default", "llama3"):
        raise ExportError(f"{_WHAT}: the model uses {kind!r} rotary scaling, which lorakit does not write for "
                          f"llama.cpp (it writes none, linear and llama3). Fix: `lorakit merge` and convert the merged folder "
                          f"with llama.cpp's convert_hf_to_gguf.py")


def llama3_rope_factors(config: Any) -> torch.Tensor | None:
    """Llama 3's per-frequency rotary factors (llama.cpp's ``rope_freqs.weight``), or None for other models."""
    rope = rope_settings(config)
    if str(rope["rope_type"]).lower() != "llama3":
        return None
    dim, base = head_dim(config), float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    factors = []
    for freq in 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)):
        wavelen = 2 * math.pi / float(freq)
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def model_tensors(state: dict[str, torch.Tensor], config: Any,
                  spec: arch.ArchSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, tensor) for every weight of a transformers state dict, in llama.cpp's layout."""
    names = arch.tensor_map(config, spec)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for key, value in state.items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reuses token_embd for a tied head
        name = arch.gguf_name(names, key)
        if name is None:
            raise ExportError(f"{_WHAT}: the model has a weight {key} that llama.cpp's {spec.gguf_arch} models do "
                              f"not have; the file would not load. Fix: convert the `lorakit merge` folder with "
                              f"llama.cpp's convert_hf_to_gguf.py")
        t = value.detach().float().cpu()
        module = key.rsplit(".", 1)[0]
        n_head = arch.qk_heads(spec, config, module)
        if n_head is not None:
            t = arch.permute_rows(t, n_head)
        yield name, t
    factors = llama3_rope_factors(config)
    if factors is not None:
        yield "rope_freqs.weight", factors


def build_writer(model: Any, tokenizer_dir: Path, chat_template: str | None, outtype: str, name: str):
    """A filled ``gguf.GGUFWriter`` holding ``model`` (a plain transformers causal LM)."""
    import gguf
    from tqdm import tqdm

    from lorakit.export.vocab import add_vocab

    config = model.config
    spec = arch.arch_spec(config, _WHAT)
    if getattr(config, "model_type", None) == "llama" and int(getattr(config, "pretraining_tp", 1) or 1) != 1:
        raise ExportError(f"{_WHAT}: pretraining_tp={config.pretraining_tp} models are not written; set it to 1")
    writer = gguf.GGUFWriter(path=None, arch=spec.gguf_arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_type(outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hparams(writer, config)
    add_vocab(writer, tokenizer_dir, int(config.vocab_size))
    if chat_template:
        writer.add_chat_template(chat_template)
    state = model.state_dict()
    total = len(state) - int(bool(getattr(config, "tie_word_embeddings", False)) and "lm_head.weight" in state)
    total += int(llama3_rope_factors(config) is not None)
    for tname, t in tqdm(model_tensors(state, config, spec), total=total, desc="Encoding", unit="tensor"):
        data, qtype = encode(t.numpy(), outtype, force_f32=tname.endswith("_norm.weight"))
        writer.add_tensor(tname, data, raw_dtype=qtype)
    return writer


def export_merged(model: Any, tokenizer_dir: Path, chat_template: str | None, out: Path, outtype: str,
                  name: str) -> None:
    """Write ``model`` as a GGUF model file at ``out`` (atomically)."""
    from lorakit.export.files import write_gguf

    write_gguf(build_writer(model, tokenizer_dir, chat_template, outtype, name), out)
