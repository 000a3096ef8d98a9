"""Is the spec's dataset on disk, and if the spec says how, make it (the trainer's synthetic sets).

Checked before anything is launched: a missing COCO stops `run` with where to put it. A generated
set is marked done by ROOT/.generated.json (written last, holding the generator's arguments), so an
interrupted generation is redone and a finished one never is. A root whose marker holds other
arguments is refused, never regenerated: it is another spec's data, and writing over it would change
that sweep's inputs under its spec hash.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from orchestrator.errors import DatasetMismatchError, DatasetMissingError
from orchestrator.sweep.spec import Dataset

logger = logging.getLogger(__name__)
MARKER = ".generated.json"


def missing_files(ds: Dataset, need_classification: bool = False) -> list[Path]:
    root = Path(ds.root)
    wanted = [*ds.split_files("train"), *ds.split_files("val")]
    if need_classification:
        wanted.append(root / "classification" / "train")
    return [p for p in wanted if not p.exists()]


def needs_generation(ds: Dataset, need_classification: bool = False) -> bool:
    """True if the set must be generated; raises DatasetMissingError if it is missing for good."""
    if ds.generate is not None:
        made = generated_with(Path(ds.root))
        if made is None:
            return True
        want = ds.generate.model_dump(mode="json")
        made = {**want, **made}  # a marker from before a field existed: that field at its default
        if made != want:
            differ = ", ".join(f"{k} {made.get(k)!r} (spec: {v!r})" for k, v in want.items() if made.get(k) != v)
            raise DatasetMismatchError(
                f"dataset.root {ds.root} holds a set generated with other settings ({differ}): point dataset.root "
                f"at a folder of its own (e.g. {ds.root}-seed{ds.generate.seed}), or delete the folder")
        return False
    missing = missing_files(ds, need_classification)
    if missing and ds.format == "voc":
        raise DatasetMissingError(
            f"dataset not found: {missing[0]} is missing. dataset.root must be a VOC20xx folder "
            f"(Annotations/*.xml, ImageSets/Main/{ds.train_split}.txt and {ds.val_split}.txt, JPEGImages/); "
            f"{Path(ds.root).resolve()} is not one")
    if missing:
        raise DatasetMissingError(
            f"dataset not found: {missing[0]} is missing. Put COCO 2017 at {Path(ds.root).resolve()} "
            f"(annotations/instances_{ds.train_split}.json, annotations/instances_{ds.val_split}.json, "
            f"{ds.train_split}/, {ds.val_split}/) or point dataset.root there (paper_grid.yaml reads $COCO_ROOT)")
    return False


def generated_with(root: Path) -> dict[str, Any] | None:
    """The generator arguments a finished generation under `root` recorded, or None (none finished)."""
    try:
        return json.loads((root / MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def generate(ds: Dataset) -> None:
    """Write the synthetic detection set (and classification crops) under dataset.root."""
    from trainer.synthetic.datasets import generate_classification, generate_detection

    g = ds.generate
    assert g is not None
    root = Path(ds.root)
    (root / MARKER).unlink(missing_ok=True)
    logger.info("generating the synthetic dataset in %s (%d train, %d val images of %dpx)", root, g.train, g.val,
                g.size)
    if g.keypoints:  # a model.task=keypoints sweep: person_keypoints_{train,val}.json
        from trainer.synthetic.datasets import generate_keypoints

        generate_keypoints(root, seed=g.seed, num_train=g.train, num_val=g.val, width=g.size, height=g.size)
    else:
        generate_detection(root, seed=g.seed, num_train=g.train, num_val=g.val, width=g.size, height=g.size)
    if g.classification:
        generate_classification(root, seed=g.seed, per_class_train=g.cls_train, per_class_val=g.cls_val,
                                size=g.cls_size, classes=g.cls_classes, detection_shapes=g.cls_detection_shapes)
    (root / MARKER).write_text(json.dumps(g.model_dump(mode="json")))


def check_defects(trials: list[Any]) -> None:
    """Every defect the trainer's dataset check finds (unknown ids, missing files, sizes that differ
    from the JSON, ...), found once on the driver before any trial starts, not once per trial after
    its gang was placed. The check is cached by annotation hash beside the annotation file, so each
    trial's own check is then a cache hit. Every COCO task (mask, box, keypoints) is checked the same
    way; VOC trials check their files themselves.
    """
    from trainer.data.coco import check_data, split_files
    from trainer.data.dataset_check import ALLOW_SWITCHES

    checked: set[tuple] = set()
    for trial in trials:
        cfg = trial.config
        if getattr(cfg.data, "format", "coco") != "coco":
            continue
        task = getattr(cfg.model, "task", "mask")
        key = (*(split_files(cfg.data, which, task) for which in ("train", "val")),
               *(getattr(cfg.data, name) for name in ALLOW_SWITCHES), cfg.data.cache_dir)
        if key not in checked:
            checked.add(key)
            logger.info("checking the dataset of trial %s (%s)", trial.name, key[0][0])
            check_data(cfg.data, task)  # a DatasetError: one line, exit 2, before anything trains
