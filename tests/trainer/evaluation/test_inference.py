"""The one inference loop and its evaluator protocol (trainer.evaluation.inference)."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import numpy as np
import torch

from trainer.evaluation.coco import COCOEvaluator
from trainer.evaluation.inference import DatasetEvaluator, inference_loader, inference_on_dataset
from trainer.evaluation.keypoints import BoxKeypointEvaluator
from trainer.evaluation.voc import VOCEvaluator

TRAINER = Path(__file__).resolve().parents[3] / "trainer"


class Images(torch.utils.data.Dataset):
    """Five images whose pixels encode their id."""

    def __len__(self) -> int:
        return 5

    def __getitem__(self, index: int):
        return torch.full((3, 4, 4), float(index)), {"image_id": 100 + index}


class Echo(torch.nn.Module):
    """Returns its image's id, records its modes, and draws from the global RNG like dropout."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(1, 1)
        self.modes: list[tuple[bool, bool]] = []

    def forward(self, images):
        self.modes.append((self.training, torch.is_inference_mode_enabled()))
        torch.rand(2)
        return [{"id": torch.tensor(int(img[0, 0, 0]))} for img in images]


class Recorder(DatasetEvaluator):
    def __init__(self):
        super().__init__()
        self.calls: list = []

    def reset(self) -> None:
        super().reset()
        self.calls.append("reset")

    def process(self, inputs, outputs) -> None:
        self.calls.append(([t["image_id"] for t in inputs], [int(o["id"]) for o in outputs]))

    def evaluate(self) -> dict[str, float]:
        self.calls.append("evaluate")
        return {"n": float(len(self.calls) - 2)}


def test_the_loop_feeds_the_evaluator_batch_by_batch_one_image_per_forward_without_side_effects():
    model, evaluator = Echo(), Recorder()
    model.train()
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].tolist()
    loader = inference_loader(Images(), batch_size=2, device=torch.device("cpu"))

    metrics = inference_on_dataset(torch.nn.DataParallel(model), loader, evaluator)

    assert evaluator.calls == ["reset", ([100, 101], [0, 1]), ([102, 103], [2, 3]), ([104], [4]), "evaluate"]
    assert metrics == {"n": 3.0}
    assert model.modes == [(False, True)] * 5  # eval mode, inference mode, one image per forward pass
    assert model.training and model.head.training
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.random.get_state()[1].tolist() == states[2]


def test_a_rank_gets_its_slice_of_the_data():
    seen = [[t["image_id"] for _, targets in inference_loader(Images(), batch_size=2, device=torch.device("cpu"),
                                                               rank=r, world_size=2) for t in targets]
            for r in range(2)]
    assert seen == [[100, 101], [102, 103, 104]]


def test_every_detector_is_scored_by_an_evaluator_of_the_protocol():
    for evaluator in (COCOEvaluator, BoxKeypointEvaluator, VOCEvaluator):
        assert issubclass(evaluator, DatasetEvaluator)


def _calls(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            names.add(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""))
    return names


def test_one_inference_loop_and_one_rng_guard_for_the_detectors():
    """Inference mode and forked RNGs appear in one module of the detection trainer: a second loop
    would show up here. (Pretraining is not detection: its classifier's top-1 and its seeded crops
    have their own.)"""
    owners = {str(p.relative_to(TRAINER)) for p in TRAINER.rglob("*.py")
              if p.parent.name != "pretrain" and _calls(p) & {"inference_mode", "fork_rng"}}
    assert owners == {"evaluation/inference.py"}
