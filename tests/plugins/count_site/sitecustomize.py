"""Counts `TrainConfig` validations in every process that starts with this folder on its PYTHONPATH.

The tests' seam for `tests/test_contract.py`: Python imports `sitecustomize` at start-up, before any
product code, so the driver (`python -m orchestrator`) and every Ray worker of its job (the driver
passes its PYTHONPATH and ORCHESTRATOR_* variables to them) wrap `TrainConfig.model_validate` and
`TrainConfig.__init__` before anything validates. Each validation appends a JSON line to
$ORCHESTRATOR_COUNT_VALIDATIONS/<pid>.jsonl: the config's folder name (its task) and the process's
role ("driver" for `python -m orchestrator`, else "worker"). A sitecustomize and not an import hook in
the product: the product names no test module and reads no test variable.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

_DIR = os.environ.get("ORCHESTRATOR_COUNT_VALIDATIONS")


def _record(cfg) -> None:
    role = "driver" if sys.argv and sys.argv[0].endswith(os.path.join("orchestrator", "__main__.py")) else "worker"
    row = {"task": Path(str(cfg.runtime.output_dir)).name, "role": role, "pid": os.getpid()}
    with open(Path(_DIR) / f"{os.getpid()}.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")


def _install() -> None:
    from trainer.config import TrainConfig

    validate, init = TrainConfig.model_validate.__func__, TrainConfig.__init__

    def model_validate(cls, obj, *args, **kwargs):
        cfg = validate(cls, obj, *args, **kwargs)
        if cls is TrainConfig:
            _record(cfg)
        return cfg

    def __init__(self, **data):
        init(self, **data)
        _record(self)

    TrainConfig.model_validate = classmethod(model_validate)
    TrainConfig.__init__ = __init__


if _DIR:
    try:
        _install()
    except ImportError:  # a process without the repo on its path (e.g. a Ray helper): nothing to count
        pass
