"""The one configuration path of ``omni_flow_node``: flat parameters -> a validated :class:`NodeSetup`.

The node (at configure), ``omni-ros replay --mode direct`` and ``omni-ros replay --mode graph``
(before it starts the node) all call :func:`node_setup` on the same flat parameter names, so the
three validate identically and fail with the same message:

* every name must be known: a node parameter (:data:`NODE_PARAMS`), a ``FlowConfig`` field
  (``timeline.*``, ``session.*``, ``vad.*``, ``aec.*``, ``flow.*``), a field of the chosen
  backend's config (``<backend>.*``), a field of another backend's config (kept for switching
  ``backend:=`` with one params file; not used), or one rclpy gives every node (``use_sim_time``,
  ``qos_overrides.*``); anything else is a :class:`ConfigError` with a "did you mean" suggestion;
* every value must have the parameter's type; the error names the parameter, the expected type and
  the value (``speech.chunk_ms = 'hundred' has type str; expected int``);
* values with their own rules (``speech.encoding``, ``speech.chunk_ms``, ``backend``) are checked
  here, and the configs' own ``__post_init__`` checks run when they are built.

One deadline owner: the flow's ``flow.backend_deadline_ms`` (one prefill + generate) and
``flow.prepare_deadline_ms`` (one prepare) are the parameters to tune. The backend timeouts they
bound (each backend config's ``FLOW_DEADLINE_SHARES``: ``vllm_omni.unit_timeout_s``,
``llamacpp_omni.read_timeout_s`` / ``decode_timeout_s`` / ``health_timeout_s`` /
``init_timeout_s``, ``minicpmo.prefill_timeout_s`` / ``generate_timeout_s`` /
``prepare_timeout_s``) are derived from them as shares below 1, so a dead server fails with the
backend's own error (and its own recovery) before the flow gives the call up as hung. One set
explicitly must leave its deadline room: the timeouts of one deadline run one after the other in
one call, so their sum must stay below it, or :func:`node_setup` refuses naming both.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omni_ros.backends.base import BACKENDS, backend_class
from omni_ros.core.audio import ENCODINGS
from omni_ros.core.config import check_type
from omni_ros.core.errors import ConfigError
from omni_ros.core.flow import FlowConfig
from omni_ros.ros._params import ParamSpec, build_config, config_params

#: The node's own parameters: name -> (default, description). FlowConfig's are derived.
NODE_PARAMS: dict[str, tuple[Any, str]] = {
    "autostart": (True, "configure + activate at startup (no lifecycle manager needed)"),
    "backend": ("reference", "backend name: reference | minicpmo | llamacpp_omni | vllm_omni"),
    "system_prompt": (FlowConfig().system_prompt, "system prompt given to the backend"),
    "ref_voice_path": ("", "WAV file with the reference voice; empty = none"),
    "camera.compressed": (False, "subscribe camera/image_raw/compressed (CompressedImage)"),
    # The microphone's message type (omni_ros.ros.audio_common: the two audio_common forks).
    "mic.type": ("omni_ros_msgs/msg/AudioChunk", "audio/mic type: AudioChunk | audio_common's"),
    "mic.info_topic": ("audio_info", "AudioInfo topic of an AudioDataStamped mic (ros-drivers)"),
    "mic.format": ("", "RATE:CHANNELS:SAMPLE_FORMAT of an AudioDataStamped mic without audio_info"),
    "speech.chunk_ms": (100, "omni/speech chunk length [ms]"),
    "speech.encoding": ("S16LE", "omni/speech encoding: S16LE | F32LE"),
    "diagnostics.period_s": (1.0, "/diagnostics period [s] (read at startup)"),
    "diagnostics.clock_stall_s": (2.0, "clock standing still this long is a WARN [s]; 0 = off"),
    "ask.default_timeout_s": (30.0, "omni/ask timeout when the goal's timeout_s is 0 [s]"),
    "ask.max_goals": (2, "omni/ask goals served at once; more are rejected"),
    "prompt.answer_timeout_s": (
        10.0,
        "omni/set_prompt waits this long for a busy backend to start preparing [s]",
    ),
    "prompt.max_bytes": (16_384, "longest system prompt [UTF-8 bytes] (checked before embedding)"),
    "ref_voice.min_s": (0.1, "shortest reference voice [s]"),
    "ref_voice.max_s": (30.0, "longest reference voice [s]"),
    "tensorrt.enabled": (False, "swap backend components for verified TensorRT engines"),
    "tensorrt.engine_dir": ("", "engine cache folder; empty = the package's tensorrt_engines/"),
    "tensorrt.components": ("vision,audio,vocoder", "components to accelerate, comma separated"),
}

#: FlowConfig's parameters as the node declares them (``flow.system_prompt`` is ``system_prompt``).
FLOW_PARAM_SPECS: list[ParamSpec] = [
    s for s in config_params(FlowConfig) if s.name != "flow.system_prompt"
]

#: Parameters rclpy gives every node (exact names, and prefixes).
ROS_PARAMS = ("use_sim_time", "start_type_description_service", "start_parameter_event_publisher")
ROS_PREFIXES = ("qos_overrides.",)


@dataclass(frozen=True)
class NodeSetup:
    """Everything configure needs, validated (see the module docstring).

    Attributes:
        backend: the backend name (a key of ``BACKENDS``).
        backend_params: that backend's ``<backend>.*`` parameters without the prefix.
        flow: the Omni-Flow config (timeline, session, vad, aec, flow).
        system_prompt: the system prompt.
        ref_voice_path: WAV file with the reference voice ("" = none).
        camera_compressed: subscribe the compressed image topic.
        speech_chunk_ms: ``omni/speech`` chunk length [ms].
        speech_encoding: ``omni/speech`` encoding (upper case).
        diagnostics_period_s: ``/diagnostics`` period [s].
        ask_default_timeout_s: ``omni/ask`` timeout when a goal gives 0 [s].
        tensorrt_enabled: swap components for TensorRT engines.
        tensorrt_engine_dir: engine cache folder ("" = the package's).
        tensorrt_components: components to accelerate, comma separated.
        derived_timeouts: the backend timeouts derived from the flow's deadlines (also in
            ``backend_params``), field -> seconds.
    """

    backend: str
    backend_params: dict[str, Any]
    flow: FlowConfig
    system_prompt: str
    ref_voice_path: str
    camera_compressed: bool
    speech_chunk_ms: int
    speech_encoding: str
    diagnostics_period_s: float
    ask_default_timeout_s: float
    tensorrt_enabled: bool
    tensorrt_engine_dir: str
    tensorrt_components: str
    derived_timeouts: dict[str, float] = dataclasses.field(default_factory=dict)


def suggest(name: str, known: typing.Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest known name, or ``""`` when nothing is close."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if not close:  # a typo in the namespace only: compare the last part as well
        leaf = name.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in known}
        leaves = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.8)
        close = [by_leaf[leaves[0]]] if leaves else []
    return f"; did you mean '{close[0]}'?" if close else ""


def _backend_fields(name: str) -> dict[str, str]:
    """Field name -> annotation text of backend ``name``'s config class."""
    cls = backend_class(name).config_class
    hints = typing.get_type_hints(cls)
    fields: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        annotation = hints.get(f.name)
        text = getattr(annotation, "__name__", None) or str(annotation)
        fields[f.name] = text.replace("typing.", "").replace("NoneType", "None")
    return fields


