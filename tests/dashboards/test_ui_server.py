"""`orchestrator ui` on a sweep tracked by a real `mlflow server`: it prints that server's experiment URL
(the server is the UI; nothing is started), and refuses in one line when the server does not answer."""

from __future__ import annotations

import urllib.request

import pytest

from tests.orchestrator.conftest import cli
from bench.harness.mlflow_server import MlflowServer, free_port


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    yield srv
    srv.stop()


def test_ui_on_a_tracking_server_prints_its_experiment_url(server):
    from orchestrator.tracking.mlflow_runs import SweepTracker

    tracker = SweepTracker(server.uri, "served-sweep", "abc123", "test")
    tracker.open_parent("name: served-sweep\n")
    from mlflow import MlflowClient

    exp_id = MlflowClient(server.uri).get_experiment_by_name("served-sweep").experiment_id
    proc = cli("ui", "served-sweep", "--tracking-uri", server.uri, timeout=120)
    assert proc.returncode == 0, proc.stderr
    url = f"{server.uri}/#/experiments/{exp_id}/runs?workflowType=machine_learning&viewStateShareKey=trials"
    assert f"MLflow UI: {url}" in proc.stdout
    with urllib.request.urlopen(url.split("#")[0], timeout=10) as resp:  # the page the URL opens
        assert resp.status == 200


def test_ui_on_an_unknown_sweep_of_a_server_is_refused(server):
    proc = cli("ui", "no-such-sweep", "--tracking-uri", server.uri, timeout=120)
    assert proc.returncode == 2
    assert "unknown sweep 'no-such-sweep'" in proc.stderr.strip().splitlines()[-1]


def test_ui_on_a_silent_server_is_refused_in_one_line():
    uri = f"http://127.0.0.1:{free_port()}"
    proc = cli("ui", "any-sweep", "--tracking-uri", uri, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith(f"does not answer {uri}/health")
