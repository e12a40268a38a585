"""Values read from JSON / YAML checked against a dataclass's annotations.

A quoted "64" for a width, or ``learning_rate: fast``, would otherwise fail far from the file that holds it,
deep inside torch. Used by the model configs (:mod:`kimivl.configuration`) and the training arguments.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from typing import Any

from kimivl.errors import KimiVLInputError


def type_problem(obj: Any, skip: tuple[str, ...] = ("extra",)) -> tuple[str, Any, str] | None:
    """The first field of dataclass ``obj`` whose value is not of its annotated type, as (name, value, what it
    must be), or None. Integers pass where a float is annotated (JSON and YAML write 2.0 as 2 just as well)."""
    for name, hint in _field_types(type(obj)).items():
        value = getattr(obj, name)
        if name not in skip and not _matches(value, hint):
            return name, value, describe(hint)
    return None


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(v, args[1]) for v in value.values())
    return isinstance(value, origin or hint)


def describe(hint: Any) -> str:
    """``int | None`` -> "an integer or null"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is list:
        return f"a list ({describe(args[0])} each)"
    if origin is dict:
        return "a mapping" if args[1] is Any else f"a mapping to {describe(args[1])}"
    names = {int: "an integer", float: "a number", bool: "true/false", str: "a string", Any: "any value"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def float_strings_to_floats(obj: Any) -> None:
    """In place: a string that reads as a number in a float field becomes that float. PyYAML follows YAML 1.1,
    where ``1e-5`` (no dot) is a string, so ``learning_rate: 1e-5`` would otherwise be refused."""
    for name, hint in _field_types(type(obj)).items():
        value = getattr(obj, name)
        if isinstance(value, str) and _allows_float(hint):
            try:
                setattr(obj, name, float(value))
            except ValueError:
                pass  # left for type_problem to name


def _allows_float(hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_allows_float(a) for a in typing.get_args(hint)) and str not in typing.get_args(hint)
    return hint is float


def checked_replace(obj: Any, changes: dict[str, Any], label: str, what: str) -> Any:
    """``dataclasses.replace(obj, **changes)`` for options given by users (a content item's ``fps``, a
    preprocessor_config's ``video_options``): an unknown key (with the closest known one) or a value of the
    wrong type is a :class:`~kimivl.errors.KimiVLInputError` naming ``label`` and the key."""
    names = [f.name for f in dataclasses.fields(obj)]
    unknown = sorted(set(changes) - set(names))
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KimiVLInputError(f"{label}: unknown {what} option {unknown[0]!r}{hint}; the options are "
                               f"{', '.join(names)}")
    out = dataclasses.replace(obj, **changes)
    problem = type_problem(out)
    if problem is not None:
        name, value, must = problem
        raise KimiVLInputError(f"{label}: {what} option {name} = {value!r} must be {must}, got {type(value).__name__}")
    return out
