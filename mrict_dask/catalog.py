"""The scan catalog: one row per file, its columns, its one Parquet schema, its one writer and reader.

The catalog is private to the run (it holds PatientIDs and file names): it lives in the work area, never in the
output store or the report.
"""

from __future__ import annotations

from typing import Any

from .errors import InputError
from .io import Location

CATALOG_COLUMNS: tuple[str, ...] = (
    "url", "size", "read_error", "is_dicomdir",
    "sop_class_uid", "sop_instance_uid", "series_uid", "study_uid", "frame_of_reference_uid",
    "patient_id", "modality", "study_date", "study_time", "series_date", "series_time",
    "series_number", "series_description", "image_type", "instance_number",
    "image_position", "image_orientation", "pixel_spacing", "slice_thickness", "spacing_between_slices",
    "rows", "columns", "number_of_frames", "bits_allocated", "samples_per_pixel", "photometric",
    "transfer_syntax_uid", "rescale_slope", "rescale_intercept", "rescale_type", "pixel_padding_value",
    "gantry_tilt", "acquisition_number", "echo_time", "echo_numbers", "repetition_time", "inversion_time",
    "scanning_sequence", "sequence_variant", "sequence_name", "mr_acquisition_type", "contrast_agent",
    "convolution_kernel", "body_part", "manufacturer", "frame_positions", "pixel_data_offset", "pixel_data_ok",
    "acquisition_time", "temporal_position", "trigger_time", "diffusion_b_value", "diffusion_direction",
)

# Column kinds, for the DataFrame dtypes and the Parquet schema.
_INT_COLS = ("size", "series_number", "instance_number", "rows", "columns", "number_of_frames", "bits_allocated",
             "samples_per_pixel", "pixel_padding_value", "acquisition_number", "echo_numbers", "pixel_data_offset",
             "temporal_position")
_FLOAT_COLS = ("slice_thickness", "spacing_between_slices", "rescale_slope", "rescale_intercept", "gantry_tilt",
               "echo_time", "repetition_time", "inversion_time", "trigger_time", "diffusion_b_value")
_LIST_COLS = ("image_position", "image_orientation", "pixel_spacing", "diffusion_direction")
_BOOL_COLS = ("is_dicomdir", "pixel_data_ok")
_NESTED_COLS = ("frame_positions",)


STORAGE_ERROR = "unreadable: storage error"  # the read failed, not the file: a later scan may well succeed
SCAN_TASK_FAILED = "unreadable: scan task failed"  # the worker reading a batch was lost, not the files


def lost_to_storage(table: Any) -> list[str]:
    """The read errors of ``table`` that say nothing about the file (storage failed, a scan task was lost): a
    catalog holding them is not kept, since a re-scan may well succeed."""
    import pyarrow.compute as pc

    col = table.column("read_error").cast("string")
    lost = pc.or_(pc.starts_with(col, STORAGE_ERROR), pc.starts_with(col, SCAN_TASK_FAILED))
    return col.filter(lost).cast("string").to_pylist()


def empty_row(url: str, size: int) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(CATALOG_COLUMNS)
    row.update(url=url, size=size, read_error="", is_dicomdir=False, pixel_data_ok=False, bytes_read=0)
    return row

def catalog_schema(encoded: bool = False):
    """The Parquet (Arrow) schema of the catalog: the one schema every writer uses.

    ``encoded``: the in-memory form of the scan's tables, with repeated text (one value per series, study or
    patient) dictionary-encoded; files always hold plain text columns.
    """
    import pyarrow as pa

    fields = []
    for col in CATALOG_COLUMNS:
        if col in _INT_COLS:
            t = pa.int64()
        elif col in _FLOAT_COLS:
            t = pa.float64()
        elif col in _BOOL_COLS:
            t = pa.bool_()
        elif col in _LIST_COLS:
            t = pa.list_(pa.float64())
        elif col in _NESTED_COLS:
            t = pa.list_(pa.list_(pa.float64()))
        elif encoded and col in _REPEATED_TEXT:
            t = pa.dictionary(pa.int32(), pa.string())
        else:
            t = pa.string()
        fields.append(pa.field(col, t, nullable=col not in ("url", "read_error", "is_dicomdir", "pixel_data_ok")))
    return pa.schema(fields)


def catalog_table(rows: list[dict]):
    """Rows (dicts with the catalog's columns, as the header reader gives them) -> an Arrow table of the schema.

    The table's metadata holds ``bytes_read``: the bytes fetched to read these headers.
    """
    import pyarrow as pa

    from .values import is_missing

    schema = catalog_schema(encoded=True)
    cols = []
    for f in schema:
        # rows from a DataFrame carry NaN (or pd.NA) where a value is missing, whatever the column's type
        vals = [None if is_missing(v := r.get(f.name)) else v for r in rows]
        if f.name in _INT_COLS:
            vals = [None if v is None else int(v) for v in vals]
        elif f.name in _FLOAT_COLS:
            vals = [None if v is None else float(v) for v in vals]
        elif f.name in _BOOL_COLS:
            vals = [bool(v) for v in vals] if f.name == "is_dicomdir" else [None if v is None else bool(v)
                                                                             for v in vals]
        elif f.name == "read_error":
            vals = [v or "" for v in vals]
        if pa.types.is_dictionary(f.type):
            cols.append(pa.array(vals, type=pa.string()).dictionary_encode())
        else:
            cols.append(pa.array(vals, type=f.type))
    bytes_read = sum(int(r.get("bytes_read") or 0) for r in rows)
    return pa.Table.from_arrays(cols, schema=schema.with_metadata({"bytes_read": str(bytes_read)}))


