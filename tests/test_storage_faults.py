"""Object-storage faults: errors injected on a share of S3 reads and writes lose no file, no pair, tear nothing.

Real parts: the moto S3 server on 127.0.0.1 reached through real s3fs, wrapped by `tests/faulty_fs.py`, which
fails a share of S3 requests (connection resets, timeouts, 503s) before s3fs's own retries can hide them, and
logs each fault so the tests count them. The faults are transient (no request fails more than twice in a row):
the guarantee is that such a store costs retries, never data. Ground truth is always the same operation
without faults, or the bytes the test itself wrote.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from . import faulty_fs
from .conftest import fast_config, upload_tree
from .faulty_fs import Faults, faults_injected, faulty_options, to_faulty

# the storage paths under test are the same for both spaces: the template space's objects alone keep the runs short
TEMPLATE_SPACE = {"native.enabled": False}


def _template_only():
    from mrict_dask.config import load_config

    return load_config(None, TEMPLATE_SPACE)


TEMPLATE_ONLY = _template_only()

RATE = 0.2  # a share of failing requests far above any real store's: every code path meets several faults


TOTAL: Counter = Counter()  # faults injected by this module's tests, by kind (printed in the session summary)


@pytest.fixture
def fault_log(tmp_path):
    path = str(tmp_path / "faults.log")
    yield path
    TOTAL.update(faults_injected(path))


@pytest.fixture(scope="module")
def dicom_folder(tmp_path_factory) -> str:
    """A small MR and CT series (6 slices each) and a few other objects, written by the generator's writer."""
    from .test_fuzz import _synthetic_files

    root = tmp_path_factory.mktemp("faults_dicom")
    for name, blob in _synthetic_files().items():
        sub = root / ("mr" if name.startswith("mr") else "ct" if name.startswith("ct") else "other")
        sub.mkdir(exist_ok=True)
        (sub / name).write_bytes(blob)
    return str(root)


# --------------------------------------------------------------------------------------------- the wrapper
def test_request_faults_reach_the_retry_policy_not_absorbed_by_s3fs(s3, fault_log, monkeypatch):
    """Without the library's retry policy, s3fs hands each injected fault to the caller; with it, none."""
    import s3fs.core

    from mrict_dask.io import Location

    so = faulty_options(s3.storage_options, rate=0.3, ops=("read", "write"), log=fault_log)
    loc = Location(to_faulty(s3.url("probe", "x")), so)
    fs, path = loc.fs, loc.path  # installs the library's policy
    with monkeypatch.context() as m:
        m.setattr(s3fs.core, "CUSTOM_ERROR_HANDLER", lambda exc: False)  # s3fs on its own
        seen, worst = 0, 0
        for i in range(30):
            streak = 0
            while True:
                try:
                    fs.pipe_file(f"{path}{i}", b"abc")
                    break
                except Exception as exc:  # as s3fs passes it on: a botocore error or an OSError
                    assert "injected fault" in str(exc), exc
                    seen += 1
                    streak += 1
            worst = max(worst, streak)
        assert seen == faults_injected(fault_log)["write"] > 5
        assert worst <= 2  # transient: no request fails more than twice in a row
    before = sum(faults_injected(fault_log).values())
    for i in range(20):  # the library's policy: every request retried until it works
        fs.pipe_file(f"{path}b{i}", b"abc")
        assert fs.cat_file(f"{path}b{i}") == b"abc"
    assert sum(faults_injected(fault_log).values()) - before > 5


def test_operation_faults_reach_the_caller(s3, fault_log):
    from mrict_dask.io import Location

    so = faulty_options(s3.storage_options, rate=0.5, ops=("write",), log=fault_log, layer="operation")
    loc = Location(to_faulty(s3.url("probe", "y")), so)
    fs, path = loc.fs, loc.path
    seen = 0
    for i in range(30):
        while True:
            try:
                fs.pipe_file(f"{path}{i}", b"abc")
                break
            except OSError:
                seen += 1
    assert seen == faults_injected(fault_log)["write"] > 5


