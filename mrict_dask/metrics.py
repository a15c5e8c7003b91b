"""How close a synthetic CT is to the reference CT, as the SynthRAD challenges score it (pure numpy/scipy).

Every metric is computed over a mask (``True`` where there is anatomy to score) on two HU volumes of one grid:

- **MAE**: mean absolute HU difference over the mask, no clipping (SynthRAD 2023 and 2025).
- **PSNR**: both images clipped to the population range :data:`HU_RANGE_2023` ([-1024, 3000] HU), then
  ``10 log10(R^2 / MSE)`` over the mask voxels with R = 4024 (SynthRAD 2023).
- **SSIM** (SynthRAD 2023): both images clipped to the range, voxels outside the mask set to its minimum, shifted to
  be non-negative; scikit-image's SSIM map (7-voxel uniform window, K1 0.01, K2 0.03, sample covariance, data range
  R); the mean of the map over the mask after cropping a 3-voxel border from map and mask.
- **MS-SSIM** (SynthRAD 2025): the same preparation with that challenge's range :data:`HU_RANGE_2025`
  ([-1024, 3071] HU); volumes smaller than 97 voxels along an axis are edge-padded to 97; at each of five levels the
  map ``L^w C^w S^w`` (luminance, contrast, structure, each clipped at 0, ``w`` the level's weight
  :data:`MS_SSIM_WEIGHTS`) is averaged over the mask as for SSIM and clipped to [0, 1]; the score is the product
  over the levels. Between levels both images are averaged over 2x2x2 blocks (a zero-padded 'same' convolution
  taken at every other voxel) and the mask is taken at every other voxel.
- **MAE by tissue class** of the reference CT: air (HU < -200), soft tissue (-200 <= HU < 300), bone (HU >= 300)
  (:data:`TISSUE_HU`).

Arithmetic is float64 throughout (the challenges' scripts run on float32 copies of their images). A score is NaN
when it is undefined: an empty mask, an empty tissue class, or an MS-SSIM level whose interior holds no mask voxel.

The SSIM map is computed only where the masked mean needs it: on the bounding box of the counted voxels plus the
window's radius, which gives the same values as the whole-volume map at those voxels, one slab at a time
(:func:`_ssim_means`). The images are 0 outside the mask once prepared, so preparing and downsampling are done on
the mask's bounding box only. The first MS-SSIM level shares its local moments with SSIM when the two ranges clip
nothing differently.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HU_RANGE_2023 = (-1024.0, 3000.0)
"""SynthRAD 2023's population range for PSNR and SSIM."""
HU_RANGE_2025 = (-1024.0, 3071.0)
"""SynthRAD 2025's range for MS-SSIM."""
TISSUE_HU = (-200.0, 300.0)
"""Air below the first threshold, bone at or above the second, soft tissue between (HU of the reference CT)."""
TISSUE_CLASSES = ("air", "soft_tissue", "bone")
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""Wang, Simoncelli and Bovik's five scale weights (2003), as SynthRAD 2025 uses them."""
MS_SSIM_MIN_SIZE = 97
WINDOW = 7  # uniform SSIM window, scikit-image's default
BORDER = (WINDOW - 1) // 2  # voxels of the map cropped at every edge before the masked mean
K1, K2 = 0.01, 0.03


def _as_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    m = np.asarray(mask)
    m = m if m.dtype == bool else m > 0  # binarized as the challenges do (anything above 0 is inside)
    if m.shape != shape:
        raise ValueError(f"mask shape {m.shape} differs from the images' {shape}")
    return m


