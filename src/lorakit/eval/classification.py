"""Classification as generation: greedy-decode the label after the prompt and compare it exactly.

Each record is rendered with the training template (the prompt ends right before the label, e.g.
``"Tweet text : ... Label : "``); the model generates up to ``max_new_tokens`` tokens (default: the
longest label's token count + 2), only the new tokens are decoded, and the text is normalised:
special tokens removed, first line only, lowercase, inner whitespace collapsed, surrounding
whitespace/quotes and trailing punctuation stripped. The prediction is the label whose normalised
name equals that text; anything else is ``"<invalid>"`` and counts as wrong.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from lorakit.data.collate import Collator
from lorakit.data.prompts import PromptTemplate
from lorakit.data.tokenize import encode_prompt
from lorakit.errors import ConfigError, DataError
from lorakit.eval.device import model_device, eval_mode

__all__ = ["ClassificationReport", "classification_eval", "normalize_label", "INVALID"]

INVALID = "<invalid>"
_TRAILING = ".,;:!?\"'`"


def normalize_label(text: str) -> str:
    """The comparable form of a generated or reference label (see module docstring)."""
    lines = text.strip().splitlines()
    text = lines[0] if lines else ""
    text = re.sub(r"\s+", " ", text).strip().lower()
    return text.rstrip(_TRAILING).strip().strip("\"'`").strip()


@dataclass
class ClassificationReport:
    """Accuracy and per-class precision/recall/F1. ``predictions[i]`` is a label name or ``"<invalid>"``."""

    accuracy: float
    n: int
    per_class: dict[str, dict[str, float]]
    predictions: list[str]
    references: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)  # the raw decoded generations

    @property
    def n_invalid(self) -> int:
        return sum(p == INVALID for p in self.predictions)

    @property
    def macro_f1(self) -> float:
        return sum(c["f1"] for c in self.per_class.values()) / max(len(self.per_class), 1)

    def table(self) -> str:
        width = max([len("label")] + [len(k) for k in self.per_class])
        lines = [f"{'label':<{width}}  precision  recall     f1  support"]
        for label, c in self.per_class.items():
            lines.append(f"{label:<{width}}  {c['precision']:9.3f}  {c['recall']:6.3f}  {c['f1']:5.3f}  "
                         f"{int(c['support']):7d}")
        correct = round(self.accuracy * self.n)
        lines.append(f"accuracy {self.accuracy:.3f} ({correct}/{self.n}); macro F1 {self.macro_f1:.3f}; "
                     f"{self.n_invalid} invalid prediction(s)")
        return "\n".join(lines)


def _per_class(labels: Sequence[str], preds: Sequence[str], refs: Sequence[str]) -> dict[str, dict[str, float]]:
    out = {}
    for label in labels:
        tp = sum(p == label and r == label for p, r in zip(preds, refs))
        n_pred = sum(p == label for p in preds)
        support = sum(r == label for r in refs)
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return out


def _sequences(out: Any) -> Any:
    return out.sequences if hasattr(out, "sequences") else out


def classification_eval(model: Any, tokenizer: Any, records: Sequence[dict], template: PromptTemplate,
                        label_names: Sequence[str], *, batch_size: int = 16,
                        max_new_tokens: int | None = None) -> ClassificationReport:
    """Greedy-generate a label for each record and score it against the record's own label.

    ``model``: a transformers causal LM, or anything with ``.generate(input_ids=, attention_mask=, ...)``
    returning the prompt ids followed by the new ids (a LoraModel works). Batches are left-padded,
    sorted by length to waste little padding; the result keeps the records' order.
    """
    import torch

    labels = list(label_names)
    by_norm = {normalize_label(l): l for l in labels}
    if not labels or len(by_norm) != len(labels):
        raise ConfigError(f"label_names must be non-empty and distinct after normalisation, got {labels!r}.")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size!r}.")
    if not records:
        raise DataError("classification_eval got no records; pass a labelled split.")
    locate = getattr(records, "location", lambda i: f"record {i}")

    prompts, refs = [], []
    for i, rec in enumerate(records):
        try:
            prompt, gold = template.render(rec, tokenizer)
        except DataError as e:
            raise DataError(f"{locate(i)}: {e}") from None
        ref = by_norm.get(normalize_label(gold))
        if ref is None:
            raise DataError(f"{locate(i)}: reference label {gold!r} is not in the label set {labels}; "
                            "evaluate on labelled rows (load_records(..., label_column=...)) with the same "
                            "label_names.")
        prompts.append(prompt)
        refs.append(ref)

    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = eos if pad is None else pad
    if pad is None:
        raise ConfigError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token.")
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer(l, add_special_tokens=False)["input_ids"]) for l in labels) + 2

    ids = encode_prompt(tokenizer, prompts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    collate = Collator(pad, padding_side="left")
    device = model_device(model)
    outputs: list[str] = [""] * len(ids)
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate([{"input_ids": ids[i]} for i in chunk]).items()}
            gen = _sequences(model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                            num_beams=1, pad_token_id=pad, eos_token_id=eos))
            new = gen[:, batch["input_ids"].shape[1]:]
            for i, row in zip(chunk, new.tolist()):
                outputs[i] = tokenizer.decode(row, skip_special_tokens=True)

    preds = [by_norm.get(normalize_label(o), INVALID) for o in outputs]
    correct = sum(p == r for p, r in zip(preds, refs))
    return ClassificationReport(accuracy=correct / len(refs), n=len(refs), per_class=_per_class(labels, preds, refs),
                                predictions=preds, references=refs, outputs=outputs)
