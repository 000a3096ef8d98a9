"""The paper's four findings, judged on one sweep's own trials by rules fixed here (`claims.json`).

- C1 pre-training speeds up early convergence;
- C2 random init catches up given a longer schedule;
- C3 with enough data pre-training does not help, with little data random init falls behind;
- C4 random init gains more on AP75 than on AP50 relative to pre-trained (localisation).

Every verdict is `holds`, `does not hold` or `not measurable` (the sweep lacks the cells). The rules
and their thresholds below were fixed before any sweep was judged and are the same for every sweep;
`RULES` states them in words, and the report prints them beside each verdict. A "pair" is one
random-init trial and one pre-trained trial (any pre-trained init: ImageNet or a pretrain job of the
sweep) of the same backbone, data size and schedule. AP is box AP in percent, as in the paper. Final
numbers come only from FINISHED trials; C1 also reads an unfinished trial's early evaluations.
Pure (pandas only): table in, verdicts out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from dashboards.figures import data_order, full_data
from dashboards.paper import PaperNumber, paper_numbers

HOLDS, FAILS, NOT_MEASURABLE = "holds", "does not hold", "not measurable"
VERDICTS = (HOLDS, FAILS, NOT_MEASURABLE)

# Thresholds, in AP points (percent). Chosen from the paper's own effect sizes, before judging.
C1_MIN_LEAD = 1.0  # C1: mean lead of pre-trained over random at the early evaluations of a pair
TOL_POINTS = 1.0  # "comparable": within max(TOL_POINTS, TOL_FRACTION x the pre-trained AP)
TOL_FRACTION = 0.10
# C4: random's relative gain on AP75 must exceed its relative gain on AP50 by this fraction (the paper:
# +2.2% vs +0.2% for R50, +1.7% vs +0.5% for R101). Relative, because AP75 < AP50: an absolute
# difference would favour whichever init is behind.
C4_MARGIN = 0.01
EARLY_FRACTION = 1 / 3  # C1: "early" = evaluations in the first third of the schedule (at least one)

TITLES = {
    "C1": "Pre-training speeds up early convergence",
    "C2": "Random init catches up given a longer schedule",
    "C3": "Pre-training does not help with enough data; with little data random init falls behind",
    "C4": "Random init gains more on AP75 than on AP50 relative to pre-trained (localisation)",
}
RULES = {
    "C1": (f"On the sweep's largest data size, in every pair that has a common evaluation, take the common "
           f"evaluations in the first {EARLY_FRACTION:.0%} of the schedule (at least the first one). Holds if "
           f"in every pair the pre-trained trial is ahead in box AP at each of them and by at least "
           f"{C1_MIN_LEAD:.1f} AP points on average; does not hold otherwise."),
    "C2": (f"On the largest data size, per (backbone, pre-trained init) with finished pairs at two or more "
           f"schedules, gap = pre-trained minus random final box AP. Holds if in every such cell the gap at "
           f"the shortest schedule is positive, the gap at the longest is smaller than at the shortest, and "
           f"the gap at the longest is at most the tolerance max({TOL_POINTS:.1f} points, "
           f"{TOL_FRACTION:.0%} of the pre-trained AP); does not hold otherwise."),
    "C3": (f"Per (backbone, pre-trained init) with finished trials of both inits at two or more data sizes, "
           f"take each (data, init)'s best box AP over all its evaluations and schedules (the paper reports "
           f"the best point of each curve). Holds if at the largest size the gap (pre-trained minus random) "
           f"is at most the tolerance max({TOL_POINTS:.1f} points, {TOL_FRACTION:.0%} of the pre-trained AP) "
           f"and at the smallest size it exceeds that size's tolerance; does not hold otherwise."),
    "C4": (f"On the largest data size, for each (backbone, pre-trained init), the finished pair at the longest "
           f"schedule both inits have: gain50 = random / pre-trained box AP50 - 1, gain75 = the same for AP75. "
           f"Holds if gain75 - gain50 >= {C4_MARGIN:.0%} in every such pair; does not hold otherwise."),
}


@dataclass
class Claim:
    key: str
    verdict: str
    reason: str  # one sentence: why this verdict
    numbers: list[dict[str, Any]] = field(default_factory=list)  # the sweep's numbers behind the verdict
    paper: list[dict[str, Any]] = field(default_factory=list)  # the paper's values for the same claim
    lines: list[str] = field(default_factory=list)  # `numbers` in words, for the report

    @property
    def title(self) -> str:
        return TITLES[self.key]

    @property
    def rule(self) -> str:
        return RULES[self.key]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("key")
        out.update(claim=self.title, rule=self.rule, unit="box AP, percent (points)",
                   thresholds=thresholds())
        return out


def thresholds() -> dict[str, float]:
    return {"C1_min_lead": C1_MIN_LEAD, "tolerance_points": TOL_POINTS, "tolerance_fraction": TOL_FRACTION,
            "C4_margin": C4_MARGIN, "early_fraction": round(EARLY_FRACTION, 4)}


def judge(trials: pd.DataFrame, metrics: pd.DataFrame, numbers: list[PaperNumber] | None = None) -> dict[str, Claim]:
    """C1..C4 for a sweep's tidy tables (`dashboards.query.load_sweep`)."""
    numbers = paper_numbers() if numbers is None else numbers
    curves = _Curves(metrics)
    out = {"C1": c1(trials, curves), "C2": c2(trials, curves), "C3": c3(trials, curves), "C4": c4(trials, curves)}
    for key, claim in out.items():
        claim.paper = paper_values(key, numbers)
    return out


