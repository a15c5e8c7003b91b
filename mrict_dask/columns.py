"""The catalog's columns as the planner reads them: numpy arrays and text codes, one entry per row.

Built once from the Arrow catalog, so that grouping files into series and stacks, sorting and selection are
array operations: no Python object is made per file (a catalog of 100x the seed has millions of rows). Text is
dictionary-coded (``Coded``: an int code per row, -1 where the value is missing or blank, and the distinct values
once); numbers are float64 with NaN where missing; vectors are (n, k) float64 with a NaN row where the value is
missing, of the wrong length or not finite. Values mean what :mod:`mrict_dask.values` makes of them (text is
stripped; ``number``; ``vector``), so decisions do not depend on how a catalog was stored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .catalog import as_catalog_table


@dataclass(frozen=True)
class Coded:
    """Text column as codes: ``codes[i]`` indexes ``values``; -1 = missing or blank."""

    codes: np.ndarray
    values: list[str]

    def text(self, i: int) -> str:
        """The value of row ``i`` ('' when missing)."""
        return self.text_of(int(self.codes[i]))

    def text_of(self, code: int) -> str:
        """The value a code stands for ('' for -1)."""
        return self.values[int(code)] if code >= 0 else ""

    def most_common(self, rows: np.ndarray) -> str | None:
        """The most frequent non-blank value among ``rows`` (ties: the one seen first), or None."""
        codes = self.codes[rows]
        codes = codes[codes >= 0]
        if not codes.size:
            return None
        uniq, first, counts = np.unique(codes, return_index=True, return_counts=True)
        best = np.lexsort((first, -counts))[0]
        return self.values[int(uniq[best])]


def _chunk(col: Any) -> Any:
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return col


def _coded(col: Any, upper: bool = False, values: bool = True) -> Coded:
    """Codes of a text (or integer) column, blanks -1, values stripped (and upper-cased); equal values one code.

    ``values=False`` for columns compared only for equality (one value per file, e.g. SOPInstanceUID): their
    distinct values are never made into Python strings.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    col = _chunk(col)
    if not pa.types.is_dictionary(col.type):
        if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
            col = col.cast(pa.string())
        col = pc.utf8_trim_whitespace(col)
        if upper:
            col = pc.utf8_upper(col)
        col = col.dictionary_encode()
        dictionary = col.dictionary
    else:  # canonicalise the (few) dictionary values; equal ones share a code below
        dictionary = pc.utf8_trim_whitespace(col.dictionary.cast(pa.string()))
        if upper:
            dictionary = pc.utf8_upper(dictionary)
    indices = col.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
    if not values:
        blank = np.flatnonzero(pc.equal(dictionary, "").fill_null(True).to_numpy(zero_copy_only=False))
        codes = indices.copy()
        if blank.size:
            codes[np.isin(codes, blank)] = -1
        return Coded(codes, [])
    texts = dictionary.to_pylist()
    canon: dict[str, int] = {}
    remap = np.full(len(texts) + 1, -1, dtype=np.int32)  # the last entry maps a null index (-1) to -1
    out_values: list[str] = []
    for k, t in enumerate(texts):
        if t:
            remap[k] = canon.setdefault(t, len(out_values))
            if remap[k] == len(out_values):
                out_values.append(t)
    return Coded(remap[indices], out_values)


def _floats(col: Any) -> np.ndarray:
    import pyarrow as pa

    return _chunk(col).cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


