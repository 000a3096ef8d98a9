"""What every config level shares: the strict pydantic base (unknown keys refused) and the literals
of backbones and norms (detection and pretraining name them alike)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Backbone = Literal["R18", "R34", "R50", "R101"]
Norm = Literal["GN", "SyncBN", "BN", "FrozenBN"]
