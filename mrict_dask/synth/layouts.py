"""Clinical layouts: how real sites store a brain MR session and a head CT study, as ``--quirks`` names.

Public collections (NCI Imaging Data Commons) show what a tool meets beyond the schematic session: one study per MR
sequence (UPENN-GBM), sagittal 3D or coronal 2D post-contrast T1s, contrast told only by ContrastBolusAgent while
"post" in a description means something else, 4D series (DSC perfusion, DTI), screenshots filed as MR, RT structure
sets, and CT studies with scouts, bone and thick reconstructions and reformats.

Each layout rebuilds one session of one patient of a paired scenario (patients drawn from the corpus seed; layouts
that do not contradict each other share a patient) and logs what a correct tool concludes:

- ``study_per_sequence``: every series of the MR session in its own StudyInstanceUID (same date, StudyTimes minutes
  apart, each study its own frame of reference), plus a thick pre-contrast axial 2D T1.
- ``sagittal_t1``: the post-contrast T1 is a sagittal 3D acquisition (1 mm isotropic, exact or oblique sagittal);
  a 5 mm axial 2D pre-contrast T1 is the distractor.
- ``coronal_t1``: the only T1 of the session is a coronal 2D post-contrast T1 (4–5 mm).
- ``contrast_tag_only``: pre- and post-contrast axial 3D T1s whose descriptions carry no contrast word (often the
  same description); only the post one has ContrastBolusAgent. A pre-contrast "t1post<n>" series with finer voxels
  is the decoy.
- ``perfusion``: a DSC series (EP, 2D, TR 1500 ms, 12–16 slices x 20 time points, 128 matrix, agent set) with a
  bolus passing; its time points are told apart as the vendor does (TemporalPositionIdentifier, AcquisitionNumber,
  or only AcquisitionTime), the habit drawn per corpus.
- ``dti``: b=0 plus b=1000 in 6–12 directions, positions repeated per volume; diffusion tags standard or the vendor's
  private ones (Siemens, GE, Philips), drawn per corpus.
- ``secondary_capture``: an RGB screenshot (Secondary Capture Image Storage) with Modality MR, no patient geometry.
- ``rtstruct``: an RT Structure Set (GTV contours on the CT's images) in its own series of the CT study.
- ``ct_reformat``: coronal and sagittal reformats (DERIVED) of the CT, 3 mm, same frame and pose.
- ``ct_bone``: a bone-kernel reconstruction of the same acquisition, thinner than the soft-tissue one.
- ``ct_thick``: a 5 mm soft-tissue reconstruction of the same acquisition.
- ``ct_scout``: a scout of two images (AP and lateral) in one series; per corpus, its ImageType says LOCALIZER or
  (described "Topogram") does not.
- ``sagittal_t1_neck``: the post-contrast T1 is a sagittal 3D with a 256, 270 or 280 mm field of view hung from the
  vertex (lowered to keep the chin where the vertex allows), centred on the head rather than the brain: face and neck
  down to about C3 in it.
- ``axial_t1_brain``: the post-contrast T1 covers the brain only: an axial 2D (5 mm; with ``contrast_tag_only``, its
  axial 3D), from below the cerebellum or from above the orbits (the posterior fossa cut) to the vertex; no face.
- ``off_centre_t1``: the head tilted 15-25 degrees in the coil for the post-contrast T1, and its grid 30-40 mm off the
  head's centre, away from the face (so the field of view cuts it) and sideways, as far as the brain stays inside.
- ``ct_face_neck``: the CT acquisition from C2 or below the mandible to the vertex, 280 mm field of view: face, teeth
  and upper neck, with the couch and headrest (every head CT has them).

The field-of-view layouts (the last four but ``ct_face_neck``) shape the session's post-contrast T1, so they land on a
patient whose T1 layout allows them: ``sagittal_t1_neck`` with ``sagittal_t1`` or none, ``axial_t1_brain`` with
``contrast_tag_only`` or none, ``off_centre_t1`` with any. The manifest tells for every series whether its grid holds
the whole brain and the face (``holds_brain``, ``holds_face``) and where the face landmarks are.

Each log entry names the patient, the ``study_uid`` and ``series_uid`` of the series the layout is about (for T1 and
field-of-view layouts and study_per_sequence: the post-contrast T1), ``series_uids`` (every series the layout made
or changed), ``role``, ``chosen_series_uid`` (the series the expected pair takes from that session) and
``expected``; and, where they apply, ``study_uids`` (study_per_sequence), ``contrast_agent`` (contrast_tag_only),
``split_by`` (perfusion), ``diffusion_style`` (dti), ``says_localizer`` (ct_scout), ``variant`` (axial_t1_brain:
skull_base or orbits), ``tilt_deg`` and ``offset_mm`` (off_centre_t1), ``down_to`` (ct_face_neck: c2 or menton).
Every series of a rebuilt session lists the session's layouts in its ``quirks``.

A rebuilt session is what a real one is: one scanner of a vendor drawn for the patient (Siemens, GE or Philips:
their naming, numbering and private tags), one head position per session and a small motion of each series of its
own (up to 3 degrees and 4 mm about each axis, and at least 2.5 mm mean apart over the brain between any two MR
series), reconstructions of one CT acquisition in exactly its pose, and BodyPartExamined on MR as exports carry it
(HEAD, BRAIN, HEADNECK, CSPINE, empty or absent). Patients and sessions no layout touches stay byte-identical: the
new choices come from streams of their own, (patient seed, 30..37, session) and (corpus seed, 196..199).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import dicom_writer as dw
from .anatomy import (
    AIR,
    Geometry,
    PatientAnatomy,
    TissueModel,
    affine_about,
    bias_field,
    render,
    rician,
    rotation_matrix,
)
from .corpus import (
    CT_INTERCEPT,
    CT_PADDING_STORED,
    CT_PROTOCOLS,
    LAYOUT_QUIRKS,
    MR_PROTOCOLS,
    PatientPlan,
    SeriesPlan,
    StudyPlan,
    _plan_series,
    _pose,
    _recon_circle,
    _render_fine,
    _rng,
    _round,
    _token,
    couch_plate,
    holds,
    patient_scaling,
    planning_points,
    sop_uid,
    volume_datasets,
    volume_header,
)

log = logging.getLogger(__name__)

PAIRED_SCENARIOS = ("pair", "two_ct", "two_mr", "pair_edge")
T1_LAYOUTS = ("sagittal_t1", "coronal_t1", "contrast_tag_only")  # each decides the session's T1s: one a patient
# Fields of view of the session's post-contrast T1, on a patient whose T1 layout (None: none) allows it
FOV_LAYOUTS = {"sagittal_t1_neck": (None, "sagittal_t1"), "axial_t1_brain": (None, "contrast_tag_only"),
               "off_centre_t1": (None, *T1_LAYOUTS)}
MR_LAYOUTS = ("study_per_sequence", *T1_LAYOUTS, "perfusion", "dti", "secondary_capture", *FOV_LAYOUTS)
CT_LAYOUTS = ("rtstruct", "ct_reformat", "ct_bone", "ct_thick", "ct_scout", "ct_face_neck")
CONFLICTS = {frozenset(("study_per_sequence", "coronal_t1")),  # its axial T1 would not leave the coronal one alone
             frozenset(("sagittal_t1_neck", "axial_t1_brain"))}
NECK_FOV_MM = (256.0, 270.0, 280.0)
FACE_CT_FOV_MM = 280.0
OFF_CENTRE_MM = (30.0, 40.0)
OFF_CENTRE_TILT_DEG = (15.0, 25.0)

# ------------------------------------------------------------------------------------------------ vendors
MR_VENDORS: dict[str, dict[str, Any]] = {
    "siemens": dict(manufacturer="SIEMENS", models=(("Avanto", 1.5), ("Aera", 1.5), ("Skyra", 3.0),
                                                     ("Prisma_fit", 3.0)),
                    coil="HeadNeck_20", tail=["M", "ND", "NORM"], dwi_tail=["DIFFUSION", "NONE", "ND", "NORM"],
                    perfusion_habits=("acquisition_number", "acquisition_time"),
                    diffusion_styles=("siemens", "standard"),
                    sc_number=99),
    "ge": dict(manufacturer="GE MEDICAL SYSTEMS", models=(("SIGNA HDxt", 1.5), ("DISCOVERY MR750", 3.0),
                                                          ("SIGNA Premier", 3.0)),
               coil="8HRBRAIN", tail=["OTHER"], dwi_tail=["OTHER"],
               perfusion_habits=("temporal_position", "acquisition_time"), diffusion_styles=("ge", "standard"),
               sc_number=900),
    "philips": dict(manufacturer="Philips Medical Systems", models=(("Achieva", 1.5), ("Ingenia", 3.0)),
                    coil="SENSE-Head-8", tail=["M_SE", "M", "SE"], dwi_tail=["M_SE", "M", "SE"],
                    perfusion_habits=("temporal_position",), diffusion_styles=("philips", "standard"),
                    sc_number=9901),
}
# Series descriptions as each vendor's protocols name them (a site picks one; "{n}": the number of directions).
MR_NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "localizer": {"siemens": ("localizer", "AAHead_Scout_64ch-head-coil"), "ge": ("3-PLANE LOC", "3Plane Loc SSFSE"),
                  "philips": ("Survey", "SURVEY_MST")},
    "t2": {"siemens": ("t2_tse_tra", "t2_tse_tra_p2"), "ge": ("AX T2 FSE", "Ax T2 PROPELLER"),
           "philips": ("T2W_TSE_tra", "AX T2W TSE")},
    "flair": {"siemens": ("t2_tirm_tra_dark-fluid", "t2_flair_tra_p2"), "ge": ("AX T2 FLAIR", "Ax FLAIR"),
              "philips": ("T2W_FLAIR_tra", "AX FLAIR LONGTR")},
    "t1_ax2d": {"siemens": ("t1_se_tra", "t1_tse_tra_5mm"), "ge": ("AX T1 SE", "Ax T1 FLAIR"),
                "philips": ("T1W_SE_tra", "AX T1W SE")},
    "t1c_ax3d": {"siemens": ("t1_mprage_tra_p2_iso_POST", "T1 3D AX +C"), "ge": ("AX T1 POST GD", "Ax 3D T1 BRAVO +C"),
                 "philips": ("T1W_3D_TFE_tra_GD", "3D T1 AX +C")},
    "t1c_sag3d": {"siemens": ("t1_mprage_sag_p2_iso_POST", "T1 MPRAGE SAG +C"),
                  "ge": ("SAG 3D T1 BRAVO +C", "Sag T1 3D FSPGR POST GD"),
                  "philips": ("sT1W_3D_TFE_sag_GD", "3D T1 SAG +C")},
    "t1c_ax2d": {"siemens": ("t1_se_tra_post", "t1_tse_tra +C"), "ge": ("AX T1 +C", "Ax T1 SE POST GD"),
                 "philips": ("T1W_SE_tra_GD", "AX T1W +C")},
    "t1c_cor2d": {"siemens": ("t1_se_cor_post", "t1_tse_cor +C"), "ge": ("COR T1 +C", "Cor T1 SE POST GD"),
                  "philips": ("T1W_SE_cor_GD", "COR T1W +C")},
    "t1_notag": {"siemens": ("t1_fl3d_tra_v1", "t1_fl3d_tra_gk_v1"), "ge": ("AX 3D T1 BRAVO", "Ax T1 3D FSPGR"),
                 "philips": ("T1W_3D_TFE_tra", "3D_T1W_TFE")},
    "t1_decoy": {"siemens": ("t1post{p}", "t1post{p}_fl3d_iso"), "ge": ("T1POST{p} 3D", "t1post{p}"),
                 "philips": ("t1post{p}_3D", "T1POST{p}")},
    "perfusion": {"siemens": ("ep2d_perf", "ep2d_perf_p2"), "ge": ("PERFUSION", "Ax DSC Perfusion"),
                  "philips": ("PERFUSION_DSC", "DSC_perf_FEEPI")},
    "dti": {"siemens": ("ep2d_diff_mddw_{n}", "DTI_{n}dir"), "ge": ("DTI {n} DIR", "AX DTI {n}"),
            "philips": ("DTI_medium_iso", "DTI_{n}dir")},
    "sc": {"siemens": ("Screen Save", "Perfusion Summary"), "ge": ("Screen Save", "SCREEN CAPTURE"),
           "philips": ("Screenshot", "ISP Perfusion")},
}
# Acquisition parameters per sequence family and vendor (DICOM MR Image module values).
MR_SEQUENCES: dict[str, dict[str, dict[str, Any]]] = {
    "t1_3d": {
        "siemens": dict(scanning_sequence=["GR", "IR"], sequence_variant=["SK", "SP", "MP"], scan_options="IR",
                        sequence_name="*tfl3d1_16ns", tr=2300.0, te=2.32, ti=900.0, flip=8),
        "ge": dict(scanning_sequence=["GR", "IR"], sequence_variant=["SK", "SP", "MP"], scan_options="FAST_GEMS",
                   sequence_name="efgre3d", tr=8.2, te=3.2, ti=450.0, flip=12),
        "philips": dict(scanning_sequence="GR", sequence_variant=["SK", "SP", "MP"], scan_options="",
                        sequence_name="T1TFE", tr=8.1, te=3.7, flip=8)},
    "t1_2d": {
        "siemens": dict(scanning_sequence="SE", sequence_variant=["SK", "SP"], scan_options="",
                        sequence_name="*se2d1", tr=500.0, te=12.0, flip=90),
        "ge": dict(scanning_sequence="SE", sequence_variant="NONE", scan_options="FAST_GEMS", sequence_name="memp",
                   tr=550.0, te=10.0, flip=90),
        "philips": dict(scanning_sequence="SE", sequence_variant=["SK"], scan_options="", sequence_name="SE",
                        tr=480.0, te=14.0, flip=90)},
    "dsc": {v: dict(scanning_sequence="EP", sequence_variant=["SK", "SS"], scan_options="FS", sequence_name=name,
                    tr=1500.0, flip=90, acq_matrix=[0, 128, 128, 0], etl=1)
            for v, name in (("siemens", "*epfid2d1_128"), ("ge", "epi"), ("philips", "FEEPI"))},
    "dwi": {v: dict(scanning_sequence=["SE", "EP"], sequence_variant=["SK", "SP"], scan_options="FS",
                    sequence_name=name, flip=90, acq_matrix=[0, 128, 128, 0], etl=1)
            for v, name in (("siemens", "*ep_b0"), ("ge", "epi2"), ("philips", "DwiSE"))},
}
CONTRAST_AGENTS = ("GADAVIST", "Gadovist 7.5 ml", "MULTIHANCE", "DOTAREM", "Magnevist", "GADOLINIUM")
BODY_PARTS = ("HEAD", "BRAIN", "HEADNECK", "CSPINE", "", None)  # None: BodyPartExamined absent
UNRELIABLE_BODY_PARTS = ("HEADNECK", "CSPINE", "", None)

CT_VENDORS: dict[str, dict[str, Any]] = {
    "ge": dict(manufacturer="GE MEDICAL SYSTEMS", models=("LightSpeed VCT", "Revolution CT", "Optima CT660"),
               soft="STANDARD", bone="BONEPLUS", bone_step=1.25, axial=["ORIGINAL", "PRIMARY", "AXIAL"],
               reformat=["DERIVED", "SECONDARY", "REFORMATTED", "AVERAGE"],
               scout=("Scout", ["ORIGINAL", "PRIMARY", "LOCALIZER"]),
               names={"ct": "HEAD {t:g}mm STND", "thick": "HEAD {t:g}mm STND", "bone": "HEAD {t:g}mm BONEPLUS",
                      "cor": "COR {t:g}mm REFORMAT", "sag": "SAG {t:g}mm REFORMAT"}),
    "siemens": dict(manufacturer="SIEMENS", models=("SOMATOM Definition AS+", "SOMATOM Force", "SOMATOM go.Up"),
                    soft="H31s", bone="H70h", bone_step=1.5, axial=["ORIGINAL", "PRIMARY", "AXIAL", "CT_SOM5 SPI"],
                    reformat=["DERIVED", "PRIMARY", "MPR", "CT_SOM5 MPR"],
                    scout=("Topogram  0.6  T20s", ["ORIGINAL", "PRIMARY", "LOCALIZER", "CT_SOM5 TOP"]),
                    names={"ct": "Head {t:.1f} {k}", "thick": "Head {t:.1f} {k}", "bone": "Head {t:.1f} {k}",
                           "cor": "Head Cor {t:.1f} {k}", "sag": "Head Sag {t:.1f} {k}"}),
}
# A scout that does not say so: the CT Image module's other defined term, under a "Topogram" description.
SCOUT_WITHOUT_LOCALIZER = ("Topogram", ["ORIGINAL", "PRIMARY", "AXIAL"])
RT_SYSTEMS = (("Varian Medical Systems", "ARIA RadOnc"), ("Elekta", "Monaco"), ("RaySearch Laboratories", "RayStation"))

MOTION_DEG, MOTION_MM, MIN_APART_MM = 3.0, 4.0, 2.5


# ------------------------------------------------------------------------------------------------ assignment
def apply_layouts(plans: list[PatientPlan], quirks: Sequence[str], model: TissueModel, corpus_seed: int,
                  taken: set[str]) -> list[dict]:
    """Rebuild the sessions the layout quirks name; returns their quirk log entries (LAYOUT_QUIRKS order)."""
    wanted = [q for q in LAYOUT_QUIRKS if q in quirks]
    if not wanted:
        return []
    where = _assign(plans, wanted, corpus_seed)
    entries: list[dict] = []
    for p in plans:
        mine = where.get(p.index, [])
        if not mine:
            continue
        mr, ct = paired_studies(p)
        ctx = _Context(p, model, corpus_seed, taken)
        if any(q in MR_LAYOUTS for q in mine):
            entries += _rebuild_mr(ctx, mr, [q for q in mine if q in MR_LAYOUTS])
        if any(q in CT_LAYOUTS for q in mine):
            entries += _rebuild_ct(ctx, ct, [q for q in mine if q in CT_LAYOUTS])
    return sorted(entries, key=lambda e: LAYOUT_QUIRKS.index(e["quirk"]))


def _assign(plans: list[PatientPlan], wanted: list[str], corpus_seed: int) -> dict[int, list[str]]:
    """Patient index -> its layouts. T1 layouts one patient each; the others spread over compatible patients;
    all CT layouts in one CT study (as one real head CT holds them all), on the least busy patient."""
    paired = [p for p in plans if p.scenario in PAIRED_SCENARIOS]
    rng = _rng(corpus_seed, 199)
    order = [paired[i].index for i in rng.permutation(len(paired))]
    where: dict[int, list[str]] = {i: [] for i in order}
    t1 = [q for q in wanted if q in T1_LAYOUTS]
    mr = [q for q in wanted if q in MR_LAYOUTS and q not in T1_LAYOUTS and q not in FOV_LAYOUTS]
    t1, mr = [t1[i] for i in rng.permutation(len(t1))], [mr[i] for i in rng.permutation(len(mr))]

    def fits(i: int, q: str) -> bool:
        return all(frozenset((q, o)) not in CONFLICTS for o in where[i]) and \
            not (q in T1_LAYOUTS and any(o in T1_LAYOUTS for o in where[i]))

    turn = 0
    for q in t1 + mr:
        for step in range(len(order)):
            i = order[(turn + step) % len(order)]
            if fits(i, q):
                where[i].append(q)
                turn = turn + step + 1
                break
        else:
            log.warning("layout %s: no paired patient left for it in this corpus", q)
    ct = [q for q in wanted if q in CT_LAYOUTS]
    if ct and order:
        where[min(order, key=lambda i: (len(where[i]), order.index(i)))] += ct
    elif ct:
        log.warning("layouts %s: no paired patient in this corpus", ", ".join(ct))
    # fields of view: on patients whose T1 layout allows them, the least busy with one first (own stream, so the
    # layouts above land where they did before these existed)
    fov_order = [order[i] for i in _rng(corpus_seed, 195).permutation(len(order))]
    for q in (q for q in wanted if q in FOV_LAYOUTS):
        ok = [i for i in fov_order if fits(i, q) and next((o for o in where[i] if o in T1_LAYOUTS), None)
              in FOV_LAYOUTS[q]]
        if ok:
            where[min(ok, key=lambda i: (sum(o in FOV_LAYOUTS for o in where[i]), ok.index(i)))].append(q)
        else:
            log.warning("layout %s: no paired patient whose T1 allows it in this corpus", q)
    return where


def paired_studies(p: PatientPlan) -> tuple[StudyPlan, StudyPlan]:
    """The MR and CT studies closest in time: the ones the patient's pair comes from."""
    mrs = [st for st in p.studies if st.info.modality == "MR"]
    cts = [st for st in p.studies if st.info.modality == "CT"]
    return min(((m, c) for m in mrs for c in cts), key=lambda mc: abs((mc[1].date - mc[0].date).days))


