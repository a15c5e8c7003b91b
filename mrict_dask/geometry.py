"""Patient geometry of a stack of parallel slices: LPS axes, slice order, spacing, gaps and gantry tilt.

Conventions (the same as SimpleITK's ImageSeriesReader and dcm2niix): x runs along the first
ImageOrientationPatient vector (row direction), y along the second (column direction), z along their cross
product; slices are sorted by their position along that normal (never by InstanceNumber or file name), so
the direction matrix is right-handed and the origin is the ImagePositionPatient of the most "negative" slice.
Used both from headers alone (:mod:`mrict_dask.stacks`) and from the pixel files (:mod:`mrict_dask.volume`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# ------------------------------------------------------------------------------------------- tolerances
ORIENTATION_TOL = 1e-4
"""Largest difference between direction cosines (ImageOrientationPatient components) of slices that still
belong to one stack; also how far from unit length/orthogonal the two vectors may be."""

DUPLICATE_POSITION_TOL_MM = 0.01
"""Two slices closer than this along the normal are at the same position (duplicates, repeats or echoes)."""

COLLINEAR_TOL_PX = 0.1
"""Largest in-plane deviation (in pixels) of any slice origin from the straight line fitted through all slice
origins; beyond it the positions do not describe one regular stack and the stack is refused."""

TILT_DRIFT_TOL_PX = 0.1
"""In-plane drift of slice origins across the whole stack (in pixels) above which the stack is sheared (gantry
tilt) and is resampled onto an orthogonal grid. Below it the drift is rounding noise and ignored; the tilt is
measured from the positions, never from GantryDetectorTilt (a nominal value, vendor-specific sign)."""


@dataclass(frozen=True)
class Geometry:
    """Where a stack's voxels are, as SimpleITK reports an image: LPS mm, direction row-major (columns = axes)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    tilt_deg: float = 0.0  # angle between the slice stacking direction and the slice normal (gantry tilt)
    shear: tuple[float, float] = (0.0, 0.0)  # in-plane drift (mm per mm along the normal) along x and y

    def to_dict(self) -> dict[str, Any]:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction), "tilt_deg": self.tilt_deg}

    @property
    def normal(self) -> np.ndarray:
        return np.asarray(self.direction, float).reshape(3, 3)[:, 2]


class Refusal(Exception):
    """A geometry problem; the caller turns it into ``Stack.refused`` or a VolumeError naming the series."""


