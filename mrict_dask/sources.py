"""Where DICOM instances come from: one interface for every input URL, so no stage branches on the kind of URL.

A source lists its *scan units*, reads the catalog rows of a batch of units, and fetches instances by the URL
its rows carry:

- :class:`~mrict_dask.files.FsspecSource` (a local path, ``s3://``, any fsspec URL): a unit is one file
  ``(url, size)``; rows come from the files' headers (:mod:`mrict_dask.dicom_header`); an instance is the file's
  bytes.
- :class:`~mrict_dask.dicomweb.DicomwebSource` (``dicomweb+http(s)://host/root``, a DICOMweb service root): a unit
  is one series ``(series URL, number of instances)``; rows come from the series metadata (DICOM JSON) without
  moving instance bytes; an instance is retrieved with WADO-RS as stored.

:func:`open_source` is the one place that looks at the URL. Sources are cheap to make and to pickle (a URL and
storage options; never credentials): the scan and the pair tasks open them again on the workers.

A source also gives its :meth:`Source.listing`: every unit with a *stamp* that changes when the unit is written
again (a file's ETag or modification time, a series' list of instances). A re-run compares it with the listing its
catalog was made from and scans only what is new or changed (:func:`mrict_dask.scan.update_catalog`).

Layers: the sources themselves (:mod:`mrict_dask.files`, :mod:`mrict_dask.dicomweb`) import nothing from here;
this module names the interface and picks the source of a URL.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from .dicomweb import DicomwebSource
from .files import FsspecSource
from .io import DICOMWEB_PREFIX, Location
from .types import Instance

log = logging.getLogger(__name__)

__all__ = ["DICOMWEB_PREFIX", "DicomwebSource", "FsspecSource", "Instance", "Source", "batches", "fetch_instances",
           "open_source", "read_rows", "rows_task"]


class Source(Protocol):
    url: str  # what the user gave (logged; never holds credentials)
    storage_options: dict  # fsspec options of the run (an fsspec source uses them; others pass them on)
    unit_name: str  # what one unit of weight is, for progress bars: "files", "instances"

    def list_units(self) -> list[tuple[str, int]]:
        """Every scan unit, sorted; raises InputError when the input as a whole cannot be read."""
        ...

    def listing(self) -> list[tuple[str, int, str]]:
        """Every scan unit with its stamp ``(url, weight, stamp)``, sorted: the stamp changes when the unit is
        written again ("" when the input cannot tell)."""
        ...

    def unit_urls(self, row_urls: Any) -> Any:
        """The unit URL of each catalog row URL (an Arrow string array in, one of the same length out)."""
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
