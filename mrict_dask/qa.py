"""Per-pair quality checks (the registration gate's measures) and a PHI-free edge-overlay figure.

Similarity values cannot measure accuracy (Rohlfing 2012), so the gate asks narrower questions, each with a
physical reading, and is validated both ways on labelled registrations (right, and deliberately wrong by
10-40 mm, 15-30 degrees, a left-right flip, 15 % scale, another patient's CT: benchmarks/bench_register.py):

- ``brain_dice``: does the template brain cover the MR's brain (found without the template's shape)?
- ``mr_corr``: does it land on a brain at all (T1 template against T1 MR correlate there, not on face or neck)?
- ``mr_gain`` / ``ct_gain``: is the result a local optimum, or would a few mm or degrees away fit better (a
  registration that is off by more than its capture range's worth is not a local optimum of its own metric)?
- ``skin_mm``: do the MR's and the CT's skin surfaces meet (median distance over the skin both show)?
"""

from __future__ import annotations

import io

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from . import register as R
from .types import QA_KEYS


def empty_qa() -> dict[str, float]:
    return {k: float("nan") for k in QA_KEYS}


def mask_centre(mask: np.ndarray) -> tuple[int, ...] | None:
    """The (truncated) mean index of a mask's voxels, from its per-axis profiles (no index array); None if empty."""
    m = np.asarray(mask, bool)
    total = int(np.count_nonzero(m))
    if not total:
        return None
    out = []
    for axis in range(m.ndim):
        profile = m.sum(axis=tuple(a for a in range(m.ndim) if a != axis), dtype=np.int64)
        out.append(int(np.dot(profile, np.arange(m.shape[axis], dtype=np.int64)) / total))
    return tuple(out)


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


BRAIN_REACH_MM = 10.0  # brain_dice looks for the MR's brain this far beyond the template brain


def brain_dice(mr_zyx: np.ndarray, brain_zyx: np.ndarray, spacing_mm: float, fov: np.ndarray | None = None) -> float:
    """Dice of the template brain vs the brain found in the MR resampled onto the same grid.

    The MR's brain: voxels brighter than CSF/skull (three-class Otsu near the brain), eroded by one voxel
    to cut them from the scalp across the skull, the component that meets the template brain's core,
    grown back and filled, within ``BRAIN_REACH_MM`` of the template brain: in a real head the tissue
    runs on through the skull base into the face and neck, and a right registration must not score low
    for it. A registration that lands the template brain on scalp, skull or noise scores low. ``fov``: where
    the MR has data; both brains are compared there only (a slab cut above the orbits lacks the cerebellum).
    """
    brain = brain_zyx.astype(bool) if fov is None else brain_zyx.astype(bool) & fov
    if not brain.any():
        return 0.0
    near = ndi.binary_dilation(brain, iterations=max(1, int(round(BRAIN_REACH_MM / spacing_mm))))
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
    found = R.fill_holes(ndi.binary_dilation(lab == int(np.argmax(hits))) & tissue) & near
    if fov is not None:
        found &= fov
    return float(2 * (found & brain).sum() / (found.sum() + brain.sum()))


# ----------------------------------------------------------------------------------------------- the gate
GATE_SIGMA_MM = 2.0  # smoothing of both images for mr_corr and the fine local-optimum check
GATE_POINTS = 20000
GATE_BINS = 32
# Perturbations of the local-optimum check: (shift mm, rotation degrees, scale, smoothing mm). The fine step
# judges errors of a few mm; the coarse one errors of 10 mm and more, where a fine step is still in the flat
PERTURBATIONS = ((4.0, 6.0, 0.06, GATE_SIGMA_MM), (10.0, 12.0, 0.12, 5.0))


def _sample_points(mask: sitk.Image, n: int, seed: int = 0) -> np.ndarray:
    pts = R._mask_points(mask)
    if len(pts) > n:
        pts = pts[np.random.default_rng(seed).choice(len(pts), size=n, replace=False)]
    return pts


def perturbations(shift_mm: float, angle_deg: float, scale: float, center: np.ndarray) -> list[np.ndarray]:
    """4x4 matrices about ``center``: +-shift along each axis, +-angle about each, and (scale > 0) +-scale."""
    out = []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            t = np.zeros(3)
            t[axis] = sign * shift_mm
            out.append(R.similarity_matrix((0.0, 0.0, 0.0), 1.0, t, center))
            a = np.zeros(3)
            a[axis] = sign * np.radians(angle_deg)
            out.append(R.similarity_matrix(a, 1.0, (0.0, 0.0, 0.0), center))
    if scale:
        out += [R.similarity_matrix((0.0, 0.0, 0.0), 1.0 + s, (0.0, 0.0, 0.0), center) for s in (-scale, scale)]
    return out


