"""Real heads (Colin27 from Debian's mricron-data, pydeface's average head) through the whole job.

Each head is written as a DICOM MR series in a scanner pose and field of view (a sagittal 3D T1 down to the neck,
an axial 2D T1 of the brain only, an axial 3D T1 off the head's centre) with a partner CT derived from it and
posed apart (mrict_dask.synth.realheads: the ground truth, never read from the pipeline). The job must take every
pair, put the real brain on the template brain, and recover CT -> MR; the gate must refuse the same pairs
registered wrong.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import xarray as xr
from scipy import ndimage as ndi

from mrict_dask.config import Config
from mrict_dask.synth import realheads as RH

pytestmark = pytest.mark.slow

# (head, MR field of view, MR pose angles, MR pose shift): each a patient of its own
CASES = {
    "RH-COLIN-SAG": ("colin27", "sagittal_3d_neck", (12, 4, -6), (5, -10, 0)),
    "RH-COLIN-AX2D": ("colin27", "axial_2d_brain", (-8, 0, 10), (0, 10, -5)),
    "RH-MEAN-SAG": ("pydeface_mean", "sagittal_3d_neck", (-15, 5, 8), (0, 15, 0)),
    "RH-MEAN-OFF": ("pydeface_mean", "axial_3d_off_centre", (20, -6, -12), (0, 0, 0)),
}


@pytest.fixture(scope="module")
def heads():
    missing = [name for name, ok in RH.available().items() if not ok]
    assert not missing, f"real heads not installed: {missing} (apt-get install mricron-data; pip install pydeface)"
    return {name: RH.load(name) for name in RH.available()}


@pytest.fixture(scope="module")
def real_run(heads, local_cluster, tmp_path_factory):
    """Every case written as DICOM, then the job on a 2-worker LocalCluster with the default configuration."""
    from distributed import Client

    from mrict_dask.orchestrate import run_pipeline

    root = tmp_path_factory.mktemp("real")
    posed = {}
    for pid, (head, fov, angles, shift) in CASES.items():
        posed[pid] = RH.posed_pair(heads[head], fov, angles, shift, seed=len(posed))
        RH.write_dicom(posed[pid], str(root / "in" / pid), pid, seed=len(posed))
    out = root / "store.zarr"
    with Client(local_cluster, set_as_default=False) as client:
        summary = run_pipeline(str(root / "in"), str(out), config=Config(), executor=client, pseudonym_key="real")
    return summary, str(out), posed


def _case_of(pair) -> str:
    return next(pid for pid in CASES if f"/{pid}/" in pair.mr_files[0])


def test_every_real_head_pair_is_ok_with_its_brain_on_the_template_brain(real_run, template):
    from mrict_dask.io import Location
    from mrict_dask.plan import Plan

    summary, store, posed = real_run
    plan = Plan.from_json(Location(store + ".work").join("plan.json").read_text())
    assert sorted(_case_of(p) for p in plan.pairs) == sorted(CASES)
    ds = xr.open_zarr(store)
    assert list(ds["status"].values) == ["ok"] * len(CASES), list(ds["status"].values)
    brain = sitk.GetArrayFromImage(template.mask) > 0
    near = ndi.binary_dilation(brain, iterations=3)  # the template brain + 3 mm
    for p in plan.pairs:
        truth = posed[_case_of(p)]
        mr_affine, ct_affine = ds["mr_affine"].values[p.index], ds["ct_affine"].values[p.index]
        # deep brain points of the real head (>= 10 mm inside its brain), from the MR frame into the template
        tpl = (truth.deep_brain_mr - mr_affine[:3, 3]) @ np.linalg.inv(mr_affine[:3, :3]).T
        idx = np.array([template.image.TransformPhysicalPointToIndex(tuple(v)) for v in tpl])
        inside = near[idx[:, 2], idx[:, 1], idx[:, 0]].mean()
        assert inside >= 0.97, (_case_of(p), inside)
        # CT -> MR against the known pose, over the same points
        got = ct_affine @ np.linalg.inv(mr_affine)
        err = np.linalg.norm(truth.deep_brain_mr @ (got - truth.mr_to_ct)[:3, :3].T + (got - truth.mr_to_ct)[:3, 3],
                             axis=1)
        # 0.5 mm where the MR is 3D; 6 mm slices leave the MR's through-plane position to within a mm
        limit = 1.0 if truth.info["mr_fov"] == "axial_2d_brain" else 0.5
        assert err.mean() <= limit, (_case_of(p), err.mean())


def test_gate_passes_the_real_registration_and_refuses_it_made_wrong(real_run, template):
    """On the sagittal Colin27 pair: the pipeline's transforms pass every check; the same transforms shifted,
    rotated, flipped or scaled are refused by at least one check, and the reason names it."""
    from mrict_dask import qa
    from mrict_dask import register as R
    from mrict_dask.synth.anatomy import affine_about, rotation_matrix

    _, store, posed = real_run
    cfg = Config().registration
    truth = posed["RH-COLIN-SAG"]
    ds = xr.open_zarr(store)
    mr_w = R.work_image(truth.mr, cfg)
    mr_head = R.head_mask_mr(mr_w)
    ct_w = R.resample_iso(R.prepare_ct(truth.ct), cfg.working_spacing_mm, default=R.CT_CLAMP[0])
    ct_head = R.head_mask_ct(ct_w)
    wt = R.work_template(template, cfg.working_spacing_mm)
    # the pair of this case: its recovered CT -> MR is the one closest to the truth
    k = int(np.argmin([np.abs(c @ np.linalg.inv(m) - truth.mr_to_ct)[:3].sum()
                       for m, c in zip(ds["mr_affine"].values, ds["ct_affine"].values)]))
    mr_affine = ds["mr_affine"].values[k]
    mr_to_ct = ds["ct_affine"].values[k] @ np.linalg.inv(mr_affine)

    assert qa.mr_failures(qa.mr_measures(mr_w, wt, mr_affine), cfg) == []
    assert qa.ct_failures(qa.ct_measures(mr_w, mr_head, ct_w, ct_head, mr_to_ct), cfg) == []

    c_t, c_h = wt.centroid, R._centroid(mr_head)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    wrong = {
        "shift 15 mm": affine_about(np.eye(3), c_t, (9.0, -9.0, 8.0)),
        "rotation 20 degrees": affine_about(rotation_matrix((14, 0, 14)), c_t),
        "scale 15 %": affine_about(1.15 * np.eye(3), c_t),
        "left-right flip": affine_about(flip[:3, :3], c_t),
    }
    for name, w in wrong.items():
        assert qa.mr_failures(qa.mr_measures(mr_w, wt, mr_affine @ w), cfg), f"MR -> template {name} passed"
    wrong_ct = {
        "shift 15 mm": affine_about(np.eye(3), c_h, (9.0, -9.0, 8.0)),
        "rotation 20 degrees": affine_about(rotation_matrix((0, 20, 0)), c_h),
        "left-right flip": affine_about(flip[:3, :3], c_h),
    }
    for name, w in wrong_ct.items():
        assert qa.ct_failures(qa.ct_measures(mr_w, mr_head, ct_w, ct_head, mr_to_ct @ w), cfg), \
            f"CT -> MR {name} passed"
