"""Ray's own fake autoscaler on this one machine (provider `fake_multinode`), and a sampler of what it does.

`fake_cluster` starts the head itself (`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...
--block` in its own session; never `AutoscalingCluster.start()`, which runs `ray stop --force` and
would kill every Ray cluster on the host). The head's monitor launches worker nodes as processes
of that same session, so teardown kills the session: the head and every node it launched, nothing
else. GPUs are declared: trials train on CPU with gloo. `Timeline` samples nodes, placement groups
and the autoscaler's resource request once a second from the test process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from bench.harness.local import auth_disabled, free_port as _free_port
from bench.harness.specs import PYTHON, REPO

HEAD_ID = "f" * 51 + "00000"  # the fake provider's node ids: the head, then ...00001, ...00002


def _config(gcs: str, head_cpus: float, types: dict[str, dict], max_workers: int, idle_min: float) -> dict:
    nodes = {"ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0}}
    nodes.update({name: {"node_config": {}, "min_workers": 0, **t} for name, t in types.items()})
    return {"cluster_name": "fake", "max_workers": max_workers, "upscaling_speed": 1.0,
            "idle_timeout_minutes": idle_min, "head_node_type": "ray.head.default", "available_node_types": nodes,
            # A read-only provider: node ids as IPs, no updaters, no launch-config check (else launches fail).
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": gcs},
            "auth": {"ssh_user": "ubuntu"}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": []}


@contextmanager
def fake_cluster(folder: Path, types: dict[str, dict], head_cpus: float = 1, max_workers: int = 2,
                 idle_min: float = 0.1, timeout: float = 300) -> Iterator[tuple[str, int]]:
    """A head without GPUs and an autoscaler for `types` ({name: {resources, max_workers}}); yields its
    address and its session id (every process of the cluster, launched nodes included, is in it)."""
    import ray._private.services as services

    with auth_disabled():
        ip = services.get_node_ip_address()  # the launched nodes reach the head at the machine's address
        port = _free_port()
        cfg = folder / "autoscaler.json"
        cfg.write_text(json.dumps(_config(f"{ip}:{port}", head_cpus, types, max_workers, idle_min)))
        env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AIR_NEW_OUTPUT": "0", "RAY_FAKE_CLUSTER": "1",
               "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        env.pop("RAY_ADDRESS", None)
        log = folder / "head.log"
        with open(log, "w") as fh:
            head = subprocess.Popen([str(Path(PYTHON).parent / "ray"), "start", "--head", f"--port={port}",
                                     f"--num-cpus={head_cpus:g}", "--num-gpus=0", "--include-dashboard=false",
                                     f"--dashboard-agent-listen-port={_free_port()}", f"--autoscaling-config={cfg}",
                                     "--disable-usage-stats", "--block"],
                                    stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.time() + timeout
            while "Ray runtime started" not in log.read_text():
                assert head.poll() is None and time.time() < deadline, log.read_text()[-2000:]
                time.sleep(1)
            yield f"{ip}:{port}", head.pid
        finally:
            kill_session(head.pid)
            head.wait()


def session_pids(sid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after "pid (comm)": state, ppid, pgrp, session
            out.append(int(stat.parent.name))
    return out


def kill_session(sid: int) -> None:
    """SIGKILL every process of the head's session: the head, its monitor, and the nodes it launched."""
    for _ in range(3):
        pids = session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(1)


def node_pids(sid: int, node_id: str) -> list[int]:
    """The processes of one launched node (its raylet and what the raylet started), by its fake node id."""
    raylets = [p for p in session_pids(sid) if f"--node_id={node_id}".encode() in _cmdline(p)
               or f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}".encode() in _environ(p)]
    children = [p for p in session_pids(sid) if _ppid(p) in raylets]
    return raylets + children


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError):
        return -1


class Timeline:
    """Once a second: the alive nodes (GPU nodes by their fake id), placement groups by state, and the
    autoscaler's resource request. `rows`: (seconds since start, nodes, groups, request)."""

    def __init__(self, address: str):
        self.address, self.rows, self.t0 = address, [], time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Timeline":
        import ray

        with auth_disabled():
            ray.init(address=self.address, log_to_driver=False, configure_logging=False)
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import ray

        self._stop.set()
        self._thread.join()
        self.sample()
        ray.shutdown()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.sample()
            except Exception:  # a sample lost while the cluster changes; the next one comes in a second
                pass

    def sample(self) -> tuple:
        import ray
        from ray.experimental.internal_kv import _internal_kv_get

        nodes = tuple(sorted(n["NodeID"][-5:] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")))
        states: dict[str, int] = {}
        for g in ray.util.placement_group_table().values():
            states[g["state"]] = states.get(g["state"], 0) + 1
        raw = _internal_kv_get("autoscaler_resource_request")
        request = json.loads(raw) if raw else None
        gpus = sum(b.get("GPU", 0) for b in request or [])
        row = (round(time.time() - self.t0, 1), nodes, tuple(sorted(states.items())), gpus if request else 0)
        self.rows.append(row)
        return row

    def changes(self) -> list[tuple]:
        """The rows where something changed."""
        out = []
        for row in self.rows:
            if not out or out[-1][1:] != row[1:]:
                out.append(row)
        return out

    def render(self) -> str:
        return "\n".join(f"  t={t:6.1f}s  GPU nodes {list(n) or '-'}  placement groups {dict(g) or '-'}  "
                         f"request {r:g} GPU(s)" for t, n, g, r in self.changes())
