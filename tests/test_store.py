"""The Zarr output store: layout contract, round trip, concurrency, kill/resume, verify, S3, CLI.

Pair results are synthetic arrays on the template grid (registration is not needed to test the store);
every expectation is the array the test itself handed to ``write_pair``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing as mp
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from mrict_dask import store
from mrict_dask.config import NormalizeConfig, RunConfig
from mrict_dask.errors import StoreMismatchError
from mrict_dask.template import Template
from mrict_dask.types import QA_KEYS, PairResult, PairSpec

from .conftest import SMALL_NATIVE, native_arrays

SPLITS = ("train", "val", "test")
CONFIG = SMALL_NATIVE  # every store here has native space on a small box, so results stay small


# --------------------------------------------------------------------------------------------- helpers
def small_template(size=(12, 10, 7), sha="ab" * 32) -> Template:
    """A tiny template with non-trivial geometry: oblique direction, anisotropic spacing, offset origin."""
    img = sitk.Image(list(size), sitk.sitkFloat32)
    img.SetSpacing([1.5, 2.0, 2.5])
    img.SetOrigin([98.0, -134.5, 72.25])
    a = math.radians(30)
    img.SetDirection([math.cos(a), -math.sin(a), 0, math.sin(a), math.cos(a), 0, 0, 0, -1])
    rng = np.random.default_rng(5)
    arr = rng.random(size[::-1], dtype=np.float32)
    t1 = sitk.GetImageFromArray(arr)
    t1.CopyInformation(img)
    mask = sitk.Cast(t1 > 0.5, sitk.sitkUInt8)
    return Template(image=t1, mask=mask, name="tiny test grid", sha256=sha)


def make_pairs(n: int, splits=SPLITS) -> list[PairSpec]:
    return [PairSpec(index=i, pair_id=f"P{i // 2:016x}-{i:04x}", patient=f"P{i // 2:016x}",
                     split=splits[(i // 2) % len(splits)], days_apart=7 * i - 10, mr_files=(f"s3://in/mr/{i}",), ct_files=(f"s3://in/ct/{i}",))
            for i in range(n)]


def make_result(pair: PairSpec, shape, seed: int = 0, status: str = "ok") -> PairResult:
    """Deterministic arrays for a pair (same in any process), with realistic structure: zero background."""
    if status != "ok":
        return PairResult(pair_id=pair.pair_id, status=status, qa={k: float("nan") for k in QA_KEYS})
    rng = np.random.default_rng(seed * 1000 + pair.index)
    z, y, x = shape
    mr = np.zeros(shape, np.float32)
    mr[1:-1, 2:-2, 2:-2] = rng.random((z - 2, y - 4, x - 4), dtype=np.float32)
    mr[0, 0, 0] = -0.0  # bit patterns must survive, not only values
    ct = rng.random(shape, dtype=np.float32) * np.float32(0.5)
    valid = rng.random(shape) > 0.1
    slice_ok = rng.random(z) > 0.3
    slice_ok[z // 2] = True
    aff = np.eye(4)
    aff[:3, 3] = rng.normal(size=3)
    return PairResult(pair_id=pair.pair_id, status="ok", mr=mr, ct=ct, valid=valid, slice_ok=slice_ok,
                      head=valid & (mr > 0.2), face=~valid & (ct > 0.4), native=native_arrays(rng, aff + 1.0),
                      mr_lo=float(rng.random()), mr_hi=1000.0 + pair.index, ct_lo=-1024.0, ct_hi=3071.0,
                      mr_affine=aff, ct_affine=aff @ np.diag([1, 1, 1, 1.0]) + 0.5 * pair.index,
                      qa={k: float(rng.random()) for k in QA_KEYS}, timings={"register": 1.5},
                      figure_png=b"\x89PNG fake" if pair.index == 0 else None)


def build_store(url, n=6, failed=(3,), pending=(), template=None, config=None, storage_options=None, seed=0):
    template = template or small_template()
    pairs = make_pairs(n)
    store.open_or_create_store(url, pairs, template, config or CONFIG, storage_options=storage_options)
    results = {}
    for p in pairs:
        if p.index in pending:
            continue
        status = "failed: MR registration did not converge" if p.index in failed else "ok"
        r = make_result(p, template.shape_zyx, seed, status)
        store.write_pair(url, p.index, r, storage_options=storage_options)
        results[p.index] = r
    store.finalize_store(url, storage_options=storage_options)
    return pairs, results, template


def _objects(root: str) -> list[str]:
    out = []
    for d, _, files in os.walk(root):
        out += [os.path.relpath(os.path.join(d, f), root) for f in files]
    return sorted(out)


# --------------------------------------------------------------------------------------------- layout
def test_layout_matches_contract(tmp_path):
    import zarr

    url = str(tmp_path / "out.zarr")
    pairs, results, t = build_store(url, n=4, failed=(1,))
    z, y, x = t.shape_zyx
    g = zarr.open_group(url, mode="r")
    for name, dtype in (("mr", "float32"), ("ct", "float32"), ("valid", "bool")):
        a = g[name]
        assert a.shape == (4, z, y, x) and a.dtype == np.dtype(dtype)
        assert a.chunks == (1, 1, y, x), name  # inner chunk: one axial slice
        assert a.shards == (1, z, y, x), name  # shard: one volume
        assert a.metadata.dimension_names == ("pair", "z", "y", "x")
        meta = a.metadata.to_dict()
        inner = meta["codecs"][0]["configuration"]["codecs"]
        assert meta["codecs"][0]["name"] == "sharding_indexed"
        blosc = inner[-1]
        assert blosc["name"] == "blosc" and blosc["configuration"]["cname"] == store.VOLUME_CODEC["cname"]
        assert blosc["configuration"]["shuffle"] == "shuffle"  # byte-shuffled
    assert g["slice_ok"].shape == (4, z) and g["slice_ok"].chunks == (1, z) and g["slice_ok"].dtype == bool
    for name in ("mr_lo", "mr_hi", "ct_lo", "ct_hi", *QA_KEYS):
        assert g[name].shape == (4,) and g[name].dtype == np.float32, name
    for name in ("mr_affine", "ct_affine"):
        assert g[name].shape == (4, 4, 4) and g[name].dtype == np.float64
    assert g["days_apart"].dtype.kind == "i"
    # each ok pair is exactly one object per variable; the failed pair wrote none
    objs = [o for o in _objects(url) if o.split("/")[0] in ("mr", "ct", "valid", "slice_ok") and "/c/" in o]
    expected = sorted(f"{v}/c/{i}/0/0/0" for v in ("mr", "ct", "valid") for i in (0, 2, 3)) + \
        sorted(f"slice_ok/c/{i}/0" for i in (0, 2, 3))
    assert sorted(objs) == sorted(expected)
    assert sorted(os.listdir(os.path.join(url, "_pairs"))) == ["0.json", "0.png", "1.json", "2.json", "3.json"]


def test_xarray_reads_consolidated_store_with_contract_attrs(tmp_path):
    import xarray as xr

    url = str(tmp_path / "out.zarr")
    cfg = dataclasses.replace(CONFIG, normalize=NormalizeConfig(mr_percentiles=(0.5, 99.5)))
    pairs, results, t = build_store(url, n=5, failed=(2,), config=cfg)
    with open(os.path.join(url, "zarr.json")) as fh:
        root = json.load(fh)
    consolidated = root["consolidated_metadata"]["metadata"]
    names = {"mr", "ct", "valid", "slice_ok", "status", "patient", "split", "days_apart", "mr_affine"}
    assert names <= set(consolidated)
    ds = xr.open_zarr(url, consolidated=True)
    assert dict(ds.sizes) == {"pair": 5, "z": t.shape_zyx[0], "y": t.shape_zyx[1], "x": t.shape_zyx[2],
                              "row": 4, "col": 4}
    assert ds.mr.dims == ("pair", "z", "y", "x") and ds.mr.dtype == np.float32
    assert ds.valid.dtype == bool and ds.slice_ok.dims == ("pair", "z")
    assert ds.mr_affine.dims == ("pair", "row", "col") and ds.mr_affine.dtype == np.float64
    assert ds.days_apart.dtype.kind == "i" and ds.days_apart.values.tolist() == [p.days_apart for p in pairs]
    assert [str(s) for s in ds.status.values] == ["ok", "ok", "failed: MR registration did not converge", "ok", "ok"]
    assert [str(s) for s in ds.split.values] == [p.split for p in pairs]
    assert [str(s) for s in ds.patient.values] == [p.patient for p in pairs]
    assert isinstance(ds.split.values[0], str)
    assert [str(s) for s in ds.pair.values] == [p.pair_id for p in pairs]
    # the pair coordinate selects by pair_id
    sel = ds.sel(pair=pairs[4].pair_id)
    np.testing.assert_array_equal(sel.mr.values, results[4].mr)
    # scalars come from the markers, the failed pair has NaN
    assert float(ds.mr_hi.values[1]) == results[1].mr_hi and math.isnan(float(ds.mr_lo.values[2]))
    np.testing.assert_array_equal(ds.ct_affine.values[3], results[3].ct_affine)
    for k in QA_KEYS:
        assert float(ds[k].values[0]) == np.float32(results[0].qa[k])
    # attrs: grid exactly as SimpleITK reports the template image
    img = t.image
    assert ds.attrs["grid"] == {"size": list(img.GetSize()), "spacing": list(img.GetSpacing()),
                                "origin": list(img.GetOrigin()), "direction": list(img.GetDirection())}
    assert ds.attrs["template"] == {"name": t.name, "sha256": t.sha256}
    assert ds.attrs["config"] == json.loads(cfg.to_json())
    assert ds.attrs["percentiles"]["mr"] == [0.5, 99.5] and ds.attrs["percentiles"]["ct"] == [-1024.0, 3071.0]
    from mrict_dask import __version__

    assert ds.attrs["mrict_dask_version"] == __version__


def test_grid_locates_voxels_on_the_real_template(tmp_path, template):
    """The contract's axes: TransformIndexToPhysicalPoint((x, y, z)) of the attrs grid locates store voxels."""
    import xarray as xr

    url = str(tmp_path / "mni.zarr")
    pair = make_pairs(1)
    store.open_or_create_store(url, pair, template, CONFIG)
    t1 = sitk.GetArrayFromImage(template.image)
    assert t1.shape == (189, 233, 197)
    mr = (t1 / t1.max()).astype(np.float32)
    res = PairResult(pair_id=pair[0].pair_id, status="ok", mr=mr, ct=mr[::-1].copy(), valid=mr > 0,
                     slice_ok=(mr > 0).any(axis=(1, 2)), head=mr > 0, face=np.zeros(mr.shape, bool),
                     native=native_arrays(np.random.default_rng(0), np.eye(4)))
    store.write_pair(url, 0, res)
    store.finalize_store(url)
    ds = xr.open_zarr(url)
    grid = ds.attrs["grid"]
    assert grid["size"] == [197, 233, 189]
    ref = sitk.Image(grid["size"], sitk.sitkUInt8)
    ref.SetSpacing(grid["spacing"])
    ref.SetOrigin(grid["origin"])
    ref.SetDirection(grid["direction"])
    stored = ds.mr[0].values
    rng = np.random.default_rng(1)
    brain = np.argwhere(t1 > 0)
    for zi, yi, xi in brain[rng.choice(len(brain), 20, replace=False)]:
        point = template.image.TransformIndexToPhysicalPoint((int(xi), int(yi), int(zi)))
        x, y, z = ref.TransformPhysicalPointToIndex(point)
        assert float(stored[z, y, x]) == pytest.approx(template.image.GetPixel(int(xi), int(yi), int(zi)) / t1.max())
        assert ref.TransformIndexToPhysicalPoint((x, y, z)) == pytest.approx(point)


