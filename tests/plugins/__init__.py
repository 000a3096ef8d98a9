"""Test-only plugins the trials load through `ORCHESTRATOR_REPORTERS` (see orchestrator.worker.reporting)."""
