"""Registration and normalization, measured against the synthetic generator's ground truth.

Accuracy: target registration error (true vs recovered template -> series transform) over template brain
voxels, for MR -> template and for CT -> template through the composition, on seeded synthetic patients.
"""

from __future__ import annotations

import dataclasses
from functools import cache

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from mrict_dask import register as R
from mrict_dask.config import Config, NormalizeConfig, RegistrationConfig
from mrict_dask.errors import VolumeError
from mrict_dask.normalize import ct_to_hu, normalize_ct, normalize_mr, slice_ok

from .truth import brain_points, tre_mm

SEEDS = (1, 2, 3, 4, 5)


@cache
def simulated(seed: int):
    """One synthetic patient (the generator's in-memory twin of a corpus pair), shared by test modules."""
    from mrict_dask.synth import simulate_patient
    from mrict_dask.template import load_template

    return simulate_patient(seed, load_template())


@cache
def processed(seed: int):
    """``process_images`` on one synthetic patient with the default configuration (1 ITK thread)."""
    from mrict_dask.pair import process_images
    from mrict_dask.template import load_template

    p = simulated(seed)
    return process_images(p.mr, p.ct, Config(), load_template(), f"sim-{seed}")


@pytest.fixture(scope="module")
def points(template):
    return brain_points(template, step=3)


# --------------------------------------------------------------------------------------------- accuracy
@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_registration_error_against_ground_truth(seed, points):
    """MR -> template and CT -> template (composed through the MR) within 1 mm mean, 2 mm max."""
    p, r = simulated(seed), processed(seed)
    assert r.status == "ok", r.status
    mr_mean, mr_max = tre_mm(p.mr_transform, r.mr_affine, points)
    ct_mean, ct_max = tre_mm(p.ct_transform, r.ct_affine, points)
    assert mr_mean <= 1.0 and mr_max <= 2.0, (mr_mean, mr_max)
    assert ct_mean <= 1.0 and ct_max <= 2.0, (ct_mean, ct_max)
    # the CT affine is rigid relative to the MR one (CT -> MR is rigid; the patient's size lives in mr_affine)
    rel = r.ct_affine @ np.linalg.inv(r.mr_affine)
    np.testing.assert_allclose(rel[:3, :3] @ rel[:3, :3].T, np.eye(3), atol=1e-6)


@pytest.mark.slow
def test_registration_is_reproducible_with_one_thread():
    """Same input, same seed, one thread: bit-identical affine (the sampling is seeded)."""
    from mrict_dask.template import load_template

    p, r = simulated(SEEDS[0]), processed(SEEDS[0])
    tx, info = R.register_mr_to_template(p.mr, load_template(), RegistrationConfig(threads=1))
    assert np.array_equal(R.to_matrix(tx), r.mr_affine)
    assert info["metric"] == r.qa["mr_metric"]


# --------------------------------------------------------------------------------------------- transforms
def _random_rigid(rng) -> sitk.Euler3DTransform:
    tx = sitk.Euler3DTransform()
    tx.SetCenter(tuple(rng.uniform(-50, 50, 3)))
    tx.SetRotation(*rng.uniform(-0.4, 0.4, 3))
    tx.SetTranslation(tuple(rng.uniform(-20, 20, 3)))
    return tx


def test_to_matrix_matches_transform_point():
    rng = np.random.default_rng(0)
    rigid = _random_rigid(rng)
    aff = sitk.AffineTransform(3)
    aff.SetCenter(tuple(rng.uniform(-30, 30, 3)))
    aff.SetMatrix(tuple((np.eye(3) + rng.uniform(-0.1, 0.1, (3, 3))).ravel()))
    aff.SetTranslation(tuple(rng.uniform(-10, 10, 3)))
    composite = sitk.CompositeTransform([rigid, aff])  # applies aff first, then rigid
    pts = rng.uniform(-100, 100, (20, 3))
    for tx in (rigid, aff, composite):
        m = R.to_matrix(tx)
        expected = np.array([tx.TransformPoint(tuple(p)) for p in pts])
        np.testing.assert_allclose(pts @ m[:3, :3].T + m[:3, 3], expected, atol=1e-9)
    np.testing.assert_allclose(R.to_matrix(composite), R.to_matrix(rigid) @ R.to_matrix(aff), atol=1e-12)
    # and back: an affine built from the matrix, about any centre, is the same map
    back = R.affine_from_matrix(R.to_matrix(composite), center=(10.0, -5.0, 3.0))
    np.testing.assert_allclose(R.to_matrix(back), R.to_matrix(composite), atol=1e-9)


