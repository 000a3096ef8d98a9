"""What one checkpoint costs on an object store, against writing it to a shared folder: same bytes, one run.

The checkpoint is a full trainer state (model, SGD momentum, scheduler, RNG, counters) of the demo's
trial model (`sweeps/demo.yaml`: R18-FPN GN Mask R-CNN) or of the paper's (`--model paper`: R50-FPN GN
at 1333 px), built as `Trainer.state_dict` builds it, saved once to bytes. Then, alternating so that
drift in the machine hits all sides, each repeat times:

  posix     the write a shared-folder trial makes: `checkpoint.save_atomic` (temp file, fsync, rename)
  upload    what an object-store trial adds after that write: `ObjectStore.put_file` (stream + manifest)
  fetch     what a resume on another node pays: `ObjectStore.get_verified` (download + sha256 check)

against moto's S3 server on 127.0.0.1 (bench/harness/s3_server.py; or any S3 store whose AWS_* variables
are set, with --bucket), and prints mean, spread (min-max) and the ratio upload / posix. The server is
in-process Python on the same cores, so these are upper bounds of the client's and server's CPU cost,
not of a network: give --bucket to measure a real store.

    python bench/store_upload.py [--model demo|paper] [--repeats 5] [--bucket NAME]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.worker.object_store import ObjectStore  # noqa: E402
from trainer.engine.checkpoint import rng_state, save_atomic  # noqa: E402

MODELS = {"demo": dict(backbone="R18", norm="GN", min_size=64, max_size=64, fpn_channels=64, representation_size=128),
          "paper": dict(backbone="R50", norm="GN")}


def build_state(which: str) -> dict:
    """A trainer checkpoint's contents for the model: weights, SGD momentum for every parameter, the rest."""
    from trainer.config import ModelConfig
    from trainer.modeling.model import build_model

    model, _ = build_model(ModelConfig(**MODELS[which]), num_classes=5 if which == "demo" else 81)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": {}, "scaler": {},
            "rng": rng_state(), "ranks": None, "iteration": 100, "counters": {"images": 100}, "last_eval": {}}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="demo")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bucket", help="a real bucket (the AWS_* variables set); default: a local moto server")
    args = ap.parse_args()
    state = build_state(args.model)
    with tempfile.TemporaryDirectory() as tmp, _store(args.bucket) as store:
        tmp = Path(tmp)
        src = save_atomic(state, tmp / "src.pt")
        size = src.stat().st_size
        times: dict[str, list[float]] = {"posix": [], "upload": [], "fetch": []}
        for i in range(args.repeats):  # the order rotates; a fetch reads this repeat's upload
            for side in (["posix", "upload", "fetch"] if i % 2 == 0 else ["upload", "fetch", "posix"]):
                if side == "posix":
                    times[side].append(timed(lambda: save_atomic(state, tmp / f"posix_{i}.pt")))
                elif side == "upload":
                    times[side].append(timed(lambda: store.put_file(src, f"bench/ckpt_{i}.pt")))
                else:
                    ok = []
                    times[side].append(timed(lambda: ok.append(store.get_verified(f"bench/ckpt_{i}.pt",
                                                                                  tmp / f"fetched_{i}.pt"))))
                    assert ok == [True], "the fetched checkpoint did not match its manifest"
        _table(args.model, size, times)


@contextlib.contextmanager
def _store(bucket: str | None):
    if bucket:
        yield ObjectStore.from_uri(f"s3://{bucket}/store-upload-bench")
        return
    from bench.harness.s3_server import exported, s3_server

    with s3_server("bench") as env, exported(env):
        yield ObjectStore.from_uri("s3://bench/store-upload-bench")


def _table(model: str, size: int, times: dict[str, list[float]]) -> None:
    print(f"checkpoint of the {model} trial model: {size / 1e6:.1f} MB; {len(times['posix'])} repeats")
    print(f"{'side':<8} {'mean s':>8} {'min s':>8} {'max s':>8} {'MB/s':>8}")
    for side, ts in times.items():
        mean = statistics.mean(ts)
        print(f"{side:<8} {mean:8.3f} {min(ts):8.3f} {max(ts):8.3f} {size / 1e6 / mean:8.1f}")
    ratios = [u / p for u, p in zip(times["upload"], times["posix"])]
    print(f"upload / posix: {statistics.mean(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
