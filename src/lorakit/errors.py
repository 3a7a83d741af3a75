"""Exception types. Every message names the problem and how to fix it."""


class LoraError(ValueError):
    """Base class for lorakit errors caused by user input."""


class ConfigError(LoraError):
    """A LoraConfig field (or a recipe value) is invalid."""


class TargetError(LoraError):
    """target_modules matched nothing, or a module cannot be wrapped."""


class AdapterLoadError(LoraError):
    """An adapter on disk is corrupt, incomplete, or made for another model; nothing was changed."""


class ModelLoadError(LoraError):
    """A model or tokenizer cannot be found, converted or loaded."""


class DataError(LoraError):
    """A dataset file or row is malformed."""


class ExportError(LoraError):
    """An adapter or model cannot be written in a runtime's format (llama.cpp, Ollama) as asked."""


class TrainingError(RuntimeError):
    """Training had to stop (e.g. a NaN/inf loss)."""
