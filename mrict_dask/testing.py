"""Real local servers for the test suite and the benchmarks: an S3 endpoint (moto's standalone server), a PACS
(Orthanc with its DICOMweb plugin) and a byte-counting HTTP proxy to put in front of it.

Not used by the pipeline itself. Each server is a subprocess on 127.0.0.1 with a free port, started by a context
manager that waits until it answers and stops it on exit; ``moto`` is a test/benchmark dependency only.
"""

from __future__ import annotations

import contextlib
import json
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


# ------------------------------------------------------------------------------------------------ Orthanc
ORTHANC_EXE = "/usr/sbin/Orthanc"
ORTHANC_DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
DICOMWEB_ROOT = "/dicom-web"


def orthanc_missing() -> str:
    """Why a real Orthanc with its DICOMweb plugin cannot be started here ('' when it can)."""
    for path, package in ((ORTHANC_EXE, "orthanc"), (ORTHANC_DICOMWEB_PLUGIN, "orthanc-dicomweb")):
        if not os.path.exists(path):
            return f"{path} not found (apt-get install {package})"
    return ""


class OrthancServer:
    """A real Orthanc PACS with its DICOMweb plugin on 127.0.0.1, with basic auth and its own storage folder.

    ``start()``/``stop()`` may be called again (same port, same storage): a server that goes down and comes
    back. ``url`` is the REST root, ``dicomweb_url`` the ``dicomweb+http://...`` input URL of the pipeline.
    """

    def __init__(self, folder: str, user: str = "user", password: str = "password", port: int | None = None):
        self.folder = folder
        self.user, self.password = user, password
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.config_path = os.path.join(folder, "orthanc.json")
        os.makedirs(os.path.join(folder, "storage"), exist_ok=True)
        config = {
            "Name": "mrict-test", "HttpPort": self.port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
            "StorageDirectory": os.path.join(folder, "storage"), "IndexDirectory": os.path.join(folder, "storage"),
            "AuthenticationEnabled": True, "RegisteredUsers": {user: password},
            "Plugins": [ORTHANC_DICOMWEB_PLUGIN], "HttpCompressionEnabled": False,
            "DicomWeb": {"Enable": True, "Root": DICOMWEB_ROOT + "/", "StudiesMetadata": "Full",
                         "SeriesMetadata": "Full"},
        }
        with open(self.config_path, "w") as fh:
            json.dump(config, fh)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return f"dicomweb+{self.url}{DICOMWEB_ROOT}"

    def _request(self, method: str, path: str, data: bytes | None = None, timeout: float = 30) -> bytes:
        import base64

        req = urllib.request.Request(self.url + path, data=data, method=method)
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        req.add_header("Authorization", "Basic " + token)
        if data is not None:
            req.add_header("Content-Type", "application/dicom")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()

    def start(self) -> OrthancServer:
        log_path = os.path.join(self.folder, "orthanc.log")
        with open(log_path, "ab") as log_file:
            self.proc = subprocess.Popen([ORTHANC_EXE, self.config_path], stdout=log_file, stderr=subprocess.STDOUT)
        wait_until(lambda: bool(self._request("GET", "/system", timeout=1)), self.proc, "Orthanc")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _stop(self.proc)
        self.proc = None

    def upload(self, paths: list[str]) -> int:
        """POST each file to /instances (non-DICOM files are refused by the server and skipped); the count stored."""
        import urllib.error

        stored = 0
        for path in paths:
            with open(path, "rb") as fh:
                data = fh.read()
            try:
                self._request("POST", "/instances", data)
                stored += 1
            except urllib.error.HTTPError as err:
                if err.code != 400:
                    raise
        return stored

    def upload_tree(self, folder: str) -> int:
        paths = sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files)
        return self.upload(paths)

    def delete(self, uid: str) -> None:
        """Delete the study, series or instance with this DICOM UID (Orthanc's own REST API)."""
        for item in json.loads(self._request("POST", "/tools/lookup", uid.encode())):
            self._request("DELETE", item["Path"])

    def statistics(self) -> dict:
        return json.loads(self._request("GET", "/statistics"))

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def orthanc_server(folder: str, user: str = "user", password: str = "password") -> Iterator[OrthancServer]:
    """A started :class:`OrthancServer` storing into ``folder``; stopped (by its pid) on exit."""
    server = OrthancServer(folder, user, password)
    with server:
        yield server


# -------------------------------------------------------------------------------------------- HTTP proxy
class CountingProxy:
    """A threaded reverse proxy on 127.0.0.1 that counts the bytes it relays, optionally adding latency.

    Every request is forwarded as it came (headers included) to ``upstream``. ``before(path)`` is called before
    each request is forwarded: a test can stop the server there, or return ``(status, headers)`` to answer with
    that instead (a 429 or a 503 as an overloaded server gives). An upstream that cannot be reached gives 502, as
    a gateway would, or with ``drop_when_down`` a connection closed without an answer. ``counts`` maps a request
    kind ("metadata", "instance", "qido", "other") to [requests, response bytes].
    """

    def __init__(self, upstream: str, latency_s: float = 0.0,
                 before: Callable[[str], tuple[int, dict] | None] | None = None, drop_when_down: bool = False):
        import http.server
        import threading

        self.upstream = upstream.rstrip("/")
        self.latency_s = latency_s
        self.before = before
        self.drop_when_down = drop_when_down
        self.counts: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                proxy._relay(self)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @staticmethod
    def kind(path: str) -> str:
        path = path.split("?")[0]
        if path.endswith("/metadata"):
            return "metadata"
        if "/instances/" in path:
            return "instance"
        if path.endswith(("/studies", "/series", "/instances")):
            return "qido"
        return "other"

    def _relay(self, handler) -> None:
        import http.client
        import urllib.parse

        answer = self.before(handler.path) if self.before is not None else None
        if self.latency_s:
            time.sleep(self.latency_s)
        target = urllib.parse.urlsplit(self.upstream)
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "connection")}
        if answer is not None:
            status, reply_headers, body = answer[0], list(answer[1].items()), b""
        else:
            try:
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                conn.request("GET", handler.path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                status, reply_headers = resp.status, resp.getheaders()
                conn.close()
            except OSError:
                if self.drop_when_down:
                    handler.close_connection = True
                    return
                status, reply_headers, body = 502, [("Content-Type", "text/plain")], b"upstream not reachable"
        handler.send_response(status)
        for k, v in reply_headers:
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
        with self._lock:
            c = self.counts.setdefault(self.kind(handler.path), [0, 0])
            c[0] += 1
            c[1] += len(body)

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()

    def bytes(self, *kinds: str) -> int:
        with self._lock:
            return sum(v[1] for k, v in self.counts.items() if not kinds or k in kinds)

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