# --------------------------------------------------------------------------------------------- scan
def _same_catalog(a, b) -> None:
    a = a.assign(url=a["url"].str.split("://").str[1]).sort_values("url").reset_index(drop=True)
    b = b.assign(url=b["url"].str.split("://").str[1]).sort_values("url").reset_index(drop=True)
    assert list(a["url"]) == list(b["url"])
    assert list(a["read_error"]) == list(b["read_error"]), [e for e in b["read_error"] if e]
    for col in ("sop_instance_uid", "series_uid", "rows", "image_position", "pixel_data_ok", "pixel_data_offset"):
        assert [str(v) for v in a[col]] == [str(v) for v in b[col]], col


def test_scan_under_read_faults_equals_the_fault_free_scan(s3, dicom_folder, fault_log):
    from mrict_dask.scan import scan

    url = upload_tree(dicom_folder, s3, "in")
    truth = scan(url, storage_options=s3.storage_options)
    assert (truth["read_error"] == "").sum() >= 12
    so = faulty_options(s3.storage_options, rate=RATE, ops=("read", "meta"), log=fault_log, seed=1)
    for batch_size in (256, 3):  # one batch (pilot reads + rest) and many small ones
        got = scan(to_faulty(url), storage_options=so, batch_size=batch_size)
        _same_catalog(truth, got)
    assert faults_injected(fault_log)["read"] > 0


def test_scan_on_a_cluster_under_read_faults(s3, dicom_folder, fault_log, client):
    from mrict_dask.orchestrate import as_executor
    from mrict_dask.scan import scan

    client.register_plugin(faulty_fs.RegisterFaultyFS())
    url = upload_tree(dicom_folder, s3, "in")
    truth = scan(url, storage_options=s3.storage_options)
    # each worker process draws its own fault stream (seeded by its pid): a small folder can pass through one
    # without a read fault; scan again with another seed until one was injected (every scan must be equal)
    for seed in range(2, 8):
        so = faulty_options(s3.storage_options, rate=RATE, ops=("read", "meta"), log=fault_log, seed=seed)
        got = scan(to_faulty(url), storage_options=so, executor=as_executor(client), batch_size=4)
        _same_catalog(truth, got)
        if faults_injected(fault_log)["read"] > 0:
            break
    assert faults_injected(fault_log)["read"] > 0


# --------------------------------------------------------------------------------------------- volumes
def test_read_volume_under_read_faults_gives_the_same_volume(s3, dicom_folder, fault_log):
    import SimpleITK as sitk

    from mrict_dask.volume import read_volume

    upload_tree(dicom_folder, s3, "in")
    so = faulty_options(s3.storage_options, rate=RATE, log=fault_log, seed=3)
    for modality in ("mr", "ct"):
        urls = [s3.url("in", modality, f"{modality}{k}") for k in range(6)]
        truth = sitk.GetArrayFromImage(read_volume(urls, s3.storage_options))
        for _ in range(4):
            img = read_volume([to_faulty(u) for u in urls], so)
            assert np.array_equal(sitk.GetArrayFromImage(img), truth)
    assert faults_injected(fault_log)["read"] > 0


# --------------------------------------------------------------------------------------------- the store
def _written(url: str, so: dict, pairs, results) -> None:
    """What the store holds (read without faults) is exactly what each pair task handed to write_pair."""
    import zarr

    from mrict_dask.store import completed_pairs, verify_store, zarr_store

    report = verify_store(url, so)
    assert report.ok, report.describe()
    assert sorted(completed_pairs(url, so)) == [p.index for p in pairs]
    g = zarr.open_group(zarr_store(url, so, read_only=True), mode="r")
    assert [str(v) for v in g["status"][:]] == [results[p.index].status for p in pairs]
    for p in pairs:
        r = results[p.index]
        if r.ok:
            for name in ("mr", "ct", "valid", "slice_ok"):
                assert np.asarray(g[name][p.index]).tobytes() == np.asarray(getattr(r, name)).tobytes(), (p, name)


@pytest.mark.slow
def test_store_under_request_faults_on_every_kind_of_request(s3, fault_log):
    """Create, write (ok and failed pairs), finalize, verify: 20 % of every S3 request fails, nothing is lost."""
    from mrict_dask import store

    from .test_store import make_pairs, make_result, small_template

    url = s3.url("out.zarr")
    so = faulty_options(s3.storage_options, rate=RATE, ops=("read", "write", "meta", "delete"), log=fault_log,
                        seed=4)
    t = small_template()
    pairs = make_pairs(5)
    store.open_or_create_store(to_faulty(url), pairs, t, TEMPLATE_ONLY, so)
    results = {}
    for p in pairs:
        status = "failed: MR: constant image" if p.index == 2 else "ok"
        results[p.index] = make_result(p, t.shape_zyx, status=status)
        store.write_pair(to_faulty(url), p.index, results[p.index], so)
    store.write_pair(to_faulty(url), 3, results[3], so)  # a rewrite of a complete pair
    store.finalize_store(to_faulty(url), so)
    assert store.verify_store(to_faulty(url), so).ok
    _written(url, s3.storage_options, pairs, results)
    counts = faults_injected(fault_log)
    assert counts["write"] > 0 and counts["read"] > 0, counts


