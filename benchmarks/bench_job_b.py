"""Job b end to end, lorakit's loop vs peft + the plain loop of peft's example (issue 4, target 3).

    python benchmarks/bench_job_b.py --variants lorakit,peft   # target 3: 2 rounds in ABBA order
    python benchmarks/bench_job_b.py                       # all three variants, 3 epochs
    python benchmarks/bench_job_b.py --epochs 1 --variants lorakit,peft   # smoke run

The same job (RAFT twitter_complaints, 50 rows, the job_b_raft recipe's template and max_length 64, the
embedded SmolLM2-135M-Instruct) trained three ways on deep copies of one base model, from the same
initial LoRA weights (r=8, alpha 32, dropout 0.1 on q_proj/v_proj), with the same tokenised examples
(prompt + label + EOS, loss on label + EOS), epochs, batch size 8, AdamW lr / betas / weight decay,
seed, linear schedule with the recipe's warm-up and gradient clipping:

* ``lorakit``: ``lorakit.get_peft_model`` + ``lorakit.train.train_loop`` (the recipe's loop: batches of
  similar length padded to their own longest row, the LM head and the loss only at answer positions).
* ``peft``: ``peft.get_peft_model`` + a plain PyTorch loop set up as peft's example does it: every
  sequence LEFT-padded to max_length 64 once up front, labels -100 on prompt and padding, a shuffled
  DataLoader, ``model(**batch).loss`` (logits for all 64 positions), AdamW, linear schedule
  (``transformers.get_linear_schedule_with_warmup``). Gradient clipping to the recipe's
  ``max_grad_norm`` and ``use_cache=False`` are added so that only padding and the loss path differ.
* ``peft+lorakit-loop``: the peft model trained by lorakit's loop: shows that the loop, not the
  adapter implementation, decides speed and accuracy.

Rounds run in ABBA order (``--repeats``, default 2) and each variant's times are summed over its
rounds, so a slow or fast phase of a shared machine hits both alike. Each is scored with the same greedy ``lorakit.eval.classification_eval`` on the 50 training rows (as
peft's example reports it). Times are the training call only (no evaluation), wall and process CPU.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402

RAFT_CSV = common.ROOT.parent / "shared" / "data" / "raft" / "twitter_complaints" / "train.csv"
VARIANTS = ("lorakit", "peft", "peft+lorakit-loop")


def left_pad_all(examples: list[dict], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """peft example's preprocessing: every row left-padded (or cut) to ``length``; labels -100 on padding."""
    ids, mask, labels = [], [], []
    for ex in examples:
        x, y = list(ex["input_ids"])[-length:], list(ex["labels"])[-length:]
        n = length - len(x)
        ids.append([pad_id] * n + x)
        mask.append([0] * n + [1] * len(x))
        labels.append([-100] * n + y)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


def plain_loop(model, padded: dict[str, torch.Tensor], cfg, epochs: int) -> dict:
    """The training loop of peft's example (plus clipping, see the module docstring)."""
    from torch.utils.data import DataLoader
    from transformers import get_linear_schedule_with_warmup

    tc = cfg.train
    rows = [{k: v[i] for k, v in padded.items()} for i in range(len(padded["input_ids"]))]
    loader = DataLoader(rows, batch_size=tc.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(tc.seed))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=tc.warmup_steps,
                                            num_training_steps=len(loader) * epochs)
    torch.manual_seed(tc.seed)
    model.train()
    steps, tokens, loss = 0, 0, None
    for _ in range(epochs):
        for batch in loader:
            out = model(**batch, use_cache=False)
            out.loss.backward()
            if tc.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            steps += 1
            tokens += batch["input_ids"].numel()
            loss = out.loss.item()
    return {"steps": steps, "final_loss": loss, "tokens": tokens}


def lorakit_loop(model, examples: list[dict], collate, cfg, tmp: Path) -> dict:
    from lorakit.train import train_loop

    res = train_loop(model, examples, collate, cfg, tmp, print_fn=lambda s: None)
    return {"steps": res.steps, "final_loss": res.final_loss, "tokens": res.tokens, "fast_loss": res.fast_loss}


