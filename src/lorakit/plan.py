"""What an adapter would do to a model, worked out without changing it.

The plan is the single source for injection, the dry run, and the check of an adapter file
against a model before anything is loaded: the PEFT key names and shapes it expects.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator

from torch import nn

from .config import LoraConfig, TaskType
from .errors import ConfigError, LoraError, TargetError
from .hf.quant import quantized_kind
from .layers import LoraLayer, ModulesToSave
from .layers.routing import BASE
from .targets import module_kind, pattern_value, select_targets, unmatched_pattern_keys
from .variants_plan import check_param_adapters, plan_variants, selects_modules

__all__ = ["TargetSpec", "AdapterPlan", "as_adapter_names", "batch_size", "check_new_adapter", "check_rows", "plan_adapter", "trained_biases", "plain_modules", "PEFT_PREFIX"]

PEFT_PREFIX = "base_model.model."
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")

# heads that classification-type tasks train and save along with the adapter (as peft does)
_TASK_HEADS = {
    TaskType.SEQ_CLS: ("classifier", "score"),
    TaskType.TOKEN_CLS: ("classifier", "score"),
    TaskType.QUESTION_ANS: ("qa_outputs",),
}


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    name: str            # module path in the model
    kind: str            # "linear" | "conv1d" | "embedding"
    in_features: int     # Linear/Conv1D: input size; Embedding: num_embeddings
    out_features: int    # Linear/Conv1D: output size; Embedding: embedding_dim
    r: int
    alpha: float
    scaling: float
    dora: bool = False   # DoRA: also a magnitude per output feature

    @property
    def lora_shapes(self) -> dict[str, tuple[int, ...]]:
        """PEFT state-dict suffixes and shapes of this target's A and B (and DoRA magnitude)."""
        if self.kind == "embedding":
            shapes = {"lora_embedding_A": (self.r, self.in_features), "lora_embedding_B": (self.out_features, self.r)}
        else:
            shapes = {"lora_A.weight": (self.r, self.in_features), "lora_B.weight": (self.out_features, self.r)}
        if self.dora:
            shapes["lora_magnitude_vector"] = (self.out_features,)
        return shapes

    @property
    def n_params(self) -> int:
        return self.r * (self.in_features + self.out_features) + (self.out_features if self.dora else 0)


@dataclasses.dataclass(frozen=True)
class AdapterPlan:
    config: LoraConfig
    targets: tuple[TargetSpec, ...]
    modules_to_save: tuple[str, ...]            # module paths given a trainable copy
    saved_shapes: dict[str, tuple[int, ...]]    # PEFT key (no prefix) -> shape, for modules_to_save params
    bias_shapes: dict[str, tuple[int, ...]]     # PEFT key (no prefix) -> shape, for trained biases
    #: LoRA on raw parameters, tied heads, trainable tokens (``lorakit.variants``), in injection order
    extras: tuple = ()

    def expected_keys(self) -> dict[str, tuple[int, ...]]:
        """Every key (with the ``base_model.model.`` prefix) an adapter file of this plan holds."""
        out: dict[str, tuple[int, ...]] = {}
        for t in self.targets:
            for suffix, shape in t.lora_shapes.items():
                out[f"{PEFT_PREFIX}{t.name}.{suffix}"] = shape
        for key, shape in {**self.saved_shapes, **self.bias_shapes, **self.extra_shapes}.items():
            out[PEFT_PREFIX + key] = shape
        return out

    @property
    def extra_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v for e in self.extras for k, v in e.keys().items()}

    @property
    def n_lora_params(self) -> int:
        return sum(t.n_params for t in self.targets) + sum(e.n_params for e in self.extras)

    @property
    def n_trainable(self) -> int:
        return self.n_lora_params + sum(_numel(s) for s in {**self.saved_shapes, **self.bias_shapes}.values())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _unwrap(module: nn.Module) -> nn.Module:
    while isinstance(module, (LoraLayer, ModulesToSave)):  # wrappers nest (one LoraParam per parameter)
        module = module.base_layer if isinstance(module, LoraLayer) else module.original_module
    return module


