"""LoraModel: a transformers model with named LoRA adapters.

Porting peft code means changing imports: ``get_peft_model``, ``print_trainable_parameters``,
``save_pretrained``, ``LoraModel.from_pretrained`` (alias ``PeftModel``), ``merge_and_unload``
keep their names and meaning. The wrapped model is changed in place (its target layers are
wrapped); ``unload`` / ``merge_and_unload`` give back plain modules.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .config import LoraConfig
from .errors import AdapterLoadError, LoraError
from .forward_signature import signed_forward
from .layers import LoraLayer, ModulesToSave, wrapper_for
from .layers.routing import BASE, adapter_rows
from .ops import SharedDropout
from .plan import PEFT_PREFIX, AdapterPlan, plan_adapter
from .quant import guard_cpu_4bit_training, is_quantized_model

__all__ = ["LoraModel", "PeftModel", "get_peft_model", "get_peft_model_state_dict", "set_peft_model_state_dict"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_ADAPTER_KEY = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_dropout|modules_to_save)\.([^.]+)(?=\.|$)")


class LoraModel(nn.Module):
    """A model with LoRA adapters. Calls and unknown attributes go to the wrapped model."""

    #: tells transformers' Trainer that adapters are attached (it refuses to train a quantized base without)
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default", *,
                 _strict_targets: bool = True):
        super().__init__()
        if isinstance(model, LoraModel):
            raise LoraError("the model already has LoRA adapters; use add_adapter() on it for another one.")
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self._plans: dict[str, AdapterPlan] = {}
        self.active_adapter: str | None = None
        self._unloaded = False
        #: training with labels computes a causal LM's loss fused (see forward); False: the model's own
        self.fused_loss = True
        self._fused_ok: bool | None = None  # fused loss checked against the model's own: None = not yet
        for p in model.parameters():
            p.requires_grad_(False)
        if is_quantized_model(model):
            guard_cpu_4bit_training(model)  # bitsandbytes' CPU inference packing would cut the gradient
        self._add_adapter(adapter_name, config, strict=_strict_targets)

    # -- attribute passthrough --------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
        try:
            return getattr(self.model, name)
        except AttributeError:
            raise AttributeError(f"'LoraModel' object has no attribute {name!r} (nor has the "
                                 f"{type(self.model).__name__} it wraps)") from None

    @property
    def base_model(self) -> "LoraModel":
        """peft's ``PeftModel.base_model``; ``model.base_model.model`` is the transformers model."""
        return self

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if self.active_adapter else []

    @property
    def active_peft_config(self) -> LoraConfig:
        return self.peft_config[self.active_adapter]

    def _check_live(self) -> None:
        if self._unloaded:
            raise LoraError("this LoraModel was unloaded; use the model that unload()/merge_and_unload() returned.")

    # -- layers -----------------------------------------------------------------------------
    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        for name, m in self.model.named_modules():
            if isinstance(m, LoraLayer):
                yield name, m

    def _saved_wrappers(self) -> Iterator[tuple[str, ModulesToSave]]:
        for name, m in self.model.named_modules():
            if isinstance(m, ModulesToSave):
                yield name, m

    def _replace(self, path: str, new: nn.Module) -> None:
        parent_path, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        setattr(parent, child, new)

    # -- adapters ---------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        """Inject a new adapter (it becomes active if none is)."""
        self._add_adapter(adapter_name, config, strict=True)

    def _add_adapter(self, adapter_name: str, config: LoraConfig, strict: bool) -> None:
        """``strict=False`` when loading a file: target entries matching nothing pass (see plan_adapter)."""
        self._check_live()
        if not isinstance(config, LoraConfig):
            raise LoraError(f"config must be a lorakit.LoraConfig; got {type(config).__name__}.")
        if not isinstance(adapter_name, str) or not _NAME_RE.match(adapter_name) or adapter_name == BASE:
            raise LoraError(
                f"adapter name {adapter_name!r} is not allowed: use letters, digits, '_' or '-' (no dots), "
                f"and not {BASE!r}."
            )
        if adapter_name in self.peft_config:
            raise LoraError(f"adapter {adapter_name!r} exists already; delete_adapter() it first or pick another name.")
        with_bias = [n for n, c in self.peft_config.items() if c.bias != "none"]
        if self.peft_config and (config.bias != "none" or with_bias):
            who = f"adapter {with_bias[0]!r} has bias={self.peft_config[with_bias[0]].bias!r}" if with_bias else \
                f"the new adapter has bias={config.bias!r}"
            raise LoraError(
                f"cannot add adapter {adapter_name!r}: {who}. bias='all'/'lora_only' trains the base model's own "
                f"biases, which every adapter shares, so one adapter's biases would change the others' outputs. "
                f"Use bias='none' for every adapter when a model holds several (peft has the same rule).")
        wrapped = {n for n, _ in self.lora_layers()}
        plan = plan_adapter(self.model, config, wrapped=wrapped, strict=strict)  # raises before any change
        dropout = SharedDropout(config.lora_dropout) if config.lora_dropout > 0 else None
        for spec in plan.targets:
            module = self.model.get_submodule(spec.name)
            if not isinstance(module, LoraLayer):
                wrapper = wrapper_for(spec.kind)(module)
                self._replace(spec.name, wrapper)
                module = wrapper
            module.add_adapter(adapter_name, spec.r, spec.alpha, spec.scaling, dropout, config.init_lora_weights)
        for path in plan.modules_to_save:
            module = self.model.get_submodule(path)
            if not isinstance(module, ModulesToSave):
                wrapper = ModulesToSave(module)
                self._replace(path, wrapper)
                module = wrapper
            module.add_adapter(adapter_name)
        self.peft_config[adapter_name] = config
        self._plans[adapter_name] = plan
        if self.active_adapter is None:
            self._activate(adapter_name)
        else:
            self._mark_trainable()
        if dropout is not None:
            dropout.train(self.training)
        self._fused_ok = None  # a new head copy (modules_to_save) is checked again

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the active adapter (the one used, trained and saved by default).

        As in peft, the adapter it activates trains unless ``inference_mode=True`` (also for one loaded
        with ``is_trainable=False``); its config's ``inference_mode`` is updated to say so.
        """
        self._check_live()
        self._require(adapter_name)
        config = self.peft_config[adapter_name]
        if config.inference_mode != bool(inference_mode):
            self.peft_config[adapter_name] = config.replace(inference_mode=bool(inference_mode))
        self._activate(adapter_name)

    def _activate(self, adapter_name: str) -> None:
        """Switch the active adapter, trainability as its config says (lorakit's own calls)."""
        self.active_adapter = adapter_name
        for _, layer in self.lora_layers():
            for name in list(layer.merged_adapters):
                if name != adapter_name:
                    layer.unmerge([name])
            layer.set_active([adapter_name])
        for _, w in self._saved_wrappers():
            w.active_adapter = adapter_name
        self._mark_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_live()
        self._require(adapter_name)
        for path, layer in list(self.lora_layers()):
            if adapter_name in layer.r:
                layer.delete_adapter(adapter_name)
                if not layer.r:
                    self._replace(path, layer.base_layer)
        for path, w in list(self._saved_wrappers()):
            if adapter_name in w.modules_to_save:
                w.delete_adapter(adapter_name)
                if not len(w.modules_to_save):
                    self._replace(path, w.original_module)
        del self.peft_config[adapter_name]
        del self._plans[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None
            if self.peft_config:
                self._activate(next(iter(self.peft_config)))

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True,
                             svd_driver: str | None = None, density: float | None = None,
                             majority_sign_method: str = "total") -> None:
        """Add ``adapter_name``, the weighted combination of ``adapters`` (peft's method and arguments).

        ``combination_type``: ``"cat"`` (exact, rank = sum of ranks), ``"svd"`` (the exact weighted sum cut
        to ``svd_rank``, default the largest rank; ``svd_clamp``, ``svd_full_matrices``, ``svd_driver`` as in
        peft) or ``"linear"`` (equal ranks; weighted sums of the A's and of the B's, peft's rough
        approximation); one adapter always combines as ``"linear"``. Weights may be negative. The new
        adapter is not activated (``set_adapter`` it); it covers the modules any of ``adapters`` wraps, with
        lora_alpha = r. peft's ties / dare / magnitude_prune variants are not implemented. As in peft, an
        existing ``adapter_name`` is left as it is (with a warning here).
        """
        import warnings

        from . import combine

        self._check_live()
        adapters, given = list(adapters), list(weights)
        if not adapters:
            raise LoraError("add_weighted_adapter needs at least one adapter to combine.")
        for name in adapters:
            self._require(name)
        try:
            weights = [float(w) for w in given]
        except (TypeError, ValueError):
            weights = []
        if len(weights) != len(adapters) or not all(math.isfinite(w) for w in weights):
            raise LoraError(f"weights must be one finite number per adapter: {len(adapters)} adapter(s) {adapters}, "
                            f"weights {given!r}.")
        if adapter_name in self.peft_config:
            warnings.warn(f"adapter {adapter_name!r} exists already; add_weighted_adapter left it unchanged "
                          f"(delete_adapter() it first to rebuild it).", stacklevel=2)
            return
        if combination_type in combine.PEFT_ONLY:
            raise LoraError(f"combination_type {combination_type!r} is not implemented in lorakit; use 'cat' or "
                            f"'svd' (exact up to the rank) or 'linear'.")
        if combination_type not in combine.COMBINATIONS:
            raise LoraError(f"unknown combination_type {combination_type!r}; choose one of {list(combine.COMBINATIONS)}.")
        kind = "linear" if len(adapters) == 1 else combination_type
        configs = [self.peft_config[a] for a in adapters]
        ranks = [max([c.r, *c.rank_pattern.values()]) for c in configs]
        if kind == "linear" and len(set(ranks)) != 1:
            raise LoraError(f"combination_type='linear' needs adapters of one rank, got ranks {ranks} for {adapters}; "
                            f"use 'cat' or 'svd'.")
        if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank < 1):
            raise LoraError(f"svd_rank must be a positive integer, got {svd_rank!r}.")
        if svd_clamp is not None and not 0.0 < float(svd_clamp) <= 1.0:
            raise LoraError(f"svd_clamp is a quantile in (0, 1], got {svd_clamp!r}.")
        rank = {"cat": sum(ranks), "linear": ranks[0]}.get(kind) or svd_rank or max(ranks)
        shared = [path for path, w in self._saved_wrappers() if sum(a in w.modules_to_save for a in adapters) > 1]
        if shared:
            raise LoraError(f"adapters {adapters} each keep their own copy of {shared[0]!r} (modules_to_save), "
                            f"which cannot be combined; combine adapters that share no saved module.")
        paths = sorted(path for path, layer in self.lora_layers() if any(a in layer.r for a in adapters))
        # the modules the sources wrap, by path (a union of their target patterns could reach others);
        # plain initialisation (no PiSSA-style change of the base) and scaling exactly 1
        config = configs[0].replace(r=rank, lora_alpha=rank, use_rslora=False, target_modules=tuple(paths),
                                    exclude_modules=None, layers_to_transform=None, layers_pattern=None,
                                    rank_pattern={}, alpha_pattern={}, init_lora_weights=True)
        self.add_adapter(adapter_name, config)
        with torch.no_grad():
            for _, layer in self.lora_layers():
                if adapter_name not in layer.r:
                    continue
                present = [(a, w) for a, w in zip(adapters, weights) if a in layer.r]
                A, B = combine.lora_pair(layer, adapter_name)
                if not present:
                    A.zero_(), B.zero_()
                    continue
                new_a, new_b = combine.combined_pair(layer, [a for a, _ in present], [w for _, w in present],
                                                     kind, rank, svd_clamp=svd_clamp,
                                                     svd_full_matrices=svd_full_matrices, svd_driver=svd_driver)
                A.copy_(new_a), B.copy_(new_b)

    def _require(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise LoraError(f"no adapter named {adapter_name!r}; adapters: {list(self.peft_config) or 'none'}.")

    def _mark_trainable(self) -> None:
        """Only the active adapter trains (nothing does in inference mode); biases per ``bias``."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        name = self.active_adapter
        if name is None:
            return
        config = self.peft_config[name]
        if config.inference_mode:
            return
        for p in self.adapter_parameters(name):
            p.requires_grad_(True)

    def adapter_parameters(self, adapter_name: str | None = None) -> list[nn.Parameter]:
        """The parameters an adapter trains: A/B, its modules_to_save copies, its biases."""
        name = adapter_name or self.active_adapter
        self._require(name)
        params: list[nn.Parameter] = []
        for _, layer in self.lora_layers():
            if name in layer.r:
                params.extend(layer.adapter_parameters(name))
        for _, w in self._saved_wrappers():
            if name in w.modules_to_save:
                params.extend(w.modules_to_save[name].parameters())
        bias = self.peft_config[name].bias
        if bias != "none":
            targets = {t.name for t in self._plans[name].targets}
            for mpath, m in self.model.named_modules():
                if isinstance(m, (LoraLayer, ModulesToSave)):
                    continue
                b = m._parameters.get("bias") if hasattr(m, "_parameters") else None
                if isinstance(b, nn.Parameter):
                    owner = mpath[: -len(".base_layer")] if mpath.endswith(".base_layer") else mpath
                    if "modules_to_save" in owner.split(".") or ".original_module" in owner:
                        continue
                    if bias == "all" or owner in targets:
                        params.append(b)
        return params

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Switch training on (or off) for the named adapters' parameters, leaving the others as they are
        (peft's method: several adapters can train at once). ``set_adapter`` resets it to the active one."""
        self._check_live()
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self._require(name)
        for name in names:
            for p in self.adapter_parameters(name):
                p.requires_grad_(bool(requires_grad))

    def _switchable(self) -> list:
        """Every module whose adapters can be switched off: LoRA layers and modules_to_save wrappers."""
        return [l for _, l in self.lora_layers()] + [w for _, w in self._saved_wrappers()]

    def _set_adapters_disabled(self, disabled: bool) -> None:
        self._check_live()
        for layer in self._switchable():
            layer.disable_adapters = disabled

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model without any adapter inside the ``with`` block."""
        self._check_live()
        layers = self._switchable()
        before = [l.disable_adapters for l in layers]  # nested blocks: leaving the inner one restores, not enables
        try:
            for l in layers:
                l.disable_adapters = True
            yield
        finally:
            for l, was in zip(layers, before):
                l.disable_adapters = was

    def disable_adapter_layers(self) -> None:
        """Switch every adapter off until ``enable_adapter_layers()`` (peft's method; merged ones are unmerged)."""
        self._set_adapters_disabled(True)

    def enable_adapter_layers(self) -> None:
        """Undo ``disable_adapter_layers()``."""
        self._set_adapters_disabled(False)

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (with the LoRA layers in it), as peft's ``get_base_model``."""
        return self.model

    @property
    def peft_type(self) -> str:
        return "LORA"

    # -- forward ----------------------------------------------------------------------------
    @signed_forward  # instance.forward shows the wrapped model's parameters (HF Trainer reads them)
    def forward(self, *args, adapter_names: Sequence[str] | None = None, return_logits: bool = False, **kwargs):
        """Forward of the wrapped model. ``adapter_names`` (one per row; "__base__" for none) mixes adapters in a batch.

        Training a causal LM with ``labels`` (``model.train()``, grad enabled, keyword inputs only), the
        loss comes from ``lorakit.lm_loss``: the head and cross-entropy only where labels count, chunk by
        chunk, never the full [tokens, vocab] logits at once. The output (``lm_loss.FusedLossOutput``)
        has the same loss and computes its logits only when they are read (``out.logits``: the head over
        the kept final hidden states, the model's own values), so a loop that only backpropagates the loss
        never makes them. The first such call checks the loss against the model's own once and keeps the
        model's own from then on if they differ. ``return_logits=True`` for one call, or
        ``model.fused_loss = False`` for all, runs the model's own forward unchanged.
        """
        self._check_live()
        rows = contextlib.nullcontext()
        if adapter_names is not None:
            self._check_rows(adapter_names)
            rows = adapter_rows(adapter_names)
        try:
            with rows:
                # per-row adapters keep the model's own forward: the fused path's one-row self-check and its
                # single head would not follow the rows
                if adapter_names is None and not args and not return_logits and self._fused_loss_applies(kwargs):
                    return self._fused_loss_forward(kwargs)
                return self.model(*args, **kwargs)
        finally:
            if adapter_names is not None:
                self._drop_route_caches()

    _FUSED_KEYS = frozenset({"input_ids", "attention_mask", "labels", "position_ids", "use_cache",
                             "num_items_in_batch", "return_dict"})

    def _fused_loss_applies(self, kwargs: dict) -> bool:
        if not (self.fused_loss and self.training and torch.is_grad_enabled() and self._fused_ok is not False):
            return False
        labels, ids = kwargs.get("labels"), kwargs.get("input_ids")
        if labels is None or ids is None or not set(kwargs) <= self._FUSED_KEYS:
            return False
        if kwargs.get("use_cache") or kwargs.get("return_dict", True) is False:
            return False
        if not (isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape == ids.shape):
            return False
        if ids.shape[1] < 2:  # nothing to predict; the model's own loss says so (NaN, as HF and peft)
            return False
        task = getattr(self.peft_config.get(self.active_adapter), "task_type", None)
        if task is not None:
            return str(getattr(task, "value", task)) == "CAUSAL_LM"
        return type(self.model).__name__.endswith(("ForCausalLM", "LMHeadModel"))

    def _fused_loss_forward(self, kwargs: dict):
        from .lm_loss import (IGNORE_INDEX, _linear_of, body_hidden, check_fast_loss, fast_path_parts, fused_output,
                              labelled_loss_sum)

        parts = fast_path_parts(self)
        if parts is None:
            self._fused_ok = False
            return self.model(**kwargs)
        batch = {k: kwargs[k] for k in ("input_ids", "attention_mask", "labels", "position_ids")
                 if kwargs.get(k) is not None}
        labelled = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        if self._fused_ok is None:
            if not bool(labelled):
                return self.model(**kwargs)  # no labelled token to check against: decide on a later batch
            self._fused_ok = check_fast_loss(self, parts, batch)
            if not self._fused_ok:
                return self.model(**kwargs)
        body, head = parts
        # every position through the body (not one less, as the training loop's loss does): the output's
        # logits, computed only if read, then have the shape and values of the model's own
        hidden = body_hidden(body, batch, drop_last=False)
        denom = kwargs.get("num_items_in_batch")
        if denom is None:
            denom = labelled
        # half-precision heads round their gradient after the 1/N, as HF does (float32 ones need no scale, and
        # no host sync for it)
        weight = getattr(_linear_of(head), "weight", None)
        half = weight is not None and weight.dtype in (torch.float16, torch.bfloat16)
        scale = 1.0 / max(float(denom), 1.0) if half else 1.0
        total = labelled_loss_sum(hidden[:, :-1], head, batch["labels"][:, 1:], half_scale=scale)
        if isinstance(denom, torch.Tensor):
            denom = denom.to(total.device)
        return fused_output(total / denom, head, hidden)

    def generate(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        self._check_live()
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        self._check_rows(adapter_names)
        try:
            with adapter_rows(adapter_names):
                return self.model.generate(*args, **kwargs)
        finally:
            self._drop_route_caches()

    def _drop_route_caches(self) -> None:
        """Per-row routing keeps gathered adapter weights for the steps of one call (generation); a later call
        gathers them again, so weights changed in between by any means (``.data``, a fused optimizer) count."""
        for _, layer in self.lora_layers():
            layer.__dict__.pop("_route_cache", None)

    def _check_rows(self, names: Sequence[str]) -> None:
        unknown = sorted({n for n in names if n != BASE and n not in self.peft_config})
        if unknown:
            raise LoraError(f"adapter_names has unknown adapters {unknown}; loaded: {list(self.peft_config)} "
                            f"(use {BASE!r} for the base model).")

    # -- merge ------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active one) into the base weights; merging twice is a no-op."""
        self._check_live()
        names = list(adapter_names or self.active_adapters)
        for n in names:
            self._require(n)
        layers = [l for _, l in self.lora_layers()]
        if safe_merge:  # check every layer first so a bad adapter leaves no layer half-merged
            for l in layers:
                for n in names:
                    if n in l.r and n not in l.merged_adapters:
                        new = l.base_layer.weight.data.float() + l.delta_weight(n)
                        if not torch.isfinite(new).all():
                            raise LoraError(
                                f"merging adapter {n!r} would put NaN/inf into the weights of a "
                                f"{type(l.base_layer).__name__} layer; nothing was merged. The adapter is broken."
                            )
        for l in layers:
            l.merge(names, safe=False)

    def unmerge_adapter(self) -> None:
        self._check_live()
        for _, l in self.lora_layers():
            l.unmerge()

    def _strip(self, merge: bool, safe_merge: bool, adapter_names: Sequence[str] | None) -> nn.Module:
        self._check_live()
        if merge:
            self.merge_adapter(adapter_names, safe_merge=safe_merge)
        for path, l in list(self.lora_layers()):
            if not merge:
                l.unmerge()
            self._replace(path, l.base_layer)
        for path, w in list(self._saved_wrappers()):
            keep = w.modules_to_save[self.active_adapter] if merge and self.active_adapter in w.modules_to_save \
                else w.original_module
            self._replace(path, keep)
        model = self.model
        for p in model.parameters():
            p.requires_grad_(False)
        self._unloaded = True
        return model

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> nn.Module:
        """Merge the adapter into the weights and return the plain transformers model."""
        return self._strip(True, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the original model."""
        return self._strip(False, False, None)

    # -- parameters -------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.model.parameters():
            n = p.numel()
            if type(p).__name__ == "Params4bit":  # two 4-bit values per stored byte
                n *= 2
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def get_layer_status(self) -> list:
        """Per adapter layer: enabled, active / merged / available adapters, requires_grad, devices (peft's fields)."""
        from .status import layer_status

        return layer_status(self.model)

    def get_model_status(self):
        """The layers' status folded into one, ``"irregular"`` where they disagree (peft's ``get_model_status``)."""
        from .status import model_status

        return model_status(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    # -- state dicts (PEFT key names) -------------------------------------------------------
    def lora_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's weights under PEFT key names (``base_model.model.<path>.lora_A.weight`` ...)."""
        self._check_live()
        name = adapter_name or self.active_adapter
        self._require(name)
        wanted = set(self._plans[name].expected_keys())
        out: dict[str, torch.Tensor] = {}
        for key, tensor in self.model.state_dict(keep_vars=True).items():
            peft_key = _peft_key(key, name)
            if peft_key is not None and peft_key in wanted:
                out[peft_key] = tensor.detach()
        missing = wanted - set(out)
        if missing:  # a bug, not a user error: the plan and the model disagree
            raise RuntimeError(f"internal: adapter {name!r} lacks {sorted(missing)[:5]}")
        return out

    def load_lora_state_dict(self, state_dict: dict[str, torch.Tensor], adapter_name: str | None = None) -> None:
        """Copy PEFT-named weights into an existing adapter; every key and shape is checked first."""
        self._check_live()
        name = adapter_name or self.active_adapter
        self._require(name)
        expected = self._plans[name].expected_keys()
        clean = check_state_dict(state_dict, expected, what=f"adapter {name!r}")
        current = self.lora_state_dict(name)
        with torch.no_grad():
            for key, value in clean.items():
                current[key].copy_(value.to(dtype=current[key].dtype, device=current[key].device))

    # -- files ------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: Sequence[str] | None = None,
                        **_ignored) -> None:
        """Write PEFT-format adapter folders (the default adapter at the top, others in subfolders)."""
        from .checkpoint import save_adapter

        self._check_live()
        for name in selected_adapters or list(self.peft_config):
            target = save_directory if name == "default" else os.path.join(save_directory, name)
            save_adapter(self, target, name)

    def load_adapter(self, adapter_dir: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False,
                     allow_pickle: bool = False, **peft_kwargs) -> None:
        """Load a PEFT-format adapter folder as a new adapter (checked completely before any change).

        peft's keyword arguments are taken as far as they apply to a local folder (see ``_peft_load_options``).
        """
        self._check_live()
        adapter_dir = _peft_load_options(adapter_dir, peft_kwargs)
        if adapter_name in self.peft_config:
            raise LoraError(f"adapter {adapter_name!r} exists already; pick another adapter_name or delete it first.")
        wrapped = {n for n, _ in self.lora_layers()}
        config, weights = _read_checked(self.model, adapter_dir, is_trainable, allow_pickle, wrapped)
        self._add_adapter(adapter_name, config, strict=False)
        self.load_lora_state_dict(weights, adapter_name)
        if not is_trainable:
            self.eval()  # loaded for inference: dropout off, as peft's load_adapter does

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter_dir: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, allow_pickle: bool = False, **peft_kwargs) -> "LoraModel":
        """Wrap ``model`` with the adapter saved in ``adapter_dir`` (peft's ``PeftModel.from_pretrained``)."""
        adapter_dir = _peft_load_options(adapter_dir, peft_kwargs)
        config, weights = _read_checked(model, adapter_dir, is_trainable, allow_pickle, set())
        out = cls(model, config, adapter_name, _strict_targets=False)
        out.load_lora_state_dict(weights, adapter_name)
        if not is_trainable:
            out.eval()  # loaded for inference: dropout off, as peft's from_pretrained does
        return out


#: peft loading options that change nothing for a local folder read onto the model's own devices
_PEFT_LOAD_NOOPS = frozenset({"low_cpu_mem_usage", "torch_device", "ephemeral_gpu_offload", "revision", "token",
                              "cache_dir", "local_files_only", "use_auth_token"})


def _peft_load_options(adapter_dir: str | os.PathLike, kwargs: dict) -> str:
    """Apply peft's from_pretrained / load_adapter keyword arguments; refuse what lorakit cannot honour.

    ``subfolder`` is joined to the path; options about downloading or placement are accepted and change
    nothing (adapters go to their base layers' devices); ``autocast_adapter_dtype=False`` (adapters in a
    half-precision base's dtype) and ``config=`` (overriding the saved config) are not supported.
    """
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


def _read_checked(model: nn.Module, adapter_dir: str | os.PathLike, is_trainable: bool, allow_pickle: bool,
                  wrapped: set[str]) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read an adapter folder and check it against ``model`` completely; the model is not touched."""
    from .checkpoint import read_adapter, warn_if_other_base

    config, weights = read_adapter(adapter_dir, allow_pickle=allow_pickle)
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


PeftModel = LoraModel  # the name peft users have in their code


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default") -> LoraModel:
    """Wrap ``model`` with a fresh LoRA adapter (peft's entry point, same signature)."""
    return LoraModel(model, peft_config, adapter_name)


def get_peft_model_state_dict(model: LoraModel, state_dict: dict | None = None,
                              adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """peft's function: the adapter's weights under PEFT key names (``model.lora_state_dict``).

    ``state_dict`` (peft's optional argument) is not supported: the weights are read from the model.
    """
    _require_lora_model(model, "get_peft_model_state_dict")
    if state_dict is not None:
        raise LoraError("get_peft_model_state_dict(model, state_dict=...) is not supported; lorakit reads the "
                        "adapter's weights from the model itself: call it without state_dict.")
    return model.lora_state_dict(adapter_name)


def set_peft_model_state_dict(model: LoraModel, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default") -> None:
    """peft's function: load PEFT-named weights into an existing adapter (every key and shape checked first)."""
    _require_lora_model(model, "set_peft_model_state_dict")
    model.load_lora_state_dict(peft_model_state_dict, adapter_name)


def _require_lora_model(model, what: str) -> None:
    if not isinstance(model, LoraModel):
        raise LoraError(f"{what} needs a model wrapped by lorakit.get_peft_model (a LoraModel); "
                        f"got {type(model).__name__}.")


def _peft_key(key: str, adapter_name: str) -> str | None:
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
    clean: dict[str, torch.Tensor] = {}
    unexpected, wrong = [], []
    for key, value in state_dict.items():
        if key not in expected:
            if key.endswith(".base_layer.weight"):
                continue
            if _peft_wrapper_duplicate(key, value, expected):
                continue
            unexpected.append(key)
            continue
        if tuple(value.shape) != tuple(expected[key]):
            wrong.append(f"{key}: file has {tuple(value.shape)}, model needs {tuple(expected[key])}")
            continue
        clean[key] = value
    missing = sorted(set(expected) - set(state_dict))
    problems = []
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
