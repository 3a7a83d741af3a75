"""What a serving runtime will refuse in an adapter, or compute differently from lorakit (`lorakit inspect --check`).

Each finding is one of: ``refuses`` (the runtime will not load it, or lorakit's export will not write it),
``differs`` (it loads, but the delta is not lorakit's unless something is done, named in the fix), ``ok``
(a feature that works as in lorakit). The rules are the runtimes' own:

* llama.cpp scales each LoRA pair by ``adapter.lora.alpha / r`` (r from the pair's shape), holds only
  low-rank pairs (no modules_to_save, biases or DoRA magnitudes), and finds a pair by tensor name (so an
  embedding LoRA on a model whose head is tied to the embedding is applied to the head too, and aborts);
* vLLM (``PEFTHelper``) refuses modules_to_save, biases and DoRA, accepts a rank up to ``--max-lora-rank``
  (default 16), and scales every module by the config's ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA):
  rank_pattern and alpha_pattern entries are not read;
* Ollama runs GGUF adapters through llama.cpp, and needs the chat template as a Go TEMPLATE.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from lorakit.export.source import AdapterSource

RUNTIMES = ("llama.cpp", "vllm", "ollama")
VLLM_DEFAULT_MAX_RANK = 16
#: the --max-lora-rank values vLLM accepts
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_MERGE = "export the merged model instead: lorakit export --to gguf-merged (or --to ollama --merged)"


@dataclasses.dataclass(frozen=True)
class Finding:
    level: str  # "refuses" | "differs" | "ok"
    what: str
    fix: str = ""

    def line(self) -> str:
        return f"  {self.level:8s}{self.what}" + (f". Fix: {self.fix}" if self.fix else "")


def _modules(names) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (f" ... ({len(names)} in all)" if len(names) > 3 else "")


def _scale_findings(source: AdapterSource, runtime_scale, who: str, fix: str) -> list[Finding]:
    """Modules whose lorakit scale differs from ``runtime_scale(pair)``, grouped by the ratio."""
    off: dict[float, list[str]] = {}
    for pair in source.pairs:
        ratio = runtime_scale(pair) / pair.scaling
        if not math.isclose(ratio, 1.0, rel_tol=1e-6):
            off.setdefault(round(ratio, 6), []).append(pair.module)
    return [Finding("differs", f"{who} scales {_modules(mods)} by {ratio:g}x lorakit's scale", fix)
            for ratio, mods in sorted(off.items())]


def _common_refusals(source: AdapterSource, who: str, fix: str) -> list[Finding]:
    found = []
    if getattr(source.config, "use_dora", False):
        found.append(Finding("refuses", f"DoRA (use_dora): {who} has no per-row magnitude", fix))
    extra = [n for n in source.extra if "lora_magnitude_vector" not in n]  # DoRA's, reported above
    biases = [n for n in extra if n.endswith(".bias") and source.config.bias != "none"]
    saved = [n for n in extra if n not in biases]
    if saved:
        found.append(Finding("refuses", f"modules_to_save tensors ({_modules(saved)}): {who} adapters hold no "
                                        f"whole tensors", fix))
    if biases:
        found.append(Finding("refuses", f"trained biases ({_modules(biases)}, bias={source.config.bias!r})", fix))
    return found


def llama_cpp_findings(source: AdapterSource, base_config: Any | None) -> list[Finding]:
    found = _common_refusals(source, "a llama.cpp LoRA adapter", _MERGE)
    alpha = float(source.config.lora_alpha)
    folded = _scale_findings(source, lambda p: alpha / p.rank, "llama.cpp (alpha / r)",
                             "lorakit export --to gguf folds this into lora_b, so its file computes lorakit's "
                             "delta; a converter that does not (llama.cpp's convert_lora_to_gguf.py) does not")
    found += folded
    if source.config.rank_pattern:
        found.append(Finding("ok", "rank_pattern: llama.cpp reads each pair's rank from its shape"))
    found += _architecture_findings(source, base_config)
    return found


def _architecture_findings(source: AdapterSource, base_config: Any | None) -> list[Finding]:
    from lorakit.errors import ExportError
    from lorakit.export import arch

    if base_config is None:
        return [Finding("ok", "base model not available here: its architecture, tied head and module names "
                              "were not checked (pass --model)")]
    try:
        spec = arch.arch_spec(base_config, "llama.cpp")
    except ExportError as e:
        return [Finding("refuses", str(e).split(". Fix:")[0].removeprefix("llama.cpp: "),
                        "convert a `lorakit merge` folder with llama.cpp's convert_hf_to_gguf.py")]
    names = arch.tensor_map(base_config, spec)
    tied = bool(getattr(base_config, "tie_word_embeddings", False))
    found = []
    unmapped = [p.module for p in source.pairs if arch.gguf_name(names, p.module + ".weight") is None]
    if unmapped:
        found.append(Finding("refuses", f"modules with no llama.cpp tensor: {_modules(unmapped)}", _MERGE))
    for pair in source.pairs:
        name = arch.gguf_name(names, pair.module + ".weight")
        if tied and (pair.embedding or name == "output.weight"):
            found.append(Finding("refuses", f"{pair.module}: the model's head is tied to the token embedding, "
                                            f"so llama.cpp would apply this pair to both (it aborts)", _MERGE))
    return found


def vllm_findings(source: AdapterSource) -> list[Finding]:
    config = source.config
    found = _common_refusals(source, "vLLM", "merge the adapter (lorakit merge) and serve the merged model")
    rank = max(p.rank for p in source.pairs)
    if rank > VLLM_DEFAULT_MAX_RANK:
        need = next((r for r in VLLM_RANKS if r >= rank), rank)
        found.append(Finding("refuses", f"rank {rank} is above vLLM's default max_lora_rank "
                                        f"{VLLM_DEFAULT_MAX_RANK}", f"start vLLM with --max-lora-rank {need}"))
    vllm_scale = (config.lora_alpha / math.sqrt(config.r)) if config.use_rslora else (config.lora_alpha / config.r)
    found += _scale_findings(source, lambda p: vllm_scale, "vLLM (one lora_alpha / r for every module)",
                             "merge the adapter, or retrain without rank_pattern / alpha_pattern")
    if config.use_rslora:
        found.append(Finding("ok", "rsLoRA: vLLM scales by lora_alpha / sqrt(r) too"))
    if any(p.embedding or p.module.endswith("lm_head") for p in source.pairs):
        found.append(Finding("ok", "embedding / lm_head LoRA: vLLM loads these only for model classes that "
                                   "declare them (embedding_modules); others refuse the adapter"))
    return found


def ollama_findings(source: AdapterSource, base_config: Any | None, template_check: Any = None) -> list[Finding]:
    found = [Finding(f.level, f.what, f.fix) for f in llama_cpp_findings(source, base_config)]
    found.append(Finding("ok", "Ollama applies GGUF adapters through llama.cpp, so llama.cpp's rules (the lines "
                               "above) hold for `lorakit export --to ollama`; with --merged they do not"))
    if template_check is not None:
        found.append(template_check)
    return found


def template_finding(template: str | None, tokenizer: Any) -> Finding:
    """Whether the chat template translates into an Ollama TEMPLATE."""
    from lorakit.errors import ExportError
    from lorakit.export.ollama_template import translate

    if template is None:
        return Finding("refuses", "no chat template: Ollama cannot chat with the model",
                       "train with a tokenizer that has one, or write the Modelfile's TEMPLATE yourself")
    try:
        t = translate(template, tokenizer)
    except ExportError as e:
        return Finding("refuses", str(e).split(". Fix:")[0], "pass --no-template to export and write it yourself")
    if t.difference:
        return Finding("differs", f"the chat template resembles {t.format.name} but {t.difference}",
                       "check the exported Modelfile's TEMPLATE")
    return Finding("ok", f"the chat template is {t.format.name}; export --to ollama writes it as a TEMPLATE")


def check_adapter(adapter_dir: str, runtime: str, model: str | None = None,
                  trust_remote_code: bool = False) -> list[Finding]:
    """The findings for ``runtime``; the base model (``model`` or the adapter's own) is read when available."""
    from lorakit.errors import ConfigError, LoraError
    from lorakit.export.source import read_source

    if runtime not in RUNTIMES:
        raise ConfigError(f"--check {runtime!r}: use one of {', '.join(RUNTIMES)}")
    source = read_source(adapter_dir)
    if runtime == "vllm":
        return vllm_findings(source)
    folder = config = None
    name = model or source.config.base_model_name_or_path
    if name:
        from lorakit.export.run import base_config, base_folder

        try:
            folder = base_folder(name)
            config = base_config(folder, trust_remote_code)
        except LoraError:
            folder = config = None
    if runtime == "llama.cpp":
        return llama_cpp_findings(source, config)
    template = None
    if folder is not None:
        from transformers import AutoTokenizer

        from lorakit.export.chat_source import chat_template, tokenizer_dir

        text, _ = chat_template(adapter_dir, folder)
        where = tokenizer_dir(adapter_dir, folder)
        try:
            tokenizer = AutoTokenizer.from_pretrained(where)
        except (OSError, ValueError):
            template = Finding("ok", f"no tokenizer in {where}: the chat template was not checked")
        else:
            template = template_finding(text, tokenizer)
    return ollama_findings(source, config, template)
