"""Volume assembly: geometry and voxels against what was written (hand-made series, pydicom's files, the
synthetic corpus's manifest) and against dcm2niix; every refusal has its reason."""

from __future__ import annotations

import glob
import os
import random
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mrict_dask.config import PlanConfig
from mrict_dask.errors import VolumeError
from mrict_dask.export import export_series_command
from mrict_dask.geometry import stack_geometry
from mrict_dask.stacks import stacks_from_catalog
from mrict_dask.volume import CT_FILL, read_volume

PYDICOM_FILES = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")
DICOMDIR_TESTS = os.path.join(PYDICOM_FILES, "dicomdirtests")
SOP = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}


# --------------------------------------------------------------------------------------------- helpers
def _ds_str(x: float) -> str:
    return f"{x:.6f}"[:16]


def _rounded(v) -> np.ndarray:
    return np.array([float(_ds_str(x)) for x in np.ravel(v)])


@dataclass
class Written:
    files: list[str]  # in true spatial order (ascending along the normal)
    truth: np.ndarray  # (z, y, x) float32 values after rescale, in that order
    origin: np.ndarray
    direction: np.ndarray  # 3x3, columns = axes
    spacing: tuple[float, float, float]
    series_uid: str


def write_slice(path: str, *, pixels: np.ndarray, ipp, iop, pixel_spacing=(0.9, 0.8), modality="MR",
                series_uid: str, study_uid: str, instance: int, desc="AX T1 POST", number=5,
                image_type=r"ORIGINAL\PRIMARY\AXIAL", slope=1.0, intercept=0.0, sop_uid=None, syntax=None,
                extra: dict | None = None) -> str:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP[modality]
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SOP[modality]
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = "HANDMADE-01"
    ds.PatientName = "Hand^Made"
    ds.StudyDate = "20200101"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesNumber = number
    ds.SeriesDescription = desc
    ds.InstanceNumber = instance
    ds.ImageType = image_type.split("\\")
    ds.ImagePositionPatient = [_ds_str(x) for x in ipp]
    ds.ImageOrientationPatient = [_ds_str(x) for x in iop]
    ds.PixelSpacing = [_ds_str(x) for x in pixel_spacing]
    ds.SliceThickness = "2.0"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    if modality == "CT" or slope != 1.0 or intercept != 0.0:
        ds.RescaleSlope = _ds_str(slope)
        ds.RescaleIntercept = _ds_str(intercept)
    for k, v in (extra or {}).items():
        setattr(ds, k, v)
    ds.PixelData = pixels.astype("<i2").tobytes()
    if syntax is not None:
        ds.compress(syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder, *, n=6, rows=12, cols=14, pixel_spacing=(0.9, 0.8), step=2.5,
                 iop=(1, 0, 0, 0, 1, 0), origin=(-10.0, -20.0, 30.0), modality="MR", seed=0,
                 slope=1.0, intercept=0.0, series_uid=None, steps=None, shear=(0.0, 0.0), **kw) -> Written:
    """A series as a scanner writes it: shuffled odd file names, instance numbers not in spatial order."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    iop = _rounded(iop)
    r, c = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    nrm = np.cross(r, c)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    t = np.concatenate([[0.0], np.cumsum(steps)]) if steps is not None else np.arange(n) * step
    ipps = [_rounded(np.asarray(origin) + tk * nrm + tk * (shear[0] * r + shear[1] * c)) for tk in t]
    stored = rng.integers(-200, 1500, size=(len(t), rows, cols)).astype(np.int16)
    names = [f"x{rng.integers(1e9):09d}" for _ in t]
    instances = rng.permutation(len(t)) + 1
    files = []
    for k in range(len(t)):
        files.append(write_slice(os.path.join(folder, names[k]), pixels=stored[k], ipp=ipps[k], iop=iop,
                                 pixel_spacing=pixel_spacing, modality=modality, series_uid=series_uid,
                                 study_uid=study_uid, instance=int(instances[k]), slope=slope, intercept=intercept,
                                 **kw))
    truth = stored.astype(np.float32) * np.float32(float(_ds_str(slope))) + np.float32(float(_ds_str(intercept)))
    direction = np.stack([r, c, nrm], axis=1)
    ps = _rounded(pixel_spacing)
    return Written(files=files, truth=truth, origin=ipps[0], direction=direction,
                   spacing=(ps[1], ps[0], float(t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else 0.0),
                   series_uid=series_uid)


def header_catalog(paths) -> pd.DataFrame:
    """A minimal catalog (the scan's columns that the volume and plan code read), straight from pydicom headers."""
    rows = []
    for p in paths:
        row = {"url": p, "read_error": ""}
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception as exc:
            row["read_error"] = f"not DICOM: {type(exc).__name__}"
            rows.append(row)
            continue

        def num(k, ds=ds):
            v = ds.get(k)
            try:
                return float(v) if v not in (None, "") else None
            except (TypeError, ValueError):
                return None

        def lst(k, ds=ds):
            v = ds.get(k)
            return [float(x) for x in v] if v is not None else None

        frame_positions = None
        if "PerFrameFunctionalGroupsSequence" in ds:
            frame_positions = [[float(x) for x in f.PlanePositionSequence[0].ImagePositionPatient]
                               for f in ds.PerFrameFunctionalGroupsSequence]
            sh = ds.SharedFunctionalGroupsSequence[0]
            iop = [float(x) for x in sh.PlaneOrientationSequence[0].ImageOrientationPatient]
            ps = [float(x) for x in sh.PixelMeasuresSequence[0].PixelSpacing]
        else:
            iop, ps = lst("ImageOrientationPatient"), lst("PixelSpacing")
        it = ds.get("ImageType")
        row.update({
            "is_dicomdir": "DirectoryRecordSequence" in ds,
            "sop_class_uid": str(ds.get("SOPClassUID", "")), "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
            "series_uid": str(ds.get("SeriesInstanceUID", "")), "study_uid": str(ds.get("StudyInstanceUID", "")),
            "patient_id": str(ds.get("PatientID", "")), "modality": str(ds.get("Modality", "")),
            "study_date": str(ds.get("StudyDate", "")), "series_description": str(ds.get("SeriesDescription", "")),
            "series_number": num("SeriesNumber"),
            "image_type": "\\".join(it) if it is not None and not isinstance(it, str) else str(it or ""),
            "instance_number": num("InstanceNumber"), "image_position": lst("ImagePositionPatient"),
            "image_orientation": iop, "pixel_spacing": ps, "slice_thickness": num("SliceThickness"),
            "rows": num("Rows"), "columns": num("Columns"), "number_of_frames": num("NumberOfFrames"),
            "acquisition_number": num("AcquisitionNumber"), "echo_time": num("EchoTime"),
            "echo_numbers": str(ds.get("EchoNumbers", "")), "repetition_time": num("RepetitionTime"),
            "inversion_time": num("InversionTime"), "contrast_agent": str(ds.get("ContrastBolusAgent", "")),
            "convolution_kernel": str(ds.get("ConvolutionKernel", "")),
            "body_part": str(ds.get("BodyPartExamined", "")),
            "frame_positions": frame_positions,
        })
        rows.append(row)
    return pd.DataFrame(rows)


def assert_geometry(img: sitk.Image, w: Written, tol_mm: float = 0.01) -> None:
    assert img.GetSize() == (w.truth.shape[2], w.truth.shape[1], w.truth.shape[0])
    np.testing.assert_allclose(img.GetSpacing(), w.spacing, atol=tol_mm)
    np.testing.assert_allclose(img.GetOrigin(), w.origin, atol=tol_mm)
    np.testing.assert_allclose(np.reshape(img.GetDirection(), (3, 3)), w.direction, atol=1e-4)


def shuffled(files, seed=1):
    out = list(files)
    random.Random(seed).shuffle(out)
    return out


def rotation(ax_deg: float, ay_deg: float, az_deg: float) -> np.ndarray:
    ax, ay, az = np.radians([ax_deg, ay_deg, az_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


# --------------------------------------------------------------------------------------------- geometry core
def test_stack_geometry_sorts_along_normal_and_reports_spacing():
    pos = np.array([[0, 0, 5.0], [0, 0, 0.0], [0, 0, 2.5]])
    geom, order = stack_geometry(pos, (1, 0, 0, 0, 1, 0), (0.5, 0.7), 10, 20)
    assert list(order) == [1, 2, 0]
    assert geom.size == (20, 10, 3)
    assert geom.spacing == pytest.approx((0.7, 0.5, 2.5))
    assert geom.origin == (0.0, 0.0, 0.0)
    assert geom.tilt_deg == 0.0


# --------------------------------------------------------------------------------------------- hand-made series
def test_axial_series_in_shuffled_order(tmp_path):
    w = write_series(tmp_path / "s", n=7)
    img = read_volume(shuffled(w.files))
    assert_geometry(img, w)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), w.truth)
    assert img.GetPixelID() == sitk.sitkFloat32


def test_slices_written_in_reverse_order(tmp_path):
    # the first instance is the most superior slice: instance numbers run against the normal
    w = write_series(tmp_path / "s", n=5, origin=(0, 0, 40), step=-3.0)
    img = read_volume(w.files)
    order = np.argsort([float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in w.files])
    assert img.GetOrigin()[2] == pytest.approx(28.0)
    assert img.GetSpacing()[2] == pytest.approx(3.0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), w.truth[order])


