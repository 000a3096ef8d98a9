"""The paper's four findings, judged on one sweep's own trials by rules fixed here (`claims.json`).

- C1 pre-training speeds up early convergence;
- C2 random init catches up given a longer schedule;
- C3 with enough data pre-training does not help, with little data random init falls behind;
- C4 random init gains more on AP75 than on AP50 relative to pre-trained (localisation).

A "pair" is one random-init trial and one pre-trained trial (any pre-trained init: ImageNet or a
pretrain job of the sweep) of the same backbone, data size, schedule and replicate: the two share
their data, batch order and evaluation set, so each rule's statistic is computed per replicate on its
pair and judged over the replicates with a 95% t-interval (`dashboards.uncertainty`). Every verdict is
`holds` (every condition's interval on the claim's side of its threshold), `does not hold` (some
interval wholly on the other side), `inconclusive` (an interval straddles its threshold), `single
run: no interval` (one replicate: never conclusive) or `not measurable` (the sweep lacks the cells).
The rules and thresholds below were fixed before any sweep was judged and are the same for every
sweep; `RULES` states them in words, and the report prints them beside each verdict. AP is box AP in
percent, as in the paper. Final numbers come only from FINISHED trials; C1 also reads an unfinished
trial's early evaluations. Pure (pandas only): tables in, verdicts out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from dashboards.figures import data_order, full_data
from dashboards.paper import PaperNumber, paper_numbers
from dashboards.replicates import Curves, with_replicates
from dashboards.uncertainty import (FAILS, HOLDS, INCONCLUSIVE, METHOD, NOT_MEASURABLE, SINGLE, Condition, combine,
                                    failing)

VERDICTS = (HOLDS, FAILS, INCONCLUSIVE, SINGLE, NOT_MEASURABLE)

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
_EACH = ("Each statistic is computed per replicate on its pair and judged by its 95% interval over the "
         "replicates (paired t-interval): holds if every interval lies on the claim's side, does not hold if "
         "one lies wholly on the other side, inconclusive otherwise; one replicate: single run, no interval.")
RULES = {
    "C1": (f"On the sweep's largest data size, per pair with a common evaluation, the lead = pre-trained minus "
           f"random box AP averaged over the common evaluations in the first {EARLY_FRACTION:.0%} of the "
           f"schedule (at least the first one). Needs lead > {C1_MIN_LEAD:.1f} AP points in every cell. " + _EACH),
    "C2": (f"On the largest data size, per (backbone, pre-trained init) with finished pairs at two or more "
           f"schedules, gap = pre-trained minus random final box AP. Needs, in every such cell: the gap at the "
           f"shortest schedule > 0; the gap's change from the shortest to the longest < 0 (it closes); the gap "
           f"at the longest minus its tolerance max({TOL_POINTS:.1f} points, {TOL_FRACTION:.0%} of the "
           f"pre-trained AP) < 0. " + _EACH),
    "C3": (f"Per (backbone, pre-trained init) with finished trials of both inits at two or more data sizes, "
           f"each (data, init)'s best box AP over its evaluations and schedules (the paper reports the best "
           f"point of each curve). Needs the gap (pre-trained minus random) minus the tolerance "
           f"max({TOL_POINTS:.1f} points, {TOL_FRACTION:.0%} of the pre-trained AP) < 0 at the largest size "
           f"and > 0 at the smallest. " + _EACH),
    "C4": (f"On the largest data size, for each (backbone, pre-trained init), the finished pair at the longest "
           f"schedule both inits have: gain50 = random / pre-trained box AP50 - 1, gain75 = the same for AP75. "
           f"Needs gain75 - gain50 > {C4_MARGIN:.0%} in every such cell. " + _EACH),
}


@dataclass
class Claim:
    key: str
    verdict: str
    reason: str  # one sentence: why this verdict, naming the condition that decided it
    numbers: list[dict[str, Any]] = field(default_factory=list)  # the sweep's numbers behind the verdict
    paper: list[dict[str, Any]] = field(default_factory=list)  # the paper's values for the same claim
    lines: list[str] = field(default_factory=list)  # `numbers` in words, for the report
    conditions: list[dict[str, Any]] = field(default_factory=list)  # per condition: per-replicate values, interval, N

    @property
    def title(self) -> str:
        return TITLES[self.key]

    @property
    def rule(self) -> str:
        return RULES[self.key]

    @property
    def n(self) -> int:
        """Replicates behind the verdict: the fewest any of its conditions had (0: not measurable)."""
        return min((c["n"] for c in self.conditions), default=0)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("key")
        out.update(claim=self.title, rule=self.rule, unit="box AP, percent (points)", n=self.n,
                   interval=METHOD, thresholds=thresholds())
        return out


def thresholds() -> dict[str, float]:
    return {"C1_min_lead": C1_MIN_LEAD, "tolerance_points": TOL_POINTS, "tolerance_fraction": TOL_FRACTION,
            "C4_margin": C4_MARGIN, "early_fraction": round(EARLY_FRACTION, 4)}


def judge(trials: pd.DataFrame, metrics: pd.DataFrame, numbers: list[PaperNumber] | None = None) -> dict[str, Claim]:
    """C1..C4 for a sweep's tidy tables (`dashboards.query.load_sweep`)."""
    numbers = paper_numbers() if numbers is None else numbers
    trials = with_replicates(trials)
    curves = Curves(metrics)
    out = {"C1": c1(trials, curves), "C2": c2(trials, curves), "C3": c3(trials, curves), "C4": c4(trials, curves)}
    for key, claim in out.items():
        claim.paper = paper_values(key, numbers)
    return out


