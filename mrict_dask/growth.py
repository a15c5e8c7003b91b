"""Growing collections: which planned pairs a store already holds, which are new, which it must retire; and
withdrawal of a patient (``mrict-dask forget``).

Pure decisions first (:func:`reconcile`), then the steps that act on the store and the private work area.

- A pair's identity is its *inputs*: a keyed digest of the instances it is computed from (each instance's
  SOPInstanceUID, rows, columns and frames, MR and CT apart). DICOM gives an instance whose pixels change a new
  SOPInstanceUID, so a series re-sent with other instances gives other inputs, while files copied elsewhere or
  touched (new modification times, new URLs), or the same instances read from a PACS instead of files, give the
  same.
- A planned pair whose inputs the store holds (in a pair still live) is that pair: never computed or written
  again. Any other planned pair is new and is appended; its pair_id is the plan's, unless the store already used
  that id (a pair re-sent with other instances has the same series, so the same planned id): then a keyed
  variant of it.
- A live pair of the store that no planned pair matches is retired when its patient is still in the input (the
  input now gives that patient other pairs, or none); a patient no longer in the input at all keeps its pairs
  (an export of this month only does not remove last month's patients: withdrawal is explicit, with forget).
- Existing patients keep their split; new patients get theirs by the same keyed rule.
- Withdrawn patients (the work area's withdrawal list, and every patient the store holds a tombstone of) are
  never planned again.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError
from .io import Location
from .lease import DEFAULT_TTL_S, holding
from .pseudonym import pseudonym, short_hash
from .store import (
    STATUS_RETIRED,
    STATUS_WITHDRAWN,
    completed_pairs,
    finalize_store,
    pair_state,
    pair_table,
    withdraw_pair,
)
from .types import PairSpec
from .versions import redact_withdrawn

log = logging.getLogger(__name__)

WITHDRAWN_NAME = "withdrawn.json"
INPUT_COLUMNS = ("sop_instance_uid", "rows", "columns", "number_of_frames")
"""What a pair's inputs digest covers, per instance: what every source tells alike (a file and a PACS's metadata;
sizes and transfer syntaxes a PACS does not give), as text and integers only (their text form never changes)."""
KEY_CHECK = "mrict-dask pseudonym key check"


# ----------------------------------------------------------------------------------------------- inputs
def key_check(key: bytes) -> str:
    """A keyed value the store keeps to tell whether a run uses the pseudonym key it was made with."""
    return short_hash(key, KEY_CHECK, n=16)


def with_inputs(catalog: Location | Any, pairs: Sequence[PairSpec], key: bytes) -> list[PairSpec]:
    """``pairs`` with their ``inputs`` digest, from the catalog's rows of their files (Arrow; one Python string per
    file of a pair at a time)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from .catalog import read_catalog_table

    files = [(k, role, u) for k, p in enumerate(pairs) for role, urls in (("mr", p.mr_files), ("ct", p.ct_files))
             for u in urls]
    if not files:
        return list(pairs)
    table = read_catalog_table(catalog, ("url", *INPUT_COLUMNS)) if isinstance(catalog, Location) else catalog
    text = pc.binary_join_element_wise(
        *[pc.cast(table.column(c), pa.string()).fill_null("") for c in INPUT_COLUMNS], "\x1f")
    rows = pa.table({"url": pc.cast(table.column("url"), pa.string()), "text": text})
    wanted = pa.table({"url": pa.array([u for _, _, u in files], pa.string()),
                       "pair": pa.array([k for k, _, _ in files], pa.int64()),
                       "role": pa.array([r for _, r, _ in files], pa.string())})
    joined = wanted.join(rows, "url", join_type="left outer").sort_by([("pair", "ascending"), ("role", "ascending"),
                                                                         ("text", "ascending")])
    pair_col = joined.column("pair").to_numpy()
    role_col, text_col = joined.column("role"), joined.column("text").fill_null("?")
    out = []
    start = 0
    for k, p in enumerate(pairs):
        end = start
        while end < len(pair_col) and pair_col[end] == k:
            end += 1
        parts = [f"{r}\x1e{t}" for r, t in zip(role_col.slice(start, end - start).to_pylist(),
                                               text_col.slice(start, end - start).to_pylist())]
        digest = hmac.new(key, "\n".join(parts).encode(), hashlib.sha256).hexdigest()[:16]
        out.append(dataclasses.replace(p, inputs=digest))
        start = end
    return out


