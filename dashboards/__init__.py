"""Dashboards of a sweep: the `report` folder (figures, paper comparison, cost accounting) and the MLflow UI.

    python -m orchestrator report SPEC|FOLDER|NAME    figures + index.html, also logged to the parent run
    python -m orchestrator ui [SPEC|FOLDER|NAME]      the MLflow UI on the sweep's store (127.0.0.1)

`query` is the only module here that talks to MLflow; `figures`, `cost` and `paper` are pure.
"""
