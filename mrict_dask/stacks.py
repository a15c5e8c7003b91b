"""Catalog rows (headers only) -> geometric stacks of one series, each usable (with geometry) or refused with a reason.

The plan chooses among the usable stacks without reading pixels; :mod:`mrict_dask.volume` re-checks everything on
the actual files. Reasons name the series by its description and number, never by patient or file name.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .columns import Coded, Columns
from .config import PlanConfig
from .geometry import (
    DUPLICATE_POSITION_TOL_MM,
    ORIENTATION_TOL,
    Geometry,
    Refusal,
    has_repeats,
    stack_geometry,
    unique_positions,
    unit_axes,
)
from .values import is_missing, is_number, number, text

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
# Objects that travel with images but are none (first matching prefix names them in reasons).
NON_IMAGE_SOP_CLASSES = (
    ("1.2.840.10008.5.1.4.1.1.66.4", "segmentation (SEG)"),
    ("1.2.840.10008.5.1.4.1.1.66", "registration or raw data object"),
    ("1.2.840.10008.5.1.4.1.1.481.3", "RT structure set (RTSTRUCT)"),
    ("1.2.840.10008.5.1.4.1.1.481.2", "RT dose (RTDOSE)"),
    ("1.2.840.10008.5.1.4.1.1.481", "radiotherapy object (RT)"),
    ("1.2.840.10008.5.1.4.1.1.88.59", "key object selection (KO)"),
    ("1.2.840.10008.5.1.4.1.1.88", "structured report (SR)"),
    ("1.2.840.10008.5.1.4.1.1.11", "presentation state (PR)"),
    ("1.2.840.10008.5.1.4.1.1.104", "encapsulated document"),
)
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
SCOUT_TOKENS = {"LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW"}
SCOUT_WORDS = re.compile(r"(?<![a-z])(scout|topogram|topo|locali[sz]er|loc|surview|scanogram|survey|pilot)"
                         r"(?![a-z])", re.I)
"""A series description naming a scout, whatever its ImageType says (some exports leave LOCALIZER out)."""
PROJECTION_TOKENS = {"MIP", "MINIP", "MNIP", "MAX_IP", "MIN_IP", "MAXIP", "MINIMUM", "MAXIMUM", "PROJECTION IMAGE",
                     "VOLUME RENDERING", "VR", "SSD", "CPR", "CURVED"}
SUBTRACTION_TOKENS = {"SUBTRACTION", "SUB", "SUBTRACT", "DIFFERENCE"}
MAP_TOKENS = {"ADC", "EADC", "FA", "TRACE", "TRACEW", "TENSOR", "CBF", "CBV", "MTT", "TTP", "TMAX", "T1 MAP",
              "T2 MAP", "T1MAP", "T2MAP", "T2_STAR_MAP", "R2_STAR", "R2STAR", "MOSAIC", "FUSED", "COLOR", "COLOUR"}
"""ImageType values of derived images that are not a tissue volume: projections, subtractions, parameter maps,
fused or colour images, mosaics. Other derived images (reformats, MPRs) are volumes, ranked after originals."""
NOT_MAGNITUDE_TOKENS = {"P", "PHASE", "R", "REAL", "I", "IMAGINARY", "F", "FAT", "FAT_ONLY"}
"""ImageType values of MR images that hold phase, real or imaginary parts, or the fat-only image of a Dixon
series: not the tissue magnitude a T1 volume needs (the water, in-phase and magnitude images are)."""


@dataclass(frozen=True)
class Split:
    """This volume's place among the volumes of one series that hold the same positions (4D, repeats).

    ``kind``: "diffusion" (b-value and gradient direction), "dynamic" (time points: perfusion, DCE, fMRI),
    "echo" (multi-echo) or "repeat" (a few repeated acquisitions); ``by``: the tags that told them apart.
    """

    group: int  # the split within its series (one series can hold several, e.g. one per orientation)
    index: int
    count: int
    kind: str
    by: str
    label: str  # this volume, e.g. "b=1000 direction (0.71, 0.71, 0.00)", "time point 3 of 20", "echo 2"

    @property
    def name(self) -> str:
        """A file-name-safe tag of this volume, unique within its series: its number, then its label."""
        return f"v{self.index + 1:03d}_" + re.sub(r"[^A-Za-z0-9]+", "_", self.label).strip("_")[:60]


DYNAMIC_MIN_VOLUMES = 3
"""Volumes told apart by time (or acquisition) from this many on are a dynamic series (perfusion, DCE, fMRI);
two are repeated acquisitions, each a candidate volume."""


@dataclass(eq=False)
class Stack:
    """One geometric stack of a series: the unit that becomes one volume (or is refused with a reason)."""

    key: str  # private: the series UID, plus "#n" when the series splits into several stacks
    series_uid: str
    rows: np.ndarray  # catalog rows, in spatial order (ascending along the slice normal) when usable
    columns: Columns | None = field(default=None, repr=False)  # the catalog the rows index
    geometry: Geometry | None = None
    refused: str | None = None  # the reason, PHI-free; None when usable
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # header facts the selection rules use
    split: Split | None = None  # set when this stack is one volume of a series holding several

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(self.columns.urls(self.rows)) if self.columns is not None else ()

    @property
    def n_files(self) -> int:
        return len(self.rows)

    @property
    def usable(self) -> bool:
        return self.refused is None and self.geometry is not None

    @property
    def label(self) -> str:
        return series_label(self.info.get("series_number"))


def series_label(number: Any) -> str:
    """How reasons name a series: by its SeriesNumber only. Reasons reach the store, the report and the logs,
    and free-text tags (SeriesDescription above all) can hold what a site typed in: names, record numbers,
    dates. The private plan keeps each series' description."""
    if is_missing(number) or text(number) == "":
        return "series #?"
    return f"series #{int(float(number)) if is_number(number) else text(number)}"

