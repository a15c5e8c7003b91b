"""Plan: catalog -> stacks (volumes) -> imaging sessions -> the best MR and CT volume per session -> MR/CT
session pairs per patient -> patient-level split.

Works on the catalog's columns on the driver, no pixel reading. A session is a patient's studies of one modality
on one date (or within ``plan.session_hours``): sites store a session as one study or as one study per
sequence, and candidates are compared across the whole session either way (:mod:`mrict_dask.selection` says
how, with the evidence). Every series gets a decision ("chosen", "not chosen", "refused") with its reason, its
session, and for candidates their rank and evidence; a series holding several volumes (4D: diffusion, perfusion,
multi-echo) is one entry with its volume count. Every patient without a pair gets an exclusion reason starting
with one of :data:`EXCLUSION_REASONS`. The plan JSON is private (file URLs, UIDs, the PatientID -> pseudonym
map); what :meth:`Plan.summary` prints is not (pseudonyms, counts and reasons only).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from .config import Config, PlanConfig, plan_config
from .pseudonym import keyed_fraction, pseudonym, short_hash
from .selection import Candidate, evaluate
from .stacks import CatalogStacks, Stack
from .types import PairSpec

log = logging.getLogger(__name__)

EXCLUSION_REASONS = ("no MR study", "no CT study", "no usable MR series", "no usable CT series", "too far apart",
                     "withdrawn")

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
        sessions = {(s["patient"], s.get("session")) for s in self.series if s.get("session")}
        lines.append(f"  series in {len(sessions)} imaging session(s): {dec.get('chosen', 0)} chosen, "
                     f"{dec.get('not chosen', 0)} not chosen, {dec.get('refused', 0)} refused")
        four_d = Counter(s.get("volume_kind") for s in self.series if s.get("volumes"))
        if four_d:
            lines.append("  series holding several volumes (each listed once): " +
                         ", ".join(f"{n} {kind}" for kind, n in sorted(four_d.items())))
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


def _when(info: dict) -> dt.datetime | None:
    """The study's date and time (StudyTime, else SeriesTime; midnight when neither is readable)."""
    day = _date(info)
    if day is None:
        return None
    for k in ("study_time", "series_time"):
        m = re.match(r"^(\d{2})(\d{2})?(\d{2})?", (info.get(k) or "").replace(":", "").strip())
        if m and int(m[1]) < 24 and int(m[2] or 0) < 60 and int(m[3] or 0) < 60:
            return dt.datetime.combine(day, dt.time(int(m[1]), int(m[2] or 0), int(m[3] or 0)))
    return dt.datetime.combine(day, dt.time())


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
    cfg = plan_config(config)
    plan = Plan(config=asdict(cfg))
    cs = CatalogStacks(catalog, cfg)
    c = cs.c
    unusable: Counter[str] = Counter()  # per patient: files that are in no series (unreadable, ...)
    for i in cs.rows_with_problems().tolist():
        problem = cs.problems.text(i)
        plan.files_with_errors.append({"url": c.url(i), "reason": problem or "no SeriesInstanceUID"})
        unusable[c["patient_id"].text(i)] += 1

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
        pairs.extend(_plan_patient(plan, pid, pseud, stacks_by_patient[pid], cfg, key, unusable[pid]))

    pairs.sort(key=lambda p: p["pair_id"])
    plan.pairs = [PairSpec(index=i, **p) for i, p in enumerate(pairs)]
    plan.exclusions.sort(key=lambda e: e["patient"])
    return plan


@dataclass
class _Session:
    """A patient's studies of one modality close together in time: where candidates are compared."""

    modality: str
    label: str  # "MR session 1", in time order (PHI-free)
    studies: list[str] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    chosen: Candidate | None = None


