"""Plan patients, render their series, write DICOM + a ground-truth manifest; and the in-memory variant.

One code path: ``generate_corpus`` and ``simulate_patient`` both go through ``plan_patient`` (identities, dates,
poses, grids) and ``render_series`` (voxels). Every random choice comes from a generator seeded by (corpus seed,
patient index, purpose), so quirk switches never change the other files. Each series of the built-in session is
placed independently (``_pose``: up to 12 degrees and 15 mm); sessions rebuilt by a layout quirk (layouts.py) hold
one head position with a small motion per series.

Heads are whole heads (anatomy.py, head.py): face, ears, neck down to C5-C6, the top of the shoulders. Grids are
planned as a technologist plans them: MR on the cranium (brain, skull and scalp above the skull base), a head CT from
the atlas (C1) to the vertex; layouts add fields of view to the neck, brain-only slabs and off-centre heads.

The manifest (``<corpus>.manifest.json``, format 2; format 1 had no landmarks and its ``whole_head`` meant the whole
synthetic head, which then ended at the skull). Top level: ``generator`` (version, seed, patients, quirks, layout,
template_sha256, scenarios, ``anatomy_landmarks``: the face landmarks on the model, template LPS mm, the same for
every patient), ``n_files``, ``n_bytes``, ``files`` (path, kind, series_uid, sop_uid, duplicate_of), ``patients``,
``expected_pairs``, ``expected_exclusions``, ``quirks`` (one entry per quirk applied: where, the files it touched,
``expected``: what a correct tool concludes), ``phi``, ``phi_strings``.

A patient: patient_id, patient_name, birth_date, sex, scenario, sim_seed (``simulate_patient(sim_seed)`` is the same
patient), lesion (centre and radii, template LPS mm), scale, ``landmarks`` (nose_tip, upper_lip, chin (soft-tissue
pogonion), right_eye and left_eye (globe centres): where the patient's own landmarks lie in the template frame the
series transforms map from, i.e. y = d^-1(a) for an anatomy landmark a and the patient's small deformation d, so a
series shows it at ``transform`` @ y), ``brain_center`` (the template brain's centroid, likewise), studies.

A study: study_uid, modality, study_date, study_time, accession_number, description, frame_of_reference_uid,
manufacturer, model, ``session_id`` (a patient's studies of one modality on one date form one session, e.g.
"MR-20121012"), series.

A series: series_uid, series_number, description, role, modality, series_time, image_type, ``files`` (in true
spatial order; a 4D series volume by volume, ``files[v * slices + k]``), ``usable``/``reason`` (whether it can
become a volume at all; a 4D series is usable: each of its volumes is one), ``geometry`` (size, spacing, origin,
direction of the grid, for a 4D series that of each volume), ``images`` (single images: localizer, scout),
``transform`` (4x4 template physical LPS -> series physical LPS; reconstructions of one CT acquisition share it),
``rescale`` (CT: stored -> HU as written), ``quirks``, and the truth a reader concludes from the images whatever the
descriptions say: ``candidate``/``candidate_reason`` (could be taken for the pair: a T1-weighted MR volume, a CT
volume; never perfusion, diffusion, screenshots, scouts, non-image objects), ``weighting`` (T1, T2, FLAIR, T2*,
DWI), ``post_contrast``, ``contrast_agent`` (ContrastBolusAgent as written, "" if none), ``mr_acquisition`` (2D/3D),
``kernel`` (CT: soft/bone), ``derived`` (ImageType DERIVED), ``whole_head`` (the grid holds the whole cranium:
brain, skull and scalp above the skull base), ``body_part`` (BodyPartExamined as written; null: absent); for every
series with images: ``landmarks`` (the patient's landmarks in series LPS mm), ``brain_center`` (series LPS mm),
``holds_brain`` (the grid holds every template brain point, through the deformation; null without a volume grid),
``holds_face`` (the grid holds every face landmark with 5 mm around it). Where they apply: ``volumes`` and
``split_by`` (a 4D series: how many volumes, and the ways to tell them apart, each a list of tags {tag, keyword,
private_creator?} that together separate the volumes, the vendor's own first), ``temporal`` (habit, times_s,
bolus_arrival_s, bolus_time_to_peak_s), ``diffusion`` (style, b_values, directions: LPS unit vectors, null for b=0),
``acquisition_series_uid`` (a reconstruction: the CT series of the same acquisition), ``references`` and ``rois``
(RT structure set: the CT series, frame of reference, images, contours), ``sop_class_uid`` (other than the classic
MR/CT image storage), ``samples_per_pixel``/``photometric`` (RGB capture).

An expected pair: patient_id, mr/ct_study_uid, mr/ct_series_uid (the series a neuroradiologist takes: MR,
T1-weighted, post-contrast before pre, 3D before 2D, finer voxels, whole head, ORIGINAL before DERIVED; CT, ORIGINAL
before reformats, soft tissue before bone kernels, thinnest), days_apart (CT date - MR date; the closest MR and CT
sessions, at most 183 days), mr/ct_session_id, mr/ct_session_study_uids, mr/ct_alternatives (every other candidate
of the session: series_uid, description, why_not).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..errors import ConfigError
from ..template import Template
from . import dicom_writer as dw
from .anatomy import (
    AIR,
    Geometry,
    PatientAnatomy,
    TissueModel,
    affine_about,
    bias_field,
    make_patient,
    render,
    rician,
    rotation_matrix,
    tissue_model,
)

log = logging.getLogger(__name__)

GENERATOR_VERSION = "2"
MANIFEST_FORMAT = 2
QUIRKS: tuple[str, ...] = ("missing_slice", "duplicate_instance", "truncated_file", "non_dicom_file",
                           "gantry_tilt", "compressed", "shuffled_instance_numbers", "multiframe_mr")
# Clinical layouts (what real exports look like; see layouts.py): each changes one session of one paired patient.
LAYOUT_QUIRKS: tuple[str, ...] = ("study_per_sequence", "sagittal_t1", "coronal_t1", "contrast_tag_only", "perfusion",
                                  "dti", "secondary_capture", "rtstruct", "ct_reformat", "ct_bone", "ct_thick",
                                  "ct_scout", "sagittal_t1_neck", "axial_t1_brain", "off_centre_t1", "ct_face_neck")
SCENARIOS = ("pair", "two_ct", "too_far", "mr_only", "two_mr", "ct_only", "pair_edge")
LAYOUTS = ("tcia", "flat")
MAX_DAYS = 183
CT_INTERCEPT = -1024.0
CT_PADDING_STORED = -2000  # stored value outside the reconstruction circle (HU -3024)


def parse_quirks(text: str) -> tuple[str, ...]:
    """"" -> (), "all" -> every quirk (file-level, then layouts), "a,b" -> those (validated, in that order)."""
    text = (text or "").strip()
    if not text:
        return ()
    if text.lower() == "all":
        return QUIRKS + LAYOUT_QUIRKS
    names = [t.strip() for t in text.split(",") if t.strip()]
    _check_quirks(names, " or 'all'")
    return tuple(q for q in QUIRKS + LAYOUT_QUIRKS if q in names)


def _check_quirks(names: Sequence[str], hint: str = "") -> None:
    unknown = [n for n in names if n not in QUIRKS + LAYOUT_QUIRKS]
    if unknown:
        raise ConfigError(f"unknown quirk(s) {', '.join(unknown)}; choose from "
                          f"{', '.join(QUIRKS + LAYOUT_QUIRKS)}{hint}")


# ------------------------------------------------------------------------------------------------ protocols
MR_PROTOCOLS: dict[str, dict[str, Any]] = {
    "localizer": dict(number=1, description="3-PLANE LOC", image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"],
                      scanning_sequence="GR", sequence_variant="SS", acquisition_type="2D", tr=6.1, te=1.6,
                      flip=30, sequence_name="fgre", fov=280.0, matrix=256, thickness=8.0),
    "t2": dict(number=3, description="AX T2 FSE", image_type=["ORIGINAL", "PRIMARY", "OTHER"],
               scanning_sequence="SE", sequence_variant=["SK", "OSP"], scan_options="FAST_GEMS",
               acquisition_type="2D", tr=4200.0, te=102.0, etl=16, flip=90, sequence_name="fse-xl",
               fov=240.0, matrix=256, thickness=5.0, step=6.0, instances="desc"),
    "flair": dict(number=4, description="AX FLAIR", image_type=["ORIGINAL", "PRIMARY", "OTHER"],
                  scanning_sequence=["SE", "IR"], sequence_variant=["SK", "SP", "OSP"], scan_options="FAST_GEMS",
                  acquisition_type="2D", tr=9000.0, te=122.0, ti=2250.0, etl=24, flip=90,
                  sequence_name="fse-flair", fov=230.0, matrix=256, thickness=5.0, step=5.0, instances="desc"),
    "t1c": dict(number=7, description="AX T1 POST GD", image_type=["ORIGINAL", "PRIMARY", "OTHER"],
                scanning_sequence=["GR", "IR"], sequence_variant=["SK", "SP", "MP"], scan_options="FAST_GEMS",
                acquisition_type="3D", tr=8.2, te=3.2, ti=450.0, flip=12, sequence_name="efgre3d",
                fov=240.0, matrix=256, thickness=1.0, step=1.0, instances="asc", contrast="GADOLINIUM"),
}
CT_PROTOCOLS: dict[str, dict[str, Any]] = {
    "scout": dict(number=1, description="SCOUT", image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"], kvp=120,
                  kernel="STANDARD", fov=300.0, matrix=256),
    "ct": dict(number=2, description="HEAD 2.5mm STND", image_type=["ORIGINAL", "PRIMARY", "AXIAL"], kvp=120,
               kernel="STANDARD", fov=250.0, matrix=512, thickness=2.5, step=2.5, instances="desc", down_to="c1"),
    "sr": dict(number=999, description="Dose Report"),
}
MR_ORDER = ("localizer", "t2", "flair", "t1c")
# Ground truth by role, whatever the descriptions say: (weighting, post-contrast, candidate, why). A candidate is a
# series a reader could take for the pair: a T1-weighted MR volume, a CT volume.
ROLE_TRUTH: dict[str, tuple[str | None, bool | None, bool, str]] = {
    "t1c": ("T1", True, True, "T1-weighted volume"),
    "t1": ("T1", False, True, "T1-weighted volume"),
    "t2": ("T2", False, False, "T2-weighted, not T1"),
    "flair": ("FLAIR", False, False, "FLAIR, not T1"),
    "localizer": (None, False, False, "localizer: single images in three planes"),
    "perfusion": ("T2*", True, False, "DSC perfusion: a time series of volumes, never a T1 candidate"),
    "dti": ("DWI", False, False, "diffusion: volumes per b-value and direction, never a T1 candidate"),
    "secondary_capture": (None, None, False, "secondary capture: an RGB screenshot without patient geometry"),
    "ct": (None, None, True, "CT volume"),
    "ct_thick": (None, None, True, "CT volume"),
    "ct_bone": (None, None, True, "CT volume"),
    "ct_reformat": (None, None, True, "CT volume"),
    "scout": (None, None, False, "scout: projection images, not a volume"),
    "sr": (None, None, False, "not an image (structured report)"),
    "rtstruct": (None, None, False, "not an image (RT structure set)"),
}
AXIAL_ROLES = ("t1c", "t2", "flair", "ct", "t1")  # planned on an axial grid over the whole head by default
VOLUME_ROLES = ("t1c", "t2", "flair", "ct", "t1", "ct_thick", "ct_bone", "ct_reformat")  # one file per slice
CT_ORDER = ("scout", "ct", "sr")
SCANNERS = {
    "MR": [("GE MEDICAL SYSTEMS", "SIGNA HDxt"), ("GE MEDICAL SYSTEMS", "DISCOVERY MR750")],
    "CT": [("GE MEDICAL SYSTEMS", "LightSpeed VCT"), ("GE MEDICAL SYSTEMS", "Revolution CT")],
}
LAST = ["HALVORSEN", "OKAFOR", "LINDQVIST", "MARCHETTI", "BRENNAN", "DUBOIS", "NAKAMURA", "ABERNATHY",
        "KOWALCZYK", "FITZGERALD", "ESPINOZA", "VANDERMEER", "ACHTERBERG", "O'SULLIVAN", "PETRAKIS", "YILMAZ"]
FIRST = {"F": ["MAREN", "ODALYS", "PRIYA", "HELENE", "CORA", "ILSE", "NADIA", "ROSALIND"],
         "M": ["TOBIAS", "EMEKA", "ANDERS", "CALLUM", "DMITRI", "FELIX", "RAFAEL", "GIDEON"]}
TOWNS = ["Ashbury", "Kellerton", "Marrowgate", "Oakhaven", "Pellston", "Ravenmoor", "Sundale", "Wexcombe"]
TOKEN_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


# ------------------------------------------------------------------------------------------------ plans
@dataclass
class SeriesPlan:
    info: dw.SeriesInfo
    role: str
    modality: str
    transform: np.ndarray  # template physical LPS -> series physical LPS (4x4)
    geometry: Geometry | None  # the volume grid (None: no volume)
    images: list[Geometry] = field(default_factory=list)  # single images (localizer planes, scout)
    seed: int = 0
    thickness: float = 0.0
    spacing_between: float | None = None
    instances: str = "asc"  # "asc": InstanceNumber increases along the slice normal
    tilt_deg: float = 0.0
    quirks: list[str] = field(default_factory=list)
    transfer_syntax: str | None = None
    multiframe: bool = False
    whole_head: bool | None = None  # the grid holds the whole head (set once the plan is final)
    usable: bool = True
    reason: str = ""
    missing_k: int | None = None  # quirk: this slice's file is not written
    truncated_k: int | None = None  # quirk: this slice's file is cut inside its pixel data
    duplicate_k: int | None = None  # quirk: this slice's file is written twice
    shuffled: bool = False  # quirk: InstanceNumber does not follow the slice order
    missing_path: str = ""
    recipe: Any = None  # renders and writes what the built-in roles do not (4D MR, CT reconstructions, captures, ...)
    folder_no: int = 0  # the number in its TCIA folder name
    manifest: dict = field(default_factory=dict)  # more ground truth for its manifest entry (4D, references, ...)
    couch: dict | None = None  # CT: the headrest plate as rendered (set by render_series)


@dataclass
class StudyPlan:
    info: dw.StudyInfo
    date: dt.date
    series: list[SeriesPlan]
    folder_no: int = 0


@dataclass
class PatientPlan:
    index: int
    seed: int
    scenario: str
    info: dw.PatientInfo
    studies: list[StudyPlan]


def patient_seed(corpus_seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(corpus_seed), int(index), 7919]).generate_state(1)[0])


def _rng(seed: int, *purpose: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *[int(p) for p in purpose]])


def _token(rng: np.random.Generator, n: int = 5) -> str:
    return "".join(TOKEN_ALPHABET[i] for i in rng.integers(0, len(TOKEN_ALPHABET), size=n))


def _study_dates(rng: np.random.Generator, scenario: str, occurrence: int) -> tuple[list[dt.date], list[dt.date]]:
    """(MR dates, CT dates) for a scenario; ``occurrence`` counts earlier patients with the same scenario."""
    base = dt.date(2005, 1, 3) + dt.timedelta(days=int(rng.integers(0, 14 * 365)))

    def d(days: int) -> dt.date:
        return base + dt.timedelta(days=int(days))

    offset = int(rng.integers(3, 151)) * (1 if rng.random() < 0.6 else -1)
    if scenario == "pair":
        return [base], [d(offset)]
    if scenario == "pair_edge":
        return [base], [d(MAX_DAYS)]
    if scenario == "two_ct":
        return [base], [d(rng.integers(5, 60)), d(-rng.integers(95, 175))]
    if scenario == "two_mr":
        return [d(-rng.integers(5, 40)), d(rng.integers(90, 170))], [base]
    if scenario == "too_far":
        gap = MAX_DAYS + 1 if occurrence == 0 else int(rng.integers(200, 1500))
        return [base], [d(gap if rng.random() < 0.5 or occurrence == 0 else -gap)]
    if scenario == "mr_only":
        return [base], []
    if scenario == "ct_only":
        return [], [base]
    raise ValueError(scenario)


def _pose(rng: np.random.Generator, center: np.ndarray) -> np.ndarray:
    angles = rng.uniform(-12.0, 12.0, size=3)
    shift = rng.uniform(-15.0, 15.0, size=3)
    return affine_about(rotation_matrix(angles), center, shift)


def _round(v: float, nd: int = 4) -> float:
    return float(round(float(v), nd))


def _axial_grid(points: np.ndarray, rng: np.random.Generator, fov: float, matrix: int, step: float,
                margin: float = 3.0) -> Geometry:
    """An axial grid centred in-plane on the head with its slices covering it (as a technologist plans it)."""
    px = float(dw._fmt(fov / matrix))
    lo, hi = points.min(0), points.max(0)
    cx, cy = (lo[:2] + hi[:2]) / 2 + rng.uniform(-3.0, 3.0, size=2)
    z0 = lo[2] - margin
    n = int(math.ceil((hi[2] + margin - z0) / step)) + 1
    origin = np.array([_round(cx - (matrix - 1) / 2 * px), _round(cy - (matrix - 1) / 2 * px), _round(z0)])
    return Geometry(size=(matrix, matrix, n), spacing=(px, px, float(step)), origin=origin, axes=np.eye(3))


def _plane_geometry(center: np.ndarray, row, col, fov: float, matrix: int, thickness: float) -> Geometry:
    row, col = np.asarray(row, float), np.asarray(col, float)
    px = float(dw._fmt(fov / matrix))
    origin = center - (row + col) * (matrix - 1) / 2 * px
    origin = np.array([_round(v) for v in origin])
    return Geometry(size=(matrix, matrix, 1), spacing=(px, px, thickness), origin=origin,
                    axes=np.stack([row, col, np.cross(row, col)], axis=1))


def _series_seed(pseed: int, modality: str, study_ordinal: int, role: str) -> int:
    return int(np.random.SeedSequence([pseed, 1 if modality == "MR" else 2, study_ordinal,
                                       zlib_crc(role)]).generate_state(1)[0])


def zlib_crc(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode())


def _person(rng: np.random.Generator, token: str) -> str:
    first = FIRST["M" if rng.random() < 0.5 else "F"][int(rng.integers(8))]
    return f"{LAST[int(rng.integers(len(LAST)))]}^{first}^{token}"


def plan_patient(pseed: int, scenario: str, index: int, model: TissueModel, occurrence: int = 0,
                 corpus_seed: int = 0, taken: set[str] | None = None) -> PatientPlan:
    """Identities, dates, poses and grids of one patient's studies (no voxels yet)."""
    taken = taken if taken is not None else set()
    rid = _rng(pseed, 1)

    def token() -> str:
        while True:
            t = _token(rid)
            if t not in taken:
                taken.add(t)
                return t

    sex = "F" if rid.random() < 0.5 else "M"
    name = f"{LAST[rid.integers(len(LAST))]}^{FIRST[sex][rid.integers(8)]}^{token()}"
    pid = f"SYN-{index:04d}-{token()}"
    birth = dt.date(1938, 1, 1) + dt.timedelta(days=int(rid.integers(0, 50 * 365)))
    patient = dw.PatientInfo(patient_id=pid, name=name, birth_date=birth.strftime("%Y%m%d"), sex=sex)
    mr_dates, ct_dates = _study_dates(_rng(pseed, 2), scenario, occurrence)
    scaling = patient_scaling(pseed, model)
    studies: list[StudyPlan] = []
    for modality, dates in (("MR", mr_dates), ("CT", ct_dates)):
        for ordinal, date in enumerate(dates):
            rs = _rng(pseed, 3, 1 if modality == "MR" else 2, ordinal)
            maker, mdl = SCANNERS[modality][int(rs.integers(len(SCANNERS[modality])))]
            hour = int(rs.integers(7, 19))
            start = dt.datetime.combine(date, dt.time(hour, int(rs.integers(0, 60)), int(rs.integers(0, 60))))
            age = (date - birth).days // 365
            uid_parts = (corpus_seed, pseed, modality, ordinal)
            study = dw.StudyInfo(
                uid=str(dw.make_uid(*uid_parts, "study")), modality=modality, date=date.strftime("%Y%m%d"),
                time=start.strftime("%H%M%S"), accession=f"A{token()}{int(rs.integers(1000, 9999))}",
                description="MRI BRAIN WWO CONTRAST" if modality == "MR" else "CT HEAD WO CONTRAST",
                study_id=str(int(rs.integers(1000, 99999))),
                institution=f"{TOWNS[int(rs.integers(len(TOWNS)))]} Medical Center {token()}",
                referring=_person(rs, token()) + "^DR",
                manufacturer=maker, model=mdl,
                station=f"{modality}{int(rs.integers(1, 9))}OC{int(rs.integers(10, 99))}",
                frame_uid=str(dw.make_uid(*uid_parts, "frame")), age=f"{age:03d}Y")
            series = []
            order = MR_ORDER if modality == "MR" else CT_ORDER
            for n, role in enumerate(order):
                sseed = _series_seed(pseed, modality, ordinal, role)
                series.append(_plan_series(role, modality, sseed, start + dt.timedelta(minutes=3 + 6 * n),
                                           scaling, model, uid_parts))
            studies.append(StudyPlan(info=study, date=date, series=series))
    studies.sort(key=lambda s: (s.date, s.info.modality))
    rfold = _rng(pseed, 4)
    for study in studies:
        study.folder_no = int(rfold.integers(10000, 99999))
        for s in study.series:
            s.folder_no = int(rfold.integers(10000, 99999))
    return PatientPlan(index=index, seed=pseed, scenario=scenario, info=patient, studies=studies)