def _image_type_tokens(v: Any) -> list[str]:
    if v is None or is_missing(v):
        return []
    if not isinstance(v, (str, bytes)):
        try:
            return [str(x).strip().upper() for x in v]
        except TypeError:
            pass
    return [x.strip().upper() for x in text(v).split("\\")] if text(v) else []


def non_volume_reason(image_type: Any, sop_class_uid: Any, rows: Any = None, photometric: Any = None,
                      description: Any = None) -> str | None:
    """Why instances of this kind never enter a volume (non-image objects, colour images, scouts, projections,
    subtractions, parameter maps), or None. Derived reformats are volumes (ranked after originals)."""
    sop = text(sop_class_uid)
    tokens = _image_type_tokens(image_type)
    shown = "\\".join(tokens)
    if sop.startswith(_SECONDARY_CAPTURE_PREFIX):
        return "secondary capture (not an acquired image)"
    if sop and sop not in IMAGE_SOP_CLASSES:
        name = next((n for prefix, n in NON_IMAGE_SOP_CLASSES if sop.startswith(prefix)), "")
        return f"not a CT/MR image: {name} (SOP class {sop})" if name else f"not a CT/MR image (SOP class {sop})"
    if not number(rows):
        return "no image pixels"
    colour = text(photometric).upper()
    if colour and colour not in MONOCHROME:
        return f"colour image (PhotometricInterpretation {colour}), not a grey-scale acquisition"
    if SCOUT_TOKENS & set(tokens):
        return f"localizer/scout (ImageType {shown})"
    if SCOUT_WORDS.search(text(description)):
        return "localizer/scout (by its series description)"
    if PROJECTION_TOKENS & set(tokens):
        return f"projection image (MIP or rendering; ImageType {shown}), not a volume of tissue values"
    if SUBTRACTION_TOKENS & set(tokens):
        return f"subtraction image (ImageType {shown})"
    if MAP_TOKENS & set(tokens):
        return f"derived map or fused image (ImageType {shown})"
    if NOT_MAGNITUDE_TOKENS & set(tokens[2:]):  # values 1-2 are ORIGINAL/DERIVED and PRIMARY/SECONDARY
        return f"phase, real, imaginary or fat-only image (ImageType {shown}), not a magnitude image"
    return None


