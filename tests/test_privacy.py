"""Privacy: no planted identifier and no credential reaches anything written outside the private work area.

The generator plants unique marker strings (names, IDs, birth dates, accession numbers, institution,
referring physician, study dates, UIDs) and records them in its manifest; the TCIA layout also puts the
PatientID in every file path, so a logged URL is a leak too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
import xarray as xr

from .conftest import fast_config_file, upload_tree

pytestmark = pytest.mark.slow

ACCESS_KEY = "AKIAMRICTPRIVACY0001"
SECRET_KEY = "mrict-privacy-secret-Zq8x"


def _markers(manifest: dict) -> list[str]:
    out = set(manifest["phi_strings"])
    for p in manifest["patients"]:
        out.add(p["patient_id"])
        for st in p["studies"]:
            out.add(st["study_uid"])
            out.add(st["study_date"])
            for se in st["series"]:
                out.add(se["series_uid"])
    return sorted(m for m in out if m and len(m) >= 6)


def _png_text(data: bytes) -> bytes:
    """Every tEXt/zTXt/iTXt payload of a PNG (the figures' embedded text)."""
    out, i = b"", 8
    while i + 8 <= len(data):
        n = int.from_bytes(data[i:i + 4], "big")
        kind = data[i + 4:i + 8]
        body = data[i + 8:i + 8 + n]
        if kind == b"tEXt" or kind == b"iTXt":
            out += body
        elif kind == b"zTXt":
            out += zlib.decompress(body.split(b"\0", 1)[1][1:])
        i += 12 + n
    return out


def _store_blobs(fs, root: str) -> list[tuple[str, bytes]]:
    return [(p, fs.cat_file(p)) for p in fs.find(root)]


def _assert_nothing_leaks(manifest: dict, logs: list[bytes], written: list[tuple[str, bytes]], ds,
                          secrets: tuple[str, ...]) -> None:
    """No planted identifier and no secret in the logs, the store's strings and attrs, or any file written."""
    assert any(p.endswith(".png") for p, _ in written), "the report should hold QA figures"
    strings = "\n".join(str(v) for name in ("patient", "split", "status") for v in np.ravel(ds[name].values))
    attrs = json.dumps(ds.attrs, default=str)
    haystacks = [("log", b"\n".join(logs)), ("store strings", strings.encode()), ("attrs", attrs.encode())]
    haystacks += [(p, blob) for p, blob in written]
    haystacks += [(p + " (png text)", _png_text(blob)) for p, blob in written if p.endswith(".png")]

    markers = _markers(manifest)
    assert len(markers) >= 20
    leaks = [(m, where) for m in markers for where, blob in haystacks if m.encode() in blob]
    assert not leaks, leaks[:10]
    for secret in secrets:
        assert not [where for where, blob in haystacks if secret.encode() in blob], secret


def test_no_identifier_or_credential_leaves_the_work_area(corpus, s3, tmp_path):
    src = upload_tree(corpus.url, s3, "in/dicom")
    out = s3.url("out", "store.zarr")
    work = s3.url("private", "work")
    so = dict(s3.storage_options, key=ACCESS_KEY, secret=SECRET_KEY)
    logs = []
    env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    # at -vv every log line any lower level (-v, default, -q) would print is printed too, besides the summary;
    # the first run computes everything, the second resumes over the same store (the resume path's lines)
    config = fast_config_file(tmp_path / "fast.yaml")
    for verbosity in ["-vv", "-vv"]:
        args = [sys.executable, "-m", "mrict_dask.cli"] + ([verbosity] if verbosity else []) + [
            "run", src, out, "--work", work, "--storage-options", json.dumps(so), "--config", config,
            "--workers", "2", "--pseudonym-key", "privacy-test-key"]
        proc = subprocess.run(args, capture_output=True, env=env, timeout=900)
        logs.append(proc.stdout + proc.stderr)
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]

    fs = s3.fs()
    written = _store_blobs(fs, out) + _store_blobs(fs, out + "-report")
    ds = xr.open_zarr(out, storage_options=so)
    _assert_nothing_leaks(corpus.manifest, logs, written, ds, secrets=(ACCESS_KEY, SECRET_KEY))

    # the pseudonyms follow the contract and the private mapping lives in the work area only
    from mrict_dask.pseudonym import pseudonym

    ids = {p["patient_id"] for p in corpus.manifest["patients"]}
    expected = {pseudonym(b"privacy-test-key", pid) for pid in ids}
    assert set(ds["patient"].values) <= expected
    assert fs.exists(work + "/plan.json")
    _no_face_in_front_renders(corpus.manifest, xr.open_zarr(out, group="native", storage_options=so), so, work)


