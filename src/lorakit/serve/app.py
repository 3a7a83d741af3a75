"""The HTTP side: FastAPI routes in OpenAI's shapes, the API-key and body-size guard, every error as JSON.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``,
``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter`` (vLLM's names and bodies). Every
refusal is ``{"error": {"message", "type", "param", "code"}}`` with its status; an unexpected failure is
a 500 in the same shape (the traceback goes to the server's log, never to the client).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import LoraError
from ..layers.routing import BASE
from .adapters import Adapter, AdapterRegistry, attach, chat_template_of, detach
from .engine import NOT_YET, Delta, Done, Engine, Failed, Job
from .errors import ApiError, bad_request
from .limits import ServeLimits
from .protocol import ApiRequest, chunk, parse_request, response, usage

ROUTES = ("GET /health", "GET /v1/models", "POST /v1/chat/completions", "POST /v1/completions",
          "POST /v1/load_lora_adapter", "POST /v1/unload_lora_adapter")
_POLL_S = 0.5  # how often a waiting non-streaming request checks that its client is still there


def error_response(error: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class Guard:
    """ASGI middleware run before any route: the API key, and a declared body size over the limit."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            error = self._check(scope)
            if error is not None:
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, scope) -> ApiError | None:
        headers = dict(scope.get("headers") or [])
        if self.expected is not None and scope.get("path") != "/health":
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                what = "no Authorization header" if not given else "a wrong API key"
                return ApiError(401, f"{what}: send `Authorization: Bearer <the server's API key>`",
                                code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return bad_request("the Content-Length header is not a number")
            if int(length) > self.max_body_bytes:
                return _too_large(self.max_body_bytes)
        return None


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than this server's limit of {limit} bytes (its "
                         f"--max-body-bytes); send a shorter prompt", code="request_too_large")


