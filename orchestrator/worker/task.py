"""The trial's typed contract (worker side): `Task`, one unit of work the driver hands to a worker.

A task is a trial (role "trial"), a schedule-forking trunk ("trunk", `orchestrator.sweep.fork`) or a
branch ("branch": a trial that starts from its trunk's checkpoint at `fork.at`). Its plan
(`TaskPlan`: id, name, role, axes, iterations, pretrain jobs it needs, fork source, branches) is
what sweep.json stores; a `Task` adds what the launch binds: the validated `TrainConfig` (absolute
paths), the MLflow run id, the resources and the checkpoint policy. The driver builds each task
once (`orchestrator.execution.run`); it crosses Ray as a plain dict (`to_wire`) and the worker validates it
once on arrival (`Task.from_wire`): the config inside is validated by `trainer.config.build_config`
there and nowhere else on the worker.

Worker side: this module imports pydantic and the trainer only, never a driver module (queue,
monitor, view, status, spec, expand, fork, plan, run, cli). The strings the worker and the driver
share (a task's status, the keys of a Tune result) live here too.

Older sweeps (990dd5f and before) wrote other shapes: sweep.json rows with `total_iters` and a
trunk's `forks`, and Tune trials whose pickled task dicts hold marker paths in `needs` and
`fork.checkpoint`. `upgrade` reads both, in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from trainer.config import TrainConfig, build_config, config_to_dict
from trainer.trial_dir import TrialDir

Role = Literal["trial", "trunk", "branch"]
KeepCheckpoints = Literal["all", "final", "weights", "none"]

# A task's status in the driver's view (state.json, the live table, `status`).
FINISHED, RUNNING, PENDING, ERROR = "FINISHED", "RUNNING", "PENDING", "ERROR"
# Keys an attempt adds to every Tune result (the rest are trainer metrics) and its events.
K_ITER, K_TOTAL, K_ATTEMPT, K_EVENT = "trial/iteration", "trial/total", "trial/attempt", "trial/event"
K_WARNINGS = "trial/warnings"  # in an attempt's "start" report: what the driver should warn about
PREEMPTED = "preempted"  # the K_EVENT of an attempt's last report when it stopped on a preemption notice


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Fork(_Frozen):
    """Where a branch starts: its trunk's checkpoint at `at` (its first LR drop)."""

    trunk_id: str
    trunk: str  # the trunk's name (its folder)
    at: int


class Branch(_Frozen):
    """One branch of a trunk: its name (its folder) and fork point."""

    name: str
    at: int


class TaskPlan(_Frozen):
    """What sweep.json stores of a task: the same on every machine and for every driver."""

    trial_id: str
    name: str
    role: Role = "trial"
    index: int = 0
    axes: dict[str, str] = {}
    total: int  # the iteration it stops at (a trunk: its last fork point)
    needs: tuple[str, ...] = ()  # pretrain jobs whose backbone it starts from
    fork: Fork | None = None  # a branch's source
    branches: tuple[Branch, ...] = ()  # a trunk's branches; a branch's siblings (itself included)

    @property
    def trained(self) -> int:
        """Iterations the task trains itself: all, or those after its fork point."""
        return self.total - (self.fork.at if self.fork else 0)


class StoreRef(_Frozen):
    """An object-store sweep (`orchestrator.worker.store_sync`): its objects' root and each node's scratch."""

    uri: str  # s3://bucket/prefix/SWEEP
    scratch: str  # the sweep's local folder on every node
    mirror: str = ""  # the driver's local folder of the sweep: the paths the configs name

    def on_node(self, path: str | Path) -> Path:
        """A path in the driver's mirror as the same path in this node's scratch (others as they are)."""
        path = Path(path)
        if self.mirror and path.is_relative_to(self.mirror):
            return Path(self.scratch) / path.relative_to(self.mirror)
        return path

    def key(self, path: str | Path) -> str:
        """A scratch path's key in the store (relative to the sweep's root)."""
        return Path(path).relative_to(self.scratch).as_posix()


