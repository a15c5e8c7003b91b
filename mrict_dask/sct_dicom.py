"""``mrict-dask to-dicom``: a synthetic CT back to the clinic, as a DICOM CT series a planning system imports.

The synthetic CT (a NIfTI or MetaImage file in the pair's native space, on the grid the export writes) becomes one
CT Image Storage file per axial slice of its grid:

- the patient and study of the MR series the plan chose for the pair (read from the private work area): the new
  series lies in the MR's study (StudyInstanceUID) and on its frame of reference (FrameOfReferenceUID), so a viewer
  or planning system overlays the two;
- a new SeriesInstanceUID and SOPInstanceUIDs, ImageType ``DERIVED\\SECONDARY\\AXIAL`` (a CT image's third value
  must be AXIAL), a series description and derivation description that say it is synthetic;
- HU through RescaleSlope 1 and RescaleIntercept -1024 on unsigned 16-bit pixels, as CT scanners write them (HU are
  rounded to whole numbers; below -1024 they are written as -1024);
- ImagePositionPatient and ImageOrientationPatient from the grid's geometry, whatever its direction: the first
  index axis is the row direction, the second the column direction, each slice at its voxel (0, 0, k).

The output holds the patient's identity (name, ID, birth date, study): it is for the hospital side, and the command
says so. Nothing else of the MR's header (descriptions, institution, device) is copied.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError
from .io import Location
from .spaces import Geometry, open_space, pair_table

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SERIES_DESCRIPTION = "SYNTHETIC CT from MR (mrict-dask)"
DERIVATION = "Synthetic CT computed from an MR series by a model; not an acquired CT"
IDENTITY_NOTICE = ("this DICOM series holds the patient's identity (name, ID, birth date, study) taken from the MR in "
                   "the private work area: keep it on the hospital side")
RESCALE_INTERCEPT = -1024
# Patient, study and frame-of-reference attributes the new series shares with the MR (absent ones stay empty)
FROM_MR = ("SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
           "PatientAge", "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
           "AccessionNumber", "StudyDescription", "FrameOfReferenceUID", "PositionReferenceIndicator",
           "PatientPosition", "BodyPartExamined")
TYPE2_FROM_MR = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber", "PositionReferenceIndicator",
                 "PatientPosition")


def _orientation(geometry: Geometry) -> np.ndarray:
    """The direction matrix (columns: LPS directions of index axes x, y, z); refused unless orthonormal."""
    d = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-4):
        raise InputError("the synthetic CT's grid is not orthonormal (sheared): DICOM slices cannot hold it")
    return d


def sct_datasets(hu_zyx: np.ndarray, geometry: Geometry, mr: Any, series_number: int = 9901,
                 now: dt.datetime | None = None) -> list[Any]:
    """One CT Image Storage data set per slice k of ``hu_zyx`` (z, y, x) on ``geometry``, in ``mr``'s study and
    frame of reference (``mr``: a pydicom data set of the MR series, its header is enough)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    hu = np.asarray(hu_zyx)
    if hu.shape != geometry.shape_zyx:
        raise ValueError(f"volume {hu.shape} is not on the grid (z, y, x) {geometry.shape_zyx}")
    if not mr.get("StudyInstanceUID") or not mr.get("FrameOfReferenceUID"):
        raise InputError("the MR series has no StudyInstanceUID or FrameOfReferenceUID: nothing to attach the "
                         "synthetic CT to")
    d = _orientation(geometry)
    sx, sy, sz = geometry.spacing
    origin = np.asarray(geometry.origin, dtype=np.float64)
    stored = np.clip(np.rint(hu.astype(np.float64)) - RESCALE_INTERCEPT, 0, 65535).astype(np.uint16)
    now = now or dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    series_uid = generate_uid()
    base = Dataset()
    for kw in FROM_MR:
        if kw in mr:
            setattr(base, kw, mr.data_element(kw).value)
    for kw in TYPE2_FROM_MR:
        if kw not in base:
            setattr(base, kw, "")
    if not base.get("BodyPartExamined"):
        base.BodyPartExamined = "HEAD"  # an unpaired body part: Laterality stays absent
    base.SOPClassUID = CT_IMAGE_STORAGE
    base.Modality = "CT"
    base.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    base.SeriesInstanceUID = series_uid
    base.SeriesNumber = series_number
    base.SeriesDescription = SERIES_DESCRIPTION
    base.DerivationDescription = DERIVATION
    base.SeriesDate, base.SeriesTime = date, time
    base.ContentDate, base.ContentTime = date, time
    base.Manufacturer = "mrict-dask"
    base.BurnedInAnnotation = "NO"
    base.KVP = ""
    base.AcquisitionNumber = ""
    base.ImageOrientationPatient = [_ds(v) for v in (*d[:, 0], *d[:, 1])]
    base.PixelSpacing = [_ds(sy), _ds(sx)]  # between rows (along y), between columns (along x)
    base.SliceThickness = _ds(sz)
    base.SpacingBetweenSlices = _ds(sz)
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows, base.Columns = int(hu.shape[1]), int(hu.shape[2])
    base.BitsAllocated, base.BitsStored, base.HighBit, base.PixelRepresentation = 16, 16, 15, 0
    base.RescaleIntercept = RESCALE_INTERCEPT
    base.RescaleSlope = 1
    base.RescaleType = "HU"
    base.WindowCenter, base.WindowWidth = 40, 400
    normal = np.cross(d[:, 0], d[:, 1])
    out = []
    for k in range(hu.shape[0]):
        ds = pydicom.Dataset()
        ds.update(base)
        position = origin + k * sz * d[:, 2]
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.SliceLocation = _ds(float(position @ normal))
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        out.append(ds)
    return out


