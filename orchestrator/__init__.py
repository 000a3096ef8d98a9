"""Sweep orchestrator for "Rethinking ImageNet Pre-training": spec -> grid -> Ray Tune -> MLflow.

`python -m orchestrator {plan,run,resume,status} SPEC`. The pure parts (spec, expand, plan, state,
status, view, monitor) import neither Ray nor MLflow; `ray_backend` and `trainable` are the only
modules that import Ray, `tracking` the only one that imports MLflow.
"""
