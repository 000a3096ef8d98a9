"""Sweep orchestrator for "Rethinking ImageNet Pre-training": spec -> grid -> Ray Tune -> MLflow.

`python -m orchestrator {plan,run,resume,status,report,ui} SPEC` (`cli`). Rooms by side:

- worker side, what a trial's process loads (`worker/`): `task` (the typed unit of work and the strings
  both sides share), `trainable` (the entry Tune calls), `reporting`, `gang`, `retention`, `object_store` and `store_sync`
  (a sweep on an object store); with `errors`, it imports nothing of the driver side;
- driver side: the sweep's definition (`sweep/`, no Ray, no torch), execution on Ray (`execution/`:
  `run`, the Ray adapter `ray_backend`, `release` — the order tasks start in —, `capacity`,
  `autoscale`, `storage`), MLflow (`tracking/`, `mlflow_runs` the only module that imports it), the
  sweep's folder (`state/`; `mirror`: the driver's copy of an object-store sweep) and the terminal (`views/`).

Only `execution/ray_backend`, `execution/autoscale`, `worker/trainable` and `worker/gang` import Ray. A
trial's folder belongs to `trainer.trial_dir`.
"""
