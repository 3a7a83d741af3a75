"""lorakit demo: zero-shot accuracy -> LoRA fine-tuning -> fine-tuned accuracy, on the embedded model."""

from __future__ import annotations

import argparse

HELP = "the end-to-end demo on the embedded model (a few minutes on a laptop CPU)"
DESCRIPTION = """Runs the shipped `demo` recipe: the embedded SmolLM2-135M-Instruct learns to route short
support tickets to a queue (billing / shipping / technical / account).

It prints the zero-shot accuracy on the demo test split, trains a LoRA adapter with a progress bar,
prints the fine-tuned accuracy with a per-class table and a few example predictions, and says where
the adapter, the merged model and the loss plot were written (default outputs/demo/).

examples:
  lorakit demo
  lorakit demo --out /tmp/demo --set train.epochs=1"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="output folder (default: the recipe's output.dir, outputs/demo).")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the demo recipe (see `lorakit train --list-keys`).")
    p.add_argument("--examples", type=int, default=4, help="example predictions to print (default 4).")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from lorakit.cli.common import check_model_source, check_output_dir, load_recipe_checked

    overrides = list(args.overrides) + ([f"output.dir={args.out}"] if args.out else [])
    cfg = load_recipe_checked("demo", overrides, "--set" if not args.out else "--set/--out")
    check_output_dir(cfg.output.dir, "--out" if args.out else "output.dir")
    check_model_source(cfg.model.name, "model.name")
    t0 = time.time()
    print(f"== lorakit demo: {cfg.description}")
    print(f"loading {cfg.model.name} and the demo data ...", flush=True)

    from lorakit.eval import classification_eval
    from lorakit.train.run import prepare, train

    setup = prepare(cfg)
    labels = setup.label_names
    print(f"{len(setup.train_records)} training tickets, {len(setup.eval_records)} test tickets, "
          f"labels: {', '.join(labels)}")
    example = setup.template.render(setup.eval_records[0], setup.tokenizer)
    print(f"prompt format: {example[0]!r} -> {example[1]!r}")

    print("\n-- zero-shot (no adapter) --", flush=True)
    with setup.model.disable_adapter():
        zero = classification_eval(setup.model, setup.tokenizer, setup.eval_records, setup.template, labels,
                                   batch_size=cfg.eval.batch_size)
    print(f"zero-shot accuracy: {zero.accuracy:.1%} ({zero.n_invalid} of {zero.n} answers were not a label)")

    print("\n-- LoRA fine-tuning --", flush=True)
    from lorakit.train.outputs import RUN_OUTPUTS

    if any((Path(cfg.output.dir) / name).exists() for name in RUN_OUTPUTS):
        print(f"(replacing the previous demo run in {cfg.output.dir})")
    outputs = train(cfg, setup=setup, overwrite=True)  # the demo's own folder: each run replaces the last
    res, report = outputs.result, outputs.report

    print("\n-- fine-tuned --")
    if report is not None:
        print(report.table())
        print(f"\naccuracy: zero-shot {zero.accuracy:.1%} -> fine-tuned {report.accuracy:.1%}")
        print("\nexamples:")
        for i in range(min(args.examples, report.n)):
            text = str(setup.eval_records[i].get(setup.template.text_column, ""))
            mark = "ok " if report.predictions[i] == report.references[i] else "XX "
            print(f"  {mark}{text[:90]!r}\n      -> {report.outputs[i].strip()!r} (gold {report.references[i]})")
    if res.eval.get("eval_loss") is not None:
        print(f"held-out loss {res.eval['eval_loss']:.4f} (perplexity {res.eval['eval_perplexity']:.3f})")
    print(f"\ntrained {res.steps} steps on {res.tokens:,d} tokens in {res.seconds:.0f}s "
          f"({res.tokens / max(res.seconds, 1e-9):.0f} tokens/s); whole demo {time.time() - t0:.0f}s")
    print(f"adapter (PEFT format): {res.adapter_dir}")
    if outputs.merged_dir:
        print(f"merged model:          {outputs.merged_dir}  (AutoModelForCausalLM.from_pretrained loads it)")
    if res.loss_plot:
        print(f"loss plot:             {res.loss_plot}")
    print(f"metrics:               {res.output_dir / 'metrics.jsonl'} (TensorBoard: {res.output_dir / 'tb'})")
    print(f"\ntry it: lorakit generate --adapter {res.adapter_dir} "
          f"--prompt {example[0]!r}")
    return 0