def test_to_matrix_refuses_a_nonlinear_transform():
    arr = np.zeros((8, 8, 8, 3))
    arr[4, 4, 4] = (3.0, 0.0, 0.0)
    field = sitk.GetImageFromArray(arr, isVector=True)
    field.SetOrigin((30.0, -60.0, 70.0))
    field.SetSpacing((3.0, 3.0, 3.0))
    with pytest.raises(ValueError, match="not a linear"):
        R.to_matrix(sitk.DisplacementFieldTransform(field))


# --------------------------------------------------------------------------------------------- masks
def _phantom_ct(with_couch: bool) -> tuple[sitk.Image, np.ndarray]:
    """An ellipsoid 'head' (skull shell, brain) lying on a couch plate that touches the scalp; 1 mm grid."""
    z, y, x = np.mgrid[0:160, 0:220, 0:200].astype(np.float32)
    r = np.sqrt(((x - 100) / 72) ** 2 + ((y - 100) / 88) ** 2 + ((z - 80) / 70) ** 2)
    hu = np.full(r.shape, -1000.0, np.float32)
    hu[r < 1.0] = 20.0
    hu[(r >= 0.88) & (r < 0.95)] = 1200.0
    head = r < 1.0
    if with_couch:
        hu[:, 188:196, 10:190] = 300.0  # 8 mm plate, touching the back of the head
        hu[:, 186:188, 90:110] = 100.0  # and a pad bridging scalp and plate
    img = sitk.GetImageFromArray(hu)
    img.SetOrigin((-100.0, -100.0, -80.0))
    return img, head


def test_ct_head_mask_leaves_out_a_touching_couch():
    ct, truth = _phantom_ct(with_couch=True)
    ct_w = R.resample_iso(R.prepare_ct(ct), 2.0, default=-1024.0)
    mask = sitk.GetArrayFromImage(sitk.Resample(R.head_mask_ct(ct_w), ct, sitk.Transform(),
                                                sitk.sitkNearestNeighbor, 0)) > 0
    couch = np.zeros_like(truth)
    couch[:, 190:196, 10:190] = True
    # what stays is the plate right under the pad that bridges it to the scalp, within an opening radius
    kept = mask & couch
    assert kept.sum() < 0.05 * couch.sum()
    assert ndi.distance_transform_edt(~truth)[kept].max(initial=0) <= R.CT_OPENING_MM + 2
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.95


def test_ct_head_mask_without_couch_is_the_head():
    ct, truth = _phantom_ct(with_couch=False)
    ct_w = R.resample_iso(R.prepare_ct(ct), 2.0, default=-1024.0)
    mask = sitk.GetArrayFromImage(sitk.Resample(R.head_mask_ct(ct_w), ct, sitk.Transform(),
                                                sitk.sitkNearestNeighbor, 0)) > 0
    assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.98


def test_ct_without_a_head_is_refused():
    ct, _ = _phantom_ct(with_couch=True)
    arr = sitk.GetArrayFromImage(ct)
    arr[arr != 300.0] = -1000.0  # only the couch plate is left
    empty = sitk.GetImageFromArray(arr)
    empty.CopyInformation(ct)
    with pytest.raises(VolumeError, match="CT series: no head"):
        R.head_mask_ct(R.resample_iso(R.prepare_ct(empty), 2.0, default=-1024.0))


def test_hole_filling_matches_scipy_slice_by_slice():
    """fill_holes / fill_slices label once per axis; scipy's binary_fill_holes, 3D and then slice by slice along
    each axis, is the reference."""
    rng = np.random.default_rng(7)
    for k in range(25):
        a = ndi.binary_opening(rng.random((18, 23, 29)) < rng.uniform(0.3, 0.8))
        want = ndi.binary_fill_holes(a)
        assert np.array_equal(R.fill_holes(a), want), k
        for axis in range(3):
            moved = np.moveaxis(want, axis, 0)
            want = np.moveaxis(np.stack([ndi.binary_fill_holes(s) for s in moved]), 0, axis)
        assert np.array_equal(R.fill_slices(a), want), k
    ring = np.zeros((5, 9, 9), bool)
    ring[:, 2:7, 2:7] = True
    ring[:, 3:6, 3:6] = False  # a tube: open along z in 3D, a hole in every axial slice
    assert not R.fill_holes(ring)[2, 4, 4] and R.fill_slices(ring)[2, 4, 4]


def test_top_visible_follows_the_superior_axis_whatever_the_slice_order():
    mask = np.zeros((30, 20, 20), np.uint8)
    mask[5:29, 5:15, 5:15] = 1  # ends one slice below the last (highest index) slice
    img = sitk.GetImageFromArray(mask)
    assert R.top_visible(img)
    mask[29] = mask[28]
    touching = sitk.GetImageFromArray(mask)
    assert not R.top_visible(touching)
    touching.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))  # slices stored top-down: index 0 is superior
    assert R.top_visible(touching)