def check_key(store: Location, key: bytes, planned_ids: Sequence[str]) -> None:
    """Refuse a run whose pseudonym key is not the one the store was made with (its patients would come back
    under other pseudonyms, beside themselves). A store from before the check was kept gets it when the plan
    shows the same key (it names a pair the store holds)."""
    from .errors import StoreMismatchError
    from .store import root_attrs, update_root_attrs

    attrs = root_attrs(store)
    mine = key_check(key)
    if "pseudonym_check" in attrs:
        if attrs["pseudonym_check"] != mine:
            raise StoreMismatchError(f"{store.url} was made with another pseudonym key: its patients would come "
                                     "back under other pseudonyms; pass the key it was made with (--pseudonym-key "
                                     "or MRICT_PSEUDONYM_KEY)")
        return
    stored = set(pair_table(store, ("pair",))["pair"])
    if stored and planned_ids and not stored & set(planned_ids):
        raise StoreMismatchError(f"cannot tell whether {store.url} was made with this pseudonym key: none of its "
                                 "pairs is planned from this input; pass the key it was made with, or use a new "
                                 "output URL")
    update_root_attrs(store, {"pseudonym_check": mine})


# ----------------------------------------------------------------------------------------------- reconcile
@dataclass(frozen=True)
class StorePair:
    """A pair the store holds: where, which, from what inputs, and in what state (ok, failed: ..., pending,
    retired, withdrawn)."""

    index: int
    pair_id: str
    patient: str
    split: str
    inputs: str
    state: str

    @property
    def live(self) -> bool:
        return self.state not in (STATUS_RETIRED, STATUS_WITHDRAWN)


@dataclass
class Reconciliation:
    """What a run does with the store: the planned pairs it works on (kept ones at their store index, new ones
    appended), the pairs it retires (index -> (reason, pair ids replacing them)), and live pairs left alone
    because their patient is no longer in the input."""

    pairs: list[PairSpec] = field(default_factory=list)  # in store index order
    new: list[PairSpec] = field(default_factory=list)
    retire: dict[int, tuple[str, list[str]]] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)  # new pair ids that replace a retired pair of their patient
    absent: list[int] = field(default_factory=list)

    @property
    def added(self) -> list[str]:
        return [p.pair_id for p in self.new if p.pair_id not in set(self.changed)]


def _fresh_id(p: PairSpec, key: bytes, taken: set[str]) -> str:
    """The plan's pair_id, or (the store used it for other inputs) a keyed variant of it of the same form."""
    if p.pair_id not in taken:
        return p.pair_id
    k = 1
    while True:
        candidate = f"{p.patient}-{short_hash(key, p.pair_id, p.inputs, str(k))}"
        if candidate not in taken:
            return candidate
        k += 1


