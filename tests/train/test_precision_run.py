"""train.precision through a whole recipe run on a tiny model saved to disk: the base loaded straight in the
chosen dtype, the adapters float32, saved adapters and merged models float32, the choice recorded, resumes
kept in their precision, and auto following the (mocked) measurement each way."""
import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit.precision as precision_module
from lorakit.errors import TrainingError
from lorakit.train import load_recipe
from lorakit.train.run import prepare, train
from lorakit.train.state import list_checkpoints
from tiny import instantiate, single_thread  # noqa: F401

AMX = "model name\t: Test Xeon with AMX {n}\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16\n"
NO_BF16 = "model name\t: Test CPU without bf16\nflags\t\t: fpu avx2 fma\n"


@pytest.fixture
def model_dir(tiny_model_dir):
    """A 2-layer Llama over the embedded model's tokenizer (head tied), saved like a real model (tests/conftest.py)."""
    return tiny_model_dir


@pytest.fixture(scope="module")
def biased_dir(tmp_path_factory, embedded_model_dir):
    """The same with biases on the attention projections and an untied head (for lora.bias / modules_to_save)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    out = tmp_path_factory.mktemp("tiny_llama_bias")
    instantiate("LlamaConfig", "LlamaForCausalLM", 0, vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def recipe(model_dir, out, *extra):
    """The demo recipe on ``model_dir``: one batch of 4 tickets trained again and again (the loss must fall)."""
    return load_recipe("demo", [f"model={model_dir}", f"output.dir={out}", "data.max_train_samples=4",
                                "data.max_eval_samples=4", "train.batch_size=4", "train.max_steps=6", "train.lr=2e-2",
                                "train.cpu=true", "train.progress=false", "output.tensorboard=false",
                                "output.plot=false", "eval.accuracy=false", "lora.dropout=0.0", *extra])


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def dtypes(model):
    lora = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    base = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    return lora, base


def merged_equals_adapter(out, model_dir):
    """The merged model (read back from disk) is float32 and computes what the float32 base + saved adapter do."""
    from transformers import AutoModelForCausalLM

    from lorakit import LoraModel

    assert {v.dtype for v in load_file(str(out / "merged" / "model.safetensors")).values()} == {torch.float32}
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    lora = LoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "adapter").eval()
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, lora(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_a_bf16_run_trains_a_bf16_base_and_writes_float32_outputs(model_dir, tmp_path):
    said = []
    out = train(recipe(model_dir, tmp_path, "train.precision=bf16", "output.merge=true"), print_fn=said.append)
    assert out.setup.precision.name == out.result.precision.name == "bf16"
    assert out.setup.precision.describe() in precision_module._announced  # printed once per process
    lora, base = dtypes(out.setup.model)  # the run's own model is not merged into (its base is bf16)
    assert lora == {torch.float32} and base == {torch.bfloat16}
    trained = losses(tmp_path)
    assert len(trained) == 6 and all(torch.isfinite(torch.tensor(trained)))
    assert trained[-1] < trained[0] - 0.1, trained
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved and {v.dtype for v in saved.values()} == {torch.float32}
    merged_equals_adapter(tmp_path, model_dir)
    assert any("loaded in float32" in s for s in said)
    # the run says what it used: the recipe it wrote, and its checkpoints
    assert (tmp_path / "recipe.yaml").read_text().startswith("# precision: bf16 (bf16: asked for")
    state = json.loads((list_checkpoints(tmp_path)[-1] / "trainer_state.json").read_text())
    assert state["precision"] == "bf16" and "asked for" in state["precision_reason"]


def test_an_fp32_run_is_float32_throughout(model_dir, tmp_path):
    out = train(recipe(model_dir, tmp_path, "train.precision=fp32", "output.merge=true"), print_fn=lambda s: None)
    assert out.result.precision.name == "fp32" and out.setup.precision.dtype == torch.float32
    assert {p.dtype for p in out.setup.model.parameters()} == {torch.float32}
    trained = losses(tmp_path)
    assert trained[-1] < trained[0] - 0.1, trained
    assert {v.dtype for v in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).values()} == \
        {torch.float32}
    merged_equals_adapter(tmp_path, model_dir)


def test_trained_biases_and_modules_to_save_under_bf16(biased_dir, tmp_path):
    """They compute in the base's dtype (bf16) while training, and are saved float32 like the adapters."""
    out = train(recipe(biased_dir, tmp_path, "train.precision=bf16", "lora.bias=all",
                       "lora.modules_to_save=[lm_head]", "lora.target_modules=[q_proj,v_proj]"),
                print_fn=lambda s: None)
    trainable = {n: p for n, p in out.setup.model.named_parameters() if p.requires_grad}
    assert any(n.endswith(".bias") for n in trainable) and any("modules_to_save" in n for n in trainable)
    assert all(p.dtype == (torch.float32 if "lora_" in n else torch.bfloat16) for n, p in trainable.items())
    trained = losses(tmp_path)
    assert all(torch.isfinite(torch.tensor(trained))) and trained[-1] < trained[0] - 0.1, trained
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("bias") for k in saved) and any("lm_head" in k for k in saved)
    assert {v.dtype for v in saved.values()} == {torch.float32}
    ckpt = list_checkpoints(tmp_path)[-1]
    assert {v.dtype for v in load_file(str(ckpt / "adapter" / "adapter_model.safetensors")).values()} == \
        {torch.float32}
    # saving widened them only for the while: the live weights are bf16 again, and equal to what was saved
    head = next(p for n, p in trainable.items() if "modules_to_save" in n)
    assert head.dtype == torch.bfloat16
    saved_head = next(v for k, v in saved.items() if "lm_head" in k)
    assert torch.equal(saved_head.to(torch.bfloat16), head.detach())


