"""Head masks and the face region on any output grid (template or native): pure functions of grids and transforms.

``head``: the head and neck with the air inside it (sinuses, ear canals, airway) filled in, from the CT where the
CT has data (its head mask leaves the couch, headrest and pillow out) and from the MR elsewhere (the MR's head
mask: noise and coil give no signal). Both masks are made on the registrations' working grids and read onto the
output grid by linear interpolation of the 0/1 mask, cut at one half: edges between the 2 mm steps.

``face``: the region defacing empties, defined once in template coordinates (LPS mm; the template is any brain
template in patient coordinates) from the template brain alone:

- in front of the coronal plane ``front_mm`` anterior of the template's y = 0 (LPS: anterior is -y; by default
  MNI y = +30, in front of the temporal poles): the ears, the jaw joints, the spine and the back of the neck stay;
- and more than ``margin_mm`` below the template brain's lowest point in the same (x, y) column, or, in front of
  or beside the brain, below the lowest point of the nearest brain column (the brow line): the eyes, the nose, the
  lips, the chin, the cheeks and the front of the neck go; the forehead stays;
- never within ``protect_mm`` of the template brain: the brain and the cranium around it are never touched.

Every pair maps it through its own MR -> template affine, so the region follows each head's size and tilt.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from .config import DefaceConfig
from .register import affine_from_matrix, covered
from .template import Template


@dataclass(frozen=True)
class FaceRegion:
    """The face region in template coordinates: a floor height map over (x, y) and the protected brain."""

    origin: tuple[float, float]  # (x, y) of the height map's [0, 0], LPS mm
    step: float
    floor: np.ndarray  # (ny, nx): z below which a column is face (brain's lowest z - margin), LPS mm
    front: float  # face only where y < front (anterior of this coronal plane)
    protect: sitk.Image  # uint8 on the template grid: the brain dilated by protect_mm
    protect_mm: float
    on_template: np.ndarray  # the region on the template's own grid (bool, z, y, x), protection applied

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Whether template-space points (N, 3) lie in the face region (before the brain's protection)."""
        fx = (points[:, 0] - self.origin[0]) / self.step
        fy = (points[:, 1] - self.origin[1]) / self.step
        z = ndi.map_coordinates(self.floor, [fy, fx], order=1, mode="nearest")
        return (points[:, 1] < self.front) & (points[:, 2] < z)


_cache: dict[tuple, FaceRegion] = {}
_lock = threading.Lock()


def face_region(template: Template, cfg: DefaceConfig) -> FaceRegion:
    """The template's face region (cached per template and settings)."""
    key = (template.sha256, template.image.GetSize(), template.image.GetSpacing(), cfg.margin_mm, cfg.protect_mm,
           cfg.front_mm)
    with _lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    brain = sitk.GetArrayFromImage(template.mask) > 0
    d = np.array(template.image.GetDirection()).reshape(3, 3) * np.array(template.image.GetSpacing())
    pts = np.array(template.image.GetOrigin()) + np.argwhere(brain)[:, ::-1].astype(np.float64) @ d.T
    step = 1.0
    lo = np.floor(pts[:, :2].min(0)) - 120.0  # the map reaches well past the head; beyond it, its edge holds
    hi = np.ceil(pts[:, :2].max(0)) + 120.0
    nx, ny = (int(v) for v in np.round((hi - lo) / step) + 1)
    floor = np.full((ny, nx), np.inf)
    ix = np.round((pts[:, 0] - lo[0]) / step).astype(int)
    iy = np.round((pts[:, 1] - lo[1]) / step).astype(int)
    np.minimum.at(floor, (iy, ix), pts[:, 2])
    empty = ~np.isfinite(floor)
    # columns without brain take the nearest brain column's lowest point: the brow line in front, the temporal
    # lobes' floor beside
    _, (jy, jx) = ndi.distance_transform_edt(empty, return_indices=True)
    floor = floor[jy, jx] - cfg.margin_mm
    protect = ndi.distance_transform_edt(~brain, sampling=template.image.GetSpacing()[::-1]) <= cfg.protect_mm
    pimg = sitk.GetImageFromArray(protect.astype(np.uint8))
    pimg.CopyInformation(template.image)
    # the template's anterior commissure level is y = 0 in MNI space; front_mm in front of it (LPS: -y)
    region = FaceRegion((float(lo[0]), float(lo[1])), step, floor.astype(np.float32), -float(cfg.front_mm), pimg,
                        cfg.protect_mm, np.zeros(0, bool))
    region = dataclasses.replace(region, on_template=face_on_grid(region, template.image, np.eye(4)))
    with _lock:
        _cache[key] = region
    return region


