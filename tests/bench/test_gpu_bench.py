"""bench/gpu.py: the CPU smoke mode runs every path (train, inference, evaluation) and prints its table."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_tiny_cpu_run_prints_the_table(bench, capsys):
    assert bench.main(["--device", "cpu", "--tiny", "--threads", "1", "--modes", "fp32,bf16+nhwc"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["fp32"], ["bf16+nhwc"])}
    assert set(rows) == {"fp32", "bf16+nhwc"}
    for cells in rows.values():
        assert float(cells[1]) > 0 and float(cells[4]) > 0 and cells[5] == "yes"  # train, infer img/s, finite
    assert "evaluation (fp32, 4 images, 20 detections/image)" in out  # score_thresh 0: full detections


def test_synthetic_ground_truth_matches_the_training_targets(bench):
    ds = bench.SyntheticInstances(3, (40, 60), num_classes=5, seed=4, with_coco=True)
    image, target = ds[(7, 1)]
    assert image.shape == (3, 40, 60) and target["masks"].shape[1:] == (40, 60)
    anns = ds.coco.imgToAnns[ds.image_ids[1]]
    assert [a["category_id"] for a in anns] == target["labels"].tolist()
    assert [a["area"] for a in anns] == target["masks"].sum(dim=(1, 2)).float().tolist()
    assert torch.equal(ds[(0, 1)][0], image) and ds[1][1] == {"image_id": ds.image_ids[1]}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_without_cuda_it_says_so(bench, capsys):
    assert bench.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