def local_gain(fixed: sitk.Image, fixed_mask: sitk.Image, moving: sitk.Image, matrix: np.ndarray, *,
               moving_range: tuple[float, float], with_scale: bool) -> float:
    """How much better the best nearby transform fits than ``matrix`` (fixed -> moving), relative to it.

    Mutual information over the fixed mask, for ``matrix`` composed with each of :data:`PERTURBATIONS`
    (applied in the fixed image's space, about the mask's centre). ~0 or below: a local optimum.
    """
    pts = _sample_points(fixed_mask, GATE_POINTS)
    center = pts.mean(0)
    lo, hi = moving_range
    gain = -np.inf
    for shift, angle, scale, sigma in PERTURBATIONS:
        f = R._Smoothed(fixed, sigma)(pts)
        fb = R._bins(f, float(f.min()), float(f.max()), GATE_BINS)
        mv = R._Smoothed(moving, sigma)
        base, *near = (R.mutual_information(fb, mv(pts @ m[:3, :3].T + m[:3, 3]), lo, hi, GATE_BINS)
                       for m in [matrix] + [matrix @ d for d in
                                            perturbations(shift, angle, scale if with_scale else 0.0, center)])
        best = max(near)
        gain = max(gain, (best - base) / max(base, 1e-6))
    return float(gain)


def template_correlation(template: sitk.Image, brain: sitk.Image, mr: sitk.Image, matrix: np.ndarray) -> float:
    """Pearson correlation of the (T1) template and the MR over the template brain the MR shows (its field of
    view), both lightly smoothed."""
    pts = _sample_points(brain, GATE_POINTS)
    moved = pts @ matrix[:3, :3].T + matrix[:3, 3]
    seen = _inside(mr, moved)
    pts, moved = pts[seen], moved[seen]
    if len(pts) < 100:
        return 0.0
    a = R._Smoothed(template, GATE_SIGMA_MM)(pts)
    b = R._Smoothed(mr, GATE_SIGMA_MM)(moved)
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def skin_distance_mm(mr_head: sitk.Image, ct_head: sitk.Image, mr_to_ct: np.ndarray, margin_mm: float = 6.0) -> float:
    """Median distance (mm) from the MR's skin surface to the CT's, over the skin both fields of view show.

    The CT head's signed distance map is read at the MR's skin points mapped into the CT (both surfaces are
    voxel centres on their masks' boundaries, so two coinciding heads meet at ~0 whatever the grid). Skin
    within ``margin_mm`` of either image's field-of-view edge is left out (a field of view's cut is not
    skin). Inf when they share no skin.
    """
    a = sitk.GetArrayFromImage(mr_head) > 0
    keep = max(1, int(round(margin_mm / mr_head.GetSpacing()[0])))
    inner = np.zeros(a.shape, bool)
    inner[keep:-keep, keep:-keep, keep:-keep] = True
    skin = a & ~ndi.binary_erosion(a) & inner
    if not skin.any():
        return float("inf")
    d = np.array(mr_head.GetDirection()).reshape(3, 3) * np.array(mr_head.GetSpacing())
    pts = np.array(mr_head.GetOrigin()) + np.argwhere(skin)[:, ::-1].astype(np.float64) @ d.T
    pts = pts @ mr_to_ct[:3, :3].T + mr_to_ct[:3, 3]
    sdm = sitk.SignedMaurerDistanceMap(ct_head, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    ct_inner = np.zeros(sitk.GetArrayViewFromImage(ct_head).shape, np.float32)
    keep_ct = max(1, int(round(margin_mm / ct_head.GetSpacing()[0])))
    ct_inner[keep_ct:-keep_ct, keep_ct:-keep_ct, keep_ct:-keep_ct] = 1.0
    inside = R._Smoothed(_like(ct_inner, ct_head), 0.0)(pts) > 0.5
    if not inside.any():
        return float("inf")
    dist = R._Smoothed(sdm, 0.0, outside=np.inf)(pts[inside])
    # the two masks may sit a constant way apart (each modality's skin threshold): the spread about the
    # median, not the distance itself, tells a misaligned head (one side out, the other in)
    return float(np.median(np.abs(dist - np.median(dist))))


def _inside(img: sitk.Image, points: np.ndarray, margin: float = 0.5) -> np.ndarray:
    """Which physical points fall inside ``img``'s grid (voxel centres +- ``margin`` voxels)."""
    inv = np.linalg.inv(np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing()))
    ijk = (points - np.array(img.GetOrigin())) @ inv.T
    return ((ijk >= -margin) & (ijk <= np.array(img.GetSize()) - 1 + margin)).all(1)


def _like(arr: np.ndarray, ref: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ref)
    return img


