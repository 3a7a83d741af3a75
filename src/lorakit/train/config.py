"""Recipe configuration: frozen dataclasses, one section per concern, every default defined once, here.

A recipe is a YAML file whose top-level keys are the sections below (``model``, ``data``, ``lora``,
``train``, ``eval``, ``output``). Every field carries its help text in ``metadata["help"]``; the CLI and
the error messages read it from there. ``--set section.key=value`` overrides are parsed against the
field's declared type, so ``--set lora.r=16`` becomes an int and ``--set lora.r=big`` is an error that
names the key and the type it expects.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from lorakit.config import LORA_DEFAULTS
from lorakit.errors import ConfigError


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its documentation attached (``metadata["help"]``)."""
    if isinstance(default, (dict, list)):
        factory = (lambda d=default: type(d)(d))
        return field(default_factory=factory, metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass(frozen=True)
class ModelSection:
    """Which base model to fine-tune and how to load it."""

    name: str = _f("embedded", "Model name or path: a local folder, a hub id, or `embedded` (the bundled "
                   "SmolLM2-135M-Instruct).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "Base weights dtype. auto: follow train.precision (float32 for fp32, bfloat16 for bf16). An "
        "explicit dtype with train.precision auto is used as given (float16 included); one that contradicts an "
        "explicit train.precision is refused.")
    trust_remote_code: bool = _f(False, "Allow the model's own Python code from the hub (only for models you trust).")
    load_in_4bit: bool = _f(False, "QLoRA: keep the base weights in 4-bit NF4 (bitsandbytes), compute in the run's "
                            "precision (train.precision / model.dtype), with activation checkpointing; the adapter "
                            "trains in float32.")


@dataclass(frozen=True)
class DataSection:
    """Where the examples come from and how they become token sequences."""

    train: str = _f("", "Training data: a .jsonl/.json/.csv file, a datasets folder, a hub dataset id, or "
                    "`builtin:NAME.jsonl` for the data shipped with lorakit.")
    train_split: str = _f("train", "Split to read from `train` when it is a hub dataset / datasets folder.")
    eval: Optional[str] = _f(None, "Held-out data (same forms as `train`). None: hold out `eval_fraction` of train.")
    eval_split: str = _f("test", "Split to read from `eval` when it is a hub dataset / datasets folder.")
    eval_fraction: float = _f(0.0, "Fraction of the training records held out for evaluation when `eval` is None "
                              "(0 = no held-out evaluation).")
    template: str = _f("human_assistant", "Prompt template: human_assistant, classification, chat or alpaca. chat "
                       "also reads conversations (OpenAI `messages` / ShareGPT `conversations`; loss on every "
                       "assistant reply).")
    template_args: dict = _f({}, "Template options, e.g. {text_column: 'Tweet text'} (classification also gets "
                             "label_column from data.label_column unless given here).")
    subset: Optional[str] = _f(None, "Hub dataset configuration / subset, e.g. twitter_complaints for ought/raft.")
    columns: Optional[tuple] = _f(None, "Keep only these columns (each must exist in every record); None = all.")
    label_column: Optional[str] = _f(None, "Column holding the class label (classification data).")
    label_names: tuple = _f((), "Class names in order; integer labels k map to label_names[k-1] (RAFT codes). "
                            "Empty: read from a task.json beside the file, else the distinct labels of train.")
    max_length: int = _f(256, "Maximum tokens per example (prompt + answer); longer ones are truncated.")
    max_train_samples: Optional[int] = _f(None, "Use at most this many training records (None = all).")
    max_eval_samples: Optional[int] = _f(None, "Use at most this many evaluation records (None = all).")
    sort_by_length: bool = _f(True, "Group examples of similar length into a batch (less padding, faster); "
                              "the batch order is still shuffled.")


@dataclass(frozen=True)
class LoraSection:
    """The adapter; mapped one to one onto `lorakit.LoraConfig`, whose defaults it shares (LORA_DEFAULTS)."""

    r: int = _f(LORA_DEFAULTS["r"], "LoRA rank.")
    alpha: float = _f(float(LORA_DEFAULTS["lora_alpha"]), "LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = _f(LORA_DEFAULTS["lora_dropout"], "Dropout on the LoRA branch input.")
    target_modules: Optional[tuple] = _f(None, "Module names (or 'all-linear') to adapt; None = the model "
                                         "family's default.")
    bias: Literal["none", "all", "lora_only"] = _f(LORA_DEFAULTS["bias"], "Which biases to train.")
    use_rslora: bool = _f(LORA_DEFAULTS["use_rslora"], "Scale by alpha / sqrt(r) instead of alpha / r "
                          "(rank-stabilised LoRA).")
    use_dora: bool = _f(False, "DoRA: weight-decomposed LoRA (a trained magnitude per output row).")
    modules_to_save: Optional[tuple] = _f(None, "Modules trained in full and saved with the adapter (e.g. a new head).")


@dataclass(frozen=True)
class TrainSection:
    """Optimisation: AdamW over the trainable (LoRA) parameters with a warm-up schedule."""

    epochs: float = _f(3.0, "Passes over the training data (ignored when max_steps is set).")
    max_steps: Optional[int] = _f(None, "Stop after this many optimizer steps (None = derive from epochs).")
    batch_size: int = _f(8, "Examples per micro-batch.")
    grad_accum: int = _f(1, "Micro-batches per optimizer step (effective batch = batch_size * grad_accum).")
    lr: float = _f(2e-4, "Peak learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    betas: tuple = _f((0.9, 0.999), "AdamW betas.")
    loraplus_lr_ratio: Optional[float] = _f(None, "LoRA+: lora_B (and DoRA magnitudes) learn at this multiple of "
                                            "`lr` (2-16 in the paper; lower `lr` a little); None = plain LoRA.")
    loraplus_lr_embedding: float = _f(1e-6, "LoRA+: learning rate of embedding LoRA layers (peft's default).")
    scheduler: Literal["linear", "cosine", "constant"] = _f("linear", "Learning-rate decay after warm-up.")
    warmup_steps: int = _f(0, "Linear warm-up steps (takes precedence over warmup_ratio when > 0).")
    warmup_ratio: float = _f(0.0, "Warm-up as a fraction of the total steps.")
    max_grad_norm: Optional[float] = _f(1.0, "Clip the gradient norm to this value (None = no clipping).")
    seed: int = _f(42, "Seed for the LoRA init, dropout and the data order.")
    precision: Literal["auto", "fp32", "bf16"] = _f(
        "auto", "Arithmetic of the run. bf16: the frozen base weights and the activations in bfloat16 (half the "
        "memory), the LoRA weights, their gradients and the optimizer state in float32, the loss accumulated in "
        "float32; saved adapters and merged models stay float32. fp32: everything float32. auto: on a CPU, measured "
        "once per machine (bf16 and float32 products at the model's shapes, cached in ~/.cache/lorakit/"
        "precision.json) and the faster taken (fp32 without measuring on a CPU without bf16 instructions); on a "
        "GPU, bf16 where it is supported.")
    mixed_precision: Literal["no", "bf16", "fp16"] = _f(
        "no", "Autocast (accelerate) over float32 weights: the products run in bf16/fp16, the weights stay float32. "
        "Keep `no` on CPU. Not with train.precision bf16 (the weights are bf16 already); with train.precision auto "
        "it keeps the weights float32.")
    cpu: bool = _f(False, "Train on the CPU even when a GPU is available.")
    fast_loss: bool = _f(True, "Apply the LM head only at answer positions (same loss, less compute); falls "
                         "back to the model's own loss when the architecture does not allow it.")
    log_every: int = _f(1, "Write a metrics line every N optimizer steps.")
    progress: bool = _f(True, "Show a progress bar.")


@dataclass(frozen=True)
class EvalSection:
    """Evaluation during and after training."""

    every_steps: Optional[int] = _f(None, "Evaluate every N optimizer steps (None = only at the end).")
    batch_size: int = _f(16, "Batch size for evaluation.")
    accuracy: Optional[bool] = _f(None, "Report generation accuracy on the eval records (None = for classification "
                                  "recipes: template classification or label_names set). Slower than the loss: it generates an answer per record.")


@dataclass(frozen=True)
class OutputSection:
    """What is written, and where."""

    dir: str = _f("outputs/run", "Output folder: adapter/, checkpoints/, metrics.jsonl, tb/, loss.png.")
    save_every: Optional[int] = _f(None, "Write a resumable checkpoint every N optimizer steps (None = only at "
                                   "the end; the end of a run always gets one).")
    keep_last: int = _f(2, "Keep only this many most recent checkpoints (0 = keep all).")
    merge: bool = _f(False, "Also write the merged model (base + adapter) to <dir>/merged.")
    plot: bool = _f(True, "Write the loss curve to <dir>/loss.png.")
    tensorboard: bool = _f(True, "Write TensorBoard events to <dir>/tb.")


@dataclass(frozen=True)
class TrainConfig:
    """A whole recipe."""

    description: str = _f("", "What this recipe does (free text).")
    model: ModelSection = _f(ModelSection(), "Base model.")
    data: DataSection = _f(DataSection(), "Data and prompt template.")
    lora: LoraSection = _f(LoraSection(), "Adapter.")
    train: TrainSection = _f(TrainSection(), "Optimisation.")
    eval: EvalSection = _f(EvalSection(), "Evaluation.")
    output: OutputSection = _f(OutputSection(), "Outputs.")

    def __post_init__(self) -> None:
        checks = [
            (self.lora.r >= 1, "lora.r", "must be >= 1"),
            (self.lora.alpha > 0, "lora.alpha", "must be > 0"),
            (0.0 <= self.lora.dropout < 1.0, "lora.dropout", "must be in [0, 1)"),
            (0 < self.train.epochs <= 1e6, "train.epochs", "must be > 0 and at most 1e6 (for a fixed number of "
             "steps set train.max_steps)"),
            (self.train.max_steps is None or self.train.max_steps >= 1, "train.max_steps", "must be >= 1 or null"),
            (self.train.batch_size >= 1, "train.batch_size", "must be >= 1"),
            (self.train.grad_accum >= 1, "train.grad_accum", "must be >= 1"),
            (self.train.lr > 0, "train.lr", "must be > 0"),
            (self.train.warmup_steps >= 0, "train.warmup_steps", "must be >= 0"),
            (0.0 <= self.train.warmup_ratio < 1.0, "train.warmup_ratio", "must be in [0, 1)"),
            (len(self.train.betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                                and 0.0 <= b < 1.0 for b in self.train.betas),
             "train.betas", "must be two numbers in [0, 1), e.g. [0.9, 0.999]"),
            (self.train.weight_decay >= 0, "train.weight_decay", "must be >= 0"),
            (self.train.loraplus_lr_ratio is None or self.train.loraplus_lr_ratio > 0, "train.loraplus_lr_ratio",
             "must be > 0 or null"),
            (self.train.loraplus_lr_embedding > 0, "train.loraplus_lr_embedding", "must be > 0"),
            (self.train.max_grad_norm is None or self.train.max_grad_norm > 0, "train.max_grad_norm",
             "must be > 0 or null"),
            (self.train.log_every >= 1, "train.log_every", "must be >= 1"),
            (self.data.max_length >= 4, "data.max_length", "must be >= 4"),
            (0.0 <= self.data.eval_fraction < 1.0, "data.eval_fraction", "must be in [0, 1)"),
            (self.eval.every_steps is None or self.eval.every_steps >= 1, "eval.every_steps", "must be >= 1 or null"),
            (self.eval.batch_size >= 1, "eval.batch_size", "must be >= 1"),
            (self.output.save_every is None or self.output.save_every >= 1, "output.save_every",
             "must be >= 1 or null"),
            (self.output.keep_last >= 0, "output.keep_last", "must be >= 0"),
            (bool(self.output.dir.strip()), "output.dir", "is empty: name the folder the run writes to"),
            (bool(self.model.name.strip()), "model.name", "is empty: name a model folder, a hub id or `embedded`"),
            (self.lora.target_modules is None or len(self.lora.target_modules) > 0, "lora.target_modules",
             "is an empty list: list module names, or null for the model family's default"),
        ]
        for ok, key, what in checks:
            if not ok:
                value = get_value(self, key)
                raise ConfigError(f"{key} = {value!r} {what}; fix it in the recipe or with --set {key}=...")
        self._check_precision()

    def _check_precision(self) -> None:
        """train.precision against model.dtype and train.mixed_precision: contradictions are refused, naming
        both keys and the fix (an explicit model.dtype under precision auto is used as given)."""
        precision, dtype, autocast = self.train.precision, self.model.dtype, self.train.mixed_precision
        if precision != "auto" and dtype != "auto" and dtype != _PRECISION_DTYPES[precision]:
            raise ConfigError(
                f"model.dtype = {dtype!r} contradicts train.precision = {precision!r} (which loads the base in "
                f"{_PRECISION_DTYPES[precision]}). Fix: drop model.dtype (its default, auto, follows "
                f"train.precision), or --set train.precision=auto to load the base in {dtype} as given"
                + (f", or --set train.precision={_DTYPE_PRECISIONS[dtype]}" if dtype in _DTYPE_PRECISIONS else "")
                + ".")
        if precision == "bf16" and autocast != "no":
            raise ConfigError(
                f"train.mixed_precision = {autocast!r} autocasts float32 weights, but train.precision = 'bf16' stores "
                f"them in bfloat16 already: autocast over them would only add casts. Fix: --set "
                f"train.mixed_precision=no (bf16 weights and activations), or --set train.precision=fp32 to keep "
                f"autocast over float32 weights.")

    @property
    def is_classification(self) -> bool:
        return self.data.template == "classification" or bool(self.data.label_names)

    @property
    def wants_accuracy(self) -> bool:
        return self.is_classification if self.eval.accuracy is None else self.eval.accuracy

    def to_dict(self) -> dict:
        return to_plain(self)


#: the base dtype each explicit train.precision loads, and back
_PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
_DTYPE_PRECISIONS = {v: k for k, v in _PRECISION_DTYPES.items()}

SECTIONS = ("model", "data", "lora", "train", "eval", "output")
# A scalar given for a whole section means this field (``model: embedded`` == ``model.name: embedded``).
_SECTION_SHORTHAND = {"model": "name"}


# ---------------------------------------------------------------------------------------------- building


def to_plain(obj: Any) -> Any:
    """Dataclass -> plain dict/list/scalars (YAML/JSON friendly)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def get_value(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def valid_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """All dotted keys a recipe / --set accepts."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(valid_keys(tp, prefix + f.name + "."))
        else:
            keys.append(prefix + f.name)
    return keys


def field_help(dotted: str) -> tuple[Any, str]:
    """(type, help) for a dotted key."""
    cls: Any = TrainConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            raise ConfigError(_unknown_key_message(dotted))
        tp = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            return tp, fields[part].metadata.get("help", "")
        cls = tp
    raise AssertionError


def _unknown_key_message(key: str) -> str:
    keys = valid_keys()
    import difflib

    close = difflib.get_close_matches(key, keys, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return (f"unknown recipe key {key!r}.{hint} Valid keys: {', '.join(keys)}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    if tp is tuple or origin is tuple:
        return "a list"
    if tp is dict or origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _finite(number: float, key: str) -> float:
    """Every float of a recipe is a finite number: inf / nan would overflow a step count or poison the weights."""
    import math

    if not math.isfinite(number):
        raise ConfigError(f"{key} must be a finite number, got {number}; fix the recipe or pass --set {key}=<number>")
    return number


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value to the field type; errors name the key and the expected type."""

    def bad() -> ConfigError:
        return ConfigError(f"{key} expects {_type_name(tp)}, got {value!r} ({type(value).__name__}); "
                           f"fix the recipe or pass --set {key}=<{_type_name(tp)}>")

    origin = typing.get_origin(tp)
    if origin is typing.Union:
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return coerce(value, inner, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad()
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float, str)):  # YAML 1.1 reads "2e-4" (no dot) as a string
            try:
                number = float(value)
            except (ValueError, OverflowError):
                raise bad() from None
            return _finite(number, key)
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    if tp is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        raise bad()
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise bad()
    raise bad()


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Build a (nested) config dataclass from a plain mapping, validating keys and types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = prefix + str(k)
        if k not in names:
            raise ConfigError(_unknown_key_message(key))
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            if k in _SECTION_SHORTHAND and not isinstance(v, dict):
                v = {_SECTION_SHORTHAND[k]: v}
            kwargs[k] = build(tp, v, key + ".")
        else:
            kwargs[k] = coerce(v, tp, key)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------- overrides

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def parse_value(raw: str, tp: Any, key: str) -> Any:
    """Parse a --set string against the field type."""
    import yaml

    origin = typing.get_origin(tp)
    if origin is typing.Union:
        if raw.strip().lower() in ("none", "null", "~", ""):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return parse_value(raw, inner, key)
    text = raw.strip()
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"{key} expects true/false, got {raw!r}; e.g. --set {key}=true")
    if tp is int:
        try:
            return int(text.replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key} expects an int, got {raw!r}; e.g. --set {key}=8") from None
    if tp is float:
        try:
            number = float(text)
        except ValueError:
            raise ConfigError(f"{key} expects a number, got {raw!r}; e.g. --set {key}=0.1") from None
        return _finite(number, key)
    if tp is str or origin is Literal:
        return coerce(text, tp, key)
    if tp is tuple or origin is tuple:
        if text.startswith("["):
            return coerce(yaml.safe_load(text), tp, key)
        return coerce(text, tp, key)
    if tp is dict or origin is dict:
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError:
            loaded = None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{key} expects a mapping, got {raw!r}; e.g. --set '{key}={{a: 1}}'")
        return loaded
    raise ConfigError(f"{key} cannot be set from the command line")


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    """Apply ``key=value`` strings to a raw recipe mapping (returns a new mapping)."""
    import copy

    out = copy.deepcopy(data) if data else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}; e.g. --set lora.r=16")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key in _SECTION_SHORTHAND:
            key = f"{key}.{_SECTION_SHORTHAND[key]}"
        tp, _ = field_help(key)
        if dataclasses.is_dataclass(tp):
            raise ConfigError(f"{key} is a section; set one of its keys, e.g. "
                              f"--set {key}.{dataclasses.fields(tp)[0].name}=...")
        value = parse_value(raw, tp, key)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            sub = node.get(part)
            if part in _SECTION_SHORTHAND and sub is not None and not isinstance(sub, dict):
                sub = {_SECTION_SHORTHAND[part]: sub}
            if sub is None:
                sub = {}
            node[part] = sub
            node = sub
        node[parts[-1]] = value
    return out


def config_from_dict(data: dict, overrides: typing.Iterable[str] = ()) -> TrainConfig:
    return build(TrainConfig, apply_overrides(data or {}, overrides))
