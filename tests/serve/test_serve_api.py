"""lorakit serve through the official openai client: models, a concurrent burst over the base and two
adapters (each reply equal to `lorakit generate`'s), streaming, stop sequences, seeds, run-time loads."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from .conftest import BASE_NAME, OWN_TEMPLATE, paused, wait_for

PROMPTS = {"completion": "The weather today is", "chat": "Name three colours."}


def ask(client, model: str, kind: str, prompt: str, max_tokens: int, **kw):
    if kind == "chat":
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=max_tokens, temperature=0, **kw)
        return r.choices[0].message.content, r
    r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)
    return r.choices[0].text, r


def test_models_lists_the_base_and_the_adapters(server, serve_dirs):
    models = server.client().models.list().data
    assert [m.id for m in models] == [BASE_NAME, "alpha", "beta"]
    assert all(m.object == "model" and m.owned_by == "lorakit" for m in models)
    assert json.loads(server.http().get("/v1/models").text)["data"][1]["parent"] == BASE_NAME


def test_burst_over_base_and_two_adapters_equals_generate(server, reference):
    """Six requests (three models x chat/completions, different lengths) held back until all are queued,
    then decoded together: every reply is `lorakit generate`'s for its adapter, greedy."""
    cases = [(model, kind, n) for model, n in ((BASE_NAME, 20), ("alpha", 14), ("beta", 24))
             for kind in ("chat", "completion")]
    refs = {c: reference(PROMPTS[c[1]], None if c[0] == BASE_NAME else c[0], c[1] == "chat", c[2]) for c in cases}
    assert len({refs[c] for c in cases if c[1] == "chat"}) == 3, "the adapters must change the reply"
    client = server.client()
    with ThreadPoolExecutor(len(cases)) as pool:
        with paused(server.engine):
            futures = {c: pool.submit(ask, client, c[0], c[1], PROMPTS[c[1]], c[2]) for c in cases}
            wait_for(lambda: server.engine.stats()["waiting"] == len(cases), what="the burst to queue")
        replies = {c: f.result() for c, f in futures.items()}
    assert {c: text for c, (text, _) in replies.items()} == refs
    assert server.engine.stats()["peak_batch"] >= len(cases)  # they really ran as one batch
    for (model, kind, n), (_, r) in replies.items():
        assert r.model == model and r.usage.completion_tokens <= n
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.choices[0].finish_reason in ("stop", "length")


def test_stream_equals_the_whole_reply(server):
    client = server.client()
    whole, r = ask(client, "alpha", "chat", PROMPTS["chat"], 20)
    chunks = list(client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": PROMPTS["chat"]}], max_tokens=20, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    texts = list(client.completions.create(model="beta", prompt=PROMPTS["completion"], max_tokens=12,
                                           temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in texts) == ask(client, "beta", "completion", PROMPTS["completion"], 12)[0]


def test_stream_wire_format(server):
    """Server-sent events as OpenAI sends them: `data: {json}` blocks, ending with `data: [DONE]`."""
    body = {"model": "beta", "prompt": "Hello", "max_tokens": 5, "temperature": 0, "stream": True}
    with server.http().stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["model"] == "beta" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_sequences_cut_the_reply(server):
    client = server.client()
    whole, _ = ask(client, "alpha", "completion", PROMPTS["completion"], 24)
    stop = whole[len(whole) // 2:len(whole) // 2 + 3]
    cut, r = ask(client, "alpha", "completion", PROMPTS["completion"], 24, stop=[stop, "never-there"])
    assert cut == whole[:whole.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="alpha", prompt=PROMPTS["completion"], max_tokens=24, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_seeded_sampling_is_repeatable_alone_or_in_a_batch(server, serve_dirs):
    client = server.client()

    def sample(seed):
        r = client.completions.create(model="beta", prompt=PROMPTS["completion"], max_tokens=16, temperature=0.9,
                                      top_p=0.95, seed=seed)
        return r.choices[0].text

    alone = sample(7)
    with ThreadPoolExecutor(4) as pool:
        with paused(server.engine):
            futures = [pool.submit(sample, s) for s in (7, 8, 7, 9)]
            wait_for(lambda: server.engine.stats()["waiting"] == 4, what="the samples to queue")
        together = [f.result() for f in futures]
    assert together[0] == together[2] == alone
    assert len(set(together)) > 1  # other seeds draw other text
    # and it is what transformers' generate draws with that seed (its default top-k of 50 included)
    import torch

    from lorakit import LoraModel
    from lorakit.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(serve_dirs["model"]))
    model = LoraModel.from_pretrained(model, serve_dirs["beta"])
    ids = torch.tensor([tok(PROMPTS["completion"])["input_ids"]])
    torch.manual_seed(7)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=True,
                             temperature=0.9, top_p=0.95, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert alone == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_load_and_unload_at_run_time(server, serve_dirs, reference):
    from transformers import AutoTokenizer

    client, http = server.client(), server.http()
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": "gamma"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "loaded"
    try:
        assert [m.id for m in client.models.list().data] == [BASE_NAME, "alpha", "beta", "gamma"]
        text, _ = ask(client, "gamma", "completion", PROMPTS["completion"], 16)
        assert text == reference(PROMPTS["completion"], "gamma", max_tokens=16)
        # chat uses the template saved with the adapter, not the base's
        tok = AutoTokenizer.from_pretrained(serve_dirs["model"])
        msgs = [{"role": "user", "content": PROMPTS["chat"]}]
        own = tok.apply_chat_template(msgs, chat_template=OWN_TEMPLATE, add_generation_prompt=True, tokenize=True)
        own = own["input_ids"] if hasattr(own, "keys") else own
        _, reply = ask(client, "gamma", "chat", PROMPTS["chat"], 4)
        assert reply.usage.prompt_tokens == len(own)
        assert ask(client, "alpha", "chat", PROMPTS["chat"], 4)[1].usage.prompt_tokens != len(own)
    finally:
        r = http.post("/v1/unload_lora_adapter", json={"lora_name": "gamma"})
    assert r.status_code == 200 and r.json()["status"] == "unloaded"
    assert [m.id for m in client.models.list().data] == [BASE_NAME, "alpha", "beta"]
    # the others serve as before, and the name can be used again
    assert ask(client, "alpha", "completion", PROMPTS["completion"], 8)[0] == \
        reference(PROMPTS["completion"], "alpha", max_tokens=8)
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "gamma2",
                                                     "lora_path": str(serve_dirs["gamma"])}).status_code == 200
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "gamma2"}).status_code == 200


def test_unload_waits_for_the_requests_using_the_adapter(server, serve_dirs):
    """An unload that arrives while a request decodes on the adapter lets it finish, then removes it."""
    http = server.http()
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "busy", "lora_path": "gamma"}).status_code == 200
    client = server.client()
    with ThreadPoolExecutor(2) as pool:
        with paused(server.engine):
            reply = pool.submit(ask, client, "busy", "completion", PROMPTS["completion"], 40)
            wait_for(lambda: server.engine.stats()["waiting"] == 1, what="the request to queue")
            unload = pool.submit(http.post, "/v1/unload_lora_adapter", json={"lora_name": "busy"})
            wait_for(lambda: len(server.engine._commands) == 2, what="the unload to queue")
        assert unload.result().status_code == 200
        text, r = reply.result()
    assert r.usage.completion_tokens > 0 and text
    assert "busy" not in [m.id for m in client.models.list().data]
