"""The report's keypoint / VOC section: curves of keypoints/AP and voc/mAP, and the paper's rows."""

import pandas as pd

from dashboards import keypoints_voc as KV
from dashboards.figures import curve_count
from dashboards.paper import paper_numbers


def _tables():
    trials = pd.DataFrame([
        {"name": "random-all-2x-R18", "init": "random", "data": "all", "schedule": "2x", "backbone": "R18"},
        {"name": "synthetic-r18-all-2x-R18", "init": "pretrained:synthetic-r18", "data": "all", "schedule": "2x",
         "backbone": "R18"},
    ])
    rows = []
    for name, values in (("random-all-2x-R18", [0.01, 0.05, 0.12]), ("synthetic-r18-all-2x-R18", [0.03, 0.09, 0.2])):
        rows += [{"name": name, "metric": "keypoints/AP", "step": s, "value": v} for s, v in zip((100, 200, 400), values)]
        rows.append({"name": name, "metric": "bbox/AP", "step": 400, "value": 0.5})
    return trials, pd.DataFrame(rows)


def test_keypoint_curves_and_paper_rows(tmp_path):
    trials, metrics = _tables()
    assert KV.present(metrics) == ["keypoints/AP"]
    assert curve_count(KV.curves(trials, metrics, "keypoints/AP")) == 2
    rows = KV.paper_rows(trials, metrics, paper_numbers())
    kp = [r for r in rows if "Figure 6" in r[0]]
    # 65.6 (random) and 65.5 (pretrained), each beside the trial of its init kind with its final AP
    assert [(r[1], r[4]) for r in kp] == [("random", "random-all-2x-R18"), ("pretrained", "synthetic-r18-all-2x-R18")]
    assert "12.0" in kp[0][6] and "65.6" in kp[0][3] and "20.0" in kp[1][6]
    voc = [r for r in rows if "VOC" in r[0]]
    assert voc and all("no trial of this sweep" in r[4] for r in voc)
    figs = KV.draw_figures(trials, metrics, tmp_path)
    html = "".join(KV.sections(trials, metrics, figs))
    assert figs["keypoints/AP"].is_file() and "Keypoints and Pascal VOC" in html


def test_no_section_without_task_metrics(tmp_path):
    trials, metrics = _tables()
    metrics = metrics[metrics["metric"] == "bbox/AP"]
    assert KV.draw_figures(trials, metrics, tmp_path) == {} and KV.sections(trials, metrics, {}) == []


def test_voc_rows_use_the_area_metric_of_val2012():
    trials, _ = _tables()
    rows = [{"name": n, "metric": k, "step": 600, "value": v} for n in trials["name"]
            for k, v in (("voc/mAP", 0.30), ("voc/mAP_area", 0.25))]
    voc = [r for r in KV.paper_rows(trials, pd.DataFrame(rows), paper_numbers()) if "VOC" in r[0]]
    assert len(voc) == 2 and all("25.0" in r[6] for r in voc)