def grid_points(grid: sitk.Image, k: int) -> np.ndarray:
    """Physical points (ny * nx, 3) of slice ``k`` (index z) of ``grid``, in array order."""
    nx, ny, _ = grid.GetSize()
    d = np.array(grid.GetDirection()).reshape(3, 3) * np.array(grid.GetSpacing())
    jj, ii = np.mgrid[0:ny, 0:nx]
    idx = np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, k)], axis=1).astype(np.float64)
    return np.array(grid.GetOrigin()) + idx @ d.T


def face_on_grid(region: FaceRegion, grid: sitk.Image, grid_to_template: np.ndarray) -> np.ndarray:
    """The face region on ``grid`` (bool, z, y, x), ``grid_to_template`` mapping the grid's physical points into
    the template; never within the protected brain.

    The region's floor is read on every other voxel along each axis (its edge steps by one voxel more; 8x
    fewer points), the brain's protection on every voxel.
    """
    nx, ny, nz = grid.GetSize()
    half = sitk.Image([(n + 1) // 2 for n in (nx, ny, nz)], sitk.sitkUInt8)
    half.SetOrigin(grid.GetOrigin())
    half.SetDirection(grid.GetDirection())
    half.SetSpacing([2.0 * s for s in grid.GetSpacing()])
    hx, hy, hz = half.GetSize()
    a, t = grid_to_template[:3, :3], grid_to_template[:3, 3]
    coarse = np.stack([region.contains(grid_points(half, k) @ a.T + t).reshape(hy, hx) for k in range(hz)])
    out = coarse.repeat(2, 0).repeat(2, 1).repeat(2, 2)[:nz, :ny, :nx]
    protect = sitk.Resample(region.protect, grid, affine_from_matrix(grid_to_template), sitk.sitkNearestNeighbor, 0)
    return out & (sitk.GetArrayViewFromImage(protect) == 0)


def read_mask(mask: sitk.Image, grid: sitk.Image, grid_to_mask: np.ndarray) -> np.ndarray:
    """A 0/1 mask read onto ``grid`` by linear interpolation, cut at one half (bool, z, y, x)."""
    f = sitk.Resample(sitk.Cast(mask, sitk.sitkFloat32), grid, affine_from_matrix(grid_to_mask), sitk.sitkLinear,
                      0.0, sitk.sitkFloat32)
    return sitk.GetArrayViewFromImage(f) >= 0.5


def joint_head(mr_head: sitk.Image, ct_head: sitk.Image, mr_to_ct: np.ndarray, reach_mm: float = 60.0) -> sitk.Image:
    """The head in the MR's frame, on the MR's working grid grown by ``reach_mm``: the CT's head mask wherever
    the CT has data (it leaves couch, headrest and pillow out), the MR's elsewhere. Both hold the air inside
    the head already (filled on their working grids, :func:`mrict_dask.register.fill_slices`)."""
    n = [int(np.ceil(reach_mm / s)) for s in mr_head.GetSpacing()]
    grid = sitk.ConstantPad(mr_head, n, n, 0)
    tx = affine_from_matrix(mr_to_ct)
    ct_h_img = sitk.Resample(ct_head, grid, tx, sitk.sitkNearestNeighbor, 0)  # kept while its view is read
    ct_h = sitk.GetArrayViewFromImage(ct_h_img) > 0
    head = np.where(covered(ct_head, grid, tx), ct_h, sitk.GetArrayViewFromImage(grid) > 0)
    out = sitk.GetImageFromArray(head.astype(np.uint8))
    out.CopyInformation(grid)
    return out