def _sessions(modality: str, studies: dict[str, list[Stack]], hours: float) -> list[_Session]:
    """Group studies into sessions: the same date, or within ``hours`` of the previous study (in time order).
    A study without a readable date is a session of its own."""
    when = {uid: _when(stacks[0].info) for uid, stacks in studies.items()}
    order = sorted(studies, key=lambda u: (when[u] is None, when[u] or dt.datetime.min, u))
    out: list[_Session] = []
    for uid in order:
        t, last = when[uid], out[-1] if out else None
        prev = when[last.studies[-1]] if last is not None else None
        same = t is not None and prev is not None and (
            t.date() == prev.date() or abs((t - prev).total_seconds()) <= hours * 3600)
        if not same:
            last = _Session(modality, f"{modality} session {len(out) + 1}")
            out.append(last)
        last.studies.append(uid)
    return out


@dataclass
class _Option:
    """A possible MR/CT pair of one patient: the chosen volumes of an MR session and of a CT session."""

    mr: Candidate
    ct: Candidate
    mr_session: str
    ct_session: str
    days: int  # CT study date minus MR study date

    @property
    def order(self) -> tuple:
        """Closest in time first; then the better-ranked volumes; then the sessions' order (deterministic)."""
        return (abs(self.days), self.mr.rank, self.ct.rank, self.mr_session, self.ct_session)


def _entry_key(st: Stack) -> str:
    """The plan entry a stack belongs to: one per stack, one for all volumes of a split series."""
    return st.key if st.split is None else f"{st.series_uid}|split{st.split.group}"


def _choose(session: _Session) -> None:
    """Rank the session's eligible candidates, choose the best, and give every candidate its decision."""
    eligible = sorted((c for c in session.candidates if c.eligible), key=lambda c: c.rank)
    session.chosen = eligible[0] if eligible else None
    n = len(eligible)
    for c in session.candidates:
        if c is session.chosen:
            c.decision = "chosen"
            c.why = f"best {c.modality} volume of {session.label} ({c.summary})"
        elif c.eligible:
            c.decision = "not chosen"
            c.why = f"ranked {eligible.index(c) + 1} of {n} in {session.label}, below {session.chosen.stack.label} " \
                    f"({c.summary})"
        elif c.stack.usable:
            c.decision, c.why = "not chosen", c.reason
        else:
            c.decision, c.why = "refused", c.reason


