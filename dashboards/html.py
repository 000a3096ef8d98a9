"""The report's `index.html`: one self-contained page (inline CSS, figures embedded as data URIs).

It opens from disk and inside MLflow's artifact viewer alike (no external file or network fetch);
the PNGs next to it are the same images, for slides. The page and the claims table are Jinja2
templates (`dashboards/templates`, autoescaped); the number tables, whose cells each pick a class
and format, are built here from the report's tables.
"""

from __future__ import annotations

import base64
import html
import os
import time
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
from jinja2 import Environment, PackageLoader
from markupsafe import Markup

from dashboards.cost import KINDS, Seen, format_count
from dashboards.tables import AP_METRICS, TASKS

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1500px;padding:0 16px;color:#222}
h1{margin-bottom:4px} h2{border-bottom:1px solid #ccc;padding-bottom:3px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0;font-size:13px} th,td{border:1px solid #ddd;padding:3px 7px}
th{background:#f3f3f3;position:sticky;top:0} td.num{text-align:right;font-variant-numeric:tabular-nums}
.paper{color:#555;font-size:11px;display:block} .neg{color:#b00} .pos{color:#070} .na{color:#999}
.warn{background:#fff4e0;border:1px solid #e0b060;padding:8px 14px;margin:12px 0}
figure{margin:14px 0} figure img{max-width:100%;border:1px solid #eee} figcaption{color:#555}
.meta td{border:none;padding:1px 10px 1px 0} td:first-child{white-space:nowrap}
.v-holds{background:#e3f4e3;font-weight:bold} .v-fails{background:#fbe3e3;font-weight:bold}
.v-na{background:#eee;color:#555} td ul{margin:0;padding-left:16px} .rule{color:#555;font-size:12px}
table.claims{table-layout:fixed;width:100%} table.claims td{vertical-align:top;overflow-wrap:break-word}
table.claims td:first-child{white-space:normal} table.claims ul{font-size:12px} td p{margin:0 0 3px}
"""
_TEMPLATES = Environment(loader=PackageLoader("dashboards", "templates"), autoescape=True)
# The claims table's columns: the claim's sentence short, the numbers beside it wide (fixed layout, so
# a long list of the paper's values wraps in its column instead of widening it or the page).
CLAIM_COLUMNS = {"claim": 13, "verdict": 9, "this sweep (box AP %)": 28, "the paper (box AP %)": 26, "rule": 24}


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def table(headers: Iterable[str], rows: Iterable[Iterable[str]], cls: str = "") -> str:
    """Cells are HTML already (callers escape text)."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    head = f"<thead><tr>{head}</tr></thead>" if head else ""
    body = "\n".join("<tr>" + "".join(rows_cell(c) for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}">{head}<tbody>\n{body}\n</tbody></table>'


def rows_cell(cell: str) -> str:
    return cell if cell.startswith("<td") else f"<td>{cell}</td>"


def num(value: float | None, digits: int = 1) -> str:
    return '<td class="num na">n/a</td>' if value is None else f'<td class="num">{value:.{digits}f}</td>'


def diff(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f'<span class="{"neg" if value < 0 else "pos"}">{value:+.1f}</span>'


def figure(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{esc(path.name)}" data-file="{esc(path.name)}">'
            f'<figcaption>{esc(caption)} (<a href="{esc(path.name)}">{esc(path.name)}</a>)</figcaption></figure>')


def shareable(uri: str, sweep_dir: Path | None) -> str:
    """A store's URI without the machine's path: a SQLite file relative to the sweep folder (or its name)."""
    if not uri.startswith("sqlite:///"):
        return uri  # a server's URL names no local path
    db = Path(uri.removeprefix("sqlite:///"))
    rel = os.path.relpath(db, sweep_dir) if sweep_dir is not None else db.name
    return f"SQLite {rel}" + (" (from the sweep folder)" if sweep_dir is not None else "")


def header(sweep: Any, n_finished: int) -> list[tuple[str, str]]:
    """The page's facts about the sweep, as (label, value) rows."""
    t, tags = sweep.target, sweep.parent_tags
    # No absolute path of this machine: the page is shared as is (the folder's name says which sweep).
    return [("tracking store", shareable(t.uri, t.sweep_dir)), ("experiment id", sweep.experiment_id),
            ("parent run", sweep.parent_id),
            ("spec hash", tags.get("spec_hash", "?")), ("code version", tags.get("code_version", "?")),
            ("sweep folder", f"{t.sweep_dir.name}/ (this page is its report/index.html)" if t.sweep_dir else
             "not given"), ("trials", f"{n_finished} of {len(sweep.trials)} finished"),
            ("written", time.strftime("%Y-%m-%d %H:%M:%S"))]


def _ap_cell(cell: dict[str, Any]) -> str:
    if cell["na"]:
        return '<td class="num na" title="no objects of that size">n/a</td>'
    ours = cell["ours"]
    text = "&ndash;" if ours is None else f"{ours:.1f}"
    for value in sorted({p.value for p in cell["paper"]}):
        sources = ", ".join(sorted({p.source for p in cell["paper"] if p.value == value}))
        d = None if ours is None else ours - value
        text += (f'<span class="paper" title="{esc(sources)}">paper {value:.1f} ({esc(sources)}) '
                 f"&Delta; {diff(d)}</span>")
    return f'<td class="num">{text}</td>'


def trial_table(rows: list[dict[str, Any]]) -> str:
    metrics = [(t, m) for t in TASKS for m in AP_METRICS]
    headers = ["trial", "init", "data", "schedule", "backbone", "status", "evaluated at"] + \
              [f"{'box' if t == 'bbox' else 'mask'} {m}" for t, m in metrics]
    body = []
    for row in rows:
        t = row["trial"]
        at = "&ndash;" if pd.isna(t.get("eval_step")) or t.get("eval_step") is None else \
            f"{int(t['eval_step'])}" + (f" / {int(t['total_iters'])}" if not pd.isna(t["total_iters"]) else "")
        body_norm = t.get("body_norm") if isinstance(t.get("body_norm"), str) else ""
        init = t["init"] + (f" ({body_norm} body)" if body_norm and body_norm != t.get("norm") else "")
        body.append([esc(t["name"]), esc(init), esc(t["data"]), esc(t["schedule"]), esc(t["backbone"]),
                     esc(t["status"]), at] + [_ap_cell(row["cells"][f"{a}/{m}"]) for a, m in metrics])
    return table(headers, body)


def paper_table(comparison: list[dict[str, Any]]) -> str:
    headers = ["source", "setting", "backbone", "init", "schedule", "data", "task", "metric", "paper",
               "trial (ours)", "ours", "&Delta;", "note"]
    body = []
    for entry in comparison:
        n = entry["number"]
        hits = entry["trials"] or [{"trial": None, "ours": None, "diff": None}]
        for h in hits:
            body.append([esc(n.source), esc(n.setting), esc(n.backbone), esc(n.init), esc(n.schedule),
                         esc(n.data), esc(n.task), esc(n.metric), num(n.value),
                         esc(h["trial"]) if h["trial"] else '<span class="na">no trial of this sweep</span>',
                         num(h["ours"]), diff(h["diff"]) if h["trial"] else "", esc(n.note)])
    return table(headers, body)


_VERDICT_CLASS = {"holds": "v-holds", "does not hold": "v-fails", "not measurable": "v-na"}


def claims_table(claims: dict[str, Any]) -> str:
    """One row per claim: verdict, why, this sweep's numbers, the paper's values, the rule."""
    from dashboards.claims import paper_lines

    return _TEMPLATES.get_template("claims.html.j2").render(
        claims=claims, columns=CLAIM_COLUMNS, verdict_class=_VERDICT_CLASS, paper_lines=paper_lines)


def paper_tables(comparison: list[dict[str, Any]]) -> str:
    """The numbers some trial compares with, then the rest collapsed (a sweep compares with few)."""
    hit = [e for e in comparison if e["trials"]]
    rest = [e for e in comparison if not e["trials"]]
    out = [paper_table(hit) if hit else '<p class="na">No trial of this sweep reports a cell the paper '
                                        "reports (its backbones, data sizes or schedules differ).</p>"]
    if rest:
        out.append(f"<details><summary>{len(rest)} more numbers of the paper, for cells this sweep has no "
                   f"trial of</summary>{paper_table(rest)}</details>")
    return "\n".join(out)


def cost_table(cost: pd.DataFrame) -> str:
    headers = ["trial", "init", "pre-training counts from"] + \
              [f"{part} {k}" for k in KINDS for part in ("pre-train", "detection", "total")] + ["box AP", "mask AP"]
    body = []
    for _, c in cost.iterrows():
        cells = [esc(c["name"]), esc(c["init"]), esc(c["pretrain_source"])]
        for kind in KINDS:
            cells += [f'<td class="num">{format_count(_val(c[f"{p}_{kind}"]))}</td>'
                      for p in ("pretrain", "detection", "total")]
        cells += [num(_val(c["bbox/AP"])), num(_val(c["segm/AP"]))]
        body.append(cells)
    return table(headers, body)


def figure2_table(fig2: dict[str, Seen]) -> str:
    names = list(fig2)
    scratch, both = fig2[names[3]], fig2[names[2]]
    headers = ["", *map(esc, names), "scratch / (pre-train + fine-tune)"]
    body = []
    for kind in KINDS:
        ratio = scratch.get(kind) / both.get(kind)
        body.append([f"<b>{kind}</b>"] + [f'<td class="num">{format_count(fig2[n].get(kind))}</td>' for n in names]
                    + [f'<td class="num">{ratio:.1%}</td>'])
    return table(headers, body)


def _val(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def page(sweep: Any, n_finished: int, missing: list[str], sections: list[str]) -> str:
    """The whole page: the header, then `sections` (HTML already)."""
    return _TEMPLATES.get_template("page.html.j2").render(
        name=sweep.target.name, css=Markup(CSS), meta=header(sweep, n_finished), notes=sweep.notes,
        missing=missing, sections=[Markup(x) for x in sections]) + "\n"