def patient_scaling(pseed: int, model: TissueModel) -> np.ndarray:
    """The patient's head size as a 4x4 scaling about the brain centre (the first draws of the anatomy stream,
    which make_patient repeats)."""
    scale = _rng(pseed, 0).uniform(0.92, 1.08, size=3)
    return affine_about(np.diag(scale), model.center)


def planning_points(model: TissueModel, transform: np.ndarray, down_to: str | None = None,
                    face: bool = False) -> np.ndarray:
    """Series points a technologist plans a grid on: the cranium (brain, skull, scalp), down to a level of the neck
    (CT: "c1" by default, "c2", "menton"), with the face's landmarks if asked."""
    pts = [model.head_points]
    if down_to:
        pts.append(model.levels[down_to])
    if face:
        pts.append(np.stack(list(model.landmarks.values())))
    return np.vstack(pts) @ transform[:3, :3].T + transform[:3, 3]


def _plan_series(role: str, modality: str, sseed: int, when: dt.datetime, scaling: np.ndarray,
                 model: TissueModel, uid_parts: tuple, transform: np.ndarray | None = None,
                 proto: dict | None = None, uid_key: tuple = ()) -> SeriesPlan:
    """One series' plan; without ``transform`` its pose is drawn from the series' own stream (each series of a
    session independently placed), with ``proto`` other acquisition parameters than the role's default."""
    proto = dict(proto if proto is not None else (MR_PROTOCOLS if modality == "MR" else CT_PROTOCOLS)[role])
    rng = _rng(sseed, 0)
    if transform is None:
        transform = _pose(rng, model.center) @ scaling
    head = planning_points(model, transform, proto.get("down_to") if modality == "CT" else None,
                           proto.get("face", False))
    center = transform[:3, :3] @ model.center + transform[:3, 3]
    info = dw.SeriesInfo(uid=str(dw.make_uid(*uid_parts, *uid_key, role, "series")), number=proto["number"],
                         description=proto["description"], role=role, time=when.strftime("%H%M%S"),
                         image_type=list(proto.get("image_type", [])), protocol=proto)
    plan = SeriesPlan(info=info, role=role, modality=modality, transform=transform, geometry=None, seed=sseed)
    if role in AXIAL_ROLES and proto.get("plane", "axial") == "axial":
        plan.geometry = _axial_grid(head, rng, proto["fov"] + rng.choice([-10.0, 0.0, 10.0]), proto["matrix"],
                                    proto["step"])
        plan.thickness = proto["thickness"]
        plan.spacing_between = proto["step"] if modality == "MR" else None
        plan.instances = proto["instances"]
        if modality == "CT":
            plan.info.protocol["recon_diameter"] = plan.geometry.spacing[0] * plan.geometry.size[0]
    elif role == "localizer":
        c = np.array([_round(v, 1) for v in center])
        planes = [((1, 0, 0), (0, 1, 0)), ((0, 1, 0), (0, 0, -1)), ((1, 0, 0), (0, 0, -1))]
        plan.images = [_plane_geometry(c, r, cl, proto["fov"], proto["matrix"], proto["thickness"]) for r, cl in planes]
        plan.usable, plan.reason = False, "localizer"
    elif role == "scout":
        c = np.array([_round(v, 1) for v in center])
        planes = proto.get("planes", [((0, 1, 0), (0, 0, -1))])  # lateral; AP is ((1, 0, 0), (0, 0, -1))
        plan.images = [_plane_geometry(c, r, cl, proto["fov"], proto["matrix"], 1.0) for r, cl in planes]
        plan.info.protocol["recon_diameter"] = proto["fov"]
        plan.usable, plan.reason = False, "scout"
    elif role == "sr":
        plan.usable, plan.reason = False, "not an image"
    return plan