def test_oblique_stack_matches_written_geometry_and_simpleitk(tmp_path):
    rot = rotation(14, -9, 23)
    iop = np.concatenate([rot[:, 0], rot[:, 1]])
    w = write_series(tmp_path / "s", n=6, iop=iop, origin=(12.3, -45.6, 7.8), step=1.7)
    img = read_volume(shuffled(w.files))
    assert_geometry(img, w)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), w.truth)
    # an independent reader (GDCM through SimpleITK) agrees on the geometry
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "s")))
    ref = reader.Execute()
    np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(img.GetDirection(), ref.GetDirection(), atol=1e-4)
    np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-3)


def test_rescale_to_hu_and_padding_is_air(tmp_path):
    w = write_series(tmp_path / "s", n=4, modality="CT", slope=1.0, intercept=-1024.0,
                     extra={"PixelPaddingValue": -2000, "ConvolutionKernel": "STANDARD"})
    # plant padding in the corners of every slice (outside the reconstruction circle)
    stored = []
    for f in w.files:
        ds = pydicom.dcmread(f)
        a = ds.pixel_array.copy()
        a[:3, :3] = -2000
        ds.PixelData = a.astype("<i2").tobytes()
        ds.save_as(f)
        stored.append(a)
    img = read_volume(w.files)
    vol = sitk.GetArrayFromImage(img)
    expect = np.stack(stored).astype(np.float32) - np.float32(1024)
    expect[:, :3, :3] = CT_FILL
    np.testing.assert_array_equal(vol, expect)