def _vectors(col: Any, k: int) -> np.ndarray:
    """(n, k) float64 from a list column; NaN rows where a value is missing, of another length or not finite."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = _chunk(col)
    n = len(col)
    out = np.full((n, k), np.nan)
    if n == 0:
        return out
    lengths = pc.list_value_length(col).fill_null(-1).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(lengths == k)
    if rows.size:
        offsets = col.offsets.to_numpy()[:-1]
        values = col.values.cast(pa.float64()).to_numpy(zero_copy_only=False)
        out[rows] = values[offsets[rows][:, None] + np.arange(k)[None, :]]
    out[~np.isfinite(out).all(axis=1)] = np.nan
    return out


def _bools(col: Any) -> np.ndarray:
    """int8: 1 true, 0 false, -1 missing."""
    col = _chunk(col)
    vals = col.fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    return np.where(valid, vals.astype(np.int8), np.int8(-1)).astype(np.int8)


_TEXT = ("read_error", "sop_class_uid", "series_uid", "study_uid", "patient_id", "series_description", "study_date",
         "study_time", "series_date", "series_time", "convolution_kernel", "body_part", "scanning_sequence",
         "sequence_variant", "sequence_name", "mr_acquisition_type", "contrast_agent", "echo_numbers",
         "acquisition_number", "image_type", "photometric", "temporal_position", "acquisition_time")
_NUMBERS = ("series_number", "rows", "columns", "number_of_frames", "slice_thickness", "echo_time",
            "repetition_time", "inversion_time", "trigger_time", "diffusion_b_value", "instance_number")
class Columns:
    """The planner's view of a catalog (see the module docstring).

    Made from a catalog in memory (Arrow table, DataFrame or rows) or, one column at a time, from a Parquet catalog
    (:meth:`from_parquet`), so the whole catalog is never in memory at once. Keeps the rows' URLs (Arrow) and the
    frame positions of multi-frame rows; everything else is numpy.
    """

    def __init__(self, column: Callable[[str], Any], n: int):
        import pyarrow.compute as pc

        self.n = n
        self.text: dict[str, Coded] = {name: _coded(column(name)) for name in _TEXT}
        self.text["modality"] = _coded(column("modality"), upper=True)
        self.text["image_type_upper"] = _coded(column("image_type"), upper=True)
        self.text["sop_instance_uid"] = _coded(column("sop_instance_uid"), values=False)
        self.num: dict[str, np.ndarray] = {name: _floats(column(name)) for name in _NUMBERS}
        self.ipp = _vectors(column("image_position"), 3)
        self.iop = _vectors(column("image_orientation"), 6)
        self.pixel_spacing = _vectors(column("pixel_spacing"), 2)
        self.diffusion_direction = _vectors(column("diffusion_direction"), 3)
        self.is_dicomdir = _bools(column("is_dicomdir")) == 1
        self.pixel_data_ok = _bools(column("pixel_data_ok"))
        frames = self.num["number_of_frames"]
        # as ``int(number(v) or 1)``: missing or 0 frames count as one
        self.frames = np.where(np.isnan(frames) | (frames == 0), 1, np.nan_to_num(frames)).astype(np.int64)
        multi = np.flatnonzero(self.frames > 1)
        self._frame_positions = dict(zip(multi.tolist(), _chunk(column("frame_positions")).take(multi).to_pylist()))
        self._url = _chunk(column("url"))
        self.url_rank = np.empty(self.n, dtype=np.int64)
        self.url_rank[pc.sort_indices(self._url).to_numpy()] = np.arange(self.n)

    @classmethod
    def of(cls, catalog: Any) -> Columns:
        """``catalog`` as Columns: Columns as they are; a :class:`~mrict_dask.io.Location` of a Parquet catalog
        read column by column; an Arrow table, DataFrame or list of rows."""
        from .io import Location

        if isinstance(catalog, Columns):
            return catalog
        if isinstance(catalog, Location):
            return cls.from_parquet(catalog)
        table = as_catalog_table(catalog)
        return cls(table.column, table.num_rows)

    @classmethod
    def from_parquet(cls, where: Any) -> Columns:
        from .catalog import CatalogFile

        with CatalogFile(where) as f:
            return cls(f.column, f.num_rows)

    def __getitem__(self, name: str) -> Coded:
        return self.text[name]

    def urls(self, rows: np.ndarray) -> list[str]:
        return self._url.take(np.asarray(rows, dtype=np.int64)).to_pylist()

    def url(self, i: int) -> str:
        return str(self._url[int(i)].as_py())

    def frame_positions(self, i: int) -> Any:
        return self._frame_positions.get(int(i))

    def number(self, name: str, i: int) -> float | None:
        v = float(self.num[name][i])
        return None if np.isnan(v) else v

    def vector(self, which: np.ndarray, i: int) -> np.ndarray | None:
        v = which[i]
        return None if np.isnan(v).any() else v.copy()

    def problems(self) -> Coded:
        """Per row, why it cannot be used as an image file (its read error, or pixel data missing), -1 if it can."""
        err = self.text["read_error"]
        values = list(err.values)
        codes = err.codes.copy()
        no_pixels = (codes < 0) & (self.pixel_data_ok == 0) & (np.nan_to_num(self.num["rows"]) > 0)
        if no_pixels.any():
            values.append("pixel data missing or truncated")
            codes[no_pixels] = len(values) - 1
        return Coded(codes, values)