# ------------------------------------------------------------------------------------------------ quirks
# Where each quirk lands: (preferred patient index, candidate roles). With 4 patients (scenarios pair, two_ct,
# too_far, mr_only) both pairs survive with every quirk on, and no series carries two quirks.
QUIRK_TARGETS: dict[str, tuple[int, tuple[str, ...]]] = {
    "multiframe_mr": (2, ("t1c", "t2", "flair")),
    "compressed": (1, ("t1c", "t2", "flair")),  # RLE; a CT series in JPEG 2000 is placed separately
    "gantry_tilt": (1, ("ct",)),
    "missing_slice": (0, ("flair", "t2")),
    "truncated_file": (1, ("t2", "flair")),
    "duplicate_instance": (0, ("t1c", "t2", "flair", "ct")),
    "shuffled_instance_numbers": (3, ("t1c", "t2", "flair", "ct")),
}
J2K_TARGET = (0, ("ct",))
TILT_CHOICES = (15.0, 18.0, 20.0)


def _candidates(plans: list[PatientPlan], start: int, roles: tuple[str, ...]):
    """Series with one of ``roles``, patients from ``start`` on (wrapping), the most pair-relevant study first."""
    n = len(plans)
    for off in range(n):
        p = plans[(start + off) % n]
        for role in roles:
            studies = [st for st in p.studies if any(s.role == role for s in st.series)]
            others = [st.date for st in p.studies if st.info.modality != (studies[0].info.modality if studies else "")]
            studies.sort(key=lambda st: min((abs((st.date - d).days) for d in others), default=0))
            for st in studies:
                for s in st.series:
                    if s.role == role:
                        yield p, st, s


