"""No write lands outside the folder the user named, and a failed write (disk full, read-only, file too large)
is a clear error that leaves the previous files intact and no half-written file where a loader would look."""

from __future__ import annotations

import errno
import os
import resource
import signal
from pathlib import Path

import pytest
import torch

from lorakit import LoraConfig, LoraModel, TaskType, get_peft_model
from lorakit.errors import DataError, TrainingError
from lorakit.train.config import config_from_dict
from lorakit.train.loop import train_loop
from lorakit.train.state import list_checkpoints, read_checkpoint, save_checkpoint
from tiny import pad_batch, tiny_examples, train_llama

from .helpers import assert_one_clean_error, run_cli, tree_snapshot, write_recipe

BASE = ["train.progress=false", "train.batch_size=4", "train.lr=1e-2", "output.tensorboard=false",
        "output.plot=true", "train.max_steps=4", "output.save_every=2", "output.keep_last=0"]


def lora_model(seed: int = 0):
    torch.manual_seed(seed)
    return get_peft_model(train_llama(0), LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8,
                                                     target_modules=["q_proj", "v_proj"]))


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file outside the output folder that a planted link points at."""
    path = tmp_path / "elsewhere" / "precious.txt"
    path.parent.mkdir()
    path.write_text("precious")
    return path


def _untouched(victim: Path) -> None:
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in victim.parent.iterdir()) == ["precious.txt"]


# ---------------------------------------------------------------------------------------------- links


@pytest.mark.parametrize("name", ["adapter_config.json.tmp", "adapter_config.json", "adapter_model.safetensors",
                                  ".tmp-adapter_config.json"])
def test_adapter_save_never_writes_through_a_planted_link(tmp_path, victim, name):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).symlink_to(victim)
    lora_model().save_pretrained(out)
    _untouched(victim)
    assert not (out / "adapter_config.json").is_symlink() and not (out / "adapter_model.safetensors").is_symlink()
    LoraModel.from_pretrained(train_llama(0), out)  # what was written is a loadable adapter


def test_config_save_pretrained_alone_never_writes_through_a_link(tmp_path, victim):
    (tmp_path / "adapter_config.json.tmp").symlink_to(victim)
    (tmp_path / "adapter_config.json").symlink_to(victim)
    LoraConfig(r=4).save_pretrained(tmp_path)
    _untouched(victim)
    assert LoraConfig.from_pretrained(tmp_path).r == 4


@pytest.mark.parametrize("name", ["metrics.jsonl", "loss.png", "recipe.yaml"])
def test_training_replaces_links_at_its_output_files(tmp_path, victim, name):
    out = tmp_path / "run"
    out.mkdir()
    (out / name).symlink_to(victim)
    cfg = config_from_dict({}, BASE)
    if name == "recipe.yaml":  # written by the recipe runner: atomically, replacing the link
        from lorakit.train.recipe import dump_recipe

        dump_recipe(cfg, out / name)
    else:
        train_loop(lora_model(), tiny_examples(8), pad_batch, cfg, out, overwrite=True, print_fn=lambda s: None)
    _untouched(victim)
    assert (out / name).is_file() and not (out / name).is_symlink()


@pytest.mark.parametrize("name", ["adapter", "checkpoints", "tb"])
def test_a_linked_output_folder_is_refused_and_nothing_is_written(tmp_path, victim, name):
    out = tmp_path / "run"
    out.mkdir()
    (out / name).symlink_to(victim.parent, target_is_directory=True)
    cfg = config_from_dict({}, BASE)
    with pytest.raises(TrainingError, match="symbolic link"):
        train_loop(lora_model(), tiny_examples(8), pad_batch, cfg, out, print_fn=lambda s: None)
    _untouched(victim)
    with pytest.raises(TrainingError, match="symbolic link"):  # a dangling link too
        (out / name).unlink()
        (out / name).symlink_to(tmp_path / "nowhere", target_is_directory=True)
        train_loop(lora_model(), tiny_examples(8), pad_batch, cfg, out, print_fn=lambda s: None)
    assert not (tmp_path / "nowhere").exists()


def test_overwrite_removes_a_linked_output_folder_not_its_target(tmp_path, victim):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").symlink_to(victim.parent, target_is_directory=True)
    train_loop(lora_model(), tiny_examples(8), pad_batch, config_from_dict({}, BASE), out, overwrite=True,
               print_fn=lambda s: None)
    _untouched(victim)
    assert (out / "checkpoints").is_dir() and not (out / "checkpoints").is_symlink()


def test_tokenizer_save_replaces_a_planted_link(tmp_path, victim, model_dir):
    from transformers import AutoTokenizer

    from lorakit.io import atomic_save_pretrained

    out = tmp_path / "adapter"
    out.mkdir()
    (out / "tokenizer.json").symlink_to(victim)
    atomic_save_pretrained(AutoTokenizer.from_pretrained(model_dir).save_pretrained, out)
    _untouched(victim)
    assert (out / "tokenizer.json").is_file() and not (out / "tokenizer.json").is_symlink()
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "..", "../recipes/demo.yaml",
                                  "__init__.py", "sub/demo_train.jsonl", ""])
def test_builtin_names_stay_in_the_builtin_folder(name):
    from lorakit.data.selection import resolve_source

    with pytest.raises(DataError, match="no such built-in data file"):
        resolve_source("builtin:" + name)


# ---------------------------------------------------------------------------------------------- failed writes


def _failing_after(n_bytes: int, err: int):
    """A safetensors writer that writes ``n_bytes`` of the file and then fails with ``err``."""
    def fail(obj, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"\0" * n_bytes)
        raise OSError(err, os.strerror(err), str(path))
    return fail


class _FullFile:
    """A file whose writes fail with ``err`` after ``n_bytes`` (what a full disk does to a plain write)."""

    def __init__(self, f, n_bytes: int, err: int):
        self._f, self._left, self._err = f, n_bytes, err

    def write(self, data):
        if len(data) > self._left:
            self._f.write(data[: self._left])
            raise OSError(self._err, os.strerror(self._err))
        self._left -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _full_disk_for_plain_writes(monkeypatch, n_bytes: int, err: int) -> None:
    real = os.fdopen

    def fdopen(fd, mode="r", *a, **k):
        f = real(fd, mode, *a, **k)
        return _FullFile(f, n_bytes, err) if "w" in mode else f

    monkeypatch.setattr(os, "fdopen", fdopen)


@pytest.fixture
def run_at_step_2(tmp_path):
    """A run trained 2 steps with its checkpoint and adapter written, then a model and optimizer one step on."""
    out = tmp_path / "run"
    cfg = config_from_dict({}, BASE + ["train.max_steps=2"])
    model = lora_model()
    train_loop(model, tiny_examples(8), pad_batch, cfg, out, print_fn=lambda s: None)
    return out, model


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES])
@pytest.mark.parametrize("where", ["plain", "safetensors"])
def test_a_failed_checkpoint_write_keeps_the_previous_one(run_at_step_2, monkeypatch, err, where):
    out, model = run_at_step_2
    before = tree_snapshot(out)
    if where == "plain":  # optimizer.pt, scheduler.json, rng.json, trainer_state.json
        _full_disk_for_plain_writes(monkeypatch, 100, err)
    else:
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", _failing_after(100, err))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(TrainingError) as e:
        save_checkpoint(out, 3, model, optimizer, scheduler, {"step": 3}, keep_last=1)
    msg = str(e.value)
    assert os.strerror(err) in msg and "step-000002" in msg and "intact" in msg and "--resume" in msg
    assert tree_snapshot(out) == before  # nothing new, nothing half-written, nothing pruned
    read_checkpoint(out / "checkpoints" / "step-000002")


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_a_failed_adapter_write_changes_neither_file(run_at_step_2, monkeypatch, err):
    import lorakit.peft_format as peft_format

    out, model = run_at_step_2
    before = tree_snapshot(out / "adapter")
    monkeypatch.setattr(peft_format, "save_safetensors", _failing_after(64, err))
    with pytest.raises(OSError) as e:
        model.save_pretrained(out / "adapter")
    assert e.value.errno == err
    assert tree_snapshot(out / "adapter") == before


def test_a_failed_config_write_leaves_the_weights_as_they_were(run_at_step_2, monkeypatch):
    import lorakit.peft_format as peft_format

    out, model = run_at_step_2
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)  # new weights, which must not land without their config
    before = tree_snapshot(out / "adapter")

    def full(tmp, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)

    monkeypatch.setattr(peft_format, "write_to_temp", full)
    with pytest.raises(OSError):
        model.save_pretrained(out / "adapter")
    assert tree_snapshot(out / "adapter") == before


def test_disk_full_during_training_is_one_line_and_resumable(tmp_path, model_dir, capsys, monkeypatch):
    """Through the CLI: the step-4 checkpoint hits a full disk; one line, step 2 intact, --resume finishes."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, model_dir, out, max_steps="4", plot="false")
    import lorakit.train.state as state_mod

    real = state_mod.atomic_torch_save
    calls = {"n": 0}

    def torch_save(obj, path):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint's optimizer state meets a full disk
            with monkeypatch.context() as m:
                _full_disk_for_plain_writes(m, 10, errno.ENOSPC)
                return real(obj, path)
        return real(obj, path)

    monkeypatch.setattr(state_mod, "atomic_torch_save", torch_save)
    rc, _, err = run_cli(["train", recipe], capsys)
    assert_one_clean_error(rc, err, "No space left on device", "step-000002", "--resume")
    assert [p.name for p in list_checkpoints(out)] == ["step-000002"]
    assert not (out / "adapter").exists()
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    monkeypatch.setattr(state_mod, "atomic_torch_save", real)
    rc, _, err = run_cli(["train", recipe, "--resume"], capsys)
    assert rc == 0, err[-2000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_file_size_limit_is_a_real_write_failure(run_at_step_2):
    """A real failed write, no mock: the process may not grow a file past 2 KiB (RLIMIT_FSIZE), so the kernel
    refuses the checkpoint's writes (EFBIG) as it would a full disk."""
    out, model = run_at_step_2
    before = tree_snapshot(out)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write instead of a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, limits[1]))
    try:
        with pytest.raises(TrainingError) as e:
            save_checkpoint(out, 3, model, optimizer, scheduler, {"step": 3})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert "step-000002" in str(e.value) and "intact" in str(e.value)
    assert tree_snapshot(out) == before


