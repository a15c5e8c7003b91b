"""DICOM series -> trustworthy volumes: stack grouping, geometry checks, pixel assembly, export.

Pure functions, no Dask. Two entry points share one geometry core (:func:`stack_geometry`):

- :func:`stacks_from_catalog` splits one series' catalog rows (headers only) into geometric stacks and says,
  for each, why it is usable or refused; the plan chooses among the usable ones without reading pixels.
- :func:`read_volume` reads the pixels of one stack, re-checks everything on the actual files (never trusting
  the plan's order), and returns a SimpleITK image in DICOM patient coordinates (LPS).

Conventions (the same as SimpleITK's ImageSeriesReader and dcm2niix): x runs along the first
ImageOrientationPatient vector (row direction), y along the second (column direction), z along their cross
product; slices are sorted by their position along that normal (never by InstanceNumber or file name), so
the direction matrix is right-handed and the origin is the ImagePositionPatient of the most "negative" slice.
Voxel values: ``float32(stored) * float32(RescaleSlope) + float32(RescaleIntercept)`` per slice (CT in HU).
Pixel padding (PixelPaddingValue, or the range up to PixelPaddingRangeLimit) marks voxels that are not tissue
(outside the reconstruction circle); they become :data:`CT_FILL` (air) for CT and :data:`MR_FILL` otherwise,
as does anything outside the acquired field of view after gantry-tilt resampling.

A series is refused (:class:`~mrict_dask.errors.VolumeError`, or ``Stack.refused``) rather than guessed when
slices are missing or unevenly spaced, positions repeat with different content, orientations are mixed, there
is a single slice, pixel data is unreadable or truncated, or the image is constant. Reasons name the series by
its description and number, never by patient or file name (paths often embed PatientIDs).
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from .config import PlanConfig
from .errors import VolumeError

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------- tolerances
ORIENTATION_TOL = 1e-4
"""Largest difference between direction cosines (ImageOrientationPatient components) of slices that still
belong to one stack; also how far from unit length/orthogonal the two vectors may be."""

DUPLICATE_POSITION_TOL_MM = 0.01
"""Two slices closer than this along the normal are at the same position (duplicates, repeats or echoes)."""

COLLINEAR_TOL_PX = 0.1
"""Largest in-plane deviation (in pixels) of any slice origin from the straight line fitted through all slice
origins; beyond it the positions do not describe one regular stack and the stack is refused."""

TILT_DRIFT_TOL_PX = 0.1
"""In-plane drift of slice origins across the whole stack (in pixels) above which the stack is sheared (gantry
tilt) and is resampled onto an orthogonal grid. Below it the drift is rounding noise and ignored; the tilt is
measured from the positions, never from GantryDetectorTilt (a nominal value, vendor-specific sign)."""

MAX_VOXELS = 1_000_000_000
"""A stack declaring more voxels than this (4 GB as float32) is refused before any allocation: no head volume is
that large, and declared sizes in damaged headers must not decide how much memory a worker takes."""

CT_FILL = -1000.0
"""HU written for CT voxels that hold no tissue: pixel padding and space outside the acquired field of view."""

MR_FILL = 0.0
"""Value written for MR (and other modalities) voxels that hold no tissue."""

# SOP classes whose instances are images we can stack (single-frame and enhanced multi-frame CT/MR).
IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image",
    "1.2.840.10008.5.1.4.1.1.128": "PET Image",
    "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET Image",
}
_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
_NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # implicit / explicit VR little endian


# ------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Geometry:
    """Where a stack's voxels are, as SimpleITK reports an image: LPS mm, direction row-major (columns = axes)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    tilt_deg: float = 0.0  # angle between the slice stacking direction and the slice normal (gantry tilt)
    shear: tuple[float, float] = (0.0, 0.0)  # in-plane drift (mm per mm along the normal) along x and y

    def to_dict(self) -> dict[str, Any]:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction), "tilt_deg": self.tilt_deg}

    @property
    def normal(self) -> np.ndarray:
        return np.asarray(self.direction, float).reshape(3, 3)[:, 2]


