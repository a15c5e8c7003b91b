"""Which volume of a session to use: each candidate's eligibility and rank, with the evidence that decided them.

Pure functions of one stack's header facts (:class:`~mrict_dask.stacks.Stack`) and the plan configuration; the
planner (:mod:`mrict_dask.plan`) compares candidates across an imaging session. What a neuroradiologist preparing
MR -> CT training data would choose, in order of what matters most:

- MR: T1-weighted (description or sequence tags: short TR/TE, or an inversion-prepared gradient echo), never a
  diffusion, perfusion or other dynamic series (whatever ContrastBolusAgent says); then post-contrast
  (ContrastBolusAgent, or a description that says so and does not say "pre"), whole-head coverage, ORIGINAL
  before DERIVED (a reformat), 3D before 2D, the finest voxel (worst axis, then volume).
- CT: original reconstructions before reformats, soft-tissue before bone/sharp kernels, a head body part (when
  given) before others, then the thinnest.

Any orientation is a candidate: every volume is resampled onto the template grid anyway. Words that only look
like contrast (e.g. "t1post1") do not count: a word must stand apart from letters and digits.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import PlanConfig
from .stacks import Stack

MIN_EXTENT_MM = 60.0
"""Least coverage along the slice normal (first to last slice centre) for a stack to be registered to a head
template; localizer and partial-coverage slabs fall below it."""

MIN_FOV_MM = 100.0
"""Least in-plane field of view (along each image axis) for a head volume."""

HEAD_EXTENT_MM = (130.0, 160.0, 100.0)
"""Extent (left-right, anterior-posterior, inferior-superior) a volume must span to count as covering the whole
head; less is ranked after whole-head volumes (the brain is about 140 x 170 x 110 mm)."""

T1_MAX_TR_MS, T1_MAX_TE_MS, T1_MAX_GRE_TE_MS = 800.0, 30.0, 10.0
"""T1 weighting from sequence tags: short TR and short TE; a gradient echo's TE must be shorter still (T2*-weighted
and susceptibility gradient echoes have TEs of 15-40 ms, T1 spoiled gradient echoes 2-6 ms)."""

MR_MAX_VOXEL_MM = (2.0, 8.0)
"""Coarsest in-plane pixel and slice spacing of a structural T1 candidate: calibration, coil-sensitivity and
survey scans (e.g. 8 x 8 x 10 mm) are short-TR gradient echoes that would otherwise pass as T1."""

T1_IR_TI_MS = (300.0, 1300.0)
"""Inversion-prepared gradient echo (MPRAGE/BRAVO-like) T1: inversion time in this range with a short TE."""

OTHER_WEIGHTING = re.compile(r"t2|flair|\bpd\b|proton|dwi|diff|adc|swi|swan|perf|stir|dti|tof|angio|mra|"
                             r"fiesta|ciss|true.?fisp|\bdrive\b|\bmerge\b|\bmedic\b|\bhemo|suscept", re.I)
"""A description naming another weighting: neither its tags nor its sequence name make such a series a T1 (a
time-of-flight angiography is a fast 3D gradient echo, "fl3d", with a short TR and TE; steady-state free
precession (FIESTA, CISS, TrueFISP, DRIVE) and T2*/susceptibility echoes (SWAN, MERGE, MEDIC) are short-TR
gradient echoes too), unless it says T1."""

POST_CONTRAST = re.compile(r"(?<![a-z])(post(?![a-z0-9])(?![\s_-]*(?:op|operative|surg\w*|fossa)(?![a-z]))|"
                           r"gd(?![a-z])|gad|gado|\+c(?![a-z])|c\+|contrast|enhanced|ce(?![a-z])|t1c(?![a-z])|"
                           r"km(?![a-z])|kontrast)", re.I)
PRE_CONTRAST = re.compile(r"(?<![a-z])(pre(?![a-z0-9])|wo(?![a-z])|w/o|without|non[\s_-]?(contrast|con|enh)|"
                          r"noncon|unenhanced|native)", re.I)
"""Descriptions saying post-contrast (and not pre-contrast: "T1 pre contrast" names both words). "Post" before
"op", "operative" or "fossa" is not about contrast."""

NO_AGENT = re.compile(r"^\s*(none|no|n|nil|null|0|-+|n/?a|no\s+contrast|without\b.*|not\s+given)\s*$", re.I)
"""ContrastBolusAgent values that say no agent was given."""

DIFFUSION_WORDS = re.compile(r"(?<![a-z])(dwi|dti|diff\w*|adc|trace|tensor|ep2d_diff)", re.I)
DYNAMIC_WORDS = re.compile(r"(?<![a-z])(perf\w*|dsc|dce|pwi|bold|fmri|asl|pcasl|dynamic|dyn)(?![a-z])", re.I)

BONE_KERNEL = re.compile(r"bone|sharp|lung|edge|detail|^[bhjqu]r?[6-9]\d|^fc(3\d|5\d|8\d)|^(d|e|l|y[c-e])$", re.I)
"""Reconstruction kernels that are sharp/bone: GE BONE/BONEPLUS/LUNG/EDGE/DETAIL; Siemens B/H/J/Q/U (and Br/Hr/
Ur...) 60 and up; Canon/Toshiba FC30-FC39, FC50-FC59 and FC80-FC89; Philips D, E, L and YC-YE."""

BONE_DESCRIPTION = re.compile(r"(?<![a-z])(bone|osteo|lung)", re.I)
"""A CT series description naming a bone or lung reconstruction (for kernels this list does not know)."""

HEAD_BODY_PART = re.compile(r"head|brain|skull|neuro|cran|cerebr", re.I)


@dataclass
class Candidate:
    """One volume of a session, as the selection sees it: eligible (with evidence and rank) or not (reason)."""

    stack: Stack
    modality: str
    eligible: bool
    reason: str = ""  # why it is not eligible
    evidence: list[str] = field(default_factory=list)  # what ranked it, most important first
    rank: tuple = ()  # smaller is better
    decision: str = ""  # set by the planner: chosen / not chosen / refused
    why: str = ""  # set by the planner: the decision's reason

    @property
    def summary(self) -> str:
        return "; ".join(self.evidence)


def _as_patterns(v: Any) -> tuple[str, ...]:
    # a lone string would otherwise be iterated character by character
    return (v,) if isinstance(v, str) else tuple(v)


def _rejected(info: dict, patterns: Any) -> str | None:
    for pat in _as_patterns(patterns):
        if re.search(pat, info.get("description") or "", re.I):
            return f"rejected by rule '{pat}' on its description"
    return None


def coverage_problem(stack: Stack) -> str | None:
    """Why a stack is too small to be a head volume, or None."""
    g = stack.geometry
    extent = g.spacing[2] * (g.size[2] - 1)
    if extent < MIN_EXTENT_MM:
        return (f"too little coverage ({g.size[2]} slices over {extent:.0f} mm; a head volume needs "
                f"{MIN_EXTENT_MM:.0f} mm)")
    fov = min(g.spacing[0] * g.size[0], g.spacing[1] * g.size[1])
    if fov < MIN_FOV_MM:
        return f"field of view too small ({fov:.0f} mm; a head volume needs {MIN_FOV_MM:.0f} mm)"
    return None


def patient_extent(stack: Stack) -> np.ndarray:
    """Extent in mm of the volume's box along the patient's left-right, anterior-posterior, inferior-superior."""
    g = stack.geometry
    d = np.asarray(g.direction, float).reshape(3, 3)
    axes = d * (np.asarray(g.size, float) * np.asarray(g.spacing, float))[None, :]  # columns: the box's edges
    return np.abs(axes).sum(axis=1)


def _voxel(stack: Stack) -> tuple[float, float, str]:
    sp = [float(x) for x in stack.geometry.spacing]
    return max(sp), float(np.prod(sp)), "x".join(f"{x:.2f}" for x in sp)


def _kind_of_4d(stack: Stack) -> str | None:
    """Diffusion or dynamic (perfusion, DCE, fMRI) series, from how its volumes split or what it says it is."""
    split = stack.split
    if split is not None and split.kind in ("diffusion", "dynamic"):
        what = "diffusion-weighted" if split.kind == "diffusion" else "dynamic (perfusion, DCE or fMRI)"
        return f"{what} series ({split.count} volumes told apart by {split.by})"
    desc = " ".join(x for x in (stack.info.get("description"), stack.info.get("sequence_name")) if x)
    if DIFFUSION_WORDS.search(desc):
        return "diffusion-weighted series (by its description or sequence name)"
    if DYNAMIC_WORDS.search(desc):
        return "dynamic series (perfusion, DCE or fMRI; by its description or sequence name)"
    return None


def _t1_evidence(info: dict) -> tuple[str, str]:
    """(text the T1 rules match: description, sequence name and 't1' when the tags say so; the tag evidence)."""
    desc = " ".join(x for x in (info.get("description"), info.get("sequence_name")) if x)
    tr, te, ti = info.get("repetition_time"), info.get("echo_time"), info.get("inversion_time")
    seq = (info.get("scanning_sequence") or "").upper()
    tags = ""
    if not OTHER_WEIGHTING.search(desc):
        gradient_echo = "GR" in seq
        short_tr_te = tr is not None and te is not None and tr < T1_MAX_TR_MS and \
            te < (T1_MAX_GRE_TE_MS if gradient_echo else T1_MAX_TE_MS)
        ir_gradient_echo = (ti is not None and T1_IR_TI_MS[0] <= ti <= T1_IR_TI_MS[1] and te is not None and te < 10
                            and ("GR" in seq or not seq))
        if short_tr_te:
            tags = f"TR {tr:g} ms, TE {te:g} ms"
        elif ir_gradient_echo:
            tags = f"inversion-prepared gradient echo, TI {ti:g} ms, TE {te:g} ms"
    return (desc + (" t1" if tags else "")).strip(), tags


def contrast_evidence(info: dict) -> tuple[bool, str]:
    """(post-contrast?, the evidence): ContrastBolusAgent first, unless the description says pre-contrast (some
    sites fill the agent in on every series of the exam), then the description."""
    agent = (info.get("contrast_agent") or "").strip()
    desc = info.get("description") or ""
    pre = bool(PRE_CONTRAST.search(desc))
    if agent and not NO_AGENT.match(agent):
        # the agent's free text is not quoted: evidence reaches the report, and sites type anything there
        if pre and not POST_CONTRAST.search(desc):
            return False, "pre-contrast by its description, although ContrastBolusAgent is set"
        return True, "post-contrast (ContrastBolusAgent set)"
    if POST_CONTRAST.search(desc) and not pre:
        return True, "post-contrast (its description)"
    return False, "no contrast agent (tags and description)"


def _derived(info: dict) -> bool:
    return (info.get("image_type") or "").upper().split("\\")[0].strip() == "DERIVED"


def evaluate_mr(stack: Stack, cfg: PlanConfig) -> Candidate:
    info = stack.info
    why = _kind_of_4d(stack) or _rejected(info, cfg.mr_reject)
    if why:
        return Candidate(stack, "MR", False, why + ("" if why.startswith("rejected") else ": never a T1 candidate"))
    if "EP" in (info.get("scanning_sequence") or "").upper().split("\\"):
        return Candidate(stack, "MR", False, "echo-planar acquisition (ScanningSequence EP): not a structural T1")
    cov = coverage_problem(stack)
    if cov:
        return Candidate(stack, "MR", False, cov)
    sp = stack.geometry.spacing
    if max(sp[0], sp[1]) > MR_MAX_VOXEL_MM[0] or sp[2] > MR_MAX_VOXEL_MM[1]:
        return Candidate(stack, "MR", False, f"voxel too coarse for a structural T1 ({_voxel(stack)[2]} mm; at most "
                                             f"{MR_MAX_VOXEL_MM[0]:g} mm in-plane and {MR_MAX_VOXEL_MM[1]:g} mm "
                                             "between slices; calibration and survey scans are this coarse)")
    text, tags = _t1_evidence(info)
    prefer = _as_patterns(cfg.mr_prefer)
    cls = next((i for i, pat in enumerate(prefer) if re.search(pat, text, re.I)), None)
    desc = info.get("description") or ""
    if OTHER_WEIGHTING.search(desc) and not re.search(r"t1", desc, re.I):
        cls = None
    if cls is None:
        return Candidate(stack, "MR", False, "not T1-weighted by the selection rules (description and sequence tags)")
    by_desc = next((i for i, pat in enumerate(prefer)
                    if re.search(pat, text.removesuffix(" t1") if tags else text, re.I)), None)
    t1 = f"T1-weighted by its sequence tags ({tags})" if by_desc is None else "T1-weighted by its description"
    if len(prefer) > 1:
        t1 += f" (rule {cls + 1} of {len(prefer)})"
    post, contrast = contrast_evidence(info)
    extent = patient_extent(stack)
    whole = bool(np.all(extent >= np.asarray(HEAD_EXTENT_MM)))
    cover = ("covers the head" if whole else "partial head coverage") + \
        f" ({extent[0]:.0f} x {extent[1]:.0f} x {extent[2]:.0f} mm)"
    derived = _derived(info)
    three_d = (info.get("mr_acquisition_type") or "").upper() == "3D"
    worst, volume, shown = _voxel(stack)
    evidence = [t1, contrast, cover, "DERIVED (a reformat)" if derived else "ORIGINAL",
                "3D acquisition" if three_d else "2D acquisition", f"voxel {shown} mm, {orientation(stack)}"]
    if stack.split is not None:
        evidence.append(f"volume {stack.split.label} of {stack.split.count}")
    # a T1 known only from its TR/TE ranks after one that says so in its description
    rank = (int(not post), cls, int(by_desc is None), int(not whole), int(derived), int(not three_d), round(worst, 1),
            round(volume, 2), -stack.n_files, info.get("series_number") or 0, stack.key)
    return Candidate(stack, "MR", True, evidence=evidence, rank=rank)


def evaluate_ct(stack: Stack, cfg: PlanConfig) -> Candidate:
    info = stack.info
    why = _rejected(info, cfg.ct_reject)
    if why:
        return Candidate(stack, "CT", False, why)
    if stack.split is not None and stack.split.kind == "dynamic":
        return Candidate(stack, "CT", False, f"dynamic CT series ({stack.split.count} time points told apart by "
                                             f"{stack.split.by}): not a single head CT")
    cov = coverage_problem(stack)
    if cov:
        return Candidate(stack, "CT", False, cov)
    kernel = (info.get("convolution_kernel") or "").replace("\\", " ").strip()
    bone_kernel = bool(BONE_KERNEL.search(kernel))
    bone_desc = not bone_kernel and bool(BONE_DESCRIPTION.search(info.get("description") or ""))
    bone = bone_kernel or bone_desc
    body = info.get("body_part") or ""
    not_head = bool(body) and not HEAD_BODY_PART.search(body)
    derived = _derived(info)
    worst, _, shown = _voxel(stack)
    evidence = ["reformat (DERIVED)" if derived else "original reconstruction",
                (f"bone/sharp kernel '{kernel}'" if bone_kernel else
                 f"bone/lung reconstruction by its description (kernel '{kernel or 'not given'}')" if bone_desc else
                 f"soft-tissue kernel '{kernel}'" if kernel else "kernel not given (taken as soft tissue)")]
    if not_head:
        evidence.append(f"body part '{body}'")
    evidence.append(f"voxel {shown} mm, {orientation(stack)}")
    if stack.split is not None:
        evidence.append(f"volume {stack.split.label} of {stack.split.count}")
    rank = (int(derived), int(bone), int(not_head), round(worst, 2), -stack.n_files, info.get("series_number") or 0,
            stack.key)
    return Candidate(stack, "CT", True, evidence=evidence, rank=rank)


def evaluate(stack: Stack, modality: str, cfg: PlanConfig) -> Candidate:
    """The candidate a usable stack of an MR or CT series makes."""
    return (evaluate_mr if modality == "MR" else evaluate_ct)(stack, cfg)


def orientation(stack: Stack) -> str:
    """axial, coronal or sagittal (the patient axis closest to the slice normal), "oblique" beyond 10 degrees."""
    n = np.abs(np.asarray(stack.geometry.normal, float))
    k = int(np.argmax(n))
    off = math.degrees(math.acos(min(1.0, float(n[k]) / float(np.linalg.norm(n)))))
    return ("oblique " if off > 10 else "") + ("sagittal", "coronal", "axial")[k]
