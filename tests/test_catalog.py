"""The catalog stays columnar from scan to plan: one schema on disk, column-by-column reading, the same plan from
any form of the same catalog (rows, DataFrame, Arrow, Parquet read a column at a time)."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mrict_dask.catalog import CATALOG_COLUMNS, CatalogFile, catalog_schema, concat_tables, write_catalog
from mrict_dask.columns import Columns
from mrict_dask.config import Config, PlanConfig
from mrict_dask.io import Location
from mrict_dask.plan import make_plan

KEY = b"catalog-test"


@pytest.fixture(scope="module")
def quirky_table(quirky_corpus):
    from mrict_dask.scan import scan_table

    return scan_table(quirky_corpus.url)


def _plan_json(catalog, cfg=None) -> dict:
    return json.loads(make_plan(catalog, cfg or Config(), KEY).to_json())


def test_scan_tables_encode_repeated_text_and_files_hold_the_plain_schema(quirky_table, tmp_path):
    assert pa.types.is_dictionary(quirky_table.schema.field("series_uid").type)  # in memory: once per series
    assert not pa.types.is_dictionary(quirky_table.schema.field("url").type)  # one per file: plain
    out = Location(str(tmp_path / "c.parquet"))
    write_catalog(quirky_table, out, row_group=100)  # several row groups
    on_disk = pq.read_table(out.local_path)
    assert on_disk.schema.remove_metadata() == catalog_schema()
    assert pq.ParquetFile(out.local_path).metadata.num_row_groups == -(-quirky_table.num_rows // 100)
    assert on_disk.column("url").to_pylist() == quirky_table.column("url").to_pylist()
    for name in ("series_uid", "image_type", "read_error", "image_position", "rows"):
        assert on_disk.column(name).to_pylist() == quirky_table.column(name).to_pylist(), name


def test_column_at_a_time_reading_equals_the_whole_table(quirky_table, tmp_path):
    out = Location(str(tmp_path / "c.parquet"))
    write_catalog(quirky_table, out)
    with CatalogFile(out) as f:
        assert f.num_rows == quirky_table.num_rows
        for name in CATALOG_COLUMNS:
            assert f.column(name).to_pylist() == quirky_table.column(name).to_pylist(), name
    a, b = Columns.of(quirky_table), Columns.from_parquet(out)
    for name in ("series_uid", "patient_id", "image_type", "read_error", "acquisition_number"):
        assert [a[name].text(i) for i in range(a.n)] == [b[name].text(i) for i in range(b.n)], name
    np.testing.assert_array_equal(a.iop, b.iop)
    np.testing.assert_array_equal(a.url_rank, b.url_rank)


def test_same_plan_from_every_form_and_row_order(quirky_table, tmp_path):
    out = Location(str(tmp_path / "c.parquet"))
    write_catalog(quirky_table, out)
    frame = quirky_table.to_pandas()
    cfg = Config(plan=PlanConfig(pair_all=True, max_days=400))
    want = _plan_json(out, cfg)
    assert want["pairs"] and want["series"]
    assert _plan_json(quirky_table, cfg) == want
    assert _plan_json(frame, cfg) == want
    assert _plan_json(frame.to_dict("records"), cfg) == want
    # the catalog's row order decides nothing but the order files with errors are listed in
    order = list(range(len(frame)))
    random.Random(5).shuffle(order)
    shuffled = _plan_json(frame.iloc[order].reset_index(drop=True), cfg)
    for key in ("pairs", "series", "exclusions", "patients"):
        assert shuffled[key] == want[key], key
    assert sorted(map(json.dumps, shuffled["files_with_errors"])) == sorted(map(json.dumps, want["files_with_errors"]))


def test_batches_in_listing_order_need_no_sort(quirky_table):
    pieces = [quirky_table.slice(i, 37) for i in range(0, quirky_table.num_rows, 37)]
    joined = concat_tables(pieces)
    assert joined.column("url").to_pylist() == quirky_table.column("url").to_pylist()
    shuffled = pieces[::-1]
    assert concat_tables(shuffled).column("url").to_pylist() == sorted(quirky_table.column("url").to_pylist())


def test_catalog_file_errors_name_the_problem(tmp_path):
    from mrict_dask.errors import InputError

    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_text("url,series_uid\n")
    with pytest.raises(InputError, match="not a readable Parquet catalog"):
        CatalogFile(Location(str(not_parquet)))
    pq.write_table(pa.table({"url": ["a"]}), tmp_path / "y.parquet")
    with pytest.raises(InputError, match="no series_uid column"):
        CatalogFile(Location(str(tmp_path / "y.parquet")))
    with pytest.raises(InputError, match="catalog not found"):
        CatalogFile(Location(str(tmp_path / "missing.parquet")))
