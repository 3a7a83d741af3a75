"""Where an export takes the tokenizer and the chat template from: the adapter folder first, then the base.

A chat adapter carries the template it was trained with (``chat_template.jinja`` or the tokenizer files in
the adapter folder); an export must use that one, since the base model's template may differ. Without one
in the adapter folder the base model's template is used.
"""
from __future__ import annotations

from pathlib import Path

from lorakit.data.chat_template import load_chat_template


def chat_template(adapter_dir: str | Path | None, base_dir: str | Path) -> tuple[str | None, str]:
    """(template text or None, the folder it came from)."""
    for folder in ([Path(adapter_dir)] if adapter_dir else []) + [Path(base_dir)]:
        text = load_chat_template(folder)
        if text is not None:
            return text, str(folder)
    return None, str(base_dir)


def tokenizer_dir(adapter_dir: str | Path | None, base_dir: str | Path) -> Path:
    """The adapter folder when it holds its own tokenizer (tokenizer.json), else the base model's folder."""
    if adapter_dir and (Path(adapter_dir) / "tokenizer.json").is_file():
        return Path(adapter_dir)
    return Path(base_dir)