def _pick(plans, start, roles, allow_shared: bool):
    cands = list(_candidates(plans, start, roles))
    free = [c for c in cands if not c[2].quirks]
    if free:
        return free[0]
    shared = [c for c in cands if allow_shared and not c[2].multiframe and c[2].usable]
    return shared[0] if shared else None


def assign_quirks(plans: list[PatientPlan], quirks: Sequence[str], model: TissueModel,
                  corpus_seed: int) -> list[dict]:
    """Mark the series each quirk hits; returns the quirk log (what, where, and what a correct tool concludes)."""
    log_entries: list[dict] = []
    for name in QUIRKS:
        if name not in quirks or name == "non_dicom_file":
            continue
        rng = _rng(corpus_seed, 99, QUIRKS.index(name))
        targets = [QUIRK_TARGETS[name]] + ([J2K_TARGET] if name == "compressed" else [])
        for t_index, (start, roles) in enumerate(targets):
            hit = _pick(plans, start, roles, allow_shared=name != "multiframe_mr")
            if hit is None:
                log.warning("quirk %s: no series to apply it to in this corpus", name)
                continue
            p, st, s = hit
            s.quirks.append(name)
            entry = {"quirk": name, "patient_id": p.info.patient_id, "study_uid": st.info.uid,
                     "series_uid": s.info.uid, "role": s.role}
            n = s.geometry.size[2]
            if name == "missing_slice":
                s.missing_k = int(rng.integers(2, n - 2))
                s.usable, s.reason = False, f"missing slice (slice {s.missing_k} of {n} absent)"
                entry["expected"] = "series refused: missing slice"
            elif name == "truncated_file":
                s.truncated_k = int(rng.integers(2, n - 2))
                s.usable, s.reason = False, f"missing slice (slice {s.truncated_k} of {n} is a truncated file)"
                entry["expected"] = "the truncated file is unreadable; the series is refused: missing slice"
            elif name == "duplicate_instance":
                s.duplicate_k = int(rng.integers(0, n))
                entry["expected"] = "series usable after dropping the duplicate (same SOPInstanceUID)"
            elif name == "shuffled_instance_numbers":
                s.shuffled = True
                entry["expected"] = "series usable: slices ordered by position, not InstanceNumber"
            elif name == "compressed":
                s.transfer_syntax = str(dw.RLELossless if t_index == 0 else dw.JPEG2000Lossless)
                entry["transfer_syntax"] = s.transfer_syntax
                entry["expected"] = "series usable: voxels identical to the uncompressed values after decoding"
            elif name == "multiframe_mr":
                s.multiframe = True
                entry["expected"] = "series usable: one Enhanced MR file, frames placed by PlanePositionSequence"
            elif name == "gantry_tilt":
                s.tilt_deg = float(TILT_CHOICES[int(rng.integers(len(TILT_CHOICES)))])
                proto = s.info.protocol
                head = planning_points(model, s.transform, proto.get("down_to"), proto.get("face", False))
                s.geometry = _tilted_grid(head, s.geometry, s.tilt_deg, proto["step"])
                entry["tilt_deg"] = s.tilt_deg
                entry["expected"] = ("series usable: resample the sheared slices onto an orthogonal grid; "
                                     "the manifest transform stays exact")
            log_entries.append(entry)
    return log_entries


def _tilted_grid(points: np.ndarray, axial: Geometry, tilt_deg: float, step: float, margin: float = 3.0) -> Geometry:
    """The same in-plane grid with its column direction tilted about x; slices still advance along z only."""
    t = np.deg2rad(tilt_deg)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, float(dw._fmt(np.cos(t))), float(dw._fmt(-np.sin(t)))])
    axes = np.stack([row, col, np.array([0.0, 0.0, 1.0])], axis=1)
    px, py = axial.spacing[0], axial.spacing[1]
    ni, nj = axial.size[0], axial.size[1]
    centre = axial.origin + np.array([(ni - 1) / 2 * px, (nj - 1) / 2 * py, 0.0])
    # k of each head point in the sheared basis decides how many slices cover the head
    m = axes * np.array([px, py, step])[None, :]
    base = centre - m[:, 0] * (ni - 1) / 2 - m[:, 1] * (nj - 1) / 2
    ks = np.linalg.solve(m, (points - base).T)[2]
    k0 = math.floor(ks.min() - margin / step)
    n = int(math.ceil(ks.max() + margin / step)) - k0 + 1
    origin = base + m[:, 2] * k0
    origin = np.array([_round(v) for v in origin])
    return Geometry(size=(ni, nj, n), spacing=(px, py, float(step)), origin=origin, axes=axes)


# ------------------------------------------------------------------------------------------------ rendering
def patient_anatomy(plan: PatientPlan, model: TissueModel) -> PatientAnatomy:
    return make_patient(_rng(plan.seed, 0), model)


def _window(arr: np.ndarray, lo_q=1.0, hi_q=99.5) -> tuple[float, float]:
    sample = arr[::4, ::8, ::8]
    sample = sample[sample > 0]
    if sample.size == 0:
        return 500.0, 1000.0
    lo, hi = np.percentile(sample, [lo_q, hi_q])
    return float(round((lo + hi) / 2)), float(max(round(hi - lo), 1))


