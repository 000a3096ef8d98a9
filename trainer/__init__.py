"""The shared Mask R-CNN trainer of the sweep: runs alone (`python -m trainer --config trial.yaml`).

It knows nothing of Ray or MLflow: the orchestrator plugs in through `trainer.engine.reporters.Reporter`.
"""
