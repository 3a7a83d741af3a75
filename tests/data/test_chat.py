"""Multi-turn chat data: the loss on every assistant reply (its end-of-turn marker included) and nowhere else,
for several real templates, checked token by token against an independent location of the replies."""
import logging

import pytest

from lorakit.data import get_template, tokenize_records
from lorakit.data.chat import assistant_spans
from lorakit.data.conversations import Turn
from lorakit.errors import DataError

from .chat_templates import TEMPLATES, reference_labels, with_template

SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
TALK = [
    {"role": "user", "content": "Is the shop open on Sunday?"},
    {"role": "assistant", "content": "Yes, from ten to four."},
    {"role": "user", "content": "Yes"},  # the same words as a reply: locating by text alone could be fooled
    {"role": "assistant", "content": "Yes"},
    {"role": "user", "content": "And on Monday?"},
    {"role": "assistant", "content": "On Monday it opens at nine."},
]
CHAT = get_template("chat")


def runs(tokenizer, example):
    """The labelled stretches of an example, decoded."""
    out, cur = [], []
    for i, lab in zip(example["input_ids"], example["labels"]):
        if lab != -100:
            cur.append(i)
        elif cur:
            out.append(tokenizer.decode(cur))
            cur = []
    return out + ([tokenizer.decode(cur)] if cur else [])


# every template with and without a system turn, but Mistral v0.1's, which refuses one
CASES = [(name, system) for name in sorted(TEMPLATES) for system in (True, False)
         if (name, system) != ("mistral", True)]


@pytest.mark.parametrize("name,with_system", CASES)
def test_masks_match_an_independent_location_of_the_replies(tokenizer, name, with_system):
    template, eot, bos, eos = TEMPLATES[name]
    tok = with_template(tokenizer, template, bos, eos)
    messages = ([SYSTEM] if with_system else []) + TALK
    ex = tokenize_records([{"messages": messages}], CHAT, tok, 1024)[0]
    text = tok.apply_chat_template(messages, tokenize=False)
    ids, labels = reference_labels(tok, text, messages, eot)
    assert ex["input_ids"] == ids  # the whole rendering, tokenised as one text, nothing added
    assert ex["labels"] == labels  # token by token
    # (a template that writes ' ' + reply makes " Yes" one token: it straddles the reply's edge and is the reply's)
    assert [r.lstrip() for r in runs(tok, ex)] == [m["content"] + eot for m in TALK if m["role"] == "assistant"]
    assert tok.convert_tokens_to_ids(eot) in ex["labels"]  # the model learns to stop


def test_the_default_system_prompt_is_masked(tokenizer):
    tok = with_template(tokenizer, TEMPLATES["chatml_default_system"][0])
    ex = tokenize_records([{"messages": TALK[:2]}], CHAT, tok, 256)[0]
    text = tok.decode(ex["input_ids"])
    assert "named SmolLM" in text and runs(tok, ex) == ["Yes, from ten to four.<|im_end|>"]


def test_trimmed_content_and_a_bos_the_tokenizer_adds(tokenizer):
    """Llama 3 trims each message: the reply's span is the text the template wrote. A tokenizer that adds BOS by
    itself does not get a second one in front of the template's."""
    from tokenizers.processors import TemplateProcessing

    tok = with_template(tokenizer, TEMPLATES["llama3"][0], "<|begin_of_text|>", "<|eot_id|>")
    bos_id = tok.convert_tokens_to_ids("<|begin_of_text|>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos_id)])
    messages = [{"role": "user", "content": "  hi  "}, {"role": "assistant", "content": "\n hello there \n"}]
    ex = tokenize_records([{"messages": messages}], CHAT, tok, 256)[0]
    assert ex["input_ids"].count(bos_id) == 1 and ex["input_ids"][0] == bos_id
    assert runs(tok, ex) == ["hello there<|eot_id|>"]


def test_sharegpt_and_openai_give_the_same_examples(tokenizer):
    sharegpt = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                for m in [SYSTEM] + TALK]
    a = tokenize_records([{"messages": [SYSTEM] + TALK}], CHAT, tokenizer, 512)
    b = tokenize_records([{"id": 7, "conversations": sharegpt}], CHAT, tokenizer, 512)
    assert a.examples == b.examples


def test_weight_zero_reply_carries_no_loss(tokenizer):
    messages = [dict(m) for m in TALK]
    messages[1]["weight"] = 0
    ex = tokenize_records([{"messages": messages}], CHAT, tokenizer, 512)[0]
    assert runs(tokenizer, ex) == ["Yes<|im_end|>", "On Monday it opens at nine.<|im_end|>"]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert ex["labels"] == reference_labels(tokenizer, text, messages, "<|im_end|>")[1]