def render_series(plan: SeriesPlan, anatomy: PatientAnatomy) -> list[np.ndarray]:
    """The series' stored pixel values: one (k, j, i) array for a volume, or one 2D array per single image.

    MR: uint16 magnitude. CT: int16 stored values (HU - intercept), padding outside the reconstruction circle.
    """
    if plan.recipe is not None:
        return plan.recipe.render(plan, anatomy)
    rng = _rng(plan.seed, 1)
    deform = anatomy.deformation()
    if plan.role in ("t1c", "t2", "flair", "localizer", "t1"):
        contrast = "t1c" if plan.role == "localizer" else plan.role
        img = anatomy.contrast(contrast)
        geoms = [plan.geometry] if plan.geometry is not None else plan.images
        out = []
        for g in geoms:
            signal = render(img, g, plan.transform, deform, AIR[contrast])
            gain = np.float32(rng.uniform(0.9, 1.4))
            signal *= bias_field(signal.shape, rng) * gain
            sigma = 12.0 if plan.role != "localizer" else 25.0
            values = rician(signal, sigma, rng)
            out.append(np.clip(np.rint(values), 0, 4095).astype(np.uint16))
        return out if plan.geometry is None else out[:1]
    if plan.role == "ct":
        hu = _render_fine(anatomy.contrast("ct"), plan.geometry, plan.transform, deform, AIR["ct"])
        hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(5.0)
        plan.couch = _add_couch(hu, plan.geometry, rng)  # the same plate for its other reconstructions
        stored = np.clip(np.rint(hu - CT_INTERCEPT), -1024, 4095).astype(np.int16)
        stored[:, ~_recon_circle(plan.geometry)] = CT_PADDING_STORED
        return [stored]
    if plan.role == "scout":
        return [_scout(plan, anatomy, g) for g in plan.images]
    return []


def _render_fine(image: sitk.Image, g: Geometry, transform: np.ndarray, deform, default: float) -> np.ndarray:
    """Render a fine in-plane grid (finer than the 1 mm anatomy) at half resolution, then upsample linearly.

    The anatomy has no detail below 1 mm, so this changes nothing that matters and saves most of the time.
    """
    ni, nj, nk = g.size
    if ni % 2 or nj % 2:
        return render(image, g, transform, deform, default)
    px, py = g.spacing[0], g.spacing[1]
    coarse = Geometry(size=(ni // 2, nj // 2, nk), spacing=(2 * px, 2 * py, g.spacing[2]),
                      origin=g.origin + g.axes[:, 0] * px / 2 + g.axes[:, 1] * py / 2, axes=g.axes)
    low = sitk.GetImageFromArray(render(image, coarse, transform, deform, default))
    low.SetSpacing((2.0, 2.0, 1.0))
    low.SetOrigin((0.5, 0.5, 0.0))  # index space of the fine grid
    ref = sitk.Image([ni, nj, nk], sitk.sitkFloat32)
    f = sitk.ResampleImageFilter()
    f.SetReferenceImage(ref)
    f.SetInterpolator(sitk.sitkLinear)
    f.SetUseNearestNeighborExtrapolator(True)
    fine = f.Execute(low)
    return sitk.GetArrayFromImage(fine)


def _inplane_xy(g: Geometry) -> tuple[np.ndarray, np.ndarray]:
    m = g.index_matrix
    if abs(m[0, 2]) > 1e-9 or abs(m[1, 2]) > 1e-9:
        raise ValueError("in-plane coordinates need slices stepping along z")
    i = np.arange(g.size[0])[None, :]
    j = np.arange(g.size[1])[:, None]
    x = g.origin[0] + m[0, 0] * i + m[0, 1] * j
    y = g.origin[1] + m[1, 0] * i + m[1, 1] * j
    return x, y


def _recon_circle(g: Geometry) -> np.ndarray:
    n = g.size[0]
    i = np.arange(n)[None, :] - (n - 1) / 2
    j = np.arange(g.size[1])[:, None] - (g.size[1] - 1) / 2
    return i * i + j * j <= (n / 2) ** 2


def _add_couch(hu: np.ndarray, g: Geometry, rng: np.random.Generator) -> dict | None:
    """A curved headrest plate behind the occiput, fixed in the scanner frame, never touching the head.

    Returns the plate (centre x, y and inner radius in mm, HU) so that other reconstructions place the same one."""
    from scipy import ndimage

    x, y = _inplane_xy(g)
    head = (hu > -500).any(axis=0)
    if not head.any():
        return None
    px = float(min(g.spacing[0], g.spacing[1]))
    dist = ndimage.distance_transform_edt(~head) * px  # mm from the head (in-plane projection over all slices)
    cx = float(x[head].mean())
    y_back = float(y[head].max())
    radius = float(rng.uniform(80.0, 110.0))
    gap = float(rng.uniform(6.0, 10.0))
    cy = y_back + gap - radius
    for _ in range(20):  # push the plate back until it clears the head everywhere
        cy = y_back + gap - radius
        plate = couch_plate(x, y, cx, cy, radius)
        if not plate.any() or dist[plate].min() >= 5.0:
            break
        gap += 2.0
    level = np.float32(rng.uniform(250.0, 450.0))
    hu[:, plate] = level + rng.standard_normal((hu.shape[0], int(plate.sum())), dtype=np.float32) * np.float32(5.0)
    return {"cx": cx, "cy": cy, "radius": radius, "hu": float(level)}


def couch_plate(x: np.ndarray, y: np.ndarray, cx: float, cy: float, radius: float) -> np.ndarray:
    """Where the headrest plate is: a 6 mm arc behind the head, constant along z (x, y: physical LPS mm)."""
    r = np.hypot(x - cx, y - cy)
    return (r >= radius) & (r <= radius + 6.0) & (y > cy + 0.5 * radius)


def _scout(plan: SeriesPlan, anatomy: PatientAnatomy, g: Geometry) -> np.ndarray:
    """A projection radiograph through the head along the image normal (line integral of attenuation)."""
    vol_g = Geometry(size=(g.size[0], g.size[1], 64), spacing=(g.spacing[0], g.spacing[1], 4.0),
                     origin=g.origin - g.axes[:, 2] * 32 * 4.0, axes=g.axes)
    hu = render(anatomy.contrast("ct"), vol_g, plan.transform, None, AIR["ct"])
    mu = np.clip(hu + 1000.0, 0.0, None) / 1000.0 * 0.02  # 1/mm, water ~0.02
    line = mu.sum(axis=0) * 4.0
    img = 3000.0 * (1.0 - np.exp(-line / 2.0))
    return np.clip(np.rint(img), 0, 4095).astype(np.int16)


# ------------------------------------------------------------------------------------------------ in memory
@dataclass
class SimPatient:
    """One synthetic patient in memory (no DICOM): what registration tests need."""

    seed: int
    mr: sitk.Image  # T1 post-contrast, float32 scanner-like intensities, in its series geometry
    ct: sitk.Image  # HU float32 (padding outside the reconstruction circle is -3024)
    mr_transform: np.ndarray  # template physical LPS mm -> MR series physical LPS mm
    ct_transform: np.ndarray
    lesion: dict
    scale: np.ndarray
    plan: PatientPlan
    field: sitk.Image | None = None  # the patient's displacement field (template mm): see points.py

    @property
    def ct_to_mr(self) -> np.ndarray:
        """4x4 rigid: CT series physical -> MR series physical."""
        return self.mr_transform @ np.linalg.inv(self.ct_transform)


def to_image(arr: np.ndarray, g: Geometry) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetOrigin([float(v) for v in g.origin])
    img.SetSpacing([float(v) for v in g.spacing])
    img.SetDirection([float(v) for v in g.axes.ravel()])
    return img


def simulate_patient(seed: int, template: Template | None = None) -> SimPatient:
    """A paired patient (scenario "pair") in memory: the T1c and the CT of its first MR and CT studies.

    ``seed`` is a patient seed: a corpus patient with manifest ``sim_seed`` S gives the same anatomy,
    transforms and voxels for its first MR study's T1c and first CT study's CT as ``simulate_patient(S)``.
    """
    model = tissue_model(template)
    plan = plan_patient(int(seed), "pair", 0, model)
    anatomy = patient_anatomy(plan, model)
    mr = next(s for st in plan.studies if st.info.modality == "MR" for s in st.series if s.role == "t1c")
    ct = next(s for st in plan.studies if st.info.modality == "CT" for s in st.series if s.role == "ct")
    mr_img = to_image(render_series(mr, anatomy)[0].astype(np.float32), mr.geometry)
    ct_img = to_image(render_series(ct, anatomy)[0].astype(np.float32) + np.float32(CT_INTERCEPT), ct.geometry)
    return SimPatient(seed=int(seed), mr=mr_img, ct=ct_img, mr_transform=mr.transform, ct_transform=ct.transform,
                      lesion=anatomy.lesion.as_dict(), scale=anatomy.scale, plan=plan, field=anatomy.field)


# ------------------------------------------------------------------------------------------------ corpus
@dataclass
class SynthSummary:
    manifest: dict
    n_files: int
    n_bytes: int
    seconds: float
    out_url: str = ""
    manifest_url: str = ""

    def describe(self) -> str:
        m = self.manifest
        n_series = sum(len(st["series"]) for p in m["patients"] for st in p["studies"])
        n_studies = sum(len(p["studies"]) for p in m["patients"])
        quirks = ", ".join(m["generator"]["quirks"]) or "none"
        lines = [
            f"wrote {self.n_files} files ({self.n_bytes / 1e6:.1f} MB) in {self.seconds:.1f} s to {self.out_url}",
            f"  {len(m['patients'])} patients, {n_studies} studies, {n_series} series; quirks: {quirks}",
            f"  expected pairs: {len(m['expected_pairs'])}; expected exclusions: {len(m['expected_exclusions'])}",
            f"  ground-truth manifest: {self.manifest_url}",
        ]
        return "\n".join(lines)


@dataclass
class _Out:
    """Collects files for one series and writes them in one batch (concurrent on object storage)."""

    fs: Any
    root: str
    local: bool
    files: list[dict] = field(default_factory=list)
    n_bytes: int = 0
    pending: dict[str, bytes] = field(default_factory=dict)

    def add(self, rel: str, data: bytes, kind: str, series_uid: str | None, sop_uid: str | None,
            duplicate_of: str | None = None) -> None:
        self.pending[rel] = data
        self.files.append({"path": rel, "kind": kind, "series_uid": series_uid, "sop_uid": sop_uid,
                           "duplicate_of": duplicate_of})
        self.n_bytes += len(data)

    def flush(self) -> None:
        if not self.pending:
            return
        full = {f"{self.root}/{rel}": data for rel, data in self.pending.items()}
        if self.local:
            for d in sorted({p.rsplit("/", 1)[0] for p in full}):
                self.fs.makedirs(d, exist_ok=True)
        self.fs.pipe(full)
        self.pending = {}


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in " .-_" else "_" for c in text)


