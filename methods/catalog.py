"""What each registered method declares, without importing torch.

A spec is validated (method names, hyperparameter names, default search spaces, which batches a method
reads) before anything heavy is imported, so bad input is refused in well under a second. The method files
are read with ``ast``: each ``@register_method("name")`` class's literal class attributes and its ``Params``
dataclass fields. Classes registered at run time (a user's tuning script) are described from the live
registry, which wins over the files. tests/test_catalog.py checks that the static reading of every file
equals the description of the imported class, so the two cannot drift apart.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
# The protocol's class attributes a method may override; their defaults are read from base.py's class.
PROTOCOL_ATTRIBUTES = ("splits", "reference_splits", "combine", "trains", "default_space")
_NOT_METHOD_FILES = {"__init__", "base", "catalog"}


@dataclass(frozen=True)
class MethodInfo:
    """A registered method as validation and ``unlearn methods`` see it."""

    name: str
    doc: str  # first line of the class docstring
    params: dict[str, Any]  # hyperparameter name → default, in declaration order
    default_space: dict[str, dict[str, Any]] = field(default_factory=dict)
    splits: tuple[str, ...] = ("forget",)
    reference_splits: tuple[str, ...] = ()
    combine: str = "sum"
    trains: str = "model"

    def listing(self) -> dict[str, Any]:
        """The JSON ``unlearn methods --json`` prints for this method."""
        return {"doc": self.doc, "params": self.params, "default_space": self.default_space, "combine": self.combine,
                "splits": list(self.splits), "reference": bool(self.reference_splits), "trains": self.trains}


class NotStatic(ValueError):
    """A method file whose declarations are not plain literals (it is then described by importing it)."""


def _literal(node: ast.expr, where: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise NotStatic(f"{where}: not a literal") from None


def _class_assignments(cls: ast.ClassDef) -> dict[str, ast.expr]:
    """Class-body ``name = value`` and ``name: type = value`` statements."""
    values: dict[str, ast.expr] = {}
    for statement in cls.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1 and isinstance(statement.targets[0], ast.Name):
            values[statement.targets[0].id] = statement.value
        elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name) and statement.value is not None:
            values[statement.target.id] = statement.value
    return values


def _dataclass_defaults(cls: ast.ClassDef, where: str) -> dict[str, Any]:
    """Field name → default of a ``@dataclass`` (every field of a method's Params has a default)."""
    defaults: dict[str, Any] = {}
    for statement in cls.body:
        if not isinstance(statement, ast.AnnAssign) or not isinstance(statement.target, ast.Name):
            continue
        if "ClassVar" in ast.unparse(statement.annotation):
            continue
        if statement.value is None:
            raise NotStatic(f"{where}.{statement.target.id}: no default")
        defaults[statement.target.id] = _literal(statement.value, f"{where}.{statement.target.id}")
    return defaults


def _registered_name(cls: ast.ClassDef) -> str | None:
    for decorator in cls.decorator_list:
        if (isinstance(decorator, ast.Call) and getattr(decorator.func, "id", None) == "register_method"
                and decorator.args and isinstance(decorator.args[0], ast.Constant)):
            return str(decorator.args[0].value)
    return None


def _first_line(doc: str | None) -> str:
    return doc.strip().splitlines()[0] if doc and doc.strip() else ""


@lru_cache(maxsize=None)
def _protocol_defaults() -> dict[str, Any]:
    tree = ast.parse((PACKAGE_DIR / "base.py").read_text("utf-8"))
    base = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "UnlearningMethod")
    values = _class_assignments(base)
    return {name: _literal(values[name], f"base.UnlearningMethod.{name}") for name in PROTOCOL_ATTRIBUTES}


def read_method_file(path: Path) -> list[MethodInfo]:
    """The registered methods one file declares, read without executing it (NotStatic if it cannot be)."""
    tree = ast.parse(path.read_text("utf-8"), filename=str(path))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    found = []
    for cls in classes.values():
        name = _registered_name(cls)
        if name is None:
            continue
        where = f"{path.name}:{cls.name}"
        values = _class_assignments(cls)
        params_node = values.get("Params")
        if not isinstance(params_node, ast.Name) or params_node.id not in classes:
            raise NotStatic(f"{where}.Params: not a dataclass defined in the file")
        declared = dict(_protocol_defaults())
        declared.update({key: _literal(values[key], f"{where}.{key}") for key in PROTOCOL_ATTRIBUTES if key in values})
        found.append(MethodInfo(
            name=name, doc=_first_line(ast.get_docstring(cls)),
            params=_dataclass_defaults(classes[params_node.id], f"{where}.{params_node.id}"),
            default_space=declared["default_space"], splits=tuple(declared["splits"]),
            reference_splits=tuple(declared["reference_splits"]), combine=declared["combine"], trains=declared["trains"],
        ))
    return found


def describe_class(cls: type) -> MethodInfo:
    """The same description from a live, registered class."""
    import dataclasses

    params = {f.name: f.default for f in dataclasses.fields(cls.Params) if f.default is not dataclasses.MISSING}
    return MethodInfo(name=cls.name, doc=_first_line(cls.__doc__), params=params, default_space=dict(cls.default_space),
                      splits=tuple(cls.splits), reference_splits=tuple(cls.reference_splits), combine=cls.combine,
                      trains=cls.trains)


def load_method_files() -> None:
    """Import every method file, so each registers itself (idempotent)."""
    import importlib

    for path in method_files():
        importlib.import_module(f"methods.{path.stem}")


def method_files() -> list[Path]:
    return sorted(p for p in PACKAGE_DIR.glob("*.py") if p.stem not in _NOT_METHOD_FILES)


@lru_cache(maxsize=None)
def _static_catalog() -> dict[str, MethodInfo]:
    catalog: dict[str, MethodInfo] = {}
    for path in method_files():
        try:
            infos = read_method_file(path)
        except NotStatic:  # declarations computed at import: describe the imported classes instead
            load_method_files()
            infos = []
        for info in infos:
            catalog[info.name] = info
    return catalog


def _live_registry() -> dict[str, type]:
    """Classes registered so far, if the registry module was imported (by a worker or a user's script)."""
    base = sys.modules.get("methods.base")
    return dict(getattr(base, "_REGISTRY", {})) if base is not None else {}


def catalog() -> dict[str, MethodInfo]:
    """Every known method by name: the method files read statically, then live registrations over them."""
    known = dict(_static_catalog())
    known.update({name: describe_class(cls) for name, cls in _live_registry().items()})
    return dict(sorted(known.items()))


def describe(name: str) -> MethodInfo:
    """One method's description; an unknown name is an error listing the known ones."""
    known = catalog()
    if name not in known:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(known)}")
    return known[name]
