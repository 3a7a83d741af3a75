"""Load a recipe (file or shipped name) into a TrainConfig, applying --set overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from lorakit.errors import ConfigError
from lorakit.train.config import TrainConfig, config_from_dict


def read_yaml(path: Path) -> dict:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"recipe {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8 "
                          f"(a recipe is a YAML file)") from None
    except OSError as e:
        raise ConfigError(f"recipe {path} cannot be read ({e.strerror or e}); check the path and its "
                          f"permissions") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"recipe {path} is nested too deeply to be a recipe; check the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections (model, data, lora, ...), "
                          f"got {type(data).__name__}")
    return data


def load_recipe(path_or_name: str | Path, overrides: Iterable[str] = ()) -> TrainConfig:
    """Read a recipe file or shipped recipe name; ``overrides`` are ``"section.key=value"`` strings."""
    from lorakit.recipes import resolve_recipe

    path = resolve_recipe(path_or_name)
    data = read_yaml(path)
    try:
        return config_from_dict(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def dump_recipe(cfg: TrainConfig, path: Path, comment: str | None = None) -> None:
    """The resolved recipe as YAML; ``comment`` (e.g. the precision the run chose) heads it as ``# `` lines,
    so the file says what the run used and still loads as the same recipe."""
    import yaml

    from lorakit.io import atomic_write_text

    head = "".join(f"# {line}\n" for line in comment.splitlines()) if comment else ""
    atomic_write_text(path, head + yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))