def _study_folder(study: StudyPlan) -> str:
    return f"{study.date.strftime('%m-%d-%Y')}-NA-{_safe(study.info.description)}-{study.folder_no}"


def _series_folder(series: SeriesPlan) -> str:
    return f"{series.info.number}.000000-{_safe(series.info.description)}-{series.folder_no}"


def _series_datasets(plan: SeriesPlan, patient: PatientPlan, study: StudyPlan,
                     pixels: list[np.ndarray], uid_parts: tuple) -> list[tuple[int, int, Any, Any]]:
    """(spatial index k, InstanceNumber, dataset, shared header or None) for each file of the series."""
    if plan.recipe is not None:
        return plan.recipe.datasets(plan, patient, study, pixels, uid_parts)
    out = []
    pinfo, sinfo, info = patient.info, study.info, plan.info
    if plan.role in VOLUME_ROLES:
        out = volume_datasets(plan, patient, study, pixels, uid_parts)
    elif plan.role in ("localizer", "scout"):
        for k, (g, img) in enumerate(zip(plan.images, pixels)):
            sop = sop_uid(uid_parts, info.uid, k)
            common = dict(sop_uid=sop, instance=k + 1, pixels=img, row=g.axes[:, 0], col=g.axes[:, 1],
                          position=g.origin, pixel_spacing=(g.spacing[1], g.spacing[0]), thickness=g.spacing[2],
                          window=_window(img[None]))
            if plan.modality == "MR":
                ds = dw.mr_image(pinfo, sinfo, info, spacing_between=None, **common)
            else:
                ds = dw.ct_image(pinfo, sinfo, info, intercept=0.0, padding=None, **common)
            out.append((k, k + 1, ds, None))
    elif plan.role == "sr":
        sop = sop_uid(uid_parts, info.uid, 0)
        text = (f"CT head without contrast. CTDIvol 52.3 mGy, DLP 915 mGy*cm. Referring: {sinfo.referring}. "
                f"Institution: {sinfo.institution}.")
        out.append((0, 1, dw.text_sr(pinfo, sinfo, info, sop_uid=sop, text=text), None))
    return out


def volume_datasets(plan: SeriesPlan, patient: PatientPlan, study: StudyPlan, pixels: list[np.ndarray],
                    uid_parts: tuple) -> list[tuple[int, int, Any, Any]]:
    """One file per slice of a 3D volume series, sharing one header."""
    vol, g = pixels[0], plan.geometry
    header = volume_header(plan, patient, study, vol)
    numbers = _instance_numbers(plan)
    out = []
    for k in range(g.size[2]):
        ds = dw.slice_dataset(header, sop_uid=sop_uid(uid_parts, plan.info.uid, k), instance=numbers[k],
                              position=g.physical([0, 0, k]), pixels=vol[k])
        out.append((k, numbers[k], ds, header))
    return out


def sop_uid(uid_parts: tuple, series_uid: str, k: int) -> str:
    """The SOPInstanceUID of image ``k`` (spatial order) of a series."""
    return str(dw.make_uid(*uid_parts, series_uid, k, "sop"))


def volume_header(plan: SeriesPlan, patient: PatientPlan, study: StudyPlan, vol: np.ndarray) -> Any:
    """The header shared by every slice of a volume series (``vol``: its stored values, for the MR window)."""
    g = plan.geometry
    proto = plan.info.protocol
    window = proto.get("window") or ((40.0, 80.0) if plan.modality == "CT" else _window(vol))
    geo = dict(rows_cols=vol.shape[-2:], row=g.axes[:, 0], col=g.axes[:, 1],
               pixel_spacing=(g.spacing[1], g.spacing[0]), thickness=plan.thickness, window=window,
               spacing_between=plan.spacing_between)
    if plan.modality == "MR":
        return dw.mr_header(patient.info, study.info, plan.info, **geo)
    return dw.ct_header(patient.info, study.info, plan.info, intercept=CT_INTERCEPT,
                        padding=proto.get("padding", CT_PADDING_STORED), tilt=plan.tilt_deg, **geo)


def _instance_numbers(plan: SeriesPlan) -> list[int]:
    n = plan.geometry.size[2]
    if plan.shuffled:
        perm = _rng(plan.seed, 5).permutation(n)
        while n > 2 and (np.all(np.diff(perm) > 0) or np.all(np.diff(perm) < 0)):
            perm = _rng(plan.seed, 6).permutation(n)
        return [int(v) + 1 for v in perm]
    return [k + 1 if plan.instances == "asc" else n - k for k in range(n)]


def _series_manifest(plan: SeriesPlan, files: list[str], truth: PatientTruth) -> dict:
    weighting, post_contrast, candidate, why = ROLE_TRUTH[plan.role]
    proto = plan.info.protocol
    entry = {
        "series_uid": plan.info.uid, "series_number": plan.info.number, "description": plan.info.description,
        "role": plan.role, "modality": plan.modality, "files": files, "usable": plan.usable, "reason": plan.reason,
        "geometry": plan.geometry.as_dict() if plan.geometry is not None else None,
        "transform": [[float(v) for v in row] for row in plan.transform],
        "rescale": _rescale(plan),
        "quirks": list(plan.quirks),
        "series_time": plan.info.time,
        "image_type": list(plan.info.image_type),
        "candidate": candidate, "candidate_reason": why,
        "weighting": weighting, "post_contrast": post_contrast,
        "contrast_agent": proto.get("contrast") or "" if plan.modality == "MR" else None,
        "mr_acquisition": proto.get("acquisition_type") if plan.modality == "MR" and plan.geometry else None,
        "kernel": _kernel(plan),
        "derived": _derived(plan),
        "whole_head": plan.whole_head,
        "body_part": proto.get("body_part", "HEAD") if plan.geometry is not None or plan.images else None,
    }
    if plan.geometry is not None or plan.images:
        entry.update(truth.in_series(plan.transform, plan.geometry))
    if plan.images:
        entry["images"] = [g.as_dict() for g in plan.images]
    if plan.tilt_deg:
        entry["tilt_deg"] = plan.tilt_deg
    if plan.transfer_syntax:
        entry["transfer_syntax"] = plan.transfer_syntax
    if plan.missing_k is not None:
        entry["missing"] = {"k": plan.missing_k, "path": plan.missing_path}
    if plan.multiframe:
        entry["sop_class_uid"] = str(dw.ENHANCED_MR_IMAGE_STORAGE)
    entry.update(plan.manifest)
    return entry


