"""Scan: list every instance of an input and read DICOM headers only into a one-row-per-instance catalog.

Layers, from pure to orchestrated:

- ``list_files`` / ``scan_batch`` (:mod:`mrict_dask.files`, re-exported here): the file input's listing, and the
  Arrow catalog table of a batch of files (headers read by :mod:`mrict_dask.dicom_header`: first bytes only, one
  concurrent ranged read per batch on object storage). Every file gives exactly one row; a bad file gets a
  ``read_error`` reason instead of raising.
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

from .catalog import SCAN_TASK_FAILED, bytes_read, catalog_frame, catalog_table, write_catalog
from .files import list_files, lost_rows, scan_batch
from .io import Location, redact
from .progress import Progress
from .sources import Source, batches, open_source, rows_task

log = logging.getLogger(__name__)

__all__ = ["Batch", "ScanSummary", "list_files", "lost_rows", "scan", "scan_batch", "scan_table", "scan_to_parquet",
           "update_catalog"]


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

    ``executor``: None reads serially in this process; an :mod:`~mrict_dask.executor` executor (a Dask client
    through :func:`mrict_dask.orchestrate.as_executor`) maps the source's row reading over batches of
    ``batch_size`` units (one task each, a bounded number in flight).
    """
    return catalog_frame(scan_table(url, storage_options, executor, batch_size, progress))


def scan_table(url: str | Location | Source, storage_options: dict | None = None, executor: Any = None,
               batch_size: int = 256, progress: bool = False, units: list[tuple[str, int]] | None = None):
    """:func:`scan`, as the Arrow table (sorted by URL; ``bytes_read`` in its metadata).

    ``url`` is any input (see :func:`~mrict_dask.sources.open_source`): the source lists its units (files, or
    series of a DICOMweb service) on the driver and each task reads the rows of a batch of units. ``units``: scan
    only these (sorted), as the source lists them.
    """
    from .catalog import concat_tables
    from .executor import as_executor

    source = open_source(url, storage_options)
    units = source.list_units() if units is None else list(units)
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


# ----------------------------------------------------------------------------------------------- re-runs
CATALOG_NAME = "catalog.parquet"
LISTING_NAME = "listing.parquet"
"""Beside the catalog in the work area: the input's listing (unit URL, weight, stamp) the catalog was made from."""


@dataclass
class CatalogUpdate:
    """What a run's scan did: units of the input new, changed or gone since the catalog was made, and how many
    were read (only the new and changed ones)."""

    where: Location  # the catalog
    units: int = 0  # units the input lists now
    new: int = 0
    changed: int = 0
    removed: int = 0
    scanned: int = 0  # units read by this run
    unit_name: str = "files"

    def describe(self) -> str:
        if self.scanned == self.units and not self.removed:
            return f"scan: {self.units:,} {self.unit_name} read"
        if not (self.new or self.changed or self.removed):
            return f"scan: the input's {self.units:,} {self.unit_name} are unchanged since the catalog was made"
        return (f"scan: {self.new:,} new, {self.changed:,} changed and {self.removed:,} removed of {self.units:,} "
                f"{self.unit_name} since the catalog was made; only the new and changed were read")


def _listing_table(rows: list[tuple[str, int, str]]):
    import pyarrow as pa

    return pa.table({"url": pa.array([u for u, _, _ in rows], pa.string()),
                     "weight": pa.array([int(w or 0) for _, w, _ in rows], pa.int64()),
                     "stamp": pa.array([s or "" for _, _, s in rows], pa.string())})


def _write_parquet(table: Any, where: Location) -> None:
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    where.write_bytes(buf.getvalue())


