"""Figures of a sweep, as pure functions of the tidy tables (`dashboards.query`): table in, Figure out.

- `ap_curves`: AP vs iterations, one panel per backbone, one curve per (init, schedule) on the full
  data (the paper's Figures 1 and 3);
- `final_bars`: final AP per (init, schedule), a panel per (task, backbone);
- `small_data_curves`: AP vs iterations, one panel per data size (the paper's Figures 7-8);
- `cost_bars` / `cost_ap`: images, instances and pixels seen, pre-training stacked under detection,
  and AP against each of them (the paper's Figure 2).

Colour is the schedule, line style the init (a body norm other than `norm` is an init of its own,
e.g. 'ImageNet pre-trained, FrozenBN body'), in every figure but `cost_ap`, whose curves of one
schedule and init differ in data and backbone too: there each trial has a colour and marker of its
own, named in the legend. AP is drawn in percent, like the paper, and all panels of one figure share
their x- and y-limits (y from 0): a panel with one short, noisy curve (a single R34 or 150-image
trial) is drawn on the same scale as its neighbours, not stretched across its axis.
matplotlib runs on the Agg backend: the report is written without a display.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from dashboards.cost import format_count  # noqa: E402

TASKS = {"bbox": "box", "segm": "mask"}
_STYLES = ["-", "--", ":", "-."]
_PANEL = (4.6, 3.4)


def schedule_order(labels: Iterable[str]) -> list[str]:
    """'1x' < '2x' < '6x' < '300it' < other labels, each group in numeric order."""
    def key(label: str) -> tuple[int, float, str]:
        m = re.fullmatch(r"([\d.]+)(x|it)", label)
        return (0 if m and m.group(2) == "x" else 1 if m else 2, float(m.group(1)) if m else 0.0, label)
    return sorted(set(labels), key=key)


def data_order(labels: Iterable[str]) -> list[str]:
    """'all' first, then image counts from large to small ('35k', '10k', '3.5k', '1k', '150')."""
    def count(label: str) -> float:
        if label == "all":
            return float("inf")
        m = re.fullmatch(r"([\d.]+)(k?)", label)
        return float(m.group(1)) * (1000 if m.group(2) else 1) if m else -1.0
    return sorted(set(labels), key=lambda lab: (-count(lab), lab))


def backbone_order(labels: Iterable[str]) -> list[str]:
    """Natural order: R18 < R34 < R50 < R101 < X152."""
    return sorted(set(labels), key=lambda lab: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", lab)])


def init_order(labels: Iterable[str]) -> list[str]:
    return sorted(set(labels), key=lambda lab: (lab != "random", lab))


def arms(trials: pd.DataFrame) -> pd.Series:
    """Per trial, its init, plus the body norm where that differs from `norm` ('imagenet|FrozenBN'):
    a FrozenBN-body trial is another arm than the GN one and never shares its line style or label."""
    return trials.apply(arm_of, axis=1) if len(trials) else trials["init"]


def arm_of(trial: pd.Series) -> str:
    body = trial.get("body_norm")
    return f"{trial['init']}|{body}" if isinstance(body, str) and body and body != trial.get("norm") else trial["init"]


class Style:
    """Colour per schedule, line style per init (and body norm), fixed for the whole report."""

    def __init__(self, trials: pd.DataFrame):
        cmap = plt.get_cmap("tab10")
        self.schedules = schedule_order(trials["schedule"])
        self.inits = init_order(arms(trials))
        self.color = {s: cmap(i % 10) for i, s in enumerate(self.schedules)}
        self.line = {v: _STYLES[i % len(_STYLES)] for i, v in enumerate(self.inits)}

    def legend(self, fig: Figure, schedules: Iterable[str], inits: Iterable[str], bars: bool = False) -> None:
        handles = [Line2D([], [], color=self.color[s], label=f"schedule {s}") for s in schedule_order(schedules)]
        if bars:  # bars tell inits apart by hatching (the first init plain)
            handles += [Patch(facecolor="white", edgecolor="0.3", hatch="//" if k else None, label=init_label(i))
                        for k, i in enumerate(init_order(inits))]
        else:
            handles += [Line2D([], [], color="0.3", linestyle=self.line[i], label=init_label(i))
                        for i in init_order(inits)]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), frameon=False,
                   fontsize="small")


def init_label(init: str) -> str:
    init, _, body = init.partition("|")
    if body:
        return f"{init_label(init)}, {body} body"
    if init == "random":
        return "random init"
    if init.startswith("pretrained:"):
        return f"pre-trained ({init.removeprefix('pretrained:')})"
    return f"pre-trained ({init})" if init != "imagenet" else "ImageNet pre-trained"


def series(metrics: pd.DataFrame, name: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    rows = metrics[(metrics["name"] == name) & (metrics["metric"] == metric)].sort_values("step")
    return rows["step"].to_numpy(), rows["value"].to_numpy(dtype=float)


def _grid(n: int, title: str) -> tuple[Figure, list]:
    cols = min(n, 3)
    rows = -(-n // cols)
    # At least two panels wide: the title and the legend below must fit even with one panel.
    fig, axes = plt.subplots(rows, cols, figsize=(_PANEL[0] * max(cols, 2), _PANEL[1] * rows + 0.9), squeeze=False,
                             layout="constrained", sharex="all", sharey="all")
    fig.suptitle(title)
    flat = list(axes.flat)
    for ax in flat:  # shared x: every panel keeps its own tick labels all the same
        ax.xaxis.set_tick_params(labelbottom=True)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def full_data(trials: pd.DataFrame) -> str:
    """The data size of the main figures: 'all' when the sweep has it, else its largest subset."""
    return data_order(trials["data"])[0]


def _draw_curves(ax, style: Style, trials: pd.DataFrame, metrics: pd.DataFrame, metric: str) -> int:
    drawn = 0
    # Longest schedules first: a shorter one follows the same path until its LR drops, so it goes on top.
    order = {s: i for i, s in enumerate(schedule_order(trials["schedule"]))}
    for _, t in trials.sort_values("schedule", key=lambda c: -c.map(order)).iterrows():
        steps, values = series(metrics, t["name"], metric)
        if len(steps):
            ax.plot(steps, values * 100, color=style.color[t["schedule"]], linestyle=style.line[arm_of(t)],
                    marker="o", markersize=3, label=t["name"])
            drawn += 1
    ax.set_xlabel("iterations")
    ax.set_ylabel(f"{TASKS[metric.split('/')[0]]} AP (%)")
    ax.grid(alpha=0.3)
    if not drawn:
        ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax.transAxes, color="0.5")
    return drawn


def _from_zero(axes: list) -> None:
    """y from 0, once every panel is drawn: the shared top then fits every panel's curves (set per
    panel while drawing, it froze at the first panel's top and cut off the later ones)."""
    for ax in axes:
        ax.set_ylim(bottom=0)


