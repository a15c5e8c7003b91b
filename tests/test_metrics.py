"""The metrics against values worked out by hand and against scikit-image and SciPy called directly, following the
SynthRAD recipes step by step (to 1e-6 relative)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.signal import fftconvolve
from skimage.metrics import structural_similarity
from skimage.util import crop

from mrict_dask import metrics

REL = 1e-6


def _volumes(shape, seed: int, noise: float = 40.0):
    """A smooth 'CT' in HU with values beyond both ends of the population range, and a noisy prediction of it."""
    rng = np.random.default_rng(seed)
    ref = gaussian_filter(rng.normal(0, 1, shape), 2) * 6000 + 200
    ref.flat[rng.choice(ref.size, 30, replace=False)] = rng.choice([-3000.0, 3500.0, 5000.0], 30)
    pred = ref + gaussian_filter(rng.normal(0, noise, shape), 1) + rng.normal(0, noise / 4, shape)
    return ref, pred


def _prepared(img, mask, lo, hi):
    """SynthRAD's SSIM input, step by step: clip, outside the mask the minimum, shifted to start at 0."""
    return np.where(mask, np.clip(img, lo, hi), lo) - lo


def test_mae_and_mae_by_tissue_by_hand():
    ref = np.array([-1000, -100, 0, 50, 250, 400, 1200, 3100], float).reshape(2, 2, 2)
    pred = np.array([-950, -100, 20, 30, 300, 300, 1000, 2500], float).reshape(2, 2, 2)
    mask = np.ones((2, 2, 2), bool)
    mask.flat[7] = False  # the 600 HU error is outside
    # |differences| inside: 50, 0, 20, 20, 50, 100, 200
    assert metrics.mae(ref, pred, mask) == pytest.approx(440 / 7, rel=REL)
    by = metrics.mae_by_tissue(ref, pred, mask)  # air < -200 <= soft tissue < 300 <= bone
    assert by == pytest.approx({"air": 50.0, "soft_tissue": (0 + 20 + 20 + 50) / 4, "bone": (100 + 200) / 2}, rel=REL)
    assert math.isnan(metrics.mae_by_tissue(ref, pred, mask, thresholds=(-2000, -1500))["soft_tissue"])
    assert math.isnan(metrics.mae(ref, pred, np.zeros_like(mask)))


def test_psnr_clips_both_images_to_the_population_range():
    ref = np.array([3500, -2000, 0, 4000, 0], float).reshape(1, 1, 5)
    pred = np.array([2900, -1000, 10, 5000, 2000], float).reshape(1, 1, 5)
    mask = np.array([1, 1, 1, 1, 0], bool).reshape(1, 1, 5)
    # clipped to [-1024, 3000]: (3000, 2900), (-1024, -1000), (0, 10), (3000, 3000) -> squared errors 10000, 576, 100, 0
    assert metrics.psnr(ref, pred, mask) == pytest.approx(10 * math.log10(4024**2 / (10676 / 4)), rel=REL)
    assert metrics.psnr(ref, np.minimum(ref, 3000), mask) == math.inf  # equal once clipped
    assert math.isnan(metrics.psnr(ref, pred, np.zeros_like(mask)))


def test_ssim_matches_scikit_image_with_the_mask_at_the_crop_border():
    ref, pred = _volumes((20, 24, 22), seed=1, noise=400)
    mask = np.zeros(ref.shape, bool)
    mask[0:14, 5:24, 2:20] = True  # touches the first z and the last y voxel: inside the cropped border
    mask[16:19, 1:4, 19:22] = True  # a blob mostly in the border
    lo, hi = -1024, 3000
    _, ssim_map = structural_similarity(_prepared(ref, mask, lo, hi), _prepared(pred, mask, lo, hi),
                                        data_range=hi - lo, full=True)
    expected = crop(ssim_map, 3)[crop(mask, 3)].mean()
    assert metrics.ssim(ref, pred, mask) == pytest.approx(expected, rel=REL)
    assert abs(ssim_map[mask].mean() - expected) > 1e-3  # the border crop matters for this mask
    border_only = np.zeros(ref.shape, bool)
    border_only[:3] = True
    assert math.isnan(metrics.ssim(ref, pred, border_only))
    assert metrics.ssim(ref, ref, mask) == pytest.approx(1.0, rel=1e-12)


def _ms_ssim_reference(ref, pred, mask, lo=-1024.0, hi=3071.0):
    """SynthRAD 2025's masked MS-SSIM with scikit-image's SSIM map and SciPy's convolution: the level map
    L^w C^w S^w equals (skimage's map)^w where that map is not negative (asserted)."""
    weights = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    x, y = _prepared(ref, mask, lo, hi), _prepared(pred, mask, lo, hi)
    m = mask.astype(float)
    pads = [((97 - n) // 2, 97 - n - (97 - n) // 2) if n < 97 else (0, 0) for n in x.shape]
    x, y, m = (np.pad(a, pads, mode="edge") for a in (x, y, m))
    values = []
    for level, w in enumerate(weights):
        _, ssim_map = structural_similarity(x, y, data_range=hi - lo, full=True)
        assert ssim_map.min() >= 0, level
        values.append(np.clip((crop(ssim_map, 3) ** w)[crop(m, 3).astype(bool)].mean(), 0, 1))
        x, y = (fftconvolve(a, np.ones((2, 2, 2)) / 8, mode="same") for a in (x, y))
        x, y, m = x[::2, ::2, ::2], y[::2, ::2, ::2], m[::2, ::2, ::2]
    return float(np.prod(values))


def test_ms_ssim_matches_scikit_image_and_scipy_level_by_level():
    ref, pred = _volumes((30, 26, 100), seed=2, noise=60)  # padded to 97 along two axes, not the third
    mask = np.zeros(ref.shape, bool)
    mask[2:28, 0:24, 10:95] = True
    expected = _ms_ssim_reference(ref, pred, mask)
    assert metrics.ms_ssim(ref, pred, mask) == pytest.approx(expected, rel=REL)
    assert metrics.ms_ssim(ref, ref, mask) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("above_3000", [False, True])
def test_score_gives_the_single_metrics(above_3000):
    """score() shares work between SSIM and the first MS-SSIM level only when the two ranges clip alike."""
    ref, pred = _volumes((97, 98, 99), seed=3)
    if not above_3000:
        ref, pred = np.minimum(ref, 2900), np.minimum(pred, 2900)
    mask = np.zeros(ref.shape, bool)
    mask[5:90, 8:95, 3:97] = True
    got = metrics.score(ref, pred, mask)
    want = {"mae": metrics.mae(ref, pred, mask), "psnr": metrics.psnr(ref, pred, mask),
            "ssim": metrics.ssim(ref, pred, mask), "ms_ssim": metrics.ms_ssim(ref, pred, mask),
            **{f"mae_{k}": v for k, v in metrics.mae_by_tissue(ref, pred, mask).items()},
            "mask_voxels": int(mask.sum())}
    assert got == pytest.approx(want, rel=1e-12)
