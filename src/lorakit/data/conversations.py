"""Conversations in the two formats people have, checked and turned into a list of :class:`Turn`.

OpenAI ``messages``:      ``[{"role": "system"|"user"|"assistant", "content": "...", "weight": 0|1}, ...]``
                          (``weight`` is optional, as in OpenAI's fine-tuning files: 0 = no loss on that reply;
                          ``content`` may also be a list of ``{"type": "text", "text": ...}`` parts)
ShareGPT ``conversations``: ``[{"from": "system"|"human"|"gpt", "value": "..."}, ...]``

The column is the one named (recipe: ``data.template_args.messages_column``), else ``messages`` or
``conversations``, else the one field whose value is a list of such turns. A column read from a CSV file
may hold the list as JSON text.

Bad records follow the policy of the other templates: a record whose *shape* is wrong is an error that
names it (the column missing, a turn that is not an object or has neither ``role`` nor ``from``, an unknown
role, roles out of order); a record with *nothing to learn from* is dropped and counted (a turn whose
content is null, a blank assistant reply, no assistant turn). For training, a last user turn with no reply
is left out (no loss could fall there); for generation it is the prompt.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from lorakit.errors import DataError

__all__ = ["Turn", "CONVERSATION_COLUMNS", "find_conversation_column", "is_turn_list", "read_conversation"]

CONVERSATION_COLUMNS = ("messages", "conversations")
# every role name accepted, in either format -> the role the chat templates know
_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
_ORDER_RULE = ("a conversation is an optional system turn first, then user and assistant turns taking turns, "
               "starting with user")


@dataclass(frozen=True)
class Turn:
    """One message: ``role`` is system, user or assistant; ``trained`` is False for a reply given weight 0."""

    role: str
    content: str
    trained: bool = True

    def message(self) -> dict:
        """The dict a chat template reads."""
        return {"role": self.role, "content": self.content}


def is_turn_list(value: Any) -> bool:
    """A non-empty list of objects that each have a ``role`` or a ``from`` key."""
    return (isinstance(value, list) and bool(value)
            and all(isinstance(t, Mapping) and ("role" in t or "from" in t) for t in value))


def find_conversation_column(record: Mapping, column: str | None = None) -> str | None:
    """The field of ``record`` that holds its conversation (see the module doc), or None."""
    if column is not None:
        return column if column in record else None
    for name in CONVERSATION_COLUMNS:
        if name in record:
            return name
    found = [k for k, v in record.items() if is_turn_list(v)]
    return found[0] if len(found) == 1 else None


def read_conversation(value: Any, where: str) -> tuple[list[Turn], str | None]:
    """``(turns, why_empty)``: the checked turns and, for a record with
    nothing to train on, the reason (``"null content"``, ``"blank assistant reply"``, ``"no assistant turn"``,
    ``"no assistant turn with weight 1"``), else None. A record of the wrong shape raises :class:`DataError`
    naming ``where`` (the record and its column) and the turn."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: the conversation is text that is not valid JSON ({e.msg} at column "
                            f"{e.colno}); write it as a JSON list of turns.") from None
    if not isinstance(value, list):
        raise DataError(f"{where}: a conversation is a list of turns such as [{{'role': 'user', 'content': ...}}, "
                        f"{{'role': 'assistant', 'content': ...}}], not a {type(value).__name__}; fix the record "
                        "or name the right column (recipe: data.template_args.messages_column).")
    turns, why = [], None
    for i, raw in enumerate(value):
        turn, empty = _read_turn(raw, f"{where} turn {i}")
        turns.append(turn)
        why = why or empty
    _check_order(turns, where)
    if why is None and not any(t.role == "assistant" for t in turns):
        why = "no assistant turn"
    elif why is None and not any(t.role == "assistant" and t.trained for t in turns):
        why = "no assistant turn with weight 1"
    return turns, why


def _read_turn(raw: Any, where: str) -> tuple[Turn, str | None]:
    if not isinstance(raw, Mapping):
        raise DataError(f"{where}: a {type(raw).__name__}, not an object like {{'role': 'user', 'content': "
                        "'...'}} (OpenAI) or {'from': 'human', 'value': '...'} (ShareGPT); fix the record.")
    # a datasets column unifies its rows' keys, filling the absent ones with None: look at the values
    role_key, text_key = ("role", "content") if raw.get("role") is not None or "from" not in raw else ("from", "value")
    if role_key not in raw:
        raise DataError(f"{where}: no 'role' (OpenAI messages) or 'from' (ShareGPT) key; keys there: "
                        f"{list(raw)}. Fix the record.")
    role = _ROLES.get(raw[role_key]) if isinstance(raw[role_key], str) else None
    if role is None:
        raise DataError(f"{where}: unknown role {raw[role_key]!r}; lorakit trains on the roles system, user and "
                        "assistant (ShareGPT: system, human, gpt). Rename the role, or remove the turn.")
    if text_key not in raw:
        raise DataError(f"{where}: no {text_key!r} key beside {role_key!r}; keys there: {list(raw)}. Fix the record.")
    trained = _weight(1 if raw.get("weight") is None else raw["weight"], role, where)
    if raw[text_key] is None:
        return Turn(role, "", trained), "null content"
    content = _content_text(raw[text_key], where)
    blank = role == "assistant" and trained and not content.strip()
    return Turn(role, content, trained), "blank assistant reply" if blank else None


def _content_text(value: Any, where: str) -> str:
    """A turn's text: a string, or OpenAI's list of ``{"type": "text", "text": ...}`` parts joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, Mapping) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise DataError(f"{where}: the content is a {type(value).__name__} lorakit cannot train on (only text: a "
                    "string, or a list of {'type': 'text', 'text': ...} parts); remove images/tool calls from "
                    "the record or drop it.")


def _weight(value: Any, role: str, where: str) -> bool:
    if isinstance(value, (str, list, dict)) or value not in (0, 1):
        raise DataError(f"{where}: weight {value!r}; a reply's weight is 0 (no loss on it) or 1 (the default).")
    if value == 0 and role != "assistant":
        raise DataError(f"{where}: weight 0 on a {role} turn; only assistant replies carry a loss, so only they "
                        "take a weight. Remove the key.")
    return value == 1


def _check_order(turns: list[Turn], where: str) -> None:
    expected = "user"
    for i, turn in enumerate(turns):
        if turn.role == "system" and i == 0:
            continue
        if turn.role != expected:
            raise DataError(f"{where}: turn {i} is {turn.role!r} where {expected!r} was due (roles out of order): "
                            f"{_ORDER_RULE}. Merge consecutive turns of one role, or fix the order.")
        expected = "assistant" if expected == "user" else "user"