def test_non_unit_slope_in_float32(tmp_path):
    w = write_series(tmp_path / "s", n=3, modality="CT", slope=0.5, intercept=-1000.0)
    vol = sitk.GetArrayFromImage(read_volume(w.files))
    np.testing.assert_array_equal(vol, w.truth)
    assert vol.dtype == np.float32


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90"], ids=["rle", "j2k-lossless"])
def test_compressed_transfer_syntaxes(tmp_path, syntax):
    w = write_series(tmp_path / "s", n=4, rows=64, cols=48, syntax=syntax)
    assert pydicom.dcmread(w.files[0]).file_meta.TransferSyntaxUID == syntax
    img = read_volume(shuffled(w.files))
    assert_geometry(img, w)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), w.truth)


def test_pydicom_mr_small_in_every_syntax_decodes_to_the_same_volume(tmp_path):
    """pydicom's MR_small in 6 transfer syntaxes (RLE, JPEG 2000, JPEG-LS, big endian...), stacked into 3 slices."""
    variants = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                "MR_small_bigendian.dcm", "MR_small_implicit.dcm"]
    ref = pydicom.dcmread(os.path.join(PYDICOM_FILES, "MR_small.dcm")).pixel_array.astype(np.float32)
    for v in variants:
        ds0 = pydicom.dcmread(os.path.join(PYDICOM_FILES, v))
        series_uid = generate_uid()
        files = []
        z0 = float(ds0.ImagePositionPatient[2])
        for k in range(3):
            ds = pydicom.dcmread(os.path.join(PYDICOM_FILES, v))
            ds.SeriesInstanceUID = series_uid
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]  # the file says DERIVED, which we never stack
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.ImagePositionPatient = [ds0.ImagePositionPatient[0], ds0.ImagePositionPatient[1], z0 + 4 * k]
            path = str(tmp_path / f"{v}-{k}")
            ds.save_as(path)
            files.append(path)
        img = read_volume(files[::-1])
        vol = sitk.GetArrayFromImage(img)
        assert vol.shape == (3, 64, 64), v
        for k in range(3):
            np.testing.assert_array_equal(vol[k], ref, err_msg=v)


def test_gap_is_refused(tmp_path):
    w = write_series(tmp_path / "s", steps=[2.0, 2.0, 4.0, 2.0, 2.0], desc="AX T2", number=7)
    with pytest.raises(VolumeError, match=r"series #7: missing slice"):
        read_volume(w.files)


def test_uneven_spacing_is_refused(tmp_path):
    w = write_series(tmp_path / "s", steps=[2.0, 2.0, 2.0, 3.1, 3.1, 3.1])
    with pytest.raises(VolumeError, match="uneven slice spacing"):
        read_volume(w.files)


def test_small_jitter_within_tolerance_is_accepted(tmp_path):
    w = write_series(tmp_path / "s", steps=[2.0, 2.1, 1.9, 2.0])
    img = read_volume(w.files)
    assert img.GetSpacing()[2] == pytest.approx(2.0)


def test_single_slice_is_refused(tmp_path):
    w = write_series(tmp_path / "s", n=1)
    with pytest.raises(VolumeError, match="single slice"):
        read_volume(w.files)


def test_constant_image_is_refused(tmp_path):
    w = write_series(tmp_path / "s", n=3)
    for f in w.files:
        ds = pydicom.dcmread(f)
        ds.PixelData = np.full((ds.Rows, ds.Columns), 7, "<i2").tobytes()
        ds.save_as(f)
    with pytest.raises(VolumeError, match="constant image"):
        read_volume(w.files)


def test_truncated_pixel_data_is_refused(tmp_path):
    w = write_series(tmp_path / "s", n=4, desc="AX FLAIR", number=9)
    with open(w.files[2], "r+b") as fh:
        fh.truncate(os.path.getsize(w.files[2]) - 50)
    with pytest.raises(VolumeError, match=r"series #9: .*(truncated|unreadable)"):
        read_volume(w.files)
    with open(w.files[1], "r+b") as fh:
        fh.truncate(200)  # cut inside the header
    with pytest.raises(VolumeError, match=r"series #9: "):
        read_volume(w.files)


def test_reason_never_names_the_patient_or_the_files(tmp_path):
    folder = tmp_path / "HANDMADE-01" / "study"
    w = write_series(folder, steps=[2.0, 6.0])
    with pytest.raises(VolumeError) as err:
        read_volume(w.files)
    assert "HANDMADE" not in str(err.value) and "Hand" not in str(err.value)
    assert str(tmp_path) not in str(err.value)


def test_same_instance_twice_counts_once(tmp_path):
    w = write_series(tmp_path / "s", n=4)
    copy = str(tmp_path / "s" / "copy-of-one")
    shutil.copy(w.files[1], copy)
    vol = sitk.GetArrayFromImage(read_volume(w.files + [copy]))
    np.testing.assert_array_equal(vol, w.truth)


def test_duplicate_position_with_identical_content_is_dropped_different_content_refused(tmp_path):
    w = write_series(tmp_path / "s", n=4)
    ds = pydicom.dcmread(w.files[2])
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    same = str(tmp_path / "s" / "resent")
    ds.save_as(same)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_volume(w.files + [same])), w.truth)
    a = ds.pixel_array.copy()
    a[0, 0] += 1
    ds.PixelData = a.tobytes()
    ds.save_as(same)
    with pytest.raises(VolumeError, match="duplicate slice positions with different content"):
        read_volume(w.files + [same])


