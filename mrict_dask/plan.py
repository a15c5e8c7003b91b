"""Plan: catalog -> stacks -> chosen MR/CT series per study -> MR/CT pairs per patient -> patient-level split.

Plain pandas on the driver, no pixel reading. Every candidate stack gets a decision ("chosen", "not chosen",
"refused") with its reason, and every patient without a pair gets an exclusion reason starting with one of
:data:`EXCLUSION_REASONS`. The plan JSON is private (file URLs, UIDs, the PatientID -> pseudonym map); what
:meth:`Plan.summary` prints is not (pseudonyms, counts and reasons only).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from .config import Config, PlanConfig
from .pseudonym import keyed_fraction, pseudonym, short_hash
from .stacks import CatalogStacks, Stack
from .types import PairSpec

log = logging.getLogger(__name__)

EXCLUSION_REASONS = ("no MR study", "no CT study", "no usable MR series", "no usable CT series", "too far apart")

AXIAL_MAX_ANGLE_DEG = 45.0
"""A stack is axial(-ish) when its slice normal is within this angle of the patient's head-foot axis. Oblique
axial acquisitions and tilted CT gantries stay well inside it; sagittal and coronal stacks are far outside."""

MIN_EXTENT_MM = 60.0
"""Least coverage along the slice normal (first to last slice centre) for a stack to be registered to a head
template; localizer and partial-coverage stacks fall below it."""

MIN_FOV_MM = 100.0
"""Least in-plane field of view (along each image axis) for a head volume."""

T1_MAX_TR_MS, T1_MAX_TE_MS = 800.0, 30.0
"""Spin-echo/gradient-echo T1 weighting from sequence tags: short TR and short TE."""

T1_IR_TI_MS = (300.0, 1300.0)
"""Inversion-prepared gradient echo (MPRAGE/BRAVO-like) T1: inversion time in this range with a short TE."""

OTHER_WEIGHTING = re.compile(r"t2|flair|\bpd\b|proton|dwi|diff|adc|swi|perf|stir|dti|tof|angio", re.I)
"""A description naming another weighting: tags never turn such a series into a T1."""

BONE_KERNEL = re.compile(r"bone|sharp|lung|edge|detail|^[bhj]r?[6-9]\d", re.I)
"""Reconstruction kernels that are sharp/bone (GE BONE/BONEPLUS/LUNG/EDGE/DETAIL, Siemens B/H/J 60 and up):
ranked after soft-tissue kernels for the CT."""

HEAD_BODY_PART = re.compile(r"head|brain|skull|neuro|cran|cerebr", re.I)


# ------------------------------------------------------------------------------------------------ records
@dataclass
class Plan:
    pairs: list[PairSpec] = field(default_factory=list)
    exclusions: list[dict] = field(default_factory=list)  # {"patient": pseudonym, "reason": ...}
    series: list[dict] = field(default_factory=list)  # one per candidate stack: decision and reason
    files_with_errors: list[dict] = field(default_factory=list)  # {"url": ..., "reason": ...} (private)
    patients: dict[str, str] = field(default_factory=dict)  # pseudonym -> PatientID (private)
    config: dict = field(default_factory=dict)

    def to_json(self) -> str:
        data = {
            "format": "mrict-dask plan v1 (private: holds file URLs, UIDs and the PatientID map)",
            "pairs": [{f.name: getattr(p, f.name) for f in fields(PairSpec)} for p in self.pairs],
            "exclusions": self.exclusions,
            "series": self.series,
            "files_with_errors": self.files_with_errors,
            "patients": self.patients,
            "config": self.config,
        }
        # compact: at 100x the seed the plan lists millions of file URLs
        return json.dumps(data, separators=(",", ":"), default=_json_default)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        pairs = []
        for stored in data.get("pairs", []):
            p = dict(stored)
            p["mr_files"] = tuple(p.get("mr_files", ()))
            p["ct_files"] = tuple(p.get("ct_files", ()))
            pairs.append(PairSpec(**p))
        return cls(pairs=pairs, exclusions=list(data.get("exclusions", [])), series=list(data.get("series", [])),
                   files_with_errors=list(data.get("files_with_errors", [])),
                   patients=dict(data.get("patients", {})), config=dict(data.get("config", {})))

    def summary(self) -> str:
        """Counts and reasons only: no PatientIDs, names, dates or UIDs."""
        splits = Counter(p.split for p in self.pairs)
        patients = {p.patient for p in self.pairs}
        lines = [f"plan: {len(self.pairs)} pair(s) from {len(patients)} patient(s) "
                 f"(train {splits.get('train', 0)}, val {splits.get('val', 0)}, test {splits.get('test', 0)}); "
                 f"{len(self.exclusions)} patient(s) excluded"]
        if self.exclusions:
            lines.append("  exclusions by reason:")
            for reason, n in Counter(_head(e["reason"]) for e in self.exclusions).most_common():
                lines.append(f"    {n:5d}  {reason}")
        dec = Counter(s["decision"] for s in self.series)
        lines.append(f"  candidate series/stacks: {dec.get('chosen', 0)} chosen, {dec.get('not chosen', 0)} not "
                     f"chosen, {dec.get('refused', 0)} refused")
        refused = Counter(_head(s["reason"]) for s in self.series if s["decision"] == "refused")
        for reason, n in refused.most_common():
            lines.append(f"    {n:5d}  refused: {reason}")
        if self.files_with_errors:
            lines.append(f"  files with errors (never used): {len(self.files_with_errors)}")
            for reason, n in Counter(_head(f["reason"]) for f in self.files_with_errors).most_common():
                lines.append(f"    {n:5d}  {reason}")
        return "\n".join(lines)


def _head(reason: str) -> str:
    """The category of a reason: the text before its first colon, without parenthesised detail."""
    return re.sub(r"\s*\(.*", "", str(reason).split(":")[0]).strip()


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.ndarray, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ------------------------------------------------------------------------------------------------ selection
@dataclass
class _Candidate:
    stack: Stack
    modality: str
    eligible: bool
    reason: str  # why not eligible, or what it is (for the "chosen"/ranking reasons)
    rank: tuple = ()
    entry: dict = field(default_factory=dict)  # the plan's series record (shared, updated in place)


def _as_patterns(v: Any) -> tuple[str, ...]:
    # a lone string would otherwise be iterated character by character
    return (v,) if isinstance(v, str) else tuple(v)


def _axial_angle(stack: Stack) -> float:
    n = stack.geometry.normal
    return math.degrees(math.acos(min(1.0, abs(float(n[2])) / float(np.linalg.norm(n)))))


def _coverage(stack: Stack) -> str | None:
    g = stack.geometry
    extent = g.spacing[2] * (g.size[2] - 1)
    if extent < MIN_EXTENT_MM:
        return (f"too little coverage ({g.size[2]} slices over {extent:.0f} mm; a head volume needs "
                f"{MIN_EXTENT_MM:.0f} mm)")
    fov = min(g.spacing[0] * g.size[0], g.spacing[1] * g.size[1])
    if fov < MIN_FOV_MM:
        return f"field of view too small ({fov:.0f} mm; a head volume needs {MIN_FOV_MM:.0f} mm)"
    return None


def _mr_text(info: dict) -> tuple[str, str]:
    """(text the selection rules match, what the tags said): description + sequence name + weighting from tags."""
    desc = " ".join(x for x in (info.get("description"), info.get("sequence_name")) if x)
    tr, te, ti = info.get("repetition_time"), info.get("echo_time"), info.get("inversion_time")
    seq = (info.get("scanning_sequence") or "").upper()
    tags = ""
    if not OTHER_WEIGHTING.search(desc):
        short_tr_te = tr is not None and te is not None and tr < T1_MAX_TR_MS and te < T1_MAX_TE_MS
        ir_gradient_echo = (ti is not None and T1_IR_TI_MS[0] <= ti <= T1_IR_TI_MS[1] and te is not None and te < 10
                            and ("GR" in seq or not seq))
        if short_tr_te or ir_gradient_echo:
            tags = "t1"
        if tags and info.get("contrast_agent"):
            tags += " post contrast"
    return (desc + (" " + tags if tags else "")).strip(), tags


def _evaluate_mr(st: Stack, cfg: PlanConfig) -> _Candidate:
    info = st.info
    text, tags = _mr_text(info)
    post = re.search(r"post|\+c|gd|contrast", text, re.I)
    if info.get("contrast_agent") and re.search(r"t1", text, re.I) and not post:
        text += " post contrast"  # ContrastBolusAgent set on a T1: post-contrast whatever the description says
    for pat in _as_patterns(cfg.mr_reject):
        if re.search(pat, info.get("description") or "", re.I):
            return _Candidate(st, "MR", False, f"rejected by rule '{pat}' on its description")
    angle = _axial_angle(st)
    if angle > AXIAL_MAX_ANGLE_DEG:
        return _Candidate(st, "MR", False, f"not axial (slice normal {angle:.0f} degrees from the head-foot axis)")
    cov = _coverage(st)
    if cov:
        return _Candidate(st, "MR", False, cov)
    prefer = _as_patterns(cfg.mr_prefer)
    plain = " ".join(x for x in (info.get("description"), info.get("sequence_name")) if x)
    by_desc = next((i for i, pat in enumerate(prefer) if re.search(pat, plain, re.I)), None)
    cls = next((i for i, pat in enumerate(prefer) if re.search(pat, text, re.I)), None)
    if cls is None:
        return _Candidate(st, "MR", False, "not T1-weighted by the selection rules (description and sequence tags)")
    g = st.geometry
    from_tags = " (weighting/contrast from sequence tags)" if by_desc != cls else ""
    what = f"rule {cls + 1} of {len(prefer)}{from_tags}, {g.spacing[2]:.2f} mm slices"
    rank = (cls, round(g.spacing[2], 3), -g.size[2], info.get("series_number") or 0, st.key)
    return _Candidate(st, "MR", True, what, rank)


def _evaluate_ct(st: Stack, cfg: PlanConfig) -> _Candidate:
    info = st.info
    for pat in _as_patterns(cfg.ct_reject):
        if re.search(pat, info.get("description") or "", re.I):
            return _Candidate(st, "CT", False, f"rejected by rule '{pat}' on its description")
    angle = _axial_angle(st)
    if angle > AXIAL_MAX_ANGLE_DEG:
        return _Candidate(st, "CT", False, f"not axial (slice normal {angle:.0f} degrees from the head-foot axis)")
    cov = _coverage(st)
    if cov:
        return _Candidate(st, "CT", False, cov)
    kernel = info.get("convolution_kernel") or ""
    bone = bool(BONE_KERNEL.search(kernel.replace("\\", " ")))
    body = info.get("body_part") or ""
    not_head = bool(body) and not HEAD_BODY_PART.search(body)
    g = st.geometry
    what = ("bone/sharp kernel" if bone else "soft-tissue kernel") + (f", body part '{body}'" if not_head else "") + \
        f", {g.spacing[2]:.2f} mm slices"
    rank = (int(bone), int(not_head), round(g.spacing[2], 3), -g.size[2], info.get("series_number") or 0, st.key)
    return _Candidate(st, "CT", True, what, rank)


def _choose(cands: list[_Candidate]) -> _Candidate | None:
    """Mark the best eligible candidate of a study "chosen" and give every other one its reason."""
    eligible = sorted((c for c in cands if c.eligible), key=lambda c: c.rank)
    best = eligible[0] if eligible else None
    for c in cands:
        if c is best:
            c.entry.update(decision="chosen", reason=f"best {c.modality} series of its study ({c.reason})")
        elif c.eligible:
            c.entry.update(decision="not chosen", reason=f"ranked below {best.stack.label} ({c.reason})")
        elif c.entry["decision"] != "refused":
            c.entry.update(decision="not chosen", reason=c.reason)
    return best


# ------------------------------------------------------------------------------------------------ planning
def _date(info: dict) -> dt.date | None:
    for k in ("study_date", "series_date"):
        v = (info.get(k) or "").strip()
        m = re.match(r"^(\d{4})(\d{2})(\d{2})$", v.replace("-", "").replace(".", "")[:8])
        if m:
            try:
                return dt.date(int(m[1]), int(m[2]), int(m[3]))
            except ValueError:
                continue
    return None


def split_of(key: bytes, patient_id: str, ratios: tuple[float, float, float]) -> str:
    """train / val / test for a patient: a keyed hash of the PatientID against the cumulative ratios."""
    r = np.asarray(ratios, dtype=float)
    if r.size != 3 or np.any(r < 0) or r.sum() <= 0:
        from .errors import ConfigError

        raise ConfigError(f"plan.split_ratios must be three non-negative numbers, got {ratios}")
    r = r / r.sum()
    f = keyed_fraction(key, patient_id)
    return "train" if f < r[0] else "val" if f < r[0] + r[1] else "test"


def make_plan(catalog: Any, config: Config | PlanConfig | None = None, key: bytes = b"") -> Plan:
    """Build the plan from a catalog (Arrow table, DataFrame or list of rows with the scan's columns).

    Works on the catalog's columns (:class:`~mrict_dask.stacks.CatalogStacks`): Python objects exist per stack,
    series and patient, never per file.
    """
    cfg = getattr(config, "plan", config) or PlanConfig()
    plan = Plan(config=asdict(cfg))
    cs = CatalogStacks(catalog, cfg)
    c = cs.c
    for i in cs.rows_with_problems().tolist():
        problem = cs.problems.text(i)
        plan.files_with_errors.append({"url": c.url(i), "reason": problem or "no SeriesInstanceUID"})

    stacks_by_patient: dict[str, list[Stack]] = defaultdict(list)
    for _, stacks in cs.series():
        for st in stacks:
            stacks_by_patient[st.info.get("patient_id", "")].append(st)
    # patients known only through unreadable files still count (as having no usable series)
    patients = c["patient_id"]
    for code in np.unique(patients.codes[patients.codes >= 0]).tolist():
        stacks_by_patient.setdefault(patients.values[code], [])

    pairs: list[dict] = []
    for pid in sorted(stacks_by_patient):
        pseud = pseudonym(key, pid)
        plan.patients[pseud] = pid
        pairs.extend(_plan_patient(plan, pid, pseud, stacks_by_patient[pid], cfg, key))

    pairs.sort(key=lambda p: p["pair_id"])
    plan.pairs = [PairSpec(index=i, **p) for i, p in enumerate(pairs)]
    plan.exclusions.sort(key=lambda e: e["patient"])
    return plan


@dataclass
class _Option:
    """A possible MR/CT pair of one patient: the chosen series of an MR study and of a CT study."""

    mr: _Candidate
    ct: _Candidate
    mr_study: str
    ct_study: str
    days: int  # CT study date minus MR study date

    @property
    def order(self) -> tuple:
        """Closest in time first; then the better-ranked series; then study UIDs (deterministic)."""
        return (abs(self.days), self.mr.rank, self.ct.rank, self.mr_study, self.ct_study)


def _plan_patient(plan: Plan, pid: str, pseud: str, stacks: list[Stack], cfg: PlanConfig,
                  key: bytes) -> list[dict]:
    studies: dict[str, dict[str, list[_Candidate]]] = defaultdict(lambda: {"MR": [], "CT": []})
    dates: dict[str, dt.date | None] = {}
    has_modality = {"MR": False, "CT": False}
    for st in sorted(stacks, key=lambda s: (s.info.get("study_uid", ""), s.info.get("series_number") or 0, s.key)):
        info = st.info
        mod = info.get("modality", "")
        entry = {"patient": pseud, "modality": mod, "description": info.get("description", ""),
                 "series_number": info.get("series_number"), "n_files": st.n_files,
                 "decision": "refused" if not st.usable else "not chosen", "reason": st.refused or "",
                 "notes": list(st.notes), "series_uid": st.series_uid, "stack": st.key,
                 "study_uid": info.get("study_uid", "")}
        plan.series.append(entry)
        if mod not in ("MR", "CT"):
            if st.usable:
                entry["reason"] = f"modality {mod or 'unknown'} is neither MR nor CT"
            continue
        has_modality[mod] = True
        study = info.get("study_uid", "")
        dates.setdefault(study, _date(info))
        if st.usable:
            cand = (_evaluate_mr if mod == "MR" else _evaluate_ct)(st, cfg)
        else:
            cand = _Candidate(st, mod, False, st.refused or "refused")
        cand.entry = entry
        studies[study][mod].append(cand)

    chosen: dict[str, dict[str, _Candidate]] = {"MR": {}, "CT": {}}
    why_not: dict[str, list[str]] = {"MR": [], "CT": []}
    for study, by_mod in studies.items():
        for mod in ("MR", "CT"):
            if not by_mod[mod]:
                continue
            best = _choose(by_mod[mod])
            if best is not None:
                chosen[mod][study] = best
            else:
                why_not[mod].extend(f"{c.stack.label}: {c.reason}" for c in by_mod[mod])

    def exclude(reason: str) -> list[dict]:
        plan.exclusions.append({"patient": pseud, "reason": reason})
        for mod in ("MR", "CT"):
            for c in chosen[mod].values():
                c.entry.update(decision="not chosen",
                               reason=f"best {mod} series of its study, but the patient has no pair ({_head(reason)})")
        return []

    if not has_modality["MR"]:
        return exclude("no MR study")
    if not has_modality["CT"]:
        return exclude("no CT study")
    if not chosen["MR"]:
        return exclude("no usable MR series: " + _brief(why_not["MR"]))
    if not chosen["CT"]:
        return exclude("no usable CT series: " + _brief(why_not["CT"]))

    options: list[_Option] = []
    gaps = []
    for ms, mc in chosen["MR"].items():
        for cs, cc in chosen["CT"].items():
            if dates.get(ms) is None or dates.get(cs) is None:
                continue
            days = (dates[cs] - dates[ms]).days
            gaps.append(abs(days))
            if abs(days) <= cfg.max_days:
                options.append(_Option(mc, cc, ms, cs, days))
    if not options:
        if not gaps:
            return exclude("too far apart: study dates are missing, the gap cannot be measured")
        return exclude(f"too far apart: the closest MR and CT studies are {min(gaps)} days apart "
                       f"(at most {cfg.max_days} allowed)")
    options.sort(key=lambda o: o.order)
    picked = options if cfg.pair_all else options[:1]
    used = {id(o.mr) for o in picked} | {id(o.ct) for o in picked}
    for mod in ("MR", "CT"):
        for c in chosen[mod].values():
            if id(c) not in used:
                c.entry.update(decision="not chosen",
                               reason=f"best {mod} series of its study, but another study pairs closer in time")
    split = split_of(key, pid, cfg.split_ratios)
    return [{
        "pair_id": f"{pseud}-{short_hash(key, o.mr.stack.series_uid, o.ct.stack.series_uid)}",
        "patient": pseud, "split": split, "days_apart": int(o.days),
        "mr_files": o.mr.stack.urls, "ct_files": o.ct.stack.urls,
        "mr_series_uid": o.mr.stack.series_uid, "ct_series_uid": o.ct.stack.series_uid,
    } for o in picked]


def _brief(reasons: list[str], n: int = 3) -> str:
    uniq = list(dict.fromkeys(reasons))
    text = "; ".join(uniq[:n])
    return text + (f"; and {len(uniq) - n} more" if len(uniq) > n else "") if uniq else "no image stack"


# ------------------------------------------------------------------------------------------------ command
@dataclass
class PlanSummary:
    plan: Plan
    out_url: str
    key_source: str

    def describe(self) -> str:
        lines = [self.plan.summary(), f"wrote the plan to {self.out_url} (private: keep it in the work area)"]
        if self.key_source.startswith("random"):
            lines.append(f"pseudonym key: {self.key_source}; pass --pseudonym-key or set MRICT_PSEUDONYM_KEY to "
                         "get the same pseudonyms across runs and sites")
        return "\n".join(lines)


def plan_to_json(catalog_url: str, out_url: str, config: Config | None = None, pseudonym_key: str | None = None,
                 storage_options: dict | None = None) -> PlanSummary:
    """Read a catalog (Parquet, any fsspec URL), make the plan, write it as JSON beside it in the work area."""
    from .columns import Columns
    from .io import Location
    from .pseudonym import resolve_key

    out = Location.of(out_url, storage_options)
    catalog = Columns.from_parquet(Location.of(catalog_url, storage_options))
    key, source = resolve_key(pseudonym_key, out.parent.url, storage_options)
    plan = make_plan(catalog, config or Config(), key)
    out.write_text(plan.to_json())
    log.info("plan: %d pairs, %d exclusions", len(plan.pairs), len(plan.exclusions))
    return PlanSummary(plan=plan, out_url=out_url, key_source=source)