def to_json(claims: dict[str, Claim]) -> dict[str, Any]:
    return {key: claim.to_json() for key, claim in claims.items()}


# ------------------------------------------------------------------------------------ the tables


class _Curves:
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


def _pairs(trials: pd.DataFrame, finished: bool) -> list[tuple[pd.Series, pd.Series]]:
    """(random, pre-trained) trials of the same backbone, data and schedule, in a stable order."""
    rows = trials[trials["status"] == "FINISHED"] if finished else trials
    rnd = rows[rows["init_kind"] == "random"]
    pre = rows[rows["init_kind"] == "pretrained"]
    out = []
    for _, p in pre.sort_values(["backbone", "data", "init", "schedule"]).iterrows():
        hit = rnd[(rnd["backbone"] == p["backbone"]) & (rnd["data"] == p["data"]) & (rnd["schedule"] == p["schedule"])]
        out.extend((r, p) for _, r in hit.iterrows())
    return out


def _cell(p: pd.Series, *keys: str) -> str:
    return " ".join(str(p[k]) for k in keys)


def _length(t: pd.Series) -> float:
    """A schedule's length in iterations, for ordering (its label when the length is unknown)."""
    return float(t["total_iters"]) if pd.notna(t["total_iters"]) else float("inf")


def tolerance(pretrained_ap: float) -> float:
    return max(TOL_POINTS, TOL_FRACTION * pretrained_ap)


def _r(x: float) -> float:
    return round(float(x), 2)


def _all(oks: list[bool], noun: str) -> str:
    return f"the one {noun}" if len(oks) == 1 else f"all {len(oks)} {noun}s"


def _verdict(key: str, oks: list[bool], none_reason: str, ok_reason: str, fail_reason: str) -> Claim:
    if not oks:
        return Claim(key, NOT_MEASURABLE, none_reason)
    return Claim(key, HOLDS, ok_reason) if all(oks) else Claim(key, FAILS, fail_reason)


# ------------------------------------------------------------------------------------ the claims


def c1(trials: pd.DataFrame, curves: _Curves) -> Claim:
    data = full_data(trials) if len(trials) else None
    numbers, lines, oks = [], [], []
    for r, p in _pairs(trials[trials["data"] == data], finished=False):
        cr, cp = curves.curve(r["name"]), curves.curve(p["name"])
        common = sorted(set(cr) & set(cp))
        if not common:
            continue
        total = min(_length(r), _length(p))
        early = [s for s in common if s <= max(common[0], EARLY_FRACTION * total)]
        leads = [cp[s] - cr[s] for s in early]
        mean = sum(leads) / len(leads)
        ok = all(d > 0 for d in leads) and mean >= C1_MIN_LEAD
        oks.append(ok)
        numbers.append({"cell": _cell(p, "backbone", "data", "schedule"), "random": r["name"], "pretrained": p["name"],
                        "steps": early, "random_ap": [_r(cr[s]) for s in early],
                        "pretrained_ap": [_r(cp[s]) for s in early], "lead": [_r(d) for d in leads],
                        "mean_lead": _r(mean), "ok": ok})
        at = ", ".join(f"it {s}: {cp[s]:.1f} vs {cr[s]:.1f}" for s in early)
        lines.append(f"{_cell(p, 'backbone', 'data', 'schedule')} ({p['init']}): pre-trained vs random {at}; "
                     f"mean lead {mean:+.1f}")
    claim = _verdict("C1", oks, "no (random, pre-trained) pair on the largest data size has a common evaluation",
                     f"pre-trained ahead early in {_all(oks, 'pair')}",
                     f"pre-trained not ahead early (by >= {C1_MIN_LEAD:.1f} on average) in "
                     f"{oks.count(False)} of {len(oks)} pairs")
    claim.numbers, claim.lines = numbers, lines
    return claim


