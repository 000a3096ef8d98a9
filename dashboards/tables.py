"""The report's tables from the tidy tables: final AP per trial, the paper comparison, cost, what is missing.

Pure (pandas only). AP is stored by the trainer on pycocotools' scale ([0, 1], -1 = no objects of
that size) and shown in percent, like the paper.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dashboards.cost import KINDS, pretrain_seen
from dashboards.paper import PaperNumber, paper_for

AP_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
TASKS = ("bbox", "segm")


def finals(trials: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """Per trial: the last value of every AP and seen/* metric, the last evaluated step and last step."""
    rows = []
    for name in trials["name"]:
        mine = metrics[metrics["name"] == name]
        last = mine.sort_values("step").groupby("metric").tail(1).set_index("metric")
        row: dict[str, Any] = {"name": name}
        row.update({m: float(v) for m, v in last["value"].items()})
        evals = mine[mine["metric"].isin(["bbox/AP", "segm/AP"])]
        row["eval_step"] = int(evals["step"].max()) if len(evals) else None
        row["last_step"] = int(mine["step"].max()) if len(mine) else 0
        rows.append(row)
    cols = ["name", "eval_step", "last_step"] + [f"{t}/{m}" for t in TASKS for m in AP_METRICS] + \
           [f"seen/{k}" for k in KINDS]
    return pd.DataFrame(rows).reindex(columns=cols)


def percent(value: Any) -> float | None:
    """pycocotools value -> percent; None for missing or -1 (no objects of that size)."""
    if value is None or pd.isna(value) or float(value) < 0:
        return None
    return float(value) * 100


def comparison(trials: pd.DataFrame, fin: pd.DataFrame, numbers: list[PaperNumber]) -> list[dict[str, Any]]:
    """Every paper number with the trials that report its cell, our value and the difference."""
    merged = trials.merge(fin, on="name", how="left")
    out = []
    for n in numbers:
        hits = []
        for _, t in merged.iterrows():
            if paper_for([n], backbone=t["backbone"], init=t["init"], data=t["data"], schedule=t["schedule"],
                         task=n.task, metric=n.metric, body_norm=body_norm(t)):
                ours = percent(t.get(f"{n.task}/{n.metric}"))
                hits.append({"trial": t["name"], "ours": ours, "diff": None if ours is None else ours - n.value})
        out.append({"number": n, "trials": hits})
    return out


def trial_cells(trials: pd.DataFrame, fin: pd.DataFrame, numbers: list[PaperNumber]) -> list[dict[str, Any]]:
    """Per trial: each AP cell in percent with the paper numbers of that cell (possibly none)."""
    merged = trials.merge(fin, on="name", how="left")
    rows = []
    for _, t in merged.iterrows():
        cells = {}
        for task in TASKS:
            for metric in AP_METRICS:
                ours = percent(t.get(f"{task}/{metric}"))
                paper = paper_for(numbers, backbone=t["backbone"], init=t["init"], data=t["data"],
                                  schedule=t["schedule"], task=task, metric=metric, body_norm=body_norm(t))
                cells[f"{task}/{metric}"] = {"ours": ours, "paper": paper,
                                             "na": _is_na(t.get(f"{task}/{metric}"))}
        rows.append({"trial": t, "cells": cells})
    return rows


def body_norm(trial: Any) -> str:
    """A trial row's body norm ('GN' for rows without the column: the paper's recipe, the default)."""
    value = trial.get("body_norm") if hasattr(trial, "get") else None
    return "GN" if value is None or (isinstance(value, float) and np.isnan(value)) or value == "" else str(value)


def _is_na(value: Any) -> bool:
    return value is not None and not pd.isna(value) and float(value) < 0


def cost_table(trials: pd.DataFrame, fin: pd.DataFrame, sweep_dir: Path | None) -> pd.DataFrame:
    """Per trial: pre-training, detection and total images / instances / pixels seen, and final AP."""
    merged = trials.merge(fin, on="name", how="left")
    rows = []
    for _, t in merged.iterrows():
        pre, source = pretrain_seen(t["init"], t["model_init"], sweep_dir)
        row: dict[str, Any] = {"name": t["name"], "init": t["init"], "pretrain_source": source,
                               "bbox/AP": percent(t.get("bbox/AP")), "segm/AP": percent(t.get("segm/AP"))}
        for kind in KINDS:
            det = t.get(f"seen/{kind}")
            det = None if det is None or pd.isna(det) else float(det)
            row[f"pretrain_{kind}"] = pre.get(kind)
            row[f"detection_{kind}"] = det
            row[f"total_{kind}"] = None if det is None or pre.get(kind) is None else det + pre.get(kind)
        rows.append(row)
    return pd.DataFrame(rows)


def missing(trials: pd.DataFrame, fin: pd.DataFrame, cost: pd.DataFrame) -> list[str]:
    """One line per thing the report lacks: unfinished trials, trials without evaluation, counts."""
    merged = trials.merge(fin, on="name", how="left")
    lines = []
    for _, t in merged.iterrows():
        total = t["total_iters"]
        at = f"at iteration {int(t['last_step'] or 0)}" + (f" of {int(total)}" if _num(total) else "")
        reasons = [f"{t['status'].lower()} {at}; its numbers are not final"] if t["status"] != "FINISHED" else []
        if not _num(t.get("eval_step")):
            reasons.append("no evaluation logged yet (no AP)")
        if not _num(t.get("seen/images")):
            reasons.append("no samples-seen counts logged (seen/*)")
        if reasons:
            lines.append(f"{t['name']}: " + "; ".join(reasons))
    for _, c in cost.iterrows():
        if c["pretrain_images"] is None or pd.isna(c["pretrain_images"]):
            lines.append(f"{c['name']}: pre-training counts for init {c['init']} {c['pretrain_source']}")
    return lines


def _num(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value))
