"""A local S3-compatible server for tests and benches: moto's server mode on 127.0.0.1, one bucket.

`s3_server()` starts moto's `ThreadedMotoServer` on a free port (a thread of this process: it ends
with the process, and nothing is left behind), creates the bucket with boto3 and yields the
environment a client needs to reach it (endpoint and dummy credentials, as pyarrow and boto read
them). Ray nodes and drivers started with these variables in their environment see the same store.
"""

from __future__ import annotations

import logging
import os
import urllib.request
from contextlib import contextmanager
from typing import Iterator

REGION = "us-east-1"


@contextmanager
def s3_server(bucket: str = "sweeps") -> Iterator[dict[str, str]]:
    """Yields {AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION}."""
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO: thousands of lines in a sweep's test output.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION}
        # moto keeps its buckets in this process, not in the server: a new server would see the last one's.
        _reset(env)
        client(env).create_bucket(Bucket=bucket)
        try:
            yield env
        finally:
            _reset(env)  # and its memory back (a sweep's checkpoints are hundreds of MB)
    finally:
        server.stop()


def _reset(env: dict[str, str]) -> None:
    request = urllib.request.Request(env["AWS_ENDPOINT_URL"] + "/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=30) as resp:
        resp.read()


def client(env: dict[str, str]):
    """A boto3 S3 client for the server whose `env` `s3_server` yielded."""
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])


@contextmanager
def exported(env: dict[str, str]) -> Iterator[None]:
    """`env` in os.environ for a while (pyarrow in this process, and the nodes and drivers a test starts,
    which copy os.environ, read the endpoint and credentials there); the old values after."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
