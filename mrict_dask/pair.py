"""One pair, end to end, as a pure function: read both series, register, resample once, normalize, QA.

`process_pair` is what a worker runs; `process_images` is its core on in-memory images, for tests and
notebooks. Deterministic refusals (a bad volume, an implausible registration) come back as a failed
`PairResult` with the reason; I/O errors propagate so the orchestrator can retry them.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import SimpleITK as sitk

from .config import Config
from .errors import RegistrationError, VolumeError
from .normalize import normalize_ct, normalize_mr, slice_ok
from .template import Template
from .types import QA_KEYS, PairResult, PairSpec

log = logging.getLogger(__name__)

CT_FILL_HU = -1000.0  # outside the CT's field of view: air, flagged invalid
MIN_HEAD_OVERLAP = 0.6  # Dice of MR and CT heads after CT -> MR; below it the rigid fit is not trusted


def _fov(img: sitk.Image, reference: sitk.Image, tx: sitk.Transform) -> np.ndarray:
    """Voxels of ``reference`` whose mapped point falls inside ``img``'s grid (its field of view)."""
    ones = sitk.Image(img.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(img)
    return sitk.GetArrayFromImage(sitk.Resample(ones, reference, tx, sitk.sitkNearestNeighbor, 0)) > 0


def check_plausible(qa: dict[str, float], head_overlap: float, config: Config) -> None:
    """Raise RegistrationError when the QA numbers say the registration cannot be trusted."""
    cfg = config.registration
    for key in ("mr_metric", "ct_metric"):
        if not np.isfinite(qa[key]):
            raise RegistrationError(f"{key.replace('_', ' ')} is not finite")
    lo, hi = cfg.det_range
    if not lo <= qa["mr_det"] <= hi:
        raise RegistrationError(f"implausible MR scaling: determinant {qa['mr_det']:.3f} outside [{lo}, {hi}]")
    if qa["brain_dice"] < cfg.min_brain_overlap:
        raise RegistrationError(f"brain overlap too low after MR -> template: Dice {qa['brain_dice']:.2f} "
                                f"< {cfg.min_brain_overlap}")
    if head_overlap < MIN_HEAD_OVERLAP:
        raise RegistrationError(f"CT and MR heads overlap too little after CT -> MR: Dice {head_overlap:.2f} "
                                f"< {MIN_HEAD_OVERLAP}")


def process_images(mr: sitk.Image, ct: sitk.Image, config: Config, template: Template,
                   pair_id: str = "") -> PairResult:
    """Register, resample once onto the template grid, normalize and QA one MR/CT pair of images."""
    from . import register as R
    from .qa import overlay_png

    timings: dict[str, float] = {}
    rc = config.registration
    R.set_threads(rc.threads)
    try:
        t = time.perf_counter()
        mr_w = R.work_image(mr, rc)
        mr_head = R.head_mask_mr(mr_w)
        mr_tx, mr_info = R.register_mr_to_template(mr, template, rc, mr_work=mr_w, mr_head=mr_head)
        timings["register_mr"] = time.perf_counter() - t

        t = time.perf_counter()
        ct_clamped = R.prepare_ct(ct)
        ct_tx, ct_info = R.register_ct_to_mr(ct, mr, rc, mr_work=mr_w, mr_head=mr_head, ct_clamped=ct_clamped)
        timings["register_ct"] = time.perf_counter() - t

        # one resampling each, straight from the source grids onto the template grid
        t = time.perf_counter()
        grid = template.image
        ct_tx_full = R.compose(mr_tx, ct_tx)
        mr_t = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(mr, sitk.sitkFloat32), grid, mr_tx,
                                                    sitk.sitkLinear, 0.0, sitk.sitkFloat32))
        ct_t = sitk.GetArrayFromImage(sitk.Resample(ct_clamped, grid, ct_tx_full, sitk.sitkLinear, CT_FILL_HU,
                                                    sitk.sitkFloat32))
        mr_valid = _fov(mr, grid, mr_tx)
        ct_valid = _fov(ct, grid, ct_tx_full)
        valid = mr_valid & ct_valid
        head_t = sitk.GetArrayFromImage(sitk.Resample(mr_head, grid, mr_tx, sitk.sitkNearestNeighbor, 0)) > 0
        ct_t[~ct_valid] = CT_FILL_HU
        mr_t[~mr_valid] = 0.0
        timings["resample"] = time.perf_counter() - t

        t = time.perf_counter()
        brain = sitk.GetArrayViewFromImage(template.mask) > 0
        mr_n, mr_lo, mr_hi = normalize_mr(mr_t, head_t & mr_valid, config.normalize.mr_percentiles,
                                          name=f"MR series of pair {pair_id}")
        ct_n, ct_lo, ct_hi = normalize_ct(ct_t, head_t & valid, config.normalize, name=f"CT series of pair {pair_id}")
        ok_slices = slice_ok(brain, valid, config.normalize)

        wt = R.work_template(template, rc.working_spacing_mm)
        mr_in_t_w = sitk.Resample(mr_w, wt.image, mr_tx, sitk.sitkLinear, 0.0)
        n_brain = int(brain.sum())
        qa = {
            "mr_metric": float(mr_info["metric"]),
            "ct_metric": float(ct_info["metric"]),
            "brain_dice": float(R.brain_dice(mr_in_t_w, wt.mask)),
            "mr_det": float(np.linalg.det(R.to_matrix(mr_tx)[:3, :3])),
            "valid_fraction": float((brain & valid).sum() / n_brain) if n_brain else 0.0,
        }
        assert set(qa) == set(QA_KEYS)
        check_plausible(qa, float(ct_info.get("head_overlap", 1.0)), config)
        timings["normalize_qa"] = time.perf_counter() - t

        t = time.perf_counter()
        figure = overlay_png(mr_n, ct_n, valid, template.image.GetDirection())
        timings["figure"] = time.perf_counter() - t
    except (VolumeError, RegistrationError) as err:
        log.info("pair %s failed: %s", pair_id, err)
        return PairResult(pair_id=pair_id, status=f"failed: {err}", timings=timings)
    except RuntimeError as err:  # ITK raises RuntimeError for degenerate registrations
        reason = R._itk_reason(err)
        log.info("pair %s failed in ITK: %s", pair_id, reason)
        return PairResult(pair_id=pair_id, status=f"failed: registration error: {reason}", timings=timings)

    log.info("pair %s ok: MR metric %.3f, CT metric %.3f, brain Dice %.2f, valid %.2f", pair_id, qa["mr_metric"],
             qa["ct_metric"], qa["brain_dice"], qa["valid_fraction"])
    return PairResult(
        pair_id=pair_id, status="ok", mr=mr_n, ct=ct_n, valid=valid, slice_ok=ok_slices,
        mr_lo=mr_lo, mr_hi=mr_hi, ct_lo=ct_lo, ct_hi=ct_hi,
        mr_affine=R.to_matrix(mr_tx), ct_affine=R.to_matrix(ct_tx_full), qa=qa, figure_png=figure, timings=timings,
    )


def process_pair(pair: PairSpec, config: Config, template: Template,
                 storage_options: dict | None = None) -> PairResult:
    """Read the pair's two series from storage (on the worker) and process them."""
    from .volume import read_volume

    t = time.perf_counter()
    try:
        mr = read_volume(pair.mr_files, storage_options, config.plan)
        ct = read_volume(pair.ct_files, storage_options, config.plan)
    except VolumeError as err:
        log.info("pair %s refused: %s", pair.pair_id, err)
        return PairResult(pair_id=pair.pair_id, status=f"failed: {err}")
    read_s = time.perf_counter() - t
    result = process_images(mr, ct, config, template, pair.pair_id)
    result.timings = {"read": read_s, **result.timings}
    return result
