"""End to end: DICOM -> store on a real LocalCluster, S3 -> S3, serial == Dask, quirks, resume after a killed driver."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import xarray as xr
from scipy import ndimage as ndi

from mrict_dask.config import Config
from mrict_dask.orchestrate import run_pipeline

from .conftest import fast_config, fast_config_file, upload_tree
from .truth import brain_points, read_series, series_by_uid, tre_mm

pytestmark = pytest.mark.slow

KEY = "test-key"
FAST = fast_config()  # same pipeline, cheaper (see conftest); accuracy is checked on the 1 mm run below


def _plan(work_url: str, storage_options=None):
    from mrict_dask.io import Location
    from mrict_dask.plan import Plan

    return Plan.from_json(Location(work_url, storage_options).join("plan.json").read_text())


def _expected_pairs(manifest) -> set[tuple[str, str]]:
    return {(p["mr_series_uid"], p["ct_series_uid"]) for p in manifest["expected_pairs"]}


@pytest.fixture(scope="module")
def dask_run(corpus, local_cluster, tmp_path_factory):
    """The clean corpus through the whole job on a 2-worker LocalCluster, at the template's 1 mm grid."""
    from distributed import Client

    out = tmp_path_factory.mktemp("run") / "store.zarr"
    with Client(local_cluster, set_as_default=False) as client:
        summary = run_pipeline(corpus.url, str(out), config=Config(), executor=client, pseudonym_key=KEY)
    return summary, str(out)


def test_pairs_and_registration_match_manifest(dask_run, corpus, template):
    summary, store = dask_run
    plan = _plan(store + ".work")
    assert {(p.mr_series_uid, p.ct_series_uid) for p in plan.pairs} == _expected_pairs(corpus.manifest)
    assert summary.ok == len(plan.pairs) == summary.n_pairs > 0

    ds = xr.open_zarr(store)
    assert list(ds["status"].values) == ["ok"] * len(plan.pairs)
    truth = series_by_uid(corpus.manifest)
    pts = brain_points(template, step=6)
    for p in plan.pairs:
        for var, uid in (("mr_affine", p.mr_series_uid), ("ct_affine", p.ct_series_uid)):
            mean, worst = tre_mm(np.array(truth[uid]["transform"]), ds[var].values[p.index], pts)
            assert mean <= 1.0 and worst <= 2.0, (var, p.index, mean, worst)


def test_store_has_no_source_identifiers(dask_run, corpus):
    _, store = dask_run
    blob = b""
    for root, _, files in os.walk(store):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                blob += fh.read()
    ds = xr.open_zarr(store)
    strings = " ".join(str(v) for name in ("patient", "split", "status") for v in ds[name].values)
    for marker in corpus.manifest["phi_strings"]:
        assert marker.encode() not in blob, marker
        assert marker not in strings, marker


def test_report_written(dask_run):
    summary, store = dask_run
    rep = json.load(open(store + "-report/report.json"))
    assert rep["counts"]["pairs_ok"] == summary.ok
    assert all(r["figure"] and os.path.exists(os.path.join(store + "-report", r["figure"]))
               for r in rep["pairs"] if r["status"] == "ok")
    assert "<html" in open(store + "-report/report.html").read()


def test_serial_executor_gives_identical_store(corpus, local_cluster, tmp_path):
    from distributed import Client

    a, b = str(tmp_path / "dask.zarr"), str(tmp_path / "serial.zarr")
    with Client(local_cluster, set_as_default=False) as client:
        run_pipeline(corpus.url, a, config=FAST, executor=client, pseudonym_key=KEY)
    run_pipeline(corpus.url, b, config=FAST, executor="serial", pseudonym_key=KEY)
    da, db = xr.open_zarr(a), xr.open_zarr(b)
    assert set(da.data_vars) == set(db.data_vars)
    for name in da.data_vars:
        np.testing.assert_array_equal(da[name].values, db[name].values, err_msg=name)


def test_s3_to_s3(one_patient, s3, local_cluster):
    """One patient's files (every moto request costs ~10 ms on this box): S3 in, S3 out, on the cluster."""
    from distributed import Client

    folder, expected = one_patient
    src = upload_tree(folder, s3, "dicom")
    out = s3.url("out", "store.zarr")
    with Client(local_cluster, set_as_default=False) as client:
        summary = run_pipeline(src, out, config=FAST, executor=client, pseudonym_key=KEY,
                               storage_options=s3.storage_options)
    assert summary.ok == summary.n_pairs == len(expected)
    ds = xr.open_zarr(out, storage_options=s3.storage_options)
    assert ds["mr"].shape[0] == summary.n_pairs
    assert s3.fs().exists(s3.url("out", "store.zarr-report", "report.html"))
    assert s3.fs().exists(s3.url("out", "store.zarr.work", "plan.json"))


