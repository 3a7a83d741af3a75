"""Chat templates written after real models' (trimmed to the parts that shape the text), and a tokenizer that
knows their special tokens, for the multi-turn masking tests."""
import copy

# SmolLM2 / Qwen style ChatML: a default system prompt when the conversation has none
CHATML_DEFAULT_SYSTEM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Meta Llama 3 Instruct: BOS text, headers, trimmed content, <|eot_id|>
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# Llama 3.1 style: a system header with dates always written, the user's system text appended to it
LLAMA31_DEFAULT_SYSTEM = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}{{- 'Cutting Knowledge Date: December 2023\n' }}"
    "{{- 'Today Date: 26 Jul 2024\n\n' }}{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")

# Gemma 3: role "model", the system text folded into the first user turn
GEMMA = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}")

# Gemma 1/2: refuses a system turn
GEMMA_NO_SYSTEM = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")

# Mistral Instruct v0.1: [INST] ... [/INST], the reply followed by </s>, no generation prompt at all
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

# Mistral v0.3 style: the system text goes into the *last* user turn, so renderings of a conversation's
# beginnings are not prefixes of the whole (the masking's fallback path)
MISTRAL_SYSTEM_LAST = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}")

# name -> (template, end-of-turn marker after each reply, bos text, eos text)
TEMPLATES = {
    "chatml_default_system": (CHATML_DEFAULT_SYSTEM, "<|im_end|>", None, "<|im_end|>"),
    "llama3": (LLAMA3, "<|eot_id|>", "<|begin_of_text|>", "<|eot_id|>"),
    "llama31_default_system": (LLAMA31_DEFAULT_SYSTEM, "<|eot_id|>", "<|begin_of_text|>", "<|eot_id|>"),
    "gemma": (GEMMA, "<end_of_turn>", "<bos>", "<eos>"),
    "mistral": (MISTRAL, "</s>", "<s>", "</s>"),
    "mistral_system_last": (MISTRAL_SYSTEM_LAST, "</s>", "<s>", "</s>"),
}
SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<bos>", "<eos>",
           "<start_of_turn>", "<end_of_turn>", "<s>", "</s>", "[INST]", "[/INST]"]


def with_template(tokenizer, template, bos=None, eos=None):
    """A copy of ``tokenizer`` with ``template`` as its chat template and the templates' markers as
    single special tokens; ``bos`` / ``eos``: the token texts the template reads as bos_token / eos_token."""
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    tok.chat_template = template
    if bos is not None:
        tok.bos_token = bos
    if eos is not None:
        tok.eos_token = eos
    return tok


def reference_labels(tokenizer, text, messages, eot):
    """The expected labels, found another way than lorakit's: every user and assistant message's text looked
    up in order in the rendering (system text is skipped: templates move it), each assistant reply's span
    running over the end-of-turn marker ``eot`` that must follow it; tokens overlapping a span keep their id."""
    spans, cursor = [], 0
    for m in messages:
        if m["role"] == "system":
            continue
        content = m["content"].strip()
        start = text.index(content, cursor)
        end = start + len(content)
        if m["role"] == "assistant":
            assert text.startswith(eot, end), (text[end:end + 20], eot)
            end += len(eot)
            if m.get("weight", 1):
                spans.append((start, end))
        cursor = end
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [i if any(a < e and b > s for s, e in spans) else -100
                              for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]
