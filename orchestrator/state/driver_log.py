"""The sweep's log file, and Ray/Tune's chatter kept out of the terminal.

While a driver runs a sweep, every log record (ours, Ray's, Tune's) is written in full, tracebacks
included, to SWEEP/driver.log. Ray's and Tune's own records (a lost node's traceback, a restore's
"Failed to fetch metrics ... FileNotFoundError") reach the terminal as one line each, warnings and
errors only, naming that file; our own records keep going where the CLI sends them.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TextIO

LOG_NAME = "driver.log"
THIRD_PARTY = ("ray",)  # Tune, Train and Ray core log under "ray.*"; Ray gives "ray" its own stderr handler


class OneLine(logging.Formatter):
    """`LEVEL name: first line of the message [(ExcType)] (full text: PATH)`: no traceback."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def format(self, record: logging.LogRecord) -> str:
        lines = record.getMessage().strip().splitlines() or [""]
        first = lines[0].rstrip(":")
        exc = record.exc_info[1] if record.exc_info else None
        cause = f" ({type(exc).__name__})" if exc is not None else ""
        more = f" (full text: {self.path})" if exc is not None or len(lines) > 1 else ""
        return f"{record.levelname} {record.name}: {first}{cause}{more}"


@contextmanager
def sweep_log(sweep_dir: Path, terminal: TextIO | None = None) -> Iterator[Path]:
    """Route as described above while the block runs; yields the log file's path."""
    path = Path(sweep_dir) / LOG_NAME
    full = logging.FileHandler(path)
    full.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    short = logging.StreamHandler(terminal or sys.stderr)
    short.setLevel(logging.WARNING)
    short.setFormatter(OneLine(path))
    root = logging.getLogger()
    root.addHandler(full)
    saved = {}
    for name in THIRD_PARTY:
        lg = logging.getLogger(name)
        saved[name] = (list(lg.handlers), lg.propagate)
        for handler in saved[name][0]:
            lg.removeHandler(handler)
        lg.propagate = False  # not through the CLI's (full-text) handler on the root logger
        lg.addHandler(full)
        lg.addHandler(short)
    try:
        yield path
    finally:
        for name, (handlers, propagate) in saved.items():
            lg = logging.getLogger(name)
            lg.removeHandler(full)
            lg.removeHandler(short)
            for handler in handlers:
                lg.addHandler(handler)
            lg.propagate = propagate
        root.removeHandler(full)
        full.close()
