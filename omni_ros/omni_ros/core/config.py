"""Build frozen config dataclasses from plain mappings (YAML / ROS parameters), with clear errors.

Every config class in the project uses :func:`from_mapping` so that an unknown key, a wrong type or
a missing required value is a :class:`ConfigError` naming the key, never a silent default.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from omni_ros.core.errors import ConfigError

T = TypeVar("T")

_SCALARS: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
}


def check_type(name: str, type_name: str, value: Any) -> Any:
    """``value`` as a value of ``type_name`` (``int``, ``float | None``, ...), or a ConfigError
    naming ``name``, the value and the expected type.

    An int is accepted for a float (YAML writes ``1`` for 1.0); a bool is never an int.
    Containers and nested types (``tuple[int, ...]``) are accepted as given: their config class's
    ``__post_init__`` validates them.
    """
    options = [o.strip() for o in type_name.split("|")]
    if value is None:
        if "None" in options:
            return None
        raise ConfigError(f"{name} must not be empty (expected {type_name})")
    for option in options:
        allowed = _SCALARS.get(option)
        if allowed is None:
            if option != "None":
                return value
            continue
        if option in ("int", "float") and isinstance(value, bool):
            continue
        if option == "float" and isinstance(value, int | float):
            return float(value)
        if isinstance(value, allowed):
            return value
    raise ConfigError(f"{name} = {value!r} has type {type(value).__name__}; expected {type_name}")


def from_mapping(cls: type[T], mapping: Mapping[str, Any] | None) -> T:
    """Build dataclass ``cls`` from ``mapping``.

    Raises:
        ConfigError: an unknown key (with the list of known ones), a wrong type, or a value the
            class's own ``__post_init__`` rejects.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    mapping = dict(mapping or {})
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} parameter(s) {unknown}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in mapping.items():
        annotation = hints.get(key)
        text = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
        text = text.replace("NoneType", "None")
        kwargs[key] = check_type(f"{cls.__name__}.{key}", text, value)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {cls.__name__}: {exc}") from exc