@dataclass
class Stack:
    """One geometric stack of a series: the unit that becomes one volume (or is refused with a reason)."""

    key: str  # private: the series UID, plus "#n" when the series splits into several stacks
    series_uid: str
    urls: tuple[str, ...]  # in spatial order (ascending along the slice normal) when usable
    geometry: Geometry | None = None
    refused: str | None = None  # the reason, PHI-free; None when usable
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # header facts the selection rules use

    @property
    def usable(self) -> bool:
        return self.refused is None and self.geometry is not None

    @property
    def label(self) -> str:
        return series_label(self.info.get("description"), self.info.get("series_number"))


def series_label(description: Any, number: Any) -> str:
    desc = _s(description) or "(no description)"
    num = "?" if _isnan(number) or _s(number) == "" else str(int(float(number))) if _isnum(number) else _s(number)
    return f"series '{desc}' #{num}"


def _isnan(v: Any) -> bool:
    """True for None and the missing-value markers pandas/Parquet give (NaN, pd.NA, NaT)."""
    if v is None:
        return True
    if isinstance(v, float):
        return v != v
    if isinstance(v, (str, bytes, int, list, tuple, np.ndarray)):
        return False
    try:
        import pandas as pd

        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _isnum(v: Any) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------- geometry core
class _Refusal(Exception):
    """A geometry problem; the caller turns it into ``Stack.refused`` or a VolumeError naming the series."""


