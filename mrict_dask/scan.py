"""Scan: list every instance of an input and read DICOM headers only into a one-row-per-instance catalog.

Layers, from pure to orchestrated:

- ``list_files`` / ``scan_batch``: the file input's listing, and the Arrow catalog table of a batch of files
  (headers read by :mod:`mrict_dask.dicom_header`: first bytes only, one concurrent ranged read per batch on
  object storage). Every file gives exactly one row; a bad file gets a ``read_error`` reason instead of raising.
- ``scan_table``: the input's source (:mod:`mrict_dask.sources`: files, or a DICOMweb service) lists its units on
  the driver; its ``read_rows`` runs over batches through an :mod:`~mrict_dask.executor` executor (serially,
  or on a Dask cluster); the driver gathers one Arrow table per batch, never a Python object per instance.
- ``scan`` (a DataFrame) and ``scan_to_parquet`` (written to Parquet, with a PHI-free ``ScanSummary``).

The table's metadata holds ``bytes_read`` (bytes fetched to read the headers).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from .catalog import SCAN_TASK_FAILED, bytes_read, catalog_frame, catalog_table, empty_row, write_catalog
from .dicom_header import read_headers, unreadable
from .errors import InputError
from .io import Location, redact
from .progress import Progress
from .sources import Source, batches, open_source, rows_task

log = logging.getLogger(__name__)


def list_files(url: str | Location, storage_options: dict | None = None) -> list[tuple[str, int]]:
    """(URL, size) of every file under ``url``, recursively, whatever the names; sorted by URL.

    A URL naming one file gives that file. Raises ``InputError`` when nothing is there.
    """
    loc = Location.of(url, storage_options)
    fs, path = loc.fs, loc.path
    try:
        if fs.isfile(path):
            return [(loc.url_of(path), int(fs.size(path) or 0))]
        if not fs.exists(path):
            raise InputError(f"input not found: {loc.url}")
        found = fs.find(path, withdirs=False, detail=True)
    except InputError:
        raise
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(f"input not found: {loc.url}") from None
    except PermissionError as exc:
        raise InputError(f"input not readable: {loc.url}: {type(exc).__name__}") from None
    out = [(loc.url_of(p), int(info.get("size") or 0)) for p, info in found.items()
           if info.get("type") != "directory"]
    if not out:
        raise InputError(f"no files under {loc.url}")
    out.sort()
    return out


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


@dataclass(frozen=True)
class Batch:
    """A scan task's item: the batch's position in the listing and its units (URLs, which may name patients, are
    left out of its ``repr``: a Dask worker logs a failed task's arguments)."""

    index: int
    units: list = field(repr=False)


def _read_batch(batch: Batch, fn: Any) -> Any:
    """``fn`` of a numbered batch: results can be put back in listing order."""
    return fn(batch.units)


def scan(url: str | Location | Source, storage_options: dict | None = None, executor: Any = None,
         batch_size: int = 256, progress: bool = False):
    """Catalog DataFrame of every instance of ``url`` (one row each, sorted by URL); see :func:`scan_table`.

    ``executor``: None reads serially in this process; an :mod:`~mrict_dask.executor` executor or a Dask
    client maps the source's row reading over batches of ``batch_size`` units (one task each, a bounded number
    in flight).
    """
    return catalog_frame(scan_table(url, storage_options, executor, batch_size, progress))


def scan_table(url: str | Location | Source, storage_options: dict | None = None, executor: Any = None,
               batch_size: int = 256, progress: bool = False):
    """:func:`scan`, as the Arrow table (sorted by URL; ``bytes_read`` in its metadata).

    ``url`` is any input (see :func:`~mrict_dask.sources.open_source`): the source lists its units (files, or
    series of a DICOMweb service) on the driver and each task reads the rows of a batch of units.
    """
    from .catalog import concat_tables
    from .executor import as_executor

    source = open_source(url, storage_options)
    units = source.list_units()
    total = sum(source.weight(u) for u in units)
    ex = as_executor(executor, retries=2)
    log.info("scan %s: %d %s in %d units, batches of %d on the %s executor (storage options %s)", source.url, total,
             source.unit_name, len(units), batch_size, ex.name, redact(source.storage_options))
    task = functools.partial(_read_batch, fn=rows_task(source))
    numbered = (Batch(k, b) for k, b in enumerate(batches(source, units, max(1, int(batch_size)))))
    tables: dict[int, Any] = {}
    with Progress("scan", total, progress, unit=source.unit_name) as bar:
        for outcome in ex.run(task, numbered, key=lambda b: f"scan-batch-{b.index}"):
            batch = outcome.item
            if outcome.ok:
                tables[batch.index] = outcome.value
            else:  # the task itself failed (worker lost repeatedly, or a bug): its units still get rows
                tables[batch.index] = catalog_table(source.lost_rows(batch.units,
                                                                     f"{SCAN_TASK_FAILED}: {outcome.error}"))
            bar.advance(sum(source.weight(u) for u in batch.units))
    del units
    # batches are consecutive runs of the sorted units: in batch order the rows are (almost always) sorted already
    return concat_tables([tables.pop(k) for k in sorted(tables)])


@dataclass
class ScanSummary:
    catalog: Any  # the catalog as an Arrow table
    seconds: float
    out: str | None = None
    bytes_read: int = field(default=0)

    def describe(self) -> str:
        """Counts only: no PatientIDs, names, UIDs or file names (those stay in the private catalog)."""
        import pyarrow.compute as pc

        t = self.catalog
        n = t.num_rows
        total = int(pc.sum(t.column("size")).as_py() or 0) if n else 0
        errors = t.column("read_error").cast("string")
        ok = t.select(["series_uid", "study_uid", "patient_id"]).filter(pc.equal(errors, ""))
        rate = n / self.seconds if self.seconds > 0 else float("nan")
        size = f" ({_human(total)})" if n and t.column("size").null_count < n else ""  # DICOMweb gives no size
        lines = [f"scanned {n:,} files{size} in {self.seconds:.1f} s ({rate:,.0f} files/s)"]
        if self.bytes_read and total:
            share = 100 * self.bytes_read / total
            lines.append(f"  header bytes read: {_human(self.bytes_read)} ({share:.1f} % of the files)")

        def distinct(col: str) -> int:
            return int(pc.count_distinct(ok.column(col).cast("string")).as_py())

        lines.append(f"  readable DICOM objects: {ok.num_rows:,} in {distinct('series_uid'):,} series, "
                     f"{distinct('study_uid'):,} studies, {distinct('patient_id'):,} patients")
        bad = errors.filter(pc.not_equal(errors, "")).cast("string")
        if len(bad):
            kinds = pc.value_counts(pc.utf8_trim_whitespace(pc.replace_substring_regex(bad, r"(?s):.*", "")))
            lines.append(f"  not catalogued as images: {len(bad):,} files")
            for item in sorted(kinds.to_pylist(), key=lambda d: (-d["counts"], d["values"])):
                lines.append(f"    {item['values']}: {item['counts']:,}")
        else:
            lines.append("  no read errors")
        if self.out:
            lines.append("  catalog (private: holds patient IDs): written")
        return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def scan_to_parquet(url: str | Location | Source, out: str | Location, storage_options: dict | None = None,
                    executor: Any = None, batch_size: int = 256, progress: bool = False) -> ScanSummary:
    """Scan ``url`` and write the catalog as Parquet to ``out`` (a path or fsspec URL).

    The storage options apply to ``out`` when the input is on the same kind of store (endpoint, keys), or is not
    an fsspec store at all (a DICOMweb input: the options are the run's, for its outputs).
    """
    t0 = time.perf_counter()
    src = open_source(url, storage_options)
    if isinstance(out, Location):
        dest = out
    else:
        dest = Location(out)
        loc = getattr(src, "location", None)
        if loc is None or type(dest.fs) is type(loc.fs):
            dest = Location(out, src.storage_options)
    table = scan_table(src, executor=executor, batch_size=batch_size, progress=progress)
    write_catalog(table, dest)
    seconds = time.perf_counter() - t0
    return ScanSummary(catalog=table, seconds=seconds, out=dest.url, bytes_read=bytes_read(table))
