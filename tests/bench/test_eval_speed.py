"""bench/eval_speed.py: the smoke mode runs all three pairs and prints their ratios and AP checks."""

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "eval_speed.py"


def test_quick_run_prints_three_ratios_and_equal_aps(capsys):
    spec = importlib.util.spec_from_file_location("bench_eval_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line[:16].strip(): line[16:].split() for line in lines if line[:3] in ("(a)", "(b)", "(c)") and "x (" in line}
    assert set(rows) == {"(a) conversion", "(b) scoring", "(c) end to end"}
    for cells in rows.values():
        assert float(cells[0]) > 0 and float(cells[1]) > 0 and cells[2].endswith("x")
    checks = [line for line in lines if "max |AP difference|" in line]
    assert len(checks) == 3 and "byte-identical: True" in checks[0]
    for line in checks:
        assert float(line.rsplit(" ", 1)[1]) <= 1e-4, line