@pytest.mark.slow
def test_write_pair_cut_by_an_outage_is_never_torn_and_completes_on_retry(s3, fault_log):
    """Writes fail for longer than the client retries (the error reaches write_pair): after every failed
    attempt the pair is not complete and verify finds nothing torn; retrying the pair completes it once."""
    from mrict_dask import store

    from .test_store import make_pairs, make_result, small_template

    url = s3.url("out.zarr")
    plain = s3.storage_options
    t = small_template()
    pairs = make_pairs(4)
    store.open_or_create_store(url, pairs, t, TEMPLATE_ONLY, plain)
    first = {p.index: make_result(p, t.shape_zyx, seed=1) for p in pairs}
    for p in pairs[:2]:  # two pairs already complete: their rewrite is cut too
        store.write_pair(url, p.index, first[p.index], plain)
    so = faulty_options(plain, rate=0.25, ops=("write",), log=fault_log, seed=5, layer="operation",
                        max_consecutive=3)
    results = {p.index: make_result(p, t.shape_zyx, seed=2) for p in pairs}
    attempts = failures = 0
    for p in pairs:
        while True:
            attempts += 1
            assert attempts < 60
            try:
                store.write_pair(to_faulty(url), p.index, results[p.index], so)
                break
            except Exception as exc:
                failures += 1
                assert "injected fault" in str(exc) or isinstance(exc, OSError), exc
                done = store.completed_pairs(url, plain)
                assert p.index not in done  # never complete after a cut write, old marker or not
                report = store.verify_store(url, plain)
                assert report.torn == [], report.describe()
    assert failures > 0 and faults_injected(fault_log)["write"] >= failures
    store.finalize_store(url, plain)
    _written(url, plain, pairs, results)


# --------------------------------------------------------------------------------------------- the pipeline

def _plan_pairs(work_url: str, so: dict) -> list:
    from mrict_dask.io import Location
    from mrict_dask.plan import Plan

    return list(Plan.from_json(Location(work_url, so).join("plan.json").read_text()).pairs)


def _check_finished(out: str, so: dict, expected) -> None:
    """Every expected pair exactly once, ok, nothing torn; read back without faults."""
    from mrict_dask.store import completed_pairs, verify_store

    pairs = _plan_pairs(out + ".work", so)
    assert sorted((p.mr_series_uid, p.ct_series_uid) for p in pairs) == sorted(expected)
    assert len({p.pair_id for p in pairs}) == len(pairs)
    markers = completed_pairs(out, so)
    assert sorted(markers) == [p.index for p in pairs]
    assert all(m["status"] == "ok" for m in markers.values()), markers
    report = verify_store(out, so)
    assert report.ok and report.checked == len(pairs), report.describe()


@pytest.mark.slow
def test_pipeline_under_request_faults_completes_in_one_run(one_patient, s3, fault_log):
    """S3 -> S3, serial executor, 20 % of every read, write, listing and delete failing: one run, every pair ok."""
    from mrict_dask.orchestrate import run_pipeline

    folder, expected = one_patient
    src = upload_tree(folder, s3, "dicom")
    out = s3.url("out", "store.zarr")
    so = faulty_options(s3.storage_options, rate=RATE, ops=("read", "write", "meta", "delete"), log=fault_log,
                        seed=6)
    summary = run_pipeline(to_faulty(src), to_faulty(out), config=fast_config(**TEMPLATE_SPACE),
                           executor="serial", pseudonym_key="k", storage_options=so)
    assert summary.exit_code == 0 and summary.ok == summary.n_pairs == len(expected), summary.describe()
    _check_finished(out, s3.storage_options, expected)
    counts = faults_injected(fault_log)
    assert counts["read"] > 0 and counts["write"] > 0, counts
    print(f"\n[faults] serial run: {sum(counts.values())} injected {dict(counts)}, 0 pairs lost")


