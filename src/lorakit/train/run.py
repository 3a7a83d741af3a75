"""From a recipe to a trained adapter: load model + data, wrap with LoRA, run the loop, write outputs.

`prepare(cfg)` does everything up to the first step and returns a `Setup` (the CLI's `eval` and
`demo` reuse it); `train(cfg)` = prepare + train_loop + the final artefacts (adapter, merged model,
resolved recipe, loss plot). The precision (train.precision, see `train.run_precision`) is chosen before
the base loads, and the base is loaded straight in it; the resolved recipe's first line says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from lorakit.errors import DataError
from lorakit.io import atomic_save_pretrained
from lorakit.train.config import TrainConfig
from lorakit.train.loop import TrainResult, train_loop
from lorakit.train.outputs import clear_for_new_run, is_main_process


@dataclass
class Setup:
    """Everything a run needs, built from a recipe."""

    cfg: TrainConfig
    model: Any                      # LoraModel (or the base model for evaluation-only uses)
    tokenizer: Any
    template: Any
    train_records: list
    eval_records: list
    label_names: tuple
    train_data: Any = None          # TokenizedDataset
    eval_data: Any = None
    collator: Any = None
    notes: list = field(default_factory=list)   # what was truncated / dropped, for the user
    precision: Any = None           # the PrecisionChoice the base was loaded in


def load_base(cfg: TrainConfig, precision: Any = None):
    """(model, tokenizer) of the recipe's base, loaded straight in ``precision``'s dtype (a PrecisionChoice;
    None: ``resolve_precision(cfg)``), never as a float32 copy first; QLoRA computes in that dtype."""
    from lorakit.models import load_model_and_tokenizer
    from lorakit.train.run_precision import resolve_precision

    dtype = (precision or resolve_precision(cfg)).dtype
    if not cfg.model.load_in_4bit:
        return load_model_and_tokenizer(cfg.model.name, dtype=dtype, device="cpu",
                                        trust_remote_code=cfg.model.trust_remote_code)
    from lorakit.hf.quant import bnb_4bit_config, prepare_for_kbit_training

    model, tokenizer = load_model_and_tokenizer(
        cfg.model.name, dtype=dtype, device="cpu", trust_remote_code=cfg.model.trust_remote_code,
        quantization_config=bnb_4bit_config(dtype), device_map="cpu")
    return prepare_for_kbit_training(model), tokenizer


def lora_config(cfg: TrainConfig):
    from lorakit import LoraConfig, TaskType

    targets = list(cfg.lora.target_modules) if cfg.lora.target_modules else None
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                      lora_dropout=cfg.lora.dropout, target_modules=targets, bias=cfg.lora.bias,
                      use_rslora=cfg.lora.use_rslora, use_dora=cfg.lora.use_dora, modules_to_save=cfg.lora.modules_to_save,
                      base_model_name_or_path=cfg.model.name)


def prepare(cfg: TrainConfig, *, with_lora: bool = True, print_fn: Callable[[str], None] = print,
            records: Optional[Sequence[dict]] = None, eval_records: Optional[Sequence[dict]] = None,
            precision: Any = None) -> Setup:
    """Model, tokenizer, template and tokenized data for ``cfg``; ``records`` / ``eval_records`` (lists of
    dicts in memory) replace the recipe's data files (see ``lorakit.data.selection.recipe_records``).
    ``precision``: the PrecisionChoice to load the base in (None: ``resolve_precision(cfg)``, announced)."""
    import torch

    from lorakit.data import Collator, tokenize_records
    from lorakit.data.selection import make_template, recipe_records
    from lorakit.precision import announce
    from lorakit.train.run_precision import resolve_precision

    train_records, eval_records, labels = recipe_records(cfg.data, cfg.train.seed, need_labels=cfg.wants_accuracy,
                                                         records=records, eval_records=eval_records)
    if not train_records:
        where = "the records passed in" if records is not None else repr(cfg.data.train)
        raise DataError(f"no training records in {where}")
    precision = precision or resolve_precision(cfg)
    announce(precision, print_fn)
    model, tokenizer = load_base(cfg, precision)
    template = make_template(cfg.data)
    notes: list = []  # tokenize_records warns about truncated / dropped examples itself, naming the split
    train_data = tokenize_records(train_records, template, tokenizer, cfg.data.max_length, name="train")
    eval_data = (tokenize_records(eval_records, template, tokenizer, cfg.data.max_length, name="eval")
                 if eval_records else None)
    if with_lora:
        from lorakit import get_peft_model

        torch.manual_seed(cfg.train.seed)  # the LoRA A init
        model = get_peft_model(model, lora_config(cfg))
    return Setup(cfg=cfg, model=model, tokenizer=tokenizer, template=template, train_records=train_records,
                 eval_records=eval_records, label_names=labels, train_data=train_data, eval_data=eval_data,
                 collator=Collator(tokenizer.pad_token_id), notes=notes, precision=precision)


def accuracy_eval(setup: Setup) -> Callable[[Any], dict]:
    """An `extra_eval` for the loop: generation accuracy on the eval records (keeps the last report)."""
    from lorakit.eval import classification_eval

    def run(model: Any) -> dict:
        report = classification_eval(model, setup.tokenizer, setup.eval_records, setup.template, setup.label_names,
                                     batch_size=setup.cfg.eval.batch_size)
        run.last_report = report
        return {"eval_accuracy": report.accuracy}

    run.last_report = None
    return run


@dataclass
class RunOutputs:
    result: TrainResult
    setup: Setup
    merged_dir: Optional[Path] = None
    report: Any = None              # the last ClassificationReport, when accuracy was measured


def train(cfg: TrainConfig, *, resume: str | Path | None = None, output_dir: str | Path | None = None,
          setup: Optional[Setup] = None, print_fn: Callable[[str], None] = print,
          overwrite: bool = False) -> RunOutputs:
    """Run a recipe end to end; see the module docstring."""
    from lorakit.train.recipe import dump_recipe
    from lorakit.train.run_precision import checkpoint_precision, resolve_precision

    out = Path(output_dir or cfg.output.dir)
    main = is_main_process()  # data-parallel runs: only the main process writes files
    # before the model loads and before anything is written: a refused run costs nothing and changes nothing
    saved_precision = None
    if resume is None:
        clear_for_new_run(out, overwrite, remove=main)
    else:
        from lorakit.train.state import resolve_resume

        ckpt = resolve_resume(resume, out, report=lambda msg: None)  # a checkpoint to resume from (reported later)
        saved_precision = checkpoint_precision(ckpt)
    setup = setup or prepare(cfg, print_fn=print_fn, precision=resolve_precision(cfg, checkpoint=saved_precision))
    out.mkdir(parents=True, exist_ok=True)
    if main:
        dump_recipe(cfg, out / "recipe.yaml", comment=setup.precision.describe() if setup.precision else None)
    for note in setup.notes:
        print_fn(note)
    trainable, total = setup.model.get_nb_trainable_parameters()
    print_fn(f"model {cfg.model.name}: {trainable:,d} trainable of {total:,d} parameters "
             f"({100 * trainable / total:.3f}%); {len(setup.train_data)} train / "
             f"{len(setup.eval_data) if setup.eval_data is not None else 0} eval examples")
    extra = accuracy_eval(setup) if cfg.wants_accuracy and setup.eval_records else None
    result = train_loop(setup.model, setup.train_data.examples, setup.collator, cfg, out,
                        eval_examples=setup.eval_data.examples if setup.eval_data is not None else None,
                        extra_eval=extra, resume=resume, print_fn=print_fn, precision=setup.precision)
    if not main:
        return RunOutputs(result=result, setup=setup, report=extra.last_report if extra is not None else None)
    atomic_save_pretrained(setup.tokenizer.save_pretrained, result.adapter_dir or out)
    from lorakit.data.chat_template import save_chat_template

    save_chat_template(setup.tokenizer, result.adapter_dir or out)  # generate/chat/merge/export read it there
    merged_dir = save_merged(float32_model(setup, result, print_fn), setup.tokenizer, out / "merged") \
        if cfg.output.merge else None
    return RunOutputs(result=result, setup=setup, merged_dir=merged_dir,
                      report=extra.last_report if extra is not None else None)


def float32_model(setup: Setup, result: TrainResult, print_fn: Callable[[str], None]) -> Any:
    """The trained model to merge, in float32: the run's own when its base is float32; else (a bf16 / fp16
    or 4-bit base, which cannot hold the merged weights at full precision) the saved adapter (float32) on the
    base loaded again in float32. The merged model is float32 either way."""
    import torch

    cfg = setup.cfg
    if not cfg.model.load_in_4bit and all(p.dtype == torch.float32 for p in setup.model.parameters()
                                          if p.is_floating_point()):
        return setup.model
    from lorakit import LoraModel
    from lorakit.models import load_model_and_tokenizer

    why = "4-bit" if cfg.model.load_in_4bit else "half-precision"
    print_fn(f"merging the adapter into {cfg.model.name} loaded in float32 (the merged model is float32; the "
             f"run's {why} base is not merged into)")
    base, _ = load_model_and_tokenizer(cfg.model.name, dtype="float32", device="cpu",
                                       trust_remote_code=cfg.model.trust_remote_code)
    return LoraModel.from_pretrained(base, result.adapter_dir)


def save_merged(model: Any, tokenizer: Any, out_dir: Path) -> Path:
    """Fold the adapter into a copy of the weights and save a plain transformers model + tokenizer.

    The LoraModel stays usable: merge_and_unload works on the live model, so it is called last."""
    merged = model.merge_and_unload()

    def save(folder: str) -> None:
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    atomic_save_pretrained(save, out_dir)  # written in a temp folder, then moved in: never through a link
    return out_dir
