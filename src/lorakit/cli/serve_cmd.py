"""lorakit serve --model M [--adapter NAME=DIR ...]: an OpenAI-compatible server for the base and its adapters."""

from __future__ import annotations

import argparse
import os
import re
import sys

from lorakit.cli.common import add_model_args

HELP = "serve a base model and its adapters over an OpenAI-compatible HTTP API"
DESCRIPTION = """Serve one base model and any number of LoRA adapters over the OpenAI HTTP API
(GET /v1/models, POST /v1/chat/completions, POST /v1/completions, streaming included). A request's
`model` field picks the adapter by name, or the base by the base's name; requests that run at the
same time are decoded together in one batch, each row through its own adapter.

Adapters can be added and removed while serving (POST /v1/load_lora_adapter {"lora_name", "lora_path"},
POST /v1/unload_lora_adapter {"lora_name"}), but only from folders under --adapter-root.

Safe by default: listens on 127.0.0.1 (this machine) unless --host says otherwise; with --api-key (or
LORAKIT_API_KEY) every endpoint but /health needs `Authorization: Bearer KEY`.

examples:
  lorakit serve --model embedded --adapter demo=outputs/demo/adapter
  lorakit serve --model embedded --adapter-root outputs --api-key "$(openssl rand -hex 16)" --port 8001
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "demo", "messages": [{"role": "user", "content": "my card was charged twice"}]}'"""

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lorakit.serve.limits import ServeLimits

    add_model_args(p, adapter=False)
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve the adapter in DIR under the name NAME (repeatable).")
    p.add_argument("--served-model-name", help="the base model's name in requests (default: the --model value).")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every network).")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000).")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on every endpoint but /health (default: the "
                        "LORAKIT_API_KEY environment variable; unset: no key).")
    p.add_argument("--adapter-root", help="allow run-time adapter loads from folders under this one (default: "
                                          "run-time loading is off).")
    limits = ServeLimits()
    for field, what in (("max_tokens", "most tokens one request may generate"),
                        ("max_prompt_tokens", "most prompt tokens"),
                        ("max_queue", "requests that may wait for a row (more: 429)"),
                        ("max_batch", "rows decoded together"),
                        ("max_body_bytes", "largest request body in bytes (more: 413)")):
        p.add_argument("--" + field.replace("_", "-"), type=int, default=getattr(limits, field),
                       help=f"{what} (default {getattr(limits, field)}).")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log detail (default info; debug also logs every request).")


def parse_adapters(specs: list[str]) -> tuple[tuple[str, str], ...]:
    """``NAME=DIR`` pairs, each name valid and used once, each folder a readable adapter."""
    from lorakit.cli.common import read_adapter_config
    from lorakit.errors import AdapterLoadError, ConfigError

    out: dict[str, str] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise ConfigError(f"--adapter {spec!r}: write NAME=DIR, e.g. --adapter demo=outputs/demo/adapter "
                              f"(NAME is what requests put in `model`)")
        if not _NAME_RE.match(name) or name == "__base__":
            raise ConfigError(f"--adapter {spec!r}: the name {name!r} may hold only letters, digits, '_' and '-'")
        if name in out:
            raise ConfigError(f"--adapter: the name {name!r} is given twice; give each adapter its own name")
        read_adapter_config(folder)
        if not any(os.path.isfile(os.path.join(folder, f)) for f in ("adapter_model.safetensors",
                                                                      "adapter_model.bin")):
            raise AdapterLoadError(f"no adapter weights in {folder}: expected adapter_model.safetensors")
        out[name] = folder
    return tuple(out.items())


def settings_from_args(args: argparse.Namespace):
    """ServeSettings from the command line, every input checked before anything loads."""
    from lorakit.cli.common import check_device, check_model_source
    from lorakit.errors import ConfigError
    from lorakit.serve.limits import ServeLimits
    from lorakit.serve.server import ServeSettings

    adapters = parse_adapters(args.adapter)
    if not args.model:
        raise ConfigError("no model given: pass --model NAME_OR_PATH (a local folder, a cached hub id, or "
                          "`embedded`)")
    check_model_source(args.model)
    if args.device:
        check_device(args.device)
    if args.precision is not None:
        from lorakit.models.precision import check_precision_option

        args.precision = check_precision_option(args.precision)
    name = args.served_model_name or args.model
    if name in dict(adapters):
        raise ConfigError(f"the base model is served as {name!r}, which is also an adapter's name; rename the "
                          f"adapter or pass --served-model-name")
    if args.adapter_root is not None and not os.path.isdir(args.adapter_root):
        raise ConfigError(f"--adapter-root {args.adapter_root} is not a folder; pass the folder that holds the "
                          f"adapters clients may load")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be from 0 to 65535, got {args.port}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("LORAKIT_API_KEY")
    if api_key is not None and not api_key.strip():
        raise ConfigError("the API key is empty; pass a non-empty --api-key (or unset LORAKIT_API_KEY for none)")
    limits = ServeLimits(max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                         max_queue=args.max_queue, max_batch=args.max_batch, max_body_bytes=args.max_body_bytes)
    return ServeSettings(model_name=name, adapters=adapters, adapter_root=args.adapter_root, api_key=api_key,
                         limits=limits)


def run(args: argparse.Namespace) -> int:
    import logging

    from lorakit.errors import ModelLoadError
    from lorakit.serve.server import Server, bind

    settings = settings_from_args(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print(f"lorakit serve: warning: listening on {args.host} without an API key: anyone who can reach this "
              f"machine can use the model; pass --api-key", file=sys.stderr)
    sock = bind(args.host, args.port)

    def load():
        from lorakit.cli.common import load_dtype, load_model_checked, pick_device

        device = pick_device(args.device)
        return load_model_checked(args.model, dtype=load_dtype(args, args.model, device, "generate"), device=device,
                                  trust_remote_code=args.trust_remote_code)

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s: %(message)s")
    server = Server(settings, load)
    host, port = sock.getsockname()[:2]
    names = ", ".join(n for n, _ in settings.adapters) or "none yet"
    print(f"lorakit serve: http://{host}:{port}/v1  base {settings.model_name!r}, adapters: {names}; "
          f"loading the model (GET /health answers 503 until it is ready)", file=sys.stderr, flush=True)
    server.serve(sock, log_level=args.log_level)
    if server.engine.failure:
        raise ModelLoadError(f"the server stopped: {server.engine.failure}")
    return 0
