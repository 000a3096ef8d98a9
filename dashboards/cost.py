"""Cost accounting (the paper's Figure 2): images, instances and pixels seen, pre-training included.

A detection trial counts what it saw as it trains (`seen/images`, `seen/instances`, `seen/pixels`
metrics, pixels at the model's resize size). What its init saw before comes from:

- `random`: nothing;
- `imagenet`: the paper's ImageNet accounting (1.28M images x 100 epochs, 224x224, one instance per
  image; constants in `paper_results.yaml`);
- `pretrained:NAME` / `checkpoint:PATH`: the pretrain job's `pretrain_summary.json` next to its
  `backbone.pt` (images and pixels it counted; a classification image is one instance).

`figure2()` is the paper's own arithmetic: ImageNet 100 epochs + COCO 2x fine-tuning vs COCO 6x from
scratch. Pure: no MLflow, no plotting.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from dashboards.paper import accounting

logger = logging.getLogger(__name__)
KINDS = ("images", "instances", "pixels")


@dataclass(frozen=True)
class Seen:
    """Samples seen, by kind; None where unknown (a pretrain job whose summary cannot be found)."""

    images: float | None
    instances: float | None
    pixels: float | None

    def __add__(self, other: "Seen") -> "Seen":
        return Seen(*(_add(getattr(self, k), getattr(other, k)) for k in KINDS))

    def get(self, kind: str) -> float | None:
        return getattr(self, kind)

    @property
    def known(self) -> bool:
        return all(getattr(self, k) is not None for k in KINDS)


NOTHING = Seen(0.0, 0.0, 0.0)
UNKNOWN = Seen(None, None, None)


def _add(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


def imagenet_seen(acc: Mapping[str, Any] | None = None) -> Seen:
    """ImageNet pre-training as the paper counts it (Section 3.2)."""
    inet = (acc or accounting())["imagenet"]
    images = float(inet["images"]) * float(inet["epochs"])
    return Seen(images, images * float(inet["instances_per_image"]), images * float(inet["pixels_per_image"]))


def coco_seen(schedule_x: float, acc: Mapping[str, Any] | None = None) -> Seen:
    """A COCO detection schedule of `schedule_x` x 90k iterations at batch 16, by the paper's sizes."""
    coco = (acc or accounting())["coco"]
    images = float(schedule_x) * float(coco["iters_per_x"]) * float(coco["batch_size"])
    return Seen(images, images * float(coco["instances_per_image"]), images * float(coco["pixels_per_image"]))


def figure2(acc: Mapping[str, Any] | None = None) -> dict[str, Seen]:
    """The paper's Figure 2 comparison: pre-train + fine-tune vs from scratch, by its stated sizes."""
    acc = acc or accounting()
    fig = acc["figure2"]
    pre = imagenet_seen(acc)
    fine = coco_seen(_x(fig["fine_tune_schedule"]), acc)
    scratch = coco_seen(_x(fig["scratch_schedule"]), acc)
    return {"ImageNet pre-training": pre, f"COCO fine-tuning {fig['fine_tune_schedule']}": fine,
            "pre-training + fine-tuning": pre + fine, f"COCO from scratch {fig['scratch_schedule']}": scratch}


def _x(label: str) -> float:
    return float(str(label).rstrip("x"))


def summary_seen(summary: Mapping[str, Any]) -> Seen:
    """A pretrain job's counts (`pretrain_summary.json` / backbone.pt meta); one instance per image."""
    images = float(summary["images_seen"])
    return Seen(images, images, float(summary["pixels_seen"]))


def pretrain_seen(init: str, init_param: str | None, sweep_dir: Path | None = None) -> tuple[Seen, str]:
    """What a trial's init saw before detection training, and where that number comes from.

    `init` is the trial's `axis.init` tag; `init_param` its `model.init` param (a bound pretrained
    init reads `checkpoint:SWEEP/pretrain/NAME/backbone.pt`).
    """
    if init in ("", "random"):
        return NOTHING, "random init"
    if init == "imagenet":
        return imagenet_seen(), "the paper's ImageNet accounting (1.28M images x 100 epochs, 224x224)"
    candidates = []
    if init_param and init_param.startswith("checkpoint:"):
        candidates.append(Path(init_param.removeprefix("checkpoint:")).with_name("pretrain_summary.json"))
    if init.startswith("pretrained:") and sweep_dir is not None:
        candidates.append(Path(sweep_dir) / "pretrain" / init.removeprefix("pretrained:") / "pretrain_summary.json")
    for path in candidates:
        try:
            return summary_seen(json.loads(path.read_text())), shown_path(path, sweep_dir)
        except (OSError, ValueError, KeyError) as exc:
            logger.debug("no pretrain counts in %s: %s", path, exc)
    shown = ", ".join(shown_path(p, sweep_dir) for p in candidates)
    return UNKNOWN, "not found (" + (shown or "no pretrain summary path") + ")"


def shown_path(path: Path, sweep_dir: Path | None) -> str:
    """A path as the report prints it: relative to the sweep folder (the page names no machine's path)."""
    return os.path.relpath(path, sweep_dir) if sweep_dir is not None else Path(path).name


def format_count(value: float | None) -> str:
    """128000000 -> '128M', 6.42e12 -> '6.42T'; None -> 'n/a'."""
    if value is None:
        return "n/a"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"
