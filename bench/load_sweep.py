"""Benchmark: a sweep of many short real trials through Ray and a real `mlflow server` (project issue 6, item 8).

Runs `python -m orchestrator run` (it starts its own local Ray cluster) on a grid of N two-iteration
trials of the tiny test config, logging to a `mlflow server` on 127.0.0.1 that this script starts,
then counts what arrived and prints one table:

  trials, sweep wall        the driver process, start to exit (Ray start and MLflow set-up included)
  in-trial time             per trial: final_metrics.json's mtime minus its attempt's start (the
                            trainer's own loop, evaluation included), summed
  overhead per trial        (slots x sweep wall - sum of in-trial time) / trials: everything a trial
                            slot spends outside the trainer loop (Ray worker start, imports, model
                            build, Tune and MLflow bookkeeping), per trial
  metric rows, rows/s       rows in the store at the end (checked: every point of every
                            metrics.jsonl, once) over the sweep wall
  disk MB                   what the sweep folder holds at the end: the trials run with
                            `keep_checkpoints: none` (a finished trial drops its checkpoints; at
                            ~180 MB each, 200 kept final checkpoints would take 36 GB)
Side by side on the same server it then times MLflow logging itself: 2,000 steps x 12 keys sent
(a) one request per step (`MetricLogger.log`) and (b) in batches (`MetricLogger.log_rows`, what the
driver's `MetricSync` sends); the final ratio is (b)/(a) rows/s.

    python bench/load_sweep.py                 # 200 trials
    python bench/load_sweep.py --trials 20     # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The harness the load test uses too (pytest-free), so the bench measures what the test proves.
from bench.harness.load_shape import count_arrivals, load_spec  # noqa: E402
from bench.harness.mlflow_server import MlflowServer  # noqa: E402
from bench.harness.specs import write_spec  # noqa: E402

log = logging.getLogger("bench.load_sweep")
NEEDED_GB = 8  # a few trials' checkpoints while they run, Ray's session logs, the MLflow store


def check_disk(folder: Path) -> float:
    """Free GB where the sweep writes; refuse to start a run that would fill the disk halfway."""
    free = shutil.disk_usage(folder).free / 1e9
    if free < NEEDED_GB:
        raise SystemExit(f"only {free:.1f} GB free in {folder}; this bench needs about {NEEDED_GB} GB")
    return free


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_sweep(tmp: Path, server: MlflowServer, trials: int) -> dict:
    spec = load_spec(tmp, server.uri, trials)
    path = write_spec(tmp, spec)
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "orchestrator", "run", str(path), "--no-view"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    wall = time.time() - t0
    if out.returncode != 0:
        raise SystemExit(f"sweep failed ({out.returncode}):\n{out.stderr[-3000:]}")
    sweep = tmp / "runs" / "load"
    in_trial = 0.0
    for folder in (sweep / "trials").iterdir():
        start = json.loads((folder / "attempts.jsonl").read_text().splitlines()[0])["time"]
        in_trial += (folder / "final_metrics.json").stat().st_mtime - start
    got = count_arrivals(server, sweep, "load")
    got["disk"] = folder_bytes(sweep)
    # The driver says how many trials the cluster ran at once ("running N trials, at most K at a time").
    slots = int(re.search(r"at most (\d+) at a time", out.stderr).group(1))
    return {"wall": wall, "in_trial": in_trial, "slots": slots, **got}


def logging_rates(server: MlflowServer, steps: int = 2000, keys: int = 12) -> tuple[float, float]:
    """Rows/s of per-step requests vs batched ones (the driver's syncer), on two fresh runs of one server."""
    from mlflow import MlflowClient

    from orchestrator.tracking.mlflow_runs import MetricLogger

    client = MlflowClient(server.uri)
    exp = client.create_experiment("bench-logging")
    rows = [(s, {f"train/k{k}": float(s * k) for k in range(keys)}) for s in range(1, steps + 1)]
    direct = MetricLogger(client, client.create_run(exp).info.run_id)
    t0 = time.perf_counter()
    for step, metrics in rows:
        direct.log(step, metrics)
    direct_s = time.perf_counter() - t0
    batched = MetricLogger(client, client.create_run(exp).info.run_id)
    t0 = time.perf_counter()
    sent = batched.log_rows(rows)
    batched_s = time.perf_counter() - t0
    assert sent == steps * keys, sent
    return steps * keys / direct_s, steps * keys / batched_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--logging-steps", type=int, default=2000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="load-sweep-") as tmp:
        log.info("%.0f GB free in %s", check_disk(Path(tmp)), tmp)
        server = MlflowServer(Path(tmp) / "mlflow")
        log.info("mlflow server up in %.1fs", server.start())
        try:
            r = run_sweep(Path(tmp), server, args.trials)
            per_step, batched = logging_rates(server, args.logging_steps)
        finally:
            server.stop()
    overhead = (r["slots"] * r["wall"] - r["in_trial"]) / args.trials
    ok = not r["missing"] and not r["extra"] and not r["duplicates"] and r["rows"] == r["expected_points"]
    print(f"{'trials':>8} {'slots':>5} {'wall s':>8} {'in-trial s':>10} {'overhead s/trial':>16} "
          f"{'runs':>5} {'metric rows':>11} {'rows/s':>7} {'dups':>4} {'complete':>8} {'disk MB':>8}")
    print(f"{args.trials:>8} {r['slots']:>5} {r['wall']:>8.1f} {r['in_trial']:>10.1f} {overhead:>16.2f} "
          f"{r['runs']:>5} {r['rows']:>11} {r['rows'] / r['wall']:>7.1f} {len(r['duplicates']):>4} {str(ok):>8} {r['disk'] / 1e6:>8.1f}")
    print(f"MLflow logging, {args.logging_steps} steps x 12 keys: per-step requests {per_step:.0f} rows/s, "
          f"buffered sender {batched:.0f} rows/s")
    print(f"ratio buffered/per-step: {batched / per_step:.1f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
