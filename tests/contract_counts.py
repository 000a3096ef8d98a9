"""The trial contract's numbers (issue 23), each printed by `python tests/contract_counts.py`.

  task-key reads        string-key reads of task dicts in orchestrator/ (the issue's grep)
  folder-file names     places in product code that spell a trial-folder file's name, outside
                        `trainer/trial_dir.py` and `trainer/engine/checkpoint.py` (string constants,
                        docstrings left out; bench/ counted apart)
  metrics parsers       functions that parse metrics.jsonl rows (a `json.loads` of a row with a "step")
  driver modules        orchestrator driver-side modules a trial process has loaded after importing
                        the worker entry (`orchestrator.worker.trainable`) in a fresh interpreter

`tests/test_contract.py` asserts them; the config validations per trial are counted there (they
need a sweep). Pure standard library here, so the script runs anywhere.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("trainer", "orchestrator", "dashboards")
TASK_KEY_READ = re.compile(r'\["(trial_id|name|config|run_id|total|role|needs|fork|stop_after|branches)"\]')
FOLDER_FILES = {"metrics.jsonl", "final_metrics.json", "config.yaml", "train_image_ids.txt", "attempts.jsonl",
                "segments.jsonl", "gang.jsonl", "fork.json", "trunk_done.json", "diverged.json", "trial.lock",
                "model_final.pt", "train.log", "checkpoints"}
FOLDER_OWNERS = {"trainer/trial_dir.py", "trainer/engine/checkpoint.py"}
# Same spelling, other folders: torch hub's own cache ("checkpoints"), a pretrain job's folder.
NOT_TRIAL_FOLDERS = {("trainer/modeling/backbone.py", "checkpoints"), ("trainer/pretrain/train.py", "checkpoints")}
# The worker side: orchestrator/worker/ (what a trial process runs) and orchestrator.errors; every other
# room (sweep, execution, tracking, state, views) and the CLI are the driver side.
WORKER_SIDE = ("worker", "errors")


def _py_files(packages) -> list[Path]:
    return [p for pkg in packages for p in sorted((REPO / pkg).rglob("*.py"))]


def task_key_reads() -> list[str]:
    return [f"{p.relative_to(REPO)}:{i}" for p in _py_files(["orchestrator"])
            for i, line in enumerate(p.read_text().splitlines(), 1) for _ in TASK_KEY_READ.finditer(line)]


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def folder_file_names(packages=PRODUCT) -> list[str]:
    """String constants naming a trial-folder file (or a checkpoint file, "ckpt_...")."""
    found = []
    for path in _py_files(packages):
        rel = str(path.relative_to(REPO))
        if rel in FOLDER_OWNERS:
            continue
        tree = ast.parse(path.read_text())
        skip = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
                if (rel, node.value) in NOT_TRIAL_FOLDERS:
                    continue
                if node.value in FOLDER_FILES or re.fullmatch(r"\.?ckpt_(\d+\.pt.*)?", node.value):
                    found.append(f"{rel}:{node.lineno} {node.value!r}")
    return found


def metrics_parsers(packages=PRODUCT) -> list[str]:
    """Functions with a `json.loads` and a "step" key: what parses metrics.jsonl rows."""
    found = []
    for path in _py_files(packages):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            names = {n.attr if isinstance(n, ast.Attribute) else getattr(n, "value", None) for n in ast.walk(fn)}
            loads = any(isinstance(n, ast.Attribute) and n.attr == "loads" for n in ast.walk(fn))
            if loads and "step" in names:
                found.append(f"{path.relative_to(REPO)}:{fn.lineno} {fn.name}")
    return found


def driver_modules_in_worker() -> list[str]:
    """Import the worker entry in a fresh interpreter; the driver modules it loaded."""
    code = ("import json, sys; import orchestrator.worker.trainable; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('orchestrator.'))))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    return [m for m in loaded if m.split(".")[1] not in WORKER_SIDE]


def counts() -> dict[str, list[str]]:
    return {"task-key reads": task_key_reads(), "folder-file names": folder_file_names(),
            "folder-file names in bench": folder_file_names(("bench",)), "metrics parsers": metrics_parsers(),
            "driver modules": driver_modules_in_worker()}


if __name__ == "__main__":
    for name, where in counts().items():
        print(f"{name}: {len(where)}" + "".join(f"\n    {w}" for w in where))
