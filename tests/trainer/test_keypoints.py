"""Keypoint and box-only tasks: model heads, COCO keypoint data and AP, exact resume, bad files."""

import json

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tests.conftest import tiny_config
from trainer.engine import checkpoint as ckpt
from trainer.__main__ import main as trainer_main
from trainer.config import ModelConfig, build_config
from trainer.engine.train_loop import train
from trainer.evaluation.keypoints import keypoint_results, score_keypoints
from trainer.data.keypoints import CocoBoxKeypointDataset, flip_index
from trainer.modeling.model import build_model
from trainer.engine.reporters import JsonlReporter, Reporter, read_metrics
from trainer.synthetic.datasets import generate_keypoints
from trainer.synthetic.keypoints import KEYPOINT_NAMES

KP_MODEL = {"task": "keypoints", "keypoint_head_channels": 32}


@pytest.fixture(scope="module")
def kp_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("kp")
    generate_keypoints(root, seed=0, num_train=24, num_val=6, width=64, height=64)
    return root


def _kp_config(root, out, **levels):
    cfg = tiny_config(root, out, **levels)
    cfg["model"].update(KP_MODEL)
    cfg["eval"]["batch_size"] = 6
    return cfg


def test_synthetic_keypoint_file_is_coco_and_seeded(kp_root, tmp_path):
    doc = json.loads((kp_root / "annotations" / "person_keypoints_train.json").read_text())
    assert [c["keypoints"] for c in doc["categories"]] == [list(KEYPOINT_NAMES)]
    vis = [v for a in doc["annotations"] for v in a["keypoints"][2::3]]
    assert set(vis) <= {0, 1, 2} and {1, 2} <= set(vis)  # occluded and visible keypoints both occur
    for a in doc["annotations"]:
        k = a["keypoints"]
        assert a["num_keypoints"] == sum(v > 0 for v in k[2::3])
        assert all(k[3 * j] == k[3 * j + 1] == 0 for j in range(17) if k[3 * j + 2] == 0)
    generate_keypoints(tmp_path, seed=0, num_train=24, num_val=6, width=64, height=64)
    again = (tmp_path / "annotations" / "person_keypoints_train.json").read_bytes()
    assert again == (kp_root / "annotations" / "person_keypoints_train.json").read_bytes()


def test_keypoint_flip_swaps_sides_and_is_an_involution(kp_root):
    ds = CocoBoxKeypointDataset(kp_root / "annotations" / "person_keypoints_train.json", kp_root / "train", "keypoints", 17, train=True)
    assert flip_index(KEYPOINT_NAMES)[:5] == [0, 2, 1, 4, 3]
    image, target = ds[(0, 0)]
    flipped_image, flipped = ds.flip(image, target)
    kp, fk = target["keypoints"], flipped["keypoints"]
    # the flipped left shoulder is the mirrored right shoulder (where that one was labeled)
    labeled = kp[:, 6, 2] > 0
    assert torch.equal(fk[labeled, 5, 0], 64 - kp[labeled, 6, 0])
    back_image, back = ds.flip(flipped_image, flipped)
    assert torch.allclose(back["keypoints"], kp) and torch.allclose(back["boxes"], target["boxes"])
    assert "masks" not in target and target["image_size"] == (64, 64)


def _gt_with_results(kp_root):
    coco = COCO(str(kp_root / "annotations" / "person_keypoints_val.json"))
    outputs, ids = [], sorted(coco.getImgIds())
    for image_id in ids:
        anns = [a for a in coco.imgToAnns[image_id] if a["num_keypoints"] > 0]
        kps = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32).reshape(-1, 17, 3)
        outputs.append({"keypoints": kps, "scores": torch.linspace(0.9, 0.5, len(anns)),
                        "labels": torch.ones(len(anns), dtype=torch.int64)})
    return coco, outputs, ids


def test_keypoint_ap_matches_pycocotools(kp_root):
    coco, outputs, ids = _gt_with_results(kp_root)
    perfect = score_keypoints(coco, keypoint_results(outputs, ids, {1: 1}), ids)
    assert perfect["keypoints/AP"] == pytest.approx(1.0)
    # Shift every prediction by 2 px and swap left and right: AP drops, and equals pycocotools run by hand.
    swap = flip_index(KEYPOINT_NAMES)
    worse = [{**o, "keypoints": o["keypoints"][:, swap] + torch.tensor([2.0, 0.0, 0.0])} for o in outputs]
    results = keypoint_results(worse, ids, {1: 1})
    ours = score_keypoints(coco, results, ids)
    ev = COCOeval(coco, coco.loadRes([dict(r) for r in results]), "keypoints")
    ev.params.imgIds = ids
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert [ours[f"keypoints/{n}"] for n in ("AP", "AP50", "AP75", "APm", "APl")] == pytest.approx(list(ev.stats[:5]))
    assert 0.0 <= ours["keypoints/AP"] < 0.9


