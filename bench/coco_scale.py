"""Benchmark: the train data path at COCO scale, the old pycocotools objects against the numpy index.

Generates (once, into --out) a COCO-sized train2017 annotation file: 118,287 images of varied sizes,
~860k instances (polygons of 10-40 points, ~1% crowd regions as uncompressed RLE), COCO's 80
non-contiguous category ids; the image files are symlinks to a few real JPEGs of the listed sizes.
Then, each measurement in its own fresh process:

  build   time and peak RSS of `pycocotools.COCO(file)` and of `TrainIndex.build` (JSON load included),
          alternating, --repeats times each;
  loader  PSS (and private dirty memory) of the main process and of each of 4 loader workers at
          batch 0, 1k and 3k (10k with --long) of the training stream, 2 images per batch as one rank
          of a 16-image, 8-GPU trial sees it, for
            before   the previous data path (pycocotools COCO in the main process, workers read the
                     annotation dicts; images as float32), reproduced below as `LegacyTrain`;
            after    `trainer.data.coco_index.TrainImages` over the cached, memory-mapped index;
            after1k  the same for a 1k-image subset trial (the subset's records only).

    python bench/coco_scale.py --out /tmp/coco_scale            # ~15 min on 2 loaded cores
    python bench/coco_scale.py --out /tmp/cs --images 5000 --batches 0,200,600   # a quick look
    python bench/coco_scale.py --out /tmp/coco_scale --check   # the up-front check: first run, cached

`--check` times only `trainer.data.dataset_check.check_split` on the generated train split, each run in a
fresh process: a first run with an empty cache (every image decoded fully in `--check-workers`
processes, every annotation and polygon validated) and a second one answered by the cache (the
annotation file's hash and a stat of every listed image).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COCO_CATS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]  # COCO's 80 ids
SIZES = [(480, 640), (640, 480), (427, 640), (640, 427), (375, 500), (640, 640)]  # (height, width)


def _polygon(rng, x, y, w, h, points):
    t = np.sort(rng.uniform(0, 2 * np.pi, points))
    r = rng.uniform(0.6, 1.0, points)
    xs, ys = x + w / 2 * (1 + r * np.cos(t)), y + h / 2 * (1 + r * np.sin(t))
    return np.stack([xs, ys], 1).ravel().round(2).tolist()


def _crowd_rle(h, w, x0, y0, bw, bh):
    """Uncompressed column-major RLE of a rectangle, as COCO stores crowd regions."""
    counts = [x0 * h + y0]
    for _ in range(bw - 1):
        counts += [bh, h - bh]
    counts += [bh, h * w - counts[0] - bw * bh - (bw - 1) * (h - bh)]
    return {"size": [h, w], "counts": counts}


def generate(out: Path, n_images: int, per_image: float, seed: int = 0) -> Path:
    """COCO-shaped train2017 annotations + symlinked JPEGs; skipped when already there."""
    ann_file = out / "annotations" / "instances_train2017.json"
    marker = out / f".done-{n_images}-{per_image}-{seed}"
    if marker.is_file():
        return ann_file
    from PIL import Image

    rng = np.random.default_rng(seed)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    (out / "jpeg").mkdir(exist_ok=True)
    images_dir = out / "train2017"
    images_dir.mkdir(exist_ok=True)
    for h, w in SIZES:  # real JPEGs: smooth noise, so decoding costs what a photo costs
        small = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(out / "jpeg" / f"{w}x{h}.jpg", quality=90)
    images, anns = [], []
    for k in range(n_images):
        image_id = 9 + 7 * k  # sparse ids, as COCO's
        h, w = SIZES[int(rng.integers(len(SIZES)))]
        name = f"{image_id:012d}.jpg"
        link = images_dir / name
        if not link.is_symlink():
            link.symlink_to(out / "jpeg" / f"{w}x{h}.jpg")
        images.append({"id": image_id, "file_name": name, "height": h, "width": w, "license": 1})
        for _ in range(int(rng.poisson(per_image))):
            bw, bh = (float(v) for v in np.exp(rng.uniform(np.log(6), np.log(min(h, w) - 2), 2)))
            x, y = float(rng.uniform(0, w - bw - 1)), float(rng.uniform(0, h - bh - 1))
            crowd = rng.random() < 0.01
            seg = (_crowd_rle(h, w, int(x), int(y), max(int(bw), 1), max(int(bh), 1)) if crowd
                   else [_polygon(rng, x, y, bw, bh, int(rng.integers(10, 41)))])
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(rng.choice(COCO_CATS)),
                         "segmentation": seg, "area": round(bw * bh * 0.7, 2), "iscrowd": int(crowd),
                         "bbox": [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)]})
    cats = [{"id": c, "name": f"cat{c}", "supercategory": "x"} for c in COCO_CATS]
    doc = {"info": {"description": "bench/coco_scale"}, "licenses": [], "images": images,
           "annotations": anns, "categories": cats}
    with open(ann_file, "w") as fh:
        json.dump(doc, fh, separators=(",", ":"))
    marker.write_text(json.dumps({"images": len(images), "annotations": len(anns)}))
    return ann_file


# ---------------------------------------------------------------- the previous data path (baseline)


class LegacyTrain:
    """The training dataset as it was before trainer.data.coco_index (pycocotools objects, float images)."""

    def __init__(self, coco, image_dir: Path, ids):
        self.coco, self.image_dir = coco, image_dir
        self.cat_to_label = {c: i + 1 for i, c in enumerate(sorted(coco.getCatIds()))}
        self.image_ids = [i for i in ids if self._usable_anns(i)]

    def __len__(self):
        return len(self.image_ids)

    def _usable_anns(self, image_id):
        anns = self.coco.imgToAnns.get(image_id, [])
        return [a for a in anns if not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1]

    def __getitem__(self, key):
        import torch

        from trainer.data.coco import read_image

        _, index = key
        image_id = self.image_ids[index]
        image = read_image(self.image_dir / self.coco.imgs[image_id]["file_name"]).float().div_(255.0)
        anns = self._usable_anns(image_id)
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        masks = np.stack([self.coco.annToMask(a) for a in anns]) if anns else np.zeros((0, *image.shape[-2:]), np.uint8)
        labels = torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        return image, {"boxes": boxes, "labels": labels, "masks": torch.from_numpy(masks), "image_id": image_id}


# ---------------------------------------------------------------- measurements (each in its own process)


def _memory(pid: int) -> tuple[float, float, float, float]:
    """(PSS, private dirty, anonymous PSS, file-backed PSS) in MiB from /proc/PID/smaps_rollup.

    Copy-on-write copies of the parent's Python objects are anonymous private dirty pages; pages of
    a memory-mapped index are file-backed, clean and shared (page cache), so they are split out."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0])
    return (fields["Pss"] / 1024, fields["Private_Dirty"] / 1024, fields.get("Pss_Anon", 0) / 1024,
            fields.get("Pss_File", 0) / 1024)