def file_problem(row: dict) -> str:
    """Why one catalog row cannot be used as an image file ('' when it can): :meth:`Columns.problems` of it."""
    return Columns.of([row]).problems().text(0)


def _num_key(x: str) -> tuple:
    try:
        return (0, float(x), "")
    except ValueError:
        return (1, 0.0, x)


# ------------------------------------------------------------------------------------------- columns
def _orientation_clusters(iops: np.ndarray) -> np.ndarray:
    """Cluster ids of (n, 6) orientations in order of first appearance (within ORIENTATION_TOL); -1 for NaN rows."""
    out = np.full(len(iops), -1, dtype=np.int64)
    finite = ~np.isnan(iops).any(axis=1)
    if not finite.any():
        return out
    idx = np.flatnonzero(finite)
    if np.all(iops[idx] == iops[idx[0]]):
        out[idx] = 0
        return out
    uniq, first, inverse = np.unique(iops[idx], axis=0, return_index=True, return_inverse=True)
    reps: list[np.ndarray] = []
    cluster_of_uniq = np.empty(len(uniq), dtype=np.int64)
    for u in np.argsort(first, kind="stable"):
        for c, rep in enumerate(reps):
            if np.max(np.abs(rep - uniq[u])) <= ORIENTATION_TOL:
                cluster_of_uniq[u] = c
                break
        else:
            reps.append(uniq[u])
            cluster_of_uniq[u] = len(reps) - 1
    out[idx] = cluster_of_uniq[inverse.reshape(-1)]
    return out


def _group_keys(c: Columns) -> np.ndarray:
    """Per row, a code for (matrix, pixel spacing, echo, image type): files of one stack share it."""
    import pandas as pd

    ps = np.round(c.pixel_spacing, 4)
    et = np.round(c.num["echo_time"], 2)
    frame = pd.DataFrame({
        "rows": np.nan_to_num(c.num["rows"]).astype(np.int64), "cols": np.nan_to_num(c.num["columns"]).astype(np.int64),
        "ps0": ps[:, 0], "ps1": ps[:, 1], "echo": c["echo_numbers"].codes, "et": et,
        "type": c["image_type_upper"].codes})
    return frame.groupby(list(frame.columns), sort=False, dropna=False).ngroup().to_numpy()


def _nonvolume(c: Columns) -> Coded:
    """Per row, why the instance never enters a volume (:func:`non_volume_reason`), -1 if it may."""
    sop, it, ph, desc = c["sop_class_uid"], c["image_type"], c["photometric"], c["series_description"]
    has_rows = (np.nan_to_num(c.num["rows"]) != 0).astype(np.int64)
    key = np.stack([sop.codes, it.codes, has_rows, ph.codes, desc.codes], axis=1)
    uniq, inverse = np.unique(key, axis=0, return_inverse=True)
    values: list[str] = []
    code_of: dict[str, int] = {}
    per_uniq = np.full(len(uniq), -1, dtype=np.int64)
    for u, (s, t, r, p, d) in enumerate(uniq):
        why = non_volume_reason(it.text_of(t), sop.text_of(s), int(r), ph.text_of(p), desc.text_of(d))
        if why:
            if why not in code_of:
                code_of[why] = len(values)
                values.append(why)
            per_uniq[u] = code_of[why]
    return Coded(per_uniq[inverse.reshape(-1)], values)


