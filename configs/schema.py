"""The one validator of the configuration dataclasses: every value checked against its
field's annotation, every error naming the field's dotted path.

Both configurations use it: ``model.SparseTransformerConfig`` on construction
(:func:`check_fields`) and the run's sections in ``distributed.config`` when a YAML tree
is read (:func:`build`). What a field accepts is its annotation:

``int``, ``float``, ``bool``, ``str``
    exactly that type (``train.lr: expected float, got 'abc'``); an int widens to a
    float field, a float must be finite, a bool is never taken for a number.
``Literal[...]``, or ``bool | Literal[...]``
    one of the listed values, compared with their types (``1.0`` is not ``1``). YAML
    reads ``true``/``false`` as booleans; a Literal listing the strings ``"true"`` and
    ``"false"`` takes them by that spelling.
``list[X]``, ``tuple[X, ...]``
    a list or tuple, each item checked as ``X`` (``path[i]``); a tuple field stores a
    tuple.
``dict[str, X]``
    a mapping, each value checked as ``X`` (``path.key``).
a dataclass
    a mapping of its fields, built by :func:`build`; unknown keys fail.
``X | Y``, ``X | None``
    None where None is allowed; otherwise the first arm that takes this kind of value (a
    number, a string, a list, a mapping) checks it, and its error is the one raised.
``Annotated[X, Range(...), Noun(...)]``
    ``X`` within bounds (:class:`Range`), or a Literal whose values have a name
    (:class:`Noun`: ``unknown pattern 'x'; expected one of (...)``).

Rules between fields (sizes that must divide each other, ...) stay with each dataclass
as small explicit checks raising :class:`ConfigError`. Standard library only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NoReturn, TypeVar

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "Noun",
    "Range",
    "build",
    "check_fields",
    "coerce",
    "fail",
    "field_types",
]


class ConfigError(ValueError):
    """An invalid configuration; the message starts with the dotted field name."""


def fail(path: str, message: str) -> NoReturn:
    """Raise :class:`ConfigError` as ``"<path>: <message>"``."""
    raise ConfigError(f"{path}: {message}")


@dataclass(frozen=True)
class Range:
    """Bounds of a number field, as ``Annotated[int, Range(gt=0)]``.

    The error reads ``must be > 0``, ``must be in [0, 1)``; an int's lone inclusive lower
    bound reads ``must be an integer >= 1``.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, value: float) -> bool:
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )

    def describe(self, tp: Any = float) -> str:
        lower = ("[", self.ge) if self.ge is not None else ("(", self.gt)
        upper = ("]", self.le) if self.le is not None else (")", self.lt)
        if lower[1] is not None and upper[1] is not None:
            return f"in {lower[0]}{lower[1]}, {upper[1]}{upper[0]}"
        if lower[1] is not None:
            if self.ge is not None:
                return f"{'an integer ' if tp is int else ''}>= {self.ge}"
            return f"> {self.gt}"
        return f"{'<=' if self.le is not None else '<'} {upper[1]}"

    def check(self, path: str, value: float, tp: Any = float) -> None:
        if not self.holds(value):
            fail(path, f"must be {self.describe(tp)}, got {value!r}")


@dataclass(frozen=True)
class Noun:
    """What the values of a Literal field are called in its error, as
    ``Annotated[PatternKind, Noun("pattern")]``: ``unknown pattern 'x'; expected one of (...)``."""

    word: str


# -- the annotation's parts ----------------------------------------------------------------


def _unwrap(tp: Any) -> tuple[Any, Range | None, Noun | None]:
    """(type, bounds, noun) of an annotation, ``Annotated`` taken apart."""
    if typing.get_origin(tp) is not Annotated:
        return tp, None, None
    meta = tp.__metadata__
    range_ = next((m for m in meta if isinstance(m, Range)), None)
    noun = next((m for m in meta if isinstance(m, Noun)), None)
    return tp.__origin__, range_, noun


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _choices(tp: Any) -> tuple[Any, ...] | None:
    """The values of a Literal, or of a union of Literals and bool; None for other types."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if not _is_union(tp):
        return None
    arms = typing.get_args(tp)
    if not any(typing.get_origin(a) is Literal for a in arms):
        return None
    if not all(a is bool or typing.get_origin(a) is Literal for a in arms):
        return None
    return tuple(c for a in arms for c in ((True, False) if a is bool else typing.get_args(a)))


def _describe(tp: Any) -> str:
    """What ``tp`` accepts, for a union's error."""
    tp = _unwrap(tp)[0]
    choices = _choices(tp)
    origin = typing.get_origin(tp)
    if choices is not None:
        return f"one of {choices}"
    if _is_union(tp):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _takes(tp: Any, value: Any) -> bool:
    """Whether ``value`` is the kind of value ``tp`` checks (a union picks its arm by it)."""
    tp = _unwrap(tp)[0]
    choices = _choices(tp)
    if choices is not None:
        return any(type(c) is type(value) for c in choices)
    if _is_union(tp):
        return any(_takes(a, value) for a in typing.get_args(tp))
    origin = typing.get_origin(tp) or tp
    if tp is Any:
        return True
    if origin in (int, float):
        numbers = (int, float) if origin is float else int
        return isinstance(value, numbers) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or dataclasses.is_dataclass(tp):
        return isinstance(value, Mapping)
    return isinstance(value, origin)