def _rescale(plan: SeriesPlan) -> dict | None:
    """Stored value -> HU as written (scouts are written with intercept 0 and no padding)."""
    if plan.modality != "CT" or plan.role not in VOLUME_ROLES + ("scout",):
        return None
    if plan.role == "scout":
        return {"slope": 1, "intercept": 0.0, "padding_value": None}
    padding = plan.info.protocol.get("padding", CT_PADDING_STORED)
    return {"slope": 1, "intercept": CT_INTERCEPT, "padding_value": padding}


def _derived(plan: SeriesPlan) -> bool:
    return bool(plan.info.image_type) and plan.info.image_type[0] == "DERIVED"


def _kernel(plan: SeriesPlan) -> str | None:
    if plan.modality != "CT" or plan.role not in VOLUME_ROLES:
        return None
    return "bone" if plan.role == "ct_bone" else "soft"


def covers_head(plan: SeriesPlan, model: TissueModel) -> bool | None:
    """Whether the series' grid holds the whole head: the cranium (brain, skull and scalp above the skull base) every
    point of it within half a voxel of the grid."""
    if plan.geometry is None:
        return None
    return holds(plan.geometry, model.head_points @ plan.transform[:3, :3].T + plan.transform[:3, 3])


def holds(g: Geometry, points: np.ndarray, margin_mm: float = 0.0) -> bool:
    """Whether every point (series LPS mm) lies within the grid (within half a voxel of its outer voxel centres),
    ``margin_mm`` inside its edges."""
    ijk = np.linalg.solve(g.index_matrix, (np.atleast_2d(points) - g.origin).T)
    m = margin_mm / np.asarray(g.spacing, float)[:, None]
    size = np.asarray(g.size, float)[:, None]
    return bool(np.all((ijk >= -0.5 + m) & (ijk <= size - 0.5 - m)))


FACE_MARGIN_MM = 5.0