def test_quirky_corpus_completes_with_reasons(quirky_corpus, local_cluster, tmp_path):
    from distributed import Client

    out = str(tmp_path / "store.zarr")
    with Client(local_cluster, set_as_default=False) as client:
        summary = run_pipeline(quirky_corpus.url, out, config=FAST, executor=client, pseudonym_key=KEY)
    plan = _plan(out + ".work")
    assert {(p.mr_series_uid, p.ct_series_uid) for p in plan.pairs} == _expected_pairs(quirky_corpus.manifest)
    assert summary.ok == summary.n_pairs
    rep = json.load(open(out + "-report/report.json"))
    bad_files = [f for f in quirky_corpus.manifest["files"] if f["kind"] != "dicom"]
    assert rep["counts"]["files_with_errors"] >= len(bad_files)
    assert len(rep["exclusions"]) == len(quirky_corpus.manifest["expected_exclusions"])
    assert all(e["reason"] for e in rep["exclusions"])


def test_resume_after_driver_killed(corpus, tmp_path):
    """Kill the driver after its first pair is written; the re-run computes only what is missing."""
    from mrict_dask.store import completed_pairs, verify_store

    out = str(tmp_path / "store.zarr")
    cmd = [sys.executable, "-m", "mrict_dask.cli", "-q", "run", corpus.url, out, "--executor", "serial",
           "--config", fast_config_file(tmp_path / "fast.yaml"), "--pseudonym-key", KEY]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if glob.glob(os.path.join(out, "_pairs", "*.json")):  # a pair's completion marker
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = completed_pairs(out)
    assert len(before) >= 1

    summary = run_pipeline(corpus.url, out, config=FAST, executor="serial", pseudonym_key=KEY)
    assert summary.skipped == len([m for m in before.values() if m["status"] == "ok"])
    assert summary.processed == summary.n_pairs - summary.skipped
    assert summary.ok == summary.n_pairs
    assert verify_store(out).ok


