"""`python -m orchestrator {plan,run,resume,status}`: the command line of the sweep orchestrator.

    plan SPEC            the trial table and the sweep's totals (no dataset, no Ray); --show TRIAL
                         prints one trial's resolved trainer config, --json the plan as data
    run SPEC             start the sweep, or resume it if it exists with the same spec
    resume SPEC|FOLDER   resume an existing sweep (by its spec, or its folder on the storage path)
    status SPEC|FOLDER   the trial table from the stored state (no Ray); --json as data

`plan`, `run` and `resume` take `--set KEY=VALUE` (or `--set KEY VALUE`) overrides of the spec
(`orchestrator.sweep.sets`).

Other packages add subcommands as plugins: an entry point in the group `rethink_sweeps.commands`
names a module with `COMMANDS`, `add_commands(subparsers)` and `dispatch(args)`. The dashboards add
`report` and `ui` that way, so the orchestrator never imports the dashboards (layers point one way:
trainer <- orchestrator <- dashboards).

Refusals (bad spec, missing dataset, unreachable cluster or tracking store, changed spec) are one
line on stderr and exit code 2, before anything is launched. `run` exits 0 when every trial
finished and 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Sequence

import yaml

from orchestrator.errors import OrchestratorError, SpecError, SweepInterrupted, SweepNotFoundError
from trainer.errors import TrainerError

logger = logging.getLogger("orchestrator")
PROG = "python -m orchestrator"
PLUGIN_GROUP = "rethink_sweeps.commands"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Sweeps of the shared Mask R-CNN trainer on Ray Tune, tracked in MLflow.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sp = sub.add_parser("plan", help="print the trial table and the sweep's cost")
    sp.add_argument("spec", type=Path)
    sp.add_argument("--gpus", type=int, metavar="N", help="cluster size for trials at once and the makespan bound "
                    "(default: enough for every task that can start at once); exit 2 if a trial cannot fit")
    sp.add_argument("--node", metavar="GPUS,CPUS", help="with --gpus: the shape of one node, so trials at once "
                    "count CPUs too, as `run` does (default: GPUs alone)")
    sp.add_argument("--show", metavar="TRIAL", help="print one trial's resolved trainer config (YAML) instead: "
                    "its name, id or row number (3, T0)")
    _add_sets(sp)
    sp.add_argument("--json", action="store_true", help="the plan as JSON")
    for name, help_text in (("run", "start the sweep (or resume it if it exists)"),
                            ("resume", "resume an existing sweep (SPEC or its folder)")):
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument("spec", type=_place, metavar="SPEC" if name == "run" else "SPEC|FOLDER|s3://...")
        sp.add_argument("--storage", type=_place, help="override the spec's storage_path (a folder or s3://...)")
        sp.add_argument("--no-view", action="store_true", help="no live table (a progress log line a minute)")
        _add_sets(sp)
    sp = sub.add_parser("status", help="the trial table from the stored state (no Ray)")
    sp.add_argument("target", type=_place, metavar="SPEC|FOLDER|s3://BUCKET/PREFIX/NAME")
    sp.add_argument("--json", action="store_true", help="the table as JSON")
    for plugin in _plugins():
        plugin.add_commands(sub)
    return p


def _place(text: str) -> Path | str:
    """A path, or an object store's URI kept as written (a Path would fold its "//")."""
    return text if text.startswith(("s3://", "gs://")) else Path(text)


def _add_sets(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--set", dest="sets", action="append", nargs="+", metavar="KEY=VALUE",
                    help="override the spec: a trainer key for every trial (optim.base_lr=0.01) or a spec field "
                    "(resources.gpus_per_trial=1, grid.optim.base_lr=[0.01,0.02]); also KEY VALUE pairs; "
                    "repeatable; run stores them and resume reapplies them")