def test_the_templates_system_option_and_a_trailing_question(tokenizer):
    """A last user turn with no reply is left out; `system` is used when the conversation has none."""
    ex = tokenize_records([{"messages": TALK[:3]}], get_template("chat", system="Be kind."), tokenizer, 256)[0]
    text = tokenizer.decode(ex["input_ids"])
    assert text.startswith("<|im_start|>system\nBe kind.<|im_end|>") and text.endswith("four.<|im_end|>\n")


def test_render_gives_the_prompt_before_the_last_reply(tokenizer):
    prompt, answer = CHAT.render({"messages": TALK}, tokenizer)
    assert answer == "On Monday it opens at nine."
    assert prompt == tokenizer.apply_chat_template(TALK[:-1], tokenize=False, add_generation_prompt=True)
    prompt, answer = CHAT.render({"messages": TALK[:1]}, tokenizer)  # nothing answered yet: all of it is prompt
    assert answer == "" and prompt.endswith("Sunday?<|im_end|>\n<|im_start|>assistant\n")


def test_spans_fall_back_when_renderings_are_not_prefixes(tokenizer):
    template, eot, bos, eos = TEMPLATES["mistral_system_last"]
    tok = with_template(tokenizer, template, bos, eos)
    turns = [Turn(m["role"], m["content"]) for m in [SYSTEM] + TALK]
    before = tok.apply_chat_template([t.message() for t in turns[:2]], tokenize=False, add_generation_prompt=True)
    full, spans = assistant_spans(tok, turns)
    assert not full.startswith(before)  # the system text moved: the prefix path cannot be used
    assert [full[a:b] for a, b in spans] == [t.content + eot for t in turns if t.role == "assistant"]


def test_a_template_that_refuses_the_conversation_names_the_record(tokenizer, tmp_path):
    from lorakit.data import load_records

    from .chat_templates import GEMMA_NO_SYSTEM

    tok = with_template(tokenizer, GEMMA_NO_SYSTEM, "<bos>", "<eos>")
    path = tmp_path / "c.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                    '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, '
                    '{"role": "assistant", "content": "b"}]}\n')
    with pytest.raises(DataError, match=r"c.jsonl line 2: .*System role not supported"):
        tokenize_records(load_records(path), CHAT, tok, 256)


def test_a_tokenizer_without_chat_template_is_an_error(tokenizer):
    tok = with_template(tokenizer, None)
    with pytest.raises(DataError, match="has none"):
        tokenize_records([{"messages": TALK}], CHAT, tok, 256)


# ---------------------------------------------------------------- too long: whole exchanges cut from the start

def test_too_long_cuts_whole_exchanges_keeps_the_system_turn_and_says_so_once(tokenizer, caplog):
    full = tokenize_records([{"messages": [SYSTEM] + TALK}], CHAT, tokenizer, 1024)[0]
    without_first = tokenize_records([{"messages": [SYSTEM] + TALK[2:]}], CHAT, tokenizer, 1024)[0]
    last_only = tokenize_records([{"messages": [SYSTEM] + TALK[4:]}], CHAT, tokenizer, 1024)[0]
    limit = len(without_first["input_ids"])
    assert len(last_only["input_ids"]) < limit < len(full["input_ids"])
    recs = [{"messages": [SYSTEM] + TALK}] * 3 + [{"messages": [SYSTEM] + TALK[4:]}]
    with caplog.at_level(logging.WARNING, logger="lorakit.data.chat"):
        data = tokenize_records(recs, CHAT, tokenizer, limit, name="train")
    assert [ex == without_first for ex in data] == [True, True, True, False]
    assert data[3] == last_only and (data.n_truncated, data.n_turns_cut, data.n_dropped) == (3, 3, 0)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "3 of 4 conversations" in warnings[0] and "3 user/assistant" in warnings[0]


def test_a_conversation_whose_last_exchange_cannot_fit_is_dropped(tokenizer, caplog):
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    long_reply = {"messages": TALK[:1] + [{"role": "assistant", "content": "word " * 80}]}
    with caplog.at_level(logging.WARNING, logger="lorakit.data.chat"):
        data = tokenize_records([short, long_reply], CHAT, tokenizer, 64)
    assert len(data) == 1 and data.dropped == [1] and data.n_empty == 0
    assert "1 dropped" in caplog.text and "record 1" in caplog.text
    with pytest.raises(DataError, match="all 1 conversations were dropped"):
        tokenize_records([long_reply], CHAT, tokenizer, 64)