def known_parameters(backend: str) -> dict[str, str]:
    """Every parameter name the node accepts with ``backend`` chosen -> its type name."""
    known = {name: type(default).__name__ for name, (default, _text) in NODE_PARAMS.items()}
    known.update({s.name: s.type_name for s in FLOW_PARAM_SPECS})
    known.update({f"{backend}.{k}": t for k, t in _backend_fields(backend).items()})
    return known


def node_setup(values: Mapping[str, Any], backend: str | None = None) -> NodeSetup:
    """Validate flat node parameters (``{"speech.chunk_ms": 100, "reference.size": "tiny"}``)
    and build the configs from them; parameters not given keep their defaults.

    Args:
        values: flat dotted parameter names -> values (a params file's, or the node's).
        backend: overrides ``values["backend"]`` (``omni-ros replay --backend``).

    Raises:
        ConfigError: an unknown name (with a suggestion), a wrong type (naming the parameter,
            the expected type and the value), or a value the configs reject.
    """
    name = backend or values.get("backend") or NODE_PARAMS["backend"][0]
    if not isinstance(name, str) or name not in BACKENDS:
        raise ConfigError(
            f"backend {name!r} unknown; choose one of {sorted(BACKENDS)}"
            + (suggest(name, BACKENDS) if isinstance(name, str) else "")
        )
    known = known_parameters(name)
    other_backends = tuple(f"{b}." for b in BACKENDS if b != name)
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key in ROS_PARAMS or key.startswith(ROS_PREFIXES) or key == "backend":
            continue
        if key.startswith(other_backends):
            continue  # another backend's section of a shared params file: not used
        if key not in known:
            raise ConfigError(f"unknown parameter {key!r}" + suggest(key, known))
        if value is None:  # declared without a value: keeps its default
            continue
        checked[key] = check_type(key, known[key], config_value_of(value))

    def node(param: str) -> Any:
        return checked.get(param, NODE_PARAMS[param][0])

    chunk_ms = int(node("speech.chunk_ms"))
    if chunk_ms <= 0:
        raise ConfigError(f"speech.chunk_ms must be > 0, got {chunk_ms}")
    encoding = str(node("speech.encoding")).strip().upper()
    if encoding not in ENCODINGS:
        raise ConfigError(
            f"speech.encoding = {node('speech.encoding')!r}: choose one of {list(ENCODINGS)}"
        )
    flow_values = {k: v for k, v in checked.items() if k.split(".")[0] in _FLOW_NAMESPACES}
    flow_values["flow.system_prompt"] = str(node("system_prompt"))
    flow = build_config(FlowConfig, flow_values)
    prefix = name + "."
    backend_params = {k[len(prefix) :]: v for k, v in checked.items() if k.startswith(prefix)}
    derived = deadline_timeouts(name, flow, backend_params)
    return NodeSetup(
        backend=name,
        backend_params={**derived, **backend_params},
        flow=flow,
        system_prompt=str(node("system_prompt")),
        ref_voice_path=str(node("ref_voice_path")),
        camera_compressed=bool(node("camera.compressed")),
        speech_chunk_ms=chunk_ms,
        speech_encoding=encoding,
        diagnostics_period_s=float(node("diagnostics.period_s")),
        ask_default_timeout_s=float(node("ask.default_timeout_s")),
        tensorrt_enabled=bool(node("tensorrt.enabled")),
        tensorrt_engine_dir=str(node("tensorrt.engine_dir")),
        tensorrt_components=str(node("tensorrt.components")),
        derived_timeouts=derived,
    )


