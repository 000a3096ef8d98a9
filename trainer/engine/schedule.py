"""The learning-rate schedule of the paper, as pure functions of the iteration.

"Nx" means N x `iters_per_x` iterations (90k at batch 16). The LR is multiplied by `gamma` at the
last 60k and the last 20k iterations, whatever the total (so 2x drops at 120k/160k, 6x at 480k/520k);
those distances scale with `iters_per_x / 90000` for shorter units. The drops are NOT proportional
to the length, which is why the schedule is a function of (iteration, total, drops), not of progress.
Warmup is linear from `warmup_factor` to 1 over `warmup_iters`.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from trainer.config import ScheduleConfig
from trainer.errors import ConfigError

PAPER_ITERS_PER_X = 90_000


@dataclass(frozen=True)
class Schedule:
    total_iters: int
    drops: tuple[int, ...]
    gamma: float
    warmup_iters: int
    warmup_factor: float

    def lr_factor(self, iteration: int) -> float:
        """Multiplier of the base LR for the step that runs at `iteration` (0-based)."""
        factor = self.gamma ** bisect_right(self.drops, iteration)
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return factor

    @property
    def first_drop(self) -> int:
        """Last iteration (exclusive) run at the base LR: a schedule's fork point from its trunk."""
        return self.drops[0] if self.drops else self.total_iters


def parse_length(length: str) -> float:
    return float(length.strip().lower().removesuffix("x"))


def resolve_schedule(cfg: ScheduleConfig) -> Schedule:
    """Total iterations and drop points for a schedule config (raises ConfigError if impossible)."""
    if cfg.iters is not None:
        total, drops = cfg.iters, tuple(cfg.drops or ())
    else:
        assert cfg.length is not None
        n = parse_length(cfg.length)
        total = round(n * cfg.iters_per_x)
        scale = cfg.iters_per_x / PAPER_ITERS_PER_X
        drops = tuple(total - round(d * scale) for d in cfg.drop_distances)
        if total <= 0:
            raise ConfigError(f"schedule.length: {cfg.length!r} gives no iterations")
        if any(d <= 0 for d in drops):
            raise ConfigError(
                f"schedule.length: {cfg.length} ({total} iterations) is shorter than the first LR drop "
                f"distance ({round(max(cfg.drop_distances) * scale)}); use a longer schedule or explicit "
                "{iters, drops}"
            )
        drops = tuple(sorted(drops))
    if cfg.warmup_iters > total:
        raise ConfigError(f"schedule.warmup_iters ({cfg.warmup_iters}) exceeds the schedule ({total} iterations)")
    return Schedule(total, drops, cfg.gamma, cfg.warmup_iters, cfg.warmup_factor)
