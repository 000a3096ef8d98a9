"""The paper's numbers as data: every one has a source, and a trial finds exactly the cells it reports."""

from __future__ import annotations

from collections import Counter

from dashboards.paper import STANDARD, paper_for, paper_numbers


def test_every_number_has_a_source_and_a_value():
    numbers = paper_numbers()
    assert all(n.source and n.what and n.value > 0 for n in numbers)
    by_source = Counter(n.source for n in numbers)
    assert by_source["Table 1"] == 20  # 2 backbones x 2 inits x 5 schedules
    assert by_source["Table 2"] == 24  # 2 x 2 x (box, mask) x (AP, AP50, AP75)
    assert by_source["Table 3"] == 24
    assert by_source["Section 5.2 (Figures 7-8)"] == 8


def _cell(**trial):
    return sorted({(n.source, n.value) for n in paper_for(paper_numbers(), **trial)})


def test_trial_cells_find_their_paper_numbers():
    assert _cell(backbone="R50", init="random", data="all", schedule="6x", task="bbox", metric="AP") == \
        [("Table 1", 41.3), ("Table 2", 41.3)]
    assert _cell(backbone="R101", init="imagenet", data="all", schedule="3x", task="segm", metric="AP75") == \
        [("Table 2", 39.7)]
    assert _cell(backbone="R50", init="imagenet", data="all", schedule="2x", task="bbox", metric="AP") == \
        [("Table 1", 40.3)]
    # Less data: the best point of the paper's curve, whatever the trial's schedule.
    assert _cell(backbone="R50", init="random", data="3.5k", schedule="2x", task="bbox", metric="AP") == \
        [("Section 5.2 (Figures 7-8)", 9.3)]
    # A pretrain job of the sweep counts as "pre-trained".
    assert _cell(backbone="R50", init="pretrained:x", data="1k", schedule="1x", task="bbox", metric="AP") == \
        [("Section 5.2 (Figures 7-8)", 9.9)]


def test_cells_the_paper_does_not_report_stay_empty():
    assert _cell(backbone="R18", init="random", data="all", schedule="1x", task="bbox", metric="AP") == []
    assert _cell(backbone="R50", init="random", data="all", schedule="1x", task="bbox", metric="AP") == []
    assert _cell(backbone="R50", init="random", data="all", schedule="6x", task="bbox", metric="APs") == []
    # Numbers of other settings (train aug, cascade, TTA, VOC) are listed but never matched.
    others = [n for n in paper_numbers() if n.setting != STANDARD]
    assert others and not any(paper_for(others, backbone=n.backbone, init=n.init, data=n.data, schedule="6x",
                                        task=n.task, metric=n.metric) for n in others)
