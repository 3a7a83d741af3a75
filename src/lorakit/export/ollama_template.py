"""A chat template (Jinja, as transformers runs it) translated into an Ollama TEMPLATE (Go text/template).

Ollama cannot run Jinja. Rather than parse Jinja, lorakit knows a few chat formats (ChatML, Llama 3, Gemma,
Mistral [INST]) as data: the text around each system / user / assistant turn and after them (the generation
prompt). For each format it can (a) write the Go template and (b) render a conversation the way that Go
template renders it under Ollama (system messages collected into ``.System``, the others in ``.Messages``).
A model's Jinja template is recognised when it renders a set of probe conversations exactly as the format
does; a template that inserts a default system prompt gets it back as the Modelfile's ``SYSTEM``.

A template that only resembles a format (its markers appear, the text differs) is translated with a
warning that shows the first difference; one that resembles none is refused.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from lorakit.errors import ExportError


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    name: str
    #: substrings of the Jinja source that suggest the format
    markers: tuple[str, ...]
    user: tuple[str, str]
    assistant: tuple[str, str]
    #: the generation prompt, written after the last turn
    generation: str
    #: "own": a turn of its own (``system`` prefix/suffix); "first_user" / "last_user": put in front of that
    #: user turn's content, followed by ``system_join``
    system_at: str
    system: tuple[str, str] = ("", "")
    system_join: str = "\n\n"
    stops: tuple[str, ...] = ()


FORMATS = (
    ChatFormat("chatml", ("<|im_start|>", "<|im_end|>"), user=("<|im_start|>user\n", "<|im_end|>\n"),
               assistant=("<|im_start|>assistant\n", "<|im_end|>\n"), generation="<|im_start|>assistant\n",
               system_at="own", system=("<|im_start|>system\n", "<|im_end|>\n"),
               stops=("<|im_end|>", "<|im_start|>")),
    ChatFormat("llama3", ("<|start_header_id|>", "<|eot_id|>"),
               user=("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
               assistant=("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
               generation="<|start_header_id|>assistant<|end_header_id|>\n\n", system_at="own",
               system=("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
               stops=("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")),
    ChatFormat("gemma", ("<start_of_turn>", "<end_of_turn>"), user=("<start_of_turn>user\n", "<end_of_turn>\n"),
               assistant=("<start_of_turn>model\n", "<end_of_turn>\n"), generation="<start_of_turn>model\n",
               system_at="first_user", stops=("<end_of_turn>",)),
    ChatFormat("mistral", ("[INST]", "[/INST]"), user=("[INST] ", " [/INST]"), assistant=("", "</s>"),
               generation="", system_at="first_user", stops=("[INST]", "[/INST]", "</s>")),
    ChatFormat("mistral-v3", ("[INST]", "[/INST]"), user=("[INST] ", "[/INST]"), assistant=(" ", "</s>"),
               generation="", system_at="last_user", stops=("[INST]", "[/INST]", "</s>")),
)


def go_template(fmt: ChatFormat, bos: str = "") -> str:
    """The Ollama TEMPLATE of ``fmt``. No whitespace trimming: every character outside ``{{ }}`` is literal."""
    (up, us), (ap, as_) = fmt.user, fmt.assistant
    content = "{{ .Content }}"
    if fmt.system_at == "own":
        head = "{{ if .System }}" + fmt.system[0] + "{{ .System }}" + fmt.system[1] + "{{ end }}"
        loop = "{{ range .Messages }}"
        user = up + content + us
    elif fmt.system_at == "first_user":
        head = "{{ $system := .System }}"
        loop = "{{ range .Messages }}"
        user = up + "{{ if $system }}{{ $system }}" + fmt.system_join + '{{ $system = "" }}{{ end }}' + content + us
    else:  # last_user: the system text goes into the last message when it is the user's
        head = ""
        loop = "{{ range $i, $_ := .Messages }}"
        user = (up + "{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}" + fmt.system_join
                + "{{ end }}" + content + us)
    body = ('{{ if eq .Role "user" }}' + user + '{{ else if eq .Role "assistant" }}' + ap + content + as_
            + "{{ end }}")
    return bos + head + loop + body + "{{ end }}" + fmt.generation


def render(fmt: ChatFormat, messages: list[dict], default_system: str | None = None, bos: str = "") -> str:
    """What Ollama sends the model for ``messages`` through ``go_template(fmt, bos)``: system messages joined
    into ``.System`` (the Modelfile's SYSTEM when there are none), the rest rendered turn by turn."""
    systems = [m["content"] for m in messages if m["role"] == "system"]
    system = "\n\n".join(systems) if systems else (default_system or "")
    out = [bos]
    if fmt.system_at == "own" and system:
        out += [fmt.system[0], system, fmt.system[1]]
    pending = system if fmt.system_at == "first_user" else ""
    for i, m in enumerate(messages):
        if m["role"] == "user":
            out.append(fmt.user[0])
            if pending:
                out += [pending, fmt.system_join]
                pending = ""
            if fmt.system_at == "last_user" and system and i == len(messages) - 1:
                out += [system, fmt.system_join]
            out += [m["content"], fmt.user[1]]
        elif m["role"] == "assistant":
            out += [fmt.assistant[0], m["content"], fmt.assistant[1]]
    out.append(fmt.generation)
    return "".join(out)


_SYSTEM = {"role": "system", "content": "Answer in one short sentence."}
_USER = {"role": "user", "content": "Where is the station?"}
_REPLY = {"role": "assistant", "content": "Two streets north of here."}
_AGAIN = {"role": "user", "content": "And the museum?"}
#: conversations the two renderings must agree on (system turns are skipped where the template refuses them)
PROBES = ([_USER], [_SYSTEM, _USER], [_USER, _REPLY, _AGAIN], [_SYSTEM, _USER, _REPLY, _AGAIN])


@dataclasses.dataclass(frozen=True)
class Translation:
    format: ChatFormat
    template: str
    system: str | None
    stops: tuple[str, ...]
    #: empty when every probe rendered identically; else what differs (shown as a warning)
    difference: str


def _jinja(tokenizer: Any, template: str, messages: list[dict]) -> str | None:
    """transformers' rendering with the generation prompt, or None when the template refuses the messages."""
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - raise_exception() in a template (e.g. no system role): not comparable
        return None


def _default_system(fmt: ChatFormat, rendered: str) -> str | None:
    """The system prompt a template inserts when the conversation has none (SmolLM2's does), if any."""
    start, end = fmt.system
    if fmt.system_at != "own" or not start or not rendered.startswith(start):
        return None
    stop = rendered.find(end, len(start))
    return rendered[len(start):stop] if stop > 0 else None


def _first_difference(expected: str, got: str) -> str:
    i = next((k for k, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    window = slice(max(0, i - 20), i + 40)
    return f"the training template gives {expected[window]!r}, the Ollama one {got[window]!r}"


def _compare(fmt: ChatFormat, template: str, tokenizer: Any, strip_bos: str) -> tuple[str, str | None]:
    """(first difference over the probes or "", the default system prompt found)."""
    default = None
    for probe in PROBES:
        expected = _jinja(tokenizer, template, list(probe))
        if expected is None:
            continue
        expected = expected[len(strip_bos):] if strip_bos and expected.startswith(strip_bos) else expected
        has_system = any(m["role"] == "system" for m in probe)
        if default is None and not has_system:
            got = render(fmt, list(probe))
            if got != expected:
                default = _default_system(fmt, expected)
        got = render(fmt, list(probe), default)
        if got != expected:
            return _first_difference(expected, got), default
    return "", default


def translate(template: str, tokenizer: Any) -> Translation:
    """The Ollama form of a Jinja chat template; ExportError when it matches no known format."""
    from lorakit.export.vocab import adds_bos_eos

    candidates = [f for f in FORMATS if all(m in template for m in f.markers)]
    if not candidates:
        raise ExportError(
            f"the chat template is not one lorakit can translate for Ollama (it knows "
            f"{', '.join(f.name for f in FORMATS)}). Fix: pass --no-template and add a TEMPLATE to the Modelfile "
            f"yourself (Ollama's docs/template.md), or use `--to gguf-merged`, which keeps the template in the file")
    bos = tokenizer.bos_token or ""
    first = _jinja(tokenizer, template, [_USER]) or ""
    # A rendering that starts with the BOS text: either the template writes BOS (then the Ollama template must
    # not, when llama.cpp adds it anyway), or a turn marker happens to be the BOS token (SmolLM2's
    # <|im_start|>). Both readings are tried.
    readings = [("", "")]
    if bos and first.startswith(bos):
        readings.insert(0, (bos, "" if adds_bos_eos(tokenizer)[0] else bos))
    eos = tokenizer.eos_token
    best = None
    for fmt in candidates:
        for strip_bos, literal_bos in readings:
            difference, system = _compare(fmt, template, tokenizer, strip_bos)
            stops = fmt.stops + ((eos,) if eos and eos not in fmt.stops else ())
            found = Translation(fmt, go_template(fmt, literal_bos), system, stops, difference)
            if not difference:
                return found
            best = best or found
    return best