def test_mixed_orientations_refused_by_reader_and_split_by_catalog(tmp_path):
    uid = generate_uid()
    ax = write_series(tmp_path / "s", n=4, series_uid=uid, seed=1)
    rot = rotation(0, 90, 0)  # sagittal
    sag = write_series(tmp_path / "s", n=3, series_uid=uid, seed=2, iop=np.concatenate([rot[:, 0], rot[:, 1]]))
    with pytest.raises(VolumeError, match="mixed orientations"):
        read_volume(ax.files + sag.files)
    stacks = stacks_from_catalog(header_catalog(ax.files + sag.files), PlanConfig())
    assert len(stacks) == 2 and all(s.usable for s in stacks)
    by_n = {len(s.urls): s for s in stacks}
    assert list(by_n[4].urls) == ax.files and list(by_n[3].urls) == sag.files
    assert {s.key for s in stacks} == {uid + "#1", uid + "#2"}
    for st, w in ((by_n[4], ax), (by_n[3], sag)):
        img = read_volume(st.urls)
        assert_geometry(img, w)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), w.truth)


def _tilted_ct(tmp_path, tilt_deg: float, n=8, rows=40, cols=48, spacing=(0.8, 0.8), step=3.0):
    """CT slices of a known linear HU field, acquired with the gantry tilted about the x axis.

    The slice planes stay axial in the patient (normal +z) but successive slice origins move along y, as on a
    scanner that tilts the gantry: positions follow the tilted stacking direction.
    """
    a = np.tan(np.radians(tilt_deg))
    uid, study = generate_uid(), generate_uid()
    origin = np.array([-20.0, -15.0, 10.0])
    field = np.array([0.9, -0.6, 2.1])  # HU per mm: linear, so linear interpolation reproduces it exactly
    files = []
    for k in range(n):
        t = k * step
        ipp = _rounded(origin + [0, a * t, t])
        jj, ii = np.mgrid[0:rows, 0:cols]
        pts = ipp + ii[..., None] * np.array([spacing[1], 0, 0]) + jj[..., None] * np.array([0, spacing[0], 0])
        hu = np.rint(pts @ field).astype(np.int16) + 40
        files.append(write_slice(str(tmp_path / f"ct{k:03d}"), pixels=hu + 1024, ipp=ipp, iop=(1, 0, 0, 0, 1, 0),
                                 pixel_spacing=spacing, modality="CT", series_uid=uid, study_uid=study,
                                 instance=k + 1, intercept=-1024.0, desc="HEAD TILT", number=2,
                                 extra={"GantryDetectorTilt": _ds_str(tilt_deg)}))
    return files, origin, field


@pytest.mark.parametrize("tilt", [15.0, -20.0])
def test_gantry_tilt_is_resampled_keeping_physical_positions(tmp_path, tilt):
    files, origin, field = _tilted_ct(tmp_path, tilt)
    img = read_volume(shuffled(files))
    np.testing.assert_allclose(np.reshape(img.GetDirection(), (3, 3)), np.eye(3), atol=1e-6)
    assert img.GetSpacing() == pytest.approx((0.8, 0.8, 3.0))
    vol = sitk.GetArrayFromImage(img)
    # every voxel that holds data shows the HU of its own physical point (the field is linear)
    inside = vol != CT_FILL
    assert inside.mean() > 0.6
    zyx = np.argwhere(inside)
    pts = np.array([img.TransformIndexToPhysicalPoint([int(i), int(j), int(k)]) for k, j, i in zyx])
    expect = pts @ field + 40
    np.testing.assert_allclose(vol[inside], expect, atol=1.01)  # rounding to integer HU when written
    # the grid grew to keep every acquired voxel: drift over 21 mm at the given tilt
    drift_px = abs(np.tan(np.radians(tilt)) * 21.0) / 0.8
    assert img.GetSize()[1] == 40 + int(np.ceil(drift_px - 1e-6))


def test_gantry_tilt_refused_when_disabled(tmp_path):
    files, _, _ = _tilted_ct(tmp_path, 12.0)
    with pytest.raises(VolumeError, match=r"gantry tilt of 12\.0 degrees"):
        read_volume(files, config=PlanConfig(allow_gantry_tilt=False))


def write_enhanced_mr(path: str, n=5, rows=10, cols=12, step=1.5, seed=3, shuffle=True) -> Written:
    """An Enhanced MR Image Storage object with per-frame positions, frames stored out of spatial order."""
    rng = np.random.default_rng(seed)
    rot = rotation(5, 0, -7)
    iop = _rounded(np.concatenate([rot[:, 0], rot[:, 1]]))
    r, c = iop[:3], iop[3:]
    nrm = np.cross(r / np.linalg.norm(r), c / np.linalg.norm(c))
    origin = np.array([-30.0, 20.0, -5.0])
    ipps = [_rounded(origin + k * step * nrm) for k in range(n)]
    data = rng.integers(0, 3000, size=(n, rows, cols)).astype(np.int16)
    perm = rng.permutation(n) if shuffle else np.arange(n)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesDescription = "3D T1 MPRAGE POST"
    ds.SeriesNumber = 11
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.NumberOfFrames = n
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    shared = Dataset()
    po, pm, pvt = Dataset(), Dataset(), Dataset()
    po.ImageOrientationPatient = [_ds_str(x) for x in iop]
    pm.PixelSpacing = ["0.700000", "0.600000"]
    pm.SliceThickness = "1.5"
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = "2.0", "-10.0", "US"
    shared.PlaneOrientationSequence = [po]
    shared.PixelMeasuresSequence = [pm]
    shared.PixelValueTransformationSequence = [pvt]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k in perm:
        fr, pp = Dataset(), Dataset()
        pp.ImagePositionPatient = [_ds_str(x) for x in ipps[k]]
        fr.PlanePositionSequence = [pp]
        frames.append(fr)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = data[perm].astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    truth = data.astype(np.float32) * np.float32(2.0) + np.float32(-10.0)
    return Written(files=[path], truth=truth, origin=ipps[0], direction=np.stack([r, c, nrm], axis=1),
                   spacing=(0.6, 0.7, step), series_uid=str(ds.SeriesInstanceUID))


