"""Native patient space: the MR's own patient frame, on one fixed box for every pair (pure functions).

The box is axis-aligned in the MR series' patient coordinates (LPS mm, identity direction: array axes (z, y, x)
run superior, posterior, left), isotropic (``NativeConfig.spacing_mm``), of one size for every pair
(``box_mm``), so that arrays stay rectangular. Its centre is a fixed template point mapped through the pair's
MR -> template affine: it sits on each head the same way whatever the field of view. A voxel index (x, y, z)
maps to the MR's patient LPS mm by the pair's ``affine`` (4 x 4), as SimpleITK's TransformIndexToPhysicalPoint
does for the box image; a model's prediction on the box maps back onto the source MR series exactly.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .config import NativeConfig
from .register import covered


def box_size(cfg: NativeConfig) -> tuple[int, int, int]:
    """(x, y, z) voxels of the box."""
    return tuple(int(round(v / cfg.spacing_mm)) for v in cfg.box_mm)  # type: ignore[return-value]


def box_affine(mr_affine: np.ndarray, cfg: NativeConfig) -> np.ndarray:
    """4x4 voxel index (x, y, z, 1) -> MR patient LPS mm of the pair's box."""
    centre = mr_affine[:3, :3] @ np.asarray(cfg.centre_template_mm, float) + mr_affine[:3, 3]
    size = np.array(box_size(cfg), float)
    a = np.eye(4)
    a[:3, :3] *= cfg.spacing_mm
    a[:3, 3] = np.round(centre - cfg.spacing_mm * (size - 1) / 2, 3)  # to the micrometre: readable numbers
    return a


def box_image(affine: np.ndarray, cfg: NativeConfig) -> sitk.Image:
    """An empty image on the box: the reference grid for resampling (uint8: only its geometry is read)."""
    img = sitk.Image(list(box_size(cfg)), sitk.sitkUInt8)
    sp = float(cfg.spacing_mm)
    img.SetSpacing([sp] * 3)
    img.SetOrigin([float(v) for v in affine[:3, 3]])
    img.SetDirection([float(v) for v in (affine[:3, :3] / sp).ravel()])
    return img


def affine_of(image: sitk.Image) -> np.ndarray:
    """The 4x4 voxel index -> physical matrix of any SimpleITK image."""
    a = np.eye(4)
    a[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    a[:3, 3] = image.GetOrigin()
    return a


def cut_ml(head: sitk.Image, box: sitk.Image) -> float:
    """Volume (mL) of ``head`` (a mask on any grid, MR patient frame) lying outside the box (the box read onto the
    head's grid by nearest neighbour: a voxel is inside when its centre is within half a box voxel of the box)."""
    outside = (sitk.GetArrayViewFromImage(head) > 0) & ~covered(box, head)
    return float(outside.sum() * np.prod(head.GetSpacing()) / 1000.0)
