"""Config files: YAML mappings checked by pydantic, with errors worded for people.

Each config section is a pydantic dataclass (``@section``) with strict scalar types and value
bounds; pydantic does the checking. This module turns its first complaint into a one-line
ConfigError that names the key path and what is valid ("training.lr must be > 0, got -0.1";
an unknown key gets the closest valid one), and reads YAML files. Both the training config and
the active-learning config build on it; it imports neither torch nor anything of bayesrace.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar, Union

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, Strict, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and says what is valid."""


def section(cls):
    """A config section: a dataclass whose construction rejects unknown keys, wrong types and bounds."""
    return pydantic_dataclass(cls, config=ConfigDict(extra="forbid"))


# YAML scalars are taken as written: "4" is no integer and 1 is not true (an integer is a number)
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]
AtLeastOne = Annotated[Int, Field(ge=1)]
NonNegativeInt = Annotated[Int, Field(ge=0)]
Positive = Annotated[Float, Field(gt=0)]
NonNegative = Annotated[Float, Field(ge=0)]
UnitInterval = Annotated[Float, Field(ge=0, le=1)]

_S = TypeVar("_S")
# a section written with no keys under it (`training:` alone in YAML is null) takes its defaults
Section = Annotated[_S, BeforeValidator(lambda value: {} if value is None else value)]

_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def parse_section(cls, values: Any):
    """``cls`` built from the mapping ``values``; the first problem found as a ConfigError."""
    try:
        return cls.__pydantic_validator__.validate_python({} if values is None else values)
    except ValidationError as error:
        raise ConfigError(_describe(cls, error.errors()[0])) from None


def _strip(annotation):
    """The type under Annotated[...] and Optional[...]."""
    while True:
        inner = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        origin = typing.get_origin(annotation)
        if origin is not Annotated and not (origin is Union and len(inner) == 1):
            return annotation
        annotation = inner[0]


def _walk(root, loc):
    """The key path of pydantic's error location ``loc`` and the annotation it leads to (None for an
    unknown key); it stops at a union, where pydantic adds the branch's name to the location."""
    annotation, keys, mapping = root, [], None
    for part in loc:
        plain = _strip(annotation)
        if typing.get_origin(plain) is Union:
            break
        if part == "[key]" and mapping is not None:  # the mapping's key itself is wrong, not its value
            annotation = typing.get_args(mapping)[0]
            continue
        keys.append(part)
        if dataclasses.is_dataclass(plain):
            annotation = typing.get_type_hints(plain, include_extras=True).get(part)
        elif typing.get_origin(plain) is dict:  # part is a key of the mapping
            mapping, annotation = plain, typing.get_args(plain)[1]
        else:
            annotation = None
    return keys, annotation


def _bounds(annotation) -> dict:
    """The gt/ge/lt/le bounds declared anywhere in ``annotation``, lower ones first."""
    found, stack = {}, [annotation]
    while stack:
        current = stack.pop()
        if typing.get_origin(current) is Annotated:
            for marker in current.__metadata__:
                for item in getattr(marker, "metadata", [marker]):  # a FieldInfo holds its bounds
                    found.update({name: getattr(item, name) for name in _BOUNDS if hasattr(item, name)})
        stack.extend(typing.get_args(current)[:1] if typing.get_origin(current) is Annotated else
                     typing.get_args(current))
    return dict(sorted(found.items(), key=lambda item: item[0] in ("lt", "le")))


def _expected(annotation) -> str:
    """What a value of ``annotation`` looks like, in words."""
    plain = _strip(annotation)
    if typing.get_origin(plain) is Union:
        return " or ".join(_expected(option) for option in typing.get_args(plain) if option is not type(None))
    if typing.get_origin(plain) is dict:
        value = typing.get_args(plain)[1]
        return "a mapping" if value is Any else f"a mapping with {_expected(value)} per key"
    if dataclasses.is_dataclass(plain):
        return "a mapping of keys"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(plain, str(plain))


def _describe(root, error) -> str:
    kind, value = error["type"], error["input"]
    keys, annotation = _walk(root, error["loc"])
    where = ".".join(map(str, keys))
    if kind == "value_error":  # a cross-field check of a model validator: its message is complete
        return str(error["ctx"]["error"])
    if kind == "unexpected_keyword_argument":
        valid = [field.name for field in dataclasses.fields(_strip(_walk(root, error["loc"][:-1])[1]))]
        close = difflib.get_close_matches(str(keys[-1]), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        place = f"section '{'.'.join(map(str, keys[:-1]))}'" if len(keys) > 1 else "the top level"
        return f"unknown key {keys[-1]!r} in {place}{hint}; valid keys: {', '.join(valid)}"
    if kind == "literal_error":
        return f"{where} is {value!r}; expected one of {list(typing.get_args(_strip(annotation)))}"
    bounds = _bounds(annotation)
    if kind.startswith(("greater_than", "less_than")) and len(bounds) == 2:
        (low, low_bound), (high, high_bound) = bounds.items()
        interval = f"{'(' if low == 'gt' else '['}{low_bound}, {high_bound}{')' if high == 'lt' else ']'}"
        return f"{where} must lie in {interval}, got {value}"
    if kind.startswith(("greater_than", "less_than")) and len(bounds) == 1:
        ((name, bound),) = bounds.items()
        return f"{where} must be {_BOUNDS[name]} {bound}, got {value}"
    if kind.endswith("_type"):
        return f"{where or 'config'}: expected {_expected(annotation)}, got {type(value).__name__} {value!r}"
    return f"{where or 'config'}: {error['msg']}"


def resolve_path(base: Path, path: Optional[str]) -> Optional[str]:
    """``path`` relative to ``base`` unless absolute (``~`` expanded); None and "" stay as they are."""
    if not path:
        return path
    resolved = Path(path).expanduser()
    return str(resolved if resolved.is_absolute() else Path(base) / resolved)


class _Yaml12Floats(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where ``1e-5`` (no dot) is a string; a config's ``lr: 1e-5``
    means a number, as in YAML 1.2 and JSON."""


_Yaml12Floats.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def read_yaml(text: str):
    """The YAML document ``text``, with YAML 1.2 floats (``1e-5`` is a number)."""
    return yaml.load(text, Loader=_Yaml12Floats)  # noqa: S506 (a SafeLoader subclass)


def load_yaml_config(path, from_dict):
    """``from_dict(values, base_dir=...)`` on the YAML file at ``path``; every error names the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        values = read_yaml(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error
    try:
        return from_dict(values or {}, base_dir=path.parent)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error

