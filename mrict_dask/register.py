"""Registration: MR -> template (affine) and CT -> MR (rigid), with SimpleITK, pure functions.

Conventions: SimpleITK's. The template (or the MR) is the fixed image, so every transform maps points of the
fixed image's physical space (LPS mm) to the moving image's: ``mr_tx`` maps template -> MR, ``ct_tx`` maps
MR -> CT, and template -> CT is ``ct_tx(mr_tx(p))``, exactly the store's `mr_affine` / `ct_affine` convention.

Both registrations run on an isotropic working grid (``cfg.working_spacing_mm``, 2 mm by default; the
1 mm template has 8.7 M voxels, a 12-parameter affine is well determined by far fewer), the MR one ending
with a level on the template's own grid. Masks keep what the other image cannot explain out of the
metric: the template is brain-extracted, so MR -> template samples only the template brain; the CT
couch and headrest are cut away by a head mask before CT -> MR.

Finding the brain in a real head: the head's centre is not the brain's (a neck, a face, the shoulders, a field
of view off the head's centre), and the template (MNI152) is larger than most brains. :func:`locate_brain`
therefore starts from the top of the head, the one landmark every head shares, and scores a coarse grid of
sizes, positions and head tilts by mutual information on heavily smoothed images before any optimiser runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from .config import RegistrationConfig
from .errors import RegistrationError, VolumeError
from .template import Template

log = logging.getLogger(__name__)

CT_CLAMP = (-1024.0, 3071.0)  # HU; padding outside the reconstruction circle (-2000, -3024) becomes air
CT_HEAD_HU = -400.0  # soft tissue and bone; air, foam and most of a carbon-fibre couch fall below
CT_OPENING_MM = 8.0
_BALL = ndi.generate_binary_structure(3, 2)
SEARCH_SAMPLES = 2000  # a grid search only ranks candidates far apart
COARSE_SAMPLES = 4000
FINAL_SAMPLES_FACTOR = 4
ROTATION_STEP_DEG = 9.0  # rotation search: +-18 degrees about each axis
# MR -> template search (locate_brain). Sizes: template brain -> patient brain scale; MNI152 2009 is larger
# than most adult brains (real heads register at 0.85-0.95 linear), the synthetic ones at 0.92-1.08
BRAIN_SCALES = (0.84, 0.92, 1.0, 1.08)
TOP_SLAB_MM = 60.0  # the head's top slab: skull vault only, above any face, neck or shoulders
SCALP_MM = 12.0  # skull and scalp over the template brain: the template's pseudo head for the top anchor
LOCATE_SIGMA_MM = 6.0  # smoothing of both images for the coarse search
LOCATE_POINTS = 3000  # template brain samples scored by the coarse search
LOCATE_BINS = 24
FOV_PAD_MM = 40.0  # the MR padded with air: samples leaving its field of view are scored, never dropped
FIXED_HEAD_DILATION_MM = 6.0  # CT -> MR: the head plus its skin/air edge
SLICE_SAMPLES = 100_000  # CT -> MR on thick slices: every voxel of the fixed head counts, at most about this many


def set_threads(n: int) -> None:
    """ITK threads for this process (ITK defaults to every core: oversubscribes inside Dask workers)."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, int(n)))


# ----------------------------------------------------------------------------------------------- matrices
def to_matrix(tx: sitk.Transform) -> np.ndarray:
    """4x4 homogeneous matrix of a linear (possibly composite) transform: ``y = M @ [x, 1]``.

    Probed through ``TransformPoint`` so that any linear SimpleITK transform (Euler, versor, similarity,
    affine, composite of these) gives its matrix without per-type parameter bookkeeping.
    """
    if not tx.IsLinear():
        raise ValueError(f"{tx.GetName()} is not a linear transform")
    probes = np.array([[0, 0, 0], [100, 0, 0], [0, 100, 0], [0, 0, 100]], dtype=np.float64)
    out = np.array([tx.TransformPoint(tuple(float(v) for v in p)) for p in probes])
    m = np.eye(4)
    m[:3, 3] = out[0]
    m[:3, :3] = (out[1:] - out[0]).T / 100.0
    check = np.array([37.0, -52.0, 81.0])
    if not np.allclose(tx.TransformPoint(tuple(check)), m[:3, :3] @ check + m[:3, 3], atol=1e-6):
        raise ValueError(f"{tx.GetName()} is not a linear transform")
    return m


def affine_from_matrix(m: np.ndarray, center: np.ndarray | None = None) -> sitk.AffineTransform:
    """The sitk.AffineTransform of a 4x4 matrix (optionally parametrised about ``center``)."""
    a = np.asarray(m, dtype=np.float64)
    tx = sitk.AffineTransform(3)
    c = np.zeros(3) if center is None else np.asarray(center, dtype=np.float64)
    tx.SetCenter(tuple(c))
    tx.SetMatrix(tuple(a[:3, :3].ravel()))
    # y = A (x - c) + t + c  =>  t = b - c + A c
    tx.SetTranslation(tuple(a[:3, 3] - c + a[:3, :3] @ c))
    return tx