@cache
def _plugins() -> tuple[ModuleType, ...]:
    """The subcommand modules installed under PLUGIN_GROUP (a broken one is named and skipped)."""
    from importlib.metadata import entry_points

    found = []
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            found.append(ep.load())
        except Exception as exc:  # a broken plugin must not take plan/run/status down with it
            logger.warning("command plugin %s (%s) not loaded: %s: %s", ep.name, ep.value, type(exc).__name__, exc)
    return tuple(found)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return _dispatch(args)
    except SweepInterrupted as exc:
        logger.warning("%s; `%s resume` continues the sweep", exc, PROG)
        return 128 + exc.signum
    except (OrchestratorError, TrainerError) as exc:
        sys.stderr.write(f"{PROG} {args.command}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        logger.warning("interrupted; `%s resume` continues the sweep", PROG)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "plan":
        return _plan(args)
    if args.command == "status":
        from orchestrator.state.folder import find_sweep_dir
        from orchestrator.views.status import render_status, status_json

        folder = find_sweep_dir(args.target)
        sys.stdout.write((_json(status_json(folder)) if args.json else render_status(folder)) + "\n")
        return 0
    for plugin in _plugins():
        if args.command in plugin.COMMANDS:
            return plugin.dispatch(args)
    from orchestrator.execution.run import run
    from orchestrator.sweep.sets import pair_tokens

    spec, storage, sets = args.spec, args.storage, pair_tokens(args.sets)
    if args.command == "resume" and isinstance(args.spec, str):  # an object store's sweep: its mirror's spec
        from orchestrator.state.folder import find_sweep_dir

        args.spec = find_sweep_dir(args.spec)
    if args.command == "resume" and args.spec.is_dir():
        spec, storage, stored = _spec_of_folder(args.spec)
        sets = sets or stored
    return run(spec, storage=storage, must_exist=args.command == "resume", view=not args.no_view, sets=sets)


def _plan(args: argparse.Namespace) -> int:
    from orchestrator.sweep.expand import expand
    from orchestrator.sweep.plan import plan_json, render_plan, show_task
    from orchestrator.sweep.sets import pair_tokens
    from orchestrator.sweep.spec import load_spec

    if args.gpus is not None and args.gpus < 1:
        raise SpecError(f"--gpus {args.gpus}: a cluster has at least 1 GPU")
    node = _node_shape(args.node) if args.node else None
    if node is not None and args.gpus is None:
        raise SpecError("--node needs --gpus (the cluster's size)")
    exp = expand(load_spec(args.spec, pair_tokens(args.sets)))
    if args.show:
        text = show_task(exp, args.show)
    else:
        text = _json(plan_json(exp, args.gpus, node)) if args.json else render_plan(exp, args.gpus, node)
    sys.stdout.write(text + "\n")
    return 0


def _json(data: object) -> str:
    import json

    return json.dumps(data, indent=1, default=str)


def _spec_of_folder(folder: Path) -> tuple[Path, Path, list[str]]:
    """A sweep folder's stored spec and `--set`s, read from the working directory the sweep was started in."""
    from orchestrator.state.folder import read_record

    folder = folder.resolve()
    record = read_record(folder)
    if record is None:
        raise SweepNotFoundError(f"{folder}: not a sweep folder (no sweep.json)")
    if record.get("cwd") and Path(record["cwd"]).is_dir():
        os.chdir(record["cwd"])  # the spec's relative paths (dataset root, mlflow.db) are relative to it
    # The mirror of an object-store sweep is not its storage: the stored spec names the store.
    stored = str((yaml.safe_load((folder / "spec.yaml").read_text()) or {}).get("storage_path", ""))
    storage = None if stored.startswith(("s3://", "gs://")) else folder.parent
    return folder / "spec.yaml", storage, list(record.get("sets") or [])


def _node_shape(text: str) -> tuple[int, float]:
    """`--node 8,64`: (GPUs, CPUs) of one node."""
    try:
        gpus, cpus = text.split(",")
        shape = int(gpus), float(cpus)
    except ValueError:
        raise SpecError(f"--node {text}: expected GPUS,CPUS (e.g. 8,64)") from None
    if shape[0] < 1 or shape[1] <= 0:
        raise SpecError(f"--node {text}: a node has at least 1 GPU and some CPUs")
    return shape
