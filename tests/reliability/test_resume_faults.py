"""Resume survives a damaged newest checkpoint: each damaged file is named; `latest` resumes from the newest
intact checkpoint and ends with the uninterrupted run's weights; a damaged checkpoint named explicitly is
refused in one line, the model untouched. Leftovers of killed runs are removed at the next start."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from lorakit.errors import TrainingError
from lorakit.train.config import config_from_dict
from lorakit.train.loop import train_loop
from lorakit.train.state import list_checkpoints, read_checkpoint
from tiny import pad_batch, tiny_examples, train_llama

from .helpers import assert_model_unchanged, model_snapshot

BASE = ["train.progress=false", "train.batch_size=4", "train.lr=1e-2", "output.tensorboard=false",
        "output.plot=false", "train.max_steps=6", "output.save_every=2", "output.keep_last=0"]


def lora_model():
    from lorakit import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(train_llama(0), LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8,
                                                    lora_dropout=0.3, target_modules=["q_proj", "v_proj"]))


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.lora_state_dict().items()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run (checkpoints at steps 2, 4, 6) and its final LoRA weights."""
    out = tmp_path_factory.mktemp("finished") / "run"
    model = lora_model()
    train_loop(model, tiny_examples(12), pad_batch, config_from_dict({}, BASE), out, print_fn=lambda s: None)
    return out, weights(model)


