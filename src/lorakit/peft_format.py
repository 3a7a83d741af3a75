"""Adapter folders in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Everything about the on-disk format lives here: PEFT key names (``base_model.model.<path>.lora_A.weight``),
reading and writing folders, and the check of a file against a model before anything is loaded. This
module never imports ``model``: it reads a LoraModel only through ``peft_config``, ``_plans`` and
``lora_state_dict``.

Writes are atomic (a temp file renamed into place), so a crash never leaves a half-written
adapter that looks complete. Reads refuse pickles unless asked, and then load tensors only.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping

import torch
from torch import nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import CONFIG_NAME, LoraConfig
from .errors import AdapterLoadError, ConfigError, LoraError
from .io import UnreadableFile, atomic_paths, atomic_save_tensors, load_plain_tensors, save_safetensors, write_to_temp
from .init_conversion import to_plain_lora, warn_random_init
from .plan import PEFT_PREFIX, plan_adapter

__all__ = ["PICKLE_WEIGHTS_NAME", "WEIGHTS_NAME", "adapter_state_dict", "atomic_save_file", "check_state_dict", "peft_key",
           "peft_load_options", "read_adapter", "read_checked", "save_adapter"]

_ADAPTER_KEY = re.compile(
    r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|lora_dropout|modules_to_save|trainable_tokens_delta)"
    r"\.([^.]+)(?=\.|$)")

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """safetensors save through a fresh temp file in the same folder, then rename (``io.atomic_save_tensors``)."""
    atomic_save_tensors(tensors, path, metadata=metadata)


def save_adapter(model, directory: str | os.PathLike, adapter_name: str, initial: str | os.PathLike | None = None
                 ) -> None:
    """Write one adapter of ``model`` to ``directory`` in PEFT's format.

    ``initial``: the adapter folder saved before training (peft's ``path_initial_model_for_weight_conversion``):
    the adapter is written as a plain LoRA of rank 2r for the base before PiSSA/OLoRA changed it
    (``lorakit.init_conversion``).
    """
    directory = os.fspath(directory)
    config = model.peft_config[adapter_name]
    plan = model._plans[adapter_name]
    if config.target_modules is None or isinstance(config.target_modules, str) and config.target_modules == "all-linear":
        # record the resolved module names, so readers without our defaults (vLLM, converters) see them
        config = config.replace(target_modules=sorted({t.name.rsplit(".", 1)[-1] for t in plan.targets}))
    if config.base_model_name_or_path is None:
        name = getattr(getattr(model.model, "config", None), "_name_or_path", None) or None
        if name:
            config = config.replace(base_model_name_or_path=name)
    # what peft writes, for readers that go by the config: saved heads chosen by the task type (SEQ_CLS's
    # classifier/score), fan_in_fan_out for Conv1D targets (GPT-2), inference_mode true on disk
    changes = {"inference_mode": True}
    if config.modules_to_save is None and plan.modules_to_save:
        changes["modules_to_save"] = sorted({p.rsplit(".", 1)[-1] for p in plan.modules_to_save})
    if not config.fan_in_fan_out and any(t.kind == "conv1d" for t in plan.targets):
        changes["fan_in_fan_out"] = True
    config = config.replace(**changes)
    weights = _unshared(model.lora_state_dict(adapter_name))
    if initial is not None:
        config, weights = to_plain_lora(config, weights, read_adapter(initial)[1], os.fspath(initial))
    write_adapter_files(directory, config, weights)


def write_adapter_files(directory: str, config: LoraConfig, weights: dict[str, torch.Tensor]) -> None:
    """adapter_model.safetensors + adapter_config.json, both written and synced before either is renamed into
    place (``io.atomic_paths``): a failure (disk full, read-only folder) changes neither file."""
    plain = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    text = json.dumps(config.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    with atomic_paths([os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, CONFIG_NAME)],
                      [".safetensors", ".json"]) as (weights_tmp, config_tmp):
        save_safetensors(plain, weights_tmp, metadata={"format": "pt"})
        write_to_temp(config_tmp, text.encode("utf-8"))


def _unshared(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A tensor under two keys (a tied head's saved copy is the embedding's) is written twice, as peft does:
    safetensors refuses shared storage."""
    seen: set[int] = set()
    out = {}
    for key, t in weights.items():
        ptr = t.untyped_storage().data_ptr()
        out[key] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def adapter_folder(save_directory, adapter_name: str) -> str:
    """Where ``save_pretrained`` writes an adapter: the folder itself for "default", a subfolder for others."""
    if not isinstance(save_directory, (str, os.PathLike)):
        raise LoraError(f"save_directory must be a path (str or os.PathLike); got {type(save_directory).__name__} "
                        f"{save_directory!r}.")
    return os.fspath(save_directory) if adapter_name == "default" else os.path.join(save_directory, adapter_name)


def read_adapter(directory: str | os.PathLike, allow_pickle: bool = False) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read and check an adapter folder; raises AdapterLoadError naming the file and the problem."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise AdapterLoadError(f"adapter folder {directory} does not exist (it should hold {CONFIG_NAME} "
                               f"and {WEIGHTS_NAME}).")
    try:
        config = LoraConfig.from_pretrained(directory)
    except ConfigError as e:
        raise AdapterLoadError(f"cannot read the adapter config in {directory}: {e}") from None
    st_path = os.path.join(directory, WEIGHTS_NAME)
    bin_path = os.path.join(directory, PICKLE_WEIGHTS_NAME)
    if os.path.isfile(st_path):
        try:
            weights = load_file(st_path)
        except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
            raise AdapterLoadError(
                f"{st_path} is corrupt or truncated ({e}); save the adapter again or re-download it."
            ) from None
    elif os.path.isfile(bin_path):
        if not allow_pickle:
            raise AdapterLoadError(
                f"{directory} holds only {PICKLE_WEIGHTS_NAME}, a pickle, which can run code when loaded. "
                f"If you trust its source, pass allow_pickle=True (tensors only, weights_only=True), "
                f"or convert it to {WEIGHTS_NAME}."
            )
        try:
            weights = load_plain_tensors(bin_path)
        except UnreadableFile as e:
            raise AdapterLoadError(f"{bin_path}: {e}; convert it to {WEIGHTS_NAME} from a source you trust.") from None
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise AdapterLoadError(f"{bin_path} does not hold a dict of tensors.")
    else:
        raise AdapterLoadError(f"no adapter weights in {directory}: expected {WEIGHTS_NAME}.")
    return config, weights


def _model_key(name_or_path: str) -> str:
    """A model's name for comparison: the embedded model's aliases and cache folder are one name."""
    from .models.embedded import embedded_cache_path, is_embedded_alias

    name = name_or_path.rstrip("/")
    if is_embedded_alias(name) or os.path.abspath(os.path.expanduser(name)) == os.path.abspath(embedded_cache_path()):
        return "embedded"
    return os.path.basename(name)


def warn_if_other_base(config: LoraConfig, model, directory: str) -> None:
    """Shapes catch most mismatches; a differing recorded base-model name catches the rest (a warning:
    a local path and a hub name can mean the same model)."""
    made_for = config.base_model_name_or_path
    this = getattr(getattr(model, "config", None), "_name_or_path", None)
    if made_for and this and _model_key(made_for) != _model_key(str(this)):
        warnings.warn(
            f"adapter in {directory} was made for {made_for!r} but is loaded on {this!r}; its shapes fit, "
            f"but its weights were trained on another model.", stacklevel=3)


#: peft loading options that change nothing for a local folder read onto the model's own devices
_PEFT_LOAD_NOOPS = frozenset({"low_cpu_mem_usage", "torch_device", "ephemeral_gpu_offload", "revision", "token",
                              "cache_dir", "local_files_only", "use_auth_token"})


def peft_load_options(adapter_dir: str | os.PathLike, kwargs: dict) -> str:
    """Apply peft's from_pretrained / load_adapter keyword arguments; refuse what lorakit cannot honour.

    ``subfolder`` is joined to the path; options about downloading or placement are accepted and change
    nothing (adapters go to their base layers' devices); ``autocast_adapter_dtype=False`` (adapters in a
    half-precision base's dtype) and ``config=`` (overriding the saved config) are not supported.
    """
    if not isinstance(adapter_dir, (str, os.PathLike)):
        raise AdapterLoadError(f"the adapter folder must be a path (str or os.PathLike); got "
                               f"{type(adapter_dir).__name__} {adapter_dir!r}.")
    path = os.fspath(adapter_dir)
    for key, value in kwargs.items():
        if key == "subfolder":
            path = os.path.join(path, value) if value else path
        elif key == "autocast_adapter_dtype":
            if not value:
                raise LoraError("autocast_adapter_dtype=False is not supported: lorakit keeps adapters over a "
                                "half-precision base in float32 (peft's default); drop the argument.")
        elif key == "config":
            if value is not None:
                raise LoraError("passing config= to override the saved adapter_config.json is not supported; edit "
                                "the folder's adapter_config.json or load it as saved.")
        elif key not in _PEFT_LOAD_NOOPS:
            raise TypeError(f"unexpected keyword argument {key!r} for loading an adapter (lorakit takes peft's "
                            f"{sorted(_PEFT_LOAD_NOOPS | {'subfolder', 'autocast_adapter_dtype', 'config'})})")
    return path


def read_checked(model: nn.Module, adapter_dir: str | os.PathLike, is_trainable: bool, allow_pickle: bool,
                  wrapped: set[str]) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read an adapter folder and check it against ``model`` completely; the model is not touched."""
    from .peft_format import read_adapter, warn_if_other_base

    config, weights = read_adapter(adapter_dir, allow_pickle=allow_pickle)
    warn_random_init(config, os.fspath(adapter_dir))
    if config.inference_mode == is_trainable:
        config = config.replace(inference_mode=not is_trainable)
    try:
        plan = plan_adapter(model, config, wrapped=wrapped, strict=False)  # the file's keys are checked instead
    except LoraError as e:
        raise AdapterLoadError(f"adapter at {adapter_dir} does not fit this model: {e}") from None
    weights = _drop_embedding_base_weights(model, weights, plan.expected_keys(), os.fspath(adapter_dir))
    check_state_dict(weights, plan.expected_keys(), what=f"adapter file in {adapter_dir}")
    warn_if_other_base(config, model, os.fspath(adapter_dir))
    return config, weights


def _drop_embedding_base_weights(model: nn.Module, weights: dict[str, torch.Tensor], expected: dict, where: str
                                 ) -> dict[str, torch.Tensor]:
    """Drop the base embedding weights peft adds with ``save_embedding_layers`` (an input or output
    embedding's ``weight``, or a targeted one's ``base_layer.weight``): lorakit never loads base weights.
    Warns when they differ from this model's (e.g. the vocabulary was resized before training and the
    new rows were trained or initialised differently): load or resize the base model they came from."""
    embeddings = {}
    for get in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, get, None)
        module = fn() if callable(fn) else None
        module = getattr(module, "base_layer", module)
        module = getattr(module, "original_module", module)
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            for path, m in model.named_modules():
                if getattr(m, "weight", None) is weight:
                    embeddings[PEFT_PREFIX + path.removesuffix(".base_layer") + ".weight"] = weight
    kept, differ = {}, []
    for key, value in weights.items():
        plain = key.replace(".base_layer.weight", ".weight") if key.endswith(".base_layer.weight") else key
        if key not in expected and plain in embeddings:
            ours = embeddings[plain]
            if ours.shape != value.shape or not torch.allclose(ours.detach().float().cpu(), value.float(), atol=1e-6):
                differ.append(key)
            continue
        kept[key] = value
    if differ:
        import warnings

        warnings.warn(f"adapter file in {where} carries base embedding weights (peft's save_embedding_layers) that "
                      f"differ from this model's: {differ}; lorakit loads only the adapter. If the vocabulary was "
                      f"resized for training, resize this model the same way (and load those rows) first.",
                      stacklevel=4)
    return kept


def peft_key(key: str, adapter_name: str) -> str | None:
    """Model state-dict key -> PEFT file key for ``adapter_name`` (None if it belongs to another adapter)."""
    m = _ADAPTER_KEY.search(key)
    if m:
        if m.group(2) != adapter_name:
            return None
        kept = "" if m.group(1) == "modules_to_save" else "." + m.group(1)  # the adapter name never goes in a key
        key = key[: m.start()] + kept + key[m.end():]
    return PEFT_PREFIX + key


#: peft's keys for a parameter inside a modules_to_save wrapper: (head path, parameter name)
_PEFT_WRAPPER_KEY = re.compile(r"^(.*?)\.(?:modules_to_save|original_module)\.(.+)$")


def _peft_wrapper_duplicate(key: str, value: torch.Tensor, expected: dict[str, tuple[int, ...]]) -> bool:
    """Is ``key`` peft's extra copy of an expected head parameter (``<head>.modules_to_save[.<adapter>].<p>``
    or ``<head>.original_module.<p>``, written with bias="all") with that parameter's shape?"""
    m = _PEFT_WRAPPER_KEY.match(key)
    if not m:
        return False
    head, rest = m.groups()
    candidates = [rest] + ([rest.split(".", 1)[1]] if "." in rest else [])  # with or without the adapter name
    return any(tuple(expected.get(f"{head}.{c}", ())) == tuple(value.shape) for c in candidates)