def deadline_timeouts(backend: str, flow: FlowConfig, given: Mapping[str, Any]) -> dict[str, float]:
    """The ``backend``'s timeouts that the flow's deadlines bound, derived from them unless
    ``given`` (see the module docstring): field -> seconds, for the fields not in ``given``.

    Raises:
        ConfigError: timeouts of one deadline (given or derived) that add up to it or beyond, so
            the flow would give the call up before the backend's own timeout could fire.
    """
    shares: Mapping[str, tuple[str, float]] = getattr(
        backend_class(backend).config_class, "FLOW_DEADLINE_SHARES", {}
    )
    derived: dict[str, float] = {}
    for deadline in dict.fromkeys(d for d, _share in shares.values()):
        deadline_ms = int(getattr(flow, deadline))
        fields = [f for f, (d, _share) in shares.items() if d == deadline]
        for f in fields:
            if f not in given:
                derived[f] = round(shares[f][1] * deadline_ms / 1000, 3)
        total_s = sum(float(given[f]) if f in given else derived[f] for f in fields)
        if total_s >= deadline_ms / 1000:
            explicit = ", ".join(f"{backend}.{f} = {given[f]} s" for f in fields if f in given)
            raise ConfigError(
                f"{explicit} leaves flow.{deadline} = {deadline_ms} ms no room: "
                f"{' + '.join(f'{backend}.{f}' for f in fields)} = {total_s:g} s run within one "
                f"call and must stay below it, or the flow gives the call up before the backend's "
                f"own timeout fires; leave them unset (derived from flow.{deadline}) or raise "
                f"flow.{deadline}"
            )
    return derived


def build_backend_config(setup: NodeSetup) -> Any:
    """The chosen backend's config from ``setup.backend_params`` (its own checks run here).

    Raises:
        ConfigError: the config's own checks; a timeout derived from a flow deadline that they
            refuse is named as derived, with the deadline to raise.
    """
    config_class = backend_class(setup.backend).config_class
    try:
        return config_class.from_mapping(dict(setup.backend_params))
    except ConfigError as exc:
        shares: Mapping[str, tuple[str, float]] = getattr(config_class, "FLOW_DEADLINE_SHARES", {})
        named = [f for f in setup.derived_timeouts if f in str(exc)]
        if not named:
            raise
        origin = ", ".join(
            f"{setup.backend}.{f} = {setup.derived_timeouts[f]} s from flow.{shares[f][0]}"
            for f in named
        )
        raise ConfigError(f"{exc} (derived: {origin}; raise that deadline)") from exc


_FLOW_NAMESPACES = {s.name.split(".")[0] for s in FLOW_PARAM_SPECS}


def config_value_of(value: Any) -> Any:
    """A ROS parameter value as a plain value (rclpy arrays become tuples)."""
    if isinstance(value, list | tuple) or type(value).__name__ == "array":
        return tuple(value)
    return value
