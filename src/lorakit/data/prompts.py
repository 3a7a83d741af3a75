"""Prompt templates: a record -> (prompt text, answer text). The loss is taken on the answer only.

Templates (``get_template(name, **fields)``):

``alpaca``
    The Stanford Alpaca format: "Below is an instruction that describes a task..." with
    ``### Instruction:`` / ``### Input:`` (only when the input is non-empty) / ``### Response:``.
``human_assistant``
    ``"Human: {instruction}\\n{input}\\n\\nAssistant: "`` -> ``"{output}"``. The user turn is
    ``"\\n".join([instruction, input]).strip()`` as in the notebook this format comes from, so an
    empty input gives ``"Human: {instruction}\\n\\nAssistant: "`` (no blank line left over).
``classification``
    ``"{text_label} : {text} Label : "`` -> the label name (RAFT style). ``text_label`` defaults to the
    text column's name (e.g. ``"Tweet text"``).
``chat``
    The tokenizer's own chat template (``apply_chat_template``): user = instruction (+ "\\n" + input),
    assistant = output; the prompt is the conversation with the generation prompt, the answer is the
    rest of the full conversation with trailing whitespace removed (so it ends with the template's
    end-of-turn token, e.g. ``<|im_end|>``).
    Records that hold a conversation instead (OpenAI ``messages`` or ShareGPT ``conversations``, or the
    column named by ``messages_column``) are multi-turn: the loss falls on every assistant reply
    (:mod:`lorakit.data.chat`); ``render`` gives the conversation up to its last reply, and that reply.

At inference the answer field may be absent: ``render`` then returns ``(prompt, "")``.

For training, ``empty_fields(record)`` names what a record lacks to be worth training on: a null or blank
answer (label), a null or blank classification text, or an instruction that is null or blank with no input
either. ``tokenize_records`` drops such records (counted, one warning) instead of training an empty target.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from lorakit.errors import ConfigError, DataError

__all__ = ["PromptTemplate", "AlpacaTemplate", "HumanAssistantTemplate", "ClassificationTemplate",
           "ChatTemplate", "get_template", "TEMPLATE_NAMES"]


def _text(record: dict, key: str, *, required: bool, option: str = "instruction_column") -> str:
    if key not in record:
        if required:
            raise DataError(f"record has no field {key!r}; fields there: {list(record)}. "
                            f"Name the right column in the template (e.g. get_template('alpaca', {option}=...); "
                            f"recipe: data.template_args.{option}) or fix the data.")
        return ""
    value = record[key]
    return "" if value is None else str(value)


def _blank(record: dict, key: str) -> bool:
    """The field is absent, null, or only whitespace (a number such as 0 is not blank)."""
    value = record.get(key)
    return value is None or not str(value).strip()


@dataclass(frozen=True)
class PromptTemplate:
    """Base class: ``render(record, tokenizer=None) -> (prompt, answer)``."""

    name: ClassVar[str] = ""
    # whether tokenize_records may cut the end of an answer too long for max_length (a class label: never)
    answer_truncatable: ClassVar[bool] = True
    # the recipe key that names the answer column (for error messages)
    answer_recipe_key: ClassVar[str] = "data.template_args.output_column"

    @property
    def answer_column(self) -> str:
        """The record field that holds the answer (training needs it in every record)."""
        raise NotImplementedError

    def empty_fields(self, record: dict) -> list[str]:
        """What makes ``record`` useless for training (empty list: nothing), e.g. ``["'output'"]`` when the
        answer is null or blank; ``tokenize_records`` drops such records."""
        return [repr(self.answer_column)] if _blank(record, self.answer_column) else []

    def render(self, record: dict, tokenizer: Any = None) -> tuple[str, str]:
        raise NotImplementedError


@dataclass(frozen=True)
class _InstructionTemplate(PromptTemplate):
    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"

    @property
    def answer_column(self) -> str:
        return self.output_column

    def empty_fields(self, record: dict) -> list[str]:
        out = super().empty_fields(record)
        if _blank(record, self.instruction_column) and _blank(record, self.input_column):
            out.append(f"{self.instruction_column!r} (and no {self.input_column!r})")
        return out

    def _parts(self, record: dict) -> tuple[str, str, str]:
        return (_text(record, self.instruction_column, required=True),
                _text(record, self.input_column, required=False),
                _text(record, self.output_column, required=False))


@dataclass(frozen=True)
class AlpacaTemplate(_InstructionTemplate):
    name: ClassVar[str] = "alpaca"
    WITH_INPUT: ClassVar[str] = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
    NO_INPUT: ClassVar[str] = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n")

    def render(self, record: dict, tokenizer: Any = None) -> tuple[str, str]:
        instruction, inp, output = self._parts(record)
        fmt = self.WITH_INPUT if inp.strip() else self.NO_INPUT
        return fmt.format(instruction=instruction, input=inp), output


@dataclass(frozen=True)
class HumanAssistantTemplate(_InstructionTemplate):
    name: ClassVar[str] = "human_assistant"

    def render(self, record: dict, tokenizer: Any = None) -> tuple[str, str]:
        instruction, inp, output = self._parts(record)
        user = "\n".join([instruction, inp]).strip()
        return f"Human: {user}\n\nAssistant: ", output


@dataclass(frozen=True)
class ClassificationTemplate(PromptTemplate):
    name: ClassVar[str] = "classification"
    text_column: str = "text"
    label_column: str = "label"
    text_label: str | None = None  # the name shown before the text; None -> text_column
    answer_truncatable: ClassVar[bool] = False  # a cut label would be a wrong label: cut the text instead
    answer_recipe_key: ClassVar[str] = "data.label_column"

    @property
    def answer_column(self) -> str:
        return self.label_column

    def empty_fields(self, record: dict) -> list[str]:
        out = super().empty_fields(record)
        if _blank(record, self.text_column):
            out.append(repr(self.text_column))
        return out

    def render(self, record: dict, tokenizer: Any = None) -> tuple[str, str]:
        if self.text_column not in record:
            raise DataError(f"record has no text column {self.text_column!r}; fields there: {list(record)}. "
                            "Pass text_column=<one of them> to the classification template (recipe: "
                            "data.template_args.text_column).")
        text = _text(record, self.text_column, required=True, option="text_column")
        label = _text(record, self.label_column, required=False)
        shown = self.text_column if self.text_label is None else self.text_label
        return f"{shown} : {text} Label : ", label


@dataclass(frozen=True)
class ChatTemplate(_InstructionTemplate):
    name: ClassVar[str] = "chat"
    system: str | None = None  # optional system message; None -> the chat template's own default
    messages_column: str | None = None  # conversation records: None -> 'messages' / 'conversations' / found

    def is_conversation(self, records: Any) -> bool:
        """Whether ``records`` are conversations (one record holding one is enough: the others must too)."""
        from lorakit.data.conversations import find_conversation_column

        return self.messages_column is not None or any(
            isinstance(r, dict) and find_conversation_column(r) is not None for r in records)

    def render(self, record: dict, tokenizer: Any = None) -> tuple[str, str]:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError("the 'chat' template uses the tokenizer's chat template, but "
                            + ("no tokenizer was given" if tokenizer is None else "this tokenizer has none")
                            + "; pass the tokenizer, or use template 'human_assistant' or 'alpaca'.")
        if self.is_conversation([record]):
            return self._render_conversation(record, tokenizer)
        instruction, inp, output = self._parts(record)
        user = instruction if not inp.strip() else f"{instruction}\n{inp}"
        messages = ([{"role": "system", "content": self.system}] if self.system is not None else [])
        messages.append({"role": "user", "content": user})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not output:
            return prompt, ""
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": output}],
                                             tokenize=False)
        if not full.startswith(prompt):
            raise DataError("this tokenizer's chat template does not extend the generation prompt with the "
                            "assistant turn (the full conversation does not start with the prompt), so the "
                            "answer cannot be separated; use template 'human_assistant' or 'alpaca'.")
        return prompt, full[len(prompt):].rstrip()

    def _render_conversation(self, record: dict, tokenizer: Any) -> tuple[str, str]:
        """(the conversation before its last reply with the generation prompt, that reply's text)."""
        from lorakit.data.chat import conversation_of, render_turns

        turns, _ = conversation_of(record, self, "record")
        last = max((k for k, t in enumerate(turns) if t.role == "assistant"), default=len(turns))
        prompt = render_turns(tokenizer, turns[:last], generation_prompt=True)
        return prompt, turns[last].content if last < len(turns) else ""


_TEMPLATES: dict[str, type[PromptTemplate]] = {
    t.name: t for t in (AlpacaTemplate, HumanAssistantTemplate, ClassificationTemplate, ChatTemplate)}
TEMPLATE_NAMES = tuple(_TEMPLATES)


def get_template(name: str, **kw: Any) -> PromptTemplate:
    """The template called ``name`` with its fields (column names, ...) set from ``kw``."""
    cls = _TEMPLATES.get(name)
    if cls is None:
        raise ConfigError(f"unknown prompt template {name!r}; choose one of {list(TEMPLATE_NAMES)}.")
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(kw) - set(fields))
    if unknown:
        raise ConfigError(f"template {name!r} has no option(s) {unknown}; its options are {fields}.")
    return cls(**kw)
