"""peft's LoraConfig fields that lorakit's LoraConfig does not have, and what a saved value of each means.

An ``adapter_config.json`` written by peft holds every field of peft's LoraConfig. Those lorakit has as
``LoraConfig`` fields are read as such; for the others this table says which values change nothing
(the neutral ones: peft's default and its "off" spellings), so that such a file loads, and what the
field does otherwise, so that a file using it is refused by name instead of loaded into a model that
would compute something else. A key in neither place (a newer peft's) loads only when its value is
null, false or empty. ``markdown_table`` renders the whole answer for the README.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import ConfigError

__all__ = ["Foreign", "FOREIGN", "NOTES", "check_foreign_key", "markdown_table"]


@dataclasses.dataclass(frozen=True)
class Foreign:
    """A peft field lorakit has no LoraConfig field for."""

    #: values that change nothing in what the adapter computes; None: every value (pure bookkeeping)
    neutral: tuple[Any, ...] | None
    #: what the field is in peft, and why lorakit ignores or refuses it
    note: str

    def is_neutral(self, value: Any) -> bool:
        """Whether ``value`` changes nothing (same type too: 0 is not False)."""
        return self.neutral is None or any(value == v and type(value) is type(v) for v in self.neutral)


FOREIGN: dict[str, Foreign] = {
    "peft_type": Foreign(("LORA",), "the adapter method; lorakit reads and writes LoRA adapters only"),
    "peft_version": Foreign(None, "the peft version that wrote the file (bookkeeping)"),
    "auto_mapping": Foreign(None, "the classes peft's AutoPeftModel rebuilds (bookkeeping)"),
    "runtime_config": Foreign(None, "peft's runtime placement options (ephemeral GPU offload); never saved"),
    "megatron_config": Foreign((None,), "LoRA inside Megatron-LM tensor-parallel layers; lorakit wraps "
                                        "transformers models"),
    "megatron_core": Foreign(None, "the Megatron module name, read only with megatron_config"),
    "eva_config": Foreign((None,), "EVA initialisation (SVD of activations)"),
    "corda_config": Foreign((None,), "CorDA initialisation (changes the base weights)"),
    "lora_ga_config": Foreign((None,), "LoRA-GA initialisation (gradient-aligned, changes the base weights)"),
    "velora_config": Foreign((None,), "VeLoRA (compressed activations in the LoRA branch)"),
    "alora_invocation_tokens": Foreign((None,), "activated LoRA (aLoRA): the adapter acts only after "
                                                "an invocation sequence"),
    "use_qalora": Foreign((False, None), "QA-LoRA (group-pooled inputs for GPTQ layers)"),
    "qalora_group_size": Foreign(None, "QA-LoRA's group size, read only with use_qalora"),
    "monteclora_config": Foreign((None,), "MonteCLoRA (Monte Carlo estimated LoRA weights)"),
    "layer_replication": Foreign((None,), "builds a deeper model by repeating base layers"),
    "lora_bias": Foreign((False, None), "a trained bias on lora_B"),
    "use_bdlora": Foreign((None, False), "block-diagonal LoRA (BD-LoRA)"),
    "arrow_config": Foreign((None,), "Arrow routing between several LoRA experts"),
    "kasa_config": Foreign((None,), "KaSA (SVD-based knowledge-aware LoRA)"),
}

#: remarks on peft fields lorakit supports, shown in the README's table
NOTES: dict[str, str] = {
    "task_type": "supported; SEQ_CLS / TOKEN_CLS / QUESTION_ANS also train and save the task head",
    "inference_mode": "supported; written true on save, as peft",
    "fan_in_fan_out": "supported; set automatically for GPT-2's Conv1D",
    "init_lora_weights": "supported: True, False, gaussian, pissa, pissa_niter_N, olora, orthogonal, loftq (on an "
                         "unquantized base, bitsandbytes on the CPU); eva, corda, lora_ga, mica refused (data-driven "
                         "or a variant)",
    "loftq_config": "supported with init_lora_weights='loftq' (loftq_bits 4 or 8, loftq_iter)",
    "trainable_token_indices": "supported: list or {embedding: ids}; a tied output head follows the embedding",
    "ensure_weight_tying": "supported: target_modules and modules_to_save on a tied embedding/head pair",
    "target_parameters": "supported: 2-D and fused 3-D (MoE expert) parameters, rank_pattern per parameter; no "
                         "dropout, DoRA or per-row adapter_names (as peft)",
    "target_modules": "supported; a name matching nothing is an error (peft ignores it when another matches)",
    "use_dora": "supported: Linear, Conv1D and Embedding; per-row adapter_names refused, as peft",
}


def _is_empty(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (str, list, dict, tuple)) and not value)


def check_foreign_key(key: str, value: Any, version: str, written_by: Any = None) -> None:
    """Refuse ``key=value`` from an adapter config when it would change what the adapter computes.

    ``key`` is not a lorakit LoraConfig field. Neutral values pass silently; anything else raises a
    ConfigError naming the key, the value and this lorakit ``version``.
    """
    entry = FOREIGN.get(key)
    if entry is not None:
        if entry.is_neutral(value):
            return
        raise ConfigError(
            f"this adapter uses {key}={value!r} ({entry.note}), which lorakit {version} does not support; "
            f"it loads only where {key} is {' or '.join(repr(v) for v in entry.neutral)}. Use peft for it, or a "
            f"lorakit version whose README lists {key} as supported.")
    if _is_empty(value):
        return
    source = f" (written by peft {written_by})" if written_by else ""
    raise ConfigError(
        f"this adapter uses {key}={value!r}{source}, a setting lorakit {version} does not know; it may change "
        f"what the adapter computes, so it is not loaded. Use peft for it, or a lorakit version that supports {key}.")


def _answer(name: str, lorakit_fields: set[str]) -> str:
    if name in lorakit_fields:
        return NOTES.get(name, "supported")
    entry = FOREIGN.get(name)
    if entry is None:
        return "not known: loads only when null, false or empty, refused otherwise"
    if entry.neutral is None:
        return f"ignored: {entry.note}"
    values = ", ".join("null" if v is None else repr(v).lower() if isinstance(v, bool) else repr(v)
                       for v in entry.neutral)
    return f"refused unless {values}: {entry.note}"


def markdown_table(lorakit_fields: Iterable[str], peft_fields: Iterable[str]) -> str:
    """The README's table: every field of peft's LoraConfig and lorakit's answer for it."""
    ours = set(lorakit_fields)
    rows = ["| peft LoraConfig field | lorakit |", "|---|---|"]
    rows += [f"| `{name}` | {_answer(name, ours)} |" for name in peft_fields]
    return "\n".join(rows) + "\n"


def neutral_defaults(peft_defaults: Mapping[str, Any]) -> list[str]:
    """Foreign fields whose neutral values miss peft's own default (a test keeps this list empty)."""
    return [k for k, entry in FOREIGN.items() if k in peft_defaults and not entry.is_neutral(peft_defaults[k])]
