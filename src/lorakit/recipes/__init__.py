"""The shipped recipes (YAML files next to this module) and name -> path resolution."""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import ConfigError

RECIPE_DIR = Path(__file__).resolve().parent


def list_recipes() -> list[str]:
    """Names of the shipped recipes (file names without .yaml)."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def resolve_recipe(path_or_name: str | Path) -> Path:
    """A recipe file: an existing path, or the name of a shipped recipe (`job_b_raft` or `job_b_raft.yaml`)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"recipe {str(path_or_name)!r} is a folder; pass a recipe YAML file or the name of a shipped "
                          f"recipe ({', '.join(list_recipes())})")
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if str(path_or_name) in (name, name + ".yaml"):
        shipped = RECIPE_DIR / f"{name}.yaml"
        if shipped.is_file():
            return shipped
    raise ConfigError(f"recipe {str(path_or_name)!r} not found: it is neither a file nor a shipped recipe. "
                      f"Shipped recipes: {', '.join(list_recipes())}")
