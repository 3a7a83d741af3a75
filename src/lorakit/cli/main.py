"""`lorakit` entry point: argparse with one sub-parser per command, lazily run."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from lorakit.cli import (chat_cmd, demo_cmd, eval_cmd, export_cmd, generate_cmd, inspect_cmd, merge_cmd,
                         serve_cmd, train_cmd)

COMMANDS = {
    "train": train_cmd,
    "eval": eval_cmd,
    "generate": generate_cmd,
    "chat": chat_cmd,
    "merge": merge_cmd,
    "export": export_cmd,
    "inspect": inspect_cmd,
    "demo": demo_cmd,
    "serve": serve_cmd,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit", description="LoRA fine-tuning for transformer language models.",
        epilog="Run `lorakit COMMAND --help` for the options of each command. Model names: a local folder, "
               "a hub id (offline: must be cached), or `embedded` (the bundled SmolLM2-135M-Instruct).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def describe_os_error(e: OSError) -> str:
    """``"<reason>: <path>"`` for an OSError, with a hint for the common causes."""
    import errno

    if e.filename is None or not e.strerror:
        return str(e)
    where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    hint = {errno.EACCES: "choose a path you can write to, or fix its permissions",
            errno.EPERM: "choose a path you can write to, or fix its permissions",
            errno.EROFS: "the file system is read-only; choose another path",
            errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
            errno.ENOSPC: "the disk is full; free some space or choose another path",
            errno.ENOENT: "check the path"}.get(e.errno)
    return f"{e.strerror}: {where}" + (f"; {hint}" if hint else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    from lorakit.errors import LoraError, TrainingError

    try:
        return int(args._run(args) or 0)
    except (LoraError, TrainingError) as e:
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # stdout closed early (`lorakit ... | head`): not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        # A file-system failure (permission, disk full, a path through a file, ...): one line naming the path.
        print(f"lorakit {args.command}: error: {describe_os_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last resort: an input no check foresaw, i.e. a lorakit bug
        import os

        if os.environ.get("LORAKIT_DEBUG", "").strip() not in ("", "0"):
            raise
        what = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"lorakit {args.command}: internal error: {type(e).__name__}: {what}. lorakit should have refused this "
              f"input with a clear message; please report it with the command you ran (set LORAKIT_DEBUG=1 to see "
              f"the traceback).", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
