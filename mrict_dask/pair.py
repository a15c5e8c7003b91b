"""One pair, end to end, as a pure function: read both series, register, resample once, normalize, QA.

`process_pair` is what a worker runs; `process_images` is its core on in-memory images, for tests and
notebooks. Deterministic refusals (a bad volume, an implausible registration) come back as a failed
`PairResult` with the reason; I/O errors (OSError, ...) propagate so the orchestrator can retry them.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import SimpleITK as sitk

from . import register as R
from .config import Config
from .errors import RegistrationError, VolumeError
from .normalize import check_volume, normalize_ct, normalize_mr, slice_ok
from .qa import brain_dice, empty_qa, overlay_png
from .template import Template
from .types import PairResult, PairSpec

log = logging.getLogger(__name__)

CT_FILL_HU = -1000.0  # outside the CT's field of view: air, flagged invalid


def _to_template(img: sitk.Image, grid: sitk.Image, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``img`` resampled onto ``grid`` through ``matrix`` (linear), with the mask of where it had data.

    One pass: NaN as the default value marks the points that fall outside the source grid.
    """
    out = sitk.Resample(sitk.Cast(img, sitk.sitkFloat32), grid, R.affine_from_matrix(matrix), sitk.sitkLinear,
                        float("nan"), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(out)
    inside = ~np.isnan(arr)
    return arr, inside


def check_mr(qa: dict[str, float], config: Config) -> None:
    """Raise RegistrationError when the MR -> template numbers say the fit cannot be trusted."""
    cfg = config.registration
    if not np.isfinite(qa["mr_metric"]):
        raise RegistrationError(f"MR -> template registration failed: final metric is {qa['mr_metric']}")
    lo, hi = cfg.det_range
    if not lo <= qa["mr_det"] <= hi:
        raise RegistrationError(f"implausible MR -> template scaling: determinant {qa['mr_det']:.3f} "
                                f"outside [{lo:g}, {hi:g}]")
    if not qa["brain_dice"] >= cfg.min_brain_overlap:
        raise RegistrationError(f"brain overlap too low after MR -> template: Dice {qa['brain_dice']:.2f} "
                                f"< {cfg.min_brain_overlap:g}")


def check_ct(qa: dict[str, float], head_overlap: float, config: Config) -> None:
    """Raise RegistrationError when the CT -> MR numbers say the fit cannot be trusted."""
    floor = config.registration.min_brain_overlap
    if not np.isfinite(qa["ct_metric"]):
        raise RegistrationError(f"CT -> MR registration failed: final metric is {qa['ct_metric']}")
    # the brain-overlap floor serves for the heads too: a right CT -> MR fit overlaps them at ~0.97
    if not head_overlap >= floor:
        raise RegistrationError(f"CT and MR heads overlap too little after CT -> MR: Dice {head_overlap:.2f} "
                                f"< {floor:g}")


def process_images(mr: sitk.Image, ct: sitk.Image, config: Config, template: Template,
                   pair_id: str = "") -> PairResult:
    """Register, resample once onto the template grid, normalize and QA one MR/CT pair of images."""
    timings: dict[str, float] = {}
    qa = empty_qa()
    rc = config.registration
    R.set_threads(rc.threads)
    start = t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timings[name] = now - t
        t = now

    try:
        check_volume(sitk.GetArrayViewFromImage(mr), "MR series")
        check_volume(sitk.GetArrayViewFromImage(ct), "CT series")
        mr_w = R.work_image(mr, rc)
        mr_head = R.head_mask_mr(mr_w)
        ct_clamped = R.prepare_ct(ct)
        ct_w = R.resample_iso(ct_clamped, rc.working_spacing_mm, default=R.CT_CLAMP[0])
        ct_head = R.head_mask_ct(ct_w)  # before registering anything: a CT without a head fails fast
        lap("prepare")

        mr_tx, mr_info = R.register_mr_to_template(mr, template, rc, mr_work=mr_w, mr_head=mr_head)
        mr_affine = R.to_matrix(mr_tx)
        qa["mr_metric"] = float(mr_info["metric"])
        qa["mr_det"] = float(np.linalg.det(mr_affine[:3, :3]))
        wt = R.work_template(template, rc.working_spacing_mm)
        mr_in_t_w = sitk.Resample(mr_w, wt.image, mr_tx, sitk.sitkLinear, 0.0)
        qa["brain_dice"] = brain_dice(sitk.GetArrayViewFromImage(mr_in_t_w), sitk.GetArrayViewFromImage(wt.mask),
                                      rc.working_spacing_mm)
        lap("register_mr")
        check_mr(qa, config)

        ct_tx, ct_info = R.register_ct_to_mr(ct, mr, rc, mr_work=mr_w, mr_head=mr_head, ct_work=ct_w,
                                             ct_head=ct_head)
        qa["ct_metric"] = float(ct_info["metric"])
        ct_affine = R.to_matrix(ct_tx) @ mr_affine  # template -> MR -> CT: one matrix, one interpolation
        lap("register_ct")
        check_ct(qa, float(ct_info["head_overlap"]), config)

        grid = template.image
        mr_t, mr_valid = _to_template(mr, grid, mr_affine)
        ct_t, ct_valid = _to_template(ct_clamped, grid, ct_affine)
        mr_t[~mr_valid] = 0.0
        ct_t[~ct_valid] = CT_FILL_HU
        valid = mr_valid & ct_valid
        head_t = sitk.GetArrayFromImage(
            sitk.Resample(mr_head, grid, R.affine_from_matrix(mr_affine), sitk.sitkNearestNeighbor, 0)) > 0
        lap("resample")

        brain = sitk.GetArrayViewFromImage(template.mask) > 0
        mr_n, mr_lo, mr_hi = normalize_mr(mr_t, head_t & mr_valid, config.normalize.mr_percentiles, name="MR series")
        mr_n[~mr_valid] = 0.0
        ct_n, ct_lo, ct_hi = normalize_ct(ct_t, head_t & valid, config.normalize, name="CT series")
        ok_slices = slice_ok(brain, valid, config.normalize)
        n_brain = int(brain.sum())
        qa["valid_fraction"] = float((brain & valid).sum() / n_brain) if n_brain else 0.0
        lap("normalize")

        centre = tuple(int(v) for v in np.argwhere(brain).mean(axis=0)) if n_brain else None
        figure = overlay_png(mr_n, ct_t, centre, grid.GetSpacing(), grid.GetDirection())
        lap("figure")
    except (VolumeError, RegistrationError) as err:
        timings["total"] = time.perf_counter() - start
        log.info("pair %s failed: %s", pair_id, err)
        return PairResult(pair_id=pair_id, status=f"failed: {err}", qa=qa, timings=timings)

    timings["total"] = time.perf_counter() - start
    log.info("pair %s ok: MR metric %.3f, CT metric %.3f, brain Dice %.2f, valid %.2f, %.1f s", pair_id,
             qa["mr_metric"], qa["ct_metric"], qa["brain_dice"], qa["valid_fraction"], timings["total"])
    return PairResult(
        pair_id=pair_id, status="ok", mr=mr_n, ct=ct_n, valid=valid, slice_ok=ok_slices,
        mr_lo=float(mr_lo), mr_hi=float(mr_hi), ct_lo=float(ct_lo), ct_hi=float(ct_hi),
        mr_affine=mr_affine, ct_affine=ct_affine, qa=qa, figure_png=figure, timings=timings,
    )


def process_pair(pair: PairSpec, config: Config, template: Template,
                 storage_options: dict | None = None) -> PairResult:
    """Read the pair's two series from storage (on the worker) and process them."""
    from .volume import read_volume

    t = time.perf_counter()
    try:
        which = "MR"
        mr = read_volume(pair.mr_files, storage_options, config.plan)
        which = "CT"
        ct = read_volume(pair.ct_files, storage_options, config.plan)
    except VolumeError as err:
        log.info("pair %s refused: %s: %s", pair.pair_id, which, err)
        return PairResult(pair_id=pair.pair_id, status=f"failed: {which}: {err}", qa=empty_qa(),
                          timings={"read": time.perf_counter() - t})
    read_s = time.perf_counter() - t
    result = process_images(mr, ct, config, template, pair.pair_id)
    result.timings = {"read": read_s, **result.timings}
    return result
