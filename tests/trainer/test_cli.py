"""`python -m trainer`: bad input ends with one clear line and exit code 2, never a traceback."""

import subprocess
import sys

import pytest
import torch
import torchvision
import yaml

from tests.conftest import tiny_config
from trainer.__main__ import main


def _write(tmp_path, cfg, name="trial.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _fails(capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def base(synth_root, tmp_path):
    return tiny_config(synth_root, tmp_path / "out")


def test_unknown_key(capsys, tmp_path, base):
    base["optim"]["learning_rate"] = 0.1
    _fails(capsys, ["--config", _write(tmp_path, base)], "unknown key 'optim.learning_rate'")


def test_wrong_type(capsys, tmp_path, base):
    _fails(capsys, ["--config", _write(tmp_path, base), "--set", "optim.batch_size=two"], "optim.batch_size")


def test_unknown_schedule(capsys, tmp_path, base):
    base["schedule"] = "forever"
    _fails(capsys, ["--config", _write(tmp_path, base)], "unknown schedule 'forever'")


def test_missing_annotation_file(capsys, tmp_path, base):
    base["data"]["root"] = str(tmp_path / "nowhere")
    _fails(capsys, ["--config", _write(tmp_path, base)], "annotation file not found")


def test_train_images_larger_than_split(capsys, tmp_path, base):
    base["data"]["train_images"] = 100000
    _fails(capsys, ["--config", _write(tmp_path, base)], "asked for 100000 images but the split has only 120")


def test_missing_imagenet_weights(capsys, tmp_path, base, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    torch.hub.set_dir(str(tmp_path / "hub"))
    base["model"]["init"] = "imagenet"
    base["model"]["body_norm"] = "FrozenBN"  # torchvision's BN weights (GN ones have no hub file)
    line = _fails(capsys, ["--config", _write(tmp_path, base)], "resnet18-f37072fd.pth")
    assert "imagenet_weights" in line


def test_checkpoint_of_wrong_architecture(capsys, tmp_path, base):
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pth")
    base["model"]["init"] = f"checkpoint:{tmp_path / 'r50.pth'}"
    _fails(capsys, ["--config", _write(tmp_path, base)], "wrong architecture")


def test_resume_from_checkpoint_of_other_model(capsys, tmp_path, base):
    from trainer.config import build_config
    from trainer.engine.train_loop import train

    train(build_config(base), stop_after=1)
    base["model"]["backbone"] = "R34"
    _fails(capsys, ["--config", _write(tmp_path, base), "--resume"], "does not fit this model")


def test_subprocess_exit_code(tmp_path):
    bad = _write(tmp_path, {"model": {"backbone": "R152"}})
    proc = subprocess.run([sys.executable, "-m", "trainer", "--config", bad], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "model.backbone" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_set_typo_is_reported_against_the_override(capsys, tmp_path, base):
    path = _write(tmp_path, base)
    code = main(["--config", path, "--set", "data.trian_json=x.json"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: --set data.trian_json=x.json: unknown key 'data.trian_json'"), err
    assert str(path) not in err
    base["optim"]["learning_rate"] = 0.1  # a typo in the file is still told against the file
    path = _write(tmp_path, base)
    main(["--config", path, "--set", "optim.batch_size=two"])
    err = capsys.readouterr().err.strip()
    assert f"{path}: unknown key 'optim.learning_rate'" in err and "--set optim.batch_size=two: optim.batch_size" in err
