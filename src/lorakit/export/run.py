"""``lorakit export``'s work, one function per target: a GGUF adapter, a merged GGUF model, an Ollama folder.

Everything that can be checked without loading weights (the output path, the adapter's tensors, the base
architecture, the chat template) is checked first; nothing is written until the file or folder is complete.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Callable

from lorakit.errors import ExportError, ModelLoadError
from lorakit.export import files
from lorakit.export.tensors import check_outtype

TARGETS = ("gguf", "gguf-merged", "ollama")
#: the encoding used when --outtype is not given: adapters are small, models are halved
DEFAULT_OUTTYPE = {"gguf": "f32", "gguf-merged": "f16", "ollama": "f16"}


@dataclasses.dataclass(frozen=True)
class ExportRequest:
    model: str
    adapter: str | None
    to: str
    out: str
    outtype: str | None = None
    overwrite: bool = False
    #: --to ollama: one merged model file instead of base + adapter
    merged: bool = False
    #: --to ollama: write a TEMPLATE (False: leave it to Ollama)
    template: bool = True
    trust_remote_code: bool = False

    @property
    def encoding(self) -> str:
        return check_outtype(self.outtype or DEFAULT_OUTTYPE[self.to])


def base_folder(model: str) -> Path:
    """The local folder of a base model: the embedded model's cache, a folder, or a hub id's cached snapshot."""
    from lorakit.models import resolve_model_path

    path = Path(resolve_model_path(model)).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), local_files_only=True))
    except Exception as e:  # noqa: BLE001 - any hub failure means: not available locally
        raise ModelLoadError(f"--model {model} is neither a folder nor a model in the local Hugging Face cache "
                             f"({type(e).__name__}); pass a local folder or `embedded`") from None


def base_config(folder: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the model config in {folder}: {str(e)[:300]}") from None


def to_gguf(req: ExportRequest, say: Callable[[str], None]) -> Path:
    """The adapter as a llama.cpp LoRA adapter file."""
    from lorakit.export.gguf_adapter import export_adapter
    from lorakit.export.source import read_source

    if not req.adapter:
        raise ExportError("--to gguf writes an adapter: pass --adapter DIR")
    out = files.check_out_file(req.out, req.overwrite)
    source = read_source(req.adapter)
    config = base_config(base_folder(req.model), req.trust_remote_code)
    written = export_adapter(source, config, out, req.encoding)
    say(f"wrote {out}: {len(written.tensors) // 2} LoRA pairs, {req.encoding}, adapter.lora.alpha={written.alpha:g}")
    if written.folded:
        say(f"  scaling folded into lora_b for {len(written.folded)} module(s) (rsLoRA / alpha_pattern), so "
            f"llama.cpp's alpha/r computes lorakit's delta")
    base = _embedded_gguf(req.model, base_folder(req.model))
    say(f"  run it: llama-cli -m {base or 'BASE.gguf'} --lora {out}"
        + ("" if base else "   (BASE.gguf: the base model as GGUF, e.g. from `lorakit export --to gguf-merged`)"))
    return out


def _embedded_gguf(model: str, folder: Path) -> Path | None:
    """The embedded model's own GGUF file when ``model`` is the embedded model, else None."""
    from lorakit.models.embedded import embedded_cache_path, embedded_gguf_path, is_embedded_alias

    if is_embedded_alias(model) or folder.resolve() == embedded_cache_path().resolve():
        return embedded_gguf_path()
    return None


def merged_model(req: ExportRequest) -> Any:
    """The base model in float32 with the adapter (if any) merged in, as a plain transformers model."""
    from lorakit.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(req.model, dtype="float32", device="cpu",
                                        trust_remote_code=req.trust_remote_code)
    if not req.adapter:
        return model.eval()
    from lorakit import LoraModel

    _untie_if_adapted(model, req.adapter)
    return LoraModel.from_pretrained(model, req.adapter).merge_and_unload().eval()


def _untie_if_adapted(model: Any, adapter: str) -> None:
    """Give a tied head its own copy of the weight when the adapter wraps the embedding or the head.

    The adapter changes only the module it wraps (the input lookup, or the output product), but merging into
    a weight the two share would change both; the merged model would then not compute what the adapter does.
    """
    import torch

    from lorakit.export.source import read_source

    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None or head.weight is not embed.weight:
        return
    names = {id(m): n for n, m in model.named_modules()}
    wrapped = {p.module for p in read_source(adapter).pairs}
    if names.get(id(head)) in wrapped or names.get(id(embed)) in wrapped:
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False


