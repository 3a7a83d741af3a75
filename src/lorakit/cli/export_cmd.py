"""lorakit export --adapter DIR --to gguf|gguf-merged|ollama --out PATH [--model M] [--outtype f32|f16|q8_0]"""

from __future__ import annotations

import argparse

HELP = "write an adapter or a merged model for llama.cpp (GGUF) or Ollama"
DESCRIPTION = """Export for runtimes that do not read PEFT folders.

  --to gguf          the adapter as a GGUF LoRA adapter: llama.cpp's `--lora FILE`, llama-cpp-python's
                     lora_path=FILE, on the base model's GGUF. --out FILE.gguf (default encoding f32)
  --to gguf-merged   the adapter merged into the base, one GGUF model file llama.cpp runs alone, with the
                     tokenizer and the chat template. --out FILE.gguf (default f16)
  --to ollama        a folder with base.gguf + adapter.gguf (or, with --merged, model.gguf) and a Modelfile
                     whose TEMPLATE is the chat template translated for Ollama. --out FOLDER

Scales llama.cpp does not know (rsLoRA, alpha_pattern) are folded into the adapter's B so the delta is the
same. What a llama.cpp adapter cannot hold (modules_to_save, trained biases, a head tied to the embedding)
is refused; export the merged model instead. Llama-family models (Llama, Mistral, SmolLM) are supported.
Files are written under a temporary name and renamed when complete; an existing --out needs --overwrite.

examples:
  lorakit export --adapter outputs/demo/adapter --to gguf --out demo-lora.gguf
  lorakit export --adapter outputs/chat/adapter --to ollama --out ollama-chat
  lorakit export --model embedded --adapter outputs/demo/adapter --to gguf-merged --out demo.gguf --outtype q8_0"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lorakit.export.run import TARGETS
    from lorakit.export.tensors import OUTTYPES

    p.add_argument("--model", help="the base model: local folder, cached hub id, or `embedded` (default: the "
                                   "adapter's base_model_name_or_path).")
    p.add_argument("--adapter", help="the PEFT-format adapter folder to export.")
    p.add_argument("--to", required=True, choices=TARGETS, help="what to write (see above).")
    p.add_argument("--out", required=True, help="the .gguf file (gguf, gguf-merged) or the folder (ollama).")
    p.add_argument("--outtype", choices=OUTTYPES, help="tensor encoding (default f32 for gguf, f16 otherwise).")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new one is complete.")
    p.add_argument("--merged", action="store_true", help="--to ollama: one merged model.gguf instead of "
                                                         "base.gguf + adapter.gguf.")
    p.add_argument("--no-template", action="store_true", help="--to ollama: write no TEMPLATE (Ollama picks one).")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code from the hub.")


def run(args: argparse.Namespace) -> int:
    from lorakit.cli.common import check_model_inputs
    from lorakit.errors import ConfigError
    from lorakit.export import run as export

    if not args.out.strip():
        raise ConfigError("--out is empty; give the file (gguf, gguf-merged) or folder (ollama) to write")
    if args.to != "ollama" and (args.merged or args.no_template):
        raise ConfigError("--merged and --no-template apply to --to ollama only; drop them")
    if args.to in ("gguf", "ollama") and not args.adapter and not args.merged:
        raise ConfigError(f"--to {args.to} exports an adapter: pass --adapter DIR")
    args.device = None
    model = check_model_inputs(args)
    req = export.ExportRequest(model=model, adapter=args.adapter, to=args.to, out=args.out, outtype=args.outtype,
                               overwrite=args.overwrite, merged=args.merged, template=not args.no_template,
                               trust_remote_code=args.trust_remote_code)
    step = {"gguf": export.to_gguf, "gguf-merged": export.to_gguf_merged, "ollama": export.to_ollama}[args.to]
    step(req, print)
    return 0
