"""Every refusal of lorakit serve: the right status and OpenAI's JSON error shape, never a traceback; the
server and the other adapters unchanged afterwards."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from .conftest import BASE_NAME, loader, paused, running, wait_for

CHAT = [{"role": "user", "content": "Name three colours."}]


def error_of(response, status: int, code: str | None = None, param: str | None = None) -> str:
    """The error message of a refusal, after checking its status and shape."""
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error["message"]


def test_api_key_is_required_except_for_health(server):
    for key in (None, "wrong"):
        r = server.http(api_key=key).get("/v1/models")
        assert "Authorization" in error_of(r, 401, code="invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").chat.completions.create(model=BASE_NAME, messages=CHAT, max_tokens=2)
    health = server.http(api_key=None).get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


@pytest.mark.parametrize("body, param", [
    ({"messages": CHAT}, "model"),
    ({"model": BASE_NAME}, "messages"),
    ({"model": BASE_NAME, "messages": CHAT, "n": 2}, "n"),
    ({"model": BASE_NAME, "messages": CHAT, "temperature": 5}, "temperature"),
    ({"model": BASE_NAME, "messages": CHAT, "top_p": 0}, "top_p"),
    ({"model": BASE_NAME, "messages": CHAT, "max_tokens": 0}, "max_tokens"),
    ({"model": BASE_NAME, "messages": CHAT, "max_tokens": 301}, "max_tokens"),       # above --max-tokens
    ({"model": BASE_NAME, "messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": BASE_NAME, "messages": CHAT, "logprobs": True}, "logprobs"),
    ({"model": BASE_NAME, "messages": CHAT, "seed": "x"}, "seed"),
    ({"model": BASE_NAME, "messages": CHAT, "stream": "yes"}, "stream"),
    ({"model": BASE_NAME, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"model": BASE_NAME, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
    ({"model": BASE_NAME, "messages": [{"role": "user", "content": "word " * 310}]}, "messages"),  # > prompt limit
])
def test_bad_chat_requests_are_400(server, body, param):
    error_of(server.http().post("/v1/chat/completions", json=body), 400, param=param)


def test_bad_completion_requests_are_400(server):
    http = server.http()
    for body, param in (({"model": BASE_NAME, "prompt": ""}, "prompt"),
                        ({"model": BASE_NAME, "prompt": ["one", "two"]}, "prompt"),
                        ({"model": BASE_NAME, "prompt": [1, 10**9]}, "prompt"),
                        ({"model": BASE_NAME, "prompt": "hi", "echo": True}, "echo"),
                        # 250 prompt tokens + 300 > the model's 320 positions
                        ({"model": BASE_NAME, "prompt": "hi " * 250, "max_tokens": 300}, "max_tokens")):
        error_of(http.post("/v1/completions", json=body), 400, param=param)
    for raw in (b"{not json", b"[1, 2]", b'{"model": NaN}'):
        error_of(http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"}), 400)
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(model=BASE_NAME, prompt="hi", n=3)
    assert e.value.body["param"] == "n"
    # without max_tokens, a chat reply is cut to the room the context leaves instead of refused
    r = server.client().chat.completions.create(model=BASE_NAME, temperature=0,
                                                messages=[{"role": "user", "content": "hi " * 260}])
    assert r.usage.total_tokens <= 320 and r.usage.completion_tokens > 0


def test_unknown_model_and_route_are_404(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.client().chat.completions.create(model="nope", messages=CHAT, max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "alpha" in e.value.body["message"]
    assert "/v1/chat/completions" in error_of(server.http().get("/v1/nothing"), 404)
    error_of(server.http().get("/v1/chat/completions"), 405)


def test_oversized_bodies_are_413_declared_or_not(server, limits):
    big = {"model": BASE_NAME, "prompt": "x" * limits.max_body_bytes}
    error_of(server.http().post("/v1/completions", json=big), 413, code="request_too_large")

    def chunks():  # no Content-Length: the body is counted as it arrives
        for _ in range(limits.max_body_bytes // 1000 + 2):
            yield b" " * 1000

    error_of(server.http().post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}),
             413, code="request_too_large")


def test_a_full_queue_is_429(server, limits):
    client = server.client()
    with ThreadPoolExecutor(limits.max_queue) as pool:
        with paused(server.engine):
            waiting = [pool.submit(client.completions.create, model=BASE_NAME, prompt="hi", max_tokens=2,
                                   temperature=0) for _ in range(limits.max_queue)]
            wait_for(lambda: server.engine.stats()["waiting"] == limits.max_queue, what="the queue to fill")
            with pytest.raises(openai.RateLimitError) as e:
                client.completions.create(model=BASE_NAME, prompt="hi", max_tokens=2)
            assert e.value.body["code"] == "queue_full"
        assert all(f.result().usage.completion_tokens >= 1 for f in waiting)


def test_runtime_loads_stay_inside_the_adapter_root(server, serve_dirs):
    http, client = server.http(), server.client()
    before = [m.id for m in client.models.list().data]
    load = lambda name, path: http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})  # noqa: E731
    error_of(load("out1", "../outside"), 403, param="lora_path")
    error_of(load("out2", str(serve_dirs["outside"])), 403, param="lora_path")
    error_of(load("out3", "sneaky"), 403, param="lora_path")          # a symlink in the root, pointing out
    error_of(load("bad name", "gamma"), 400, param="lora_name")
    error_of(load("alpha", "gamma"), 400, code="name_taken")
    error_of(load(BASE_NAME, "gamma"), 400, code="name_taken")
    error_of(load("nothing", "no-such-folder"), 400, code="invalid_adapter")
    message = error_of(load("broken", "broken"), 400, code="invalid_adapter")
    assert "broken" in message
    error_of(http.post("/v1/load_lora_adapter", json={"lora_name": "x"}), 400, param="lora_path")
    error_of(http.post("/v1/unload_lora_adapter", json={"lora_name": "nope"}), 404)
    error_of(http.post("/v1/unload_lora_adapter", json={"lora_name": BASE_NAME}), 400)
    # nothing changed: same models, and a failed name is free again
    assert [m.id for m in client.models.list().data] == before
    r = client.completions.create(model="alpha", prompt="The weather today is", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4


@pytest.mark.parametrize("failing_call", [1, 2], ids=["prompt", "decoding-step"])
def test_a_failing_forward_is_a_500_and_the_server_goes_on(server, monkeypatch, failing_call):
    engine = server.engine
    real = engine._forward
    calls = []

    def failing(rows, **inputs):
        calls.append(rows)
        if len(calls) == failing_call:  # the prompt's forward, or the first decoding step after it
            raise RuntimeError("simulated device failure")
        return real(rows, **inputs)

    monkeypatch.setattr(engine, "_forward", failing)
    r = server.http().post("/v1/completions", json={"model": "beta", "prompt": "hi", "max_tokens": 5})
    assert "simulated device failure" in error_of(r, 500, code="generation_failed")
    monkeypatch.setattr(engine, "_forward", real)
    wait_for(lambda: engine.stats()["active"] == 0, what="the failed row to leave")
    ok = server.client().completions.create(model="beta", prompt="hi", max_tokens=3, temperature=0)
    assert ok.usage.completion_tokens == 3


def test_a_client_that_leaves_frees_its_row(server):
    engine = server.engine
    body = {"model": "alpha", "prompt": "The weather today is", "max_tokens": 300, "temperature": 0,
            "stream": True}
    http = server.http()
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(l for l in lines if l.startswith("data: "))
        with paused(engine):
            assert engine.stats()["active"] == 1
            job = engine._active[0]
            r.close()
            http.close()
            wait_for(lambda: job.cancelled, what="the server to see the client leave")
    wait_for(lambda: engine.stats()["active"] == 0, what="the row to be freed")
    assert len(job.generated) < 300


def test_a_non_streaming_client_that_leaves_frees_its_row(server):
    import httpx2 as httpx

    engine = server.engine
    body = {"model": "beta", "prompt": "The weather today is", "max_tokens": 300, "temperature": 0}
    with paused(engine):
        with pytest.raises(httpx.TimeoutException):
            server.http().post("/v1/completions", json=body, timeout=0.3)
        # the handler notices the client is gone and takes the request out of the queue before it ever runs
        wait_for(lambda: engine.stats()["waiting"] == 0, what="the queued request to be dropped")
    assert engine.stats()["active"] == 0


def test_503_while_the_model_loads(serve_dirs, limits):
    from lorakit.serve.server import ServeSettings

    gate = threading.Event()
    load = loader(serve_dirs["model"])

    def slow_load():
        gate.wait(30)
        return load()

    with running(ServeSettings(model_name=BASE_NAME, limits=limits), slow_load) as r:
        http = r.http(api_key=None)
        error_of(http.get("/health"), 503, code="model_loading")
        error_of(http.get("/v1/models"), 503, code="model_loading")
        with pytest.raises(openai.InternalServerError) as e:
            r.client().chat.completions.create(model=BASE_NAME, messages=CHAT, max_tokens=2)
        assert e.value.status_code == 503
        gate.set()
        r.wait_ready()
        assert http.get("/health").status_code == 200
        # no --adapter-root: run-time loading is refused
        error_of(http.post("/v1/load_lora_adapter", json={"lora_name": "g", "lora_path": str(serve_dirs["gamma"])}),
                 403, param="lora_path")


def test_a_model_that_fails_to_load_stops_the_server(serve_dirs, limits):
    from lorakit.errors import ModelLoadError
    from lorakit.serve.server import ServeSettings

    def bad_load():
        raise ModelLoadError("model folder /nowhere does not exist. Fix: check the path.")

    with running(ServeSettings(model_name=BASE_NAME, limits=limits), bad_load) as r:
        r.thread.join(20)
        assert not r.thread.is_alive()
        assert r.engine.state == "failed" and "/nowhere" in r.engine.failure