def wrap(impl: str, base, cfg):
    model = copy.deepcopy(base)
    targets = list(cfg.lora.target_modules)
    if impl == "peft":
        from peft import LoraConfig, get_peft_model
        return get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                                target_modules=targets, task_type="CAUSAL_LM"))
    import lorakit
    return lorakit.get_peft_model(model, lorakit.LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                                            lora_dropout=cfg.lora.dropout, target_modules=targets,
                                                            task_type="CAUSAL_LM"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(RAFT_CSV))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS}")
    p.add_argument("--rows", type=int, default=None, help="use only the first N rows (smoke runs)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=2,
                   help="rounds of all variants, in ABBA order; times are summed over rounds")
    args = p.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = sorted(set(variants) - set(VARIANTS))
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}; choose from {VARIANTS}")
    common.setup_threads(args.threads)
    print(common.machine_report(args.threads))
    print(f"load average at start: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")

    from lorakit.data import Collator, load_records, tokenize_records
    from lorakit.eval import classification_eval
    from lorakit.models import load_model_and_tokenizer
    from lorakit.train.recipe import load_recipe
    from lorakit.data.selection import make_template

    overrides = ["model=embedded", f"data.train={args.data}", "data.eval_fraction=0", f"train.epochs={args.epochs}",
                 f"train.lr={args.lr}", f"train.seed={args.seed}", f"lora.target_modules={args.targets}",
                 "train.progress=false", "output.plot=false", "output.tensorboard=false"]
    cfg = load_recipe("job_b_raft", overrides)
    print(f"recipe job_b_raft with --set {' --set '.join(overrides)}")
    print(f"lora r={cfg.lora.r} alpha={cfg.lora.alpha} dropout={cfg.lora.dropout} targets={list(cfg.lora.target_modules)}; "
          f"epochs={args.epochs} batch={cfg.train.batch_size} lr={cfg.train.lr} warmup={cfg.train.warmup_steps} "
          f"linear; max_grad_norm={cfg.train.max_grad_norm}; weight_decay={cfg.train.weight_decay}; seed={args.seed}")

    base, tok = load_model_and_tokenizer("embedded")
    base.config.use_cache = False
    template = make_template(cfg.data)
    records = list(load_records(args.data, label_column=cfg.data.label_column,
                                label_names=list(cfg.data.label_names) or None))[:args.rows]
    labels = tuple(cfg.data.label_names)
    data = tokenize_records(records, template, tok, cfg.data.max_length)
    examples = data.examples
    collate = Collator(tok.pad_token_id)
    padded = left_pad_all(examples, cfg.data.max_length, tok.pad_token_id)
    real = sum(len(e["input_ids"]) for e in examples)
    print(f"data: {len(examples)} rows, {real} real tokens (mean {real / len(examples):.1f}); peft-style padding "
          f"to {cfg.data.max_length} makes {padded['input_ids'].numel()} ({padded['input_ids'].numel() / real:.2f}x)")

    torch.manual_seed(args.seed)
    initial = wrap("lorakit", base, cfg)  # the shared starting LoRA weights
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_jobb_") as tmp:
        # untimed warm-up: one step of each loop, so first-call costs (allocator, accelerate, kernels) hit no one
        t = time.perf_counter()
        warm = load_recipe("job_b_raft", overrides + ["train.max_steps=1"])
        lorakit_loop(wrap("lorakit", base, cfg), examples[:8], collate, warm, Path(tmp) / "warmup")
        plain_loop(wrap("peft", base, cfg), {k: v[:8] for k, v in padded.items()}, cfg, 1)
        print(f"warm-up (one step of each loop, untimed): {time.perf_counter() - t:.0f}s")
        # rounds in ABBA order (lorakit, peft, peft, lorakit, ...): a slow or fast phase of a shared machine
        # then hits every variant alike; each variant's wall/CPU is the sum over its runs
        for rnd in range(args.repeats):
            for name in (variants if rnd % 2 == 0 else variants[::-1]):
                model = wrap("peft" if name.startswith("peft") else "lorakit", base, cfg)
                n = common.copy_lora_weights(initial, model)
                t, c = time.perf_counter(), time.process_time()
                if name == "peft":
                    r = plain_loop(model, padded, cfg, args.epochs)
                else:
                    r = lorakit_loop(model, examples, collate, cfg, Path(tmp) / f"{name}-{rnd}")
                r["wall"], r["cpu"] = time.perf_counter() - t, time.process_time() - c
                t = time.perf_counter()
                rep = classification_eval(model, tok, records, template, labels, batch_size=cfg.eval.batch_size)
                r["acc"], r["invalid"], r["eval_s"] = rep.accuracy, rep.n_invalid, time.perf_counter() - t
                prev = results.get(name)
                if prev is not None:  # same data order and seed each round: sum the times
                    r["wall"] += prev["wall"]
                    r["cpu"] += prev["cpu"]
                    r["rounds"] = prev["rounds"] + 1
                else:
                    r["rounds"] = 1
                results[name] = r
                print(f"{name:>18} (round {rnd + 1}): {n} LoRA tensors copied from the shared init; {r['steps']} steps, "
                      f"{r['tokens']} tokens fed, train {r['wall'] - (prev['wall'] if prev else 0):.1f}s wall "
                      f"({r['steps']} steps), final loss {r['final_loss']:.4f}; accuracy on the {rep.n} rows "
                      f"{r['acc']:.3f} ({r['invalid']} invalid; eval {r['eval_s']:.0f}s)"
                      + ("" if "fast_loss" not in r else f"; fast loss {'on' if r['fast_loss'] else 'OFF'}"))
                del model
    print(f"load average at end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    if "lorakit" in results:
        ours = results["lorakit"]
        for name, r in results.items():
            if name != "lorakit":
                goal = ("goal >= 2x", "goal: within 2") if name == "peft" else ("same loop: ~1x", "same loop")
                print(f"{name} / lorakit: wall {r['wall'] / ours['wall']:.2f}x, CPU {r['cpu'] / ours['cpu']:.2f}x "
                      f"({goal[0]}); accuracy {100 * (ours['acc'] - r['acc']):+.1f} points for lorakit ({goal[1]})")


if __name__ == "__main__":
    main()
