"""Scan stage: one catalog row per listed file, fields as written, bad files with their reason.

Ground truth comes from what each test wrote with pydicom (values set by hand), from pydicom's own full
reads of its bundled test files (an independent parse, incl. the pixel data offset), and from the
synthetic generator's manifest.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
)

from mrict_dask.catalog import CATALOG_COLUMNS, catalog_frame
from mrict_dask.dicom_header import HEAD_BYTES_REMOTE, read_header
from mrict_dask.errors import InputError
from mrict_dask.scan import list_files, scan, scan_batch, scan_to_parquet

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
REASON_KINDS = ("not DICOM", "truncated", "unreadable", "bad pixel data", "DICOMDIR")


def _kind(reason: str) -> str:
    return next(k for k in REASON_KINDS if reason.startswith(k))


# ------------------------------------------------------------------------------------------- writing
def _uid(n: int, part: str) -> str:
    return f"1.2.826.0.1.3680043.10.999.{n}.{part}"


def _image(modality: str, series: int, instance: int, rows: int = 32, cols: int = 24, z: float = 0.0,
           pixel_rep: int = 1) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = _uid(series * 1000 + instance, "3")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyDate, ds.SeriesDate, ds.StudyTime, ds.SeriesTime = "20210304", "20210304", "101500", "102030.5"
    ds.Modality = modality
    ds.Manufacturer = "ACME Medical"
    ds.InstitutionName = "Example Hospital"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = f"PID-{series // 10:04d}"
    ds.PatientBirthDate = "19600101"
    ds.BodyPartExamined = "HEAD"
    ds.SliceThickness = "2.5"
    ds.StudyInstanceUID = _uid(series // 10, "1")
    ds.SeriesInstanceUID = _uid(series, "2")
    ds.FrameOfReferenceUID = _uid(series // 10, "4")
    ds.SeriesNumber = series
    ds.SeriesDescription = f"{modality} série {series}"  # non-ASCII, ISO_IR 100
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [-120.5, -98.25, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9961947, -0.0871557]
    ds.PixelSpacing = [0.9375, 0.5]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, pixel_rep
    if modality == "CT":
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.GantryDetectorTilt = "-12.5"
        ds.ConvolutionKernel = ["FC21", "AX"]
        ds.PixelPaddingValue = -2000 if pixel_rep else 0
        ds.AcquisitionNumber = 2
    else:
        ds.EchoTime, ds.RepetitionTime, ds.InversionTime = "12.5", "2100", "900"
        ds.EchoNumbers = 1
        ds.ScanningSequence, ds.SequenceVariant = ["GR", "IR"], ["SP", "MP"]
        ds.SequenceName, ds.MRAcquisitionType = "*tfl3d1_16ns", "3D"
        ds.ContrastBolusAgent = "Gadovist"
        ds.SpacingBetweenSlices = "1.25"
    arr = (np.arange(rows * cols, dtype=np.int16).reshape(rows, cols) % 1000) + instance
    ds.PixelData = arr.astype("<i2" if pixel_rep else "<u2").tobytes()
    return ds


def _expect(ds: Dataset, **extra) -> dict:
    """The catalog fields a written data set must give (read back from the values we set)."""
    out = {
        "sop_instance_uid": str(ds.SOPInstanceUID), "series_uid": str(ds.SeriesInstanceUID),
        "study_uid": str(ds.StudyInstanceUID), "frame_of_reference_uid": str(ds.FrameOfReferenceUID),
        "patient_id": ds.PatientID, "modality": ds.Modality, "study_date": ds.StudyDate,
        "series_time": ds.SeriesTime, "series_number": int(ds.SeriesNumber),
        "series_description": ds.SeriesDescription, "image_type": "ORIGINAL\\PRIMARY\\AXIAL",
        "instance_number": int(ds.InstanceNumber), "rows": ds.Rows, "columns": ds.Columns,
        "bits_allocated": 16, "samples_per_pixel": 1, "photometric": "MONOCHROME2",
        "image_position": [float(v) for v in ds.get("ImagePositionPatient", [])] or None,
        "image_orientation": [float(v) for v in ds.get("ImageOrientationPatient", [])] or None,
        "pixel_spacing": [0.9375, 0.5], "slice_thickness": 2.5, "manufacturer": "ACME Medical",
        "body_part": "HEAD", "read_error": "", "pixel_data_ok": True, "is_dicomdir": False,
    }
    if ds.Modality == "CT":
        out.update(rescale_intercept=-1024.0, rescale_slope=1.0, rescale_type="HU", gantry_tilt=-12.5,
                   convolution_kernel="FC21\\AX", pixel_padding_value=int(ds.PixelPaddingValue),
                   acquisition_number=2)
    else:
        out.update(echo_time=12.5, repetition_time=2100.0, inversion_time=900.0, echo_numbers=1,
                   scanning_sequence="GR\\IR", sequence_variant="SP\\MP", sequence_name="*tfl3d1_16ns",
                   mr_acquisition_type="3D", contrast_agent="Gadovist", spacing_between_slices=1.25)
    out.update(extra)
    return out


def _enhanced_mr(n_frames: int = 4) -> tuple[Dataset, list[list[float]]]:
    ds = _image("MR", 71, 1, rows=16, cols=16)
    del ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing, ds.SliceThickness
    del ds.EchoTime, ds.RepetitionTime, ds.InversionTime, ds.ContrastBolusAgent
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    ds.NumberOfFrames = n_frames
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    shared.PlaneOrientationSequence = Sequence([orient])
    meas = Dataset()
    meas.PixelSpacing, meas.SliceThickness, meas.SpacingBetweenSlices = [1.1, 1.2], "3.0", "3.3"
    shared.PixelMeasuresSequence = Sequence([meas])
    # sequence timing and contrast only in the functional groups (the agent coded at the top level)
    timing, echo, modifier, usage, agent = Dataset(), Dataset(), Dataset(), Dataset(), Dataset()
    timing.RepetitionTime, echo.EffectiveEchoTime, modifier.InversionTimes = 2300.0, 2.9, [900.0]
    usage.ContrastBolusAgentNumber, usage.ContrastBolusAgentAdministered = 1, "YES"
    agent.CodeValue, agent.CodingSchemeDesignator, agent.CodeMeaning = "C-17800", "SRT", "Gadolinium"
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    shared.MREchoSequence = Sequence([echo])
    shared.MRModifierSequence = Sequence([modifier])
    shared.ContrastBolusUsageSequence = Sequence([usage])
    ds.ContrastBolusAgentSequence = Sequence([agent])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    positions = [[-10.0 + 3.3 * k, 20.5, 44.0] for k in range(n_frames)]
    frames = []
    for p in positions:
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = p
        item.PlanePositionSequence = Sequence([pos])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.zeros((n_frames, 16, 16), "<i2").tobytes()
    return ds, positions


def _save(ds: Dataset, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=kw.pop("enforce_file_format", True), **kw)
    return path


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """A folder of files written as scanners and exporters do, plus junk, with the expected row of each.

    Names are odd on purpose (no suffix, spaces, non-ASCII, deep nesting): nothing may depend on them.
    """
    root = tmp_path_factory.mktemp("written")
    exp: dict[str, dict] = {}

    for i in range(3):
        ds = _image("CT", 10, i + 1, z=-50.0 + 2.5 * i)
        exp[f"pat 1/CT head/IM{i:04d}"] = _expect(ds)
        _save(ds, root / f"pat 1/CT head/IM{i:04d}")
    for i in range(2):
        ds = _image("MR", 11, i + 1, z=12.0 * i, pixel_rep=0)
        exp[f"pat 1/mr/ünïcode dir/{i}.dcm"] = _expect(ds, pixel_padding_value=None)
        _save(ds, root / f"pat 1/mr/ünïcode dir/{i}.dcm")

    # a full-size CT slice: its header is a small fraction of the file
    ds = _image("CT", 12, 1, rows=512, cols=512)
    exp["pat 1/CT head/big 512"] = _expect(ds)
    _save(ds, root / "pat 1/CT head/big 512")

    # implicit VR little endian: no VRs in the file; the padding value is signed by PixelRepresentation
    ds = _image("CT", 20, 1)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    exp["a/b/c/d/implicit"] = _expect(ds, transfer_syntax_uid=ImplicitVRLittleEndian)
    _save(ds, root / "a/b/c/d/implicit", implicit_vr=True)

    # explicit VR big endian (retired, still found in archives)
    ds = _image("CT", 21, 1)
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    exp["bigendian.dcm"] = _expect(ds, transfer_syntax_uid=ExplicitVRBigEndian)
    _save(ds, root / "bigendian.dcm", little_endian=False, implicit_vr=False)

    # no preamble, no file meta: a bare implicit VR data set (old exporters)
    ds = _image("MR", 22, 3)
    del ds.file_meta
    exp["bare_dataset"] = _expect(ds, transfer_syntax_uid=ImplicitVRLittleEndian, pixel_padding_value=None)
    pydicom.dcmwrite(root / "bare_dataset", ds, implicit_vr=True, little_endian=True)

    # RLE lossless (encapsulated pixel data)
    ds = _image("CT", 23, 1)
    ds.compress(RLELossless, np.frombuffer(ds.PixelData, "<i2").reshape(ds.Rows, ds.Columns))
    exp["rle.dcm"] = _expect(ds, transfer_syntax_uid=RLELossless)
    _save(ds, root / "rle.dcm")
    rle_bytes = (root / "rle.dcm").read_bytes()

    # an encapsulated file cut inside its first (only) fragment
    (root / "rle_cut.dcm").write_bytes(rle_bytes[: len(rle_bytes) - 40])
    exp["rle_cut.dcm"] = _expect(ds, transfer_syntax_uid=RLELossless, read_error="truncated", pixel_data_ok=False)

    # enhanced multi-frame MR: geometry only in the functional groups
    ds, positions = _enhanced_mr(4)
    e = _expect(ds, image_position=None, image_orientation=[0.0, 1.0, 0.0, 0.0, 0.0, -1.0],
                pixel_spacing=[1.1, 1.2], slice_thickness=3.0, spacing_between_slices=3.3, number_of_frames=4,
                frame_positions=positions, rows=16, columns=16, pixel_padding_value=None, repetition_time=2300.0,
                echo_time=2.9, inversion_time=900.0, contrast_agent="Gadolinium")
    exp["enhanced/mf"] = e
    _save(ds, root / "enhanced/mf")

    # a header longer than any first read: a 300 kB private value before the pixel data
    ds = _image("MR", 30, 1, rows=256, cols=256, pixel_rep=0)
    ds.add_new(0x00290010, "LO", "ACME CSA")
    ds.add_new(0x00291010, "OB", bytes(300_000))
    exp["long header/IM1"] = _expect(ds, pixel_padding_value=None)
    _save(ds, root / "long header/IM1")

    # truncated inside the pixel data (a cut copy)
    ds = _image("CT", 10, 9)
    _save(ds, root / "cut/pixels.dcm")
    data = (root / "cut/pixels.dcm").read_bytes()
    (root / "cut/pixels.dcm").write_bytes(data[:-500])
    exp["cut/pixels.dcm"] = _expect(ds, read_error="truncated: pixel data has", pixel_data_ok=False)
    # truncated inside the header
    (root / "cut/header.dcm").write_bytes(data[:400])
    exp["cut/header.dcm"] = {"read_error": "truncated", "pixel_data_ok": False}

    # a corrupt length field: a header value claiming ~4 GB (must neither allocate it nor hang)
    ds = _image("CT", 40, 1)
    ds.add_new(0x00091010, "OB", b"\x01\x02\x03\x04")
    ds.add_new(0x00090010, "LO", "ACME")
    _save(ds, root / "corrupt/huge_length.dcm")
    raw = bytearray((root / "corrupt/huge_length.dcm").read_bytes())
    at = raw.find(struct.pack("<HH", 0x0009, 0x1010) + b"OB\0\0")
    raw[at + 8:at + 12] = struct.pack("<I", 0xFFFFFFF0)
    (root / "corrupt/huge_length.dcm").write_bytes(bytes(raw))
    # what precedes the corrupt element (group 0008) is still catalogued; what follows it cannot be
    exp["corrupt/huge_length.dcm"] = {"read_error": "truncated", "pixel_data_ok": False,
                                      "sop_instance_uid": str(ds.SOPInstanceUID), "modality": "CT",
                                      "series_uid": None}

    rng = np.random.default_rng(7)
    (root / "junk").mkdir()
    (root / "junk/random.bin").write_bytes(rng.integers(0, 256, 70_000, dtype=np.uint8).tobytes())
    (root / "junk/random_with_dicm").write_bytes(rng.integers(0, 256, 128, dtype=np.uint8).tobytes() + b"DICM"
                                                 + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (root / "junk/notes.txt").write_text("patient list\nsee ticket 12\n" * 50)
    (root / "junk/empty").write_bytes(b"")
    (root / "junk/.hidden").write_text("x")
    exp["junk/random.bin"] = {"read_error": "not DICOM"}
    exp["junk/random_with_dicm"] = {"read_error": "not DICOM", "pixel_data_ok": False}
    exp["junk/notes.txt"] = {"read_error": "not DICOM", "pixel_data_ok": False}
    exp["junk/empty"] = {"read_error": "not DICOM: empty file", "size": 0}
    exp["junk/.hidden"] = {"read_error": "not DICOM"}

    shutil.copy(TEST_FILES / "dicomdirtests" / "DICOMDIR", root / "DICOMDIR")
    exp["DICOMDIR"] = {"is_dicomdir": True, "read_error": "DICOMDIR (media directory, not an image)"}
    return root, exp


def _check_row(row: dict | pd.Series, want: dict, name: str) -> None:
    for col, value in want.items():
        got = row[col]
        if col == "read_error" and value:
            assert str(got).startswith(value), (name, got)
        elif col in ("image_position", "image_orientation", "pixel_spacing"):
            if value is None:
                assert got is None, (name, col, got)
            else:
                np.testing.assert_allclose(got, value, rtol=0, atol=1e-9, err_msg=f"{name} {col}")
        elif col == "frame_positions":
            np.testing.assert_allclose(np.array(got, float), np.array(value, float), atol=1e-9)
        elif isinstance(value, float):
            assert got == pytest.approx(value), (name, col, got)
        elif value is None:
            assert got is None or pd.isna(got), (name, col, got)
        else:
            assert got == value, (name, col, got, value)


# ------------------------------------------------------------------------------------------- local
def test_written_folder_rows_match_what_was_written(written):
    root, exp = written
    df = scan(str(root))
    listed = sorted(str(p) for p in root.rglob("*") if p.is_file())
    assert list(df["url"]) == listed  # every file, once, sorted; names do not matter
    assert tuple(df.columns) == CATALOG_COLUMNS
    by_name = {os.path.relpath(u, root): r for u, r in zip(df["url"], df.to_dict("records"))}
    assert set(exp) == set(by_name)
    for name, want in exp.items():
        _check_row(by_name[name], want, name)
    # sizes as listed, and the pixel data offset is where pydicom finds the value in a full read
    for name, row in by_name.items():
        assert row["size"] == os.path.getsize(root / name)
        if row["pixel_data_ok"]:
            full = pydicom.dcmread(root / name, force=True)
            assert row["pixel_data_offset"] == full.get_item(0x7FE00010).value_tell, name


def test_transfer_syntax_and_endianness_recorded(written):
    root, exp = written
    df = scan(str(root)).set_index("url")
    assert df.loc[str(root / "pat 1/CT head/IM0000"), "transfer_syntax_uid"] == ExplicitVRLittleEndian
    for name in ("a/b/c/d/implicit", "bigendian.dcm", "bare_dataset", "rle.dcm"):
        assert df.loc[str(root / name), "transfer_syntax_uid"] == exp[name]["transfer_syntax_uid"]
    # signed padding value read through PixelRepresentation in an implicit VR file
    assert df.loc[str(root / "a/b/c/d/implicit"), "pixel_padding_value"] == -2000


def test_read_header_single_file_and_listing(written):
    root, exp = written
    url = str(root / "pat 1/CT head/IM0001")
    assert list_files(url) == [(url, os.path.getsize(url))]
    row = read_header(url)
    _check_row(row, exp["pat 1/CT head/IM0001"], "IM0001")
    assert set(CATALOG_COLUMNS) <= set(row)
    missing = read_header(str(root / "nope.dcm"))
    assert missing["read_error"].startswith("unreadable: FileNotFoundError")


def test_input_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no files under"):
        scan(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="input not found"):
        scan(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="input not found"):
        list_files(str(tmp_path / "missing" / "x.dcm"))


def test_scan_batch_pure_and_ordered(written):
    root, _ = written
    items = list_files(str(root))[::-1]  # any order in, same order out
    table = scan_batch(items, None)
    assert table.column("url").to_pylist() == [u for u, _ in items]
    assert scan_batch([], None).num_rows == 0
    lost = scan_batch([("nosuchproto://bucket/a", 10), ("nosuchproto://bucket/b", 0)], None).to_pylist()
    assert [r["url"] for r in lost] == ["nosuchproto://bucket/a", "nosuchproto://bucket/b"]
    assert all(r["read_error"].startswith("unreadable: InputError: unknown URL scheme 'nosuchproto://'")
               for r in lost)
    df = catalog_frame(table)
    assert list(df["url"]) == sorted(u for u, _ in items)
    assert df.attrs["bytes_read"] == sum(read_header(u)["bytes_read"] for u, _ in items) > 0


# ------------------------------------------------------------------------------------------- pydicom's files
def test_every_pydicom_test_file_catalogued_or_explained():
    files = sorted(str(p) for p in TEST_FILES.rglob("*") if p.is_file())
    df = scan(str(TEST_FILES))
    assert list(df["url"]) == files
    for row in df.itertuples():
        if row.read_error:
            _kind(row.read_error)  # a known kind of reason, never an empty or odd one
    by = df.set_index("url")
    dicomdirs = [f for f in files if Path(f).name.startswith("DICOMDIR")]
    assert len(dicomdirs) >= 8
    assert set(df.loc[df["is_dicomdir"], "url"]) == set(dicomdirs)
    assert (by.loc[dicomdirs, "read_error"] == "DICOMDIR (media directory, not an image)").all()
    assert by.loc[str(TEST_FILES / "MR_truncated.dcm"), "read_error"] == "truncated: pixel data has 8130 of 8192 bytes"
    assert by.loc[str(TEST_FILES / "rtplan_truncated.dcm"), "read_error"].startswith("truncated:")
    for name in ("README.txt", "test1.json", "zipMR.gz", "crayons.icc", "rtplan.dump",
                 "dicomdirtests/README.txt"):
        assert by.loc[str(TEST_FILES / name), "read_error"].startswith("not DICOM"), name
    # no_meta.dcm has one stray byte before its data set; pydicom's forced read makes a garbage element of it
    assert by.loc[str(TEST_FILES / "no_meta.dcm"), "read_error"].startswith("not DICOM")

    # Every file pydicom reads in full without complaint: our header fields agree with its conversion.
    checked = 0
    for f in files:
        row = by.loc[f]
        if row["read_error"]:
            continue
        full = pydicom.dcmread(f, force=True)
        for col, kw in (("sop_instance_uid", "SOPInstanceUID"), ("series_uid", "SeriesInstanceUID"),
                        ("study_uid", "StudyInstanceUID"), ("patient_id", "PatientID"), ("modality", "Modality"),
                        ("rows", "Rows"), ("columns", "Columns"), ("instance_number", "InstanceNumber"),
                        ("bits_allocated", "BitsAllocated")):
            value = full.get(kw)
            if value in (None, ""):
                continue
            assert row[col] == (int(value) if col in ("rows", "columns", "instance_number", "bits_allocated")
                                else str(value).strip()), (f, col)
        ipp = full.get("ImagePositionPatient")
        if ipp is not None and len(ipp) == 3:
            np.testing.assert_allclose(row["image_position"], [float(v) for v in ipp])
        pix = next((full.get_item(t) for t in (0x7FE00010, 0x7FE00008, 0x7FE00009) if t in full), None)
        if pix is not None and full.file_meta.get("TransferSyntaxUID") != "1.2.840.10008.1.2.1.99":
            assert row["pixel_data_offset"] == pix.value_tell, f
        if pix is not None:
            assert row["pixel_data_ok"], f
        checked += 1
    assert checked >= 120


def test_dicomdir_tree_series_found():
    df = scan(str(TEST_FILES / "dicomdirtests"))
    ok = df[df["read_error"] == ""]
    # the tree's image files, grouped by series as pydicom reads them (independent full reads)
    truth = {}
    for f in ok["url"]:
        ds = pydicom.dcmread(f)
        truth.setdefault(str(ds.SeriesInstanceUID), set()).add(f)
    got = {s: set(g["url"]) for s, g in ok.groupby("series_uid")}
    assert got == truth
    assert len(got) >= 6


# ------------------------------------------------------------------------------------------- S3
def test_s3_same_catalog_as_local_with_ranged_reads(written, s3, caplog):
    from .conftest import upload_tree

    root, exp = written
    url = upload_tree(str(root), s3, "export")
    so = dict(s3.storage_options, key="AKIASCANTESTKEY0001", secret="scan-secret-never-logged-42")
    with caplog.at_level(logging.DEBUG, logger="mrict_dask"):
        remote = scan(url, storage_options=so, batch_size=5)
    local = scan(str(root))
    assert len(remote) == len(local)
    rel_remote = remote["url"].str.slice(len(url) + 1)
    rel_local = local["url"].str.slice(len(str(root)) + 1)
    assert list(rel_remote) == list(rel_local)
    cols = [c for c in CATALOG_COLUMNS if c != "url"]
    pd.testing.assert_frame_equal(remote[cols], local[cols])
    # header bytes only: the 512x512 slice is read as far as its header, the 300 kB header to its end
    rows = {r["url"][len(url) + 1:]: r for r in _header_rows(url, so)}
    assert sum(r["bytes_read"] for r in rows.values()) == remote.attrs["bytes_read"]
    big = rows["pat 1/CT head/big 512"]
    assert big["bytes_read"] <= HEAD_BYTES_REMOTE < big["size"] / 50
    long = rows["long header/IM1"]
    assert HEAD_BYTES_REMOTE < long["pixel_data_offset"] <= long["bytes_read"] < long["size"]
    # one batch of all files (pilot reads first) gives the same catalog as small batches
    whole = catalog_frame(list(rows.values()))
    pd.testing.assert_frame_equal(whole[cols], remote[cols])
    text = caplog.text + remote.to_string()
    assert "scan-secret-never-logged-42" not in text and "AKIASCANTESTKEY0001" not in text


def _header_rows(url: str, so: dict) -> list[dict]:
    """Every file's row with the bytes read for it, as one scan batch reads them."""
    from mrict_dask.dicom_header import read_headers
    from mrict_dask.io import Location

    return read_headers(list_files(url, so), Location(url, so).fs)