def _final_gaps(trials: pd.DataFrame, curves: _Curves) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """Finished pairs grouped by (backbone, data, pre-trained init): final AP of each, by schedule."""
    out: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r, p in _pairs(trials, finished=True):
        fr, fp = curves.final(r["name"]), curves.final(p["name"])
        if fr is None or fp is None:
            continue
        out.setdefault((p["backbone"], p["data"], p["init"]), []).append(
            {"schedule": p["schedule"], "iters": _length(p), "random": r["name"], "pretrained": p["name"],
             "random_ap": fr, "pretrained_ap": fp, "gap": fp - fr,
             **{f"{who}_ap{m}": curves.final(t["name"], f"bbox/AP{m}") for who, t in (("random", r), ("pretrained", p))
                for m in (50, 75)}})
    for rows in out.values():
        rows.sort(key=lambda g: g["iters"])
    return out


def c2(trials: pd.DataFrame, curves: _Curves) -> Claim:
    data = full_data(trials) if len(trials) else None
    numbers, lines, oks = [], [], []
    for (backbone, d, init), rows in _final_gaps(trials[trials["data"] == data], curves).items():
        if len({g["schedule"] for g in rows}) < 2:
            continue
        short, long = rows[0], rows[-1]
        tol = tolerance(long["pretrained_ap"])
        ok = short["gap"] > 0 and long["gap"] < short["gap"] and long["gap"] <= tol
        oks.append(ok)
        numbers.append({"cell": f"{backbone} {d}", "pretrained_init": init, "tolerance": _r(tol), "ok": ok,
                        "by_schedule": [{"schedule": g["schedule"], "random_ap": _r(g["random_ap"]),
                                         "pretrained_ap": _r(g["pretrained_ap"]), "gap": _r(g["gap"])} for g in rows]})
        gaps = ", ".join(f"{g['schedule']}: {g['pretrained_ap']:.1f} vs {g['random_ap']:.1f} ({g['gap']:+.1f})"
                         for g in rows)
        lines.append(f"{backbone} {d} ({init}): final pre-trained vs random {gaps}; tolerance {tol:.1f}")
    claim = _verdict("C2", oks, "no cell on the largest data size has finished pairs at two or more schedules",
                     f"the gap closes to within tolerance in {_all(oks, 'cell')}",
                     f"the gap does not close to within tolerance in {oks.count(False)} of {len(oks)} cells")
    claim.numbers, claim.lines = numbers, lines
    return claim


def c3(trials: pd.DataFrame, curves: _Curves) -> Claim:
    done = trials[trials["status"] == "FINISHED"]
    numbers, lines, oks = [], [], []
    for (backbone, init), pre in done[done["init_kind"] == "pretrained"].groupby(["backbone", "init"]):
        rnd = done[(done["init_kind"] == "random") & (done["backbone"] == backbone)]
        sizes = [d for d in data_order(pre["data"]) if d in set(rnd["data"])]
        best = {}
        for d in sizes:
            bp = [b for b in map(curves.best, pre[pre["data"] == d]["name"]) if b is not None]
            br = [b for b in map(curves.best, rnd[rnd["data"] == d]["name"]) if b is not None]
            if bp and br:
                best[d] = (max(bp), max(br))
        if len(best) < 2:
            continue
        large, small = list(best)[0], list(best)[-1]
        by_data = [{"data": d, "pretrained_ap": _r(p), "random_ap": _r(r), "gap": _r(p - r),
                    "tolerance": _r(tolerance(p))} for d, (p, r) in best.items()]
        ok = (best[large][0] - best[large][1] <= tolerance(best[large][0])
              and best[small][0] - best[small][1] > tolerance(best[small][0]))
        oks.append(ok)
        numbers.append({"cell": backbone, "pretrained_init": init, "by_data": by_data, "ok": ok})
        lines.append(f"{backbone} ({init}): best pre-trained vs random " + ", ".join(
            f"{g['data']}: {g['pretrained_ap']:.1f} vs {g['random_ap']:.1f} ({g['gap']:+.1f}, tol {g['tolerance']:.1f})"
            for g in by_data))
    claim = _verdict("C3", oks, "no backbone has finished trials of both inits at two or more data sizes",
                     f"comparable with the most data, random behind with the least, in {_all(oks, 'cell')}",
                     f"not so in {oks.count(False)} of {len(oks)} cells")
    claim.numbers, claim.lines = numbers, lines
    return claim