# ----------------------------------------------------------------------------------------------- grids
def resample_iso(img: sitk.Image, spacing: float, interp: int = sitk.sitkLinear, default: float = 0.0) -> sitk.Image:
    """``img`` on an isotropic grid of ``spacing`` mm covering the same extent, same direction.

    Averaging (BinShrink) by the integer part of the factor first: an anti-aliased and cheap way down from
    0.5 mm CT pixels or 1 mm MR voxels.
    """
    sp = np.array(img.GetSpacing())
    factors = [max(1, int(math.floor(spacing / s + 1e-6))) for s in sp]
    src = sitk.BinShrink(img, factors) if interp != sitk.sitkNearestNeighbor and max(factors) > 1 else img
    size = np.array(img.GetSize())
    extent = size * sp
    new_size = [max(1, int(round(e / spacing))) for e in extent]
    direction = np.array(img.GetDirection()).reshape(3, 3)
    corner = np.array(img.GetOrigin()) - direction @ (sp / 2)
    origin = corner + direction @ (np.full(3, spacing) / 2)
    ref = sitk.Image(new_size, img.GetPixelID())
    ref.SetSpacing([float(spacing)] * 3)
    ref.SetOrigin([float(v) for v in origin])
    ref.SetDirection(img.GetDirection())
    return sitk.Resample(src, ref, sitk.Transform(), interp, default)


def _ball(radius_mm: float, spacing: float) -> int:
    return max(1, int(round(radius_mm / spacing)))


def _largest_component(arr: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(arr)
    if n == 0:
        return arr.astype(bool)
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    return lab == int(np.argmax(counts))


def fill_holes(arr: np.ndarray, structure: np.ndarray | None = None, border_axes: Sequence[int] | None = None
               ) -> np.ndarray:
    """``arr`` with every background component that touches no border filled (scipy's binary_fill_holes in one
    labelling). ``structure``: the background's connectivity (default: faces); ``border_axes``: the axes whose
    two ends are the border (default: all)."""
    st = ndi.generate_binary_structure(arr.ndim, 1) if structure is None else structure
    lab, n = ndi.label(~arr.astype(bool, copy=False), structure=st)
    outer = np.zeros(n + 1, bool)  # label 0: the foreground
    for axis in range(arr.ndim) if border_axes is None else border_axes:
        outer[np.take(lab, 0, axis=axis)] = True
        outer[np.take(lab, -1, axis=axis)] = True
    outer[0] = False
    return ~outer[lab]


def fill_slices(arr: np.ndarray) -> np.ndarray:
    """3D hole filling plus per-slice 2D filling along every axis (a neck cut opens the 3D skull 'hole').

    Each axis's slices are filled in one labelling whose connectivity stays within the slice."""
    out = fill_holes(arr)
    for axis in range(3):
        st = np.zeros((3, 3, 3), bool)
        st[tuple(1 if a == axis else slice(None) for a in range(3))] = ndi.generate_binary_structure(2, 1)
        out = fill_holes(out, st, [a for a in range(3) if a != axis])
    return out


def _as_mask(arr: np.ndarray, like: sitk.Image) -> sitk.Image:
    m = sitk.GetImageFromArray(arr.astype(np.uint8))
    m.CopyInformation(like)
    return m


def head_mask_mr(mr_w: sitk.Image) -> sitk.Image:
    """Rough head mask of an MR on a coarse grid: above the background noise, largest blob, filled."""
    a = sitk.GetArrayFromImage(mr_w)
    hi = float(np.percentile(a, 99.5))
    if not hi > float(a.min()):
        raise VolumeError(f"MR series: constant volume (every voxel {hi:g})")
    # Otsu on log intensities: the background noise is one narrow peak there, every tissue (dim skull,
    # grey scalp, bright fat) lies far above it; on linear intensities Otsu splits the tissues instead
    lo = float(np.percentile(a, 0.5))
    logs = np.log1p(np.clip(a, lo, hi) - lo)
    fg = logs > _otsu(logs)
    sp = mr_w.GetSpacing()[0]
    fg = ndi.binary_opening(fg, iterations=1)
    fg = _largest_component(fg)
    fg = ndi.binary_closing(fg, iterations=_ball(4, sp))
    fg = fill_slices(fg)
    if fg.sum() * sp**3 < 200e3:  # < 0.2 L: no head
        raise VolumeError("MR series: no head found (foreground under 0.2 L)")
    return _as_mask(fg, mr_w)


def head_mask_ct(ct_w: sitk.Image) -> sitk.Image:
    """Head mask of a (clamped, coarse) CT: tissue/bone, opened to detach couch and headrest, largest, filled."""
    a = sitk.GetArrayFromImage(ct_w)
    sp = ct_w.GetSpacing()[0]
    tissue = a > CT_HEAD_HU
    # an opening of radius CT_OPENING_MM erases couch tops, headrests and their contacts with the scalp
    # (all thinner than 2 r) but not a head; growing back r mm restores the head's thin parts (ears, nose)
    # but not pieces of what was cut away that reach far from the head (a plate under it)
    r = _ball(CT_OPENING_MM, sp)
    core = _largest_component(ndi.binary_opening(tissue, structure=_BALL, iterations=r))
    cut, _ = ndi.label(tissue & ~core)
    far = cut[~ndi.binary_dilation(core, structure=_BALL, iterations=2 * r + 2) & (cut > 0)]
    foreign = np.isin(cut, np.unique(far)) & (cut > 0)
    fg = ndi.binary_dilation(core, structure=_BALL, iterations=r + 1) & tissue & ~foreign
    fg = _largest_component(fg)
    fg = fill_slices(fg)
    if fg.sum() * sp**3 < 200e3:
        raise VolumeError("CT series: no head found (under 0.2 L of tissue above -400 HU)")
    return _as_mask(fg, ct_w)


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    w = hist.astype(np.float64)
    w0 = np.cumsum(w)
    w1 = w0[-1] - w0
    m0 = np.cumsum(w * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between[:-1]))])


def _centroid(mask: sitk.Image) -> np.ndarray:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    return np.array(stats.GetCentroid(1))


