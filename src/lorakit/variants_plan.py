"""Working out an adapter's parameters, ties and tokens (``lorakit.variants``) from a config and a model.

Everything is checked here, before the model changes: a target parameter that matches nothing (with
the parameters that exist), token ids beyond the vocabulary, a module that would be both a LoRA target
and trained another way, a tied pair whose two sides would get different ranks or rows, and inits that
cannot run on these targets (a quantized base for PiSSA, an odd rank for "orthogonal", ...).
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .config import LoraConfig
from .errors import ConfigError, LoraError, TargetError
from .hf.quant import is_quantized_weight
from .layers import LoraLayer
from .layers.init import changes_base
from .layers.tied import TiedLoraLinear
from .layers.param import param_shape
from .targets import default_target_modules, module_kind, pattern_value
from .variants import ParamSpec, TieSpec, TokenSpec

__all__ = ["VariantPlan", "check_param_adapters", "plan_variants", "selects_modules", "tied_pair"]


@dataclasses.dataclass(frozen=True)
class VariantPlan:
    names: list[str]              # the module targets (a tied head moved to a TieSpec, its embedding added)
    saved: tuple[str, ...]        # modules_to_save paths (both sides of a tied pair)
    extras: tuple                 # ParamSpec..., TieSpec..., TokenSpec... in injection order
    pattern_names: list[str]      # every targeted name rank_pattern / alpha_pattern may address


def selects_modules(config: LoraConfig, model_type: str | None) -> bool:
    """Whether module targets are chosen at all: ``target_modules=[]`` (or no family default) with
    target_parameters means LoRA on the parameters only, as in peft."""
    if config.target_modules == ():
        return False
    return not (config.target_parameters and config.target_modules is None
                and default_target_modules(model_type) is None)


def tied_pair(model: nn.Module, mods: Sequence[tuple[str, nn.Module]]) -> tuple[str | None, list[str]]:
    """(path of the input embedding, paths of the other modules whose weight is that very tensor)."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        emb = None
    emb = getattr(emb, "base_layer", emb)
    path = next((n for n, m in mods if m is emb), None)
    weight = getattr(emb, "weight", None)
    if path is None or not isinstance(weight, torch.Tensor):
        return path, []
    return path, [n for n, m in mods if m is not emb and getattr(m, "weight", None) is weight]


def check_param_adapters(existing: dict[str, LoraConfig], config: LoraConfig) -> None:
    """All adapters on target_parameters target the same parameters (they nest in one order; peft's rule)."""
    mine = set(config.target_parameters or ())
    for name, other in existing.items():
        theirs = set(other.target_parameters or ())
        if mine and theirs and mine != theirs:
            raise LoraError(f"adapters on target_parameters must all target the same parameters: the new one names "
                            f"{sorted(mine)}, adapter {name!r} {sorted(theirs)} (peft has the same rule).")


def _refuse_param_options(config: LoraConfig) -> None:
    bad = [f for f, v in (("lora_dropout", config.lora_dropout > 0), ("use_dora", config.use_dora),
                          ("fan_in_fan_out", config.fan_in_fan_out)) if v]
    if config.init_lora_weights not in (True, False, "gaussian"):
        bad.append(f"init_lora_weights={config.init_lora_weights!r}")
    if bad:
        raise TargetError(f"target_parameters cannot be combined with {', '.join(bad)}: the update is added to a "
                          f"weight (no input to drop out, no row norms), and the base-reading inits expect a .weight "
                          f"(peft refuses these too). Put those options in a separate adapter on target_modules.")


def plan_params(config: LoraConfig, mods: Sequence[tuple[str, nn.Module]], names: Sequence[str], strict: bool
                ) -> list[ParamSpec]:
    """One ParamSpec per targeted parameter, in module order and, per module, in registration order."""
    wanted = config.target_parameters
    if not wanted:
        return []
    _refuse_param_options(config)
    specs, hit = [], set()
    for path, m in mods:
        found = []
        for pname, p in m.named_parameters(recurse=False):
            key = f"{path}.{pname}"
            entry = next((t for t in wanted if key == t or key.endswith("." + t)), None) if path else None
            if entry is not None:
                found.append((pname, p))
                hit.add(entry)
        if found and path in names:
            raise TargetError(f"{path} is a target_modules target and holds target_parameters "
                              f"{[p for p, _ in found]}; target it one way (peft refuses both too).")
        for i, (pname, p) in enumerate(found):
            if is_quantized_weight(p):
                raise TargetError(f"target parameter {path}.{pname} is quantized; LoRA on raw parameters needs them "
                                  f"in float (load the base in bf16/fp32).")
            experts, fin, fout, _ = param_shape(p, bool(getattr(m, "is_transposed", False)))
            key = f"{path}.{pname}"
            r = pattern_value(config.rank_pattern, key, config.r)
            alpha = pattern_value(config.alpha_pattern, key, config.lora_alpha)
            specs.append(ParamSpec(path, pname, len(found) - 1 - i, experts, fin, fout, r, alpha,
                                   config.scaling_for(r, alpha)))
    missing = [t for t in wanted if t not in hit]
    if missing and strict:
        have = sorted({f"{n.split('.')[-1]}.{p}" for n, m in mods if n for p, t in m.named_parameters(recurse=False)
                       if t.dim() == 3}) or ["(no 3-D parameters)"]
        raise TargetError(f"target_parameters {missing!r} match no parameter (names match the end of "
                          f"'<module path>.<parameter>'). 3-D parameters here: {', '.join(have[:12])}.")
    return specs


