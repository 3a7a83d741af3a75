"""The Ollama Modelfile of an exported model: FROM / ADAPTER lines, TEMPLATE, SYSTEM and stop parameters.

``ollama create NAME -f Modelfile`` in the folder reads the GGUF files named relative to it. The TEMPLATE is
the chat template translated by ollama_template.py; ``PARAMETER stop`` lists the format's end-of-turn
markers so generation ends where the model learned to stop.
"""
from __future__ import annotations

from lorakit.errors import ExportError
from lorakit.export.ollama_template import Translation


def _block(keyword: str, text: str) -> str:
    if '"""' in text:
        raise ExportError(f"the {keyword} text contains three double quotes in a row, which a Modelfile cannot "
                          f"hold; write the Modelfile's {keyword} yourself")
    return f'{keyword} """{text}"""'


def modelfile(model_file: str, adapter_file: str | None, translation: Translation | None) -> str:
    """The Modelfile text; ``translation`` None leaves TEMPLATE out (Ollama then picks its own)."""
    lines = ["# Written by `lorakit export --to ollama`. In this folder run:",
             "#   ollama create MODEL_NAME -f Modelfile && ollama run MODEL_NAME",
             f"FROM ./{model_file}"]
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    if translation is not None:
        lines.append(_block("TEMPLATE", translation.template))
        if translation.system:
            lines.append(_block("SYSTEM", translation.system))
        for stop in translation.stops:
            if '"' in stop or "\n" in stop:
                raise ExportError(f"the stop text {stop!r} cannot be written as a Modelfile parameter")
            lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"
