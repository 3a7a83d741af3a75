"""Every file lorakit writes goes through here: atomic, never through a link, never under a fixed temp name.

A write makes a fresh temp file in the target's own folder (``tempfile.mkstemp``: ``O_CREAT | O_EXCL``,
mode 0600, a random name, so a link planted in advance cannot be followed), fills it, flushes it to disk
and renames it over the target with ``os.replace`` (which replaces a link at the target instead of
writing through it). A crash, a full disk or a read-only folder leaves the old file as it was and no
temp file behind; a reader sees the old file or the new one, never a half-written one.

Folders written by other libraries (``save_pretrained`` of a tokenizer or a model, matplotlib's
``savefig``) are written the same way: into a fresh private temp folder, then moved into place.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["atomic_path", "atomic_paths", "write_to_temp", "atomic_write_bytes", "atomic_write_text",
           "atomic_write_json", "atomic_save_tensors", "atomic_torch_save", "save_safetensors", "atomic_save_pretrained",
           "atomic_savefig", "private_temp_dir", "remove_temp_dirs", "load_plain_tensors", "UnreadableFile",
           "TEMP_PREFIX"]

#: temp files and folders start with this, so a later run can recognise (and remove) leftovers of a killed one
TEMP_PREFIX = ".tmp-"


def _file_mode() -> int:
    """The mode an ordinary ``open(path, 'w')`` would give (mkstemp makes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened / synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a fresh temp file's path next to ``path``; when the block ends without an error, the temp
    file replaces ``path``. On any error (or interrupt) it is removed and ``path`` is unchanged.

    For writers that take a file name (safetensors, torch.save). The temp file exists (empty, created with
    O_EXCL) when the block starts, so nothing else can have put a link there.
    """
    with atomic_paths([path], [suffix]) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(paths: list, suffixes: list[str] | None = None) -> Iterator[list[str]]:
    """``atomic_path`` for files that belong together (an adapter's weights and config): every temp file is
    written and synced before the first rename, so a failure while writing changes none of them."""
    paths = [os.fspath(p) for p in paths]
    suffixes = suffixes or [""] * len(paths)
    temps: list[str] = []
    try:
        for path, suffix in zip(paths, suffixes):
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX + os.path.basename(path) + ".", suffix=suffix, dir=folder)
            os.close(fd)
            temps.append(tmp)
        yield temps
        for tmp in temps:  # the writer may not have synced: no rename may outrun its data
            os.chmod(tmp, _file_mode())
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for tmp, path in zip(temps, paths):
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        raise
    for folder in dict.fromkeys(os.path.dirname(os.path.abspath(p)) for p in paths):
        _fsync_dir(folder)


def write_to_temp(tmp: str, data: bytes) -> None:
    """Fill a temp file made by ``atomic_path(s)`` (it exists and is ours; a link there is refused)."""
    fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> None:
    """JSON (UTF-8, strict: NaN/inf refused rather than written as invalid JSON) plus a newline."""
    atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False, allow_nan=False) + "\n")


def save_safetensors(tensors: dict, path: str, metadata: dict[str, str] | None = None) -> None:
    """safetensors' ``save_file``, with a failed write (disk full, file too large, ...) raised as the OSError
    it is (safetensors reports it as a SafetensorError whose text holds the OS error number)."""
    import re

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), path) from None


def atomic_save_tensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written atomically (tensors moved to the CPU, made contiguous)."""
    plain = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_safetensors(plain, tmp, metadata=metadata)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` written atomically (the reader loads it with ``weights_only=True``). Serialised in memory
    first: torch reports a failed file write as an opaque RuntimeError, a plain write as the OSError it is."""
    import io as _io

    import torch

    buffer = _io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_savefig(fig: Any, path: str | os.PathLike, **kw: Any) -> None:
    """matplotlib's ``savefig`` written atomically (the format from ``path``'s extension)."""
    ext = os.path.splitext(os.fspath(path))[1].lstrip(".") or "png"
    with atomic_path(path, suffix="." + ext) as tmp:
        fig.savefig(tmp, format=ext, **kw)


class UnreadableFile(ValueError):
    """A file that cannot be read as asked: ``refused`` (it would need code to load) or damaged."""


def load_plain_tensors(path: str | os.PathLike) -> Any:
    """``torch.load`` restricted to plain data (tensors, numbers, strings, lists, dicts): no code runs.

    A pickle that needs anything else is refused (``UnreadableFile("refused: not plain tensors ...")``),
    never loaded with the protection off; a truncated or corrupt file is ``UnreadableFile("damaged ...")``.
    """
    import pickle

    import torch

    try:
        with warnings.catch_warnings():  # torch's notes on odd pickle protocols: the verdict below says enough
            warnings.simplefilter("ignore")
            return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise UnreadableFile(f"refused: not plain tensors ({os.fspath(path)} is a pickle that names Python code "
                                 f"or objects to build; lorakit loads tensors and plain numbers only)") from None
        raise UnreadableFile(f"damaged ({_first_line(e)})") from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, ImportError, TypeError, IndexError) as e:
        raise UnreadableFile(f"damaged ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def private_temp_dir(parent: str | os.PathLike, name: str) -> str:
    """A fresh folder (mode 0700, random name starting with TEMP_PREFIX) inside ``parent``."""
    parent = os.fspath(parent)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{name}.", dir=parent)


def atomic_save_pretrained(save: Callable[[str], Any], directory: str | os.PathLike) -> None:
    """Run ``save(folder)`` (e.g. ``tokenizer.save_pretrained``) into a private temp folder inside
    ``directory``, then move each file it wrote into ``directory`` with ``os.replace``. Files already in
    ``directory`` under other names stay; a link at a written name is replaced, never followed."""
    directory = os.fspath(directory)
    if os.path.islink(directory):
        raise OSError(f"refusing to write through a symbolic link: {directory}")
    tmp = private_temp_dir(directory, "save")
    try:
        save(tmp)
        _move_tree(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(directory)


def _move_tree(src: str, dst: str) -> None:
    for entry in sorted(os.listdir(src)):
        s, d = os.path.join(src, entry), os.path.join(dst, entry)
        if os.path.isdir(s) and not os.path.islink(s):
            if os.path.islink(d) or (os.path.exists(d) and not os.path.isdir(d)):
                os.remove(d)
            os.makedirs(d, exist_ok=True)
            _move_tree(s, d)
        else:
            with open(s, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(s, _file_mode())
            os.replace(s, d)


def remove_temp_dirs(folder: str | os.PathLike) -> list[str]:
    """Remove what killed writers left in ``folder``: entries named TEMP_PREFIX... (never followed if links).

    Only call this on a folder one writer owns (a run's output or checkpoint folder at its start)."""
    folder = os.fspath(folder)
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        if not entry.startswith(TEMP_PREFIX):
            continue
        path = os.path.join(folder, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)
        removed.append(path)
    return removed