def mr_measures(mr_w: sitk.Image, wt, matrix: np.ndarray) -> dict[str, float]:
    """The MR -> template gate's measures of ``matrix`` (template -> MR) on the working grids.

    ``wt``: the working template (:func:`mrict_dask.register.work_template`).
    """
    sp = wt.image.GetSpacing()[0]
    in_t = sitk.GetArrayFromImage(sitk.Resample(mr_w, wt.image, R.affine_from_matrix(matrix), sitk.sitkLinear,
                                                float("nan")))
    fov = ~np.isnan(in_t)
    in_t[~fov] = 0.0
    a = sitk.GetArrayViewFromImage(mr_w)
    return {
        "mr_det": float(np.linalg.det(matrix[:3, :3])),
        "brain_dice": brain_dice(in_t, sitk.GetArrayViewFromImage(wt.mask), sp, fov),
        "mr_corr": template_correlation(wt.image, wt.mask, mr_w, matrix),
        "mr_gain": local_gain(wt.image, wt.mask, mr_w, matrix, moving_range=(0.0, float(np.percentile(a, 99.5))),
                              with_scale=True),
    }


def ct_measures(mr_w: sitk.Image, mr_head: sitk.Image, ct_w: sitk.Image, ct_head: sitk.Image,
                mr_to_ct: np.ndarray) -> dict[str, float]:
    """The CT -> MR gate's measures of ``mr_to_ct`` (MR -> CT) on the working grids (``ct_w`` clamped HU)."""
    near = sitk.BinaryDilate(mr_head, [3, 3, 3])
    ct_head_only = sitk.Mask(ct_w, ct_head, outsideValue=R.CT_CLAMP[0])
    return {
        "ct_rigid": float(np.abs(mr_to_ct[:3, :3].T @ mr_to_ct[:3, :3] - np.eye(3)).max()
                          + abs(np.linalg.det(mr_to_ct[:3, :3]) - 1.0)),
        "ct_gain": local_gain(mr_w, near, ct_head_only, mr_to_ct, moving_range=(R.CT_CLAMP[0], 2000.0),
                              with_scale=False),
        "skin_mm": skin_distance_mm(mr_head, ct_head, mr_to_ct),
        "head_overlap": R._head_overlap(mr_head, ct_head, R.affine_from_matrix(mr_to_ct)),
    }


def mr_failures(qa: dict[str, float], cfg) -> list[str]:
    """Which MR -> template checks fail, each with its value and limit (``cfg``: RegistrationConfig)."""
    out = []
    lo, hi = cfg.det_range
    if not lo <= qa["mr_det"] <= hi:
        out.append(f"scaling implausible: determinant {qa['mr_det']:.3f} outside [{lo:g}, {hi:g}]")
    if not qa["brain_dice"] >= cfg.min_brain_overlap:
        out.append(f"brain overlap too low: Dice {qa['brain_dice']:.2f} < {cfg.min_brain_overlap:g}")
    if not qa["mr_corr"] >= cfg.min_template_correlation:
        out.append(f"not on a brain: template correlation {qa['mr_corr']:.2f} < {cfg.min_template_correlation:g}")
    if not qa["mr_gain"] <= cfg.max_local_gain:
        out.append(f"not a local optimum: a fit a few mm or degrees away scores {100 * qa['mr_gain']:.0f} % "
                   f"higher (limit {100 * cfg.max_local_gain:g} %)")
    return out


def ct_failures(qa: dict[str, float], cfg) -> list[str]:
    """Which CT -> MR checks fail, each with its value and limit."""
    out = []
    if not qa.get("ct_rigid", 0.0) <= 1e-3:
        out.append(f"not a rigid transform (deviation {qa['ct_rigid']:.3f})")
    if not qa["head_overlap"] >= cfg.min_brain_overlap:
        out.append(f"heads overlap too little: Dice {qa['head_overlap']:.2f} < {cfg.min_brain_overlap:g}")
    if not qa["skin_mm"] <= cfg.max_skin_mm:
        out.append(f"skins do not meet: spread {qa['skin_mm']:.1f} mm > {cfg.max_skin_mm:g} mm")
    if not qa["ct_gain"] <= cfg.max_local_gain:
        out.append(f"not a local optimum: a fit a few mm or degrees away scores {100 * qa['ct_gain']:.0f} % "
                   f"higher (limit {100 * cfg.max_local_gain:g} %)")
    return out


def _edges(hu: np.ndarray) -> np.ndarray:
    """CT edges worth seeing on an MR: skin/air and bone boundaries (> ~150 HU per voxel)."""
    s = ndi.gaussian_filter(hu.astype(np.float32), 0.7)
    mag = np.hypot(ndi.sobel(s, 0), ndi.sobel(s, 1)) / 8.0
    return mag > 150.0