def _load_coco(ann_file: Path):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


def phase_build(kind: str, ann_file: Path) -> dict:
    import torch  # noqa: F401  (a trainer process has it; imported before timing in both cases)
    from pycocotools.coco import COCO  # noqa: F401

    from trainer.data.coco_index import TrainIndex  # noqa: F401

    base = _memory(os.getpid())[0]
    started = time.perf_counter()
    if kind == "coco":
        obj = _load_coco(ann_file)
        count = len(obj.anns)
    elif kind == "cache":
        from trainer.data.coco_index import TrainIndex
        from trainer.data.dataset_check import AnnotationFile

        obj = TrainIndex.load_or_build(AnnotationFile(ann_file), ann_file.parent / ".trainer_cache")
        count = len(obj.labels)
    else:
        from trainer.data.coco_index import TrainIndex
        from trainer.data.dataset_check import AnnotationFile

        ann = AnnotationFile(ann_file)
        obj = TrainIndex.build(ann.data)
        ann.drop()
        count = len(obj.labels)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "base_pss_mib": base, "instances": count}


def phase_loader(variant: str, ann_file: Path, checkpoints: list[int], workers: int, batch: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from trainer.data.coco_index import TrainImages, TrainIndex
    from trainer.data.coco import StreamBatchSampler, collate, select_subset, start_workers
    from trainer.data.dataset_check import AnnotationFile

    torch.set_num_threads(1)
    image_dir = ann_file.parent.parent / "train2017"
    started = time.perf_counter()
    if variant == "before":
        coco = _load_coco(ann_file)
        dataset = LegacyTrain(coco, image_dir, sorted(coco.getImgIds()))
    else:
        index = TrainIndex.load_or_build(AnnotationFile(ann_file), ann_file.parent / ".trainer_cache")
        if variant == "after1k":
            index = index.subset(select_subset(index.image_ids, 1000, 0))
        dataset = TrainImages(index, image_dir)
    setup = time.perf_counter() - started
    sampler = StreamBatchSampler(len(dataset), batch, 0, 0, max(checkpoints) + 1)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers, prefetch_factor=2)
    # "before" forks as the old trainer did; "after" as the trainer now does (gc frozen at the fork).
    rows, it = [], (iter(loader) if variant == "before" else start_workers(loader))
    t0 = time.perf_counter()
    for step, _ in enumerate(it):
        if step in checkpoints:
            main = _memory(os.getpid())
            ws = [_memory(w.pid) for w in it._workers]
            rows.append({"batch": step, "main": main, "workers": ws, "seconds": time.perf_counter() - t0})
            print(json.dumps({"progress": variant, "batch": step}), file=sys.stderr, flush=True)
        if step >= max(checkpoints):
            break
    del it
    return {"variant": variant, "setup_seconds": setup, "rows": rows}


