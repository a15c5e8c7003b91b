"""Per-pair quality checks: brain overlap after registration and a PHI-free edge-overlay figure.

Similarity values cannot tell a good registration from a bad one (Rohlfing 2012); the brain overlap can
catch gross failures (template brain landed on scalp, skull or noise), and the figure lets a person look.
"""

from __future__ import annotations

import io

import numpy as np
from scipy import ndimage as ndi

from .types import QA_KEYS


def empty_qa() -> dict[str, float]:
    return {k: float("nan") for k in QA_KEYS}


def _otsu3_lower(values: np.ndarray, bins: int = 128) -> float:
    """Lower threshold of a three-class Otsu (dark | grey | bright), exhaustive over bin pairs."""
    hist, edges = np.histogram(values, bins=bins)
    c = (edges[:-1] + edges[1:]) / 2
    p = hist / max(hist.sum(), 1)
    cp, cm = np.cumsum(p), np.cumsum(p * c)
    i, j = np.triu_indices(bins - 1, k=1)  # class 0 = bins [0..i], class 1 = (i..j], class 2 = (j..]
    w0, w1, w2 = cp[i], cp[j] - cp[i], 1 - cp[j]
    m0, m1, m2 = cm[i], cm[j] - cm[i], cm[-1] - cm[j]
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where((w0 > 0) & (w1 > 0) & (w2 > 0), m0**2 / w0 + m1**2 / w1 + m2**2 / w2, -np.inf)
    return float(c[i[int(np.argmax(score))]])


def brain_dice(mr_zyx: np.ndarray, brain_zyx: np.ndarray, spacing_mm: float) -> float:
    """Dice of the template brain vs the brain found in the MR resampled onto the same grid.

    The MR's brain: voxels brighter than CSF/skull (three-class Otsu near the brain), eroded by one voxel
    to cut them from the scalp across the skull, the component that meets the template brain's core,
    grown back and filled. A registration that lands the template brain on scalp, skull or noise scores
    low (on synthetic data: ~0.97 when right, ~0.87 at 10 mm off, ~0.25 on noise).
    """
    brain = brain_zyx.astype(bool)
    if not brain.any():
        return 0.0
    near = ndi.binary_dilation(brain, iterations=max(1, int(round(10.0 / spacing_mm))))
    vals = mr_zyx[near]
    vals = vals[np.isfinite(vals)]
    if vals.size == 0 or not vals.max() > vals.min():
        return 0.0
    tissue = mr_zyx > _otsu3_lower(vals)
    lab, n = ndi.label(ndi.binary_erosion(tissue))
    if n == 0:
        return 0.0
    hits = np.bincount(lab[ndi.binary_erosion(brain, iterations=3)], minlength=n + 1)
    hits[0] = 0
    if hits.max() == 0:
        return 0.0
    found = ndi.binary_fill_holes(ndi.binary_dilation(lab == int(np.argmax(hits))) & tissue)
    return float(2 * (found & brain).sum() / (found.sum() + brain.sum()))


def _edges(hu: np.ndarray) -> np.ndarray:
    """CT edges worth seeing on an MR: skin/air and bone boundaries (> ~150 HU per voxel)."""
    s = ndi.gaussian_filter(hu.astype(np.float32), 0.7)
    mag = np.hypot(ndi.sobel(s, 0), ndi.sobel(s, 1)) / 8.0
    return mag > 150.0


def overlay_png(mr_zyx: np.ndarray, ct_hu_zyx: np.ndarray, center_zyx: tuple[int, int, int] | None = None,
                spacing_xyz: tuple[float, ...] = (1.0, 1.0, 1.0),
                direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)) -> bytes:
    """Three planes through ``center_zyx`` (default: the grid centre): the MR in grey, CT edges in colour.

    Shown as radiologists look at them (anterior and superior up, the patient's left on the image right),
    for an axis-aligned grid of any axis signs. No text but the plane names.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    z, y, x = center_zyx if center_zyx is not None else tuple(n // 2 for n in mr_zyx.shape)
    sx, sy, sz = spacing_xyz[:3]
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    # LPS: +x left, +y posterior, +z superior. Rows: anterior/superior first; columns: right to left,
    # except sagittal columns: anterior to posterior
    flip_x, flip_y, flip_z = d[0, 0] < 0, d[1, 1] < 0, d[2, 2] > 0

    def orient(a: np.ndarray, flip_rows: bool, flip_cols: bool) -> np.ndarray:
        a = a[::-1] if flip_rows else a
        return a[:, ::-1] if flip_cols else a

    planes = [
        ("axial", lambda v: orient(v[z], flip_y, flip_x), sy / sx),
        ("coronal", lambda v: orient(v[:, y], flip_z, flip_x), sz / sx),
        ("sagittal", lambda v: orient(v[:, :, x], flip_z, flip_y), sz / sy),
    ]
    fig = Figure(figsize=(9.0, 3.4), dpi=80, facecolor="black")
    for k, (name, cut, aspect) in enumerate(planes):
        mr2, ct2 = cut(mr_zyx), cut(ct_hu_zyx)
        ax = fig.add_subplot(1, 3, k + 1)
        ax.imshow(mr2, cmap="gray", vmin=0.0, vmax=1.0, aspect=aspect, interpolation="nearest")
        edges = np.ma.masked_where(~_edges(ct2), np.ones_like(ct2))
        ax.imshow(edges, cmap="autumn", vmin=0, vmax=1, aspect=aspect, alpha=0.9, interpolation="nearest")
        ax.set_title(name, color="white", fontsize=9)
        ax.set_axis_off()
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.03)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="black", metadata={"Software": None})
    return buf.getvalue()