def test_string_variables_read_back_as_plain_numpy_strings(tmp_path):
    """pair, patient, split and status are Zarr v3 fixed_length_utf32: xarray and zarr both give numpy ``<U``
    arrays, so ``.astype(str)`` and comparisons work; a failure reason longer than any status the store was
    created with ("pending") is kept whole."""
    import xarray as xr
    import zarr

    url = str(tmp_path / "out.zarr")
    pairs, results, _ = build_store(url, n=5, failed=(2,))
    want = {"pair": [p.pair_id for p in pairs], "patient": [p.patient for p in pairs],
            "split": [p.split for p in pairs],
            "status": ["ok", "ok", "failed: MR registration did not converge", "ok", "ok"]}
    ds = xr.open_zarr(url)
    g = zarr.open_group(url, mode="r")
    for name, values in want.items():
        assert ds[name].dtype.kind == "U" and g[name].dtype.kind == "U", name
        assert ds[name].values.astype(str).tolist() == values, name
        assert g[name][:].astype(str).tolist() == values, name
        with open(os.path.join(url, name, "zarr.json")) as fh:
            assert json.load(fh)["data_type"]["name"] == "fixed_length_utf32", name
    assert (ds.split == "train").values.tolist() == [s == "train" for s in want["split"]]
    assert ds.sel(pair=pairs[3].pair_id).patient.values.astype(str) == pairs[3].patient