def _unit_axes(iop: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    v = np.asarray(iop, dtype=float).reshape(-1)
    if v.size != 6 or not np.all(np.isfinite(v)):
        raise _Refusal("missing or malformed ImageOrientationPatient")
    r, c = v[:3], v[3:]
    nr, nc = np.linalg.norm(r), np.linalg.norm(c)
    # vendors write 5-6 significant digits; 1e-3 off unit length is still clearly a direction cosine
    if abs(nr - 1) > 1e-3 or abs(nc - 1) > 1e-3 or abs(float(r @ c)) > 1e-3:
        raise _Refusal("ImageOrientationPatient is not two orthogonal unit vectors")
    r = r / nr
    c = c - (c @ r) * r  # remove the rounding residue so the direction matrix is orthonormal
    c = c / np.linalg.norm(c)
    return r, c, np.cross(r, c)


def stack_geometry(positions: np.ndarray, iop: Sequence[float], pixel_spacing: Sequence[float],
                   rows: int, columns: int, gap_tolerance: float = 0.2,
                   allow_tilt: bool = True) -> tuple[Geometry, np.ndarray]:
    """Geometry of a stack of parallel slices and the permutation putting them in spatial order.

    ``positions``: (n, 3) ImagePositionPatient per slice (any order). Raises :class:`_Refusal` for a single slice,
    repeated positions, slices not on a line, missing slices or uneven spacing (a step differing from the median
    step by more than ``gap_tolerance`` of it), and for gantry tilt when ``allow_tilt`` is false.
    For a tilted stack the returned geometry is the orthogonal grid it will be resampled onto.
    """
    pos = np.asarray(positions, dtype=float).reshape(-1, 3)
    if not np.all(np.isfinite(pos)):
        raise _Refusal("missing ImagePositionPatient")
    ps = np.asarray(pixel_spacing, dtype=float).reshape(-1)
    if ps.size != 2 or not np.all(ps > 0):
        raise _Refusal("missing or invalid PixelSpacing")
    dy, dx = float(ps[0]), float(ps[1])  # PixelSpacing = (between rows, between columns)
    r, c, n = _unit_axes(iop)
    if len(pos) < 2:
        raise _Refusal("single slice (not a volume)")
    t = pos @ n
    order = np.argsort(t, kind="stable")
    t, pos = t[order], pos[order]
    steps = np.diff(t)
    if np.any(steps < DUPLICATE_POSITION_TOL_MM):
        k = int(np.sum(steps < DUPLICATE_POSITION_TOL_MM))
        raise _Refusal(f"duplicate slice positions ({k} slice(s) at an already occupied position)")
    med = float(np.median(steps))
    dev = np.abs(steps - med) > gap_tolerance * med
    if np.any(dev):
        big = steps[steps > (1 + gap_tolerance) * med]
        if big.size and np.all(np.abs(steps[dev] / med - np.round(steps[dev] / med)) <= gap_tolerance) and \
                np.all(steps[dev] > med):
            missing = int(np.sum(np.round(big / med) - 1))
            raise _Refusal(f"missing slice(s): about {missing} missing, gap of {big.max():.2f} mm where slices "
                           f"are {med:.2f} mm apart")
        raise _Refusal(f"uneven slice spacing: steps from {steps.min():.2f} to {steps.max():.2f} mm (median "
                       f"{med:.2f} mm, tolerance {gap_tolerance:.0%})")
    # in-plane coordinates of each slice origin; a regular stack has them on a straight line in t
    u, v = pos @ r, pos @ c
    tc = t - t[0]
    A = np.stack([np.ones_like(tc), tc], axis=1)
    (u0, a), res_u = np.linalg.lstsq(A, u, rcond=None)[:2]
    (v0, b), res_v = np.linalg.lstsq(A, v, rcond=None)[:2]
    dev_u = np.abs(u - (u0 + a * tc)).max() / dx
    dev_v = np.abs(v - (v0 + b * tc)).max() / dy
    if max(dev_u, dev_v) > COLLINEAR_TOL_PX:
        raise _Refusal(f"slice positions do not lie on one line (off by up to {max(dev_u, dev_v):.2f} pixels)")
    extent = float(t[-1] - t[0])
    dz = extent / (len(t) - 1)
    drift_x, drift_y = a * extent / dx, b * extent / dy
    tilt_deg = math.degrees(math.atan(math.hypot(a, b)))
    direction = tuple(float(x) for x in np.stack([r, c, n], axis=1).reshape(-1))
    if max(abs(drift_x), abs(drift_y)) <= TILT_DRIFT_TOL_PX:
        geom = Geometry(size=(int(columns), int(rows), len(t)), spacing=(dx, dy, dz),
                        origin=tuple(float(x) for x in pos[0]), direction=direction)
        return geom, order
    if not allow_tilt:
        raise _Refusal(f"gantry tilt of {tilt_deg:.1f} degrees (resampling disabled by configuration)")
    # orthogonal grid that contains every sheared slice; slice 0 keeps its own pixel lattice
    mx = int(math.ceil(abs(drift_x) - 1e-6))
    my = int(math.ceil(abs(drift_y) - 1e-6))
    ox = -mx if drift_x < 0 else 0
    oy = -my if drift_y < 0 else 0
    origin = pos[0] + ox * dx * r + oy * dy * c
    geom = Geometry(size=(int(columns) + mx, int(rows) + my, len(t)), spacing=(dx, dy, dz),
                    origin=tuple(float(x) for x in origin), direction=direction, tilt_deg=tilt_deg,
                    shear=(float(a), float(b)))
    return geom, order


# ------------------------------------------------------------------------------------------- catalog side
def _s(v: Any) -> str:
    if _isnan(v):
        return ""
    return str(v).strip()


def _f(v: Any) -> float | None:
    if v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _vec(v: Any, n: int) -> np.ndarray | None:
    """``v`` as n finite floats, or None (missing, wrong length, not numbers)."""
    if v is None or isinstance(v, (str, bytes, float, int)):
        return None
    try:
        vals = [float(x) for x in v]
    except (TypeError, ValueError):
        return None
    if len(vals) != n or not all(math.isfinite(x) for x in vals):
        return None
    return np.array(vals)


def _image_type_tokens(v: Any) -> list[str]:
    if v is None or _isnan(v):
        return []
    if not isinstance(v, (str, bytes)):
        try:
            return [str(x).strip().upper() for x in v]
        except TypeError:
            pass
    return [x.strip().upper() for x in _s(v).split("\\")] if _s(v) else []


def non_volume_reason(image_type: Any, sop_class_uid: Any, rows: Any = None) -> str | None:
    """Why instances of this kind never enter a volume (localizer, derived, non-image), or None."""
    sop = _s(sop_class_uid)
    tokens = _image_type_tokens(image_type)
    if sop.startswith(_SECONDARY_CAPTURE_PREFIX):
        return "secondary capture (not an acquired image)"
    if sop and sop not in IMAGE_SOP_CLASSES:
        return f"not a CT/MR image (SOP class {sop})"
    if not _f(rows):
        return "no image pixels"
    if "LOCALIZER" in tokens or "SCOUT" in tokens:
        return "localizer/scout (ImageType " + "\\".join(tokens) + ")"
    if (tokens[:1] == ["DERIVED"]) or (len(tokens) > 1 and tokens[1] == "SECONDARY"):
        return "derived/secondary image (ImageType " + "\\".join(tokens) + ")"
    return None


def _orientation_clusters(iops: list[np.ndarray | None]) -> list[int]:
    reps: list[np.ndarray] = []
    out = []
    for v in iops:
        if v is None:
            out.append(-1)
            continue
        for i, rep in enumerate(reps):
            if np.max(np.abs(rep - v)) <= ORIENTATION_TOL:
                out.append(i)
                break
        else:
            reps.append(v)
            out.append(len(reps) - 1)
    return out


def _stack_info(rows: list[dict]) -> dict[str, Any]:
    first = rows[0]

    def most_common(name: str) -> Any:
        vals = [_s(r.get(name)) for r in rows if _s(r.get(name))]
        return Counter(vals).most_common(1)[0][0] if vals else None

    iop = _vec(first.get("image_orientation"), 6)
    return {
        "patient_id": _s(first.get("patient_id")),
        "study_uid": _s(first.get("study_uid")),
        "modality": _s(first.get("modality")).upper(),
        "description": _s(first.get("series_description")),
        "series_number": _f(first.get("series_number")),
        "image_type": most_common("image_type") or "",
        "study_date": _s(first.get("study_date")),
        "series_date": _s(first.get("series_date")),
        "slice_thickness": _f(first.get("slice_thickness")),
        "convolution_kernel": most_common("convolution_kernel") or "",
        "body_part": _s(first.get("body_part")),
        "echo_time": _f(first.get("echo_time")),
        "repetition_time": _f(first.get("repetition_time")),
        "inversion_time": _f(first.get("inversion_time")),
        "scanning_sequence": _s(first.get("scanning_sequence")),
        "sequence_variant": _s(first.get("sequence_variant")),
        "sequence_name": _s(first.get("sequence_name")),
        "mr_acquisition_type": _s(first.get("mr_acquisition_type")),
        "contrast_agent": _s(first.get("contrast_agent")),
        "n_files": len(rows),
        "image_orientation": None if iop is None else [float(x) for x in iop],
        "rows": _f(first.get("rows")),
        "columns": _f(first.get("columns")),
    }


def _group_key(row: dict) -> tuple:
    ps = _vec(row.get("pixel_spacing"), 2)
    et = _f(row.get("echo_time"))
    return (
        int(_f(row.get("rows")) or 0), int(_f(row.get("columns")) or 0),
        (round(float(ps[0]), 4), round(float(ps[1]), 4)) if ps is not None else None,
        _s(row.get("echo_numbers")), None if et is None else round(et, 2),
        _s(row.get("image_type")).upper(),
    )


def _records(rows: Any) -> list[dict]:
    if isinstance(rows, list):
        return [dict(r) for r in rows]
    return rows.to_dict("records")


def _frames(r: dict) -> int:
    return int(_f(r.get("number_of_frames")) or 1)


def stacks_from_catalog(rows: Any, config: PlanConfig | None = None) -> list[Stack]:
    """Split one series' catalog rows into geometric stacks, each usable (with geometry) or refused (with reason).

    ``rows``: a DataFrame (or list of dicts) with the scan's columns, all of one SeriesInstanceUID.
    Splits by orientation, matrix size/pixel spacing, echo and image type; by acquisition only when that
    resolves repeated positions (CT acquisitions often split one contiguous stack, which stays whole). Drops
    localizers, scouts, derived/secondary and non-image objects with reasons. Two files of one SOP instance
    count once. A file with a read error is never used, and a stack it may belong to is refused rather than
    assembled around the hole.
    """
    config = config or PlanConfig()
    recs = [r for r in _records(rows) if not (not _isnan(r.get("is_dicomdir")) and bool(r.get("is_dicomdir")))]
    if not recs:
        return []
    series_uid = _s(recs[0].get("series_uid"))
    problems = [file_problem(r) for r in recs]
    bad = [(r, p) for r, p in zip(recs, problems) if p]
    recs = sorted((r for r, p in zip(recs, problems) if not p), key=lambda r: str(r.get("url")))
    out: list[Stack] = []

    def new_stack(sub: list[dict], suffix: str, refused: str | None = None, notes: list[str] | None = None) -> Stack:
        return Stack(key=series_uid + suffix, series_uid=series_uid, urls=tuple(str(r["url"]) for r in sub),
                     refused=refused, notes=list(notes or []), info=_stack_info(sub))

    # kinds of instance that never enter a volume
    kept: list[dict] = []
    never: dict[str, list[dict]] = {}
    for r in recs:
        why = non_volume_reason(r.get("image_type"), r.get("sop_class_uid"), r.get("rows"))
        if why:
            never.setdefault(why, []).append(r)
        else:
            kept.append(r)
    for why in sorted(never):
        out.append(new_stack(never[why], "", refused=why))

    groups: list[tuple[str, list[dict]]] = []
    for r in kept:
        if _frames(r) > 1:
            groups.append(("multi-frame object", [r]))
    single = [r for r in kept if _frames(r) <= 1]
    if single:
        orient = _orientation_clusters([_vec(r.get("image_orientation"), 6) for r in single])
        parts: dict[tuple, list[dict]] = {}
        for o, r in zip(orient, single):
            parts.setdefault((o, _group_key(r)), []).append(r)
        n_orient = len(set(orient))
        for (o, _), sub in parts.items():
            label = []
            if n_orient > 1:
                label.append(f"orientation {o + 1} of {n_orient}" if o >= 0 else "no orientation")
            if len(parts) > n_orient:
                label.append("echo/image type/matrix group")
            groups.append((", ".join(label), sub))

    # dedupe, split by acquisition when positions repeat, then geometry
    final: list[tuple[list[dict], list[str], str | None]] = []
    for label, sub in groups:
        notes = [label] if label else []
        seen: set[str] = set()
        dedup = []
        for r in sub:
            sop = _s(r.get("sop_instance_uid"))
            if sop and sop in seen:
                continue
            seen.add(sop)
            dedup.append(r)
        if len(dedup) < len(sub):
            notes.append(f"{len(sub) - len(dedup)} duplicate file(s) of one instance ignored")
        sub = dedup
        if len(sub) == 1 and _frames(sub[0]) > 1:
            final.append((sub, notes, None))
            continue
        pos = [_vec(r.get("image_position"), 3) for r in sub]
        if any(p is None for p in pos):
            final.append((sub, notes, "missing ImagePositionPatient"))
            continue
        try:
            iop = _vec(sub[0].get("image_orientation"), 6)
            _, _, nrm = _unit_axes(iop if iop is not None else [np.nan] * 6)
        except _Refusal as err:
            final.append((sub, notes, str(err)))
            continue
        t = np.asarray(pos) @ nrm
        if _has_repeats(t):
            acq = [_s(r.get("acquisition_number")) for r in sub]
            values = sorted(set(acq), key=_num_key)
            if len(values) > 1 and not any(_has_repeats(t[[a == v for a in acq]]) for v in values):
                for v in values:
                    final.append(([r for r, a in zip(sub, acq) if a == v], notes + [f"acquisition {v}"], None))
                continue
            k = int(len(t) - len(_unique_positions(t)))
            final.append((sub, notes, f"duplicate slice positions: {k} image(s) at an already occupied position "
                                      "with a different instance"))
            continue
        final.append((sub, notes, None))

    multi_stack = len(final) > 1
    for i, (sub, notes, refused) in enumerate(final):
        suffix = f"#{i + 1}" if multi_stack else ""
        st = new_stack(sub, suffix, refused=refused, notes=notes)
        if not refused:
            try:
                st.geometry, order = _catalog_geometry(sub, config)
                st.urls = tuple(st.urls[j] for j in order)
                if st.geometry.tilt_deg:
                    st.notes.append(f"gantry tilt {st.geometry.tilt_deg:.1f} degrees: resampled onto an "
                                    "orthogonal grid")
            except _Refusal as err:
                st.refused = str(err)
        out.append(st)

    # a file of the series that cannot be read may be a slice of a stack: never assemble around the hole
    good_sops = {_s(r.get("sop_instance_uid")) for r in recs} - {""}
    for b, problem in bad:
        if _s(b.get("sop_instance_uid")) in good_sops:
            continue
        b_iop, b_rows, b_cols = _vec(b.get("image_orientation"), 6), _f(b.get("rows")), _f(b.get("columns"))
        for st in out:
            if not st.usable:
                continue
            s_iop = st.info.get("image_orientation")
            if b_iop is not None and s_iop is not None and np.max(np.abs(b_iop - np.asarray(s_iop))) > ORIENTATION_TOL:
                continue
            if b_rows and b_cols and (b_rows, b_cols) != (st.info.get("rows"), st.info.get("columns")):
                continue
            st.refused = f"a file of this stack is unreadable ({problem})"
    return out


def file_problem(row: Any) -> str:
    """Why a catalog row cannot be used as an image file ('' when it can): its read error, or missing pixels."""
    err = _s(row.get("read_error"))
    if err:
        return err
    ok = row.get("pixel_data_ok")
    if ok is not None and not _isnan(ok) and not bool(ok) and (_f(row.get("rows")) or 0) > 0:
        return "pixel data missing or truncated"
    return ""


def _num_key(x: str) -> tuple:
    try:
        return (0, float(x), "")
    except ValueError:
        return (1, 0.0, x)


def _unique_positions(t: np.ndarray) -> np.ndarray:
    s = np.sort(np.asarray(t, float))
    if s.size == 0:
        return s
    keep = np.concatenate([[True], np.diff(s) >= DUPLICATE_POSITION_TOL_MM])
    return s[keep]


def _has_repeats(t: np.ndarray) -> bool:
    return len(_unique_positions(t)) < len(t)


def _catalog_geometry(sub: list[dict], config: PlanConfig) -> tuple[Geometry, np.ndarray]:
    r0 = sub[0]
    iop = _vec(r0.get("image_orientation"), 6)
    ps = _vec(r0.get("pixel_spacing"), 2)
    if iop is None:
        raise _Refusal("missing ImageOrientationPatient")
    if ps is None:
        raise _Refusal("missing PixelSpacing")
    rows, cols = int(_f(r0.get("rows")) or 0), int(_f(r0.get("columns")) or 0)
    nf = _frames(r0)
    if len(sub) == 1 and nf > 1:
        fp = r0.get("frame_positions")
        try:
            pos = np.asarray([list(p) for p in fp], dtype=float).reshape(-1, 3)
        except (TypeError, ValueError):
            raise _Refusal("multi-frame object without per-frame positions") from None
        if len(pos) != nf:
            raise _Refusal("multi-frame object without per-frame positions")
        if _has_repeats(pos @ _unit_axes(iop)[2]):
            raise _Refusal("multi-frame object holds several frames at one position (more than one volume)")
        geom, _ = stack_geometry(pos, iop, ps, rows, cols, config.gap_tolerance, config.allow_gantry_tilt)
        return geom, np.zeros(1, dtype=int)
    pos = np.asarray([_vec(r.get("image_position"), 3) for r in sub], dtype=float)
    return stack_geometry(pos, iop, ps, rows, cols, config.gap_tolerance, config.allow_gantry_tilt)


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


def _plan_config(config: Any) -> PlanConfig:
    if config is None:
        return PlanConfig()
    return getattr(config, "plan", config)


def fetch_bytes(urls: Sequence[str], storage_options: dict | None = None) -> list[bytes | Exception]:
    """Whole-file bytes for each URL (local paths read directly; object storage fetched concurrently)."""
    urls = list(urls)
    if not urls:
        return []
    if all("://" not in u or u.startswith("file://") for u in urls):
        out: list[bytes | Exception] = []
        for u in urls:
            try:
                with open(u[7:] if u.startswith("file://") else u, "rb") as fh:
                    out.append(fh.read())
            except OSError as exc:
                out.append(exc)
        return out
    from .io import get_fs

    fs, _ = get_fs(urls[0], storage_options)
    paths = [fs._strip_protocol(u) for u in urls]
    got = fs.cat(paths, on_error="return")
    if not isinstance(got, dict):  # a single path gives bytes
        got = {paths[0]: got}
    return [got.get(p, FileNotFoundError(p)) for p in paths]


def _parse(data: bytes) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

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
                config: Any = None) -> "sitk.Image":  # noqa: F821
    """Read one stack of DICOM files into a float32 SimpleITK image in LPS (see the module docstring).

    ``config`` is a :class:`PlanConfig` (or a whole Config). Raises :class:`VolumeError` with a reason naming
    the series (description and number) for anything that would make the volume untrustworthy.
    """
    cfg = _plan_config(config)
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
        label = next((series_label(d.get("SeriesDescription"), d.get("SeriesNumber")) for d in datasets),
                     "series (unreadable)")
    except Exception:  # pydicom converts values lazily: a malformed one raises on first access
        label = "series (malformed description)"
    if problems:
        raise VolumeError(f"{label}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    try:
        return _assemble(datasets, label, cfg)
    except VolumeError:
        raise
    except Exception as exc:  # a malformed value anywhere (bad VR, wrong length, missing tag) refuses the series
        msg = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise VolumeError(f"{label}: malformed DICOM ({type(exc).__name__}: {msg})") from None


def _assemble(datasets: list[Any], label: str, cfg: PlanConfig) -> "sitk.Image":  # noqa: F821
    import SimpleITK as sitk

    modality = str(datasets[0].get("Modality", "")).upper()
    fill = CT_FILL if modality == "CT" else MR_FILL
    for d in datasets:
        why = non_volume_reason(d.get("ImageType"), d.get("SOPClassUID"), d.get("Rows"))
        if why:
            raise VolumeError(f"{label}: instance {d.get('InstanceNumber', '?')} is a {why}")
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
            n_orient = len(_set_of_orientations([x.iop for x in slices]))
            raise VolumeError(f"{label}: mixed orientations ({n_orient} different ImageOrientationPatient)")
        if (s.rows, s.columns) != (ref.rows, ref.columns) or np.max(np.abs(s.spacing - ref.spacing)) > 1e-4:
            raise VolumeError(f"{label}: slices differ in matrix size or pixel spacing")

    try:
        _, _, nrm = _unit_axes(ref.iop)
    except _Refusal as err:
        raise VolumeError(f"{label}: {err}") from None
    slices = _drop_identical_repeats(slices, nrm, fill, label)
    positions = np.stack([s.position for s in slices])
    try:
        geom, order = stack_geometry(positions, ref.iop, ref.spacing, ref.rows, ref.columns, cfg.gap_tolerance,
                                     cfg.allow_gantry_tilt)
    except _Refusal as err:
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


def _set_of_orientations(iops: Iterable[np.ndarray]) -> list[np.ndarray]:
    reps: list[np.ndarray] = []
    for v in iops:
        if not any(np.max(np.abs(v - r)) <= ORIENTATION_TOL for r in reps):
            reps.append(v)
    return reps


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


# ------------------------------------------------------------------------------------------- export
@dataclass
class ExportSummary:
    written: list[tuple[str, str]] = field(default_factory=list)  # (output URL, series label + stack note)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (series label, reason)
    files_with_errors: int = 0

    def describe(self) -> str:
        lines = [f"exported {len(self.written)} volume(s); refused {len(self.refused)} stack(s)"
                 + (f"; {self.files_with_errors} unreadable file(s) skipped" if self.files_with_errors else "")]
        for out, what in self.written:
            lines.append(f"  wrote {out}  <- {what}")
        by_reason = Counter(reason for _, reason in self.refused)
        for what, reason in self.refused:
            lines.append(f"  refused {what}: {reason}")
        if len(self.refused) > 20:
            lines = lines[:1] + [f"  wrote {o}  <- {w}" for o, w in self.written] + \
                [f"  refused {n}: {r}" for r, n in by_reason.most_common()]
        return "\n".join(lines)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:40] or "series"


