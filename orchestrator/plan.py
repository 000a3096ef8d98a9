"""`plan`: the trial table of a spec and what the sweep costs, without a dataset and without Ray.

Per trial: iterations, LR drops, images seen (iterations x batch), epochs (where the train-set size
is known), pixels seen (images x the resized area of the spec's typical image size; with scale
augmentation the largest scale, as the trainer counts), and GPU-hours from the spec's stated
images/s per GPU. Pure: imports neither torch, Ray nor MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.expand import Expansion, Trial
from orchestrator.spec import SweepSpec
from trainer.schedule import resolve_schedule

COCO_TRAIN2017 = 118_287  # images in train2017: the size of data 'all' for epochs


@dataclass(frozen=True)
class PlanRow:
    trial: Trial
    iters: int
    drops: tuple[int, ...]
    images: int
    epochs: float | None
    pixels: float
    gpu_hours: float


def resized_area(height: int, width: int, min_size: int, max_size: int) -> int:
    """Pixels after torchvision's resize: short side to min_size unless the long side passes max_size."""
    scale = min_size / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return round(height * scale) * round(width * scale)


def images_per_s(spec: SweepSpec, backbone: str) -> float:
    ips = spec.estimate.images_per_s_per_gpu
    if isinstance(ips, dict):
        return float(ips.get(backbone) or max(ips.values()))
    return float(ips)


def plan_rows(exp: Expansion) -> list[PlanRow]:
    spec = exp.spec
    h, w = spec.estimate.image_size
    rows = []
    for t in exp.trials:
        cfg = t.config
        sched = resolve_schedule(cfg.schedule)
        images = sched.total_iters * cfg.optim.batch_size
        short = cfg.data.scale_jitter[1] if cfg.data.scale_jitter else cfg.model.min_size
        pixels = float(images) * resized_area(h, w, short, cfg.model.max_size)
        size = cfg.data.train_images if isinstance(cfg.data.train_images, int) else _all_images(spec)
        epochs = images / size if size else None
        gpu_hours = images / images_per_s(spec, cfg.model.backbone) / 3600
        rows.append(PlanRow(t, sched.total_iters, sched.drops, images, epochs, pixels, gpu_hours))
    return rows


def _all_images(spec: SweepSpec) -> int | None:
    """The size of data 'all', where it is known without reading the dataset."""
    if spec.dataset.generate is not None:
        return spec.dataset.generate.train
    return COCO_TRAIN2017 if spec.dataset.train_split == "train2017" else None


def _hours(h: float) -> str:
    return f"{h:,.1f}" if h >= 10 else f"{h:.3g}"


def _si(x: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def render_plan(exp: Expansion) -> str:
    spec = exp.spec
    rows = plan_rows(exp)
    width = max(len(r.trial.name) for r in rows)
    head = (f"{'#':>4}  {'trial':<{width}}  {'id':<10}  {'iters':>8}  {'LR drops':<15}  {'images':>7}  "
            f"{'epochs':>6}  {'pixels':>7}  {'GPU-h':>8}")
    out = [f"sweep {spec.name}  (spec hash {exp.spec_hash}; {len(rows)} trials; "
           f"{spec.resources.gpus_per_trial:g} GPU(s) x {spec.resources.workers} worker(s) per trial)", head,
           "-" * len(head)]
    for i, r in enumerate(rows):
        drops = ",".join(_si(d) for d in r.drops) or "-"
        epochs = f"{r.epochs:.1f}" if r.epochs is not None else "-"
        out.append(f"{i:>4}  {r.trial.name:<{width}}  {r.trial.trial_id:<10}  {r.iters:>8}  {drops:<15}  "
                   f"{_si(r.images):>7}  {epochs:>6}  {_si(r.pixels):>7}  {_hours(r.gpu_hours):>8}")
    out.append("-" * len(head))
    out.extend(_totals(spec, exp, rows))
    return "\n".join(out)


def _totals(spec: SweepSpec, exp: Expansion, rows: list[PlanRow]) -> list[str]:
    iters = sum(r.iters for r in rows)
    images = sum(r.images for r in rows)
    pixels = sum(r.pixels for r in rows)
    gpu_h = sum(r.gpu_hours for r in rows)
    ips: Any = spec.estimate.images_per_s_per_gpu
    ips_text = (", ".join(f"{k} {v:g}" for k, v in ips.items()) if isinstance(ips, dict) else f"{ips:g}")
    g = spec.resources.gpus_per_trial
    longest = max(rows, key=lambda r: r.gpu_hours)
    lines = [
        f"total: {len(rows)} trials, {iters:,} iterations, {images:,} images ({_si(images)}), "
        f"{_si(pixels)} pixels seen",
        f"estimate: {_hours(gpu_h)} GPU-hours at {ips_text} images/s per GPU "
        f"({h_w(spec)} images); longest trial {longest.trial.name}: "
        + (f"{_hours(longest.gpu_hours / g)} h on its {g:g} GPUs" if g else f"{_hours(longest.gpu_hours)} device-hours"),
    ]
    for job in exp.pretrain:
        cfg = job.config
        lines.append(f"pretrain job {job.name}: {job.backbone}, {cfg.get('iters', '?')} iterations x batch "
                     f"{cfg.get('batch_size', '?')}, runs before the {sum(job.name in r.trial.needs for r in rows)} "
                     "trials that use it")
    return lines


def h_w(spec: SweepSpec) -> str:
    h, w = spec.estimate.image_size
    return f"{h}x{w}"
