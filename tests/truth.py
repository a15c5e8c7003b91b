"""Ground-truth helpers for tests: errors measured against the generator's manifest, never against our own output."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def brain_points(template, step: int = 4) -> np.ndarray:
    """Physical LPS coordinates (N, 3) of template brain-mask voxel centres, every ``step``-th voxel per axis."""
    mask = sitk.GetArrayFromImage(template.mask)[::step, ::step, ::step] > 0
    zyx = np.argwhere(mask) * step
    ijk = zyx[:, ::-1].astype(float)
    direction = np.array(template.image.GetDirection()).reshape(3, 3)
    spacing = np.array(template.image.GetSpacing())
    origin = np.array(template.image.GetOrigin())
    return origin + (ijk * spacing) @ direction.T


def apply(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    a = np.asarray(affine, dtype=float)
    return points @ a[:3, :3].T + a[:3, 3]


def tre_mm(true_affine, recovered_affine, points: np.ndarray) -> tuple[float, float]:
    """(mean, max) distance in mm between where the true and the recovered transforms send ``points``."""
    d = np.linalg.norm(apply(true_affine, points) - apply(recovered_affine, points), axis=1)
    return float(d.mean()), float(d.max())


def series_by_uid(manifest: dict) -> dict[str, dict]:
    out = {}
    for patient in manifest["patients"]:
        for study in patient["studies"]:
            for series in study["series"]:
                out[series["series_uid"]] = series
    return out
