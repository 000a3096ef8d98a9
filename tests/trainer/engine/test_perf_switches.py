"""Speed switches on CPU: aspect-grouped batches, channels_last, bf16, workers, CUDA-only no-ops."""

import logging

import numpy as np
import pytest
import torch

from tests.conftest import TINY_MODEL, tiny_config
from trainer.engine import checkpoint as ckpt
from trainer.engine import speed
from trainer.data.coco_index import TrainImages, TrainIndex
from trainer.config import DataConfig, RuntimeConfig, build_config
from trainer.data.coco import StreamBatchSampler
from trainer.engine.train_loop import Trainer, train
from trainer.errors import ConfigError, DatasetError
from trainer.modeling.model import build_model
from trainer.engine.reporters import JsonlReporter, read_metrics

GROUPS = [0, 1, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0]  # 23 images, 8 portrait


def _grouped(start=0, total=30, seed=5, batch=4, **kw):
    return list(StreamBatchSampler(len(GROUPS), batch, seed, start, total, groups=GROUPS, **kw))


def test_grouped_stream_is_a_function_of_seed_and_iteration():
    full = _grouped()
    assert _grouped(start=13) == full[13:]
    assert full == _grouped() and full != _grouped(seed=6)
    assert all(len(b) == 4 for b in full)
    assert [p for b in full for p, _ in b] == list(range(30 * 4))  # slot j of iteration i: i*B + j


def test_grouped_batches_share_an_orientation():
    per_epoch = len(GROUPS) // 4  # 5 batches; 3 images sit out each epoch
    full = _grouped(total=4 * per_epoch)
    for e in range(4):
        epoch = [[i for _, i in b] for b in full[e * per_epoch:(e + 1) * per_epoch]]
        mixed = [b for b in epoch if len({GROUPS[i] for i in b}) > 1]
        assert len(mixed) <= 1  # only the groups' remainders may share a batch
        images = [i for b in epoch for i in b]
        assert len(set(images)) == len(images) == per_epoch * 4  # no image twice in an epoch
    epochs = [sorted(i for b in full[e * per_epoch:(e + 1) * per_epoch] for _, i in b) for e in range(4)]
    assert len({tuple(e) for e in epochs}) > 1  # a different 3 sit out in different epochs


def test_grouped_stream_splits_across_ranks_and_checks_inputs():
    one = _grouped(total=12)
    ranks = [_grouped(total=12, rank=r, world_size=2) for r in range(2)]
    for it in range(12):
        assert sorted(ranks[0][it] + ranks[1][it]) == sorted(one[it])
    with pytest.raises(DatasetError, match="aspect groups for"):
        StreamBatchSampler(5, 2, 0, 0, 3, groups=[0, 1])
    with pytest.raises(DatasetError, match="at least optim.batch_size=8"):
        StreamBatchSampler(3, 8, 0, 0, 3, groups=[0, 1, 0])


def test_aspect_groups_read_from_annotations(tmp_path):
    images = [{"id": 1, "width": 640, "height": 480, "file_name": "a.jpg"},
              {"id": 2, "width": 480, "height": 640, "file_name": "b.jpg"},
              {"id": 3, "width": 500, "height": 500, "file_name": "c.jpg"}]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 9, 9], "iscrowd": 0,
             "segmentation": [[1, 1, 10, 1, 10, 10, 1, 10]]} for i in (1, 2, 3)]
    coco = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}
    assert TrainImages(TrainIndex.build(coco), tmp_path).aspect_groups() == [0, 1, 0]


def test_switch_defaults_and_validation():
    rt, dc = RuntimeConfig(), DataConfig()
    assert (rt.cudnn_benchmark, rt.tf32, rt.channels_last, rt.compile_backbone) == (False, True, False, False)
    assert (dc.pin_memory, dc.persistent_workers, dc.aspect_grouping) == (True, False, False)
    with pytest.raises(ConfigError, match="runtime.channels_last"):
        build_config({"runtime": {"channels_last": "sideways"}})
    with pytest.raises(ConfigError, match="unknown key 'data.aspect_groupin'"):
        build_config({"data": {"aspect_groupin": True}})


