"""Write the multi-turn chat demo set: an online shop's support assistant, "Kit", in short conversations.

    python -m lorakit.data.builtin.make_chat_data     # rewrites chat_train.jsonl / chat_test.jsonl

Every conversation has two or three user/assistant exchanges: the customer names a problem with an item,
Kit asks for the order number in its own words, the customer gives it, and Kit answers with the order
number and the item from the earlier turns (so a reply depends on the whole conversation, not on the last
message only); sometimes the customer thanks Kit and gets a closing line. Half the conversations start
with Kit's system message. The training file is in OpenAI's ``messages`` format, the test file in
ShareGPT's ``conversations`` format, to show that ``data.template=chat`` reads both.

The output is a pure function of SEED: rerunning the script reproduces the committed files byte for byte.
The test conversations are about items (TEST_ITEMS) and order numbers that no training conversation has:
Kit must copy them from the conversation.
"""
from __future__ import annotations

import random
from pathlib import Path

from lorakit.data.builtin.make_demo_data import to_jsonl, write_splits  # noqa: F401 (to_jsonl: the tests compare with it)

SEED = 20240612
N_TRAIN = 96
N_TEST = 24
HERE = Path(__file__).resolve().parent
TRAIN_FILE = "chat_train.jsonl"
TEST_FILE = "chat_test.jsonl"
SYSTEM = "You are Kit, the support assistant of the Lorashop online store. Answer in one or two short sentences."

ITEMS = ["desk lamp", "blender", "backpack", "keyboard", "coffee maker", "phone case", "router", "smart watch",
         "printer", "headphones"]
TEST_ITEMS = ["kettle", "yoga mat"]
# problem -> (what the customer says, how Kit answers once it knows the order)
PROBLEMS = {
    "late": ("My {item} has not arrived yet.",
             "Thanks! Order {ref} with your {item} left our warehouse yesterday and arrives within two days."),
    "broken": ("The {item} I got is broken.",
               "Sorry about that! I have started a free replacement of the {item} from order {ref}; it ships "
               "today."),
    "return": ("I want to return my {item}.",
               "No problem. I have emailed you a return label for the {item} from order {ref}; you get a refund "
               "once it is back."),
    "wrong": ("You sent me the wrong {item}.",
              "My apologies! The right {item} for order {ref} ships today; keep the wrong one."),
    "address": ("Can I still change the delivery address for my {item}?",
                "Yes. Reply with the new address and I will update order {ref} before the {item} ships."),
}
GREETINGS = ["", "Hi! ", "Hello, ", "Hey. ", "Good morning. "]
ASK_REF = "I can help with your {item}. What is your order number?"
GIVE_REF = ["It is {ref}.", "Order {ref}.", "The number is {ref}.", "{ref}", "Sure, it's {ref}."]
THANKS = ["Thanks!", "Great, thank you.", "Perfect, thanks a lot."]
CLOSING = "You're welcome! Anything else about order {ref}, just ask."


def _conversation(problem: str, item: str, ref: str, rng: random.Random) -> list[dict]:
    """One conversation as OpenAI messages."""
    ask, answer = PROBLEMS[problem]
    greeting = rng.choice(GREETINGS)
    opening = ask.format(item=item)
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
    messages += [
        {"role": "user", "content": greeting + (opening[0].lower() + opening[1:] if greeting.endswith(", ")
                                                else opening)},
        {"role": "assistant", "content": ASK_REF.format(item=item)},
        {"role": "user", "content": rng.choice(GIVE_REF).format(ref=ref)},
        {"role": "assistant", "content": answer.format(item=item, ref=ref)},
    ]
    if rng.random() < 0.4:
        messages += [{"role": "user", "content": rng.choice(THANKS)},
                     {"role": "assistant", "content": CLOSING.format(ref=ref)}]
    return messages


def _sharegpt(messages: list[dict]) -> list[dict]:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"from": names[m["role"]], "value": m["content"]} for m in messages]


def build_splits(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(train rows ``{"messages": [...]}``, test rows ``{"conversations": [...]}``)."""
    rng = random.Random(seed)
    picked = []
    for items, n in ((ITEMS, N_TRAIN), (TEST_ITEMS, N_TEST)):
        situations = [(p, item) for p in PROBLEMS for item in items]
        rng.shuffle(situations)
        picked += [situations[i % len(situations)] for i in range(n)]
    refs = rng.sample(range(10000, 100000), N_TRAIN + N_TEST)
    rows = [_conversation(p, item, f"LS-{ref}", rng) for (p, item), ref in zip(picked, refs)]
    train = [{"messages": m} for m in rows[:N_TRAIN]]
    test = [{"conversations": _sharegpt(m)} for m in rows[N_TRAIN:]]
    return train, test


def main(out_dir: Path = HERE) -> None:
    train, test = build_splits()
    write_splits({TRAIN_FILE: train, TEST_FILE: test}, out_dir, what="conversations")


if __name__ == "__main__":
    main()