# ----------------------------------------------------------------------------------------------- template
@dataclass
class _WorkTemplate:
    image: sitk.Image  # working grid
    mask: sitk.Image  # brain mask, working grid
    fixed_mask: sitk.Image  # metric sampling region (the brain)
    centroid: np.ndarray  # of the brain mask, LPS mm
    full_mask: sitk.Image  # the brain mask on the template's own grid
    locate: _Locate  # coarse-search samples and the top anchor


_cache: dict[tuple, _WorkTemplate] = {}
_cache_lock = threading.Lock()


def work_template(template: Template, spacing: float) -> _WorkTemplate:
    key = (template.sha256, template.image.GetSize(), template.image.GetSpacing(), template.image.GetOrigin(), spacing)
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    img = resample_iso(template.image, spacing)
    mask = resample_iso(template.mask, spacing, sitk.sitkNearestNeighbor)
    # the brain only: a band of template zeros around it would pair with whatever surrounds a brain (CSF,
    # skull, or bright scalp and fat where a real head is blurred or thin), and pulled averaged and real heads
    # off by ~10 mm; the brain's own structure (ventricles, grey/white matter) places it
    full = sitk.Cast(template.mask > 0, sitk.sitkUInt8)
    wt = _WorkTemplate(img, mask, mask, _centroid(template.mask), full, _locate_template(img, mask))
    with _cache_lock:
        _cache[key] = wt
    return wt


# ----------------------------------------------------------------------------------------------- locate
class _Smoothed:
    """An image smoothed once, sampled at physical points by trilinear interpolation (``outside`` beyond it)."""

    def __init__(self, img: sitk.Image, sigma_mm: float, outside: float = 0.0):
        a = sitk.GetArrayFromImage(img).astype(np.float32)
        sp = np.array(img.GetSpacing())
        self.array = ndi.gaussian_filter(a, sigma_mm / sp[::-1], mode="constant", cval=outside) if sigma_mm else a
        self.to_index = np.linalg.inv(np.array(img.GetDirection()).reshape(3, 3) * sp)
        self.origin = np.array(img.GetOrigin())
        self.outside = outside

    def __call__(self, points: np.ndarray) -> np.ndarray:
        ijk = (points - self.origin) @ self.to_index.T
        return ndi.map_coordinates(self.array, ijk[:, ::-1].T, order=1, mode="constant", cval=self.outside)


def _bins(values: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    return np.clip(((values - lo) * (bins / max(hi - lo, 1e-12))).astype(np.int64), 0, bins - 1)


def mutual_information(fixed_bins: np.ndarray, moving: np.ndarray, lo: float, hi: float, bins: int) -> float:
    """MI (nats) of pre-binned fixed samples and moving values binned over [lo, hi]: higher is better."""
    joint = np.bincount(fixed_bins * bins + _bins(moving, lo, hi, bins), minlength=bins * bins).astype(np.float64)
    p = joint.reshape(bins, bins) / max(joint.sum(), 1.0)
    pf, pm = p.sum(1), p.sum(0)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / np.outer(pf, pm)[nz])).sum())


def similarity_matrix(angles_rad: Sequence[float], scale: float, translation: Sequence[float],
                      center: np.ndarray) -> np.ndarray:
    """4x4 of y -> s R (y - c) + c + t, R = Rz Ry Rx (ITK's Euler3D order)."""
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = scale * (rz @ ry @ rx)
    m[:3, 3] = center + np.asarray(translation, float) - m[:3, :3] @ center
    return m


def top_anchor(mask: sitk.Image, slab_mm: float = TOP_SLAB_MM) -> np.ndarray:
    """The head's top: (x, y) centroid of the mask's top ``slab_mm`` (the skull vault) and the top's z."""
    pts = _mask_points(mask)
    top = pts[:, 2].max()
    vault = pts[pts[:, 2] >= top - slab_mm]
    return np.array([vault[:, 0].mean(), vault[:, 1].mean(), top])


@dataclass
class _Locate:
    points: np.ndarray  # template brain sample points, LPS mm
    bins: np.ndarray  # their smoothed template values, binned
    anchor: np.ndarray  # top_anchor of the template's pseudo head (brain + SCALP_MM)


def _locate_template(img: sitk.Image, mask: sitk.Image) -> _Locate:
    m = sitk.GetArrayFromImage(mask) > 0
    idx = np.argwhere(m)
    idx = idx[np.random.default_rng(0).choice(len(idx), size=min(LOCATE_POINTS, len(idx)), replace=False)]
    d = np.array(mask.GetDirection()).reshape(3, 3) * np.array(mask.GetSpacing())
    points = np.array(mask.GetOrigin()) + idx[:, ::-1].astype(np.float64) @ d.T
    values = _Smoothed(img, LOCATE_SIGMA_MM)(points)
    pseudo_head = ndi.binary_dilation(m, iterations=_ball(SCALP_MM, mask.GetSpacing()[0]))
    return _Locate(points, _bins(values, float(values.min()), float(values.max()), LOCATE_BINS),
                   top_anchor(_as_mask(pseudo_head, mask)))