@pytest.mark.parametrize("writer", ["bytes", "torch", "safetensors"])
def test_each_writer_reports_a_real_failed_write_as_an_oserror(tmp_path, writer):
    """Under a real 1 KiB file-size limit each writer raises OSError (EFBIG), the old file stays, no temp file
    is left (safetensors and torch report the failure in their own exception types; lorakit.io converts)."""
    from lorakit import io

    target = tmp_path / "file"
    target.write_bytes(b"old")
    big = {"t": torch.zeros(4096)}
    write = {"bytes": lambda: io.atomic_write_bytes(target, b"x" * 8192),
             "torch": lambda: io.atomic_torch_save(big, target),
             "safetensors": lambda: io.atomic_save_tensors(big, target)}[writer]
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, limits[1]))
    try:
        with pytest.raises(OSError) as e:
            write()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert e.value.errno == errno.EFBIG
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ---------------------------------------------------------------------------------------------- the audit

#: raw writes allowed outside lorakit/io.py, each inside a fresh private temp folder (mkdtemp) that is
#: renamed into place, or a developer script that regenerates the shipped data
_RAW_WRITES_ALLOWED = {
    "export/run.py": "the Ollama folder is built in a mkdtemp folder, then renamed (export/files.py)",
    "models/embedded.py": "the embedded model's cache is converted in a mkdtemp folder, then renamed",
    "cli/merge_cmd.py": "the merged model is saved in a mkdtemp folder, then renamed",
    "train/run.py": "inside io.atomic_save_pretrained's callback (a private temp folder)",
    "data/builtin/make_chat_data.py": "developer script: regenerates the shipped data",
    "data/builtin/make_demo_data.py": "developer script: regenerates the shipped data",
}
#: single raw writes allowed, by file and the text of the line
_RAW_LINES_ALLOWED = {
    ("train/metrics.py", 'os.fdopen(fd, "a"'): "metrics.jsonl: an append-only log opened with O_NOFOLLOW; a torn "
                                                 "last line is skipped when read",
}


def test_every_write_in_the_package_goes_through_lorakit_io():
    """The promise's audit: a file opened for writing, write_text/write_bytes, json.dump, torch.save,
    safetensors' save_file or savefig anywhere but lorakit/io.py (and the temp-folder writers above)."""
    import re

    src = Path(__file__).resolve().parents[2] / "src" / "lorakit"
    raw = re.compile(r"open\([^)]*['\"](?:w|a|x)b?['\"]|\.write_text\(|\.write_bytes\(|json\.dump\(|torch\.save\("
                     r"|(?<!\w)save_file\(|\.savefig\(")
    found = []
    for path in sorted(src.rglob("*.py")):
        rel = str(path.relative_to(src))
        if rel == "io.py" or rel in _RAW_WRITES_ALLOWED:
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            allowed = any(rel == f and text in code for f, text in _RAW_LINES_ALLOWED)
            if raw.search(code) and "def " not in code and not allowed:
                found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "write through lorakit.io (atomic, never through a link) instead:\n" + "\n".join(found)