def phase_check(ann_file: Path, cache_dir: Path, workers: int) -> dict:
    """The up-front dataset check of the train split (every image decoded), timed in this process."""
    from trainer.data.dataset_check import AnnotationFile, check_split

    started = time.perf_counter()
    dropped = check_split(AnnotationFile(ann_file), ann_file.parents[1] / "train2017", cache_dir=cache_dir,
                          workers=workers)
    return {"seconds": time.perf_counter() - started, "dropped": dropped,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _print_check(args: argparse.Namespace) -> None:
    """First run (cold cache, every image decoded) and a cached run, each in a fresh process."""
    import shutil

    cache = args.out / "check_cache"
    shutil.rmtree(cache, ignore_errors=True)
    print(f"\n| dataset check ({args.check_workers or os.cpu_count()} decode processes) | seconds | peak RSS MiB "
          f"(main) |\n|---|---|---|")
    for label in ("first run (decode all, write cache)", "cached"):
        res = _child(args, "check", str(cache))
        print(f"| {label} | {res['seconds']:.1f} | {res['peak_rss_mib']:.0f} |")


def _child(args: argparse.Namespace, *phase: str) -> dict:
    cmd = [sys.executable, __file__, "--out", str(args.out), "--images", str(args.images),
           "--per-image", str(args.per_image), "--workers", str(args.workers), "--batch", str(args.batch),
           "--batches", args.batches, "--check-workers", str(args.check_workers), "--phase", *phase]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{' '.join(phase)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where the generated set lives (reused)")
    parser.add_argument("--images", type=int, default=118_287)
    parser.add_argument("--per-image", type=float, default=7.3, help="mean instances per image")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2, help="images per batch on one rank (16 / 8 GPUs)")
    parser.add_argument("--batches", default="0,1000,3000", help="batches at which memory is read")
    parser.add_argument("--long", action="store_true", help="also read it at batch 10k")
    parser.add_argument("--repeats", type=int, default=2, help="index builds per method")
    parser.add_argument("--variants", default="before,after,after1k")
    parser.add_argument("--check", action="store_true", help="time the up-front dataset check only")
    parser.add_argument("--check-workers", type=int, default=0, help="decode processes (0: one per CPU)")
    parser.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.long and "10000" not in args.batches.split(","):
        args.batches += ",10000"
    checkpoints = sorted(int(b) for b in args.batches.split(","))
    ann_file = args.out / "annotations" / "instances_train2017.json"
    if args.phase:  # a measurement in this fresh process
        kind, *rest = args.phase
        if kind == "check":
            result = phase_check(ann_file, Path(rest[0]), args.check_workers)
        else:
            result = (phase_build(rest[0], ann_file) if kind == "build"
                      else phase_loader(rest[0], ann_file, checkpoints, args.workers, args.batch))
        print(json.dumps(result))
        return 0
    started = time.perf_counter()
    generate(args.out, args.images, args.per_image)
    stats = json.loads(next(args.out.glob(f".done-{args.images}-*")).read_text())
    print(f"set: {stats['images']:,} images, {stats['annotations']:,} instances, "
          f"{ann_file.stat().st_size / 2**20:.0f} MiB JSON (generated/reused in {time.perf_counter() - started:.0f}s)")
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    if args.check:
        _print_check(args)
        print(f"\nload average at end: {os.getloadavg()[0]:.2f}; total {time.perf_counter() - started:.0f}s")
        return 0
    builds = {"coco": [], "index": []}
    for _ in range(args.repeats):
        for kind in builds:
            builds[kind].append(_child(args, "build", kind))
    if args.repeats:
        _print_builds(builds)
    cached = _child(args, "build", "cache")  # the index cache the "after" loaders map
    print(f"cache: built and/or loaded in {cached['seconds']:.1f}s (a cached load in a trial: "
          f"{_child(args, 'build', 'cache')['seconds']:.2f}s)")
    _print_loaders(args)
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}; total {time.perf_counter() - started:.0f}s")
    return 0