def locate_brain(wt: _WorkTemplate, mr_w: sitk.Image, head: sitk.Image) -> tuple[np.ndarray, dict]:
    """Coarse template -> MR similarity (size, position, tilt) that puts the template brain on the MR's brain.

    Starts from the top of the head (the top of the template's pseudo head on the MR head's top, centred on
    the skull vault's top slab) when the field of view shows it, else from the head's centre with a twice
    longer search along z. Then scores, by mutual information of the smoothed images over the template brain:
    4 sizes x 75 positions (8 mm apart, +-8 mm left-right, +-16 mm front-back, +-16 mm (+-32) up-down),
    then twice 125 tilts (+-18, then +-9 degrees about each axis) each followed by 27 positions +-4 mm.
    Returns the 4x4 matrix and what was tried.
    """
    loc = wt.locate
    c_t = wt.centroid
    a = sitk.GetArrayViewFromImage(mr_w)
    h = sitk.GetArrayViewFromImage(head) > 0
    lo, hi = 0.0, float(np.percentile(a[h], 99.5))
    moving = _Smoothed(mr_w, LOCATE_SIGMA_MM)
    top = top_visible(head)
    if top:
        t0, z_steps = top_anchor(head) - loc.anchor, (-16, -8, 0, 8, 16)
    else:
        t0, z_steps = _centroid(head) - c_t, tuple(range(-32, 33, 8))

    def score(m: np.ndarray) -> float:
        return mutual_information(loc.bins, moving(loc.points @ m[:3, :3].T + m[:3, 3]), lo, hi, LOCATE_BINS)

    tried = 0
    best = (-np.inf, 1.0, t0)
    for s in BRAIN_SCALES:
        for d in itertools.product((-8, 0, 8), (-16, -8, 0, 8, 16), z_steps):
            t = t0 + np.array(d, float)
            v = score(similarity_matrix((0.0, 0.0, 0.0), s, t, c_t))
            tried += 1
            if v > best[0]:
                best = (v, s, t)
    value, scale, t = best
    angles = np.zeros(3)
    step = math.radians(ROTATION_STEP_DEG)
    for _ in range(2):
        for grid_steps, moves in (((-2, -1, 0, 1, 2), "angles"), ((-1, 0, 1), "shift")):
            cands = []
            for d in itertools.product(grid_steps, repeat=3):
                if moves == "angles":
                    ang, tt = angles + np.array(d) * step, t
                else:
                    ang, tt = angles, t + np.array(d) * 4.0
                cands.append((score(similarity_matrix(ang, scale, tt, c_t)), tuple(ang), tuple(tt)))
            tried += len(cands)
            value, ang, tt = max(cands, key=lambda c: c[0])
            angles, t = np.array(ang), np.array(tt)
        step /= 2
    m = similarity_matrix(angles, scale, t, c_t)
    info = {"start": "head top" if top else "head centre", "candidates": tried, "scale": scale,
            "tilt_deg": [round(math.degrees(v), 1) for v in angles], "score": value}
    return m, info


# ----------------------------------------------------------------------------------------------- engine
def _run(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, cfg: RegistrationConfig, *,
         bins: int, fixed_mask: sitk.Image, levels: tuple[tuple[int, float], ...], line_search: bool,
         what: str, every_voxel: bool = False) -> tuple[sitk.Transform, dict]:
    """One multi-resolution Mattes-MI registration; ``levels`` = (shrink of the working grid, sigma mm).

    ``line_search``: conjugate gradients with a line search, for the coarse level that must travel far
    (a 20 degree rotation: fixed-step descent crawls there, its steps shrink at every zigzag between
    translation and rotation); otherwise regular-step gradient descent, cheap per iteration, for the
    short way left on the fine levels. ``every_voxel``: the metric over every voxel of the fixed mask, not a
    random sample: the same value at every iteration, so the descent settles on the optimum instead of
    stopping where sampling noise turned its gradient.
    """
    n_mask = int(np.count_nonzero(sitk.GetArrayViewFromImage(fixed_mask)))
    if n_mask == 0:
        raise RegistrationError(f"{what} registration failed: empty fixed-image mask")
    # the same number of samples at every level (all voxels where a coarse level has fewer): the
    # coarse levels decide the capture range and need their statistics as much as the fine ones.
    # Counted on the working grid whatever the grid of ``fixed``: a finer grid is not more work
    voxel_mm3 = float(np.prod(fixed_mask.GetSpacing()))
    n_samples = max(2000, cfg.sampling_fraction * n_mask * voxel_mm3 / cfg.working_spacing_mm**3)
    if line_search:
        n_samples = min(n_samples, COARSE_SAMPLES)
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(max(1, int(cfg.threads)))
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(bins))
    if every_voxel:
        reg.SetMetricSamplingStrategy(reg.NONE)
        n_samples = n_mask
    else:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        # the percentage counts voxels of the whole image; samples outside the mask are dropped
        reg.SetMetricSamplingPercentagePerLevel(
            [min(1.0, n_samples / (n_mask / f**3)) for f, _ in levels], int(cfg.seed))
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    # gradients at the sampled points only, not as whole gradient images of both inputs at every level
    reg.MetricUseFixedImageGradientFilterOff()
    reg.MetricUseMovingImageGradientFilterOff()
    if line_search:
        reg.SetOptimizerAsConjugateGradientLineSearch(
            learningRate=1.0, numberOfIterations=int(cfg.iterations), convergenceMinimumValue=1e-6,
            convergenceWindowSize=10, estimateLearningRate=reg.Once)
    else:
        # not plain gradient descent: with a learning rate estimated each iteration it stops early on the
        # sampled MI (its convergence window fires before the transform settles)
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=float(cfg.learning_rate), minStep=1e-3, numberOfIterations=int(cfg.iterations),
            relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([int(f) for f, _ in levels])
    reg.SetSmoothingSigmasPerLevel([float(s) for _, s in levels])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(initial, inPlace=False)
    iterations: list[int] = []
    reg.AddCommand(sitk.sitkMultiResolutionIterationEvent, lambda: iterations.append(0))
    reg.AddCommand(sitk.sitkIterationEvent, lambda: iterations.__setitem__(-1, iterations[-1] + 1))
    try:
        out = reg.Execute(fixed, moving)
    except RuntimeError as exc:
        raise RegistrationError(f"{what} registration failed: {_itk_reason(exc)}") from None
    out = _flat(out)
    metric = float(reg.GetMetricValue())
    info = {"metric": metric, "stop": reg.GetOptimizerStopConditionDescription(),
            "iterations": iterations, "samples": int(n_samples)}
    log.debug("%s: metric %.4f, iterations per level %s, %s", what, metric, iterations, info["stop"])
    if not math.isfinite(metric):
        raise RegistrationError(f"{what} registration failed: metric is {metric}")
    return out, info


