"""The project's .msg files register in rosbags; bags round-trip every field; CDR crosses to rclpy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from interface_samples import SAMPLES, TIME_FIELDS, build_rclpy
from omni_ros.tools.typestore import omni_typestore
from rosbags.rosbag2 import Reader, StoragePlugin, Writer


def _rosbags_msg(type_name: str) -> Any:
    store = omni_typestore()
    types = store.types

    def build(msgtype: str, values: dict[str, Any]) -> Any:
        cls = types[msgtype]
        fields = {name for name, _ in store.fielddefs[msgtype][1]}
        kwargs: dict[str, Any] = {}
        for name, value in values.items():
            if name == "header":
                stamp = types["builtin_interfaces/msg/Time"](**value["stamp"])
                kwargs[name] = types["std_msgs/msg/Header"](stamp=stamp, frame_id=value["frame_id"])
            elif name in TIME_FIELDS:
                kwargs[name] = types["builtin_interfaces/msg/Time"](**value)
            elif name == "data":
                import numpy as np

                kwargs[name] = np.frombuffer(value, dtype=np.uint8)
            elif isinstance(value, list) and all(isinstance(v, int) for v in value):
                import numpy as np

                kwargs[name] = np.asarray(value, dtype=np.uint64)  # uint64[]: a numpy array
            else:
                kwargs[name] = value
        assert set(kwargs) == fields, "sample does not cover every field"
        return cls(**kwargs)

    return build(f"omni_ros_msgs/msg/{type_name}", SAMPLES[type_name])


def _as_plain(msg: Any) -> Any:
    """Nested rosbags message -> plain Python values, for field-by-field comparison."""
    import numpy as np

    msgtype = getattr(msg, "__msgtype__", None)
    if msgtype is not None:
        names = [name for name, _ in omni_typestore().fielddefs[msgtype][1]]
        return {name: _as_plain(getattr(msg, name)) for name in names}
    if isinstance(msg, np.ndarray):
        return msg.tobytes()
    if isinstance(msg, float):
        return pytest.approx(msg)
    return msg


def test_every_project_message_type_is_registered_in_the_typestore() -> None:
    types = omni_typestore().types
    for name in SAMPLES:
        assert f"omni_ros_msgs/msg/{name}" in types


@pytest.mark.parametrize("storage", [StoragePlugin.MCAP, StoragePlugin.SQLITE3])
def test_a_written_bag_reads_back_every_field_of_every_message(
    tmp_path: Path, storage: Any
) -> None:
    store = omni_typestore()
    bag = tmp_path / f"bag_{storage.name.lower()}"
    sent = {name: _rosbags_msg(name) for name in SAMPLES}
    with Writer(bag, version=9, storage_plugin=storage) as writer:
        for i, (name, msg) in enumerate(sorted(sent.items())):
            msgtype = f"omni_ros_msgs/msg/{name}"
            conn = writer.add_connection(f"/test/{name}", msgtype, typestore=store)
            writer.write(conn, 1_000 + i, store.serialize_cdr(msg, msgtype))
    with Reader(bag) as reader:
        got = {
            conn.topic.rsplit("/", 1)[1]: store.deserialize_cdr(raw, conn.msgtype)
            for conn, _t, raw in reader.messages()
        }
    assert sorted(got) == sorted(sent)
    for name, msg in sent.items():
        expected = _as_plain(msg)
        actual = _as_plain(got[name])
        assert actual == expected, name


@pytest.mark.parametrize("type_name", sorted(SAMPLES))
def test_cdr_written_by_rosbags_deserializes_in_rclpy(type_name: str) -> None:
    pytest.importorskip("rclpy")
    from rclpy.serialization import deserialize_message, serialize_message

    import omni_ros_msgs.msg as msgs

    store = omni_typestore()
    msgtype = f"omni_ros_msgs/msg/{type_name}"
    raw = store.serialize_cdr(_rosbags_msg(type_name), msgtype)
    via_rclpy = deserialize_message(bytes(raw), getattr(msgs, type_name))
    assert via_rclpy == build_rclpy(type_name)
    # ...and the other direction: rclpy's CDR deserializes in rosbags to the same fields.
    back = store.deserialize_cdr(serialize_message(via_rclpy), msgtype)
    assert _as_plain(back) == _as_plain(_rosbags_msg(type_name))


def test_type_hashes_match_the_ones_rosidl_generated() -> None:
    pytest.importorskip("rclpy")
    import json

    from ament_index_python.packages import get_package_share_directory

    store = omni_typestore()
    share = Path(get_package_share_directory("omni_ros_msgs"))
    for name in SAMPLES:
        desc = json.loads((share / "msg" / f"{name}.json").read_text())
        rosidl_hash = desc["type_hashes"][0]["hash_string"]
        assert store.hash_rihs01(f"omni_ros_msgs/msg/{name}") == rosidl_hash