# -- checking one value ---------------------------------------------------------------------


def coerce(path: str, tp: Any, value: Any) -> Any:
    """``value`` checked against the annotation ``tp`` and normalised (an int widened to a
    float field, a list to a tuple field, a YAML boolean to a Literal's ``"true"``).

    Raises :class:`ConfigError` naming ``path``.
    """
    tp, range_, noun = _unwrap(tp)
    choices = _choices(tp)
    if choices is not None:
        return _choice(path, choices, noun, value)
    out = _coerce_type(path, tp, value)
    if range_ is not None:
        range_.check(path, out, tp)
    return out


def _coerce_type(path: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if _is_union(tp):
        return _union(path, typing.get_args(tp), value)
    if tp is Any:
        return value
    if tp in (bool, int, float, str):
        return _scalar(path, tp, value)
    if origin in (list, tuple):
        return _sequence(path, tp, value)
    if origin is dict:
        return _mapping(path, tp, value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    raise TypeError(f"{path}: unsupported field type {tp!r}")


def _choice(path: str, choices: tuple[Any, ...], noun: Noun | None, value: Any) -> Any:
    for choice in choices:
        if type(choice) is type(value) and choice == value:
            return choice
    if isinstance(value, bool) and str(value).lower() in choices:
        return str(value).lower()  # YAML's true/false, for a Literal spelling them
    if noun is not None:
        fail(path, f"unknown {noun.word} {value!r}; expected one of {choices}")
    if any(isinstance(c, bool) for c in choices):  # booleans and strings: YAML's words
        words = ["true" if c is True else "false" if c is False else str(c) for c in choices]
        fail(path, f"must be {', '.join(words[:-1])} or {words[-1]}, got {value!r}")
    fail(path, f"expected one of {choices}, got {value!r}")


def _scalar(path: str, tp: type, value: Any) -> Any:
    if tp is float and _takes(float, value):
        if not math.isfinite(value):
            fail(path, f"expected a finite number, got {value!r}")
        return float(value)
    if _takes(tp, value):
        return value
    fail(path, f"expected {tp.__name__}, got {value!r}")


def _sequence(path: str, tp: Any, value: Any) -> list[Any] | tuple[Any, ...]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and (len(args) != 2 or args[1] is not Ellipsis):
        raise TypeError(f"{path}: only tuple[X, ...] is supported, not {tp!r}")
    if not isinstance(value, (list, tuple)):
        fail(path, f"expected a list, got {value!r}")
    item = args[0] if args else Any
    items = [coerce(f"{path}[{i}]", item, v) for i, v in enumerate(value)]
    return tuple(items) if typing.get_origin(tp) is tuple else items


def _mapping(path: str, tp: Any, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        fail(path, f"expected a mapping, got {value!r}")
    _, item = typing.get_args(tp) or (str, Any)
    return {str(k): coerce(f"{path}.{k}", item, v) for k, v in value.items()}


def _union(path: str, arms: tuple[Any, ...], value: Any) -> Any:
    if value is None and type(None) in arms:
        return None
    for arm in arms:
        if arm is not type(None) and _takes(arm, value):
            return coerce(path, arm, value)
    fail(path, f"expected {' or '.join(_describe(a) for a in arms)}, got {value!r}")


# -- whole dataclasses ------------------------------------------------------------------------


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """``{name: annotation}`` of the dataclass's ``__init__`` fields, in order."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def build(cls: type[T], values: Any, path: str) -> T:
    """``cls(**values)`` from a mapping (a YAML section): unknown keys refused by name, each
    value checked by :func:`coerce` as ``<path>.<field>``.

    The class's own checks may name fields ``<ClassName>.<field>``: their errors are
    raised again as ``<path>.<field>`` (``SparseTransformerConfig.d_model`` read under
    ``model`` is ``model.d_model``).
    """
    if not isinstance(values, Mapping):
        fail(path, f"expected a mapping, got {values!r}")
    types_ = field_types(cls)
    for key in values:
        if key not in types_:
            fail(f"{path}.{key}", f"unknown field; known fields: {', '.join(types_)}")
    kwargs = {key: coerce(f"{path}.{key}", types_[key], v) for key, v in values.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:
        message, prefix = str(err), cls.__name__
        if path == prefix and isinstance(err, ConfigError):
            raise
        if message.startswith((f"{prefix}.", f"{prefix}:")):
            raise ConfigError(path + message[len(prefix) :]) from err
        raise ConfigError(f"{path}: {message}") from err


def check_fields(obj: Any, path: str) -> None:
    """Check every field of the dataclass instance ``obj`` by :func:`coerce` and store the
    normalised values in place (frozen dataclasses too: call it from ``__post_init__``)."""
    for name, tp in field_types(type(obj)).items():
        value = getattr(obj, name)
        checked = coerce(f"{path}.{name}", tp, value)
        if checked is not value:
            object.__setattr__(obj, name, checked)
