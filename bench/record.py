"""Typed records to and from JSON: the one codec for results.json and the worker's replies.

Results are dataclasses. ``dump`` turns one into JSON-ready values field by field, in field
order; ``load`` builds one back from such values by the field's type hints, filling absent
keys with the field's default and ignoring keys it does not know (so older results load).
A field whose metadata is ``OMIT`` is left out of the JSON while it is None, which keeps the
recorded shape: such keys were written only when they had something to say.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar, Union

T = TypeVar("T")
_OMIT = "omit_when_none"
OMIT = types.MappingProxyType({_OMIT: True})  # field(default=None, metadata=OMIT)


def dump(value: Any) -> Any:
    """``value`` as JSON-ready data: dataclasses become dicts, tuples lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if item is None and f.metadata.get(_OMIT):
                continue
            out[f.name] = dump(item)
        return out
    if isinstance(value, dict):
        return {str(k): dump(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [dump(v) for v in value]
    return value


def load(cls: type[T], data: Any) -> T:
    """Build a ``cls`` dataclass from ``data`` (as ``dump`` wrote it)."""
    hints = typing.get_type_hints(cls)
    given = data if isinstance(data, dict) else {}
    kwargs = {
        f.name: _convert(hints[f.name], given[f.name])
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.name in given and f.init
    }
    return cls(**kwargs)


def _convert(hint: Any, value: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        return _convert(next(a for a in args if a is not type(None)), value)
    if origin is list:
        return [_convert(args[0], v) for v in value]
    if origin is tuple:
        return tuple(_convert(a, v) for a, v in zip(args, value, strict=True))
    if origin is dict:
        return {k: _convert(args[1], v) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return load(hint, value)  # type: ignore[arg-type]
    if hint is float and isinstance(value, int):
        return float(value)
    return value