def reconcile(stored: Sequence[StorePair], planned: Sequence[PairSpec], key: bytes, input_patients: set[str],
              limit: int | None = None) -> Reconciliation:
    """Match a plan against a store (see the module docstring). Pure.

    ``input_patients``: pseudonyms of every patient the input holds (paired or not). ``limit``: only the first
    ``limit`` planned pairs are considered, and nothing is retired (a trial run does not see the whole plan).
    """
    rec = Reconciliation()
    live = [s for s in stored if s.live]
    by_inputs = {s.inputs: s for s in live if s.inputs}
    by_id = {s.pair_id: s for s in live}
    taken = {s.pair_id for s in stored}
    split_of = {s.patient: s.split for s in stored}
    matched: set[int] = set()
    considered = list(planned if limit is None else planned[:limit])
    n = len(stored)
    for p in considered:
        s = by_inputs.get(p.inputs) if p.inputs else None
        if s is None and p.pair_id in by_id and not by_id[p.pair_id].inputs:
            s = by_id[p.pair_id]  # a store from before inputs were recorded: the same pair id is the same pair
        if s is not None and s.patient == p.patient and s.index not in matched:
            matched.add(s.index)
            rec.pairs.append(dataclasses.replace(p, index=s.index, pair_id=s.pair_id, split=s.split))
            continue
        pid = _fresh_id(p, key, taken)
        taken.add(pid)
        q = dataclasses.replace(p, index=n + len(rec.new), pair_id=pid, split=split_of.get(p.patient, p.split))
        rec.new.append(q)
        rec.pairs.append(q)
    new_by_patient: dict[str, list[PairSpec]] = {}
    for q in rec.new:
        new_by_patient.setdefault(q.patient, []).append(q)
    for s in live:
        if s.index in matched:
            continue
        if limit is not None or s.patient not in input_patients:
            if limit is None:
                rec.absent.append(s.index)
            continue
        repl = new_by_patient.get(s.patient, [])
        planned_ids = {p.pair_id for p in considered if p.patient == s.patient}
        if s.pair_id in planned_ids:
            reason = "inputs changed: a series of the pair was sent again with other instances"
        elif repl:
            reason = "replaced: the input now selects other series for the patient"
        else:
            reason = "no longer planned: the patient's input gives no such pair now"
        rec.retire[s.index] = (reason, [q.pair_id for q in repl])
        rec.changed.extend(q.pair_id for q in repl if q.pair_id not in rec.changed)
    rec.pairs.sort(key=lambda p: p.index)
    return rec


def store_pairs(store: Location) -> list[StorePair]:
    """The store's pairs with their states (from the completion markers: a damaged ok pair counts as pending)."""
    table = pair_table(store, ("pair", "patient", "split", "inputs"))
    markers = completed_pairs(store)
    return [StorePair(index=i, pair_id=pid, patient=table["patient"][i], split=table["split"][i],
                      inputs=table["inputs"][i], state=pair_state(markers.get(i)))
            for i, pid in enumerate(table["pair"])]


# ----------------------------------------------------------------------------------------------- withdrawal
def read_withdrawals(work: Location) -> list[dict]:
    """The work area's withdrawal list: ``{"patient": pseudonym, "patient_id": PatientID or None, "time": ...}``."""
    loc = work.join(WITHDRAWN_NAME)
    if not loc.exists():
        return []
    try:
        return list(loc.read_json().get("patients", []))
    except (ValueError, AttributeError) as exc:
        raise InputError(f"{loc.url} is not a readable withdrawal list ({type(exc).__name__}); it must never be "
                         "lost: restore it from a backup") from None


def add_withdrawals(work: Location, entries: Sequence[dict]) -> None:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    known = read_withdrawals(work)
    have = {e["patient"] for e in known}
    known += [{**e, "time": now} for e in entries if e["patient"] not in have]
    work.join(WITHDRAWN_NAME).write_bytes(json.dumps(
        {"format": "mrict-dask withdrawal list v1 (private: may hold PatientIDs; never delete it)",
         "patients": known}, indent=1).encode(), durable=True)


def withdrawn_patients(work: Location, stored: Sequence[StorePair], key: bytes) -> set[str]:
    """Pseudonyms never to plan again: on the withdrawal list (by PatientID too, under the run's key) or withdrawn
    in the store."""
    out = {s.patient for s in stored if s.state == STATUS_WITHDRAWN}
    for e in read_withdrawals(work):
        out.add(e["patient"])
        if e.get("patient_id"):
            out.add(pseudonym(key, e["patient_id"]))
    return out


def apply_withdrawals(plan: Any, withdrawn: set[str]) -> Any:
    """``plan`` without the pairs and series of withdrawn patients; each of them excluded as ``withdrawn``."""
    if not withdrawn:
        return plan
    present = {p.patient for p in plan.pairs} | {e["patient"] for e in plan.exclusions} | set(plan.patients)
    hit = withdrawn & present
    if not hit:
        return plan
    plan.pairs = [p for p in plan.pairs if p.patient not in hit]
    plan.series = [s for s in plan.series if s.get("patient") not in hit]
    plan.exclusions = [e for e in plan.exclusions if e["patient"] not in hit]
    plan.exclusions += [{"patient": p, "reason": "withdrawn: the patient withdrew; no pair is made"}
                        for p in sorted(hit)]
    plan.exclusions.sort(key=lambda e: e["patient"])
    return plan


