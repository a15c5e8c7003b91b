"""Reading from a PACS over DICOMweb, against a real Orthanc (its DICOMweb plugin, basic auth).

The server is started by the fixtures in conftest.py and filled through its REST API with the generated corpus;
without the Orthanc binary these tests skip with the reason. Faults are real: the server is stopped, a series is
deleted on it, or a reverse proxy in front of it answers 429/503 as an overloaded gateway does.
Sections: [urls] [scan] [instances] [faults] [cli] [run].
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mrict_dask.testing import CountingProxy

from .conftest import PACS_PASSWORD, PACS_USER, fast_config, fast_config_file

KEY = "dicomweb-test-key"
# Columns that only a file's bytes or name can tell; every other column of a DICOMweb row equals the file scan's.
FILE_ONLY = ("url", "size", "pixel_data_offset", "transfer_syntax_uid")


def _through(proxy: CountingProxy) -> str:
    return f"dicomweb+{proxy.url}/dicom-web"


def _by_instance(df):
    df = df[df["sop_instance_uid"].map(bool)]
    return df.set_index("sop_instance_uid").sort_index()


def _series_uids(df) -> set[str]:
    return set(df.loc[df["read_error"] == "", "series_uid"])


# --------------------------------------------------------------------------------------------- [urls]
def test_url_forms():
    from mrict_dask.dicomweb import DicomwebSource, split_url
    from mrict_dask.errors import InputError
    from mrict_dask.sources import FsspecSource, open_source

    assert split_url("dicomweb+https://pacs.example.org/dicom-web/") == ("https://pacs.example.org/dicom-web", "")
    assert split_url("dicomweb+http://10.0.0.5:8042") == ("http://10.0.0.5:8042", "")
    inst = "dicomweb+http://h:1/wado/rs/studies/1.2/series/3.4/instances/5.6"
    assert split_url(inst) == ("http://h:1/wado/rs", "/studies/1.2/series/3.4/instances/5.6")
    src = open_source(inst)
    assert isinstance(src, DicomwebSource) and src.url == "dicomweb+http://h:1/wado/rs"
    assert isinstance(open_source("/some/folder"), FsspecSource)
    with pytest.raises(InputError, match="MRICT_DICOMWEB_USER") as err:
        open_source("dicomweb+https://alice:s3cret@pacs.example.org/dicom-web")
    assert "s3cret" not in str(err.value)
    for bad in ("dicomweb+ftp://pacs/dicom-web", "dicomweb+https://"):
        with pytest.raises(InputError, match="not a DICOMweb URL"):
            open_source(bad)
    # a DICOMweb service is read, never written: outputs and work areas still refuse it
    from mrict_dask.io import Location

    with pytest.raises(InputError, match="only be an input"):
        Location("dicomweb+https://pacs.example.org/dicom-web")


# --------------------------------------------------------------------------------------------- [scan]
@pytest.fixture(scope="module")
def scans(orthanc, corpus):
    """(DICOMweb catalog, folder catalog, the proxy's counts during the DICOMweb scan) of the shared corpus."""
    from mrict_dask.scan import scan

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MRICT_DICOMWEB_USER", PACS_USER)
        mp.setenv("MRICT_DICOMWEB_PASSWORD", PACS_PASSWORD)
        with CountingProxy(orthanc.url) as proxy:
            web = scan(_through(proxy), batch_size=256)
            counts = {k: list(v) for k, v in proxy.counts.items()}
            url = _through(proxy)
    return web, scan(corpus.url), counts, url


def test_scan_rows_have_the_file_scans_columns_and_move_no_instance_bytes(scans):
    web, files, counts, url = scans
    assert "instance" not in counts, "the scan must not retrieve instances"
    assert counts["metadata"][0] == web["series_uid"].nunique(), "one metadata request per series"
    assert (web["read_error"] == "").all()
    a, b = _by_instance(web), _by_instance(files)
    assert list(a.index) == list(b.index), "every instance the server holds, once"
    for col in a.columns:
        if col in FILE_ONLY:
            continue
        left, right = a[col].tolist(), b[col].tolist()
        diff = [(i, x, y) for i, (x, y) in enumerate(zip(left, right)) if str(x) != str(y)]
        assert not diff, (col, diff[:3])
    for sop, row in a.iterrows():
        assert row["url"] == f"{url}/studies/{row['study_uid']}/series/{row['series_uid']}/instances/{sop}"
    # metadata has no pixel bytes: an image row is trusted (checked when a pair reads it), a report is not an image
    assert a.loc[a["rows"].fillna(0) > 0, "pixel_data_ok"].all()
    assert (a["pixel_data_ok"] == b["pixel_data_ok"]).all()


def test_plan_from_the_pacs_equals_the_plan_from_files(scans):
    from mrict_dask.plan import make_plan

    web, files, _, _ = scans
    cfg = fast_config()
    pw, pf = make_plan(web, cfg, KEY.encode()), make_plan(files, cfg, KEY.encode())

    def shape(plan):
        return [(p.index, p.pair_id, p.patient, p.split, p.days_apart, p.mr_series_uid, p.ct_series_uid,
                 len(p.mr_files), len(p.ct_files)) for p in plan.pairs]

    assert shape(pw) == shape(pf) and len(pw.pairs) == 2
    assert sorted(json.dumps(e, sort_keys=True, default=str) for e in pw.exclusions) == \
        sorted(json.dumps(e, sort_keys=True, default=str) for e in pf.exclusions)


# --------------------------------------------------------------------------------------------- [instances]
def test_a_pairs_series_read_from_the_pacs_equal_the_files(scans, pacs_credentials):
    import SimpleITK as sitk

    from mrict_dask.plan import make_plan
    from mrict_dask.volume import read_volume

    web, files, _, _ = scans
    cfg = fast_config()
    pw, pf = make_plan(web, cfg, KEY.encode()), make_plan(files, cfg, KEY.encode())
    w, f = pw.pairs[0], pf.pairs[0]
    for web_urls, file_urls in ((w.mr_files, f.mr_files), (w.ct_files, f.ct_files)):
        a, b = read_volume(web_urls, None, cfg), read_volume(file_urls, None, cfg)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))
        assert (a.GetOrigin(), a.GetSpacing(), a.GetDirection()) == (b.GetOrigin(), b.GetSpacing(), b.GetDirection())