@pytest.mark.slow
def test_pipeline_on_a_cluster_under_faults_and_outages_loses_nothing(one_patient, s3, fault_log, client):
    """LocalCluster, S3 -> S3: 20 % of all requests fail, and on top writes of pair objects fail for longer than
    the client retries (the errors reach the pair tasks). Each run leaves nothing torn; re-runs finish the pairs
    a run could not, and every expected pair ends in the store exactly once."""
    from mrict_dask.orchestrate import run_pipeline
    from mrict_dask.store import verify_store

    client.register_plugin(faulty_fs.RegisterFaultyFS())
    folder, expected = one_patient
    src = upload_tree(folder, s3, "dicom")
    out = s3.url("out", "store.zarr")
    # the CT shard write fails on both attempts of run 1, and so does recording the failure: run 1 ends with the
    # pair unaccounted for; run 2 must redo it
    outages = (Faults(layer="operation", rate=1.0, ops=("write",), max_consecutive=2, keys=r"store\.zarr/ct/c/"),
               Faults(layer="operation", rate=1.0, ops=("write",), max_consecutive=1,
                      keys=r"store\.zarr/_pairs/\d+\.json"))
    so = faulty_options(s3.storage_options, rate=RATE, ops=("read", "write", "meta", "delete"), log=fault_log,
                        seed=7, more=outages)
    config = fast_config(**{"run.retries": 1}, **TEMPLATE_SPACE)
    runs = []
    for _ in range(4):
        summary = run_pipeline(to_faulty(src), to_faulty(out), config=config, executor=client, pseudonym_key="k",
                               storage_options=so)
        runs.append((summary.ok, dict(summary.failed), summary.exit_code))
        report = verify_store(out, s3.storage_options)
        assert report.torn == [], report.describe()
        if summary.ok == summary.n_pairs:
            break
    assert summary.ok == summary.n_pairs == len(expected), runs
    assert len(runs) == 2 and runs[0][0] == 0 and runs[0][2] != 0, runs  # run 1 lost the pair to the outage
    _check_finished(out, s3.storage_options, expected)
    reached = faults_injected(fault_log, layer="operation")["write"]
    assert reached == 3 * len(expected)
    print(f"\n[faults] cluster runs (ok, failed, exit code) {runs}: {sum(faults_injected(fault_log).values())} "
          f"injected ({reached} outage faults reaching the pair tasks and the driver), 0 pairs lost")


def test_files_lost_to_an_outage_during_the_scan_are_not_frozen_into_the_plan(s3, dicom_folder, fault_log):
    """A file that cannot be downloaded during the scan must not enter the catalog as unreadable (the catalog is
    reused on resume, so its series, and its pair, would be lost for good): the run stops before planning,
    and the next run scans again."""
    from mrict_dask.errors import InputError
    from mrict_dask.orchestrate import run_pipeline

    url = upload_tree(dicom_folder, s3, "in")
    out = s3.url("out", "store.zarr")
    outage = Faults(layer="operation", rate=1.0, ops=("read",), max_consecutive=12, keys=r"in/mr/mr3$")
    so = faulty_options(s3.storage_options, rate=0.0, log=fault_log, more=(outage,))
    with pytest.raises(InputError, match=r"1 of .* files could not be read from storage"):
        run_pipeline(to_faulty(url), to_faulty(out), executor="serial", pseudonym_key="k", storage_options=so)
    fs = s3.fs()
    assert not fs.exists(s3.url("out", "store.zarr.work", "catalog.parquet"))
    assert not fs.exists(s3.url("out", "store.zarr", "zarr.json"))
    assert faults_injected(fault_log)["read"] >= 10  # the client's and the scan's own retries were all spent
    summary = run_pipeline(to_faulty(url), to_faulty(out), executor="serial", pseudonym_key="k", storage_options=so)
    assert summary.exit_code == 0, summary.describe()
    import pandas as pd

    with fs.open(s3.url("out", "store.zarr.work", "catalog.parquet"), "rb") as fh:
        catalog = pd.read_parquet(fh)
    row = catalog[catalog["url"].str.endswith("in/mr/mr3")]
    assert len(row) == 1 and row["read_error"].iloc[0] == "" and row["rows"].iloc[0] == 16
