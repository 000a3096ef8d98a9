"""The command line of `python -m trainer.synthetic`: arguments, one-line errors (exit 2), a summary line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from trainer.errors import ConfigError, TrainerError
from trainer.synthetic.datasets import (CATEGORIES, generate_classification, generate_detection, generate_keypoints,
                                        generate_voc)
from trainer.synthetic.draw import CLS_SHAPES, SHAPES

log = logging.getLogger("trainer.synthetic")  # not __main__ under `python -m`


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line instead of argparse's usage block: the message is what the user must fix.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m trainer.synthetic",
        description="Write seeded synthetic shape data sets: a COCO-layout instance-segmentation set "
        "(OUT/annotations/instances_{train,val}.json, OUT/{train,val}/*.png) and, with "
        "--classification, an ImageFolder set (OUT/classification/{train,val}/<class>/*.png).",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="non-negative; same seed, same bytes")
    p.add_argument("--train", type=int, default=600, help="detection train images (default 600)")
    p.add_argument("--val", type=int, default=100, help="detection val images (default 100)")
    p.add_argument("--size", type=int, default=64, help="square image side in pixels (default 64)")
    p.add_argument("--width", type=int, help="image width; overrides --size")
    p.add_argument("--height", type=int, help="image height; overrides --size")
    p.add_argument("--max-objects", type=int, default=6, help="objects per image are 1..N (default 6)")
    p.add_argument("--empty-prob", type=float, default=0.03, help="chance of an object-free image")
    p.add_argument("--crowd-prob", type=float, default=0.05, help="chance of an iscrowd=1 cluster")
    p.add_argument("--classification", action="store_true", help="also write the ImageFolder set")
    p.add_argument("--no-detection", action="store_true", help="skip the COCO set (with --classification)")
    p.add_argument("--cls-train", type=int, default=300, help="classification train images per class")
    p.add_argument("--cls-val", type=int, default=60, help="classification val images per class")
    p.add_argument("--cls-size", type=int, default=32, help="classification crop side (default 32)")
    p.add_argument("--cls-classes", type=int, default=len(CLS_SHAPES),
                   help=f"classification classes, 2..{len(CLS_SHAPES)} (default {len(CLS_SHAPES)})")
    p.add_argument("--cls-no-detection-shapes", action="store_true",
                   help="classification classes from the shapes the detection set does not have (at most "
                        f"{len(CLS_SHAPES) - len(SHAPES)})")
    p.add_argument("--keypoints", action="store_true",
                   help="write the person-keypoint set (person_keypoints_{train,val}.json) instead of shapes")
    p.add_argument("--voc", action="store_true",
                   help="write a Pascal VOC-layout box set (OUT/VOCdevkit/VOC2007) instead of the COCO shapes")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def _run(args: argparse.Namespace) -> str:
    """Generate what `args` asks for; return the one-line summary."""
    if args.no_detection and not (args.classification or args.keypoints or args.voc):
        raise ConfigError("--no-detection without --classification, --keypoints or --voc writes nothing")
    parts = []
    width = args.size if args.width is None else args.width
    height = args.size if args.height is None else args.height
    if args.keypoints:
        kp = generate_keypoints(args.out, seed=args.seed, num_train=args.train, num_val=args.val, width=width,
                                height=height, max_figures=min(args.max_objects, 3))
        n = sum(s["annotations"] for s in kp["splits"].values())
        parts.append(f"{args.train} train + {args.val} val keypoint images ({n} figures, 17 keypoints) "
                     f"in {kp['seconds']:.1f}s")
    if args.voc:
        voc = generate_voc(args.out, seed=args.seed, num_trainval=args.train, num_test=args.val, width=width,
                           height=height, max_objects=min(args.max_objects, 4))
        n = sum(s["objects"] for s in voc["splits"].values())
        parts.append(f"{args.train} trainval + {args.val} test VOC images ({n} objects) in {voc['root']} "
                     f"in {voc['seconds']:.1f}s (classes: data.voc_classes=[ellipse,rectangle,triangle,star])")
    if not args.no_detection and not (args.keypoints or args.voc):
        det = generate_detection(
            args.out, seed=args.seed, num_train=args.train, num_val=args.val,
            width=args.size if args.width is None else args.width,
            height=args.size if args.height is None else args.height,
            max_objects=args.max_objects, empty_prob=args.empty_prob, crowd_prob=args.crowd_prob,
        )  # fmt: skip
        train, val = det["splits"]["train"], det["splits"]["val"]
        anns = train["annotations"] + val["annotations"]
        parts.append(f"{train['images']} train + {val['images']} val detection images ({anns} annotations, "
                     f"{len(CATEGORIES)} categories) in {det['seconds']:.1f}s")  # fmt: skip
    if args.classification:
        cls = generate_classification(
            args.out, seed=args.seed, per_class_train=args.cls_train, per_class_val=args.cls_val,
            size=args.cls_size, classes=args.cls_classes, detection_shapes=not args.cls_no_detection_shapes,
        )  # fmt: skip
        parts.append(f"{args.cls_classes}x{args.cls_train} train + {args.cls_classes}x{args.cls_val} val "
                     f"classification crops in {cls['seconds']:.1f}s")  # fmt: skip
    return f"wrote {'; '.join(parts)} to {args.out}"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        log.info(_run(args))
    except TrainerError as e:
        sys.stderr.write(f"python -m trainer.synthetic: error: {e}\n")
        return 2
    except OSError as e:  # disk full, permissions: the user's environment, not a bug
        sys.stderr.write(f"python -m trainer.synthetic: error: {e}\n")
        return 1
    return 0