def test_the_base_is_loaded_once_straight_in_the_chosen_dtype(model_dir, tmp_path, monkeypatch):
    from tiny import spy_model_loads

    calls = spy_model_loads(monkeypatch)
    prepare(recipe(model_dir, tmp_path, "train.precision=bf16"), print_fn=lambda s: None)
    assert calls == [torch.bfloat16]  # never a float32 copy first


@pytest.mark.parametrize("speedup, picked", [(3.0, torch.bfloat16), (0.5, torch.float32)])
def test_auto_follows_the_measurement_through_the_pipeline(model_dir, tmp_path, monkeypatch, speedup, picked):
    measured = []

    def measure(shapes):
        measured.append(shapes)
        return {"fp32": 1.0, "bf16": 1.0 / speedup}

    real_facts = precision_module.cpu_facts
    monkeypatch.setattr(precision_module, "cpu_facts", lambda cpuinfo=None: real_facts(AMX.format(n=speedup)))
    monkeypatch.setattr(precision_module, "measure_products", measure)
    monkeypatch.setattr(precision_module, "CACHE_DIR", tmp_path / "cache")
    said = []
    setup = prepare(recipe(model_dir, tmp_path / "run"), print_fn=said.append)
    assert setup.precision.setting == "auto" and setup.precision.dtype == picked
    assert measured == [[(32, 64), (64, 32), (32, 32)]]  # the model's shapes, read from its config
    _, base = dtypes(setup.model)
    assert base == {picked}
    assert f"{speedup:.2f}x" in setup.precision.reason


def test_auto_on_a_cpu_without_bf16_is_float32_without_measuring(model_dir, tmp_path, monkeypatch):
    real_facts = precision_module.cpu_facts
    monkeypatch.setattr(precision_module, "cpu_facts", lambda cpuinfo=None: real_facts(NO_BF16))
    monkeypatch.setattr(precision_module, "measure_products", lambda shapes: pytest.fail("measured"))
    setup = prepare(recipe(model_dir, tmp_path), print_fn=lambda s: None)
    assert setup.precision.name == "fp32" and "no bf16 instructions" in setup.precision.reason
    assert {p.dtype for p in setup.model.parameters()} == {torch.float32}


def test_an_explicit_dtype_under_auto_is_kept_and_said(model_dir, tmp_path):
    said = []
    setup = prepare(recipe(model_dir, tmp_path, "model.dtype=float16"), print_fn=said.append)
    assert setup.precision.name == "fp16" and "model.dtype float16 as given" in setup.precision.reason
    assert dtypes(setup.model) == ({torch.float32}, {torch.float16})