def _as_variable_length_strings(url: str) -> None:
    """Rewrite the string variables the way stores were written before fixed-width strings (Zarr v3 `string`)."""
    import zarr

    with store._quiet():
        g = zarr.open_group(url, mode="r+", use_consolidated=False)
        for name in ("pair", "patient", "split", "status"):
            values = [str(v) for v in g[name][:]]
            a = g.create_array(name, shape=(len(values),), dtype=str, fill_value="", dimension_names=("pair",),
                               chunks=(len(values),), overwrite=True)
            a[:] = np.array(values, dtype=object)
        zarr.consolidate_metadata(g.store)


def test_stores_with_variable_length_strings_still_read(tmp_path):
    """A store written before fixed-width strings: the loader, inspect, verify and a resumed finalize all work."""
    from mrict_dask.loader import SlicePairs, VolumePairs

    url = str(tmp_path / "out.zarr")
    pairs, results, t = build_store(url, n=6, failed=(3,))
    _as_variable_length_strings(url)
    with open(os.path.join(url, "status", "zarr.json")) as fh:
        assert json.load(fh)["data_type"] == "string"
    for split in SPLITS:
        sp = SlicePairs(url, split=split, with_valid=True)
        ok = sorted(i for i, r in results.items() if r.ok and pairs[i].split == split)
        assert len(sp) == sum(int(results[i].slice_ok.sum()) for i in ok)
        for i in range(len(sp)):
            mr, ct, valid = sp[i]
            p, z = sp.locate(i)
            assert mr.tobytes() == results[p].mr[z].tobytes() and ct.tobytes() == results[p].ct[z].tobytes()
            assert np.array_equal(valid, results[p].valid[z])
        assert [int(p) for p in VolumePairs(url, split=split).pair_indices] == ok
    assert store.verify_store(url).ok
    assert "pairs: 6 (ok 5, failed 1, pending 0)" in store.inspect_store(url)
    store.finalize_store(url)  # a resumed run finalizes again: the old encoding stays, and stays readable
    with open(os.path.join(url, "status", "zarr.json")) as fh:
        assert json.load(fh)["data_type"] == "string"
    assert store.verify_store(url).ok


