"""LoRA+ vs plain LoRA on job b's data: the training loss after the same steps, and the accuracy reached.

    python benchmarks/bench_loraplus.py                      # ratio 16, 3 epochs, q_proj,v_proj
    python benchmarks/bench_loraplus.py --ratios 1,4,16 --lr 2e-3
    python benchmarks/bench_loraplus.py --epochs 1 --rows 16  # smoke run

The job_b_raft recipe (RAFT twitter_complaints, its template, max_length 64, the embedded
SmolLM2-135M-Instruct) trained by lorakit's loop once per ``train.loraplus_lr_ratio`` (1 = plain LoRA,
whose optimizer is plain AdamW), from the same initial LoRA weights, the same examples, data order,
seed, schedule and clipping. Printed: the logged training loss at a few steps, the mean of the last
epoch's losses, and greedy classification accuracy on the training rows (as bench_job_b.py reports it).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402

RAFT_CSV = common.ROOT.parent / "shared" / "data" / "raft" / "twitter_complaints" / "train.csv"


def wrap(base, cfg):
    import lorakit

    return lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM"))


def train_one(base, initial, cfg, examples, collate, out: Path):
    """Train a fresh copy from ``initial``'s LoRA weights: (the model, the logged loss of every step)."""
    from lorakit.train import train_loop

    model = wrap(base, cfg)
    common.copy_lora_weights(initial, model)
    train_loop(model, examples, collate, cfg, out, print_fn=lambda s: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return model, [r["loss"] for r in rows if "loss" in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(RAFT_CSV))
    p.add_argument("--ratios", default="1,16", help="loraplus_lr_ratio values; 1 = plain LoRA")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--rows", type=int, default=None, help="use only the first N rows (smoke runs)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    common.setup_threads(args.threads)
    print(common.machine_report(args.threads))

    from lorakit.data import Collator, load_records, tokenize_records
    from lorakit.data.selection import make_template
    from lorakit.eval import classification_eval
    from lorakit.models import load_model_and_tokenizer
    from lorakit.train.recipe import load_recipe

    overrides = ["model=embedded", f"data.train={args.data}", "data.eval_fraction=0", f"train.epochs={args.epochs}",
                 f"train.lr={args.lr}", f"train.seed={args.seed}", f"lora.target_modules={args.targets}",
                 "train.progress=false", "output.plot=false", "output.tensorboard=false"]
    cfg0 = load_recipe("job_b_raft", overrides)
    base, tok = load_model_and_tokenizer("embedded")
    base.config.use_cache = False
    template = make_template(cfg0.data)
    records = list(load_records(args.data, label_column=cfg0.data.label_column,
                                label_names=list(cfg0.data.label_names) or None))[:args.rows]
    examples = tokenize_records(records, template, tok, cfg0.data.max_length).examples
    collate = Collator(tok.pad_token_id)
    print(f"recipe job_b_raft with --set {' --set '.join(overrides)}; {len(examples)} rows; lora r={cfg0.lora.r} "
          f"alpha={cfg0.lora.alpha} dropout={cfg0.lora.dropout}; batch {cfg0.train.batch_size}, warmup "
          f"{cfg0.train.warmup_steps}, linear schedule")
    torch.manual_seed(args.seed)
    initial = wrap(base, cfg0)  # the shared starting LoRA weights
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_loraplus_") as tmp:
        for ratio in [float(r) for r in args.ratios.split(",")]:
            extra = [] if ratio == 1 else [f"train.loraplus_lr_ratio={ratio}"]
            cfg = load_recipe("job_b_raft", overrides + extra)
            model, losses = train_one(base, initial, cfg, examples, collate, Path(tmp) / f"ratio-{ratio}")
            rep = classification_eval(model, tok, records, template, tuple(cfg.data.label_names),
                                      batch_size=cfg.eval.batch_size)
            results[ratio] = (losses, rep.accuracy)
            name = "plain LoRA" if ratio == 1 else f"LoRA+ ratio {ratio:g}"
            per_epoch = max(1, len(losses) // args.epochs)
            marks = sorted({0, len(losses) // 4, len(losses) // 2, 3 * len(losses) // 4, len(losses) - 1})
            print(f"{name:>18}: {len(losses)} steps; loss at steps "
                  + ", ".join(f"{i + 1}: {losses[i]:.4f}" for i in marks)
                  + f"; last epoch mean {sum(losses[-per_epoch:]) / len(losses[-per_epoch:]):.4f}; "
                  f"accuracy on the {rep.n} rows {rep.accuracy:.3f}")
    if 1.0 in results:
        plain = results[1.0][0]
        for ratio, (losses, acc) in results.items():
            if ratio != 1.0:
                print(f"LoRA+ {ratio:g} vs plain: final loss {losses[-1]:.4f} vs {plain[-1]:.4f}; accuracy "
                      f"{100 * (acc - results[1.0][1]):+.1f} points")


if __name__ == "__main__":
    main()
