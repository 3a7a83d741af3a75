"""QLoRA on the CPU: bitsandbytes >= 0.45 runs 4-bit Linear layers without a GPU."""
import pytest
import torch

from lorakit import LoraConfig, LoraError, LoraModel, get_peft_model
from lorakit.hf.quant import bnb_4bit_config, is_quantized_model, prepare_for_kbit_training

from tiny import ids


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny4bit")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(d)
    return d


def _load4bit(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_4bit_config(), device_map="cpu")


def test_qlora_trains_saves_and_loads_on_full_precision_base(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM

    model = prepare_for_kbit_training(_load4bit(tiny_dir))
    assert is_quantized_model(model)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == 2 * 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 2 + (128 + 64))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    x = ids()
    pm.train()
    losses = []
    for _ in range(5):
        loss = pm(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with pytest.raises(LoraError, match="quantized"):
        pm.merge_adapter()
    pm.eval()
    with torch.no_grad():
        q_logits = pm(x).logits
    pm.save_pretrained(tmp_path)
    full = AutoModelForCausalLM.from_pretrained(tiny_dir)
    loaded = LoraModel.from_pretrained(full, tmp_path)
    with torch.no_grad():
        f_logits = loaded(x).logits
    # same adapter on the unquantised base: close, not equal (NF4 rounding of the base)
    assert (f_logits - q_logits).abs().max() < 0.5
    merged = loaded.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, f_logits, atol=1e-5, rtol=0)


def test_bad_quant_type():
    with pytest.raises(LoraError, match="quant_type"):
        bnb_4bit_config(quant_type="int3")


def test_peft_named_prepare_model_for_kbit_training():
    from lorakit import prepare_model_for_kbit_training
    from tiny import tiny_llama

    model = tiny_llama()
    assert prepare_model_for_kbit_training(model, use_gradient_checkpointing=False) is model
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="use_reentrant"):
        prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": True})


def test_evaluating_a_4bit_model_between_steps_keeps_gradients_and_weights(tiny_dir):
    # bitsandbytes repacks 4-bit weights for a CPU inference kernel without backward the first time a
    # layer runs in eval mode (on AVX512-BF16 CPUs, like the dev VM); lorakit must keep training exact,
    # including after the fused loss's own one-time check (an eval-mode forward)
    def run(eval_first, fused):
        model = prepare_for_kbit_training(_load4bit(tiny_dir), gradient_checkpointing=False)
        torch.manual_seed(1)
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
        x = ids()
        if eval_first:
            pm.eval()
            with torch.no_grad():
                pm(x)
        pm.train()
        pm(input_ids=x, labels=x, return_logits=not fused).loss.backward()
        state = {k: v.clone() for k, v in pm.model.state_dict().items() if "lora_" not in k}
        return {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}, state

    grads, weights = run(eval_first=False, fused=False)  # nothing ever ran in eval mode
    assert len(grads) == 28
    for eval_first, fused in [(True, False), (False, True)]:
        other, other_weights = run(eval_first, fused)
        assert other.keys() == grads.keys()
        for n, g in grads.items():
            torch.testing.assert_close(other[n], g, rtol=1e-4, atol=1e-6, msg=f"{n} eval_first={eval_first}")
        for k, v in weights.items():
            assert torch.equal(other_weights[k], v), k


def _packed_by_an_eval_forward(tiny_dir):
    """A 4-bit model run once in eval mode without grad: bitsandbytes repacks its layers for the CPU kernel."""
    from lorakit.hf import quant

    model = _load4bit(tiny_dir)
    model.eval()
    with torch.no_grad():
        model(ids())
    packed = [m for m in model.modules() if quant._is_packed(getattr(m, "weight", None))]
    if not packed:
        pytest.skip("bitsandbytes does not repack 4-bit weights on this CPU (no AVX512-BF16): nothing to unpack")
    return model, packed


def test_unpacking_without_bitsandbytes_private_inverse_gives_the_same_weights(tiny_dir, monkeypatch):
    # bitsandbytes' _convert_weight_packed_for_cpu_inverse is private: without it, its public state_dict()
    # path unpacks the weights, to the same bytes
    from lorakit.hf import quant

    assert quant._bnb_unpack_function() is not None  # this bitsandbytes has it: the first model uses it
    with_private, packed = _packed_by_an_eval_forward(tiny_dir)
    with pytest.warns(UserWarning, match=f"{len(packed)} 4-bit layers had been repacked"):
        quant.guard_cpu_4bit_training(with_private)
    monkeypatch.setattr(quant, "_bnb_unpack_function", lambda: None)
    public, _ = _packed_by_an_eval_forward(tiny_dir)
    calls = []
    monkeypatch.setattr(type(packed[0]), "state_dict", lambda self, *a, **k: calls.append(1) or
                        torch.nn.Module.state_dict(self, *a, **k))
    with pytest.warns(UserWarning, match=f"{len(packed)} 4-bit layers had been repacked"):
        quant.guard_cpu_4bit_training(public)
    assert len(calls) == len(packed)  # the fallback ran for every packed layer
    for (name, a), b in zip(with_private.named_modules(), public.modules()):
        if quant.quantized_kind(getattr(a, "weight", None)) == "bnb 4bit":
            assert not quant._is_packed(a.weight) and not quant._is_packed(b.weight), name
            assert torch.equal(a.weight.data, b.weight.data), name
            assert torch.equal(a.weight.quant_state.absmax, b.weight.quant_state.absmax), name


def test_a_packed_weight_that_cannot_be_unpacked_is_refused(tiny_dir, monkeypatch):
    from lorakit.hf import quant

    model, packed = _packed_by_an_eval_forward(tiny_dir)
    monkeypatch.setattr(quant, "_bnb_unpack_function", lambda: None)
    # a bitsandbytes whose save path keeps the packed layout: no way back to the training layout
    monkeypatch.setattr(type(packed[0]), "_save_to_state_dict", torch.nn.Module._save_to_state_dict)
    with pytest.raises(LoraError, match="cannot unpack it; load the model again and wrap it"):
        quant.guard_cpu_4bit_training(model)