def test_box_task_builds_no_mask_head_and_keypoint_head_norm():
    box, _ = build_model(ModelConfig(task="box", backbone="R18", fpn_channels=64, representation_size=64), 3)
    assert type(box).__name__ == "FasterRCNN" and not box.roi_heads.has_mask()
    assert not any("mask" in name for name, _ in box.named_parameters())
    kp, _ = build_model(ModelConfig(**KP_MODEL, backbone="R18", fpn_channels=64, representation_size=64), 2)
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in kp.roi_heads.keypoint_head.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in kp.roi_heads.box_head.modules()) == 4
    gn, _ = build_model(ModelConfig(**KP_MODEL, keypoint_head_norm="model", backbone="R18", fpn_channels=64,
                                    representation_size=64), 2)
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in gn.roi_heads.keypoint_head.modules()) == 8


def test_keypoint_resume_is_bit_exact(kp_root, tmp_path):
    class Boom(RuntimeError):
        pass

    class CrashAt(Reporter):  # a preemption after the checkpoint at 3
        def log(self, step, metrics):
            if step == 5 and "train/loss" in metrics:
                raise Boom(step)

    def run(out, extra=(), **kw):
        return train(build_config(_kp_config(kp_root, out)), reporters=[JsonlReporter(), *extra], **kw)

    full = run(tmp_path / "full")
    assert full.status == "finished" and "keypoints/AP" in full.final_metrics
    with pytest.raises(Boom):
        run(tmp_path / "cut", [CrashAt()])
    resumed = run(tmp_path / "cut", resume=True)
    a, b = read_metrics(tmp_path / "full" / "metrics.jsonl"), read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in a if "keypoints/AP" in r] == [3, 6]
    assert any("train/loss_keypoint" in r for r in a)
    assert a == b and resumed.final_metrics == full.final_metrics
    ma = ckpt.load(tmp_path / "full" / "checkpoints" / "ckpt_0000006.pt")["model"]
    mb = ckpt.load(tmp_path / "cut" / "checkpoints" / "ckpt_0000006.pt")["model"]
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.parametrize("break_it, words", [
    (lambda d: d["annotations"][0].update(keypoints=[1, 2, 2]), "needs 'keypoints' as 51 numbers"),
    (lambda d: d["categories"][0].pop("keypoints"), "has no 'keypoints' list"),
    (lambda d: d["annotations"][1]["keypoints"].__setitem__(2, 7), "visibility outside 0/1/2"),
])
def test_bad_keypoint_file_is_refused_with_one_line(kp_root, tmp_path, capsys, break_it, words):
    bad = tmp_path / "bad"
    (bad / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (bad / split).symlink_to(kp_root / split)
        doc = json.loads((kp_root / "annotations" / f"person_keypoints_{split}.json").read_text())
        if split == "train":
            break_it(doc)
        (bad / "annotations" / f"person_keypoints_{split}.json").write_text(json.dumps(doc))
    rc = trainer_main(["--set", "model.task=keypoints", "--set", f"data.root={bad}", "--set", "data.train_split=train",
                       "--set", "data.val_split=val", "--set", "runtime.device=cpu",
                       "--set", f"runtime.output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and words in err and "person_keypoints_train.json" in err


def test_box_trial_on_coco_has_no_masks_anywhere(synth_root, tmp_path):
    cfg = tiny_config(synth_root, tmp_path / "box", schedule={"iters": 2, "drops": [1], "warmup_iters": 1},
                      eval={"period": 0, "batch_size": 8}, data={"val_images": 8})
    cfg["model"]["task"] = "box"
    result = train(build_config(cfg), reporters=[JsonlReporter()])
    assert "bbox/AP" in result.final_metrics and not any(k.startswith("segm") for k in result.final_metrics)
    rows = read_metrics(tmp_path / "box" / "metrics.jsonl")
    assert "train/loss_mask" not in {k for r in rows for k in r} and rows[0]["seen/pixels"] > 0