def _old_listing(source: Source, catalog: Any, where: Location):
    """The listing the catalog was made from; for a catalog from before listings were kept, what its rows tell:
    each unit's URL and weight (a file's size, a series' instance count), no stamp."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if where.exists():
        with where.open("rb") as fh:
            return pq.read_table(fh)
    units = source.unit_urls(catalog.column("url").cast(pa.string()))
    if source.unit_name == "files":
        weights = catalog.column("size").fill_null(0)
        table = pa.table({"url": units, "weight": weights.cast(pa.int64())})
    else:
        table = pa.table({"url": units, "weight": pa.repeat(pa.scalar(1, pa.int64()), catalog.num_rows)})
        table = table.group_by("url").aggregate([("weight", "sum")]).rename_columns(["url", "weight"])
    return table.append_column("stamp", pc.cast(pa.repeat(pa.scalar("", pa.string()), table.num_rows), pa.string()))


def changed_units(old: Any, now: Any) -> tuple[list[str], list[str], list[str]]:
    """(new, changed, removed) unit URLs between two listings (Arrow tables url, weight, stamp): a unit changed
    when its weight differs, or both stamps are known and differ."""
    import pyarrow as pa
    import pyarrow.compute as pc

    joined = now.join(old, "url", join_type="full outer", left_suffix="_now", right_suffix="_old")
    now_w, old_w = joined.column("weight_now"), joined.column("weight_old")
    new = joined.filter(pc.is_null(old_w)).column("url")
    removed = joined.filter(pc.is_null(now_w)).column("url")
    both = joined.filter(pc.and_(pc.is_valid(now_w), pc.is_valid(old_w)))
    s_now, s_old = both.column("stamp_now").fill_null(""), both.column("stamp_old").fill_null("")
    stamped = pc.and_(pc.not_equal(s_now, ""), pc.not_equal(s_old, ""))
    differ = pc.or_(pc.not_equal(both.column("weight_now"), both.column("weight_old")),
                    pc.and_(stamped, pc.not_equal(s_now, s_old)))
    changed = both.filter(differ).column("url")

    def urls(col: Any) -> list[str]:
        return sorted(col.cast(pa.string()).to_pylist())

    return urls(new), urls(changed), urls(removed)


def update_catalog(source: Source, work: Location, executor: Any = None, batch_size: int = 256,
                   progress: bool = False, listing: list[tuple[str, int, str]] | None = None) -> CatalogUpdate:
    """Bring the work area's catalog up to date with the input, reading only what is new or changed.

    One listing of the input (with stamps: ETags or modification times, a series' instances) is compared with the
    listing the catalog was made from: rows of changed or removed units leave the catalog, new and changed units
    are scanned, and the catalog and its listing are written again. Without a catalog everything is scanned.
    ``listing``: the source's listing, when the caller made it already.
    Files that could not be read from storage after the retries are never written into the catalog (a re-scan may
    well read them): :class:`~mrict_dask.errors.InputError`, and nothing is written.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from .catalog import catalog_schema, concat_tables, lost_to_storage, read_catalog_table
    from .errors import InputError

    where, listing_at = work.join(CATALOG_NAME), work.join(LISTING_NAME)
    listing = source.listing() if listing is None else listing
    units = [(u, w) for u, w, _ in listing]
    now = _listing_table(listing)
    update = CatalogUpdate(where=where, units=len(units), unit_name=source.unit_name)
    old_catalog = read_catalog_table(where) if where.exists() else None
    if old_catalog is None:
        todo, keep = units, None
        update.new = len(units)
    else:
        new, changed, removed = changed_units(_old_listing(source, old_catalog, listing_at), now)
        update.new, update.changed, update.removed = len(new), len(changed), len(removed)
        if not (new or changed or removed):
            log.info("the input is unchanged since the catalog was made: reusing it")
            if not listing_at.exists():
                _write_parquet(now, listing_at)
            return update
        wanted = set(new) | set(changed)
        todo = [u for u in units if u[0] in wanted]
        gone = pa.array(sorted(set(changed) | set(removed)), pa.string())
        stale = pc.is_in(source.unit_urls(old_catalog.column("url").cast(pa.string())), value_set=gone)
        keep = old_catalog.filter(pc.invert(stale.fill_null(False))).cast(catalog_schema(encoded=True))
        log.info("input changed since the catalog was made: %d new, %d changed, %d removed %s", update.new,
                 update.changed, update.removed, source.unit_name)
    update.scanned = len(todo)
    table = scan_table(source, executor=executor, batch_size=batch_size, progress=progress, units=todo) if todo \
        else None
    if table is not None:
        # The plan (and so the store) is made from this catalog: a file that only failed to download must not be
        # frozen into it as unreadable (its pair would be lost for good).
        lost = lost_to_storage(table)
        if lost:
            kinds = sorted({":".join(r.split(":")[:3]) for r in lost})  # no file names (PHI)
            left = "no catalog, plan or store was written" if keep is None else \
                "the catalog, plan and store were left as they were"
            raise InputError(f"{len(lost)} of {table.num_rows} files could not be read from storage after retries "
                             f"({'; '.join(kinds)[:200]}); {left}: re-run when the storage answers again")
    parts = [t for t in (keep, table) if t is not None]
    write_catalog(concat_tables(parts) if len(parts) > 1 else parts[0], where)
    _write_parquet(now, listing_at)
    return update


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
