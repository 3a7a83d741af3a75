"""The seed's two jobs on real data with the embedded SmolLM2-135M-Instruct, through the shipped recipes.

    python benchmarks/real_data_jobs.py job-b                # RAFT twitter_complaints: train-set + 5-fold CV accuracy
    python benchmarks/real_data_jobs.py job-a                # alpaca-zh: held-out loss and generations before/after
    python benchmarks/real_data_jobs.py job-b --epochs 1 --folds 2 --quick   # smoke run

Both load the shipped recipe with ``--set`` overrides exactly as ``lorakit train`` does
(``lorakit.train.recipe.load_recipe``), build the model and data with ``lorakit.train.run.prepare`` and
train with ``lorakit.train.run.train``; the equivalent CLI command is printed. Cross-validation reuses the
one prepared model: before each fold the LoRA weights go back to their (seeded) initial values and the
fold's 40 records are tokenised with the recipe's template, so every fold starts from the same adapter.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402

SHARED = common.ROOT.parent / "shared" / "data"
RAFT_CSV = SHARED / "raft" / "twitter_complaints" / "train.csv"
ALPACA_ZH = SHARED / "alpaca" / "alpaca_zh_demo.json"
QUIET = ["train.progress=false", "output.plot=false", "output.tensorboard=false"]


def cli_command(recipe: str, overrides: list[str]) -> str:
    return "lorakit train " + recipe + "".join(f" --set {shlex.quote(o)}" for o in overrides)


def stratified_folds(labels: list[str], k: int, seed: int) -> list[list[int]]:
    """k disjoint index lists covering every row; each class is shuffled (seeded) and dealt round-robin,
    so every fold holds the class proportions up to one row."""
    folds: list[list[int]] = [[] for _ in range(k)]
    rng = random.Random(seed)
    slot = 0
    for label in sorted(set(labels)):
        rows = [i for i, l in enumerate(labels) if l == label]
        rng.shuffle(rows)
        for i in rows:
            folds[slot % k].append(i)
            slot += 1
    return [sorted(f) for f in folds]


def reset_lora(model, initial: dict) -> None:
    model.load_lora_state_dict({k: v.clone() for k, v in initial.items()})


def fold_setup(setup, train_records: list):
    from lorakit.data import tokenize_records

    data = tokenize_records(train_records, setup.template, setup.tokenizer, setup.cfg.data.max_length)
    return dataclasses.replace(setup, train_records=train_records, train_data=data, eval_records=[],
                               eval_data=None, notes=[])


# ---------------------------------------------------------------------------------------------------- job b


def job_b(args: argparse.Namespace) -> None:
    from lorakit.eval import classification_eval
    from lorakit.train.recipe import load_recipe
    from lorakit.train.run import prepare, train

    overrides = ["model=embedded", f"data.train={args.data}", "data.eval_fraction=0",
                 f"train.epochs={args.epochs}", f"train.lr={args.lr}", f"train.seed={args.seed}", *args.set]
    cfg = load_recipe("job_b_raft", overrides + QUIET)
    print(f"recipe: job_b_raft; equivalent CLI for (a): {cli_command('job_b_raft', overrides)}")
    print(f"lora r={cfg.lora.r} alpha={cfg.lora.alpha} dropout={cfg.lora.dropout} targets="
          f"{cfg.lora.target_modules or 'family default'}; epochs={cfg.train.epochs} lr={cfg.train.lr} "
          f"batch={cfg.train.batch_size} warmup={cfg.train.warmup_steps} max_length={cfg.data.max_length}")
    t_all = time.perf_counter()
    setup = prepare(cfg)
    model, tok = setup.model, setup.tokenizer
    records, labels = setup.train_records, setup.label_names
    initial = {k: v.detach().clone() for k, v in model.lora_state_dict().items()}
    print(f"data: {len(records)} rows from {args.data}; labels {list(labels)}; "
          f"counts {[sum(r[cfg.data.label_column] == l for r in records) for l in labels]}")

    def accuracy(recs) -> "object":
        return classification_eval(model, tok, recs, setup.template, labels, batch_size=cfg.eval.batch_size)

    with tempfile.TemporaryDirectory(prefix="jobb_") as tmp:
        # (a) zero-shot, then train on all rows and score those same rows (as the peft example reports it)
        t = time.perf_counter()
        zero = accuracy(records)
        print(f"\n(a) zero-shot accuracy on the {zero.n} rows: {zero.accuracy:.3f}  ({time.perf_counter() - t:.0f}s; "
              f"{zero.n_invalid} invalid; first outputs {zero.outputs[:3]!r})")
        t = time.perf_counter()
        out = train(cfg, setup=setup, output_dir=Path(tmp) / "all", print_fn=lambda s: None)
        t_train = time.perf_counter() - t
        rep = accuracy(records)
        print(f"(a) trained on all {len(records)} rows: {out.result.steps} steps in {t_train:.0f}s, final loss "
              f"{out.result.final_loss:.4f}; accuracy on those rows {rep.accuracy:.3f}")
        print(rep.table())

        # (b) stratified k-fold cross-validation, every fold from the same initial adapter
        if args.folds < 2:
            print(f"total wall time {time.perf_counter() - t_all:.0f}s (no cross-validation: --folds {args.folds})")
            return
        folds = stratified_folds([r[cfg.data.label_column] for r in records], args.folds, args.seed)
        accs = []
        for k, held in enumerate(folds):
            held_set = set(held)
            fs = fold_setup(setup, [r for i, r in enumerate(records) if i not in held_set])
            reset_lora(model, initial)
            t = time.perf_counter()
            res = train(cfg, setup=fs, output_dir=Path(tmp) / f"fold{k}", print_fn=lambda s: None).result
            t_fold = time.perf_counter() - t
            rep = accuracy([records[i] for i in held])
            accs.append(rep.accuracy)
            print(f"(b) fold {k + 1}/{len(folds)}: train {len(fs.train_records)} rows, {res.steps} steps, "
                  f"{t_fold:.0f}s, loss {res.final_loss:.4f}; held-out {rep.n} rows: accuracy {rep.accuracy:.3f} "
                  f"({round(rep.accuracy * rep.n)}/{rep.n}, {rep.n_invalid} invalid)")
        mean = sum(accs) / len(accs)
        sd = (sum((a - mean) ** 2 for a in accs) / max(len(accs) - 1, 1)) ** 0.5
        print(f"(b) {len(folds)}-fold CV accuracy: mean {mean:.3f} (sd {sd:.3f}) per fold "
              f"{[round(a, 3) for a in accs]}; majority-class baseline "
              f"{max(sum(r[cfg.data.label_column] == l for r in records) for l in labels) / len(records):.3f}")
    print(f"total wall time {time.perf_counter() - t_all:.0f}s")


# ---------------------------------------------------------------------------------------------------- job a


def generate(model, tok, template, records, max_new_tokens: int) -> list[str]:
    from lorakit.data import Collator
    from lorakit.data.tokenize import encode_prompt

    ids = encode_prompt(tok, [template.render(r, tok)[0] for r in records])
    batch = Collator(tok.pad_token_id, padding_side="left")([{"input_ids": x} for x in ids])
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model.train(was)
    return [tok.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]


def job_a(args: argparse.Namespace) -> None:
    from lorakit.data import Collator
    from lorakit.eval import heldout_loss
    from lorakit.train.recipe import load_recipe
    from lorakit.train.run import prepare, train

    overrides = ["model=embedded", f"data.train={args.data}", f"data.eval_fraction={args.eval_fraction}",
                 f"data.max_train_samples={args.train_samples}", f"lora.target_modules={args.targets}",
                 f"train.max_steps={args.steps}", f"train.lr={args.lr}", f"train.seed={args.seed}", *args.set]
    cfg = load_recipe("job_a_alpaca_zh", overrides + QUIET)
    print(f"recipe: job_a_alpaca_zh; equivalent CLI: {cli_command('job_a_alpaca_zh', overrides)}")
    print(f"lora r={cfg.lora.r} alpha={cfg.lora.alpha} dropout={cfg.lora.dropout} targets={list(cfg.lora.target_modules)}; "
          f"template {cfg.data.template}, max_length {cfg.data.max_length}; {cfg.train.max_steps} steps x batch "
          f"{cfg.train.batch_size} x grad_accum {cfg.train.grad_accum}, lr {cfg.train.lr} {cfg.train.scheduler}")
    t_all = time.perf_counter()
    setup = prepare(cfg)
    model, tok = setup.model, setup.tokenizer
    for note in setup.notes:
        print("note:", note)
    print(f"data: {len(setup.train_records)} train records ({len(setup.train_data)} kept, "
          f"{setup.train_data.n_truncated} cut to max_length), {len(setup.eval_records)} held out "
          f"({len(setup.eval_data)} kept, {setup.eval_data.n_truncated} cut; too-long answers lose their end, "
          f"as in the seed's notebook, and are dropped only when no answer token fits)")
    collate = Collator(tok.pad_token_id)
    shown = [setup.eval_records[i] for i in range(0, len(setup.eval_records), max(1, len(setup.eval_records) // 3))][:3]

    def report(when: str) -> dict:
        t = time.perf_counter()
        r = heldout_loss(model, setup.eval_data, collate, batch_size=8)
        print(f"[{when}] held-out loss {r['loss']:.4f}, perplexity {r['perplexity']:.2f} over {r['tokens']} answer "
              f"tokens ({time.perf_counter() - t:.0f}s)")
        gens = generate(model, tok, setup.template, shown, args.max_new_tokens)
        for rec, g in zip(shown, gens):
            print(f"[{when}] instruction: {rec['instruction']}{(' / ' + rec['input']) if rec.get('input') else ''}\n"
                  f"[{when}] generated:   {g!r}")
        return r

    before = report("before")
    no_eval = dataclasses.replace(setup, eval_data=None, eval_records=[])
    with tempfile.TemporaryDirectory(prefix="joba_") as tmp:
        t = time.perf_counter()
        res = train(cfg, setup=no_eval, output_dir=tmp, print_fn=lambda s: None).result
        print(f"trained {res.steps} steps ({res.steps * cfg.train.batch_size * cfg.train.grad_accum} examples, "
              f"{res.tokens} tokens) in {time.perf_counter() - t:.0f}s; last step loss {res.final_loss:.4f}")
    after = report("after")
    print(f"held-out loss {before['loss']:.4f} -> {after['loss']:.4f}, perplexity {before['perplexity']:.2f} -> "
          f"{after['perplexity']:.2f}; total wall time {time.perf_counter() - t_all:.0f}s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="job", required=True)
    b = sub.add_parser("job-b", help="RAFT twitter_complaints: train-set accuracy and k-fold CV")
    b.add_argument("--data", default=str(RAFT_CSV))
    b.add_argument("--epochs", type=float, default=3)
    b.add_argument("--lr", type=float, default=5e-3)
    b.add_argument("--folds", type=int, default=5, help="k of the k-fold CV; < 2 skips it")
    a = sub.add_parser("job-a", help="alpaca-zh: held-out loss/perplexity and generations before/after")
    a.add_argument("--data", default=str(ALPACA_ZH))
    a.add_argument("--eval-fraction", type=float, default=0.1, help="held out (seeded); 0.1 of 1000 = 100 records")
    a.add_argument("--train-samples", type=int, default=300)
    a.add_argument("--targets", default="q_proj,v_proj")
    a.add_argument("--steps", type=int, default=12)
    a.add_argument("--lr", type=float, default=2e-3)
    a.add_argument("--max-new-tokens", type=int, default=48)
    for s in (a, b):
        s.add_argument("--seed", type=int, default=42)
        s.add_argument("--threads", type=int, default=torch.get_num_threads())
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more recipe overrides")
    args = p.parse_args()
    common.setup_threads(args.threads)
    print(common.machine_report(args.threads))
    print(f"load average at start: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    (job_b if args.job == "job-b" else job_a)(args)


if __name__ == "__main__":
    main()
