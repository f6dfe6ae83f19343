"""Frozen dataclasses to and from JSON-ready dicts, strictly: what crosses a process boundary.

`to_dict` is `dataclasses.asdict` (but quicker: no deep copies); `from_dict` is its
checked inverse. It follows the dataclass's type hints: nested dataclasses,
``tuple[X, ...]``, fixed tuples, ``X | None``, ``dict[str, X]`` and the scalars
int, float, str and bool. Every field must be present and no other key may be (a
writer always writes them all), and each value must have its field's type;
anything else raises `WireError`, one line that names the key. No defaults are
filled in: a file that lacks a field is from another version, not one to guess
about. A reader is built once per type (a measured run carries 10^4-10^5 spans).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from functools import cache
from typing import Any, TypeVar

from .errors import UserError

T = TypeVar("T")
Reader = Callable[[object], Any]


class WireError(UserError):
    """A job or result file that does not match its dataclass."""


class _Mismatch(Exception):
    """Raised inside a reader; `path` grows as it passes up through containers."""

    def __init__(self, message: str, path: str = ""):
        self.message, self.path = message, path


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass instance as nested dicts, tuples and scalars (json writes tuples as lists)."""
    value: dict[str, Any] = _plain(obj)
    return value


def from_dict(cls: type[T], data: object, where: str = "") -> T:
    """An instance of dataclass `cls` from `data` (as `to_dict` or json made it), checked."""
    try:
        value: T = _reader(typing.cast(Any, cls))(data)
    except _Mismatch as exc:
        raise WireError(f"{where or cls.__name__}{exc.path}: {exc.message}") from None
    return value


_SCALARS = frozenset({int, float, str, bool, type(None)})


def _plain(value: Any) -> Any:
    if type(value) in _SCALARS:
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {name: _plain(getattr(value, name)) for name in _field_names(type(value))}
    if isinstance(value, (tuple, list)):
        return tuple(_plain(item) for item in value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


@cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def _got(data: object) -> str:
    return f"got {type(data).__name__} {data!r:.60}"


@cache
def _reader(hint: Any) -> Reader:
    """A function that checks and converts one value of type `hint`."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _dataclass_reader(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        return _tuple_reader(args)
    if origin in (typing.Union, types.UnionType):
        return _union_reader(args)
    if origin is dict:
        return _dict_reader(_reader(args[1]))
    if hint is Any:
        return lambda data: data
    if hint is float:
        return _float
    if hint in (int, str, bool):
        return _scalar_reader(hint)
    raise TypeError(f"wire: no reader for the type {hint!r}")  # a bug in a dataclass, not bad input


def _float(data: object) -> float:
    if isinstance(data, bool) or not isinstance(data, (int, float)):
        raise _Mismatch(f"expected a number, {_got(data)}")
    return float(data)


def _scalar_reader(kind: type) -> Reader:
    wanted = f"expected {'an' if kind is int else 'a'} {kind.__name__}"

    def read(data: object) -> object:
        if type(data) is not kind:
            raise _Mismatch(f"{wanted}, {_got(data)}")
        return data

    return read


def _dataclass_reader(cls: type) -> Reader:
    names = _field_names(cls)
    hints = typing.get_type_hints(cls)
    readers = [(name, _reader(hints[name])) for name in names]

    def read(data: object) -> object:
        if not isinstance(data, dict):
            raise _Mismatch(f"expected an object ({cls.__name__}), {_got(data)}")
        if len(data) != len(names) or any(name not in data for name in names):
            _key_error(names, data)
        values = {}
        for name, reader in readers:
            try:
                values[name] = reader(data[name])
            except _Mismatch as exc:
                raise _Mismatch(exc.message, f".{name}{exc.path}") from None
        return cls(**values)

    return read


def _key_error(names: tuple[str, ...], data: dict[Any, Any]) -> typing.NoReturn:
    unknown = [key for key in data if key not in names]
    if unknown:
        raise _Mismatch(f"unknown key {unknown[0]!r} (allowed: {', '.join(names)})")
    missing = [name for name in names if name not in data]
    raise _Mismatch(f"missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")


def _tuple_reader(args: tuple[Any, ...]) -> Reader:
    if len(args) == 2 and args[1] is Ellipsis:
        item = _reader(args[0])

        def read_all(data: object) -> tuple[Any, ...]:
            if not isinstance(data, (list, tuple)):
                raise _Mismatch(f"expected a list, {_got(data)}")
            try:
                return tuple(map(item, data))
            except _Mismatch as exc:
                index = next(i for i, x in enumerate(data) if _fails(item, x))
                raise _Mismatch(exc.message, f"[{index}]{exc.path}") from None

        return read_all
    readers = [_reader(a) for a in args]

    def read_fixed(data: object) -> tuple[Any, ...]:
        if not isinstance(data, (list, tuple)) or len(data) != len(readers):
            raise _Mismatch(f"expected a list of {len(readers)}, {_got(data)}")
        values = []
        for i, (reader, x) in enumerate(zip(readers, data)):
            try:
                values.append(reader(x))
            except _Mismatch as exc:
                raise _Mismatch(exc.message, f"[{i}]{exc.path}") from None
        return tuple(values)

    return read_fixed


def _fails(reader: Reader, data: object) -> bool:
    try:
        reader(data)
    except _Mismatch:
        return True
    return False


def _union_reader(args: tuple[Any, ...]) -> Reader:
    optional = type(None) in args
    options = [_reader(a) for a in args if a is not type(None)]
    names = " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in args)

    def read(data: object) -> object:
        if data is None and optional:
            return None
        mismatches = []
        for reader in options:
            try:
                return reader(data)
            except _Mismatch as exc:
                mismatches.append(exc)
        if len(mismatches) == 1:
            raise mismatches[0]
        raise _Mismatch(f"expected {names}, {_got(data)}")

    return read


def _dict_reader(item: Reader) -> Reader:
    def read(data: object) -> dict[str, Any]:
        if not isinstance(data, dict) or not all(isinstance(key, str) for key in data):
            raise _Mismatch(f"expected an object, {_got(data)}")
        values = {}
        for key, x in data.items():
            try:
                values[key] = item(x)
            except _Mismatch as exc:
                raise _Mismatch(exc.message, f".{key}{exc.path}") from None
        return values

    return read
