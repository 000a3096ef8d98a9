"""COCO data: nested seeded subsets, training targets, and the (seed, iteration) batch stream."""

import numpy as np
import pytest
import torch

from trainer.config import DataConfig
from trainer.data.coco import StreamBatchSampler, build_datasets, hflip, select_subset, split_paths
from trainer.errors import DatasetError


def test_subsets_are_nested_and_seeded():
    ids = list(range(1000, 6000, 3))
    sizes = [10, 35, 100, 350, len(ids)]
    subsets = [set(select_subset(ids, n, seed=7)) for n in sizes]
    for small, big in zip(subsets, subsets[1:]):
        assert small < big
    assert select_subset(ids, 35, seed=7) == select_subset(ids, 35, seed=7)
    assert select_subset(ids, 35, seed=7) != select_subset(ids, 35, seed=8)
    assert select_subset(ids, "all", seed=7) == sorted(ids)


def test_subset_larger_than_split():
    with pytest.raises(DatasetError, match="asked for 11 images but the split has only 10"):
        select_subset(range(10), 11, seed=0)


def test_missing_annotation_file_says_where(tmp_path):
    with pytest.raises(DatasetError, match=r"instances_train2017\.json.*ROOT/annotations"):
        split_paths(tmp_path, "train2017")


def test_training_targets(synth_root):
    cfg = DataConfig(root=synth_root, train_split="train", val_split="val", hflip=False)
    ds, val, _ = build_datasets(cfg)
    coco = val.coco.__class__(str(synth_root / "annotations" / "instances_train.json"))
    # images without a usable non-crowd instance are skipped in training, kept for evaluation
    empty = [i for i in coco.getImgIds() if not [a for a in coco.imgToAnns[i] if not a["iscrowd"]]]
    assert empty and not set(empty) & set(ds.image_ids)
    assert len(val) == len(val.coco.getImgIds())
    crowd_img = next(i for i in ds.image_ids if any(a["iscrowd"] for a in coco.imgToAnns[i]))
    image, target = ds[(0, ds.image_ids.index(crowd_img))]
    n_plain = sum(1 for a in coco.imgToAnns[crowd_img] if not a["iscrowd"])
    assert target["boxes"].shape == (n_plain, 4) and target["masks"].shape == (n_plain, 64, 64)
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8  # floats only on the device
    # labels are contiguous 1..K; category ids are not
    assert sorted(ds.label_to_cat) == list(range(1, ds.num_classes + 1))
    assert sorted(ds.label_to_cat.values()) == ds.cat_ids != list(range(1, ds.num_classes + 1))
    assert set(target["labels"].tolist()) <= set(ds.label_to_cat)
    # boxes enclose their masks
    for box, mask in zip(target["boxes"], target["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box[0] <= xs.min() and box[2] >= xs.max() + 1 - 1e-4


def test_hflip_moves_boxes_with_masks():
    mask = torch.zeros(1, 8, 10, dtype=torch.uint8)
    mask[0, 2:4, 1:3] = 1
    target = {"boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "masks": mask, "labels": torch.tensor([1])}
    image, flipped = hflip(torch.zeros(3, 8, 10), target)
    assert flipped["boxes"].tolist() == [[7.0, 2.0, 9.0, 4.0]]
    assert flipped["masks"][0, 2:4, 7:9].all() and flipped["masks"].sum() == 4


def test_stream_depends_only_on_seed_and_iteration():
    full = list(StreamBatchSampler(50, 4, seed=3, start_iter=0, total_iters=40))
    resumed = list(StreamBatchSampler(50, 4, seed=3, start_iter=17, total_iters=40))
    assert resumed == full[17:]
    # every image once per epoch
    positions = [p for batch in full for p, _ in batch]
    assert positions == list(range(160))
    first_epoch = [i for batch in full for p, i in batch if p < 50]
    assert sorted(first_epoch) == list(range(50))
    assert full != list(StreamBatchSampler(50, 4, seed=4, start_iter=0, total_iters=40))


def test_stream_splits_global_batch_across_ranks():
    one = list(StreamBatchSampler(30, 4, 0, 0, 10))
    ranks = [list(StreamBatchSampler(30, 4, 0, 0, 10, rank=r, world_size=2)) for r in range(2)]
    for it in range(10):
        assert sorted(ranks[0][it] + ranks[1][it]) == sorted(one[it])
    with pytest.raises(DatasetError, match="not divisible"):
        StreamBatchSampler(30, 3, 0, 0, 10, rank=0, world_size=2)


def test_build_datasets_writes_nothing_and_checks(synth_root):
    cfg = DataConfig(root=synth_root, train_split="train", val_split="val", train_images=50, val_images=10)
    train, val, chosen = build_datasets(cfg)
    assert len(chosen) == 50 and set(train.image_ids) <= set(chosen)
    assert len(val) == 10
    with pytest.raises(DatasetError, match="asked for 500"):
        build_datasets(cfg.model_copy(update={"train_images": 500}))


class _FreezeCount(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        import gc

        return gc.get_freeze_count()


def test_workers_start_with_the_parents_objects_frozen():
    """A worker's garbage collector must not walk (and so copy) what it inherited from the parent."""
    import gc

    from trainer.data.coco import start_workers

    loader = torch.utils.data.DataLoader(_FreezeCount(), batch_size=1, num_workers=1)
    counts = [int(c) for c in start_workers(loader)]
    assert counts and all(c > 1000 for c in counts)
    assert gc.get_freeze_count() == 0  # the parent collects as before
