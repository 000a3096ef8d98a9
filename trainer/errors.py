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

    def __init__(self, message: str = "", *args: object):
        # A DataLoader worker's error comes back as DatasetError("Caught DatasetError in DataLoader
        # worker process 0.\nOriginal Traceback ...\ntrainer.errors.DatasetError: <message>"): keep
        # the worker's own line, so the CLI still prints one line naming the file, never a traceback.
        if isinstance(message, str) and message.startswith("Caught DatasetError") and "\n" in message:
            last = [line for line in message.splitlines() if line.strip()][-1]
            message = last.split("DatasetError: ", 1)[-1]
        super().__init__(message, *args)


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
