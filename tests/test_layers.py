"""Layers point one way: trainer <- orchestrator <- dashboards. Read from the source (every import
statement, at any depth), so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"trainer": {"orchestrator", "dashboards"}, "orchestrator": {"dashboards"}}


def _imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_against_the_layers(package):
    offenders = [f"{path.relative_to(REPO)} imports {bad}"
                 for path in sorted((REPO / package).rglob("*.py"))
                 for bad in sorted(_imported_packages(path) & FORBIDDEN[package])]
    assert offenders == []


def test_the_checker_sees_a_lazy_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from dashboards.cli import dispatch\n    import orchestrator.run\n")
    assert {"dashboards", "orchestrator"} <= _imported_packages(probe)


# The orchestrator's worker side: what a trial process runs (the worker entry `trainable` and what it
# needs). It must not import the driver side (the queue, monitor, views, spec, expansion, ...), at
# any depth: a trial would load the driver's modules for nothing (tests/contract_counts.py counts
# what a fresh trial process loads).
WORKER_SIDE = {"task", "trainable", "trial_report", "gang", "retention", "errors"}


def _orchestrator_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + ([f"orchestrator.{a.name}" for a in node.names] if node.module == "orchestrator"
                                     else [])
        found.update(n.split(".")[1] for n in names if n.startswith("orchestrator."))
    return found


def test_the_worker_side_does_not_import_the_driver_side():
    offenders = [f"orchestrator/{module}.py imports orchestrator.{other}"
                 for module in sorted(WORKER_SIDE)
                 for other in sorted(_orchestrator_modules(REPO / "orchestrator" / f"{module}.py") - WORKER_SIDE)]
    assert offenders == []


def test_the_worker_checker_sees_a_driver_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from orchestrator import monitor\n    import orchestrator.spec\n")
    assert _orchestrator_modules(probe) == {"monitor", "spec"}
