"""Where DICOM instances come from: one interface for every input URL, so no stage branches on the kind of URL.

A source lists its *scan units*, reads the catalog rows of a batch of units, and fetches instances by the URL
its rows carry:

- :class:`FsspecSource` (a local path, ``s3://``, any fsspec URL): a unit is one file ``(url, size)``; rows come
  from the files' headers (:mod:`mrict_dask.dicom_header`); an instance is the file's bytes.
- :class:`~mrict_dask.dicomweb.DicomwebSource` (``dicomweb+http(s)://host/root``, a DICOMweb service root): a unit
  is one series ``(series URL, number of instances)``; rows come from the series metadata (DICOM JSON) without
  moving instance bytes; an instance is retrieved with WADO-RS as stored.

:func:`open_source` is the one place that looks at the URL. Sources are cheap to make and to pickle (a URL and
storage options; never credentials): the scan and the pair tasks open them again on the workers.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from .io import Location

log = logging.getLogger(__name__)

DICOMWEB_PREFIX = "dicomweb+"

Instance = Any
"""What :meth:`Source.fetch` gives for one URL: the bytes of a DICOM file, a data set already parsed from them
(pydicom ``Dataset``), or the exception that stopped it (transient ones are retried by the caller)."""


class Source(Protocol):
    url: str  # what the user gave (logged; never holds credentials)
    storage_options: dict  # fsspec options of the run (an fsspec source uses them; others pass them on)
    unit_name: str  # what one unit of weight is, for progress bars: "files", "instances"

    def list_units(self) -> list[tuple[str, int]]:
        """Every scan unit, sorted; raises InputError when the input as a whole cannot be read."""
        ...

    def weight(self, unit: tuple[str, int]) -> int:
        """How many catalog rows a unit is expected to give (for batching and progress)."""
        ...

    def read_rows(self, units: list[tuple[str, int]]) -> Any:
        """The catalog table (Arrow) of a batch of units; never raises for a unit (its rows carry the reason)."""
        ...

    def lost_rows(self, units: list[tuple[str, int]], reason: str) -> list[dict]:
        """Rows that record ``reason`` for units whose task failed as a whole."""
        ...

    def fetch(self, urls: Sequence[str]) -> list[Instance]:
        """The instances named by catalog URLs, in order (one entry per URL, an exception when it failed)."""
        ...


def open_source(url: str | Location | Source, storage_options: dict | None = None) -> Source:
    """The source of an input URL (a Location or a source is taken as it is)."""
    if isinstance(url, Location):
        return FsspecSource(url)
    if not isinstance(url, str) and hasattr(url, "list_units") and hasattr(url, "fetch"):
        return url
    text = str(url)
    if text.startswith(DICOMWEB_PREFIX):
        from .dicomweb import DicomwebSource

        return DicomwebSource(text, storage_options)
    return FsspecSource(Location.of(url, storage_options))


def fetch_instances(urls: Sequence[str], storage_options: dict | None = None) -> list[Instance]:
    """The instances of catalog URLs that all come from one source (see :meth:`Source.fetch`)."""
    urls = list(urls)
    if not urls:
        return []
    return open_source(urls[0], storage_options).fetch(urls)


def batches(source: Source, units: list[tuple[str, int]], batch_size: int) -> Iterator[list[tuple[str, int]]]:
    """Consecutive units grouped until their weight reaches ``batch_size`` (a unit heavier than that goes alone)."""
    batch: list[tuple[str, int]] = []
    weight = 0
    for unit in units:
        batch.append(unit)
        weight += source.weight(unit)
        if weight >= batch_size:
            yield batch
            batch, weight = [], 0
    if batch:
        yield batch


def read_rows(units: list[tuple[str, int]], source: Source) -> Any:
    """:meth:`Source.read_rows` as a plain function (what a scan task runs)."""
    return source.read_rows(units)


def rows_task(source: Source):
    """The scan's task function for ``source``: picklable, takes a batch of units."""
    return functools.partial(read_rows, source=source)


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
        from .scan import list_files

        return list_files(self.location)

    def weight(self, unit: tuple[str, int]) -> int:
        return 1

    def read_rows(self, units: list[tuple[str, int]]) -> Any:
        from .scan import scan_batch

        return scan_batch(units, self.storage_options)

    def lost_rows(self, units: list[tuple[str, int]], reason: str) -> list[dict]:
        from .scan import lost_rows

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
