"""What the MLflow runs say about themselves, in words and summary values; pure (no MLflow, no Ray).

`tracking` writes these: the sweep's parent run gets `sweep_params` (spec hash, each axis's values,
counts) and `sweep_note` as its description (`mlflow.note.content`, which the UI shows on the run's
page); each trial's run gets `trial_note` and its training set as `dataset_input` (for `log_input`);
`final_metrics` turns a finished trial's final_metrics.json into the parent's `final/<trial>/bbox_AP`
summary metrics, one per trial and task, so the parent's row in the runs table shows every result.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from orchestrator.worker.task import read_plans

FINAL_KEYS = ("bbox/AP", "segm/AP", "keypoints/AP", "voc/mAP")  # the summary metrics a trial can have


def sweep_params(record: Mapping[str, Any]) -> dict[str, str]:
    """The sweep's identity and shape: spec hash, each axis's values, how many trials, trunks, jobs; --sets."""
    trials = _trials(record)
    axes: dict[str, list[str]] = {}
    for t in trials:
        for axis, label in t.axes.items():
            if label not in axes.setdefault(axis, []):
                axes[axis].append(label)
    params = {"spec_hash": record["spec_hash"], "trials": str(len(trials)),
              "trunks": str(len(record.get("trunks", []))), "pretrain_jobs": str(len(record.get("pretrain", []))),
              "iterations": str(sum(t.total for t in trials))}
    params.update({f"axis.{a}": ", ".join(values) for a, values in axes.items()})
    if record.get("sets"):  # the command line's --set overrides, part of the sweep as much as its spec
        params["set"] = "; ".join(record["sets"])
    return params


def sweep_note(record: Mapping[str, Any]) -> str:
    """The parent run's description (Markdown): what the sweep is and how its runs are named."""
    trials = _trials(record)
    varied = [a for a in trials[0].axes if len({t.axes[a] for t in trials}) > 1] if trials else []
    lines = [f"Sweep **{record['name']}** (spec hash `{record['spec_hash'][:12]}`): {len(trials)} trials of "
             f"Mask R-CNN, varying {', '.join(varied) or 'nothing'}.",
             "",
             "Each trial's run is named init-data-schedule-backbone and carries its axes as `axis.*` tags; "
             "its final box / mask AP is also this run's metric `final/<trial>/bbox_AP` (`segm_AP`).",
             "The paper's claims are judged by `python -m orchestrator report` (added below when run)."]
    return "\n".join(lines)


def _trials(record: Mapping[str, Any]) -> list[Any]:
    """The record's trials (no trunks), as `orchestrator.worker.task.TaskPlan`s of any record version."""
    return [t for t in read_plans(dict(record)) if t.role != "trunk"]


def claims_note(note: str, verdicts: Mapping[str, Mapping[str, Any]]) -> str:
    """`note` with its claims section replaced by the report's verdicts (one line per claim)."""
    head = note.split("\n\n## Claims", 1)[0]
    lines = [f"- **{key}** {c.get('claim', '')}: **{c['verdict']}**" + (f" ({c['reason']})" if c.get("reason") else "")
             for key, c in verdicts.items()]
    return head + "\n\n## Claims (from the report)\n" + "\n".join(lines)


def trial_note(name: str, axes: Mapping[str, str], params: Mapping[str, Any]) -> str:
    """One paragraph a reader of the run page understands without the config."""
    images = params.get("data.train_images", "all")
    data = "all training images" if images in ("all", None) else f"a seeded subset of {images} training images"
    iters = params.get("schedule.iters") or _times(params.get("schedule.length"), params.get("schedule.iters_per_x"))
    root = Path(str(params.get("data.root", "?"))).name
    extra = {a: v for a, v in axes.items() if a not in ("init", "data", "schedule", "backbone")}
    text = (f"Trial **{name}**: Mask R-CNN with a {params.get('model.backbone', axes.get('backbone', '?'))} "
            f"backbone ({params.get('model.norm', '?')} norm), {_init_words(axes.get('init', '?'))}, trained on "
            f"{data} of `{root}/{params.get('data.train_split', '?')}` for schedule {axes.get('schedule', '?')} "
            f"({iters} iterations at batch {params.get('optim.batch_size', '?')}, base LR "
            f"{params.get('optim.base_lr', '?')}), evaluated on `{root}/{params.get('data.val_split', '?')}`.")
    if extra:
        text += " Other axes: " + ", ".join(f"{k} = {v}" for k, v in extra.items()) + "."
    return text


def _init_words(init: str) -> str:
    if init == "random":
        return "random init (trained from scratch)"
    if init == "imagenet":
        return "ImageNet pre-trained init"
    return f"initialised from the sweep's pretrain job {init.removeprefix('pretrained:')}"


def _times(length: Any, per_x: Any) -> str:
    try:
        return str(round(float(str(length).rstrip("x")) * int(per_x)))
    except (TypeError, ValueError):
        return "?"


def dataset_input(params: Mapping[str, Any]) -> dict[str, str]:
    """The trial's training set for `log_input`: name, digest (annotation file bytes + subset), source, profile."""
    root = Path(str(params.get("data.root", "")))
    split = str(params.get("data.train_split", "train"))
    ann = Path(str(params["data.train_json"])) if params.get("data.train_json") else \
        root / "annotations" / f"instances_{split}.json"
    images = params.get("data.train_images", "all")
    seed = params.get("data.subset_seed", 0)
    digest = hashlib.sha256(f"{_file_digest(str(ann))}:{images}:{seed}".encode()).hexdigest()[:16]
    profile = {"train_images": images, "subset_seed": seed, "annotation_file": ann.name}
    return {"name": f"{root.name}/{split}" + ("" if images in ("all", None) else f"[{images}]"),
            "digest": digest, "source": ann.as_uri() if ann.is_absolute() else str(ann),
            "profile": json.dumps(profile)}


@lru_cache(maxsize=16)
def _file_digest(path: str) -> str:
    """sha256 of the annotation file's bytes, once per file per driver (COCO's train file is 450 MB: ~1 s)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    except OSError:
        return "missing"
    return digest.hexdigest()


def final_metrics(trial: str, final: Mapping[str, Any]) -> dict[str, float]:
    """final_metrics.json -> the parent's summary metrics `final/<trial>/bbox_AP` (COCO's -1 left out)."""
    out = {}
    for key in FINAL_KEYS:
        value = final.get(key)
        if isinstance(value, (int, float)) and value >= 0:
            out[f"final/{trial}/{key.replace('/', '_')}"] = float(value)
    return out
