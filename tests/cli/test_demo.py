"""`lorakit demo` (what `make demo` runs) on the real embedded model: minutes, so marked slow."""

import re
import time

import pytest

from lorakit.cli.main import main


@pytest.mark.slow
def test_demo_fine_tuning_beats_zero_shot(tmp_path, capsys):
    t0 = time.time()
    assert main(["demo", "--out", str(tmp_path)]) == 0
    elapsed = time.time() - t0
    out = capsys.readouterr().out
    m = re.search(r"accuracy: zero-shot ([\d.]+)% -> fine-tuned ([\d.]+)%", out)
    assert m, out
    zero, tuned = float(m.group(1)), float(m.group(2))
    assert tuned >= 80.0 and tuned - zero >= 50.0, out
    for name in ("adapter/adapter_model.safetensors", "merged/config.json", "loss.png", "metrics.jsonl"):
        assert (tmp_path / name).is_file(), name
    assert elapsed < 8 * 60, f"demo took {elapsed:.0f}s"
