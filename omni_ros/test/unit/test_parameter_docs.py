"""The README's parameter table of omni_flow_node is the node's one table (``NODE_PARAMS`` +
FlowConfig's specs) written out: every node parameter is listed, and every listed name and default
is the node's own (a renamed parameter or a changed default fails here, not in a user's launch)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omni_ros.ros._setup import FLOW_PARAM_SPECS, NODE_PARAMS

README = Path(__file__).resolve().parents[3] / "README.md"


def _rows() -> list[tuple[list[str], list[str]]]:
    """(names, defaults) of each row of the README's ``omni_flow_node`` parameter table."""
    text = README.read_text()
    section = text[text.index("### Parameters of `omni_flow_node`") :]
    section = section[: section.index("\n\n", section.index("| parameter |"))]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or cells[0] in ("parameter", "---"):
            continue
        names = re.findall(r"`([^`]+)`", cells[0])
        defaults = re.findall(r"`([^`]*)`", cells[1])
        rows.append((names, defaults))
    return rows


def _spelled(value: Any) -> str:
    """A default as the README spells it (YAML-ish: true/false, "" for an empty string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return '""'
    return str(value)


def test_the_readme_lists_every_node_parameter() -> None:
    listed = {name for names, _ in _rows() for name in names}
    missing = sorted(set(NODE_PARAMS) - listed)
    assert not missing, f"README's omni_flow_node table lacks {missing}"


def test_every_readme_parameter_exists_with_the_default_it_states() -> None:
    flow = {s.name: s.default for s in FLOW_PARAM_SPECS}
    defaults = {name: d for name, (d, _text) in NODE_PARAMS.items()} | flow
    checked = 0
    for names, stated in _rows():
        concrete = [n for n in names if not n.endswith("*")]
        for name in concrete:
            assert name in defaults, f"README names {name!r}, which omni_flow_node does not declare"
        if len(stated) != len(concrete):
            continue  # a descriptive default ("per backend") or a wildcard row
        for name, text in zip(concrete, stated, strict=True):
            if name == "backend":
                assert text == defaults[name]
            else:
                assert text == _spelled(defaults[name]), (
                    f"README: {name} = {text}; node: {defaults[name]!r}"
                )
            checked += 1
    assert checked >= len(NODE_PARAMS) - 1, "the table's defaults were not read"
