"""The claims' verdict rules (C1..C4) on MLflow stores written through the orchestrator's real tracker,
with replicates: a clear effect holds, a clear reverse effect does not hold, an effect inside the
seed noise is inconclusive, one replicate is a single run; intervals against a hand computation; a
sweep without a pre-trained arm, one that can judge only part; and the report's claims.json (per-replicate
values, interval, N, the noise floor), its MLflow tags and the collapsed paper table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import pytest

from dashboards import claims as C
from dashboards.query import SweepTarget, load_sweep
from dashboards.report import build_report

ITERS_PER_X = 20
EVAL = 10
T_975_2 = 4.302653  # Student t, 97.5th percentile, 2 degrees of freedom (printed tables): N = 3

# (init, data, schedule) -> box AP curve in [0, 1] of the iteration; AP50/AP75 are fixed multiples.
Curve = Callable[[int], float]


def _rise(ceiling: float, tau: float) -> Curve:
    return lambda step: ceiling * (1 - math.exp(-step / tau))


def _shift(curve: Curve, points: float) -> Curve:
    return lambda step: curve(step) + points / 100


def replicated(arms: dict[tuple[str, str, str], tuple[Curve, float]], shared: list[float],
               own: dict[str, list[float]] | None = None) -> dict[tuple[str, str, str, int], tuple[Curve, float]]:
    """Each arm once per replicate r, moved by shared[r] AP points (the seed's effect on both inits: a
    paired statistic cancels it) plus own[init][r] (this init's own seed noise)."""
    own = own or {}
    return {(init, data, sched, r): (_shift(curve, s + own.get(init, [0.0] * len(shared))[r]), ratio)
            for (init, data, sched), (curve, ratio) in arms.items() for r, s in enumerate(shared)}


def write_sweep(tmp: Path, name: str, arms: dict[tuple, tuple[Curve, float]],
                unfinished: tuple[str, ...] = ()) -> SweepTarget:
    """One child run per arm ((init, data, schedule) or with a replicate index last, tagged
    axis.replicate), `bbox/AP` every EVAL iterations and at the end; AP75 = AP x the arm's ratio,
    AP50 = AP x 1.5. Names in `unfinished` stop at half their schedule, RUNNING."""
    from orchestrator.tracking.mlflow_runs import SweepTracker

    uri = f"sqlite:///{tmp / (name + '.db')}"
    tracker = SweepTracker(uri, name, "hash", "test")
    tracker.open_parent()
    for k, (arm, (curve, ap75_ratio)) in enumerate(arms.items()):
        init, data, sched, *rep = arm
        trial = f"{init}-{data}-{sched}-R18" + "".join(f"-r{r}" for r in rep)
        total = int(sched.rstrip("x")) * ITERS_PER_X
        params = {"model.init": init, "schedule.length": sched, "schedule.iters_per_x": ITERS_PER_X,
                  "schedule.iters": None, "runtime.seed": rep[0] if rep else 0}
        axes = {"init": init, "data": data, "schedule": sched, "backbone": "R18",
                **({"replicate": str(rep[0])} if rep else {})}
        run_id = tracker.child_run(f"t{k}", trial, axes, params)
        log = tracker.metric_logger(run_id)
        last = total // 2 if trial in unfinished else total
        for step in range(EVAL, last + 1, EVAL):
            ap = curve(step)
            log.log(step, {"bbox/AP": ap, "bbox/AP50": ap * 1.5, "bbox/AP75": ap * ap75_ratio,
                           "segm/AP": ap * 0.9, "seen/images": step * 4.0, "train/loss": 2.0 - ap})
        tracker.set_status(run_id, "RUNNING" if trial in unfinished else "FINISHED")
    tracker.finish("FINISHED")
    return SweepTarget(name, uri)


def hand_interval(values: list[float]) -> tuple[float, float]:
    """mean +- t(0.975, 2) x sd / sqrt(3), sd with n - 1: the interval the claims must report for N = 3."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean - T_975_2 * sd / math.sqrt(n), mean + T_975_2 * sd / math.sqrt(n)


PRE = "pretrained:cls"
# Pre-trained rises fast and random slowly to the same ceiling on all the data; with 150 images
# random stays low. Random's boxes are tighter (AP75 = 1.2 x AP vs 1.1 x AP).
PAPER_LIKE = {
    ("random", "all", "1x"): (_rise(0.40, 20.0), 1.2), (PRE, "all", "1x"): (_rise(0.40, 5.0), 1.1),
    ("random", "all", "3x"): (_rise(0.40, 20.0), 1.2), (PRE, "all", "3x"): (_rise(0.40, 5.0), 1.1),
    ("random", "150", "1x"): (_rise(0.10, 20.0), 1.2), (PRE, "150", "1x"): (_rise(0.25, 5.0), 1.1),
}


SHARED = [0.0, 1.5, -1.2]  # the seed moves both inits of a replicate by up to 1.5 AP points
OWN = {PRE: [0.0, 0.2, -0.1]}  # and pre-trained by a little more of its own


def _judge(target: SweepTarget) -> dict[str, C.Claim]:
    sweep = load_sweep(target)
    return C.judge(sweep.trials, sweep.metrics)


def _condition(claim: C.Claim, what: str) -> dict:
    return next(c for c in claim.conditions if what in c["what"])


def test_a_clear_effect_holds(tmp_path):
    claims = _judge(write_sweep(tmp_path, "like", replicated(PAPER_LIKE, SHARED, OWN)))
    assert {k: c.verdict for k, c in claims.items()} == {k: C.HOLDS for k in ("C1", "C2", "C3", "C4")}
    assert all(c.n == 3 for c in claims.values())
    # 1x = 20 iterations: the first third holds no evaluation, so the first one (10) is "early";
    # 3x = 60: evaluations 10 and 20.
    c1 = claims["C1"].numbers
    assert [(n["cell"], n["pairs"][0]["steps"]) for n in c1] == [("R18 all 1x", [10]), ("R18 all 3x", [10, 20])]
    lead = 40 * (math.exp(-10 / 20) - math.exp(-10 / 5))
    leads = [lead + d for d in OWN[PRE]]  # the shared shift cancels in the pair
    early = _condition(claims["C1"], "R18 all 1x")
    assert list(early["per_replicate"].values()) == pytest.approx(leads, abs=0.01)
    assert early["n"] == 3 and early["interval"] == pytest.approx(hand_interval(leads), abs=0.01)
    gap_1x = 40 * (math.exp(-20 / 20) - math.exp(-20 / 5))
    gap_3x = 40 * (math.exp(-60 / 20) - math.exp(-60 / 5))
    grew = _condition(claims["C2"], "change of the gap 1x -> 3x")
    assert list(grew["per_replicate"].values()) == pytest.approx([gap_3x - gap_1x] * 3, abs=0.01)
    assert claims["C2"].numbers[0]["tolerance"]["r0"] == pytest.approx(4.0, abs=0.01)  # 10% of ~40 AP
    c3 = claims["C3"].numbers[0]["by_replicate"]["r1"]
    assert [g["data"] for g in c3] == ["all", "150"] and c3[1]["gap"] > c3[1]["tolerance"]
    c4 = claims["C4"].numbers[0]
    assert c4["cell"] == "R18 all 3x" and [p["replicate"] for p in c4["pairs"]] == ["r0", "r1", "r2"]
    # The paper's values sit beside ours.
    assert {"source": "Table 1", "cell": "R50 all 2x", "pretrained_ap": 40.3, "random_ap": 36.8, "gap": 3.5} in \
        claims["C1"].paper
    assert any(p["cell"] == "R50 1k" and p["gap"] == pytest.approx(6.4) for p in claims["C3"].paper)
    r50 = [p for p in claims["C4"].paper if p["cell"].startswith("R50")][0]
    assert r50["gain50"] == pytest.approx(61.8 / 61.7 - 1, abs=1e-4)
    assert r50["gain75"] == pytest.approx(45.6 / 44.6 - 1, abs=1e-4)
    # The rule's margin is met by the paper's own numbers, for both backbones.
    assert all(p["gain75"] - p["gain50"] >= C.C4_MARGIN for p in claims["C4"].paper)


def test_a_clear_reverse_effect_does_not_hold(tmp_path):
    # Random init ahead everywhere, and with the same box shape (AP75/AP ratio) as pre-trained.
    arms = {
        ("random", "all", "1x"): (_rise(0.40, 5.0), 1.1), (PRE, "all", "1x"): (_rise(0.30, 20.0), 1.1),
        ("random", "all", "3x"): (_rise(0.40, 5.0), 1.1), (PRE, "all", "3x"): (_rise(0.30, 20.0), 1.1),
        ("random", "150", "1x"): (_rise(0.30, 5.0), 1.1), (PRE, "150", "1x"): (_rise(0.25, 20.0), 1.1),
    }
    claims = _judge(write_sweep(tmp_path, "opposite", replicated(arms, SHARED, OWN)))
    assert {k: c.verdict for k, c in claims.items()} == {k: C.FAILS for k in ("C1", "C2", "C3", "C4")}
    assert claims["C1"].reason.startswith("pre-trained not ahead early by > 1.0: R18 all 1x")
    assert "pre-trained not ahead at 1x" in claims["C2"].reason


def test_an_effect_inside_the_noise_is_inconclusive(tmp_path):
    """Pre-trained leads by +3.0, -1.0 and +1.5 points in the three replicates: mean +1.17 against the
    1.0 threshold, an interval from about -3.9 to +6.2."""
    flat = (lambda s: 0.10 + s / 1000, 1.1)
    leads = [3.0, -1.0, 1.5]
    arms = replicated({("random", "all", "1x"): flat, (PRE, "all", "1x"): flat}, [0.0, 0.8, -0.5], {PRE: leads})
    claim = _judge(write_sweep(tmp_path, "noise", arms))["C1"]
    assert claim.verdict == C.INCONCLUSIVE and claim.n == 3
    low, high = hand_interval(leads)
    assert (low, high) == pytest.approx((-3.853, 6.187), abs=1e-3)  # by hand: 7/6 -+ 4.3027 x 2.0207 / sqrt(3)
    assert claim.conditions[0]["interval"] == pytest.approx([low, high], abs=0.01)
    assert claim.conditions[0]["mean"] == pytest.approx(7 / 6, abs=0.01)
    assert "straddles the threshold" in claim.reason and "N=3" in claim.reason


def test_one_replicate_is_a_single_run(tmp_path):
    claims = _judge(write_sweep(tmp_path, "single", PAPER_LIKE))  # no replicate axis: replicate 0 only
    assert {k: c.verdict for k, c in claims.items()} == {k: C.SINGLE for k in ("C1", "C2", "C3", "C4")}
    assert C.SINGLE == "single run: no interval"
    assert all(c.n == 1 and c.reason.startswith("single run: no interval") for c in claims.values())
    assert all(cond["interval"] is None for c in claims.values() for cond in c.conditions)


def test_c2_names_the_condition_that_failed(tmp_path):
    """The gap is positive at 1x and within tolerance at 3x, but it grew: that, not the tolerance, is why."""
    arms = {("random", "all", "1x"): (lambda s: 0.10 + s / 1000, 1.1),
            (PRE, "all", "1x"): (lambda s: 0.105 + s / 1000, 1.1),  # +0.5 at 1x
            ("random", "all", "3x"): (lambda s: 0.10 + s / 1000, 1.1),
            (PRE, "all", "3x"): (lambda s: 0.108 + s / 1000, 1.1)}  # +0.8 at 3x, tolerance 1.0
    claim = _judge(write_sweep(tmp_path, "grew", replicated(arms, SHARED, {PRE: [0.0, 0.05, -0.05]})))["C2"]
    assert claim.verdict == C.FAILS
    assert claim.reason.startswith("the gap grew from 1x to 3x: R18 all (pretrained:cls): change of the gap")
    assert "tolerance" not in claim.reason
    assert _condition(claim, "minus tolerance")["verdict"] == C.HOLDS


def test_without_a_pretrained_arm_nothing_is_measurable(tmp_path):
    arms = {("random", d, s): (_rise(0.3, 10.0), 1.2) for d in ("all", "150") for s in ("1x", "3x")}
    claims = _judge(write_sweep(tmp_path, "scratch", replicated(arms, SHARED)))
    assert {k: c.verdict for k, c in claims.items()} == {k: C.NOT_MEASURABLE for k in ("C1", "C2", "C3", "C4")}
    assert all(c.numbers == [] and c.reason for c in claims.values())
    assert claims["C2"].paper  # the paper's values are shown even when ours cannot be


def test_unfinished_trials_count_for_c1_only(tmp_path):
    # The 3x pre-trained trials stop at iteration 30: their early evaluations exist, their final AP does not.
    target = write_sweep(tmp_path, "partial", replicated(PAPER_LIKE, SHARED, OWN),
                         unfinished=tuple(f"{PRE}-all-3x-R18-r{r}" for r in range(3)))
    claims = _judge(target)
    assert [n["cell"] for n in claims["C1"].numbers] == ["R18 all 1x", "R18 all 3x"]
    assert claims["C2"].verdict == C.NOT_MEASURABLE  # only 1x has a finished pair on all the data
    assert claims["C4"].numbers[0]["cell"] == "R18 all 1x"  # the longest finished pair


def test_report_writes_claims_json_logs_it_and_opens_with_it(tmp_path):
    from mlflow import MlflowClient

    target = write_sweep(tmp_path, "rep", replicated(PAPER_LIKE, SHARED, OWN))
    report = build_report(target, tmp_path / "out")
    saved = json.loads((report.folder / "claims.json").read_text())
    assert (report.folder / "index.html").is_file()
    assert list(saved) == ["C1", "C2", "C3", "C4", "noise_floor"]
    noise = saved.pop("noise_floor")
    cell = next(c for c in noise["cells"] if c["cell"] == "random all 1x R18")
    finals = [100 * _rise(0.40, 20.0)(20) + s for s in SHARED]
    assert cell["n"] == 3 and list(cell["final_ap"].values()) == pytest.approx(finals, abs=0.01)
    assert cell["sd"] == pytest.approx(math.sqrt(sum((f - sum(finals) / 3) ** 2 for f in finals) / 2), abs=0.01)
    for key, claim in saved.items():
        assert claim["verdict"] == C.HOLDS and claim["rule"] == C.RULES[key] and claim["numbers"]
        assert claim["paper"] and claim["thresholds"]["C1_min_lead"] == C.C1_MIN_LEAD
        assert claim["n"] == 3 and claim["interval"].startswith("paired t-interval")
        assert all(len(c["per_replicate"]) == 3 and len(c["interval"]) == 2 for c in claim["conditions"])
    client = MlflowClient(target.uri)
    parent = client.search_runs([load_sweep(target).experiment_id], "tags.role = 'sweep'")[0]
    assert {k: parent.data.tags[f"claim.{k}"] for k in saved} == {k: C.HOLDS for k in saved}
    note = parent.data.tags["mlflow.note.content"]  # the run page's description lists the verdicts
    assert all(f"- **{k}** {saved[k]['claim']}: **{C.HOLDS}**" in note for k in saved), note
    root = [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert "claims.json" in root
    assert "report/claims.json" in [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
    page = report.index.read_text()
    # The claims come first, before any figure; every rule is printed with its thresholds.
    assert page.index("id='claims'") < page.index("<figure")
    assert page.count('class="v-holds"') == 4 and "lead &gt; 1.0 AP points" in page
    # R18 on synthetic data matches no paper cell: the whole paper table is collapsed.
    paper = page.split("id='paper-table'")[1].split("id='cost'")[0]
    assert "No trial of this sweep reports a cell" in paper and "<details><summary>" in paper