def test_demo_command_runs_as_the_readme_says(tmp_path):
    """`mrict-dask demo` (the README's first command), on one synthetic patient: corpus, run, summary, a batch."""
    proc = subprocess.run([sys.executable, "-m", "mrict_dask.cli", "demo", "--dir", str(tmp_path / "demo"),
                           "--patients", "1", "--workers", "1"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pairs:   1 planned, 1 ok, 0 failed" in proc.stdout, proc.stdout
    assert "batch: mr (8, " in proc.stdout and "Traceback" not in proc.stderr
    assert xr.open_zarr(str(tmp_path / "demo" / "store.zarr"))["status"].values.tolist() == ["ok"]


# --------------------------------------------------------------------------------------------- native space, defacing
BALL_5MM = np.array([(x, y, z) for x in range(-5, 6) for y in range(-5, 6) for z in range(-5, 6)
                     if x * x + y * y + z * z <= 25], float)


def _indices(points: np.ndarray, grid_affine: np.ndarray, shape_zyx) -> np.ndarray:
    """(z, y, x) voxel indices of physical points on a grid (4x4 index -> physical); rows outside dropped."""
    inv = np.linalg.inv(grid_affine)
    ijk = np.round(points @ inv[:3, :3].T + inv[:3, 3]).astype(int)
    keep = ((ijk >= 0) & (ijk < np.array(shape_zyx[::-1]))).all(1)
    return ijk[keep][:, ::-1]


def test_faces_are_emptied_in_both_spaces_and_brains_untouched(dask_run, corpus, template):
    """Against the generator's truth: each face landmark's 5 mm ball is background (MR 0, CT -1024 HU) and face in
    both spaces; the template brain grown by 3 mm, sent into each MR by the true transform, has no face voxel."""
    from mrict_dask.native import affine_of

    _, store = dask_run
    plan = _plan(store + ".work")
    root, nat = xr.open_zarr(store), xr.open_zarr(store, group="native")
    truth = series_by_uid(corpus.manifest)
    brain = sitk.GetArrayFromImage(template.mask) > 0
    grown = ndi.distance_transform_edt(~brain, sampling=template.image.GetSpacing()[::-1]) <= 3.0
    tpl = affine_of(template.image)
    brain_pts = np.argwhere(grown)[::7][:, ::-1].astype(float) @ tpl[:3, :3].T + tpl[:3, 3]
    checked = 0
    for p in plan.pairs:
        series = truth[p.mr_series_uid]
        true_mr = np.array(series["transform"])  # template -> MR series, truth
        mr_affine = root["mr_affine"].values[p.index]
        # grid physical frame of each space, from the MR series' frame (the template's: the store's own mapping)
        spaces = {"native": (nat, nat["affine"].values[p.index], np.eye(4)),
                  "template": (root, tpl, np.linalg.inv(mr_affine))}
        for space, (ds, grid_affine, from_mr) in spaces.items():
            mr, ct, face = (ds[v].values[p.index] for v in ("mr", "ct", "face"))
            for name, lm in series["landmarks"].items():
                pts = (np.asarray(lm) + BALL_5MM) @ from_mr[:3, :3].T + from_mr[:3, 3]
                z, y, x = _indices(pts, grid_affine, mr.shape).T
                if len(z) < 0.9 * len(BALL_5MM):
                    continue  # the landmark is beyond this grid (a template grid ends above the chin)
                assert face[z, y, x].all() and not mr[z, y, x].any() and not ct[z, y, x].any(), (p.index, space, name)
                checked += 1
            sent = (brain_pts @ true_mr[:3, :3].T + true_mr[:3, 3]) @ from_mr[:3, :3].T + from_mr[:3, 3]
            z, y, x = _indices(sent, grid_affine, mr.shape).T
            assert len(z) > 0.9 * len(brain_pts) and not face[z, y, x].any(), (p.index, space)
    assert checked >= 3 * len(plan.pairs)  # eyes and nose at least, in native space


def test_native_space_sits_on_the_mr_series_and_the_ct_follows_rigidly(dask_run, corpus):
    """The stored native MR is the DICOM series (read by GDCM, independently) on the box its affine describes:
    the sub-voxel shift that best matches the two is under 0.1 mm. Native CT -> MR against the generator's
    transforms: mean error <= 0.5 mm over the head."""
    _, store = dask_run
    plan = _plan(store + ".work")
    root, nat = xr.open_zarr(store), xr.open_zarr(store, group="native")
    truth = series_by_uid(corpus.manifest)
    for p in plan.pairs:
        series = truth[p.mr_series_uid]
        src, _ = read_series(corpus.url, series)
        affine = nat["affine"].values[p.index]
        box = sitk.Image(list(nat["mr"].shape[1:][::-1]), sitk.sitkFloat32)
        box.SetOrigin(tuple(affine[:3, 3]))
        box.SetSpacing(tuple(np.linalg.norm(affine[:3, :3], axis=0)))
        box.SetDirection(tuple((affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)).ravel()))
        ref = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(src, sitk.sitkFloat32), box, sitk.Transform(),
                                                   sitk.sitkLinear, float("nan"), sitk.sitkFloat32))
        lo, hi = float(root["mr_lo"].values[p.index]), float(root["mr_hi"].values[p.index])
        ref = np.clip((ref - lo) / (hi - lo), 0.0, 1.0)
        got = nat["mr"].values[p.index]
        grads = np.stack(np.gradient(ref), axis=-1)  # (z, y, x) per voxel
        use = (np.isfinite(grads).all(-1) & ~nat["face"].values[p.index] & nat["valid"].values[p.index]
               & (got > 0.05) & (got < 0.95))
        shift, *_ = np.linalg.lstsq(grads[use], (got - ref)[use], rcond=None)  # got(x) = ref(x + shift)
        assert np.linalg.norm(shift) < 0.1, (p.index, shift)
        t_mr, t_ct = np.array(series["transform"]), np.array(truth[p.ct_series_uid]["transform"])
        head = np.argwhere(nat["head"].values[p.index])[::50][:, ::-1].astype(float)
        pts = head @ affine[:3, :3].T + affine[:3, 3]
        got_ct = root["ct_affine"].values[p.index] @ np.linalg.inv(root["mr_affine"].values[p.index])
        mean, _ = tre_mm(t_ct @ np.linalg.inv(t_mr), got_ct, pts)
        assert mean <= 0.5, (p.index, mean)
