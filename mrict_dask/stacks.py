"""Catalog rows (headers only) -> geometric stacks of one series, each usable (with geometry) or refused with a reason.

The plan chooses among the usable stacks without reading pixels; :mod:`mrict_dask.volume` re-checks everything on
the actual files. Reasons name the series by its description and number, never by patient or file name.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import PlanConfig
from .geometry import ORIENTATION_TOL, Geometry, Refusal, has_repeats, stack_geometry, unique_positions, unit_axes
from .values import is_missing, is_number, number, text, vector

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
    desc = text(description) or "(no description)"
    if is_missing(number) or text(number) == "":
        num = "?"
    else:
        num = str(int(float(number))) if is_number(number) else text(number)
    return f"series '{desc}' #{num}"

def _image_type_tokens(v: Any) -> list[str]:
    if v is None or is_missing(v):
        return []
    if not isinstance(v, (str, bytes)):
        try:
            return [str(x).strip().upper() for x in v]
        except TypeError:
            pass
    return [x.strip().upper() for x in text(v).split("\\")] if text(v) else []


def non_volume_reason(image_type: Any, sop_class_uid: Any, rows: Any = None) -> str | None:
    """Why instances of this kind never enter a volume (localizer, derived, non-image), or None."""
    sop = text(sop_class_uid)
    tokens = _image_type_tokens(image_type)
    if sop.startswith(_SECONDARY_CAPTURE_PREFIX):
        return "secondary capture (not an acquired image)"
    if sop and sop not in IMAGE_SOP_CLASSES:
        return f"not a CT/MR image (SOP class {sop})"
    if not number(rows):
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
        vals = [text(r.get(name)) for r in rows if text(r.get(name))]
        return Counter(vals).most_common(1)[0][0] if vals else None

    iop = vector(first.get("image_orientation"), 6)
    return {
        "patient_id": text(first.get("patient_id")),
        "study_uid": text(first.get("study_uid")),
        "modality": text(first.get("modality")).upper(),
        "description": text(first.get("series_description")),
        "series_number": number(first.get("series_number")),
        "image_type": most_common("image_type") or "",
        "study_date": text(first.get("study_date")),
        "series_date": text(first.get("series_date")),
        "slice_thickness": number(first.get("slice_thickness")),
        "convolution_kernel": most_common("convolution_kernel") or "",
        "body_part": text(first.get("body_part")),
        "echo_time": number(first.get("echo_time")),
        "repetition_time": number(first.get("repetition_time")),
        "inversion_time": number(first.get("inversion_time")),
        "scanning_sequence": text(first.get("scanning_sequence")),
        "sequence_variant": text(first.get("sequence_variant")),
        "sequence_name": text(first.get("sequence_name")),
        "mr_acquisition_type": text(first.get("mr_acquisition_type")),
        "contrast_agent": text(first.get("contrast_agent")),
        "n_files": len(rows),
        "image_orientation": None if iop is None else [float(x) for x in iop],
        "rows": number(first.get("rows")),
        "columns": number(first.get("columns")),
    }


def _group_key(row: dict) -> tuple:
    ps = vector(row.get("pixel_spacing"), 2)
    et = number(row.get("echo_time"))
    return (
        int(number(row.get("rows")) or 0), int(number(row.get("columns")) or 0),
        (round(float(ps[0]), 4), round(float(ps[1]), 4)) if ps is not None else None,
        text(row.get("echo_numbers")), None if et is None else round(et, 2),
        text(row.get("image_type")).upper(),
    )


def _records(rows: Any) -> list[dict]:
    if isinstance(rows, list):
        return [dict(r) for r in rows]
    return rows.to_dict("records")


def _frames(r: dict) -> int:
    return int(number(r.get("number_of_frames")) or 1)


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
    recs = [r for r in _records(rows) if not (not is_missing(r.get("is_dicomdir")) and bool(r.get("is_dicomdir")))]
    if not recs:
        return []
    series_uid = text(recs[0].get("series_uid"))
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
        orient = _orientation_clusters([vector(r.get("image_orientation"), 6) for r in single])
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
            sop = text(r.get("sop_instance_uid"))
            if sop and sop in seen:
                continue
            seen.add(sop)
            dedup.append(r)
        if len(dedup) < len(sub):
            notes.append(f"{len(sub) - len(dedup)} duplicate file(s) of one instance ignored")
        sub = dedup  # noqa: PLW2901 - the deduplicated group replaces the group from here on
        if len(sub) == 1 and _frames(sub[0]) > 1:
            final.append((sub, notes, None))
            continue
        pos = [vector(r.get("image_position"), 3) for r in sub]
        if any(p is None for p in pos):
            final.append((sub, notes, "missing ImagePositionPatient"))
            continue
        try:
            iop = vector(sub[0].get("image_orientation"), 6)
            _, _, nrm = unit_axes(iop if iop is not None else [np.nan] * 6)
        except Refusal as err:
            final.append((sub, notes, str(err)))
            continue
        t = np.asarray(pos) @ nrm
        if has_repeats(t):
            acq = [text(r.get("acquisition_number")) for r in sub]
            values = sorted(set(acq), key=_num_key)
            if len(values) > 1 and not any(has_repeats(t[[a == v for a in acq]]) for v in values):
                for v in values:
                    final.append(([r for r, a in zip(sub, acq) if a == v], notes + [f"acquisition {v}"], None))
                continue
            k = int(len(t) - len(unique_positions(t)))
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
            except Refusal as err:
                st.refused = str(err)
        out.append(st)

    # a file of the series that cannot be read may be a slice of a stack: never assemble around the hole
    good_sops = {text(r.get("sop_instance_uid")) for r in recs} - {""}
    for b, problem in bad:
        if text(b.get("sop_instance_uid")) in good_sops:
            continue
        b_iop, b_rows, b_cols = vector(b.get("image_orientation"), 6), number(b.get("rows")), number(b.get("columns"))
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
    err = text(row.get("read_error"))
    if err:
        return err
    ok = row.get("pixel_data_ok")
    if ok is not None and not is_missing(ok) and not bool(ok) and (number(row.get("rows")) or 0) > 0:
        return "pixel data missing or truncated"
    return ""


def _num_key(x: str) -> tuple:
    try:
        return (0, float(x), "")
    except ValueError:
        return (1, 0.0, x)

def _catalog_geometry(sub: list[dict], config: PlanConfig) -> tuple[Geometry, np.ndarray]:
    r0 = sub[0]
    iop = vector(r0.get("image_orientation"), 6)
    ps = vector(r0.get("pixel_spacing"), 2)
    if iop is None:
        raise Refusal("missing ImageOrientationPatient")
    if ps is None:
        raise Refusal("missing PixelSpacing")
    rows, cols = int(number(r0.get("rows")) or 0), int(number(r0.get("columns")) or 0)
    nf = _frames(r0)
    if len(sub) == 1 and nf > 1:
        fp = r0.get("frame_positions")
        try:
            pos = np.asarray([list(p) for p in fp], dtype=float).reshape(-1, 3)
        except (TypeError, ValueError):
            raise Refusal("multi-frame object without per-frame positions") from None
        if len(pos) != nf:
            raise Refusal("multi-frame object without per-frame positions")
        if has_repeats(pos @ unit_axes(iop)[2]):
            raise Refusal("multi-frame object holds several frames at one position (more than one volume)")
        geom, _ = stack_geometry(pos, iop, ps, rows, cols, config.gap_tolerance, config.allow_gantry_tilt)
        return geom, np.zeros(1, dtype=int)
    pos = np.asarray([vector(r.get("image_position"), 3) for r in sub], dtype=float)
    return stack_geometry(pos, iop, ps, rows, cols, config.gap_tolerance, config.allow_gantry_tilt)
