"""Shared fixtures: tiny specs on tmp paths, a tiny synthetic dataset, a real local Ray cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

# Re-exported: tests import these from here; the benchmarks from bench.harness.
from bench.harness.local import auth_disabled, free_port as _free_port  # noqa: F401
from bench.harness.specs import PYTHON, REPO, TINY_SWEEP_MODEL, cli, set_path, tiny_spec, write_spec  # noqa: F401


def start_node(log_path: Path, head: str | None = None, num_cpus: float = 2, num_gpus: float = 0,
               timeout: float = 300, tries: int = 3, prefix: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """`ray start [--head | --address HEAD] --block` on 127.0.0.1, in its own session; (process, head address).

    RAY_AUTH_MODE must be set already (`auth_disabled`). `prefix` runs before `ray start` (e.g. a
    mount-namespace wrapper that ends by exec-ing its arguments). Ray gives a starting node 30 s to register,
    which a loaded machine can miss: such a start is killed (its whole process group) and tried again.
    """
    for _ in range(tries):
        port = _free_port()
        where = [f"--address={head}"] if head else ["--head", f"--port={port}", "--include-dashboard=false"]
        env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AIR_NEW_OUTPUT": "0"}
        env.pop("RAY_ADDRESS", None)
        with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
            # A free agent port each: the default (52365) would clash between nodes on one host.
            proc = subprocess.Popen([*prefix, str(Path(PYTHON).parent / "ray"), "start", *where, "--block",
                                     f"--num-cpus={num_cpus:g}", f"--num-gpus={num_gpus:g}",
                                     f"--dashboard-agent-listen-port={_free_port()}", "--node-ip-address=127.0.0.1",
                                     "--disable-usage-stats"],
                                    stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None and "Ray runtime started" not in log_path.read_text():
            time.sleep(1)
        if proc.poll() is None and "Ray runtime started" in log_path.read_text():
            return proc, head or f"127.0.0.1:{port}"
        kill_node(proc)
    raise RuntimeError(f"ray node did not start in {tries} tries: {log_path.read_text()[-2000:]}")


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL every process of a node from `start_node` (its process group): a node lost at once."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def stop_node(proc: subprocess.Popen) -> None:
    """Stop a node from `start_node` (never `ray stop`, which would hit other clusters on this host)."""
    proc.terminate()  # `ray start --block` stops the processes it started
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        kill_node(proc)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A real Ray head (`ray start --head --block`) on 127.0.0.1 with 2 CPUs; yields its address."""
    with auth_disabled():
        proc, address = start_node(tmp_path_factory.mktemp("ray") / "head.log")
        try:
            yield address
        finally:
            stop_node(proc)
