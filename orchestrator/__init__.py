"""Sweep orchestrator for "Rethinking ImageNet Pre-training": spec -> grid -> Ray Tune -> MLflow.

`python -m orchestrator {plan,run,resume,status} SPEC`. The pure parts (spec, expand, plan, state,
status, view, monitor) import neither Ray nor MLflow; `ray_backend` and `trainable` are the only
modules that import Ray, `tracking` the only one that imports MLflow.

Two sides. The worker side is what a trial process loads: `task` (the typed unit of work and the
strings both sides share), `trainable` (the worker entry), `trial_report`, `gang`, `retention`,
`errors`; it imports nothing of the driver side, which is everything else (the spec and its
expansion, `release` — the order tasks start in —, `run`, `ray_backend`'s driver part, the monitor,
views, state, MLflow sync and tracking). A trial's folder belongs to `trainer.trial_dir`.
"""
