"""LoraModel.forward's fused causal-LM loss against the model's own loss, and which of the two ran."""
import warnings

import pytest
import torch

import lorakit
from lorakit import kernels
from lorakit.loss import fused_forward, lm_loss
from lorakit.loss.state import loss_state
from tiny import fused_and_own, ids, randomize_lora, tiny_bloom, tiny_gpt2, tiny_llama


@pytest.fixture(autouse=True)
def kernels_on():
    """The fused loss is a kernel: these tests compare it with the model's own, whatever LORAKIT_KERNELS says."""
    with kernels.enabled_as(True):
        yield


def _verdict(m):
    return loss_state(m).verdict


def _run(m, **kw):
    """(output of m(**kw), whether the model's own forward made it: its head ran over every position)."""
    head = m.model.get_output_embeddings()
    shapes = []
    handle = head.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(inp[0].shape[:2])))
    try:
        out = m(**kw)
    finally:
        handle.remove()
    own = tuple(kw["input_ids"].shape) in shapes
    assert own == (type(out).__name__ != "FusedLossOutput")  # the fused output never ran the head (yet)
    return out, own


def tiny_gptj():  # an LM head with a bias
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(0)
    return GPTJForCausalLM(GPTJConfig(vocab_size=100, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                      n_positions=64)).eval()


def tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                    num_attention_heads=4, max_position_embeddings=64,
                                    word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
                                    layerdrop=0.0)).eval()  # functional dropout the test cannot switch off


def _lora(model, **kw):
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    cfg.update(kw)
    m = lorakit.get_peft_model(model, lorakit.LoraConfig(**cfg))
    randomize_lora(m)
    return m


def _batch(masked=True):
    x = ids(3, 9)
    labels = x.clone()
    if masked:
        labels[:, :4] = -100  # prompt positions
    mask = torch.ones_like(x)
    mask[2, -2:] = 0
    labels[2, -2:] = -100
    return {"input_ids": x, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, tiny_bloom, tiny_gptj, tiny_opt])
@pytest.mark.parametrize("masked", [True, False])
def test_training_forward_with_labels_is_fused_and_equals_the_models_loss(make, masked):
    # the models' own dropout off (GPT-2 has some): LoRA dropout alone is checked with its masks below
    base = make()
    for mod in base.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    m = _lora(base).train()
    out, ref, fused, own = fused_and_own(m, _batch(masked))
    assert type(out).__name__ == "FusedLossOutput" and _verdict(m) is True
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)  # computed on reading, same values
    for n, g in own.items():
        torch.testing.assert_close(fused[n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_fused_output_reads_like_a_model_output_and_makes_logits_only_when_read():
    m = _lora(tiny_llama()).train()
    batch = _batch()
    m(**batch)  # the first call also checks the fused loss against the model's own forward
    head = m.model.get_output_embeddings()
    calls = []
    hook = head.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape))
    try:
        out = m(**batch)
        assert out[0] is out.loss and out["loss"] is out.loss
        assert out.hidden_states is None and out.attentions is None and out.past_key_values is None
        assert "logits" in out and not calls  # nothing computed the full logits yet
        logits = out.logits
        assert calls == [torch.Size([3, 9, 32])] and logits.shape == (3, 9, 100)
        assert out["logits"] is logits and out[1] is logits and out.to_tuple() == (out.loss, logits)
        assert len(calls) == 1  # computed once
        with pytest.raises(AttributeError, match="no attribute 'foo'"):
            out.foo
    finally:
        hook.remove()
    with torch.no_grad():
        m.eval()
        ref = m(**batch)
    m.train()
    torch.testing.assert_close(logits, ref.logits, rtol=0, atol=0)