class CatalogStacks:
    """A catalog's series, each split into stacks: the planner's and the exporter's one way to group files.

    ``series()`` yields (series UID, stacks) in UID order. Row-level facts (problems, never-volume reasons, group
    keys, URL order) are computed once for the whole catalog, as arrays.
    """

    def __init__(self, catalog: Any, config: PlanConfig | None = None):
        self.c = Columns.of(catalog)
        self.config = config or PlanConfig()
        c = self.c
        self.problems = c.problems()
        self.nonvolume = _nonvolume(c)
        self.group_key = _group_keys(c)
        series = c["series_uid"].codes
        self._order = np.lexsort((c.url_rank, series))  # by series, then URL
        self._bounds = np.flatnonzero(np.diff(series[self._order])) + 1

    def rows_with_problems(self) -> np.ndarray:
        """Rows (in catalog order) that cannot be image files, or belong to no series."""
        return np.flatnonzero((self.problems.codes >= 0) | (self.c["series_uid"].codes < 0))

    def series(self, only: str | None = None):
        """(series UID, its stacks) for every series, in UID order; ``only``: just that series."""
        c = self.c
        uids = c["series_uid"]
        runs = [r for r in np.split(self._order, self._bounds) if len(r) and uids.codes[r[0]] >= 0
                and (only is None or uids.values[uids.codes[r[0]]] == only)]
        runs.sort(key=lambda r: uids.values[uids.codes[r[0]]])
        for run in runs:
            yield uids.values[uids.codes[run[0]]], self.stacks(run)

    def stacks(self, rows: np.ndarray, series_uid: str | None = None) -> list[Stack]:
        """The stacks of one series' rows (any order); see :func:`stacks_from_catalog`."""
        c = self.c
        rows = np.asarray(rows, dtype=np.int64)
        rows = rows[~c.is_dicomdir[rows]]
        if not len(rows):
            return []
        if series_uid is None:
            series_uid = c["series_uid"].text(rows[np.argmin(rows)])
        problem = self.problems.codes[rows] >= 0
        bad = np.sort(rows[problem])  # catalog order
        good = rows[~problem]
        good = good[np.argsort(c.url_rank[good], kind="stable")]
        return _series_stacks(self, good, bad, series_uid)


def _stack_info(c: Columns, rows: np.ndarray) -> dict[str, Any]:
    i = int(rows[0])
    iop = c.vector(c.iop, i)
    return {
        "patient_id": c["patient_id"].text(i),
        "study_uid": c["study_uid"].text(i),
        "modality": c["modality"].text(i),
        "description": c["series_description"].text(i),
        "series_number": c.number("series_number", i),
        "image_type": c["image_type"].most_common(rows) or "",
        "study_date": c["study_date"].text(i),
        "study_time": c["study_time"].text(i),
        "series_date": c["series_date"].text(i),
        "series_time": c["series_time"].text(i),
        "slice_thickness": c.number("slice_thickness", i),
        "convolution_kernel": c["convolution_kernel"].most_common(rows) or "",
        "body_part": c["body_part"].text(i),
        "echo_time": c.number("echo_time", i),
        "repetition_time": c.number("repetition_time", i),
        "inversion_time": c.number("inversion_time", i),
        "scanning_sequence": c["scanning_sequence"].text(i),
        "sequence_variant": c["sequence_variant"].text(i),
        "sequence_name": c["sequence_name"].text(i),
        "mr_acquisition_type": c["mr_acquisition_type"].text(i),
        "contrast_agent": c["contrast_agent"].text(i),
        "n_files": len(rows),
        "image_orientation": None if iop is None else [float(x) for x in iop],
        "rows": c.number("rows", i),
        "columns": c.number("columns", i),
    }


def _dedupe(c: Columns, sub: np.ndarray) -> np.ndarray:
    """``sub`` without later files of an instance already present (same SOPInstanceUID), order kept."""
    sop = c["sop_instance_uid"].codes[sub]
    known = sop >= 0
    if not known.any():
        return sub
    _, first = np.unique(sop[known], return_index=True)
    keep = ~known
    keep[np.flatnonzero(known)[first]] = True
    return sub[keep]


