"""The house's seams: no import cycle, stages never import drivers, the per-image step travels.

The import graph is read from the source with `ast` (imports inside functions included, since a
late import is how a cycle hides), so these tests fail the moment a new module crosses a seam.
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLES
from pipeline.engine.caption import Captioner
from pipeline.job import load_job
from pipeline.providers import make_provider
from pipeline.sources import open_source

PACKAGE = ROOT / "pipeline"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The pipeline modules `name` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known.keys()
            found.update(submodules)  # `from pkg import submodule` needs the submodule...
            if len(submodules) < len(node.names):
                found.add(base)  # ...and `from pkg import name` the package (or module) itself
    return {m for m in found if m in known and m != "pipeline" and m != name}


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph`, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_anywhere_in_pipeline():
    assert _cycle(_graph()) is None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


STAGES = ("pipeline.providers", "pipeline.sources", "pipeline.store", "pipeline.cost", "pipeline.images",
          "pipeline.records", "pipeline.errors", "pipeline.job", "pipeline.engine.limits", "pipeline.engine.calibration")
ABOVE = ("pipeline.engine", "pipeline.readers", "pipeline.cli", "pipeline.localserver")


@pytest.mark.parametrize("stage", STAGES)
def test_stages_never_import_drivers_readers_or_the_cli(stage):
    graph = _graph()
    crossing = {(name, target) for name, targets in graph.items() if name == stage or name.startswith(stage + ".")
                for target in targets if target.startswith(ABOVE) and not target.startswith(STAGES)}
    assert not crossing


def test_providers_import_no_source_or_store_and_sources_no_provider():
    graph = _graph()
    for name, targets in graph.items():
        if name.startswith("pipeline.providers"):
            assert not {t for t in targets if t.startswith(("pipeline.sources", "pipeline.store"))}, name
        if name.startswith("pipeline.sources"):
            assert not {t for t in targets if t.startswith(("pipeline.providers", "pipeline.store"))}, name


def test_the_drivers_name_no_protocol_package():
    graph = _graph()
    for name, targets in graph.items():
        if name.startswith("pipeline.engine"):
            assert not {t for t in targets if t.startswith("pipeline.providers.")
                        and t not in ("pipeline.providers.base", "pipeline.providers.http")}, name


def test_the_captioner_is_picklable_and_works_the_same_after_the_trip():
    job = load_job(ROOT / "jobs" / "demo.toml")
    captioner = Captioner(job, make_provider(job, "http://127.0.0.1:9/v1", api_key=None, headers={}))
    travelled = pickle.loads(pickle.dumps(captioner))
    item = next(iter(open_source(SAMPLES / "chelsea_the_cat.jpg").items()))
    here, there = captioner.prepare(item), travelled.prepare(item)
    assert here == there and here.sent_width > 0
    assert (captioner.provider.build_request(here, stream=True)
            == travelled.provider.build_request(there, stream=True))
