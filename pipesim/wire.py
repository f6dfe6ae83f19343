"""Frozen dataclasses to and from JSON-ready dicts, strictly: what crosses a process boundary.

`to_dict` is `dataclasses.asdict`; `from_dict` is its checked inverse. It walks the
dataclass's type hints: nested dataclasses, ``tuple[X, ...]``, fixed tuples,
``X | None``, ``dict[str, X]`` and the scalars int, float, str and bool. Every field
must be present and no other key may be (a writer always writes them all), and each
value must have its field's type; anything else raises `WireError`, one line that
names the key. No defaults are filled in: a file that lacks a field is a file from
another version, not one to guess about.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import cache
from typing import Any, TypeVar

from .errors import UserError

T = TypeVar("T")


class WireError(UserError):
    """A job or result file that does not match its dataclass."""


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass instance as nested dicts, lists and scalars (tuples stay tuples; json writes lists)."""
    return dataclasses.asdict(obj)


def from_dict(cls: type[T], data: object, where: str = "") -> T:
    """An instance of dataclass `cls` from `data` (as `to_dict` or json made it), checked."""
    value: T = _value(cls, data, where or cls.__name__)
    return value


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fail(where: str, wanted: str, data: object) -> WireError:
    return WireError(f"{where}: expected {wanted}, got {type(data).__name__} {data!r:.60}")


def _value(hint: Any, data: object, where: str) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _dataclass(hint, data, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        return _tuple(args, data, where)
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _value(option, data, where)
            except WireError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else _fail(where, " or ".join(map(_name, args)), data)
    if origin is dict:
        if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
            raise _fail(where, "an object", data)
        return {k: _value(args[1], v, f"{where}.{k}") for k, v in data.items()}
    if hint is Any:
        return data
    if hint is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise _fail(where, "a number", data)
        return float(data)
    if hint in (int, str, bool):
        if type(data) is not hint:
            raise _fail(where, f"{'an' if hint is int else 'a'} {hint.__name__}", data)
        return data
    raise TypeError(f"wire.from_dict: {where} has a type it cannot read: {hint!r}")  # a bug, not input


def _name(hint: Any) -> str:
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _dataclass(cls: type, data: object, where: str) -> Any:
    if not isinstance(data, dict):
        raise _fail(where, f"an object ({cls.__name__})", data)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    unknown = [key for key in data if key not in names]
    if unknown:
        raise WireError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(names)})")
    missing = [name for name in names if name not in data]
    if missing:
        plural = "s" if len(missing) > 1 else ""
        raise WireError(f"{where}: missing key{plural} {', '.join(map(repr, missing))}")
    hints = _hints(cls)
    return cls(**{name: _value(hints[name], data[name], f"{where}.{name}") for name in names})


def _tuple(args: tuple[Any, ...], data: object, where: str) -> tuple[Any, ...]:
    if not isinstance(data, (list, tuple)):
        raise _fail(where, "a list", data)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_value(args[0], item, f"{where}[{i}]") for i, item in enumerate(data))
    if len(data) != len(args):
        raise WireError(f"{where}: expected a list of {len(args)}, got {len(data)} items")
    return tuple(_value(a, item, f"{where}[{i}]") for i, (a, item) in enumerate(zip(args, data)))
