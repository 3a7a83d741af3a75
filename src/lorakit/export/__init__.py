"""Export for runtimes that do not read PEFT folders: llama.cpp (GGUF adapter or merged GGUF model) and Ollama.

  arch.py            llama.cpp's architecture and tensor names for a transformers model; q/k row order
  source.py          an adapter folder read as LoRA pairs with lorakit's per-module scale
  gguf_adapter.py    the adapter as a GGUF LoRA adapter (scales llama.cpp does not know folded into B)
  gguf_merged.py     a merged model as one GGUF model file; vocab.py: its tokenizer
  tensors.py         f32 / f16 / q8_0 encodings; files.py: atomic writes, never over an existing output
  ollama_template.py the chat template as an Ollama TEMPLATE; ollama.py: the Modelfile
  checks.py          what llama.cpp, vLLM or Ollama would refuse or compute differently (lorakit inspect --check)
  run.py             lorakit export's three targets

Nothing heavy is imported here; each module imports gguf / torch / transformers where it needs them.
"""