def _series_stacks(cs: CatalogStacks, good: np.ndarray, bad: np.ndarray, series_uid: str) -> list[Stack]:
    """Stacks of one series: ``good`` rows in URL order, ``bad`` (rows with a problem) in catalog order."""
    c, config = cs.c, cs.config
    out: list[Stack] = []

    def new_stack(sub: np.ndarray, refused: str | None = None, notes: list[str] | None = None) -> Stack:
        return Stack(key=series_uid, series_uid=series_uid, rows=np.asarray(sub, dtype=np.int64),
                     columns=c, refused=refused, notes=list(notes or []), info=_stack_info(c, sub))

    # kinds of instance that never enter a volume
    nv = cs.nonvolume.codes[good]
    for code in sorted({int(k) for k in nv[nv >= 0]}, key=lambda k: cs.nonvolume.values[k]):
        out.append(new_stack(good[nv == code], refused=cs.nonvolume.values[code]))
    kept = good[nv < 0]

    groups: list[tuple[str, np.ndarray]] = [("multi-frame object", kept[j:j + 1])
                                            for j in np.flatnonzero(c.frames[kept] > 1)]
    single = kept[c.frames[kept] <= 1]
    if len(single):
        orient = _orientation_clusters(c.iop[single])
        parts: dict[tuple[int, int], list[int]] = {}
        for o, g, i in zip(orient.tolist(), cs.group_key[single].tolist(), single.tolist()):
            parts.setdefault((o, g), []).append(i)
        n_orient = len(set(orient.tolist()))
        for (o, _), sub in parts.items():
            label = []
            if n_orient > 1:
                label.append(f"orientation {o + 1} of {n_orient}" if o >= 0 else "no orientation")
            if len(parts) > n_orient:
                label.append("echo/image type/matrix group")
            groups.append((", ".join(label), np.asarray(sub, dtype=np.int64)))

    # a handful of images in several planes is a scout, whatever its tags say
    if 0 < len(kept) <= SCOUT_MAX_IMAGES and len(groups) > 1 and \
            len({int(o) for o in _orientation_clusters(c.iop[kept])}) > 1:
        out.append(new_stack(kept, refused=f"localizer/scout ({len(kept)} images in several planes)"))
        groups = []

    # dedupe; volumes that share positions told apart (4D series, repeats); then geometry
    final: list[tuple[np.ndarray, list[str], str | None, Split | None]] = []
    n_splits = 0
    for label, group in groups:
        notes = [label] if label else []
        sub = _dedupe(c, group)
        if len(sub) < len(group):
            notes.append(f"{len(group) - len(sub)} duplicate file(s) of one instance ignored")
        if len(sub) == 1 and c.frames[sub[0]] > 1:
            final.append((sub, notes, None, None))
            continue
        pos = c.ipp[sub]
        if np.isnan(pos).any():
            final.append((sub, notes, "missing ImagePositionPatient", None))
            continue
        try:
            _, _, nrm = unit_axes(c.iop[sub[0]])
        except Refusal as err:
            final.append((sub, notes, str(err), None))
            continue
        t = pos @ nrm
        if has_repeats(t):
            volumes = _split_volumes(c, sub, t, n_splits)
            if volumes:
                n_splits += 1
                for vol, split in volumes:
                    final.append((vol, [*notes, split.label] if split.kind == "repeat" else notes, None, split))
                continue
            k = int(len(t) - len(unique_positions(t)))
            final.append((sub, notes, f"duplicate slice positions: {k} image(s) at an already occupied position "
                                      "with a different instance", None))
            continue
        final.append((sub, notes, None, None))
    _mark_echo_splits(c, final, n_splits)

    for sub, notes, refused, split in final:
        st = new_stack(sub, refused=refused, notes=notes)
        st.split = split
        if not refused:
            try:
                st.geometry, order = _catalog_geometry(c, sub, config)
                st.rows = st.rows[order]
                if st.geometry.tilt_deg:
                    st.notes.append(f"gantry tilt {st.geometry.tilt_deg:.1f} degrees: resampled onto an "
                                    "orthogonal grid")
            except Refusal as err:
                st.refused = str(err)
        out.append(st)

    if len(out) > 1:  # every stack its own key: the plan lists each one, and ranks break ties on it
        for i, st in enumerate(out):
            st.key = f"{series_uid}#{i + 1}"

    # a file of the series that cannot be read may be a slice of a stack: never assemble around the hole
    if len(bad):
        good_sops = set(c["sop_instance_uid"].codes[good].tolist()) - {-1}
        for b in bad.tolist():
            sop = int(c["sop_instance_uid"].codes[b])
            if sop >= 0 and sop in good_sops:
                continue
            problem = cs.problems.text(b)
            b_iop, b_rows, b_cols = c.vector(c.iop, b), c.number("rows", b), c.number("columns", b)
            for st in out:
                if not st.usable:
                    continue
                s_iop = st.info.get("image_orientation")
                if b_iop is not None and s_iop is not None and \
                        np.max(np.abs(b_iop - np.asarray(s_iop))) > ORIENTATION_TOL:
                    continue
                if b_rows and b_cols and (b_rows, b_cols) != (st.info.get("rows"), st.info.get("columns")):
                    continue
                st.refused = f"a file of this stack is unreadable ({problem})"
    return out


