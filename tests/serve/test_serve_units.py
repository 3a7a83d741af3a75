"""The server's parts on their own: the batch cache (rows joining and leaving between steps decode exactly
as each would alone), stop sequences and streamable text, request parsing."""
from __future__ import annotations

import pytest
import torch

from lorakit.serve.errors import ApiError
from lorakit.serve.limits import ServeLimits
from lorakit.serve.protocol import parse_request
from lorakit.serve.sampling import TextTracker

STEPS = 12


TARGETS = {"tiny_llama": (["q_proj", "v_proj"], ["q_proj", "v_proj", "down_proj"]),
           "tiny_gpt2": (["c_attn"], ["c_attn", "c_fc"]),
           "tiny_bloom": (["query_key_value"], ["query_key_value", "dense_4h_to_h"])}


def _lora_model(family: str):
    import tiny
    from tiny import randomize_lora

    from lorakit import LoraConfig, get_peft_model

    first, second = TARGETS[family]
    model = get_peft_model(getattr(tiny, family)(), LoraConfig(r=4, lora_alpha=8, target_modules=first), "a")
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=second))
    randomize_lora(model, seed=5)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data *= 10  # adapters that change the greedy path
    return model.eval()


def _alone(model, prompt: list[int], name: str) -> list[int]:
    ids = torch.tensor([prompt])
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, do_sample=False,
              eos_token_id=None, pad_token_id=0)
    if name == "__base__":
        with model.disable_adapter():
            out = model.generate(**kw)
    else:
        model.set_adapter(name)
        out = model.generate(**kw)
    return out[0, len(prompt):].tolist()


def _together(model, prompts, names, join_at) -> list[list[int]]:
    """Decode the rows in one batch, row i joining at step join_at[i] and leaving after STEPS tokens."""
    from lorakit.layers.routing import adapter_rows
    from lorakit.serve.kvcache import BatchCache, cache_kwarg, logits_kwarg, new_cache

    lm = model.model
    keys = {"use_cache": True}
    if logits_kwarg(lm):
        keys[logits_kwarg(lm)] = 1
    batch, active, out = BatchCache(), [], [[] for _ in prompts]
    with torch.no_grad():
        for step in range(3 * STEPS):
            for i in [i for i, s in enumerate(join_at) if s == step]:
                cache, ids = new_cache(), torch.tensor([prompts[i]])
                with adapter_rows([names[i]]):
                    logits = lm(input_ids=ids, attention_mask=torch.ones_like(ids), **{cache_kwarg(lm): cache},
                                **keys).logits
                out[i].append(int(logits[0, -1].argmax()))
                batch.add_row(cache, len(prompts[i]))
                active.append(i)
            if not active:
                continue
            inputs = batch.step_inputs()
            with adapter_rows([names[i] for i in active]):
                logits = lm(input_ids=torch.tensor([[out[i][-1]] for i in active]), **inputs,
                            **{cache_kwarg(lm): batch.cache}, **keys).logits
            batch.advance(inputs["attention_mask"])
            for row, i in enumerate(active):
                out[i].append(int(logits[row, -1].argmax()))
            keep = [row for row, i in enumerate(active) if len(out[i]) < STEPS]
            batch.keep_rows(keep)
            active = [active[row] for row in keep]
    return out


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_rows_joining_and_leaving_decode_as_alone(family):
    model = _lora_model(family)
    prompts = [[1, 5, 9, 13], [1, 7, 7, 7, 7, 7, 8, 2, 3], [1, 50], [1, 4, 4, 22, 33, 44], [9, 9, 9]]
    names = ["a", "__base__", "b", "a", "b"]
    join_at = [0, 0, 3, 7, 15]  # the last joins after the first ones have left (the batch shrank to one row)
    alone = [_alone(model, p, n) for p, n in zip(prompts, names)]
    assert len({tuple(a) for a in alone[:3]}) == 3, "the adapters must change the tokens"
    assert _together(model, prompts, names, join_at) == alone


def test_text_tracker_holds_back_what_may_become_a_stop():
    t = TextTracker(("END", "##"))
    assert t.update("Hello E") == "Hello "      # "E" may start "END"
    assert t.update("Hello EN") == ""
    assert t.update("Hello ENX") == "ENX"       # it did not
    assert t.update("Hello ENX #") == " "
    assert t.update("Hello ENX ## more") == "" and t.stopped and t.text == "Hello ENX "
    p = TextTracker(())
    assert p.update("caf\ufffd") == "caf"       # a character whose bytes are not all there yet
    assert p.update("café") == "é" and p.finish() == ""
    assert TextTracker(("x",)).update("x at once") == ""


LIMITS = ServeLimits(max_tokens=50)


def test_requests_parse_with_openai_defaults():
    chat = parse_request("chat", {"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]}, LIMITS)
    assert chat.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"})
    assert chat.sampling.temperature == 1.0 and chat.sampling.top_p == 1.0 and chat.sampling.max_tokens == 50
    done = parse_request("completion", {"model": "m", "prompt": ["text"], "stop": "\n", "max_completion_tokens": 5,
                                        "user": "ignored", "temperature": 0}, LIMITS)
    assert done.prompt == "text" and done.sampling.stop == ("\n",) and done.sampling.max_tokens == 5
    assert done.sampling.greedy and not done.stream
    assert parse_request("completion", {"model": "m", "prompt": [1, 2]}, LIMITS).sampling.max_tokens == 16
    streamed = parse_request("completion", {"model": "m", "prompt": "x", "stream": True,
                                            "stream_options": {"include_usage": True}}, LIMITS)
    assert streamed.stream and streamed.include_usage


@pytest.mark.parametrize("body", [[], {"model": "m", "messages": []}, {"model": "m", "messages": ["hi"]},
                                  {"model": "m", "messages": [{"role": "user", "content": None}]},
                                  {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": True},
                                  {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                   "response_format": {"type": "json_object"}},
                                  {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": float("nan")}])
def test_bad_bodies_are_refused(body):
    with pytest.raises(ApiError) as e:
        parse_request("chat", body, LIMITS)
    assert e.value.status == 400 and e.value.body()["error"]["message"]


def test_limits_are_checked():
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match="--max-queue"):
        ServeLimits(max_queue=0)
