"""``LoraModel.forward`` with the wrapped model's signature, for tools that inspect it.

HF's Trainer keeps only the dataset columns named in ``inspect.signature(model.forward)`` and takes
its default ``label_names`` from the parameters of the model class's ``forward`` that contain
"label". A wrapper whose forward is ``(*args, **kwargs)`` shows neither, so the Trainer drops every
column ("No columns in the dataset match the model's forward method signature") and reports no
eval loss. This descriptor makes ``instance.forward`` a bound method whose signature is the wrapped
model's own plus lorakit's keyword-only extras, and ``LoraModel.forward`` (the class attribute)
show a ``labels`` parameter. It is a non-data descriptor, so code that assigns ``model.forward``
(accelerate's mixed-precision wrapper) still overrides it per instance.
"""
from __future__ import annotations

import functools
import inspect
import types
from typing import Any, Callable

__all__ = ["signed_forward"]

_P = inspect.Parameter


def _with_extras(sig: inspect.Signature, extras: list[inspect.Parameter]) -> list[inspect.Parameter]:
    """``sig``'s parameters with ``extras`` (keyword-only) inserted before any ``**kwargs``."""
    params = [p for p in sig.parameters.values() if p.name not in {e.name for e in extras}]
    var_kw = [p for p in params if p.kind is _P.VAR_KEYWORD]
    rest = [p for p in params if p.kind is not _P.VAR_KEYWORD]
    return rest + extras + var_kw


class signed_forward:
    """Decorator for ``LoraModel.forward`` (see the module docstring)."""

    def __init__(self, func: Callable[..., Any]):
        self.func = func
        functools.update_wrapper(self, func)
        own = inspect.signature(func)
        self._extras = [p for p in own.parameters.values() if p.kind is _P.KEYWORD_ONLY]
        # the class-level view: what Trainer's find_labels() reads
        func.__signature__ = own.replace(parameters=_with_extras(
            own, self._extras + [_P("labels", _P.KEYWORD_ONLY, default=None)]))
        self._by_type: dict[type, Callable[..., Any]] = {}

    def __get__(self, obj: Any, objtype: type | None = None):
        if obj is None:
            return self.func
        inner = obj.__dict__.get("_modules", {}).get("model")
        key = type(inner)
        bound = self._by_type.get(key)
        if bound is None:
            bound = self._by_type[key] = self._signed_for(inner)
        return types.MethodType(bound, obj)

    def _signed_for(self, inner: Any) -> Callable[..., Any]:
        func = self.func

        @functools.wraps(func)
        def forward(self, *args, **kwargs):
            return func(self, *args, **kwargs)

        try:
            inner_sig = inspect.signature(inner.forward)
        except (TypeError, ValueError, AttributeError):
            return forward
        self_param = _P("self", _P.POSITIONAL_OR_KEYWORD)
        params = [self_param] + _with_extras(inner_sig, self._extras)
        try:
            forward.__signature__ = inspect.Signature(params)
        except ValueError:  # an ordering the extras cannot join (e.g. positional-only after them)
            pass
        del forward.__wrapped__  # inspect must read __signature__, not follow the wrapped function
        return forward
