"""`python -m orchestrator ui [SWEEP]`: the MLflow UI on a sweep's tracking store, on 127.0.0.1 only.

Runs `mlflow ui` (the tracking server with its web app) as a child process in its own process group,
from the store's folder, so the server's default `./mlartifacts` lands next to the `mlflow.db` where
the orchestrator keeps artifacts too. Waits for `/health`, then the caller prints the experiment's
URL, `http://127.0.0.1:PORT/#/experiments/ID/runs?workflowType=machine_learning` (MLflow 3.17 opens
an experiment in its GenAI view otherwise) `&viewStateShareKey=trials`: the sweep's saved view (its
trials as rows, their axes and AP as columns; `query.save_view`). Stopping (Ctrl-C, SIGTERM) stops
the whole group.

A sweep tracked by an `mlflow server` (an http(s) tracking URI) already has its UI: that server. Then
nothing is started; the server must answer `/health`, and the sweep's experiment URL on it is printed.
(`mlflow ui --backend-store-uri http://...` fails: a server URI is no backend store.)
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dashboards.errors import UiError
from dashboards.query import SweepTarget, check_store, experiment_id, save_view

logger = logging.getLogger(__name__)
HOST = "127.0.0.1"  # never another interface: the UI has no authentication


@dataclass
class UiServer:
    process: subprocess.Popen
    base_url: str
    log: Path

    def experiment_url(self, exp_id: str, view: str | None = None) -> str:
        return experiment_url(self.base_url, exp_id, view)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the server's process group (uvicorn and its workers), SIGKILL if it lingers."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass


def experiment_url(base_url: str, exp_id: str, view: str | None = None) -> str:
    # MLflow >= 3.x opens an experiment in its GenAI view unless told this is model training; `view`:
    # a saved view of the runs table (`query.save_view`), which no other search parameter may override.
    url = f"{base_url.rstrip('/')}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    return url + (f"&viewStateShareKey={view}" if view else "")


def is_server_uri(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_ui(uri: str, port: int = 0, timeout: float = 120.0, log: Path | None = None) -> UiServer:
    """Start `mlflow ui` on `uri` bound to 127.0.0.1 and wait until it answers /health."""
    check_store(uri)
    port = port or free_port()
    cwd = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else Path.cwd()
    log = log or Path(os.environ.get("TMPDIR", "/tmp")) / f"mlflow-ui-{port}.log"
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", HOST, "--port", str(port)]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    server = UiServer(proc, f"http://{HOST}:{port}", log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
            raise UiError(f"mlflow ui exited with code {proc.returncode}: {tail[0]} (log: {log})")
        if _healthy(server.base_url):
            logger.info("MLflow UI on %s (store %s, log %s)", server.base_url, uri, log)
            return server
        time.sleep(0.5)
    server.stop()
    raise UiError(f"mlflow ui did not answer on {server.base_url}/health within {timeout:.0f}s (log: {log})")


def _healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(base_url + "/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def serve(target: SweepTarget | None, uri: str, announce: Callable[..., None], port: int = 0) -> int:
    """Run the UI until interrupted; `announce` gets the URL to open (the sweep's experiment if given).

    On a tracking server, announce its URL and return 0 at once: the server is the UI."""
    store = target.uri if target is not None else uri
    if is_server_uri(store):
        if not _healthy(store.rstrip("/")):  # before MLflow's client retries for minutes
            raise UiError(f"tracking server {store} does not answer {store.rstrip('/')}/health")
        if target is not None:
            exp_id = experiment_id(target)
            url = experiment_url(store, exp_id, save_view(target, exp_id))
        else:
            url = store.rstrip("/") + "/"
        announce(url, served_here=False)
        return 0
    exp_id = experiment_id(target) if target is not None else None  # unknown sweep: refuse before starting
    view = save_view(target, exp_id) if target is not None else None
    server = start_ui(target.uri if target is not None else uri, port)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # so `finally` stops the server on SIGTERM
    try:
        announce(server.experiment_url(exp_id, view) if exp_id else server.base_url + "/")
        return server.process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
