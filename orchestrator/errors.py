"""Typed errors of the orchestrator; each message is one line that names the field or the cause.

`python -m orchestrator` catches `OrchestratorError` (and the trainer's `TrainerError`) at the top,
prints the message on one line to stderr and exits with status 2, before anything is launched.
"""


class OrchestratorError(Exception):
    """Base of every error the orchestrator raises on purpose."""


class SpecError(OrchestratorError, ValueError):
    """A sweep spec that cannot be used: unknown key, wrong type, empty axis, duplicate trial."""


class DatasetMissingError(OrchestratorError):
    """The spec's dataset is not on disk (and the spec does not say how to generate it)."""


class InputsMissingError(OrchestratorError):
    """Inputs the sweep reads are not on disk: the dataset, weight files (all named in one refusal)."""


class SpecChangedError(OrchestratorError):
    """`run` on an existing sweep whose stored spec differs from the one given."""


class ClusterError(OrchestratorError):
    """The Ray cluster cannot be reached, or cannot hold even one trial."""


class TrackingError(OrchestratorError):
    """The MLflow tracking store cannot be reached or written."""


class SweepNotFoundError(OrchestratorError):
    """`status`/`resume` on a sweep that has never been started."""


class ForkError(OrchestratorError):
    """A schedule branch cannot start: its trunk ended before the branch's fork point."""


class SweepInterrupted(OrchestratorError):
    """The driver was told to stop (SIGTERM): it stopped cleanly, and `resume` continues the sweep."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by signal {signum}; the trials' checkpoints and Tune's state are saved")
