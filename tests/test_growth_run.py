"""A collection that grows, through the whole job: a second run over the same input folder, grown by 3 patients and
one series sent again, computes only what is new or changed and rewrites nothing of what the store held; a
withdrawn patient's bytes leave the store for good; one run writes a store at a time; a driver and a worker killed
mid-append leave a store that the next run finishes into the same store as an uninterrupted append.

Patients are real DICOM made from the shared corpus's first patient: copies under a new PatientID, with new
study, series and instance UIDs and their pixel values changed by a little noise (their volumes, so their
registrations and chunks, are their own). The cheaper pipeline settings of the end-to-end tests apply
(``conftest.FAST_SETTINGS``).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import pytest
import xarray as xr

from mrict_dask import store as S
from mrict_dask.orchestrate import run_pipeline

from .conftest import fast_config, fast_config_file
from .test_growth import object_hashes, pair_object_keys, shard_chunks

pytestmark = pytest.mark.slow

KEY = "growth-run-key"
FAST = fast_config()


# --------------------------------------------------------------------------------------------- corpus
def _rewrite(path: str, out: str, uids: dict, seed: int, patient: tuple[str, str] | None) -> None:
    """``path`` written to ``out`` with new UIDs (``uids`` maps old to new, filled as met), the patient's identity
    replaced when given, and small noise on the image's non-background pixels."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(path)

    def new(uid: str) -> str:
        return uids.setdefault(uid, generate_uid(entropy_srcs=[str(seed), uid]))

    tags = ("SOPInstanceUID",) if patient is None else \
        ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
    for tag in tags:
        if tag in ds:
            setattr(ds, tag, new(str(getattr(ds, tag))))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if patient is not None:
        ds.PatientID, ds.PatientName = patient
    if "PixelData" in ds:
        arr = ds.pixel_array
        rng = np.random.default_rng([seed, int(ds.get("InstanceNumber") or 0)])
        noisy = arr.astype(np.int32) + rng.integers(-2, 3, arr.shape) * (arr > max(int(arr.min()), 0))
        info = np.iinfo(arr.dtype)
        ds.PixelData = np.clip(noisy, info.min, info.max).astype(arr.dtype).tobytes()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    ds.save_as(out)