@dataclass
class _Context:
    patient: PatientPlan
    model: TissueModel
    corpus_seed: int
    taken: set[str]

    @property
    def scaling(self) -> np.ndarray:
        return patient_scaling(self.patient.seed, self.model)

    def stream(self, purpose: int, study: StudyPlan) -> np.random.Generator:
        return _rng(self.patient.seed, purpose, zlib.crc32(study.info.uid.encode()))

    def seed(self, study: StudyPlan, key: str) -> int:
        return int(np.random.SeedSequence([self.patient.seed, 17, zlib.crc32(study.info.uid.encode()),
                                           zlib.crc32(key.encode())]).generate_state(1)[0])

    def token(self, rng: np.random.Generator) -> str:
        while True:
            t = _token(rng)
            if t not in self.taken:
                self.taken.add(t)
                return t


def _motions(n: int, rng: np.random.Generator, model: TissueModel) -> list[np.ndarray]:
    """n small head motions (about the brain centre), every two at least MIN_APART_MM apart on average."""
    points = model.brain_points[:: max(1, len(model.brain_points) // 2000)]
    out: list[np.ndarray] = []
    for _ in range(100 * n):
        if len(out) == n:
            return out
        m = affine_about(rotation_matrix(rng.uniform(-MOTION_DEG, MOTION_DEG, size=3)), model.center,
                         rng.uniform(-MOTION_MM, MOTION_MM, size=3))
        moved = points @ m[:3, :3].T + m[:3, 3]
        if all(np.linalg.norm(moved - (points @ o[:3, :3].T + o[:3, 3]), axis=1).mean() >= MIN_APART_MM
               for o in out):
            out.append(m)
    if len(out) < n:  # pragma: no cover - a session of far more series than any layout writes
        raise RuntimeError(f"no {n} head motions {MIN_APART_MM} mm apart within the motion range")
    return out


def _when(study: StudyPlan, minutes: float) -> dt.datetime:
    start = dt.datetime.combine(study.date, dt.datetime.strptime(study.info.time, "%H%M%S").time())
    return start + dt.timedelta(minutes=minutes)


# ------------------------------------------------------------------------------------------------ grids
def oriented_grid(points: np.ndarray, axes: np.ndarray, rng: np.random.Generator, fov: float, matrix: int,
                  step: float, margin: float = 3.0) -> Geometry:
    """A grid of any orientation centred in-plane on the head, its slices covering it (as the axial one)."""
    px = float(dw._fmt(fov / matrix))
    uvw = np.linalg.solve(axes, points.T).T
    lo, hi = uvw.min(0), uvw.max(0)
    c = (lo[:2] + hi[:2]) / 2 + rng.uniform(-3.0, 3.0, size=2)
    n = int(math.ceil((hi[2] - lo[2] + 2 * margin) / step)) + 1
    start = np.array([c[0] - (matrix - 1) / 2 * px, c[1] - (matrix - 1) / 2 * px, lo[2] - margin])
    origin = np.array([_round(v) for v in axes @ start])
    return Geometry(size=(matrix, matrix, n), spacing=(px, px, float(step)), origin=origin, axes=axes)


def axial_slab(center: np.ndarray, rng: np.random.Generator, fov: float, matrix: int, step: float,
               n: int) -> Geometry:
    """An axial slab of n slices centred on the brain (perfusion and diffusion cover the brain, not the head)."""
    px = float(dw._fmt(fov / matrix))
    c = center + np.r_[rng.uniform(-3.0, 3.0, size=2), rng.uniform(-5.0, 5.0)]
    start = c - np.array([(matrix - 1) / 2 * px, (matrix - 1) / 2 * px, (n - 1) / 2 * step])
    return Geometry(size=(matrix, matrix, n), spacing=(px, px, float(step)),
                    origin=np.array([_round(v) for v in start]), axes=np.eye(3))


def neck_grid(model: TissueModel, transform: np.ndarray, axes: np.ndarray, rng: np.random.Generator, fov: float,
              matrix: int, step: float, margin: float = 3.0) -> Geometry:
    """A field of view hung from the vertex (columns run head to feet) down over the face and neck, centred on the
    head in the row direction (not on the brain), slices covering the cranium."""
    px = float(dw._fmt(fov / matrix))
    body = np.linalg.solve(axes, (model.body_points @ transform[:3, :3].T + transform[:3, 3]).T).T
    head = np.linalg.solve(axes, planning_points(model, transform).T).T
    span = (matrix - 1) * px
    chin = np.linalg.solve(axes, model.landmarks["chin"] @ transform[:3, :3].T + transform[:3, 3])[1] + 8.0
    v0 = head[:, 1].min() - margin - rng.uniform(0.0, 6.0)
    if chin > v0 + span:  # lower, as far as the vertex allows, to keep the chin
        v0 = min(head[:, 1].min() - 1.0, chin - span)
    seen = body[(body[:, 1] >= v0) & (body[:, 1] <= v0 + span)]
    u = (seen[:, 0].min() + seen[:, 0].max()) / 2 + rng.uniform(-3.0, 3.0)
    w0, w1 = head[:, 2].min() - margin, head[:, 2].max() + margin
    n = int(math.ceil((w1 - w0) / step)) + 1
    start = np.array([u - (matrix - 1) / 2 * px, v0, w0])
    return Geometry(size=(matrix, matrix, n), spacing=(px, px, float(step)),
                    origin=np.array([_round(v) for v in axes @ start]), axes=axes)


def brain_only(g: Geometry, model: TissueModel, transform: np.ndarray, variant: str, margin: float = 4.0) -> Geometry:
    """An axial grid's slices cut to the brain: from below the brain ("skull_base") or from above the orbits
    ("orbits", the temporal poles and the posterior fossa cut) up to the vertex."""
    if abs(g.axes[2, 2]) < 0.99:
        raise ValueError("a brain-only slab is planned on an axial grid")
    def to(p):
        return np.atleast_2d(p) @ transform[:3, :3].T + transform[:3, 3]
    top = planning_points(model, transform)[:, 2].max() + margin
    if variant == "skull_base":
        bottom = to(model.brain_points)[:, 2].min() - margin
    else:
        bottom = to(np.stack([model.landmarks["right_eye"], model.landmarks["left_eye"]]))[:, 2].max() + 16.0
    dz = g.spacing[2] * g.axes[2, 2]
    k0 = math.floor((bottom - g.origin[2]) / dz)
    n = int(math.ceil((top - g.origin[2]) / dz)) - k0 + 1
    origin = g.origin + g.axes[:, 2] * g.spacing[2] * k0
    return dataclasses.replace(g, size=(g.size[0], g.size[1], n), origin=np.array([_round(v) for v in origin]))


def off_centre(g: Geometry, model: TissueModel, transform: np.ndarray, params: dict) -> tuple[Geometry, float]:
    """The grid moved away from the face (so the field of view cuts it) and sideways, 30-40 mm in all, as far as
    the brain stays inside; returns the grid and how far the head is off its planned centre (mm)."""
    def to(p):
        return np.atleast_2d(p) @ transform[:3, :3].T + transform[:3, 3]
    brain = to(model.brain_points[:: max(1, len(model.brain_points) // 2000)])
    face = to(model.landmarks["nose_tip"])[0] - to(model.center)[0]
    f = face / np.linalg.norm(face)
    side = np.cross(f, g.axes[:, 2])
    if np.linalg.norm(side) < 0.3:  # the slices run along the face: move across the rows instead
        side = g.axes[:, 0] - f * (g.axes[:, 0] @ f)
    side /= np.linalg.norm(side)
    side = math.cos(params["turn"]) * side + math.sin(params["turn"]) * np.cross(f, side)
    for total in np.arange(float(params["offset_mm"]), 9.9, -2.0):  # as far off as the brain allows
        for back in np.arange(min(24.0, total), -0.1, -2.0):
            shift = -f * back + side * math.sqrt(total * total - back * back)
            moved = dataclasses.replace(g, origin=np.array([_round(v) for v in g.origin + shift]))
            if holds(moved, brain, 2.5):
                return moved, round(float(np.linalg.norm(shift)), 2)
    return g, 0.0


def _axes(row, col) -> np.ndarray:
    """Rounded as ImageOrientationPatient is written, so the manifest's grid is what the files say."""
    row = np.array([float(dw._fmt(v)) for v in row])
    col = np.array([float(dw._fmt(v)) for v in col])
    return np.stack([row, col, np.cross(row, col)], axis=1)


def sagittal_axes(tilt_deg: float = 0.0) -> np.ndarray:
    """Rows anterior->posterior, columns head->feet, slices right->left... turned about the left-right axis."""
    t = math.radians(tilt_deg)
    return _axes((0.0, math.cos(t), math.sin(t)), (0.0, math.sin(t), -math.cos(t)))


CORONAL_AXES = _axes((1.0, 0.0, 0.0), (0.0, 0.0, -1.0))


# ------------------------------------------------------------------------------------------------ MR session
@dataclass
class _Step:
    key: str  # what it is in this session (unique)
    role: str
    minutes: float
    proto: dict
    plane: str = "axial"  # axial | sagittal | coronal | slab | none
    quirks: tuple[str, ...] = ()


def _mr_protocol(key: str, vendor: str, rng: np.random.Generator, **over: Any) -> dict:
    v = MR_VENDORS[vendor]
    names = MR_NAMES[key][vendor]
    proto = dict(description=names[int(rng.integers(len(names)))], image_type=["ORIGINAL", "PRIMARY", *v["tail"]],
                 coil=v["coil"])
    proto.update(over)
    return proto


def _rebuild_mr(ctx: _Context, study: StudyPlan, names: list[str]) -> list[dict]:
    p, model = ctx.patient, ctx.model
    rs = ctx.stream(30, study)
    vendor = ("siemens", "ge", "philips")[int(rs.integers(3))]
    v = MR_VENDORS[vendor]
    model_name, field_t = v["models"][int(rs.integers(len(v["models"])))]
    scanner = dict(field="1.5", frequency="63.87") if field_t < 2 else dict(field="3", frequency="123.25")
    agent = CONTRAST_AGENTS[int(rs.integers(len(CONTRAST_AGENTS)))]
    steps = _mr_steps(names, vendor, rs, agent, ctx.corpus_seed, ctx.stream(38, study))
    # one head position for the session, each series a small motion of its own
    base = _pose(ctx.stream(31, study), model.center)
    motions = _motions(len(steps), ctx.stream(36, study), model)
    folders = ctx.stream(35, study)
    when_min = 0.0
    series: list[SeriesPlan] = []
    chosen = next(s for s in steps if s.role == "t1c")
    for i, (step, motion) in enumerate(zip(steps, motions)):
        when_min += step.minutes
        proto = dict(step.proto, **scanner)
        proto["number"] = v["sc_number"] if step.role == "secondary_capture" else \
            (i + 1) * 100 + 1 if vendor == "philips" else i + 1
        if step.role != "secondary_capture":
            pool = UNRELIABLE_BODY_PARTS if step is chosen else BODY_PARTS
            proto["body_part"] = pool[int(rs.integers(len(pool)))]
        transform = base @ motion @ ctx.scaling
        if "off_centre" in proto:  # the head tilted in the coil
            transform = base @ affine_about(rotation_matrix(proto["off_centre"]["tilt_deg"]), model.center) @ \
                motion @ ctx.scaling
        s = _series_plan(ctx, study, step, proto, transform, _when(study, when_min))
        s.folder_no = int(folders.integers(10000, 99999))
        series.append(s)
    study.info = dataclasses.replace(study.info, manufacturer=v["manufacturer"], model=model_name)
    study.series = series
    for s in series:
        s.quirks += list(names)
    entries = [_mr_entry(q, p, study, series, steps) for q in names]
    if "study_per_sequence" in names:
        _split_studies(ctx, study, folders)
        study_of = {s.info.uid: st.info.uid for st in p.studies for s in st.series}
        for e in entries:
            e["study_uid"] = study_of[e["series_uid"]]
            if e["quirk"] == "study_per_sequence":
                e["study_uids"] = [study_of[s.info.uid] for s in series]
    return entries


def _mr_steps(names: list[str], vendor: str, rng: np.random.Generator, agent: str, corpus_seed: int,
              fov_rng: np.random.Generator) -> list[_Step]:
    """The session's series in acquisition order (minutes each took), as the layouts ask."""
    t1_3d, t1_2d = MR_SEQUENCES["t1_3d"][vendor], MR_SEQUENCES["t1_2d"][vendor]
    base = {role: {k: MR_PROTOCOLS[role][k] for k in ("scanning_sequence", "sequence_variant", "acquisition_type", "tr",
                                                      "te", "flip", "fov", "matrix", "thickness", "step", "etl", "ti",
                                                      "scan_options", "sequence_name", "instances")
                   if k in MR_PROTOCOLS[role]} for role in ("localizer", "t2", "flair")}
    if vendor != "ge":  # GE's own scan options and sequence names are not another vendor's
        for role, seq in (("localizer", "*fl2d1" if vendor == "siemens" else "FFE"),
                          ("t2", "*tse2d1_15" if vendor == "siemens" else "TSE"),
                          ("flair", "*tir2d1_16" if vendor == "siemens" else "IR")):
            base[role].update(scan_options="", sequence_name=seq)
    def proto(key: str, **kw: Any) -> dict:
        return _mr_protocol(key, vendor, rng, **kw)

    localizer = proto("localizer", **base["localizer"])
    localizer["image_type"] = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    steps = [_Step("localizer", "localizer", 1, localizer)]
    if "study_per_sequence" in names or "sagittal_t1" in names:
        q = tuple(n for n in ("study_per_sequence", "sagittal_t1") if n in names)
        steps.append(_Step("t1_ax2d", "t1", 4, proto("t1_ax2d", **t1_2d, acquisition_type="2D", fov=230.0,
                                                     matrix=256, thickness=5.0, step=6.0, instances="asc"), quirks=q))
    if "dti" in names:
        steps.append(_dti_step(vendor, rng, corpus_seed))
    steps.append(_Step("t2", "t2", 4, proto("t2", **base["t2"])))
    steps.append(_Step("flair", "flair", 5, proto("flair", **base["flair"])))
    t1_3d_grid = dict(acquisition_type="3D", fov=250.0, matrix=256, thickness=1.0, step=1.0, instances="asc")
    pre: dict = {}
    if "contrast_tag_only" in names:
        pre = proto("t1_notag", **t1_3d, **t1_3d_grid)
        decoy_names = MR_NAMES["t1_decoy"][vendor]
        decoy = proto("t1_notag", **t1_3d, acquisition_type="3D", fov=230.0, matrix=256, thickness=0.9, step=0.9,
                      instances="asc")
        decoy["description"] = decoy_names[int(rng.integers(len(decoy_names)))].format(p=int(rng.integers(1, 5)))
        steps += [_Step("t1_pre3d", "t1", 6, pre, quirks=("contrast_tag_only",)),
                  _Step("t1_decoy", "t1", 6, decoy, quirks=("contrast_tag_only",))]
    if "perfusion" in names:
        steps.append(_perfusion_step(vendor, rng, agent, corpus_seed))
    if "sagittal_t1" in names or "sagittal_t1_neck" in names:
        t1c = _Step("t1c", "t1c", 6, proto("t1c_sag3d", **t1_3d, acquisition_type="3D", fov=256.0, matrix=256,
                                           thickness=1.0, step=1.0, instances="asc"),
                    plane="sagittal", quirks=tuple(q for q in ("sagittal_t1", "sagittal_t1_neck") if q in names))
        t1c.proto["tilt_deg"] = float(rng.choice([0.0, 0.0, -8.0, 6.0, 11.0]))
        t1c.proto["neck"] = "sagittal_t1_neck" in names
        if t1c.proto["neck"]:
            t1c.proto["fov"] = float(fov_rng.choice(NECK_FOV_MM))
    elif "coronal_t1" in names:
        thickness = float(rng.choice([4.0, 5.0]))
        t1c = _Step("t1c", "t1c", 5, proto("t1c_cor2d", **t1_2d, acquisition_type="2D", fov=250.0, matrix=256,
                                           thickness=thickness, step=thickness * 1.1, instances="asc"),
                    plane="coronal", quirks=("coronal_t1",))
    elif "contrast_tag_only" in names:
        post = proto("t1_notag", **t1_3d, **t1_3d_grid)
        if rng.random() < 0.5:  # often the very same description as the pre-contrast one
            post["description"] = pre["description"]
        t1c = _Step("t1c", "t1c", 6, post, quirks=("contrast_tag_only",))
    elif "axial_t1_brain" in names:
        t1c = _Step("t1c", "t1c", 5, proto("t1c_ax2d", **t1_2d, acquisition_type="2D", fov=230.0, matrix=256,
                                           thickness=5.0, step=6.0, instances="asc"))
    else:
        t1c = _Step("t1c", "t1c", 6, proto("t1c_ax3d", **t1_3d, **t1_3d_grid))
    for q in ("axial_t1_brain", "off_centre_t1"):
        if q in names:
            t1c.quirks += (q,)
    if "axial_t1_brain" in names:  # from the skull base, or from above the orbits (the lower brain cut)
        t1c.proto["brain_only"] = str(fov_rng.choice(["skull_base", "orbits"]))
    if "off_centre_t1" in names:
        tilt = np.zeros(3)
        tilt[int(fov_rng.integers(2))] = fov_rng.uniform(*OFF_CENTRE_TILT_DEG) * fov_rng.choice([-1.0, 1.0])
        tilt += fov_rng.uniform(-3.0, 3.0, size=3)
        t1c.proto["off_centre"] = {"tilt_deg": [round(float(v), 2) for v in tilt],
                                   "offset_mm": round(float(fov_rng.uniform(*OFF_CENTRE_MM)), 2),
                                   "turn": round(float(fov_rng.uniform(0.0, 2.0 * math.pi)), 4)}
    # ContrastBolusAgent: always where only the tag tells; else on most post-contrast T1s, the rest saying it only
    # in their description
    if "contrast_tag_only" in names or rng.random() < 0.6:
        t1c.proto["contrast"] = agent
    steps.append(t1c)
    if "secondary_capture" in names:
        sc = proto("sc")
        sc["device"] = {"siemens": "syngo.via", "ge": "AW Server", "philips": "IntelliSpace Portal"}[vendor]
        steps.append(_Step("sc", "secondary_capture", 20, sc, plane="none", quirks=("secondary_capture",)))
    return steps


def _perfusion_step(vendor: str, rng: np.random.Generator, agent: str, corpus_seed: int) -> _Step:
    habits = MR_VENDORS[vendor]["perfusion_habits"]
    habit = habits[int(_rng(corpus_seed, 198).integers(len(habits)))]
    seq = dict(MR_SEQUENCES["dsc"][vendor], te=float(rng.choice([30.0, 35.0, 40.0, 45.0])))
    proto = _mr_protocol("perfusion", vendor, rng, **seq, acquisition_type="2D", fov=240.0, matrix=128,
                         thickness=5.0, step=6.5, instances="asc", contrast=agent)
    proto.update(habit=habit, slices=int(rng.integers(12, 17)), times=20)
    return _Step("perfusion", "perfusion", 2, proto, plane="slab", quirks=("perfusion",))


def _dti_step(vendor: str, rng: np.random.Generator, corpus_seed: int) -> _Step:
    styles = MR_VENDORS[vendor]["diffusion_styles"]
    style = styles[int(_rng(corpus_seed, 197).integers(len(styles)))]
    n_dir = int(rng.choice([6, 12]))
    seq = dict(MR_SEQUENCES["dwi"][vendor], tr=float(rng.choice([6000.0, 7200.0, 8400.0])),
               te=float(rng.choice([82.0, 88.0, 94.0])))
    proto = _mr_protocol("dti", vendor, rng, **seq, acquisition_type="2D", fov=240.0, matrix=128, thickness=3.0,
                         step=3.0, instances="asc")
    proto["description"] = proto["description"].format(n=n_dir)
    proto["image_type"] = ["ORIGINAL", "PRIMARY", *MR_VENDORS[vendor]["dwi_tail"]]
    proto.update(style=style, directions=n_dir, slices=40, b_value=1000.0)
    return _Step("dti", "dti", 6, proto, plane="slab", quirks=("dti",))


def _series_plan(ctx: _Context, study: StudyPlan, step: _Step, proto: dict, transform: np.ndarray,
                 when: dt.datetime) -> SeriesPlan:
    model = ctx.model
    modality = study.info.modality
    sseed = ctx.seed(study, step.key)
    proto = dict(proto, plane=step.plane)
    s = _plan_series(step.role, modality, sseed, when, ctx.scaling, model, (ctx.corpus_seed, ctx.patient.seed,
                                                                            modality, "layout", study.info.uid),
                     transform=transform, proto=proto, uid_key=(step.key,))
    head = planning_points(model, transform)
    rng = _rng(sseed, 2)
    if step.plane in ("sagittal", "coronal"):
        axes = sagittal_axes(proto.get("tilt_deg", 0.0)) if step.plane == "sagittal" else CORONAL_AXES
        if proto.get("neck"):
            s.geometry = neck_grid(model, transform, axes, rng, proto["fov"], proto["matrix"], proto["step"])
        else:
            s.geometry = oriented_grid(head, axes, rng, proto["fov"], proto["matrix"], proto["step"])
    elif step.plane == "slab":
        center = transform[:3, :3] @ model.center + transform[:3, 3]
        s.geometry = axial_slab(center, rng, proto["fov"], proto["matrix"], proto["step"], proto["slices"])
    if proto.get("brain_only") and s.geometry is not None:
        s.geometry = brain_only(s.geometry, model, transform, proto["brain_only"])
    if proto.get("off_centre") and s.geometry is not None:
        s.geometry, s.manifest["off_centre_mm"] = off_centre(s.geometry, model, transform, proto["off_centre"])
    if s.geometry is not None and modality == "MR":
        s.thickness, s.spacing_between, s.instances = proto["thickness"], proto["step"], proto["instances"]
    if step.role == "perfusion":
        s.recipe = Perfusion.plan(s, proto)
    elif step.role == "dti":
        s.recipe = Diffusion.plan(s, proto)
    elif step.role == "secondary_capture":
        s.recipe = SecondaryCapture()
        s.usable, s.reason = False, "not an image with patient geometry (secondary capture)"
        s.manifest.update(sop_class_uid=str(dw.SECONDARY_CAPTURE_STORAGE), samples_per_pixel=3, photometric="RGB")
    return s


def _split_studies(ctx: _Context, study: StudyPlan, folders: np.random.Generator) -> None:
    """One study per series, as a re-identified collection keeps them: same date, own UIDs and accession."""
    p = ctx.patient
    rs = ctx.stream(34, study)
    parts = (ctx.corpus_seed, p.seed, "layout", study.info.uid)
    studies = []
    for s in study.series:
        info = dataclasses.replace(
            study.info, uid=str(dw.make_uid(*parts, s.info.uid, "study")), time=s.info.time,
            accession=f"A{ctx.token(rs)}{int(rs.integers(1000, 9999))}", study_id=str(int(rs.integers(1000, 99999))),
            frame_uid=str(dw.make_uid(*parts, s.info.uid, "frame")))
        studies.append(StudyPlan(info=info, date=study.date, series=[s], folder_no=int(folders.integers(10000, 99999))))
    i = p.studies.index(study)
    p.studies[i:i + 1] = studies


_MR_EXPECTED = {
    "study_per_sequence": "one MR session of {n} studies on one date (a study per series): choose the post-contrast T1 "
                          "(series {number}) across them and pair it with the CT session",
    "sagittal_t1": "choose the sagittal 3D post-contrast T1 (series {number}) over the axial 2D pre-contrast T1",
    "coronal_t1": "choose the coronal 2D post-contrast T1 (series {number}), the session's only T1",
    "contrast_tag_only": "contrast is told only by ContrastBolusAgent: choose series {number} over the pre-contrast "
                         "3D T1 and over the finer 't1post' series, whose 'post' is not contrast",
    "perfusion": "DSC perfusion: {volumes} volumes of repeated positions, never a T1 candidate",
    "dti": "diffusion: {volumes} volumes (b-values, directions) of repeated positions, never a T1 candidate",
    "secondary_capture": "an RGB screenshot with Modality MR: not an image volume, never a candidate",
    "sagittal_t1_neck": "choose the sagittal 3D post-contrast T1 (series {number}): a {fov:.0f} mm field of view hung "
                        "from the vertex, the face and the neck down to about C3 in it, the brain well above its "
                        "centre",
    "axial_t1_brain": "choose the post-contrast T1 (series {number}), an axial {acquisition} of the brain only, from "
                      "{bottom} to the vertex: no face",
    "off_centre_t1": "choose the post-contrast T1 (series {number}): the head tilted {tilt:.0f} degrees in the coil "
                     "and {offset:.0f} mm off the field-of-view centre, the face partly outside it",
}
_BRAIN_ONLY_BOTTOM = {"skull_base": "below the cerebellum",
                      "orbits": "above the orbits (the temporal poles and the posterior fossa cut)"}


def _mr_entry(q: str, p: PatientPlan, study: StudyPlan, series: list[SeriesPlan], steps: list[_Step]) -> dict:
    t1c = next(s for s in series if s.role == "t1c")
    mine = [s for s, st in zip(series, steps) if q in st.quirks]
    if q == "study_per_sequence":
        mine = list(series)
    main = t1c if q in ("study_per_sequence", *T1_LAYOUTS, *FOV_LAYOUTS) else mine[0]
    entry = {"quirk": q, "patient_id": p.info.patient_id, "study_uid": study.info.uid, "series_uid": main.info.uid,
             "series_uids": [s.info.uid for s in mine], "role": main.role, "chosen_series_uid": t1c.info.uid}
    proto = t1c.info.protocol
    tilt = max(abs(v) for v in proto["off_centre"]["tilt_deg"]) if "off_centre" in proto else 0.0
    entry["expected"] = _MR_EXPECTED[q].format(n=len(series), number=t1c.info.number,
                                                volumes=main.manifest.get("volumes"),
                                                acquisition=proto.get("acquisition_type"),
                                                bottom=_BRAIN_ONLY_BOTTOM.get(proto.get("brain_only", ""), ""),
                                                tilt=tilt, offset=t1c.manifest.get("off_centre_mm", 0.0),
                                                fov=proto.get("fov", 0.0))
    if q == "perfusion":
        entry["split_by"] = main.manifest["split_by"]
    elif q == "dti":
        entry["diffusion_style"] = main.manifest["diffusion"]["style"]
    elif q == "contrast_tag_only":
        entry["contrast_agent"] = t1c.info.protocol.get("contrast")
    elif q == "axial_t1_brain":
        entry["variant"] = proto["brain_only"]
    elif q == "off_centre_t1":
        entry["tilt_deg"] = list(proto["off_centre"]["tilt_deg"])
        entry["offset_mm"] = t1c.manifest["off_centre_mm"]
    return entry


# ------------------------------------------------------------------------------------------------ CT study
def _rebuild_ct(ctx: _Context, study: StudyPlan, names: list[str]) -> list[dict]:
    p, model = ctx.patient, ctx.model
    rs = ctx.stream(32, study)
    vendor = ("ge", "siemens")[int(rs.integers(2))]
    v = CT_VENDORS[vendor]
    base = _pose(ctx.stream(33, study), model.center)
    m_scout, m_acq = _motions(2, ctx.stream(37, study), model)
    acquisition = base @ m_acq @ ctx.scaling
    folders = ctx.stream(35, study)
    scout_name, scout_type = v["scout"]
    if "ct_scout" in names and _rng(ctx.corpus_seed, 196).random() < 0.5:
        scout_name, scout_type = SCOUT_WITHOUT_LOCALIZER
    scout = dict(CT_PROTOCOLS["scout"], description=scout_name, image_type=list(scout_type), kernel=v["soft"])
    if "ct_scout" in names:
        scout["planes"] = [((1, 0, 0), (0, 0, -1)), ((0, 1, 0), (0, 0, -1))]  # AP, then lateral
    ct = dict(CT_PROTOCOLS["ct"], description=v["names"]["ct"].format(t=2.5, k=v["soft"]), image_type=list(v["axial"]),
              kernel=v["soft"])
    if "ct_face_neck" in names:  # from C2 or below the mandible, the face in a wider field of view
        ct.update(down_to=str(ctx.stream(39, study).choice(["c2", "menton"])), face=True, fov=FACE_CT_FOV_MM)
    plans = [_series_plan(ctx, study, _Step("scout", "scout", 1, {}, "none"), scout, base @ m_scout @ ctx.scaling,
                          _when(study, 1)),
             _series_plan(ctx, study, _Step("ct", "ct", 3, {}), ct, acquisition, _when(study, 3))]
    src = plans[1]
    recon_quirk: dict[str, str] = {src.info.uid: "ct_face_neck"} if "ct_face_neck" in names else {}
    if "ct_thick" in names:
        plans.append(_recon(ctx, study, src, "thick", v, 5.0, 4))
        recon_quirk[plans[-1].info.uid] = "ct_thick"
    if "ct_bone" in names:
        plans.append(_recon(ctx, study, src, "bone", v, v["bone_step"], 5))
        recon_quirk[plans[-1].info.uid] = "ct_bone"
    if "ct_reformat" in names:
        for kind in ("cor", "sag"):
            plans.append(_recon(ctx, study, src, kind, v, 3.0, 7))
            recon_quirk[plans[-1].info.uid] = "ct_reformat"
    for i, s in enumerate(plans):
        s.info.number = i + 1
        s.info.protocol["number"] = i + 1
        s.folder_no = int(folders.integers(10000, 99999))
    others = [s for s in study.series if s.role not in ("scout", "ct")]  # the dose report stays as it was
    if "rtstruct" in names:
        others.append(_rtstruct(ctx, study, src, rs))
        others[-1].folder_no = int(folders.integers(10000, 99999))
        recon_quirk[others[-1].info.uid] = "rtstruct"
    study.info = dataclasses.replace(study.info, manufacturer=v["manufacturer"],
                                     model=v["models"][int(rs.integers(len(v["models"])))])
    study.series = plans + others
    for s in study.series:
        s.quirks += list(names)
    entries = []
    for q in names:
        mine = [s for s in study.series if recon_quirk.get(s.info.uid) == q] if q != "ct_scout" else [plans[0]]
        entry = {"quirk": q, "patient_id": p.info.patient_id, "study_uid": study.info.uid,
                 "series_uid": mine[0].info.uid, "series_uids": [s.info.uid for s in mine], "role": mine[0].role,
                 "chosen_series_uid": src.info.uid,
                 "expected": _CT_EXPECTED[q].format(number=src.info.number,
                                                    bottom=_CT_BOTTOM.get(src.info.protocol["down_to"], ""))}
        if q == "ct_scout":
            entry["says_localizer"] = "LOCALIZER" in scout_type
        elif q == "ct_face_neck":
            entry["down_to"] = src.info.protocol["down_to"]
        entries.append(entry)
    return entries


_CT_EXPECTED = {
    "rtstruct": "an RT structure set referencing the CT: not an image, never a candidate",
    "ct_reformat": "coronal and sagittal reformats (DERIVED): the original axial reconstruction (series {number}) is "
                   "chosen",
    "ct_bone": "a thinner bone-kernel reconstruction: soft tissue before thinness, series {number} is chosen",
    "ct_thick": "a 5 mm soft-tissue reconstruction: the thinner one (series {number}) is chosen",
    "ct_scout": "a scout of two planes in one series: not a volume, never a candidate",
    "ct_face_neck": "a head CT from {bottom} to the vertex (series {number}, chosen): the face, the teeth and the "
                    "upper neck in its field of view, on the couch and headrest",
}
_CT_BOTTOM = {"c2": "the axis (C2)", "menton": "below the mandible"}


def _recon(ctx: _Context, study: StudyPlan, src: SeriesPlan, kind: str, v: dict, step: float,
           minutes: float) -> SeriesPlan:
    """Another reconstruction of the source CT's acquisition: its pose and frame; axial ones on its table range."""
    g = src.geometry
    kernel = v["bone"] if kind == "bone" else v["soft"]
    proto = dict(CT_PROTOCOLS["ct"], kernel=kernel, description=v["names"][kind].format(t=step, k=kernel))
    role = {"thick": "ct_thick", "bone": "ct_bone", "cor": "ct_reformat", "sag": "ct_reformat"}[kind]
    s = _series_plan(ctx, study, _Step(kind, role, minutes, {}, "none"), proto, src.transform, _when(study, minutes))
    if kind in ("thick", "bone"):
        n = int(math.floor((g.size[2] - 1) * g.spacing[2] / step + 1e-6)) + 1
        s.geometry = Geometry(size=(g.size[0], g.size[1], n), spacing=(g.spacing[0], g.spacing[1], step),
                              origin=g.origin.copy(), axes=g.axes.copy())
        s.info.image_type = list(v["axial"])
        proto["recon_diameter"] = src.info.protocol["recon_diameter"]
        s.instances = src.instances
        if kind == "bone":
            proto["window"] = (500.0, 2500.0)
    else:
        sp = src.info.protocol
        head = planning_points(ctx.model, src.transform, sp.get("down_to"), sp.get("face", False))
        axes = CORONAL_AXES if kind == "cor" else sagittal_axes()
        s.geometry = oriented_grid(head, axes, _rng(s.seed, 2), 250.0, 256, step)
        s.info.image_type = list(v["reformat"])
        proto.update(recon_diameter=250.0, padding=None)
        s.instances = "asc"
    s.info.protocol = proto
    s.thickness = step
    s.recipe = CTRecon(src, kind)
    s.manifest["acquisition_series_uid"] = src.info.uid
    return s


def _rtstruct(ctx: _Context, study: StudyPlan, src: SeriesPlan, rs: np.random.Generator) -> SeriesPlan:
    maker, system = RT_SYSTEMS[int(rs.integers(len(RT_SYSTEMS)))]
    proto = dict(number=1001, description=str(rs.choice(["RTSTRUCT", "Structure Set", "CT_1 Contours"])),
                 manufacturer=maker, model=system)
    s = _series_plan(ctx, study, _Step("rtstruct", "rtstruct", 90, {}, "none"), proto, src.transform,
                     _when(study, 90))
    s.usable, s.reason = False, "not an image (RT structure set)"
    s.recipe = RTStruct(src)
    s.manifest["sop_class_uid"] = str(dw.RT_STRUCTURE_SET_STORAGE)
    return s


# ------------------------------------------------------------------------------------------------ recipes
def _seconds(hhmmss: str) -> float:
    return int(hhmmss[:2]) * 3600 + int(hhmmss[2:4]) * 60 + float(hhmmss[4:])


def _tag(tag: int, keyword: str, creator: str | None = None) -> dict:
    out = {"tag": f"{tag:08X}", "keyword": keyword}
    if creator:
        out["private_creator"] = creator
    return out


ACQUISITION_TIME = _tag(0x00080032, "AcquisitionTime")
_HABIT_TAGS = {"temporal_position": [_tag(0x00200100, "TemporalPositionIdentifier")],
               "acquisition_number": [_tag(0x00200012, "AcquisitionNumber")]}
_DIFFUSION_TAGS = {
    "standard": [_tag(0x00189087, "DiffusionBValue"), _tag(0x00189089, "DiffusionGradientOrientation")],
    "siemens": [_tag(0x0019100C, "B_value", "SIEMENS MR HEADER"),
                _tag(0x0019100E, "DiffusionGradientDirection", "SIEMENS MR HEADER")],
    "ge": [_tag(0x00431039, "SlopInt6-9 (b-value first)", "GEMS_PARM_01"),
           *[_tag(t, k, "GEMS_ACQU_01") for t, k in ((0x001910BB, "UserData20"), (0x001910BC, "UserData21"),
                                                    (0x001910BD, "UserData22"))]],
    "philips": [_tag(0x20011003, "DiffusionBFactor", "Philips Imaging DD 001"),
                *[_tag(t, k, "Philips MR Imaging DD 001") for t, k in ((0x200510B0, "DiffusionDirectionRL"),
                                                                      (0x200510B1, "DiffusionDirectionAP"),
                                                                      (0x200510B2, "DiffusionDirectionFH"))]],
}


class _FourD:
    """A series of several volumes on one grid: files ordered volume by volume, slices in spatial order."""

    def headers(self, plan: SeriesPlan, patient: PatientPlan, study: StudyPlan, vols: list[np.ndarray]) -> list:
        raise NotImplementedError

    def datasets(self, plan: SeriesPlan, patient: PatientPlan, study: StudyPlan, pixels: list[np.ndarray],
                 uid_parts: tuple) -> list[tuple[int, int, Any, Any]]:
        g = plan.geometry
        n = g.size[2]
        out = []
        for v, header in enumerate(self.headers(plan, patient, study, pixels)):
            for k in range(n):
                index = v * n + k
                ds = dw.slice_dataset(header, sop_uid=sop_uid(uid_parts, plan.info.uid, index), instance=index + 1,
                                      position=g.physical([0, 0, k]), pixels=pixels[v][k])
                out.append((index, index + 1, ds, header))
        return out


@dataclass
class Perfusion(_FourD):
    """DSC: the same slab every TR, the bolus darkening the tissue in its first pass (gamma variate)."""

    habit: str
    times_s: list[float]
    arrival_s: float
    peak_s: float

    @classmethod
    def plan(cls, s: SeriesPlan, proto: dict) -> Perfusion:
        tr = proto["tr"] / 1000.0
        rng = _rng(s.seed, 3)
        recipe = cls(habit=proto["habit"], times_s=[round(i * tr, 3) for i in range(proto["times"])],
                     arrival_s=round(float(rng.uniform(9.0, 13.0)), 2), peak_s=round(float(rng.uniform(5.0, 7.0)), 2))
        split_by = [_HABIT_TAGS[recipe.habit], [ACQUISITION_TIME]] if recipe.habit in _HABIT_TAGS else \
            [[ACQUISITION_TIME]]
        s.manifest.update(volumes=len(recipe.times_s), split_by=split_by, temporal={
            "habit": recipe.habit, "times_s": recipe.times_s, "bolus_arrival_s": recipe.arrival_s,
            "bolus_time_to_peak_s": recipe.peak_s})
        return recipe

    def concentration(self, t: float) -> float:
        x = (t - self.arrival_s) / self.peak_s
        return float(x ** 3 * math.exp(3.0 * (1.0 - x))) if x > 0 else 0.0

    def render(self, plan: SeriesPlan, anatomy: PatientAnatomy) -> list[np.ndarray]:
        g, rng, deform = plan.geometry, _rng(plan.seed, 1), anatomy.deformation()
        s0 = render(anatomy.contrast("t2"), g, plan.transform, deform, AIR["t2"]) * np.float32(0.7)
        cbv = render(anatomy.tissue("gm"), g, plan.transform, deform, 0.0) + \
            np.float32(0.45) * render(anatomy.tissue("wm"), g, plan.transform, deform, 0.0)
        gain = bias_field(s0.shape, rng) * np.float32(rng.uniform(0.9, 1.3))
        out = []
        for t in self.times_s:
            signal = s0 * np.exp(np.float32(-0.55 * self.concentration(t)) * cbv) * gain
            out.append(np.clip(np.rint(rician(signal, 10.0, rng)), 0, 4095).astype(np.uint16))
        return out

    def headers(self, plan, patient, study, vols):
        start = _seconds(plan.info.time)
        out = []
        for v, t in enumerate(self.times_s):
            h = volume_header(plan, patient, study, vols[v])
            dw.set_temporal(h, self.habit, v, len(self.times_s), t, start)
            out.append(h)
        return out


@dataclass
class Diffusion(_FourD):
    """DTI: b=0, then one volume per gradient direction; tissue signal falls with its (anisotropic) diffusivity."""

    style: str
    b_values: list[float]
    directions: list[list[float] | None]
    tr_s: float

    @classmethod
    def plan(cls, s: SeriesPlan, proto: dict) -> Diffusion:
        dirs = _hemisphere(proto["directions"])
        recipe = cls(style=proto["style"], b_values=[0.0] + [proto["b_value"]] * len(dirs),
                     directions=[None] + [[float(v) for v in d] for d in dirs], tr_s=proto["tr"] / 1000.0)
        s.manifest.update(volumes=len(recipe.b_values), split_by=[_DIFFUSION_TAGS[recipe.style], [ACQUISITION_TIME]],
                          diffusion={"style": recipe.style, "b_values": recipe.b_values,
                                     "directions": recipe.directions})
        return recipe

    def render(self, plan: SeriesPlan, anatomy: PatientAnatomy) -> list[np.ndarray]:
        g, rng, deform = plan.geometry, _rng(plan.seed, 1), anatomy.deformation()
        t2 = render(anatomy.contrast("t2"), g, plan.transform, deform, AIR["t2"])
        wm = render(anatomy.tissue("wm"), g, plan.transform, deform, 0.0)
        # diffusivity (mm^2/s) from the tissue's T2 value: white matter, grey matter, oedema, CSF
        adc = np.interp(t2, [0.0, 440.0, 620.0, 1050.0, 1400.0], [0.5e-3, 0.7e-3, 0.8e-3, 1.4e-3, 3.0e-3])
        fibre = plan.transform[:3, :3] @ np.array([1.0, 0.0, 0.0])  # left-right, as the corpus callosum
        fibre /= np.linalg.norm(fibre)
        s0 = t2 * np.float32(0.8)
        gain = bias_field(t2.shape, rng) * np.float32(rng.uniform(0.9, 1.3))
        out = []
        for b, d in zip(self.b_values, self.directions):
            if d is None:
                signal = s0
            else:
                cos2 = float(np.dot(d, fibre)) ** 2
                signal = s0 * np.exp(-b * adc * (1.0 + 0.6 * wm * (1.5 * cos2 - 0.5))).astype(np.float32)
            out.append(np.clip(np.rint(rician(signal * gain, 8.0, rng)), 0, 4095).astype(np.uint16))
        return out

    def headers(self, plan, patient, study, vols):
        start = _seconds(plan.info.time)
        out = []
        for v, (b, d) in enumerate(zip(self.b_values, self.directions)):
            h = volume_header(plan, patient, study, vols[v])
            h.AcquisitionTime = dw.tm(start + v * self.tr_s)
            if self.style == "siemens":
                h.SequenceName = "*ep_b0" if d is None else f"*ep_b{int(b)}#{v}"
            dw.set_diffusion(h, self.style, b, None if d is None else np.asarray(d))
            out.append(h)
        return out


def _hemisphere(n: int) -> np.ndarray:
    """n unit vectors spread over a hemisphere (a golden-angle spiral), rounded as scanners store them."""
    k = np.arange(n) + 0.5
    z = 1.0 - k / n
    r = np.sqrt(1.0 - z * z)
    phi = k * math.pi * (3.0 - math.sqrt(5.0))
    d = np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)
    return np.round(d / np.linalg.norm(d, axis=1, keepdims=True), 6)


@dataclass
class CTRecon:
    """Another reconstruction of a CT acquisition: the same anatomy and couch, its own grid, kernel and noise."""

    source: SeriesPlan
    kind: str  # thick | bone | cor | sag

    def render(self, plan: SeriesPlan, anatomy: PatientAnatomy) -> list[np.ndarray]:
        from scipy import ndimage

        g, rng = plan.geometry, _rng(plan.seed, 1)
        hu = _render_fine(anatomy.contrast("ct"), g, plan.transform, anatomy.deformation(), AIR["ct"])
        if self.kind == "bone":  # a sharp kernel: edges enhanced in-plane, noisier
            hu += np.float32(1.5) * (hu - ndimage.gaussian_filter(hu, sigma=(0, 1.2, 1.2)))
            hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(20.0)
        else:
            hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(3.0 if self.kind == "thick" else 4.0)
        couch = self.source.couch
        if couch is None:
            raise RuntimeError("the source CT is rendered before its other reconstructions")
        plate = np.broadcast_to(couch_plate(*_xy(g), couch["cx"], couch["cy"], couch["radius"]), hu.shape)
        hu[plate] = np.float32(couch["hu"]) + rng.standard_normal(int(plate.sum()), dtype=np.float32) * np.float32(5.0)
        stored = np.clip(np.rint(hu - CT_INTERCEPT), -1024, 4095).astype(np.int16)
        if plan.info.protocol.get("padding", CT_PADDING_STORED) is not None:
            stored[:, ~_recon_circle(g)] = CT_PADDING_STORED
        return [stored]

    def datasets(self, plan, patient, study, pixels, uid_parts):
        return volume_datasets(plan, patient, study, pixels, uid_parts)


def _xy(g: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Physical x and y of every voxel as arrays broadcastable to (k, j, i), only along the axes they vary."""
    m = g.index_matrix
    i, j, k = (np.arange(n, dtype=float) for n in g.size)
    idx = (i[None, None, :], j[None, :, None], k[:, None, None])
    out = []
    for row in (0, 1):
        v = np.full((1, 1, 1), g.origin[row])
        for c in range(3):
            if abs(m[row, c]) > 1e-9:
                v = v + m[row, c] * idx[c]
        out.append(v)
    return out[0], out[1]


@dataclass
class SecondaryCapture:
    """A workstation screenshot: an axial post-contrast slice through the lesion, the enhancing part in colour,
    a colour bar; RGB, upsampled for the screen."""

    def render(self, plan: SeriesPlan, anatomy: PatientAnatomy) -> list[np.ndarray]:
        t = plan.transform
        c = t[:3, :3] @ anatomy.lesion.center + t[:3, 3]
        px = 0.9375
        g = Geometry(size=(256, 256, 1), spacing=(px, px, 1.0), origin=c - np.array([127.5 * px, 127.5 * px, 0.0]),
                     axes=np.eye(3))
        img = render(anatomy.contrast("t1c"), g, t, anatomy.deformation(), 0.0)[0]
        hi = float(np.percentile(img[img > 0], 99.5)) if (img > 0).any() else 1.0
        gray = np.clip(img / hi * 255.0, 0, 255)
        rgb = np.repeat(gray[..., None], 3, axis=2)
        hot = img > float(np.percentile(img[img > 0], 97.0)) if (img > 0).any() else np.zeros_like(img, bool)
        rgb[hot] = np.c_[np.full(hot.sum(), 255.0), gray[hot] * 0.6, np.zeros(hot.sum())]
        bar = np.linspace(255.0, 0.0, 200)[:, None]
        rgb[28:228, 240:250] = np.concatenate([bar, 255.0 - np.abs(bar - 128.0) * 2, 255.0 - bar], axis=1)[:, None, :]
        return [np.repeat(np.repeat(np.rint(rgb).astype(np.uint8), 2, axis=0), 2, axis=1)]

    def datasets(self, plan, patient, study, pixels, uid_parts):
        ds = dw.secondary_capture(patient.info, study.info, plan.info, sop_uid=sop_uid(uid_parts, plan.info.uid, 0),
                                  rgb=pixels[0], modality="MR")
        return [(0, 1, ds, None)]


@dataclass
class RTStruct:
    """GTV contours of the lesion on the source CT's slices, in its frame of reference (the lesion ellipsoid through
    the CT's transform; the patient's smooth deformation, under 2.5 mm, is not followed)."""

    source: SeriesPlan
    lesion: Any = None

    def render(self, plan: SeriesPlan, anatomy: PatientAnatomy) -> list[np.ndarray]:
        self.lesion = anatomy.lesion
        return []

    def datasets(self, plan, patient, study, pixels, uid_parts):
        src, g = self.source, self.source.geometry
        uids = [sop_uid(uid_parts, src.info.uid, k) for k in range(g.size[2])]
        contours = []
        for k in range(g.size[2]):
            pts = ellipse_section(self.lesion.center, self.lesion.radii, src.transform, g.physical([0, 0, k]),
                                  g.axes[:, 0], g.axes[:, 1])
            if pts is not None:
                contours.append(dw.Contour(uids[k], pts))
        roi = dw.Roi(number=1, name="GTV", interpreted_type="GTV", color=(255, 0, 0), contours=contours)
        ds = dw.rt_structure_set(patient.info, study.info, plan.info, sop_uid=sop_uid(uid_parts, plan.info.uid, 0),
                                 label="GTV", referenced_series_uid=src.info.uid, image_class=str(dw.CT_IMAGE_STORAGE),
                                 image_uids=uids, rois=[roi])
        plan.manifest["references"] = {"series_uid": src.info.uid, "frame_of_reference_uid": study.info.frame_uid,
                                       "image_sop_uids": uids, "contour_sop_uids": [c.image_sop_uid for c in contours]}
        plan.manifest["rois"] = [{"number": 1, "name": "GTV", "contours": len(contours)}]
        return [(0, 1, ds, None)]


def ellipse_section(center: np.ndarray, radii: np.ndarray, transform: np.ndarray, origin: np.ndarray, a: np.ndarray,
                    b: np.ndarray, n: int = 36) -> np.ndarray | None:
    """Where the plane origin + u a + v b cuts the template ellipsoid (center, radii) seen through ``transform``:
    n points (patient mm) of the closed curve, or None if it misses."""
    inv = np.linalg.inv(transform)
    d = 1.0 / np.asarray(radii)
    w0 = d * (inv[:3, :3] @ origin + inv[:3, 3] - center)
    m = np.stack([d * (inv[:3, :3] @ a), d * (inv[:3, :3] @ b)], axis=1)
    gram = m.T @ m
    z0 = -np.linalg.solve(gram, m.T @ w0)
    q = float(np.sum((w0 + m @ z0) ** 2))
    if q >= 0.98:
        return None
    theta = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    u = np.linalg.solve(np.linalg.cholesky(gram).T, np.stack([np.cos(theta), np.sin(theta)]))
    z = z0[:, None] + math.sqrt(1.0 - q) * u
    return origin[None, :] + z[0][:, None] * a[None, :] + z[1][:, None] * b[None, :]
