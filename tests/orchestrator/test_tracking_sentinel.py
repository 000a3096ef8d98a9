"""COCO's -1 sentinel (no objects of that size) never reaches MLflow as a value."""

from __future__ import annotations

from orchestrator.tracking.mlflow_runs import MetricLogger


def test_minus_one_ap_is_not_logged(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("sentinel")).info.run_id
    logger = MetricLogger(client, run_id)
    metrics = {"bbox/AP": 0.31, "bbox/APs": -1.0, "segm/APs": -1.0, "segm/APl": 0.4, "train/loss": -0.5}
    assert logger.log(10, metrics) == 3
    assert logger.log_rows([(20, metrics)]) == 3
    logged = client.get_run(run_id).data.metrics
    assert set(logged) == {"bbox/AP", "segm/APl", "train/loss"}
    assert client.get_metric_history(run_id, "bbox/APs") == []


def test_report_still_shows_the_undefined_size_ap_as_na():
    import pandas as pd

    from dashboards.tables import _not_logged_size_ap

    logged = pd.Series({"bbox/AP": 0.31, "bbox/APl": 0.4})  # bbox/APs was -1: not in MLflow
    assert _not_logged_size_ap(logged, "bbox", "APs")
    assert not _not_logged_size_ap(logged, "bbox", "APl")
    assert not _not_logged_size_ap(pd.Series({"train/loss": 1.0}), "bbox", "APs")  # not evaluated yet