def _search(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, cfg: RegistrationConfig,
            *, bins: int, fixed_mask: sitk.Image, steps: tuple[int, ...], step: float, step_mm: float,
            what: str) -> sitk.Transform:
    """Best of a grid of parameters around ``initial`` (MI on a coarse level): a wide capture range.

    ``steps``: grid half-widths per parameter (Euler3D: 3 angles, 3 translations); ``step``: the grid
    spacing in parameter units; ``step_mm``: the physical scale that sets the level's resolution.
    """
    n_params = initial.GetNumberOfParameters()
    n_mask = int(np.count_nonzero(sitk.GetArrayViewFromImage(fixed_mask)))
    shrink = max(1, int(round(step_mm / cfg.working_spacing_mm)))
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(max(1, int(cfg.threads)))
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(bins))
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(min(1.0, SEARCH_SAMPLES / (n_mask / shrink**3)), int(cfg.seed))
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsExhaustive([0] * (n_params - len(steps)) + list(steps), stepLength=float(step))
    reg.SetOptimizerScales([1.0] * n_params)
    reg.SetShrinkFactorsPerLevel([shrink])
    reg.SetSmoothingSigmasPerLevel([float(step_mm) / 2])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(initial, inPlace=False)
    try:
        out = reg.Execute(fixed, moving)
    except RuntimeError as exc:
        raise RegistrationError(f"{what} registration failed: {_itk_reason(exc)}") from None
    log.debug("%s: search over %s best metric %.4f", what, steps, reg.GetMetricValue())
    return _flat(out)


def _flat(tx: sitk.Transform) -> sitk.Transform:
    """The single transform inside the one-element composite that Execute returns."""
    if tx.GetName() == "CompositeTransform":
        comp = sitk.CompositeTransform(tx)
        if comp.GetNumberOfTransforms() == 1:
            return comp.GetNthTransform(0).Downcast()
    return tx


def _itk_reason(exc: Exception) -> str:
    text = str(exc)
    if "Joint PDF summed to zero" in text:
        return "images do not overlap (mutual information undefined: joint PDF summed to zero)"
    if "samples map outside moving image buffer" in text:
        return "images do not overlap (the samples map outside the moving image)"
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("Description:"):
            text = line.split(":", 1)[1]
            break
    else:
        text = text.strip().splitlines()[-1] if text.strip() else type(exc).__name__
    # drop ITK's prefixes, source paths and object addresses: the reason goes into the store and the report
    text = re.sub(r"ITK ERROR:\s*", "", text)
    text = re.sub(r"\S+\(0x[0-9a-f]+\):\s*", "", text)
    text = re.sub(r"\S*/\S+\.(?:hxx|cxx|h):\d+:?\s*", "", text)
    return text.strip()[:200] or type(exc).__name__


# ----------------------------------------------------------------------------------------------- MR -> template
def _levels(cfg: RegistrationConfig) -> tuple[tuple[int, float], ...]:
    if len(cfg.shrink_factors) != len(cfg.smoothing_sigmas_mm) or not cfg.shrink_factors:
        raise RegistrationError("registration.shrink_factors and smoothing_sigmas_mm must be equally long")
    return tuple((int(f), float(s)) for f, s in zip(cfg.shrink_factors, cfg.smoothing_sigmas_mm))


def _pyramid(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, cfg: RegistrationConfig, *,
             bins: int, fixed_mask: sitk.Image, what: str,
             fine: Callable[[sitk.Transform], sitk.Transform] | None = None) -> tuple[sitk.Transform, dict]:
    """Coarsest level by line search, the finer ones by regular steps (see :func:`_run`).

    ``fine``: optional callable turning the coarse result into the transform the fine levels refine
    (rigid first, affine after: a line search over 12 affine parameters can jump off the head).
    """
    levels = _levels(cfg)
    tx, coarse = _run(fixed, moving, initial, cfg, bins=bins, fixed_mask=fixed_mask, levels=levels[:1],
                      line_search=True, what=what)
    if fine is not None:
        tx = fine(tx)
    if len(levels) == 1:
        return tx, coarse
    tx, info = _run(fixed, moving, tx, cfg, bins=bins, fixed_mask=fixed_mask, levels=levels[1:],
                    line_search=False, what=what)
    info["iterations"] = coarse["iterations"] + info["iterations"]
    return tx, info


def work_image(img: sitk.Image, cfg: RegistrationConfig, default: float = 0.0) -> sitk.Image:
    """``img`` (float32) on the isotropic working grid of the registrations."""
    return resample_iso(sitk.Cast(img, sitk.sitkFloat32), cfg.working_spacing_mm, default=default)


def pad_air(img: sitk.Image, air: float = 0.0, mm: float = FOV_PAD_MM) -> sitk.Image:
    """``img`` with ``mm`` of air around it: samples leaving the field of view are scored as air, not dropped
    (dropped samples let an optimiser slide off the image, where the few samples left agree on anything)."""
    n = [int(math.ceil(mm / s)) for s in img.GetSpacing()]
    return sitk.ConstantPad(img, n, n, air)