def to_gguf_merged(req: ExportRequest, say: Callable[[str], None]) -> Path:
    """The merged model as one GGUF file."""
    from lorakit.export.chat_source import chat_template, tokenizer_dir
    from lorakit.export.gguf_merged import export_merged
    from lorakit.export.source import read_source

    out = files.check_out_file(req.out, req.overwrite)
    folder = base_folder(req.model)
    _check_arch(folder, req)
    if req.adapter:
        read_source(req.adapter)  # a broken adapter fails before the model loads
    template, where = chat_template(req.adapter, folder)
    model = merged_model(req)
    export_merged(model, tokenizer_dir(req.adapter, folder), template, out, req.encoding, _name(req))
    say(f"wrote {out}: {'merged ' if req.adapter else ''}{model.config.model_type} model, {req.encoding}"
        f"{', chat template from ' + where if template else ', no chat template'}")
    say(f"  run it: llama-cli -m {out}")
    return out


def _check_arch(folder: Path, req: ExportRequest) -> None:
    from lorakit.export.arch import arch_spec

    arch_spec(base_config(folder, req.trust_remote_code), f"export --to {req.to}")


def _name(req: ExportRequest) -> str:
    """general.name: the adapter folder's name (its parent's for `lorakit train`'s <output>/adapter)."""
    if not req.adapter:
        return Path(str(req.model)).name
    folder = Path(req.adapter).resolve()
    return folder.parent.name if folder.name == "adapter" and folder.parent.name else folder.name


def to_ollama(req: ExportRequest, say: Callable[[str], None]) -> Path:
    """A folder with the GGUF file(s) and a Modelfile for `ollama create`."""
    from transformers import AutoTokenizer

    from lorakit.export.chat_source import chat_template, tokenizer_dir
    from lorakit.export.ollama import modelfile
    from lorakit.export.ollama_template import translate

    if not req.adapter and not req.merged:
        raise ExportError("--to ollama needs --adapter DIR (or --merged to export the base model alone)")
    out = files.check_out_dir(req.out, req.overwrite)
    folder = base_folder(req.model)
    _check_arch(folder, req)
    translation = None
    if req.template:
        template, where = chat_template(req.adapter, folder)
        if template is None:
            raise ExportError(f"no chat template in {req.adapter or folder}; Ollama needs one to chat. Pass "
                              f"--no-template to write the Modelfile without a TEMPLATE")
        translation = translate(template, AutoTokenizer.from_pretrained(tokenizer_dir(req.adapter, folder)))
        if translation.difference:
            say(f"warning: the chat template from {where} resembles {translation.format.name} but differs: "
                f"{translation.difference}. Check the Modelfile's TEMPLATE before relying on it")
    with files.atomic_dir(out) as tmp:
        if req.merged:
            names = _ollama_merged(req, tmp, folder)
        else:
            names = _ollama_unmerged(req, tmp, folder)
        (tmp / "Modelfile").write_text(modelfile(*names, translation), encoding="utf-8")
    fmt = f"TEMPLATE: {translation.format.name}" if translation else "no TEMPLATE"
    say(f"wrote {out}: {', '.join(n for n in names if n)} and a Modelfile ({fmt})")
    say(f"  cd {out} && ollama create {_name(req).lower()} -f Modelfile && ollama run {_name(req).lower()}")
    return out


def _ollama_merged(req: ExportRequest, tmp: Path, folder: Path) -> tuple[str, None]:
    from lorakit.export.chat_source import chat_template, tokenizer_dir
    from lorakit.export.gguf_merged import export_merged

    template, _ = chat_template(req.adapter, folder)
    export_merged(merged_model(req), tokenizer_dir(req.adapter, folder), template, tmp / "model.gguf",
                  req.encoding, _name(req))
    return "model.gguf", None


def _ollama_unmerged(req: ExportRequest, tmp: Path, folder: Path) -> tuple[str, str]:
    """base.gguf + adapter.gguf. The embedded model's base is its own GGUF file, the very weights lorakit
    trained on (dequantised); another base is converted without an adapter."""
    from lorakit.export.gguf_adapter import export_adapter
    from lorakit.export.source import read_source

    source = read_source(req.adapter)
    export_adapter(source, base_config(folder, req.trust_remote_code), tmp / "adapter.gguf", req.encoding)
    own = _embedded_gguf(req.model, folder)
    if own is not None:
        shutil.copyfile(own, tmp / "base.gguf")
    else:
        from lorakit.export.chat_source import chat_template, tokenizer_dir
        from lorakit.export.gguf_merged import export_merged

        template, _ = chat_template(req.adapter, folder)
        base_req = dataclasses.replace(req, adapter=None)
        export_merged(merged_model(base_req), tokenizer_dir(req.adapter, folder), template, tmp / "base.gguf",
                      req.encoding, Path(str(req.model)).name)
    return "base.gguf", "adapter.gguf"
