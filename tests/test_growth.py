"""Growing stores: appends that rewrite nothing, readers that keep their view, versions, withdrawal, one writer.

Store-level tests use synthetic pair results (registration is not needed to test the store) on the local disk
and on the local S3 server; expectations are the arrays the test handed to ``write_pair`` and the bytes it hashed
before. The end-to-end tests (marked slow) grow a real corpus through the whole job: see ``test_growth_run.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mrict_dask import store
from mrict_dask.config import Config
from mrict_dask.errors import LeaseHeld, StoreMismatchError, VersionUnavailable
from mrict_dask.growth import StorePair, check_key, forget, key_check, reconcile
from mrict_dask.io import Location
from mrict_dask.loader import SlicePairs, VolumePairs
from mrict_dask.types import PairSpec

from .conftest import SMALL_NATIVE
from .test_store import make_pairs, make_result, small_template

KEY = b"growth-key"


# --------------------------------------------------------------------------------------------- helpers
def object_hashes(url: str, storage_options: dict | None = None) -> dict[str, str]:
    """sha256 of every object below ``url``, by key relative to it."""
    loc = Location.of(url, storage_options)
    loc.fs.invalidate_cache()
    root = loc.path.rstrip("/")
    return {p[len(root) + 1:]: hashlib.sha256(loc.fs.cat_file(p)).hexdigest()
            for p in loc.fs.find(root, withdirs=False)}


def pair_object_keys(url: str, index: int, storage_options: dict | None = None) -> list[str]:
    """Every object of one pair: its per-pair variables' objects (the store's registry), its marker and figure."""
    loc = Location.of(url, storage_options)
    keys = list(store._pair_keys(loc, index).values()) + [f"_pairs/{index}.json"]
    return keys + ([f"_pairs/{index}.png"] if loc.join(f"_pairs/{index}.png").exists() else [])


def shard_chunks(blob: bytes, nz: int) -> list[bytes]:
    """The compressed inner chunks of a shard (its index, nz (offset, length) pairs + crc32c, is at the end)."""
    index = np.frombuffer(blob[-(nz * 16 + 4):-4], dtype="<u8").reshape(nz, 2)
    return [blob[int(o):int(o) + int(n)] for o, n in index if o != 2**64 - 1]


def grown_store(url: str, so: dict | None = None):
    """A store of 4 pairs (2 patients) finalized as version 1, then grown: pairs 4 and 5 (a new patient) appended,
    and pair 1 retired for pair 6 of its patient; finalized as version 2. Returns the pairs, the results written,
    the object hashes before the growth and a reader of each kind opened before it."""
    import xarray as xr

    t = small_template()
    pairs = [dataclasses.replace(p, inputs=f"{p.index:016x}") for p in make_pairs(6)]
    base, later = pairs[:4], pairs[4:]
    later.append(PairSpec(index=6, pair_id=f"{pairs[1].patient}-000000aa", patient=pairs[1].patient,
                          split=pairs[1].split, days_apart=3, mr_files=(), ct_files=(), inputs="6" * 16))
    store.open_or_create_store(url, base, t, SMALL_NATIVE, storage_options=so)
    results = {p.index: make_result(p, t.shape_zyx) for p in base + later}
    for p in base:
        store.write_pair(url, p.index, results[p.index], storage_options=so)
    assert store.finalize_store(url, so)["id"] == 1
    before = object_hashes(url, so)
    readers = {"slices": SlicePairs(url, split=None, with_valid=True, storage_options=so),
               "volumes": VolumePairs(url, split=None, storage_options=so)}
    if not so:  # xarray on the local store (each open on the S3 server costs a second)
        readers["xarray"] = xr.open_zarr(url)
    store.append_pairs(url, later, so)
    for p in later:
        store.write_pair(url, p.index, results[p.index], storage_options=so)
    store.retire_pair(url, 1, pairs[1].pair_id, "inputs changed", by=[later[2].pair_id], storage_options=so)
    assert store.finalize_store(url, so)["id"] == 2
    return pairs[:4] + later, results, before, readers


def check_old_pairs_untouched(url: str, so: dict | None, before: dict, readers: dict, results: dict) -> None:
    """Every object of the 4 pairs the store held before the growth is byte-identical (pair 1's marker, which now
    says retired, aside), and the readers opened before read exactly what was written."""
    after = object_hashes(url, so)
    old = [k for i in range(4) for k in pair_object_keys(url, i, so) if not (i == 1 and k.endswith(".json"))]
    # each per-pair variable's object (both spaces) and the marker of each pair, and pair 0's figure; but pair 1's
    # marker (retired)
    assert len(old) == 4 * (len(store.pair_arrays(store.root_attrs(url, so))) + 1) + 1 - 1
    assert {k: after[k] for k in old} == {k: before[k] for k in old}
    sp, vp = readers["slices"], readers["volumes"]
    assert sorted(set(sp.pair_indices)) == [0, 1, 2, 3]
    for i in range(len(sp)):
        p, z = sp.locate(i)
        mr, ct, valid = sp[i]
        assert mr.tobytes() == results[p].mr[z].tobytes() and ct.tobytes() == results[p].ct[z].tobytes()
        assert np.array_equal(valid, results[p].valid[z])
    for k in range(len(vp)):
        assert vp[k][0].tobytes() == results[int(vp.pair_indices[k])].mr.tobytes()
    if "xarray" in readers:
        ds = readers["xarray"]
        assert ds.sizes["pair"] == 4
        for p in range(4):
            assert ds["ct"][p].values.tobytes() == results[p].ct.tobytes()


# --------------------------------------------------------------------------------------------- append, readers
def test_append_rewrites_no_object_of_a_pair_and_readers_keep_their_view(tmp_path):
    import xarray as xr

    url = str(tmp_path / "out.zarr")
    pairs, results, before, readers = grown_store(url)
    check_old_pairs_untouched(url, None, before, readers, results)

    # a reader opened after sees every pair with its status, and serves the live ones only
    now = xr.open_zarr(url)
    assert now["status"].values.tolist() == ["ok", "retired", "ok", "ok", "ok", "ok", "ok"]
    assert now["pair"].values.tolist() == [p.pair_id for p in pairs]
    assert now["split"].values.tolist() == [p.split for p in pairs]
    fresh = VolumePairs(url, split=None)
    assert fresh.pair_indices.tolist() == [0, 2, 3, 4, 5, 6] and fresh.version_id == 2
    assert fresh[5][1].tobytes() == results[6].ct.tobytes()

    # versions: 1 is the store before the growth, served exactly; 2 says what changed
    pinned = VolumePairs(url, split=None, version=1)
    assert pinned.pair_indices.tolist() == [0, 1, 2, 3] and pinned.version_id == 1
    assert pinned[1][0].tobytes() == results[1].mr.tobytes()
    v2 = store.resolve_version(url, 2)
    assert v2.changes["added"] == [pairs[4].pair_id, pairs[5].pair_id]
    assert v2.changes["changed"] == [{"retired": [pairs[1].pair_id], "by": [pairs[6].pair_id]}]
    assert [p.status for p in v2.pairs] == now["status"].values.tolist()
    assert v2.pairs[2].objects["mr"] == "mr/c/2/0/0/0" and v2.pairs[1].objects == {}
    assert store.verify_store(url).ok
    assert "versions: 2" in store.inspect_store(url)


def test_on_object_storage_too_and_the_shard_cache_never_serves_a_retired_or_redone_pair(s3, tmp_path):
    url, so = s3.url("out.zarr"), s3.storage_options
    cache = str(tmp_path / "cache")
    pairs, results, before, readers = grown_store(url, so)
    check_old_pairs_untouched(url, so, before, readers, results)
    head = VolumePairs(url, split=None, storage_options=so, cache_dir=cache)
    for k in range(len(head)):
        head[k]
    folders = sorted(os.listdir(next(os.scandir(cache)).path))
    assert len(folders) == 6 and not [f for f in folders if f.startswith(pairs[1].pair_id)]
    # version 1 holds the retired pair: its copies live apart, under its own digest
    old = VolumePairs(url, split=None, storage_options=so, cache_dir=cache, version=1)
    assert old[1][0].tobytes() == results[1].mr.tobytes()
    # a pair written again with other bytes (a damaged pair recomputed) gets other copies, never the old ones
    other = make_result(pairs[2], small_template().shape_zyx, seed=9)
    store.write_pair(url, 2, other, storage_options=so)
    store.finalize_store(url, so)
    again = VolumePairs(url, split=None, storage_options=so, cache_dir=cache)
    assert again[1][0].tobytes() == other.mr.tobytes()
    with pytest.raises(VersionUnavailable, match="bytes of 1 of its pairs changed"):
        VolumePairs(url, split=None, storage_options=so, version=2)


# --------------------------------------------------------------------------------------------- withdrawal
def test_forget_leaves_no_byte_of_the_patient_and_no_version_that_held_it(tmp_path):
    """Every object of the store and its report is searched for the withdrawn pairs' compressed chunks (each chunk
    no other pair has), the checksums their markers held, and their figures."""
    from mrict_dask.orchestrate import RunSummary
    from mrict_dask.plan import Plan
    from mrict_dask.report import write_report

    url, report, work = str(tmp_path / "out.zarr"), str(tmp_path / "out.zarr-report"), str(tmp_path / "work")
    pairs, results, _, _ = grown_store(url)
    t = small_template()
    nz = t.shape_zyx[0]
    figures = {p.pair_id: f"\x89PNG figure of {p.pair_id} ".encode() * 20 for p in pairs}
    for p in pairs:
        os.makedirs(os.path.join(report, "figures"), exist_ok=True)
        with open(os.path.join(report, "figures", f"{p.pair_id}.png"), "wb") as fh:
            fh.write(figures[p.pair_id])
    summary = RunSummary(output_url=url, report_url=report, n_pairs=len(pairs))
    plan = Plan(pairs=pairs, series=[{"patient": p.patient, "decision": "chosen", "reason": "best"} for p in pairs])
    write_report(report, plan, pairs, store.completed_pairs(url), summary, Config(), t)

    gone = [p for p in pairs if p.patient == pairs[0].patient]  # pairs 0 and 1 (retired), and 6
    assert [p.index for p in gone] == [0, 1, 6]
    secrets: list[bytes] = []
    others = b"".join(open(os.path.join(url, k), "rb").read() for p in pairs if p not in gone
                      for k in pair_object_keys(url, p.index))
    for p in gone:
        for k in pair_object_keys(url, p.index):
            blob = open(os.path.join(url, k), "rb").read()
            if k.endswith(".json"):
                secrets += [v.encode() for v in json.loads(blob).get("checksum", {}).values() if len(v) == 64]
            elif k.split("/")[0] in store.VOLUME_VARS:
                secrets += [c for c in shard_chunks(blob, nz) if len(c) >= 32 and c not in others]
            elif blob not in others:  # slice_ok, the figure: a few bytes another pair may share
                secrets.append(blob)
        secrets.append(figures[p.pair_id])
    assert len(secrets) > 3 * 3 * nz  # most chunks of 3 pairs x 3 volumes are the pair's own
    assert store.resolve_version(url, 2).id == 2

    everything = b"".join(open(os.path.join(d, f), "rb").read() for root in (url, report)
                          for d, _, files in os.walk(root) for f in files)
    assert all(s in everything for s in secrets)  # the search finds them before
    summary = forget(url, [pairs[0].patient], work_url=work)
    assert sorted(summary.pairs) == sorted(p.pair_id for p in gone) and summary.version == 3
    assert summary.versions_redacted == 2

    everything = b"".join(open(os.path.join(d, f), "rb").read() for root in (url, report)
                          for d, _, files in os.walk(root) for f in files)
    found = [s[:16] for s in secrets if s in everything]
    assert not found, f"{len(found)} withdrawn byte strings are still stored"
    assert store.verify_store(url).ok
    import xarray as xr

    ds = xr.open_zarr(url)
    assert ds["status"].values.tolist() == ["withdrawn", "withdrawn", "ok", "ok", "ok", "ok", "withdrawn"]
    assert np.isnan(ds["brain_dice"].values[[0, 1, 6]]).all() and (ds["days_apart"].values[[0, 1, 6]] == 0).all()
    assert (ds["inputs"].values[[0, 1, 6]] == "").all() and (ds["inputs"].values[[2, 3, 4, 5]] != "").all()
    assert np.isnan(ds["mr_affine"].values[0]).all()
    rep = json.load(open(os.path.join(report, "report.json")))
    assert [r["status"] for r in rep["pairs"]][:2] == ["withdrawn", "withdrawn"]
    assert not [s for s in rep["series_decisions"] if s["patient"] == pairs[0].patient]
    # versions that held the patient cannot be served; the loader says so in one line
    for v in (1, 2):
        with pytest.raises(VersionUnavailable) as err:
            SlicePairs(url, split=None, version=v)
        assert "\n" not in str(err.value) and "withdrew" in str(err.value) and pairs[0].patient in str(err.value)
    assert SlicePairs(url, split=None).pair_indices.tolist() == [2, 3, 4, 5]
    # the withdrawal list keeps the patient out of later runs
    listed = json.load(open(os.path.join(work, "withdrawn.json")))["patients"]
    assert [e["patient"] for e in listed] == [pairs[0].patient]
    assert forget(url, [pairs[0].patient], work_url=work).version is None  # again: nothing left to do


# --------------------------------------------------------------------------------------------- reconcile
def _spec(i: int, patient: str, base: str, inputs: str, split: str = "train") -> PairSpec:
    return PairSpec(index=i, pair_id=f"{patient}-{base}", patient=patient, split=split, days_apart=0,
                    mr_files=(), ct_files=(), inputs=inputs)


def test_reconcile_keeps_appends_and_retires():
    a, b, c, d = (f"P{k:016x}" for k in range(4))
    stored = [StorePair(0, f"{a}-0000000a", a, "val", "in-a", "ok"),
              StorePair(1, f"{b}-0000000b", b, "train", "in-b", "ok"),
              StorePair(2, f"{c}-0000000c", c, "test", "in-c", "ok"),
              StorePair(3, f"{d}-0000000d", d, "train", "in-d", "failed: MR: no brain")]
    planned = [_spec(0, a, "0000000a", "in-a", "train"),   # kept (and keeps the split the store gave it)
               _spec(1, b, "0000000b", "in-b2"),           # the same series re-sent with other instances
               _spec(2, c, "000000c2", "in-c2"),           # a better series now selected
               _spec(3, d, "0000000d", "in-d"),            # kept: computed again by the run, at its index
               _spec(4, "P" + "e" * 16, "0000000e", "in-e")]  # a new patient
    rec = reconcile(stored, planned, KEY, {a, b, c, d, "P" + "e" * 16})
    assert [(p.index, p.pair_id) for p in rec.pairs][:2] == [(0, f"{a}-0000000a"), (3, f"{d}-0000000d")]
    assert rec.pairs[0].split == "val"
    new = {p.patient: p for p in rec.new}
    assert [p.index for p in rec.new] == [4, 5, 6]
    assert new[b].pair_id != f"{b}-0000000b" and new[b].pair_id.startswith(b + "-") and len(new[b].pair_id) == 26
    assert new[c].pair_id == f"{c}-000000c2" and new[b].split == "train" and new[c].split == "test"
    assert rec.retire[1][0].startswith("inputs changed") and rec.retire[1][1] == [new[b].pair_id]
    assert rec.retire[2][0].startswith("replaced") and rec.retire[2][1] == [new[c].pair_id]
    assert sorted(rec.changed) == sorted([new[b].pair_id, new[c].pair_id]) and rec.added == ["P" + "e" * 16
                                                                                             + "-0000000e"]
    # the same reconcile again, once the store holds the new pairs: nothing to do
    again = [StorePair(p.index, p.pair_id, p.patient, p.split, p.inputs, "ok") for p in rec.pairs] + \
        [dataclasses.replace(stored[i], state="retired") for i in (1, 2)]
    rec2 = reconcile(sorted(again, key=lambda s: s.index), planned, KEY, {a, b, c, d, "P" + "e" * 16})
    assert not rec2.new and not rec2.retire and [p.index for p in rec2.pairs] == [0, 3, 4, 5, 6]
    # a patient no longer in the input keeps its pairs; a trial run (limit) retires nothing
    rec3 = reconcile(stored, planned[:1], KEY, {a})
    assert not rec3.retire and rec3.absent == [1, 2, 3]
    assert not reconcile(stored, planned, KEY, {a, b, c, d}, limit=1).retire
    # a store from before inputs were recorded: the same pair id is the same pair
    legacy = [dataclasses.replace(s, inputs="") for s in stored]
    assert not reconcile(legacy, planned[:1], KEY, {a}).new


def test_a_run_with_another_pseudonym_key_is_refused(tmp_path):
    url = str(tmp_path / "out.zarr")
    pairs = make_pairs(2)
    store.open_or_create_store(url, pairs, small_template(), SMALL_NATIVE, attrs={"pseudonym_check": key_check(KEY)})
    check_key(Location(url), KEY, [])
    with pytest.raises(StoreMismatchError, match="another pseudonym key"):
        check_key(Location(url), b"other", [])


# --------------------------------------------------------------------------------------------- lease
_HOLDER = """
import sys, time
from mrict_dask import lease
held = lease.acquire(sys.argv[1], ttl=float(sys.argv[2]))
held.start_renewing()
print("held", flush=True)
for _ in range(200):
    time.sleep(0.1)
    if held.lost:
        sys.exit(3)
