"""Unlearning methods: one file each, registered by name with ``@register_method``.

Adding a method is adding a file. Importing this package does not import torch: ``describe``, ``catalog``
and ``method_names`` read the method files statically (methods/catalog.py) for validation and listings;
the classes themselves (``get_method_class``, ``build_method``, ``register_method`` and the protocol types)
load the method files on first use.
"""
from __future__ import annotations

from typing import Any

from methods.catalog import MethodInfo, catalog, describe, load_method_files

# Protocol names re-exported from methods.base; importing them imports torch.
_FROM_BASE = ("MethodInputs", "ModelOutput", "UnlearningMethod", "register_method")


def method_names() -> list[str]:
    return list(catalog())


def get_method_class(name: str) -> type:
    """The registered class (method files are loaded on demand); an unknown name lists the known ones."""
    from methods import base

    return base.get_method_class(name)


def build_method(name: str, **params: Any):
    """Instantiate a registered method; unknown hyperparameters are an error naming the known ones."""
    from methods import base

    return base.build_method(name, **params)


def param_names(name: str) -> list[str]:
    return list(describe(name).params)


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:
        from methods import base

        return getattr(base, name)
    raise AttributeError(f"module 'methods' has no attribute {name!r}")


__all__ = ["MethodInfo", "MethodInputs", "ModelOutput", "UnlearningMethod", "build_method", "catalog", "describe",
           "get_method_class", "load_method_files", "method_names", "param_names", "register_method"]
