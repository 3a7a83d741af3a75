"""The chat template travels with the adapter: written into the adapter folder at training time, read back
by ``generate``, ``chat``, ``merge`` and ``export`` before the base model's own.

The file is ``chat_template.jinja`` (what transformers' ``save_pretrained`` writes too). Reading also
accepts the older places: a ``chat_template`` entry in ``tokenizer_config.json`` or ``chat_template.json``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lorakit.errors import DataError

__all__ = ["CHAT_TEMPLATE_FILE", "save_chat_template", "load_chat_template", "template_text"]

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def template_text(tokenizer: Any) -> str | None:
    """The tokenizer's default chat template as text (a dict of named templates: its ``default``), or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template.strip() else None


def save_chat_template(tokenizer: Any, directory: str | os.PathLike) -> Path | None:
    """Write the tokenizer's chat template to ``directory/chat_template.jinja`` (atomically: a temporary file
    in that folder, then a rename). Returns the path, or None when the tokenizer has no template."""
    text = template_text(tokenizer)
    if text is None:
        return None
    from lorakit.io import atomic_write_text

    target = Path(directory) / CHAT_TEMPLATE_FILE
    atomic_write_text(target, text)
    return target


def load_chat_template(directory: str | os.PathLike) -> str | None:
    """The chat template saved in ``directory`` (see the module doc), or None when there is none."""
    folder = Path(directory)
    jinja = folder / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        text = _read(jinja)
        return text if text.strip() else None
    for name in ("tokenizer_config.json", "chat_template.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            value = json.loads(_read(path)).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            raise DataError(f"{path}: not a JSON object; fix or delete the file (a chat template can also be "
                            f"given as {CHAT_TEMPLATE_FILE}).") from None
        if isinstance(value, list):  # [{"name": "default", "template": ...}, ...]
            value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"),
                         None)
        if isinstance(value, str) and value.strip():
            return value
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); re-save it as UTF-8.") from None
