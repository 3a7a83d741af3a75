"""lorakit chat --model M [--adapter DIR]: an interactive REPL with the model's chat template."""

from __future__ import annotations

import argparse
import sys

from lorakit.cli.common import add_model_args, add_sampling_args

HELP = "chat with a model (+ adapter) in the terminal"
DESCRIPTION = """Interactive chat using the model's chat template. Reads lines from stdin.

commands:  /exit (or /quit, end of input) leaves; /reset forgets the conversation.

example:
  lorakit chat --model embedded --adapter outputs/run/adapter"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--system", help="system message at the start of the conversation.")
    add_sampling_args(p, max_new_tokens=256)


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    from lorakit.errors import ConfigError

    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("this tokenizer has no chat template; use `lorakit generate` for plain completion, or "
                          "a chat model (e.g. --model embedded)")
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def run(args: argparse.Namespace) -> int:
    import torch

    from lorakit.cli.common import check_sampling_args, generate_text, load_model

    check_sampling_args(args)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args, workload="generate")
    chat_ids(tokenizer, [{"role": "user", "content": "hi"}])  # fail early without a chat template
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    from lorakit.cli.common import tolerant_stdin

    tolerant_stdin()
    interactive = sys.stdin.isatty()
    print("chat: type a message; /reset clears the conversation, /exit leaves.", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        ids = chat_ids(tokenizer, system + history)
        print("assistant> ", end="", flush=True)
        reply = generate_text(model, tokenizer, ids, args.max_new_tokens, args.temperature, args.top_p,
                              stream=interactive)
        if not interactive:
            print(reply.strip(), flush=True)
        history.append({"role": "assistant", "content": reply.strip()})
    return 0
