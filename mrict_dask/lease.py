"""One writer at a time: a lease object in the store, taken with a conditional create and renewed while held.

A lock file does not work on object storage (no atomic rename, no O_EXCL), but a conditional PUT does: S3 (and the
local S3 servers we test against) honour ``If-None-Match: *``, which s3fs sends for ``pipe_file(..., mode="create")``;
a local file is created with a hard link, which fails when the name exists. Leases are numbered generations
``<store>/_lease/<n>.json``: the holder of the highest generation owns the store until its lease expires or is
released; whoever takes over creates generation n + 1, and of two runs that try at once exactly one succeeds.

A lease names its owner (host, process id, start time) and when it expires; the holder renews it (rewrites its own
generation with a later expiry) in a background thread. A run whose lease was taken over (it stalled past the
expiry) notices at its next renewal and stops before writing anything more. A crashed run's lease expires after
``ttl`` seconds; on the same host, a lease whose process no longer exists is taken over at once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from .errors import LeaseHeld
from .io import Location

log = logging.getLogger(__name__)

LEASE_DIR = "_lease"
DEFAULT_TTL_S = 120.0


class LeaseLost(LeaseHeld):
    """This run's lease expired and another run took the store over: this run must not write any more."""


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _name(generation: int) -> str:
    return f"{generation:012d}.json"


def _generations(store: Location) -> list[int]:
    return store.join(LEASE_DIR).numbered()


def _read(store: Location, generation: int) -> dict | None:
    loc = store.join(LEASE_DIR, _name(generation))
    loc.fs.invalidate_cache(loc.path)
    try:
        return json.loads(loc.read_bytes())
    except (FileNotFoundError, ValueError):
        return None


def create_exclusive(loc: Location, data: bytes) -> bool:
    """Write ``data`` to ``loc`` only if nothing is there yet; False when something is.

    Object storage: a conditional PUT (``If-None-Match: *``). Local files: written under a temporary name, then
    hard-linked to the name (fails if it exists), so a reader never sees a partial lease.
    """
    if loc.is_local:
        path = loc.local_path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)
    loc.make_parent()
    try:
        loc.fs.pipe_file(loc.path, data, mode="create")
        return True
    except FileExistsError:
        return False
    except Exception as exc:  # some clients report 412 Precondition Failed as a plain error
        if "PreconditionFailed" in str(exc) or "412" in str(exc):
            return False
        raise


def _alive_here(owner: dict) -> bool:
    """Is the owner a process that still runs on this host (False for other hosts: unknown, assume alive)?"""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, ValueError):
        return True
    return True


def describe_owner(owner: dict) -> str:
    return (f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, {owner.get('command', 'run')} started "
            f"{owner.get('started', '?')}")


@dataclass
class Lease:
    """A lease this process holds on a store (see the module docstring)."""

    store: Location
    generation: int
    owner: dict
    ttl: float
    lost: bool = False
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def location(self) -> Location:
        return self.store.join(LEASE_DIR, _name(self.generation))

    def _write(self, released: bool = False) -> None:
        now = time.time()
        self.owner.update(renewed=_iso(now), expires=now + self.ttl, expires_at=_iso(now + self.ttl),
                          released=released)
        self.location.write_bytes(json.dumps(self.owner, sort_keys=True).encode())

    def renew(self) -> None:
        """Extend the lease; raises :class:`LeaseLost` when another run has taken the store over."""
        if self.lost or any(g > self.generation for g in _generations(self.store)):
            self.lost = True
            raise LeaseLost(f"{self.store.url}: this run's lease expired and another run took the store over; "
                            "this run stopped writing")
        self._write()

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the lease was lost (cheap: what the renewal thread found)."""
        if self.lost:
            raise LeaseLost(f"{self.store.url}: this run's lease expired and another run took the store over; "
                            "this run stopped writing")

    def start_renewing(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.ttl / 4):
                try:
                    self.renew()
                except LeaseLost:
                    log.error("the lease on %s was taken over by another run; stopping", self.store.url)
                    return
                except Exception as exc:  # storage hiccup: the next renewal tries again, well before expiry
                    log.warning("renewing the lease on %s failed (%s); trying again", self.store.url,
                                type(exc).__name__)

        self._thread = threading.Thread(target=loop, name="mrict-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and mark the lease released (the next run takes over at once)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if not self.lost and not any(g > self.generation for g in _generations(self.store)):
            try:
                self._write(released=True)
            except Exception as exc:  # it will expire by itself
                log.warning("could not release the lease on %s (%s); it expires at %s", self.store.url,
                            type(exc).__name__, self.owner.get("expires_at"))


def acquire(store: str | Location, ttl: float = DEFAULT_TTL_S, command: str = "run",
            storage_options: dict | None = None) -> Lease:
    """Take the store's lease, or raise :class:`~mrict_dask.errors.LeaseHeld` naming the run that holds it."""
    store = Location.of(store, storage_options)
    gens = _generations(store)
    top = gens[-1] if gens else 0
    if top:
        held = _read(store, top)
        if held is not None and not held.get("released") and float(held.get("expires", 0)) > time.time():
            if _alive_here(held):
                raise LeaseHeld(f"{store.url} is being written by another run ({describe_owner(held)}); its lease "
                                f"expires at {held.get('expires_at', '?')} unless renewed: try again later")
            log.warning("the run holding %s (%s) no longer runs: taking over its lease", store.url,
                        describe_owner(held))
        elif held is not None and not held.get("released"):
            log.warning("the lease on %s of a run that stopped renewing it (%s) expired: taking over", store.url,
                        describe_owner(held))
    now = time.time()
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "command": command, "started": _iso(now),
             "token": uuid.uuid4().hex, "expires": now + ttl, "expires_at": _iso(now + ttl), "released": False}
    generation = top + 1
    if not create_exclusive(store.join(LEASE_DIR, _name(generation)), json.dumps(owner, sort_keys=True).encode()):
        winner = _read(store, generation) or {}
        if winner.get("token") != owner["token"]:  # not our own write answered twice
            raise LeaseHeld(f"{store.url} is being written by another run ({describe_owner(winner)}), which took "
                            "the store at the same moment: try again later")
    lease = Lease(store=store, generation=generation, owner=owner, ttl=float(ttl))
    for old in gens:
        store.join(LEASE_DIR, _name(old)).remove()
    return lease


@contextlib.contextmanager
def holding(store: str | Location, ttl: float = DEFAULT_TTL_S, command: str = "run",
            storage_options: dict | None = None) -> Iterator[Lease]:
    """Hold the store's lease for the block, renewed in the background; released at the end, whatever happens."""
    lease = acquire(store, ttl, command, storage_options)
    lease.start_renewing()
    try:
        yield lease
    finally:
        lease.release()