def register_mr_to_template(mr: sitk.Image, template: Template, cfg: RegistrationConfig,
                            *, mr_work: sitk.Image | None = None,
                            mr_head: sitk.Image | None = None) -> tuple[sitk.AffineTransform, dict]:
    """Affine template -> MR (fixed: template, moving: MR), Mattes MI over the template brain.

    :func:`locate_brain` (size, position, tilt), then a similarity transform on the coarse level, affine on
    the finer ones, and a last level on the template's grid. ``mr_work``/``mr_head`` (the MR on the working
    grid and its head mask, from :func:`work_image` / :func:`head_mask_mr`) skip recomputing them.
    Returns the transform and {metric, stop condition, iterations per level, samples, search}.
    """
    set_threads(cfg.threads)
    wt = work_template(template, cfg.working_spacing_mm)
    mr_w = mr_work if mr_work is not None else work_image(mr, cfg)
    head = mr_head if mr_head is not None else head_mask_mr(mr_w)
    c_t = wt.centroid
    m0, search = locate_brain(wt, mr_w, head)
    scale = float(np.cbrt(np.linalg.det(m0[:3, :3])))
    init = sitk.Similarity3DTransform()
    init.SetCenter(tuple(c_t))
    init.SetMatrix(tuple((m0[:3, :3] / scale).ravel()), 1e-6)
    init.SetScale(scale)
    init.SetTranslation(tuple(m0[:3, 3] - c_t + m0[:3, :3] @ c_t))
    what = "MR -> template (affine)"
    tx, info = _pyramid(wt.image, pad_air(mr_w), init, cfg, bins=cfg.mr_bins, fixed_mask=wt.fixed_mask,
                        what=what, fine=lambda sim: affine_from_matrix(to_matrix(sim), center=c_t))
    if cfg.refine_at_template_resolution and min(template.image.GetSpacing()) < cfg.working_spacing_mm - 1e-6:
        # one last level on the template's own grid (unsmoothed), with FINAL_SAMPLES_FACTOR times the
        # samples: it decides the last tenths of a mm (~0.1 mm closer for ~1.5 s)
        final = dataclasses.replace(cfg, sampling_fraction=cfg.sampling_fraction * FINAL_SAMPLES_FACTOR)
        tx, last = _run(template.image, sitk.Cast(mr, sitk.sitkFloat32), tx, final, bins=cfg.mr_bins,
                        fixed_mask=wt.full_mask, levels=((1, 0.0),), line_search=False, what=what)
        info = {**last, "iterations": info["iterations"] + last["iterations"]}
    info["search"] = search
    out = affine_from_matrix(to_matrix(tx), center=c_t)
    log.info("MR -> template: metric %.4f, iterations %s, %s; search from the %s over %d candidates, scale %.2f",
             info["metric"], info["iterations"], info["stop"], search["start"], search["candidates"],
             search["scale"])
    return out, info


# ----------------------------------------------------------------------------------------------- CT -> MR
def prepare_ct(ct: sitk.Image) -> sitk.Image:
    """CT clamped to the HU range a scanner can represent: padding values become air, metal stays bounded."""
    return sitk.Clamp(sitk.Cast(ct, sitk.sitkFloat32), sitk.sitkFloat32, *CT_CLAMP)


