from lorakit import LoraConfig, dry_run, get_peft_model

from tiny import tiny_gpt2, tiny_llama


def test_dry_run_counts_match_injection_and_change_nothing():
    model = tiny_llama()
    before = [n for n, _ in model.named_modules()]
    cfg = LoraConfig(r=4, target_modules="all-linear", modules_to_save=["lm_head"])
    report = dry_run(model, cfg)
    assert [n for n, _ in model.named_modules()] == before
    assert len(report.plan.targets) == 14
    pm = get_peft_model(model, cfg)
    assert pm.get_nb_trainable_parameters() == (report.trainable_params, report.all_params)
    table = report.table()
    assert "model.layers.1.mlp.down_proj" in table and "trainable params" in table and "adamw_state" in table


def test_dry_run_conv1d_shapes():
    report = dry_run(tiny_gpt2(), LoraConfig(r=2))
    t = report.plan.targets[0]
    assert (t.name, t.kind, t.in_features, t.out_features) == ("transformer.h.0.attn.c_attn", "conv1d", 32, 96)
    assert report.default_targets == ("c_attn",)
