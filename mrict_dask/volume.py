"""Pixels of one stack of DICOM files -> a trustworthy float32 SimpleITK volume in LPS.

:func:`read_volume` reads the files of one stack (chosen by :mod:`mrict_dask.stacks` from headers), re-checks
everything on the actual files (never trusting the plan's order) and assembles the volume with the geometry core
of :mod:`mrict_dask.geometry`.

Voxel values: ``float32(stored) * float32(RescaleSlope) + float32(RescaleIntercept)`` per slice (CT in HU).
Pixel padding (PixelPaddingValue, or the range up to PixelPaddingRangeLimit) marks voxels that are not tissue
(outside the reconstruction circle); they become :data:`CT_FILL` (air) for CT and :data:`MR_FILL` otherwise,
as does anything outside the acquired field of view after gantry-tilt resampling.

A series is refused (:class:`~mrict_dask.errors.VolumeError`) rather than guessed when slices are missing or
unevenly spaced, positions repeat with different content, orientations are mixed, there is a single slice,
pixel data is unreadable or truncated, or the image is constant. Reasons name the series by its description and
number, never by patient or file name (paths often embed PatientIDs).
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import PlanConfig, plan_config
from .errors import VolumeError
from .geometry import (
    DUPLICATE_POSITION_TOL_MM,
    ORIENTATION_TOL,
    Geometry,
    Refusal,
    set_of_orientations,
    stack_geometry,
    unit_axes,
)
from .stacks import non_volume_reason, series_label

log = logging.getLogger(__name__)

MAX_VOXELS = 1_000_000_000
"""A stack declaring more voxels than this (4 GB as float32) is refused before any allocation: no head volume is
that large, and declared sizes in damaged headers must not decide how much memory a worker takes."""

CT_FILL = -1000.0
"""HU written for CT voxels that hold no tissue: pixel padding and space outside the acquired field of view."""

MR_FILL = 0.0
"""Value written for MR (and other modalities) voxels that hold no tissue."""

_NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # implicit / explicit VR little endian

# ------------------------------------------------------------------------------------------- pixel side
@dataclass
class _Slice:
    position: np.ndarray  # ImagePositionPatient
    iop: np.ndarray
    spacing: np.ndarray  # PixelSpacing
    rows: int
    columns: int
    slope: float
    intercept: float
    raw: Any  # callable -> stored values (rows, columns)
    sop_uid: str
    instance: str  # InstanceNumber (for messages only)
    padding: tuple[float, float] | None


def fetch_bytes(urls: Sequence[str], storage_options: dict | None = None) -> list[Any]:
    """Each instance named by ``urls``, from whichever source holds them (:func:`~mrict_dask.sources.fetch_instances`):
    a file's bytes, a data set already parsed from them, or the exception that stopped it."""
    from .sources import fetch_instances

    return fetch_instances(urls, storage_options)


def _parse(data: Any) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    if isinstance(data, pydicom.Dataset):  # parsed by the source as it arrived
        return data

    try:
        return pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError:
        # some exporters omit the 128-byte preamble; anything else fails the checks that follow
        return pydicom.dcmread(io.BytesIO(data), force=True)


def _num(ds: Any, keyword: str, default: float | None = None) -> float | None:
    v = ds.get(keyword)
    if v is None or v == "":
        return default
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def _padding(ds: Any) -> tuple[float, float] | None:
    pv = _num(ds, "PixelPaddingValue")
    if pv is None:
        return None
    lim = _num(ds, "PixelPaddingRangeLimit")
    lo, hi = (pv, pv) if lim is None else (min(pv, lim), max(pv, lim))
    return (lo, hi)


