"""A real S3-compatible server for tests: moto's standalone server as its own process on 127.0.0.1.

The stores under test talk to it over HTTP exactly as they talk to a bucket; the process is started
on a free port and killed afterwards. Credentials reach the clients only through the environment,
as in production (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    process: subprocess.Popen

    def create_bucket(self, bucket: str) -> None:
        """A plain `PUT /<bucket>` (path style); moto accepts it unsigned."""
        response = httpx.put(f"{self.endpoint_url}/{bucket}", timeout=10)
        assert response.status_code == 200, response.text

    def stop(self) -> None:
        """Kills the server, so that the next call to it fails as an unreachable store does."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@contextlib.contextmanager
def s3_server(timeout_s: float = 60) -> Iterator[S3Server]:
    port = free_port()
    env = {**os.environ, **TEST_CREDENTIALS}
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = S3Server(f"http://127.0.0.1:{port}", process)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"moto server exited with {process.returncode}")
            try:
                httpx.get(f"{server.endpoint_url}/moto-api/", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"moto server not up on port {port} after {timeout_s}s") from None
                time.sleep(0.1)
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def credentials_in_environment() -> Iterator[None]:
    """The test credentials in this process's environment for the duration, then the old values back."""
    old = {key: os.environ.get(key) for key in TEST_CREDENTIALS}
    os.environ.update(TEST_CREDENTIALS)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