def _planes(fig, row: int, n_rows: int, n_cols: int, label: str, mr_zyx: np.ndarray, ct_hu_zyx: np.ndarray,
            center_zyx: tuple[int, int, int] | None, spacing_xyz, direction, outline: np.ndarray | None,
            ct_window: tuple[float, float] | None = None) -> None:
    """Three planes through ``center_zyx`` into ``fig``'s row ``row``: the MR in grey, CT edges in colour, the
    boundary of ``outline`` in cyan; shown as radiologists look at them (anterior and superior up, the patient's
    left on the image right) for an axis-aligned grid of any axis signs. ``ct_window``: the CT is given scaled to
    [0, 1] over this HU window (its planes are read back in HU)."""
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
    for k, (name, cut, aspect) in enumerate(planes):
        mr2, ct2 = cut(mr_zyx), cut(ct_hu_zyx)
        if ct_window is not None:
            ct2 = ct2 * (ct_window[1] - ct_window[0]) + ct_window[0]
        ax = fig.add_subplot(n_rows, n_cols, row * n_cols + k + 1)
        ax.imshow(mr2, cmap="gray", vmin=0.0, vmax=1.0, aspect=aspect, interpolation="nearest")
        edges = np.ma.masked_where(~_edges(ct2), np.ones_like(ct2))
        ax.imshow(edges, cmap="autumn", vmin=0, vmax=1, aspect=aspect, alpha=0.9, interpolation="nearest")
        if outline is not None:
            o = cut(outline).astype(float)
            if o.any():
                ax.contour(o, levels=[0.5], colors="cyan", linewidths=0.6)
        ax.set_title(f"{label}{name}", color="white", fontsize=9)
        ax.set_axis_off()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="black", metadata={"Software": None})
    return buf.getvalue()


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=80, facecolor="black")


def overlay_png(mr_zyx: np.ndarray, ct_hu_zyx: np.ndarray, center_zyx: tuple[int, int, int] | None = None,
                spacing_xyz: tuple[float, ...] = (1.0, 1.0, 1.0),
                direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
                outline: np.ndarray | None = None) -> bytes:
    """Three planes through ``center_zyx`` (default: the grid centre): the MR in grey, CT edges in colour, and
    the boundary of ``outline`` (the template brain) in cyan. No text but the plane names."""
    fig = _figure(9.0, 3.4)
    _planes(fig, 0, 1, 3, "", mr_zyx, ct_hu_zyx, center_zyx, spacing_xyz, direction, outline)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.03)
    return _png(fig)


def depth_render(mask_zyx: np.ndarray, view: str) -> np.ndarray:
    """A depth-shaded surface of a mask on an LPS grid (identity direction), seen from the front ("front":
    along +y, the patient's right on the image left) or from the patient's left ("side": along -x, anterior on
    the left); rows superior first. Brighter is nearer; 0 where the ray meets nothing."""
    m = mask_zyx.astype(bool)
    if view == "front":
        hit, depth, n = m.any(axis=1), m.argmax(axis=1), m.shape[1]
        img = np.where(hit, 1.0 - depth / n, 0.0)[::-1]  # (z, x): superior first, x = patient's left on the right
    elif view == "side":
        flipped = m[:, :, ::-1]  # rays from the left (+x) side
        hit, depth, n = flipped.any(axis=2), flipped.argmax(axis=2), m.shape[2]
        img = np.where(hit, 1.0 - depth / n, 0.0)[::-1]  # (z, y): anterior on the left
    else:
        raise ValueError(f"unknown view {view!r}")
    return img.astype(np.float32)


def pair_figure(mr_t: np.ndarray, ct_t: np.ndarray, center_zyx, template_image, brain: np.ndarray,
                native: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
                ct_window: tuple[float, float] | None = None) -> bytes:
    """The pair's figure: template space (three planes, CT edges, the template brain's outline); native space
    (three planes, CT edges, the head's outline) and the head from the front and the side (a depth-shaded
    surface, so that a reviewer sees at a glance that the face is gone and the brain intact). CTs in HU, or
    scaled to [0, 1] over ``ct_window``."""
    rows = 1 if native is None else 3
    fig = _figure(9.0, 3.4 * rows)
    _planes(fig, 0, rows, 3, "template ", mr_t, ct_t, center_zyx, template_image.GetSpacing(),
            template_image.GetDirection(), brain, ct_window)
    if native is not None:
        mr_n, ct_n, head = native
        c = mask_centre(head)
        _planes(fig, 1, rows, 3, "native ", mr_n, ct_n, c, (1.0, 1.0, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), head,
                ct_window)
        for k, view in enumerate(("front", "side")):
            ax = fig.add_subplot(rows, 2, 4 + k + 1)
            ax.imshow(depth_render(head, view), cmap="bone", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"head from the {view}", color="white", fontsize=9)
            ax.set_axis_off()
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.95, wspace=0.03, hspace=0.12)
    return _png(fig)