def register_ct_to_mr(ct: sitk.Image, mr: sitk.Image, cfg: RegistrationConfig,
                      *, mr_work: sitk.Image | None = None, mr_head: sitk.Image | None = None,
                      ct_clamped: sitk.Image | None = None, ct_work: sitk.Image | None = None,
                      ct_head: sitk.Image | None = None) -> tuple[sitk.Euler3DTransform, dict]:
    """Rigid MR -> CT (maps MR physical points to CT physical points), Mattes MI on head masks.

    The CT is clamped to [-1024, 3071] HU and everything outside its head mask (couch, headrest, padding)
    set to air (``ct_clamped``, ``ct_work`` (clamped, on the working grid) and ``ct_head`` (its head
    mask) may be passed to skip recomputing them). The series showing less of the head is the fixed image
    (as SynthRAD does), so that every sample has a partner; when that is the CT, the result is inverted.
    Initialised by centring the two head masks (see :func:`_initial_offset`), then grid searches, the pyramid,
    and one last level: on the thick-sliced series' own slices (:func:`_slice_level`) or at ``ct_refine_mm``.
    Returns the transform and {metric, stop condition, iterations, fixed, head_overlap}.
    """
    set_threads(cfg.threads)
    sp = cfg.working_spacing_mm
    mr_w = mr_work if mr_work is not None else work_image(mr, cfg)
    mhead = mr_head if mr_head is not None else head_mask_mr(mr_w)
    if ct_work is None:
        ctc = ct_clamped if ct_clamped is not None else prepare_ct(ct)
        ct_work = resample_iso(ctc, sp, default=CT_CLAMP[0])
    ct_w = ct_work
    chead = ct_head if ct_head is not None else head_mask_ct(ct_w)
    ct_masked = sitk.Mask(ct_w, chead, outsideValue=CT_CLAMP[0])
    offset, z_known = _initial_offset(mhead, chead)  # MR -> CT
    n_mr = int(np.count_nonzero(sitk.GetArrayViewFromImage(mhead)))
    n_ct = int(np.count_nonzero(sitk.GetArrayViewFromImage(chead)))
    ct_fixed = n_ct < n_mr
    if ct_fixed:
        fixed, moving, fhead, offset = ct_masked, pad_air(mr_w), chead, -offset
    else:
        fixed, moving, fhead = mr_w, pad_air(ct_masked, CT_CLAMP[0]), mhead
    center = _centroid(fhead)
    init = sitk.Euler3DTransform()
    init.SetCenter(tuple(center))
    init.SetTranslation(tuple(offset))
    fh = sitk.GetArrayFromImage(fhead) > 0
    fixed_mask = _as_mask(ndi.binary_dilation(fh, iterations=_ball(FIXED_HEAD_DILATION_MM, sp)), fhead)
    what = "CT -> MR (rigid)"
    # translations first (the field-of-view guess), then rotations about the head's centre: head
    # positions on a CT couch and in an MR coil differ by up to ~25 degrees, beyond the coarse level's reach
    init = _search(fixed, moving, init, cfg, bins=cfg.ct_bins, fixed_mask=fixed_mask,
                   steps=(0, 0, 0, 1, 1, 4 if z_known else 12), step=8.0, step_mm=8.0, what=what)
    init = _search(fixed, moving, init, cfg, bins=cfg.ct_bins, fixed_mask=fixed_mask,
                   steps=(2, 2, 2, 0, 0, 0), step=math.radians(ROTATION_STEP_DEG), step_mm=8.0, what=what)
    tx, info = _pyramid(fixed, moving, init, cfg, bins=cfg.ct_bins, fixed_mask=fixed_mask, what=what)
    m = to_matrix(tx)
    mr_to_ct = np.linalg.inv(m) if ct_fixed else m
    fine = cfg.ct_refine_mm
    thick = _thick_slices(mr, ct, max(sp, cfg.thick_slice_mm)) if cfg.thick_slice_mm else ""
    if thick:
        # a series of slices thicker than the working grid: its slices are what was measured, and values
        # interpolated between them (the working grid) misplace every edge crossing them
        ctc = ct_clamped if ct_clamped is not None else prepare_ct(ct)
        mr_to_ct, last = _slice_level(mr, mhead, ctc, chead, mr_to_ct, cfg, thick=thick, what=what)
        info = {**last, "iterations": info["iterations"] + last["iterations"]}
    elif fine and fine < sp and max(*mr.GetSpacing(), *ct.GetSpacing()) <= fine + 1e-6:
        # both series sampled finer than the working grid: one last level at ``fine`` mm decides the last
        # tenths of a mm (on real heads ~0.6 -> ~0.3 mm); never finer than the data (thick slices)
        ctc = ct_clamped if ct_clamped is not None else prepare_ct(ct)
        mr_f = work_image(mr, dataclasses.replace(cfg, working_spacing_mm=fine))
        ct_f = _ct_in_head(resample_iso(ctc, fine, default=CT_CLAMP[0]), chead)
        f_img, m_img = (ct_f, pad_air(mr_f)) if ct_fixed else (mr_f, pad_air(ct_f, CT_CLAMP[0]))
        tx, last = _run(f_img, m_img, tx, dataclasses.replace(cfg, working_spacing_mm=fine), bins=cfg.ct_bins,
                        fixed_mask=_regrid_mask(fixed_mask, f_img), levels=((1, 0.0),), line_search=False, what=what)
        info = {**last, "iterations": info["iterations"] + last["iterations"]}
        m = to_matrix(tx)
        mr_to_ct = np.linalg.inv(m) if ct_fixed else m
    out = _euler(mr_to_ct, _centroid(mhead))
    info["fixed"] = "CT" if ct_fixed else "MR"
    info["head_overlap"] = _head_overlap(mhead, chead, out)
    log.info("CT -> MR: metric %.4f, iterations %s, %s; fixed %s; head overlap %.3f", info["metric"],
             info["iterations"], info["stop"], info["fixed"], info["head_overlap"])
    return out, info


def _thick_slices(mr: sitk.Image, ct: sitk.Image, spacing: float) -> str:
    """"MR" or "CT": the series whose slices are the thicker, when they are thicker than ``spacing``; else "".

    (Slices a little thicker than the working grid, 2.5 mm under 2 mm, cost the working grid a few tenths of a
    mm; the level costs ~1 s there. ``registration.thick_slice_mm`` sets where it starts, 0 turns it off.)"""
    s_mr, s_ct = max(mr.GetSpacing()), max(ct.GetSpacing())
    if max(s_mr, s_ct) <= spacing + 1e-6:
        return ""
    return "MR" if s_mr >= s_ct else "CT"