def to_json(claims: dict[str, Claim], noise: dict[str, Any] | None = None) -> dict[str, Any]:
    """claims.json: one entry per claim, and the sweep's noise floor (`noise_floor`) when given."""
    out: dict[str, Any] = {key: claim.to_json() for key, claim in claims.items()}
    if noise is not None:
        out["noise_floor"] = noise
    return out


# ------------------------------------------------------------------------------------ the tables


def _pairs(trials: pd.DataFrame, finished: bool) -> list[tuple[pd.Series, pd.Series]]:
    """(random, pre-trained) trials of the same backbone, data, schedule and replicate, in a stable order."""
    rows = trials[trials["status"] == "FINISHED"] if finished else trials
    rnd = rows[rows["init_kind"] == "random"]
    pre = rows[rows["init_kind"] == "pretrained"]
    out = []
    for _, p in pre.sort_values(["backbone", "data", "init", "schedule", "replicate"]).iterrows():
        hit = rnd[(rnd["backbone"] == p["backbone"]) & (rnd["data"] == p["data"]) & (rnd["schedule"] == p["schedule"])
                  & (rnd["replicate"] == p["replicate"])]
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


def _rep(t: pd.Series) -> str:
    return f"r{t['replicate']}"


def _verdict(key: str, conditions: list[Condition], none_reason: str, ok_reason: str) -> Claim:
    """The claim's verdict from its conditions, and a reason naming the condition(s) that decided it."""
    verdict = combine([c.verdict for c in conditions])
    if verdict == NOT_MEASURABLE:
        return Claim(key, verdict, none_reason)
    deciding = failing(conditions)
    if verdict == HOLDS:
        reason = f"{ok_reason}: every interval lies on the claim's side (N={min(c.interval.n for c in conditions)})"
    elif verdict == FAILS:
        reason = "; ".join(f"{c.failure}: {c.words()}" for c in deciding)
    elif verdict == INCONCLUSIVE:
        reason = "the interval straddles the threshold: " + "; ".join(c.words() for c in deciding)
    else:
        reason = ("single run: no interval (one replicate per pair; add replicates to judge it); point values: "
                  + "; ".join(c.words() for c in deciding))
    return Claim(key, verdict, reason, conditions=[c.to_json() for c in conditions])


def _values_line(cond: Condition) -> str:
    per = ", ".join(f"{k} {v:+.1f}" for k, v in cond.values.items())
    return f"{cond.what}: {per}; {cond.interval.words()} (needs {'>' if cond.above else '<'} {cond.threshold:+.1f}): " \
           f"{cond.verdict}"


# ------------------------------------------------------------------------------------ the claims


