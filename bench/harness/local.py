"""Local-process helpers of the harness: a free TCP port on 127.0.0.1, Ray without token auth."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def auth_disabled() -> Iterator[None]:
    """Ray >= 2.59 turns token auth on for local clusters; a test head and its drivers on one host do
    without (drivers and `ray start` inherit os.environ)."""
    saved_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        yield
    finally:
        if saved_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved_mode