def _slice_level(mr: sitk.Image, mr_head: sitk.Image, ct_clamped: sitk.Image, ct_head: sitk.Image,
                 mr_to_ct: np.ndarray, cfg: RegistrationConfig, *, thick: str, what: str) -> tuple[np.ndarray, dict]:
    """A last rigid level with the thick-sliced series fixed on its own slices, every voxel of its head counted.

    The fixed series keeps its slices (binned in-plane to the working spacing or coarser, to about SLICE_SAMPLES
    voxels in its head); the other series, moving, is read at ``cfg.ct_refine_mm`` (the working spacing when 0)
    between them. Every voxel counted makes the metric deterministic: on a 6 mm MR a randomly sampled last level
    stopped 0.6 mm off, this one ~0.2 mm. Returns the refined MR -> CT matrix and the level's information.
    """
    sp = cfg.working_spacing_mm
    fine = cfg.ct_refine_mm if 0 < cfg.ct_refine_mm < sp else sp
    if thick == "MR":
        fixed, head, init = sitk.Cast(mr, sitk.sitkFloat32), mr_head, mr_to_ct
        moving = pad_air(_ct_in_head(resample_iso(ct_clamped, fine, default=CT_CLAMP[0]), ct_head), CT_CLAMP[0])
    else:
        fixed, head, init = _ct_in_head(ct_clamped, ct_head), ct_head, np.linalg.inv(mr_to_ct)
        moving = pad_air(work_image(mr, dataclasses.replace(cfg, working_spacing_mm=fine)))
    near = ndi.binary_dilation(sitk.GetArrayViewFromImage(head) > 0, iterations=_ball(FIXED_HEAD_DILATION_MM, sp))
    spacing = np.array(fixed.GetSpacing())
    k = int(np.argmax(spacing))
    # in-plane bins of at least the working spacing, larger where the head would hold over SLICE_SAMPLES of them
    pixel_mm2 = float(near.sum()) * sp**3 / (spacing[k] * SLICE_SAMPLES)
    fixed = sitk.BinShrink(fixed, [1 if i == k else max(1, math.ceil(max(sp, math.sqrt(pixel_mm2)) / s - 1e-6))
                                   for i, s in enumerate(spacing)])
    fixed_mask = _regrid_mask(_as_mask(near, head), fixed)
    tx, info = _run(fixed, moving, _euler(init, _centroid(head)), cfg, bins=cfg.ct_bins, fixed_mask=fixed_mask,
                    levels=((1, 0.0),), line_search=False, what=what, every_voxel=True)
    m = to_matrix(tx)
    return (m if thick == "MR" else np.linalg.inv(m)), info


def _euler(m: np.ndarray, center: np.ndarray) -> sitk.Euler3DTransform:
    """The Euler3DTransform of a rigid 4x4 matrix, parametrised about ``center``."""
    out = sitk.Euler3DTransform()
    out.SetCenter(tuple(float(v) for v in center))
    out.SetMatrix(tuple(m[:3, :3].ravel()), 1e-6)
    out.SetTranslation(tuple(m[:3, 3] - center + m[:3, :3] @ center))
    return out


def _ct_in_head(ct: sitk.Image, head: sitk.Image) -> sitk.Image:
    """The CT with everything outside its head mask (couch, headrest, padding) set to air."""
    return sitk.Mask(ct, _regrid_mask(head, ct), outsideValue=CT_CLAMP[0])


def _regrid_mask(mask: sitk.Image, like: sitk.Image) -> sitk.Image:
    return sitk.Resample(mask, like, sitk.Transform(), sitk.sitkNearestNeighbor, 0)


def _mask_points(mask: sitk.Image) -> np.ndarray:
    idx = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1].astype(np.float64)  # (x, y, z) indices
    d = np.array(mask.GetDirection()).reshape(3, 3) * np.array(mask.GetSpacing())
    return np.array(mask.GetOrigin()) + idx @ d.T


def top_visible(mask: sitk.Image) -> bool:
    """Whether the head ends inside the field of view superiorly (the mask leaves the top slab empty)."""
    d = np.array(mask.GetDirection()).reshape(3, 3)
    k = int(np.argmax(np.abs(d[2])))  # the index axis closest to superior
    arr = sitk.GetArrayViewFromImage(mask)
    face = mask.GetSize()[k] - 1 if d[2, k] > 0 else 0
    return not bool(np.take(arr, face, axis=2 - k).any())


def _initial_offset(mhead: sitk.Image, chead: sitk.Image, rounds: int = 3) -> tuple[np.ndarray, bool]:
    """Translation MR -> CT centring the heads over the slab both cover; and whether z is known.

    Superior-inferior, the head's top is the landmark both series share (CT and MR cut the neck at
    different levels): used when both show it. Otherwise z is only a guess (returned ``False``) and the
    caller searches a wider range.
    """
    pm, pc = _mask_points(mhead), _mask_points(chead)
    z_known = top_visible(mhead) and top_visible(chead)
    offset = pc.mean(axis=0) - pm.mean(axis=0)
    if z_known:
        offset[2] = pc[:, 2].max() - pm[:, 2].max()
    for _ in range(rounds):
        zc = pc[:, 2] - offset[2]  # CT points in MR frame (translation only)
        lo, hi = max(pm[:, 2].min(), zc.min()), min(pm[:, 2].max(), zc.max())
        if hi - lo < 20:
            break
        sm = pm[(pm[:, 2] >= lo) & (pm[:, 2] <= hi)]
        sc = pc[(zc >= lo) & (zc <= hi)]
        new = sc.mean(axis=0) - sm.mean(axis=0)
        new[2] = offset[2] if z_known else new[2]
        done = np.allclose(new, offset, atol=0.5)
        offset = new
        if done:
            break
    return offset, z_known


def covered(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform | None = None) -> np.ndarray:
    """The voxels of ``grid`` (bool, z, y, x) that ``image``'s grid covers, ``transform`` mapping ``grid``'s
    physical points into ``image``'s (identity with None): nearest neighbour, so a voxel is covered when its centre
    lies within half a voxel of ``image``'s grid."""
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    inside = sitk.Resample(ones, grid, transform or sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(inside) > 0


def _head_overlap(mhead: sitk.Image, chead: sitk.Image, mr_to_ct: sitk.Transform) -> float:
    """Dice of the MR head and the CT head mapped into MR space, over the slab both cover."""
    ct_in_mr = sitk.Resample(chead, mhead, mr_to_ct, sitk.sitkNearestNeighbor, 0)
    f = covered(chead, mhead, mr_to_ct)
    a = (sitk.GetArrayFromImage(mhead) > 0) & f
    b = (sitk.GetArrayFromImage(ct_in_mr) > 0) & f
    denom = a.sum() + b.sum()
    return float(2 * (a & b).sum() / denom) if denom else 0.0