def plain_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) as if no lorakit wrapper were present: wrapped modules appear as themselves."""

    def walk(prefix: str, module: nn.Module):
        module = _unwrap(module)
        yield prefix, module
        for child_name, child in module._modules.items():
            if child is None:
                continue
            yield from walk(f"{prefix}.{child_name}" if prefix else child_name, child)

    yield from walk("", model)


def _output_heads(model: nn.Module, paths: dict[int, str]) -> list[str]:
    """The output layer "all-linear" leaves out: the model's output embeddings (the LM head), as peft.

    Task heads (classifier, score, qa_outputs) are not excluded here: with a SEQ_CLS/TOKEN_CLS/
    QUESTION_ANS task_type they are saved whole (modules_to_save) and so never targeted; without a
    task_type peft wraps them like any linear layer, and so does lorakit.
    """
    heads = []
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None:
        head = _unwrap(head)
        if id(head) in paths:
            heads.append(paths[id(head)])
    return heads


def _modules_to_save(config: LoraConfig, names: list[str]) -> tuple[str, ...]:
    wanted = list(config.modules_to_save or ())
    # the task's heads are optional even when listed: peft writes all of them (['classifier', 'score'])
    # into every SEQ_CLS adapter config, though a model has only one
    heads = _TASK_HEADS.get(config.task_type, ())
    optional = [h for h in heads if h not in wanted]
    found: list[str] = []
    for entry in wanted + optional:
        hits = [n for n in names if n and (n == entry or n.endswith("." + entry))]
        if not hits and entry in wanted and entry not in heads:
            raise TargetError(
                f"modules_to_save entry {entry!r} matches no module. Top-level modules: "
                f"{', '.join(sorted({n.split('.')[0] for n in names if n}))}; names match the end of a module path."
            )
        found.extend(h for h in hits if h not in found)
    return tuple(found)


def plan_adapter(model: nn.Module, config: LoraConfig, *, wrapped: set[str] | None = None,
                 strict: bool = True) -> AdapterPlan:
    """Work out targets, shapes and saved keys of ``config`` on ``model``; the model is not changed.

    ``wrapped`` names the module paths already wrapped by other adapters (their biases are named
    ``<path>.base_layer.bias`` in PEFT files). ``strict=False`` (loading a saved adapter) lets
    target_modules entries that match nothing pass (see ``targets.select_targets``).
    """
    mods = list(plain_modules(model))
    kinds = {n: module_kind(m) for n, m in mods}
    paths = {id(m): n for n, m in reversed(mods)}  # first path wins for shared modules
    by_name = dict(mods)
    model_config = getattr(model, "config", None)
    model_type = getattr(model_config, "model_type", None)
    saved = _modules_to_save(config, list(kinds))
    names = select_targets(
        kinds,
        config,
        model_type=model_type,
        output_heads=_output_heads(model, paths),
        modules_to_save=saved,
        model_name=type(model).__name__,
        strict=strict,
    ) if selects_modules(config, model_type) else []
    variant = plan_variants(model, config, mods, names, saved, strict)  # parameters, ties, tokens: variants_plan
    names, saved = variant.names, variant.saved
    if strict:
        _check_patterns(config, variant.pattern_names)
    targets = []
    for n in names:
        m, kind = by_name[n], kinds[n]
        r = pattern_value(config.rank_pattern, n, config.r)
        alpha = pattern_value(config.alpha_pattern, n, config.lora_alpha)
        if kind == "embedding":
            fin, fout = m.num_embeddings, m.embedding_dim
        elif kind == "conv1d":
            fin, fout = m.weight.shape
        else:
            fin, fout = m.in_features, m.out_features
        if config.use_dora and quantized_kind(getattr(m, "weight", None)) == "bnb 8bit":
            raise TargetError(f"use_dora=True on the 8-bit layer {n!r} is not supported: DoRA reads the base weight's "
                              f"values (4-bit bases work: QDoRA). Load the base in 4 bits or bf16/fp32, or use plain LoRA.")
        targets.append(TargetSpec(n, kind, int(fin), int(fout), r, alpha, config.scaling_for(r, alpha),
                                  dora=config.use_dora))
    _check_size(targets, config)

    saved_shapes: dict[str, tuple[int, ...]] = {}
    for s in saved:
        for pname, p in by_name[s].named_parameters():
            saved_shapes[f"{s}.{pname}"] = tuple(p.shape)

    wrapped_now = set(wrapped or ()) | set(names)
    bias_shapes: dict[str, tuple[int, ...]] = {}
    if config.bias != "none":
        for n, m in mods:
            b = getattr(m, "bias", None)
            if not isinstance(b, nn.Parameter) or any(n == s or n.startswith(s + ".") for s in saved):
                continue
            if config.bias == "lora_only" and n not in names:
                continue
            key = f"{n}.base_layer.bias" if n in wrapped_now else f"{n}.bias"
            bias_shapes[key] = tuple(b.shape)
    return AdapterPlan(config, tuple(targets), saved, saved_shapes, bias_shapes, variant.extras)


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_size(targets: list[TargetSpec], config: LoraConfig) -> None:
    """An r so large that the adapter cannot fit in this machine's memory is a typo, refused before anything
    is allocated (allocation would fail halfway through injection, or the system would start swapping)."""
    n = sum(t.n_params for t in targets)
    memory = _physical_memory()
    if memory is None or n * 4 <= memory:
        return
    biggest = max(targets, key=lambda t: t.r)
    raise ConfigError(
        f"r={config.r}" + (f" (rank_pattern up to {biggest.r})" if biggest.r != config.r else "")
        + f" gives this adapter {n:,d} parameters, {n * 4 / 2**30:,.0f} GiB in float32, more than this machine's "
        f"memory ({memory / 2**30:,.0f} GiB). LoRA ranks are usually 4 to 64; use a smaller r.")


def _check_patterns(config: LoraConfig, names: list[str]) -> None:
    """A rank_pattern / alpha_pattern key that matches no targeted module changes nothing: a typo that would
    leave every layer at the default (peft warns and ignores it; lorakit refuses, as for target_modules)."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    for field in ("rank_pattern", "alpha_pattern"):
        missing = unmatched_pattern_keys(getattr(config, field), names)
        if missing:
            raise TargetError(
                f"{field} keys {missing!r} match no targeted module, so they would change nothing. Targeted "
                f"modules: {', '.join(leaves)} (e.g. {names[0]}). A key matches the end of a module path "
                f"('q_proj', 'layers.0.self_attn.q_proj') or is a regex; fix the key, or add the module to "
                f"target_modules.")


