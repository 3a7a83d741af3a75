"""lorakit merge --model M --adapter DIR --out DIR [--overwrite]"""

from __future__ import annotations

import argparse

from lorakit.cli.common import add_model_args

HELP = "fold an adapter into the base weights and save a plain model"
DESCRIPTION = """Merge an adapter into its base model (merge_and_unload) and save the result with the tokenizer.
The output folder loads with transformers' AutoModelForCausalLM.from_pretrained, no lorakit needed.

--out must be a new or empty folder (--overwrite replaces an existing one). The model is written to a
temporary folder next to --out and renamed at the end, so a failed merge leaves nothing half-written.

example:
  lorakit merge --model embedded --adapter outputs/demo/adapter --out outputs/demo/merged"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, precision=False)  # the merged model is written in --dtype (float32 on a CPU)
    p.add_argument("--out", required=True, help="new or empty folder to write the merged model + tokenizer to.")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out when it already holds files (only once the merge has succeeded).")
    p.add_argument("--safe", action="store_true", help="check the merged weights for NaN/inf before saving.")


def _inside(path, folder) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def check_out(args: argparse.Namespace, model_name: str):
    """--out as a resolved Path, or a ConfigError: not writable, a file, non-empty without --overwrite, or
    (even with --overwrite) a folder holding the adapter or the base model, which replacing it would lose."""
    from pathlib import Path

    from lorakit.cli.common import check_output_dir
    from lorakit.errors import ConfigError

    out = check_output_dir(args.out, "--out").resolve()
    keep = [("--adapter", Path(args.adapter).resolve())]
    if model_name and Path(model_name).expanduser().exists():
        keep.append(("--model", Path(model_name).expanduser().resolve()))
    for option, path in keep:
        if _inside(path, out):
            raise ConfigError(f"--out {args.out} holds the {option} folder {path}; writing the merged model there "
                              f"would replace it. Choose a new folder, e.g. --out {out / 'merged'}")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        content = sorted(p.name for p in out.iterdir())
        shown = ", ".join(content[:5]) + (f", ... ({len(content)} entries)" if len(content) > 5 else "")
        raise ConfigError(f"--out {args.out} already holds files ({shown}); choose a new or empty folder, or "
                          f"pass --overwrite to replace it")
    return out


def run(args: argparse.Namespace) -> int:
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from lorakit.errors import ConfigError

    if not args.adapter:
        raise ConfigError("merge needs --adapter DIR (the adapter to fold into --model)")
    from lorakit.cli.common import check_model_inputs, load_model

    args.device = args.device or "cpu"
    name = check_model_inputs(args)
    out = check_out(args, name)
    model, tokenizer = load_model(args)
    merged = model.merge_and_unload(safe_merge=args.safe)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    aside = None  # with --overwrite: the old --out, kept until the new one is in place
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            if any(out.iterdir()):
                aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.replace(out, aside / out.name)
            else:
                out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        if aside is not None and not out.exists() and (aside / out.name).exists():
            os.replace(aside / out.name, out)
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    print(f"merged model written to {out}")
    return 0
