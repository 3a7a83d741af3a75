"""Write the demo dataset: short customer-support tickets routed to one of four queues.

    python -m lorakit.data.builtin.make_demo_data        # rewrites demo_train.jsonl / demo_test.jsonl

Each row is ``{"text": ..., "label": ...}`` with label in LABELS (one short word). Tickets are built
from per-queue sentence templates with slot fillers, then given a greeting/closing shared by all
queues, so the queue is decided by what the ticket is about, not by how it is phrased. The output is
a pure function of SEED: rerunning the script reproduces the committed files byte for byte.

Splits are stratified (TRAIN_PER_LABEL / TEST_PER_LABEL rows per label) and the test split never
reuses a ticket *body* (template + fillers) seen in training, only the shared greetings/closings.
A 135M model asked zero-shot with ``Ticket : {text} Label : `` rarely answers with the queue name;
two epochs of LoRA learn the mapping.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path

SEED = 20240611
TRAIN_PER_LABEL = 75
TEST_PER_LABEL = 25
LABELS = ("billing", "shipping", "technical", "account")
HERE = Path(__file__).resolve().parent
TRAIN_FILE = "demo_train.jsonl"
TEST_FILE = "demo_test.jsonl"

FILLERS = {
    "amount": ["$12.99", "$49", "$120", "€35", "£18.50", "$7.25", "$230", "€99.99"],
    "amount2": ["$9.99", "$39", "$100", "€30", "£15", "$5"],
    "plan": ["Pro", "Basic", "Family", "Premium", "Team", "Starter"],
    "product": ["headphones", "blender", "phone case", "desk lamp", "router", "smart watch", "coffee maker",
                "backpack", "keyboard", "printer"],
    "gadget": ["router", "smart watch", "printer", "headphones", "keyboard", "speaker", "smart TV", "webcam"],
    "time": ["last week", "yesterday", "in March", "two days ago", "last month", "on Monday"],
    "card": ["Visa card", "Mastercard", "debit card", "PayPal payment", "credit card", "Amex card"],
    "code": ["SPRING20", "WELCOME10", "SAVE15", "FREESHIP", "VIP25"],
    "days": ["five", "ten", "twelve", "three", "eight", "fourteen"],
    "ref": ["A1042", "B7731", "C2290", "D5518", "E0934", "F6617", "G3385"],
    "place": ["Canada", "Berlin", "Norway", "Texas", "Brazil", "Osaka", "Dublin", "Lyon"],
    "device": ["iPhone", "Android phone", "laptop", "tablet", "Windows PC", "Mac"],
    "feature": ["the settings", "the dashboard", "the photo gallery", "the calendar", "the search", "the reports"],
    "errcode": ["500", "E-401", "0x80070005", "503", "TIMEOUT-7", "E-22"],
    "browser": ["Chrome", "Firefox", "Safari", "Edge"],
    "action": ["rotate the screen", "open a PDF", "start a video call", "switch tabs", "plug in a monitor"],
    "person": ["my wife", "my colleague", "my son", "an assistant", "my business partner"],
    "name": ["Maria Lopez", "Sam Chen", "Alex Kim", "Priya Shah", "Tom Berg"],
    "mailhost": ["gmail.com", "outlook.com", "yahoo.com", "proton.me", "icloud.com"],
    "user": ["mlopez88", "samchen", "alex.k", "priya_s", "tberg", "jdoe42"],
}

TEMPLATES = {
    "billing": [
        "I was charged twice for my {plan} subscription this month.",
        "My invoice shows {amount} but I expected {amount2}.",
        "Can I get a refund for the {product} I returned {time}?",
        "Why was my {card} declined when I tried to pay?",
        "There is an unknown charge of {amount} on my {card} statement.",
        "How do I switch the {plan} plan to annual billing?",
        "The promo code {code} was not applied to my bill.",
        "I need a receipt for the {amount} payment I made {time}.",
        "My refund of {amount} still has not reached my {card}.",
        "I cancelled the {plan} plan {time} but you billed me again.",
        "Please explain the extra fee of {amount} on this month's invoice.",
        "You charged {amount} for the {product} instead of the sale price.",
    ],
    "shipping": [
        "My {product} has not arrived and it has been {days} days.",
        "The tracking number for order {ref} shows no updates since {time}.",
        "Can I change the delivery address for order {ref} to {place}?",
        "The courier left my {product} at the wrong house.",
        "My {product} arrived in a crushed box and is damaged.",
        "How long does express delivery to {place} take?",
        "Do you deliver to {place} and what does postage cost?",
        "Order {ref} was sent to {place} instead of my home.",
        "Only half of order {ref} arrived, the {product} is missing.",
        "Can I collect my {product} from your depot in {place}?",
        "The parcel with my {product} is stuck in customs in {place}.",
        "The delivery driver never came {time} although I stayed home.",
    ],
    "technical": [
        "The app crashes every time I open {feature} on my {device}.",
        "I get error {errcode} when I try to sync my {device}.",
        "{feature} will not load in {browser}, the page stays white.",
        "Since the update my {device} cannot connect to the {gadget}.",
        "Push notifications stopped working on my {device} {time}.",
        "The {gadget} keeps dropping its wifi connection.",
        "Uploading files from my {device} fails with error {errcode}.",
        "The screen freezes whenever I {action}.",
        "Your API answers every request with error {errcode}.",
        "The app is very slow on my {device} and {feature} never finishes loading.",
        "Bluetooth pairing between my {device} and the {gadget} fails.",
        "The firmware update for my {gadget} stopped halfway with error {errcode}.",
    ],
    "account": [
        "I forgot my password and the reset email to my {mailhost} address never comes.",
        "How do I change the email address on my profile to my {mailhost} one?",
        "My login was locked after too many attempts {time}.",
        "Please close the account {user} and delete all my personal data.",
        "I want to add {person} as a second user on my profile.",
        "I cannot verify my phone number for two-factor sign in on my {device}.",
        "Someone signed in to my profile from {place} and it was not me.",
        "How can I change my username to {name}?",
        "Can I merge my second profile {user} into my main one?",
        "Please update the name on my profile to {name}.",
        "I lost my {device} with my authenticator app and cannot sign in.",
        "Please give {person} admin rights on my profile.",
        "My login stopped working after I changed my email {time}.",
        "Please reset the password for the login {user}.",
        "The username {user} is already taken, can I claim it?",
        "My profile still shows my old name instead of {name}.",
        "How do I remove {person} from my profile?",
        "Two-factor codes sent to my {device} are always rejected.",
        "I never got the verification email for my new profile at {mailhost}.",
    ],
}

OPENERS = ["", "", "", "Hi, ", "Hello, ", "Hey team, ", "Good morning. ", "Urgent: ", "Quick question: ",
           "Hi there. "]
CLOSERS = ["", "", "", " Thanks.", " Please help.", " Can someone look into this?", " This is frustrating.",
           " Thank you in advance.", " Any update would be great."]


def _expansions(template: str) -> list[str]:
    """Every distinct body one template can produce, first letter capitalised."""
    slots = re.findall(r"\{(\w+)\}", template)
    bodies = [template.format(**dict(zip(slots, values)))
              for values in itertools.product(*(FILLERS[slot] for slot in slots))]
    return [body[0].upper() + body[1:] for body in bodies]


def _bodies(label: str, count: int, rng: random.Random) -> list[str]:
    """`count` distinct ticket bodies for one label: round-robin over its templates, each drawing
    without replacement from its own shuffled expansions (templates without slots give one)."""
    pools = [_expansions(template) for template in TEMPLATES[label]]
    for pool in pools:
        rng.shuffle(pool)
    bodies: list[str] = []
    while len(bodies) < count:
        if not any(pools):
            raise RuntimeError(f"not enough distinct {label!r} tickets; add templates or fillers")
        for pool in pools:
            if pool and len(bodies) < count:
                bodies.append(pool.pop())
    return bodies


def _decorate(body: str, rng: random.Random) -> str:
    opener = rng.choice(OPENERS)
    if opener.endswith(", ") and not body.startswith("I "):  # "Hi, my parcel ..." mid-sentence
        body = body[0].lower() + body[1:]
    return opener + body + rng.choice(CLOSERS)


def build_splits(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(train rows, test rows), each shuffled; test bodies never occur in train."""
    rng = random.Random(seed)
    train: list[dict] = []
    test: list[dict] = []
    for label in LABELS:
        bodies = _bodies(label, TRAIN_PER_LABEL + TEST_PER_LABEL, rng)
        rng.shuffle(bodies)
        rows = [{"text": _decorate(body, rng), "label": label} for body in bodies]
        train += rows[:TRAIN_PER_LABEL]
        test += rows[TRAIN_PER_LABEL:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_splits(splits: dict[str, list[dict]], out_dir: Path, what: str = "rows") -> None:
    """Each split as a JSON-lines file in ``out_dir`` (the generators' one writer)."""
    for name, rows in splits.items():
        (out_dir / name).write_text(to_jsonl(rows), encoding="utf-8")
        print(f"wrote {len(rows)} {what} to {out_dir / name}")


def main(out_dir: Path = HERE) -> None:
    train, test = build_splits()
    write_splits({TRAIN_FILE: train, TEST_FILE: test}, out_dir)


if __name__ == "__main__":
    main()