def test_s3_long_headers_read_in_few_bytes(s3, tmp_path):
    """A collection whose headers are all longer than the first read: little fetched beyond each header."""
    from .conftest import upload_tree

    for i in range(40):
        ds = _image("MR", 50, i + 1, rows=256, cols=256)
        ds.add_new(0x00290010, "LO", "ACME CSA")
        ds.add_new(0x00291010, "OB", bytes(10_000 + 37 * i))
        _save(ds, tmp_path / "long" / f"{i:03d}")
    url = upload_tree(str(tmp_path / "long"), s3, "long")
    rows = _header_rows(url, s3.storage_options)
    for r in rows:
        assert r["read_error"] == "" and r["pixel_data_ok"]
        assert HEAD_BYTES_REMOTE < r["pixel_data_offset"] < r["bytes_read"]
        assert r["bytes_read"] <= 1.25 * r["pixel_data_offset"] + 2048, r["bytes_read"]


def test_s3_single_file_and_missing(written, s3):
    from .conftest import upload_tree

    root, exp = written
    url = upload_tree(str(root / "long header"), s3, "one")
    so = s3.storage_options
    files = list_files(url + "/IM1", so)
    assert files == [(url + "/IM1", os.path.getsize(root / "long header/IM1"))]
    row = read_header(files[0][0], storage_options=so)
    _check_row(row, exp["long header/IM1"], "long header on S3")
    assert HEAD_BYTES_REMOTE < row["pixel_data_offset"] <= row["bytes_read"] < files[0][1]
    # credentials from the usual AWS environment variables (set by the fixture), not the storage options
    env_only = {"endpoint_url": s3.endpoint}
    assert scan(url, storage_options=env_only)["read_error"].tolist() == [""]
    with pytest.raises(InputError, match="input not found"):
        scan(s3.url("nothing-here"), storage_options=so)
    # a key prefix is not a folder: "one" must not list "one-other"
    s3.fs().pipe(s3.url("one-other/x"), b"x")
    assert [u for u, _ in list_files(url, so)] == [url + "/IM1"]


