"""The `report` and `ui` subcommands, plugged into `python -m orchestrator` through the entry point
group `rethink_sweeps.commands` (pyproject.toml; orchestrator/cli.py loads it).

    report SPEC|FOLDER|NAME [--out DIR] [--tracking-uri URI] [--no-log]
    ui [SPEC|FOLDER|NAME] [--port P] [--tracking-uri URI]

A sweep is named like `status` does (its spec or its folder on the storage path), or by its name
alone (then its store is --tracking-uri, else ./mlflow.db). Errors are `DashboardError`s, which the
orchestrator's command line prints on one line with exit code 2. Heavy imports (MLflow, pandas,
matplotlib) happen only when a subcommand runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dashboards.errors import SweepDataError

COMMANDS = ("report", "ui")


def add_commands(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("report", help="figures, paper comparison and cost accounting of a sweep (HTML + PNG)")
    sp.add_argument("target", metavar="SPEC|FOLDER|NAME")
    sp.add_argument("--out", type=Path, help="report folder (default SWEEP_FOLDER/report, else ./report-NAME)")
    sp.add_argument("--tracking-uri", help="MLflow store (default: the spec's, else sqlite:///mlflow.db here)")
    sp.add_argument("--no-log", action="store_true", help="do not log the report to the sweep's parent run")
    sp = sub.add_parser("ui", help="the MLflow UI on the sweep's tracking store, on 127.0.0.1")
    sp.add_argument("target", nargs="?", metavar="SPEC|FOLDER|NAME")
    sp.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    sp.add_argument("--tracking-uri", help="MLflow store (default: the spec's, else sqlite:///mlflow.db here)")


def dispatch(args: argparse.Namespace) -> int:
    from dashboards.query import find_sweep

    target = find_sweep(args.target, args.tracking_uri)
    if args.command == "report":
        from dashboards.report import build_report

        if target is None:
            raise SweepDataError("report needs a sweep: its spec, its folder or its name")
        report = build_report(target, args.out, log_to_mlflow=not args.no_log)
        sys.stdout.write(f"{report.index}\n")
        return 0
    from dashboards.ui import serve
    from orchestrator.tracking.mlflow_runs import resolve_uri

    def announce(url: str, served_here: bool = True) -> None:
        sys.stdout.write(f"MLflow UI: {url}" + ("  (Ctrl-C stops it)\n" if served_here else "  (the tracking server's own UI)\n"))
        sys.stdout.flush()

    return serve(target, args.tracking_uri or resolve_uri(None), announce, args.port)