# --------------------------------------------------------------------------------------------- round trip
def test_round_trip_is_bit_for_bit(tmp_path):
    from mrict_dask.loader import SlicePairs, VolumePairs

    url = str(tmp_path / "out.zarr")
    pairs, results, t = build_store(url, n=6, failed=(3,))
    seen = set()
    for split in SPLITS:
        sp = SlicePairs(url, split=split, with_valid=True)
        for i in range(len(sp)):
            p, z = sp.locate(i)
            mr, ct, valid = sp[i]
            r = results[p]
            assert mr.dtype == np.float32 and ct.dtype == np.float32 and valid.dtype == bool
            assert mr.tobytes() == r.mr[z].tobytes() and ct.tobytes() == r.ct[z].tobytes()
            assert np.array_equal(valid, r.valid[z])
            seen.add((p, z))
        vp = VolumePairs(url, split=split)
        for i in range(len(vp)):
            p = int(vp.pair_indices[i])
            mr, ct, valid = vp[i]
            assert mr.tobytes() == results[p].mr.tobytes() and ct.tobytes() == results[p].ct.tobytes()
            assert np.array_equal(valid, results[p].valid)
    expected = {(i, int(z)) for i, r in results.items() if r.ok for z in np.flatnonzero(r.slice_ok)}
    assert seen == expected
    marker = store.completed_pairs(url)[0]
    assert marker["checksum"]["mr"] == store._sha256(results[0].mr)
    assert marker["figure"] == "_pairs/0.png"
    with open(os.path.join(url, "_pairs", "0.png"), "rb") as fh:
        assert fh.read() == results[0].figure_png