# ------------------------------------------------------------------------------------------- Dask
def test_local_cluster_gives_the_serial_catalog(written, client):
    root, _ = written
    serial = scan(str(root))
    from mrict_dask.orchestrate import as_executor

    distributed = scan(str(root), executor=as_executor(client), batch_size=4)
    pd.testing.assert_frame_equal(distributed, serial)
    assert distributed.attrs["bytes_read"] == serial.attrs["bytes_read"]


# ------------------------------------------------------------------------------------------- Parquet, CLI
def test_parquet_catalog_and_summary(written, tmp_path):
    import pyarrow.parquet as pq

    root, _ = written
    out = tmp_path / "work" / "catalog.parquet"
    summary = scan_to_parquet(str(root), str(out), progress=True)
    table = pq.read_table(out)
    assert tuple(table.column_names) == CATALOG_COLUMNS
    back = table.to_pandas()
    assert len(back) == summary.catalog.num_rows
    assert list(back["url"]) == summary.catalog.column("url").to_pylist()
    enhanced = back[back["url"].str.endswith("enhanced/mf")].iloc[0]
    assert len(enhanced["frame_positions"]) == 4
    text = summary.describe()
    n_files = sum(1 for p in root.rglob("*") if p.is_file())
    assert f"scanned {n_files} files" in text
    assert "truncated: " in text and "not DICOM: " in text and "DICOMDIR" in text
    for secret in ("PID-", "Doe", "1.2.826.0.1.3680043.10.999", "pat 1", "20210304"):
        assert secret not in text


