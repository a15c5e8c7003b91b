"""`mrict-dask to-dicom`: a synthetic CT as a DICOM CT series in the MR's study and frame of reference.

Checked with the tools a clinic's software stands on: dciodvfy (the IOD is valid), dcm2niix and SimpleITK's GDCM
series reader (the series reads back onto the synthetic CT's grid within 0.1 mm and to the HU), and pydicom against
the generator's manifest (the study, frame of reference and patient of the MR series the plan chose). Two grids: pair
0's native grid as the pipeline wrote it, pair 1 moved onto an oblique, left-handed grid (tests/native_contract.py).
The pipeline's own native CTs go through export and to-dicom and come back with the stored HU.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from mrict_dask.cli import main
from mrict_dask.plan import Plan

from .test_cases import Store, _one_error


def _cli(*args):
    return CliRunner().invoke(main, ["-q", *[str(a) for a in args]])


@pytest.fixture(scope="module")
def native_cases(oblique_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("native_cases") / "cases"
    result = _cli("export", oblique_store, out)
    assert result.exit_code == 0, result.output
    return out


def _corners(img) -> np.ndarray:
    """The physical points of the grid's 8 corner voxels, in a fixed order whatever the axes' order or signs."""
    pts = [img.TransformIndexToPhysicalPoint([int(v) for v in ijk])
           for ijk in itertools.product(*[[0, n - 1] for n in img.GetSize()])]
    return np.array(sorted(pts))


def _check_read_back(img, sct, what: str) -> None:
    """``img`` (a reader's volume) lies on ``sct``'s grid within 0.1 mm and holds its HU within 1."""
    assert sorted(img.GetSize()) == sorted(sct.GetSize()), what
    assert np.abs(_corners(img) - _corners(sct)).max() < 0.1, what
    on_grid = sitk.Resample(sitk.Cast(img, sitk.sitkFloat32), sct, sitk.Transform(), sitk.sitkNearestNeighbor, -9999)
    diff = np.abs(sitk.GetArrayFromImage(on_grid) - sitk.GetArrayFromImage(sct))
    assert diff.max() <= 1.0, (what, diff.max())


def _mr_truth(corpus, store: str, pair_id: str) -> tuple[dict, dict]:
    """The manifest's expected pair and MR study for the pair the plan made (by the MR series it chose)."""
    plan = Plan.from_json(open(store + ".work/plan.json").read())
    mr_series = next(p.mr_series_uid for p in plan.pairs if p.pair_id == pair_id)
    expected = next(e for e in corpus.manifest["expected_pairs"] if e["mr_series_uid"] == mr_series)
    study = next(st for pt in corpus.manifest["patients"] for st in pt["studies"]
                 if st["study_uid"] == expected["mr_study_uid"])
    return expected, study


@pytest.mark.parametrize("index", [0, 1])
def test_to_dicom_is_a_valid_ct_series_on_the_mrs_frame_that_reads_back_onto_its_grid(oblique_store, native_cases,
                                                                                       corpus, tmp_path, index):
    pid = Store(oblique_store).ids[index]
    ct = sitk.ReadImage(str(native_cases / pid / "ct.nii.gz"))
    # a prediction with fractional HU and values down to -1024, beside the exported CT
    arr = sitk.GetArrayFromImage(ct).astype(np.float32) + np.float32(0.3)
    arr[:, :, :5] = -1024.0
    sct = sitk.GetImageFromArray(arr)
    sct.CopyInformation(ct)
    sct_path = str(native_cases / pid / "sct.nii.gz")
    sitk.WriteImage(sct, sct_path)
    out = tmp_path / "dicom"
    result = _cli("to-dicom", sct_path, "--pair", pid, "--store", oblique_store, "--out", out)
    assert result.exit_code == 0, result.output
    assert "holds the patient's identity" in result.stdout
    files = sorted(os.listdir(out))
    assert len(files) == sct.GetSize()[2]

    for f in (files[0], files[len(files) // 2], files[-1]):
        check = subprocess.run(["dciodvfy", str(out / f)], capture_output=True, text=True, timeout=60)
        assert "CTImage" in check.stderr + check.stdout
        assert not [ln for ln in (check.stderr + check.stdout).splitlines() if ln.startswith("Error")], check.stderr

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(out)))
    _check_read_back(reader.Execute(), sct, "SimpleITK (GDCM)")
    nifti = tmp_path / "dcm2niix"
    nifti.mkdir()
    conv = subprocess.run([shutil.which("dcm2niix") or "dcm2niix", "-z", "n", "-f", "sct", "-o", str(nifti), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert conv.returncode == 0, conv.stdout + conv.stderr
    _check_read_back(sitk.ReadImage(str(nifti / "sct.nii")), sct, "dcm2niix")

    expected, study = _mr_truth(corpus, oblique_store, pid)
    headers = [pydicom.dcmread(out / f, stop_before_pixels=True) for f in files]
    first = headers[0]
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and first.Modality == "CT"
    assert first.StudyInstanceUID == expected["mr_study_uid"]
    assert first.FrameOfReferenceUID == study["frame_of_reference_uid"]
    assert first.PatientID == expected["patient_id"]
    assert list(first.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"] and "SYNTHETIC" in first.SeriesDescription
    assert (first.RescaleSlope, first.RescaleIntercept) == (1, -1024)
    known_uids = set(corpus.manifest["phi"]["uids"])
    assert first.SeriesInstanceUID not in known_uids
    assert len({h.SOPInstanceUID for h in headers}) == len(headers)
    assert {h.SeriesInstanceUID for h in headers} == {first.SeriesInstanceUID}
    assert {h.StudyInstanceUID for h in headers} == {expected["mr_study_uid"]}


def test_to_dicom_refuses_what_is_not_the_patients_geometry(oblique_store, native_cases, old_store, tmp_path):
    a, b = Store(oblique_store).ids
    old_url, old_ids = old_store  # template space only
    template_only = _cli("to-dicom", native_cases / a / "ct.nii.gz", "--pair", old_ids[0], "--store", old_url,
                         "--out", tmp_path / "x")
    assert template_only.exit_code == 2
    _one_error(template_only, "no native space")
    other_grid = _cli("to-dicom", native_cases / a / "ct.nii.gz", "--pair", b, "--store", oblique_store,
                      "--out", tmp_path / "y")
    assert other_grid.exit_code == 2
    _one_error(other_grid, f"not on pair {b}'s native grid")
    unknown = _cli("to-dicom", native_cases / a / "ct.nii.gz", "--pair", "Pnot-a-pair", "--store", oblique_store,
                   "--out", tmp_path / "z")
    assert unknown.exit_code == 2
    _one_error(unknown, "Pnot-a-pair")
    assert not any(os.path.exists(tmp_path / d) for d in "xyz")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "CT0001.dcm").write_bytes(b"a series written before")
    not_empty = _cli("to-dicom", native_cases / a / "ct.nii.gz", "--pair", a, "--store", oblique_store,
                     "--out", tmp_path / "used")
    assert not_empty.exit_code == 2
    _one_error(not_empty, "not empty")


def test_round_trip_of_the_real_cts_native_volume(pipeline_store, tmp_path):
    """The pipeline's own native space: each pair's CT exported, written as DICOM, read back gives the stored HU."""
    st = Store(pipeline_store)
    assert _cli("export", pipeline_store, tmp_path / "cases").exit_code == 0  # native space: the default
    for i, pid in enumerate(st.ids):
        out = tmp_path / "dicom" / pid
        result = _cli("to-dicom", tmp_path / "cases" / pid / "ct.nii.gz", "--pair", pid, "--store", pipeline_store,
                      "--out", out)
        assert result.exit_code == 0, result.output
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(out)))
        series = reader.Execute()
        ct = sitk.ReadImage(str(tmp_path / "cases" / pid / "ct.nii.gz"))
        _check_read_back(series, ct, pid)
        on_grid = sitk.Resample(series, ct, sitk.Transform(), sitk.sitkNearestNeighbor, -9999)
        hu = st.hu(i, "native/")
        assert hu.min() >= -1024  # what the stored CT holds, RescaleIntercept -1024 keeps
        np.testing.assert_array_equal(sitk.GetArrayFromImage(on_grid), hu)
