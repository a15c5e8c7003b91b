"""process_pair / process_images: from DICOM files to arrays on the template grid, checked against ground truth.

Accuracy of the registrations on five patients lives in test_register.py; here: the pair from real DICOM
files, the field of view, the single resampling, the outputs' form, and every way a pair can fail.
"""

from __future__ import annotations

import dataclasses
import os
import re
import zlib

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from mrict_dask import register as R
from mrict_dask.config import Config, RegistrationConfig
from mrict_dask.errors import MrictError, VolumeError
from mrict_dask.normalize import ct_to_hu
from mrict_dask.pair import CT_FILL_HU, process_images, process_pair
from mrict_dask.types import QA_KEYS, PairSpec

from .test_register import _phantom_ct, processed, simulated
from .truth import brain_points, series_by_uid, tre_mm


def _png_chunks(data: bytes) -> list[bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        assert zlib.crc32(data[pos + 4:pos + 8 + n]) == int.from_bytes(data[pos + 8 + n:pos + 12 + n], "big")
        out.append(kind)
        pos += 12 + n
    return out


# --------------------------------------------------------------------------------------------- from DICOM
@pytest.mark.slow
def test_process_pair_from_dicom_matches_the_manifest(corpus, template):
    """The generator's DICOM files, read by read_volume, registered: transforms as the manifest says."""
    pair = corpus.manifest["expected_pairs"][0]
    series = series_by_uid(corpus.manifest)
    mr, ct = series[pair["mr_series_uid"]], series[pair["ct_series_uid"]]
    spec = PairSpec(index=0, pair_id="p0", patient="P0000000000000000", split="train", days_apart=0,
                    mr_files=tuple(os.path.join(corpus.url, f) for f in mr["files"]),
                    ct_files=tuple(os.path.join(corpus.url, f) for f in ct["files"]))
    r = process_pair(spec, Config(), template)
    assert r.status == "ok", r.status
    pts = brain_points(template, step=3)
    for true, got in ((mr["transform"], r.mr_affine), (ct["transform"], r.ct_affine)):
        mean, worst = tre_mm(np.array(true), got, pts)
        assert mean <= 1.0 and worst <= 2.0, (mean, worst)
    assert r.timings["read"] > 0 and r.timings["total"] > 0


# --------------------------------------------------------------------------------------------- outputs
@pytest.mark.slow
def test_outputs_on_the_template_grid(template):
    r = processed(1)
    assert r.ok
    shape = template.shape_zyx
    for arr in (r.mr, r.ct):
        assert arr.shape == shape and arr.dtype == np.float32
        assert np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0
    assert r.valid.shape == r.head.shape == r.face.shape == shape and r.valid.dtype == r.head.dtype == bool
    assert r.slice_ok.shape == (shape[0],) and r.slice_ok.dtype == bool and r.slice_ok.sum() > 50
    assert not (r.head & r.face).any()  # the metric mask head & valid never holds a defaced voxel
    box = tuple(int(v) for v in Config().native.box_mm[::-1])  # 1 mm: (z, y, x) voxels
    nat = r.native
    for name in ("mr", "ct", "valid", "head", "face"):
        assert nat[name].shape == box, name
    assert nat["slice_ok"].shape == box[:1] and nat["affine"].shape == (4, 4)
    assert np.allclose(nat["affine"][:3, :3], np.eye(3))  # the MR's patient axes, 1 mm
    assert r.mr_affine.shape == r.ct_affine.shape == (4, 4) and r.mr_affine.dtype == np.float64
    assert (r.ct_lo, r.ct_hi) == Config().normalize.ct_window and r.mr_hi > r.mr_lo
    assert set(r.qa) == set(QA_KEYS) and all(np.isfinite(v) for v in r.qa.values())
    assert r.qa["brain_dice"] >= 0.9 and r.qa["valid_fraction"] == pytest.approx(1.0, abs=1e-3)
    assert set(r.timings) >= {"prepare", "register_mr", "register_ct", "resample", "normalize", "figure"}
    # the figure: a valid PNG with no text chunks (its only words are the drawn plane names)
    chunks = _png_chunks(r.figure_png)
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND"
    assert not {b"tEXt", b"iTXt", b"zTXt"} & set(chunks)


@pytest.mark.slow
def test_ct_is_interpolated_once_from_its_own_grid(template):
    """The stored CT is the source CT sampled once through the composed affine, not MR-resampled twice."""
    p, r = simulated(1), processed(1)
    ref = sitk.Resample(R.prepare_ct(p.ct), template.image, R.affine_from_matrix(r.ct_affine), sitk.sitkLinear,
                        float("nan"), sitk.sitkFloat32)
    hu = sitk.GetArrayFromImage(ref)
    inside = ~np.isnan(hu)
    assert not (r.valid & ~inside).any() and (r.valid & inside).sum() > 0.5 * inside.sum()
    kept = r.valid & ~r.face
    np.testing.assert_allclose(ct_to_hu(r.ct, r.ct_lo, r.ct_hi)[kept], hu[kept], atol=2e-3)
    assert np.all(ct_to_hu(r.ct, r.ct_lo, r.ct_hi)[r.face] == -1024.0)  # defaced: air
    # native space: the CT through the rigid CT -> MR transform only, onto the box the affine describes
    nat = r.native
    box = sitk.Image(list(nat["mr"].shape[::-1]), sitk.sitkFloat32)
    box.SetOrigin(tuple(nat["affine"][:3, 3]))
    mr_to_ct = r.ct_affine @ np.linalg.inv(r.mr_affine)
    hu = sitk.GetArrayFromImage(sitk.Resample(R.prepare_ct(p.ct), box, R.affine_from_matrix(mr_to_ct),
                                              sitk.sitkLinear, float("nan"), sitk.sitkFloat32))
    kept = nat["valid"] & ~nat["face"]
    assert kept.sum() > 1e6 and not np.isnan(hu[kept]).any()
    np.testing.assert_allclose(ct_to_hu(nat["ct"], r.ct_lo, r.ct_hi)[kept], hu[kept], atol=2e-3)
    mr = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(p.mr, sitk.sitkFloat32), box, sitk.Transform(),
                                              sitk.sitkLinear, float("nan"), sitk.sitkFloat32))
    np.testing.assert_allclose(nat["mr"][kept], np.clip((mr[kept] - r.mr_lo) / (r.mr_hi - r.mr_lo), 0, 1), atol=1e-5)


