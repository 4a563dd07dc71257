"""Unlearning methods: one file each, registered by name with ``@register_method``.

Every module in this package is imported here, so adding a method is adding a file.
"""
import importlib
import pkgutil

from methods.base import (
    MethodInputs,
    ModelOutput,
    UnlearningMethod,
    build_method,
    get_method_class,
    method_names,
    register_method,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "MethodInputs",
    "ModelOutput",
    "UnlearningMethod",
    "build_method",
    "get_method_class",
    "method_names",
    "register_method",
]
