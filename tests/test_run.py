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
import xarray as xr

from mrict_dask.config import Config
from mrict_dask.orchestrate import run_pipeline

from .conftest import fast_config, fast_config_file, upload_tree
from .truth import brain_points, series_by_uid, tre_mm

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