def c1(trials: pd.DataFrame, curves: Curves) -> Claim:
    data = full_data(trials) if len(trials) else None
    leads: dict[tuple[str, str], dict[str, float]] = {}
    numbers: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r, p in _pairs(trials[trials["data"] == data], finished=False):
        cr, cp = curves.curve(r["name"]), curves.curve(p["name"])
        common = sorted(set(cr) & set(cp))
        if not common:
            continue
        total = min(_length(r), _length(p))
        early = [s for s in common if s <= max(common[0], EARLY_FRACTION * total)]
        lead = [cp[s] - cr[s] for s in early]
        cell = (_cell(p, "backbone", "data", "schedule"), p["init"])
        leads.setdefault(cell, {})[_rep(p)] = sum(lead) / len(lead)
        numbers.setdefault(cell, []).append(
            {"replicate": _rep(p), "random": r["name"], "pretrained": p["name"], "steps": early,
             "random_ap": [_r(cr[s]) for s in early], "pretrained_ap": [_r(cp[s]) for s in early],
             "lead": [_r(d) for d in lead], "mean_lead": _r(sum(lead) / len(lead))})
    conds = [Condition(f"{cell} ({init}): early lead", values, C1_MIN_LEAD, True,
                       f"pre-trained not ahead early by > {C1_MIN_LEAD:.1f}")
             for (cell, init), values in leads.items()]
    claim = _verdict("C1", conds, "no (random, pre-trained) pair on the largest data size has a common evaluation",
                     f"pre-trained ahead early by > {C1_MIN_LEAD:.1f} in {_all(len(conds), 'cell')}")
    claim.numbers = [{"cell": cell, "pretrained_init": init, "pairs": rows} for (cell, init), rows in numbers.items()]
    claim.lines = [_values_line(c) for c in conds]
    return claim


def _final_gaps(trials: pd.DataFrame, curves: Curves) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """Finished pairs grouped by (backbone, data, pre-trained init): final AP of each, by schedule and replicate."""
    out: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r, p in _pairs(trials, finished=True):
        fr, fp = curves.final(r["name"]), curves.final(p["name"])
        if fr is None or fp is None:
            continue
        out.setdefault((p["backbone"], p["data"], p["init"]), []).append(
            {"schedule": p["schedule"], "iters": _length(p), "replicate": _rep(p), "random": r["name"],
             "pretrained": p["name"], "random_ap": fr, "pretrained_ap": fp, "gap": fp - fr,
             **{f"{who}_ap{m}": curves.final(t["name"], f"bbox/AP{m}") for who, t in (("random", r), ("pretrained", p))
                for m in (50, 75)}})
    for rows in out.values():
        rows.sort(key=lambda g: (g["iters"], g["replicate"]))
    return out


def _by_replicate(rows: list[dict[str, Any]], schedule: str) -> dict[str, dict[str, Any]]:
    return {g["replicate"]: g for g in rows if g["schedule"] == schedule}


def _gap_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"schedule": g["schedule"], "replicate": g["replicate"], "random_ap": _r(g["random_ap"]),
             "pretrained_ap": _r(g["pretrained_ap"]), "gap": _r(g["gap"])} for g in rows]


def c2(trials: pd.DataFrame, curves: Curves) -> Claim:
    data = full_data(trials) if len(trials) else None
    conds: list[Condition] = []
    numbers = []
    for (backbone, d, init), rows in _final_gaps(trials[trials["data"] == data], curves).items():
        short, long = rows[0]["schedule"], rows[-1]["schedule"]
        if short == long:
            continue
        a, b = _by_replicate(rows, short), _by_replicate(rows, long)
        reps = sorted(set(a) & set(b))
        if not reps:
            continue
        cell = f"{backbone} {d} ({init})"
        conds += [
            Condition(f"{cell}: gap at {short}", {k: a[k]["gap"] for k in reps}, 0.0, True,
                      f"pre-trained not ahead at {short}"),
            Condition(f"{cell}: change of the gap {short} -> {long}", {k: b[k]["gap"] - a[k]["gap"] for k in reps},
                      0.0, False, f"the gap grew from {short} to {long}"),
            Condition(f"{cell}: gap at {long} minus tolerance",
                      {k: b[k]["gap"] - tolerance(b[k]["pretrained_ap"]) for k in reps}, 0.0, False,
                      f"the gap at {long} stays above the tolerance")]
        numbers.append({"cell": f"{backbone} {d}", "pretrained_init": init, "by_schedule": _gap_rows(rows),
                        "tolerance": {k: _r(tolerance(b[k]["pretrained_ap"])) for k in reps}})
    claim = _verdict("C2", conds, "no cell on the largest data size has finished pairs at two or more schedules",
                     f"the gap is positive at the shortest schedule and closes to within tolerance at the longest "
                     f"in {_all(len(conds) // 3, 'cell')}")
    claim.numbers, claim.lines = numbers, [_values_line(c) for c in conds]
    return claim


