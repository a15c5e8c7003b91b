"""Versions of a store: one small JSON manifest per finalize that changed what the store holds.

A manifest ``<store>/_versions/<id>.json`` (ids 1, 2, ...; written once, with a conditional create, by the one
writer that holds the store's lease) lists every pair of the store at that moment: index, pair_id, patient
pseudonym, split, status, and for a pair with data the *digest* of its bytes (sha256 over the checksums its
completion marker recorded for each per-pair variable), plus what changed since the version before (pairs added,
pairs that replace a retired pair of the same patient, retired, withdrawn, completed, redone). Pair objects are
never rewritten once finished, so a version's pairs keep the bytes the version names: a training job that records
the version id can read exactly those pairs again (``SlicePairs(..., version=3)``; :func:`mrict_dask.store.
resolve_version` for any other reader), unless a patient has withdrawn since. Withdrawal redacts the withdrawn
pairs' entries in every manifest (no digest is left), and a version that held them cannot be served any more.

Everything here is PHI-free: pair ids, pseudonyms, splits, statuses, digests of bytes, counts and a UTC time.
This module knows JSON and storage only; :mod:`mrict_dask.store` builds the entries.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .io import Location

log = logging.getLogger(__name__)

VERSION_DIR = "_versions"
VERSION_FORMAT = 1


def pair_digest(marker: dict | None) -> str | None:
    """The digest of a pair's bytes from its completion marker (None when it holds no data)."""
    checksum = (marker or {}).get("checksum")
    if not checksum or (marker or {}).get("status") == "withdrawn":
        return None
    return hashlib.sha256(json.dumps(checksum, sort_keys=True).encode()).hexdigest()


def _name(version: int) -> str:
    return f"{int(version):08d}.json"


def version_ids(store: Location) -> list[int]:
    """Ids of the store's versions, oldest first."""
    return store.join(VERSION_DIR).numbered()


def read_version(store: Location, version: int) -> dict:
    """The manifest of ``version`` (FileNotFoundError when the store has no such version)."""
    loc = store.join(VERSION_DIR, _name(version))
    loc.fs.invalidate_cache(loc.path)
    return json.loads(loc.read_bytes())


def latest_version(store: Location) -> dict | None:
    ids = version_ids(store)
    return read_version(store, ids[-1]) if ids else None


def _key(entry: dict) -> tuple:
    return (entry["pair_id"], entry["status"], entry.get("digest"), entry.get("split"), entry.get("patient"))


def changes(old: Sequence[dict], new: Sequence[dict]) -> dict[str, list]:
    """What differs between two versions' pair lists (pair ids only).

    ``changed`` pairs an added pair with the pairs of the same patient retired in the same step (a series re-sent
    with other instances, or a better series selected): ``{"retired": [...], "by": [...]}``.
    """
    before = {e["index"]: e for e in old}
    out: dict[str, list] = {k: [] for k in ("added", "changed", "retired", "withdrawn", "completed", "redone")}
    retired_by_patient: dict[str, list[str]] = {}
    added_by_patient: dict[str, list[str]] = {}
    for e in new:
        b = before.get(e["index"])
        if b is None:
            if e["status"] not in ("retired", "withdrawn"):
                added_by_patient.setdefault(e["patient"], []).append(e["pair_id"])
            continue
        if e["status"] == "retired" and b["status"] != "retired":
            out["retired"].append(e["pair_id"])
            retired_by_patient.setdefault(e["patient"], []).append(e["pair_id"])
        elif e["status"] == "withdrawn" and b["status"] != "withdrawn":
            out["withdrawn"].append(e["pair_id"])
        elif b["status"] == "pending" and e["status"] != "pending":
            out["completed"].append(e["pair_id"])
        elif e.get("digest") and b.get("digest") and e["digest"] != b["digest"]:
            out["redone"].append(e["pair_id"])
    for patient, ids in added_by_patient.items():
        if patient in retired_by_patient:
            out["changed"].append({"retired": retired_by_patient[patient], "by": ids})
        else:
            out["added"].extend(ids)
    return out


