"""The serialised train index: same targets as pycocotools, compact subsets, a cache keyed by content."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from trainer.data.coco_index import FIELDS, TrainImages, TrainIndex
from trainer.data.dataset_check import AnnotationFile
from trainer.errors import DatasetError


def _entries(folder):
    return [p for p in folder.iterdir() if p.suffix != ".lock"]


def _coco(path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _mixed_doc():
    """Varied sizes; polygons (several per object), compressed and uncompressed RLE, crowd, degenerate."""
    rng = np.random.default_rng(0)
    images, anns = [], []
    for image_id in (3, 8, 9, 20, 31):
        h, w = int(rng.integers(30, 70)), int(rng.integers(30, 70))
        images.append({"id": image_id, "height": h, "width": w, "file_name": f"img{image_id}.png"})
        for k in range(int(rng.integers(0, 4))):
            x, y = float(rng.uniform(0, w / 2)), float(rng.uniform(0, h / 2))
            bw, bh = float(rng.uniform(4, w / 2)), float(rng.uniform(4, h / 2))
            poly = [x, y, x + bw, y + 0.3, x + bw * 0.7, y + bh, x + 0.13, y + bh * 0.9]
            kind = (image_id + k) % 4
            if kind == 0:
                seg = [poly, [v + 1.5 for v in poly[:6]]]
            elif kind in (1, 2):
                mask = mask_util.decode(mask_util.merge(mask_util.frPyObjects([poly], h, w)))
                rle = mask_util.encode(np.asfortranarray(mask))
                seg = {"size": [h, w], "counts": rle["counts"].decode()}
                if kind == 2:  # uncompressed, as COCO's crowd regions are
                    flat = mask.ravel(order="F")
                    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
                    runs = np.diff(bounds).tolist()
                    seg = {"size": [h, w], "counts": [0, *runs] if flat[0] else runs}
            else:
                seg = [poly]
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": [4, 17, 90][k % 3],
                         "bbox": [x, y, bw, bh], "iscrowd": int(kind == 2 and k == 2), "segmentation": seg,
                         "area": bw * bh})
    anns.append({"id": 99, "image_id": 9, "category_id": 4, "bbox": [1, 1, 0.5, 3], "iscrowd": 0,
                 "segmentation": [[1, 1, 1.5, 1, 1.5, 4]], "area": 1.0})  # under a pixel: never trains
    images.append({"id": 40, "height": 32, "width": 48, "file_name": "img40.png"})  # no instance
    cats = [{"id": c, "name": str(c)} for c in (4, 17, 90)]
    return {"images": images, "annotations": anns, "categories": cats}


@pytest.fixture
def mixed(tmp_path):
    doc = _mixed_doc()
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(doc))
    for im in doc["images"]:
        from PIL import Image
        Image.new("RGB", (im["width"], im["height"]), (im["id"], 7, 9)).save(tmp_path / im["file_name"])
    return path


def _expected(coco, image_id):
    anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"] and a["bbox"][2] >= 1 and a["bbox"][3] >= 1]
    return anns, [coco.annToMask(a) for a in anns]


def test_targets_equal_pycocotools(mixed):
    coco = _coco(mixed)
    index = TrainIndex.build(AnnotationFile(mixed).data)
    assert index.image_ids.tolist() == sorted(coco.getImgIds())
    ds = TrainImages(index, mixed.parent)
    label = {c: i + 1 for i, c in enumerate(sorted(coco.getCatIds()))}
    assert len(ds) < len(index)  # an image without usable instances sits out
    checked = 0
    for row, image_id in enumerate(ds.image_ids):
        image, target = ds[(0, row)]
        anns, masks = _expected(coco, image_id)
        info = coco.imgs[image_id]
        assert image.dtype == torch.uint8 and image.shape == (3, info["height"], info["width"])
        assert int(image[0, 0, 0]) == image_id and target["image_id"] == image_id
        assert np.array_equal(target["masks"].numpy(), np.stack(masks))
        assert target["labels"].tolist() == [label[a["category_id"]] for a in anns]
        xyxy = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        assert torch.allclose(target["boxes"], torch.tensor(xyxy).clamp(min=0), atol=1e-4)
        checked += len(anns)
    kinds = [type(a["segmentation"]).__name__ for a in coco.dataset["annotations"] if not a["iscrowd"]]
    assert checked >= 5 and {"list", "dict"} <= set(kinds)


def test_subset_keeps_only_its_records(mixed):
    full = TrainIndex.build(AnnotationFile(mixed).data)
    part = full.subset([31, 8])
    assert part.image_ids.tolist() == [8, 31]
    for image_id in (8, 31):
        a, b = full.rows([image_id])[0], part.rows([image_id])[0]
        assert full.file_name(a) == part.file_name(b)
        assert np.array_equal(full.masks(a), part.masks(b))
        assert np.array_equal(full.boxes[full.ann_offsets[a]:full.ann_offsets[a + 1]],
                              part.boxes[part.ann_offsets[b]:part.ann_offsets[b + 1]])
    assert len(part.labels) == sum(full.ann_offsets[r + 1] - full.ann_offsets[r] for r in full.rows([8, 31]))
    assert len(part.coords) < len(full.coords) or len(part.rle_bytes) < len(full.rle_bytes)
    with pytest.raises(DatasetError, match="does not list"):
        full.subset([5])


def test_cache_is_keyed_by_content_and_memory_mapped(mixed, tmp_path):
    built = TrainIndex.load_or_build(AnnotationFile(mixed), tmp_path / "cache")
    assert len(_entries(tmp_path / "cache")) == 1
    ann = AnnotationFile(mixed)
    cached = TrainIndex.load_or_build(ann, tmp_path / "cache")
    assert ann._data is None  # the JSON was never parsed
    assert all(isinstance(cached.arrays[f], np.memmap) for f in FIELDS)
    assert all(np.array_equal(built.arrays[f], cached.arrays[f]) for f in FIELDS)
    doc = json.loads(mixed.read_text())
    doc["annotations"] = doc["annotations"][1:]
    mixed.write_text(json.dumps(doc))
    changed = TrainIndex.load_or_build(AnnotationFile(mixed), tmp_path / "cache")
    assert len(changed.labels) == len(built.labels) - 1 and len(_entries(tmp_path / "cache")) == 2


def test_workers_read_only_numpy(mixed):
    """What a loader worker receives holds no Python annotation objects: only arrays and scalars."""
    import pickle

    ds = TrainImages(TrainIndex.build(AnnotationFile(mixed).data), mixed.parent)
    payload = pickle.loads(pickle.dumps(ds))
    assert all(isinstance(v, np.ndarray) for v in payload.index.arrays.values())
    assert {k for k, v in vars(payload).items() if isinstance(v, (list, dict))} <= {"cat_ids", "label_to_cat"}
    # a cached (mapped) index travels to spawn/forkserver workers as its folder, not its bytes
    mapped = TrainIndex.load_or_build(AnnotationFile(mixed), mixed.parent / "cache")
    assert mapped.folder is not None and len(pickle.dumps(mapped)) < 500
    again = pickle.loads(pickle.dumps(mapped))
    built = TrainIndex.build(AnnotationFile(mixed).data)
    assert all(np.array_equal(again.arrays[f], built.arrays[f]) for f in FIELDS)


def test_concurrent_loaders_build_once(mixed, tmp_path, monkeypatch):
    """The ranks of a trial start together: one builds the index, the others wait and map it."""
    import threading

    builds = []
    real = TrainIndex.build.__func__

    def counting(cls, data):
        builds.append(1)
        return real(cls, data)

    monkeypatch.setattr(TrainIndex, "build", classmethod(counting))
    got = []
    threads = [threading.Thread(target=lambda: got.append(TrainIndex.load_or_build(AnnotationFile(mixed),
                                                                                   tmp_path / "cache")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(got) == 3 and len(builds) == 1 and all(i.folder is not None for i in got)