class Task(TaskPlan):
    """A task bound for launch (see the module docstring)."""

    config: TrainConfig
    run_id: str = ""
    store: StoreRef | None = None  # None: the sweep folder is shared storage, the config's paths hold
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    keep_checkpoints: KeepCheckpoints = "final"

    @field_validator("config", mode="plain")
    @classmethod
    def _config(cls, value: Any, info: ValidationInfo) -> TrainConfig:
        # Plain: an already validated config (the driver's) is kept as is; a dict (off the wire) is
        # validated once, by the trainer's own entry point.
        if isinstance(value, TrainConfig):
            return value
        return build_config(value, source=f"task {info.data.get('name', '?')}")

    @property
    def folder(self) -> TrialDir:
        return TrialDir(self.config.runtime.output_dir)

    @property
    def stop_after(self) -> int | None:
        """Where training stops before the schedule's end: a trunk at its last fork point."""
        return self.total if self.role == "trunk" else None

    def fork_checkpoint(self) -> Path | None:
        """A branch's source checkpoint file (in its trunk's folder)."""
        return self.folder.sibling(self.fork.trunk).checkpoint(self.fork.at) if self.fork else None

    def trunk_folder(self) -> TrialDir | None:
        return self.folder.sibling(self.fork.trunk) if self.fork else None

    def on_node(self) -> "Task":
        """The task as it trains on this node: an object-store task's folder (and a backbone a pretrain job
        of the sweep made) in the node's scratch."""
        if self.store is None:
            return self
        runtime = self.config.runtime.model_copy(
            update={"output_dir": Path(self.store.scratch) / "trials" / self.name})
        model = self.config.model
        if model.init.startswith("checkpoint:"):
            model = model.model_copy(update={"init": f"checkpoint:{self.store.on_node(model.init[11:])}"})
        return self.model_copy(update={"config": self.config.model_copy(update={"runtime": runtime, "model": model})})

    def fork_copy(self) -> Path | None:
        """Where an object-store branch fetches its fork checkpoint (never into its trunk's own scratch
        folder, which the trunk may be training in on this node)."""
        if not self.fork or self.store is None:
            return None
        return Path(self.store.scratch) / "forks" / self.name / self.fork_checkpoint().name

    def to_wire(self) -> dict[str, Any]:
        """The plain dict Tune carries (and pickles into its experiment)."""
        return {**self.model_dump(mode="json", exclude={"config"}), "config": config_to_dict(self.config)}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> "Task":
        return cls.model_validate(upgrade(data))


def wire_id(data: dict[str, Any]) -> str:
    """A wire task's id without validating it (the driver's Tune shims read it at every step)."""
    return str(data.get("trial_id"))


def wire_name(data: dict[str, Any]) -> str:
    return str(data.get("name"))


def read_plans(record: dict[str, Any]) -> list[TaskPlan]:
    """sweep.json's tasks: the trials, then the trunks (none without schedule forking)."""
    rows = list(record.get("trials", [])) + list(record.get("trunks", []))
    names = {r.get("trial_id"): r.get("name") for r in rows}
    return [TaskPlan.model_validate(upgrade(r, names)) for r in rows]


def upgrade(row: dict[str, Any], names: dict[str, str] | None = None) -> dict[str, Any]:
    """A task row or wire dict of any version as this version's fields (the one reader of old shapes).

    990dd5f: sweep.json rows said `total_iters`, a trunk's `forks` ({branch id: at}) and had no role
    for a branch; wire dicts said `needs` as {job: done-marker path}, `fork.checkpoint` and
    `fork.branches` / `branches` as [[branch folder, at]] and a trunk's `stop_after` (= its total).
    """
    out = {k: v for k, v in row.items() if k not in ("total_iters", "forks", "stop_after")}
    if "total_iters" in row:
        out.update(total=row.get("total_iters"))
    fork = row.get("fork")
    if fork:  # the trunk's name from its row where a fork names its id only
        out.update(fork={"trunk_id": fork.get("trunk_id"), "at": fork.get("at"),
                         "trunk": fork.get("trunk") or (names or {}).get(fork.get("trunk_id"))})
    out.update(role=row.get("role") or ("branch" if fork else "trial"))
    needs = row.get("needs") or ()
    out.update(needs=list(needs.keys()) if isinstance(needs, dict) else list(needs))
    branches = row.get("branches") or (fork or {}).get("branches") or []
    if isinstance(row.get("forks"), dict) and not branches:
        branches = [{"name": (names or {}).get(tid, tid), "at": at} for tid, at in row.get("forks").items()]
    out.update(branches=[b if isinstance(b, dict) else {"name": Path(b[0]).name, "at": b[1]} for b in branches])
    return out