def ap_curves(trials: pd.DataFrame, metrics: pd.DataFrame, task: str) -> Figure:
    """AP vs iterations on the full data, a panel per backbone (paper Figures 1 and 3)."""
    style, data = Style(trials), full_data(trials)
    sub = trials[trials["data"] == data]
    backbones = backbone_order(sub["backbone"])
    fig, axes = _grid(len(backbones), f"{TASKS[task]} AP vs iterations: random init vs pre-trained (data: {data})")
    for ax, backbone in zip(axes, backbones):
        _draw_curves(ax, style, sub[sub["backbone"] == backbone], metrics, f"{task}/AP")
        ax.set_title(backbone)
    _from_zero(axes)
    style.legend(fig, sub["schedule"], arms(sub))
    return fig


def small_data_curves(trials: pd.DataFrame, metrics: pd.DataFrame, task: str = "bbox") -> Figure:
    """AP vs iterations, a panel per data size, on the backbone most trials with less data use."""
    style = Style(trials)
    small = trials[trials["data"] != "all"]
    backbone = (small if len(small) else trials)["backbone"].value_counts().index[0]
    sub = trials[trials["backbone"] == backbone]
    sizes = data_order(sub["data"])
    fig, axes = _grid(len(sizes), f"{TASKS[task]} AP vs iterations by training-set size ({backbone})")
    for ax, data in zip(axes, sizes):
        _draw_curves(ax, style, sub[sub["data"] == data], metrics, f"{task}/AP")
        ax.set_title(f"data: {data}" + (" images" if data != "all" else ""))
    _from_zero(axes)
    style.legend(fig, sub["schedule"], arms(sub))
    return fig


def final_bars(trials: pd.DataFrame, finals: pd.DataFrame) -> Figure:
    """Final box and mask AP per (init, schedule) on the full data: rows task, columns backbone."""
    style, data = Style(trials), full_data(trials)
    sub = trials[trials["data"] == data].merge(finals, on="name", how="left")
    backbones = backbone_order(sub["backbone"])
    fig, grid = plt.subplots(2, len(backbones), figsize=(_PANEL[0] * max(len(backbones), 2), 2 * _PANEL[1] + 0.9),
                             squeeze=False, layout="constrained", sharey="all")
    fig.suptitle(f"final AP per (init, schedule) (data: {data})")
    sub = sub.assign(arm=arms(sub))
    inits = init_order(sub["arm"])
    width = 0.8 / max(len(inits), 1)
    for col, backbone in enumerate(backbones):
        rows = sub[sub["backbone"] == backbone]
        scheds = schedule_order(rows["schedule"])
        for r, task in enumerate(TASKS):
            ax = grid[r][col]
            for i, init in enumerate(inits):
                for j, sched in enumerate(scheds):
                    hit = rows[(rows["arm"] == init) & (rows["schedule"] == sched)].dropna(subset=[f"{task}/AP"])
                    if hit.empty:
                        continue
                    x, y = j + (i - (len(inits) - 1) / 2) * width, float(hit[f"{task}/AP"].iloc[0]) * 100
                    done = hit["status"].iloc[0] == "FINISHED"  # an unfinished trial's last AP is not final
                    ax.bar(x, y, width, color=style.color[sched], hatch="//" if i else None, edgecolor="0.2",
                           alpha=1.0 if done else 0.4)
                    ax.annotate(f"{y:.1f}" + ("" if done else " (unfinished)"), (x, y), ha="center", va="bottom",
                                fontsize="x-small")
            ax.set_xticks(range(len(scheds)), [f"schedule {s}" for s in scheds])
            ax.set_ylabel(f"final {TASKS[task]} AP (%)")
            ax.set_xlabel("schedule")
            ax.set_title(f"{backbone}: {TASKS[task]} AP")
            ax.grid(axis="y", alpha=0.3)
    style.legend(fig, sub["schedule"], sub["arm"], bars=True)
    return fig