@dataclass
class PatientTruth:
    """A patient's anatomy points in its template frame, y = d^-1(a) (a series point x = T y sees the anatomy at a):
    face landmarks, the brain centre and (subsampled) template brain points."""

    landmarks: dict[str, np.ndarray]
    brain_center: np.ndarray
    brain: np.ndarray

    @classmethod
    def of(cls, anatomy: PatientAnatomy, n_brain: int = 3000) -> PatientTruth:
        model = anatomy.model
        names = list(model.landmarks)
        pts = np.vstack([np.stack([model.landmarks[n] for n in names]), model.center[None, :],
                         model.brain_points[:: max(1, len(model.brain_points) // n_brain)]])
        y = anatomy.to_template(pts)
        return cls(landmarks=dict(zip(names, y[:len(names)])), brain_center=y[len(names)], brain=y[len(names) + 1:])

    def as_dict(self) -> dict:
        return {"landmarks": {k: _point(v) for k, v in self.landmarks.items()},
                "brain_center": _point(self.brain_center)}

    def in_series(self, transform: np.ndarray, g: Geometry | None) -> dict:
        """Landmarks and brain centre in series LPS mm; whether the grid holds the whole brain and the face (each face
        landmark with FACE_MARGIN_MM around it)."""
        t = np.asarray(transform, float)

        def to(p):
            return np.atleast_2d(p) @ t[:3, :3].T + t[:3, 3]

        out: dict[str, Any] = {"landmarks": {k: _point(to(v)[0]) for k, v in self.landmarks.items()},
                               "brain_center": _point(to(self.brain_center)[0]), "holds_brain": None,
                               "holds_face": None}
        if g is not None:
            out["holds_brain"] = holds(g, to(self.brain))
            out["holds_face"] = holds(g, to(np.stack(list(self.landmarks.values()))), FACE_MARGIN_MM)
        return out


def _point(p) -> list[float]:
    return [round(float(v), 4) for v in p]


# ------------------------------------------------------------------------------------------------ expected choices
def sessions(p: PatientPlan) -> list[tuple[str, list[StudyPlan]]]:
    """(session id, studies): a patient's studies of one modality on one date belong to one session."""
    out: dict[tuple[str, dt.date], list[StudyPlan]] = {}
    for st in p.studies:
        out.setdefault((st.info.modality, st.date), []).append(st)
    return [(f"{m}-{d.strftime('%Y%m%d')}", sts) for (m, d), sts in out.items()]


def _rank(s: SeriesPlan) -> tuple:
    """Lower is better. MR: post-contrast, 3D, finer voxels, whole head, ORIGINAL. CT: ORIGINAL, soft tissue kernel,
    thinnest slices."""
    if s.modality == "MR":
        voxel = float(np.prod(s.geometry.spacing)) if s.geometry is not None else math.inf
        return (not ROLE_TRUTH[s.role][1], s.info.protocol.get("acquisition_type") != "3D", round(voxel, 4),
                not s.whole_head, _derived(s))
    return (_derived(s), _kernel(s) != "soft", round(float(s.thickness), 4))


_RANK_REASONS = {"MR": ("pre-contrast", "2D (a 3D acquisition is preferred)", "coarser voxels", "partial coverage",
                        "DERIVED"),
                 "CT": ("DERIVED (reformatted)", "bone kernel (soft tissue preferred)", "thicker slices")}


def choose(studies: list[StudyPlan]) -> tuple[SeriesPlan, StudyPlan, list[dict]] | None:
    """The series a neuroradiologist takes from one session, its study, and why each other candidate lost."""
    cands = [(s, st) for st in studies for s in st.series if ROLE_TRUTH[s.role][2]]
    usable = sorted([c for c in cands if c[0].usable], key=lambda c: _rank(c[0]))
    if not usable:
        return None
    best, study = usable[0]
    others = []
    for s, _ in cands:
        if s is best:
            continue
        if not s.usable:
            why = f"not usable: {s.reason}"
        else:
            a, b = _rank(best), _rank(s)
            why = next(r for r, x, y in zip(_RANK_REASONS[s.modality], a, b) if x != y) if a != b else "equal rank"
        others.append({"series_uid": s.info.uid, "description": s.info.description, "why_not": why})
    return best, study, others


def _expected(patients: list[PatientPlan]) -> tuple[list[dict], list[dict]]:
    pairs, exclusions = [], []
    for p in patients:
        by_modality: dict[str, list[tuple[str, list[StudyPlan]]]] = {"MR": [], "CT": []}
        for sid, sts in sessions(p):
            by_modality[sts[0].info.modality].append((sid, sts))
        reason = ""
        if not by_modality["MR"]:
            reason = "no MR study"
        elif not by_modality["CT"]:
            reason = "no CT study"
        else:
            mr_ok = [(sid, sts, c) for sid, sts in by_modality["MR"] if (c := choose(sts))]
            ct_ok = [(sid, sts, c) for sid, sts in by_modality["CT"] if (c := choose(sts))]
            if not mr_ok:
                reason = "no usable MR series"
            elif not ct_ok:
                reason = "no usable CT series"
            else:
                cands = sorted(((abs((c[1][0].date - m[1][0].date).days), m, c) for m in mr_ok for c in ct_ok),
                               key=lambda t: t[0])
                gap, m, c = cands[0]
                if gap > MAX_DAYS:
                    reason = f"too far apart (closest MR/CT studies {gap} days apart > {MAX_DAYS})"
                else:
                    (m_id, m_sts, (ms, mst, m_alt)), (c_id, c_sts, (cs, cst, c_alt)) = m, c
                    pairs.append({"patient_id": p.info.patient_id, "mr_study_uid": mst.info.uid,
                                  "ct_study_uid": cst.info.uid, "mr_series_uid": ms.info.uid,
                                  "ct_series_uid": cs.info.uid, "days_apart": (cst.date - mst.date).days,
                                  "mr_session_id": m_id, "ct_session_id": c_id,
                                  "mr_session_study_uids": [st.info.uid for st in m_sts],
                                  "ct_session_study_uids": [st.info.uid for st in c_sts],
                                  "mr_alternatives": m_alt, "ct_alternatives": c_alt})
        if reason:
            exclusions.append({"patient_id": p.info.patient_id, "reason": reason})
    return pairs, exclusions


def _phi(patients: list[PatientPlan]) -> dict:
    phi: dict[str, list[str]] = {k: [] for k in ("patient_names", "patient_ids", "birth_dates", "accession_numbers",
                                                 "institutions", "referring_physicians", "study_dates", "uids")}
    for p in patients:
        phi["patient_names"].append(p.info.name)
        phi["patient_ids"].append(p.info.patient_id)
        phi["birth_dates"].append(p.info.birth_date)
        for st in p.studies:
            phi["accession_numbers"].append(st.info.accession)
            phi["institutions"].append(st.info.institution)
            phi["referring_physicians"].append(st.info.referring)
            phi["study_dates"].append(st.info.date)
            phi["uids"].append(st.info.uid)
            phi["uids"].extend(s.info.uid for s in st.series)
    return {k: sorted(set(v)) for k, v in phi.items()}


def _add_quirk_files(quirk_log: list[dict], patient_entries: list[dict], out: _Out) -> None:
    """Name the files each quirk touched in its log entry."""
    by_series: dict[str, list[dict]] = {}
    for f in out.files:
        if f["series_uid"]:
            by_series.setdefault(f["series_uid"], []).append(f)
    series = {s["series_uid"]: s for p in patient_entries for st in p["studies"] for s in st["series"]}
    for e in quirk_log:
        if "series_uid" not in e:
            continue
        files = by_series.get(e["series_uid"], [])
        q = e["quirk"]
        if q == "missing_slice":
            e["files"] = list(series[e["series_uid"]]["files"])
            e["missing_path"] = series[e["series_uid"]]["missing"]["path"]
        elif q == "truncated_file":
            e["files"] = [f["path"] for f in files if f["kind"] == "truncated"]
        elif q == "duplicate_instance":
            e["files"] = [f["path"] for f in files if f["duplicate_of"]]
            e["duplicate_of"] = [f["duplicate_of"] for f in files if f["duplicate_of"]]
        else:
            e["files"] = [f for uid in e.get("series_uids", [e["series_uid"]]) for f in series[uid]["files"]]


class _Namer:
    """File names: the TCIA layout as is, or flat (one folder, extension-less names from a keyed hash)."""

    def __init__(self, layout: str, seed: int):
        self.layout, self.seed = layout, seed

    def __call__(self, rel: str) -> str:
        if self.layout == "tcia":
            return rel
        return hashlib.sha256(f"{self.seed}/{rel}".encode()).hexdigest()[:20]


def _write_patient(plan: PatientPlan, model: TissueModel, out: _Out, corpus_seed: int, namer: _Namer) -> dict:
    anatomy = patient_anatomy(plan, model)
    truth = PatientTruth.of(anatomy)
    entry = {"patient_id": plan.info.patient_id, "patient_name": plan.info.name, "birth_date": plan.info.birth_date,
             "sex": plan.info.sex, "scenario": plan.scenario, "sim_seed": plan.seed,
             "lesion": anatomy.lesion.as_dict(), "scale": [float(v) for v in anatomy.scale], **truth.as_dict(),
             "studies": []}
    session_of = {st.info.uid: sid for sid, sts in sessions(plan) for st in sts}
    for study in plan.studies:
        sfold = _study_folder(study)
        st_entry = {"study_uid": study.info.uid, "modality": study.info.modality, "study_date": study.info.date,
                    "accession_number": study.info.accession, "description": study.info.description,
                    "frame_of_reference_uid": study.info.frame_uid, "session_id": session_of[study.info.uid],
                    "study_time": study.info.time, "manufacturer": study.info.manufacturer,
                    "model": study.info.model, "series": []}
        for series in study.series:
            folder = f"{plan.info.patient_id}/{sfold}/{_series_folder(series)}"
            files = _write_series(series, plan, study, anatomy, folder, out, corpus_seed, namer)
            st_entry["series"].append(_series_manifest(series, files, truth))
        entry["studies"].append(st_entry)
    return entry


def _write_series(series: SeriesPlan, plan: PatientPlan, study: StudyPlan, anatomy: PatientAnatomy, folder: str,
                  out: _Out, corpus_seed: int, namer: _Namer) -> list[str]:
    """Render and write one series (quirks included); returns its files in true spatial order."""
    pixels = render_series(series, anatomy)
    uid_parts = (corpus_seed, plan.seed)
    ts = dw.UID(series.transfer_syntax) if series.transfer_syntax else None
    if series.multiframe:
        sop = str(dw.make_uid(*uid_parts, series.info.uid, "enhanced", "sop"))
        ds = dw.enhanced_mr(plan.info, study.info, series.info, sop_uid=sop, volume=pixels[0],
                            geometry=series.geometry, thickness=series.thickness,
                            spacing_between=series.spacing_between, window=_window(pixels[0]))
        rel = namer(f"{folder}/1-1.dcm")
        out.add(rel, dw.encode(ds, ts), "dicom", series.info.uid, sop)
        out.flush()
        return [rel]
    by_k: dict[int, str] = {}
    encoders: dict[int, dw.SeriesEncoder] = {}  # one per shared header (a 4D series has one per volume)
    for k, instance, ds, header in _series_datasets(series, plan, study, pixels, uid_parts):
        rel = namer(f"{folder}/1-{instance:03d}.dcm")
        if k == series.missing_k:
            series.missing_path = rel
            continue
        if header is not None and ts is None:
            if id(header) not in encoders:
                encoders[id(header)] = dw.SeriesEncoder(header)
            data = encoders[id(header)].encode(ds)
        else:
            data = dw.encode(ds, ts)
        sop = str(ds.SOPInstanceUID)
        if k == series.truncated_k:
            cut = len(data) - len(ds.PixelData) // 2  # inside the pixel data
            out.add(rel, data[:cut], "truncated", series.info.uid, sop)
        else:
            out.add(rel, data, "dicom", series.info.uid, sop)
        if k == series.duplicate_k:
            out.add(namer(f"{folder}/copy_of_1-{instance:03d}.dcm"), data, "dicom", series.info.uid, sop,
                    duplicate_of=rel)
        by_k[k] = rel
    out.flush()
    return [by_k[k] for k in sorted(by_k)]


def _write_non_dicom(manifest_patients: list[dict], out: _Out, corpus_seed: int, namer: _Namer) -> list[dict]:
    """A TCIA-style metadata.csv at the root and a stray binary (a macOS '._' resource file) in a series folder."""
    rows = ["Series UID,Subject ID,Study Description,Series Description,Modality,Number of Images,File Location"]
    first_folder = ""
    for p in manifest_patients:
        for st in p["studies"]:
            for s in st["series"]:
                folder = s["files"][0].rsplit("/", 1)[0] if "/" in s["files"][0] else "."
                first_folder = first_folder or folder
                rows.append(f"{s['series_uid']},{p['patient_id']},{st['description']},{s['description']},"
                            f"{st['modality']},{len(s['files'])},./{folder}")
    csv_rel = namer("metadata.csv")
    out.add(csv_rel, ("\n".join(rows) + "\n").encode(), "non_dicom", None, None)
    blob = _rng(corpus_seed, 98).integers(0, 256, size=4096, dtype=np.uint8).tobytes()
    blob_rel = namer(f"{first_folder}/._1-001.dcm") if first_folder != "." else namer("._1-001.dcm")
    out.add(blob_rel, b"\x00\x05\x16\x07" + blob, "non_dicom", None, None)
    out.flush()
    expected = "not DICOM: catalogued with a read error, never part of a series"
    return [{"quirk": "non_dicom_file", "files": [csv_rel, blob_rel], "expected": expected}]
