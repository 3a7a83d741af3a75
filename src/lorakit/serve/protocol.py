"""The OpenAI wire format: request bodies checked into ``ApiRequest``, responses and stream chunks built.

Fields lorakit serves: ``model``, ``messages`` (chat) / ``prompt`` (completions), ``max_tokens`` (or
``max_completion_tokens``), ``temperature`` (default 1, as OpenAI; 0 = greedy), ``top_p``, ``stop``,
``seed``, ``n`` (1 only), ``stream`` and ``stream_options.include_usage``. A field that asks for
something lorakit does not do (``n`` > 1, logprobs, tools, penalties, ...) is a 400 naming it, never
silently ignored; fields that change nothing here (``user``, ``metadata``, ...) pass.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from .errors import bad_request
from .limits import ServeLimits

#: completions' default ``max_tokens`` (OpenAI's); chat defaults to the server's limit
COMPLETION_DEFAULT_MAX_TOKENS = 16
MAX_STOP = 4  # stop sequences per request, as OpenAI allows
CHAT_ROLES = ("system", "user", "assistant")

# fields that would change the answer in a way lorakit does not implement: name -> values that are fine
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "logprobs": (None, False, 0),
    "top_logprobs": (None, 0), "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "audio": (None,), "prediction": (None,),
}


@dataclasses.dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float   # 0: greedy
    top_p: float
    seed: int | None
    stop: tuple[str, ...]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class ApiRequest:
    kind: str                       # "chat" or "completion"
    model: str
    messages: tuple[dict, ...] | None
    prompt: str | tuple[int, ...] | None
    sampling: Sampling
    stream: bool
    include_usage: bool


def parse_request(kind: str, body: Any, limits: ServeLimits) -> ApiRequest:
    """Check a chat or completions body; a bad field is a 400 that names it and says what to send."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("`model` is required: the base model's name or a loaded adapter's (GET /v1/models "
                          "lists them)", param="model")
    for key, fine in _UNSUPPORTED.items():
        if key in body and body[key] not in fine:
            raise bad_request(f"`{key}` is not supported by lorakit serve; leave it out", param=key)
    n = body.get("n", 1)
    if n not in (None, 1) or isinstance(n, bool):
        raise bad_request("`n` must be 1: lorakit serve returns one choice per request (send several requests "
                          "for several answers)", param="n")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad_request("`response_format` other than {\"type\": \"text\"} is not supported", param="response_format")
    if kind == "chat":
        messages, prompt = _messages(body.get("messages")), None
    else:
        messages, prompt = None, _prompt(body.get("prompt"))
    default = limits.max_tokens if kind == "chat" else min(COMPLETION_DEFAULT_MAX_TOKENS, limits.max_tokens)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("`stream` must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("`stream_options` must be an object such as {\"include_usage\": true}", param="stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad_request("`stream_options.include_usage` must be true or false", param="stream_options")
    return ApiRequest(kind=kind, model=model, messages=messages, prompt=prompt, stream=stream,
                      include_usage=include_usage and stream, sampling=_sampling(body, default, limits))


def _sampling(body: dict, default_max: int, limits: ServeLimits) -> Sampling:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is None:
        max_tokens = default_max
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise bad_request(f"`{key}` must be a whole number >= 1, got {max_tokens!r}", param=key)
    if max_tokens > limits.max_tokens:
        raise bad_request(f"`{key}` is {max_tokens}, above this server's limit of {limits.max_tokens} (its "
                          f"--max-tokens); ask for fewer", param=key)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad_request("`top_p` must be above 0 and at most 1 (use temperature 0 for greedy decoding)",
                          param="top_p")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad_request(f"`seed` must be a whole number, got {seed!r}", param="seed")
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=_stop(body.get("stop")))


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise bad_request(f"`{key}` must be a number from {low:g} to {high:g}, got {value!r}", param=key)
    return float(value)


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items) or len(items) > MAX_STOP:
        raise bad_request(f"`stop` must be a non-empty string or a list of at most {MAX_STOP} non-empty strings",
                          param="stop")
    return tuple(items)


def _messages(messages: Any) -> tuple[dict, ...]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("`messages` must be a non-empty list of {\"role\", \"content\"} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object with `role` and `content`", param=where)
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(f"{where}.role is {m.get('role')!r}; use one of {', '.join(CHAT_ROLES)}",
                              param=f"{where}.role")
        out.append({"role": role, "content": _content(m.get("content"), where)})
    return tuple(out)


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad_request(f"{where}.content: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                                  f"supported", param=f"{where}.content")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"{where}.content must be a string (or a list of text parts)", param=f"{where}.content")


def _prompt(prompt: Any) -> str | tuple[int, ...]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in a list (what some clients send)
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                   for t in prompt):
        return tuple(prompt)
    raise bad_request("`prompt` must be one non-empty string (or one list of token ids); send several prompts as "
                      "several requests", param="prompt")


# -- responses ---------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(req: ApiRequest, rid: str, created: int, text: str, finish: str, use: dict) -> dict:
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                  "logprobs": None}
        return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [choice], "usage": use}
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": "text_completion", "created": created, "model": req.model, "choices": [choice],
            "usage": use}


def chunk(req: ApiRequest, rid: str, created: int, text: str | None = None, finish: str | None = None,
          first: bool = False, use: dict | None = None) -> dict:
    """One stream chunk: text, a finish reason, or (``use``) the final usage-only chunk with no choices."""
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    out: dict = {"id": rid, "object": obj, "created": created, "model": req.model}
    if use is not None:
        out.update(choices=[], usage=use)
        return out
    if req.kind == "chat":
        delta: dict = {"role": "assistant", "content": text or ""} if first else \
            ({"content": text} if text else {})
        out["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    else:
        out["choices"] = [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
    if req.include_usage:
        out["usage"] = None
    return out