def _pair(ref: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref, pred = np.asarray(ref), np.asarray(pred)
    if ref.shape != pred.shape:
        raise ValueError(f"reference shape {ref.shape} differs from the prediction's {pred.shape}")
    return ref, pred


def _masked(ref: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mask, reference values, predicted values) at the mask voxels, as float64."""
    ref, pred = _pair(ref, pred)
    m = _as_mask(mask, ref.shape)
    return m, ref[m].astype(np.float64, copy=False), pred[m].astype(np.float64, copy=False)


def _abs_diff(r: np.ndarray, p: np.ndarray) -> np.ndarray:
    d = np.subtract(r, p)
    return np.abs(d, out=d)


def _mae(absd: np.ndarray) -> float:
    return float(absd.sum() / absd.size) if absd.size else float("nan")


def _psnr(r: np.ndarray, p: np.ndarray, hu_range: Sequence[float]) -> float:
    if not r.size:
        return float("nan")
    lo, hi = float(hu_range[0]), float(hu_range[1])
    mse = float(np.mean((np.clip(r, lo, hi) - np.clip(p, lo, hi)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10((hi - lo) ** 2 / mse))


def _by_tissue(r: np.ndarray, absd: np.ndarray, thresholds: Sequence[float]) -> dict[str, float]:
    cls = (r >= float(thresholds[0])).astype(np.intp) + (r >= float(thresholds[1]))  # 0 air, 1 soft tissue, 2 bone
    n = np.bincount(cls, minlength=3)
    total = np.bincount(cls, weights=absd, minlength=3)
    return {name: float(total[k] / n[k]) if n[k] else float("nan") for k, name in enumerate(TISSUE_CLASSES)}


def mae(ref: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute difference over the mask."""
    return _mae(_abs_diff(*_masked(ref, pred, mask)[1:]))


def psnr(ref: np.ndarray, pred: np.ndarray, mask: np.ndarray, hu_range: Sequence[float] = HU_RANGE_2023) -> float:
    """PSNR over the mask voxels with both images clipped to ``hu_range`` and its width as the peak (inf when the
    clipped images agree on every mask voxel)."""
    return _psnr(*_masked(ref, pred, mask)[1:], hu_range)


def mae_by_tissue(ref: np.ndarray, pred: np.ndarray, mask: np.ndarray,
                  thresholds: Sequence[float] = TISSUE_HU) -> dict[str, float]:
    """MAE over the mask voxels of each tissue class of the reference CT (see :data:`TISSUE_HU`)."""
    _, r, p = _masked(ref, pred, mask)
    return _by_tissue(r, _abs_diff(r, p), thresholds)


# ------------------------------------------------------------------------------------------- SSIM machinery
def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box of the True voxels (None: there are none)."""
    ends = [np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax))) for ax in range(mask.ndim)]
    return None if not ends[0].size else tuple(slice(int(v[0]), int(v[-1]) + 1) for v in ends)


def prepare(img: np.ndarray, mask: np.ndarray, hu_range: Sequence[float]) -> np.ndarray:
    """The challenges' SSIM input: clipped to ``hu_range``, the range minimum outside the mask, shifted to start
    at 0 (float64). Computed as ``clip(img - lo, 0, hi - lo)`` inside the mask's bounding box (the same values:
    both round the one difference ``img - lo``), 0 elsewhere."""
    lo, hi = float(hu_range[0]), float(hu_range[1])
    out = np.zeros(np.shape(img))
    box = _bbox(mask)
    if box is None:
        return out
    view = out[box]
    np.subtract(np.asarray(img)[box], lo, out=view, dtype=np.float64)
    np.clip(view, 0.0, hi - lo, out=view)
    np.copyto(view, 0.0, where=~mask[box])
    return out


def _counted(mask: np.ndarray) -> np.ndarray:
    """Mask voxels at least :data:`BORDER` voxels inside every edge: those the cropped masked mean counts."""
    inner = np.zeros_like(mask)
    core = tuple(slice(BORDER, max(n - BORDER, BORDER)) for n in mask.shape)
    inner[core] = mask[core]
    return inner


def _ssim_means(x: np.ndarray, y: np.ndarray, counted: np.ndarray,
                maps: Sequence[tuple[float, float | None]]) -> list[float]:
    """For each ``(data_range, weight)`` of ``maps``, the mean over the counted voxels of scikit-image's SSIM map
    (weight None) or of SynthRAD 2025's ``L^w C^w S^w`` (weight w), from local moments (uniform window, sample
    covariance); NaN without counted voxels.

    scikit-image's map is ``lum * cs`` with ``lum = (2 ux uy + C1) / (ux^2 + uy^2 + C1)`` and
    ``cs = (2 vxy + C2) / (vx + vy + C2)``. SynthRAD 2025's ``L^w C^w S^w``, with its contrast
    ``C = (2 sx sy + C2) / (vx + vy + C2)`` and structure ``S = (vxy + C2/2) / (sx sy + C2/2)`` each clipped at 0,
    is ``(max(lum, 0) * max(cs, 0))^w``: C is never negative and ``C * S = cs``.

    The local means are window sums over the bounding box of the counted voxels widened by the window's radius
    (every window around a counted voxel lies inside it, and inside the volume, since counted voxels keep that
    distance from every edge), so they equal the whole-volume filter's values there. They are summed one slab
    (first axis) at a time: each slab's window means over the other axes are kept for the window's length and added
    up along the first axis as it moves, and the maps are averaged slab by slab. The slabs stay in the processor's
    cache instead of several volumes making several passes each through memory (float64 throughout; the means
    agree with scipy's whole-volume filter to ~1e-14 relative).
    """
    from scipy.ndimage import uniform_filter1d

    nd = counted.ndim
    core = _bbox(counted)
    if core is None:
        return [float("nan")] * len(maps)
    box = tuple(slice(c.start - BORDER, c.stop + BORDER) for c in core)
    xs, ys, inner = x[box], y[box], counted[core]
    shape = inner.shape[1:]
    crop = (slice(None), *[slice(BORDER, -BORDER)] * (nd - 1))
    planes = np.empty((4, *xs.shape[1:]))  # x, y, (x + y)^2, (x - y)^2 of one slab, then their window means
    spare = np.empty_like(planes)
    ring = np.empty((WINDOW, 4, *shape))  # the last WINDOW slabs' window means over the other axes
    run = np.zeros((4, *shape))  # their sum
    cov_norm = WINDOW ** nd / (WINDOW ** nd - 1.0)
    consts = [((K1 * r) ** 2, (K2 * r) ** 2, w) for r, w in maps]
    totals = [0.0] * len(maps)
    for k in range(xs.shape[0]):
        xk, yk = xs[k], ys[k]
        planes[0], planes[1] = xk, yk
        np.square(np.add(xk, yk, out=planes[2]), out=planes[2])
        np.square(np.subtract(xk, yk, out=planes[3]), out=planes[3])
        src, dst = planes, spare
        for ax in range(nd - 1, 0, -1):
            uniform_filter1d(src, WINDOW, axis=ax, output=dst)
            src, dst = dst, src
        slot = ring[k % WINDOW]
        if k >= WINDOW:
            run -= slot
        slot[...] = src[crop]
        run += slot
        j = k - 2 * BORDER  # the slab of counted voxels whose windows end here
        at = np.flatnonzero(inner[j]) if j >= 0 else ()
        if not len(at):
            continue
        ux, uy, ss, dd = run.reshape(4, -1)[:, at] * (1.0 / WINDOW)
        uxy2 = 2 * ux * uy
        uxuy_sq = ux * ux + uy * uy
        # E[x^2] + E[y^2] and 2 E[xy] from the local means of (x + y)^2 and (x - y)^2
        vxy2 = cov_norm * ((ss - dd) / 2 - uxy2)
        vsum = cov_norm * ((ss + dd) / 2 - uxuy_sq)
        for i, (c1, c2, w) in enumerate(consts):
            lum, cs = (uxy2 + c1) / (uxuy_sq + c1), (vxy2 + c2) / (vsum + c2)
            totals[i] += float(np.sum(lum * cs) if w is None else
                               np.sum((np.maximum(lum, 0) * np.maximum(cs, 0)) ** w))
    n = int(inner.sum())
    return [t / n for t in totals]


def ssim(ref: np.ndarray, pred: np.ndarray, mask: np.ndarray, hu_range: Sequence[float] = HU_RANGE_2023) -> float:
    """SynthRAD 2023's masked SSIM (see the module docstring)."""
    ref, pred = _pair(ref, pred)
    m = _as_mask(mask, ref.shape)
    (value,) = _ssim_means(prepare(ref, m, hu_range), prepare(pred, m, hu_range), _counted(m),
                           [(float(hu_range[1]) - float(hu_range[0]), None)])
    return value


def downsample(a: np.ndarray) -> np.ndarray:
    """A 2x2x2 mean filter as a zero-padded 'same' convolution, taken at every other voxel: output voxel ``i``
    averages input voxels ``2i - 1`` and ``2i`` along each axis (voxel -1 being 0)."""
    out = np.asarray(a, dtype=np.float64)
    for ax in range(out.ndim):
        even = [slice(None)] * out.ndim
        even[ax] = slice(0, None, 2)
        half = 0.5 * out[tuple(even)]  # voxels 2i
        odd, into = [slice(None)] * out.ndim, [slice(None)] * out.ndim
        odd[ax], into[ax] = slice(1, None, 2), slice(1, None)
        prev = out[tuple(odd)]  # voxels 2i + 1, i.e. 2(i + 1) - 1
        into[ax] = slice(1, 1 + prev.shape[ax])
        trimmed = [slice(None)] * out.ndim
        trimmed[ax] = slice(0, half.shape[ax] - 1)
        half[tuple(into)] += 0.5 * prev[tuple(trimmed)]
        out = half
    return out


def _pad_to(a: np.ndarray, size: int) -> np.ndarray:
    pads = [((size - n) // 2, size - n - (size - n) // 2) if n < size else (0, 0) for n in a.shape]
    return np.pad(a, pads, mode="edge") if any(p != (0, 0) for p in pads) else a


def _downsampled(a: np.ndarray, support: Sequence[tuple[int, int]]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """:func:`downsample` of ``a``, which is 0 outside the box ``support`` ((start, stop) per axis), computed on
    that box only, and the box where the result is not 0. Output voxel ``i`` averages inputs ``2i - 1`` and ``2i``:
    the box taken from an even start (its first output's voxel ``2i - 1`` lies outside the support, 0 as the
    padding is) to one voxel past its stop (the last output that reaches into it) gives the same values."""
    starts = [b - b % 2 for b, _ in support]
    sub = downsample(a[tuple(slice(b, min(e + 1, n)) for b, (_, e), n in zip(starts, support, a.shape))])
    out = np.zeros(tuple((n + 1) // 2 for n in a.shape))
    box = [(b // 2, b // 2 + m) for b, m in zip(starts, sub.shape)]
    out[tuple(slice(b, e) for b, e in box)] = sub
    return out, box


def _ms_ssim_of_prepared(x: np.ndarray, y: np.ndarray, mask: np.ndarray, data_range: float,
                         weights: Sequence[float], first: float | None = None) -> float:
    """``x`` and ``y`` are 0 outside ``mask`` (as :func:`prepare` makes them); ``first``: the first level's mean
    when the caller has it (the same images, without padding)."""
    x, y, mask = (_pad_to(a, MS_SSIM_MIN_SIZE) for a in (x, y, mask))
    box = _bbox(mask)
    if box is None:
        return float("nan")
    support = [(b.start, b.stop) for b in box]
    means = []
    for level, w in enumerate(weights):
        if level:
            (x, support), (y, _) = _downsampled(x, support), _downsampled(y, support)
            mask = mask[::2, ::2, ::2]
        (mean,) = [first] if level == 0 and first is not None else \
            _ssim_means(x, y, _counted(mask), [(data_range, float(w))])
        if np.isnan(mean):
            return float("nan")
        means.append(min(max(mean, 0.0), 1.0))
    return float(np.prod(means))


def ms_ssim(ref: np.ndarray, pred: np.ndarray, mask: np.ndarray, hu_range: Sequence[float] = HU_RANGE_2025,
            weights: Sequence[float] = MS_SSIM_WEIGHTS) -> float:
    """SynthRAD 2025's masked multi-scale SSIM of two 3D volumes (see the module docstring).

    The challenge's code sets each level's luminance exponent to that level's weight, like contrast and structure
    (its separate luminance weights are never used), and so does this function.
    """
    ref, pred = _pair(ref, pred)
    if ref.ndim != 3:
        raise ValueError(f"MS-SSIM needs 3D volumes, got {ref.ndim} dimensions")
    m = _as_mask(mask, ref.shape)
    return _ms_ssim_of_prepared(prepare(ref, m, hu_range), prepare(pred, m, hu_range), m,
                                float(hu_range[1]) - float(hu_range[0]), weights)


# ------------------------------------------------------------------------------------------- everything at once
def score(ref: np.ndarray, pred: np.ndarray, mask: np.ndarray, tissue_hu: Sequence[float] = TISSUE_HU) -> dict:
    """Every metric of one pair: ``mae``, ``psnr``, ``ssim``, ``ms_ssim``, ``mae_<tissue class>`` and
    ``mask_voxels``; the same values as the single functions, computed once where they share work."""
    m, r, p = _masked(ref, pred, mask)
    absd = _abs_diff(r, p)
    out: dict[str, float] = {"mae": _mae(absd), "psnr": _psnr(r, p, HU_RANGE_2023)}
    out.update({f"mae_{k}": v for k, v in _by_tissue(r, absd, tissue_hu).items()})
    lo23, hi23 = HU_RANGE_2023
    lo25, hi25 = HU_RANGE_2025
    r23, p23 = prepare(ref, m, HU_RANGE_2023), prepare(pred, m, HU_RANGE_2023)
    # The two ranges share their minimum: when nothing inside the mask exceeds the 2023 maximum, both prepare the
    # same images, and (without padding to the minimum size) the first MS-SSIM level averages over the same local
    # moments: one pass gives both.
    same = lo23 == lo25 and (not r.size or max(r.max(), p.max()) <= hi23)
    shared = same and m.ndim == 3 and min(m.shape) >= MS_SSIM_MIN_SIZE
    maps = [(hi23 - lo23, None)] + ([(hi25 - lo25, MS_SSIM_WEIGHTS[0])] if shared else [])
    out["ssim"], *first = _ssim_means(r23, p23, _counted(m), maps)
    r25, p25 = (r23, p23) if same else (prepare(ref, m, HU_RANGE_2025), prepare(pred, m, HU_RANGE_2025))
    out["ms_ssim"] = _ms_ssim_of_prepared(r25, p25, m, hi25 - lo25, MS_SSIM_WEIGHTS, first[0] if first else None) \
        if m.ndim == 3 else float("nan")
    out["mask_voxels"] = int(m.sum())
    return out
