"""A short multi-turn chat_sft run on the embedded SmolLM2-135M lowers the loss on the held-out conversations'
assistant replies (the only labelled tokens), and the adapter folder carries the chat template."""
import pytest


@pytest.mark.slow
def test_chat_sft_lowers_the_heldout_assistant_loss(tmp_path):
    from lorakit.constants import IGNORE_INDEX
    from lorakit.data.chat_template import load_chat_template
    from lorakit.eval import heldout_loss
    from lorakit.train import load_recipe
    from lorakit.train.run import prepare, train

    cfg = load_recipe("chat_sft", ["data.max_train_samples=32", "data.max_eval_samples=8", "train.batch_size=4",
                                   "train.max_steps=6", "output.tensorboard=false", "output.plot=false",
                                   "train.progress=false", f"output.dir={tmp_path}"])
    setup = prepare(cfg)
    # the labelled tokens are exactly the replies: as many <|im_end|> among them as there are assistant turns
    im_end = setup.tokenizer.convert_tokens_to_ids("<|im_end|>")
    n_replies = sum(len([t for t in r["conversations"] if t["from"] == "gpt"]) for r in setup.eval_records)
    assert sum(ex["labels"].count(im_end) for ex in setup.eval_data) == n_replies
    assert all(ex["labels"][0] == IGNORE_INDEX for ex in setup.eval_data)

    before = heldout_loss(setup.model, setup.eval_data, setup.collator)  # LoRA B starts at zero: the base model
    out = train(cfg, setup=setup, output_dir=tmp_path)
    after = heldout_loss(out.setup.model, setup.eval_data, setup.collator)
    assert before["tokens"] == after["tokens"] > 0
    assert after["loss"] < before["loss"] - 0.3, (before, after)
    assert load_chat_template(out.result.adapter_dir) == setup.tokenizer.chat_template
