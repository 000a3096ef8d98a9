"""The trial table: one row per trial (state, iteration/total, latest box/mask AP, ETA) and a total.

Pure text rendering, shared by the live terminal view of `run` and by `status` (which builds the
rows from the stored state without Ray). AP is printed in percent, as the paper prints it (the row
and MLflow hold COCO's fractions in [0, 1]). A row is a `Row` (state.json and `status --json` hold
it as JSON, `Row.to_json`): name, status, iteration/total, box and mask AP, ETA, attempts, the
pretrain jobs it needs; a failed trial's one-line `reason` (printed under the table), a preempted
one's `preemptions` and `preempted_at` (printed under the table apart from failures), and, with
schedule forking, `role` ("trunk" | "branch") and a branch's `start` (its fork point): the total
line counts the iterations each task trains itself, so it adds up to the forked plan. A pretrain
job is a row of role "pretrain" with its own iterations, counted apart from the trials'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Iterable

from trainer.engine.reporters import hms

STATUS_ORDER = ("RUNNING", "PENDING", "ERROR", "INTERRUPTED", "FINISHED")
APS = ("bbox/AP", "segm/AP")  # the APs a row shows (its `ap`), under these names in JSON


@dataclass
class Row:
    """One line of the table: a task's (or a pretrain job's) state; see the module docstring."""

    name: str
    status: str = "PENDING"
    total: int = 0
    iteration: int = 0
    attempts: int = 0
    role: str | None = None  # trunk | branch | pretrain (None: a plain trial)
    needs: list[str] | None = None
    start: int | None = None  # a branch's fork point
    ap: dict[str, float] = field(default_factory=dict)
    eta_s: float | None = None
    rate: float | None = None
    reason: str | None = None
    error: str | None = None
    diverged: bool | None = None
    preemptions: int | None = None
    preempted_at: int | None = None
    axes: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        """As state.json and `status --json` hold it: APs under their metric names, unset fields left out."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "ap"}
        out.update(self.ap)
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any], **defaults: Any) -> "Row":
        """A stored row (state.json), over `defaults`; unknown keys are left out."""
        known = {f.name for f in fields(cls)} - {"ap"}
        row = cls(**{**defaults, **{k: v for k, v in data.items() if k in known}})
        row.ap.update({k: data[k] for k in APS if data.get(k) is not None})
        return row


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    s = int(round(seconds))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    return hms(s)


def _ap(value: Any) -> str:
    return f"{100 * value:5.1f}" if isinstance(value, (int, float)) and math.isfinite(value) else "    -"


def render(title: str, rows: list[Row], elapsed_s: float | None = None) -> str:
    """The table and its total line, as text (no trailing newline)."""
    width = max([len(r.name) for r in rows] + [5])
    done = {r.name for r in rows if r.role == "pretrain" and r.status == "FINISHED"}
    shown = [_progress(r, done) for r in rows]
    wide = max([len(p) for _, p in shown] + [17])
    head = (f"{'#':>3}  {'trial':<{width}}  {'state':<11}  {'iter/total':>{wide}}  {'box AP%':>7}  {'mask AP%':>8}  "
            f"{'ETA':>8}")
    lines = [title, head, "-" * len(head)]
    for i, (r, (state, progress)) in enumerate(zip(rows, shown)):
        retry = f"*{r.attempts}" if r.attempts > 1 else ""
        lines.append(f"{i:>3}  {r.name:<{width}}  {state + retry:<11}  {progress:>{wide}}  "
                     f"{_ap(r.ap.get('bbox/AP')):>7}  {_ap(r.ap.get('segm/AP')):>8}  {duration(r.eta_s):>8}")
    lines.append(total_line(rows, elapsed_s))
    # Why a trial failed (e.g. "diverged: loss nan at iteration 7"), one line each under the table.
    lines.extend(f"  ! {r.name}: {r.reason}" for r in rows if r.status == "ERROR" and r.reason)
    # Preemptions are not failures: their own lines (the trial resumed, or waits to, from that iteration).
    lines.extend(f"  ~ {r.name}: preempted {r.preemptions}x, last at iteration "
                 f"{'?' if r.preempted_at is None else r.preempted_at} (attempts {r.attempts}; not counted as "
                 "failures)" for r in rows if r.preemptions)
    return "\n".join(lines)


def _progress(r: Row, jobs_done: set[str]) -> tuple[str, str]:
    """(state, iter/total) of a row. A task not started shows what it waits for: a pretrain job (of the
    rows' `pretrain:NAME` jobs, those not finished); a branch its trunk's checkpoint at its fork point
    (shown instead of the fork point, which would read as progress), or, once that is on disk, a slot."""
    it, total, state = int(r.iteration or 0), int(r.total or 0), r.status or "PENDING"
    waits = [f"pretrain:{job}" for job in r.needs or () if f"pretrain:{job}" not in jobs_done]
    if state == "PENDING" and waits:
        return "WAITING", f"for {waits[0]}"
    if r.role == "branch" and state == "PENDING":
        start = int(r.start or 0)
        return ("WAITING", f"for trunk @ {start}") if it < start else ("PENDING", f"ready @ {start}")
    return state, f"{it}/{total}" if total else "-"


def total_line(rows: Iterable[Row], elapsed_s: float | None = None) -> str:
    rows = list(rows)
    jobs = [r for r in rows if r.role == "pretrain"]  # their iterations are not the trials' kind
    rows = [r for r in rows if r.role != "pretrain"]
    counts = {s: sum(1 for r in rows if (r.status or "PENDING") == s) for s in STATUS_ORDER}
    start = [int(r.start or 0) for r in rows]
    done = sum(max(min(int(r.iteration or 0), int(r.total or 0)) - s, 0) for r, s in zip(rows, start))
    total = sum(int(r.total or 0) - s for r, s in zip(rows, start))
    trunks = sum(1 for r in rows if r.role == "trunk")
    rate = sum(r.rate or 0.0 for r in rows if r.status == "RUNNING")
    eta = (total - done) / rate if rate > 0 else None
    state = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
    best = max((r.ap["bbox/AP"] for r in rows if isinstance(r.ap.get("bbox/AP"), (int, float))), default=None)
    pct = 100 * done / total if total else 0.0
    tasks = f"{len(rows) - trunks} trials + {trunks} trunks" if trunks else f"{len(rows)} trials"
    parts = [f"total: {tasks} ({state})", f"iterations {done}/{total} ({pct:.0f}%)"]
    if jobs:
        parts.insert(1, f"pretrain {sum(r.status == 'FINISHED' for r in jobs)}/{len(jobs)} done")
    preempted = sum(int(r.preemptions or 0) for r in rows)
    if preempted:
        parts.append(f"{preempted} preemption{'s' if preempted > 1 else ''}")
    if best is not None:
        parts.append(f"best box AP {100 * best:.1f}%")
    if elapsed_s is not None:
        parts.append(f"elapsed {duration(elapsed_s)}")
    if eta is not None:
        parts.append(f"ETA {duration(eta)}")
    return " | ".join(parts)
