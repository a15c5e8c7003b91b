"""Ground-truth helpers for tests: errors measured against the generator's manifest, never against our own output."""

from __future__ import annotations

import os
import shutil
import subprocess

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


def deep_brain_in_series(source, series="mr", depth_mm: float = 10.0, max_points: int = 2000):
    """(template points at least ``depth_mm`` inside the template brain, where the generator put each of them in the
    series: LPS mm). ``source``: a SimPatient (series "mr"/"ct") or a manifest patient entry with one of its series
    entries. A correct MR -> template registration maps the second set back inside the template brain."""
    from mrict_dask.synth.points import deep_brain_points

    return deep_brain_points(source, series, depth_mm, max_points)


def landmarks_in_series(series: dict) -> dict[str, np.ndarray]:
    """A manifest series' face landmarks (nose_tip, upper_lip, chin, right_eye, left_eye), series LPS mm."""
    return {k: np.asarray(v, float) for k, v in series["landmarks"].items()}


def share_inside_brain(template, points: np.ndarray, margin_mm: float = 0.0) -> float:
    """The share of template points (LPS mm) inside the template brain mask grown by ``margin_mm``."""
    dist = sitk.SignedMaurerDistanceMap(template.mask > 0, insideIsPositive=False, squaredDistance=False,
                                        useImageSpacing=True)
    arr = sitk.GetArrayViewFromImage(dist)
    idx = np.array([dist.TransformPhysicalPointToContinuousIndex([float(v) for v in p]) for p in points])
    ijk = np.rint(idx).astype(int)
    ok = np.all((ijk >= 0) & (ijk < np.array(dist.GetSize())), axis=1)
    inside = np.zeros(len(points), bool)
    inside[ok] = arr[ijk[ok, 2], ijk[ok, 1], ijk[ok, 0]] <= margin_mm
    return float(inside.mean())


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


def manifest_series(manifest: dict, role: str | None = None):
    """(patient, study, series) entries of a manifest, optionally of one role."""
    for patient in manifest["patients"]:
        for study in patient["studies"]:
            for series in study["series"]:
                if role is None or series["role"] == role:
                    yield patient, study, series


def read_series(root: str, series: dict) -> tuple[sitk.Image, list[str]]:
    """Assemble a series as a user would: GDCM's position sort over the series folder; also the files it used."""
    folder = os.path.dirname(os.path.join(root, series["files"][0]))
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(folder, series["series_uid"])
    reader.SetFileNames(names)
    return reader.Execute(), [os.path.relpath(n, root) for n in names]


def assert_read_back_equals_manifest(root: str, series: dict) -> sitk.Image:
    """GDCM's assembly of a series has the manifest's grid and takes its files in the manifest's (spatial) order."""
    img, names = read_series(root, series)
    g = series["geometry"]
    assert list(img.GetSize()) == g["size"]
    np.testing.assert_allclose(img.GetOrigin(), g["origin"], atol=0.01)
    np.testing.assert_allclose(img.GetSpacing(), g["spacing"], atol=0.01)
    np.testing.assert_allclose(img.GetDirection(), g["direction"], atol=1e-4)
    assert names == series["files"]
    return img


def sitk_affine(m) -> sitk.AffineTransform:
    m = np.asarray(m, dtype=float)
    t = sitk.AffineTransform(3)
    t.SetMatrix([float(v) for v in m[:3, :3].ravel()])
    t.SetTranslation([float(v) for v in m[:3, 3]])
    return t


def ncc_in_template(img: sitk.Image, transform, template) -> float:
    """Pull a series back onto the template grid through ``transform`` and correlate inside the brain."""
    # Resample maps output (template) points to input (series) points: that is the manifest transform itself.
    warped = sitk.Resample(sitk.Cast(img, sitk.sitkFloat32), template.image, sitk_affine(transform), sitk.sitkLinear,
                           0.0)
    mask = sitk.GetArrayViewFromImage(template.mask) > 0
    a = sitk.GetArrayViewFromImage(warped)[mask]
    b = sitk.GetArrayViewFromImage(template.image)[mask]
    return float(np.corrcoef(a, b)[0, 1])


def dciodvfy_errors(path: str) -> list[str]:
    """dciodvfy's error lines for one file (warnings are not errors)."""
    exe = shutil.which("dciodvfy")
    assert exe, "dciodvfy (Debian package dicom3tools) is required for this test"
    proc = subprocess.run([exe, path], capture_output=True, text=True, timeout=120)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]
