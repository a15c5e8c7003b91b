"""A fault-injecting S3 filesystem for tests: real s3fs against the real local S3 endpoint, with a share of its
requests failing as a flaky or briefly unavailable object store fails.

`FaultyS3FileSystem` is `s3fs.S3FileSystem` under the protocol ``faulty://``. Every S3 API call goes through
``_call_s3``, where the wrapper injects connection resets, 503s and endpoint errors, of two kinds (`Faults`):

- ``layer="request"``: a flaky connection. Inside s3fs's retry loop, a share ``rate`` of requests fail, each at
  most ``max_consecutive`` times in a row. s3fs gives up at once on these error types unless told they are
  retryable, so each fault reaches the code under test's retry policy.
- ``layer="operation"``: an outage of some objects. Above s3fs, so the error reaches the caller as is: a share
  ``rate`` of the objects (chosen by a stable hash, the same in every process) fail ``max_consecutive`` times
  in all, whichever process asks, then work.

``ops`` picks reads, writes, listings ("meta") or deletes; ``keys`` (a regex on the object key) limits faults to
some objects. Every fault is appended to ``fault_log`` (one line each, from any process), so tests count them.

Configuration travels in the storage options (they reach every Dask worker with the task), e.g.::

    so = faulty_options(s3.storage_options, rate=0.2, ops=("read", "write"), log=str(tmp_path / "faults"))
    scan(to_faulty(s3.url("in")), storage_options=so)

Worker processes need the protocol registered: ``client.register_plugin(RegisterFaultyFS())``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass

import fsspec
import s3fs

PROTOCOL = "faulty"

# S3 API methods by kind; "meta" (HEAD, LIST) and "delete" are opt-in.
OPS = {
    "get_object": "read",
    "put_object": "write", "upload_part": "write", "create_multipart_upload": "write",
    "complete_multipart_upload": "write", "copy_object": "write",
    "head_object": "meta", "list_objects_v2": "meta", "head_bucket": "meta",
    "delete_object": "delete", "delete_objects": "delete",
}


def _fault(rng: random.Random, method: str, layer: str) -> Exception:
    """An error as the layer sees it: raw botocore errors inside s3fs's loop, translated ones above it.
    (No plain timeouts: s3fs already retries those by itself, so they would test nothing of ours.)"""
    from botocore.exceptions import ClientError, EndpointConnectionError

    kind = rng.randrange(3)
    if kind == 0:
        return ConnectionResetError(errno.ECONNRESET, f"injected fault: connection reset during {method}")
    if layer == "operation":
        return OSError(errno.EIO, f"injected fault: {method}: 503 Service Unavailable")
    if kind == 1:
        return EndpointConnectionError(endpoint_url=f"injected fault during {method}")
    return ClientError({"Error": {"Code": "ServiceUnavailable", "Message": "injected fault"},
                        "ResponseMetadata": {"HTTPStatusCode": 503}}, method)


_STATE: dict = {}


def _state(seed) -> tuple[random.Random, Counter]:
    """Per process (and seed): the random stream and the failure streak of each request, shared by every
    instance, so code that makes a new filesystem per attempt still meets transient faults only."""
    k = (os.getpid(), seed)
    if k not in _STATE:
        _STATE[k] = (random.Random(f"{seed}-{os.getpid()}"), Counter())
    return _STATE[k]


@dataclass(frozen=True)
class Faults:
    """One kind of fault: where it is injected, how often, on which requests, and how long it lasts."""

    layer: str = "request"  # "request" (inside s3fs's retry loop) or "operation" (above it: an outage)
    rate: float = 0.2  # request: share of requests failing; operation: share of objects hit by an outage
    ops: tuple = ("read", "write")
    max_consecutive: int = 2
    keys: str | None = None  # regex on the object key

    def applies(self, method: str, kwargs: dict) -> bool:
        return (OPS.get(method) in self.ops and self.rate > 0
                and (self.keys is None or re.search(self.keys, str(kwargs.get("Key") or "")) is not None))


class FaultyS3FileSystem(s3fs.S3FileSystem):
    protocol = (PROTOCOL,)

    def __init__(self, *args, faults: list[dict] | None = None, fault_log: str | None = None, fault_seed: int = 0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.faults = [Faults(**{k: tuple(v) if isinstance(v, list) else v for k, v in f.items()})
                       for f in (faults or [])]
        assert all(f.layer in ("request", "operation") for f in self.faults)
        self.fault_log = fault_log
        self.fault_seed = fault_seed

    def _maybe_fail(self, layer: str, method: str, kwargs: dict) -> None:
        for n, f in enumerate(self.faults):
            if f.layer != layer or not f.applies(method, kwargs):
                continue
            key = (n, method, kwargs.get("Bucket"), kwargs.get("Key"), kwargs.get("Range"), kwargs.get("PartNumber"))
            if layer == "request":  # flaky: any request may fail, a few times in a row at most
                rng, streak = _state(self.fault_seed)
                fail = 0 < streak[key] < f.max_consecutive or (streak[key] == 0 and rng.random() < f.rate)
                if not fail:
                    streak.pop(key, None)
                    continue
                streak[key] += 1
            else:  # an outage: the chosen objects fail max_consecutive times, in whichever process, then work
                digest = hashlib.sha256(repr((self.fault_seed, key)).encode()).digest()
                rng = random.Random(digest)
                if int.from_bytes(digest[:8], "big") / 2**64 >= f.rate or self._logged(key) >= f.max_consecutive:
                    continue
            self._record(layer, OPS[method], method, kwargs.get("Key"), key)
            raise _fault(rng, method, layer)

    def _logged(self, key: tuple) -> int:
        assert self.fault_log, "outages are counted in the fault log"
        if not os.path.exists(self.fault_log):
            return 0
        tag = repr(key)
        with open(self.fault_log) as fh:
            return sum(1 for line in fh if line.rstrip("\n").endswith("\t" + tag))

    async def _call_s3(self, method, *akwarglist, **kwargs):
        self._maybe_fail("operation", method, kwargs)  # above s3fs's retry loop: reaches the caller as is
        if not any(f.layer == "request" for f in self.faults):
            return await super()._call_s3(method, *akwarglist, **kwargs)
        # inside s3fs's retry loop, like a flaky connection (mirrors S3FileSystem._call_s3)
        await self.set_session()
        client = await self.get_s3(kwargs.get("Bucket"))
        call = getattr(client, method)
        additional = self._get_s3_method_kwargs(call, *akwarglist, **kwargs)

        async def attempt(**kw):
            self._maybe_fail("request", method, kw)
            return await call(**kw)

        return await s3fs.core._error_wrapper(attempt, kwargs=additional, retries=self.retries)

    def _record(self, layer: str, op: str, method: str, name: str | None, key: tuple) -> None:
        if not self.fault_log:
            return
        line = f"{os.getpid()}\t{op}\t{layer}\t{method}\t{name}\t{key!r}\n".encode()
        fd = os.open(self.fault_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one small O_APPEND write: lines from many processes never interleave
        finally:
            os.close(fd)


def register() -> None:
    fsspec.register_implementation(PROTOCOL, FaultyS3FileSystem, clobber=True)


def to_faulty(url: str) -> str:
    assert url.startswith("s3://"), url
    return f"{PROTOCOL}://" + url[len("s3://"):]


def faulty_options(storage_options: dict, rate: float = 0.2, ops=("read", "write"), log: str | None = None,
                   seed: int = 0, max_consecutive: int = 2, layer: str = "request", keys: str | None = None,
                   more: tuple[Faults, ...] = ()) -> dict:
    """Storage options for ``faulty://`` URLs: one kind of fault from the arguments, plus any ``more``."""
    kinds = [Faults(layer, rate, tuple(ops), max_consecutive, keys), *more]
    return {**storage_options, "faults": [{**asdict(f), "ops": list(f.ops)} for f in kinds], "fault_log": log,
            "fault_seed": seed}


def faults_injected(log: str, layer: str | None = None) -> Counter:
    """Faults injected so far, by kind (read/write/meta/delete), over all processes; optionally of one layer."""
    if not os.path.exists(log):
        return Counter()
    with open(log) as fh:
        rows = [line.split("\t") for line in fh if line.strip()]
    return Counter(r[1] for r in rows if layer is None or r[2] == layer)


try:
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # pragma: no cover
    WorkerPlugin = object


class RegisterFaultyFS(WorkerPlugin):
    """Registers ``faulty://`` in every worker process, including workers started after a restart."""

    name = "register-faulty-fs"

    def setup(self, worker=None):
        register()


register()
