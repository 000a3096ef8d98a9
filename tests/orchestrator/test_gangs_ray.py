"""Whole-gang DDP trials on a real 2-node Ray cluster with 2 declared GPUs per node (trials on CPU, gloo).

The cluster is two `ray start --block` processes (head + worker, 3 CPUs and 2 logical GPUs each),
each in its own process group, on one host: the storage path is shared by being on one local disk.
With `gpus_per_trial: 2` at most 2 trials fit; the trials' own records (gang.jsonl: each rank's
node, GPUs, start and end; attempts.jsonl), the driver's queue log and the cluster's placement-group
table show what ran when. What each test measured is printed as one `gangs:` line (pytest -s).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.plugins.faults import FAULTS
from tests.orchestrator.conftest import auth_disabled, cli, kill_node, start_node, stop_node, tiny_spec, write_spec
from tests.orchestrator.sweep_utils import check_children, duplicate_points, mlflow_contents, start_driver, wait_for

pytestmark = pytest.mark.slow

GRID = {"init": ["random"], "data": ["all", 8], "schedule": ["1x", "2x"], "backbone": ["R18"]}
# iters_per_x 6: 1x = 6 iterations (fork at 2), 2x = 12 (fork at 8); evaluations every 3.
EVALS = {f"random-{d}-{s}-R18": list(range(3, n + 1, 3)) for d in ("all", "8") for s, n in (("1x", 6), ("2x", 12))}
GANG = {"cpus_per_trial": 2, "gpus_per_trial": 2}
LOST = "random-all-2x-R18"  # the trial whose node is lost; its forked run in the sweep test is the reference
REFERENCE: dict = {}


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory):
    """Head and one worker node, 3 CPUs and 2 logical GPUs each; yields (address, worker process)."""
    logs = tmp_path_factory.mktemp("ray")
    with auth_disabled():
        head, address = start_node(logs / "head.log", num_cpus=3, num_gpus=2)
        try:
            worker = start_node(logs / "worker.log", head=address, num_cpus=3, num_gpus=2)[0]
            try:
                yield address, worker
            finally:
                stop_node(worker)
        finally:
            stop_node(head)


def _spec(tmp: Path, name: str, grid: dict | None = None) -> Path:
    spec = tiny_spec(tmp, name=name, grid=grid or GRID, fork_schedules=True, resources=GANG,
                     base__optim__batch_size=2, base__runtime__log_period=1)
    return write_spec(tmp, spec, f"{name}.yaml")


def _gang_rows(sweep: Path) -> dict[str, list[dict]]:
    out = {}
    for folder in sorted((sweep / "trials").iterdir()):
        path = folder / "gang.jsonl"
        out[folder.name] = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return out


def _intervals(rows: dict[str, list[dict]]) -> list[tuple[float, float, str, int]]:
    """(start, end, trial, attempt) of every gang attempt: from its workers being placed (gang_start)
    to its last rank's end, or to now for an attempt whose ranks died (a lost node)."""
    spans = []
    for name, rs in rows.items():
        for head in (r for r in rs if "gang_start" in r):
            ranks = [r for r in rs if r.get("attempt") == head["attempt"] and "rank" in r]
            end = max((r["end"] for r in ranks), default=time.time())
            spans.append((head["gang_start"], end, name, head["attempt"]))
    return sorted(spans)


def _placement_groups(address: str) -> dict[str, dict]:
    """The cluster's placement groups (GCS table): id -> {state, placed (was it ever scheduled)}."""
    import ray

    with auth_disabled():
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        try:
            table = ray.util.placement_group_table()
        finally:
            ray.shutdown()
    return {pid: {"state": g["state"], "placed": g.get("stats", {}).get("end_to_end_creation_latency_ms", 0) > 0,
                  "attempts": g.get("stats", {}).get("scheduling_attempt")} for pid, g in table.items()}


def _release_groups(released: list[tuple[str, ...]], order: list[str]) -> list[set[str]]:
    """`order` cut into the queue's release groups: tasks released within 2 s of each other go to Tune
    together (two gangs freed in one step), and Tune may start those in either order."""
    seconds = [sum(int(x) * m for x, m in zip(r[0].split(":"), (3600, 60, 1))) for r in released]
    sizes, last = [], None
    for t in seconds:
        if last is not None and t - last <= 2:
            sizes[-1] += 1
        else:
            sizes.append(1)
        last = t
    groups, i = [], 0
    for n in sizes:
        groups.append(set(order[i:i + n]))
        i += n
    return groups


def _peak(spans: list[tuple[float, float, str, int]]) -> int:
    events = sorted([(s, 1) for s, *_ in spans] + [(e, -1) for _, e, *_ in spans])
    peak = now = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def _timeline(spans, t0: float) -> str:
    return "; ".join(f"{n}#{a} {s - t0:.0f}-{e - t0:.0f}s" for s, e, n, a in spans)


def _free_gpus(address: str) -> float:
    import ray

    with auth_disabled():
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        try:
            return ray.available_resources().get("GPU", 0.0)
        finally:
            ray.shutdown()