def test_autocast_under_auto_keeps_float32_weights(model_dir, tmp_path):
    from lorakit.train.run_precision import resolve_precision

    choice = resolve_precision(recipe(model_dir, tmp_path, "train.mixed_precision=bf16"))
    assert choice.name == "fp32" and "autocasts over float32 weights" in choice.reason


def test_qlora_computes_in_the_chosen_dtype(model_dir, tmp_path, monkeypatch):
    import lorakit.hf.quant as quant
    import lorakit.models
    from lorakit.precision import PrecisionChoice
    from lorakit.train.run import load_base

    seen = {}
    monkeypatch.setattr(quant, "bnb_4bit_config", lambda dtype: seen.setdefault("compute", dtype))
    monkeypatch.setattr(lorakit.models, "load_model_and_tokenizer",
                        lambda name, **kw: (seen.update(load=kw["dtype"]) or torch.nn.Linear(2, 2), None))
    cfg = recipe(model_dir, tmp_path, "model.load_in_4bit=true")
    load_base(cfg, PrecisionChoice("bf16", torch.bfloat16, "auto", "test"))
    assert seen == {"compute": torch.bfloat16, "load": torch.bfloat16}


def test_a_bf16_resume_is_exact_and_another_precision_is_refused(model_dir, tmp_path):
    full = train(recipe(model_dir, tmp_path / "a", "train.precision=bf16", "output.save_every=3", "output.keep_last=0"),
                 print_fn=lambda s: None)
    ckpt = tmp_path / "a" / "checkpoints" / "step-000003"
    with pytest.raises(TrainingError) as e:  # refused before the model loads
        train(recipe(model_dir, tmp_path / "b", "train.precision=fp32"), resume=ckpt, print_fn=lambda s: None)
    msg = str(e.value)
    assert "precision bf16" in msg and "set to fp32" in msg and "train.precision=auto" in msg
    assert not (tmp_path / "b").exists()
    # auto continues in the checkpoint's precision, and exactly where the uninterrupted run went
    resumed = train(recipe(model_dir, tmp_path / "b"), resume=ckpt, print_fn=lambda s: None)
    assert resumed.setup.precision.name == "bf16" and "checkpoint" in resumed.setup.precision.reason
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full.result.steps == resumed.result.steps == 6


def test_train_loop_refuses_a_checkpoint_of_another_precision_and_changes_nothing(tmp_path):
    from lorakit import LoraConfig, TaskType, get_peft_model
    from lorakit.train.config import config_from_dict
    from lorakit.train.loop import train_loop
    from tiny import pad_batch, tiny_examples, train_llama

    def model():
        torch.manual_seed(0)
        return get_peft_model(train_llama(0), LoraConfig(task_type=TaskType.CAUSAL_LM, r=4,
                                                        target_modules=["q_proj", "v_proj"]))

    base = ["train.progress=false", "train.batch_size=4", "output.tensorboard=false", "output.plot=false",
            "train.max_steps=4", "output.save_every=2"]
    bf16 = train_loop(model(), tiny_examples(8), pad_batch, config_from_dict({}, base + ["train.precision=bf16"]),
                      tmp_path, print_fn=lambda s: None)
    assert bf16.precision.name == "bf16"
    fp32 = model()  # a caller's float32 model under auto is trained as it is: float32
    before = {n: p.detach().clone() for n, p in fp32.named_parameters()}
    with pytest.raises(TrainingError, match="precision bf16.*set to fp32"):
        train_loop(fp32, tiny_examples(8), pad_batch, config_from_dict({}, base), tmp_path,
                   resume=tmp_path / "checkpoints" / "step-000002", print_fn=lambda s: None)
    assert all(torch.equal(p, before[n]) for n, p in fp32.named_parameters())


def test_data_parallel_processes_that_chose_differently_are_refused(monkeypatch):
    import accelerate.utils

    from lorakit.precision import PrecisionChoice
    from lorakit.train.run_precision import same_on_every_process

    class Accelerator:
        num_processes = 2

    choice = PrecisionChoice("bf16", torch.bfloat16, "auto", "measured")
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda names: ["bf16", "bf16"])
    same_on_every_process(Accelerator(), choice)
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda names: ["bf16", "fp32"])
    with pytest.raises(TrainingError, match=r"different precisions \(bf16, fp32\) under train.precision auto.*"
                                            r"--precision fp32"):
        same_on_every_process(Accelerator(), choice)