def test_failed_pair_leaves_fill_values_and_clears_an_earlier_write(tmp_path):
    import zarr

    url = str(tmp_path / "out.zarr")
    t = small_template()
    pairs = make_pairs(2)
    store.open_or_create_store(url, pairs, t, CONFIG)
    store.write_pair(url, 0, make_result(pairs[0], t.shape_zyx))
    reason = "failed: CT series 1.2.840.113619.2.55.3.604688119 has a gap\n  (acquired 20190312)"
    marker = store.write_pair(url, 0, make_result(pairs[0], t.shape_zyx, status=reason))
    # the output store is PHI-free: a reason quoting a UID or a date is masked, and kept on one line
    assert marker["status"] == "failed: CT series <uid> has a gap (acquired <date>)" and "checksum" not in marker
    g = zarr.open_group(url, mode="r")
    assert np.isnan(g["mr"][0]).all() and np.isnan(g["ct"][0]).all() and not g["valid"][0].any()
    assert not g["slice_ok"][0].any()
    assert store.completed_pairs(url)[0]["status"].startswith("failed")
    store.finalize_store(url)
    assert str(zarr.open_group(url, mode="r")["status"][0]) == "failed: CT series <uid> has a gap (acquired <date>)"
    report = store.verify_store(url)
    assert report.torn == [] and report.missing == [1] and not report.ok


def test_write_pair_refuses_a_result_for_another_pair_or_grid(tmp_path):
    url = str(tmp_path / "out.zarr")
    t = small_template()
    pairs = make_pairs(2)
    store.open_or_create_store(url, pairs, t, CONFIG)
    with pytest.raises(ValueError, match="index 1"):
        store.write_pair(url, 1, make_result(pairs[0], t.shape_zyx))
    bad = make_result(pairs[1], t.shape_zyx)
    bad.mr = bad.mr[:, :, :-1]
    with pytest.raises(ValueError, match="shape"):
        store.write_pair(url, 1, bad)
    with pytest.raises(IndexError):
        store.write_pair(url, 5, make_result(pairs[1], t.shape_zyx))
    assert store.completed_pairs(url) == {}


def test_store_with_no_pairs(tmp_path):
    url = str(tmp_path / "empty.zarr")
    store.open_or_create_store(url, [], small_template(), CONFIG)
    store.finalize_store(url)
    assert store.completed_pairs(url) == {}
    assert store.verify_store(url).ok
    assert "pairs: 0" in store.inspect_store(url)