def test_failed_gang_setup_leaves_no_gpus_held(tmp_path, gpu_cluster):
    """NCCL asked for on nodes whose GPUs are declared but absent: the setup fails (and its retry),
    the sweep ends, and every placement group is gone: all 4 GPUs free."""
    address, _ = gpu_cluster
    spec = tiny_spec(tmp_path, name="nosetup", grid={**GRID, "data": ["all"], "schedule": ["1x"]}, resources=GANG,
                     base__optim__batch_size=2, base__runtime__dist_backend="nccl")
    t0 = time.time()
    out = cli("run", str(write_spec(tmp_path, spec)), "--no-view", env={"RAY_ADDRESS": address}, timeout=600)
    wall = time.time() - t0
    assert out.returncode == 1, out.stderr[-3000:]
    state = (tmp_path / "runs" / "nosetup" / "state.json").read_text()
    assert "dist_backend is 'nccl' but this process has no CUDA device" in state
    gangs = [r for r in _gang_rows(tmp_path / "runs" / "nosetup")["random-all-1x-R18"] if "gang_start" in r]
    assert len(gangs) == 2  # the first try and its retry each placed a gang and failed: nothing hung
    assert _free_gpus(address) == 4.0
    table = _placement_groups(address)
    assert table and all(g["state"] == "REMOVED" for g in table.values()), table
    print(f"gangs: failed setup (nccl without CUDA), 2 attempts, sweep ended in {wall:.0f}s with exit 1; "
          f"free GPUs after: 4/4; placement groups {[g['state'] for g in table.values()]}")


def test_a_trial_that_never_fits_is_refused_before_anything(tmp_path, gpu_cluster):
    address, _ = gpu_cluster
    spec = tiny_spec(tmp_path, name="huge", grid={**GRID, "schedule": ["1x"]},
                     resources={"cpus_per_trial": 2, "gpus_per_trial": 8}, base__optim__batch_size=8)
    out = cli("run", str(write_spec(tmp_path, spec)), "--no-view", env={"RAY_ADDRESS": address}, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert "cannot hold one trial (8 worker(s)" in line and "4 GPUs" in line, line
    assert not (tmp_path / "runs" / "huge").exists()


def test_forked_gang_sweep_holds_at_most_two(tmp_path, gpu_cluster):
    address, _ = gpu_cluster
    log = tmp_path / "driver.log"
    out = cli("run", str(_spec(tmp_path, "gangs")), "--no-view", env={"RAY_ADDRESS": address}, timeout=900)
    log.write_text(out.stderr)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "running 6 trials, at most 2 at a time" in out.stderr
    sweep = tmp_path / "runs" / "gangs"
    rows = _gang_rows(sweep)
    spans = _intervals(rows)
    assert sorted({n for _, _, n, _ in spans}) == sorted(rows) and len(rows) == 6  # 2 trunks + 4 branches
    assert _peak(spans) <= 2, _timeline(spans, spans[0][0])
    for name, rs in rows.items():  # each attempt's two ranks ran together, each on its own logical GPU
        for attempt in {r["attempt"] for r in rs if "rank" in r}:
            ranks = sorted((r for r in rs if r.get("attempt") == attempt and "rank" in r), key=lambda r: r["rank"])
            assert [r["rank"] for r in ranks] == [0, 1] and {r["backend"] for r in ranks} == {"gloo"}, ranks
            assert max(r["start"] for r in ranks) < min(r["end"] for r in ranks), ranks
            assert len({(r["node_id"], g) for r in ranks for g in r["gpu_ids"]}) == 2, ranks
    # The queue decided the start order: each task started in the order the queue released it (tasks
    # released together, within 2 s, into gangs freed at once, may start in either order), and
    # the queue released the longest critical path among the ready ones.
    released = re.findall(r"(\d\d:\d\d:\d\d) \S+ orchestrator.sweep.fork: queue: (\S+) starts \(critical path (\d+)\); "
                          r"ready behind it: (.*)", out.stderr)
    started = [n for _, _, n, a in spans if a == 1]
    assert _release_groups(released, started) == _release_groups(released, [n for _, n, _, _ in released]), \
        (released, spans)
    for _, name, prio, behind in released:
        assert all(int(p) <= int(prio) for p in re.findall(r"\((\d+)\)", behind)), (name, prio, behind)
    # At most one placement group per gang attempt (Tune reuses a finished trial's group for the
    # next trial of the same shape); the cluster's table: every group was placed, none is left.
    groups = {r["placement_group"] for rs in rows.values() for r in rs if "placement_group" in r}
    assert len(groups) <= len(spans)
    table = _placement_groups(address)
    assert groups <= set(table), (groups, table)
    assert all(g["state"] == "REMOVED" and g["placed"] for g in table.values()), table
    ml = mlflow_contents(tmp_path, "gangs")
    check_children(ml, EVALS)
    assert duplicate_points(tmp_path) == []
    REFERENCE.update(final=json.loads((sweep / "trials" / LOST / "final_metrics.json").read_text()),
                     curve=_curve(tmp_path, "gangs", LOST))
    print(f"gangs: 6 tasks, peak {_peak(spans)} gangs at once; timeline {_timeline(spans, spans[0][0])}; "
          f"queue order {[n for _, n, _, _ in released]}; placement groups {len(groups)} of the trials, "
          f"{len(table)} in the cluster: {[(g['state'], g['attempts']) for g in table.values()]}")


def _curve(tmp: Path, sweep: str, name: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name(sweep)
    run = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("trial_name") == name)
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)) for k in run.data.metrics}


