"""lorakit.precision: which arithmetic a run uses (auto | fp32 | bf16), chosen by measurement and cached."""
import json

import pytest
import torch

import lorakit
from lorakit.errors import ConfigError
from lorakit.precision import (PrecisionChoice, announce, apply_precision, choose_precision, cpu_facts,
                               measure_products, normalize_precision, shapes_of)
from tests.tiny import single_thread, tiny_llama  # noqa: F401

AMX = "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ZEN4 = "model name\t: AMD EPYC 9R14\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n"
OLD = "model name\t: Intel(R) Xeon(R) CPU E5-2686 v4\nflags\t\t: fpu sse avx2 fma\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\nCPU part\t: 0xd4f\n"


class Measure:
    """A stand-in for measure_products: bf16 ``speedup`` times faster than fp32; counts its calls."""

    def __init__(self, speedup):
        self.speedup, self.calls = speedup, 0

    def __call__(self, shapes):
        self.calls += 1
        return {"fp32": 1.0, "bf16": 1.0 / self.speedup}


def test_settings_and_their_aliases_and_a_clear_error():
    assert [normalize_precision(s) for s in ("auto", "FP32", "float32", "bf16", "bfloat16", "torch.bfloat16")] == \
        ["auto", "fp32", "fp32", "bf16", "bf16", "bf16"]
    with pytest.raises(ConfigError, match=r"unknown precision 'fp8'.*auto, fp32, bf16"):
        normalize_precision("fp8")


def test_cpu_facts_read_x86_and_arm_cpuinfo():
    assert cpu_facts(AMX).bf16_instructions == ("amx_bf16", "avx512_bf16")
    assert cpu_facts(ZEN4).model == "AMD EPYC 9R14"
    assert cpu_facts(OLD).bf16_instructions == ()
    assert cpu_facts(ARM).bf16_instructions == ("bf16",)


@pytest.mark.parametrize("speedup, picked", [(4.9, "bf16"), (2.0, "bf16"), (1.05, "fp32"), (0.33, "fp32")])
def test_auto_picks_the_measured_faster(tmp_path, speedup, picked):
    m = Measure(speedup)
    choice = choose_precision("auto", "cpu", [(64, 128)], measure=m, cache_dir=tmp_path, cpuinfo=AMX)
    assert (choice.name, m.calls) == (picked, 1)
    assert choice.dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[picked]
    assert f"{speedup:.2f}x" in choice.reason and "measured now" in choice.reason


def test_a_cpu_without_bf16_instructions_gets_fp32_without_measuring(tmp_path):
    m = Measure(10.0)
    choice = choose_precision("auto", "cpu", None, measure=m, cache_dir=tmp_path, cpuinfo=OLD)
    assert choice.name == "fp32" and m.calls == 0 and "no bf16 instructions" in choice.reason
    assert not (tmp_path / "precision.json").exists()


def test_the_measurement_is_cached_per_cpu_model_and_shapes(tmp_path):
    m = Measure(3.0)
    first = choose_precision("auto", "cpu", [(64, 128)], measure=m, cache_dir=tmp_path, cpuinfo=AMX)
    again = choose_precision("auto", "cpu", [(64, 128)], measure=m, cache_dir=tmp_path, cpuinfo=AMX)
    assert m.calls == 1 and first.name == again.name == "bf16" and "measured earlier" in again.reason
    choose_precision("auto", "cpu", [(64, 128)], measure=m, cache_dir=tmp_path, cpuinfo=ZEN4)  # another CPU
    choose_precision("auto", "cpu", [(64, 256)], measure=m, cache_dir=tmp_path, cpuinfo=AMX)  # other shapes
    assert m.calls == 3
    data = json.loads((tmp_path / "precision.json").read_text())
    assert len(data) == 3 and any("AMD EPYC 9R14" in k for k in data)


def test_a_corrupt_cache_is_measured_again_and_rewritten(tmp_path):
    (tmp_path / "precision.json").write_text("{not json")
    m = Measure(0.5)
    assert choose_precision("auto", "cpu", [(8, 8)], measure=m, cache_dir=tmp_path, cpuinfo=ZEN4).name == "fp32"
    assert m.calls == 1 and json.loads((tmp_path / "precision.json").read_text())
    # an entry with nonsense numbers is not trusted either
    key = next(iter(json.loads((tmp_path / "precision.json").read_text())))
    (tmp_path / "precision.json").write_text(json.dumps({key: {"fp32": -1, "bf16": "x"}}))
    choose_precision("auto", "cpu", [(8, 8)], measure=m, cache_dir=tmp_path, cpuinfo=ZEN4)
    assert m.calls == 2


