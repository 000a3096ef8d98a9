"""The worker side: what runs inside a trial's process (the `Task` it is handed, the entry Ray Tune calls, the
DDP gang, what an attempt reports). Imports nothing of the driver side (tests/test_contract.py checks)."""
