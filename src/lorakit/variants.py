"""What an adapter adds beyond LoRA pairs on modules, planned before anything changes.

* ``target_parameters``: LoRA on raw parameters (fused MoE experts; ``layers.param``), one ``ParamSpec`` each.
* ``trainable_token_indices``: chosen embedding rows trained (``layers.tokens``), one ``TokenSpec`` per wrapped
  module; a head tied to the input embedding follows its rows.
* ``ensure_weight_tying``: when one side of a tied embedding/head pair is targeted or saved in full, the
  other side is too and shares its weights (``TieSpec``): the head's LoRA A/B are views of the embedding's
  B^T/A^T (its LoRA update is the embedding's, transposed), or the head's saved copy is the embedding's.
* the checks of the inits that read the base weights (``layers.init``).

Each spec knows its PEFT keys and shapes (``keys``) and how to put itself into the model (``inject``,
called by ``LoraModel`` after the module targets and saved copies, in peft's order: parameters, tied
LoRA, tied copies, tokens, so that one seed gives peft's initial values). ``variants_plan`` works the
specs out from a config and a model.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import nn

from .config import LoraConfig
from .layers.tied import TiedLoraLinear
from .layers.param import LoraParam
from .layers.tokens import TrainableTokens

__all__ = ["ParamSpec", "TieSpec", "TokenSpec"]


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """LoRA on parameter ``param`` of the module at ``module`` (``depth`` wrappers of the same module sit inside)."""

    module: str
    param: str
    depth: int
    experts: int
    in_features: int
    out_features: int
    r: int
    alpha: float
    scaling: float

    def keys(self) -> dict[str, tuple[int, ...]]:
        at = self.module + ".base_layer" * self.depth
        return {f"{at}.lora_A.weight": (self.r * self.experts, self.in_features),
                f"{at}.lora_B.weight": (self.out_features, self.r * self.experts)}

    @property
    def n_params(self) -> int:
        return self.r * self.experts * (self.in_features + self.out_features)

    def inject(self, model: nn.Module, name: str, config: LoraConfig) -> None:
        m = model.get_submodule(self.module)
        holder = m
        while isinstance(holder, LoraParam) and holder.parameter_name != self.param:
            holder = holder.base_layer
        if not isinstance(holder, LoraParam):  # first adapter on this parameter: wrap what is there now
            holder = LoraParam(m, self.param)
            _replace(model, self.module, holder)
        holder.add_adapter(name, self.r, self.alpha, self.scaling, None, config.init_lora_weights)


@dataclasses.dataclass(frozen=True)
class TieSpec:
    """ensure_weight_tying: the head at ``head`` shares the input embedding's LoRA pair (``kind="lora"``) or
    its saved copy (``"saved"``)."""

    kind: str
    head: str
    embedding: str
    in_features: int = 0
    out_features: int = 0
    r: int = 0
    alpha: float = 0.0
    scaling: float = 0.0

    def keys(self) -> dict[str, tuple[int, ...]]:
        if self.kind != "lora":
            return {}  # the head's copy is a modules_to_save entry already
        return {f"{self.head}.lora_A.weight": (self.r, self.in_features),
                f"{self.head}.lora_B.weight": (self.out_features, self.r)}

    @property
    def n_params(self) -> int:
        """The head's own pair (a separate parameter on the embedding's storage, counted as peft counts it); a
        tied saved copy is one parameter with the embedding's: minus the copy modules_to_save counted."""
        size = self.in_features * self.out_features
        return self.r * (self.in_features + self.out_features) if self.kind == "lora" else -size

    def inject(self, model: nn.Module, name: str, config: LoraConfig) -> None:
        emb = model.get_submodule(self.embedding)
        if self.kind == "saved":
            head = model.get_submodule(self.head)
            tied = copy.deepcopy(head.original_module)
            tied.weight = emb.modules_to_save[name].weight  # one parameter: trained and saved as one
            head.modules_to_save[name] = tied
            return
        head = model.get_submodule(self.head)
        if not isinstance(head, TiedLoraLinear):  # (planning refused a head holding untied adapters already)
            head = TiedLoraLinear(head, emb)
            _replace(model, self.head, head)
        dropout = nn.Dropout(config.lora_dropout).train(model.training) if config.lora_dropout > 0 else None
        head.add_adapter(name, self.r, self.alpha, self.scaling, dropout, False)  # nn.Linear's draws, as peft
        head.tie(name)  # merged once, through the embedding
        A, B = head.lora_A[name], head.lora_B[name]
        # separate parameters on the embedding's storage: the pair stays tied whatever trains it (peft's tie)
        A.weight = nn.Parameter(emb.lora_embedding_B[name].t())
        B.weight = nn.Parameter(emb.lora_embedding_A[name].t())
        with torch.no_grad():  # then peft's init of the head's pair, which writes through to the embedding's
            if config.init_lora_weights == "gaussian":
                nn.init.normal_(A.weight, std=1 / self.r)
            elif config.init_lora_weights is True:
                nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
            if config.init_lora_weights is not False:
                nn.init.zeros_(B.weight)


@dataclasses.dataclass(frozen=True)
class TokenSpec:
    """Rows ``indices`` of the module at ``module`` trained; ``tied_to``: the embedding whose rows a head follows."""

    module: str
    indices: tuple[int, ...]
    dim: int
    tied_to: str | None = None

    def keys(self) -> dict[str, tuple[int, ...]]:
        if self.tied_to:
            return {}
        return {f"{self.module}.token_adapter.trainable_tokens_delta": (len(self.indices), self.dim)}

    @property
    def n_params(self) -> int:
        return 0 if self.tied_to else len(self.indices) * self.dim

    def inject(self, model: nn.Module, name: str, config: LoraConfig) -> None:
        m = model.get_submodule(self.module)
        if not isinstance(m, TrainableTokens):
            m = TrainableTokens(m, model.get_submodule(self.tied_to) if self.tied_to else None)
            _replace(model, self.module, m)
        m.add_tokens(name, self.indices)