"""


def _holder(url: str, ttl: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, url, str(ttl)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_one_writer_at_a_time_and_a_lease_that_stopped_being_renewed_expires(tmp_path):
    from mrict_dask import lease

    url = str(tmp_path / "out.zarr")
    first = lease.acquire(url, ttl=30)
    with pytest.raises(LeaseHeld) as err:
        lease.acquire(url, ttl=30)
    msg = str(err.value)
    assert "\n" not in msg and f"pid {os.getpid()}" in msg and first.owner["started"] in msg
    first.release()
    lease.acquire(url, ttl=30).release()  # a released lease is taken at once

    # a holder that stalls (stopped, alive) past its lease: the next writer takes over after the expiry, and the
    # stalled one notices as soon as it runs again
    proc = _holder(url, 2.0)
    try:
        with pytest.raises(LeaseHeld):
            lease.acquire(url, ttl=30)
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(2.5)
        taken = lease.acquire(url, ttl=30)
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.wait(30) == 3
    finally:
        proc.kill()
    taken.release()

    # a holder killed outright on this host: its lease is taken at once
    proc = _holder(url, 60.0)
    proc.kill()
    proc.wait()
    lease.acquire(url, ttl=30).release()


def test_the_lease_is_a_conditional_create_on_object_storage(s3):
    from mrict_dask import lease

    url, so = s3.url("out.zarr"), s3.storage_options
    probe = Location(s3.url("probe.json"), so)
    assert lease.create_exclusive(probe, b"first") and not lease.create_exclusive(probe, b"second")
    assert probe.read_bytes() == b"first"
    held = lease.acquire(url, ttl=30, storage_options=so)
    with pytest.raises(LeaseHeld, match="being written by another run"):
        lease.acquire(url, ttl=30, storage_options=so)
    held.release()
    lease.acquire(url, ttl=30, storage_options=so).release()


# --------------------------------------------------------------------------------------------- catalog
def test_a_rerun_scans_only_new_and_changed_files_and_gets_the_full_scan_catalog(tmp_path):
    import pandas as pd

    from mrict_dask.catalog import catalog_frame, read_catalog_table
    from mrict_dask.scan import scan, update_catalog
    from mrict_dask.sources import open_source

    from .test_fuzz import _synthetic_files

    files = _synthetic_files()
    names = sorted(files)
    folder, work = tmp_path / "in", Location(str(tmp_path / "work"))
    folder.mkdir()
    for name in names[:8]:
        (folder / name).write_bytes(files[name])

    def catalog() -> pd.DataFrame:
        return catalog_frame(read_catalog_table(work.join("catalog.parquet")))

    first = update_catalog(open_source(str(folder)), work)
    assert first.scanned == first.units == 8
    assert update_catalog(open_source(str(folder)), work).scanned == 0  # nothing changed: nothing read
    for name in names[8:]:
        (folder / name).write_bytes(files[name])
    (folder / names[0]).write_bytes(files[names[1]])  # a file written again (other content)
    os.remove(folder / names[2])
    update = update_catalog(open_source(str(folder)), work)
    assert (update.new, update.changed, update.removed) == (len(names) - 8, 1, 1)
    assert update.scanned == len(names) - 8 + 1
    pd.testing.assert_frame_equal(catalog(), scan(str(folder)), check_like=True)


@pytest.mark.slow
def test_a_rerun_over_a_pacs_reads_only_series_sent_again_or_new(small_orthanc, pacs_credentials, one_patient,
                                                                  tmp_path):
    """DICOMweb: a series' stamp is its list of instances (QIDO-RS). A series sent again with other instances is
    read again, a deleted one leaves the catalog, the rest is not read; the catalog equals a full scan."""
    import glob

    import pandas as pd
    import pydicom

    from mrict_dask.catalog import catalog_frame, read_catalog_table
    from mrict_dask.scan import scan, update_catalog
    from mrict_dask.sources import open_source

    from .test_growth_run import send_again

    source, work = open_source(small_orthanc.dicomweb_url), Location(str(tmp_path / "work"))
    first = update_catalog(source, work)
    assert first.scanned == first.units > 3 and update_catalog(source, work).scanned == 0
    series = {}
    for path in glob.glob(os.path.join(one_patient[0], "**", "*"), recursive=True):
        if os.path.isfile(path):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            series.setdefault((ds.Modality, ds.SeriesInstanceUID), []).append(path)
    ct = max((k for k in series if k[0] == "CT"), key=lambda k: len(series[k]))
    again = tmp_path / "again"
    again.mkdir()
    for path in series[ct]:
        (again / os.path.basename(path)).write_bytes(open(path, "rb").read())
    send_again(str(again), seed=5)
    small_orthanc.upload(sorted(str(p) for p in again.iterdir()))
    smallest = min((k for k in series if k != ct), key=lambda k: len(series[k]))
    small_orthanc.delete(smallest[1])
    update = update_catalog(source, work)
    assert (update.new, update.changed, update.removed, update.scanned) == (0, 1, 1, 1)
    got = catalog_frame(read_catalog_table(work.join("catalog.parquet")))
    pd.testing.assert_frame_equal(got, scan(source), check_like=True)