def encoded(table: Any):
    """``table`` (catalog columns) with its repeated text dictionary-encoded, as the scan's tasks return it."""
    import pyarrow as pa

    cols = [table.column(n).dictionary_encode() if n in _REPEATED_TEXT and not pa.types.is_dictionary(
        table.column(n).type) else table.column(n) for n in table.column_names]
    return pa.table(cols, names=table.column_names, metadata=table.schema.metadata)


def bytes_read(table: Any) -> int:
    meta = table.schema.metadata or {}
    return int(meta.get(b"bytes_read", b"0"))


def concat_tables(tables: list) -> Any:
    """One catalog table from per-batch tables (as :func:`catalog_table` makes them), sorted by URL, ``bytes_read``
    summed. Tables given in URL order (a scan's batches) are not copied again by a sort."""
    import pyarrow as pa
    import pyarrow.compute as pc

    total = sum(bytes_read(t) for t in tables)
    if not tables:
        return catalog_schema(encoded=True).empty_table().replace_schema_metadata({"bytes_read": "0"})
    out = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    url = out.column("url")
    if out.num_rows > 1 and not pc.all(pc.less_equal(url.slice(0, out.num_rows - 1), url.slice(1))).as_py():
        out = out.sort_by("url")
    return out.replace_schema_metadata({"bytes_read": str(total)})


def catalog_frame(catalog: Any):
    """The catalog DataFrame (``CATALOG_COLUMNS``, typed, sorted by URL) from an Arrow table or a list of rows.

    Strings and lists are Python objects (None when absent), integers nullable ``Int64``, floats ``float64``;
    ``attrs["bytes_read"]`` holds the header bytes fetched.
    """
    import pandas as pd

    table = catalog if not isinstance(catalog, list) else catalog_table(catalog)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise InputError(f"not a scan catalog: no {', '.join(missing)} column")
    table = _with_all_columns(table)
    table = table.sort_by("url")
    cols: dict[str, Any] = {}
    for col in CATALOG_COLUMNS:
        arr = table.column(col)
        if col in _INT_COLS:
            cols[col] = pd.array(arr.to_pylist(), dtype="Int64")
        elif col in _FLOAT_COLS:
            cols[col] = arr.to_numpy(zero_copy_only=False).astype("float64")
        elif col in _BOOL_COLS and arr.null_count == 0:
            cols[col] = arr.to_numpy(zero_copy_only=False).astype(bool)
        elif col == "read_error":
            cols[col] = pd.Series([v or "" for v in arr.to_pylist()], dtype=object)
        else:
            cols[col] = pd.Series(arr.to_pylist(), dtype=object)
    df = pd.DataFrame(cols, index=pd.RangeIndex(table.num_rows))
    df.attrs["bytes_read"] = bytes_read(table)
    return df


REQUIRED_COLUMNS = ("url", "series_uid")
"""A catalog without these is not one; any other column may be absent (an older or hand-made catalog): null."""


def schema_column(name: str, col: Any, n_rows: int):
    """Column ``name`` as the schema's type (dictionary-encoded text stays encoded); ``col`` None: absent, so null
    (or the column's default: no read error, not a DICOMDIR; an absent pixel_data_ok stays unknown)."""
    import pyarrow as pa

    f = catalog_schema().field(name)
    if col is None:
        default = {"read_error": "", "is_dicomdir": False}.get(name)
        return pa.chunked_array([pa.repeat(pa.scalar(default, type=f.type), n_rows)], type=f.type)
    if pa.types.is_dictionary(col.type) and col.type.value_type == f.type:
        return col
    return col if col.type == f.type else _cast(col, f)


def _with_all_columns(table: Any):
    """``table`` with every catalog column, in order, of the schema's types; absent ones null."""
    import pyarrow as pa

    names = set(table.column_names)
    cols = [schema_column(f.name, table.column(f.name) if f.name in names else None, table.num_rows)
            for f in catalog_schema()]
    fields = [f.with_type(col.type) for f, col in zip(catalog_schema(), cols)]
    return pa.Table.from_arrays(cols, schema=pa.schema(fields, metadata=table.schema.metadata or {}))