def test_cli_scan_with_two_workers(written, tmp_path):
    from click.testing import CliRunner

    from mrict_dask.cli import main

    root, exp = written
    out = tmp_path / "cat.parquet"
    res = CliRunner().invoke(main, ["-q", "scan", str(root), "--out", str(out), "--workers", "2",
                                    "--batch-size", "5"])
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out)
    assert len(df) == len(exp)
    assert "scanned" in res.output
    bad = CliRunner().invoke(main, ["-q", "scan", str(tmp_path / "missing"), "--out", str(out), "--workers", "1"])
    assert bad.exit_code == 2 and "input not found" in bad.output


# ------------------------------------------------------------------------------------------- synthetic corpora
def _manifest_files(corpus) -> list[dict]:
    return corpus.manifest["files"]


def _check_geometry(rows: pd.DataFrame, geo: dict) -> None:
    """Catalog geometry of a series against the generator's grid (SimpleITK convention: direction columns)."""
    d = np.array(geo["direction"], float).reshape(3, 3)
    sx, sy, sz = geo["spacing"]
    for iop in rows["image_orientation"]:
        np.testing.assert_allclose(iop, [*d[:, 0], *d[:, 1]], atol=1e-4)
    for ps in rows["pixel_spacing"]:
        np.testing.assert_allclose(ps, [sy, sx], atol=1e-4)
    assert set(rows["rows"]) == {geo["size"][1]} and set(rows["columns"]) == {geo["size"][0]}
    pos = np.array(list(rows["image_position"]), float)
    pos = pos[np.argsort(pos @ d[:, 2])]
    want = np.array(geo["origin"]) + np.arange(geo["size"][2])[:, None] * sz * d[:, 2]
    np.testing.assert_allclose(pos, want, atol=1e-3)


