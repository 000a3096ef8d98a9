"""A sweep's trials as replicates: AP curves by trial, the replicate label, and the noise floor.

The noise floor is the seed-to-seed spread of final box AP within each cell (a cell: the same init,
data, schedule and backbone; its members differ only in `replicate`, i.e. in init seed and batch
order). An effect smaller than it cannot be told from a reseed. Pure (pandas only).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd


class Curves:
    """AP curves in percent, by (trial name, metric) -> {step: value}."""

    def __init__(self, metrics: pd.DataFrame):
        ap = metrics[metrics["metric"].isin(["bbox/AP", "bbox/AP50", "bbox/AP75"])]
        self._by: dict[tuple[str, str], dict[int, float]] = {}
        for (name, metric), rows in ap.groupby(["name", "metric"]):
            self._by[(name, metric)] = {int(s): float(v) * 100 for s, v in zip(rows["step"], rows["value"])}

    def curve(self, name: str, metric: str = "bbox/AP") -> dict[int, float]:
        return self._by.get((name, metric), {})

    def final(self, name: str, metric: str = "bbox/AP") -> float | None:
        c = self.curve(name, metric)
        return c[max(c)] if c else None

    def best(self, name: str) -> float | None:
        c = self.curve(name)
        return max(c.values()) if c else None


def with_replicates(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials with a `replicate` label ("0" where the sweep has no replicate axis)."""
    if "replicate" in trials and len(trials):
        return trials.assign(replicate=trials["replicate"].replace("", "0").fillna("0").astype(str))
    return trials.assign(replicate="0")


def noise_floor(trials: pd.DataFrame, metrics: pd.DataFrame) -> dict[str, Any]:
    """Seed-to-seed spread of final box AP per cell (its finished replicates): the sweep's noise floor."""
    trials, curves = with_replicates(trials), Curves(metrics)
    done = trials[trials["status"] == "FINISHED"]
    cells = []
    for key, rows in done.groupby(["init", "data", "schedule", "backbone"], sort=True):
        finals = {f"r{r}": curves.final(n) for r, n in zip(rows["replicate"], rows["name"])}
        finals = {k: v for k, v in sorted(finals.items()) if v is not None}
        if not finals:
            continue
        n, mean = len(finals), sum(finals.values()) / len(finals)
        sd = math.sqrt(sum((v - mean) ** 2 for v in finals.values()) / (n - 1)) if n > 1 else None
        cells.append({"cell": " ".join(map(str, key)), "n": n, "final_ap": {k: _r(v) for k, v in finals.items()},
                      "mean": _r(mean), "sd": None if sd is None else _r(sd),
                      "range": _r(max(finals.values()) - min(finals.values()))})
    sds = sorted(c["sd"] for c in cells if c["sd"] is not None)
    return {"metric": "final box AP, percent", "cells": cells,
            "median_sd": sds[len(sds) // 2] if sds else None,  # the upper median of an even count
            "max_range": max((c["range"] for c in cells), default=None)}


def noise_words(noise: dict[str, Any]) -> str:
    """The noise floor in one paragraph, for the report."""
    spread = [c for c in noise["cells"] if c["n"] > 1]
    if not spread:
        return ("Noise floor: every cell has one replicate, so the seed-to-seed spread of final AP is unknown and "
                "no verdict has an interval (add grid.replicate: [0, 1, 2]).")
    cells = "; ".join(f"{c['cell']}: {', '.join(f'{v:.1f}' for v in c['final_ap'].values())} (sd {c['sd']:.1f})"
                      for c in spread)
    return (f"Noise floor (seed-to-seed spread of final box AP within a cell, its replicates): median sd "
            f"{noise['median_sd']:.1f} points, largest range {noise['max_range']:.1f}. {cells}.")


def _r(x: float) -> float:
    return round(float(x), 2)
