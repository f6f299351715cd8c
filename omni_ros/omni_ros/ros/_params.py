"""Configure-time helpers of omni_flow_node: ROS parameters <-> the core configs, and the values
parameters point at (reference voice, TensorRT engines).

The parameter list of ``omni_flow_node`` for ``timeline.*``, ``session.*``, ``vad.*``, ``aec.*`` and
``flow.*`` is never written by hand: :func:`config_params` walks ``FlowConfig`` (a nested field
``timeline: TimelineConfig`` becomes the namespace ``timeline.``, a scalar field of ``FlowConfig``
itself becomes ``flow.<name>``), and :func:`build_config` rebuilds the config from the values with
each class's ``from_mapping`` (so an unknown key or a wrong type is a ``ConfigError`` naming it).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from omni_ros.core.config import from_mapping
from omni_ros.core.errors import ConfigError

#: Namespace of the top-level scalar fields of the root config (deadline, overrun policy, ...).
ROOT_NAMESPACE = "flow"


@dataclass(frozen=True)
class ParamSpec:
    """One ROS parameter derived from a config field.

    Attributes:
        name: the full parameter name, e.g. ``timeline.unit_ns``.
        default: the field's default (None: no default; the parameter starts unset).
        type_name: the field's annotation as text, e.g. ``int`` or ``float | None``.
        description: from the class docstring's ``Attributes:`` section.
    """

    name: str
    default: Any
    type_name: str
    description: str


def _attribute_docs(cls: type) -> dict[str, str]:
    """Parse ``name: text`` entries of a Google-style ``Attributes:`` docstring section."""
    doc = cls.__doc__ or ""
    _, found, section = doc.partition("Attributes:")
    if not found:
        return {}
    docs: dict[str, str] = {}
    current = ""
    for line in section.splitlines():
        match = re.match(r"^\s{4,8}(\w+)(?: \([^)]*\))?:\s*(.*)$", line)
        if match and match.group(1) not in ("Raises", "Returns", "Example", "Examples"):
            current = match.group(1)
            docs[current] = match.group(2).strip()
        elif current and line.strip():
            docs[current] += " " + line.strip()
        elif not line.strip() and current:
            current = ""
    return docs


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> its description in ``cls``'s Google-style ``Attributes:`` section."""
    return _attribute_docs(cls)


def field_default(field: dataclasses.Field[Any]) -> Any:
    """A dataclass field's default (its factory called), None when it has none."""
    return _default(field)


def nested_configs(root: type) -> dict[str, type]:
    """Fields of ``root`` whose type is itself a config dataclass: name -> class."""
    hints = typing.get_type_hints(root)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(root)
        if isinstance(hints.get(f.name), type) and dataclasses.is_dataclass(hints[f.name])
    }


def config_params(root: type) -> list[ParamSpec]:
    """Every parameter of ``root`` (see the module docstring for the naming)."""
    specs: list[ParamSpec] = []
    nested = nested_configs(root)
    for namespace, cls in [(ROOT_NAMESPACE, root), *nested.items()]:
        hints = typing.get_type_hints(cls)
        docs = _attribute_docs(cls)
        for field in dataclasses.fields(cls):
            if cls is root and field.name in nested:
                continue
            annotation = hints.get(field.name)
            type_name = getattr(annotation, "__name__", None) or str(annotation)
            specs.append(
                ParamSpec(
                    name=f"{namespace}.{field.name}",
                    default=_default(field),
                    type_name=type_name.replace("typing.", "").replace("NoneType", "None"),
                    description=docs.get(field.name, ""),
                )
            )
    return specs


def ros_value(value: Any) -> Any:
    """A config default as a ROS parameter value (tuples become lists; None stays None)."""
    if isinstance(value, tuple):
        return list(value)
    return value