def test_enhanced_multiframe_uses_per_frame_geometry(tmp_path):
    w = write_enhanced_mr(str(tmp_path / "enh"))
    img = read_volume(w.files)
    assert_geometry(img, w)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), w.truth)
    stacks = stacks_from_catalog(header_catalog(w.files), PlanConfig())
    assert len(stacks) == 1 and stacks[0].usable
    assert stacks[0].geometry.size == (12, 10, 5)
    np.testing.assert_allclose(stacks[0].geometry.origin, w.origin, atol=1e-4)


# --------------------------------------------------------------------------------------------- stacks from the catalog
def test_catalog_split_by_echo_and_localizer_dropped(tmp_path):
    uid = generate_uid()
    e1 = write_series(tmp_path / "s", n=4, series_uid=uid, seed=1, extra={"EchoTime": "12", "EchoNumbers": "1"})
    e2 = write_series(tmp_path / "s", n=4, series_uid=uid, seed=2, extra={"EchoTime": "90", "EchoNumbers": "2"})
    loc = write_series(tmp_path / "s", n=2, series_uid=uid, seed=3, image_type=r"ORIGINAL\PRIMARY\LOCALIZER")
    der = write_series(tmp_path / "s", n=3, series_uid=uid, seed=4, image_type=r"DERIVED\SECONDARY\MPR",
                       origin=(0, 0, 100))
    stacks = stacks_from_catalog(header_catalog(e1.files + e2.files + loc.files + der.files), PlanConfig())
    usable = [s for s in stacks if s.usable]
    # a derived reformat is a volume too (the selection ranks it after originals); the localizer never is
    assert sorted(tuple(s.urls) for s in usable) == sorted([tuple(e1.files), tuple(e2.files), tuple(der.files)])
    refused = {s.refused.split(" ")[0]: set(s.urls) for s in stacks if not s.usable}
    assert refused == {"localizer/scout": set(loc.files)}
    # the two echoes are two volumes of one multi-echo series, in echo order
    echoes = sorted((s for s in usable if s.split is not None), key=lambda s: s.split.index)
    assert [(tuple(s.urls), s.split.kind, s.split.count, s.split.label) for s in echoes] == [
        (tuple(e1.files), "echo", 2, "echo 1 (TE 12 ms)"), (tuple(e2.files), "echo", 2, "echo 2 (TE 90 ms)")]


def test_catalog_repeats_split_by_acquisition_but_contiguous_acquisitions_stay_one_stack(tmp_path):
    uid = generate_uid()
    a1 = write_series(tmp_path / "rep", n=4, series_uid=uid, seed=1, extra={"AcquisitionNumber": 1})
    a2 = write_series(tmp_path / "rep", n=4, series_uid=uid, seed=2, extra={"AcquisitionNumber": 2})
    stacks = stacks_from_catalog(header_catalog(a1.files + a2.files), PlanConfig())
    assert sorted(tuple(s.urls) for s in stacks if s.usable) == sorted([tuple(a1.files), tuple(a2.files)])
    # a CT whose acquisition number changes half way through one contiguous stack (common on scanners)
    uid = generate_uid()
    b1 = write_series(tmp_path / "ct", n=3, series_uid=uid, seed=3, modality="CT", intercept=-1024.0,
                      extra={"AcquisitionNumber": 1})
    b2 = write_series(tmp_path / "ct", n=3, series_uid=uid, seed=4, modality="CT", intercept=-1024.0,
                      origin=(-10.0, -20.0, 37.5), extra={"AcquisitionNumber": 2})
    stacks = stacks_from_catalog(header_catalog(b2.files + b1.files), PlanConfig())
    assert len(stacks) == 1 and stacks[0].usable
    assert list(stacks[0].urls) == b1.files + b2.files


def test_catalog_duplicates_without_acquisition_refused_and_same_instance_deduplicated(tmp_path):
    uid = generate_uid()
    a = write_series(tmp_path / "a", n=4, series_uid=uid, seed=1)
    b = write_series(tmp_path / "b", n=4, series_uid=uid, seed=2)
    stacks = stacks_from_catalog(header_catalog(a.files + b.files), PlanConfig())
    assert len(stacks) == 1 and "duplicate slice positions" in stacks[0].refused
    copy = str(tmp_path / "a" / "zz-copy")
    shutil.copy(a.files[0], copy)
    stacks = stacks_from_catalog(header_catalog(a.files + [copy]), PlanConfig())
    assert len(stacks) == 1 and stacks[0].usable and len(stacks[0].urls) == 4
    assert any("duplicate file" in n for n in stacks[0].notes)


def test_catalog_gap_refused_with_reason(tmp_path):
    w = write_series(tmp_path / "s", steps=[2.0, 2.0, 4.0, 2.0])
    stacks = stacks_from_catalog(header_catalog(w.files), PlanConfig())
    assert len(stacks) == 1 and stacks[0].refused.startswith("missing slice")


