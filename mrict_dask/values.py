"""Catalog values as the planner reads them: Parquet/pandas missing markers, numbers, vectors, text."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def is_missing(v: Any) -> bool:
    """True for None and the missing-value markers pandas/Parquet give (NaN, pd.NA, NaT)."""
    if v is None:
        return True
    if isinstance(v, float):
        return v != v
    if isinstance(v, (str, bytes, int, list, tuple, np.ndarray)):
        return False
    try:
        import pandas as pd

        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def is_number(v: Any) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False

def text(v: Any) -> str:
    if is_missing(v):
        return ""
    return str(v).strip()


def number(v: Any) -> float | None:
    if v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x
