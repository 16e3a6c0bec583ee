"""Small helpers shared across the package (and by ``napari_lsms``); standard library only."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list]]:
    """Module-level ``__getattr__`` and ``__dir__`` that import ``exports`` (name -> module) on
    first use, so importing ``package`` stays cheap (no torch, Qt or transformers up front)."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(namespace.get("__all__", exports))

    return __getattr__, __dir__


def dataclass_from_dict(cls: type[T], d: Any, hint: str = "") -> T:
    """``cls(**d)`` for a dataclass, with a clear ``ValueError`` for a non-dict or unknown keys."""
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__}.from_dict expects a dict, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} field(s) {unknown}; known fields are {sorted(known)}.{hint}"
        )
    return cls(**d)
