"""The bundled multi-turn demo set (chat_sft's data): reproducible, held-out items, fits the recipe."""
from importlib import resources

from lorakit.data import get_template, load_records, tokenize_records
from lorakit.data.builtin import make_chat_data as mk
from lorakit.train.recipe import load_recipe


def committed(name):
    return (resources.files("lorakit.data.builtin") / name).read_text(encoding="utf-8")


def test_the_script_reproduces_the_committed_files():
    train, test = mk.build_splits()
    assert committed(mk.TRAIN_FILE) == mk.to_jsonl(train) and committed(mk.TEST_FILE) == mk.to_jsonl(test)
    assert (len(train), len(test)) == (mk.N_TRAIN, mk.N_TEST)
    assert all(set(r) == {"messages"} for r in train) and all(set(r) == {"conversations"} for r in test)


def test_test_conversations_are_about_items_and_orders_training_never_saw():
    train, test = mk.build_splits()
    train_text, test_text = mk.to_jsonl(train), mk.to_jsonl(test)
    assert all(item not in train_text for item in mk.TEST_ITEMS)
    assert all(any(item in mk.to_jsonl([r]) for item in mk.TEST_ITEMS) for r in test)
    train_refs = {w.strip(".,") for r in train for m in r["messages"] for w in m["content"].split()
                  if w.startswith("LS-")}
    test_refs = {w.strip(".,") for r in test for m in r["conversations"] for w in m["value"].split()
                 if w.startswith("LS-")}
    assert test_refs and not train_refs & test_refs


def test_every_conversation_fits_the_recipe_whole(tokenizer):
    cfg = load_recipe("chat_sft")
    from lorakit.data.selection import resolve_source

    for source, n in ((cfg.data.train, mk.N_TRAIN), (cfg.data.eval, mk.N_TEST)):
        data = tokenize_records(load_records(resolve_source(source)), get_template("chat"), tokenizer,
                                cfg.data.max_length)
        assert len(data) == n and data.n_truncated == data.n_dropped == 0
        # two or three replies per conversation, each ending with the end-of-turn token
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert all(2 <= sum(1 for t in ex["labels"] if t == im_end) <= 3 for ex in data)