def _lora_tie(config: LoraConfig, by_name: dict, emb: str, heads: list[str], names: list[str], order: list[str],
              wrappers: dict) -> tuple[list[str], list[TieSpec]]:
    """The embedding becomes a LoRA target; each tied head gets a TieSpec instead of its own pair."""
    if module_kind(by_name[emb]) != "embedding":
        raise TargetError(f"ensure_weight_tying: the input embedding {emb} is a {type(by_name[emb]).__name__}, not "
                          f"an nn.Embedding; tie its LoRA by hand or set ensure_weight_tying=False.")
    keep = set(names) - set(heads) | {emb}
    names = [n for n in order if n in keep]
    r = pattern_value(config.rank_pattern, emb, config.r)
    ties = []
    for h in heads:
        m = by_name[h]
        if isinstance(wrappers.get(h), LoraLayer) and not isinstance(wrappers.get(h), TiedLoraLinear):
            raise TargetError(f"ensure_weight_tying: {h} holds LoRA adapters of its own already, which cannot share "
                              f"the embedding's; tie in an adapter added before them, or set ensure_weight_tying=False.")
        if module_kind(m) != "linear":
            raise TargetError(f"ensure_weight_tying: the tied head {h} is a {type(m).__name__}, not an nn.Linear.")
        alpha = pattern_value(config.alpha_pattern, h, config.lora_alpha)
        if pattern_value(config.rank_pattern, h, config.r) != r:
            raise TargetError(f"ensure_weight_tying: {h} and {emb} share one LoRA pair, so they need one rank; "
                              f"rank_pattern gives them different ranks.")
        ties.append(TieSpec("lora", h, emb, m.in_features, m.out_features, r, alpha, config.scaling_for(r, alpha)))
    return names, ties


def plan_ties(model: nn.Module, config: LoraConfig, mods: Sequence[tuple[str, nn.Module]], names: list[str],
              saved: tuple[str, ...]) -> tuple[list[str], tuple[str, ...], list[TieSpec]]:
    """ensure_weight_tying on the LoRA targets and saved copies (peft: saved copies first, then targets)."""
    emb, heads = tied_pair(model, mods)
    pair = [emb, *heads] if heads else []
    touched = [p for p in pair if p in names or p in saved]
    if not config.ensure_weight_tying:
        if touched:
            warnings.warn(f"{touched} belong to a tied embedding/head pair ({pair}); with ensure_weight_tying=False "
                          f"the adapter unties them (as peft). Set ensure_weight_tying=True to keep them tied.",
                          stacklevel=5)
        return names, saved, []
    if not heads:
        warnings.warn("ensure_weight_tying=True, but the model has no tied embedding/head pair: nothing to tie.",
                      stacklevel=5)
        return names, saved, []
    if any(p in saved for p in pair):
        saved = tuple(dict.fromkeys([*saved, emb, *heads]))
        mods_by = dict(mods)
        return names, saved, [TieSpec("saved", h, emb, *reversed(mods_by[h].weight.shape)) for h in heads]
    if any(p in names for p in pair):
        wrappers = {h: model.get_submodule(h) for h in heads}
        names, ties = _lora_tie(config, dict(mods), emb, heads, names, [n for n, _ in mods], wrappers)
        return names, saved, ties
    if config.trainable_token_indices is None:
        warnings.warn(f"ensure_weight_tying=True, but neither side of the tied pair {pair} is in target_modules or "
                      f"modules_to_save: nothing to tie.", stacklevel=5)
    return names, saved, []