def test_an_unwritable_cache_folder_still_chooses(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    m = Measure(2.0)
    assert choose_precision("auto", "cpu", [(8, 8)], measure=m, cache_dir=blocker / "sub", cpuinfo=AMX).name == "bf16"


def test_asked_for_is_taken_and_warns_where_slow(tmp_path):
    m = Measure(2.0)
    assert choose_precision("fp32", "cpu", measure=m, cpuinfo=AMX).name == "fp32"
    slow = choose_precision("bf16", "cpu", measure=m, cpuinfo=OLD)
    assert slow.name == "bf16" and "slower" in slow.reason and m.calls == 0


def test_cuda_takes_bf16_where_supported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_precision("auto", "cuda").name == "bf16"
    assert choose_precision("fp32", "cuda:0").name == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_precision("auto", "cuda").name == "fp32"
    with pytest.raises(ConfigError, match="does not support bfloat16"):
        choose_precision("bf16", "cuda")


def test_other_devices_default_to_fp32():
    assert choose_precision("auto", "meta").name == "fp32"


def test_shapes_from_a_module_and_from_a_config():
    model = tiny_llama()
    shapes = shapes_of(model)
    assert (32, 64) in shapes and (64, 32) in shapes and len(shapes) <= 4
    assert all(100 not in shape for shape in shapes)  # not the LM head (vocabulary 100)
    assert shapes_of(model.config)[:2] == [(32, 64), (64, 32)]
    assert shapes_of({"n_embd": 16}) == [(16, 64), (64, 16), (16, 16)]
    assert shapes_of({"text_config": {"hidden_size": 8, "intermediate_size": 24}})[0] == (8, 24)


def test_the_real_measurement_times_both_dtypes():
    seconds = measure_products([(32, 48)])
    assert set(seconds) == {"fp32", "bf16"} and all(v > 0 for v in seconds.values())


def test_announce_prints_once():
    said = []
    choice = PrecisionChoice("bf16", torch.bfloat16, "auto", "a test reason 123")
    announce(choice, said.append)
    announce(choice, said.append)
    assert said == ["precision: bf16 (auto: a test reason 123)"]


def test_apply_precision_casts_the_base_and_keeps_adapters_float32():
    base = tiny_llama()
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                            task_type="CAUSAL_LM"))
    bf16 = PrecisionChoice("bf16", torch.bfloat16, "bf16", "test")
    apply_precision(model, bf16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "lora_" not in n)
    inv_freq = [b for n, b in model.named_buffers() if n.endswith("inv_freq")]
    assert inv_freq and all(b.dtype == torch.float32 for b in inv_freq)
    model.train()
    ids = torch.randint(0, 100, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)
    # and back: everything float32 again, the adapters untouched
    a = next(p for n, p in model.named_parameters() if "lora_A" in n).detach().clone()
    apply_precision(model, PrecisionChoice("fp32", torch.float32, "fp32", "test"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(next(p for n, p in model.named_parameters() if "lora_A" in n), a)


def test_apply_precision_by_name_on_a_plain_model():
    model = apply_precision(tiny_llama(), "fp32")
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_generation_is_measured_as_generation_and_cached_apart(tmp_path):
    seen = []

    def measure(shapes, workload="train"):
        seen.append(workload)
        return {"fp32": 1.0, "bf16": 2.0 if workload == "generate" else 0.5}

    train = choose_precision("auto", "cpu", [(64, 128)], measure=measure, cache_dir=tmp_path, cpuinfo=ZEN4)
    gen = choose_precision("auto", "cpu", [(64, 128)], measure=measure, cache_dir=tmp_path, cpuinfo=ZEN4,
                           workload="generate")
    assert (train.name, gen.name) == ("bf16", "fp32") and seen == ["train", "generate"]
    assert "one-token" in gen.reason
    with pytest.raises(ConfigError, match="unknown workload"):
        choose_precision("auto", workload="serve")


def test_the_real_one_token_measurement_times_both_dtypes():
    seconds = measure_products([(32, 48)], rounds=2, workload="generate")
    assert set(seconds) == {"fp32", "bf16"} and all(v > 0 for v in seconds.values())


def test_apply_precision_keeps_what_transformers_keeps_float32():
    """T5 keeps its ``wo`` projections float32 in a half-precision model (``_keep_in_fp32_modules``); so does
    apply_precision, and the bf16 model still runs."""
    from tiny import batch_for, build

    model = lorakit.get_peft_model(build("t5"), lorakit.LoraConfig(r=4, target_modules=["q", "v", "wo"],
                                                                   task_type="SEQ_2_SEQ_LM"))
    assert "wo" in (type(model.model)._keep_in_fp32_modules or [])
    apply_precision(model, PrecisionChoice("bf16", torch.bfloat16, "bf16", "test"))
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if ".wo." in n)
    assert any(d == torch.bfloat16 for n, d in dtypes.items() if ".q." in n and "lora_" not in n)
    model.train()
    assert torch.isfinite(model(**batch_for("t5")).loss)
