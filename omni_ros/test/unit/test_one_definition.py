"""Constants the code shares are defined once: nanoseconds per second lives in
``omni_ros.core.clock`` (``NS_PER_S``) and every module of the package, the benchmarks and the test
helpers import it from there."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
PACKAGE = REPO / "omni_ros" / "omni_ros"
HOME = PACKAGE / "core" / "clock.py"


def _defines_ns_per_s(path: Path) -> bool:
    """A module-level ``NS_PER_S = 1_000_000_000`` (or ``NS`` / ``_NS_PER_S``) assignment."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign):
            targets, value = [node.target], node.value
        else:
            continue
        is_constant = isinstance(value, ast.Constant) and value.value == 1_000_000_000
        names = {t.id for t in targets if isinstance(t, ast.Name)}
        if is_constant and names & {"NS_PER_S", "_NS_PER_S", "NS"}:
            return True
    return False


def test_nanoseconds_per_second_is_defined_only_in_core_clock() -> None:
    sources = [
        *PACKAGE.rglob("*.py"),
        *(REPO / "benchmarks").rglob("*.py"),
        *(REPO / "omni_ros" / "test").rglob("*.py"),
    ]
    assert _defines_ns_per_s(HOME)
    defining = sorted(
        str(p.relative_to(REPO)) for p in sources if p != HOME and _defines_ns_per_s(p)
    )
    assert not defining, (
        f"import NS_PER_S from omni_ros.core.clock instead of defining it: {defining}"
    )
