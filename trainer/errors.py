"""Typed errors of the trainer; each message is one line a user can act on.

Entry points (`python -m trainer`, the orchestrator) catch `TrainerError` and print its message with
a non-zero exit instead of a traceback.
"""


class TrainerError(Exception):
    """Base of every error the trainer raises on purpose."""


class ConfigError(TrainerError, ValueError):
    """A configuration that cannot be used (unknown key, wrong type, impossible value)."""


class DatasetError(TrainerError):
    """A dataset that is missing, malformed, or too small for what was asked."""


class InitError(TrainerError):
    """Initial weights that are missing or do not fit the model (wrong architecture, bad file)."""


class CheckpointError(TrainerError):
    """A checkpoint that cannot be read or belongs to another run."""


class NonFiniteLossError(TrainerError):
    """The training loss became NaN or infinite; carries the iteration and the loss value."""

    def __init__(self, iteration: int, loss: float, parts: dict[str, float] | None = None):
        self.iteration = iteration
        self.loss = loss
        self.parts = dict(parts or {})
        detail = ", ".join(f"{k}={v:.4g}" for k, v in self.parts.items())
        super().__init__(
            f"non-finite loss {loss} at iteration {iteration}" + (f" ({detail})" if detail else "")
        )
