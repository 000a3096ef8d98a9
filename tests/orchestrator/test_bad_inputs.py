"""Bad input, one table: each malformed sweep spec or trainer config is one stderr line naming the field,
exit code 2, nothing launched and nothing written to MLflow.

Sweep specs go through `python -m orchestrator run` (its `main`, in this process, so that "no Ray
started" is `ray.is_initialized()` and a case costs no interpreter start; two cases also run as real
subprocesses to check the whole stderr is that one line). Trainer configs go through `python -m
trainer` (its `main`). Counted per case: exit code, error lines, the field in the line, and that no
sweep folder, no mlflow.db, no Ray and (trainer) no metrics or checkpoints exist afterwards.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from orchestrator.cli import main as orchestrator_main
from tests.orchestrator.conftest import TINY_SWEEP_MODEL, cli, set_path, tiny_spec, write_spec

Edit = Callable[[dict[str, Any], Path], Any]


def _set(dotted: str, value: Any) -> Edit:
    def edit(spec: dict[str, Any], tmp: Path) -> None:
        set_path(spec, dotted.split("."), value)
    return edit


def _axis(key: str, values: list[Any]) -> Edit:
    """A grid axis named by a dotted trainer key (one flat key, not nested)."""
    return lambda spec, tmp: spec["grid"].__setitem__(key, values)


def _drop_generate(root: str) -> Edit:
    def edit(spec: dict[str, Any], tmp: Path) -> None:
        spec["dataset"] = {"root": root, "train_split": "train", "val_split": "val"}
    return edit


def _imagenet_r50(weights: str) -> Edit:
    def edit(spec: dict[str, Any], tmp: Path) -> None:
        spec["grid"].update({"init": ["random", "imagenet"], "backbone": ["R50"]})
        set_path(spec, ["base", "model", "imagenet_weights"], weights)
    return edit


def _raw(text: str) -> Edit:
    return lambda spec, tmp: text  # the spec file's text instead of the dict


# (case id, edit of the tiny spec, what the error line must say)
SPEC_CASES: list[tuple[str, Edit, str]] = [
    ("yaml-syntax", _raw("name: tiny\ngrid: {data: [all, 8}\n"), "line 2"),
    ("unknown-top-key", _set("bogus", 1), "unknown key 'bogus'"),
    ("unknown-nested-key", _set("resources.gpu", 1), "unknown key 'resources.gpu'"),
    ("wrong-type", _set("retry.max_failures", "twice"), "retry.max_failures"),
    ("unknown-retention", _set("keep_checkpoints", "latest"), "keep_checkpoints"),
    ("bad-name", _set("name", "../escape"), "name:"),
    ("empty-axis", _set("grid.schedule", []), "grid.schedule: axis has no values"),
    ("duplicate-axis-value", _set("grid.data", ["all", 8, 8]), "grid.data[2]: 8 repeats grid.data[1]"),
    ("duplicate-after-normalising", _set("grid.schedule", ["1x", " 1x"]), "grid.schedule[1]"),
    ("unknown-backbone", _set("grid.backbone", ["R152"]), "grid.backbone[0]: unknown backbone 'R152'"),
    ("bad-image-count", _set("grid.data", [-5]), "grid.data[0]"),
    ("data-larger-than-split", _set("grid.data", ["all", 100]), "grid.data[1]: 100 training images, but the "
                                                               "generated train split has 16"),
    ("unknown-axis", _axis("optim.nope", [1, 2]), "grid.optim.nope: unknown axis"),
    ("axis-owned-by-named", _axis("model.backbone", ["R18"]), "grid.model.backbone: set by a named axis"),
    ("unknown-pretrain-job", _set("grid.init", ["pretrained:nojob"]), "grid.init[0]: no pretrain job named"),
    ("base-unknown-key", _set("base.optim.lr", 0.1), "unknown key 'base.optim.lr'"),
    ("base-wrong-type", _set("base.optim.base_lr", "fast"), "base.optim.base_lr"),
    ("base-sets-dataset-key", _set("base.data.root", "/elsewhere"), "base.data.root: set it in the dataset"),
    ("empty-exclude-rule", _set("exclude", [{}]), "exclude[0]: an empty rule"),
    ("exclude-unknown-value", _set("exclude", [{"data": 4}]), "exclude[0].data: 4 is not a value"),
    ("override-unknown-key", _set("overrides", [{"when": {"data": "all"}, "set": {"optim.nope": 1}}]),
     "overrides[0].set.optim.nope"),
    ("impossible-resources-split", _set("resources", {"gpus_per_trial": 2, "workers_per_trial": 3}),
     "resources"),
    ("impossible-resources-zero-cpu", _set("resources.cpus_per_trial", 0), "resources.cpus_per_trial"),
    ("unset-env-var", _set("dataset.root", "${H4_NO_SUCH_VAR}/data"), "dataset.root: environment variable "
                                                                     "H4_NO_SUCH_VAR is not set"),
    ("dataset-path-missing", _drop_generate("/nonexistent/h4/coco"), "dataset not found"),
    ("tracking-dir-missing", _set("tracking_uri", "sqlite:////nonexistent/h4/mlflow.db"),
     "tracking_uri sqlite:////nonexistent/h4/mlflow.db: folder /nonexistent/h4 does not exist"),
    ("tracking-file-store", _set("tracking_uri", "file:///tmp/h4-mlruns"), "tracking_uri file:///tmp/h4-mlruns"),
    ("ray-address-malformed", _set("ray_address", "nonsense"), "ray_address 'nonsense'"),
    ("yaml-python-tag", _raw("name: !!python/object/apply:os.system ['true']\n"), "line 1"),
    ("imagenet-gn-without-gn-weights", _set("grid.init", ["random", "imagenet"]), "model.body_norm: FrozenBN"),
    ("imagenet-gn-weights-file-missing", _imagenet_r50("/nonexistent/h13/R-50-GN.pkl"),
     "model.imagenet_weights file not found: /nonexistent/h13/R-50-GN.pkl"),
    # PyYAML keeps the last of two keys silently: a second resources block once made 8 GPUs per trial 1.
    ("duplicate-key", lambda spec, tmp: yaml.safe_dump(spec, sort_keys=False) + "resources: {cpus_per_trial: 2}\n",
     "duplicate key 'resources' (first at line"),
    ("duplicate-nested-key", _raw("name: tiny\ndataset:\n  root: a\n  root: b\ngrid: {data: [all]}\n"),
     "line 4: duplicate key 'root' (first at line 3)"),
]


def _write(tmp: Path, edit: Edit) -> Path:
    spec = tiny_spec(tmp)
    raw = edit(spec, tmp)
    path = tmp / "spec.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(spec, sort_keys=False))
    return path


def _nothing_started(tmp: Path) -> None:
    import ray

    assert not ray.is_initialized(), "a refused sweep must not start Ray"
    assert not (tmp / "runs").exists(), "a refused sweep must not create its folder"
    assert not (tmp / "mlflow.db").exists(), "a refused sweep must not touch MLflow"
    assert not list(tmp.glob("**/mlruns")), "a refused sweep must not touch MLflow"


@pytest.mark.parametrize("case, edit, needle", SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_bad_spec(tmp_path, capsys, case, edit, needle):
    path = _write(tmp_path, edit)
    code = orchestrator_main(["run", str(path), "--no-view"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(err) == 1, err
    assert needle in err[0], err[0]
    assert err[0].startswith("python -m orchestrator run: error: ")
    _nothing_started(tmp_path)


def test_plan_refuses_imagenet_gn_without_weights(tmp_path, capsys):
    path = _write(tmp_path, _set("grid.init", ["random", "imagenet"]))
    assert orchestrator_main(["plan", str(path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "body_norm" in err[0] and "model.imagenet_weights" in err[0], err


def test_paper_grid_plans_without_weights_and_run_refuses_with_the_url(tmp_path, capsys, monkeypatch):
    spec = Path(__file__).resolve().parents[2] / "sweeps" / "paper_grid.yaml"
    monkeypatch.chdir(tmp_path)
    for var in ("IMAGENET_GN_R50", "IMAGENET_GN_R101"):
        monkeypatch.delenv(var, raising=False)
    assert orchestrator_main(["plan", str(spec)]) == 0
    assert "imagenet-all-2x-R50" in capsys.readouterr().out
    assert orchestrator_main(["run", str(spec), "--no-view"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "weights/R-50-GN.pkl" in err[0], err
    assert "https://dl.fbaipublicfiles.com/detectron/ImageNetPretrained/47261647/R-50-GN.pkl" in err[0]
    _nothing_started(tmp_path)


def test_paper_grid_run_names_every_missing_input_at_once(tmp_path, capsys, monkeypatch):
    """Neither COCO nor the GN weights: one refusal names the dataset and each weights file."""
    spec = Path(__file__).resolve().parents[2] / "sweeps" / "paper_grid.yaml"
    monkeypatch.chdir(tmp_path)
    for var in ("IMAGENET_GN_R50", "IMAGENET_GN_R101", "COCO_ROOT"):
        monkeypatch.delenv(var, raising=False)
    assert orchestrator_main(["run", str(spec), "--no-view"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert "3 inputs missing" in err[0] and "dataset not found" in err[0], err[0]
    assert "weights/R-50-GN.pkl" in err[0] and "weights/R-101-GN.pkl" in err[0], err[0]
    _nothing_started(tmp_path)
    (tmp_path / "weights").mkdir()  # with the weights in place, the dataset alone is named
    for name in ("R-50-GN.pkl", "R-101-GN.pkl"):
        (tmp_path / "weights" / name).write_bytes(b"x")
    assert orchestrator_main(["run", str(spec), "--no-view"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("python -m orchestrator run: error: dataset not found"), err


def test_directory_as_spec_is_named_a_directory(tmp_path, capsys):
    for command in ("plan", "run"):
        assert orchestrator_main([command, str(tmp_path)]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and f"{tmp_path} is a directory, not a spec file" in err[0], err
    _nothing_started(tmp_path)


def test_plan_exits_2_when_a_trial_cannot_fit_the_gpus(tmp_path, capsys):
    path = write_spec(tmp_path, tiny_spec(tmp_path, resources={"gpus_per_trial": 16, "cpus_per_trial": 16}))
    assert orchestrator_main(["plan", str(path), "--gpus", "8"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--gpus 8: a cluster of 8 GPUs cannot hold one trial (16 GPUs per trial" in err[0]
    assert orchestrator_main(["plan", str(path), "--gpus", "16"]) == 0
    assert "at most 1 trial(s) at a time" in capsys.readouterr().out


def test_bare_dollar_var_is_warned_not_expanded(tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setenv("H27_ROOT", "/expanded")
    path = write_spec(tmp_path, tiny_spec(tmp_path, dataset__root="$H27_ROOT/data"))
    with caplog.at_level("WARNING", logger="orchestrator.sweep.spec"):
        assert orchestrator_main(["plan", str(path), "--show", "0"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["root"].endswith("$H27_ROOT/data")
    warned = [r.getMessage() for r in caplog.records if "without braces" in r.getMessage()]
    assert warned == ["dataset.root: '$H27_ROOT/data' has $H27_ROOT without braces: not expanded (write "
                      "${H27_ROOT})"], warned


def test_spec_changed_between_run_and_resume(tmp_path, capsys):
    from orchestrator.sweep.expand import expand
    from orchestrator.sweep.spec import parse_spec
    from orchestrator.state.folder import create_sweep

    sweep = tmp_path / "runs" / "tiny"
    create_sweep(sweep, expand(parse_spec(tiny_spec(tmp_path))), "old\n", "v0")
    before = sorted(p.name for p in sweep.rglob("*"))
    path = write_spec(tmp_path, tiny_spec(tmp_path, base__optim__base_lr=0.03))
    assert orchestrator_main(["resume", str(path), "--no-view"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "was started from a different spec" in err[0] and "optim.base_lr" in err[0]
    assert sorted(p.name for p in sweep.rglob("*")) == before
    assert not (tmp_path / "mlflow.db").exists()
    import ray

    assert not ray.is_initialized()


@pytest.mark.parametrize("case", ["unknown-nested-key", "data-larger-than-split"])
def test_bad_spec_in_a_real_process(tmp_path, case):
    """The whole stderr of `python -m orchestrator run` is the one line (no log line, no traceback)."""
    edit, needle = {c[0]: (c[1], c[2]) for c in SPEC_CASES}[case]
    out = cli("run", str(_write(tmp_path, edit)), "--no-view", timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and needle in out.stderr, out.stderr
    _nothing_started(tmp_path)


# ----------------------------------------------------------------------------------------------
# Trainer configs (`python -m trainer --config FILE [--set ...]`)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from trainer.synthetic.datasets import generate_detection

    root = tmp_path_factory.mktemp("data")
    generate_detection(root, seed=0, num_train=6, num_val=2, width=64, height=64)
    return root


def _trainer_cfg(data: Path, out: Path) -> dict[str, Any]:
    return {"model": dict(TINY_SWEEP_MODEL), "data": {"root": str(data), "train_split": "train", "val_split": "val",
                                                     "num_workers": 0},
            "optim": {"batch_size": 1}, "schedule": {"iters_per_x": 2, "warmup_iters": 1},
            "eval": {"period": 2, "batch_size": 2}, "checkpoint": {"period": 2},
            "runtime": {"device": "cpu", "threads": 1, "output_dir": str(out)}}


# (case id, change of the config dict or raw text, --set overrides, what the error line must say)
TRAINER_CASES: list[tuple[str, Any, list[str], str]] = [
    ("yaml-syntax", "optim: {base_lr: 0.1\n", [], "line"),
    ("duplicate-key", "optim: {base_lr: 0.1}\nschedule: 1x\noptim: {base_lr: 0.2}\n", [],
     "line 3: duplicate key 'optim' (first at line 1)"),
    ("unknown-key", {"optim": {"lr": 0.1}}, [], "unknown key 'optim.lr'"),
    ("wrong-type", {"optim": {"base_lr": "fast"}}, [], "optim.base_lr"),
    ("bad-override", {}, ["optim.base_lr=-1"], "optim.base_lr"),
    ("unknown-override-key", {}, ["optim.nope=1"], "optim.nope"),
    ("unknown-schedule", {"schedule": {"length": "2y"}}, [], "schedule"),
    ("subset-larger-than-split", {"data": {"train_images": 100}}, [], "100"),
    ("data-root-missing", {"data": {"root": "/nonexistent/h4/coco"}}, [], "/nonexistent/h4/coco"),
    ("init-checkpoint-missing", {"model": {"init": "checkpoint:/nonexistent/h4/w.pt"}}, [],
     "/nonexistent/h4/w.pt"),
    ("yaml-python-tag", "runtime: !!python/object/apply:os.system ['true']\n", [], "line 1"),
]


def _merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in change.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


@pytest.mark.parametrize("case, change, sets, needle", TRAINER_CASES, ids=[c[0] for c in TRAINER_CASES])
def test_bad_trainer_config(tmp_path, capsys, tiny_data, case, change, sets, needle):
    from trainer.__main__ import main as trainer_main

    out = tmp_path / "out"
    path = tmp_path / "trial.yaml"
    if isinstance(change, str):
        path.write_text(change)
    else:
        path.write_text(yaml.safe_dump(_merge(_trainer_cfg(tiny_data, out), change)))
    args = ["--config", str(path)] + [a for s in sets for a in ("--set", s)]
    code = trainer_main(args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists(), "nothing may train"
    assert not (tmp_path / "mlflow.db").exists()


def test_table_size():
    """The issue asks for at least 20 malformed inputs."""
    assert len(SPEC_CASES) + 1 + len(TRAINER_CASES) >= 20
