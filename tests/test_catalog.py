"""methods/catalog.py: the method files read without importing them describe exactly the registered classes."""
from __future__ import annotations

import dataclasses
import textwrap

import pytest


from methods import describe, get_method_class, method_names
from methods.catalog import NotStatic, describe_class, method_files, read_method_file


def test_static_reading_equals_every_imported_class():
    static = {info.name: info for path in method_files() for info in read_method_file(path)}
    assert len(static) >= 10
    for name, info in static.items():
        cls = get_method_class(name)
        assert info == describe_class(cls), name
        # and against the class itself, not only through describe_class
        assert list(info.params) == [f.name for f in dataclasses.fields(cls.Params)]
        assert info.default_space == cls.default_space and info.splits == tuple(cls.splits)


def test_a_file_is_read_with_the_protocol_defaults(tmp_path):
    path = tmp_path / "toy.py"
    path.write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from methods.base import UnlearningMethod, register_method

        @dataclass(frozen=True)
        class ToyParams:
            scale: float = 0.5
            steps: int = 3

        @register_method("toy")
        class Toy(UnlearningMethod):
            """Toy method.

            More text."""
            Params = ToyParams
            default_space = {"scale": {"grid": [0.5, 1.0]}}
    '''))
    (info,) = read_method_file(path)
    assert info.name == "toy" and info.doc == "Toy method."
    assert info.params == {"scale": 0.5, "steps": 3}
    assert info.default_space == {"scale": {"grid": [0.5, 1.0]}}
    # not set in the class: UnlearningMethod's own values, read from base.py
    assert info.splits == ("forget",) and info.reference_splits == () and info.combine == "sum"
    assert info.trains == "model"


def test_a_computed_declaration_is_not_static(tmp_path):
    path = tmp_path / "computed.py"
    path.write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from methods.base import UnlearningMethod, register_method
        SPLITS = ("forget", "retain")

        @dataclass(frozen=True)
        class P:
            x: float = 1.0

        @register_method("computed")
        class Computed(UnlearningMethod):
            Params = P
            splits = SPLITS
    '''))
    with pytest.raises(NotStatic, match="splits"):
        read_method_file(path)


def test_live_registration_is_described_and_wins():
    from methods import register_method
    from methods.base import _REGISTRY, UnlearningMethod

    @dataclasses.dataclass(frozen=True)
    class ScriptParams:
        weight: float = 2.0

    class ScriptMethod(UnlearningMethod):
        """Defined in a user's script."""
        Params = ScriptParams
        splits = ("forget", "retain")

    register_method("script_method_for_catalog_test")(ScriptMethod)
    try:
        assert "script_method_for_catalog_test" in method_names()
        info = describe("script_method_for_catalog_test")
        assert info.params == {"weight": 2.0} and info.splits == ("forget", "retain")
    finally:
        _REGISTRY.pop("script_method_for_catalog_test")


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown method 'nope'; known methods: .*npo"):
        describe("nope")