def _print_builds(builds: dict) -> None:
    print("\n| build | seconds (runs) | mean | peak RSS MiB | of which imports (torch, ...) |\n|---|---|---|---|---|")
    for kind, runs in builds.items():
        secs = [r["seconds"] for r in runs]
        print(f"| {'pycocotools.COCO()' if kind == 'coco' else 'TrainIndex.build (JSON load incl.)'} | "
              f"{', '.join(f'{s:.1f}' for s in secs)} | {statistics.mean(secs):.1f} | "
              f"{max(r['peak_rss_mib'] for r in runs):.0f} | {max(r['base_pss_mib'] for r in runs):.0f} |")
    ratio = statistics.mean(r["seconds"] for r in builds["index"]) / statistics.mean(r["seconds"] for r in builds["coco"])
    print(f"index build / COCO(): {ratio:.2f}x (target <= 2x)")


def _print_loaders(args: argparse.Namespace) -> None:
    print("\n| variant | batch | main PSS MiB | worker PSS MiB (each) | worker private dirty MiB (each) | "
          "worker anon / file PSS MiB (mean) | rank total PSS MiB | s |")
    print("|---|---|---|---|---|---|---|---|")
    for variant in args.variants.split(","):
        res = _child(args, "loader", variant)
        for row in res["rows"]:
            pss = ", ".join(f"{w[0]:.0f}" for w in row["workers"])
            dirty = ", ".join(f"{w[1]:.0f}" for w in row["workers"])
            anon = statistics.mean(w[2] for w in row["workers"])
            file_ = statistics.mean(w[3] for w in row["workers"])
            total = row["main"][0] + sum(w[0] for w in row["workers"])
            print(f"| {variant} | {row['batch']} | {row['main'][0]:.0f} | {pss} | {dirty} | {anon:.0f} / {file_:.0f} "
                  f"| {total:.0f} | {row['seconds']:.0f} |")
        first, last = [r for r in res["rows"] if r["batch"] >= 1000][:1], res["rows"][-1:]
        if first and last and last[0]["batch"] > first[0]["batch"]:
            a = sum(w[0] for w in first[0]["workers"])
            b = sum(w[0] for w in last[0]["workers"])
            da = sum(w[1] for w in first[0]["workers"])
            db = sum(w[1] for w in last[0]["workers"])
            print(f"  {variant}: set-up {res['setup_seconds']:.1f}s; batch {first[0]['batch']} -> "
                  f"{last[0]['batch']}: worker PSS {100 * (b - a) / a:+.1f}% (target <= +5%), worker private "
                  f"dirty {100 * (db - da) / da:+.1f}%")


if __name__ == "__main__":
    sys.exit(main())