def unit_axes(iop: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    v = np.asarray(iop, dtype=float).reshape(-1)
    if v.size != 6 or not np.all(np.isfinite(v)):
        raise Refusal("missing or malformed ImageOrientationPatient")
    (r0, r1, r2), (c0, c1, c2) = v[:3].tolist(), v[3:].tolist()  # plain floats: called once per stack
    nr, nc = math.sqrt(r0 * r0 + r1 * r1 + r2 * r2), math.sqrt(c0 * c0 + c1 * c1 + c2 * c2)
    # vendors write 5-6 significant digits; 1e-3 off unit length is still clearly a direction cosine
    if abs(nr - 1) > 1e-3 or abs(nc - 1) > 1e-3 or abs(r0 * c0 + r1 * c1 + r2 * c2) > 1e-3:
        raise Refusal("ImageOrientationPatient is not two orthogonal unit vectors")
    r0, r1, r2 = r0 / nr, r1 / nr, r2 / nr
    d = c0 * r0 + c1 * r1 + c2 * r2  # remove the rounding residue so the direction matrix is orthonormal
    c0, c1, c2 = c0 - d * r0, c1 - d * r1, c2 - d * r2
    nc = math.sqrt(c0 * c0 + c1 * c1 + c2 * c2)
    c0, c1, c2 = c0 / nc, c1 / nc, c2 / nc
    return (np.array([r0, r1, r2]), np.array([c0, c1, c2]),
            np.array([r1 * c2 - r2 * c1, r2 * c0 - r0 * c2, r0 * c1 - r1 * c0]))


def stack_geometry(positions: np.ndarray, iop: Sequence[float], pixel_spacing: Sequence[float],
                   rows: int, columns: int, gap_tolerance: float = 0.2,
                   allow_tilt: bool = True) -> tuple[Geometry, np.ndarray]:
    """Geometry of a stack of parallel slices and the permutation putting them in spatial order.

    ``positions``: (n, 3) ImagePositionPatient per slice (any order). Raises :class:`Refusal` for a single slice,
    repeated positions, slices not on a line, missing slices or uneven spacing (a step differing from the median
    step by more than ``gap_tolerance`` of it), and for gantry tilt when ``allow_tilt`` is false.
    For a tilted stack the returned geometry is the orthogonal grid it will be resampled onto.
    """
    pos = np.asarray(positions, dtype=float).reshape(-1, 3)
    if not np.all(np.isfinite(pos)):
        raise Refusal("missing ImagePositionPatient")
    ps = np.asarray(pixel_spacing, dtype=float).reshape(-1)
    if ps.size != 2 or not np.all(ps > 0):
        raise Refusal("missing or invalid PixelSpacing")
    dy, dx = float(ps[0]), float(ps[1])  # PixelSpacing = (between rows, between columns)
    r, c, n = unit_axes(iop)
    if len(pos) < 2:
        raise Refusal("single slice (not a volume)")
    t = pos @ n
    order = np.argsort(t, kind="stable")
    t, pos = t[order], pos[order]
    steps = np.diff(t)
    if np.any(steps < DUPLICATE_POSITION_TOL_MM):
        k = int(np.sum(steps < DUPLICATE_POSITION_TOL_MM))
        raise Refusal(f"duplicate slice positions ({k} slice(s) at an already occupied position)")
    med = float(np.median(steps))
    dev = np.abs(steps - med) > gap_tolerance * med
    if np.any(dev):
        big = steps[steps > (1 + gap_tolerance) * med]
        if big.size and np.all(np.abs(steps[dev] / med - np.round(steps[dev] / med)) <= gap_tolerance) and \
                np.all(steps[dev] > med):
            missing = int(np.sum(np.round(big / med) - 1))
            raise Refusal(f"missing slice(s): about {missing} missing, gap of {big.max():.2f} mm where slices "
                           f"are {med:.2f} mm apart")
        raise Refusal(f"uneven slice spacing: steps from {steps.min():.2f} to {steps.max():.2f} mm (median "
                       f"{med:.2f} mm, tolerance {gap_tolerance:.0%})")
    # in-plane coordinates of each slice origin; a regular stack has them on a straight line in t
    u, v = pos @ r, pos @ c
    tc = t - t[0]
    u0, a = _line_fit(tc, u)
    v0, b = _line_fit(tc, v)
    dev_u = np.abs(u - (u0 + a * tc)).max() / dx
    dev_v = np.abs(v - (v0 + b * tc)).max() / dy
    if max(dev_u, dev_v) > COLLINEAR_TOL_PX:
        raise Refusal(f"slice positions do not lie on one line (off by up to {max(dev_u, dev_v):.2f} pixels)")
    extent = float(t[-1] - t[0])
    dz = extent / (len(t) - 1)
    drift_x, drift_y = a * extent / dx, b * extent / dy
    tilt_deg = math.degrees(math.atan(math.hypot(a, b)))
    direction = tuple(float(x) for x in np.stack([r, c, n], axis=1).reshape(-1))
    if max(abs(drift_x), abs(drift_y)) <= TILT_DRIFT_TOL_PX:
        geom = Geometry(size=(int(columns), int(rows), len(t)), spacing=(dx, dy, dz),
                        origin=tuple(float(x) for x in pos[0]), direction=direction)
        return geom, order
    if not allow_tilt:
        raise Refusal(f"gantry tilt of {tilt_deg:.1f} degrees (resampling disabled by configuration)")
    # orthogonal grid that contains every sheared slice; slice 0 keeps its own pixel lattice
    mx = int(math.ceil(abs(drift_x) - 1e-6))
    my = int(math.ceil(abs(drift_y) - 1e-6))
    ox = -mx if drift_x < 0 else 0
    oy = -my if drift_y < 0 else 0
    origin = pos[0] + ox * dx * r + oy * dy * c
    geom = Geometry(size=(int(columns) + mx, int(rows) + my, len(t)), spacing=(dx, dy, dz),
                    origin=tuple(float(x) for x in origin), direction=direction, tilt_deg=tilt_deg,
                    shear=(float(a), float(b)))
    return geom, order


def _line_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y on x (x not all equal)."""
    mx, my = float(x.mean()), float(y.mean())
    dx = x - mx
    slope = float(dx @ (y - my)) / float(dx @ dx)
    return my - slope * mx, slope


def unique_positions(t: np.ndarray) -> np.ndarray:
    s = np.sort(np.asarray(t, float))
    if s.size == 0:
        return s
    keep = np.concatenate([[True], np.diff(s) >= DUPLICATE_POSITION_TOL_MM])
    return s[keep]


def has_repeats(t: np.ndarray) -> bool:
    return len(unique_positions(t)) < len(t)

def set_of_orientations(iops: Iterable[np.ndarray]) -> list[np.ndarray]:
    reps: list[np.ndarray] = []
    for v in iops:
        if not any(np.max(np.abs(v - r)) <= ORIENTATION_TOL for r in reps):
            reps.append(v)
    return reps