async def read_json(request: Request, limit: int) -> Any:
    """The request's JSON body, read no further than ``limit`` bytes."""
    size, parts = 0, []
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            raise _too_large(limit)
        parts.append(piece)
    try:
        return json.loads(b"".join(parts), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise bad_request(f"the request body is not valid JSON ({str(e)[:120]})") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _event(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class Ticket:
    """Where the engine thread sends a job's events: an asyncio queue on the request's loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def push(self, event: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: no one is listening any more
            pass


def create_app(engine: Engine, registry: AdapterRegistry, limits: ServeLimits, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="lorakit serve", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())
    _add_error_handlers(app)

    @app.get("/health")
    async def health():
        if engine.state != "ready":
            try:
                engine.require_ready()
            except ApiError as e:
                return error_response(e)
        return {"status": "ok", **engine.stats()}

    @app.get("/v1/models")
    async def models():
        engine.require_ready()
        data = [{"id": registry.base_name, "object": "model", "created": started, "owned_by": "lorakit",
                 "root": registry.base_name, "parent": None}]
        data += [{"id": a.name, "object": "model", "created": started, "owned_by": "lorakit", "root": a.path,
                  "parent": registry.base_name} for a in registry.adapters()]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _generate(engine, registry, limits, "chat", request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(engine, registry, limits, "completion", request)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request):
        body = _object(await read_json(request, limits.max_body_bytes))
        engine.require_ready()
        path = registry.runtime_path(body.get("lora_path"))
        name = registry.reserve(body.get("lora_name"))
        try:
            future = engine.run(_load_command(registry, name, path, body["lora_path"]))
        except ApiError:
            registry.release(name, None)
            raise
        try:
            adapter, warnings = await asyncio.wrap_future(future)
        except Exception as e:  # noqa: BLE001 - a bad adapter is the client's to fix; others are 500s
            raise _load_error(e, body["lora_path"]) from None
        return {"object": "lora_adapter", "lora_name": name, "lora_path": adapter.path, "status": "loaded",
                "warnings": warnings}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request):
        body = _object(await read_json(request, limits.max_body_bytes))
        engine.require_ready()
        name = registry.begin_unload(body.get("lora_name"))
        try:
            future = engine.run(_unload_command(registry, name))
        except ApiError:
            registry.finish_unload(name, removed=False)
            raise
        await asyncio.wrap_future(future)
        return {"object": "lora_adapter", "lora_name": name, "status": "unloaded"}

    return Guard(app, api_key, limits.max_body_bytes)


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def _load_command(registry: AdapterRegistry, name: str, path: str, shown: str):
    """Load on the engine thread; the registry learns the outcome there, even if the caller has left."""
    def command(engine: Engine):
        try:
            template = chat_template_of(path)
            engine.model, warnings = attach(engine.model, name, path)
        except BaseException:
            registry.release(name, None)
            raise
        adapter = Adapter(name=name, path=shown, template=template)
        registry.release(name, adapter)
        return adapter, warnings
    return command


def _unload_command(registry: AdapterRegistry, name: str):
    def command(engine: Engine):
        if engine.uses(name):
            return NOT_YET  # requests on it finish first; new ones are refused meanwhile
        try:
            detach(engine.model, name)
        except BaseException:
            registry.finish_unload(name, removed=False)
            raise
        registry.finish_unload(name, removed=True)
        return None
    return command


def _load_error(e: BaseException, shown: str) -> BaseException:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, LoraError):
        return bad_request(f"cannot load the adapter {shown!r}: {e}", param="lora_path", code="invalid_adapter")
    if isinstance(e, OSError):
        return bad_request(f"cannot read the adapter {shown!r}: {e.strerror or e}", param="lora_path",
                           code="invalid_adapter")
    return e


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            message = f"no route {request.method} {request.url.path}; this server has {', '.join(ROUTES)}"
        elif e.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; this server has {', '.join(ROUTES)}"
        else:
            message = str(e.detail)
        return error_response(ApiError(e.status_code, message))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        return error_response(ApiError(500, f"the server failed on this request ({type(e).__name__}); its log has "
                                            f"the details", code="internal_error"))


# -- generation --------------------------------------------------------------------------------
async def _generate(engine: Engine, registry: AdapterRegistry, limits: ServeLimits, kind: str, request: Request):
    body = await read_json(request, limits.max_body_bytes)
    req = parse_request(kind, body, limits)
    engine.require_ready()
    adapter = registry.lookup(req.model)
    prompt_ids = await run_in_threadpool(_prompt_ids, engine, req, adapter)
    explicit = body.get("max_tokens") is not None or body.get("max_completion_tokens") is not None
    sampling = _fit_length(engine, limits, req, len(prompt_ids), explicit)
    ticket = Ticket()
    job = Job(adapter=adapter.name if adapter else BASE, prompt_ids=prompt_ids, sampling=sampling, emit=ticket.push)
    engine.submit(job)
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    if req.stream:
        return StreamingResponse(_stream(engine, req, job, ticket, rid, created), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    done = await _wait(engine, request, job, ticket)
    if done is None:  # the client left; nobody reads this
        return JSONResponse({}, status_code=499)
    return response(req, rid, created, done.text, done.finish_reason,
                    usage(done.prompt_tokens, done.completion_tokens))


def _prompt_ids(engine: Engine, req: ApiRequest, adapter: Adapter | None) -> list[int]:
    tok = engine.tokenizer
    with engine.tokenizer_lock:
        if req.kind == "completion":
            if isinstance(req.prompt, tuple):
                vocab = len(tok)
                if max(req.prompt) >= vocab:
                    raise bad_request(f"`prompt` has token id {max(req.prompt)}, beyond the vocabulary ({vocab} "
                                      f"tokens)", param="prompt")
                return list(req.prompt)
            ids = list(tok(req.prompt)["input_ids"])
        else:
            ids = _chat_ids(tok, req, adapter)
    if not ids:
        raise bad_request("the prompt encodes to no tokens; send some text", param="prompt")
    return ids


def _chat_ids(tok, req: ApiRequest, adapter: Adapter | None) -> list[int]:
    template = (adapter.template if adapter else None) or getattr(tok, "chat_template", None)
    if not template:
        raise bad_request(f"{req.model!r} has no chat template (neither saved with the adapter nor the base "
                          f"tokenizer's); use /v1/completions with a plain prompt", param="messages")
    try:
        out = tok.apply_chat_template(list(req.messages), chat_template=template, add_generation_prompt=True,
                                      tokenize=True)
    except Exception as e:  # noqa: BLE001 - jinja's errors (a template's raise_exception) are the client's to fix
        raise bad_request(f"the chat template refused these messages: {str(e)[:300]}", param="messages") from None
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def _fit_length(engine: Engine, limits: ServeLimits, req: ApiRequest, prompt_len: int, explicit: bool):
    import dataclasses

    if prompt_len > limits.max_prompt_tokens:
        raise bad_request(f"the prompt is {prompt_len} tokens, above this server's limit of "
                          f"{limits.max_prompt_tokens} (its --max-prompt-tokens); shorten it",
                          param="messages" if req.kind == "chat" else "prompt", code="context_length_exceeded")
    context = engine.context_length
    if not context:
        return req.sampling
    room = context - prompt_len
    if room < 1:
        raise bad_request(f"the prompt is {prompt_len} tokens and the model's context is {context}; shorten it",
                          code="context_length_exceeded")
    if req.sampling.max_tokens <= room:
        return req.sampling
    if explicit:
        raise bad_request(f"the prompt ({prompt_len} tokens) plus max_tokens ({req.sampling.max_tokens}) exceeds the "
                          f"model's context of {context} tokens; ask for at most {room}", param="max_tokens",
                          code="context_length_exceeded")
    return dataclasses.replace(req.sampling, max_tokens=room)


async def _wait(engine: Engine, request: Request, job: Job, ticket: Ticket) -> Done | None:
    """The job's final event (None when the client disconnected first, which cancels the job)."""
    try:
        while True:
            try:
                event = await asyncio.wait_for(ticket.queue.get(), timeout=_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(job)
                    return None
                continue
            if isinstance(event, Done):
                return event
            if isinstance(event, Failed):
                raise event.error
    except asyncio.CancelledError:
        engine.cancel(job)
        raise


async def _stream(engine: Engine, req: ApiRequest, job: Job, ticket: Ticket, rid: str, created: int):
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
    try:
        if req.kind == "chat":
            yield _event(chunk(req, rid, created, first=True))
        while True:
            event = await ticket.queue.get()
            if isinstance(event, Delta):
                yield _event(chunk(req, rid, created, text=event.text))
            elif isinstance(event, Done):
                yield _event(chunk(req, rid, created, finish=event.finish_reason))
                if req.include_usage:
                    yield _event(chunk(req, rid, created, use=usage(event.prompt_tokens, event.completion_tokens)))
                break
            elif isinstance(event, Failed):
                yield _event(event.error.body())
                break
        yield _event("[DONE]")
    finally:
        if not job.done:
            engine.cancel(job)
