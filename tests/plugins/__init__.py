"""Test-only plugins the trials load as `orchestrator.reporters` entry points (see faults.py)."""
