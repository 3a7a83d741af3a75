"""The `lorakit export --to ollama` folder of a chat adapter, played the way Ollama plays it, vs lorakit chat.

    python benchmarks/export_ollama_chat.py [--adapter outputs/chat_sft/adapter] [--n 12]

Exports the adapter with --to ollama, then for the first N held-out conversations of the chat demo data (cut
before an assistant reply): renders the prompt from the Modelfile's TEMPLATE and SYSTEM as Ollama would
(lorakit.export.ollama_template.render, the Python mirror of the Go template that tests/export check against
a Go-template interpreter), tokenizes it with llama.cpp's tokenizer of base.gguf, and greedily generates with
base.gguf + adapter.gguf until a PARAMETER stop; lorakit generates greedily from the same conversation
rendered by transformers with the adapter's chat template. Prints how many replies are identical.
Ollama itself is not run. Needs llama-cpp-python (pip install 'lorakit[gguf-check]').
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from importlib.resources import files
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


_SHAREGPT = {"system": "system", "human": "user", "gpt": "assistant"}


def conversations(n: int) -> list[list[dict]]:
    """Held-out chats cut before their last assistant reply."""
    out = []
    for line in files("lorakit.data.builtin").joinpath("chat_test.jsonl").read_text().splitlines()[:n]:
        record = json.loads(line)
        messages = record.get("messages") or [{"role": _SHAREGPT[t["from"]], "content": t["value"]}
                                              for t in record["conversations"]]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        out.append(messages[:last])
    return out


def ollama_reply(cpp, translation, messages, max_new: int, eos: int) -> str:
    from lorakit.export.ollama_template import render

    prompt = render(translation.format, messages, translation.system)
    new = cpp.greedy(cpp.tokenize(prompt), max_new, eos=eos)
    text = cpp.llm.detokenize(new).decode("utf-8", errors="replace")
    cut = min((text.find(s) for s in translation.stops if s in text), default=len(text))
    return text[:cut].strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", default="outputs/chat_sft/adapter")
    p.add_argument("--n", type=int, default=12)
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args()
    print(f"$ python {' '.join(sys.argv)}")
    from transformers import AutoTokenizer

    from lorakit import LoraModel
    from lorakit.cli.common import generate_text
    from lorakit.cli.main import main as lorakit
    from lorakit.export.llama_cpp import LlamaCppModel
    from lorakit.export.ollama_template import translate
    from lorakit.models import load_model_and_tokenizer

    out = Path(tempfile.mkdtemp(prefix="lorakit-ollama-")) / "ollama"
    if lorakit(["export", "--adapter", args.adapter, "--to", "ollama", "--out", str(out)]):
        sys.exit("export failed")
    print((out / "Modelfile").read_text())
    model, _ = load_model_and_tokenizer("embedded", dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(args.adapter if (Path(args.adapter) / "tokenizer.json").is_file()
                                              else model.name_or_path)
    tokenizer.chat_template = (Path(args.adapter) / "chat_template.jinja").read_text()
    translation = translate(tokenizer.chat_template, tokenizer)
    lora = LoraModel.from_pretrained(model, args.adapter).eval()
    cpp = LlamaCppModel(out / "base.gguf", out / "adapter.gguf", n_ctx=1024)
    same = 0
    for messages in conversations(args.n):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        ours = generate_text(lora, tokenizer, ids, args.max_new_tokens, 0.0, 1.0).strip()
        theirs = ollama_reply(cpp, translation, messages, args.max_new_tokens, tokenizer.eos_token_id)
        same += ours == theirs
        print(f"- user: {messages[-1]['content']}\n  lorakit: {ours}\n  ollama folder in llama.cpp: {theirs}")
    cpp.close()
    print(f"\nidentical replies: {same} of {args.n} (the folder's base.gguf is the Q4_1 file, which llama.cpp runs "
          f"with quantised activations; lorakit runs its dequantised weights in float32)")


if __name__ == "__main__":
    main()