SCOUT_MAX_IMAGES = 3
"""A series of at most this many images spread over several planes is a scout (two or three plane localizer)."""


def _volume_keys(c: Columns, rows: np.ndarray) -> Iterator[tuple[str, str, np.ndarray]]:
    """(kind, tags, per-row value) that may tell the volumes of a 4D series apart, most specific first; each
    computed only when the ones before it did not tell the volumes apart."""
    b = c.num["diffusion_b_value"][rows]
    d = c.diffusion_direction[rows]
    # some vendors write b = 0 on every MR image: only b-values that differ, or a b > 0, or a gradient direction
    # make a diffusion series
    known = np.isfinite(b)
    if known.any() and (len(np.unique(b[known])) > 1 or (b[known] > 0).any()
                        or np.any(np.nan_to_num(d[known]) != 0)):
        diff = np.array([f"b={bv:g}" + ("" if not np.isfinite(dv).all() or bv == 0 or not np.any(dv) else
                                          f" direction ({dv[0]:.2f}, {dv[1]:.2f}, {dv[2]:.2f})")
                         if np.isfinite(bv) else "b unknown" for bv, dv in zip(b, d)], dtype=object)
        yield "diffusion", "DiffusionBValue and gradient direction", diff
        for name, tag in (("acquisition_number", "AcquisitionNumber"), ("temporal_position",
                                                                         "TemporalPositionIdentifier")):
            codes = c[name].codes[rows]
            if (codes >= 0).any():
                yield ("diffusion", f"DiffusionBValue, gradient direction and {tag}",
                       np.array([f"{x} ({tag} {c[name].text_of(k)})" for x, k in zip(diff, codes)], dtype=object))
        repeats = _diffusion_repeats(c, rows, diff)
        if repeats is not None:
            yield "diffusion", "DiffusionBValue, gradient direction and InstanceNumber order", repeats
    for name, tag in (("temporal_position", "TemporalPositionIdentifier"), ("acquisition_number", "AcquisitionNumber"),
                      ("acquisition_time", "AcquisitionTime")):
        yield "time", tag, np.array([c[name].text(i) for i in rows], dtype=object)
    trig = c.num["trigger_time"][rows]
    if np.isfinite(trig).any():
        yield "time", "TriggerTime", np.array([f"{v:.1f}" if np.isfinite(v) else "" for v in trig], dtype=object)
    order = _occurrence(c, rows)
    if order is not None:
        yield "time", "AcquisitionTime order at each position", order


