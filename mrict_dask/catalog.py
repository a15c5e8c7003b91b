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
)

# Column kinds, for the DataFrame dtypes and the Parquet schema.
_INT_COLS = ("size", "series_number", "instance_number", "rows", "columns", "number_of_frames", "bits_allocated",
             "samples_per_pixel", "pixel_padding_value", "acquisition_number", "echo_numbers", "pixel_data_offset")
_FLOAT_COLS = ("slice_thickness", "spacing_between_slices", "rescale_slope", "rescale_intercept", "gantry_tilt",
               "echo_time", "repetition_time", "inversion_time")
_LIST_COLS = ("image_position", "image_orientation", "pixel_spacing")
_BOOL_COLS = ("is_dicomdir", "pixel_data_ok")
_NESTED_COLS = ("frame_positions",)


STORAGE_ERROR = "unreadable: storage error"  # the read failed, not the file: a later scan may well succeed


def empty_row(url: str, size: int) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(CATALOG_COLUMNS)
    row.update(url=url, size=size, read_error="", is_dicomdir=False, pixel_data_ok=False, bytes_read=0)
    return row

def catalog_schema():
    """The Parquet (Arrow) schema of the catalog: the one schema every writer uses."""
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
        else:
            t = pa.string()
        fields.append(pa.field(col, t, nullable=col not in ("url", "read_error", "is_dicomdir", "pixel_data_ok")))
    return pa.schema(fields)


def catalog_table(rows: list[dict]):
    """Rows (dicts with the catalog's columns, as the header reader gives them) -> an Arrow table of the schema.

    The table's metadata holds ``bytes_read``: the bytes fetched to read these headers.
    """
    import pyarrow as pa

    schema = catalog_schema()
    cols = []
    for f in schema:
        vals = [r.get(f.name) for r in rows]
        if f.name in _INT_COLS:
            vals = [None if v is None else int(v) for v in vals]
        elif f.name in _FLOAT_COLS:
            vals = [None if v is None else float(v) for v in vals]
        elif f.name in _BOOL_COLS:
            vals = [bool(v) for v in vals]
        elif f.name == "read_error":
            vals = [v or "" for v in vals]
        cols.append(pa.array(vals, type=f.type))
    bytes_read = sum(int(r.get("bytes_read") or 0) for r in rows)
    return pa.Table.from_arrays(cols, schema=schema.with_metadata({"bytes_read": str(bytes_read)}))


def bytes_read(table: Any) -> int:
    meta = table.schema.metadata or {}
    return int(meta.get(b"bytes_read", b"0"))


def concat_tables(tables: list) -> Any:
    """One catalog table from per-batch tables, sorted by URL, ``bytes_read`` summed."""
    import pyarrow as pa

    schema = catalog_schema()
    total = sum(bytes_read(t) for t in tables)
    if not tables:
        return schema.empty_table().replace_schema_metadata({"bytes_read": "0"})
    out = pa.concat_tables([t.replace_schema_metadata(None) for t in tables]).sort_by("url")
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


def _with_all_columns(table: Any):
    """``table`` with every catalog column, in order, of the schema's types; absent ones null."""
    import pyarrow as pa

    schema = catalog_schema()
    cols = []
    for f in schema:
        if f.name in table.column_names:
            col = table.column(f.name)
            cols.append(col if col.type == f.type else _cast(col, f))
        else:
            default = {"read_error": "", "is_dicomdir": False}.get(f.name)  # pixel_data_ok absent: unknown
            cols.append(pa.array([default] * table.num_rows, type=f.type))
    return pa.Table.from_arrays(cols, schema=schema.with_metadata(table.schema.metadata or {}))


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
            return v
        except (TypeError, ValueError):
            return None

    return pa.array([convert(v) for v in col.to_pylist()], type=f.type)


def _as_table(catalog: Any):
    import pyarrow as pa

    if not isinstance(catalog, pa.Table):
        catalog = pa.Table.from_pandas(catalog, preserve_index=False)
    return _with_all_columns(catalog).replace_schema_metadata(None)


def write_catalog(catalog: Any, where: Location) -> None:
    """Write a catalog (Arrow table or DataFrame) as Parquet with :func:`catalog_schema`, atomically."""
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(_as_table(catalog), buf)
    where.write_bytes(buf.getvalue())


def read_catalog(where: Location):
    """The catalog DataFrame from a Parquet file; :class:`InputError` naming the problem when it is not one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with where.open("rb") as fh:
            table = pq.read_table(fh)
    except FileNotFoundError:
        raise InputError(f"catalog not found: {where.url}") from None
    except IsADirectoryError:
        raise InputError(f"{where.url} is a folder, not a catalog file") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{where.url} is not a readable Parquet catalog "
                         f"({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})") from None
    return catalog_frame(table)