def cost_bars(cost: pd.DataFrame) -> Figure:
    """Samples seen per trial (paper Figure 2): pre-training stacked under detection training."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.45 * len(cost) + 2.2), layout="constrained", sharey=True)
    fig.suptitle("samples seen per trial: pre-training (hatched) + detection training "
                 "(labels: pre-training + detection)")
    y = np.arange(len(cost))
    for ax, kind in zip(axes, ("images", "instances", "pixels")):
        pre = cost[f"pretrain_{kind}"].fillna(0).to_numpy(float)
        det = cost[f"detection_{kind}"].fillna(0).to_numpy(float)
        ax.barh(y, pre, color="0.75", hatch="//", edgecolor="0.3", label="pre-training")
        ax.barh(y, det, left=pre, color="tab:blue", label="detection training")
        # The parts can differ by orders of magnitude (ImageNet vs a short schedule): say both in text.
        for yi, p, d in zip(y, pre, det):
            ax.annotate(f"{format_count(p)} + {format_count(d)}", (0.01, yi), va="center", fontsize="x-small",
                        xycoords=("axes fraction", "data"),
                        bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none", "pad": 1})
        ax.set_xlabel(f"{kind} seen")
        ax.set_yticks(y, cost["name"])
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_ylabel("trial")
    axes[0].invert_yaxis()
    axes[0].legend(fontsize="small")
    return fig


def cost_ap(trials: pd.DataFrame, metrics: pd.DataFrame, cost: pd.DataFrame, task: str = "bbox") -> Figure:
    """AP against images / instances / pixels seen, pre-training included (log axis)."""
    style, looks = Style(trials), trial_looks(trials["name"])
    fig, axes = plt.subplots(1, 3, figsize=(15, _PANEL[1] + 1.0 + 0.25 * -(-len(trials) // 4)), layout="constrained",
                             sharey=True)
    fig.suptitle(f"{TASKS[task]} AP against samples seen (pre-training included)")
    pre = cost.set_index("name")
    for ax, kind in zip(axes, ("images", "instances", "pixels")):
        for _, t in trials.iterrows():
            steps, ap = series(metrics, t["name"], f"{task}/AP")
            s_steps, seen = series(metrics, t["name"], f"seen/{kind}")
            offset = pre.at[t["name"], f"pretrain_{kind}"] if t["name"] in pre.index else None
            if not len(steps) or not len(s_steps) or offset is None or pd.isna(offset):
                continue
            # seen/* comes as its latest point (dashboards.query): the count at each eval step, from 0 to it.
            x = np.interp(steps, np.concatenate([[0], s_steps]), np.concatenate([[0.0], seen])) + offset
            color, marker = looks[t["name"]]
            ax.plot(x, ap * 100, color=color, linestyle=style.line[arm_of(t)], marker=marker, markersize=4,
                    label=t["name"])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short ranges
        ax.set_xlabel(f"{kind} seen (log scale)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(f"{TASKS[task]} AP (%)")
    handles = [Line2D([], [], color=looks[t["name"]][0], marker=looks[t["name"]][1], linestyle=style.line[arm_of(t)],
                      label=t["name"]) for _, t in trials.iterrows()]
    handles += [Line2D([], [], color="0.3", linestyle=style.line[i], label=init_label(i))
                for i in init_order(arms(trials))]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), frameon=False,
               fontsize="small")
    return fig


def trial_looks(names: Iterable[str]) -> dict[str, tuple[Any, str]]:
    """(colour, marker) per trial, no two alike: tab20's colours, then its markers again in a new cycle."""
    cmap, markers = plt.get_cmap("tab20"), "osD^vP*Xph"
    return {name: (cmap(i % 20), markers[(i // 20 + i) % len(markers)]) for i, name in enumerate(names)}


def curve_count(fig: Figure) -> int:
    """Data curves drawn in a figure (legend handles are not on any axes)."""
    return sum(len(ax.get_lines()) for ax in fig.axes)