@pytest.mark.slow
def test_valid_is_false_outside_a_short_ct_field_of_view(template):
    """A CT cut to its upper 45 %: `valid` follows the true field of view (from the generator's transform)."""
    p = simulated(2)
    n = p.ct.GetSize()[2]
    ct = p.ct[:, :, int(n * 0.55):]  # keep the top of the head, lose the skull base
    r = process_images(p.mr, ct, Config(), template, "short-fov")
    assert r.status == "ok", r.status
    # ground truth: template voxel centres sent by the true transforms into each series' index space
    zyx = np.argwhere(np.ones(template.shape_zyx, bool))
    xyz = zyx[:, ::-1].astype(float)
    grid = template.image
    d = np.array(grid.GetDirection()).reshape(3, 3) * np.array(grid.GetSpacing())
    phys = np.array(grid.GetOrigin()) + xyz @ d.T

    def inside(img, affine, margin=0.0):
        q = phys @ affine[:3, :3].T + affine[:3, 3]
        di = np.linalg.inv(np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing()))
        idx = (q - np.array(img.GetOrigin())) @ di.T
        lo, hi = -0.5 - margin, np.array(img.GetSize()) - 0.5 + margin
        return np.all((idx >= lo) & (idx <= hi), axis=1).reshape(template.shape_zyx)

    truth = inside(p.mr, p.mr_transform) & inside(ct, p.ct_transform)
    assert 0.2 < truth.mean() < 0.8
    mismatch = (truth != r.valid).mean()
    assert mismatch < 0.01, mismatch  # the border layer, where sub-mm registration error decides
    # outside its field of view the CT is air, and brain slices the CT does not cover are not training samples
    air = (CT_FILL_HU - r.ct_lo) / (r.ct_hi - r.ct_lo)
    clearly_out = ~inside(ct, p.ct_transform, margin=2.0)  # beyond the border layer
    assert np.allclose(r.ct[clearly_out & ~r.face], air) and not r.valid[clearly_out].any()  # (defaced: 0)
    brain = sitk.GetArrayViewFromImage(template.mask) > 0
    covered = (brain & truth).sum(axis=(1, 2)) / np.maximum(brain.sum(axis=(1, 2)), 1)
    assert not r.slice_ok[(covered < 0.5)].any()
    assert r.slice_ok[(covered > 0.999) & (brain.sum(axis=(1, 2)) > 0.1 * brain[0].size)].all()
    assert r.qa["valid_fraction"] == pytest.approx((brain & truth).sum() / brain.sum(), abs=0.01)