def config_value(value: Any) -> Any:
    """A ROS parameter value as a config value (lists / arrays become tuples)."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "array":
        return tuple(value)
    return value


def build_config(root: type, values: Mapping[str, Any]) -> Any:
    """Build ``root`` from ``{"timeline.unit_ns": 1000000000, "flow.idle_wait_ms": 10, ...}``.

    Entries whose value is None are left out (the field keeps its default). Keys outside the
    known namespaces are ignored here (the node warns about them). ``root.from_mapping`` gets a
    nested mapping (``{"timeline": {...}, "idle_wait_ms": 10}``) if it has one; otherwise the
    nested configs are built first and handed to :func:`omni_ros.core.config.from_mapping`.

    Raises:
        ConfigError: an unknown key inside a namespace, a wrong type, or a rejected value.
    """
    nested = nested_configs(root)
    groups: dict[str, dict[str, Any]] = {ns: {} for ns in (ROOT_NAMESPACE, *nested)}
    for name, value in values.items():
        namespace, _, key = name.partition(".")
        if namespace in groups and key and value is not None:
            groups[namespace][key] = config_value(value)
    kwargs: dict[str, Any] = dict(groups.pop(ROOT_NAMESPACE))
    builder = getattr(root, "from_mapping", None)
    if builder is not None:
        return builder({**kwargs, **groups})
    for namespace, cls in nested.items():
        sub_builder = getattr(cls, "from_mapping", None)
        sub = groups[namespace]
        kwargs[namespace] = sub_builder(sub) if sub_builder else from_mapping(cls, sub)
    return from_mapping(root, kwargs)


# ------------------------------------------------------------------- values parameters point at
def load_ref_voice(path: str, sample_rate: int) -> Any:
    """Read the ``ref_voice_path`` WAV as mono float32 at ``sample_rate`` (None for "").

    Raises:
        ConfigError: the file is missing or not a PCM / float WAV.
    """
    if not path:
        return None
    from omni_ros.audio_io import read_wav
    from omni_ros.core.audio import decode_audio, resample
    from omni_ros.core.types import RawAudio

    data, fmt = read_wav(path)
    block = decode_audio(RawAudio(0, fmt.sample_rate, fmt.channels, fmt.encoding, data))
    return resample(block.samples, fmt.sample_rate, sample_rate)


def accelerate_with_tensorrt(backend: Any, engine_dir: str, components: str) -> list[Any]:
    """Swap ``components`` of ``backend`` for verified TensorRT engines where they load.

    Imports ``omni_ros.tensorrt`` only here (never for a node that does not ask for it); every
    component that stays on torch says why in its status.
    """
    from omni_ros.tensorrt.cache import DEFAULT_ENGINE_ROOT
    from omni_ros.tensorrt.runtime import accelerate_backend
    from omni_ros.tensorrt.specs import parse_components

    device = getattr(getattr(backend, "config", None), "device", "cuda")
    return accelerate_backend(
        backend, engine_dir or str(DEFAULT_ENGINE_ROOT), parse_components(components), device=device
    )


def flatten_parameters(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A ``ros__parameters`` tree as flat dotted names: ``{"reference": {"size": "tiny"}}`` ->
    ``{"reference.size": "tiny"}`` (how ROS 2 names nested parameters)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_parameters(value, name))
        else:
            flat[name] = value
    return flat


def read_params_file(path: str | Path, node_name: str) -> dict[str, Any]:
    """The flat parameters a ROS 2 params file gives ``node_name`` (``/**`` first, then the node's
    own section, by name with or without the leading slash).

    Raises:
        ConfigError: the file cannot be read, or has no ``ros__parameters`` for the node.
    """
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read params file {path}: {exc}") from exc
    flat: dict[str, Any] = {}
    for key in ("/**", "**", node_name, f"/{node_name}"):
        section = doc.get(key) if isinstance(doc, Mapping) else None
        if isinstance(section, Mapping) and isinstance(section.get("ros__parameters"), Mapping):
            flat.update(flatten_parameters(section["ros__parameters"]))
    if not flat:
        raise ConfigError(
            f"{path} has no '{node_name}: ros__parameters:' (or '/**:') section; see config/*.yaml"
        )
    return flat