def _token_targets(model, config: LoraConfig, mods, emb: str | None) -> dict[str, tuple[int, ...]]:
    spec = config.trainable_token_indices
    if isinstance(spec, tuple):
        path = emb or next((n for n, _ in mods if n.split(".")[-1] == "embed_tokens"), None)
        if path is None:
            raise TargetError("trainable_token_indices as a list needs the model's input embedding, which this model "
                              "does not name; give {embedding module name: ids} instead.")
        return {path: spec}
    out = {}
    for key, ids in spec.items():
        hits = [n for n, _ in mods if n and (n == key or n.endswith("." + key))]
        if not hits:
            raise TargetError(f"trainable_token_indices names {key!r}, which matches no module; embeddings here: "
                              f"{sorted(n for n, m in mods if module_kind(m) == 'embedding')}.")
        out.update({h: ids for h in hits})
    return out


def plan_tokens(model: nn.Module, config: LoraConfig, mods: Sequence[tuple[str, nn.Module]], names: Sequence[str],
                saved: Sequence[str]) -> list[TokenSpec]:
    """TokenSpecs for trainable_token_indices; a head tied to a trained input embedding follows its rows."""
    if config.trainable_token_indices is None:
        return []
    by_name = dict(mods)
    emb, heads = tied_pair(model, mods)
    targets = _token_targets(model, config, mods, emb)
    tied = []
    for h in heads if emb in targets else ():
        if h in targets and targets[h] != targets[emb]:
            if config.ensure_weight_tying:
                raise ConfigError(f"ensure_weight_tying=True, but trainable_token_indices gives the tied {emb} and {h} "
                                  f"different rows ({list(targets[emb])[:6]} / {list(targets[h])[:6]}); give both "
                                  f"the same ids, or set ensure_weight_tying=False.")
            continue  # its own rows: the pair is untied for them (peft)
        targets.pop(h, None)
        tied.append(h)
    specs = []
    for path, ids in targets.items():
        m = by_name[path]
        if module_kind(m) not in ("embedding", "linear"):
            raise TargetError(f"trainable_token_indices targets {path}, a {type(m).__name__}; it takes an "
                              f"nn.Embedding (or an nn.Linear head tied to one).")
        if path in saved or path in names:
            raise TargetError(f"{path} has trainable_token_indices and is also in "
                              f"{'modules_to_save' if path in saved else 'target_modules'}; train it one way.")
        rows = m.weight.shape[0]
        if max(ids) >= rows:
            raise TargetError(f"trainable_token_indices for {path} holds ids {[i for i in ids if i >= rows][:6]}, "
                              f"but it has {rows} rows; resize the embeddings for new tokens first.")
        specs.append(TokenSpec(path, ids, int(m.weight.shape[1])))
    return specs + [TokenSpec(h, targets[emb], int(by_name[h].weight.shape[1]), tied_to=emb) for h in tied]


def check_inits(config: LoraConfig, by_name: dict, names: Sequence[str], params: list, ties: list) -> None:
    """Refuse (before any change) an init that cannot run on these targets."""
    init = config.init_lora_weights
    if init in (True, False, "gaussian"):
        return
    if any(t.kind == "lora" for t in ties):
        raise TargetError(f"ensure_weight_tying ties the head's LoRA pair to the embedding's, and "
                          f"init_lora_weights={init!r} would initialise them separately; use True or 'gaussian'.")
    if init == "loftq":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise LoraError("init_lora_weights='loftq' quantizes with bitsandbytes: pip install 'lorakit[qlora]'.") \
                from None
    for n in names:
        m = by_name[n]
        if module_kind(m) == "embedding":
            continue  # the standard init, as in peft
        r = pattern_value(config.rank_pattern, n, config.r)
        if init == "orthogonal" and r % 2:
            raise TargetError(f"init_lora_weights='orthogonal' needs an even rank; {n} gets r={r}.")
        if changes_base(init):
            if is_quantized_weight(m.weight):
                raise TargetError(f"init_lora_weights={init!r} reads and rewrites the base weights, but {n} is "
                                  f"quantized: load the base in bf16/fp32 (LoftQ quantizes the base itself).")
            if r > min(m.weight.shape):
                raise TargetError(f"init_lora_weights={init!r} needs r <= {min(m.weight.shape)} for {n} "
                                  f"{tuple(m.weight.shape)}; got r={r} (lower it there with rank_pattern).")


def plan_variants(model: nn.Module, config: LoraConfig, mods: list[tuple[str, nn.Module]], names: list[str],
                  saved: tuple[str, ...], strict: bool) -> VariantPlan:
    """Parameters, ties and tokens of ``config`` on ``model`` (see ``lorakit.variants``); nothing changes."""
    params = plan_params(config, mods, names, strict)
    names, saved, ties = plan_ties(model, config, mods, names, saved)
    tokens = plan_tokens(model, config, mods, names, saved)
    check_inits(config, dict(mods), names, params, ties)
    order = (*params, *[t for t in ties if t.kind == "lora"], *[t for t in ties if t.kind == "saved"], *tokens)
    return VariantPlan(names, saved, order, names + [f"{p.module}.{p.param}" for p in params])