_PSEUDONYM = re.compile(r"^P[0-9a-f]{16}$")


def resolve_patient(given: str, work: Location, key: bytes | None) -> tuple[str, str | None]:
    """(pseudonym, PatientID or None) of what a user names: a pseudonym, or a PatientID resolved through the private
    work area (its plan's map, else the pseudonym key)."""
    plan_loc = work.join("plan.json")
    patients: dict[str, str] = {}
    if plan_loc.exists():
        patients = dict(json.loads(plan_loc.read_bytes()).get("patients", {}))
    if _PSEUDONYM.match(given):
        return given, patients.get(given)
    for pseud, pid in patients.items():
        if pid == given:
            return pseud, pid
    if key is None:
        raise InputError("that PatientID is not in the work area's plan, and no pseudonym key is known (pass "
                         "--pseudonym-key, or set MRICT_PSEUDONYM_KEY): give the patient's pseudonym instead")
    return pseudonym(key, given), given


@dataclass
class ForgetSummary:
    store_url: str
    patients: list[str] = field(default_factory=list)  # pseudonyms
    pairs: list[str] = field(default_factory=list)  # pair ids withdrawn
    objects_deleted: int = 0
    versions_redacted: int = 0
    version: int | None = None
    messages: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"withdrawn from {self.store_url}: {len(self.patients)} patient(s), {len(self.pairs)} pair(s); "
                 f"{self.objects_deleted} objects deleted (volumes, slice lists, figures)"]
        if self.version is not None:
            lines.append(f"  recorded as version {self.version}; {self.versions_redacted} earlier version(s) held "
                         "these pairs and can no longer be served")
        lines.append("  the patients are on the work area's withdrawal list: no later run adds them back")
        lines += [f"  {m}" for m in self.messages]
        return "\n".join(lines)


def forget(store_url: str | Location, patients: Sequence[str], work_url: str | Location | None = None,
           pseudonym_key: str | None = None, storage_options: dict | None = None,
           lease_seconds: float = DEFAULT_TTL_S) -> ForgetSummary:
    """Withdraw patients from a store: every pair of theirs leaves it (objects and figures deleted, status
    ``withdrawn``, report updated), every version that held them can no longer be served, and they go on the
    private work area's withdrawal list so that no later run adds them back. Takes the store's lease (refused while
    a run writes the store). Running it again completes a withdrawal that was cut short."""
    import os

    from .report import default_report_url, forget_in_report
    from .store import check_output

    store = Location.of(store_url, storage_options)
    work = Location.of(work_url, store.storage_options) if work_url else store.sibling(".work")
    if check_output(store) is None:
        raise InputError(f"no mrict-dask store at {store.url}")
    given = pseudonym_key or os.environ.get("MRICT_PSEUDONYM_KEY")
    key = given.encode() if given else None
    if key is None and work.join("pseudonym.key").exists():
        key = work.join("pseudonym.key").read_bytes().strip()
    summary = ForgetSummary(store_url=store.url)
    with holding(store, lease_seconds, command="forget"):
        resolved = [resolve_patient(p, work, key) for p in patients]
        add_withdrawals(work, [{"patient": ps, "patient_id": pid} for ps, pid in resolved])
        summary.patients = sorted({ps for ps, _ in resolved})
        table = pair_table(store, ("pair", "patient"))
        hit = [(i, pid) for i, (pid, pat) in enumerate(zip(table["pair"], table["patient"]))
               if pat in summary.patients]
        for ps in summary.patients:
            if ps not in table["patient"]:
                summary.messages.append(f"{ps}: no pair in the store (put on the withdrawal list only)")
        for i, pid in hit:
            summary.objects_deleted += len(withdraw_pair(store, i, pid))
            summary.pairs.append(pid)
        version = finalize_store(store)
        summary.version = version["id"] if version else None
        summary.versions_redacted = redact_withdrawn(store, set(summary.pairs))
        report = Location.of(default_report_url(store.url), store.storage_options)
        forget_in_report(report, summary.patients, summary.pairs)
    return summary
