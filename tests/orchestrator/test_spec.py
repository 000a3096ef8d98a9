"""Spec validation: every bad spec is one SpecError line naming the field."""

from __future__ import annotations

import pytest

from orchestrator.errors import SpecError
from orchestrator.sweep.spec import interpolate, load_spec, parse_spec
from tests.orchestrator.conftest import tiny_spec, write_spec


def test_tiny_spec_loads(tmp_path):
    spec = load_spec(write_spec(tmp_path, tiny_spec(tmp_path)))
    assert spec.name == "tiny" and spec.axis_names == ["init", "data", "schedule", "backbone"]
    assert spec.resources.workers == 1


@pytest.mark.parametrize("change, needle", [
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"resources__gpus_per_trail": 1}, "unknown key 'resources.gpus_per_trail'"),
    ({"resources__cpus_per_trial": "many"}, "resources.cpus_per_trial"),
    ({"grid__data": []}, "grid.data: axis has no values"),
    ({"grid__backbone": ["R50", "R152"]}, "grid.backbone[1]: unknown backbone 'R152'"),
    ({"grid__init": ["pretrained:nope"]}, "grid.init[0]: no pretrain job named 'nope'"),
    ({"grid__data": ["lots"]}, "grid.data[0]: expected an image count"),
    ({"grid__schedule": ["long"]}, "grid.schedule[0]"),
    ({"grid__optim.lr": [0.1]}, "grid.optim.lr: unknown axis"),
    ({"grid__model.backbone": ["R50"]}, "grid.model.backbone: set by a named axis (backbone)"),
    ({"base__optim__lrr": 0.1}, "unknown key 'base.optim.lrr'"),
    ({"base__data__root": "/x"}, "base.data.root: set it in the dataset section"),
    ({"exclude": [{"backbone": "R50"}]}, "exclude[0].backbone: 'R50' is not a value of that axis"),
    ({"exclude": [{"color": "red"}]}, "exclude[0].color: not a grid axis"),
    ({"overrides": [{"when": {"data": [8]}, "set": {"optim.nope": 1}}]}, "overrides[0].set.optim.nope"),
    ({"resources__gpus_per_trial": 1.5}, "use a fraction below 1 or a whole number"),
    ({"name": "bad name!"}, "name"),
    ({"dataset__train_split": "train2017"}, "dataset.generate"),
    ({"tracking__metric_period": 0}, "tracking.metric_period"),
    ({"dataset__generate__cls_detection_shapes": False}, "without the detection shapes"),
    ({"tracking__period": 10}, "tracking.period"),
    ({"storage_path": "hdfs://nn/runs"}, "an object store is s3://BUCKET/PREFIX or gs://BUCKET/PREFIX"),
    ({"storage_path": "s3://"}, "name the bucket"),
    ({"storage_path": "s3://b/p", "resources__gpus_per_trial": 2}, "need resources.one_node: true"),
])
def test_bad_specs_name_the_field(tmp_path, change, needle):
    with pytest.raises(SpecError) as err:
        parse_spec(tiny_spec(tmp_path, **change))
    message = str(err.value)
    assert needle in message and "\n" not in message


def test_env_interpolation():
    env = {"ROOT": "/data"}
    assert interpolate({"a": ["${ROOT}/coco", "${MISSING:-x}"]}, env) == {"a": ["/data/coco", "x"]}
    with pytest.raises(SpecError, match="dataset.root: environment variable NOPE is not set"):
        interpolate({"dataset": {"root": "${NOPE}"}}, env)


def test_resources_shapes(tmp_path):
    spec = parse_spec(tiny_spec(tmp_path, resources={"gpus_per_trial": 8, "cpus_per_trial": 40}))
    assert (spec.resources.workers, spec.resources.gpus_per_worker, spec.resources.cpus_per_worker) == (8, 1, 5)
    spec = parse_spec(tiny_spec(tmp_path, resources={"gpus_per_trial": 0.5}))
    assert spec.resources.workers == 1 and spec.resources.gpus_per_worker == 0.5
    spec = parse_spec(tiny_spec(tmp_path, resources={"workers_per_trial": 2, "cpus_per_trial": 2}))
    assert spec.resources.workers == 2 and spec.resources.cpus_per_worker == 1


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_storage_path_is_a_folder_or_an_object_store(tmp_path):
    from orchestrator.sweep.plan import render_plan, storage_needs
    from orchestrator.sweep.expand import expand

    folder = load_spec(write_spec(tmp_path, tiny_spec(tmp_path)))
    assert str(folder.storage_path) == str(tmp_path / "runs") and folder.store_uri is None
    store = load_spec(write_spec(tmp_path, tiny_spec(tmp_path, storage_path="s3://bkt/pre/",
                                                     local_cache=str(tmp_path / "cache"),
                                                     resources={"gpus_per_trial": 2, "one_node": True})))
    assert store.store_uri == "s3://bkt/pre/tiny"
    needs = storage_needs(store)
    assert needs["scratch"] == str(tmp_path / "cache" / "scratch" / "s3" / "bkt" / "pre" / "tiny")
    assert needs["mirror"] == str(tmp_path / "cache" / "mirror" / "s3" / "bkt" / "pre" / "tiny")
    assert render_plan(expand(store)).splitlines()[-1].startswith("storage: object store s3://bkt/pre/tiny ")
