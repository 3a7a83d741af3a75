"""Which modules get a LoRA adapter.

Matching is a pure function of module names and kinds (:func:`select_targets`), so it can be
tested, dry-run and validated without touching a model. A target that matches nothing is an
error that lists the module names that exist — peft silently ignores a typo when another entry
matches, which leaves users training less than they think.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .config import ALL_LINEAR, LoraConfig
from .errors import TargetError

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "default_target_modules",
    "module_kind",
    "select_targets",
    "pattern_value",
    "unmatched_pattern_keys",
    "WRAPPABLE_KINDS",
    "MOE_EXPERT_PARAMETERS",
    "experts_left_out",
]

# Default targets per transformers `model_type`: the seed's table (peft's), then today's families.
# Attention query/value projections are the classic LoRA choice; "all-linear" is often better
# (see docs/), but these defaults keep adapters compatible with what the field ships.
DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    # the seed's table
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "bart": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "bloom": ("query_key_value",),
    "blip-2": ("q", "v", "q_proj", "v_proj"),
    "opt": ("q_proj", "v_proj"),
    "gptj": ("q_proj", "v_proj"),
    "gpt_neox": ("query_key_value",),
    "gpt_neo": ("q_proj", "v_proj"),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"),
    "deberta-v2": ("query_proj", "value_proj"),
    "deberta": ("in_proj",),
    "layoutlm": ("query", "value"),
    "llama": ("q_proj", "v_proj"),
    "chatglm": ("query_key_value",),
    "gpt_bigcode": ("c_attn",),
    "mpt": ("Wqkv",),
    # today's families
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen2_moe": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "qwen3_moe": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"),
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "phi3": ("qkv_proj",),
    "falcon": ("query_key_value",),
    "RefinedWeb": ("query_key_value",),
    "RefinedWebModel": ("query_key_value",),
    "stablelm": ("q_proj", "v_proj"),
    "starcoder2": ("q_proj", "v_proj"),
    "olmo": ("q_proj", "v_proj"),
    "olmo2": ("q_proj", "v_proj"),
    "cohere": ("q_proj", "v_proj"),
    "codegen": ("qkv_proj",),
    "granite": ("q_proj", "v_proj"),
    "smollm3": ("q_proj", "v_proj"),
    "llama4": ("q_proj", "v_proj"),
    "mbart": ("q_proj", "v_proj"),
    "m2m_100": ("q_proj", "v_proj"),
    "distilbert": ("q_lin", "v_lin"),
    "albert": ("query", "value"),
    "camembert": ("query", "value"),
    "xlm-roberta-xl": ("query", "value"),
    "modernbert": ("Wqkv",),
    "longt5": ("q", "v"),
    "umt5": ("q", "v"),
}

# Mixture-of-experts families (mixtral, qwen2_moe, qwen3_moe, llama4 above; gpt_oss, deepseek_v3, ...) hold
# their experts as fused 3-D parameters ([experts, out, in], gpt-oss [experts, in, out]), not nn.Linear
# modules, so no module name reaches them: their defaults above adapt attention only and leave the experts,
# most of such a model's weights, out (as peft's). LoRA reaches them through target_parameters, one low-rank
# pair per expert (layers.param); ``lorakit inspect`` names what a config leaves out (experts_left_out).
MOE_EXPERT_PARAMETERS: dict[str, tuple[str, ...]] = {
    "mixtral": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    "qwen2_moe": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    "qwen3_moe": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    "llama4": ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"),
    "llama4_text": ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"),
    "gpt_oss": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    "olmoe": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    "phimoe": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    "deepseek_v3": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    "glm4_moe": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    "granitemoe": ("block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.experts.down_proj"),
}


def experts_left_out(model_type: str | None, target_parameters) -> tuple[str, ...]:
    """The fused expert parameters of an MoE family that ``target_parameters`` does not reach."""
    wanted = tuple(target_parameters or ())
    return tuple(p for p in MOE_EXPERT_PARAMETERS.get(model_type or "", ())
                 if not any(p == t or p.endswith("." + t) or t.endswith("." + p) for t in wanted))

WRAPPABLE_KINDS = ("linear", "conv1d", "embedding")


def module_kind(module: nn.Module) -> str:
    """'linear', 'conv1d' (transformers' GPT-2 style Conv1D), 'embedding', or the class name."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    cls = type(module)
    if cls.__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight"):
        return "conv1d"
    return cls.__name__


def default_target_modules(model_type: str | None) -> tuple[str, ...] | None:
    """The default targets of a model family, or None when the family is unknown."""
    if not model_type:
        return None
    for key in (model_type, model_type.replace("_", "-"), model_type.replace("-", "_")):
        if key in DEFAULT_TARGET_MODULES:
            return DEFAULT_TARGET_MODULES[key]
    return None


def _name_matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def _matches_any(name: str, spec: str | Sequence[str]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(_name_matches(name, e) for e in spec)


def _layer_index(name: str, patterns: Sequence[str] | None) -> int | None:
    """Index of the layer a module sits in: the first number after a layer-list name."""
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    else:
        m = None
        for p in patterns:
            m = re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", name)
            if m:
                break
    return int(m.group(1)) if m else None


def pattern_value(patterns: Mapping[str, float], name: str, default):
    """Value of the first pattern (module name or regex) that the end of ``name`` matches."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", name):
            return value
    return default


def _available(modules: Mapping[str, str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n, k in modules.items() if k in WRAPPABLE_KINDS and n})
    return ", ".join(leaves) if leaves else "(none: the model has no Linear, Conv1D or Embedding module)"


def _refuse_unmatched_entries(spec: Sequence[str], candidates: Sequence[str], modules: Mapping[str, str],
                              model_name: str) -> None:
    """Each listed name must match something: a typo is an error even when other names match."""
    missing = [e for e in spec if not any(_name_matches(n, e) for n in candidates)]
    if not missing:
        return
    leaves = sorted({n.rsplit(".", 1)[-1] for n, k in modules.items() if k in WRAPPABLE_KINDS and n})
    hints = {e: difflib.get_close_matches(e.rsplit(".", 1)[-1], leaves, n=3) for e in missing}
    hint = "; ".join(f"did you mean {', '.join(map(repr, h))} for {e!r}?" for e, h in hints.items() if h)
    raise TargetError(
        f"target_modules {missing!r} match no module in {model_name}. "
        f"Wrappable module names that exist: {_available(modules)}. " + (hint + " " if hint else "")
        + "Names match the end of a module path (e.g. 'q_proj' or 'self_attn.q_proj')."
    )


def _refuse_saved_targets(spec: Sequence[str], saved_hits: Sequence[str]) -> None:
    """A module named in target_modules that is also in modules_to_save would silently become a full trainable
    copy without LoRA (what peft does); lorakit asks which of the two was meant."""
    both = sorted({e for e in spec for n in saved_hits if _name_matches(n, e)})
    if both:
        raise TargetError(
            f"{both!r} {'is' if len(both) == 1 else 'are'} in both target_modules and modules_to_save "
            f"(e.g. {saved_hits[0]}). A module is either given a LoRA adapter (target_modules) or trained and saved "
            f"in full (modules_to_save), not both; remove {both[0]!r} from one of the two lists.")


def _check_layer_indices(config: LoraConfig, modules: Mapping[str, str], model_name: str) -> None:
    """Every index in layers_to_transform must be a layer the model has (a 7 on a 2-layer model is a typo)."""
    found = {_layer_index(n, config.layers_pattern) for n in modules if n}
    found.discard(None)
    missing = sorted(set(config.layers_to_transform) - found)
    if not missing:
        return
    where = f" under layers_pattern={list(config.layers_pattern)}" if config.layers_pattern else ""
    have = (f"layers 0 to {max(found)}" if found == set(range(max(found) + 1)) else f"layers {sorted(found)}") \
        if found else "no numbered layers"
    raise TargetError(
        f"layers_to_transform={list(config.layers_to_transform)} names {missing} but {model_name} has {have}{where}; "
        f"use indices of layers that exist" + (" (or fix layers_pattern)." if config.layers_pattern else "."))


def unmatched_pattern_keys(patterns: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    """Keys of a rank_pattern / alpha_pattern that match none of the module paths ``names``."""
    return [k for k in patterns if not any(re.fullmatch(rf"(?:.*\.)?(?:{k})", n) for n in names)]


def select_targets(
    modules: Mapping[str, str],
    config: LoraConfig,
    *,
    model_type: str | None = None,
    output_heads: Sequence[str] = (),
    modules_to_save: Sequence[str] = (),
    model_name: str = "the model",
    strict: bool = True,
) -> list[str]:
    """Names of the modules to wrap, in model order.

    ``modules`` maps each module path to its :func:`module_kind`. ``output_heads`` are never
    targeted by "all-linear"; ``modules_to_save`` (and their children) are never targeted.
    ``strict``: every listed target_modules entry must match a module (a typo is an error). Loading
    a saved adapter passes False: peft records entries a model may lack (a family default's names
    for other sub-models, its own wrapper paths), and the file's keys are checked one by one instead.
    """
    spec = config.target_modules
    explicit = spec is not None
    if spec is None:
        spec = default_target_modules(model_type)
        if spec is None:
            raise TargetError(
                f"no default target modules for model_type={model_type!r} ({model_name}). "
                f"Set target_modules to some of its wrappable module names: {_available(modules)}; "
                f"or target_modules='all-linear' to wrap every linear layer but the output head."
            )
    if spec == ALL_LINEAR:
        candidates = [n for n, k in modules.items() if k in ("linear", "conv1d") and n not in output_heads]
    else:
        candidates = [n for n in modules if n and _matches_any(n, spec)]

    def saved(n: str) -> bool:
        return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", n) for m in modules_to_save)

    if explicit and strict and isinstance(spec, tuple):
        _refuse_unmatched_entries(spec, candidates, modules, model_name)
        _refuse_saved_targets(spec, [n for n in candidates if saved(n)])
    candidates = [n for n in candidates if not saved(n)]
    if config.exclude_modules is not None:
        candidates = [n for n in candidates if not _matches_any(n, config.exclude_modules)]

    # wrapping needs a supported layer; containers matched by a loose regex are an error, not a silent skip
    unsupported = [n for n in candidates if modules[n] not in WRAPPABLE_KINDS]
    if unsupported:
        raise TargetError(
            "target_modules matched modules that LoRA cannot wrap: "
            + ", ".join(f"{n} ({modules[n]})" for n in unsupported[:8])
            + (" ..." if len(unsupported) > 8 else "")
            + ". Supported: nn.Linear, transformers Conv1D, nn.Embedding. Target their linear children "
            f"instead (wrappable names: {_available(modules)})."
        )

    if config.layers_to_transform is not None:
        keep = set(config.layers_to_transform)
        if strict:
            _check_layer_indices(config, modules, model_name)
        candidates = [n for n in candidates if _layer_index(n, config.layers_pattern) in keep]

    if not candidates:
        what = "its family default " + repr(list(spec)) if not explicit else f"target_modules={spec!r}"
        extra = ""
        if config.layers_to_transform is not None:
            extra = f" with layers_to_transform={list(config.layers_to_transform)}"
            if config.layers_pattern:
                extra += f" and layers_pattern={list(config.layers_pattern)}"
        raise TargetError(
            f"{what}{extra} matches no module of {model_name}. Wrappable module names that exist: "
            f"{_available(modules)}. Use some of them, or 'all-linear'."
        )
    return candidates
