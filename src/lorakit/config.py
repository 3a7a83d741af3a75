"""LoraConfig and TaskType.

A LoraConfig is frozen and validated when built: a bad value fails at once with a message that
names the field, the value and what would be accepted. It round-trips through peft's
``adapter_config.json`` (same field names), so adapters move between lorakit and peft both ways.

The math, once. A LoRA layer wraps a frozen base layer ``W`` (out x in) and adds a low-rank update::

    y = W x + (alpha / r) * B (A dropout(x))        A: r x in (random init), B: out x r (zeros)

so a fresh adapter leaves the model unchanged. With ``use_rslora`` the scale is ``alpha / sqrt(r)``,
which keeps the update's size stable as r grows. Merging adds ``(alpha / r) * B A`` into ``W``.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, Union

from .errors import ConfigError
from .peft_fields import check_foreign_key

__all__ = ["TaskType", "LoraConfig", "ALL_LINEAR", "CONFIG_NAME"]

CONFIG_NAME = "adapter_config.json"
ALL_LINEAR = "all-linear"  # every nn.Linear / Conv1D except the output head
BIAS_MODES = ("none", "all", "lora_only")


class TaskType(str, enum.Enum):
    """What the adapted model is used for; decides which heads are trained and saved with it."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    SEQ_CLS = "SEQ_CLS"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:  # json.dumps and f-strings show the bare value, like peft
        return self.value


StrOrNames = Union[str, tuple[str, ...], None]


class FrozenDict(dict):
    """A read-only dict: keeps a frozen config's mappings frozen, yet copies, pickles and serialises."""

    def _readonly(self, *args, **kwargs):
        raise TypeError("LoraConfig mappings are read-only; use config.replace(rank_pattern={...}) for a changed copy.")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = __ior__ = _readonly

    def __reduce__(self):
        return (FrozenDict, (dict(self),))

    def __deepcopy__(self, memo):
        return self


