"""Typed errors of the dashboards; one-line messages, caught by `python -m orchestrator` (exit 2).

They derive from `OrchestratorError` so the command line reports them like its own refusals.
"""

from orchestrator.errors import OrchestratorError


class DashboardError(OrchestratorError):
    """Base of every error the dashboards raise on purpose."""


class SweepDataError(DashboardError):
    """The sweep cannot be read: unknown name, no tracking store, no runs."""


class UiError(DashboardError):
    """The MLflow UI could not be started or did not answer."""
