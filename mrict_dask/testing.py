"""Real local servers for the test suite and the benchmarks: an S3 endpoint (moto's standalone server).

Not used by the pipeline itself. Each server is a subprocess on 127.0.0.1 with a free port, started by a context
manager that waits until it answers and stops it on exit; ``moto`` is a test/benchmark dependency only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen, what: str, timeout_s: float = 30.0) -> None:
    """Poll ``ready()`` until it is true; RuntimeError if ``proc`` exits or ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if ready():
                return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{what} did not start (exit code {proc.poll()})")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A real S3 endpoint (moto's standalone server); yields its URL, ``http://127.0.0.1:PORT``.

    Data lives in the server's memory; ``reset_moto(endpoint)`` empties it.
    """
    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).status == 200, proc,
                   "moto_server")
        yield endpoint
    finally:
        _stop(proc)


def reset_moto(endpoint: str) -> None:
    """Delete every bucket and object of a moto server."""
    req = urllib.request.Request(endpoint + "/moto-api/reset", method="POST")
    urllib.request.urlopen(req, timeout=10)


def s3_options(endpoint: str, key: str = "testing", secret: str = "testing") -> dict:
    """s3fs storage options for a local endpoint (moto accepts any key and secret)."""
    return {"endpoint_url": endpoint, "key": key, "secret": secret}