def test_instances_arrive_in_their_stored_transfer_syntax(small_orthanc, one_patient, tmp_path, pacs_credentials):
    """An RLE-compressed instance comes back RLE-compressed with the same pixel bytes (no transcoding)."""
    import pydicom
    from pydicom.uid import RLELossless, generate_uid

    from mrict_dask.scan import scan
    from mrict_dask.sources import fetch_instances

    files = scan(one_patient[0])
    path = files.loc[(files["modality"] == "CT") & (files["rows"].fillna(0) > 0), "url"].iloc[0]
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.compress(RLELossless)
    rle = str(tmp_path / "rle.dcm")
    ds.save_as(rle)
    assert small_orthanc.upload([rle]) == 1
    url = (f"{small_orthanc.dicomweb_url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
           f"/instances/{ds.SOPInstanceUID}")
    (got,) = fetch_instances([url])
    assert got.file_meta.TransferSyntaxUID == RLELossless
    assert bytes(got.PixelData) == bytes(pydicom.dcmread(rle).PixelData)
    np.testing.assert_array_equal(got.pixel_array, pydicom.dcmread(path).pixel_array)


# --------------------------------------------------------------------------------------------- [faults]
def test_429_with_retry_after_and_503_are_retried_and_the_scan_completes(orthanc, scans, pacs_credentials):
    from mrict_dask.scan import scan

    faults = {"429": 0, "503": 0}

    def overloaded(path: str):
        if CountingProxy.kind(path) != "metadata":
            return None
        if faults["429"] < 3:
            faults["429"] += 1
            return 429, {"Retry-After": "1"}
        if faults["503"] < 3:
            faults["503"] += 1
            return 503, {}
        return None

    with CountingProxy(orthanc.url, before=overloaded) as proxy:
        web = scan(_through(proxy))
    assert faults == {"429": 3, "503": 3}
    assert (web["read_error"] == "").all()
    assert list(_by_instance(web).index) == list(_by_instance(scans[0]).index)


def test_a_series_whose_metadata_cannot_be_read_keeps_a_row_with_the_reason(small_orthanc, one_patient,
                                                                            pacs_credentials):
    """The series is deleted on the server between the listing and its metadata request (a real 404)."""
    from mrict_dask.scan import scan

    files = scan(one_patient[0])
    victim = sorted(_series_uids(files))[0]

    def delete_victim(path: str):
        if CountingProxy.kind(path) == "metadata" and f"/series/{victim}/" in path:
            small_orthanc.delete(victim)

    with CountingProxy(small_orthanc.url, before=delete_victim) as proxy:
        web = scan(_through(proxy))
    lost = web[web["url"].str.endswith(f"/series/{victim}")]
    assert len(lost) == 1 and lost["read_error"].iloc[0].startswith("unreadable: DicomwebNotFound: series metadata")
    rest = web[web["read_error"] == ""]
    assert _series_uids(rest) == _series_uids(files) - {victim}
    assert len(rest) == int((files["series_uid"] != victim).sum())


