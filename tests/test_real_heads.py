"""Real heads (Colin27 from Debian's mricron-data, pydeface's average head) through the whole job.

Each head is written as a DICOM MR series in a scanner pose and field of view (a sagittal 3D T1 down to the neck,
an axial 2D T1 of the brain only, an axial 3D T1 off the head's centre) with a partner CT derived from it (1.5 mm
or 5 mm slices) and posed apart (mrict_dask.synth.realheads: the ground truth, never read from the pipeline). The
job must take every pair, put the real brain on the template brain, and recover CT -> MR; the gate must refuse the
same pairs registered wrong.
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

# (head, MR field of view, MR pose angles, MR pose shift, CT field of view): each a patient of its own
CASES = {
    "RH-COLIN-SAG": ("colin27", "sagittal_3d_neck", (12, 4, -6), (5, -10, 0), "ct_head"),
    "RH-COLIN-AX2D": ("colin27", "axial_2d_brain", (-8, 0, 10), (0, 10, -5), "ct_head"),
    "RH-MEAN-SAG": ("pydeface_mean", "sagittal_3d_neck", (-15, 5, 8), (0, 15, 0), "ct_head_5mm"),
    "RH-MEAN-OFF": ("pydeface_mean", "axial_3d_off_centre", (20, -6, -12), (0, 0, 0), "ct_head"),
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
    for pid, (head, fov, angles, shift, ct_fov) in CASES.items():
        posed[pid] = RH.posed_pair(heads[head], fov, angles, shift, seed=len(posed), ct_fov=ct_fov)
        RH.write_dicom(posed[pid], str(root / "in" / pid), pid, seed=len(posed))
    out = root / "store.zarr"
    with Client(local_cluster, set_as_default=False) as client:
        summary = run_pipeline(str(root / "in"), str(out), config=Config(), executor=client, pseudonym_key="real")
    return summary, str(out), posed


def _case_of(pair) -> str:
    return next(pid for pid in CASES if f"/{pid}/" in pair.mr_files[0])


def _plan(store: str):
    from mrict_dask.io import Location
    from mrict_dask.plan import Plan

    return Plan.from_json(Location(store + ".work").join("plan.json").read_text())


def test_every_real_head_pair_is_ok_with_its_brain_on_the_template_brain(real_run, template):
    summary, store, posed = real_run
    plan = _plan(store)
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
        # 0.5 mm, 3D or thick slices (6 mm MR slices, 5 mm CT slices) alike
        assert err.mean() <= 0.5, (_case_of(p), err.mean())


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
    k = next(p.index for p in _plan(store).pairs if _case_of(p) == "RH-COLIN-SAG")
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


# Colin27's eye centres (LPS mm, its own frame), found on its T1 as the centres of the dark vitreous blobs
COLIN27_EYES = ((33.3, -61.4, -35.6), (-36.3, -61.7, -37.4))


def _colin_nose(head) -> np.ndarray:
    """The most anterior point of Colin27's tissue near the midline between 15 and 40 mm below the AC (the nose;
    its field of view cuts the tip)."""
    t1 = head.t1
    a = sitk.GetArrayFromImage(t1)
    zyx = np.argwhere(ndi.gaussian_filter(a, 1.0) > 40.0)
    d = np.array(t1.GetDirection()).reshape(3, 3) * np.array(t1.GetSpacing())
    pts = np.array(t1.GetOrigin()) + zyx[:, ::-1].astype(float) @ d.T
    near = pts[(np.abs(pts[:, 0]) < 4) & (pts[:, 2] < -15) & (pts[:, 2] > -40)]
    return near[np.argmin(near[:, 1])]


def _voxels(points: np.ndarray, affine: np.ndarray, shape_zyx) -> np.ndarray:
    """(z, y, x) indices of physical points on a grid given by its 4x4 index -> physical matrix; -1 outside."""
    inv = np.linalg.inv(affine)
    ijk = np.round(points @ inv[:3, :3].T + inv[:3, 3]).astype(int)
    inside = ((ijk >= 0) & (ijk < np.array(shape_zyx[::-1]))).all(1)
    return np.where(inside[:, None], ijk[:, ::-1], -1)


def test_real_head_is_defaced_in_both_spaces_with_its_brain_untouched(real_run, heads, template):
    """Colin27 (sagittal to the neck): around each eye and the nose (5 mm) both spaces hold background (MR 0, CT
    -1024 HU) and the face mask; inside its own brain mask grown by 2 mm nothing is in the face region (the face
    region keeps 8 mm from the template brain; Colin27's temporal poles sit ~5 mm beyond the template's after the
    affine, so its 3 mm shell touches the region at a few voxels there)."""
    from mrict_dask.native import affine_of

    _, store, posed = real_run
    k = next(p.index for p in _plan(store).pairs if _case_of(p) == "RH-COLIN-SAG")
    truth, head = posed["RH-COLIN-SAG"], heads["colin27"]
    root, nat = xr.open_zarr(store), xr.open_zarr(store, group="native")
    assert root.attrs["deface"]["enabled"] is True
    to_mr = truth.mr_pose  # Colin27's own frame -> the MR scanner frame
    ball = np.array([(x, y, z) for x in range(-5, 6) for y in range(-5, 6) for z in range(-5, 6)
                     if x * x + y * y + z * z <= 25], float)
    landmarks = [*COLIN27_EYES, tuple(_colin_nose(head) + (0.0, 3.0, 0.0))]  # the nose 3 mm inside its surface
    mr_affine = root["mr_affine"].values[k]
    # (dataset, grid index -> physical, Colin27's frame -> the grid's physical frame): a point of the MR's frame
    # sits in the template grid where the store put that anatomy, through inv(mr_affine)
    spaces = {"native": (nat, nat["affine"].values[k], to_mr),
              "template": (root, affine_of(template.image), np.linalg.inv(mr_affine) @ to_mr)}
    for space, (ds, grid_affine, to_grid) in spaces.items():
        mr, ct, face = (ds[v].values[k] for v in ("mr", "ct", "face"))
        for lm in landmarks:
            pts = (np.asarray(lm) + ball) @ to_grid[:3, :3].T + to_grid[:3, 3]
            idx = _voxels(pts, grid_affine, mr.shape)
            idx = idx[(idx >= 0).all(1)]
            assert len(idx) > 0.9 * len(ball), (space, lm)
            z, y, x = idx.T
            assert face[z, y, x].all() and (mr[z, y, x] == 0).all() and (ct[z, y, x] == 0).all(), (space, lm)
        # the brain and 2 mm around it: never in the face region
        brain = sitk.GetArrayFromImage(sitk.ReadImage(RH.COLIN27_BRAIN)) > 0
        grown = ndi.distance_transform_edt(~brain, sampling=head.t1.GetSpacing()[::-1]) <= 2.0
        zyx = np.argwhere(grown)[::3]
        d = np.array(head.t1.GetDirection()).reshape(3, 3) * np.array(head.t1.GetSpacing())
        pts = np.array(head.t1.GetOrigin()) + zyx[:, ::-1].astype(float) @ d.T
        idx = _voxels(pts @ to_grid[:3, :3].T + to_grid[:3, 3], grid_affine, mr.shape)
        idx = idx[(idx >= 0).all(1)]
        assert len(idx) > 0.9 * len(pts) and not face[tuple(idx.T)].any(), space