def _diffusion_repeats(c: Columns, rows: np.ndarray, diff: np.ndarray) -> np.ndarray | None:
    """Diffusion volumes that share a b-value and direction (several b = 0 volumes, repeated directions) and
    nothing else tells apart: the k-th image of each (b, direction, position) in InstanceNumber order belongs to
    repeat k. Only when every image has its own InstanceNumber and each (b, direction) repeats the same number of
    times at every one of its positions; otherwise None (refused, not guessed)."""
    inst = c.num["instance_number"][rows]
    if not np.isfinite(inst).all() or len(np.unique(inst)) < len(rows):
        return None
    nrm = unit_axes(c.iop[rows[0]])[2]
    pos = np.round((c.ipp[rows] @ nrm) / DUPLICATE_POSITION_TOL_MM).astype(np.int64)
    groups: dict[tuple[str, int], list[int]] = {}
    for j in np.argsort(inst, kind="stable").tolist():
        groups.setdefault((diff[j], int(pos[j])), []).append(j)
    counts: dict[str, set[int]] = {}
    for (value, _), members in groups.items():
        counts.setdefault(value, set()).add(len(members))
    if any(len(n) != 1 for n in counts.values()) or all(n == {1} for n in counts.values()):
        return None
    out = np.empty(len(rows), dtype=object)
    for (value, _), members in groups.items():
        for k, j in enumerate(members):
            out[j] = value if len(members) == 1 else f"{value} (repeat {k + 1})"
    return out


def _occurrence(c: Columns, rows: np.ndarray) -> np.ndarray | None:
    """Each image's turn at its position by AcquisitionTime (InstanceNumber breaking ties): the volumes of a time
    series whose slices each carry their own time. Only when every image has a time, every position holds the
    same number of images, and the turns make consecutive time windows (all of turn k before any of turn k+1);
    otherwise None: the order would be a guess."""
    times = np.array([number(c["acquisition_time"].text(i)) for i in rows], dtype=object)
    if any(v is None for v in times):
        return None
    nrm = unit_axes(c.iop[rows[0]])[2]
    t = np.round((c.ipp[rows] @ nrm) / DUPLICATE_POSITION_TOL_MM).astype(np.int64)
    _, pos, counts = np.unique(t, return_inverse=True, return_counts=True)
    n = int(counts[0])
    if len(set(counts.tolist())) != 1 or n < 2:
        return None
    inst = np.nan_to_num(c.num["instance_number"][rows], nan=np.inf)
    keys = [(int(pos[j]), float(times[j]), float(inst[j])) for j in range(len(rows))]
    if len(set(keys)) < len(keys):
        return None
    turn = np.empty(len(rows), dtype=np.int64)
    for k, j in enumerate(sorted(range(len(rows)), key=keys.__getitem__)):
        turn[j] = k % n
    first = [min(float(times[j]) for j in np.flatnonzero(turn == k)) for k in range(n)]
    last = [max(float(times[j]) for j in np.flatnonzero(turn == k)) for k in range(n)]
    if any(last[k] >= first[k + 1] for k in range(n - 1)):  # shared times order nothing
        return None
    return np.array([f"{k:06d}" for k in turn], dtype=object)


