"""Exported files in llama.cpp vs lorakit on the embedded model: logits agreement and the demo's accuracy.

    python benchmarks/export_llama_cpp.py [--adapter outputs/demo/adapter] [--work DIR]

With the adapter (default: the demo's, trained by `lorakit demo`) this
  1. exports it with `lorakit export` as a GGUF LoRA adapter (f32) and as merged GGUF models (f16, q8_0);
  2. measures top-1 agreement of the next-token logits at every position of the demo's test tickets
     (prompt + answer), lorakit vs llama.cpp: first the base alone (lorakit's dequantised weights vs
     llama.cpp's own Q4_1 GGUF, which also quantises activations), then base + adapter, the same adapter on
     the dequantised base written as float32 (no quantisation anywhere), then the merged files;
  3. classifies the demo's test tickets with lorakit (PEFT adapter) and in llama.cpp (the embedded model's
     GGUF + the exported adapter; the merged GGUF), all through lorakit.eval.classification_eval on the same
     token ids.
Needs llama-cpp-python (pip install 'lorakit[gguf-check]').
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def agreement(ours: list[np.ndarray], theirs: list[np.ndarray]) -> float:
    """Share of positions where the two sides' highest-scoring next token is the same."""
    same = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ours, theirs))
    return same / sum(len(a) for a in ours)


def lorakit_logits(model, sequences: list[list[int]]) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0].float().numpy() for ids in sequences]


def demo_data():
    from lorakit.data.selection import make_template, recipe_records
    from lorakit.train.recipe import load_recipe

    cfg = load_recipe("demo")
    _, records, labels = recipe_records(cfg.data, cfg.train.seed, need_labels=True)
    return records, make_template(cfg.data), labels


def sequences_of(records, template, tokenizer) -> list[list[int]]:
    from lorakit.data.tokenize import encode_answer, encode_prompt

    out = []
    for rec in records:
        prompt, answer = template.render(rec, tokenizer)
        out.append(encode_prompt(tokenizer, [prompt])[0] + encode_answer(tokenizer, [answer])[0])
    return out


def export_all(adapter: str, work: Path) -> dict[str, Path]:
    from lorakit.cli.main import main

    files = {"adapter": work / "adapter.gguf", "merged-f16": work / "merged-f16.gguf",
             "merged-q8_0": work / "merged-q8_0.gguf", "base-f32": work / "base-f32.gguf"}
    for what, path in files.items():
        to, outtype = ("gguf", "f32") if what == "adapter" else ("gguf-merged", what.split("-")[1])
        with_adapter = ["--adapter", adapter] if what != "base-f32" else []
        code = main(["export", "--model", "embedded", *with_adapter, "--to", to, "--out", str(path),
                     "--outtype", outtype, "--overwrite"])
        if code:
            sys.exit(f"export --to {to} failed")
    return files


def agreement_rows(lora, files, seqs, threads: int) -> None:
    from lorakit.export.llama_cpp import LlamaCppModel
    from lorakit.models import embedded_gguf_path

    def cpp_logits(model, lora_file=None, **kw):
        m = LlamaCppModel(model, lora_file, n_threads=threads, **kw)
        out = [m.logits(s) for s in seqs]
        m.close()
        return out

    with lora.disable_adapter():  # the base alone (from_pretrained wrapped the base model in place)
        base_ours = lorakit_logits(lora, seqs)
    ad_ours = lorakit_logits(lora, seqs)
    base_cpp = cpp_logits(embedded_gguf_path())
    ad_cpp = cpp_logits(embedded_gguf_path(), files["adapter"])
    print("\ntop-1 agreement of next-token logits, lorakit vs llama.cpp")
    print(f"  base alone (Q4_1 GGUF):                              {agreement(base_ours, base_cpp):.4f}")
    print(f"  Q4_1 base + exported adapter (f32):                  {agreement(ad_ours, ad_cpp):.4f}")
    exact = cpp_logits(files["base-f32"], files["adapter"], f32_cache=True)
    print(f"  float32 base (dequantised) + adapter, float32 cache: {agreement(ad_ours, exact):.4f}")
    for name in ("merged-f16", "merged-q8_0"):
        print(f"  {name + ' GGUF:':52s} {agreement(ad_ours, cpp_logits(files[name])):.4f}")
    print(f"  adapter effect: top-1 changed at {1 - agreement(base_ours, ad_ours):.1%} of positions (lorakit), "
          f"{1 - agreement(base_cpp, ad_cpp):.1%} (llama.cpp)")


def accuracy_rows(lora, tokenizer, files, records, template, labels, threads: int) -> None:
    from lorakit.eval import classification_eval
    from lorakit.export.llama_cpp import LlamaCppModel
    from lorakit.models import embedded_gguf_path

    print("\ndemo test accuracy (classification_eval, same prompts and ids)")
    rows = [("lorakit, PEFT adapter", lambda: lora),
            ("llama.cpp, Q4_1 GGUF + exported adapter",
             lambda: LlamaCppModel(embedded_gguf_path(), files["adapter"], n_threads=threads))]
    rows += [(f"llama.cpp, {name} GGUF", lambda name=name: LlamaCppModel(files[name], n_threads=threads))
             for name in ("merged-f16", "merged-q8_0")]
    for name, make in rows:
        model = make()
        report = classification_eval(model, tokenizer, records, template, labels, batch_size=16)
        print(f"  {name:42s} {report.accuracy:.1%}  ({report.n_invalid} answers not a label)", flush=True)
        if isinstance(model, LlamaCppModel):
            model.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", default="outputs/demo/adapter")
    p.add_argument("--work", default=None, help="folder for the exported files (default: a temporary one)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip", choices=("agreement", "accuracy"), help="leave one of the two parts out")
    args = p.parse_args()
    print(f"$ python {' '.join(sys.argv)}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}")
    from lorakit import LoraModel
    from lorakit.models import load_model_and_tokenizer

    work = Path(args.work or tempfile.mkdtemp(prefix="lorakit-export-"))
    work.mkdir(parents=True, exist_ok=True)
    files = export_all(args.adapter, work)
    base, tokenizer = load_model_and_tokenizer("embedded", dtype="float32")
    records, template, labels = demo_data()
    seqs = sequences_of(records, template, tokenizer)
    print(f"{len(records)} demo test tickets, {sum(map(len, seqs))} positions")
    t0 = time.time()
    lora = LoraModel.from_pretrained(base, args.adapter).eval()
    if args.skip != "agreement":
        agreement_rows(lora, files, seqs, args.threads)
    if args.skip != "accuracy":
        accuracy_rows(lora, tokenizer, files, records, template, labels, args.threads)
    print(f"\n({time.time() - t0:.0f} s; files in {work})")


if __name__ == "__main__":
    main()