def test_catalog_unreadable_file_of_a_stack_refuses_that_stack_only(tmp_path):
    uid = generate_uid()
    w = write_series(tmp_path / "s", n=5, series_uid=uid)
    rot = rotation(0, 90, 0)
    other = write_series(tmp_path / "s", n=3, series_uid=uid, iop=np.concatenate([rot[:, 0], rot[:, 1]]), seed=5)
    cat = header_catalog(w.files + other.files)
    # the top slice is cut short: without it the stack would look complete, one slice shorter
    cat.loc[cat["url"] == w.files[-1], "read_error"] = "truncated: pixel data has 10 of 336 bytes"
    stacks = {len(s.urls): s for s in stacks_from_catalog(cat, PlanConfig())}
    assert stacks[4].refused == "a file of this stack is unreadable (truncated: pixel data has 10 of 336 bytes)"
    assert stacks[3].usable


# --------------------------------------------------------------------------------------------- real files vs dcm2niix
def _dcm2niix(src: str, out: str) -> dict[str, str]:
    """Run dcm2niix on a folder; {series number + description: nifti path} and its text output."""
    os.makedirs(out, exist_ok=True)
    proc = subprocess.run(["dcm2niix", "-z", "n", "-f", "%s_%d", "-o", out, src], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return {os.path.basename(p)[:-4]: p for p in glob.glob(os.path.join(out, "*.nii"))}, proc.stdout


def assert_same_physical_volume(ours: sitk.Image, ref: sitk.Image, tol_mm=1e-3) -> None:
    """Same grid up to axis flips (NIfTI RAS vs DICOM LPS storage order): compare physically, voxel by voxel."""
    assert sorted(ours.GetSize()) == sorted(ref.GetSize())
    # resample the reference onto our grid with nearest neighbour: exact when the grids coincide
    rs = sitk.Resample(ref, ours, sitk.Transform(), sitk.sitkNearestNeighbor, -99999.0, sitk.sitkFloat32)
    a, b = sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(rs)
    assert (b != -99999.0).all(), "grids do not cover the same space"
    np.testing.assert_array_equal(a, b)
    # and the voxel centres coincide: every corner of our grid is a voxel centre of theirs
    for idx in [(0, 0, 0), tuple(s - 1 for s in ours.GetSize())]:
        p = ours.TransformIndexToPhysicalPoint(idx)
        q = ref.TransformContinuousIndexToPhysicalPoint(
            [round(x) for x in ref.TransformPhysicalPointToContinuousIndex(p)])
        np.testing.assert_allclose(p, q, atol=tol_mm)
    # spacing agrees as a set of axis lengths
    np.testing.assert_allclose(sorted(ours.GetSpacing()), sorted(ref.GetSpacing()), atol=1e-4)


def test_dicomdirtests_multislice_series_agree_with_dcm2niix(tmp_path):
    cat = header_catalog([p for p in glob.glob(DICOMDIR_TESTS + "/**/*", recursive=True) if os.path.isfile(p)])
    niis, text = _dcm2niix(DICOMDIR_TESTS, str(tmp_path / "d2n"))
    results = {}
    for _uid, rows in cat[cat["series_uid"] != ""].groupby("series_uid"):
        if len(rows) < 2:
            continue
        for st in stacks_from_catalog(rows, PlanConfig()):
            results[(st.info["description"], int(st.info["series_number"]), len(st.urls))] = st
    # the 5-slice CT: assembled, and identical to dcm2niix in geometry and voxels (HU: both apply the rescale)
    smart = results[("SmartScore - Gated 0.5 sec", 5, 5)]
    assert smart.usable
    ours = read_volume(smart.urls)
    ref = sitk.ReadImage(niis["5_SmartScore_-_Gated_0.5_sec"], sitk.sitkFloat32)
    assert_same_physical_volume(ours, ref)
    # dcm2niix stacks 4 slices with a 202 mm hole (it warns); we refuse and say why
    brain = results[("Routine Brain", 2, 4)]
    assert brain.refused.startswith("missing slice")
    assert "Interslice distance varies" in text
    with pytest.raises(VolumeError, match=r"series #2: missing slice"):
        read_volume(brain.urls)
    # the two-image CT scout: a localizer (dcm2niix stacks it as a 45 degree tilted volume)
    assert results[("Scout", 4, 2)].refused.startswith("localizer")
    # the 7 angiography projections: derived images in 7 orientations, never a volume
    assert results[("ANGIO Projected from   C", 700, 7)].refused.startswith("projection image")


def test_oblique_handmade_series_agrees_with_dcm2niix(tmp_path):
    rot = rotation(10, -6, 18)
    w = write_series(tmp_path / "s", n=8, rows=20, cols=24, iop=np.concatenate([rot[:, 0], rot[:, 1]]),
                     origin=(30.0, -60.0, 12.0), step=2.2)
    niis, _ = _dcm2niix(str(tmp_path / "s"), str(tmp_path / "d2n"))
    assert len(niis) == 1
    ref = sitk.ReadImage(next(iter(niis.values())), sitk.sitkFloat32)
    ours = read_volume(w.files)
    np.testing.assert_allclose(np.abs(np.reshape(ours.GetDirection(), (3, 3))),
                               np.abs(np.reshape(ref.GetDirection(), (3, 3))), atol=1e-4)
    assert_same_physical_volume(ours, ref, tol_mm=1e-2)


# --------------------------------------------------------------------------------------------- export command
def test_export_series_and_all(tmp_path):
    w = write_series(tmp_path / "in" / "a", n=5, desc="AX T1 POST", number=3)
    gap = write_series(tmp_path / "in" / "b", steps=[2.0, 2.0, 4.0, 2.0], desc="AX T2", number=4)
    cat_url = str(tmp_path / "cat.parquet")
    header_catalog(w.files + gap.files).to_parquet(cat_url)
    out = str(tmp_path / "one.nii.gz")
    summary = export_series_command(str(tmp_path / "in"), series_uid=w.series_uid, out=out, catalog=cat_url)
    img = sitk.ReadImage(out)
    assert_geometry(img, w)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), w.truth)
    summary = export_series_command(str(tmp_path / "in"), all_dir=str(tmp_path / "all"), catalog=cat_url)
    text = summary.describe()
    assert len(summary.written) == 1 and "missing slice" in text and "AX T2" in text
    assert "HANDMADE" not in text and "Hand" not in text
    with pytest.raises(VolumeError, match="missing slice"):
        export_series_command(str(tmp_path / "in"), series_uid=gap.series_uid, out=str(tmp_path / "x.nii.gz"),
                              catalog=cat_url)


