import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lorakit import kernels
from lorakit.errors import TrainingError
from lorakit.train.config import config_from_dict
from lorakit.train.loop import train_loop
from lorakit.train.state import list_checkpoints

from tiny import freeze_all_but_one_layer, pad_batch, tiny_examples, train_llama

BASE = ["train.progress=false", "train.batch_size=4", "train.lr=1e-2", "output.tensorboard=false",
        "output.plot=false", "lora.dropout=0.0"]


def make_model(seed=0):
    m = train_llama(seed)
    freeze_all_but_one_layer(m)
    # dropout in the trained layer makes the RNG state matter for resume
    m.config.attention_dropout = 0.1
    for layer in m.model.layers:
        layer.self_attn.attention_dropout = 0.1
    return m


def trainable(m):
    return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}


def test_loss_goes_down_and_outputs_written(tmp_path):
    cfg = config_from_dict({}, BASE + ["train.max_steps=15", "eval.every_steps=5", "output.save_every=5",
                                       "output.plot=true", "output.tensorboard=true", "train.scheduler=cosine",
                                       "train.warmup_steps=3"])
    ex = tiny_examples(16)
    model = make_model()
    res = train_loop(model, ex, pad_batch, cfg, tmp_path, eval_examples=ex[:8], print_fn=lambda s: None)
    assert res.steps == 15 and res.fast_loss == kernels.enabled  # the fused loss is a kernel (LORAKIT_KERNELS)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert len(train_rows) == 15 and [r["step"] for r in evals] == [5, 10, 15]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert all(r["tokens_per_s"] > 0 for r in train_rows)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert any((tmp_path / "tb").iterdir())
    # keep_last=2 prunes the step-5 checkpoint
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000010", "step-000015"]
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


def test_grad_accum_matches_one_big_batch(tmp_path):
    ex = tiny_examples(8)
    results = []
    for bs, acc in [(8, 1), (2, 4)]:
        cfg = config_from_dict({}, BASE + ["train.max_steps=3", f"train.batch_size={bs}", f"train.grad_accum={acc}",
                                           "data.sort_by_length=false", "train.max_grad_norm=null"])
        model = train_llama(0)
        freeze_all_but_one_layer(model)
        train_loop(model, ex, pad_batch, cfg, tmp_path / f"{bs}", print_fn=lambda s: None)
        results.append(trainable(model))
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_is_exact(tmp_path, accum):
    n = 5  # 16 examples / bs 4 = 4 micro-batches per epoch: the resume point falls mid-epoch
    over = BASE + [f"train.max_steps={2 * n}", f"output.save_every={n}", "output.keep_last=0",
                   f"train.grad_accum={accum}", "train.warmup_steps=2"]
    cfg = config_from_dict({}, over)
    ex = tiny_examples(16)
    a = make_model()
    train_loop(a, ex, pad_batch, cfg, tmp_path / "a", print_fn=lambda s: None)
    full = trainable(a)
    ckpt = tmp_path / "a" / "checkpoints" / f"step-{n:06d}"
    assert ckpt.is_dir()

    b = make_model()
    res = train_loop(b, ex, pad_batch, cfg, tmp_path / "b", resume=ckpt, print_fn=lambda s: None)
    assert res.steps == 2 * n
    resumed = trainable(b)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], atol=0, rtol=0)
    final = load_file(str(tmp_path / "a" / "checkpoints" / f"step-{2 * n:06d}" / "trainable.safetensors"))
    for k in full:
        assert torch.equal(final[k], full[k])