def check_rows(names, known, batch: int | None = None) -> None:
    """``adapter_names`` of a forward / generate call: a list of loaded adapter names (or "__base__"), one per
    row of the batch, or one per group of rows when the batch repeats each row (beams): the batch size, when
    known, must be a multiple of the list's length."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise LoraError(f"adapter_names must be a list with one adapter name per row of the batch (e.g. "
                        f"['default', {BASE!r}]); got {type(names).__name__} {names!r}.")
    unknown = sorted({str(n) for n in names if n != BASE and n not in known})
    if unknown:
        raise LoraError(f"adapter_names has unknown adapters {unknown}; loaded: {list(known)} "
                        f"(use {BASE!r} for the base model).")
    if not names or (batch is not None and batch % len(names)):
        raise LoraError(f"adapter_names has {len(names)} entries but the batch has {batch} rows; give one adapter "
                        f"name per row.")


def batch_size(args: tuple, kwargs: dict) -> int | None:
    """Rows of a forward call's batch (input_ids or inputs_embeds), when it can be told."""
    x = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    shape = getattr(x, "shape", None)
    return int(shape[0]) if shape else None


def as_adapter_names(value, field: str) -> list:
    """An argument naming adapters: one name or a list of names (each is checked by the caller)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(value)
    raise LoraError(f"{field} must be an adapter name or a list of adapter names; got {type(value).__name__} "
                    f"{value!r}.")


def check_new_adapter(existing: dict[str, LoraConfig], adapter_name: str, config: LoraConfig) -> None:
    """Refuse a new adapter that cannot join the ``existing`` ones (name, config type, bias rule)."""
    if not isinstance(config, LoraConfig):
        raise LoraError(f"config must be a lorakit.LoraConfig; got {type(config).__name__}. Build one with "
                        f"LoraConfig(r=..., target_modules=...) or LoraConfig.from_pretrained(folder).")
    if not isinstance(adapter_name, str) or not _NAME_RE.match(adapter_name) or adapter_name == BASE:
        raise LoraError(
            f"adapter name {adapter_name!r} is not allowed: use letters, digits, '_' or '-' (no dots), "
            f"and not {BASE!r}."
        )
    check_param_adapters(existing, config)
    if adapter_name in existing:
        raise LoraError(f"adapter {adapter_name!r} exists already; delete_adapter() it first or pick another name.")
    with_bias = [n for n, c in existing.items() if c.bias != "none"]
    if existing and (config.bias != "none" or with_bias):
        who = f"adapter {with_bias[0]!r} has bias={existing[with_bias[0]].bias!r}" if with_bias else \
            f"the new adapter has bias={config.bias!r}"
        raise LoraError(
            f"cannot add adapter {adapter_name!r}: {who}. bias='all'/'lora_only' trains the base model's own "
            f"biases, which every adapter shares, so one adapter's biases would change the others' outputs. "
            f"Use bias='none' for every adapter when a model holds several (peft has the same rule).")


def trained_biases(model: nn.Module, plan: AdapterPlan) -> list[nn.Parameter]:
    """The base biases an adapter trains: every one for ``bias="all"``, its targets' for ``"lora_only"``."""
    bias = plan.config.bias
    if bias == "none":
        return []
    targets = {t.name for t in plan.targets}
    params = []
    for path, m in model.named_modules():
        if isinstance(m, (LoraLayer, ModulesToSave)):
            continue
        b = m._parameters.get("bias") if hasattr(m, "_parameters") else None
        if isinstance(b, nn.Parameter):
            owner = path[: -len(".base_layer")] if path.endswith(".base_layer") else path
            if "modules_to_save" in owner.split(".") or ".original_module" in owner:
                continue
            if bias == "all" or owner in targets:
                params.append(b)
    return params
