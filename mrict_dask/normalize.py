"""Intensity normalization and slice selection on the template grid (pure numpy).

MR: clipped at percentiles computed inside the head (never over the empty background) and scaled to [0, 1].
CT: by default a fixed HU window (HU stay comparable across patients); percentiles are an option.
The clip bounds are returned so that a user can map CT back to HU: ``hu = ct * (hi - lo) + lo``.
"""

from __future__ import annotations

import numpy as np

from .config import NormalizeConfig
from .errors import VolumeError


def check_volume(arr: np.ndarray, name: str, mask: np.ndarray | None = None) -> None:
    """Refuse an empty, non-finite or constant volume (inside ``mask`` when given), naming the series."""
    values = arr if mask is None else arr[mask]
    if values.size == 0:
        where = " inside its head/valid region" if mask is not None else ""
        raise VolumeError(f"{name}: empty volume (no voxels{where})")
    finite = np.isfinite(values)
    if not finite.all():
        raise VolumeError(f"{name}: {int((~finite).sum())} non-finite voxel value(s)")
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        raise VolumeError(f"{name}: constant volume (every voxel {lo:g})")


def scale(arr: np.ndarray, lo: float, hi: float, out: np.ndarray | None = None) -> np.ndarray:
    """``arr`` clipped to [lo, hi] and mapped to [0, 1], float32 (into ``out`` when given: ``arr`` itself may be it).

    float64 arithmetic, then one rounding to float32 (ct_to_hu inverts it to float32 precision); slab by slab
    along the first axis, so the float64 work stays in cache instead of four volume-sized temporaries."""
    a = np.asarray(arr)
    if out is None:
        out = np.empty(a.shape, np.float32)
    elif out.dtype != np.float32 or out.shape != a.shape:
        raise ValueError(f"scale: out must be float32 of shape {a.shape}, got {out.dtype} {out.shape}")
    if a.ndim < 2:
        out[...] = (np.clip(a.astype(np.float64), lo, hi) - lo) / (hi - lo)
        return out
    buf = np.empty(a.shape[1:], np.float64)
    width = hi - lo
    for k in range(a.shape[0]):
        buf[...] = a[k]  # to float64 first: clip's bounds are then never rounded to the input's float32
        np.clip(buf, lo, hi, out=buf)
        buf -= lo
        buf /= width
        out[k] = buf
    return out


def _percentiles(arr: np.ndarray, mask: np.ndarray | None, percentiles: tuple[float, float],
                 name: str) -> tuple[float, float]:
    values = arr[mask] if mask is not None else arr.ravel()
    if values.size == 0:
        raise VolumeError(f"{name}: empty volume (no voxels inside its head/valid region)")
    if not np.isfinite(values).all():
        raise VolumeError(f"{name}: non-finite voxel values")
    lo, hi = (float(v) for v in np.percentile(values, [percentiles[0], percentiles[1]]))
    if not hi > lo:
        raise VolumeError(
            f"{name}: constant intensity inside the head ({percentiles[0]:g}th and {percentiles[1]:g}th "
            f"percentiles both {lo:g})"
        )
    return lo, hi


def normalize_mr(arr: np.ndarray, mask: np.ndarray | None, percentiles: tuple[float, float] = (1.0, 99.0),
                 *, name: str = "MR series", out: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
    """Clip at the ``percentiles`` of the voxels inside ``mask`` and scale to [0, 1] -> (scaled, lo, hi)."""
    lo, hi = _percentiles(arr, mask, percentiles, name)
    return scale(arr, lo, hi, out), lo, hi


def normalize_ct(arr_hu: np.ndarray, mask: np.ndarray | None, cfg: NormalizeConfig = NormalizeConfig(),
                 *, name: str = "CT series", out: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
    """HU -> [0, 1] through the fixed window ``cfg.ct_window`` (default) or percentiles inside ``mask``."""
    if cfg.ct_mode == "window":
        lo, hi = (float(v) for v in cfg.ct_window)
        if not hi > lo:
            raise VolumeError(f"CT window must have hi > lo, got {cfg.ct_window}")
        check_volume(arr_hu, name, mask)
    elif cfg.ct_mode == "percentile":
        lo, hi = _percentiles(arr_hu, mask, cfg.ct_percentiles, name)
    else:
        raise VolumeError(f"unknown normalize.ct_mode {cfg.ct_mode!r} (use 'window' or 'percentile')")
    return scale(arr_hu, lo, hi, out), lo, hi


def ct_to_hu(ct_scaled: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Inverse of :func:`normalize_ct` inside the clip window: ``hu = ct * (hi - lo) + lo`` (float32)."""
    return (np.asarray(ct_scaled, dtype=np.float64) * (float(hi) - float(lo)) + float(lo)).astype(np.float32)


def slice_ok(brain_mask_zyx: np.ndarray, valid_zyx: np.ndarray, cfg: NormalizeConfig = NormalizeConfig()) -> np.ndarray:
    """Per axial slice: enough template brain (share of the slice) and that brain covered by valid data."""
    brain = brain_mask_zyx.astype(bool, copy=False)
    n_slice = brain.shape[1] * brain.shape[2]
    n_brain = brain.sum(axis=(1, 2))
    n_both = (brain & valid_zyx.astype(bool, copy=False)).sum(axis=(1, 2))
    enough_brain = n_brain >= cfg.min_brain_fraction * n_slice
    covered = n_both >= cfg.min_valid_fraction * np.maximum(n_brain, 1)
    return enough_brain & covered & (n_brain > 0)


def head_slice_ok(head_zyx: np.ndarray, valid_zyx: np.ndarray, cfg: NormalizeConfig = NormalizeConfig()) -> np.ndarray:
    """Native space, per axial slice: the head with data on both sides covers enough of the slice."""
    both = (head_zyx.astype(bool, copy=False) & valid_zyx.astype(bool, copy=False)).sum(axis=(1, 2))
    return both >= max(1, cfg.min_brain_fraction * head_zyx.shape[1] * head_zyx.shape[2])
