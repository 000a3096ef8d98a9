"""Tests of trainer.evaluation.coco(_convert) against real pycocotools and torchvision's mask pasting."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import pickle
import random

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from trainer.evaluation import coco as ev
from trainer.evaluation import convert as conv
from trainer.config import ModelConfig
from trainer.errors import TrainerError
from trainer.modeling.model import build_model

CATEGORIES = [{"id": 2, "name": "cat"}, {"id": 5, "name": "dog"}, {"id": 11, "name": "car"}]
LABEL_TO_CAT = {1: 2, 2: 5, 3: 11}
CAT_TO_LABEL = {c: l for l, c in LABEL_TO_CAT.items()}
IMAGES = {1: (160, 200), 2: (100, 120), 3: (64, 64), 4: (240, 240)}  # id -> (height, width)
KEYS = [f"{t}/{m}" for t in ev.IOU_TYPES for m in ev.METRIC_NAMES]


def _rect(x, y, w, h):
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def _ellipse(height, width, cy, cx, ry, rx):
    yy, xx = np.mgrid[:height, :width]
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0).astype(np.uint8)


def _box(height, width, x, y, w, h):
    mask = np.zeros((height, width), np.uint8)
    mask[y:y + h, x:x + w] = 1
    return mask


def _uncompressed_rle(mask):
    """Run lengths over the column-major pixels, starting with a (possibly empty) run of zeros."""
    flat = np.asfortranarray(mask).ravel(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate(([0], edges, [flat.size])))
    counts = runs.tolist() if flat[0] == 0 else [0] + runs.tolist()
    return {"size": list(mask.shape), "counts": counts}


def _compressed_rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


# (image_id, category_id, segmentation builder(h, w), iscrowd); sizes span small/medium/large.
OBJECTS = [
    (1, 2, lambda h, w: [_rect(10, 10, 140, 100)], 0),                          # large polygon
    (1, 5, lambda h, w: [[160, 20, 195, 20, 160, 90]], 0),                     # medium triangle
    (1, 11, lambda h, w: _compressed_rle(_ellipse(h, w, 130, 100, 6, 8)), 0),  # small RLE
    (1, 2, lambda h, w: _uncompressed_rle(_box(h, w, 0, 120, 40, 40)), 1),     # crowd region
    (2, 11, lambda h, w: [_rect(5, 5, 50, 40)], 0),
    (2, 5, lambda h, w: _compressed_rle(_ellipse(h, w, 70, 90, 20, 25)), 0),
    (2, 2, lambda h, w: [_rect(60, 70, 20, 20)], 0),
    (3, 5, lambda h, w: [_rect(10, 10, 12, 12)], 0),
    (3, 11, lambda h, w: _compressed_rle(_box(h, w, 30, 20, 30, 40)), 0),
    (4, 11, lambda h, w: _compressed_rle(_ellipse(h, w, 120, 120, 60, 80)), 0),
    (4, 2, lambda h, w: [[150, 10, 230, 10, 230, 30, 170, 30, 170, 60, 150, 60]], 0),  # L shape
    (4, 5, lambda h, w: [[10, 200, 30, 200, 10, 225]], 0),
]


@pytest.fixture(scope="module")
def coco_gt(tmp_path_factory) -> COCO:
    images = [{"id": i, "height": h, "width": w, "file_name": f"{i}.jpg"} for i, (h, w) in IMAGES.items()]
    annotations = []
    for ann_id, (image_id, cat, build, crowd) in enumerate(OBJECTS, start=1):
        h, w = IMAGES[image_id]
        segm = build(h, w)
        if isinstance(segm, list):
            rle = mask_util.merge(mask_util.frPyObjects(segm, h, w))
        else:  # frPyObjects reads any dict as uncompressed RLE, like COCO.annToRLE does
            rle = mask_util.frPyObjects(segm, h, w) if isinstance(segm["counts"], list) else segm
        annotations.append({"id": ann_id, "image_id": image_id, "category_id": cat, "iscrowd": crowd,
                            "segmentation": segm, "area": float(mask_util.area(rle)),
                            "bbox": mask_util.toBbox(rle).tolist()})
    path = tmp_path_factory.mktemp("coco") / "instances_tiny.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
    areas = [a["area"] for a in gt.dataset["annotations"] if not a["iscrowd"]]
    assert min(areas) < 32**2 and max(areas) > 96**2 and any(32**2 < a < 96**2 for a in areas)
    return gt


def perfect_outputs(gt: COCO) -> dict[int, dict[str, torch.Tensor]]:
    """What an ideal Mask R-CNN would return per image: every non-crowd GT, score 1."""
    outputs = {}
    for image_id, (h, w) in IMAGES.items():
        anns = [a for a in gt.imgToAnns[image_id] if not a["iscrowd"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        boxes[:, 2:] += boxes[:, :2]
        masks = np.stack([gt.annToMask(a) for a in anns])
        outputs[image_id] = {
            "boxes": boxes,
            "labels": torch.tensor([CAT_TO_LABEL[a["category_id"]] for a in anns]),
            "scores": torch.ones(len(anns)),
            "masks": torch.from_numpy(masks).float()[:, None],
        }
    return outputs


def perturbed_results(gt: COCO) -> list[dict]:
    """Shifted boxes and masks, one miss, one false positive, a duplicate, and graded scores."""
    outputs = perfect_outputs(gt)
    ids = list(outputs)
    results = ev.predictions_to_coco([outputs[i] for i in ids], ids, LABEL_TO_CAT)
    del results[4]  # a miss
    for k, r in enumerate(results):
        r["score"] = 1.0 - 0.07 * k
        if k % 3 == 1:  # shift boxes and masks by a few pixels: some IoUs fall below 0.75
            r["bbox"] = [r["bbox"][0] + 3 + k, r["bbox"][1] + 2, r["bbox"][2], r["bbox"][3]]
            mask = np.roll(mask_util.decode(r["segmentation"]), 3 + k, axis=1)
            r["segmentation"] = _compressed_rle(mask)
    fp_mask = _box(*IMAGES[2], 80, 5, 30, 30)
    results.append({"image_id": 2, "category_id": 2, "bbox": [80.0, 5.0, 30.0, 30.0], "score": 0.95,
                    "segmentation": _compressed_rle(fp_mask)})
    duplicate = copy.deepcopy(results[0])
    duplicate["score"] = 0.5
    results.append(duplicate)
    return results


def direct_pycocotools(gt: COCO, results: list[dict]) -> dict[str, float]:
    """COCOeval run by hand; segm gets results without "bbox" (the documented convention)."""
    metrics = {}
    for iou_type in ev.IOU_TYPES:
        drop = "segmentation" if iou_type == "bbox" else "bbox"
        dets = [{k: v for k, v in copy.deepcopy(r).items() if k != drop} for r in results]
        with contextlib.redirect_stdout(io.StringIO()):
            e = COCOeval(gt, gt.loadRes(dets), iou_type)
            e.evaluate()
            e.accumulate()
            e.summarize()
        metrics.update({f"{iou_type}/{m}": float(v) for m, v in zip(ev.METRIC_NAMES, e.stats[:6])})
    return metrics


# ----------------------------------------------------------------------------- score_coco


def test_perfect_predictions_score_one(coco_gt, capsys):
    outputs = perfect_outputs(coco_gt)
    results = ev.predictions_to_coco(list(outputs.values()), list(outputs), LABEL_TO_CAT)
    metrics = ev.score_coco(coco_gt, results, backend="pycocotools")
    assert sorted(metrics) == sorted(KEYS)
    for key in KEYS:
        assert metrics[key] == pytest.approx(1.0, abs=1e-9), key
    assert capsys.readouterr().out == ""  # pycocotools' chatter never reaches stdout


def test_perturbed_predictions_match_direct_pycocotools(coco_gt):
    results = perturbed_results(coco_gt)
    before = copy.deepcopy(results)
    metrics = ev.score_coco(coco_gt, results, backend="pycocotools")
    expected = direct_pycocotools(coco_gt, results)
    assert results == before  # loadRes mutates its input; score_coco must not pass ours through
    for key in KEYS:
        assert metrics[key] == pytest.approx(expected[key], abs=1e-12), key
    assert 0.2 < metrics["bbox/AP"] < 0.95 and 0.2 < metrics["segm/AP"] < 0.95


def test_faster_coco_eval_matches_pycocotools(coco_gt):
    pytest.importorskip("faster_coco_eval")
    for results in (perturbed_results(coco_gt), ev.predictions_to_coco(
            list(perfect_outputs(coco_gt).values()), list(IMAGES), LABEL_TO_CAT)):
        reference = ev.score_coco(coco_gt, results, backend="pycocotools")
        fast = ev.score_coco(coco_gt, results, backend="faster_coco_eval")
        for key in KEYS:
            assert fast[key] == pytest.approx(reference[key], abs=ev.BACKEND_TOLERANCE), key
    assert ev.faster_coco_eval_verified()
    assert ev.resolve_backend("auto") == "faster_coco_eval"


def test_run_scorer_verifies_faster_coco_eval_on_the_runs_own_detections(coco_gt, caplog, monkeypatch):
    pytest.importorskip("faster_coco_eval")
    calls = []
    for name in ("pycocotools", "faster_coco_eval"):
        runner = ev._BACKEND_RUNNERS[name]
        monkeypatch.setitem(ev._BACKEND_RUNNERS, name,
                            lambda *a, _n=name, _r=runner, **k: calls.append(_n) or _r(*a, **k))
    results = perturbed_results(coco_gt)
    scorer = ev.RunScorer("auto")
    assert scorer.chosen is None and ev.resolve_backend(scorer).startswith("auto")
    with caplog.at_level(logging.INFO, logger="trainer.evaluation.coco"):
        first = ev.score_coco(coco_gt, results, backend=scorer)
    assert first == ev.score_coco(coco_gt, results, backend="pycocotools")  # the first answer is pycocotools'
    assert calls[:4] == ["pycocotools", "pycocotools", "faster_coco_eval", "faster_coco_eval"]  # bbox, segm each
    assert scorer.chosen == "faster_coco_eval" and scorer.verdict["agreed"]
    assert scorer.verdict["max_abs_diff"] <= ev.BACKEND_TOLERANCE and scorer.verdict["keys"] == sorted(KEYS)
    assert any("matches pycocotools on all 12 APs" in r.getMessage() for r in caplog.records)
    calls.clear()
    later = ev.score_coco(coco_gt, results, backend=scorer)
    assert calls == ["faster_coco_eval"] * 2
    for key in KEYS:
        assert later[key] == pytest.approx(first[key], abs=ev.BACKEND_TOLERANCE), key


def test_run_scorer_keeps_pycocotools_for_the_run_when_the_backends_differ(coco_gt, caplog, monkeypatch):
    pytest.importorskip("faster_coco_eval")
    real_fast = ev._BACKEND_RUNNERS["faster_coco_eval"]
    calls = []

    def off_by_a_little(*args, **kwargs):  # a faster-coco-eval that drifts by 2e-4 on every AP
        calls.append(1)
        return real_fast(*args, **kwargs) + 2e-4

    monkeypatch.setitem(ev._BACKEND_RUNNERS, "faster_coco_eval", off_by_a_little)
    scorer = ev.RunScorer("auto")
    results = perturbed_results(coco_gt)
    outputs = perfect_outputs(coco_gt)
    ev.score_coco(coco_gt, [], backend=scorer)  # nothing to compare on yet: still undecided
    assert scorer.chosen is None and not calls
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer.evaluation.coco"):
        first = ev.evaluate(OracleModel(outputs), TinyDataset(coco_gt), backend=scorer)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "pycocotools scores this whole run" in warnings[0].getMessage()
    assert scorer.chosen == "pycocotools" and not scorer.verdict["agreed"]
    assert scorer.verdict["max_abs_diff"] == pytest.approx(2e-4, abs=1e-9)
    assert first == ev.evaluate(OracleModel(outputs), TinyDataset(coco_gt), backend="pycocotools")
    calls.clear()
    assert ev.score_coco(coco_gt, results, backend=scorer) == ev.score_coco(coco_gt, results, backend="pycocotools")
    assert not calls  # the drifting backend is never asked again in this run


def test_run_scorer_with_an_explicit_backend_does_not_check(coco_gt, monkeypatch):
    scorer = ev.RunScorer("pycocotools")
    assert scorer.chosen == "pycocotools"
    monkeypatch.setitem(ev._BACKEND_RUNNERS, "faster_coco_eval", lambda *a, **k: pytest.fail("not asked"))
    ev.score_coco(coco_gt, perturbed_results(coco_gt), backend=scorer)
    assert scorer.verdict is None
    monkeypatch.setattr(ev, "_faster_coco_eval_importable", lambda: False)
    assert ev.RunScorer("auto").chosen == "pycocotools"  # not installed: nothing to verify


def test_backend_resolution(monkeypatch):
    assert ev.resolve_backend("auto") in ("pycocotools", "faster_coco_eval")
    assert ev.resolve_backend("pycocotools") == "pycocotools"
    monkeypatch.setattr(ev, "_faster_coco_eval_importable", lambda: False)
    monkeypatch.setattr(ev, "faster_coco_eval_verified", lambda: False)
    assert ev.resolve_backend("auto") == "pycocotools"
    with pytest.raises(ev.EvaluationError, match="not installed"):
        ev.resolve_backend("faster_coco_eval")


def test_empty_results_give_zeros_and_a_warning(coco_gt, caplog):
    with caplog.at_level(logging.WARNING, logger="trainer.evaluation.coco"):
        metrics = ev.score_coco(coco_gt, [])
    assert metrics == {key: 0.0 for key in KEYS}
    assert "no detections" in caplog.text
    assert ev.score_coco(coco_gt, [], iou_types=("bbox",)) == {f"bbox/{m}": 0.0 for m in ev.METRIC_NAMES}


def test_bbox_only_results_and_iou_types(coco_gt):
    results = [{k: v for k, v in r.items() if k != "segmentation"} for r in perturbed_results(coco_gt)]
    metrics = ev.score_coco(coco_gt, results, iou_types=("bbox",), backend="pycocotools")
    assert sorted(metrics) == [f"bbox/{m}" for m in sorted(ev.METRIC_NAMES)]
    with pytest.raises(ev.EvaluationError, match="segmentation"):
        ev.score_coco(coco_gt, results, iou_types=("segm",), backend="pycocotools")


def test_bad_arguments_raise_typed_errors(coco_gt):
    result = {"image_id": 999, "category_id": 2, "bbox": [0.0, 0.0, 5.0, 5.0], "score": 1.0}
    with pytest.raises(ev.EvaluationError, match="ground truth"):
        ev.score_coco(coco_gt, [result], iou_types=("bbox",), backend="pycocotools")
    with pytest.raises(TrainerError, match="backend"):
        ev.score_coco(coco_gt, [result], backend="detectron")
    with pytest.raises(ev.EvaluationError, match="iou_types"):
        ev.score_coco(coco_gt, [result], iou_types=("keypoints",))


# ----------------------------------------------------------------------------- predictions_to_coco


def test_predictions_to_coco_round_trip():
    gen = torch.Generator().manual_seed(0)
    h, w, n = 37, 53, 6  # odd sizes catch a transposed Fortran layout
    xy = torch.rand(n, 2, generator=gen) * 20
    boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=gen) * 20], dim=1)
    labels = torch.randint(1, 4, (n,), generator=gen)
    scores = torch.rand(n, generator=gen)
    masks = torch.rand(n, 1, h, w, generator=gen)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "scores": torch.zeros(0), "masks": torch.zeros(0, 1, h, w)}
    out = {"boxes": boxes, "labels": labels, "scores": scores, "masks": masks}
    results = ev.predictions_to_coco([empty, out], [7, 42], LABEL_TO_CAT, mask_threshold=0.6)
    assert len(results) == n
    json.dumps(results)  # JSON-able: RLE counts are str, numbers are Python floats
    for k, r in enumerate(results):
        assert r["image_id"] == 42 and r["category_id"] == LABEL_TO_CAT[int(labels[k])]
        x0, y0, x1, y1 = boxes[k].tolist()
        assert r["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=1e-5)
        assert r["score"] == pytest.approx(float(scores[k]))
        assert isinstance(r["segmentation"]["counts"], str)
        decoded = mask_util.decode({**r["segmentation"], "counts": r["segmentation"]["counts"].encode()})
        np.testing.assert_array_equal(decoded, (masks[k, 0] > 0.6).numpy().astype(np.uint8))
    # The accelerator path (torch threshold + transpose) must give the same Fortran array as numpy's.
    via_numpy, via_torch = conv._threshold_numpy(masks[:, 0], 0.6), conv._threshold_torch(masks[:, 0], 0.6)
    assert via_numpy.flags.f_contiguous and via_torch.flags.f_contiguous and via_torch.shape == (h, w, n)
    np.testing.assert_array_equal(via_numpy, via_torch)
    bf16 = ev.predictions_to_coco([{**out, "masks": masks.bfloat16()}], [42], LABEL_TO_CAT)
    assert len(bf16) == n and all("segmentation" in r for r in bf16)


def test_predictions_to_coco_errors_and_bbox_only():
    out = {"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "labels": torch.tensor([9]), "scores": torch.ones(1)}
    with pytest.raises(ev.EvaluationError, match="label 9"):
        ev.predictions_to_coco([out], [1], LABEL_TO_CAT)
    with pytest.raises(ev.EvaluationError, match="image ids"):
        ev.predictions_to_coco([out], [1, 2], LABEL_TO_CAT)
    out["labels"] = torch.tensor([3])
    with pytest.raises(ev.EvaluationError, match="masks of shape"):
        ev.predictions_to_coco([{**out, "masks": torch.zeros(2, 1, 8, 8)}], [1], LABEL_TO_CAT)
    (result,) = ev.predictions_to_coco([out], [1], LABEL_TO_CAT)
    assert result == {"image_id": 1, "category_id": 11, "bbox": [0.0, 0.0, 4.0, 4.0], "score": 1.0}
    roi = {**out, "roi_masks": torch.rand(1, 1, 28, 28), "image_size": (8, 8)}
    with pytest.raises(ev.EvaluationError, match="image_size"):
        ev.predictions_to_coco([{k: v for k, v in roi.items() if k != "image_size"}], [1], LABEL_TO_CAT)
    with pytest.raises(ev.EvaluationError, match="both"):
        ev.predictions_to_coco([{**roi, "masks": torch.zeros(1, 1, 8, 8)}], [1], LABEL_TO_CAT)
    with pytest.raises(ev.EvaluationError, match=r"\[N,1,M,M\]"):
        ev.predictions_to_coco([{**roi, "roi_masks": torch.rand(1, 1, 28, 14)}], [1], LABEL_TO_CAT)
    with pytest.raises(ev.EvaluationError, match="mask_threshold"):
        ev.predictions_to_coco([roi], [1], LABEL_TO_CAT, mask_threshold=-0.1)


# ----------------------------------------------------------------------------- ROI masks
# (paste_masks_rle against torchvision's paste, pixel by pixel: tests/trainer/evaluation/test_evaluate_convert.py)


def _real_mask_rcnn() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="R18", norm="GN", min_size=64, max_size=96, fpn_channels=64,
                      representation_size=128, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=30,
                      box_detections_per_img=15)
    model, _ = build_model(cfg, num_classes=len(LABEL_TO_CAT) + 1)
    model.roi_heads.score_thresh = 0.0  # a random model scores low: keep its detections
    return model.eval()


def test_real_mask_rcnn_roi_masks_give_the_pasted_results(coco_gt):
    """Under roi_mask_outputs the model's COCO results, and evaluate()'s APs, are unchanged."""
    model = _real_mask_rcnn()
    dataset = TinyDataset(coco_gt)
    images = [dataset[i][0] + torch.rand(dataset[i][0].shape) * 0.5 for i in range(len(dataset))]
    ids = list(dataset.ids)
    batches = [[image] for image in images]  # evaluate() runs one image per forward pass
    with torch.inference_mode():
        pasted = [o for batch in batches for o in model(batch)]
        with conv.roi_mask_outputs(model) as active:
            roi = [o for batch in batches for o in model(batch)]
        again = model(images[:2])
    assert active and "postprocess" not in vars(model.transform)  # the method is back
    assert all(o["masks"].shape[-2:] == img.shape[-2:] for o, img in zip(again, images))
    for p, r, img in zip(pasted, roi, images):
        assert len(p["boxes"]) > 0 and r["image_size"] == tuple(img.shape[-2:]) and "masks" not in r
        assert r["roi_masks"].shape[-2:] == (28, 28) and torch.equal(p["boxes"], r["boxes"])
    expected = ev.predictions_to_coco(pasted, ids, LABEL_TO_CAT)
    assert ev.predictions_to_coco(roi, ids, LABEL_TO_CAT) == expected

    class NoisyDataset(TinyDataset):
        def __getitem__(self, index):
            return images[index], {"image_id": self.ids[index]}

    metrics = ev.evaluate(model, NoisyDataset(coco_gt), batch_size=3, backend="pycocotools")
    assert metrics == ev.score_coco(coco_gt, expected, backend="pycocotools", image_ids=ids)
    assert "postprocess" not in vars(model.transform)
    with conv.roi_mask_outputs(OracleModel({})) as active:  # no torchvision transform: untouched
        assert not active


# ----------------------------------------------------------------------------- evaluate


class TinyDataset:
    """Stand-in for trainer.data's eval dataset; each image's pixels encode its id."""

    def __init__(self, coco: COCO, ids=None):
        self.coco = coco
        self.label_to_cat = dict(LABEL_TO_CAT)
        self.ids = sorted(IMAGES) if ids is None else list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        h, w = IMAGES[image_id]
        return torch.full((3, h, w), image_id / 255.0), {"image_id": image_id}


class OracleModel(torch.nn.Module):
    """Returns the perfect outputs of the image it is shown, and consumes global RNG like dropout."""

    def __init__(self, outputs: dict[int, dict[str, torch.Tensor]]):
        super().__init__()
        self.head = torch.nn.Linear(1, 1)
        self.outputs = outputs
        self.seen_modes: list[tuple[bool, bool, bool]] = []

    def forward(self, images):
        self.seen_modes.append((self.training, self.head.training, torch.is_inference_mode_enabled()))
        torch.rand(3)
        return [self.outputs[round(float(img[0, 0, 0]) * 255)] for img in images]


def test_evaluate_scores_one_and_has_no_side_effects(coco_gt):
    model = OracleModel(perfect_outputs(coco_gt))
    model.train()
    model.head.eval()  # a frozen part must stay frozen: modes are restored module by module
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(5)
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()

    metrics = ev.evaluate(model, TinyDataset(coco_gt), batch_size=3, backend="pycocotools")

    for key in KEYS:
        assert metrics[key] == pytest.approx(1.0, abs=1e-9), key
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()
    assert model.seen_modes == [(False, False, True)] * 4  # 4 images, one forward pass each
    assert model.training and not model.head.training


def test_a_subset_is_scored_on_its_own_images(coco_gt):
    """A val set may hold part of its split: GT of images never run must not count as misses."""
    outputs = perfect_outputs(coco_gt)
    metrics = ev.evaluate(OracleModel(outputs), TinyDataset(coco_gt, ids=[2, 4]), backend="pycocotools")
    for key in KEYS:
        assert metrics[key] == pytest.approx(1.0, abs=1e-9), key
    results = ev.predictions_to_coco([outputs[2], outputs[4]], [2, 4], LABEL_TO_CAT)
    whole_split = ev.score_coco(coco_gt, results, backend="pycocotools")
    assert whole_split["bbox/AP"] < 0.9
    for backend in ("pycocotools", "faster_coco_eval") if ev._faster_coco_eval_importable() else ("pycocotools",):
        subset = ev.score_coco(coco_gt, results, backend=backend, image_ids=[2, 4])
        assert subset["bbox/AP"] == pytest.approx(1.0) and subset["segm/AP"] == pytest.approx(1.0)


def test_evaluate_unwraps_data_parallel_and_restores_modes_on_error(coco_gt):
    model = OracleModel({})  # knows no image: forward raises KeyError
    model.train()
    state = torch.get_rng_state()
    with pytest.raises(KeyError):
        ev.evaluate(torch.nn.DataParallel(model), TinyDataset(coco_gt), backend="pycocotools")
    assert model.training and model.head.training
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ev.EvaluationError, match="coco"):
        ev.evaluate(model, [1, 2, 3])
    assert pickle.loads(pickle.dumps(ev.collate_batch)) is ev.collate_batch  # DataLoader workers


# ----------------------------------------------------------------------------- batch size and ranks


def _noisy_dataset(coco_gt):
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand((3, *IMAGES[i]), generator=gen) for i in sorted(IMAGES)]

    class NoisyDataset(TinyDataset):
        def __getitem__(self, index):
            return images[index], {"image_id": self.ids[index]}

    return NoisyDataset(coco_gt), images


def test_ap_does_not_depend_on_the_eval_batch_size(coco_gt, tmp_path, monkeypatch):
    """Same checkpoint, batch 1 vs 4: identical bbox and segm AP, although a batched forward of
    these differently sized images would give other detections (GroupNorm sees the padding)."""
    torch.save(_real_mask_rcnn().state_dict(), tmp_path / "ckpt.pt")
    model = _real_mask_rcnn()
    model.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    dataset, images = _noisy_dataset(coco_gt)
    with torch.inference_mode():
        batched = model(images)
        single = [model([image])[0] for image in images]
    assert any(not torch.equal(b["boxes"], s["boxes"]) for b, s in zip(batched, single))
    scored, score = [], ev.score_coco
    monkeypatch.setattr(ev, "score_coco", lambda gt, results, **kw: scored.append(results) or score(gt, results, **kw))
    at = {b: ev.evaluate(model, dataset, batch_size=b, backend="pycocotools") for b in (1, 4)}
    assert at[1] == at[4] and set(at[1]) == set(KEYS)
    # the untrained model's segm AP is 0 at both sizes, so compare the detections themselves, masks included
    assert scored[0] == scored[1] and all("segmentation" in r for r in scored[0]) and len(scored[0]) > 10
    assert at[1] == ev.score_coco(coco_gt, ev.predictions_to_coco(single, list(dataset.ids), LABEL_TO_CAT),
                                  backend="pycocotools", image_ids=list(dataset.ids))


def test_shard_bounds_cover_every_item_once():
    for n in (0, 1, 4, 5, 17):
        for world in (1, 2, 3, 8):
            slices = [ev.shard_bounds(n, r, world) for r in range(world)]
            assert [i for lo, hi in slices for i in range(lo, hi)] == list(range(n))
    with pytest.raises(ev.EvaluationError):
        ev.shard_bounds(4, 2, 2)


def _jittered_outputs(gt):
    """Perfect outputs with shifted boxes and graded scores, so AP lies strictly inside (0, 1)."""
    outputs = perfect_outputs(gt)
    for k, image_id in enumerate(sorted(outputs)):
        out = outputs[image_id]
        out["boxes"] = out["boxes"] + torch.tensor([3.0 * k, 2.0, 3.0 * k, 2.0])
        out["masks"] = torch.roll(out["masks"], shifts=(2, 3 * k), dims=(2, 3))
        out["scores"] = torch.linspace(0.9, 0.3, len(out["scores"])) - 0.05 * k
    return outputs


def _rank_main(rank, store, coco_gt, outputs, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        metrics = ev.evaluate(OracleModel(outputs), TinyDataset(coco_gt), batch_size=1, backend="pycocotools",
                              rank=rank, world_size=2)
        (out_dir / f"rank{rank}.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


def test_sharded_evaluation_equals_one_process(coco_gt, tmp_path):
    """2 gloo ranks, each inferring on its half: rank 0's AP equals single-process evaluation exactly."""
    import multiprocessing as mp

    outputs = _jittered_outputs(coco_gt)
    single = ev.evaluate(OracleModel(outputs), TinyDataset(coco_gt), batch_size=1, backend="pycocotools")
    assert 0.05 < single["bbox/AP"] < 0.95 and 0.05 < single["segm/AP"] < 0.95
    half = ev.evaluate(OracleModel(outputs), TinyDataset(coco_gt, ids=sorted(IMAGES)[:2]), backend="pycocotools")
    assert half != single  # losing a rank's share would show
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_rank_main, args=(r, tmp_path / "store", coco_gt, outputs, tmp_path))
             for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert json.loads((tmp_path / "rank0.json").read_text()) == single
    assert json.loads((tmp_path / "rank1.json").read_text()) == {}


def test_a_training_run_checks_its_scorer_once_on_its_first_evaluation(synth_root, tmp_path, caplog):
    pytest.importorskip("faster_coco_eval")
    from tests.conftest import tiny_config
    from trainer.config import build_config
    from trainer.engine.train_loop import train
    from trainer.engine.reporters import JsonlReporter

    with caplog.at_level(logging.INFO, logger="trainer.evaluation.coco"):
        train(build_config(tiny_config(synth_root, tmp_path / "run", eval={"period": 3})), reporters=[JsonlReporter()])
    inferences = [r for r in caplog.records if r.getMessage().startswith("inference on")]
    checks = [r.getMessage() for r in caplog.records if r.getMessage().startswith("scorer check")]
    assert len(inferences) == 2 and len(checks) == 1, checks  # evaluations at 3 and 6; one check
    assert "matches pycocotools on all 12 APs" in checks[0]
