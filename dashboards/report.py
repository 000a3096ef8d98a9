"""`python -m orchestrator report SWEEP`: the paper's claims judged, figures, paper comparison, cost.

Reads the sweep's runs from MLflow (`dashboards.query`), judges the paper's claims C1..C4 on them
(`dashboards.claims`), draws the figures (`dashboards.figures`), writes `OUT/index.html`
(self-contained, opening with the claims), `OUT/claims.json` and one PNG per figure, and logs the
folder as artifacts `report/` of the sweep's parent run (plus `claims.json`, a `claim.Cn` tag each and
the verdicts in the run's description).
OUT defaults to SWEEP_FOLDER/report when the sweep's folder is known, else ./report-NAME. An
incomplete sweep is reported as far as it got, with what is missing listed at the top; an unknown
or empty sweep raises `SweepDataError` (exit 2 on the command line).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt

from dashboards import claims as C
from dashboards import figures as F
from dashboards import html as H
from dashboards import tables as T
from dashboards import keypoints_voc as KV
from dashboards.cost import figure2
from dashboards.paper import load_paper, paper_numbers
from dashboards.replicates import noise_floor, noise_words
from dashboards.query import SweepData, SweepTarget, load_sweep, log_claims, log_report

logger = logging.getLogger(__name__)


@dataclass
class Report:
    folder: Path
    index: Path
    figures: dict[str, Path]
    missing: list[str]
    logged: bool
    claims: dict[str, C.Claim] | None = None


def default_folder(target: SweepTarget) -> Path:
    return (target.sweep_dir / "report") if target.sweep_dir else Path.cwd() / f"report-{target.name}"


def build_report(target: SweepTarget, out: Path | None = None, log_to_mlflow: bool = True) -> Report:
    sweep = load_sweep(target)
    folder = Path(out or default_folder(target)).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    fin = T.finals(sweep.trials, sweep.metrics)
    cost = T.cost_table(sweep.trials, fin, target.sweep_dir)
    missing = T.missing(sweep.trials, fin, cost)
    claims = C.judge(sweep.trials, sweep.metrics)
    noise = noise_floor(sweep.trials, sweep.metrics)
    (folder / "claims.json").write_text(json.dumps(C.to_json(claims, noise), indent=2) + "\n")
    figs = draw_figures(sweep, fin, cost, folder)
    index = folder / "index.html"
    index.write_text(render(sweep, fin, cost, figs, missing, claims, noise))
    logger.info("report of sweep %s written to %s (%d figures%s); claims: %s", target.name, index, len(figs),
                f"; {len(missing)} things missing" if missing else "",
                ", ".join(f"{k} {c.verdict}" for k, c in claims.items()))
    if log_to_mlflow:
        log_report(target, sweep.parent_id, folder)
        log_claims(target, sweep.parent_id, C.to_json(claims, noise))
    return Report(folder, index, figs, missing, log_to_mlflow, claims)


# name -> (caption, how to draw it)
def figure_specs(sweep: SweepData, fin, cost) -> dict[str, tuple[str, object]]:
    tr, me = sweep.trials, sweep.metrics
    return {
        "ap_bbox": ("Box AP vs iterations, random init vs pre-trained, one curve per schedule, one panel per "
                    "backbone (paper Figures 1 and 3)", lambda: F.ap_curves(tr, me, "bbox")),
        "ap_segm": ("Mask AP vs iterations, as above", lambda: F.ap_curves(tr, me, "segm")),
        "final_ap": ("Final box and mask AP per (init, schedule)", lambda: F.final_bars(tr, fin)),
        "small_data_bbox": ("Box AP vs iterations for each training-set size (paper Figures 7-8)",
                            lambda: F.small_data_curves(tr, me, "bbox")),
        "small_data_segm": ("Mask AP vs iterations for each training-set size",
                            lambda: F.small_data_curves(tr, me, "segm")),
        "overfitting": ("Box AP against train loss for each training-set size: the paper's Figure 8 view "
                        "(with little data the loss keeps falling while AP stalls)", lambda: F.overfitting(tr, me)),
        "cost_seen": ("Images, instances and pixels seen per trial, pre-training included (paper Figure 2)",
                      lambda: F.cost_bars(cost)),
        "cost_ap": ("Box AP against images, instances and pixels seen, pre-training included",
                    lambda: F.cost_ap(tr, me, cost, "bbox")),
    }


def draw_figures(sweep: SweepData, fin, cost, folder: Path) -> dict[str, Path]:
    out = {}
    for name, (_, draw) in figure_specs(sweep, fin, cost).items():
        fig = draw()
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out[name] = path
    out.update(KV.draw_figures(sweep.trials, sweep.metrics, folder))  # keypoints/AP, voc/mAP if logged
    return out


def render(sweep: SweepData, fin, cost, figs: dict[str, Path], missing: list[str],
           claims: dict[str, C.Claim], noise: dict | None = None) -> str:
    numbers = paper_numbers()
    captions = {name: spec[0] for name, spec in figure_specs(sweep, fin, cost).items()}
    n_done = int((sweep.trials["status"] == "FINISHED").sum())
    paper = load_paper()
    sections = [
        "<h2 id='claims'>The paper's claims, judged on this sweep</h2>",
        "<p>Each verdict follows the rule beside it (thresholds fixed in <code>dashboards/claims.py</code>, the "
        "same for every sweep); box AP in percent. Also in <a href=\"claims.json\">claims.json</a>.</p>",
        H.claims_table(claims),
        f"<p id='noise-floor'>{H.esc(noise_words(noise))}</p>" if noise else "",
        "<h2>AP vs iterations</h2>", H.figure(figs["ap_bbox"], captions["ap_bbox"]),
        H.figure(figs["ap_segm"], captions["ap_segm"]),
        "<h2>Final AP</h2>", H.figure(figs["final_ap"], captions["final_ap"]),
        "<h2>Less data</h2>", H.figure(figs["small_data_bbox"], captions["small_data_bbox"]),
        H.figure(figs["small_data_segm"], captions["small_data_segm"]),
        H.figure(figs["overfitting"], captions["overfitting"]),
        "<h2 id='final-table'>Final AP per trial, beside the paper</h2>",
        "<p>AP in percent at each trial's last evaluation. Where the paper reports the same cell (backbone, init, "
        "data, schedule, metric in its standard recipe) its number, source and our difference are given below "
        "ours. n/a: no objects of that size in the validation set.</p>",
        H.trial_table(T.trial_cells(sweep.trials, fin, numbers)),
        "<h2 id='paper-table'>The paper's numbers this sweep can compare</h2>",
        f"<p>From <code>dashboards/paper_results.yaml</code>: {H.esc(paper['paper'])} "
        f"(<a href=\"{H.esc(paper['url'])}\">{H.esc(paper['url'])}</a>). Only the numbers of cells a trial of "
        "this sweep reports are listed here; the others are in the collapsed section below.</p>",
        H.paper_tables(T.comparison(sweep.trials, fin, numbers)),
        *KV.sections(sweep.trials, sweep.metrics, figs),
        "<h2 id='cost'>Cost accounting</h2>", H.figure(figs["cost_seen"], captions["cost_seen"]),
        H.figure(figs["cost_ap"], captions["cost_ap"]),
        "<p>Detection counts are the trainer's <code>seen/*</code> metrics (pixels at the model's resize size); "
        "pre-training counts come from the pretrain job's summary, or for <code>imagenet</code> from the "
        "paper's accounting.</p>",
        H.cost_table(cost),
        "<h3>The paper's Figure 2 arithmetic (its stated sizes)</h3>",
        "<p>ImageNet 1.28M images x 100 epochs at 224x224, one instance per image; COCO at batch 16, "
        "~7 instances per image, 800x1333 pixels per image (an upper bound).</p>",
        H.figure2_table(figure2()),
    ]
    return H.page(sweep, n_done, missing, sections)