# --------------------------------------------------------------------------------------------- fingerprint
def test_a_different_store_at_the_same_url_is_refused(tmp_path):
    url = str(tmp_path / "out.zarr")
    t = small_template()
    pairs = make_pairs(3)
    store.open_or_create_store(url, pairs, t, CONFIG)
    store.write_pair(url, 0, make_result(pairs[0], t.shape_zyx))
    with pytest.raises(StoreMismatchError, match=r"normalize\.mr_percentiles"):
        other = dataclasses.replace(CONFIG, normalize=NormalizeConfig(mr_percentiles=(2.0, 98.0)))
        store.open_or_create_store(url, pairs, t, other)
    swapped = [dataclasses.replace(pairs[1], index=0), dataclasses.replace(pairs[0], index=1), pairs[2]]
    with pytest.raises(StoreMismatchError, match="index 0"):
        store.open_or_create_store(url, swapped, t, CONFIG)
    with pytest.raises(StoreMismatchError, match="template"):
        store.open_or_create_store(url, pairs, small_template(sha="cd" * 32), CONFIG)
    with pytest.raises(StoreMismatchError, match="grid"):
        store.open_or_create_store(url, pairs, small_template(size=(12, 10, 8)), CONFIG)
    # same plan again, even with other scheduling settings: resume, data kept
    store.open_or_create_store(url, pairs, t, dataclasses.replace(CONFIG, run=RunConfig(window=7, retries=5)))
    assert list(store.completed_pairs(url)) == [0]
    # the same settings and one pair more: the store grows, what it held is kept
    store.open_or_create_store(url, make_pairs(4), t, CONFIG)
    assert store.pair_table(url)["pair"] == [p.pair_id for p in make_pairs(4)]
    assert list(store.completed_pairs(url)) == [0]


def test_foreign_content_at_the_url_is_never_overwritten(tmp_path):
    import zarr

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(StoreMismatchError, match="not empty"):
        store.open_or_create_store(str(other), make_pairs(1), small_template(), CONFIG)
    assert (other / "keep.txt").read_text() == "precious"
    zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w", attributes={"owner": "someone else"})
    with pytest.raises(StoreMismatchError, match="not an mrict-dask store"):
        store.open_or_create_store(str(tmp_path / "foreign.zarr"), make_pairs(1), small_template(), CONFIG)


def test_marker_copied_from_another_store_is_not_trusted(tmp_path):
    t = small_template()
    pairs = make_pairs(2)
    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    store.open_or_create_store(a, pairs, t, CONFIG)
    percentile = dataclasses.replace(CONFIG, normalize=NormalizeConfig(ct_mode="percentile"))
    store.open_or_create_store(b, pairs, t, percentile)
    store.write_pair(a, 0, make_result(pairs[0], t.shape_zyx))
    store.write_pair(b, 1, make_result(pairs[1], t.shape_zyx))
    # same pair, same arrays: only the fingerprint tells the stores apart
    for v in ("mr", "ct", "valid"):
        os.makedirs(os.path.join(b, v, "c", "0", "0", "0"), exist_ok=True)
        shutil.copy(os.path.join(a, v, "c", "0", "0", "0", "0"), os.path.join(b, v, "c", "0", "0", "0", "0"))
    os.makedirs(os.path.join(b, "slice_ok", "c", "0"), exist_ok=True)
    shutil.copy(os.path.join(a, "slice_ok", "c", "0", "0"), os.path.join(b, "slice_ok", "c", "0", "0"))
    shutil.copy(os.path.join(a, "_pairs", "0.json"), os.path.join(b, "_pairs", "0.json"))
    assert list(store.completed_pairs(b)) == [1]
    report = store.verify_store(b)
    assert [i for i, _ in report.torn] == [0] and "different store" in report.torn[0][1]


# ------------------------------------------------------------------------------------ concurrency, kill, resume
def _writer(url: str, indices: list[int], n: int, barrier) -> None:
    t = small_template()
    pairs = make_pairs(n)
    barrier.wait(30)
    for i in indices:
        store.write_pair(url, i, make_result(pairs[i], t.shape_zyx))


def test_two_processes_writing_different_pairs_leave_a_valid_store(tmp_path):
    url = str(tmp_path / "out.zarr")
    n = 8
    t = small_template()
    pairs = make_pairs(n)
    store.open_or_create_store(url, pairs, t, CONFIG)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(url, list(range(k, n, 2)), n, barrier)) for k in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert sorted(store.completed_pairs(url)) == list(range(n))
    store.finalize_store(url)
    report = store.verify_store(url)
    assert report.ok, report.describe()
    import zarr

    g = zarr.open_group(url, mode="r")
    for p in pairs:
        r = make_result(p, t.shape_zyx)
        assert g["mr"][p.index].tobytes() == r.mr.tobytes() and np.array_equal(g["valid"][p.index], r.valid)