def test_cli_export_series_scans_the_input(tmp_path):
    from click.testing import CliRunner

    from mrict_dask.cli import main

    w = write_series(tmp_path / "in" / "HANDMADE-01" / "a", n=5, desc="AX T1 POST", number=3)
    write_series(tmp_path / "in" / "HANDMADE-01" / "b", n=1, desc="AX T2 one slice", number=1)
    out = str(tmp_path / "vol.nii.gz")
    res = CliRunner().invoke(main, ["-q", "export-series", str(tmp_path / "in"), "--series", w.series_uid,
                                    "--out", out])
    assert res.exit_code == 0, res.output
    img = sitk.ReadImage(out)
    assert_geometry(img, w)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), w.truth)
    res = CliRunner().invoke(main, ["-q", "export-series", str(tmp_path / "in"), "--all", str(tmp_path / "all")])
    assert res.exit_code == 0, res.output
    assert "exported 1 volume(s)" in res.output and "single slice" in res.output
    assert "HANDMADE" not in res.output.replace(str(tmp_path), "")
    assert len(glob.glob(str(tmp_path / "all" / "*.nii.gz"))) == 1
    res = CliRunner().invoke(main, ["export-series", str(tmp_path / "in")])
    assert res.exit_code != 0 and "--series" in res.output


def test_read_volume_from_object_storage(tmp_path, s3):
    from .conftest import upload_tree

    w = write_series(tmp_path / "s", n=5, syntax="1.2.840.10008.1.2.5", rows=32, cols=32)
    base = upload_tree(str(tmp_path / "s"), s3, "series")
    urls = [base + "/" + os.path.basename(f) for f in shuffled(w.files)]
    img = read_volume(urls, storage_options=s3.storage_options)
    assert_geometry(img, w)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), w.truth)
    with pytest.raises(VolumeError, match="cannot be read"):
        read_volume(urls + [base + "/missing-file"], storage_options=s3.storage_options)
    # export from object storage to object storage (the input is scanned there)
    out = s3.url("exports", "t1.nii.gz")
    export_series_command(base, series_uid=w.series_uid, out=out, storage_options=s3.storage_options)
    local = str(tmp_path / "t1.nii.gz")
    s3.fs().get(out, local)
    back = sitk.ReadImage(local)
    assert_geometry(back, w)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), w.truth)


# --------------------------------------------------------------------------------------------- synthetic corpus
def _manifest_series(manifest: dict):
    for p in manifest["patients"]:
        for st in p["studies"]:
            yield from st["series"]


def _expected_voxels(series: dict, root: str) -> np.ndarray:
    """What the generator wrote, read independently: files (or frames) in true spatial order, rescaled in float32;
    CT pixel padding is not tissue and reads as air (the documented rule)."""
    g = series["geometry"]
    origin, direction = np.asarray(g["origin"]), np.asarray(g["direction"]).reshape(3, 3)
    padding = (series.get("rescale") or {}).get("padding_value")
    slices = []
    for rel in series["files"]:
        ds = pydicom.dcmread(os.path.join(root, rel))
        stored = ds.pixel_array
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            # frames in true order by their position along the manifest's slice normal
            ipps = [np.asarray(f.PlanePositionSequence[0].ImagePositionPatient, float)
                    for f in ds.PerFrameFunctionalGroupsSequence]
            k = [round(float((p - origin) @ direction[:, 2]) / g["spacing"][2]) for p in ipps]
            assert sorted(k) == list(range(len(k)))
            pvt = ds.SharedFunctionalGroupsSequence[0].get("PixelValueTransformationSequence")
            slope, icpt = (float(pvt[0].RescaleSlope), float(pvt[0].RescaleIntercept)) if pvt else (1.0, 0.0)
            frames = [None] * len(k)
            for kk, fr in zip(k, stored):
                frames[kk] = (fr, slope, icpt)
            slices.extend(frames)
        else:
            slices.append((stored, float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))))
    out = []
    for stored, slope, icpt in slices:
        v = stored.astype(np.float32) * np.float32(slope) + np.float32(icpt)
        if padding is not None:
            v[stored == padding] = np.float32(CT_FILL)
        out.append(v)
    return np.stack(out)


