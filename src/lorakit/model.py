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
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .config import LoraConfig
from .errors import AdapterLoadError, LoraError
from .hf.compat import PeftCompatMixin
from .hf.signature import signed_forward
from .layers import LoraLayer, ModulesToSave, wrapper_for
from .layers.init import init_from_base
from .layers.routing import adapter_rows
from .layers.tied import untie_for_merge
from .kernels import SharedDropout
from .loss import fused_forward
from .loss.state import loss_state
from .peft_format import (adapter_folder, adapter_state_dict, check_state_dict, peft_load_options, read_checked,
                          save_adapter)
from .plan import (AdapterPlan, as_adapter_names, batch_size, check_new_adapter, check_rows, plan_adapter,
                   trained_biases)
from .undo import undo_on_error
from .hf.quant import guard_cpu_4bit_training, is_quantized_model, stored_elements

__all__ = ["LoraModel", "PeftModel", "get_peft_model"]



class LoraModel(PeftCompatMixin, nn.Module):
    """A model with LoRA adapters. Calls and unknown attributes go to the wrapped model."""

    #: tells transformers' Trainer that adapters are attached (it refuses to train a quantized base without)
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default", *,
                 _strict_targets: bool = True):
        super().__init__()
        if isinstance(model, LoraModel):
            raise LoraError("the model already has LoRA adapters; use add_adapter() on it for another one.")
        if not isinstance(model, nn.Module):
            raise LoraError(f"model must be a torch nn.Module (a transformers model); got {type(model).__name__}.")
        # everything is checked and planned before the caller's model changes in any way (requires_grad included)
        check_new_adapter({}, adapter_name, config)
        plan = plan_adapter(model, config, wrapped=set(), strict=_strict_targets)
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self._plans: dict[str, AdapterPlan] = {}
        self.active_adapter: str | None = None
        self._unloaded = False
        #: training with labels computes a causal LM's loss fused where kernels run (see forward); False: its own
        self.fused_loss = True
        with undo_on_error(model):  # an unforeseen failure from here on leaves the model as it was
            for p in model.parameters():
                p.requires_grad_(False)
            if is_quantized_model(model):
                guard_cpu_4bit_training(model)  # bitsandbytes' CPU inference packing would cut the gradient
            self._inject(adapter_name, config, plan)

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
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if self.active_adapter else []

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
        check_new_adapter(self.peft_config, adapter_name, config)
        wrapped = {n for n, _ in self.lora_layers()}
        plan = plan_adapter(self.model, config, wrapped=wrapped, strict=strict)  # raises before any change
        with undo_on_error(self.model, self):
            self._inject(adapter_name, config, plan)

    def _inject(self, adapter_name: str, config: LoraConfig, plan: AdapterPlan) -> None:
        """Wrap the planned modules and give them the adapter (everything was checked before)."""
        dropout = SharedDropout(config.lora_dropout) if config.lora_dropout > 0 else None
        for spec in plan.targets:
            module = self.model.get_submodule(spec.name)
            if not isinstance(module, LoraLayer):
                wrapper = wrapper_for(spec.kind)(module)
                self._replace(spec.name, wrapper)
                module = wrapper
            module.add_adapter(adapter_name, spec.r, spec.alpha, spec.scaling, dropout, config.init_lora_weights)
            init_from_base(module, adapter_name, config)  # inits that read the base (PiSSA, OLoRA, ...): layers.init
            if spec.dora:  # last, as in peft: the magnitude of the initialised W + s B A
                module.init_dora(adapter_name)
        for path in plan.modules_to_save:
            module = self.model.get_submodule(path)
            if not isinstance(module, ModulesToSave):
                wrapper = ModulesToSave(module)
                self._replace(path, wrapper)
                module = wrapper
            module.add_adapter(adapter_name)
        for extra in plan.extras:  # raw parameters, tied heads, trainable tokens (lorakit.variants)
            extra.inject(self.model, adapter_name, config)
        self.peft_config[adapter_name] = config
        self._plans[adapter_name] = plan
        if self.active_adapter is None:
            self._activate(adapter_name)
        else:
            self._mark_trainable()
        if dropout is not None:
            dropout.train(self.training)
        loss_state(self).reset()  # a new head copy (modules_to_save) is checked again

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
        for path, layer in reversed(list(self.lora_layers())):  # inner wrappers first: they nest
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
        """Add ``adapter_name``, the weighted combination of ``adapters`` (peft's method and arguments; the
        combination types and their arithmetic: ``lorakit.combine``). The new adapter is not activated."""
        from .combine import add_weighted

        add_weighted(self, adapters, weights, adapter_name, combination_type, svd_rank=svd_rank, svd_clamp=svd_clamp,
                     svd_full_matrices=svd_full_matrices, svd_driver=svd_driver, density=density,
                     majority_sign_method=majority_sign_method)

    def _require(self, adapter_name: str) -> None:
        if not isinstance(adapter_name, str) or adapter_name not in self.peft_config:
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
        return params + trained_biases(self.model, self._plans[name])

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Switch training on (or off) for the named adapters' parameters, leaving the others as they are
        (peft's method: several adapters can train at once). ``set_adapter`` resets it to the active one."""
        self._check_live()
        names = as_adapter_names(adapter_names, "adapter_names")
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

    # -- forward ----------------------------------------------------------------------------
    @signed_forward  # instance.forward shows the wrapped model's parameters (HF Trainer reads them)
    def forward(self, *args, adapter_names: Sequence[str] | None = None, return_logits: bool = False, **kwargs):
        """Forward of the wrapped model. ``adapter_names`` (one per row; "__base__" for none) mixes adapters in a batch.

        Training a causal LM with ``labels``, the loss is computed at labelled positions only and the logits
        only when read (``lorakit.loss.fused_forward``: same numbers, checked once against the model's own).
        ``return_logits=True`` for one call, or ``model.fused_loss = False`` for all, runs the model's own forward.
        """
        self._check_live()
        rows = contextlib.nullcontext()
        if adapter_names is not None:
            self._check_rows(adapter_names, batch_size(args, kwargs))
            rows = adapter_rows(adapter_names)
        try:
            with rows:
                # per-row adapters keep the model's own forward: the fused path's one-row self-check and its
                # single head would not follow the rows
                if adapter_names is None and not args and not return_logits:
                    out = fused_forward.forward(self, kwargs)  # a loss path (lorakit.loss), or None
                    if out is not None:
                        return out
                return self.model(*args, **kwargs)
        finally:
            if adapter_names is not None:
                self._drop_route_caches()

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

    def _check_rows(self, names: Sequence[str], batch: int | None = None) -> None:
        check_rows(names, self.peft_config, batch)

    # -- merge ------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active one) into the base weights; merging twice is a no-op."""
        self._check_live()
        names = as_adapter_names(adapter_names, "adapter_names") if adapter_names else list(self.active_adapters)
        for n in names:
            self._require(n)
        layers = [l for _, l in self.lora_layers()]
        if safe_merge:  # check every layer first so a bad adapter leaves no layer half-merged
            for l in layers:
                l.check_merge(names)
        untie_for_merge(self.model, layers, names)  # a tied embedding/head: merge into the adapter's side only
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
        for path, l in reversed(list(self.lora_layers())):  # inner wrappers first: they nest
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
            n = stored_elements(p)
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    # -- state dicts (PEFT key names) -------------------------------------------------------
    def lora_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's weights under PEFT key names (``base_model.model.<path>.lora_A.weight`` ...)."""
        self._check_live()
        name = adapter_name or self.active_adapter
        self._require(name)
        return adapter_state_dict(self.model, self._plans[name], name)

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
                        path_initial_model_for_weight_conversion: str | os.PathLike | None = None, **_ignored) -> None:
        """Write PEFT-format adapter folders (the default adapter at the top, others in subfolders).
        ``path_initial_model_for_weight_conversion``: see ``peft_format.save_adapter``."""
        self._check_live()
        names = list(self.peft_config) if selected_adapters is None else \
            as_adapter_names(selected_adapters, "selected_adapters")
        for name in names:
            self._require(name)
        for name in names:
            target = adapter_folder(save_directory, name)
            save_adapter(self, target, name, path_initial_model_for_weight_conversion)

    def load_adapter(self, adapter_dir: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False,
                     allow_pickle: bool = False, **peft_kwargs) -> None:
        """Load a PEFT-format adapter folder as a new adapter (checked completely before any change).

        peft's keyword arguments are taken as far as they apply to a local folder (see ``peft_format.peft_load_options``).
        """
        self._check_live()
        adapter_dir = peft_load_options(adapter_dir, peft_kwargs)
        if adapter_name in self.peft_config:
            raise LoraError(f"adapter {adapter_name!r} exists already; pick another adapter_name or delete it first.")
        wrapped = {n for n, _ in self.lora_layers()}
        config, weights = read_checked(self.model, adapter_dir, is_trainable, allow_pickle, wrapped)
        self._add_adapter(adapter_name, config, strict=False)
        self.load_lora_state_dict(weights, adapter_name)
        if not is_trainable:
            self.eval()  # loaded for inference: dropout off, as peft's load_adapter does

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter_dir: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, allow_pickle: bool = False, **peft_kwargs) -> "LoraModel":
        """Wrap ``model`` with the adapter saved in ``adapter_dir`` (peft's ``PeftModel.from_pretrained``)."""
        adapter_dir = peft_load_options(adapter_dir, peft_kwargs)
        config, weights = read_checked(model, adapter_dir, is_trainable, allow_pickle, set())
        out = cls(model, config, adapter_name, _strict_targets=False)
        out.load_lora_state_dict(weights, adapter_name)
        if not is_trainable:
            out.eval()  # loaded for inference: dropout off, as peft's from_pretrained does
        return out


PeftModel = LoraModel  # the name peft users have in their code


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default") -> LoraModel:
    """Wrap ``model`` with a fresh LoRA adapter (peft's entry point, same signature)."""
    return LoraModel(model, peft_config, adapter_name)