def test_cuda_only_switches_are_logged_noops_on_cpu(caplog):
    cpu = torch.device("cpu")
    caplog.set_level(logging.DEBUG, logger="trainer.engine.speed")
    before = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32)
    speed.apply_backend_flags(RuntimeConfig(cudnn_benchmark=True, tf32=False), cpu)
    assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32) == before
    assert not speed.make_scaler("fp16", cpu).is_enabled()
    assert not speed.pin_memory(DataConfig(pin_memory=True), cpu)
    assert not speed.persistent_workers(DataConfig(persistent_workers=True, num_workers=0))
    assert speed.persistent_workers(DataConfig(persistent_workers=True, num_workers=1))
    text = caplog.text
    assert "CUDA-only: no-ops on cpu" in text and "grad scaler is CUDA-only" in text
    assert "data.pin_memory is CUDA-only" in text


def test_channels_last_and_compile_go_to_the_backbone():
    model, _ = build_model(TINY_MODEL_CFG, num_classes=3)
    keys = list(model.state_dict())
    speed.prepare_model(model, RuntimeConfig(channels_last=True, compile_backbone=True))
    assert list(model.state_dict()) == keys  # checkpoints keep their keys
    assert model.backbone._compiled_call_impl is not None  # compiled in place ...
    assert model._compiled_call_impl is None and model.roi_heads._compiled_call_impl is None  # ... alone
    conv = model.backbone.body.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


TINY_MODEL_CFG = build_config({"model": TINY_MODEL}).model


def _switched(root, out, **levels):
    cfg = tiny_config(root, out, schedule={"iters": 4, "drops": [3], "warmup_iters": 1},
                      eval={"period": 0, "batch_size": 4}, checkpoint={"period": 2})
    cfg["data"].update(num_workers=1, persistent_workers=True, aspect_grouping=True, prefetch_factor=2)
    cfg["optim"]["amp"] = "bf16"
    cfg["runtime"].update(channels_last=True, cudnn_benchmark=True, tf32=False)
    for level, values in levels.items():
        cfg[level].update(values)
    return build_config(cfg)


def test_switched_step_runs_bf16_in_channels_last(synth_root, tmp_path):
    trainer = Trainer(_switched(synth_root, tmp_path / "s"))
    seen = {}
    trainer.bare_model.backbone.body.conv1.register_forward_hook(
        lambda m, args, out: seen.update(input=args[0], out=out))
    images, targets = next(iter(trainer.loader()))
    trainer.model.train()
    trainer.train_step(images, targets)
    assert seen["out"].dtype == torch.bfloat16  # autocast reached the backbone
    assert seen["input"].is_contiguous(memory_format=torch.channels_last) and not seen["input"].is_contiguous()
    assert trainer._groups == [0] * len(trainer.train_set)  # the synthetic images are square
    assert np.isfinite(trainer.state.window_sums.cpu().numpy()).all()


def test_switched_run_resumes_bit_exact(synth_root, tmp_path):
    """Grouped batches, one persistent worker and channels_last: a cut-and-resumed run equals the
    uninterrupted one, losses, AP and weights. (fp32: bf16 autocast is stateless, and ~4x slower on CPU.)"""
    def cfg(name):
        return _switched(synth_root, tmp_path / name, optim={"amp": "none"})

    full = train(cfg("full"), reporters=[JsonlReporter()])
    train(cfg("cut"), reporters=[JsonlReporter()], stop_after=2)
    resumed = train(cfg("cut"), reporters=[JsonlReporter()], resume=True)
    rows = [read_metrics(tmp_path / name / "metrics.jsonl") for name in ("full", "cut")]
    assert rows[0] == rows[1] and len([r for r in rows[0] if "train/loss" in r]) == 4
    assert resumed.final_metrics == full.final_metrics and "segm/AP" in full.final_metrics
    ma = ckpt.load(tmp_path / "full" / "checkpoints" / "ckpt_0000004.pt")["model"]
    mb = ckpt.load(tmp_path / "cut" / "checkpoints" / "ckpt_0000004.pt")["model"]
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