def _write_image(img: Any, out_url: str, storage_options: dict | None) -> None:
    import os
    import tempfile

    import SimpleITK as sitk

    if "://" not in out_url or out_url.startswith("file://"):
        path = out_url[7:] if out_url.startswith("file://") else out_url
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        sitk.WriteImage(img, path, useCompression=path.endswith(".gz"))
        return
    from .io import write_bytes

    suffix = ".nii.gz" if out_url.endswith(".nii.gz") else os.path.splitext(out_url)[1] or ".nii.gz"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "volume" + suffix)
        sitk.WriteImage(img, path, useCompression=suffix.endswith(".gz"))
        with open(path, "rb") as fh:
            write_bytes(out_url, fh.read(), storage_options)


def _load_catalog(input_url: str, catalog: str | None, storage_options: dict | None, progress: bool) -> Any:
    import pandas as pd

    if catalog:
        from .io import get_fs

        fs, path = get_fs(catalog, storage_options)
        with fs.open(path, "rb") as fh:
            return pd.read_parquet(fh)
    from .scan import scan

    return scan(input_url, storage_options=storage_options, progress=progress)


def export_series_command(input_url: str, series_uid: str | None = None, out: str | None = None,
                          all_dir: str | None = None, catalog: str | None = None,
                          storage_options: dict | None = None, progress: bool = False,
                          config: Any = None) -> ExportSummary:
    """Write one series (``series_uid`` -> ``out``) or every usable stack (-> ``all_dir``) as NIfTI/NRRD/MHA.

    Geometry is kept in physical space (the writer converts LPS to the file format's convention). A series that
    splits into several usable stacks is written once per stack (``name_2.nii.gz``...). File names under
    ``all_dir`` use modality, series number, description and a short hash of the series UID, never patient data.
    """
    import hashlib

    from .io import join

    if not all_dir and not (series_uid and out):
        from .errors import ConfigError

        raise ConfigError("give a series UID and an output file, or an output folder for every usable series")
    cfg = _plan_config(config)
    cat = _load_catalog(input_url, catalog, storage_options, progress)
    summary = ExportSummary()
    if "read_error" in cat.columns:
        summary.files_with_errors = int(cat["read_error"].map(lambda x: bool(_s(x))).sum())
    if series_uid:
        cat = cat[cat["series_uid"].map(_s) == series_uid]
        if len(cat) == 0:
            from .errors import InputError

            raise InputError("no file of the requested series was found under the input")
    cat = cat[cat["series_uid"].map(lambda x: bool(_s(x)))]
    groups = list(cat.groupby("series_uid", sort=True))
    bar = _progress(len(groups), progress)
    for uid, rows in groups:
        stacks = stacks_from_catalog(rows, cfg)
        usable = [s for s in stacks if s.usable]
        for st in stacks:
            if not st.usable:
                summary.refused.append((f"{st.info.get('modality', '')} {st.label}".strip(), str(st.refused)))
        for i, st in enumerate(usable):
            what = f"{st.info.get('modality', '')} {st.label}".strip()
            if st.notes:
                what += f" ({'; '.join(st.notes)})"
            if series_uid:
                target = out if i == 0 else _numbered(out, i + 1)
            else:
                tag = hashlib.sha256(str(uid).encode()).hexdigest()[:8]
                num = st.info.get("series_number")
                name = f"{st.info.get('modality') or 'XX'}_{int(num) if num is not None else 0}_" \
                       f"{_safe_name(st.info.get('description') or '')}_{tag}" + (f"_{i + 1}" if i else "")
                target = join(all_dir, name + ".nii.gz")
            try:
                img = read_volume(st.urls, storage_options, cfg)
            except VolumeError as err:
                summary.refused.append((what, str(err).split(": ", 1)[-1]))
                continue
            _write_image(img, target, storage_options)
            summary.written.append((target, what))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if series_uid and not summary.written:
        reasons = "; ".join(sorted({r for _, r in summary.refused})) or "no image stack"
        raise VolumeError(f"the requested series cannot be exported: {reasons}")
    return summary


def _numbered(url: str, k: int) -> str:
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if url.endswith(ext):
            return f"{url[:-len(ext)]}_{k}{ext}"
    return f"{url}_{k}"


def _progress(total: int, enabled: bool) -> Any:
    """A rich progress bar on stderr (``.update(1)``, ``.close()``), or None when disabled."""
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import Progress

    prog = Progress(console=Console(stderr=True), transient=True)
    prog.start()
    task = prog.add_task("export", total=total)

    class _Bar:
        def update(self, n: int) -> None:
            prog.advance(task, n)

        def close(self) -> None:
            prog.stop()

    return _Bar()
