"""The keypoint and Pascal VOC parts of a sweep report (trials with `model.task` keypoints or box on VOC).

Owns the trajectories of `keypoints/AP` and `voc/mAP` (one panel per backbone, colour per schedule,
line style per init, as every other figure) and the table of the paper's keypoint (Figure 6) and
VOC (Section 5) numbers beside the trials that report those metrics. Those paper numbers are in
settings of their own (COCO person keypoints with R50-FPN; VOC with R101-FPN), so a trial is listed
against a number by init kind alone, with its own backbone, data and schedule shown next to the
paper's: the comparison is of the gap between inits, not of absolute values. Nothing is drawn or
listed for a sweep without these metrics. Pure functions of the tidy tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from dashboards import figures as F
from dashboards import html as H
from dashboards.paper import PaperNumber, init_kind, paper_numbers

# metric key -> (what it is, the paper setting it is compared with, the paper's metric name)
TASK_METRICS = {
    "keypoints/AP": ("keypoint AP (COCO OKS)", "keypoints", "AP"),
    "voc/mAP": ("VOC07 mAP@0.5, 11-point", "PASCAL VOC", "mAP"),
}
# The paper's VOC numbers are on val2012, scored by the VOC2010+ rule (area under the precision
# envelope), so they are compared with voc/mAP_area; the curves show the VOC07 11-point voc/mAP.
PAPER_KEY = {"keypoints/AP": "keypoints/AP", "voc/mAP": "voc/mAP_area"}


def present(metrics: pd.DataFrame) -> list[str]:
    """The keypoint and VOC metrics some trial of the sweep has logged."""
    logged = set(metrics["metric"]) if len(metrics) else set()
    return [k for k in TASK_METRICS if k in logged]


def curves(trials: pd.DataFrame, metrics: pd.DataFrame, key: str) -> Figure:
    """`key` vs iterations, a panel per backbone, every trial that logged it."""
    names = set(metrics.loc[metrics["metric"] == key, "name"])
    sub = trials[trials["name"].isin(names)]
    style = F.Style(trials)
    backbones = F.backbone_order(sub["backbone"]) or ["-"]
    fig, axes = F._grid(len(backbones), f"{TASK_METRICS[key][0]} vs iterations: random init vs pre-trained")
    for ax, backbone in zip(axes, backbones):
        for _, t in sub[sub["backbone"] == backbone].iterrows():
            steps, values = F.series(metrics, t["name"], key)
            ax.plot(steps, values * 100, color=style.color[t["schedule"]], linestyle=style.line[t["init"]],
                    marker="o", markersize=3, label=t["name"])
        ax.set_title(f"{backbone} (data: {', '.join(sorted(set(sub['data'])))})")
        ax.set_xlabel("iterations")
        ax.set_ylabel(f"{key} (%)")
        ax.grid(alpha=0.3)
    style.legend(fig, sub["schedule"], sub["init"])
    return fig


def final_values(metrics: pd.DataFrame, key: str) -> dict[str, float]:
    rows = metrics[metrics["metric"] == key].sort_values("step").groupby("name").tail(1)
    return {r["name"]: float(r["value"]) for _, r in rows.iterrows()}


def paper_rows(trials: pd.DataFrame, metrics: pd.DataFrame, numbers: list[PaperNumber]) -> list[list[str]]:
    """HTML table rows: each keypoint / VOC paper number with the trials of the same init kind."""
    rows = []
    for key, (_, setting, metric) in TASK_METRICS.items():
        finals = final_values(metrics, PAPER_KEY[key])
        for n in (n for n in numbers if n.setting == setting and n.metric == metric):
            hits = [t for _, t in trials.iterrows() if t["name"] in finals and init_kind(t["init"]) == n.init]
            paper_cell = f"{n.backbone}, {n.data}, {n.schedule}"
            if not hits:
                rows.append([H.esc(n.source), H.esc(n.init), H.esc(paper_cell), H.num(n.value),
                             '<span class="na">no trial of this sweep</span>', "", H.num(None), ""])
            for t in hits:
                ours = finals[t["name"]] * 100 if finals[t["name"]] >= 0 else None
                rows.append([H.esc(n.source), H.esc(n.init), H.esc(paper_cell), H.num(n.value), H.esc(t["name"]),
                             H.esc(f"{t['backbone']}, {t['data']}, {t['schedule']}"), H.num(ours),
                             H.diff(None if ours is None else ours - n.value)])
    return rows


def draw_figures(trials: pd.DataFrame, metrics: pd.DataFrame, folder: Path) -> dict[str, Path]:
    out = {}
    for key in present(metrics):
        fig = curves(trials, metrics, key)
        path = folder / f"task_{key.replace('/', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out[key] = path
    return out


def sections(trials: pd.DataFrame, metrics: pd.DataFrame, figs: dict[str, Any]) -> list[str]:
    """The report's keypoint / VOC section (empty for a sweep without those metrics)."""
    keys = [k for k in present(metrics) if k in figs]
    if not keys:
        return []
    parts = ["<h2 id='tasks'>Keypoints and Pascal VOC</h2>"]
    parts += [H.figure(figs[k], f"{TASK_METRICS[k][0]} vs iterations (paper Figure 6 for keypoints)") for k in keys]
    parts.append("<p>The paper's keypoint and VOC numbers beside this sweep's trials of the same init kind. Their "
                 "settings differ (backbone, data, schedule shown for both), so compare the gap between inits, "
                 "not absolute values. VOC rows use voc/mAP_area (the VOC2010+ rule of the paper's val2012).</p>")
    headers = ["source", "init", "paper setting", "paper", "trial (ours)", "our setting", "ours", "&Delta;"]
    parts.append(H.table(headers, paper_rows(trials, metrics, paper_numbers())))
    return parts