def _cast(col: Any, f: Any):
    """``col`` as the schema's type; values that do not convert (text in a number column) become null."""
    import pyarrow as pa

    try:
        return col.cast(f.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        pass

    def convert(v: Any) -> Any:
        try:
            if v is None or v == "":
                return None
            if f.name in _INT_COLS:
                return int(float(v))
            if f.name in _FLOAT_COLS:
                return float(v)
            if f.name in _BOOL_COLS:
                return bool(v)
            if pa.types.is_string(f.type):
                return str(v)
            if pa.types.is_list(f.type) and not isinstance(v, (list, tuple)):
                return None
            return v
        except (TypeError, ValueError):
            return None

    return pa.array([convert(v) for v in col.to_pylist()], type=f.type)


def as_catalog_table(catalog: Any):
    """A catalog as an Arrow table of :func:`catalog_schema` (every column, schema types), rows in the given order.

    Accepts an Arrow table (a scan's, or a Parquet file's), a DataFrame, or a list of row dicts.
    """
    import pyarrow as pa

    if isinstance(catalog, list):
        catalog = catalog_table(catalog)
    elif not isinstance(catalog, pa.Table):
        catalog = pa.Table.from_pandas(catalog, preserve_index=False)
    missing = [c for c in REQUIRED_COLUMNS if c not in catalog.column_names]
    if missing:
        raise InputError(f"not a scan catalog: no {', '.join(missing)} column")
    return _with_all_columns(catalog)


def write_catalog(catalog: Any, where: Location, row_group: int = 65536) -> None:
    """Write a catalog (Arrow table or DataFrame) as Parquet with :func:`catalog_schema` (plain text columns;
    Parquet encodes repeated values itself), atomically. Written a row group at a time: encoded text is decoded
    one slice at a time, never for the whole catalog at once."""
    import io

    import pyarrow.parquet as pq

    table = as_catalog_table(catalog).replace_schema_metadata(None)
    schema = catalog_schema()
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, schema) as writer:
        for start in range(0, max(table.num_rows, 1), row_group):
            writer.write_table(table.slice(start, row_group).cast(schema))
    where.write_bytes(buf.getvalue())


# Columns whose values repeat across many rows (one per series, study, patient...): read dictionary-encoded, so
# a catalog of millions of rows holds each distinct value once.
_REPEATED_TEXT = ("read_error", "sop_class_uid", "series_uid", "study_uid", "frame_of_reference_uid", "patient_id",
                  "modality", "study_date", "study_time", "series_date", "series_time", "series_description",
                  "image_type", "photometric", "transfer_syntax_uid", "rescale_type", "scanning_sequence",
                  "sequence_variant", "sequence_name", "mr_acquisition_type", "contrast_agent", "convolution_kernel",
                  "body_part", "manufacturer")


class CatalogFile:
    """A Parquet catalog opened for reading one column at a time (a catalog of millions of rows need never be
    in memory whole). :class:`InputError` naming the problem when it is missing or not a Parquet catalog."""

    def __init__(self, where: Location):
        import pyarrow.parquet as pq

        self.where = where
        self._fh = None
        try:
            self._fh = where.open("rb")
            self._pf = pq.ParquetFile(self._fh)
            self.names = set(self._pf.schema_arrow.names)
            self.num_rows = self._pf.metadata.num_rows
            missing = [c for c in REQUIRED_COLUMNS if c not in self.names]
            if missing:
                raise InputError(f"{where.url}: not a scan catalog: no {', '.join(missing)} column")
        except Exception as exc:
            self.close()
            if isinstance(exc, InputError):
                raise
            self._fail(exc)

    def _fail(self, exc: BaseException):
        import pyarrow as pa

        if isinstance(exc, FileNotFoundError):
            raise InputError(f"catalog not found: {self.where.url}") from None
        if isinstance(exc, IsADirectoryError):
            raise InputError(f"{self.where.url} is a folder, not a catalog file") from None
        if isinstance(exc, (pa.ArrowInvalid, OSError)):
            raise InputError(f"{self.where.url} is not a readable Parquet catalog "
                             f"({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})") from None
        raise exc

    def column(self, name: str):
        """Column ``name`` of the schema's type (repeated text dictionary-encoded; absent: null)."""
        if name not in self.names:
            return schema_column(name, None, self.num_rows)
        try:
            table = self._pf.read(columns=[name], use_threads=False)
        except Exception as exc:
            self._fail(exc)
        col = table.column(name)
        try:
            if name in _REPEATED_TEXT and not _is_dictionary(col):
                col = col.dictionary_encode()
            return schema_column(name, col, self.num_rows)
        except Exception:  # a column of a type the catalog never has (the message would quote its values)
            raise InputError(f"{self.where.url}: column {name} has type {col.type}, not a scan catalog's "
                             f"{catalog_schema().field(name).type}") from None

    def table(self, columns: tuple[str, ...] | None = None):
        import pyarrow as pa

        names = columns or CATALOG_COLUMNS
        return pa.table({name: self.column(name) for name in names})

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> CatalogFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _is_dictionary(col: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_dictionary(col.type)


def read_catalog_table(where: Location, columns: tuple[str, ...] | None = None):
    """The catalog as an Arrow table (schema types, repeated text dictionary-encoded; only ``columns`` if given).

    :class:`InputError` naming the problem when the file is missing or not a Parquet catalog.
    """
    with CatalogFile(where) as f:
        return f.table(columns)


def read_catalog(where: Location):
    """The catalog DataFrame from a Parquet file; :class:`InputError` naming the problem when it is not one."""
    return catalog_frame(read_catalog_table(where))