def _plan_patient(plan: Plan, pid: str, pseud: str, stacks: list[Stack], cfg: PlanConfig,
                  key: bytes, unusable: int = 0) -> list[dict]:
    by_modality: dict[str, dict[str, list[Stack]]] = {"MR": defaultdict(list), "CT": defaultdict(list)}
    others: list[Stack] = []
    for st in sorted(stacks, key=lambda s: (s.info.get("study_uid", ""), s.info.get("series_number") or 0, s.key)):
        mod = st.info.get("modality", "")
        (by_modality[mod][st.info.get("study_uid", "")] if mod in by_modality else others).append(st)
    sessions: dict[str, list[_Session]] = {}
    candidates: list[tuple[_Session | None, Candidate]] = []
    for mod, studies in by_modality.items():
        sessions[mod] = _sessions(mod, studies, cfg.session_hours)
        for session in sessions[mod]:
            for uid in session.studies:
                for st in studies[uid]:
                    cand = evaluate(st, mod, cfg) if st.usable else Candidate(st, mod, False, st.refused or "refused")
                    session.candidates.append(cand)
                    candidates.append((session, cand))
            _choose(session)
    for st in others:
        mod = st.info.get("modality", "")
        cand = Candidate(st, mod, False, st.refused or f"modality {mod or 'unknown'} is neither MR nor CT")
        cand.decision, cand.why = ("not chosen" if st.usable else "refused"), cand.reason
        candidates.append((None, cand))

    def exclude(reason: str) -> list[dict]:
        plan.exclusions.append({"patient": pseud, "reason": reason})
        for mod in ("MR", "CT"):
            for session in sessions[mod]:
                if session.chosen is not None:
                    session.chosen.decision = "not chosen"
                    session.chosen.why = f"best {mod} volume of {session.label}, but the patient has no pair " \
                                         f"({_head(reason)})"
        return []

    def finish(pairs: list[dict]) -> list[dict]:
        plan.series.extend(_entries(pseud, candidates))
        return pairs

    if not pid.strip():  # files of unknown people are never paired with each other
        return finish(exclude("no PatientID: the images cannot be attributed to one patient"))
    # a study whose every file is unreadable leaves no series: say so, not only "no study"
    lost = f" ({unusable} of the patient's files could not be read or are in no series: see files_with_errors)" \
        if unusable else ""
    if not sessions["MR"]:
        return finish(exclude("no MR study" + lost))
    if not sessions["CT"]:
        return finish(exclude("no CT study" + lost))
    chosen = {mod: [s for s in sessions[mod] if s.chosen is not None] for mod in ("MR", "CT")}
    for mod in ("MR", "CT"):
        if not chosen[mod]:
            why = [f"{c.stack.label}: {c.reason}" for s in sessions[mod] for c in s.candidates]
            return finish(exclude(f"no usable {mod} series: " + _brief(why)))

    options: list[_Option] = []
    gaps = []
    for ms in chosen["MR"]:
        for cs in chosen["CT"]:
            md, cd = _date(ms.chosen.stack.info), _date(cs.chosen.stack.info)
            if md is None or cd is None:
                continue
            days = (cd - md).days
            gaps.append(abs(days))
            if abs(days) <= cfg.max_days:
                options.append(_Option(ms.chosen, cs.chosen, ms.label, cs.label, days))
    if not options:
        if not gaps:
            return finish(exclude("too far apart: study dates are missing, the gap cannot be measured"))
        return finish(exclude(f"too far apart: the closest MR and CT sessions are {min(gaps)} days apart "
                              f"(at most {cfg.max_days} allowed)"))
    options.sort(key=lambda o: o.order)
    picked = options if cfg.pair_all else options[:1]
    used = {id(o.mr) for o in picked} | {id(o.ct) for o in picked}
    for mod in ("MR", "CT"):
        for session in chosen[mod]:
            if id(session.chosen) not in used:
                session.chosen.decision = "not chosen"
                session.chosen.why = f"best {mod} volume of {session.label}, but another session pairs closer in time"
    split = split_of(key, pid, cfg.split_ratios)
    return finish([{
        "pair_id": f"{pseud}-{short_hash(key, o.mr.stack.series_uid, o.ct.stack.series_uid)}",
        "patient": pseud, "split": split, "days_apart": int(o.days),
        "mr_files": o.mr.stack.urls, "ct_files": o.ct.stack.urls,
        "mr_series_uid": o.mr.stack.series_uid, "ct_series_uid": o.ct.stack.series_uid,
    } for o in picked])


_DECISION_ORDER = {"chosen": 0, "not chosen": 1, "refused": 2}


def _entries(pseud: str, candidates: list[tuple[_Session | None, Candidate]]) -> list[dict]:
    """The plan's series records: one per stack, one per split series (the best of its volumes speaks for it)."""
    groups: dict[str, list[tuple[_Session | None, Candidate]]] = {}
    for session, cand in candidates:
        groups.setdefault(_entry_key(cand.stack), []).append((session, cand))
    out = []
    for members in groups.values():
        session, best = min(members, key=lambda m: (_DECISION_ORDER.get(m[1].decision, 3), m[1].rank or ()))
        st = best.stack
        info = st.info
        rank = None
        if session is not None and best.eligible:
            ranked = sorted((c for c in session.candidates if c.eligible), key=lambda c: c.rank)
            rank = ranked.index(best) + 1
        entry = {"patient": pseud, "modality": best.modality, "description": info.get("description", ""),
                 "series_number": info.get("series_number"), "n_files": sum(m[1].stack.n_files for m in members),
                 "decision": best.decision, "reason": best.why or best.reason, "notes": list(st.notes),
                 "series_uid": st.series_uid, "stack": st.key, "study_uid": info.get("study_uid", ""),
                 "session": session.label if session is not None else "", "rank": rank,
                 "evidence": list(best.evidence)}
        if st.split is not None:
            entry.update(volumes=st.split.count, split_by=st.split.by, volume_kind=st.split.kind,
                         volume=st.split.label if best.decision == "chosen" else None)
        out.append(entry)
    return out


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
