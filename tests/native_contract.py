"""A store with native space as its contract describes it, made from a store the pipeline wrote in template space.

Only for testing how readers handle native geometry (export, evaluate, to-dicom) before the pipeline writes native
space itself: a copy of a real store gains the group ``native`` (``mr``, ``ct``, ``valid``, ``head``, ``face``,
``slice_ok``, ``affine``, attribute ``grid``) and the root gains ``head`` and ``face``. Each ok pair's native grid is
isotropic, in its source MR's patient frame (LPS mm):

- pair 0: the MR series' own axes (what a reader gets from the MR's DICOM);
- every other pair: those axes turned 25 degrees about an oblique axis, with the slice axis reversed (a left-handed
  grid), so readers meet a direction that is neither axis-aligned nor right-handed.

The native volumes are the template-space volumes carried through the pair's recovered MR affine (template LPS ->
MR LPS), so they hold the pair's real anatomy; ``head`` is the CT above -500 HU inside ``valid``.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import SimpleITK as sitk
import zarr

NATIVE_SPACING = 2.0


def _rotation(axis, degrees: float) -> np.ndarray:
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def native_grid(mr_image, index: int, spacing: float = NATIVE_SPACING) -> tuple[np.ndarray, list[int]]:
    """(index -> LPS 4x4, size [X, Y, Z]) of an isotropic grid covering the MR volume in its frame."""
    d = np.asarray(mr_image.GetDirection()).reshape(3, 3)
    if index:
        d = _rotation([1, 2, 0.5], 25) @ d
        d[:, 2] *= -1
    size = np.asarray(mr_image.GetSize())
    corners = np.array([mr_image.TransformContinuousIndexToPhysicalPoint([float(c) for c in ijk])
                        for ijk in np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in size])).reshape(3, -1).T])
    local = corners @ d  # coordinates along the grid's axes
    lo, hi = local.min(axis=0), local.max(axis=0)
    n = np.ceil((hi - lo) / spacing).astype(int)
    affine = np.eye(4)
    affine[:3, :3] = d * spacing
    affine[:3, 3] = d @ (lo + spacing / 2)
    return affine, [int(v) for v in n]


def _resample(img, affine: np.ndarray, size: list[int], spacing: float, mr_affine: np.ndarray, nearest: bool,
              default: float):
    ref = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    ref.SetSpacing([spacing] * 3)
    ref.SetOrigin(affine[:3, 3].tolist())
    ref.SetDirection((affine[:3, :3] / spacing).ravel().tolist())
    inv = np.linalg.inv(mr_affine)  # MR LPS -> template LPS: where a native voxel's content is in the store
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(inv[:3, :3].ravel().tolist())
    tx.SetTranslation(inv[:3, 3].tolist())
    return sitk.GetArrayFromImage(sitk.Resample(img, ref, tx, sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear,
                                                default))


def add_native_space(src_store: str, dst_store: str) -> dict:
    """Copy ``src_store`` (and its work area) to ``dst_store`` and add native space; returns {pair index: affine}."""
    with warnings.catch_warnings():  # zarr on the store's fixed-length strings and consolidated metadata
        warnings.simplefilter("ignore")
        return _add_native_space(src_store, dst_store)


def _add_native_space(src_store: str, dst_store: str) -> dict:
    from mrict_dask.plan import Plan
    from mrict_dask.volume import read_volume

    shutil.copytree(src_store, dst_store)
    shutil.copytree(src_store + ".work", dst_store + ".work")
    plan = Plan.from_json(open(dst_store + ".work/plan.json").read())
    g = zarr.open_group(dst_store, mode="r+", use_consolidated=False)
    attrs = dict(g.attrs)
    grid = attrs["grid"]
    n = g["pair"].shape[0]
    status = [str(v) for v in g["status"][:]]
    ct_lo, ct_hi = g["ct_lo"][:], g["ct_hi"][:]

    def template_image(arr):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(grid["spacing"])
        img.SetOrigin(grid["origin"])
        img.SetDirection(grid["direction"])
        return img

    grids = {}
    for p in plan.pairs:
        if status[p.index] == "ok":
            grids[p.index] = native_grid(read_volume(p.mr_files), len(grids))
    size = np.max([s for _, s in grids.values()], axis=0).tolist()  # one size for the space, as the contract has
    zyx = (size[2], size[1], size[0])
    affines = np.full((n, 4, 4), np.nan)
    native = {name: np.zeros((n, *zyx), dtype) for name, dtype in
              (("mr", np.float32), ("ct", np.float32), ("valid", bool), ("head", bool), ("face", bool))}
    root_head = np.zeros(g["valid"].shape, bool)
    for i, (affine, _) in grids.items():
        affines[i] = affine
        mr_affine = np.asarray(g["mr_affine"][i])
        ct, valid = np.asarray(g["ct"][i]), np.asarray(g["valid"][i])
        hu = ct * (ct_hi[i] - ct_lo[i]) + ct_lo[i]
        root_head[i] = (hu > -500) & valid
        air = (-1000.0 - ct_lo[i]) / (ct_hi[i] - ct_lo[i])
        native["mr"][i] = _resample(template_image(np.asarray(g["mr"][i])), affine, size, NATIVE_SPACING, mr_affine,
                                    False, 0.0)
        native["ct"][i] = _resample(template_image(ct), affine, size, NATIVE_SPACING, mr_affine, False, float(air))
        native["valid"][i] = _resample(template_image(valid.astype(np.uint8)), affine, size, NATIVE_SPACING,
                                       mr_affine, True, 0).astype(bool)
        native["head"][i] = native["valid"][i] & (native["ct"][i] * (ct_hi[i] - ct_lo[i]) + ct_lo[i] > -500)
    z, y, x = g["valid"].shape[1:]
    for name, data in (("head", root_head), ("face", np.zeros_like(root_head))):
        a = g.create_array(name, shape=data.shape, dtype=bool, chunks=(1, 1, y, x), shards=(1, z, y, x),
                           dimension_names=("pair", "z", "y", "x"), fill_value=False)
        a[:] = data
    ng = g.create_group("native", attributes={"grid": {"size": size, "spacing": [NATIVE_SPACING] * 3}})
    for name, data in native.items():
        fill = np.nan if name in ("mr", "ct") else False
        a = ng.create_array(name, shape=data.shape, dtype=data.dtype, chunks=(1, 1, *zyx[1:]), shards=(1, *zyx),
                            dimension_names=("pair", "z", "y", "x"), fill_value=fill)
        a[:] = data
    sl = ng.create_array("slice_ok", shape=(n, zyx[0]), dtype=bool, chunks=(1, zyx[0]), fill_value=False,
                         dimension_names=("pair", "z"))
    sl[:] = native["head"].any(axis=(2, 3))
    af = ng.create_array("affine", shape=(n, 4, 4), dtype="float64", chunks=(n, 4, 4), fill_value=np.nan,
                         dimension_names=("pair", "row", "col"))
    af[:] = affines
    zarr.consolidate_metadata(dst_store)
    with open(dst_store + "/native/zarr.json") as fh:
        assert json.load(fh)["node_type"] == "group"
    return {i: a for i, (a, _) in grids.items()}
