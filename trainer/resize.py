"""Mask R-CNN's resize rule as arithmetic, without torch: the trainer counts pixels seen with it and the
sweep planner (`orchestrator plan`, which must stay light) estimates a grid's cost with it."""

from __future__ import annotations


def resized_area(height: int, width: int, min_size: int, max_size: int) -> int:
    """Pixels of an image after Mask R-CNN's resize (short side to min_size, long side capped)."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return int(round(height * scale)) * int(round(width * scale))