def clone_patient(src: str, dst: str, patient_id: str, seed: int) -> None:
    """Every file of the patient folder ``src`` as another patient's, below ``dst``."""
    uids: dict = {}
    for path in sorted(glob.glob(os.path.join(src, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            _rewrite(path, os.path.join(dst, os.path.relpath(path, src)), uids, seed, (patient_id, f"Clone^{seed}"))


def send_again(series_dir: str, seed: int) -> None:
    """A series sent again with other instances: new SOPInstanceUIDs and slightly other pixels, same series."""
    uids: dict = {}
    for path in sorted(glob.glob(os.path.join(series_dir, "*"))):
        _rewrite(path, path, uids, seed, None)


def ct_series_dir(patient_dir: str) -> str:
    """The patient's largest CT series folder."""
    import pydicom

    dirs = {os.path.dirname(p) for p in glob.glob(os.path.join(patient_dir, "**", "*"), recursive=True)
            if os.path.isfile(p)}
    ct = [d for d in dirs if pydicom.dcmread(sorted(glob.glob(d + "/*"))[0], stop_before_pixels=True).Modality == "CT"]
    return max(ct, key=lambda d: len(os.listdir(d)))


class Registrations:
    """Counts MR -> template registrations, one per pair computed (the real function, counted)."""

    def __init__(self, monkeypatch):
        import mrict_dask.register as R

        self.n = 0
        real = R.register_mr_to_template

        def counted(*a, **kw):
            self.n += 1
            return real(*a, **kw)

        monkeypatch.setattr(R, "register_mr_to_template", counted)


@dataclass
class Grown:
    root: str
    input: str
    store: str
    work: str
    base_copy: str  # the store and work area as the first run left them
    first: object  # RunSummary
    second: object
    registrations: tuple[int, int]
    before: dict  # object hashes after the first run
    readers: dict  # opened after the first run
    read_before: dict  # what they read after the first run
    patients: dict  # name -> PatientID


@pytest.fixture(scope="module")
def grown(one_patient, tmp_path_factory) -> Grown:
    folder, _ = one_patient
    (original,) = os.listdir(folder)
    root = str(tmp_path_factory.mktemp("growth"))
    src = os.path.join(folder, original)
    clones = os.path.join(root, "clones")
    patients = {"original": None, "a": "GROW-A", "b": "GROW-B", "c": "GROW-C", "d": "GROW-D"}
    for seed, name in enumerate("abcd", start=1):
        clone_patient(src, os.path.join(clones, patients[name]), patients[name], seed)
    inp, out, work = os.path.join(root, "in"), os.path.join(root, "store.zarr"), os.path.join(root, "work")
    shutil.copytree(src, os.path.join(inp, original))
    shutil.copytree(os.path.join(clones, "GROW-A"), os.path.join(inp, "GROW-A"))
    with pytest.MonkeyPatch.context() as mp:
        count = Registrations(mp)
        first = run_pipeline(inp, out, work_url=work, config=FAST, executor="serial", pseudonym_key=KEY)
        n_first = count.n
        base_copy = os.path.join(root, "base")
        shutil.copytree(out, os.path.join(base_copy, "store.zarr"))
        shutil.copytree(work, os.path.join(base_copy, "work"))
        before = object_hashes(out)
        from mrict_dask.loader import SlicePairs, VolumePairs

        readers = {"slices": SlicePairs(out, split=None, with_valid=True), "volumes": VolumePairs(out, split=None),
                   "xarray": xr.open_zarr(out)}
        read_before = {"slices": [readers["slices"][i] for i in range(0, len(readers["slices"]), 7)],
                       "volumes": [readers["volumes"][k] for k in range(len(readers["volumes"]))],
                       "xarray": {v: readers["xarray"][v].values for v in ("mr", "ct", "valid", "status", "split")}}
        # the collection grows in place: three patients more, and patient A's CT sent again with other instances
        for name in "bcd":
            shutil.copytree(os.path.join(clones, patients[name]), os.path.join(inp, patients[name]))
        send_again(ct_series_dir(os.path.join(inp, "GROW-A")), seed=99)
        second = run_pipeline(inp, out, work_url=work, config=FAST, executor="serial", pseudonym_key=KEY)
        n_second = count.n - n_first
    patients["original"] = _patient_id(work)
    return Grown(root, inp, out, work, base_copy, first, second, (n_first, n_second), before, readers, read_before,
                 patients)


def _patient_id(work: str) -> str:
    """The original patient's PatientID (its files' own, as the plan recorded it)."""
    import json

    ids = set(json.load(open(os.path.join(work, "plan.json")))["patients"].values())
    (pid,) = [i for i in ids if not i.startswith("GROW-")]
    return pid


# --------------------------------------------------------------------------------------------- growth
def test_a_grown_input_computes_only_new_and_changed_pairs_and_rewrites_nothing(grown):
    first, second = grown.first, grown.second
    assert first.ok == first.n_pairs == 2 and first.exit_code == 0
    # three new patients and one pair whose CT was sent again: four registrations, no other
    assert grown.registrations == (2, 4)
    assert second.processed == 4 and second.skipped == 1 and second.exit_code == 0
    assert len(second.added) == 3 and len(second.changed) == 1 and len(second.retired) == 1
    assert "changes: 3 added, 1 changed, 1 retired" in second.describe()

    ds = xr.open_zarr(grown.store)
    status = ds["status"].values.tolist()
    assert status[:2].count("retired") == 1 and status.count("ok") == 5 and len(status) == 6
    retired = status.index("retired")
    kept = 1 - retired
    # every object of both old pairs is as the first run wrote it (the retired pair's bytes stay, for version 1)
    after = object_hashes(grown.store)
    keys = [k for i in (0, 1) for k in pair_object_keys(grown.store, i) if not (i == retired and k.endswith(".json"))]
    # each per-pair variable's object (both spaces), marker and figure
    assert len(keys) == 2 * (len(S.pair_arrays(S.root_attrs(grown.store))) + 2) - 1
    assert {k: after[k] for k in keys} == {k: grown.before[k] for k in keys}
    # splits of the patients the store held are unchanged, and the new pair of patient A has A's split
    first_ds = grown.read_before["xarray"]
    assert ds["split"].values[:2].tolist() == first_ds["split"].tolist()
    patient = ds["patient"].values
    new_of_a = [i for i in range(2, 6) if patient[i] == patient[retired]]
    assert len(new_of_a) == 1 and ds["split"].values[new_of_a[0]] == ds["split"].values[retired]
    v = S.resolve_version(grown.store, 2)
    assert v.changes["changed"] == [{"retired": [ds["pair"].values[retired]], "by": [ds["pair"].values[new_of_a[0]]]}]
    assert S.verify_store(grown.store).ok
    # the report says so
    import json

    rep = json.load(open(grown.store + "-report/report.json"))
    assert rep["counts"]["pairs_added"] == 3 and rep["counts"]["pairs_changed"] == 1
    assert [r["status"] for r in rep["pairs"]] == status
    assert kept != retired


def test_readers_opened_before_the_append_read_identical_arrays_after_it(grown):
    sp, vp, ds = grown.readers["slices"], grown.readers["volumes"], grown.readers["xarray"]
    for got, want in zip([sp[i] for i in range(0, len(sp), 7)], grown.read_before["slices"]):
        assert all(a.tobytes() == b.tobytes() for a, b in zip(got, want))
    for k in range(len(vp)):
        assert all(a.tobytes() == b.tobytes() for a, b in zip(vp[k], grown.read_before["volumes"][k]))
    for name in ("mr", "ct", "valid"):
        np.testing.assert_array_equal(ds[name].values, grown.read_before["xarray"][name])
    # opened now: every pair with its status; pinned to version 1: the first run's pairs, the same bytes
    from mrict_dask.loader import VolumePairs

    assert len(VolumePairs(grown.store, split=None)) == 5
    pinned = VolumePairs(grown.store, split=None, version=1)
    assert pinned.pair_indices.tolist() == [0, 1]
    for k in range(2):
        assert all(a.tobytes() == b.tobytes() for a, b in zip(pinned[k], grown.read_before["volumes"][k]))


def test_forget_deletes_the_patients_bytes_and_no_later_run_adds_it_back(grown, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mrict_dask.cli import main
    from mrict_dask.errors import VersionUnavailable
    from mrict_dask.loader import SlicePairs

    out, work, report = str(tmp_path / "store.zarr"), str(tmp_path / "work"), str(tmp_path / "store.zarr-report")
    shutil.copytree(grown.store, out)
    shutil.copytree(grown.work, work)
    shutil.copytree(grown.store + "-report", report)
    import json

    table = S.pair_table(out)
    # patient A, whose CT was sent again (a retired pair and its replacement), withdrawn by the PatientID that the
    # private work area resolves
    (who,) = [ps for ps, pid in json.load(open(os.path.join(work, "plan.json")))["patients"].items() if pid == "GROW-A"]
    gone = [i for i, p in enumerate(table["patient"]) if p == who]
    others = [i for i in range(len(table["pair"])) if i not in gone]
    nz = xr.open_zarr(out).sizes["z"]
    keep = b"".join(open(os.path.join(out, k), "rb").read() for i in others for k in pair_object_keys(out, i)
                    if k.split("/")[0] in S.VOLUME_VARS)
    secrets = [c for i in gone for k in pair_object_keys(out, i) if k.split("/")[0] in S.VOLUME_VARS
               for c in shard_chunks(open(os.path.join(out, k), "rb").read(), nz) if len(c) >= 64 and c not in keep]
    secrets += [open(os.path.join(report, "figures", f"{table['pair'][i]}.png"), "rb").read() for i in gone]
    secrets += [open(os.path.join(out, "_pairs", f"{i}.png"), "rb").read() for i in gone]
    assert len(secrets) > nz

    res = CliRunner().invoke(main, ["forget", out, "GROW-A", "--work", work])
    assert res.exit_code == 0, res.output
    assert len(gone) == 2 and "2 pair(s)" in res.output and "GROW-A" not in res.output
    blob = b"".join(open(os.path.join(d, f), "rb").read() for root in (out, report)
                    for d, _, files in os.walk(root) for f in files)
    assert not [s for s in secrets if s in blob]
    assert S.verify_store(out).ok
    with pytest.raises(VersionUnavailable) as err:
        SlicePairs(out, split=None, version=2)
    assert "\n" not in str(err.value) and who in str(err.value)

    # a later run over the same input and work area: nothing computed, the patient not added back
    count = Registrations(monkeypatch)
    again = run_pipeline(grown.input, out, work_url=work, config=FAST, executor="serial", pseudonym_key=KEY)
    assert count.n == 0 and again.processed == 0 and again.exit_code == 0 and again.withdrawn == 1
    assert S.pair_table(out)["patient"] == table["patient"]
    assert [xr.open_zarr(out)["status"].values[i] for i in gone] == ["withdrawn"] * len(gone)


# --------------------------------------------------------------------------------------------- faults
def test_killed_driver_and_worker_mid_append_end_as_the_uninterrupted_append(grown, tmp_path):
    """The append runs on real `dask scheduler` / `dask worker` processes, driven by the CLI: a worker is killed
    in the middle of a pair, a second run on the store is refused while the first holds it, then the driver is
    killed after its first new pair. The next run takes the dead run's lease, finishes, and the store equals the
    uninterrupted append's; verify is clean."""
    from distributed import Client

    from mrict_dask.errors import LeaseHeld

    from .test_faults import RealCluster

    out, work = str(tmp_path / "store.zarr"), str(tmp_path / "work")
    shutil.copytree(os.path.join(grown.base_copy, "store.zarr"), out)
    shutil.copytree(os.path.join(grown.base_copy, "work"), work)
    cluster = RealCluster(2)
    try:
        with Client(cluster.address, set_as_default=False) as client:
            here = os.path.dirname(os.path.dirname(os.path.abspath(S.__file__)))
            assert all(f.startswith(here) for f in client.run(lambda: __import__("mrict_dask").__file__).values())
            cmd = [sys.executable, "-m", "mrict_dask.cli", "-q", "run", grown.input, out, "--work", work,
                   "--scheduler", cluster.address, "--config", fast_config_file(tmp_path / "fast.yaml"),
                   "--pseudonym-key", KEY]
            log = open(tmp_path / "driver.log", "w")
            driver = subprocess.Popen(cmd, stdout=log, stderr=log)
            deadline = time.time() + 300

            def pairs_running() -> list:
                return [w for w, keys in client.processing().items() if any(k.startswith("pair-") for k in keys)]

            while time.time() < deadline and not pairs_running():
                time.sleep(0.2)
            with pytest.raises(LeaseHeld) as err:  # a second run while the first writes
                run_pipeline(grown.input, out, work_url=work, config=FAST, executor="serial", pseudonym_key=KEY)
            assert "\n" not in str(err.value) and f"pid {driver.pid}" in str(err.value)
            time.sleep(2)
            busy = pairs_running()
            cluster.kill_worker_with_pid(client.run(os.getpid, workers=[busy[0]])[busy[0]])

            def new_markers() -> list:
                names = glob.glob(os.path.join(out, "_pairs", "*.json"))
                return [f for f in names if int(os.path.basename(f)[:-5]) >= 2]

            while time.time() < deadline and driver.poll() is None and not new_markers():
                time.sleep(0.2)
            assert driver.poll() is None, open(tmp_path / "driver.log").read()[-2000:]
            driver.send_signal(signal.SIGKILL)
            driver.wait()
            while time.time() < deadline and [w for w, keys in client.processing().items() if keys]:
                time.sleep(0.2)  # tasks the dead driver left running finish (their writes are whole pairs)
            done = S.completed_pairs(out)
            assert 1 <= len([i for i in done if i >= 2]) < 4  # killed mid-append
            summary = run_pipeline(grown.input, out, work_url=work, config=FAST, executor=client, pseudonym_key=KEY)
        assert summary.exit_code == 0 and summary.processed == 4 - len([i for i in done if i >= 2])
    finally:
        cluster.close()
    assert S.verify_store(out).ok
    a, b = xr.open_zarr(out), xr.open_zarr(grown.store)
    assert set(a.data_vars) == set(b.data_vars)
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    np.testing.assert_array_equal(a["pair"].values, b["pair"].values)
    assert [(p.pair_id, p.status, p.digest) for p in S.resolve_version(out).pairs] == \
        [(p.pair_id, p.status, p.digest) for p in S.resolve_version(grown.store).pairs]
