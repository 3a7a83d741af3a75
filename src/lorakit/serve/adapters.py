"""Which adapters the server serves: names, folders, chat templates; loading and unloading them.

The registry is read by request handlers and changed by the engine thread (which alone touches the
model), so it keeps its own lock. A name is *loading* from the moment a load is accepted until the
model holds it (requests for it get a 503), *ready* while it serves, and *unloading* from the unload
call until the last request using it has finished (new requests get a 404).

Run-time loads read only folders under ``--adapter-root``: the path is resolved (symlinks included) and
must stay inside the resolved root. Without a root, run-time loading is refused.
"""
from __future__ import annotations

import dataclasses
import os
import re
import threading
import warnings

from .errors import ApiError, bad_request

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")  # LoraModel's rule for adapter names


@dataclasses.dataclass(frozen=True)
class Adapter:
    name: str
    path: str                 # the folder as it was given (shown in /v1/models)
    template: str | None      # the chat template saved with the adapter, if any


class AdapterRegistry:
    def __init__(self, base_name: str, root: str | os.PathLike | None):
        self.base_name = base_name
        self.root = os.path.realpath(root) if root is not None else None
        self._lock = threading.Lock()
        self._ready: dict[str, Adapter] = {}
        self._loading: set[str] = set()
        self._unloading: set[str] = set()

    def adapters(self) -> list[Adapter]:
        with self._lock:
            return [a for n, a in self._ready.items() if n not in self._unloading]

    def lookup(self, model: str) -> Adapter | None:
        """The adapter a request's ``model`` names (None: the base); 404 / 503 when it cannot serve."""
        if model == self.base_name:
            return None
        with self._lock:
            if model in self._loading:
                raise ApiError(503, f"adapter {model!r} is still loading; retry in a moment", param="model",
                               code="model_loading")
            if model in self._ready and model not in self._unloading:
                return self._ready[model]
            names = [self.base_name] + [n for n in self._ready if n not in self._unloading]
        raise ApiError(404, f"the model {model!r} does not exist here; served: {', '.join(map(repr, names))} "
                            f"(GET /v1/models)", param="model", code="model_not_found")

    # -- load -------------------------------------------------------------------------------
    def runtime_path(self, lora_path: object) -> str:
        """The real folder a run-time load may read: inside --adapter-root, or an ApiError."""
        if self.root is None:
            raise ApiError(403, "loading adapters at run time is off: start the server with --adapter-root DIR to "
                                "allow folders under DIR (or pass --adapter NAME=DIR at start)", param="lora_path")
        if not isinstance(lora_path, str) or not lora_path or "\x00" in lora_path:
            raise bad_request("`lora_path` must be the adapter folder, a path inside the server's --adapter-root",
                              param="lora_path")
        real = os.path.realpath(os.path.join(self.root, lora_path))  # an absolute lora_path replaces the root
        if real != self.root and not real.startswith(self.root.rstrip(os.sep) + os.sep):
            raise ApiError(403, f"lora_path {lora_path!r} is outside the server's --adapter-root; adapters load "
                                f"only from folders under it", param="lora_path")
        return real

    def reserve(self, name: object) -> str:
        """Claim ``name`` for a load: a valid adapter name not served or loading yet."""
        if not isinstance(name, str) or not _NAME_RE.match(name) or name == "__base__":
            raise bad_request(f"`lora_name` {name!r} is not a valid adapter name: use letters, digits, '_' or '-'",
                              param="lora_name")
        with self._lock:
            if name == self.base_name or name in self._ready or name in self._loading:
                raise bad_request(f"the name {name!r} is already served (or loading); unload it first or pick "
                                  f"another lora_name", param="lora_name", code="name_taken")
            self._loading.add(name)
        return name

    def release(self, name: str, adapter: Adapter | None) -> None:
        """End a load: ``adapter`` now serves, or (None) the load failed and the name is free again."""
        with self._lock:
            self._loading.discard(name)
            if adapter is not None:
                self._ready[name] = adapter

    # -- unload -----------------------------------------------------------------------------
    def begin_unload(self, name: object) -> str:
        if name == self.base_name:
            raise bad_request("the base model cannot be unloaded", param="lora_name")
        with self._lock:
            if not isinstance(name, str) or name not in self._ready or name in self._unloading:
                raise ApiError(404, f"no adapter named {name!r} is loaded; GET /v1/models lists them",
                               param="lora_name", code="model_not_found")
            self._unloading.add(name)
        return name

    def finish_unload(self, name: str, removed: bool) -> None:
        with self._lock:
            self._unloading.discard(name)
            if removed:
                self._ready.pop(name, None)


def chat_template_of(folder: str | os.PathLike) -> str | None:
    """The chat template saved with an adapter (``data.chat_template``'s places), or None when it has none."""
    from ..data.chat_template import load_chat_template

    return load_chat_template(folder)


def attach(model, name: str, folder: str) -> tuple[object, list[str]]:
    """Load the adapter in ``folder`` as ``name``; (the model, now a LoraModel, and any warnings).

    The folder is checked completely (config, every key and shape) before the model changes, exactly
    as ``LoraModel.load_adapter`` checks it; a bad adapter changes nothing.
    """
    from ..model import LoraModel

    _refuse_dora(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if isinstance(model, LoraModel):
            model.load_adapter(folder, adapter_name=name)
            model._drop_route_caches()  # per-row weights gathered before the load are stale
        else:
            model = LoraModel.from_pretrained(model, folder, adapter_name=name)
    model.eval()
    return model, [str(w.message) for w in caught]


def _refuse_dora(folder: str) -> None:
    """A DoRA adapter cannot take part in per-row batches (peft refuses them too): say so before loading."""
    from ..config import LoraConfig
    from ..errors import AdapterLoadError, LoraError

    try:
        dora = LoraConfig.from_pretrained(folder).use_dora
    except LoraError:
        return  # the load names what is wrong with the folder
    if dora:
        raise AdapterLoadError(
            f"{folder} is a DoRA adapter (use_dora): lorakit serve runs every request's rows through their own "
            f"adapter in one batch, which DoRA does not allow (peft refuses it too). Merge it into the base model "
            f"(lorakit merge) and serve the merged model.")


def detach(model, name: str) -> None:
    """Remove adapter ``name`` from the model (its layers go back to plain ones when no adapter is left)."""
    model.delete_adapter(name)
    model._drop_route_caches()
