"""Ground-truth points of generated patients in their series' coordinates: face landmarks and deep-brain points.

A series point x samples the anatomy at d(T^-1 x) (T: the series' manifest ``transform``, d: the patient's small
deformation), so an anatomy point a appears at x = T(d^-1(a)). A correct MR -> template registration brings every
deep-brain point back inside the template brain; a correct defacing removes every landmark's neighbourhood.

A source is a ``SimPatient`` (``simulate_patient``; series "mr" or "ct") or a manifest patient entry with one of its
series entries (the patient's deformation is rebuilt from its ``sim_seed``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..template import Template, load_template
from .anatomy import invert_displacement, make_patient, tissue_model
from .corpus import SimPatient, _rng


def series_landmarks(source: SimPatient | dict, series: str | dict = "mr") -> dict[str, np.ndarray]:
    """Face landmarks (nose_tip, upper_lip, chin, right_eye, left_eye) in the series' LPS mm."""
    model = tissue_model()
    names = list(model.landmarks)
    pts = to_series(np.stack([model.landmarks[n] for n in names]), source, series)
    return dict(zip(names, pts))


def deep_brain_points(source: SimPatient | dict, series: str | dict = "mr", depth_mm: float = 10.0,
                      max_points: int = 2000, template: Template | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(points at least ``depth_mm`` inside the template brain mask in template LPS mm, where each appears in the
    series' LPS mm)."""
    p = deep_template_points(depth_mm, max_points, template)
    return p, to_series(p, source, series)


def to_series(anatomy_points: np.ndarray, source: SimPatient | dict, series: str | dict = "mr") -> np.ndarray:
    """Where anatomy points (template LPS mm of the model) appear in a series: T(d^-1(a))."""
    transform, field = _transform_and_field(source, series)
    y = invert_displacement(field, anatomy_points)
    return y @ transform[:3, :3].T + transform[:3, 3]


def deep_template_points(depth_mm: float = 10.0, max_points: int = 2000,
                         template: Template | None = None) -> np.ndarray:
    """Template points (LPS mm) at least ``depth_mm`` inside the template's brain mask, evenly thinned."""
    template = template or load_template()
    key = (template.sha256, template.image.GetSize(), round(float(depth_mm), 3), int(max_points))
    if key not in _DEEP:
        _DEEP[key] = _deep(float(depth_mm), int(max_points), template)
    return _DEEP[key].copy()


_DEEP: dict[tuple, np.ndarray] = {}


def _deep(depth_mm: float, max_points: int, template: Template) -> np.ndarray:
    dist = sitk.SignedMaurerDistanceMap(template.mask > 0, insideIsPositive=True, squaredDistance=False,
                                        useImageSpacing=True)
    idx = np.argwhere(sitk.GetArrayViewFromImage(dist) >= depth_mm)[:, ::-1].astype(float)  # x, y, z
    if not len(idx):
        raise ValueError(f"no template brain voxel is {depth_mm} mm deep")
    idx = idx[:: max(1, len(idx) // max_points)]
    d = np.array(template.image.GetDirection()).reshape(3, 3) * np.array(template.image.GetSpacing())[None, :]
    return np.asarray(template.image.GetOrigin()) + idx @ d.T


def _transform_and_field(source: SimPatient | dict, series: str | dict) -> tuple[np.ndarray, sitk.Image]:
    if isinstance(source, SimPatient):
        if not isinstance(series, str) or series not in ("mr", "ct"):
            raise ValueError('a SimPatient has two series: "mr" and "ct"')
        if source.field is None:
            raise ValueError("this SimPatient carries no deformation field")
        return (source.mr_transform if series == "mr" else source.ct_transform), source.field
    if not isinstance(series, dict):
        raise ValueError("with a manifest patient entry, give one of its series entries")
    return np.asarray(series["transform"], float), _field(int(source["sim_seed"]))


@lru_cache(maxsize=16)
def _field(sim_seed: int) -> Any:
    """A corpus patient's deformation field, rebuilt from its seed (as corpus.patient_anatomy draws it)."""
    return make_patient(_rng(sim_seed, 0), tissue_model()).field
