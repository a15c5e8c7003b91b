"""Keyed pseudonyms (store contract): "P" + HMAC-SHA256(key, PatientID).hexdigest()[:16]."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .io import Location

ENV_KEY = "MRICT_PSEUDONYM_KEY"


def pseudonym(key: bytes, patient_id: str) -> str:
    return "P" + hmac.new(key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def keyed_fraction(key: bytes, text: str) -> float:
    """A stable number in [0, 1) derived from ``text`` under ``key`` (used for the patient-level split)."""
    digest = hmac.new(key, b"split:" + text.encode("utf-8"), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def short_hash(key: bytes, *parts: str, n: int = 8) -> str:
    return hmac.new(key, "\x1f".join(parts).encode("utf-8"), hashlib.sha256).hexdigest()[:n]


def resolve_key(given: str | None, work_url: str | Location | None,
                storage_options: dict | None = None) -> tuple[bytes, str]:
    """Return (key, source). Order: explicit option, environment, key kept in the work area, new random key.

    A new random key is written to the work area so that a resume produces the same pseudonyms.
    """
    if given:
        return given.encode("utf-8"), "option"
    env = os.environ.get(ENV_KEY)
    if env:
        return env.encode("utf-8"), "environment"
    if work_url is None:
        return secrets.token_hex(32).encode("ascii"), "random (not kept)"
    from .io import Location

    where = Location.of(work_url, storage_options).join("pseudonym.key")
    if where.exists():
        return where.read_bytes().strip(), "work area"
    key = secrets.token_hex(32).encode("ascii")
    where.write_bytes(key)
    return key, "random (kept in the work area)"
