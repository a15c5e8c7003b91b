"""Synthetic head anatomy on the template grid, per-patient variation, and rendering into a series grid.

The head is built around nilearn's brain-extracted MNI152 T1: intracranial space (brain + a CSF rim), a skull
shell, fat and skin, air outside. Each contrast (T1 post-contrast, T1 pre-contrast, T2, FLAIR, CT in HU) is a float
image on a padded template grid; a patient adds a lesion and a small smooth deformation; a series samples that image
through its ground-truth transform (template physical LPS mm -> series physical LPS mm). Grey and white matter
fraction maps drive physiological signals (perfusion, diffusion).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..template import Template, load_template, nilearn_data_file

log = logging.getLogger(__name__)

CONTRASTS = ("t1c", "t2", "flair", "ct")
AIR = {"t1c": 0.0, "t1": 0.0, "t2": 0.0, "flair": 0.0, "ct": -1000.0}
# Contrasts derived from another one's head image, differing only in the lesion: T1 before contrast (no enhancing rim).
DERIVED_CONTRASTS = {"t1": "t1c"}

# Tissue values per contrast. MR in arbitrary scanner-like units, CT in HU; "bone" is (diploe, cortical tables).
_VALUES = {
    "t1c": {"csf": 276.0, "gm": None, "wm": None, "bone": (420.0, 40.0), "fat": 1100.0, "skin": 600.0,
            "core": 150.0, "rim": 1250.0, "edema": 560.0},
    "t2": {"csf": 1400.0, "gm": 620.0, "wm": 440.0, "bone": (380.0, 30.0), "fat": 900.0, "skin": 500.0,
           "core": 1300.0, "rim": 850.0, "edema": 1050.0},
    "flair": {"csf": 90.0, "gm": 560.0, "wm": 400.0, "bone": (300.0, 30.0), "fat": 700.0, "skin": 420.0,
              "core": 300.0, "rim": 950.0, "edema": 1000.0},
    "ct": {"csf": 10.0, "gm": 40.0, "wm": 28.0, "bone": (750.0, 1650.0), "fat": -100.0, "skin": 40.0,
           "core": 12.0, "rim": 30.0, "edema": 18.0},
}
_VALUES["t1"] = dict(_VALUES["t1c"], core=190.0, rim=420.0)
T1_SCALE = 4.0  # template T1 (0..255) -> T1c units

# Shell radii, mm beyond the brain surface: CSF rim | skull | fat | skin | air
R_CSF, R_SKULL, R_FAT, R_SKIN = 2.5, 9.0, 13.0, 15.0
R_CLOSE = 9.0
PAD_MM = 22


@dataclass
class TissueModel:
    """Static head model on a padded template grid (numpy arrays in (z, y, x) order)."""

    grid: sitk.Image  # geometry of the padded grid (float32, values unused)
    contrasts: dict[str, np.ndarray]  # contrast name -> float32 image without lesion
    brain: np.ndarray  # float32 fraction of brain tissue (GM + WM)
    gm: np.ndarray
    wm: np.ndarray
    head: np.ndarray  # bool: inside the skin
    lesion_sites: np.ndarray  # (N, 3) physical points deep in white matter
    brain_points: np.ndarray  # (M, 3) physical points of the template brain mask (subsampled)
    center: np.ndarray  # brain mask centroid, physical LPS mm
    head_corners: np.ndarray  # (8, 3) physical corners of the head's bounding box
    head_points: np.ndarray  # (K, 3) physical points on/inside the skin (subsampled), for field-of-view planning
    template_sha256: str

    def index_to_physical(self, idx_zyx: np.ndarray) -> np.ndarray:
        d = np.array(self.grid.GetDirection()).reshape(3, 3)
        sp = np.array(self.grid.GetSpacing())
        return np.asarray(self.grid.GetOrigin()) + (np.asarray(idx_zyx)[..., ::-1] * sp) @ d.T


_MODELS: dict[str, TissueModel] = {}


def tissue_model(template: Template | None = None) -> TissueModel:
    """The head model for ``template`` (default: the shipped MNI152), built once per process."""
    template = template or load_template()
    key = template.sha256 + str(template.image.GetSize())
    if key not in _MODELS:
        _MODELS.clear()  # one template at a time: these arrays are large
        _MODELS[key] = _build_model(template)
    return _MODELS[key]


def _on_grid(path: str, like: sitk.Image) -> sitk.Image:
    img = sitk.Cast(sitk.ReadImage(path), sitk.sitkFloat32)
    if img.GetSize() != like.GetSize() or not np.allclose(img.GetOrigin(), like.GetOrigin()):
        img = sitk.Resample(img, like, sitk.Transform(), sitk.sitkLinear, 0.0)
    return img


def _distance(mask: np.ndarray, like: sitk.Image) -> np.ndarray:
    """Signed distance in mm to the mask's surface, positive outside."""
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.CopyInformation(like)
    dist = sitk.SignedMaurerDistanceMap(img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return sitk.GetArrayViewFromImage(dist).astype(np.float32)


def _ramp(x: np.ndarray) -> np.ndarray:
    """1 where x <= -0.5, 0 where x >= 0.5: a one-voxel partial-volume edge at x = 0."""
    return np.clip(0.5 - x, 0.0, 1.0)


def _build_model(template: Template) -> TissueModel:
    t1_img = template.image
    gm_img = _on_grid(nilearn_data_file("gm"), t1_img)
    wm_img = _on_grid(nilearn_data_file("wm"), t1_img)
    t1 = sitk.GetArrayFromImage(t1_img).astype(np.float32)
    # crop/pad to the head's bounding box: the brain's extent plus the scalp and some air
    inside = t1 > 0
    nz = np.argwhere(inside)
    lo = nz.min(0) - PAD_MM
    hi = nz.max(0) + PAD_MM + 1
    before = np.maximum(-lo, 0)
    after = np.maximum(hi - np.array(t1.shape), 0)
    lo_c = np.maximum(lo, 0)
    hi_c = np.minimum(hi, t1.shape)

    def crop(a: np.ndarray) -> np.ndarray:
        a = a[lo_c[0]:hi_c[0], lo_c[1]:hi_c[1], lo_c[2]:hi_c[2]]
        return np.pad(a, list(zip(before, after)))

    t1 = crop(t1)
    gm = crop(sitk.GetArrayFromImage(gm_img) / np.float32(255.0)).astype(np.float32)
    wm = crop(sitk.GetArrayFromImage(wm_img) / np.float32(255.0)).astype(np.float32)
    tmask = crop(sitk.GetArrayFromImage(template.mask)).astype(bool)

    grid = sitk.Image([int(v) for v in t1.shape[::-1]], sitk.sitkFloat32)
    grid.SetSpacing(t1_img.GetSpacing())
    grid.SetDirection(t1_img.GetDirection())
    grid.SetOrigin(t1_img.TransformIndexToPhysicalPoint([int(v) for v in (lo[::-1])]))

    intracranial = ndimage.binary_fill_holes(ndimage.binary_closing(t1 > 0, iterations=2))
    # a closing by distance maps (radius R_CLOSE) so the skull wraps the whole brain, not each lobe
    closed = _distance(_distance(intracranial, grid) <= R_CLOSE, grid) <= -R_CLOSE
    intracranial |= closed
    d_out = np.clip(_distance(intracranial, grid), 0.0, None)
    f_in = _ramp(d_out - R_CSF)
    f_skull = _ramp(d_out - R_SKULL)
    f_fat = _ramp(d_out - R_FAT)
    f_skin = _ramp(d_out - R_SKIN)
    bone = f_skull - f_in
    fat = f_fat - f_skull
    skin = f_skin - f_fat
    # position across the skull (0 inner table .. 1 outer table) -> diploe in the middle, cortex at the tables
    pos = np.clip((d_out - R_CSF) / (R_SKULL - R_CSF), 0.0, 1.0)
    cortical = np.abs(2.0 * pos - 1.0) ** 1.5

    brain_in = np.where(t1 > 0, 1.0, 0.0).astype(np.float32)
    tissue = np.clip(gm + wm, 0.0, 1.0) * brain_in
    gm = gm * brain_in
    wm = wm * brain_in
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)

    contrasts: dict[str, np.ndarray] = {}
    for name in CONTRASTS:
        v = _VALUES[name]
        if name == "t1c":
            intra = np.where(t1 > 0, t1 * T1_SCALE, v["csf"])
        else:
            intra = gm * v["gm"] + wm * v["wm"] + csf * v["csf"]
        bone_v = v["bone"][0] + (v["bone"][1] - v["bone"][0]) * cortical
        img = f_in * intra + bone * bone_v + fat * v["fat"] + skin * v["skin"] + (1.0 - f_skin) * AIR[name]
        contrasts[name] = img.astype(np.float32)

    d_in = -_distance(tmask, grid)
    sites = np.argwhere((d_in > 28.0) & (wm > 0.6))
    sites = sites[:: max(1, len(sites) // 4000)]
    brain_idx = np.argwhere(tmask)
    brain_idx = brain_idx[:: max(1, len(brain_idx) // 20000)]
    head = f_skin > 0.5
    hz = np.argwhere(head)
    hlo, hhi = hz.min(0), hz.max(0)
    corners = np.array([[z, y, x] for z in (hlo[0], hhi[0]) for y in (hlo[1], hhi[1]) for x in (hlo[2], hhi[2])])
    surface = np.argwhere(head & ~ndimage.binary_erosion(head, iterations=2))
    surface = surface[:: max(1, len(surface) // 20000)]

    model = TissueModel(grid=grid, contrasts=contrasts, brain=tissue.astype(np.float32), gm=gm, wm=wm,
                        head=head, lesion_sites=np.zeros((0, 3)), brain_points=np.zeros((0, 3)),
                        center=np.zeros(3), head_corners=np.zeros((8, 3)), head_points=np.zeros((0, 3)),
                        template_sha256=template.sha256)
    model.lesion_sites = model.index_to_physical(sites.astype(float))
    model.brain_points = model.index_to_physical(brain_idx.astype(float))
    model.center = model.index_to_physical(np.argwhere(tmask).mean(0))
    model.head_corners = model.index_to_physical(corners.astype(float))
    model.head_points = model.index_to_physical(surface.astype(float))
    log.debug("tissue model on %s grid", grid.GetSize())
    return model


# ------------------------------------------------------------------------------------------------ patient
@dataclass
class Lesion:
    center: np.ndarray  # template physical LPS mm
    radii: np.ndarray  # ellipsoid semi-axes along the physical x, y, z axes, mm

    def as_dict(self) -> dict:
        return {"center": [float(v) for v in self.center], "radii": [float(v) for v in self.radii]}


@dataclass
class PatientAnatomy:
    """What makes one patient's head differ from the template."""

    scale: np.ndarray  # anisotropic scaling about the brain centre (x, y, z factors)
    lesion: Lesion
    field: sitk.Image  # displacement field (template mm), zero mean and affine-free over the brain
    model: TissueModel
    _cache: dict = field(default_factory=dict, repr=False)

    def deformation(self) -> sitk.Transform:
        """The smooth deformation d: a template point y samples the anatomy at y + d(y)."""
        return sitk.DisplacementFieldTransform(sitk.Image(self.field))

    def contrast(self, name: str) -> sitk.Image:
        """The patient's anatomy in one contrast on the padded template grid (lesion included)."""
        if name not in self._cache:
            self._cache[name] = _with_lesion(self.model, name, self.lesion)
        return self._cache[name]

    def tissue(self, name: str) -> sitk.Image:
        """A tissue fraction map of the template ("gm" or "wm") on the padded grid, for physiological signals."""
        key = "tissue:" + name
        if key not in self._cache:
            img = sitk.GetImageFromArray(getattr(self.model, name))
            img.CopyInformation(self.model.grid)
            self._cache[key] = img
        return self._cache[key]


def affine_about(matrix: np.ndarray, center: np.ndarray, translation=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 of y -> M (y - c) + c + t."""
    out = np.eye(4)
    out[:3, :3] = matrix
    out[:3, 3] = np.asarray(center) - matrix @ np.asarray(center) + np.asarray(translation)
    return out


def rotation_matrix(angles_deg) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_patient(rng: np.random.Generator, model: TissueModel, deform_mm: float = 2.5) -> PatientAnatomy:
    scale = rng.uniform(0.92, 1.08, size=3)
    site = model.lesion_sites[rng.integers(len(model.lesion_sites))]
    radii = rng.uniform(7.0, 12.0) * rng.uniform(0.8, 1.2, size=3)
    field_img = _random_field(rng, model, deform_mm)
    return PatientAnatomy(scale=scale, lesion=Lesion(site, radii), field=field_img, model=model)


def _random_field(rng: np.random.Generator, model: TissueModel, amplitude: float, step: float = 8.0) -> sitk.Image:
    """A smooth random displacement field on a coarse grid; zero mean and no affine part over the brain."""
    corners = model.head_corners
    lo = corners.min(0) - 2 * step
    hi = corners.max(0) + 2 * step
    shape = np.ceil((hi - lo) / step).astype(int) + 1  # x, y, z
    noise = rng.standard_normal((3, *shape[::-1]))
    disp = np.stack([ndimage.gaussian_filter(c, sigma=2.5, mode="nearest") for c in noise])  # (3, z, y, x)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape[::-1]], indexing="ij")
    pts = np.stack([xx, yy, zz], -1).reshape(-1, 3) * step + lo
    vec = disp.reshape(3, -1).T
    # least-squares affine fit over grid points near the brain; remove it so the manifest's affine stays exact
    near = _near(pts, model.brain_points, step)
    design = np.c_[pts[near], np.ones(near.sum())]
    coef, *_ = np.linalg.lstsq(design, vec[near], rcond=None)
    vec = vec - np.c_[pts, np.ones(len(pts))] @ coef
    mag = np.linalg.norm(vec[near], axis=1).max()
    vec = vec * (amplitude / mag if mag > 0 else 0.0)
    arr = vec.reshape(*shape[::-1], 3)
    img = sitk.GetImageFromArray(arr.astype(np.float64), isVector=True)
    img.SetOrigin([float(v) for v in lo])
    img.SetSpacing([step] * 3)
    return img


def _near(pts: np.ndarray, brain_points: np.ndarray, step: float) -> np.ndarray:
    from scipy.spatial import cKDTree

    d, _ = cKDTree(brain_points).query(pts, distance_upper_bound=step)
    return np.isfinite(d)


def _with_lesion(model: TissueModel, name: str, lesion: Lesion) -> sitk.Image:
    arr = model.contrasts[DERIVED_CONTRASTS.get(name, name)].copy()
    v = _VALUES[name]
    reach = lesion.radii.max() * 1.8 + 3.0
    grid = model.grid
    c_idx = np.array(grid.TransformPhysicalPointToContinuousIndex([float(x) for x in lesion.center]))[::-1]
    lo = np.maximum(np.floor(c_idx - reach).astype(int), 0)
    hi = np.minimum(np.ceil(c_idx + reach).astype(int) + 1, arr.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    idx = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
    pts = model.index_to_physical(idx.astype(float))
    rho = np.sqrt((((pts - lesion.center) / lesion.radii) ** 2).sum(-1))
    r = lesion.radii.mean()
    brain = model.brain[sl]
    les = _ramp((rho - 1.0) * r) * brain
    core = _ramp((rho - 0.55) * r) * brain
    rim = les - core
    edema = (_ramp((rho - 1.7) * r) * brain - les).clip(0.0, None)
    if name in ("t1c", "t1"):
        edema_v = arr[sl] * 0.8
    else:
        edema_v = v["edema"]
    arr[sl] = arr[sl] * (1.0 - les - edema) + core * v["core"] + rim * v["rim"] + edema * edema_v
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(grid)
    return img


# ------------------------------------------------------------------------------------------------ rendering
@dataclass
class Geometry:
    """A voxel grid in physical LPS mm: x = origin + axes @ (spacing * index); axes columns need not be orthogonal
    (a gantry-tilted CT's slice step is not along its row x column normal)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: np.ndarray
    axes: np.ndarray  # 3x3, columns = unit vectors of the i, j, k steps

    @property
    def index_matrix(self) -> np.ndarray:
        return self.axes * np.asarray(self.spacing)[None, :]

    def physical(self, ijk) -> np.ndarray:
        return self.origin + self.index_matrix @ np.asarray(ijk, dtype=float)

    def as_dict(self) -> dict:
        return {"size": [int(v) for v in self.size], "spacing": [float(v) for v in self.spacing],
                "origin": [float(v) for v in self.origin], "direction": [float(v) for v in self.axes.ravel()]}


def render(image: sitk.Image, geometry: Geometry, transform: np.ndarray, deformation: sitk.Transform | None,
           default: float, interpolator=sitk.sitkLinear) -> np.ndarray:
    """Sample ``image`` (template space) on ``geometry``: value at series point x = image(d(T^-1 x)).

    Returns a float32 array in (k, j, i) order. The reference grid is the index space itself, so one affine
    (index -> template point) covers oblique and sheared (tilted) grids alike.
    """
    tinv = np.linalg.inv(transform)
    m = tinv[:3, :3] @ geometry.index_matrix
    t = tinv[:3, :3] @ geometry.origin + tinv[:3, 3]
    affine = sitk.AffineTransform(3)
    affine.SetMatrix([float(v) for v in m.ravel()])
    affine.SetTranslation([float(v) for v in t])
    if deformation is not None:
        tx: sitk.Transform = sitk.CompositeTransform(3)
        tx.AddTransform(deformation)
        tx.AddTransform(affine)  # applied first: composite(p) = deformation(affine(p))
    else:
        tx = affine
    ref = sitk.Image([int(v) for v in geometry.size], sitk.sitkFloat32)
    out = sitk.Resample(image, ref, tx, interpolator, float(default), sitk.sitkFloat32)
    return sitk.GetArrayViewFromImage(out).copy()


def bias_field(shape_kji: tuple[int, int, int], rng: np.random.Generator, strength: float = 0.2) -> np.ndarray:
    """Smooth multiplicative field within 1 +- strength (low-order polynomial in normalised coordinates)."""
    k, j, i = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape_kji]
    k, j, i = k[:, None, None], j[None, :, None], i[None, None, :]
    c = rng.uniform(-1.0, 1.0, size=7).astype(np.float32)
    g = c[0] * i + c[1] * j + c[2] * k + c[3] * i * j + c[4] * j * k + c[5] * (i * i - 0.33) + c[6] * (k * k - 0.33)
    g = g / np.float32(max(float(np.abs(g).max()), 1e-6))
    return (1.0 + strength * g).astype(np.float32)


def rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    n1 = rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(sigma)
    n2 = rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(sigma)
    return np.sqrt((signal + n1) ** 2 + n2 ** 2)