# --------------------------------------------------------------------------------------------- normalize
def test_ct_window_round_trip_is_exact_to_float32():
    rng = np.random.default_rng(3)
    cfg = NormalizeConfig()
    lo, hi = cfg.ct_window
    hu = rng.uniform(lo, hi, 200_000).astype(np.float32)
    hu[:4] = (lo, hi, 0.0, -1000.0)
    scaled, got_lo, got_hi = normalize_ct(hu, None, cfg)
    assert (got_lo, got_hi) == (lo, hi) and scaled.dtype == np.float32
    assert scaled.min() >= 0.0 and scaled.max() <= 1.0
    back = ct_to_hu(scaled, got_lo, got_hi)
    # one float32 rounding of the scaled value, carried through the window's width
    tol = (hi - lo) * np.finfo(np.float32).eps
    np.testing.assert_allclose(back, hu, rtol=0, atol=tol)
    assert back[0] == lo and back[1] == hi


def test_scaling_in_place_gives_the_same_values():
    """The pair task scales its volumes in place (``out=``): the same float32 values as a fresh array, which is
    float64 arithmetic rounded once (computed here independently)."""
    rng = np.random.default_rng(5)
    hu = rng.normal(0, 900, (6, 7, 8)).astype(np.float32)
    lo, hi = (np.float64(v) for v in NormalizeConfig().ct_window)
    want = ((np.clip(hu.astype(np.float64), lo, hi) - lo) / (hi - lo)).astype(np.float32)
    fresh, _, _ = normalize_ct(hu, None)
    work = hu.copy()
    same, _, _ = normalize_ct(work, None, out=work)
    assert same is work
    np.testing.assert_array_equal(fresh, want)
    np.testing.assert_array_equal(same, want)
    with pytest.raises(ValueError, match="float32"):
        normalize_ct(hu, None, out=np.empty(hu.shape, np.float64))


def test_ct_percentile_mode_and_clipping():
    rng = np.random.default_rng(4)
    hu = rng.normal(40, 300, (20, 30, 30)).astype(np.float32)
    mask = np.zeros(hu.shape, bool)
    mask[5:15] = True
    cfg = dataclasses.replace(NormalizeConfig(), ct_mode="percentile", ct_percentiles=(2.0, 98.0))
    scaled, lo, hi = normalize_ct(hu, mask, cfg)
    assert (lo, hi) == tuple(np.percentile(hu[mask], [2.0, 98.0]))
    inside = (hu >= lo) & (hu <= hi)
    np.testing.assert_allclose(ct_to_hu(scaled, lo, hi)[inside], hu[inside], atol=(hi - lo) * 1.2e-7)
    assert scaled[hu < lo].max() == 0.0 and scaled[hu > hi].min() == 1.0


def test_mr_percentiles_come_from_inside_the_mask():
    arr = np.zeros((10, 40, 40), np.float32)  # most of the volume: empty background
    arr[:, 10:30, 10:30] = np.linspace(100, 500, 400, dtype=np.float32).reshape(20, 20)
    mask = arr > 0
    scaled, lo, hi = normalize_mr(arr, mask, (1.0, 99.0))
    assert (lo, hi) == tuple(np.percentile(arr[mask], [1.0, 99.0]))
    assert lo > 100  # the background zeros did not pull the low percentile down
    assert scaled.dtype == np.float32 and scaled.min() == 0.0 and scaled.max() == 1.0


@pytest.mark.parametrize("case", ["constant", "empty_mask", "nan"])
def test_degenerate_volumes_are_refused_with_the_series_named(case):
    arr = np.full((8, 16, 16), 7.0, np.float32)
    mask = np.ones(arr.shape, bool)
    if case == "empty_mask":
        arr = np.random.default_rng(0).normal(size=arr.shape).astype(np.float32)
        mask[:] = False
    if case == "nan":
        arr[0, 0, 0] = np.nan
    with pytest.raises(VolumeError, match="MR series"):
        normalize_mr(arr, mask, (1.0, 99.0), name="MR series")
    with pytest.raises(VolumeError, match="CT series"):
        normalize_ct(arr, mask, dataclasses.replace(NormalizeConfig(), ct_mode="percentile"), name="CT series")


def test_slice_ok_needs_brain_and_coverage():
    brain = np.zeros((4, 10, 10), bool)
    brain[1:, 2:8, 2:8] = True  # slice 0: no brain
    valid = np.ones_like(brain)
    valid[2, :, :5] = False  # slice 2: half the brain outside the field of view
    brain[3] = False
    brain[3, 5, 5] = True  # slice 3: a single brain voxel (1 % of the slice)
    cfg = NormalizeConfig(min_brain_fraction=0.05, min_valid_fraction=0.95)
    assert slice_ok(brain, valid, cfg).tolist() == [False, True, False, False]