def test_pixel_data_missing_on_the_server_fails_the_pair_at_read_not_the_plan(small_orthanc, one_patient, tmp_path,
                                                                             pacs_credentials):
    """Metadata cannot show pixel bytes: the plan keeps the stack, the read refuses it with the reason."""
    import pydicom

    from mrict_dask.errors import VolumeError
    from mrict_dask.plan import make_plan
    from mrict_dask.scan import scan
    from mrict_dask.volume import read_volume

    cfg = fast_config()
    plan = make_plan(scan(one_patient[0]), cfg, KEY.encode())
    (pair,) = plan.pairs
    ds = pydicom.dcmread(pair.ct_files[len(pair.ct_files) // 2])
    del ds.PixelData
    path = str(tmp_path / "no-pixels.dcm")
    ds.save_as(path)
    small_orthanc.delete(ds.SOPInstanceUID)  # the server's copy of this slice is replaced by one without pixels
    assert small_orthanc.upload([path]) == 1
    # a file scan refuses this stack (its catalog says the pixel data is missing) ...
    from mrict_dask.stacks import file_problem

    assert "pixel data" in file_problem(scan(path).iloc[0].to_dict())
    # ... the DICOMweb row cannot tell, so the plan keeps it, and reading the series refuses it with the reason
    web = scan(small_orthanc.dicomweb_url)
    row = web[web["sop_instance_uid"] == ds.SOPInstanceUID].iloc[0]
    assert row["read_error"] == "" and bool(row["pixel_data_ok"])
    web_plan = make_plan(web, cfg, KEY.encode())
    (web_pair,) = web_plan.pairs
    assert len(web_pair.ct_files) == len(pair.ct_files)
    with pytest.raises(VolumeError, match="has no pixel data"):
        read_volume(web_pair.ct_files, None, cfg)


# --------------------------------------------------------------------------------------------- [cli]
def _cli(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mrict_dask.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _env(user: str | None = PACS_USER, password: str | None = PACS_PASSWORD) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MRICT_DICOMWEB_")}
    if user:
        env["MRICT_DICOMWEB_USER"] = user
    if password:
        env["MRICT_DICOMWEB_PASSWORD"] = password
    return env


@pytest.mark.parametrize("case", ["wrong password", "no credentials", "server down", "wrong root", "wrong scheme"])
def test_bad_pacs_access_is_one_error_line_and_a_non_zero_exit(case, orthanc, tmp_path):
    from mrict_dask.testing import free_port

    url, env = orthanc.dicomweb_url, _env()
    if case == "wrong password":
        env, needle = _env(password="not-" + PACS_PASSWORD), "refused the credentials"
    elif case == "no credentials":
        env, needle = _env(None, None), "MRICT_DICOMWEB_USER"
    elif case == "server down":
        url, needle = f"dicomweb+http://127.0.0.1:{free_port()}/dicom-web", "did not answer"
    elif case == "wrong root":
        url, needle = orthanc.dicomweb_url.replace("/dicom-web", "/wado"), "service root"
    else:
        url, needle = orthanc.dicomweb_url.replace("dicomweb+http", "dicomweb+ftp"), "not a DICOMweb URL"
    out = str(tmp_path / "o.zarr")
    for command in (["scan", url, "--out", str(tmp_path / "c.parquet")],
                    ["run", url, out, "--executor", "serial", "--pseudonym-key", KEY],
                    ["export-series", url, "--all", str(tmp_path / "x")]):
        proc = _cli(["-q", *command], env)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2, (command[0], proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr + proc.stdout
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (command[0], proc.stderr)
        assert PACS_PASSWORD not in proc.stderr + proc.stdout
        assert not os.path.exists(out), "nothing written for an input that cannot be read"


def test_cli_scan_on_a_local_cluster_equals_the_serial_scan(orthanc, scans, tmp_path):
    """The CLI's workers (separate processes) read the credentials from the environment they inherit."""
    from mrict_dask.catalog import read_catalog
    from mrict_dask.io import Location

    out = str(tmp_path / "catalog.parquet")
    proc = _cli(["-q", "scan", orthanc.dicomweb_url, "--out", out, "--workers", "2", "--batch-size", "100"], _env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"scanned {len(scans[0]):,} files in" in proc.stdout, proc.stdout
    got, want = _by_instance(read_catalog(Location(out))), _by_instance(scans[0])
    assert list(got.index) == list(want.index)
    for col in got.columns:
        if col != "url":  # the serial scan went through a proxy (another host:port)
            assert [str(v) for v in got[col]] == [str(v) for v in want[col]], col


def test_export_series_from_the_pacs_equals_the_export_from_files(orthanc, corpus, scans, tmp_path):
    import SimpleITK as sitk

    from mrict_dask.plan import make_plan

    uid = make_plan(scans[0], fast_config(), KEY.encode()).pairs[0].ct_series_uid
    a, b = str(tmp_path / "web.nii.gz"), str(tmp_path / "file.nii.gz")
    for url, out in ((orthanc.dicomweb_url, a), (corpus.url, b)):
        proc = _cli(["-q", "export-series", url, "--series", uid, "--out", out], _env())
        assert proc.returncode == 0, proc.stderr[-2000:]
    ia, ib = sitk.ReadImage(a), sitk.ReadImage(b)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(ia), sitk.GetArrayViewFromImage(ib))
    assert ia.GetOrigin() == ib.GetOrigin() and ia.GetDirection() == ib.GetDirection()


# --------------------------------------------------------------------------------------------- [run]
def _assert_same_store(a: str, b: str) -> None:
    import xarray as xr

    da, db = xr.open_zarr(a), xr.open_zarr(b)
    assert set(da.data_vars) == set(db.data_vars)
    for name in da.data_vars:
        np.testing.assert_array_equal(da[name].values, db[name].values, err_msg=name)


@pytest.mark.slow
def test_run_from_the_pacs_equals_the_folder_run_and_fetches_only_the_chosen_series(orthanc, corpus, tmp_path):
    from mrict_dask.orchestrate import run_pipeline
    from mrict_dask.plan import Plan

    web, folder = str(tmp_path / "web.zarr"), str(tmp_path / "folder.zarr")
    config = fast_config_file(tmp_path / "fast.yaml")
    with CountingProxy(orthanc.url) as proxy:
        proc = _cli(["-q", "run", _through(proxy), web, "--workers", "2", "--config", config, "--pseudonym-key", KEY],
                    _env(), timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        instance_requests = proxy.counts["instance"][0]
    summary = run_pipeline(corpus.url, folder, config=fast_config(), executor="serial", pseudonym_key=KEY)
    assert summary.ok == 2
    _assert_same_store(web, folder)
    with open(web + ".work/plan.json") as fh:
        plan = Plan.from_json(fh.read())
    assert instance_requests == sum(len(p.mr_files) + len(p.ct_files) for p in plan.pairs)


@pytest.mark.slow
def test_server_down_mid_run_fails_the_pair_after_retries_and_a_rerun_completes_it(small_orthanc, tmp_path,
                                                                                  pacs_credentials):
    import xarray as xr

    from mrict_dask.orchestrate import run_pipeline

    down = {"at": None}

    def stop_at_first_instance(path: str):
        if CountingProxy.kind(path) == "instance" and down["at"] is None:
            down["at"] = path
            small_orthanc.stop()

    out = str(tmp_path / "store.zarr")
    with CountingProxy(small_orthanc.url, before=stop_at_first_instance, drop_when_down=True) as proxy:
        first = run_pipeline(_through(proxy), out, config=fast_config(), executor="serial", pseudonym_key=KEY)
        assert down["at"] is not None and first.n_pairs == 1 and first.ok == 0
        assert first.exit_code == 3 and "re-run to retry" in first.describe()  # not a success: a re-run is due
        (status,) = xr.open_zarr(out)["status"].values
        assert status.startswith("failed: error after retries: DicomwebUnavailable"), status
        assert "/studies/" not in status, "no URL (UIDs) in the public store"
        small_orthanc.start()
        second = run_pipeline(_through(proxy), out, config=fast_config(), executor="serial", pseudonym_key=KEY)
    assert second.ok == 1 and second.processed == 1 and not second.failed and second.exit_code == 0
    assert list(xr.open_zarr(out)["status"].values) == ["ok"]