def _names(field: str, value: Any, allow_regex: bool) -> StrOrNames:
    """Normalise a list/set/tuple of module names (or, if allowed, a regex string) to a tuple."""
    if value is None:
        return None
    if isinstance(value, str):
        if not allow_regex:
            return (value,)
        if value.lower() == ALL_LINEAR:
            return ALL_LINEAR
        try:
            re.compile(value)
        except re.error as e:
            raise ConfigError(
                f"{field}={value!r} is not a valid regular expression ({e}). Pass a list of module "
                f"names (e.g. ['q_proj', 'v_proj']) or a valid regex matched against full module names."
            ) from None
        return value
    if isinstance(value, Iterable) and not isinstance(value, (Mapping, bytes)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else list(value)
        bad = [v for v in items if not isinstance(v, str) or not v]
        if bad:
            raise ConfigError(f"{field} must hold non-empty module names (strings); got {bad!r}.")
        if not items:
            raise ConfigError(
                f"{field} is an empty list. Give at least one module name, or None for the default."
            )
        return tuple(dict.fromkeys(items))  # drop repeats, keep order
    raise ConfigError(
        f"{field} must be a list of module names or a regex string; got {type(value).__name__} {value!r}."
    )


def _positive_int(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{field} must be a positive integer (e.g. 4, 8, 16); got {value!r}.")
    return value


def _positive_number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{field} must be a positive number (e.g. 16 or 32); got {value!r}.")
    return value


def _optional_text(field: str, value: Any, example: str) -> str | None:
    """A string field recorded in adapter_config.json (a path may be given as a PathLike)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise ConfigError(f"{field} must be a string (e.g. {example}) or None; got {type(value).__name__} {value!r}.")


def _regex(field: str, key: str) -> None:
    try:
        re.compile(key)
    except re.error as e:
        raise ConfigError(f"{field} entry {key!r} is not a valid module name or regular expression ({e}); "
                          f"use a module name such as 'q_proj' or a valid regex.") from None


def _pattern(field: str, value: Any, check: Any) -> "FrozenDict":
    """rank_pattern / alpha_pattern: a mapping of module names (or regexes) to values, each checked."""
    if value is None:
        return FrozenDict()
    if not isinstance(value, Mapping):
        raise ConfigError(f"{field} must be a mapping of module name (or regex) to value, e.g. "
                          f"{field}={{'q_proj': 16}}; got {type(value).__name__} {value!r}.")
    out = {}
    for key, v in value.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{field} keys must be module names (non-empty strings) or regexes; got {key!r}.")
        _regex(field, key)
        out[key] = check(f"{field}[{key!r}]", v)
    return FrozenDict(out)


def _layers_pattern(value: Any) -> tuple[str, ...]:
    names = (value,) if isinstance(value, str) else value
    if isinstance(names, (Mapping, bytes)) or not isinstance(names, Iterable):
        raise ConfigError(f"layers_pattern must be the name of the model's layer list (e.g. 'layers' or 'h') or a "
                          f"list of such names; got {type(value).__name__} {value!r}.")
    names = tuple(names)
    if not names or any(not isinstance(n, str) or not n for n in names):
        raise ConfigError(f"layers_pattern must hold non-empty names of layer lists (e.g. 'layers' or 'h'); "
                          f"got {value!r}.")
    for n in names:
        _regex("layers_pattern", n)
    return names


# init_lora_weights values peft has that lorakit refuses, and why
_INITS_REFUSED = {
    "eva": "EVA initialises from the SVD of the fine-tuning data's activations (peft's initialize_lora_eva_weights)",
    "corda": "CorDA initialises from covariance statistics collected on data (peft's preprocess_corda)",
    "lora_ga": "LoRA-GA initialises from gradients estimated on data",
    "mica": "MiCA freezes B during training (a LoRA variant lorakit lacks)",
}
#: init_lora_weights values lorakit implements besides True / False (peft's spellings; "pissa_niter_N" too)
INIT_METHODS = ("gaussian", "pissa", "olora", "orthogonal", "loftq")


def _check_init(value: Any) -> None:
    if value is True or value is False or value in INIT_METHODS:
        return
    if isinstance(value, str) and re.fullmatch(r"pissa_niter_\d+", value):
        return
    if isinstance(value, str) and value in _INITS_REFUSED:
        raise ConfigError(f"init_lora_weights={value!r} is not supported: {_INITS_REFUSED[value]}, which lorakit does "
                          f"not implement. Use peft for it, or one of True, 'gaussian', 'pissa', 'pissa_niter_N', "
                          f"'olora', 'orthogonal', 'loftq'.")
    raise ConfigError(f"init_lora_weights={value!r} is unknown; use True (default), False, 'gaussian', 'pissa', "
                      f"'pissa_niter_N' (N subspace iterations, e.g. 'pissa_niter_4'), 'olora', 'orthogonal' or "
                      f"'loftq' (peft's spellings).")


def _loftq_config(init: Any, value: Any) -> "FrozenDict":
    """peft's LoftQConfig as a mapping: {"loftq_bits": 4 or 8, "loftq_iter": n >= 1}, only with init 'loftq'."""
    if value is not None and not isinstance(value, Mapping) and hasattr(value, "loftq_bits"):
        value = vars(value)  # peft's LoftQConfig dataclass
    if value is not None and not isinstance(value, Mapping):
        raise ConfigError(f"loftq_config must be a mapping like {{'loftq_bits': 4, 'loftq_iter': 1}}; got {value!r}.")
    value = dict(value or {})
    if init != "loftq":
        if value:
            raise ConfigError(f"loftq_config={value!r} applies only with init_lora_weights='loftq'; drop it or set "
                              f"init_lora_weights='loftq'.")
        return FrozenDict()
    if not value:
        raise ConfigError("init_lora_weights='loftq' needs loftq_config, e.g. {'loftq_bits': 4, 'loftq_iter': 1}.")
    unknown = sorted(set(value) - {"loftq_bits", "loftq_iter"})
    bits, iters = value.get("loftq_bits", 4), value.get("loftq_iter", 1)
    if unknown or bits not in (4, 8) or isinstance(bits, bool) or isinstance(iters, bool) \
            or not isinstance(iters, int) or iters < 1:
        raise ConfigError(f"loftq_config={value!r} is not valid: it takes loftq_bits (4 or 8) and loftq_iter (a "
                          f"positive integer), e.g. {{'loftq_bits': 4, 'loftq_iter': 1}}.")
    return FrozenDict({"loftq_bits": bits, "loftq_iter": iters})


def _token_ids(field: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ConfigError(f"{field} must be a list of token ids (ints >= 0), e.g. [32000, 32001]; got {value!r}.")
    ids = tuple(value)
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ConfigError(f"{field} must hold distinct token ids (ints >= 0); got {value!r}.")
    return ids


def _trainable_tokens(value: Any):
    """trainable_token_indices: token ids of the input embedding, or {embedding module name: ids}; empty: None."""
    if value is None or (isinstance(value, (list, tuple, dict, FrozenDict)) and not value):
        return None
    if not isinstance(value, Mapping):
        return _token_ids("trainable_token_indices", value)
    bad = [k for k in value if not isinstance(k, str) or not k]
    if bad:
        raise ConfigError(f"trainable_token_indices keys must be embedding module names (e.g. 'embed_tokens'); "
                          f"got {bad!r}.")
    return FrozenDict({k: _token_ids(f"trainable_token_indices[{k!r}]", v) for k, v in value.items()})


def _check_variant_fields(cfg: "LoraConfig", set_) -> None:
    """init_lora_weights, loftq_config, trainable_token_indices, ensure_weight_tying, target_parameters."""
    _check_init(cfg.init_lora_weights)
    set_("loftq_config", _loftq_config(cfg.init_lora_weights, cfg.loftq_config))
    set_("trainable_token_indices", _trainable_tokens(cfg.trainable_token_indices))
    params = cfg.target_parameters
    if isinstance(params, str):
        raise ConfigError(f"target_parameters takes a list of parameter names, e.g. [{params!r}]; a single string is "
                          f"refused (as in peft, which reserves it for a regex it does not implement).")
    params = _names("target_parameters", params, allow_regex=False) if params else None
    set_("target_parameters", params)
    modules = cfg.target_modules
    if params and isinstance(modules, (list, tuple, set, frozenset)) and not modules:
        set_("target_modules", ())  # no module targets: LoRA on the parameters only (peft's target_modules=[])


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Configuration of one LoRA adapter (peft-compatible field names).

    Every field is checked when the config is built; the config never changes afterwards
    (use ``dataclasses.replace`` or :meth:`replace` for a modified copy).
    """

    #: The model the adapter was made for (hub name or path); recorded in adapter_config.json.
    base_model_name_or_path: str | None = None
    #: Hub revision of the base model, recorded for reproducibility.
    revision: str | None = None
    #: What the model is used for (CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS, ...); classification tasks also
    #: train and save their head (``classifier`` / ``score``).
    task_type: TaskType | str | None = None
    #: Load for inference: LoRA weights are frozen (no trainable parameters).
    inference_mode: bool = False
    #: Rank of the update (the inner size of B A). 4, 8 or 16 are the usual choices.
    r: int = 8
    #: Modules to wrap: a list of names (matched as the last dotted parts of a module path, so
    #: "q_proj" and "self_attn.q_proj" both work), a regex matched against full paths, "all-linear",
    #: or None for the model family's default.
    target_modules: StrOrNames = None
    #: Modules never to wrap: names (as above) or a regex.
    exclude_modules: StrOrNames = None
    #: Scale numerator: the update is multiplied by lora_alpha / r. Changing it acts like the learning rate.
    lora_alpha: float = 8
    #: Dropout on the input of the LoRA branch, in [0, 1).
    lora_dropout: float = 0.0
    #: True when the base weight is stored as (in, out), as in GPT-2's Conv1D (set automatically there).
    fan_in_fan_out: bool = False
    #: Which biases train: "none", "all" (every bias in the model) or "lora_only" (wrapped layers').
    bias: str = "none"
    #: Rank-stabilised LoRA: scale by lora_alpha / sqrt(r) instead of lora_alpha / r.
    use_rslora: bool = False
    #: Modules (other than LoRA targets) trained in full and saved with the adapter, e.g. a new head.
    modules_to_save: tuple[str, ...] | None = None
    #: A's initialisation: True (Kaiming-uniform, as nn.Linear), "gaussian" (normal, std 1/r) —
    #: both with B = 0 — or False (B random too: the adapter changes the model from the start; tests only).
    #: From the base weight (``layers.init``; they change the base so the model is unchanged at the start):
    #: "pissa" / "pissa_niter_N" (top-r singular vectors, W_res = W - scale B A), "olora" (QR), "loftq"
    #: (quantized base + SVD of the quantization residual; needs loftq_config). "orthogonal": B A = 0 from
    #: orthogonal halves, base unchanged. Save with ``path_initial_model_for_weight_conversion`` for a plain
    #: LoRA that works on the unmodified base.
    init_lora_weights: bool | str = True
    #: Only wrap modules in these layer indices (an int or a list of ints).
    layers_to_transform: int | tuple[int, ...] | None = None
    #: Name of the module list holding the layers ("layers", "h", ...); default: any.
    layers_pattern: str | tuple[str, ...] | None = None
    #: Per-module rank overrides: {name or regex: r}.
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    #: Per-module alpha overrides: {name or regex: alpha}.
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    #: DoRA (weight-decomposed LoRA): each output row's weight is rescaled to a trained magnitude,
    #: ``W' = m * (W + s B A) / ||W + s B A||_row`` (norm detached, as peft); see ``layers.dora``.
    use_dora: bool = False
    #: LoftQ's settings for init_lora_weights="loftq": {"loftq_bits": 4 or 8, "loftq_iter": n >= 1}.
    loftq_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: Train only these rows of the input embedding (token ids, e.g. added tokens), or {embedding module name:
    #: ids}; saved as peft saves them (``<embedding>.token_adapter.trainable_tokens_delta``). See ``layers.tokens``.
    trainable_token_indices: tuple[int, ...] | Mapping[str, tuple[int, ...]] | None = None
    #: Keep a tied input embedding / output head pair tied when one of them is targeted, saved in full or
    #: given trainable tokens (peft's switch; trainable tokens of a tied pair are always tied).
    ensure_weight_tying: bool = False
    #: Raw parameters to give LoRA, by name ending, e.g. ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    #: (fused 3-D mixture-of-experts weights: one low-rank pair per expert). See ``layers.param``.
    target_parameters: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen: set once, here)
        set_("base_model_name_or_path", _optional_text("base_model_name_or_path", self.base_model_name_or_path,
                                                       "'HuggingFaceTB/SmolLM2-135M' or a model folder"))
        set_("revision", _optional_text("revision", self.revision, "'main' or a commit hash"))
        if self.task_type is not None:
            try:
                set_("task_type", TaskType(str(self.task_type).upper() if isinstance(self.task_type, str)
                                           else self.task_type))
            except ValueError:
                raise ConfigError(
                    f"task_type={self.task_type!r} is unknown; use one of "
                    f"{', '.join(t.value for t in TaskType)} (or None)."
                ) from None
        for name in ("inference_mode", "fan_in_fan_out", "use_rslora", "use_dora", "ensure_weight_tying"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False; got {getattr(self, name)!r}.")
        _positive_int("r", self.r)
        _positive_number("lora_alpha", self.lora_alpha)
        p = self.lora_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p < 1.0):
            raise ConfigError(f"lora_dropout must be a number in [0, 1) (e.g. 0.05 or 0.1); got {p!r}.")
        set_("lora_dropout", float(p))
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias={self.bias!r} is unknown; use one of {', '.join(map(repr, BIAS_MODES))}.")
        _check_variant_fields(self, set_)  # may set target_modules=(): LoRA on target_parameters only
        if self.target_modules != ():
            set_("target_modules", _names("target_modules", self.target_modules, allow_regex=True))
        set_("exclude_modules", _names("exclude_modules", self.exclude_modules, allow_regex=True))
        if self.exclude_modules == ALL_LINEAR:
            raise ConfigError("exclude_modules='all-linear' would exclude every target; list the modules to skip.")
        mts = _names("modules_to_save", self.modules_to_save, allow_regex=False)
        set_("modules_to_save", mts)
        layers = self.layers_to_transform
        if layers is not None:
            layers = (layers,) if isinstance(layers, int) and not isinstance(layers, bool) else layers
            if not isinstance(layers, Iterable) or isinstance(layers, (str, bytes, Mapping)):
                raise ConfigError(f"layers_to_transform must be an int or a list of ints; got {layers!r}.")
            layers = tuple(layers)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise ConfigError(
                    f"layers_to_transform must hold layer indices (ints >= 0); got {self.layers_to_transform!r}."
                )
            if isinstance(self.target_modules, str):
                raise ConfigError(
                    "layers_to_transform cannot be combined with a regex target_modules; put the layer "
                    "indices into the regex, or give target_modules as a list of names."
                )
            set_("layers_to_transform", layers)
        if self.layers_pattern is not None:
            _layers_pattern(self.layers_pattern)  # its type first: a wrong value is named as such
            if self.layers_to_transform is None:
                raise ConfigError(
                    "layers_pattern only applies with layers_to_transform; set layers_to_transform too "
                    "(e.g. layers_to_transform=[0, 1], layers_pattern='layers')."
                )
            set_("layers_pattern", _layers_pattern(self.layers_pattern))
        set_("rank_pattern", _pattern("rank_pattern", self.rank_pattern, _positive_int))
        set_("alpha_pattern", _pattern("alpha_pattern", self.alpha_pattern, _positive_number))

    __hash__ = None  # holds mappings

    # ----------------------------------------------------------------------------------------
    def replace(self, **changes: Any) -> "LoraConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def scaling_for(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict[str, Any]:
        """The adapter_config.json content, with peft's field names and types."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, TaskType):
                v = v.value
            elif isinstance(v, FrozenDict):
                v = dict(v)
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        out["peft_type"] = "LORA"
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoraConfig":
        """Build from an adapter_config.json mapping.

        A key that is not a field here loads when its value changes nothing (peft's default, null, false,
        empty) and is refused, by name, otherwise (``lorakit.peft_fields``): a variant lorakit lacks is
        never silently dropped.
        """
        from . import __version__

        if not isinstance(data, Mapping):
            raise ConfigError(f"an adapter config is a mapping of field -> value (adapter_config.json's object); "
                              f"got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            else:
                check_foreign_key(key, value, __version__, data.get("peft_version"))
        return cls(**kwargs)

    def save(self, directory: str | os.PathLike) -> str:
        """Write adapter_config.json into ``directory`` (atomically: a fresh temp file renamed into place)."""
        from .io import atomic_write_json

        path = os.path.join(os.fspath(directory), CONFIG_NAME)
        atomic_write_json(path, self.to_dict())
        return path

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """peft's name for ``save``."""
        return self.save(directory)

    @property
    def peft_type(self) -> str:
        """Always "LORA" (written into adapter_config.json, as peft expects)."""
        return "LORA"

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "LoraConfig":
        """Read ``directory/adapter_config.json`` (or a path to the JSON file itself)."""
        if not isinstance(directory, (str, os.PathLike)):
            raise ConfigError(f"the adapter folder must be a path (str or os.PathLike); got {type(directory).__name__} "
                              f"{directory!r}.")
        path = os.fspath(directory)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(path):
            raise ConfigError(f"no adapter config at {path}: an adapter folder holds {CONFIG_NAME} and "
                              f"adapter_model.safetensors (as written by save_pretrained).")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); the adapter folder is corrupt.") from None
        except OSError as e:
            raise ConfigError(f"cannot read {path} ({e.strerror or e}); check the file and its permissions.") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object; got {type(data).__name__}.")
        return cls.from_dict(data)


#: LoraConfig's defaults, field name -> value: the one table of LoRA defaults. A recipe's ``lora`` section
#: and ``lorakit inspect`` take theirs from it; a shipped recipe that chooses other values says so.
LORA_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {f.name: f.default for f in dataclasses.fields(LoraConfig) if f.default is not dataclasses.MISSING})