def c4(trials: pd.DataFrame, curves: _Curves) -> Claim:
    data = full_data(trials) if len(trials) else None
    numbers, lines, oks = [], [], []
    for (backbone, d, init), rows in _final_gaps(trials[trials["data"] == data], curves).items():
        g = rows[-1]
        if any(not g[k] for k in ("random_ap50", "pretrained_ap50", "random_ap75", "pretrained_ap75")):
            continue  # missing, or zero: no relative gain
        g50 = relative_gain(g["random_ap50"], g["pretrained_ap50"])
        g75 = relative_gain(g["random_ap75"], g["pretrained_ap75"])
        ok = g75 - g50 >= C4_MARGIN
        oks.append(ok)
        numbers.append({"cell": f"{backbone} {d} {g['schedule']}", "pretrained_init": init,
                        "random_ap50": _r(g["random_ap50"]), "pretrained_ap50": _r(g["pretrained_ap50"]),
                        "random_ap75": _r(g["random_ap75"]), "pretrained_ap75": _r(g["pretrained_ap75"]),
                        "gain50": round(g50, 4), "gain75": round(g75, 4), "ok": ok})
        lines.append(f"{backbone} {d} {g['schedule']} ({init}): random vs pre-trained AP50 {g['random_ap50']:.1f} vs "
                     f"{g['pretrained_ap50']:.1f} ({g50:+.1%}), AP75 {g['random_ap75']:.1f} vs "
                     f"{g['pretrained_ap75']:.1f} ({g75:+.1%})")
    claim = _verdict("C4", oks, "no finished pair on the largest data size reports AP50 and AP75",
                     f"random gains more on AP75 than on AP50 in {_all(oks, 'pair')}",
                     f"not by {C4_MARGIN:.0%} in {oks.count(False)} of {len(oks)} pairs")
    claim.numbers, claim.lines = numbers, lines
    return claim


def relative_gain(random_ap: float, pretrained_ap: float) -> float:
    """Random init's AP relative to pre-trained's, minus one (+0.02: random 2% higher)."""
    return random_ap / pretrained_ap - 1


# ------------------------------------------------------------------------------------ the paper


def paper_values(key: str, numbers: list[PaperNumber]) -> list[dict[str, Any]]:
    """The paper's numbers behind a claim, from `paper_results.yaml` (pre-trained vs random, percent)."""
    def pick(source: str, **match: str) -> dict[tuple[str, ...], float]:
        out = {}
        for n in numbers:
            if n.source == source and all(getattr(n, k) == v for k, v in match.items()):
                out[(n.backbone, n.init, n.schedule, n.data, n.task, n.metric)] = n.value
        return out

    rows: list[dict[str, Any]] = []
    if key in ("C1", "C2"):
        t1 = pick("Table 1")
        for (backbone, init, sched, *_), value in t1.items():
            if init == "pretrained":
                rnd = t1[(backbone, "random", sched, "all", "bbox", "AP")]
                rows.append({"source": "Table 1", "cell": f"{backbone} all {sched}", "pretrained_ap": value,
                             "random_ap": rnd, "gap": _r(value - rnd)})
        if key == "C1":  # the paper's earliest tabulated schedule; Figure 1 shows the lead from the start
            rows = [r for r in rows if r["cell"].endswith(" 2x")]
    elif key == "C3":
        s52 = pick("Section 5.2 (Figures 7-8)")
        for (backbone, init, _, data, *_), value in s52.items():
            if init == "pretrained":
                rnd = s52[(backbone, "random", "any", data, "bbox", "AP")]
                rows.append({"source": "Section 5.2", "cell": f"{backbone} {data}", "pretrained_ap": value,
                             "random_ap": rnd, "gap": _r(value - rnd)})
    elif key == "C4":
        t2 = pick("Table 2", task="bbox")
        for backbone in sorted({k[0] for k in t2}, key=len):
            v = {(i, m): val for (b, i, _, _, _, m), val in t2.items() if b == backbone}
            rows.append({"source": "Table 2", "cell": f"{backbone} all (best schedule)",
                         **{f"{i}_ap{m}": v[(i, f"AP{m}")] for i in ("random", "pretrained") for m in (50, 75)},
                         "gain50": round(relative_gain(v[("random", "AP50")], v[("pretrained", "AP50")]), 4),
                         "gain75": round(relative_gain(v[("random", "AP75")], v[("pretrained", "AP75")]), 4)})
    return rows


def paper_lines(claim: Claim) -> list[str]:
    """The paper's values in words, for the report."""
    out = []
    for row in claim.paper:
        if "gain75" in row:
            out.append(f"{row['source']}, {row['cell']}: random vs pre-trained AP50 {row['random_ap50']:.1f} vs "
                       f"{row['pretrained_ap50']:.1f} ({row['gain50']:+.1%}), AP75 {row['random_ap75']:.1f} vs "
                       f"{row['pretrained_ap75']:.1f} ({row['gain75']:+.1%})")
        else:
            out.append(f"{row['source']}, {row['cell']}: pre-trained {row['pretrained_ap']:.1f} vs random "
                       f"{row['random_ap']:.1f} ({row['gap']:+.1f})")
    return out
