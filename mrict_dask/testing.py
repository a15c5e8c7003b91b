"""Real local servers for the test suite and the benchmarks: an S3 endpoint (moto's standalone server), a PACS
(Orthanc with its DICOMweb plugin), a byte-counting HTTP proxy to put in front of the PACS, and a reverse proxy that
adds first-byte latency in front of the S3 endpoint (object storage answers in tens of milliseconds).

Not used by the pipeline itself. Each server is a subprocess on 127.0.0.1 with a free port, started by a context
manager that waits until it answers and stops it on exit; ``moto`` is a test/benchmark dependency only.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
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


# -------------------------------------------------------------------------------------------- HTTP proxies
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
               "proxy-authenticate", "content-length"}


def request_kind(path: str) -> str:
    """What a request asks for, for byte counts: DICOMweb "metadata", "instance", "qido", else "other"."""
    path = path.split("?")[0]
    if path.endswith("/metadata"):
        return "metadata"
    if "/instances/" in path:
        return "instance"
    if path.endswith(("/studies", "/series", "/instances")):
        return "qido"
    return "other"


class _ProxyLog:
    """What a proxy relayed: each request (method, path, Range header), the most in flight at once, and per
    :func:`request_kind` [requests, response bytes]."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, str]] = []
        self.counts: dict[str, list[int]] = {}
        self.in_flight = self.peak_in_flight = 0

    def start(self, method: str, path: str, byte_range: str) -> None:
        with self.lock:
            self.requests.append((method, path, byte_range))
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def done(self, path: str, n_bytes: int | None) -> None:
        with self.lock:
            self.in_flight -= 1
            if n_bytes is not None:
                c = self.counts.setdefault(request_kind(path), [0, 0])
                c[0] += 1
                c[1] += n_bytes

    def snapshot(self, reset: bool) -> dict:
        with self.lock:
            out = {"requests": list(self.requests), "peak_in_flight": self.peak_in_flight,
                   "counts": {k: list(v) for k, v in self.counts.items()}}
            if reset:
                self.requests.clear()
                self.counts.clear()
                self.peak_in_flight = self.in_flight
        return out


