"""The launch files and YAML configs reference only things that exist.

This machine has no ``launch`` / ``launch_ros`` (see docs), so the launch files are checked in two
ways: statically with ``ast`` (executables, files, launch arguments), and by running their Python
against a test double of the launch API that records the actions they would create.

Parameter names come from the nodes' own tables: ``ros/_setup.NODE_PARAMS`` + the specs derived
from ``FlowConfig`` + ``<backend>.<field>`` for every field of each backend's config dataclass;
``mic_node.PARAMETERS``; ``speaker_node.PARAMETERS``. Node modules import rclpy, so their tables
and the backends' dataclasses (some import torch) are read with ``ast``, never imported.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from omni_ros.backends.base import BACKENDS, MODEL_PARAMETER
from omni_ros.ros._params import flatten_parameters
from omni_ros.ros.launch_arguments import ARGUMENTS, OPTIONAL_NODES

PKG = Path(__file__).resolve().parents[2]
SRC = PKG / "omni_ros"
LAUNCH_FILES = sorted((PKG / "launch").glob("*.launch.py"))
CONFIG_FILES = sorted((PKG / "config").glob("*.yaml"))
NODE_KEYS = {
    "/**": "omni_flow_node",
    "omni_flow_node": "omni_flow_node",
    "/omni_flow_node": "omni_flow_node",
}


# ------------------------------------------------------------------------------------- helpers
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _assignment(path: Path, name: str) -> ast.expr:
    """The expression assigned to module-level ``name`` (``name = ...`` or ``name: T = ...``)."""
    for stmt in _tree(path).body:
        if isinstance(stmt, ast.Assign):
            targets, value = stmt.targets, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            targets, value = [stmt.target], stmt.value
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return value
    raise AssertionError(f"{path.name} assigns no module-level {name}")


def _module_literal(path: Path, name: str) -> Any:
    """The literal value of a module-level ``name = ...`` / ``name: T = ...`` in ``path``."""
    return ast.literal_eval(_assignment(path, name))


def _parameter_table(path: Path, name: str) -> dict[str, str]:
    """Parameter name -> type of its default, from a module-level ``{name: (default, doc)}``.

    A default that is not a literal (e.g. ``FlowConfig().system_prompt``) gets type ``any``.
    """
    expr = _assignment(path, name)
    assert isinstance(expr, ast.Dict), f"{path.name}: {name} is not a dict literal"
    table: dict[str, str] = {}
    for key, value in zip(expr.keys, expr.values, strict=True):
        assert isinstance(key, ast.Constant), f"{path.name}: {name} keys must be literals"
        assert isinstance(value, ast.Tuple), f"{path.name}: {name}[{key.value!r}] is not a tuple"
        try:
            table[str(key.value)] = _type_of_default(ast.literal_eval(value.elts[0]))
        except ValueError:
            table[str(key.value)] = "any"
    return table


def _argument_names(path: Path) -> set[str]:
    """The arguments a launch file declares: every ``DeclareLaunchArgument`` it returns.

    Its Python runs against :class:`LaunchApiDouble` (declaring needs nothing else).
    """
    double = LaunchApiDouble(PKG)
    saved = {name: sys.modules.get(name) for name in double.modules}
    try:
        sys.modules.update(double.modules)
        actions = double.load(path).generate_launch_description().args[0]
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    declared = [a.args[0] for a in actions if type(a).__name__ == "DeclareLaunchArgument"]
    assert len(declared) == len(set(declared)), f"{path.name} declares an argument twice"
    return set(declared)


def _console_script_entries() -> dict[str, str]:
    """console_scripts of setup.py: name -> ``module:function``."""
    for node in ast.walk(_tree(PKG / "setup.py")):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "console_scripts":
                    entries = ast.literal_eval(value)
                    return {
                        entry.split("=")[0].strip(): entry.split("=")[1].strip()
                        for entry in entries
                    }
    raise AssertionError("setup.py declares no console_scripts")


def _console_scripts() -> set[str]:
    for node in ast.walk(_tree(PKG / "setup.py")):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "console_scripts":
                    entries = ast.literal_eval(value)
                    return {entry.split("=")[0].strip() for entry in entries}
    raise AssertionError("setup.py declares no console_scripts")


def _calls(tree: ast.AST, *names: str) -> Iterator[ast.Call]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name in names:
                yield node


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


def _dataclass_fields(path: Path, class_name: str) -> dict[str, str]:
    """Field name -> annotation text of a dataclass defined in ``path``."""
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return {
                stmt.target.id: ast.unparse(stmt.annotation)
                for stmt in node.body
                if isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and not ast.unparse(stmt.annotation).startswith("ClassVar")
            }
    raise AssertionError(f"{path.name} defines no class {class_name}")


def _backend_fields(backend: str) -> dict[str, str]:
    module, _, class_name = BACKENDS[backend].partition(":")
    path = SRC.parent / (module.replace(".", "/") + ".py")
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for stmt in node.body:
                if (
                    isinstance(stmt, ast.AnnAssign)
                    and isinstance(stmt.target, ast.Name)
                    and stmt.target.id == "config_class"
                    and stmt.value is not None
                ):
                    return _dataclass_fields(path, ast.unparse(stmt.value))
    raise AssertionError(f"{class_name} in {path.name} has no config_class")


def _type_of_default(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


def declared_parameters(executable: str) -> dict[str, str]:
    """Parameter name -> expected type text for the parameters ``executable`` declares."""
    params = {"use_sim_time": "bool"}
    if executable == "omni_flow_node":
        from omni_ros.core.flow import FlowConfig
        from omni_ros.ros._params import config_params

        params |= _parameter_table(SRC / "ros" / "_setup.py", "NODE_PARAMS")
        params |= {spec.name: spec.type_name for spec in config_params(FlowConfig)}
        for backend in BACKENDS:
            params |= {f"{backend}.{k}": t for k, t in _backend_fields(backend).items()}
    else:
        params |= _parameter_table(SRC / "ros" / f"{executable}.py", "PARAMETERS")
    return params


def _accepts(type_text: str, value: Any) -> bool:
    """Would a parameter of ``type_text`` accept ``value`` from YAML (ROS is strict: 1 is not 1.0)."""
    options = {t.strip() for t in type_text.replace("Optional[", "").rstrip("]").split("|")}
    if "any" in options:
        return True
    if isinstance(value, bool):
        return "bool" in options
    if isinstance(value, int):
        return "int" in options
    if isinstance(value, float):
        return "float" in options
    if isinstance(value, str):
        return "str" in options
    if isinstance(value, list):
        return any(t == "list" or t.startswith(("tuple", "list")) for t in options)
    return False


def _config_sections() -> Iterator[tuple[Path, str, dict[str, Any]]]:
    for path in CONFIG_FILES:
        doc = yaml.safe_load(path.read_text()) or {}
        for key, section in doc.items():
            executable = NODE_KEYS.get(key, key.lstrip("/"))
            yield path, executable, flatten_parameters(section.get("ros__parameters", {}))


# ---------------------------------------------------------------------------- static checks
def test_there_are_launch_files_and_configs_for_every_backend() -> None:
    assert {p.name for p in LAUNCH_FILES} >= {"omni_flow.launch.py", "replay.launch.py"}
    names = {p.name for p in CONFIG_FILES}
    assert {f"{backend}.yaml" for backend in BACKENDS} <= names, "backend:=X loads config/X.yaml"
    assert {"mic.yaml", "speaker.yaml"} <= names


@pytest.mark.parametrize("launch_file", LAUNCH_FILES, ids=lambda p: p.name)
def test_every_launched_executable_is_an_installed_console_script(launch_file: Path) -> None:
    scripts = _console_scripts()
    tree = _tree(launch_file)
    for call in _calls(tree, "Node", "LifecycleNode"):
        executable, package = _keyword(call, "executable"), _keyword(call, "package")
        if isinstance(executable, ast.Constant):
            assert executable.value in scripts, (
                f"{executable.value!r} is not in setup.py console_scripts"
            )
        else:  # the optional nodes' loop
            assert ast.unparse(executable) == "extra.executable", ast.unparse(executable)
        assert isinstance(package, ast.Name | ast.Constant)
        package_name = (
            package.value
            if isinstance(package, ast.Constant)
            else _module_literal(launch_file, package.id)
        )
        assert package_name == "omni_ros"
    for extra in OPTIONAL_NODES:
        assert extra.executable in scripts, f"{extra.executable!r} is not a console script"
        assert extra.flag in {a.name for a in ARGUMENTS}


@pytest.mark.parametrize("launch_file", LAUNCH_FILES, ids=lambda p: p.name)
def test_every_file_a_launch_file_names_exists(launch_file: Path) -> None:
    tree = _tree(launch_file)
    literals = [
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    ]
    for text in literals:
        if not re.fullmatch(r"[\w.-]+\.(yaml|launch\.py)", text):
            continue  # descriptions and messages, not file names
        if text.endswith(".yaml"):
            assert (PKG / "config" / text).is_file(), f"config/{text} is missing"
        if text.endswith(".launch.py"):
            assert (PKG / "launch" / text).is_file(), f"launch/{text} is missing"
    if launch_file.name == "omni_flow.launch.py":
        for extra in OPTIONAL_NODES:
            assert extra.config is None or (PKG / "config" / extra.config).is_file()
        assert set(MODEL_PARAMETER) == set(BACKENDS), "every backend has a model parameter"
        for backend, param in MODEL_PARAMETER.items():
            assert param in _backend_fields(backend), f"{backend} has no config field {param}"
            assert (PKG / "config" / f"{backend}.yaml").is_file()


@pytest.mark.parametrize("launch_file", LAUNCH_FILES, ids=lambda p: p.name)
def test_every_launch_argument_used_is_declared(launch_file: Path) -> None:
    tree = _tree(launch_file)
    declared = _argument_names(launch_file)
    for call in _calls(tree, "DeclareLaunchArgument"):
        if call.args and isinstance(call.args[0], ast.Constant):
            declared.add(call.args[0].value)
    used = {
        str(call.args[0].value)
        for call in _calls(tree, "LaunchConfiguration", "arg")
        if call.args and isinstance(call.args[0], ast.Constant)
    }
    assert used <= declared, f"used but not declared: {sorted(used - declared)}"


def test_replay_forwards_only_arguments_that_the_main_launch_file_declares() -> None:
    main = _argument_names(PKG / "launch" / "omni_flow.launch.py")
    replay_file = PKG / "launch" / "replay.launch.py"
    forwarded = _argument_names(replay_file)
    for call in _calls(_tree(replay_file), "IncludeLaunchDescription"):
        arguments = _keyword(call, "launch_arguments")
        assert arguments is not None
        for node in ast.walk(arguments):
            if isinstance(node, ast.Dict):
                forwarded |= {k.value for k in node.keys if isinstance(k, ast.Constant)}
    assert forwarded <= main, f"not declared by omni_flow.launch.py: {sorted(forwarded - main)}"


@pytest.mark.parametrize(
    ("path", "executable", "flat"),
    list(_config_sections()),
    ids=[f"{p.name}:{e}" for p, e, _ in _config_sections()],
)
def test_every_config_key_is_a_declared_parameter_of_the_right_type(
    path: Path, executable: str, flat: dict[str, Any]
) -> None:
    assert executable in _console_scripts(), f"{path.name}: no node {executable}"
    declared = declared_parameters(executable)
    unknown = sorted(set(flat) - set(declared))
    assert not unknown, f"{path.name}: {executable} declares no parameter(s) {unknown}"
    wrong = {k: v for k, v in flat.items() if not _accepts(declared[k], v)}
    assert not wrong, (
        f"{path.name}: values of the wrong type {wrong} (expected {[declared[k] for k in wrong]})"
    )
    if executable == "omni_flow_node" and path.stem in BACKENDS:
        assert flat.get("backend") == path.stem
        namespaces = {k.split(".")[0] for k in flat if k.split(".")[0] in BACKENDS}
        assert namespaces <= {path.stem}, f"{path.name} sets another backend's parameters"


def test_the_parameter_check_rejects_what_ros_would_reject() -> None:
    declared = declared_parameters("speaker_node")
    assert _accepts(declared["max_ahead_s"], 5.0)
    assert not _accepts(declared["max_ahead_s"], 5), "ROS refuses an integer for a double"
    assert "minicpmo.trust_remote_code" in declared_parameters("omni_flow_node")
    assert "minicpmo.no_such_field" not in declared_parameters("omni_flow_node")


# ------------------------------------------------------------- running them on a launch double
class LaunchApiDouble:
    """A test double of the ``launch`` / ``launch_ros`` / ``ament_index_python`` APIs the launch
    files use: every action records its arguments; OpaqueFunction runs on :meth:`run`.

    Behaviours copied from ros2/launch (checked against the real thing, see README "ROS 2
    distributions"):

    - ``DeclareLaunchArgument.execute`` (launch/actions/declare_launch_argument.py): a value
      already in the context wins over the default; a value outside ``choices`` raises
      ``RuntimeError('Argument "NAME" provided value "V" is not valid. Valid options are: [...]')``.
    - ``IncludeLaunchDescription.execute`` (launch/actions/include_launch_description.py): each
      ``launch_arguments`` entry becomes a launch configuration before the included description
      runs, so the included file's own defaults apply only to arguments not forwarded.
    - arguments given on the command line but declared nowhere are still set (ros2launch's
      ``launch_a_launch_file`` puts every ``name:=value`` into the context), so a launch file that
      does not declare an argument silently ignores it.
    """

    def __init__(self, share_dir: Path) -> None:
        self.share_dir = share_dir
        self.modules: dict[str, types.ModuleType] = {}
        recorded = self

        class Action:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self.args, self.kwargs = args, kwargs

        class LaunchDescription(Action):
            pass

        class DeclareLaunchArgument(Action):
            pass

        class OpaqueFunction(Action):
            pass

        class IncludeLaunchDescription(Action):
            pass

        class SetEnvironmentVariable(Action):
            pass

        class PythonLaunchDescriptionSource(Action):
            pass

        class IfCondition(Action):
            pass

        class Node(Action):
            pass

        class LifecycleNode(Action):
            pass

        class LaunchConfiguration:
            def __init__(self, name: str) -> None:
                self.name = name

            def perform(self, context: Any) -> str:
                return str(context.launch_configurations[self.name])

        def get_package_share_directory(package: str) -> str:
            assert package == "omni_ros"
            return str(recorded.share_dir)

        spec: dict[str, dict[str, Any]] = {
            "launch": {"LaunchContext": object, "LaunchDescription": LaunchDescription},
            "launch.actions": {
                "DeclareLaunchArgument": DeclareLaunchArgument,
                "OpaqueFunction": OpaqueFunction,
                "IncludeLaunchDescription": IncludeLaunchDescription,
                "SetEnvironmentVariable": SetEnvironmentVariable,
            },
            "launch.conditions": {"IfCondition": IfCondition},
            "launch.substitutions": {"LaunchConfiguration": LaunchConfiguration},
            "launch.launch_description_sources": {
                "PythonLaunchDescriptionSource": PythonLaunchDescriptionSource
            },
            "launch_ros": {},
            "launch_ros.actions": {"Node": Node, "LifecycleNode": LifecycleNode},
            "ament_index_python": {},
            "ament_index_python.packages": {
                "get_package_share_directory": get_package_share_directory
            },
        }
        for name, attrs in spec.items():
            module = types.ModuleType(name)
            for attr, value in attrs.items():
                setattr(module, attr, value)
            self.modules[name] = module

    def run(self, launch_file: Path, **arguments: str) -> list[Any]:
        """Load ``launch_file`` with command-line ``arguments``; run it like ``ros2 launch`` does.

        Returns the node actions created (includes are followed).
        """
        return self._execute(launch_file, dict(arguments))

    @staticmethod
    def load(launch_file: Path) -> types.ModuleType:
        """Import ``launch_file`` (the launch API modules must be this double's by then)."""
        spec = importlib.util.spec_from_file_location(
            launch_file.stem.replace(".", "_"), launch_file
        )
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    def _execute(self, launch_file: Path, configurations: dict[str, str]) -> list[Any]:
        description = self.load(launch_file).generate_launch_description()
        context = types.SimpleNamespace(launch_configurations=configurations)
        created: list[Any] = []
        for action in description.args[0]:
            kind = type(action).__name__
            if kind == "DeclareLaunchArgument":
                name = action.args[0]
                configurations.setdefault(name, action.kwargs["default_value"])
                choices = action.kwargs.get("choices")
                if choices is not None and configurations[name] not in choices:
                    raise RuntimeError(
                        f'Argument "{name}" provided value "{configurations[name]}" is not '
                        f"valid. Valid options are: {choices}"
                    )
            elif kind == "OpaqueFunction":
                created += action.kwargs["function"](context)
            elif kind == "IncludeLaunchDescription":
                included = Path(action.args[0].args[0])
                for name, value in action.kwargs["launch_arguments"]:
                    configurations[name] = (
                        value.perform(context) if hasattr(value, "perform") else value
                    )
                created += self._execute(included, configurations)
            else:
                created.append(action)
        return created


@pytest.fixture
def launch_double(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LaunchApiDouble:
    share = tmp_path / "share" / "omni_ros"
    share.mkdir(parents=True)
    (share / "config").symlink_to(PKG / "config")
    (share / "launch").symlink_to(PKG / "launch")
    double = LaunchApiDouble(share)
    for name, module in double.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return double


def _lifecycle(created: list[Any]) -> Any:
    nodes = [a for a in created if type(a).__name__ == "LifecycleNode"]
    assert len(nodes) == 1
    return nodes[0]


def _audio(created: list[Any]) -> dict[str, Any]:
    return {a.kwargs["executable"]: a for a in created if type(a).__name__ == "Node"}


MAIN = PKG / "launch" / "omni_flow.launch.py"
REPLAY = PKG / "launch" / "replay.launch.py"


def test_the_default_launch_runs_the_reference_backend_from_its_config(
    launch_double: LaunchApiDouble,
) -> None:
    created = launch_double.run(MAIN)
    node = _lifecycle(created)
    (params,) = node.kwargs["parameters"]
    assert node.kwargs["executable"] == "omni_flow_node"
    assert node.kwargs["namespace"] == ""
    assert params["backend"] == "reference"
    assert params["reference.size"] == "tiny"
    assert params["use_sim_time"] is False
    assert params["tensorrt.enabled"] is False
    assert node.kwargs["arguments"] == ["--ros-args", "--log-level", "info"]
    assert _audio(created) == {}, "mic and speaker only with with_mic:=true / with_speaker:=true"
    audio = _audio(launch_double.run(MAIN, with_mic="true", with_speaker="True"))
    assert set(audio) == {"mic_node", "speaker_node"}
    assert audio["speaker_node"].kwargs["parameters"][0]["sample_rate"] == 24000
    assert audio["mic_node"].kwargs["parameters"][0]["source"] == "pyaudio"
    live = _audio(launch_double.run(MAIN, with_foxglove="true"))["omni_live_view"]
    assert live.kwargs["parameters"][0] == {"port": 8765, "use_sim_time": False}


def test_launch_arguments_reach_the_node_parameters(launch_double: LaunchApiDouble) -> None:
    created = launch_double.run(
        MAIN,
        backend="minicpmo",
        model="/models/MiniCPM-o-4_5",
        namespace="robot1",
        use_sim_time="true",
        engine_dir="/data/engines",
        log_level="debug",
        with_mic="true",
        with_speaker="true",
    )
    node = _lifecycle(created)
    (params,) = node.kwargs["parameters"]
    assert node.kwargs["namespace"] == "robot1"
    assert params["backend"] == "minicpmo"
    assert params["minicpmo.model"] == "/models/MiniCPM-o-4_5"
    assert params["minicpmo.trust_remote_code"] is False, "remote code stays opt-in"
    assert params["use_sim_time"] is True
    assert params["tensorrt.enabled"] is True
    assert params["tensorrt.engine_dir"] == "/data/engines"
    assert node.kwargs["arguments"] == ["--ros-args", "--log-level", "debug"]
    audio = _audio(created)
    assert set(audio) == {"mic_node", "speaker_node"}
    for audio_node in audio.values():
        assert audio_node.kwargs["namespace"] == "robot1"
        assert audio_node.kwargs["parameters"][0]["use_sim_time"] is True


def test_a_custom_params_file_replaces_the_backend_config(
    launch_double: LaunchApiDouble, tmp_path: Path
) -> None:
    custom = tmp_path / "custom.yaml"
    custom.write_text("/**:\n  ros__parameters:\n    reference:\n      seed: 7\n")
    node = _lifecycle(launch_double.run(MAIN, params_file=str(custom)))
    (params,) = node.kwargs["parameters"]
    assert params["reference.seed"] == 7
    assert "reference.size" not in params


def test_every_mic_and_speaker_parameter_is_reachable_from_the_params_file(
    launch_double: LaunchApiDouble, tmp_path: Path
) -> None:
    mic = declared_parameters("mic_node")
    speaker = declared_parameters("speaker_node")
    custom = tmp_path / "robot.yaml"
    custom.write_text(
        yaml.safe_dump(
            {
                "/**": {"ros__parameters": {"backend": "reference"}},
                "mic_node": {"ros__parameters": {"source": "wav", "wav_path": "/data/in.wav"}},
                "/speaker_node": {"ros__parameters": {"sink": "null", "max_ahead_s": 2.5}},
            }
        )
    )
    audio = _audio(
        launch_double.run(MAIN, params_file=str(custom), with_mic="true", with_speaker="true")
    )
    mic_params = audio["mic_node"].kwargs["parameters"][0]
    speaker_params = audio["speaker_node"].kwargs["parameters"][0]
    assert mic_params["source"] == "wav"
    assert mic_params["wav_path"] == "/data/in.wav"
    assert mic_params["chunk_ms"] == 50, "keys the file leaves out keep config/mic.yaml's value"
    assert speaker_params["sink"] == "null"
    assert speaker_params["max_ahead_s"] == 2.5
    assert "backend" not in mic_params, "/** holds omni_flow_node's parameters, not the mic's"
    # config/*.yaml name every parameter, so a params file section can override each of them.
    assert set(mic_params) == set(mic), sorted(set(mic) ^ set(mic_params))
    assert set(speaker_params) == set(speaker), sorted(set(speaker) ^ set(speaker_params))


def test_a_params_file_with_only_audio_sections_keeps_the_backend_config(
    launch_double: LaunchApiDouble, tmp_path: Path
) -> None:
    custom = tmp_path / "mic_only.yaml"
    custom.write_text("mic_node:\n  ros__parameters:\n    device: USB\n")
    created = launch_double.run(MAIN, params_file=str(custom), with_mic="true")
    assert _lifecycle(created).kwargs["parameters"][0]["reference.size"] == "tiny"
    assert _audio(created)["mic_node"].kwargs["parameters"][0]["device"] == "USB"


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("log_level", "verbose", 'Argument "log_level" provided value "verbose" is not valid'),
        ("with_mic", "yes", 'Argument "with_mic" provided value "yes" is not valid'),
        ("use_sim_time", "on", 'Argument "use_sim_time" provided value "on" is not valid'),
        ("backend", "gpt", "backend:=gpt unknown"),
        ("params_file", "/no/such/file.yaml", "params_file:=/no/such/file.yaml is not a file"),
        ("namespace", "robot 1", "namespace:=robot 1 is not a ROS namespace"),
    ],
)
def test_a_bad_argument_stops_the_launch_with_a_message_naming_it(
    launch_double: LaunchApiDouble, argument: str, value: str, message: str
) -> None:
    # Under ros2 launch these exceptions end the launch with "Caught exception in launch" and
    # exit code 1 before any process starts (before the fix, log_level:=verbose started the
    # node, which died in rclpy.init with a traceback while launch exited 0).
    for launch_file in (MAIN, REPLAY):
        with pytest.raises(RuntimeError) as excinfo:
            launch_double.run(launch_file, **{argument: value})
        assert message in str(excinfo.value)


def test_replay_launch_defaults_to_sim_time_and_no_audio_nodes(
    launch_double: LaunchApiDouble,
) -> None:
    created = launch_double.run(REPLAY, backend="llamacpp_omni")
    node = _lifecycle(created)
    assert node.kwargs["parameters"][0]["use_sim_time"] is True
    assert node.kwargs["parameters"][0]["backend"] == "llamacpp_omni"
    assert _audio(created) == {}


def test_replay_launch_honours_explicit_sim_time_and_audio_arguments(
    launch_double: LaunchApiDouble,
) -> None:
    created = launch_double.run(
        REPLAY, use_sim_time="false", with_mic="true", with_speaker="true", namespace="r2"
    )
    node = _lifecycle(created)
    assert node.kwargs["parameters"][0]["use_sim_time"] is False
    assert set(_audio(created)) == {"mic_node", "speaker_node"}
    assert node.kwargs["namespace"] == "r2"


def test_replay_declares_every_argument_of_the_main_launch_file() -> None:
    assert _argument_names(REPLAY) == _argument_names(MAIN), (
        "an argument replay.launch.py does not declare is silently ignored by ros2 launch"
    )


def test_every_console_script_points_at_a_function_that_exists() -> None:
    for script, target in _console_script_entries().items():
        module, _, function = target.partition(":")
        path = SRC.parent / (module.replace(".", "/") + ".py")
        assert path.is_file(), f"console script {script} -> {module}: {path} does not exist"
        functions = {n.name for n in _tree(path).body if isinstance(n, ast.FunctionDef)}
        assert function in functions, f"console script {script}: {path.name} has no {function}()"


def test_the_launch_gives_its_nodes_the_shipped_fast_dds_profile_unless_told_otherwise(
    launch_double: LaunchApiDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Camera-size frames only arrive with it (docs/RELIABILITY.md); a user's own is kept."""
    launch_file = PKG / "launch" / "omni_flow.launch.py"
    variables = ["FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE"]
    for variable in variables:
        monkeypatch.delenv(variable, raising=False)

    def profile(**overrides: str) -> list[tuple[Any, ...]]:
        created = launch_double.run(launch_file, **overrides)
        return [a.args for a in created if type(a).__name__ == "SetEnvironmentVariable"]

    # Both names: Fast DDS 3 (Kilted) reads the first, Fast DDS 2 (Jazzy, Humble) the second.
    set_ = profile()
    assert [name for name, _ in set_] == variables
    (path,) = {path for _, path in set_}
    assert Path(path).name == "fastdds_camera.xml"
    assert Path(path).is_file()
    assert profile(dds_profile="none") == []
    custom = PKG / "config" / "fastdds_camera.xml"
    assert profile(dds_profile=str(custom)) == [(v, str(custom)) for v in variables]
    monkeypatch.setenv("FASTRTPS_DEFAULT_PROFILES_FILE", "/etc/my_profile.xml")
    assert profile() == []  # a user's own profile (either name) is kept


def test_driver_topics_and_the_mic_type_are_launch_arguments(
    launch_double: LaunchApiDouble, tmp_path: Path
) -> None:
    node = _lifecycle(
        launch_double.run(
            MAIN,
            camera_topic="/camera/camera/color/image_raw",
            mic_topic="/audio",
            mic_type="audio_common_msgs/msg/AudioStamped",
        )
    )
    assert node.kwargs["remappings"] == [
        ("camera/image_raw", "/camera/camera/color/image_raw"),
        ("audio/mic", "/audio"),
    ]
    assert node.kwargs["parameters"][0]["mic.type"] == "audio_common_msgs/msg/AudioStamped"
    assert "mic.type" in declared_parameters("omni_flow_node")
    compressed = tmp_path / "compressed.yaml"
    compressed.write_text("/**:\n  ros__parameters:\n    camera:\n      compressed: true\n")
    node = _lifecycle(
        launch_double.run(MAIN, params_file=str(compressed), camera_topic="/image_raw/compressed")
    )
    assert node.kwargs["remappings"] == [("camera/image_raw/compressed", "/image_raw/compressed")]
    assert _lifecycle(launch_double.run(MAIN)).kwargs["remappings"] == []


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        (
            "mic_type",
            "AudioStamped",
            'Argument "mic_type" provided value "AudioStamped" is not valid',
        ),
        (
            "camera_topic",
            "/camera/color image",
            "camera_topic:=/camera/color image is not a ROS topic",
        ),
        ("mic_topic", "9audio", "mic_topic:=9audio is not a ROS topic"),
    ],
)
def test_bad_driver_arguments_stop_the_launch(
    launch_double: LaunchApiDouble, argument: str, value: str, message: str
) -> None:
    with pytest.raises(RuntimeError) as excinfo:
        launch_double.run(MAIN, **{argument: value})
    assert message in str(excinfo.value)