def test_resume_latest_in_same_dir_rewrites_metrics(tmp_path):
    cfg = config_from_dict({}, BASE + ["train.max_steps=6", "output.save_every=3", "output.keep_last=0"])
    ex = tiny_examples(12)
    a = make_model()
    train_loop(a, ex, pad_batch, cfg, tmp_path, print_fn=lambda s: None)
    want = trainable(a)
    import shutil
    shutil.rmtree(tmp_path / "checkpoints" / "step-000006")
    b = make_model()
    train_loop(b, ex, pad_batch, cfg, tmp_path, resume="latest", print_fn=lambda s: None)
    for k, v in trainable(b).items():
        assert torch.equal(v, want[k])
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_errors(tmp_path):
    cfg = config_from_dict({}, BASE + ["train.max_steps=2"])
    with pytest.raises(TrainingError, match="no checkpoint"):
        train_loop(make_model(), tiny_examples(8), pad_batch, cfg, tmp_path, resume="latest")


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = config_from_dict({}, BASE + ["train.max_steps=10", "output.save_every=2", "output.keep_last=0"])
    model = make_model()
    calls = {"n": 0}

    def poison(module, args, output):
        if not torch.is_grad_enabled():
            return None  # the fused loss's one-time check and evaluations: not a training step
        calls["n"] += 1
        if calls["n"] > 5:  # one call per step: step 6
            return output * float("nan")

    model.model.layers[1].mlp.register_forward_hook(poison)
    with pytest.raises(TrainingError) as e:
        train_loop(model, tiny_examples(16), pad_batch, cfg, tmp_path, print_fn=lambda s: None)
    msg = str(e.value)
    assert "step 6" in msg and "learning rate" in msg and "step-000004" in msg and "float32" in msg
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000004"]
    good = load_file(str(tmp_path / "checkpoints" / "step-000004" / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in good.values())
    assert not (tmp_path / "adapter").exists()


def test_huge_lr_halts_with_training_error(tmp_path):
    cfg = config_from_dict({}, BASE + ["train.max_steps=20", "train.lr=1e30", "train.max_grad_norm=null"])
    with pytest.raises(TrainingError, match="lower learning rate"):
        train_loop(make_model(), tiny_examples(16), pad_batch, cfg, tmp_path, print_fn=lambda s: None)


def test_resume_is_exact_with_lora_dropout(tmp_path):
    from lorakit import LoraConfig, TaskType, get_peft_model

    def lora_model():
        torch.manual_seed(0)
        return get_peft_model(train_llama(0), LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8,
                                                        lora_dropout=0.3, target_modules=["q_proj", "v_proj"]))

    cfg = config_from_dict({}, BASE + ["train.max_steps=6", "output.save_every=3", "output.keep_last=0"])
    ex = tiny_examples(12)
    a = lora_model()
    res = train_loop(a, ex, pad_batch, cfg, tmp_path / "a", print_fn=lambda s: None)
    assert (res.adapter_dir / "adapter_model.safetensors").is_file()
    assert (tmp_path / "a" / "checkpoints" / "step-000003" / "adapter" / "adapter_config.json").is_file()
    b = lora_model()
    train_loop(b, ex, pad_batch, cfg, tmp_path / "b", resume=tmp_path / "a" / "checkpoints" / "step-000003",
               print_fn=lambda s: None)
    sa, sb = a.lora_state_dict(), b.lora_state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_a_new_run_refuses_a_folder_holding_another_run_unless_overwrite(tmp_path):
    cfg = config_from_dict({}, BASE + ["train.max_steps=4", "output.save_every=2", "output.keep_last=2"])
    ex = tiny_examples(8)
    train_loop(make_model(), ex, pad_batch, cfg, tmp_path, print_fn=lambda s: None)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    # a second fresh run into the same folder would mix its checkpoints with the old ones (keep_last
    # pruned by step number deleted the new run's own) and leave the old adapter looking like the new
    short = config_from_dict({}, BASE + ["train.max_steps=2", "output.save_every=1"])
    with pytest.raises(TrainingError, match="already holds a run .*--resume.*--overwrite"):
        train_loop(make_model(1), ex, pad_batch, short, tmp_path, print_fn=lambda s: None)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing touched
    res = train_loop(make_model(1), ex, pad_batch, short, tmp_path, print_fn=lambda s: None, overwrite=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001", "step-000002"]
    assert res.checkpoint.name == "step-000002" and res.checkpoint.is_dir()
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_resuming_a_finished_run_trains_nothing_and_writes_its_outputs_again(tmp_path):
    # (a run killed after its last checkpoint, before its outputs, resumes the same way: tests/reliability)
    cfg = config_from_dict({}, BASE + ["train.max_steps=2"])  # save_every None: a checkpoint at the end only
    ex = tiny_examples(8)
    a = make_model()
    res = train_loop(a, ex, pad_batch, cfg, tmp_path, print_fn=lambda s: None)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002"] and res.checkpoint is not None
    metrics = (tmp_path / "metrics.jsonl").read_text()
    said = []
    b = make_model()
    again = train_loop(b, ex, pad_batch, cfg, tmp_path, resume="latest", print_fn=said.append)
    assert any("end of its run" in s and "nothing left to train" in s for s in said)
    assert again.steps == 2 and again.final_loss == res.final_loss
    assert (tmp_path / "metrics.jsonl").read_text() == metrics
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002"]
    for k, v in trainable(b).items():  # the checkpoint's weights, nothing trained on top
        assert torch.equal(v, trainable(a)[k]), k


def test_ctrl_c_writes_a_checkpoint_that_resumes_exactly(tmp_path):
    cfg = config_from_dict({}, BASE + ["train.max_steps=6"])  # save_every None: only the end, or an interrupt
    ex = tiny_examples(12)
    a = make_model()
    train_loop(a, ex, pad_batch, cfg, tmp_path / "a", print_fn=lambda s: None)
    want = trainable(a)

    calls = []

    def interrupting(batch):
        calls.append(1)
        if len(calls) == 4:  # while fetching step 4's batch
            raise KeyboardInterrupt
        return pad_batch(batch)

    with pytest.raises(KeyboardInterrupt):
        train_loop(make_model(), ex, interrupting, cfg, tmp_path / "b", print_fn=lambda s: None)
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-000003"]
    b = make_model()
    res = train_loop(b, ex, pad_batch, cfg, tmp_path / "b", resume="latest", print_fn=lambda s: None)
    assert res.steps == 6
    for k, v in trainable(b).items():
        assert torch.equal(v, want[k]), k
