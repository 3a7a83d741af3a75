"""lorakit generate --model M [--adapter DIR] --prompt TEXT"""

from __future__ import annotations

import argparse
import sys

from lorakit.cli.common import add_model_args, add_sampling_args

HELP = "generate a completion for a prompt"
DESCRIPTION = """Generate text from a base model, optionally with an adapter.

The prompt is sent as is (plain completion), or wrapped in the model's chat template with --chat.
Prompts come from --prompt, positional arguments, or stdin (`-`).

examples:
  lorakit generate --model embedded --adapter outputs/demo/adapter --prompt "Ticket : my card was charged twice Label : "
  lorakit generate --model embedded --chat --prompt "Name three colours." """


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable).")
    p.add_argument("prompts", nargs="*", help="more prompts; `-` reads one prompt from stdin.")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn in the chat template.")
    p.add_argument("--system", help="system message (with --chat).")
    add_sampling_args(p, max_new_tokens=64)


def run(args: argparse.Namespace) -> int:
    from lorakit.errors import ConfigError

    if "-" in args.prompts:
        from lorakit.cli.common import tolerant_stdin

        tolerant_stdin()
    prompts = list(args.prompt) + [sys.stdin.read() if x == "-" else x for x in args.prompts]
    if not prompts:
        raise ConfigError("no prompt given: pass --prompt TEXT (or TEXT, or - for stdin)")
    for i, prompt in enumerate(prompts):
        if not prompt:
            which = f"prompt {i + 1}" if len(prompts) > 1 else "the prompt"
            raise ConfigError(f"{which} is empty; give the text to complete, e.g. --prompt \"Ticket : my card was "
                              f"charged twice Label : \"")
    from lorakit.cli.common import check_sampling_args

    check_sampling_args(args)
    if args.system is not None and not args.chat:
        raise ConfigError("--system only applies with --chat (a plain completion has no system message); add "
                          "--chat, or write the instructions into the prompt")
    import torch

    from lorakit.cli.common import generate_text, load_model

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args, workload="generate")
    for i, prompt in enumerate(prompts):
        if args.chat:
            from lorakit.cli.chat_cmd import chat_ids

            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            ids = chat_ids(tokenizer, messages + [{"role": "user", "content": prompt}])
        else:
            ids = tokenizer(prompt)["input_ids"]
            if not ids:
                raise ConfigError(f"prompt {prompt!r} encodes to no tokens (the tokenizer adds no BOS token); "
                                  f"give some text to complete")
        text = generate_text(model, tokenizer, ids, args.max_new_tokens, args.temperature, args.top_p)
        if len(prompts) > 1:
            print(f"### prompt {i + 1}: {prompt}")
        print(text)
    return 0
