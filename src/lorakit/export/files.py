"""Output files and folders of an export, written atomically and only where the user pointed.

A file is written under a fresh ``tempfile.mkstemp`` name in its own folder and renamed over the target at
the end (``os.replace``), so a crash leaves either the old file or the new one, never half of one. A
folder (``--to ollama``) is built the same way under a ``mkdtemp`` name next to it. An existing target is
replaced only with ``overwrite=True``; a symlink is never written through.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from lorakit.errors import ExportError


def check_out_file(path: str | os.PathLike, overwrite: bool, suffix: str = ".gguf") -> Path:
    """``path`` as an absolute Path when a file may be written there, else ExportError saying why."""
    out = Path(path).expanduser()
    if out.suffix.lower() != suffix:
        raise ExportError(f"--out {path}: the output is a {suffix} file; name it e.g. {out.with_suffix(suffix).name}")
    if out.is_symlink():
        raise ExportError(f"--out {path} is a symbolic link; lorakit does not write through links. Name the "
                          f"real file instead")
    if out.is_dir():
        raise ExportError(f"--out {path} is a folder; name a file inside it, e.g. {out / ('model' + suffix)}")
    if out.exists() and not overwrite:
        raise ExportError(f"--out {path} already exists; choose a new name or pass --overwrite to replace it")
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise ExportError(f"--out {path}: {parent} is a file, so nothing can be written under it")
    return out.resolve() if out.exists() else parent.resolve() / out.name


def check_out_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """``path`` as an absolute Path when a folder may be written there (new, empty, or --overwrite)."""
    out = Path(path).expanduser()
    if out.is_symlink():
        raise ExportError(f"--out {path} is a symbolic link; lorakit does not write through links. Name the "
                          f"real folder instead")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {path} is a file; --to ollama writes a folder. Choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {path} already holds files; choose a new or empty folder, or pass --overwrite "
                          f"to replace it")
    if out.parent.exists() and not out.parent.is_dir():
        raise ExportError(f"--out {path}: {out.parent} is a file, so nothing can be written under it")
    return out.resolve() if out.exists() else out.parent.resolve() / out.name


@contextlib.contextmanager
def atomic_file(out: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``out``; on success it replaces ``out``, on failure it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _make_ordinary(Path(tmp), 0o666)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it becomes ``out`` (an old one is removed only
    once the new one is complete), on failure it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    aside = None
    try:
        yield tmp
        _make_ordinary(tmp, 0o777)
        if out.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, aside / out.name)
        os.replace(tmp, out)
    except BaseException:
        if aside is not None and not out.exists() and (aside / out.name).exists():
            os.replace(aside / out.name, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def _make_ordinary(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp create private entries; the result gets the permissions of an ordinary new one."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def write_gguf(writer, out: Path, progress: bool = True) -> None:
    """Write a filled ``gguf.GGUFWriter`` to ``out`` atomically (header, metadata, tensors)."""
    with atomic_file(out) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=progress)
        finally:
            writer.close()