def _copy(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    shutil.rmtree(out / "adapter")
    return out


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


MARKER = Path(tempfile.gettempdir()) / f"lorakit-code-ran-{os.getpid()}"


class _Code:
    """Unpickling this makes the folder MARKER: proof that code from the file ran."""

    def __reduce__(self):
        return (os.mkdir, (str(MARKER),))


@pytest.fixture(autouse=True)
def no_code_ran():
    yield
    assert not MARKER.exists(), "code from a pickle ran"


DAMAGE = {
    "trainable.safetensors truncated": ("trainable.safetensors", lambda p: _truncate(p, 0.3)),
    "trainable.safetensors missing": ("trainable.safetensors", lambda p: p.unlink()),
    "optimizer.pt truncated": ("optimizer.pt", _truncate),
    "optimizer.pt empty": ("optimizer.pt", lambda p: p.write_bytes(b"")),
    "optimizer.pt a pickle with code": ("optimizer.pt", lambda p: p.write_bytes(pickle.dumps({"state": _Code()}))),
    "scheduler.json empty": ("scheduler.json", lambda p: p.write_text("")),
    "scheduler.json a list": ("scheduler.json", lambda p: p.write_text("[1, 2]")),
    "trainer_state.json truncated": ("trainer_state.json", lambda p: _truncate(p, 0.5)),
    "trainer_state.json step not a count": ("trainer_state.json", lambda p: p.write_text(
        json.dumps({**json.loads(p.read_text()), "step": "six"}))),
    "rng.json garbage": ("rng.json", lambda p: p.write_text('{"python": [1], "numpy": 2}')),
    "rng.safetensors truncated": ("rng.safetensors", lambda p: _truncate(p, 0.2)),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_latest_skips_a_damaged_newest_checkpoint(finished, tmp_path, case):
    name, damage = DAMAGE[case]
    out = _copy(finished, tmp_path)
    damage(out / "checkpoints" / "step-000006" / name)
    said: list[str] = []
    model = lora_model()
    res = train_loop(model, tiny_examples(12), pad_batch, config_from_dict({}, BASE), out, resume="latest",
                     print_fn=said.append)
    text = "\n".join(said)
    assert f"step-000006: {name}" in text and ("damaged" in text or "refused" in text), text
    assert "resuming from step-000004" in text
    if "pickle" in case:
        assert "refused: not plain tensors" in text and "weights_only" not in text
    assert res.steps == 6
    for k, v in weights(model).items():  # steps 5 and 6 trained again: the uninterrupted run's weights
        assert torch.equal(v, finished[1][k]), k
    read_checkpoint(out / "checkpoints" / "step-000006")  # rewritten intact


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_named_damaged_checkpoint_is_refused_and_nothing_changes(finished, tmp_path, case):
    name, damage = DAMAGE[case]
    out = _copy(finished, tmp_path)
    ckpt = out / "checkpoints" / "step-000006"
    damage(ckpt / name)
    model = lora_model()
    before = model_snapshot(model)
    with pytest.raises(TrainingError) as e:
        train_loop(model, tiny_examples(12), pad_batch, config_from_dict({}, BASE), out, resume=ckpt,
                   print_fn=lambda s: None)
    msg = str(e.value)
    assert str(ckpt) in msg and name in msg and "\n" not in msg
    assert "weights_only" not in msg and "Traceback" not in msg
    assert_model_unchanged(model, before)


def test_every_checkpoint_damaged_is_one_clear_error(finished, tmp_path):
    out = _copy(finished, tmp_path)
    for ckpt in list_checkpoints(out):
        (ckpt / "scheduler.json").write_text("")
    with pytest.raises(TrainingError, match="no intact checkpoint.*--overwrite"):
        train_loop(lora_model(), tiny_examples(12), pad_batch, config_from_dict({}, BASE), out, resume="latest",
                   print_fn=lambda s: None)


def test_resume_without_any_checkpoint_says_to_start_again(tmp_path):
    with pytest.raises(TrainingError, match="no checkpoint under .*--overwrite"):
        train_loop(lora_model(), tiny_examples(12), pad_batch, config_from_dict({}, BASE), tmp_path / "run",
                   resume="latest", print_fn=lambda s: None)


def test_killed_runs_leftovers_are_removed_and_a_checkpoint_moved_aside_comes_back(finished, tmp_path):
    out = _copy(finished, tmp_path)
    root = out / "checkpoints"
    (root / ".tmp-step-000008.k1ll3d").mkdir()
    (root / ".tmp-step-000008.k1ll3d" / "optimizer.pt").write_bytes(b"half")
    (root / ".tmp-deleted-step-000002").mkdir()
    (out / "adapter").mkdir()
    (out / "adapter" / ".tmp-adapter_model.safetensors.abc.safetensors").write_bytes(b"half")
    (out / ".tmp-loss.png.xyz.png").write_bytes(b"half")
    (root / "step-000006").rename(root / ".old-step-000006")  # killed between the two renames of a rewrite
    model = lora_model()
    res = train_loop(model, tiny_examples(12), pad_batch, config_from_dict({}, BASE), out, resume="latest",
                     print_fn=lambda s: None)
    assert res.steps == 6
    left = sorted(p.name for p in out.rglob("*") if p.name.startswith((".tmp-", ".old-")))
    assert left == []
    assert [p.name for p in list_checkpoints(out)] == ["step-000002", "step-000004", "step-000006"]
    for k, v in weights(model).items():  # resumed at step 6 (the run's end): the final weights
        assert torch.equal(v, finished[1][k]), k


def test_resume_at_the_end_writes_the_missing_adapter(finished, tmp_path):
    out = _copy(finished, tmp_path)  # the adapter folder is gone, as after a kill before the outputs
    said: list[str] = []
    res = train_loop(lora_model(), tiny_examples(12), pad_batch, config_from_dict({}, BASE), out,
                     resume="latest", print_fn=said.append)
    assert any("nothing left to train" in s for s in said)
    from safetensors.torch import load_file

    saved = load_file(str(res.adapter_dir / "adapter_model.safetensors"))
    for k, v in finished[1].items():
        assert torch.equal(saved[k], v), k


def test_adapter_pickle_with_code_is_refused_plainly(tmp_path):
    from lorakit import LoraModel
    from lorakit.errors import AdapterLoadError

    folder = tmp_path / "adapter"
    lora_model().save_pretrained(folder)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Code()}))
    base = train_llama(0)
    before = model_snapshot(base)
    with pytest.raises(AdapterLoadError) as e:
        LoraModel.from_pretrained(base, folder, allow_pickle=True)
    assert "refused: not plain tensors" in str(e.value) and "weights_only" not in str(e.value)
    assert_model_unchanged(base, before)


@pytest.mark.parametrize("resume", [5, "", "   ", ["latest"]])
def test_resume_that_names_nothing_is_refused(tmp_path, resume):
    model = lora_model()
    before = model_snapshot(model)
    with pytest.raises(TrainingError, match="latest"):
        train_loop(model, tiny_examples(12), pad_batch, config_from_dict({}, BASE), tmp_path / "run", resume=resume,
                   print_fn=lambda s: None)
    assert_model_unchanged(model, before)


def test_runs_of_another_precision_in_one_process(tmp_path):
    """accelerate keeps one precision per process; lorakit's runs may differ (folds, notebooks, tests)."""
    for i, precision in enumerate(["no", "bf16", "no"]):
        cfg = config_from_dict({}, BASE + ["train.max_steps=1", f"train.mixed_precision={precision}"])
        res = train_loop(lora_model(), tiny_examples(8), pad_batch, cfg, tmp_path / str(i), print_fn=lambda s: None)
        assert res.steps == 1
