"""The paper's published numbers (`paper_results.yaml`) as flat records, and which trial each matches.

A record is one number with the table or section it comes from. A trial matches a record when its
backbone, init kind (random / pretrained), data size, schedule, task and metric are the record's, its
ResNet body ran GN (as both of the paper's arms did), and the record is of the paper's standard recipe; records in other settings (train aug, cascade, other
datasets) are listed in the report but never matched. Pure: no MLflow, no plotting.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import yaml

PAPER_FILE = Path(__file__).with_name("paper_results.yaml")
STANDARD = "standard"
_FIELDS = ("backbone", "init", "data", "task", "setting")
# The body norm of every number the paper reports in its standard setting (both arms: GN, fine-tuned
# with GN). A trial whose body ran something else (FrozenBN with torchvision's BN weights) is not
# that experiment and is never placed in these cells.
PAPER_BODY_NORM = "GN"


@dataclass(frozen=True)
class PaperNumber:
    source: str  # the paper's table or section
    what: str
    setting: str
    backbone: str
    init: str  # random | pretrained
    schedules: tuple[str, ...]  # ("any",) when the paper names no schedule
    data: str
    task: str  # bbox | segm | keypoints
    metric: str  # AP, AP50, AP75, mAP
    value: float  # percent
    note: str = ""

    @property
    def schedule(self) -> str:
        return "/".join(self.schedules)


@lru_cache(maxsize=4)
def load_paper(path: Path = PAPER_FILE) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


def paper_numbers(path: Path = PAPER_FILE) -> list[PaperNumber]:
    """Every number of the file, in its order."""
    out: list[PaperNumber] = []
    for group in load_paper(path)["groups"]:
        out.extend(_group_numbers(group))
    return out


def _group_numbers(group: dict[str, Any]) -> Iterator[PaperNumber]:
    by = list(group["by"])
    for keys, metrics in _walk(group["values"], by):
        fields = {f: str(group.get(f, "")) for f in _FIELDS + ("schedule",)}
        fields.update(keys)
        schedules = _schedules(group, fields)
        note = str(group.get("notes", {}).get(fields.get("data", ""), "")) if "notes" in group else ""
        note = "; ".join(filter(None, [note, group.get("schedule_note", ""), group.get("backbone_note", "")]))
        for metric, value in metrics.items():
            yield PaperNumber(source=group["source"], what=group["what"], setting=fields["setting"] or STANDARD,
                              backbone=fields["backbone"], init=fields["init"], schedules=schedules,
                              data=fields["data"], task=fields["task"], metric=str(metric), value=float(value),
                              note=note)


def _walk(node: dict[str, Any], by: list[str], keys: dict[str, str] | None = None):
    keys = keys or {}
    if not by:
        yield keys, node
        return
    for label, child in node.items():
        yield from _walk(child, by[1:], {**keys, by[0]: str(label)})


def _schedules(group: dict[str, Any], fields: dict[str, str]) -> tuple[str, ...]:
    if "schedules" in group:  # Table 2: per (backbone, init), read from Table 1
        return tuple(group["schedules"][fields["backbone"]][fields["init"]])
    return (fields["schedule"] or "any",)


def accounting(path: Path = PAPER_FILE) -> dict[str, Any]:
    return load_paper(path)["accounting"]


def init_kind(init: str) -> str:
    """random | pretrained (ImageNet, a sweep's pretrain job or a checkpoint) for an `axis.init` value."""
    return "random" if init in ("random", "") else "pretrained"


def matches(number: PaperNumber, *, backbone: str, init: str, data: str, schedule: str, task: str,
            metric: str, body_norm: str = PAPER_BODY_NORM) -> bool:
    """Whether a trial's final `task/metric` is the cell this paper number reports."""
    return (number.setting == STANDARD and body_norm == PAPER_BODY_NORM and number.backbone == backbone and number.init == init_kind(init)
            and number.data == data and number.task == task and number.metric == metric
            and (number.schedules == ("any",) or schedule in number.schedules))


def paper_for(numbers: list[PaperNumber], **trial: str) -> list[PaperNumber]:
    """The paper numbers a trial's cell is compared with (usually none or one)."""
    return [n for n in numbers if matches(n, **trial)]
