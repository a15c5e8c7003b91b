"""One pair, end to end, as a pure function: read both series, register, resample once, normalize, QA.

`process_pair` is what a worker runs; `process_images` is its core on in-memory images, for tests and
notebooks. Deterministic refusals (a bad volume, an implausible registration) come back as a failed
`PairResult` with the reason; I/O errors (OSError, ...) propagate so the orchestrator can retry them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from . import register as R
from .config import Config
from .errors import RegistrationError, VolumeError
from .masks import face_on_grid, face_region, joint_head, read_mask
from .native import box_affine, box_image, cut_ml
from .normalize import check_volume, head_slice_ok, normalize_ct, normalize_mr, scale, slice_ok
from .qa import ct_failures, ct_measures, empty_qa, mask_centre, mr_failures, mr_measures, overlay_png, pair_figure
from .template import Template
from .types import PairResult, PairSpec

log = logging.getLogger(__name__)

CT_FILL_HU = -1000.0  # outside the CT's field of view: air, flagged invalid
FACE_HU = -1024.0  # the face region, emptied: air
FACELESS_ML = 30.0  # less head tissue than this in the face region: noted (a defaced export, or out of view)
FACE_VIEW_ML = 150.0  # an MR whose field of view holds this much of the face region ...
FACELESS_SHARE = 0.08  # ... with tissue in less than this share of it: noted (defaced at the source)
CUT_NOTE_ML = 50.0  # more of the MR's head than this outside the native box: noted
REFUSAL_VIEW_MM = 15.0  # a refused pair's figure shows the MR this far around the template brain


def _onto(img: sitk.Image, grid: sitk.Image, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``img`` resampled onto ``grid`` through ``matrix`` (linear), with the mask of where it had data.

    One pass: NaN as the default value marks the points that fall outside the source grid.
    """
    if img.GetPixelID() != sitk.sitkFloat32:
        img = sitk.Cast(img, sitk.sitkFloat32)
    out = sitk.Resample(img, grid, R.affine_from_matrix(matrix), sitk.sitkLinear, float("nan"), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(out)
    inside = ~np.isnan(arr)
    return arr, inside


@dataclass
class _Space:
    """One output grid's arrays before normalization: MR as read, CT in HU, masks."""

    mr: np.ndarray
    ct: np.ndarray
    mr_inside: np.ndarray
    valid: np.ndarray
    head: np.ndarray
    face: np.ndarray
    face_tissue_ml: float = 0.0
    affine: np.ndarray | None = None


def _space(grid: sitk.Image, mr: sitk.Image, ct_hu: sitk.Image, to_mr: np.ndarray, to_ct: np.ndarray,
           head_mr: sitk.Image, face: np.ndarray | None) -> _Space:
    """MR and CT on ``grid`` (``to_mr``/``to_ct``: grid physical -> series physical), each interpolated once,
    with the field-of-view masks, the head (``head_mr``: :func:`~mrict_dask.masks.joint_head`, in the MR's
    frame) and the ``face`` region emptied (None: the face stays).
    """
    mr_t, mr_inside = _onto(mr, grid, to_mr)
    ct_t, ct_inside = _onto(ct_hu, grid, to_ct)
    mr_t[~mr_inside] = 0.0
    ct_t[~ct_inside] = CT_FILL_HU
    head = read_mask(head_mr, grid, to_mr)
    tissue_ml = 0.0
    if face is None:
        face = np.zeros(head.shape, bool)
    else:
        tissue_ml = float((face & head).sum() * np.prod(grid.GetSpacing()) / 1000.0)
        mr_t[face] = 0.0
        ct_t[face] = FACE_HU
        head &= ~face
    return _Space(mr_t, ct_t, mr_inside, mr_inside & ct_inside, head, face, tissue_ml)


def _notes(qa: dict[str, float], config: Config, face_view_ml: float = 0.0) -> list[str]:
    """What a reviewer should know about an ok pair (nothing identifying). ``face_view_ml``: how much of the face
    region the MR's field of view holds."""
    notes = []
    mr_face = qa.get("mr_face_ml", np.nan)
    if config.deface.enabled and face_view_ml >= FACE_VIEW_ML and mr_face < FACELESS_SHARE * face_view_ml:
        notes.append(f"the MR shows almost no tissue in the face region ({mr_face:.0f} mL of the {face_view_ml:.0f} mL "
                     "it holds): the face was probably removed at the source")
    elif config.deface.enabled and np.isfinite(qa.get("face_ml", np.nan)) and qa["face_ml"] < FACELESS_ML:
        notes.append(f"little tissue in the face region ({qa['face_ml']:.0f} mL): the face was removed at the "
                     "source or lies outside the fields of view")
    if qa.get("native_cut_ml", 0.0) > CUT_NOTE_ML:
        notes.append(f"the native box leaves out {qa['native_cut_ml']:.0f} mL of the MR's head (neck or shoulders "
                     "below it, or a head larger than the box)")
    if qa.get("valid_fraction", 1.0) < 0.95:
        notes.append(f"MR and CT both cover {100 * qa['valid_fraction']:.0f} % of the template brain")
    return notes


def check_mr(qa: dict[str, float], config: Config, search: dict | None = None) -> None:
    """Raise RegistrationError naming every MR -> template check that fails (value against limit)."""
    if not np.isfinite(qa["mr_metric"]):
        raise RegistrationError(f"MR -> template registration failed: final metric is {qa['mr_metric']}")
    failed = mr_failures(qa, config.registration)
    if failed:
        raise RegistrationError("MR -> template refused: " + "; ".join(failed) + _tried(search))


def check_ct(qa: dict[str, float], config: Config) -> None:
    """Raise RegistrationError naming every CT -> MR check that fails (value against limit)."""
    if not np.isfinite(qa["ct_metric"]):
        raise RegistrationError(f"CT -> MR registration failed: final metric is {qa['ct_metric']}")
    failed = ct_failures(qa, config.registration)
    if failed:
        raise RegistrationError("CT -> MR refused: " + "; ".join(failed))


def _tried(search: dict | None) -> str:
    if not search:
        return ""
    return (f" (search from the {search['start']}: {search['candidates']} sizes, positions and tilts; best size "
            f"{search['scale']:.2f}, tilt {search['tilt_deg']} degrees)")


def process_images(mr: sitk.Image, ct: sitk.Image, config: Config, template: Template,
                   pair_id: str = "") -> PairResult:
    """Register, resample once onto the template grid, normalize and QA one MR/CT pair of images."""
    timings: dict[str, float] = {}
    qa = empty_qa()
    rc = config.registration
    R.set_threads(rc.threads)
    start = t = time.perf_counter()
    mr_w = mr_affine = ct_w = mr_to_ct = None

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
        lap("register_mr")
        qa.update(mr_measures(mr_w, R.work_template(template, rc.working_spacing_mm), mr_affine))
        lap("gate_mr")
        check_mr(qa, config, mr_info.get("search"))

        ct_tx, ct_info = R.register_ct_to_mr(ct, mr, rc, mr_work=mr_w, mr_head=mr_head, ct_clamped=ct_clamped,
                                             ct_work=ct_w, ct_head=ct_head)
        qa["ct_metric"] = float(ct_info["metric"])
        mr_to_ct = R.to_matrix(ct_tx)
        ct_affine = mr_to_ct @ mr_affine  # template -> MR -> CT: one matrix, one interpolation
        lap("register_ct")
        qa.update({k: v for k, v in ct_measures(mr_w, mr_head, ct_w, ct_head, mr_to_ct).items() if k in qa})
        lap("gate_ct")
        check_ct(qa, config)

        region = face_region(template, config.deface) if config.deface.enabled else None
        face_view = 0.0
        if region is not None:  # how much of the face region the MR shows, and how much tissue it shows there
            in_view = face_on_grid(region, mr_w, np.linalg.inv(mr_affine))
            voxel_ml = float(np.prod(mr_w.GetSpacing())) / 1000.0
            face_view = float(in_view.sum() * voxel_ml)
            qa["mr_face_ml"] = float((in_view & (sitk.GetArrayViewFromImage(mr_head) > 0)).sum() * voxel_ml)
        head_mr = joint_head(mr_head, ct_head, mr_to_ct)
        tpl = _space(template.image, mr, ct_clamped, mr_affine, ct_affine, head_mr,
                     None if region is None else region.on_template)
        nat = None
        if config.native.enabled:
            box = box_affine(mr_affine, config.native)
            grid = box_image(box, config.native)
            nat = _space(grid, mr, ct_clamped, np.eye(4), mr_to_ct, head_mr,
                         None if region is None else face_on_grid(region, grid, np.linalg.inv(mr_affine)))
            nat.affine = box
            qa["native_cut_ml"] = cut_ml(mr_head, grid)
        lap("resample")

        brain = sitk.GetArrayViewFromImage(template.mask) > 0
        # in place: the volumes as read are not needed after (a volume-sized buffer less per array)
        mr_n, mr_lo, mr_hi = normalize_mr(tpl.mr, tpl.head & tpl.mr_inside, config.normalize.mr_percentiles,
                                          name="MR series", out=tpl.mr)
        ct_n, ct_lo, ct_hi = normalize_ct(tpl.ct, tpl.head & tpl.valid, config.normalize, name="CT series",
                                          out=tpl.ct)
        mr_n[~tpl.mr_inside] = 0.0
        ok_slices = slice_ok(brain, tpl.valid, config.normalize)
        n_brain = int(brain.sum())
        qa["valid_fraction"] = float((brain & tpl.valid).sum() / n_brain) if n_brain else 0.0
        native = None
        if nat is not None:
            qa["face_ml"] = nat.face_tissue_ml
            nat_mr = scale(nat.mr, mr_lo, mr_hi, out=nat.mr)
            nat_mr[~nat.mr_inside] = 0.0
            native = {"mr": nat_mr, "ct": scale(nat.ct, ct_lo, ct_hi, out=nat.ct), "valid": nat.valid, "head": nat.head,
                      "face": nat.face, "slice_ok": head_slice_ok(nat.head, nat.valid, config.normalize),
                      "affine": nat.affine}
        notes = _notes(qa, config, face_view)
        lap("normalize")

        centre = mask_centre(brain)
        figure = pair_figure(mr_n, ct_n, centre, template.image, brain,
                             None if native is None else (native["mr"], native["ct"], native["head"]),
                             ct_window=(ct_lo, ct_hi))
        lap("figure")
    except (VolumeError, RegistrationError) as err:
        # a refused registration shows what it found, so that a reviewer can tell in seconds
        figure = (refusal_figure(mr_w, R.work_template(template, rc.working_spacing_mm), mr_affine, ct_w, mr_to_ct)
                  if isinstance(err, RegistrationError) and mr_affine is not None else None)
        timings["total"] = time.perf_counter() - start
        log.info("pair %s failed: %s", pair_id, err)
        return PairResult(pair_id=pair_id, status=f"failed: {err}", qa=qa, figure_png=figure, timings=timings)

    timings["total"] = time.perf_counter() - start
    log.info("pair %s ok: MR metric %.3f, CT metric %.3f, brain Dice %.2f, valid %.2f, %.1f s", pair_id,
             qa["mr_metric"], qa["ct_metric"], qa["brain_dice"], qa["valid_fraction"], timings["total"])
    return PairResult(
        pair_id=pair_id, status="ok", mr=mr_n, ct=ct_n, valid=tpl.valid, slice_ok=ok_slices, head=tpl.head,
        face=tpl.face, native=native, mr_lo=float(mr_lo), mr_hi=float(mr_hi), ct_lo=float(ct_lo),
        ct_hi=float(ct_hi), mr_affine=mr_affine, ct_affine=ct_affine, qa=qa, notes=notes, figure_png=figure,
        timings=timings,
    )


def refusal_figure(mr_w: sitk.Image, wt, mr_affine: np.ndarray, ct_w: sitk.Image | None,
                   mr_to_ct: np.ndarray | None) -> bytes:
    """The refused registration on the working template grid: MR in grey only within REFUSAL_VIEW_MM of the
    template brain (no face), the template brain's outline, CT edges where a CT -> MR transform exists."""
    grid = wt.image
    mr_t = sitk.GetArrayFromImage(sitk.Resample(mr_w, grid, R.affine_from_matrix(mr_affine), sitk.sitkLinear, 0.0))
    brain = sitk.GetArrayViewFromImage(wt.mask) > 0
    view = ndi.binary_dilation(brain, iterations=max(1, int(round(REFUSAL_VIEW_MM / grid.GetSpacing()[0]))))
    lo, hi = np.percentile(mr_t[view], [1.0, 99.0]) if view.any() else (0.0, 1.0)
    mr_n = np.where(view, np.clip((mr_t - lo) / max(hi - lo, 1e-6), 0.0, 1.0), 0.0)
    ct_t = np.full(mr_t.shape, CT_FILL_HU, np.float32)
    if ct_w is not None and mr_to_ct is not None:
        ct_t = sitk.GetArrayFromImage(sitk.Resample(ct_w, grid, R.affine_from_matrix(mr_to_ct @ mr_affine),
                                                    sitk.sitkLinear, CT_FILL_HU))
        ct_t[~view] = CT_FILL_HU
    centre = mask_centre(brain)
    return overlay_png(mr_n, ct_t, centre, grid.GetSpacing(), grid.GetDirection(), outline=brain)


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
