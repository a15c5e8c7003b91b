"""The registration target and output grid: by default nilearn's MNI152 2009 1 mm T1, loaded offline.

nilearn ships the (brain-extracted) ICBM152 2009 T1 and its GM/WM probability maps as package data; we
locate the files without importing nilearn itself (that import is slow and pulls scikit-learn).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import SimpleITK as sitk

from .errors import ConfigError

DEFAULT_NAME = "MNI152NLin2009aSym 1mm T1 (ICBM152 2009a, nilearn package data)"
_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def nilearn_data_file(kind: str) -> str:
    """Path of one of nilearn's shipped MNI152 files ("t1", "gm", "wm")."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the default template needs the 'nilearn' package (pip install nilearn), "
            "or give a template path/URL with --template"
        )
    path = os.path.join(next(iter(spec.submodule_search_locations)), "datasets", "data", _FILES[kind])
    if not os.path.exists(path):
        raise ConfigError(f"nilearn is installed but its template file is missing: {path}")
    return path


@dataclass
class Template:
    image: sitk.Image  # float32
    mask: sitk.Image  # uint8 brain mask on the same grid
    name: str
    sha256: str  # of the source file's bytes

    @property
    def grid(self) -> dict[str, Any]:
        return grid_of(self.image)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        x, y, z = self.image.GetSize()
        return (z, y, x)


def grid_of(image: sitk.Image) -> dict[str, Any]:
    """The store contract's `grid` attribute, exactly as SimpleITK reports the image."""
    return {
        "size": [int(v) for v in image.GetSize()],
        "spacing": [float(v) for v in image.GetSpacing()],
        "origin": [float(v) for v in image.GetOrigin()],
        "direction": [float(v) for v in image.GetDirection()],
    }


def _read_image_url(url: str, storage_options: dict | None = None) -> tuple[sitk.Image, str]:
    """Read a NIfTI/NRRD/MHA image from a path or fsspec URL; return it with the sha256 of its bytes."""
    import tempfile

    from .io import Location

    data = Location.of(url, storage_options).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    name = url.rstrip("/").rsplit("/", 1)[-1]
    suffix = ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1] or ".nii.gz"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "template" + suffix)
        with open(path, "wb") as fh:
            fh.write(data)
        try:
            img = sitk.ReadImage(path)
        except RuntimeError as exc:
            raise ConfigError(f"cannot read template image {name}: {str(exc).splitlines()[0]}") from None
    return img, digest


def default_brain_mask(t1: sitk.Image) -> sitk.Image:
    """Brain mask of the shipped template: GM + WM probability > 0.5, filled, plus the T1's CSF rim."""
    gm = sitk.GetArrayFromImage(sitk.ReadImage(nilearn_data_file("gm"))).astype(np.float32) / 255.0
    wm = sitk.GetArrayFromImage(sitk.ReadImage(nilearn_data_file("wm"))).astype(np.float32) / 255.0
    arr = ((gm + wm) > 0.5).astype(np.uint8)
    mask = sitk.GetImageFromArray(arr)
    mask.CopyInformation(t1)
    mask = sitk.BinaryMorphologicalClosing(mask, [3, 3, 3])
    mask = sitk.BinaryFillhole(mask)
    return mask


def _regrid(img: sitk.Image, spacing: float | None, pad_to: tuple[int, int] | None,
            interp: int) -> sitk.Image:
    size = list(img.GetSize())
    sp = list(img.GetSpacing())
    origin = np.array(img.GetOrigin())
    direction = np.array(img.GetDirection()).reshape(3, 3)
    if spacing:
        extent = [size[i] * sp[i] for i in range(3)]
        new_sp = [float(spacing)] * 3
        new_size = [int(math.ceil(extent[i] / spacing - 1e-6)) for i in range(3)]
        # keep the physical centre of the first voxel's cell corner
        corner = origin - direction @ (np.array(sp) / 2)
        origin = corner + direction @ (np.array(new_sp) / 2)
        sp, size = new_sp, new_size
    if pad_to:
        ny, nx = pad_to
        shift = np.zeros(3)
        for axis, n in ((0, nx), (1, ny)):
            before = (n - size[axis]) // 2
            shift[axis] = -before
            size[axis] = n
        origin = origin + direction @ (shift * np.array(sp))
    ref = sitk.Image([int(s) for s in size], img.GetPixelID())
    ref.SetSpacing(sp)
    ref.SetOrigin([float(v) for v in origin])
    ref.SetDirection([float(v) for v in direction.ravel()])
    return sitk.Resample(img, ref, sitk.Transform(), interp, 0.0)


@lru_cache(maxsize=4)
def load_template(url: str | None = None, mask_url: str | None = None, spacing: float | None = None,
                  pad_to: tuple[int, int] | None = None) -> Template:
    """Load the registration target and its brain mask, optionally regridded (coarser spacing, padded in-plane).

    A user template without ``mask_url`` gets a mask from Otsu thresholding (fine for brain-extracted
    templates; pass a mask for a whole-head one).
    """
    if url is None:
        path = nilearn_data_file("t1")
        with open(path, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        img = sitk.ReadImage(path)
        mask = default_brain_mask(img)
        name = DEFAULT_NAME
    else:
        img, digest = _read_image_url(url)
        name = url.rstrip("/").rsplit("/", 1)[-1]
        if mask_url:
            mask, _ = _read_image_url(mask_url)
            mask = sitk.Cast(mask > 0, sitk.sitkUInt8)
        else:
            mask = sitk.OtsuThreshold(sitk.Cast(img, sitk.sitkFloat32), 0, 1)
    img = sitk.Cast(img, sitk.sitkFloat32)
    if spacing or pad_to:
        img = _regrid(img, spacing, pad_to, sitk.sitkLinear)
        mask = _regrid(sitk.Cast(mask, sitk.sitkUInt8), spacing, pad_to, sitk.sitkNearestNeighbor)
    mask = sitk.Cast(mask, sitk.sitkUInt8)
    return Template(image=img, mask=mask, name=name, sha256=digest)


def template_from_config(grid_cfg) -> Template:
    pad = tuple(grid_cfg.pad_to) if grid_cfg.pad_to else None
    return load_template(grid_cfg.template, grid_cfg.template_mask, grid_cfg.spacing, pad)
