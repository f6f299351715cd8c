"""Fixtures for tests over real DDS: an isolated ROS domain per test session, localhost only."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest


def _ros_available() -> str | None:
    try:
        import rclpy  # noqa: F401

        import omni_ros_msgs.msg  # noqa: F401
    except Exception as exc:  # ImportError or rosidl's UnsupportedTypeSupport
        return f"the built workspace is not sourced (source install/setup.sh): {exc}"
    return None


_REASON = _ros_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _REASON is None:
        return
    if os.environ.get("OMNI_ROS_REQUIRE_ROS") == "1":
        raise pytest.UsageError(f"ROS tests required but unavailable: {_REASON}")
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.skip(reason=_REASON))


@pytest.fixture(scope="session", autouse=True)
def isolated_ros_domain() -> Iterator[int]:
    """A random ROS_DOMAIN_ID and localhost-only discovery, inherited by every child process."""
    domain = random.Random(os.getpid()).randint(1, 101)
    old = {k: os.environ.get(k) for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE")}
    os.environ["ROS_DOMAIN_ID"] = str(domain)
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    yield domain
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