def test_clean_corpus_rows_match_manifest(corpus):
    df = scan(corpus.url)
    files = _manifest_files(corpus)
    assert len(df) == len(files) == corpus.manifest["n_files"]
    by = df.set_index("url")
    for f in files:
        row = by.loc[os.path.join(corpus.url, f["path"])]
        assert row["read_error"] == "", f["path"]
        assert row["series_uid"] == f["series_uid"] and row["sop_instance_uid"] == f["sop_uid"]
    ok = df[df["read_error"] == ""]
    truth = {s["series_uid"]: s for p in corpus.manifest["patients"] for st in p["studies"] for s in st["series"]}
    assert set(ok["series_uid"]) == set(truth)
    for uid, g in ok.groupby("series_uid"):
        t = truth[uid]
        assert len(g) == len(t["files"])
        assert set(g["series_number"]) == {t["series_number"]}
        assert set(g["series_description"]) == {t["description"]}
        if t["role"] == "sr":  # a report in the CT study: no pixel data, nothing to check it against
            assert not g["pixel_data_ok"].any()
            continue
        assert set(g["modality"]) == {t["modality"]}
        assert g["pixel_data_ok"].all()
        if t["role"] == "ct":  # (the manifest's rescale entry does not describe the scout)
            assert (g["rescale_intercept"] == t["rescale"]["intercept"]).all()
            assert (g["pixel_padding_value"] == t["rescale"]["padding_value"]).all()
        geo = t["geometry"]
        if geo and not t["quirks"] and t["role"] in ("t1c", "t2", "flair", "ct"):
            _check_geometry(g, geo)
    assert set(ok["patient_id"]) == {p["patient_id"] for p in corpus.manifest["patients"]}
    study_of = {s["series_uid"]: st for p in corpus.manifest["patients"] for st in p["studies"] for s in st["series"]}
    for uid, g in ok.groupby("series_uid"):
        st = study_of[uid]
        assert set(g["study_uid"]) == {st["study_uid"]}
        if truth[uid]["role"] != "sr":  # a report has no frame of reference
            assert set(g["frame_of_reference_uid"]) == {st["frame_of_reference_uid"]}
        assert set(g["study_date"]) == {st["study_date"].replace("-", "")}


