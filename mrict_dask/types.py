"""Plain records passed between stages. Keys are immutable and hashable; nothing here imports Dask."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

Instance = Any
"""What a source's ``fetch`` gives for one URL: the bytes of a DICOM file, a data set already parsed from them
(pydicom ``Dataset``), or the exception that stopped it (transient ones are retried by the caller)."""


@dataclass(frozen=True)
class PairSpec:
    """One MR/CT pair to process. Lives in the private plan (it names source files and UIDs).

    Its ``repr`` shows only PHI-free fields: a Dask worker logs a failed task's arguments.
    """

    index: int  # position along the store's `pair` dimension
    pair_id: str  # stable, PHI-free key: pseudonym + short keyed hash of the two series
    patient: str  # keyed pseudonym, "P" + 16 hex
    split: str  # train / val / test
    days_apart: int  # CT study date minus MR study date
    mr_files: tuple[str, ...] = field(repr=False)  # URLs of the chosen MR stack's files
    ct_files: tuple[str, ...] = field(repr=False)  # URLs of the chosen CT stack's files
    mr_series_uid: str = field(default="", repr=False)  # private: for the plan and export only
    ct_series_uid: str = field(default="", repr=False)
    inputs: str = ""  # keyed digest of the input instances (PHI-free): changes when a series is re-sent


@dataclass
class PairResult:
    """What processing one pair produced: arrays on the template grid (z, y, x) plus scalars.

    A failed pair has ``status = "failed: <reason>"`` and ``None`` arrays.
    """

    pair_id: str
    status: str
    mr: np.ndarray | None = None  # float32 in [0, 1]
    ct: np.ndarray | None = None  # float32 in [0, 1]
    valid: np.ndarray | None = None  # bool
    slice_ok: np.ndarray | None = None  # bool, (z,)
    head: np.ndarray | None = None  # bool: the head (face region excluded)
    face: np.ndarray | None = None  # bool: the face region, emptied by defacing
    # native space: mr, ct (as in the template space), valid, head, face (z, y, x), slice_ok (z,), affine (4, 4)
    native: dict[str, np.ndarray] | None = None
    mr_lo: float = float("nan")
    mr_hi: float = float("nan")
    ct_lo: float = float("nan")
    ct_hi: float = float("nan")
    mr_affine: np.ndarray = field(default_factory=lambda: np.full((4, 4), np.nan))
    ct_affine: np.ndarray = field(default_factory=lambda: np.full((4, 4), np.nan))
    qa: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what a reviewer should know (PHI-free)
    figure_png: bytes | None = None  # three-plane edge overlay, PHI-free
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# QA metrics every PairResult.qa carries (float; NaN when not computed). The store has one (pair,) variable each.
QA_KEYS: tuple[str, ...] = (
    "mr_metric",  # final Mattes MI of MR -> template (SimpleITK's sign: more negative is better)
    "ct_metric",  # final Mattes MI of CT -> MR
    "brain_dice",  # Dice of the template brain mask vs the brain found in the registered MR
    "mr_det",  # determinant of the MR affine's linear part (scale change)
    "valid_fraction",  # share of template-brain voxels where both MR and CT have data
    "mr_corr",  # correlation of the T1 template and the MR over the template brain
    "mr_gain",  # how much better (relative MI) the best transform a few mm/degrees away fits the MR
    "ct_gain",  # the same for CT -> MR
    "skin_mm",  # spread (median absolute deviation) of the MR-to-CT skin distance, mm
    "head_overlap",  # Dice of the MR and CT heads over the slab both cover
    "face_ml",  # head tissue in the face region (mL, native space): what defacing removed
    "mr_face_ml",  # the MR's own head tissue in the face region (mL; near 0 for an MR defaced at the source)
    "native_cut_ml",  # the MR's head outside the native box (mL)
)
