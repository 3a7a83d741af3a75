"""A LoraModel under transformers' Trainer: columns kept, labels found, eval loss, adapters in checkpoints."""
import inspect

import torch

from lorakit import LoraConfig, LoraModel, get_peft_model
from lorakit.hf.trainer import SaveAdapterCallback

from tiny import tiny_llama


def test_trainer_trains_evaluates_and_checkpoints_the_adapter(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    ids = torch.randint(3, 98, (8, 8))
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 8] * 8, "labels": ids.tolist(),
                           "text": ["unused"] * 8})
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8))
    params = inspect.signature(model.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "adapter_names"} <= set(params)
    before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                             max_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="steps",
                             save_steps=2, dataloader_num_workers=0, seed=0)  # remove_unused_columns: default True
    trainer = Trainer(model=model, args=args, train_dataset=ds, eval_dataset=ds, callbacks=[SaveAdapterCallback()])
    assert trainer.label_names == ["labels"]
    out = trainer.train()
    assert out.global_step == 2 and torch.isfinite(torch.tensor(out.training_loss))
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and metrics["eval_loss"] > 0
    ckpt = tmp_path / "checkpoint-2"
    assert (ckpt / "adapter_config.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()
    loaded = LoraModel.from_pretrained(tiny_llama(), ckpt)
    x = ids[:2]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits)


def test_lora_trainer_saves_and_resumes_the_adapter_of_a_tied_model(tmp_path):
    # GPT-2 ties its input and output embeddings: the plain Trainer's safetensors save of the whole state
    # dict refuses shared tensors; LoraTrainer writes the adapter instead and resumes from it
    from datasets import Dataset
    from transformers import TrainingArguments

    from lorakit.hf.trainer import LoraTrainer
    from tiny import tiny_gpt2

    torch.manual_seed(0)
    ids = torch.randint(3, 90, (8, 8))
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})

    def args(out, steps):
        return TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=steps,
                                 learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="steps",
                                 save_steps=2, dataloader_num_workers=0, seed=0)

    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"]))
    trainer = LoraTrainer(model=model, args=args(tmp_path / "a", 2), train_dataset=ds)
    trainer.train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    trainer.save_model(str(tmp_path / "final"))
    loaded = LoraModel.from_pretrained(tiny_gpt2(), tmp_path / "final")
    x = ids[:2]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits)
    fresh = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"]))
    resumed = LoraTrainer(model=fresh, args=args(tmp_path / "a", 4), train_dataset=ds)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 4