def test_logits_read_from_the_fused_output_backpropagate_like_the_models_own():
    m = _lora(tiny_llama()).train()
    batch = _batch()

    def grads(**kw):
        out = m(**batch, **kw)
        (out.loss + out.logits.square().mean()).backward()
        g = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
        m.zero_grad()
        return g

    fused, own = grads(), grads(return_logits=True)
    for n, g in own.items():
        torch.testing.assert_close(fused[n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_with_dropout_the_fused_loss_is_reproducible_from_the_seed():
    m = _lora(tiny_llama(), lora_dropout=0.3).train()
    batch = _batch()
    losses = []
    for _ in range(2):
        torch.manual_seed(7)
        losses.append(m(**batch).loss)
    torch.manual_seed(8)
    other = m(**batch).loss
    assert losses[0].item() == losses[1].item() != other.item()


def test_with_dropout_fused_and_own_forward_draw_the_same_masks():
    # the body sees every position in both paths, so the same seed gives the same masks and the same loss
    m = _lora(tiny_llama(), lora_dropout=0.3).train()
    out, ref, fused, own = fused_and_own(m, _batch())
    assert type(out).__name__ == "FusedLossOutput"
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for n, g in own.items():
        torch.testing.assert_close(fused[n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_eval_no_labels_and_switched_off_keep_the_models_forward():
    m = _lora(tiny_llama())
    batch = _batch()
    assert _run(m.eval(), **batch)[1]
    m.train()
    assert _run(m, input_ids=batch["input_ids"])[1]
    with torch.no_grad():
        assert _run(m, **batch)[1]
    assert not _run(m, **batch)[1]  # training with labels: fused
    assert _run(m, **batch, output_hidden_states=True)[1]  # keys it does not handle
    assert _run(m, **batch, return_logits=True)[1]
    m.fused_loss = False
    assert _run(m, **batch)[1]


def test_kernels_off_runs_the_models_own_loss_without_deciding_anything():
    m = _lora(tiny_llama()).train()
    batch = _batch()
    with kernels.enabled_as(False):
        out, own = _run(m, **batch)
    assert own and _verdict(m) is None  # not checked, not refused: kernels were off
    fused, own = _run(m, **batch)
    assert not own and _verdict(m) is True
    torch.testing.assert_close(fused.loss, out.loss, rtol=1e-5, atol=1e-6)


def test_the_training_loop_and_the_forward_share_one_check(monkeypatch):
    calls = []
    real = lm_loss.check_fast_loss

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(lm_loss, "check_fast_loss", counting)
    monkeypatch.setattr(fused_forward, "check_fast_loss", counting)
    m = _lora(tiny_llama()).train()
    batch = _batch()
    total = lm_loss.LossComputer(m)(batch)
    assert calls == [1] and _verdict(m) is True
    out, own = _run(m, **batch)
    assert calls == [1] and not own  # the forward took the loop's verdict
    n = int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(out.loss, total / n, rtol=1e-5, atol=1e-6)
    loss_state(m).verdict = False  # a verdict against the fused loss holds for both too
    assert _run(m, **batch)[1] and not lm_loss.LossComputer(m).is_fast


def test_num_items_in_batch_divides_the_sum_as_hf_does():
    m = _lora(tiny_llama()).train()
    batch = _batch()
    n = int((batch["labels"][:, 1:] != -100).sum())
    mean = m(**batch).loss
    summed_over_more = m(**batch, num_items_in_batch=torch.tensor(2 * n)).loss
    torch.testing.assert_close(summed_over_more, mean / 2)


def test_not_a_causal_lm_task_is_left_alone():
    m = _lora(tiny_llama(), task_type="FEATURE_EXTRACTION").train()
    assert _run(m, **_batch())[1]


def test_router_loss_model_uses_its_own_loss():
    m = _lora(tiny_llama()).train()
    m.model.config.output_router_logits = True   # a mixture-of-experts model adding its router loss
    assert _run(m, **_batch())[1]


def test_logit_softcapping_model_uses_its_own_loss():
    m = _lora(tiny_llama(final_logit_softcapping=5.0)).train()
    assert _run(m, **_batch())[1] and _verdict(m) is False


def test_a_head_that_disagrees_is_caught_once_and_never_used():
    m = _lora(tiny_llama()).train()
    with torch.no_grad():
        m.model.lm_head.weight.mul_(1.0)
    real_forward = m.model.forward

    def shifted(*a, **k):  # a model whose own loss is not head(body(x)): the check must notice
        out = real_forward(*a, **k)
        out.loss = out.loss + 1.0
        return out

    m.model.forward = shifted
    with pytest.warns(UserWarning, match="fast loss"):
        out, own = _run(m, **_batch())
    assert _verdict(m) is False and own


def test_trainable_head_copy_gets_the_same_gradient():
    m = _lora(tiny_llama(), modules_to_save=["lm_head"]).train()
    out, ref, fused, own = fused_and_own(m, _batch())
    assert type(out).__name__ == "FusedLossOutput"
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    head = [n for n in fused if "modules_to_save" in n]
    assert head, "the lm_head copy should train"
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for n in fused:
        torch.testing.assert_close(fused[n], own[n], rtol=1e-4, atol=1e-6, msg=n)


def test_gradient_checkpointing_with_the_fused_loss():
    base = tiny_llama()
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m = _lora(base).train()
    out, ref, fused, own = fused_and_own(m, _batch())
    assert type(out).__name__ == "FusedLossOutput"
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for n in fused:
        torch.testing.assert_close(fused[n], own[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.fixture
def small_head_blocks(monkeypatch):
    """The one-pass head walks the 100-word vocabulary in 7 blocks (its running maximum rescales)."""
    from lorakit.kernels import cross_entropy

    monkeypatch.setattr(cross_entropy, "_VOCAB_BLOCK", 16)


def _bf16_lora():
    """train.precision bf16 on a tiny Llama: the base (head included) in bfloat16, lorakit's adapters float32."""
    m = _lora(tiny_llama().to(torch.bfloat16)).train()
    assert {p.dtype for p in m.parameters() if p.requires_grad} == {torch.float32}
    assert m.model.lm_head.weight.dtype == torch.bfloat16
    return m


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_bfloat16_model_with_float32_adapters_takes_the_fused_loss_and_equals_its_own(small_head_blocks):
    m = _bf16_lora()
    out, ref, fused, own = fused_and_own(m, _batch())
    assert type(out).__name__ == "FusedLossOutput" and _verdict(m) is True
    assert out.loss.dtype == torch.float32 and ref.loss.dtype == torch.float32
    assert out.logits.dtype == ref.logits.dtype == torch.bfloat16
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=2 ** -8, atol=1e-3)  # one bfloat16 rounding
    # the same model in float32 (the same base rounded to bfloat16 above, the same adapters): the fused
    # gradients are as close to its gradients as the bfloat16 model's own are (each ~1% off, bfloat16's
    # rounding through the body's backward), and within a few bfloat16 roundings of the model's own
    _, _, exact, _ = fused_and_own(_lora(tiny_llama()).train(), _batch())
    assert set(fused) == set(own) == set(exact) and fused
    for n in fused:
        assert fused[n].dtype == torch.float32 and exact[n].norm() > 0, n
        assert _relative(fused[n], own[n]) < 3e-2, n
        assert _relative(fused[n], exact[n]) < 1.5 * _relative(own[n], exact[n]) + 5e-3, n


def test_the_check_asks_bfloat16_agreement_of_a_bfloat16_model(monkeypatch):
    """The first-batch check allows a bfloat16 model a few roundings of its loss (else bfloat16 would always
    fall back to the model's own loss), a float32 model its last digits, and refuses a real disagreement."""
    batch = _batch()
    real = lm_loss.hf_loss_sum
    models = {"float32": _lora(tiny_llama()).train(), "bfloat16": _bf16_lora()}
    assert lm_loss.check_tolerance(models["float32"]) == (1e-3, 1e-4)
    assert lm_loss.check_tolerance(models["bfloat16"]) == (2e-2, 1e-3)

    def verdict(name, factor):
        monkeypatch.setattr(lm_loss, "hf_loss_sum", lambda model, b: real(model, b) * factor)
        m = models[name]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ok = lm_loss.check_fast_loss(m, lm_loss.fast_path_parts(m), batch)
        assert ok == (not any("fast loss" in str(w.message) for w in caught))
        return ok

    assert verdict("float32", 1.0) and verdict("bfloat16", 1.0)
    assert verdict("bfloat16", 1 + 2 ** -7) and not verdict("float32", 1 + 2 ** -7)  # two bfloat16 roundings
    assert not verdict("bfloat16", 1.1) and not verdict("float32", 1.1)


def test_bfloat16_loss_computer_skips_rows_and_equals_the_models_own_loss(small_head_blocks):
    """The training loop's fused loss on a bfloat16 model: feed-forward blocks on the read rows only, the
    one-pass head; the sum and the adapters' gradients as the model's own loss gives them."""
    m = _bf16_lora()
    batch = _batch()
    comp = lm_loss.LossComputer(m)
    act = m.model.model.layers[-1].mlp.act_fn  # inside the last feed-forward block (a hook on a LoRA layer
    seen = []                                  # would change its route)
    handle = act.register_forward_pre_hook(lambda mod, args: seen.append((tuple(args[0].shape), args[0].dtype)))
    try:
        total = comp(batch)
    finally:
        handle.remove()
    assert comp.is_fast and _verdict(m) is True
    n = int((batch["labels"][:, 1:] != -100).sum())
    assert seen[-1] == ((1, n, 64), torch.bfloat16)  # the training step's last block: the labelled rows only
    fused = _grads_of(m, total / n)
    own_total = lm_loss.hf_loss_sum(m, batch)
    torch.testing.assert_close(total, own_total, rtol=2 ** -8, atol=1e-3)
    own = _grads_of(m, own_total / n)
    assert set(fused) == set(own) and fused
    for name in own:
        assert _relative(fused[name], own[name]) < 3e-2, name


def test_fused_output_logits_survive_accelerates_mixed_precision_wrapper():
    from accelerate.utils.operations import convert_to_fp32  # what prepare()'s mixed-precision forward applies

    m = _lora(tiny_llama()).train()
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = convert_to_fp32(m(**batch))  # rebuilt from its items to cast them to float32
    assert type(out).__name__ == "FusedLossOutput"
    assert out.logits.shape == (3, 9, 100) and out.logits.dtype == torch.float32


def test_first_batch_without_labelled_tokens_does_not_switch_the_fused_loss_off():
    m = _lora(tiny_llama()).train()
    batch = _batch()
    empty = dict(batch, labels=torch.full_like(batch["labels"], -100))
    m(**empty)
    assert _verdict(m) is None  # undecided, not False
    out = m(**batch)
    assert _verdict(m) is True and type(out).__name__ == "FusedLossOutput"


def test_length_one_rows_with_labels_keep_the_models_own_loss():
    m = _lora(tiny_llama()).train()
    x = ids(2, 1)
    out = m(input_ids=x, labels=x)  # nothing to predict: the model's own (NaN) loss, as HF and peft
    assert out.logits.shape == (2, 1, 100) and torch.isnan(out.loss)


def test_per_row_adapters_in_training_with_labels_use_the_models_own_forward():
    m = _lora(tiny_llama(), modules_to_save=["lm_head"])
    m.add_adapter("b", lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    randomize_lora(m)
    batch = _batch()
    rows = ["__base__", "b", "default"]
    m.eval()
    with torch.no_grad():
        want = m(**batch, adapter_names=rows).loss
    m.train()
    out = m(**batch, adapter_names=rows)
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()  # the active adapter trains; its rows' gradient reaches it
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.named_parameters() if ".default." in n)


def _grads_of(m, loss):
    m.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_loss_computer_through_a_data_parallel_wrapper_runs_the_fused_loss_inside_its_forward():
    m = _lora(tiny_llama()).train()
    batch = _batch()
    direct = lm_loss.LossComputer(m)(batch)
    want = _grads_of(m, direct)
    wrapped = torch.nn.DataParallel(m)  # on the CPU it calls the module as it is, as DDP's forward does
    seen = []
    wrapped.register_forward_hook(lambda mod, args, kwargs, out: seen.append(type(out).__name__), with_kwargs=True)
    comp = lm_loss.LossComputer(wrapped)
    assert comp.inner is m and comp.is_fast
    head = m.model.get_output_embeddings()
    full = []
    handle = head.register_forward_hook(lambda mod, inp, out: full.append(inp[0].shape[:2] == (3, 9)))
    try:
        via = comp(batch)
    finally:
        handle.remove()
    assert seen == ["FusedLossOutput"] and not any(full)  # the wrapper's forward ran, and it ran the fused loss
    torch.testing.assert_close(via, direct, rtol=1e-6, atol=1e-6)
    for n, g in _grads_of(m, via).items():
        torch.testing.assert_close(g, want[n], rtol=1e-5, atol=1e-7, msg=n)


def test_loss_computer_without_the_fast_path_runs_the_models_own_loss():
    m = _lora(tiny_llama()).train()
    batch = _batch()
    head = m.model.get_output_embeddings()
    full = []
    handle = head.register_forward_hook(lambda mod, inp, out: full.append(tuple(inp[0].shape[:2])))
    try:
        own = lm_loss.LossComputer(m, fast=False)(batch)
    finally:
        handle.remove()
    assert full == [(3, 9)]  # the head over every position: LoraModel.forward did not take its fused path
    n = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        torch.testing.assert_close(own / n, m(**batch, return_logits=True).loss, rtol=1e-6, atol=1e-6)


def test_a_saved_loss_tensor_does_not_carry_the_head_and_hidden_states(tmp_path):
    m = _lora(tiny_llama()).train()
    out = m(**_batch())
    path = tmp_path / "loss.pt"
    torch.save(out.loss, path)
    assert path.stat().st_size < 4096  # a scalar: not the [3, 9, 32] hidden states nor the head's weights
    assert torch.load(path, weights_only=False).shape == ()
