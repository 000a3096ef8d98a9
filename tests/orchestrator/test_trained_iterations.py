"""`state.trained_iterations`: an attempt killed outright (no segments.jsonl row) still counts its work."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.state.folder import trained_iterations


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_killed_attempt_counts_up_to_where_the_next_one_resumed(tmp_path):
    folder = tmp_path / "trials" / "t"
    # Attempt 1 SIGKILLed after its checkpoint at 6; attempt 2 raised (its row exists) at 9; attempt 3
    # resumed from 9 and finished; a skipped attempt (already finished) trains nothing.
    _write(folder / "attempts.jsonl", [{"attempt": 1, "start_iter": 0}, {"attempt": 2, "start_iter": 6},
                                       {"attempt": 3, "start_iter": 9}, {"attempt": 4, "skipped": "finished"}])
    _write(folder / "segments.jsonl", [{"attempt": 2, "start": 6, "end": 10, "status": "failed"},
                                       {"attempt": 3, "start": 9, "end": 20, "status": "finished"}])
    assert trained_iterations(tmp_path, ["t"]) == 6 + 4 + 11


def test_a_killed_last_attempt_counts_up_to_its_checkpoints_and_metric_rows(tmp_path):
    folder = tmp_path / "trials" / "t"
    _write(folder / "attempts.jsonl", [{"attempt": 1, "start_iter": 0}, {"attempt": 2, "start_iter": 4}])
    _write(folder / "segments.jsonl", [{"attempt": 1, "start": 0, "end": 5, "status": "failed"}])
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "ckpt_0000008.pt").write_bytes(b"")
    _write(folder / "metrics.jsonl", [{"step": s, "train/loss": 1.0} for s in range(5, 12)])
    assert trained_iterations(tmp_path, ["t"]) == 5 + (11 - 4)
    (folder / "metrics.jsonl").unlink()  # the checkpoint alone says where it got
    assert trained_iterations(tmp_path, ["t"]) == 5 + (8 - 4)
    assert trained_iterations(tmp_path, ["missing"]) == 0