def check_state_dict(state_dict: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str
                     ) -> dict[str, torch.Tensor]:
    """Refuse a state dict with missing or unexpected keys, wrong shapes or non-finite values.

    Extra keys peft writes are accepted and dropped: a targeted embedding's base weight
    (``...base_layer.weight``), and with ``bias="all"`` the biases it finds inside a saved head's
    wrapper (``<head>.modules_to_save.bias``, a second copy of ``<head>.bias``, and
    ``<head>.original_module.bias``, the untouched original) when ``<head>.<param>`` is expected with
    the same shape. Returns the entries to load.
    """
    if not isinstance(state_dict, Mapping):
        raise AdapterLoadError(f"{what}: expected a mapping of PEFT key -> tensor (as lora_state_dict() returns); "
                               f"got {type(state_dict).__name__}. Nothing was changed.")
    clean: dict[str, torch.Tensor] = {}
    unexpected, wrong, not_float = [], [], []
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            not_float.append(f"{key!r} is a {type(value).__name__}, not a tensor")
            continue
        if not value.is_floating_point():  # an int/bool tensor cast to float would load silently wrong values
            not_float.append(f"{key!r} has dtype {str(value.dtype).removeprefix('torch.')}")
            continue
        if not isinstance(key, str) or key not in expected:
            if isinstance(key, str) and key.endswith(".base_layer.weight"):
                continue
            if isinstance(key, str) and _peft_wrapper_duplicate(key, value, expected):
                continue
            unexpected.append(str(key))
            continue
        if tuple(value.shape) != tuple(expected[key]):
            wrong.append(f"{key}: file has {tuple(value.shape)}, model needs {tuple(expected[key])}")
            continue
        clean[key] = value
    missing = sorted(set(expected) - set(state_dict))
    problems = []
    if not_float:
        problems.append("adapter weights must be floating-point tensors (float32, bfloat16 or float16): "
                        + "; ".join(not_float[:6]) + (f" ... ({len(not_float)} in all)" if len(not_float) > 6 else "")
                        + ". The file is not a LoRA adapter, or it was damaged; save or download it again")
    if wrong:
        problems.append("shape mismatch (adapter made for another base model, or another r?): " + "; ".join(wrong[:6])
                        + (f" ... ({len(wrong)} in all)" if len(wrong) > 6 else ""))
    if missing:
        problems.append(f"missing keys: {missing[:6]}" + (f" ... ({len(missing)} in all)" if len(missing) > 6 else ""))
    if unexpected:
        problems.append(f"keys this model has no place for: {sorted(unexpected)[:6]}"
                        + (f" ... ({len(unexpected)} in all)" if len(unexpected) > 6 else ""))
    if not problems:
        bad = [k for k, v in clean.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            problems.append(f"non-finite values (NaN/inf) in {bad[:6]}")
    if problems:
        raise AdapterLoadError(f"{what} does not match the model; nothing was changed. " + " | ".join(problems))
    return clean


def adapter_state_dict(model: nn.Module, plan, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's weights in ``model`` (a transformers model holding LoRA layers) under PEFT key names,
    exactly the keys ``plan`` expects (``base_model.model.<path>.lora_A.weight`` ...)."""
    wanted = set(plan.expected_keys())
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        key = peft_key(key, adapter_name)
        if key is not None and key in wanted:
            out[key] = tensor.detach()
    missing = wanted - set(out)
    if missing:  # a bug, not a user error: the plan and the model disagree
        raise RuntimeError(f"internal: adapter {adapter_name!r} lacks {sorted(missing)[:5]}")
    return out
