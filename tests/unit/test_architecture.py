"""The floors of the house as import rules (docs/architecture.md, "Floors").

From the bottom: ``adpulse.core`` (settings, errors, metrics, privacy, Kafka client
configuration), then ``schemas`` (message contracts) and ``scoring`` (pure maths and
models), then ``streams`` (the Faust worker), then the tools and the CLI (the rest of
``adpulse``: benches, demo, simulator, dashboard, embedded broker, workload). A module
may import its own floor and the floors below; nothing imports the tools. Read from the
source with ``ast``, so a lazy import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FRAMEWORKS = ("faust", "mode", "aiokafka", "kafka", "rocksdict", "aiohttp", "onnxruntime", "torch")


def imports_of(package: str) -> list[tuple[str, str]]:
    """(module file, imported module) for every import under a package directory."""
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, ast.Import):
                out += [(rel, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                out.append((rel, node.module))
    return out


def _top(name: str) -> str:
    return name.split(".", maxsplit=1)[0]


def _is_tool(name: str) -> bool:
    return _top(name) == "adpulse" and not (name == "adpulse" or name.startswith("adpulse.core"))


def test_the_core_imports_nothing_of_the_project() -> None:
    bad = [(f, m) for f, m in imports_of("adpulse/core")
           if _top(m) in {"adpulse", "schemas", "scoring", "streams"}
           and not m.startswith("adpulse.core")]  # fmt: skip
    assert bad == []


def test_schemas_import_no_framework_and_only_the_core() -> None:
    above = {"scoring", "streams"}
    bad = [(f, m) for f, m in imports_of("schemas")
           if _top(m) in FRAMEWORKS or _top(m) in above or _is_tool(m)]  # fmt: skip
    assert bad == []


def test_scoring_imports_neither_streams_nor_the_tools() -> None:
    banned = {"streams", "faust", "mode", "aiokafka", "kafka"}
    bad = [(f, m) for f, m in imports_of("scoring") if _top(m) in banned or _is_tool(m)]
    assert bad == []


@pytest.mark.parametrize("package", ["adpulse/core", "schemas", "scoring", "streams"])
def test_nothing_below_the_roof_imports_the_tools(package: str) -> None:
    bad = [(f, m) for f, m in imports_of(package) if _is_tool(m)]
    assert bad == []
