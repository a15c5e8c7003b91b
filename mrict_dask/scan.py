"""Scan: list every file under a URL and read DICOM headers only into a one-row-per-file catalog.

Layers, from pure to orchestrated:

- ``read_header`` / ``scan_batch``: pure functions. A batch fetches the first bytes of each file (one
  concurrent ``cat_ranges`` call on object storage), parses them with pydicom up to the pixel data and
  fetches more only for the few files whose header is longer. Every file gives exactly one row; a bad
  file gets a ``read_error`` reason instead of raising.
- ``scan``: lists the files on the driver, then maps ``scan_batch`` over batches (serially, or on a Dask
  ``client`` given by the caller) and builds the catalog DataFrame.
- ``scan_to_parquet``: the same, written to Parquet, with a PHI-free ``ScanSummary``.

Rows returned by ``read_header``/``scan_batch`` hold every column of ``CATALOG_COLUMNS`` plus
``bytes_read`` (bytes fetched for that file), which ``catalog_frame`` reports in ``DataFrame.attrs``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from .catalog import catalog_frame, catalog_table, empty_row, write_catalog
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


def scan(url: str | Location | Source, storage_options: dict | None = None, executor: Any = None,
         batch_size: int = 256, progress: bool = False):
    """Catalog DataFrame of every file under ``url`` (one row per file, sorted by URL).

    ``executor``: None reads serially in this process; an :mod:`~mrict_dask.executor` executor or a Dask
    client maps :func:`scan_batch` over batches of ``batch_size`` files (one task each, a bounded number in
    flight). The driver gathers one small Arrow table per batch, never a Python object per file.
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
    tables = []
    with Progress("scan", total, progress, unit=source.unit_name) as bar:
        for outcome in ex.run(rows_task(source), batches(source, units, max(1, int(batch_size))),
                              key=lambda b: f"scan-batch-{b[0][0]}"):
            if outcome.ok:
                tables.append(outcome.value)
            else:  # the task itself failed (worker lost repeatedly, or a bug): its units still get rows
                reason = "unreadable: scan task failed: " + outcome.error
                tables.append(catalog_table(source.lost_rows(outcome.item, reason)))
            bar.advance(sum(source.weight(u) for u in outcome.item))
    del units
    return concat_tables(tables)


@dataclass
class ScanSummary:
    catalog: Any  # pandas.DataFrame
    seconds: float
    out: str | None = None
    bytes_read: int = field(default=0)

    def describe(self) -> str:
        """Counts only: no PatientIDs, names, UIDs or file names (those stay in the private catalog)."""
        df = self.catalog
        n = len(df)
        total = int(df["size"].fillna(0).sum()) if n else 0
        ok = df[df["read_error"] == ""]
        rate = n / self.seconds if self.seconds > 0 else float("nan")
        size = f" ({_human(total)})" if n and df["size"].notna().any() else ""  # DICOMweb metadata has no size
        lines = [f"scanned {n:,} files{size} in {self.seconds:.1f} s ({rate:,.0f} files/s)"]
        if self.bytes_read and total:
            share = 100 * self.bytes_read / total
            lines.append(f"  header bytes read: {_human(self.bytes_read)} ({share:.1f} % of the files)")
        lines.append(f"  readable DICOM objects: {len(ok):,} in {ok['series_uid'].nunique():,} series, "
                     f"{ok['study_uid'].nunique():,} studies, {ok['patient_id'].nunique():,} patients")
        bad = df[df["read_error"] != ""]
        if len(bad):
            kinds = bad["read_error"].map(lambda r: r.split(":")[0].strip()).value_counts()
            lines.append(f"  not catalogued as images: {len(bad):,} files")
            for kind, count in kinds.items():
                lines.append(f"    {kind}: {count:,}")
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

    The input's storage options apply to ``out`` when both are on the same kind of store (endpoint, keys).
    """
    t0 = time.perf_counter()
    src = open_source(url, storage_options)
    if isinstance(out, Location):
        dest = out
    else:
        dest = Location(out)
        loc = getattr(src, "location", None)  # an fsspec input: its options serve an output on the same store
        if loc is not None and type(dest.fs) is type(loc.fs):
            dest = Location(out, src.storage_options)
    table = scan_table(src, executor=executor, batch_size=batch_size, progress=progress)
    write_catalog(table, dest)
    df = catalog_frame(table)
    del table
    seconds = time.perf_counter() - t0
    return ScanSummary(catalog=df, seconds=seconds, out=dest.url, bytes_read=int(df.attrs.get("bytes_read", 0)))
