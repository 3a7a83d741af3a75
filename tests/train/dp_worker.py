"""One process of a data-parallel training run (started by test_data_parallel.py; not a test itself).

    python dp_worker.py OUT_DIR BATCH_SIZE GRAD_ACCUM STEPS

Trains a LoRA adapter on a tiny Llama with lorakit's loop and writes this process's final LoRA weights
and the batches it trained on to OUT_DIR/rank<R>.safetensors / .json. With WORLD_SIZE=1 (no launcher)
it is the single-process reference.
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tiny.py

from tiny import tiny_examples, train_llama  # noqa: E402


def main() -> None:
    out, batch_size, grad_accum, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    from safetensors.torch import save_file

    import lorakit.train.loop as loop
    from lorakit import LoraConfig, get_peft_model
    from lorakit.data import Collator
    from lorakit.train.config import config_from_dict

    rank = int(os.environ.get("RANK", "0"))
    seen = []
    collate = Collator(0)

    def recording(examples):
        seen.append([e["input_ids"][0] for e in examples])
        return collate(examples)

    model = get_peft_model(train_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights="gaussian"))
    cfg = config_from_dict({}, ["train.progress=false", f"train.batch_size={batch_size}",
                                f"train.grad_accum={grad_accum}", f"train.max_steps={steps}", "train.lr=1e-2",
                                "output.tensorboard=false", "output.plot=false", "lora.dropout=0.0"])
    res = loop.train_loop(model, tiny_examples(24), recording, cfg, out / "run", print_fn=lambda s: None)
    state = {k: v.contiguous() for k, v in model.lora_state_dict().items()}
    save_file(state, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"seen": seen, "steps": res.steps, "loss": res.final_loss,
                                                          "fast_loss": res.fast_loss}))


if __name__ == "__main__":
    main()