def _native_dtype(ds: Any) -> np.dtype | None:
    """dtype for reading native little-endian pixels straight from the buffer, or None (let pydicom decode)."""
    ts = str(getattr(ds.get("file_meta", {}), "TransferSyntaxUID", "") or "")
    if ts not in _NATIVE_SYNTAXES or int(ds.get("SamplesPerPixel", 1)) != 1:
        return None
    ba, bs = int(ds.get("BitsAllocated", 0)), int(ds.get("BitsStored", 0))
    if ba != bs or ba not in (8, 16, 32):
        return None
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    return np.dtype(("<i" if signed else "<u") + str(ba // 8))


def _stored_pixels(ds: Any, label: str, where: str) -> np.ndarray:
    """Stored values of all frames, (frames, rows, columns); raises VolumeError for unreadable pixel data."""
    if "PixelData" not in ds or ds.PixelData is None:
        raise VolumeError(f"{label}: {where} has no pixel data")
    rows, cols = int(ds.Rows), int(ds.Columns)
    nf = int(_num(ds, "NumberOfFrames", 1) or 1)
    dt = _native_dtype(ds)
    if dt is not None:
        buf = ds.PixelData
        need = rows * cols * nf * dt.itemsize
        if len(buf) < need:
            raise VolumeError(f"{label}: {where} has truncated pixel data ({len(buf)} of {need} bytes)")
        return np.frombuffer(buf, dtype=dt, count=rows * cols * nf).reshape(nf, rows, cols)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # decoder errors come in many types
        raise VolumeError(f"{label}: {where} has unreadable pixel data ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:160]})") from None
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise VolumeError(f"{label}: {where} is a colour image, not a CT/MR volume")
    return np.asarray(arr).reshape(nf, rows, cols)


def _seq_item(ds: Any, seq: str) -> Any:
    s = ds.get(seq)
    return s[0] if s else None


def _frames_of(ds: Any, label: str) -> list[_Slice]:
    """Per-frame geometry of an enhanced multi-frame object (PerFrame/Shared functional groups)."""
    pfg = ds.get("PerFrameFunctionalGroupsSequence")
    nf = int(_num(ds, "NumberOfFrames", 1) or 1)
    if not pfg or len(pfg) != nf:
        raise VolumeError(f"{label}: multi-frame object without per-frame geometry")
    shared = _seq_item(ds, "SharedFunctionalGroupsSequence")
    stored: dict[str, np.ndarray] = {}

    def lookup(frame: Any, seq: str, attr: str) -> Any:
        for grp in (frame, shared):
            item = _seq_item(grp, seq) if grp is not None else None
            if item is not None and attr in item:
                return item.get(attr)
        return None

    def frames() -> np.ndarray:
        if "a" not in stored:
            stored["a"] = _stored_pixels(ds, label, "the multi-frame object")
        return stored["a"]

    out = []
    top_slope, top_icpt = _num(ds, "RescaleSlope", 1.0), _num(ds, "RescaleIntercept", 0.0)
    for i, fr in enumerate(pfg):
        ipp = lookup(fr, "PlanePositionSequence", "ImagePositionPatient")
        iop = lookup(fr, "PlaneOrientationSequence", "ImageOrientationPatient")
        ps = lookup(fr, "PixelMeasuresSequence", "PixelSpacing")
        slope = lookup(fr, "PixelValueTransformationSequence", "RescaleSlope")
        icpt = lookup(fr, "PixelValueTransformationSequence", "RescaleIntercept")
        if ipp is None or iop is None or ps is None:
            raise VolumeError(f"{label}: frame {i + 1} lacks position, orientation or pixel spacing")
        out.append(_Slice(
            position=np.asarray(ipp, float), iop=np.asarray(iop, float), spacing=np.asarray(ps, float),
            rows=int(ds.Rows), columns=int(ds.Columns),
            slope=float(slope) if slope is not None else float(top_slope),
            intercept=float(icpt) if icpt is not None else float(top_icpt),
            raw=(lambda i=i: frames()[i]), sop_uid=f"{ds.get('SOPInstanceUID', '')}/{i}", instance=f"frame {i + 1}",
            padding=_padding(ds)))
    return out


def _slice_of(ds: Any, label: str) -> _Slice:
    inst = str(ds.get("InstanceNumber", "?"))
    ipp, iop, ps = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"), ds.get("PixelSpacing")
    if ipp is None or iop is None or ps is None or "Rows" not in ds:
        raise VolumeError(f"{label}: instance {inst} lacks position, orientation, pixel spacing or size")
    holder: dict[str, np.ndarray] = {}

    def raw() -> np.ndarray:
        if "a" not in holder:
            holder["a"] = _stored_pixels(ds, label, f"instance {inst}")[0]
        return holder["a"]

    try:
        return _Slice(position=np.asarray(ipp, float), iop=np.asarray(iop, float), spacing=np.asarray(ps, float),
                      rows=int(ds.Rows), columns=int(ds.Columns), slope=_num(ds, "RescaleSlope", 1.0) or 1.0,
                      intercept=_num(ds, "RescaleIntercept", 0.0) or 0.0, raw=raw,
                      sop_uid=str(ds.get("SOPInstanceUID", "")), instance=inst, padding=_padding(ds))
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{label}: instance {inst} has malformed geometry tags ({exc})") from None


def _values(s: _Slice, fill: float, out: np.ndarray | None = None) -> np.ndarray:
    """Rescaled float32 values of one slice (into ``out`` when given), padding replaced by ``fill``."""
    raw = s.raw()
    if raw.shape != (s.rows, s.columns):
        raise VolumeError(f"pixel data of instance {s.instance} does not match its Rows/Columns")
    if not (math.isfinite(s.slope) and math.isfinite(s.intercept)):
        raise VolumeError(f"instance {s.instance} has a non-finite RescaleSlope/RescaleIntercept")
    if out is None:
        out = np.empty(raw.shape, dtype=np.float32)
    np.copyto(out, raw, casting="unsafe")
    if s.slope != 1.0:
        out *= np.float32(s.slope)
    if s.intercept != 0.0:
        out += np.float32(s.intercept)
    if s.padding is not None:
        lo, hi = s.padding
        np.putmask(out, (raw == lo) if lo == hi else ((raw >= lo) & (raw <= hi)), np.float32(fill))
    return out


def read_volume(urls: Sequence[str], storage_options: dict | None = None,
                config: Any = None) -> sitk.Image:  # noqa: F821
    """Read one stack of DICOM files into a float32 SimpleITK image in LPS (see the module docstring).

    ``config`` is a :class:`PlanConfig` (or a whole Config). Raises :class:`VolumeError` with a reason naming
    the series (description and number) for anything that would make the volume untrustworthy.
    """
    cfg = plan_config(config)
    urls = list(urls)
    if not urls:
        raise VolumeError("no files given for the volume")
    blobs = fetch_bytes(urls, storage_options)
    datasets: list[Any] = []
    problems: list[str] = []
    for k, b in enumerate(blobs):
        if isinstance(b, Exception):
            from .io import is_transient

            if is_transient(b):  # the storage failed, not the series: raised for the caller to retry
                raise b
            problems.append(f"file {k + 1} of {len(urls)} cannot be read ({type(b).__name__})")
            continue
        try:
            datasets.append(_parse(b))
        except Exception as exc:
            problems.append(f"file {k + 1} of {len(urls)} is not readable DICOM ({type(exc).__name__})")
    try:
        label = next((series_label(d.get("SeriesNumber")) for d in datasets), "series (unreadable)")
    except Exception:  # pydicom converts values lazily: a malformed one raises on first access
        label = "series (malformed SeriesNumber)"
    if problems:
        raise VolumeError(f"{label}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    try:
        return _assemble(datasets, label, cfg)
    except VolumeError:
        raise
    except Exception as exc:  # a malformed value anywhere (bad VR, wrong length, missing tag) refuses the series
        msg = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise VolumeError(f"{label}: malformed DICOM ({type(exc).__name__}: {msg})") from None


def _assemble(datasets: list[Any], label: str, cfg: PlanConfig) -> sitk.Image:  # noqa: F821
    import SimpleITK as sitk

    modality = str(datasets[0].get("Modality", "")).upper()
    fill = CT_FILL if modality == "CT" else MR_FILL
    for d in datasets:
        why = non_volume_reason(d.get("ImageType"), d.get("SOPClassUID"), d.get("Rows"),
                                d.get("PhotometricInterpretation"), d.get("SeriesDescription"))
        if why:
            raise VolumeError(f"{label}: instance {d.get('InstanceNumber', '?')} cannot be part of a volume: {why}")
    if len({str(d.get("SeriesInstanceUID", "")) for d in datasets}) > 1:
        raise VolumeError(f"{label}: the files belong to more than one series")

    # identical SOP instances (the same file twice) count once; different content under one UID is corrupt
    seen: dict[str, Any] = {}
    unique: list[Any] = []
    for d in datasets:
        uid = str(d.get("SOPInstanceUID", ""))
        if uid and uid in seen:
            if bytes(seen[uid].get("PixelData", b"") or b"") != bytes(d.get("PixelData", b"") or b""):
                raise VolumeError(f"{label}: two files claim instance {d.get('InstanceNumber', '?')} with "
                                  "different pixel data")
            continue
        seen[uid] = d
        unique.append(d)

    multi = [d for d in unique if int(_num(d, "NumberOfFrames", 1) or 1) > 1]
    if multi:
        if len(unique) > 1:
            raise VolumeError(f"{label}: a multi-frame object mixed with other files; give one object per volume")
        slices = _frames_of(unique[0], label)
    else:
        slices = [_slice_of(d, label) for d in unique]

    ref = slices[0]
    for s in slices[1:]:
        if np.max(np.abs(s.iop - ref.iop)) > ORIENTATION_TOL:
            n_orient = len(set_of_orientations([x.iop for x in slices]))
            raise VolumeError(f"{label}: mixed orientations ({n_orient} different ImageOrientationPatient)")
        if (s.rows, s.columns) != (ref.rows, ref.columns) or np.max(np.abs(s.spacing - ref.spacing)) > 1e-4:
            raise VolumeError(f"{label}: slices differ in matrix size or pixel spacing")

    try:
        _, _, nrm = unit_axes(ref.iop)
    except Refusal as err:
        raise VolumeError(f"{label}: {err}") from None
    slices = _drop_identical_repeats(slices, nrm, fill, label)
    positions = np.stack([s.position for s in slices])
    try:
        geom, order = stack_geometry(positions, ref.iop, ref.spacing, ref.rows, ref.columns, cfg.gap_tolerance,
                                     cfg.allow_gantry_tilt)
    except Refusal as err:
        raise VolumeError(f"{label}: {err}") from None

    if len(slices) * ref.rows * ref.columns > MAX_VOXELS:
        raise VolumeError(f"{label}: {len(slices)} x {ref.rows} x {ref.columns} voxels is larger than any head "
                          f"volume ({MAX_VOXELS:.0e} at most)")
    try:
        vol = np.empty((len(slices), ref.rows, ref.columns), dtype=np.float32)
        lo, hi = math.inf, -math.inf
        for k, i in enumerate(order):
            _values(slices[i], fill, out=vol[k])
            lo, hi = min(lo, float(vol[k].min())), max(hi, float(vol[k].max()))  # while the slice is in cache
    except VolumeError as err:
        msg = str(err)
        raise VolumeError(msg if msg.startswith(label) else f"{label}: {msg}") from None
    if lo == hi:
        raise VolumeError(f"{label}: constant image (every voxel is {lo:g})")
    if geom.tilt_deg:
        vol = _untilt(vol, geom, fill)
        log.info("%s: gantry tilt %.2f degrees, resampled onto an orthogonal grid", label, geom.tilt_deg)
    img = sitk.GetImageFromArray(vol, isVector=False)
    img.SetSpacing(geom.spacing)
    img.SetOrigin(geom.origin)
    img.SetDirection(geom.direction)
    return img

def _drop_identical_repeats(slices: list[_Slice], nrm: np.ndarray, fill: float, label: str) -> list[_Slice]:
    """Slices repeated at one position: drop exact copies (same pixels and position), refuse differing ones."""
    t = np.array([float(s.position @ nrm) for s in slices])
    order = np.argsort(t, kind="stable")
    keep = [order[0]]
    dropped = 0
    for i in order[1:]:
        j = keep[-1]
        if abs(t[i] - t[j]) >= DUPLICATE_POSITION_TOL_MM:
            keep.append(i)
            continue
        same_place = np.max(np.abs(slices[i].position - slices[j].position)) < DUPLICATE_POSITION_TOL_MM
        if same_place and np.array_equal(_values(slices[i], fill), _values(slices[j], fill)):
            dropped += 1
            continue
        raise VolumeError(f"{label}: duplicate slice positions with different content (instances "
                          f"{slices[j].instance} and {slices[i].instance})")
    if dropped:
        log.info("%s: %d repeated slice(s) with identical content ignored", label, dropped)
    return [slices[i] for i in sorted(keep)]


def _untilt(vol: np.ndarray, geom: Geometry, fill: float) -> np.ndarray:
    """Resample a sheared (gantry-tilted) stack onto ``geom``'s orthogonal grid.

    Slices are parallel planes, and the output planes coincide with them, so each slice is only shifted within
    its own plane (linear interpolation in-plane, none between slices). Space no slice covers gets ``fill``;
    padding has already become ``fill`` so it is not smeared into tissue.
    """
    from scipy.ndimage import affine_transform

    nz, ny, nx = vol.shape
    sx, sy = geom.spacing[0], geom.spacing[1]
    a, b = geom.shear
    out_x, out_y = geom.size[0], geom.size[1]
    # output index (y', x') -> source index (y' + oy - b t / sy, x' + ox - a t / sx), t = k * dz
    extent = geom.spacing[2] * (nz - 1)
    ox = -(out_x - nx) if a * extent < 0 else 0
    oy = -(out_y - ny) if b * extent < 0 else 0
    out = np.empty((nz, out_y, out_x), dtype=np.float32)
    for k in range(nz):
        t = k * geom.spacing[2]
        offset = (oy - b * t / sy, ox - a * t / sx)
        out[k] = affine_transform(vol[k], np.eye(2), offset=offset, output_shape=(out_y, out_x), order=1,
                                  mode="constant", cval=fill)
    return out
