"""A real `mlflow server` on 127.0.0.1 for tests and benches: start, stop (a whole outage), restart, count rows.

Started in its own session so `stop` can SIGTERM its whole process group (the CLI, uvicorn and its job
runner), never anything else. Rows are counted straight from its SQLite store.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.harness.local import free_port  # noqa: F401  (re-exported for the UI test)

PYTHON = sys.executable



class MlflowServer:
    def __init__(self, folder: Path, port: int | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.db = self.folder / "server.db"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def start(self, timeout: float = 600) -> float:
        """Start (or restart on the same port and store); returns the seconds until /health answered."""
        t0 = time.time()
        self.starts += 1
        log = open(self.folder / f"server{self.starts}.log", "w")
        cmd = [PYTHON, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.db}", "--artifacts-destination",
               str(self.folder / "artifacts"), "--workers", "1"]
        # No job runner (GenAI jobs; seven huey consumers): tracking needs none of it, and it doubles start-up.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(cmd, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        log.close()
        while time.time() - t0 < timeout:
            if self.healthy():
                return time.time() - t0
            if self.proc.poll() is not None:
                raise RuntimeError((self.folder / f"server{self.starts}.log").read_text()[-3000:])
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"mlflow server on port {self.port} not healthy after {timeout:.0f}s")

    def stop(self) -> None:
        """SIGTERM the server's process group and wait until it is gone (SIGKILL after 30 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        deadline = time.time() + 30
        while self.healthy() and time.time() < deadline:  # workers of the group may linger a moment
            time.sleep(0.2)

    def query(self, sql: str, *args) -> list[tuple]:
        with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True) as db:
            return db.execute(sql, args).fetchall()

    def duplicates(self) -> list[tuple]:
        """(run, key, step) logged more than once: MLflow appends, so a retry that resends shows here."""
        return self.query("SELECT run_uuid, key, step, COUNT(*) FROM metrics GROUP BY run_uuid, key, step "
                          "HAVING COUNT(*) > 1")

    def points(self, run_id: str) -> set[tuple[str, int]]:
        return {(k, int(s)) for k, s in self.query("SELECT key, step FROM metrics WHERE run_uuid = ?", run_id)}
