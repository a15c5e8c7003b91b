"""Files as an input: a local folder, ``s3://`` or any fsspec URL, listed recursively whatever the names.

The file source of :mod:`mrict_dask.sources`: a scan unit is one file ``(url, size)``, its catalog rows come from
its header (:mod:`mrict_dask.dicom_header`: the first bytes only, one concurrent ranged read per batch on object
storage), and an instance is the file's bytes. Every listed file gives exactly one catalog row; a bad file gets a
``read_error`` reason instead of raising.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .catalog import catalog_table, empty_row
from .dicom_header import read_headers, unreadable
from .errors import InputError
from .io import Location
from .types import Instance

STAMP_KEYS = ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "updated", "created")
"""Listing fields that change when a file is written again, most telling first: an object's ETag (its content
hash on S3 for a single-part upload), a file's modification time."""


def _stamp(info: dict) -> str:
    for k in STAMP_KEYS:
        v = info.get(k)
        if v not in (None, ""):
            return str(v).strip('"')
    return ""


def list_files_stamped(url: str | Location, storage_options: dict | None = None) -> list[tuple[str, int, str]]:
    """(URL, size, stamp) of every file under ``url``, recursively, sorted by URL, from one listing; the stamp is
    what the listing says changes when the file is written again (ETag, modification time), "" if nothing.

    A URL naming one file gives that file. Raises ``InputError`` when nothing is there.
    """
    loc = Location.of(url, storage_options)
    fs, path = loc.fs, loc.path
    try:
        if fs.isfile(path):
            info = fs.info(path)
            return [(loc.url_of(path), int(info.get("size") or 0), _stamp(info))]
        if not fs.exists(path):
            raise InputError(f"input not found: {loc.url}")
        found = fs.find(path, withdirs=False, detail=True)
    except InputError:
        raise
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(f"input not found: {loc.url}") from None
    except PermissionError as exc:
        raise InputError(f"input not readable: {loc.url}: {type(exc).__name__}") from None
    out = [(loc.url_of(p), int(info.get("size") or 0), _stamp(info)) for p, info in found.items()
           if info.get("type") != "directory"]
    if not out:
        raise InputError(f"no files under {loc.url}")
    out.sort()
    return out


def list_files(url: str | Location, storage_options: dict | None = None) -> list[tuple[str, int]]:
    """(URL, size) of every file under ``url``, recursively, whatever the names; sorted by URL.

    A URL naming one file gives that file. Raises ``InputError`` when nothing is there.
    """
    return [(u, size) for u, size, _ in list_files_stamped(url, storage_options)]


def lost_rows(items: list[tuple[str, int]], reason: str) -> list[dict]:
    """One row per (URL, size) recording ``reason``."""
    rows = [empty_row(url, size) for url, size in items]
    for row in rows:
        row["read_error"] = reason
    return rows


def scan_batch(items: list[tuple[str, int]], storage_options: dict | None):
    """The catalog table (Arrow) of a batch of (URL, size) on one filesystem, rows in the batch's order.

    Pure: one task on a worker, or one step of the serial loop. Never raises for a file.
    """
    if not items:
        return catalog_table([])
    try:
        fs = Location.of(items[0][0], storage_options).fs
    except Exception as exc:  # no filesystem for these URLs: every file still gets its row
        return catalog_table(lost_rows(items, unreadable(exc)))
    return catalog_table(read_headers(items, fs))


class FsspecSource:
    """Files under a local path or any fsspec URL: the header scan reads each file's first bytes only."""

    unit_name = "files"

    def __init__(self, location: Location):
        self.location = location

    @property
    def url(self) -> str:
        return self.location.url

    @property
    def storage_options(self) -> dict:
        return self.location.storage_options

    def __repr__(self) -> str:
        return f"FsspecSource({self.location!r})"

    def list_units(self) -> list[tuple[str, int]]:
        return list_files(self.location)

    def listing(self) -> list[tuple[str, int, str]]:
        """Every file with its size and stamp (ETag or modification time), from one listing."""
        return list_files_stamped(self.location)

    def unit_urls(self, row_urls: Any) -> Any:
        """The unit of each catalog row (Arrow strings): a file is its own unit."""
        return row_urls

    def weight(self, unit: tuple[str, int]) -> int:
        return 1

    def read_rows(self, units: list[tuple[str, int]]) -> Any:
        return scan_batch(units, self.storage_options)

    def lost_rows(self, units: list[tuple[str, int]], reason: str) -> list[dict]:
        return lost_rows(units, reason)

    def fetch(self, urls: Sequence[str]) -> list[Instance]:
        """Whole-file bytes for each URL (local paths read directly; object storage fetched concurrently)."""
        urls = list(urls)
        if not urls:
            return []
        if all("://" not in u or u.startswith("file://") for u in urls):
            out: list[Instance] = []
            for u in urls:
                try:
                    with open(u[7:] if u.startswith("file://") else u, "rb") as fh:
                        out.append(fh.read())
                except OSError as exc:
                    out.append(exc)
            return out
        fs = Location.of(urls[0], self.storage_options).fs
        paths = [fs._strip_protocol(u) for u in urls]
        got = fs.cat(paths, on_error="return")
        if not isinstance(got, dict):  # a single path gives bytes
            got = {paths[0]: got}
        return [got.get(p, FileNotFoundError(p)) for p in paths]
