"""Safe by default: loopback-only servers, weights-only checkpoint loading, safe YAML, sanitised trial
names, nothing from a spec executed.

The servers are started for real and their listening sockets read from /proc: the local Ray cluster
`orchestrator.execution.ray_backend.connect` starts (GCS, raylet, workers, agents) and the MLflow UI of
`python -m orchestrator ui`. A malicious pickle, YAML tags and shell/Python text in a spec each try
to create a marker file; the marker must never appear.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator.cli import main as orchestrator_main
from orchestrator.errors import SpecError
from tests.orchestrator.conftest import REPO, tiny_spec, write_spec
from tests.orchestrator.sockets import listening, loopback, tree

_RAY_PROBE = textwrap.dedent("""
    import os, sys
    import orchestrator.execution.ray_backend as rb
    rb.connect(None, {})
    import ray
    ray.get(ray.remote(lambda: os.getpid()).remote())  # a worker process, listening too
    print("READY", flush=True)
    sys.stdin.readline()
    ray.shutdown()
""")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_local_ray_cluster_listens_on_loopback_only(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # connect() must set what it needs itself
    proc = subprocess.Popen([sys.executable, "-c", _RAY_PROBE], cwd=tmp_path, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.strip() == "READY":
                break
        assert lines and lines[-1].strip() == "READY", "".join(lines)[-3000:]
        sockets = listening(tree(proc.pid))
    finally:
        proc.communicate("\n", timeout=300)
    commands = {comm for _, comm, _, _ in sockets}
    print("listening:", sorted({(comm, addr) for _, comm, addr, _ in sockets}))
    assert {"gcs_server", "raylet"} <= commands, sockets  # the probe saw the cluster's servers
    exposed = [s for s in sockets if not loopback(s[2].removeprefix("::ffff:"))]
    assert exposed == [], f"listening beyond 127.0.0.1: {exposed}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mlflow_ui_listens_on_loopback_only(tmp_path):
    from mlflow import MlflowClient

    from dashboards.ui import start_ui

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # the UI opens an existing store only
    server = start_ui(uri, timeout=500, log=tmp_path / "ui.log")
    try:
        sockets = listening(tree(server.process.pid))
    finally:
        server.stop()
    assert sockets, "the UI server listens somewhere"
    assert all(loopback(addr.removeprefix("::ffff:")) for _, _, addr, _ in sockets), sockets


class _Payload:
    """Unpickling this runs `touch MARKER` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_load_weights_only(tmp_path):
    import torch

    from trainer.modeling.backbone import read_state_file
    from trainer.engine.checkpoint import load
    from trainer.errors import CheckpointError, InitError

    marker = tmp_path / "pwned"
    path = tmp_path / "ckpt_0000003.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "iteration": 3, "extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load(path)
    with pytest.raises(InitError, match="cannot read weights file"):
        read_state_file(path)
    assert not marker.exists(), "unpickling ran code"
    with open(path, "rb") as fh:  # the payload is real: a plain unpickler would have run it
        assert b"system" in fh.read()


def test_yaml_is_loaded_safely(tmp_path, capsys):
    from trainer.config import read_yaml
    from trainer.errors import ConfigError

    marker = tmp_path / "pwned"
    text = f"name: !!python/object/apply:os.system ['touch {marker}']\n"
    (tmp_path / "evil.yaml").write_text(text)
    with pytest.raises(ConfigError, match="invalid YAML at line 1"):
        read_yaml(tmp_path / "evil.yaml")
    assert orchestrator_main(["plan", str(tmp_path / "evil.yaml")]) == 2
    assert "invalid YAML at line 1" in capsys.readouterr().err
    assert not marker.exists()


def test_trial_names_are_sanitised_before_they_become_paths(tmp_path):
    from orchestrator.sweep.expand import bind_config, expand
    from orchestrator.sweep.spec import parse_spec

    evil = "checkpoint:/tmp/../../etc/x/../$(touch pwned) `id`;rm -rf ~.pt"
    spec = tiny_spec(tmp_path, grid={"init": ["random", evil], "data": ["all"]})
    exp = expand(parse_spec(spec))
    sweep = tmp_path / "runs" / "tiny"
    for trial in exp.trials:
        assert all(ch.isalnum() or ch in "._-" for ch in trial.name), trial.name
        assert not trial.name.startswith(".")
        out = Path(bind_config(trial, sweep, {}).runtime.output_dir)
        assert out.parent == (sweep / "trials").resolve(), out
    with pytest.raises(SpecError, match="name"):
        parse_spec(tiny_spec(tmp_path, name="../../escape"))


def test_nothing_from_a_spec_is_executed(tmp_path, monkeypatch):
    """Shell and Python text in spec strings stays text: `plan` runs, the markers never appear."""
    monkeypatch.chdir(tmp_path)
    markers = [tmp_path / f"pwned{i}" for i in range(3)]
    spec = tiny_spec(tmp_path, grid={"data": ["all"], "init": [
        f"checkpoint:$(touch {markers[0]}).pt", f"checkpoint:`touch {markers[1]}`.pt",
        f"checkpoint:__import__('os').system('touch {markers[2]}').pt"]})
    spec["dataset"]["root"] = f"{tmp_path}/data;touch {markers[0]}"
    assert orchestrator_main(["plan", str(write_spec(tmp_path, spec))]) == 0
    assert not any(m.exists() for m in markers)
    # Environment interpolation substitutes values; it never evaluates them.
    monkeypatch.setenv("H4_EVIL", f"$(touch {markers[0]})")
    spec["dataset"]["root"] = "${H4_EVIL}"
    assert orchestrator_main(["plan", str(write_spec(tmp_path, spec))]) == 0
    assert not any(m.exists() for m in markers)