@pytest.mark.slow
def test_coarser_output_grid(template):
    """A 2 mm output grid (for speed): same contract on the smaller grid, same accuracy."""
    from mrict_dask.template import load_template

    coarse = load_template(spacing=2.0)
    p = simulated(1)
    r = process_images(p.mr, p.ct, Config(), coarse, "grid-2mm")
    assert r.status == "ok", r.status
    assert r.mr.shape == r.ct.shape == r.valid.shape == coarse.shape_zyx
    assert r.slice_ok.shape == (coarse.shape_zyx[0],) and r.slice_ok.any()
    pts = brain_points(template, step=3)
    for true, got in ((p.mr_transform, r.mr_affine), (p.ct_transform, r.ct_affine)):
        mean, worst = tre_mm(true, got, pts)
        assert mean <= 1.0 and worst <= 2.0, (mean, worst)


# --------------------------------------------------------------------------------------------- failures
def _mr_like(arr: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing((0.98, 0.98, 1.0))
    img.SetOrigin((-125.0, -140.0, -70.0))
    return img


def test_constant_volume_is_refused_with_the_series_named(template):
    ct, _ = _phantom_ct(with_couch=False)
    for value in (0.0, 250.0):
        r = process_images(_mr_like(np.full((40, 64, 64), value)), ct, Config(), template, "const")
        assert r.status == f"failed: MR series: constant volume (every voxel {value:g})"
        assert r.mr is None and r.ct is None and r.valid is None and r.figure_png is None
        assert set(r.qa) == set(QA_KEYS) and np.isnan(r.mr_affine).all()
    mr = _mr_like(np.random.default_rng(0).normal(100, 10, (40, 64, 64)))
    flat_ct = sitk.Image(ct.GetSize(), sitk.sitkFloat32) - 1000.0
    r = process_images(mr, flat_ct, Config(), template, "const")
    assert r.status == "failed: CT series: constant volume (every voxel -1000)"


def test_threads_setting_is_honoured(template):
    ct, _ = _phantom_ct(with_couch=False)
    mr = _mr_like(np.zeros((40, 64, 64)))
    try:
        for n in (2, 1):
            cfg = dataclasses.replace(Config(), registration=RegistrationConfig(threads=n))
            process_images(mr, ct, cfg, template, "threads")
            assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == n
    finally:
        R.set_threads(1)


@pytest.mark.slow
def test_mr_of_noise_fails_with_a_reason(template):
    rng = np.random.default_rng(5)
    noise = _mr_like(rng.gamma(2.0, 200.0, (176, 256, 256)))
    ct, _ = _phantom_ct(with_couch=True)
    r = process_images(noise, ct, Config(), template, "noise")
    assert r.status.startswith("failed: ") and ("MR" in r.status), r.status
    assert r.mr is None and r.figure_png is None


@pytest.mark.slow
def test_ct_without_a_head_fails_before_registering(template):
    p = simulated(1)
    ct, _ = _phantom_ct(with_couch=True)
    arr = sitk.GetArrayFromImage(ct)
    arr[arr != 300.0] = -1000.0  # the couch plate only: a CT that shows no head
    plate = sitk.GetImageFromArray(arr)
    plate.CopyInformation(ct)
    r = process_images(p.mr, plate, Config(), template, "no-head")
    assert r.status.startswith("failed: CT series: no head found"), r.status
    assert "register_mr" not in r.timings  # refused in the preparation step


@pytest.mark.slow
def test_ct_of_another_head_is_implausible(template):
    """An MR with a CT that is not its head (an ellipsoid phantom): refused on the head overlap, not written."""
    p = simulated(1)
    ct, _ = _phantom_ct(with_couch=True)
    r = process_images(p.mr, ct, Config(), template, "wrong-ct")
    # either the rigid fit finds no overlap at all, or the heads it aligns do not match
    assert r.status.startswith(("failed: CT -> MR refused", "failed: CT -> MR (rigid)")), r.status
    assert "0x" not in r.status and "ITK" not in r.status  # a reason for people, not an ITK dump
    assert np.isfinite(r.qa["mr_metric"]) and r.mr is None


@pytest.mark.parametrize("change, reason", [
    ({"mr_det": 0.4}, "MR -> template refused: scaling implausible: determinant 0.400 outside [0.6, 1.6]"),
    ({"mr_det": -1.0}, "MR -> template refused: scaling implausible"),
    ({"brain_dice": 0.5}, "MR -> template refused: brain overlap too low: Dice 0.50 < 0.8"),
    ({"mr_corr": 0.1}, "MR -> template refused: not on a brain: template correlation 0.10 < 0.4"),
    ({"mr_gain": 0.35}, "MR -> template refused: not a local optimum: a fit a few mm or degrees away scores 35 % "
                        "higher (limit 0 %)"),
    ({"mr_corr": 0.1, "brain_dice": 0.5}, "brain overlap too low: Dice 0.50 < 0.8; not on a brain"),
    ({"mr_metric": float("nan")}, "MR -> template registration failed: final metric is nan"),
])
def test_implausible_mr_registration_has_a_reason(change, reason):
    from mrict_dask.errors import RegistrationError
    from mrict_dask.pair import check_mr

    qa = {"mr_metric": -1.4, "brain_dice": 0.97, "mr_det": 1.02, "mr_corr": 0.9, "mr_gain": -0.3}
    check_mr(qa, Config())
    search = {"start": "head top", "candidates": 570, "scale": 0.92, "tilt_deg": [4.5, 0.0, -2.2]}
    with pytest.raises(RegistrationError, match=re.escape(reason)) as exc:
        check_mr({**qa, **change}, Config(), search)
    if "metric is nan" not in reason:  # what the search tried goes with a refusal
        assert "search from the head top: 570 sizes, positions and tilts; best size 0.92" in str(exc.value)


@pytest.mark.parametrize("change, reason", [
    ({"head_overlap": 0.5}, "CT -> MR refused: heads overlap too little: Dice 0.50 < 0.8"),
    ({"skin_mm": 4.2}, "CT -> MR refused: skins do not meet: spread 4.2 mm > 1.5 mm"),
    ({"ct_gain": 0.2}, "CT -> MR refused: not a local optimum: a fit a few mm or degrees away scores 20 % higher"),
    ({"ct_metric": float("nan")}, "CT -> MR registration failed: final metric is nan"),
])
def test_implausible_ct_registration_has_a_reason(change, reason):
    from mrict_dask.errors import RegistrationError
    from mrict_dask.pair import check_ct

    qa = {"ct_metric": -1.0, "head_overlap": 0.97, "skin_mm": 0.4, "ct_gain": -0.3}
    check_ct(qa, Config())
    with pytest.raises(RegistrationError, match=re.escape(reason)):
        check_ct({**qa, **change}, Config())


def test_unreadable_series_is_a_failed_pair_naming_the_modality(tmp_path, template):
    junk = []
    for k in range(3):
        path = tmp_path / f"img{k}"
        path.write_bytes(b"not DICOM at all" * 10)
        junk.append(str(path))
    spec = PairSpec(index=0, pair_id="junk", patient="P0", split="train", days_apart=0,
                    mr_files=tuple(junk), ct_files=tuple(junk))
    r = process_pair(spec, Config(), template)
    assert r.status.startswith("failed: MR: ") and r.mr is None


def test_storage_outage_propagates_for_the_orchestrator_to_retry(s3, tmp_path, template):
    """A transient storage error is not the pair's fault: it is raised, not recorded as a failed pair."""
    from mrict_dask.io import is_transient

    from . import faulty_fs

    faulty_fs.register()
    fs = s3.fs()
    for name in ("mr/1", "mr/2", "ct/1", "ct/2"):
        fs.pipe(s3.url(name), b"bytes the outage keeps us from reading")
    so = faulty_fs.faulty_options(s3.storage_options, rate=1.0, ops=("read",), layer="operation",
                                  max_consecutive=1000, log=str(tmp_path / "faults"))
    spec = PairSpec(index=0, pair_id="outage", patient="P0", split="train", days_apart=0,
                    mr_files=tuple(faulty_fs.to_faulty(s3.url(f"mr/{k}")) for k in (1, 2)),
                    ct_files=tuple(faulty_fs.to_faulty(s3.url(f"ct/{k}")) for k in (1, 2)))
    with pytest.raises(Exception) as info:
        process_pair(spec, Config(), template, so)
    assert is_transient(info.value) and not isinstance(info.value, MrictError)
    assert faulty_fs.faults_injected(str(tmp_path / "faults"))["read"] > 0


def test_other_errors_propagate_for_the_orchestrator_to_retry(template):
    spec = PairSpec(index=0, pair_id="x", patient="P0", split="train", days_apart=0,
                    mr_files=("nosuchprotocol://bucket/a.dcm",), ct_files=("nosuchprotocol://bucket/b.dcm",))
    with pytest.raises(Exception) as info:
        process_pair(spec, Config(), template)
    assert not isinstance(info.value, VolumeError) and "nosuchprotocol" in str(info.value)


# --------------------------------------------------------------------------------------------- defacing, bad input
@pytest.mark.slow
@pytest.mark.parametrize("case", ["defaced_at_source", "head_cut_by_the_mr_field_of_view", "ct_of_the_skull_top"])
def test_bad_input_completes_with_a_note_and_never_removes_brain(case, template):
    """A face already removed at the source (Colin27, a real head, sagittal to the neck, its face emptied in front
    of the eyes and below the brows before it was posed), a head cut by the MR's field of view, a CT of the skull top
    only: each completes (ok with a QA note, or a refusal naming its reason), and no brain voxel is ever defaced."""
    if case == "defaced_at_source":
        from mrict_dask.synth import realheads as RH

        head = RH.load("colin27")
        t1 = sitk.GetArrayFromImage(head.t1)
        d = np.array(head.t1.GetDirection()).reshape(3, 3) * np.array(head.t1.GetSpacing())
        pts = np.array(head.t1.GetOrigin()) + np.indices(t1.shape).reshape(3, -1).T[:, ::-1] @ d.T
        # Colin27's eyes sit near y = -61, z = -36 (LPS mm): everything in front of y = -50 and below z = -10 goes
        t1.reshape(-1)[(pts[:, 1] < -50.0) & (pts[:, 2] < -10.0)] = 0.0
        faceless = sitk.GetImageFromArray(t1)
        faceless.CopyInformation(head.t1)
        posed = RH.posed_pair(dataclasses.replace(head, t1=faceless), "sagittal_3d_neck", (12, 4, -6), (5, -10, 0))
        mr, ct, to_mr = posed.mr, posed.ct, None
    else:
        p = simulated(3)
        mr, ct, to_mr = p.mr, p.ct, p.mr_transform
        if case == "head_cut_by_the_mr_field_of_view":
            n = mr.GetSize()[2]
            mr = mr[:, :, : int(n * 0.65)]  # the top of the head (and of the brain) out of view
        else:
            n = ct.GetSize()[2]
            ct = ct[:, :, int(n * 0.7):]  # the skull's top 30 %
    r = process_images(mr, ct, Config(), template, case)
    if not r.ok:  # a refusal is an answer too, with its reason, never a crash
        assert r.status.startswith("failed: ") and "Traceback" not in r.status, r.status
        return
    if case == "defaced_at_source":
        assert any("removed at the source" in n for n in r.notes), r.notes
    else:
        assert any("cover" in n for n in r.notes), r.notes
    brain = sitk.GetArrayFromImage(template.mask) > 0
    grown = ndi.distance_transform_edt(~brain, sampling=template.image.GetSpacing()[::-1]) <= 3.0
    assert not (r.face & grown).any()
    if to_mr is not None:  # the template brain + 3 mm sent into the MR by the true transform: no face voxel
        d = np.array(template.image.GetDirection()).reshape(3, 3) * np.array(template.image.GetSpacing())
        pts = np.array(template.image.GetOrigin()) + np.argwhere(grown)[::5][:, ::-1].astype(float) @ d.T
        pts = pts @ to_mr[:3, :3].T + to_mr[:3, 3]
        inv = np.linalg.inv(r.native["affine"])
        ijk = np.round(pts @ inv[:3, :3].T + inv[:3, 3]).astype(int)
        keep = ((ijk >= 0) & (ijk < np.array(r.native["face"].shape[::-1]))).all(1)
        assert not r.native["face"][ijk[keep, 2], ijk[keep, 1], ijk[keep, 0]].any()
