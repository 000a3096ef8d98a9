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
    probe.write_text("def f():\n    from dashboards.cli import dispatch\n    import orchestrator.execution.run\n")
    assert {"dashboards", "orchestrator"} <= _imported_packages(probe)


# Third-party seams: only these modules may import each package (anywhere in the file, lazily too).
ADAPTERS = {
    "ray": {"orchestrator/execution/autoscale.py", "orchestrator/worker/gang.py", "orchestrator/execution/ray_backend.py",
            "orchestrator/worker/trainable.py"},
    "mlflow": {"orchestrator/tracking/mlflow_runs.py", *(str(p.relative_to(REPO)) for p in (REPO / "dashboards").rglob("*.py"))},
}


@pytest.mark.parametrize("dependency", sorted(ADAPTERS))
def test_only_the_adapters_import(dependency):
    product = [p for pkg in ("trainer", "orchestrator", "dashboards") for p in sorted((REPO / pkg).rglob("*.py"))]
    importers = {str(p.relative_to(REPO)) for p in product if dependency in _imported_packages(p)}
    assert importers <= ADAPTERS[dependency], sorted(importers - ADAPTERS[dependency])


def test_bench_does_not_import_tests():
    offenders = [str(p.relative_to(REPO)) for p in sorted((REPO / "bench").rglob("*.py"))
                 if "tests" in _imported_packages(p)]
    assert offenders == []


# The orchestrator's worker side (orchestrator/worker/: what a trial process runs, the `Task` it is handed)
# must not import the driver side (sweep definition, execution, tracking, state, views), at any depth: a
# trial would load the driver's modules for nothing (tests/contract_counts.py counts what a fresh trial
# process loads). It may import orchestrator.errors and the trainer.
WORKER_ALLOWED = {"worker", "errors"}


def _orchestrator_rooms(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + ([f"orchestrator.{a.name}" for a in node.names] if node.module == "orchestrator"
                                     else [])
        found.update(n.split(".")[1] for n in names if n.startswith("orchestrator."))
    return found


def test_the_worker_side_does_not_import_the_driver_side():
    offenders = [f"{path.relative_to(REPO)} imports orchestrator.{other}"
                 for path in sorted((REPO / "orchestrator" / "worker").rglob("*.py"))
                 for other in sorted(_orchestrator_rooms(path) - WORKER_ALLOWED)]
    assert offenders == []


def test_the_worker_checker_sees_a_driver_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from orchestrator import views\n    import orchestrator.sweep.spec\n")
    assert _orchestrator_rooms(probe) == {"views", "sweep"}