def _killed_writer(url: str, index: int, n: int) -> None:
    """Dies (no cleanup, like SIGKILL) right after the pair's first shard is written."""
    real = store._write_shard

    def write_then_die(array, i, data):
        real(array, i, data)
        os._exit(17)

    store._write_shard = write_then_die
    t = small_template()
    store.write_pair(url, index, make_result(make_pairs(n)[index], t.shape_zyx, seed=1))


def test_killed_write_is_detected_and_redone_on_resume(tmp_path):
    url = str(tmp_path / "out.zarr")
    n = 3
    t = small_template()
    pairs = make_pairs(n)
    store.open_or_create_store(url, pairs, t, CONFIG)
    store.write_pair(url, 0, make_result(pairs[0], t.shape_zyx))
    ctx = mp.get_context("spawn")
    for index in (1, 0):  # a first write, and a rewrite of a complete pair, both killed mid-pair
        proc = ctx.Process(target=_killed_writer, args=(url, index, n))
        proc.start()
        proc.join(120)
        assert proc.exitcode == 17
        assert os.path.exists(os.path.join(url, "mr", "c", str(index), "0", "0", "0"))  # first shard landed
        assert index not in store.completed_pairs(url)  # ...but the pair is not complete
    report = store.verify_store(url)
    assert not report.ok and report.missing == [0, 1, 2]
    # resume: the orchestrator rewrites what is not complete
    store.open_or_create_store(url, pairs, t, CONFIG)
    todo = [p for p in pairs if p.index not in store.completed_pairs(url)]
    assert [p.index for p in todo] == [0, 1, 2]
    for p in todo:
        store.write_pair(url, p.index, make_result(p, t.shape_zyx, seed=2))
    store.finalize_store(url)
    report = store.verify_store(url)
    assert report.ok, report.describe()
    import zarr

    g = zarr.open_group(url, mode="r")
    for p in pairs:
        r = make_result(p, t.shape_zyx, seed=2)
        assert g["mr"][p.index].tobytes() == r.mr.tobytes() and g["ct"][p.index].tobytes() == r.ct.tobytes()