def _check_corpus_volumes(c) -> int:
    root = c.url
    checked = 0
    for s in _manifest_series(c.manifest):
        if not s["usable"] or s.get("tilt_deg") or s["geometry"] is None:
            continue
        files = [os.path.join(root, f) for f in s["files"]]
        # a second copy of one instance (another file name) travels with its series
        files += [os.path.join(root, f["path"]) for f in c.manifest["files"]
                  if f.get("duplicate_of") and f.get("series_uid") == s["series_uid"]]
        img = read_volume(shuffled(files, seed=checked))
        g = s["geometry"]
        assert list(img.GetSize()) == list(g["size"]), s["description"]
        np.testing.assert_allclose(img.GetOrigin(), g["origin"], atol=0.01)
        np.testing.assert_allclose(img.GetSpacing(), g["spacing"], atol=0.01)
        np.testing.assert_allclose(img.GetDirection(), np.ravel(g["direction"]), atol=1e-4)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), _expected_voxels(s, root), err_msg=s["description"])
        checked += 1
    return checked


@pytest.mark.slow
def test_clean_corpus_volumes_equal_what_was_written(corpus):
    n = _check_corpus_volumes(corpus)
    assert n >= 8  # every usable MR (T1c, T2, FLAIR) and CT series of the corpus


@pytest.mark.slow
def test_quirky_corpus_volumes_equal_what_was_written(quirky_corpus):
    assert _check_corpus_volumes(quirky_corpus) >= 8


def test_corpus_refused_series_raise_with_the_manifest_reason(corpus):
    """Localizers and scouts (several single images) are refused with a reason naming the series."""
    seen = set()
    for s in _manifest_series(corpus.manifest):
        if s["usable"] or s["role"] not in ("localizer", "scout") or s["role"] in seen:
            continue
        seen.add(s["role"])
        with pytest.raises(VolumeError, match=rf"series #{s['series_number']}: .*localizer"):
            read_volume([os.path.join(corpus.url, f) for f in s["files"]])
    assert seen == {"localizer", "scout"}


def _acquired_points(series: dict, root: str, every: int = 6, stride: int = 4):
    """(physical LPS points of acquired pixel centres from the manifest's sheared grid, their HU values)."""
    g = series["geometry"]
    axes = np.asarray(g["direction"]).reshape(3, 3)
    sp, org = np.asarray(g["spacing"]), np.asarray(g["origin"])
    padding = series["rescale"]["padding_value"]
    pts, vals = [], []
    for k in range(0, len(series["files"]), every):
        ds = pydicom.dcmread(os.path.join(root, series["files"][k]))
        stored = ds.pixel_array
        hu = stored.astype(np.float32) + np.float32(float(ds.RescaleIntercept))
        hu[stored == padding] = CT_FILL
        jj, ii = np.mgrid[0:stored.shape[0]:stride, 0:stored.shape[1]:stride]
        ijk = np.stack([ii.ravel() * sp[0], jj.ravel() * sp[1], np.full(ii.size, k * sp[2])], axis=1)
        pts.append(org + ijk @ axes.T)
        vals.append(hu[jj, ii].ravel())
    return np.concatenate(pts), np.concatenate(vals)


def _sample(img: sitk.Image, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy.ndimage import map_coordinates

    vol = sitk.GetArrayFromImage(img)
    idx = np.array([img.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in pts])
    return map_coordinates(vol, [idx[:, 2], idx[:, 1], idx[:, 0]], order=1, cval=CT_FILL), idx


@pytest.mark.slow
def test_quirky_corpus_tilted_ct_lands_where_it_was_acquired(quirky_corpus):
    tilted = [s for s in _manifest_series(quirky_corpus.manifest) if s.get("tilt_deg")]
    assert tilted, "the quirky corpus has a gantry-tilted CT"
    s = tilted[0]
    img = read_volume(shuffled([os.path.join(quirky_corpus.url, f) for f in s["files"]]))
    # an orthogonal grid whose slice planes are the acquired planes, one per acquired slice
    d = np.reshape(img.GetDirection(), (3, 3))
    np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-6)
    assert img.GetSize()[2] == s["geometry"]["size"][2]
    axes = np.reshape(s["geometry"]["direction"], (3, 3))
    assert img.GetSpacing()[2] == pytest.approx(s["geometry"]["spacing"][2] * abs(axes[:, 2] @ d[:, 2]), abs=0.01)
    pts, acquired = _acquired_points(s, quirky_corpus.url)
    ours, idx = _sample(img, pts)
    np.testing.assert_allclose(idx[:, 2], np.round(idx[:, 2]), atol=1e-6)  # acquired planes coincide with ours
    head = acquired > -500
    err = np.abs(ours - acquired)[head]
    # only in-plane linear interpolation separates the two (teeth, cortical bone and air beside each other make
    # its error reach hundreds of HU at a few edges)
    assert np.median(err) < 5 and err.mean() < 20
    # the check is sharp: the same points displaced by 1 mm along the tilted column direction disagree far more
    shifted, _ = _sample(img, pts + 1.0 * axes[:, 1])
    assert np.abs(shifted - acquired)[head].mean() > 3 * err.mean()
    # and the volume still holds the anatomy the manifest placed there: the template brain centre, mapped
    # through the series transform, is soft tissue (brain HU), not bone or air
    from mrict_dask.template import load_template

    t = load_template()
    mask = sitk.GetArrayFromImage(t.mask) > 0
    centre_idx = np.argwhere(mask).mean(axis=0)[::-1]
    centre = np.asarray(t.image.TransformContinuousIndexToPhysicalPoint(centre_idx.tolist()))
    tr = np.asarray(s["transform"])
    p = tr[:3, :3] @ centre + tr[:3, 3]
    v, _ = _sample(img, p[None, :])
    assert -20 < v[0] < 80