def test_quirky_corpus_rows_match_manifest(quirky_corpus):
    m = quirky_corpus.manifest
    root = quirky_corpus.url
    df = scan(root)
    listed = sum(len(f) for _, _, f in os.walk(root))
    assert len(df) == listed == len(m["files"]) == m["n_files"]
    by = df.set_index("url")
    kinds = set()
    for f in m["files"]:
        row = by.loc[os.path.join(root, f["path"])]
        kinds.add(f["kind"])
        if f["kind"] == "non_dicom":
            assert row["read_error"].startswith("not DICOM"), (f["path"], row["read_error"])
            assert row["series_uid"] is None
            continue
        assert row["series_uid"] == f["series_uid"] and row["sop_instance_uid"] == f["sop_uid"], f["path"]
        if f["kind"] == "truncated":
            assert row["read_error"].startswith("truncated: pixel data has"), (f["path"], row["read_error"])
            assert not row["pixel_data_ok"]
        else:
            assert row["read_error"] == "", (f["path"], row["read_error"])
        if f["duplicate_of"]:
            orig = by.loc[os.path.join(root, f["duplicate_of"])]
            assert orig["sop_instance_uid"] == row["sop_instance_uid"] and orig["read_error"] == ""
    assert {"dicom", "truncated", "non_dicom"} <= kinds
    assert any(f["duplicate_of"] for f in m["files"])

    series = {s["series_uid"]: s for p in m["patients"] for st in p["studies"] for s in st["series"]}
    seen = set()
    for uid, s in series.items():
        g = df[df["series_uid"] == uid]
        for q in s["quirks"]:
            seen.add(q)
        if "missing_slice" in s["quirks"]:
            assert os.path.join(root, s["missing"]["path"]) not in set(df["url"])
        if "compressed" in s["quirks"]:
            ok = g[g["read_error"] == ""]
            assert len(ok) and ok["pixel_data_ok"].all()
            assert not set(ok["transfer_syntax_uid"]) & {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
        if "gantry_tilt" in s["quirks"]:
            assert np.allclose(g["gantry_tilt"].abs(), abs(s["tilt_deg"]))
        if "multiframe_mr" in s["quirks"]:
            assert len(g) == 1
            row = g.iloc[0]
            geo = s["geometry"]
            assert row["number_of_frames"] == geo["size"][2] == len(row["frame_positions"])
            d = np.array(geo["direction"], float).reshape(3, 3)
            pos = np.array(row["frame_positions"], float)
            pos = pos[np.argsort(pos @ d[:, 2])]
            want = np.array(geo["origin"]) + np.arange(geo["size"][2])[:, None] * geo["spacing"][2] * d[:, 2]
            np.testing.assert_allclose(pos, want, atol=1e-3)
            np.testing.assert_allclose(row["image_orientation"], [*d[:, 0], *d[:, 1]], atol=1e-4)
    for q in ("missing_slice", "compressed", "gantry_tilt", "multiframe_mr"):
        assert q in seen, q


def test_quieting_pydicom_from_many_threads_restores_warnings_and_logging():
    """A DICOMweb batch converts metadata in threads: the last one out restores what the first one changed."""
    import logging
    import threading
    import warnings

    from pydicom.dataset import Dataset

    from mrict_dask.dicom_header import row_from_dataset

    before = (list(warnings.filters), logging.getLogger("pydicom").level)
    ds = Dataset()
    ds.SeriesInstanceUID, ds.Modality, ds.Rows = "1.2.3", "MR", 8

    def work():
        for _ in range(200):
            row_from_dataset("u", None, ds)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (list(warnings.filters), logging.getLogger("pydicom").level) == before