def describe_changes(ch: dict[str, list]) -> str:
    """``+3 added, 1 changed, 1 retired`` (the counts that are not zero), or ``no change``."""
    parts = []
    for k in ("added", "changed", "retired", "withdrawn", "completed", "redone"):
        n = sum(len(c["by"]) for c in ch.get(k, [])) if k == "changed" else len(ch.get(k, []))
        if n:
            parts.append(f"{n} {k}")
    return ", ".join(parts) or "no change"


def record_version(store: Location, entries: list[dict], content_digest: str, fingerprint: str) -> dict | None:
    """Write a new version with ``entries`` (one per pair, by index) when they differ from the latest version's;
    returns its manifest, or None when nothing changed (finalizing again is idempotent)."""
    ids = version_ids(store)
    last = read_version(store, ids[-1]) if ids else None
    if last is not None and [_key(e) for e in last["pairs"]] == [_key(e) for e in entries]:
        return None
    version = (ids[-1] if ids else 0) + 1
    statuses = Counter("failed" if e["status"].startswith("failed") else e["status"] for e in entries)
    manifest = {
        "format": VERSION_FORMAT,
        "id": version,
        "time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "parent": last["id"] if last else None,
        "fingerprint": fingerprint,
        "content_digest": content_digest,
        "n_pairs": len(entries),
        "counts": dict(sorted(statuses.items())),
        "changes": changes(last["pairs"] if last else [], entries),
        "pairs": entries,
    }
    loc = store.join(VERSION_DIR, _name(version))
    loc.write_bytes(json.dumps(manifest, separators=(",", ":")).encode(), durable=True)
    log.info("store version %d: %s", version, describe_changes(manifest["changes"]))
    return manifest


def redact_withdrawn(store: Location, pair_ids: set[str]) -> int:
    """Remove every trace of the data of withdrawn pairs from the manifests of the versions that held them: their
    entries keep index, id and patient, lose their digest and are marked ``withdrawn`` (such a version can no
    longer be served, and says why). Returns the number of manifests rewritten."""
    n = 0
    for version in version_ids(store):
        manifest = read_version(store, version)
        touched = False
        for e in manifest["pairs"]:
            if e["pair_id"] in pair_ids and e["status"] != "withdrawn" and not e.get("withdrawn"):
                e["digest"] = None
                e["withdrawn"] = True
                touched = True
        if touched:
            store.join(VERSION_DIR, _name(version)).write_bytes(
                json.dumps(manifest, separators=(",", ":")).encode(), durable=True)
            n += 1
    return n


def describe_versions(store: Location, last: int = 10) -> list[str]:
    """Lines for ``inspect``: the number of versions and the latest ``last`` of them, newest last."""
    ids = version_ids(store)
    if not ids:
        return ["versions: none recorded (a store finalized before versions were kept)"]
    lines = [f"versions: {len(ids)} (pin one: SlicePairs(url, version=N); mrict_dask.store.resolve_version)"]
    if len(ids) > last:
        lines.append(f"  ... {len(ids) - last} older")
    for version in ids[-last:]:
        m = read_version(store, version)
        counts = ", ".join(f"{v} {k}" for k, v in m.get("counts", {}).items())
        unservable = sum(1 for e in m["pairs"] if e.get("withdrawn"))
        note = f"; held {unservable} withdrawn pair(s): cannot be served" if unservable else ""
        lines.append(f"  {m['id']:>4}  {m['time']}  {m['n_pairs']} pairs ({counts}); "
                     f"{describe_changes(m.get('changes', {}))}{note}")
    return lines


def summary_of(manifest: dict[str, Any]) -> str:
    """One line naming a version: id, time and what changed."""
    return f"version {manifest['id']} ({manifest['time']}): {describe_changes(manifest.get('changes', {}))}"
