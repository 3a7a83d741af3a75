from pathlib import Path

import pytest
import torch


# ---------------------------------------------------------------- helpers for the CLI error tests


def make_adapter(model_dir, out, r=4):
    from transformers import AutoModelForCausalLM

    from lorakit import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                     base_model_name_or_path=str(model_dir))
    model = get_peft_model(base, cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a non-zero update, so the merge changes the weights
            torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(out)
    return Path(out)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "adapter")



def err_of(argv, capsys, rc=1):
    """Run the CLI expecting exit code ``rc``; its stderr (checked to hold no traceback)."""
    from lorakit.cli.main import main

    assert main(argv) == rc
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


def broken_copy(adapter, tmp_path, name, mutate):
    """A copy of the adapter folder, changed by ``mutate(folder)``."""
    import shutil

    out = tmp_path / name
    shutil.copytree(adapter, out)
    mutate(out)
    return out