def _split_volumes(c: Columns, sub: np.ndarray, t: np.ndarray, group: int) -> list[tuple[np.ndarray, Split]]:
    """The volumes of a stack whose positions repeat, told apart by the first tag that leaves none repeating
    inside a volume; [] when none does (the stack is refused: it cannot be assembled without guessing)."""
    for key_kind, tags, values in _volume_keys(c, sub):
        distinct = sorted(set(values.tolist()), key=_num_key)
        # every volume a stack of its own (no repeated position, more than one slice)
        if len(distinct) < 2 or any(has_repeats(t[values == v]) or np.sum(values == v) < 2 for v in distinct):
            continue
        n = len(distinct)
        kind = key_kind if key_kind != "time" else "dynamic" if n >= DYNAMIC_MIN_VOLUMES else "repeat"
        out = []
        for i, v in enumerate(distinct):
            if kind == "diffusion":
                label = v
            elif kind == "dynamic":
                label = f"time point {i + 1} of {n}"
            elif tags == "AcquisitionNumber":
                label = f"acquisition {v}"
            else:
                label = f"{tags} {v or 'missing'}"
            out.append((sub[values == v], Split(group=group, index=i, count=n, kind=kind, by=tags, label=label)))
        return out
    return []


def _mark_echo_splits(c: Columns, final: list, first_group: int) -> None:
    """Volumes of one series and orientation that differ only by echo (multi-echo): one split of kind "echo"."""
    shapes: dict[tuple, list[int]] = {}
    echo: dict[int, tuple[str, float | None]] = {}
    for j, (sub, _, refused, split) in enumerate(final):
        if split is not None or refused or len(sub) < 2:
            continue
        i = int(sub[0])
        key = (tuple(np.round(c.iop[i], 4)), c.number("rows", i), c.number("columns", i),
               tuple(np.round(c.pixel_spacing[i], 4)), int(c["image_type_upper"].codes[i]))
        shapes.setdefault(key, []).append(j)
        echo[j] = (c["echo_numbers"].text(i), c.number("echo_time", i))
    group = first_group
    for members in shapes.values():
        if len(members) < 2 or len({echo[j] for j in members}) < len(members):
            continue
        members.sort(key=lambda j: (_num_key(echo[j][0]), echo[j][1] or 0.0))
        for i, j in enumerate(members):
            number_, te = echo[j]
            label = f"echo {number_ or i + 1}" + (f" (TE {te:g} ms)" if te is not None else "")
            final[j] = (*final[j][:3], Split(group=group, index=i, count=len(members), kind="echo",
                                             by="EchoNumbers/EchoTime", label=label))
        group += 1


def _catalog_geometry(c: Columns, sub: np.ndarray, config: PlanConfig) -> tuple[Geometry, np.ndarray]:
    r0 = int(sub[0])
    iop = c.vector(c.iop, r0)
    ps = c.vector(c.pixel_spacing, r0)
    if iop is None:
        raise Refusal("missing ImageOrientationPatient")
    if ps is None:
        raise Refusal("missing PixelSpacing")
    rows, cols = int(c.number("rows", r0) or 0), int(c.number("columns", r0) or 0)
    nf = int(c.frames[r0])
    if len(sub) == 1 and nf > 1:
        fp = c.frame_positions(r0)
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
    return stack_geometry(c.ipp[sub], iop, ps, rows, cols, config.gap_tolerance, config.allow_gantry_tilt)


def stacks_from_catalog(rows: Any, config: PlanConfig | None = None) -> list[Stack]:
    """Split one series' catalog rows into geometric stacks, each usable (with geometry) or refused (with reason).

    ``rows``: an Arrow table, DataFrame or list of dicts with the scan's columns, all of one SeriesInstanceUID.
    Splits by orientation, matrix size/pixel spacing, echo and image type; by acquisition only when that
    resolves repeated positions (CT acquisitions often split one contiguous stack, which stays whole). Drops
    localizers, scouts, derived/secondary and non-image objects with reasons. Two files of one SOP instance
    count once. A file with a read error is never used, and a stack it may belong to is refused rather than
    assembled around the hole.
    """
    cs = CatalogStacks(rows, config)
    if not cs.c.n:
        return []
    keep = np.flatnonzero(~cs.c.is_dicomdir)
    if not len(keep):
        return []
    return cs.stacks(np.arange(cs.c.n), series_uid=cs.c["series_uid"].text(keep[0]))