def test_verify_finds_corrupted_and_truncated_shards(tmp_path):
    url = str(tmp_path / "out.zarr")
    build_store(url, n=4, failed=())
    assert store.verify_store(url).ok
    shard = os.path.join(url, "ct", "c", "1", "0", "0", "0")
    with open(shard, "r+b") as fh:
        fh.seek(os.path.getsize(shard) // 3)
        block = bytearray(fh.read(16))
        fh.seek(-16, os.SEEK_CUR)
        fh.write(bytes(b ^ 0xFF for b in block))
    report = store.verify_store(url)
    assert not report.ok and [i for i, _ in report.torn] == [1] and report.torn[0][1].startswith("ct:")
    assert "torn pair 1" in report.describe()
    # a size change is caught by the cheap resume check too: the pair is redone
    shard = os.path.join(url, "mr", "c", "2", "0", "0", "0")
    with open(shard, "r+b") as fh:
        fh.truncate(os.path.getsize(shard) - 100)
    assert 2 not in store.completed_pairs(url)
    assert [i for i, _ in store.verify_store(url).torn] == [1, 2]


def test_status_without_marker_is_torn(tmp_path):
    url = str(tmp_path / "out.zarr")
    build_store(url, n=3, failed=())
    os.remove(os.path.join(url, "_pairs", "2.json"))
    report = store.verify_store(url)
    assert [i for i, _ in report.torn] == [2] and "no completion marker" in report.torn[0][1]
    store.finalize_store(url)  # finalize again: the pair is pending, no longer claimed ok
    report = store.verify_store(url)
    assert report.torn == [] and report.missing == [2]


# --------------------------------------------------------------------------------------------- S3
def test_s3_write_read_verify(s3):
    import xarray as xr

    from mrict_dask.loader import SlicePairs, VolumePairs

    url = s3.url("stores", "out.zarr")
    so = s3.storage_options
    pairs, results, t = build_store(url, n=4, failed=(1,), storage_options=so)
    assert sorted(store.completed_pairs(url, so)) == [0, 1, 2, 3]
    assert store.verify_store(url, so).ok
    fs = s3.fs()
    assert fs.exists(s3.url("stores", "out.zarr", "mr", "c", "2", "0", "0", "0"))
    assert not fs.exists(s3.url("stores", "out.zarr", "mr", "c", "1", "0", "0", "0"))
    ds = xr.open_zarr(url, storage_options=so, consolidated=True)
    assert [str(s) for s in ds.status.values][:2] == ["ok", "failed: MR registration did not converge"]
    sp = SlicePairs(url, split=None, storage_options=so)
    for i in range(0, len(sp), 3):
        p, z = sp.locate(i)
        mr, ct = sp[i]
        assert mr.tobytes() == results[p].mr[z].tobytes() and ct.tobytes() == results[p].ct[z].tobytes()
    vp = VolumePairs(url, split=None, storage_options=so)
    assert np.array_equal(vp[0][2], results[int(vp.pair_indices[0])].valid)
    # corruption on object storage is found too
    key = s3.url("stores", "out.zarr", "mr", "c", "3", "0", "0", "0")
    blob = bytearray(fs.cat_file(key))
    blob[len(blob) // 2: len(blob) // 2 + 8] = bytes(8)
    fs.pipe_file(key, bytes(blob))
    assert [i for i, _ in store.verify_store(url, so).torn] == [3]


# --------------------------------------------------------------------------------------------- CLI
def test_cli_inspect_and_verify(tmp_path):
    from click.testing import CliRunner

    from mrict_dask.cli import main

    url = str(tmp_path / "out.zarr")
    pairs, results, t = build_store(url, n=6, failed=(3,), pending=(5,))
    png = str(tmp_path / "montage.png")
    res = CliRunner().invoke(main, ["inspect", url, "--png", png])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "pairs: 6 (ok 4, failed 1, pending 1)" in out
    assert "MR registration did not converge" in out
    usable = {s: sum(int(r.slice_ok.sum()) for i, r in results.items() if r.ok and pairs[i].split == s) for s in SPLITS}
    for s in SPLITS:
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(s))
        assert line.split()[-1] == str(usable[s])
    assert "brain_dice" in out
    import matplotlib.image

    assert matplotlib.image.imread(png).ndim == 3
    res = CliRunner().invoke(main, ["verify", url])
    assert res.exit_code == 1 and "missing" in res.output  # pair 5 was never written
    store.write_pair(url, 5, make_result(pairs[5], t.shape_zyx))
    store.finalize_store(url)
    res = CliRunner().invoke(main, ["verify", url])
    assert res.exit_code == 0, res.output
    shard = os.path.join(url, "valid", "c", "0", "0", "0", "0")
    data = bytearray(open(shard, "rb").read())
    data[10:20] = bytes(b ^ 0x55 for b in data[10:20])
    open(shard, "wb").write(bytes(data))
    res = CliRunner().invoke(main, ["verify", url])
    assert res.exit_code == 1 and "torn pair 0" in res.output


def test_status_is_wide_from_the_start_and_long_reasons_are_cut_to_fit(tmp_path):
    """finalize never deletes and recreates ``status`` (a reader opening the store meanwhile would fail): it is
    created STATUS_WIDTH characters wide, and a longer reason is cut, in the marker too, so verify agrees."""
    import xarray as xr

    url = str(tmp_path / "out.zarr")
    pairs = make_pairs(2)
    store.open_or_create_store(url, pairs, small_template(), CONFIG)
    meta = os.path.join(url, "status", "zarr.json")
    created = open(meta).read()
    long = "failed: MR: " + "the registration went wrong in a very long way " * 20
    store.write_pair(url, 0, PairResult(pair_id=pairs[0].pair_id, status=long))
    store.finalize_store(url)
    assert open(meta).read() == created  # the same variable, not a wider one
    status = str(xr.open_zarr(url)["status"].values[0])
    assert len(status) == store.STATUS_WIDTH and status.endswith("...") and long.startswith(status[:-3])
    report = store.verify_store(url)
    assert report.torn == [] and report.checked == 1, report.describe()
