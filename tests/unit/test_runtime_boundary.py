"""The Faust side's inner floors (docs/architecture.md): plumbing, stages, handlers.

``streams/runtime/`` is the only code that reaches into Faust's private attributes, and
its docstring lists each one it uses (docs/guarantees.md, "Faust internals we depend
on", points there). The stages return results and see neither the app nor its
wiring, and the stream modules import one another without a cycle. Read from the
source with ``ast``: lazy and ``TYPE_CHECKING`` imports count too.
"""

from __future__ import annotations

import ast
import re
import sys
from functools import cache
from pathlib import Path

import streams.runtime

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ROOT / "streams" / "runtime"
STAGES = ("ingest", "interest", "decide", "join", "learn", "forget", "budget", "catalog")
# Faust, mode and aiokafka: the libraries whose privates only the runtime may use.
LIBRARIES = ("faust", "mode", "aiokafka")


def listed() -> set[str]:
    """The private attributes the runtime's docstring lists: ``Owner._name`` bullets."""
    doc = streams.runtime.__doc__ or ""
    section = doc.split("Faust internals we depend on", 1)[1].split("Public but", 1)[0]
    return set(re.findall(r"``\w+\.(_[a-z]\w*)``", section))


def _files(*packages: str) -> list[Path]:
    return [p for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py"))]


def touched(tree: ast.AST) -> set[tuple[str, int]]:
    """(name, line) of each ``x._name`` and ``getattr(x, "_name")`` in a module."""
    out: set[tuple[str, int]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            out.add((node.attr, node.lineno))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"getattr", "hasattr", "setattr", "delattr"}
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            out.add((node.args[1].value, node.lineno))
    return out


def test_the_runtime_docstring_lists_faust_internals_pinned_to_the_installed_version() -> None:
    doc = streams.runtime.__doc__ or ""
    pin = re.search(r'"faust-streaming==([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin is not None
    assert f"faust-streaming=={pin.group(1)}" in doc
    assert {"_read_offset", "_db_for_partition", "_dbs", "_producer"} <= listed()


def test_no_module_outside_the_runtime_touches_a_faust_private_attribute() -> None:
    names = listed()
    bad = []
    for path in _files("adpulse", "schemas", "scoring", "streams", "tests"):
        if RUNTIME in path.parents:
            continue
        rel = str(path.relative_to(ROOT))
        tree = ast.parse(path.read_text(), rel)
        bad += [f"{rel}:{line} {name}" for name, line in touched(tree) if name in names]
    assert bad == [], "use (or add) a helper in streams/runtime/ instead"


@cache
def _library_source() -> str:
    """Every source file of Faust, mode and aiokafka, as one text."""
    texts = []
    for lib in LIBRARIES:
        pkg = __import__(lib)
        texts += [p.read_text(errors="replace") for p in Path(pkg.__file__).parent.rglob("*.py")]
    return "\n".join(texts)


def _own_names(tree: ast.AST) -> set[str]:
    """``self._x`` and methods ``_x`` of the runtime's classes that extend nothing external."""
    local = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    own: set[str] = set()
    for cls in [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]:
        if not all(isinstance(b, ast.Name) and (b.id in local or b.id == "Protocol")
                   for b in cls.bases):  # fmt: skip
            continue
        for node in ast.walk(cls):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                own.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
    return own


def test_the_runtime_lists_every_faust_private_attribute_it_uses() -> None:
    """A private name the runtime uses (or overrides) that Faust, mode or aiokafka define
    must be in the list; every name in the list must still be used."""
    library = _library_source()
    used: set[str] = set()
    unlisted = []
    for path in _files("streams/runtime"):
        tree = ast.parse(path.read_text())
        own = _own_names(tree)
        names = {name for name, _ in touched(tree)}
        for cls in [c for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.bases]:
            defs = [n for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
            names |= {n.name for n in defs}  # overrides count as uses
        for name in sorted(names - own):
            if not name.startswith("_") or name.startswith("__"):
                continue
            if re.search(rf"(self\.|def ){re.escape(name)}\b", library):
                used.add(name)
                if name not in listed():
                    unlisted.append(f"{path.name}: {name}")
    assert unlisted == [], "list it, with where and why, in streams/runtime/__init__.py"
    assert listed() - used == set(), "the runtime no longer uses these: drop them from the list"


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stream_imports() -> dict[str, set[str]]:
    """Each streams module -> the streams modules it imports (anywhere in its source)."""
    modules = {_module(p): p for p in _files("streams")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {d for d in deps if d in modules and d not in {name, "streams"}}
    return graph


def test_the_stream_modules_import_one_another_without_a_cycle() -> None:
    graph = stream_imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(graph):
        if module not in state:
            assert visit(module) is None, f"import cycle: {' -> '.join(path)}"


def test_the_runtime_imports_no_stage_and_no_handler() -> None:
    allowed = ("streams.runtime",)  # topic admin reads the topic specs from schemas.topics
    bad = {(m, d) for m, deps in stream_imports().items() if m.startswith("streams.runtime")
           for d in deps if not d.startswith(allowed)}  # fmt: skip
    assert bad == set()


def test_the_stages_see_neither_the_app_nor_its_wiring() -> None:
    """Stages return results; streams/pipeline.py does their I/O (the issue 15 layout)."""
    above = {"streams.app", "streams.wiring", "streams.pipeline", "streams.web", "streams.serve"}
    graph = stream_imports()
    io = {"streams.runtime.tablewriter", "streams.runtime.consumer", "streams.tableio"}
    bad = {(s, d) for s in STAGES for d in graph[f"streams.{s}"] if d in above | io}
    assert bad == set()
    for stage in STAGES:
        tree = ast.parse((ROOT / "streams" / f"{stage}.py").read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not {m for m in mods if m.split(".")[0] in LIBRARIES}, stage