def _ds(v: float) -> str:
    """A decimal string as precise as DICOM's 16 characters allow."""
    v = float(v) + 0.0  # no "-0"
    for digits in range(15, 0, -1):
        text = f"{v:.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(f"{v} does not fit a decimal string")


def to_bytes(ds: Any) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- the command
@dataclass
class ToDicomSummary:
    out: str
    files: int
    series_uid: str
    study_uid: str
    frame_uid: str

    def describe(self) -> str:
        return "\n".join([
            f"wrote {self.files} DICOM files (CT Image Storage, one per slice) to {self.out}",
            f"  series '{SERIES_DESCRIPTION}', new series UID; in the MR's study, on the MR's frame of reference",
            f"warning: {IDENTITY_NOTICE}",
        ])


def _mr_header(pair_id: str, work: Location, storage_options: dict | None) -> Any:
    """The header of the MR series the plan chose for ``pair_id`` (its first file, read from the source)."""
    import pydicom

    from .plan import Plan
    from .sources import fetch_instances

    plan_loc = work.join("plan.json")
    if not plan_loc.exists():
        raise InputError(f"no plan.json in the work area {work.url}: give the private work area of the run that "
                         "made the store (--work)")
    plan = Plan.from_json(plan_loc.read_text())
    pair = next((p for p in plan.pairs if p.pair_id == pair_id), None)
    if pair is None or not pair.mr_files:
        raise InputError(f"pair {pair_id} is not in the plan of the work area {work.url}")
    (blob,) = fetch_instances([pair.mr_files[0]], storage_options)
    if isinstance(blob, Exception):
        raise InputError(f"the MR series of pair {pair_id} cannot be read from its source: "
                         f"{type(blob).__name__}") from None
    ds = blob if isinstance(blob, pydicom.Dataset) else pydicom.dcmread(io.BytesIO(blob), stop_before_pixels=True,
                                                                          force=True)
    if pair.mr_series_uid and str(ds.get("SeriesInstanceUID", "")) != pair.mr_series_uid:
        raise InputError(f"the MR file the plan lists for pair {pair_id} belongs to another series than the plan's")
    return ds


def write_sct_dicom(sct_url: str, pair_id: str, store_url: str, out_url: str, work_url: str | None = None,
                    storage_options: dict | None = None, series_number: int = 9901) -> ToDicomSummary:
    """Check the synthetic CT against the pair's native grid, then write it as a DICOM CT series to ``out_url``."""
    import SimpleITK as sitk

    from .export import read_image

    store = Location.of(store_url, storage_options)
    work = Location.of(work_url, storage_options) if work_url else store.sibling(".work")
    out = Location.of(out_url, storage_options)
    table = pair_table(store)
    ids = table.ids
    if pair_id not in ids:
        raise InputError(f"pair {pair_id} is not in the store")
    if table["status"][ids.index(pair_id)] == "withdrawn":
        raise InputError(f"pair {pair_id} was withdrawn from the store (its patient withdrew consent): nothing of it "
                         "is written")
    space = open_space(store, "native")  # a template-space CT is not in the patient's geometry: never written back
    grid = space.geometry(ids.index(pair_id))
    sct_loc = Location.of(sct_url, storage_options)
    if not sct_loc.exists():
        raise InputError(f"synthetic CT not found: {sct_loc.url}")
    try:
        img = read_image(sct_loc)
    except ValueError as exc:  # NaN or infinite voxels
        raise InputError(f"{sct_loc.url}: {exc}") from None
    except RuntimeError:
        raise InputError(f"{sct_loc.url} cannot be read as an image (NIfTI or MetaImage)") from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{sct_loc.url} is not a 3D single-channel image")
    why = grid.mismatch(Geometry.of_image(img))
    if why:
        raise InputError(f"{sct_loc.url} is not on pair {pair_id}'s native grid: {why}")
    hu = sitk.GetArrayFromImage(img)
    if not np.isfinite(hu).all():
        raise InputError(f"{sct_loc.url} holds NaN or infinite values")
    if out.exists() and out.fs.ls(out.path):
        raise InputError(f"{out.url} is not empty: give an empty folder (one folder holds one DICOM series)")
    mr = _mr_header(pair_id, work, storage_options)
    datasets = sct_datasets(hu, grid, mr, series_number=series_number)
    width = max(4, len(str(len(datasets))))
    for k, ds in enumerate(datasets):
        out.join(f"CT{k + 1:0{width}d}.dcm").write_bytes(to_bytes(ds))
    first = datasets[0]
    return ToDicomSummary(out=out.url, files=len(datasets), series_uid=str(first.SeriesInstanceUID),
                          study_uid=str(first.StudyInstanceUID), frame_uid=str(first.FrameOfReferenceUID))