def test_node_without_the_storage_is_refused(tmp_path, gpu_cluster):
    """A node whose processes live in their own mount namespace, an empty tmpfs over the storage path."""
    address, _ = gpu_cluster
    runs = tmp_path / "runs"
    runs.mkdir()
    wrap = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'mount -t tmpfs tmpfs "{runs}" && exec "$0" "$@"')
    with auth_disabled():
        blind = start_node(tmp_path / "blind.log", head=address, num_cpus=1, num_gpus=0, prefix=wrap)[0]
        try:
            out = cli("run", str(_spec(tmp_path, "blind")), "--no-view", env={"RAY_ADDRESS": address}, timeout=300)
        finally:
            stop_node(blind)
    assert out.returncode == 2, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r".*orchestrator run: error: node [0-9a-f]{12} \(.*\) does not see the sweep folder "
                        + re.escape(str(runs / "blind")) + r"; every node must see .*", line), line
    assert not (runs / "blind" / "trials").exists() or not any((runs / "blind" / "trials").iterdir())
    print(f"gangs: storage check refused: {line}")


def test_lost_node_restarts_the_whole_gang(tmp_path, gpu_cluster):
    """A 2-worker trial spread over both nodes (one GPU of each is held by the test); the worker node
    is SIGKILLed mid-trial: the gang restarts whole, on the head's two GPUs, from the trial's newest
    checkpoint, into the same MLflow run, and ends exactly where the forked run of the sweep test did."""
    import ray

    address, worker = gpu_cluster
    spec = _spec(tmp_path, "lost", grid={**GRID, "data": ["all"], "schedule": ["2x"]})
    sweep, log = tmp_path / "runs" / "lost", tmp_path / "driver.log"
    with auth_disabled():
        ray.init(address=address, log_to_driver=False, configure_logging=False, namespace="gang-test")
        try:
            holders = _hold_one_gpu_per_node()
            driver = start_driver(["run", str(spec), "--no-view"], log,
                                  {"RAY_ADDRESS": address, **FAULTS, "ORCHESTRATOR_DELAY": f"{LOST}@0.5"})
            try:
                wait_for(driver, lambda: _checkpointed(sweep, 3), log)
                first = _gang_rows(sweep)[LOST][0]
                assert len(set(first["nodes"])) == 2, first  # one rank on each node
                killed_at = time.time()
                newest = max(int(p.stem.split("_")[1])
                             for p in (sweep / "trials" / LOST / "checkpoints").glob("ckpt_*.pt"))
                kill_node(worker)
                for h in holders:  # the head's held GPU goes back: the gang fits there now
                    ray.kill(h)
                assert driver.wait(timeout=600) == 0, log.read_text()[-3000:]
            finally:
                if driver.poll() is None:
                    driver.kill()
                    driver.wait()
        finally:
            ray.shutdown()
    rows = _gang_rows(sweep)[LOST]
    again = [r for r in rows if "gang_start" in r and r["gang_start"] > killed_at]
    assert len(again) == 1 and len(set(again[0]["nodes"])) == 1, rows
    tries = [json.loads(x) for x in (sweep / "trials" / LOST / "attempts.jsonl").read_text().splitlines()]
    tries = [a for a in tries if "start_iter" in a]
    assert tries[-1]["start_iter"] >= 3 and len({a["run_id"] for a in tries}) == 1, tries
    ml = mlflow_contents(tmp_path, "lost")
    check_children(ml, {LOST: EVALS[LOST]})
    assert duplicate_points(tmp_path) == []
    final = json.loads((sweep / "trials" / LOST / "final_metrics.json").read_text())
    if REFERENCE:  # the uninterrupted (forked) run of the same trial, from the sweep test
        assert final == REFERENCE["final"]
        assert _curve(tmp_path, "lost", LOST) == REFERENCE["curve"]
    print(f"gangs: worker node killed with the trial's newest checkpoint at {newest}; gang "
          f"restarted whole on one node from iteration {tries[-1]['start_iter']}; final box AP "
          f"{final.get('bbox/AP')} (reference {REFERENCE.get('final', {}).get('bbox/AP')}); duplicates 0")


def _checkpointed(sweep: Path, at: int) -> bool:
    folder = sweep / "trials" / LOST / "checkpoints"
    return folder.exists() and any(int(p.stem.split("_")[1]) >= at for p in folder.glob("ckpt_*.pt"))


def _hold_one_gpu_per_node() -> list:
    """An idle actor holding 1 GPU on each alive node (so a 2-GPU gang must span both nodes)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, num_gpus=1)
    class Hold:
        def ready(self) -> bool:
            return True

    holders = [Hold.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
               for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")]
    ray.get([h.ready.remote() for h in holders])
    return holders