def _best_by_size(pre: pd.DataFrame, rnd: pd.DataFrame, curves: Curves) -> dict[str, dict[Any, tuple[float, float]]]:
    """replicate -> {data size (largest first): (pre-trained best, random best)}, sizes both inits have."""
    out: dict[str, dict[Any, tuple[float, float]]] = {}
    for rep in sorted(set(pre["replicate"]) & set(rnd["replicate"])):
        p, r = pre[pre["replicate"] == rep], rnd[rnd["replicate"] == rep]
        for d in data_order(p["data"]):
            bp = [b for b in map(curves.best, p[p["data"] == d]["name"]) if b is not None]
            br = [b for b in map(curves.best, r[r["data"] == d]["name"]) if b is not None]
            if bp and br:
                out.setdefault(f"r{rep}", {})[d] = (max(bp), max(br))
    return {k: v for k, v in out.items() if len(v) >= 2}


def c3(trials: pd.DataFrame, curves: Curves) -> Claim:
    done = trials[trials["status"] == "FINISHED"]
    conds: list[Condition] = []
    numbers = []
    for (backbone, init), pre in done[done["init_kind"] == "pretrained"].groupby(["backbone", "init"]):
        rnd = done[(done["init_kind"] == "random") & (done["backbone"] == backbone)]
        best = _best_by_size(pre, rnd, curves)
        if not best:
            continue
        large = {k: list(v.items())[0] for k, v in best.items()}
        small = {k: list(v.items())[-1] for k, v in best.items()}
        cell = f"{backbone} ({init})"
        conds += [
            Condition(f"{cell}: gap minus tolerance with the most data",
                      {k: p - r - tolerance(p) for k, (_, (p, r)) in large.items()}, 0.0, False,
                      "pre-trained ahead by more than the tolerance with the most data"),
            Condition(f"{cell}: gap minus tolerance with the least data",
                      {k: p - r - tolerance(p) for k, (_, (p, r)) in small.items()}, 0.0, True,
                      "random not behind by more than the tolerance with the least data")]
        numbers.append({"cell": backbone, "pretrained_init": init, "by_replicate": {
            k: [{"data": d, "pretrained_ap": _r(p), "random_ap": _r(r), "gap": _r(p - r), "tolerance": _r(tolerance(p))}
                for d, (p, r) in v.items()] for k, v in best.items()}})
    claim = _verdict("C3", conds, "no backbone has finished trials of both inits at two or more data sizes",
                     f"comparable with the most data, random behind with the least, in {_all(len(conds) // 2, 'cell')}")
    claim.numbers, claim.lines = numbers, [_values_line(c) for c in conds]
    return claim


def c4(trials: pd.DataFrame, curves: Curves) -> Claim:
    data = full_data(trials) if len(trials) else None
    conds: list[Condition] = []
    numbers = []
    for (backbone, d, init), rows in _final_gaps(trials[trials["data"] == data], curves).items():
        longest = rows[-1]["schedule"]
        pairs = [g for g in rows if g["schedule"] == longest
                 and all(g[k] for k in ("random_ap50", "pretrained_ap50", "random_ap75", "pretrained_ap75"))]
        if not pairs:
            continue  # missing, or zero: no relative gain
        gains = {g["replicate"]: (relative_gain(g["random_ap50"], g["pretrained_ap50"]),
                                  relative_gain(g["random_ap75"], g["pretrained_ap75"])) for g in pairs}
        conds.append(Condition(f"{backbone} {d} {longest} ({init}): gain75 - gain50",
                               {k: g75 - g50 for k, (g50, g75) in gains.items()}, C4_MARGIN, True,
                               f"random does not gain more on AP75 than on AP50 by {C4_MARGIN:.0%}"))
        numbers.append({"cell": f"{backbone} {d} {longest}", "pretrained_init": init, "pairs": [
            {"replicate": g["replicate"], **{k: _r(g[k]) for k in ("random_ap50", "pretrained_ap50", "random_ap75",
                                                                    "pretrained_ap75")},
             "gain50": round(gains[g["replicate"]][0], 4), "gain75": round(gains[g["replicate"]][1], 4)}
            for g in pairs]})
    claim = _verdict("C4", conds, "no finished pair on the largest data size reports AP50 and AP75",
                     f"random gains more on AP75 than on AP50 in {_all(len(conds), 'cell')}")
    claim.numbers = numbers
    claim.lines = [f"{c.what}: " + ", ".join(f"{k} {v:+.1%}" for k, v in c.values.items()) +
                   f"; {c.interval.words()} (needs > {C4_MARGIN:+.2f}): {c.verdict}" for c in conds]
    return claim


def _all(n: int, noun: str) -> str:
    return f"the one {noun}" if n == 1 else f"all {n} {noun}s"


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