def _no_face_in_front_renders(manifest: dict, native, so: dict, work: str) -> None:
    """Seen from the front (rays along +y in each MR's own frame), every stored head shows no tissue where its
    nose tip, upper lip and chin were: along each landmark's ray the first tissue (MR or CT above background) lies
    at least 5 mm behind the landmark, and the face mask holds the landmark."""
    from mrict_dask.io import Location
    from mrict_dask.plan import Plan

    from .truth import series_by_uid

    plan = Plan.from_json(Location(work, so).join("plan.json").read_text())
    truth = series_by_uid(manifest)
    checked = 0
    for p in plan.pairs:
        if str(native["status"].values[p.index]) != "ok":
            continue
        a = native["affine"].values[p.index]
        inv = np.linalg.inv(a)
        mr, ct, face = (native[v].values[p.index] for v in ("mr", "ct", "face"))
        tissue = (mr > 0.05) | (ct > 0.2)  # 0.2 of the CT window: above -200 HU
        step = float(np.linalg.norm(a[:3, 1]))
        for name in ("nose_tip", "upper_lip", "chin"):
            x, y, z = np.round(inv[:3, :3] @ np.asarray(truth[p.mr_series_uid]["landmarks"][name]) + inv[:3, 3])
            x, y, z = int(x), int(y), int(z)
            if not (0 <= z < mr.shape[0] and 0 <= y < mr.shape[1] and 0 <= x < mr.shape[2]):
                continue  # beyond the native box
            assert face[z, y, x], (p.index, name)
            ray = tissue[z, :, x]  # from the front (y = 0 is the most anterior row of the box)
            first = int(np.argmax(ray)) if ray.any() else mr.shape[1]
            assert (first - y) * step >= 5.0, (p.index, name, first, y)
            checked += 1
    assert checked >= len(plan.pairs), checked  # at least the nose of every pair


def _local_blobs(root: str) -> list[tuple[str, bytes]]:
    out = []
    for folder, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(folder, f), "rb") as fh:
                out.append((os.path.join(folder, f), fh.read()))
    return out


def test_dicomweb_input_leaks_no_identifier_and_the_password_nowhere(corpus, orthanc, tmp_path):
    """A PACS input: identifiers stay in the work area; the password is nowhere, the work area included."""
    from .conftest import PACS_PASSWORD, PACS_USER

    out, work = str(tmp_path / "store.zarr"), str(tmp_path / "private-work")
    env = dict(os.environ, MRICT_DICOMWEB_USER=PACS_USER, MRICT_DICOMWEB_PASSWORD=PACS_PASSWORD)
    config = fast_config_file(tmp_path / "fast.yaml")
    logs = []
    for _ in range(2):  # computed, then resumed over the same store, both at -vv
        args = [sys.executable, "-m", "mrict_dask.cli", "-vv", "run", orthanc.dicomweb_url, out, "--work", work,
                "--config", config, "--workers", "2", "--pseudonym-key", "privacy-test-key"]
        proc = subprocess.run(args, capture_output=True, env=env, timeout=900)
        logs.append(proc.stdout + proc.stderr)
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    written = _local_blobs(out) + _local_blobs(out + "-report")
    _assert_nothing_leaks(corpus.manifest, logs, written, xr.open_zarr(out), secrets=(PACS_PASSWORD,))
    private = _local_blobs(work)
    assert {os.path.basename(p) for p, _ in private} >= {"catalog.parquet", "plan.json"}
    assert not [p for p, blob in private if PACS_PASSWORD.encode() in blob]
