"""A store whose native space holds an oblique, left-handed grid, made from a store the pipeline wrote.

The pipeline's native grids are axis-aligned in each MR's patient frame (identity direction). Readers must handle
any grid the contract allows (export's NIfTI and MetaImage geometry, nibabel's affine, the overview's orientation,
to-dicom's ImageOrientationPatient and slice positions), so a copy of a pipeline store gets pair 1 moved onto a grid
of the same size and spacing around the same centre, turned 25 degrees about an oblique axis, its slice axis reversed
(left-handed). Pair 1's native volumes (``mr``, ``ct``, ``valid``, ``head``, ``face``, ``slice_ok``) are its own
native volumes resampled onto that grid in the MR's patient frame (linear for images, nearest for masks), and its
``affine`` is replaced; pair 0 stays as the pipeline wrote it. The copy's markers still record the pipeline's
checksums: for testing readers' geometry only (``verify`` would call pair 1 damaged).
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import SimpleITK as sitk
import zarr

OBLIQUE_PAIR = 1


def _rotation(axis, degrees: float) -> np.ndarray:
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def oblique_affine(affine: np.ndarray, size) -> np.ndarray:
    """A grid of the same size and spacing with the same centre, turned and left-handed (voxel index -> LPS)."""
    a = np.asarray(affine, float)
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    centre = a[:3, :3] @ ((np.asarray(size, float) - 1) / 2) + a[:3, 3]
    d = _rotation([1, 2, 0.5], 25) @ (a[:3, :3] / spacing)
    d[:, 2] *= -1
    out = np.eye(4)
    out[:3, :3] = d * spacing
    out[:3, 3] = centre - out[:3, :3] @ ((np.asarray(size, float) - 1) / 2)
    return out


def _image(arr: np.ndarray, affine: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    img.SetSpacing(spacing.tolist())
    img.SetOrigin(affine[:3, 3].tolist())
    img.SetDirection((affine[:3, :3] / spacing).ravel().tolist())
    return img


def make_oblique_copy(src_store: str, dst_store: str) -> np.ndarray:
    """Copy ``src_store`` (and its work area) to ``dst_store``, pair :data:`OBLIQUE_PAIR` on an oblique left-handed
    native grid; returns that grid's affine."""
    shutil.copytree(src_store, dst_store)
    shutil.copytree(src_store + ".work", dst_store + ".work")
    with warnings.catch_warnings():  # zarr on the store's fixed-length strings and consolidated metadata
        warnings.simplefilter("ignore")
        g = zarr.open_group(dst_store, mode="r+", use_consolidated=False)
        ng = g["native"]
        i = OBLIQUE_PAIR
        size = ng.attrs["grid"]["size"]
        old = np.asarray(ng["affine"][i], float)
        new = oblique_affine(old, size)
        ref = _image(np.zeros(ng["mr"].shape[1:], np.uint8), new)
        lo, hi = float(g["ct_lo"][i]), float(g["ct_hi"][i])
        fills = {"mr": 0.0, "ct": (-1024.0 - lo) / (hi - lo), "valid": 0, "head": 0, "face": 0}
        moved = {}
        for name, fill in fills.items():
            arr = np.asarray(ng[name][i])
            img = _image(arr.astype(np.uint8) if arr.dtype == bool else arr, old)
            interp = sitk.sitkNearestNeighbor if arr.dtype == bool else sitk.sitkLinear
            out = sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk.Transform(), interp, fill))
            moved[name] = out.astype(bool) if arr.dtype == bool else out.astype(arr.dtype)
        for name, arr in moved.items():
            ng[name][i] = arr
        ng["slice_ok"][i] = (moved["head"] & moved["valid"]).any(axis=(1, 2))
        ng["affine"][i] = new
    return new