class _Relay(http.server.BaseHTTPRequestHandler):
    """Forwards each request to the upstream server (over a kept-alive connection per client connection) and
    holds the answer back ``latency_s`` before its first byte.

    ``before(path)``, when set, is called first: it may stop the upstream, or return ``(status, headers)`` to
    answer that instead (a 429 or 503 as an overloaded server gives). An upstream that cannot be reached gives
    502, as a gateway would, or with ``drop_when_down`` a connection closed without an answer.
    ``GET /__proxy__/log`` answers the :class:`_ProxyLog` as JSON (``?reset=1``: and starts a new one).
    """

    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections as they would with real servers
    upstream: tuple[str, int] = ("127.0.0.1", 0)
    latency_s: float = 0.0
    before: Callable[[str], tuple[int, dict] | None] | None = None
    drop_when_down: bool = False
    log: _ProxyLog

    def log_message(self, format, *args) -> None:
        pass

    def _send(self, status: int, headers: list[tuple[str, str]], data: bytes, reason: str | None = None) -> None:
        self.send_response(status, reason)
        for k, v in headers:
            if k.lower() not in _HOP_BY_HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _forward(self) -> None:
        if self.path.startswith("/__proxy__/log"):
            body = json.dumps(self.log.snapshot(reset=self.path.endswith("reset=1"))).encode()
            return self._send(200, [("Content-Type", "application/json")], body)
        self.log.start(self.command, self.path, self.headers.get("Range", ""))
        n_bytes = None
        try:
            n_bytes = self._relay()
        finally:
            self.log.done(self.path, n_bytes)

    def _exchange(self, body: bytes | None, headers: dict) -> tuple[http.client.HTTPResponse, bytes]:
        if getattr(self, "_conn", None) is None:
            self._conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        self._conn.request(self.command, self.path, body=body, headers=headers)
        resp = self._conn.getresponse()
        return resp, resp.read()

    def _upstream(self, body: bytes | None, headers: dict) -> tuple[http.client.HTTPResponse, bytes]:
        try:
            return self._exchange(body, headers)
        except (ConnectionError, http.client.HTTPException):
            self._conn.close()  # the upstream closed a kept-alive connection: once more on a new one
            self._conn = None
            return self._exchange(body, headers)

    def _relay(self) -> int | None:
        # bodies are forwarded by Content-Length (what S3 and DICOMweb clients send); chunked uploads are not
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        answer = self.before(self.path) if self.before is not None else None
        if answer is not None:
            time.sleep(self.latency_s)
            self._send(answer[0], list(answer[1].items()), b"")
            return 0
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | {"host"}}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        try:
            resp, data = self._upstream(body, headers)
        except OSError:
            self._conn = None
            if self.drop_when_down:
                self.close_connection = True
                return None
            self._send(502, [("Content-Type", "text/plain")], b"upstream not reachable")
            return 0
        time.sleep(self.latency_s)
        self._send(resp.status, resp.getheaders(), data, resp.reason)
        return len(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


def _relay_server(upstream: str, port: int = 0, latency_s: float = 0.0, before=None,
                  drop_when_down: bool = False) -> http.server.ThreadingHTTPServer:
    host, _, up_port = upstream.removeprefix("http://").rstrip("/").partition(":")
    handler = type("Handler", (_Relay,), {"upstream": (host, int(up_port or 80)), "latency_s": latency_s,
                                          "before": staticmethod(before) if before else None,
                                          "drop_when_down": drop_when_down, "log": _ProxyLog()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    return server


class CountingProxy:
    """A reverse proxy in this process (a thread) that counts the bytes it relays by :func:`request_kind`,
    optionally adding latency or answering/stopping through ``before`` (see :class:`_Relay`).

    ``counts`` maps a request kind to [requests, response bytes].
    """

    kind = staticmethod(request_kind)

    def __init__(self, upstream: str, latency_s: float = 0.0,
                 before: Callable[[str], tuple[int, dict] | None] | None = None, drop_when_down: bool = False):
        self._server = _relay_server(upstream, 0, latency_s, before, drop_when_down)
        self._log: _ProxyLog = self._server.RequestHandlerClass.log
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def counts(self) -> dict[str, list[int]]:
        return self._log.snapshot(reset=False)["counts"]

    def reset(self) -> None:
        self._log.snapshot(reset=True)

    def bytes(self, *kinds: str) -> int:
        return sum(v[1] for k, v in self.counts.items() if not kinds or k in kinds)

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_latency_proxy(upstream: str, port: int, latency_s: float) -> None:
    """Run the delaying reverse proxy on 127.0.0.1:``port`` in front of ``upstream`` (``http://host:port``) forever."""
    _relay_server(upstream, port, latency_s).serve_forever()


def _answers(endpoint: str) -> bool:
    # any HTTP answer means it is up; a refused connection is an OSError, which wait_until takes for "not yet"
    with contextlib.suppress(urllib.error.HTTPError):
        urllib.request.urlopen(endpoint + "/", timeout=2)
    return True


@contextlib.contextmanager
def latency_proxy(upstream: str, latency_ms: float = 50.0) -> Iterator[str]:
    """A reverse proxy in front of ``upstream`` that delays every answer's first byte by ``latency_ms``.

    Runs in its own process (so its threads never compete with the client for one interpreter); yields its URL,
    ``http://127.0.0.1:PORT``, which takes the place of ``upstream`` in a client's endpoint setting.
    """
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mrict_dask.testing", "latency-proxy", upstream, str(port),
                             str(latency_ms)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(endpoint), proc, "latency proxy")
        yield endpoint
    finally:
        _stop(proc)


def proxy_log(endpoint: str, reset: bool = False) -> dict:
    """The requests a :func:`latency_proxy` forwarded since it started or was last reset: ``{"requests": [[method,
    path, Range header], ...], "peak_in_flight": n}``; ``reset`` starts a new log."""
    with urllib.request.urlopen(f"{endpoint}/__proxy__/log{'?reset=1' if reset else ''}", timeout=10) as resp:
        return json.loads(resp.read())


def _main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mrict_dask.testing", description="local servers for tests")
    sub = ap.add_subparsers(dest="server", required=True)
    lp = sub.add_parser("latency-proxy", help="reverse proxy adding first-byte latency")
    lp.add_argument("upstream")
    lp.add_argument("port", type=int)
    lp.add_argument("latency_ms", type=float)
    args = ap.parse_args(argv)
    serve_latency_proxy(args.upstream, args.port, args.latency_ms / 1000)


if __name__ == "__main__":
    _main()
