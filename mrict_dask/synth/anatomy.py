"""Synthetic head anatomy on the template grid, per-patient variation, and rendering into a series grid.

The head is built around nilearn's brain-extracted MNI152 T1: the intracranial space (brain + a CSF rim), and around
it a whole head (head.py): scalp, skull, face with eyes, nose, sinuses, lips, jaws and teeth, ears, a neck down to
C5-C6 with vertebrae, cord and airway, and the top of the shoulders. Each contrast (T1 post-contrast, T1
pre-contrast, T2, FLAIR, CT in HU) is a float image on a template-aligned grid that holds all of it; a patient adds a
lesion and a small smooth deformation; a series samples that image through its ground-truth transform (template
physical LPS mm -> series physical LPS mm). Grey and white matter fraction maps drive physiological signals
(perfusion, diffusion). Face landmarks (nose tip, upper lip, chin, eye centres) are template points of the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..template import Template, load_template, nilearn_data_file
from . import head as hd

log = logging.getLogger(__name__)

CONTRASTS = ("t1c", "t2", "flair", "ct")
AIR = {"t1c": 0.0, "t1": 0.0, "t2": 0.0, "flair": 0.0, "ct": -1000.0}
# Contrasts derived from another one's head image, differing only in the lesion: T1 before contrast (no enhancing rim).
DERIVED_CONTRASTS = {"t1": "t1c"}

# Brain and lesion values per contrast. MR in arbitrary scanner-like units, CT in HU.
_VALUES = {
    "t1c": {"csf": 276.0, "gm": None, "wm": None, "core": 150.0, "rim": 1250.0, "edema": 560.0},
    "t2": {"csf": 1400.0, "gm": 620.0, "wm": 440.0, "core": 1300.0, "rim": 850.0, "edema": 1050.0},
    "flair": {"csf": 90.0, "gm": 560.0, "wm": 400.0, "core": 300.0, "rim": 950.0, "edema": 1000.0},
    "ct": {"csf": 10.0, "gm": 40.0, "wm": 28.0, "core": 12.0, "rim": 30.0, "edema": 18.0},
}
_VALUES["t1"] = dict(_VALUES["t1c"], core=190.0, rim=420.0)
T1_SCALE = 4.0  # template T1 (0..255) -> T1c units (white matter ~890, grey matter ~670)
# Every other tissue (head.TISSUES order). T1c: fat brightest, marrow and glands bright, muscle below grey matter,
# cortical bone, teeth and air dark; T2 (fast spin echo): fluid (vitreous, CSF) brightest, fat and marrow bright,
# muscle dark; FLAIR: as T2 with the free water suppressed; CT: fat -100, muscle 50, vitreous 10, cancellous bone
# 500, cortical 1800, dentin 1900, enamel 2800, air -1000 HU.
_TISSUE_VALUES = {  # tissue: (T1c, T2, FLAIR, CT)
    "air": (0.0, 0.0, 0.0, -1000.0), "skin": (600.0, 500.0, 420.0, 40.0), "fat": (1100.0, 900.0, 700.0, -100.0),
    "muscle": (520.0, 280.0, 230.0, 50.0), "cortical": (40.0, 30.0, 30.0, 1800.0),
    "cancellous": (620.0, 640.0, 500.0, 500.0), "enamel": (15.0, 10.0, 10.0, 2800.0),
    "dentin": (20.0, 20.0, 15.0, 1900.0), "vitreous": (250.0, 1350.0, 110.0, 10.0),
    "lens": (620.0, 300.0, 250.0, 110.0),
    "sclera": (160.0, 150.0, 120.0, 60.0),
    "cartilage": (440.0, 350.0, 300.0, 130.0), "csf": (276.0, 1400.0, 90.0, 10.0), "cord": (760.0, 520.0, 450.0, 35.0),
    "disc": (430.0, 1000.0, 420.0, 80.0), "gland": (820.0, 700.0, 550.0, -10.0), "tongue": (580.0, 380.0, 300.0, 60.0),
    "nerve": (780.0, 450.0, 420.0, 30.0), "mucosa": (700.0, 1000.0, 700.0, 40.0),
}


def tissue_values(contrast: str) -> np.ndarray:
    """Each head.TISSUES value in one contrast (float32, indexed by tissue code)."""
    col = CONTRASTS.index(DERIVED_CONTRASTS.get(contrast, contrast))
    return np.array([_TISSUE_VALUES[t][col] for t in hd.TISSUES], np.float32)


# The model grid in template RAS mm: the whole head, the neck down to C5-C6 and the top of the shoulders.
MODEL_BOX_RAS = ((-100.0, -132.0, -185.0), (100.0, 114.0, None))  # top: brain top + TOP_PAD_MM
TOP_PAD_MM = 30
R_CLOSE = 9.0
MAX_POINTS = 20000


@dataclass
class TissueModel:
    """Static head model on a template-aligned grid (numpy arrays in (z, y, x) order)."""

    grid: sitk.Image  # geometry of the model grid (float32, values unused)
    contrasts: dict[str, np.ndarray]  # contrast name -> float32 image without lesion
    labels: np.ndarray  # uint8 head.TISSUES codes outside the intracranial space
    brain_box: tuple[slice, slice, slice]  # where brain/gm/wm lie on the grid (zeros elsewhere)
    brain: np.ndarray  # float32 fraction of brain tissue (GM + WM) in brain_box
    gm: np.ndarray
    wm: np.ndarray
    head: np.ndarray  # bool: inside the skin (head, neck, shoulders)
    lesion_sites: np.ndarray  # (N, 3) physical points deep in white matter
    brain_points: np.ndarray  # (M, 3) physical points of the template brain mask (subsampled)
    center: np.ndarray  # brain mask centroid, physical LPS mm
    head_corners: np.ndarray  # (8, 3) physical corners of the body's bounding box
    head_points: np.ndarray  # (K, 3) points on the cranium (brain, skull and scalp above the skull base): what a
    # head scan is planned on
    body_points: np.ndarray  # (K, 3) points on the whole skin surface (face, neck, shoulders included)
    landmarks: dict[str, np.ndarray]  # face landmarks, template physical LPS mm
    levels: dict[str, np.ndarray]  # points of the neck scans are planned to (head.levels)
    template_sha256: str

    def index_to_physical(self, idx_zyx: np.ndarray) -> np.ndarray:
        return _index_to_physical(self.grid, idx_zyx)

    def brain_fraction(self, sl: tuple[slice, slice, slice]) -> np.ndarray:
        """The brain fraction over a box of the model grid (zeros outside brain_box)."""
        out = np.zeros(tuple(s.stop - s.start for s in sl), np.float32)
        src, dst = [], []
        for s, b in zip(sl, self.brain_box):
            lo, hi = max(s.start, b.start), min(s.stop, b.stop)
            if hi <= lo:
                return out
            src.append(slice(lo - b.start, hi - b.start))
            dst.append(slice(lo - s.start, hi - s.start))
        out[tuple(dst)] = self.brain[tuple(src)]
        return out

    def brain_grid(self) -> sitk.Image:
        """Geometry of brain_box (for the gm/wm images)."""
        return model_box_grid(self.grid, self.brain_box)


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
    img.SetSpacing(like.GetSpacing())
    img.SetDirection(like.GetDirection())
    img.SetOrigin(like.GetOrigin())
    dist = sitk.SignedMaurerDistanceMap(img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return sitk.GetArrayViewFromImage(dist).astype(np.float32)


def _coarse(mask: np.ndarray) -> np.ndarray:
    """A 2x2x2-block 'any' of a mask (its voxel (0, 0, 0) centred on the fine voxel (0, 0, 0)'s block)."""
    pad = [(0, n % 2) for n in mask.shape]
    m = np.pad(mask, pad)
    z, y, x = (n // 2 for n in m.shape)
    return m.reshape(z, 2, y, 2, x, 2).any(axis=(1, 3, 5))


def _coarse_grid(fine: sitk.Image) -> sitk.Image:
    """The geometry of _coarse(fine): 2 x spacing, origin at the centre of the first 2x2x2 block."""
    img = sitk.Image([(n + 1) // 2 for n in fine.GetSize()], sitk.sitkUInt8)
    img.SetSpacing([2.0 * v for v in fine.GetSpacing()])
    img.SetDirection(fine.GetDirection())
    img.SetOrigin(fine.TransformContinuousIndexToPhysicalPoint([0.5, 0.5, 0.5]))
    return img


def _closed(mask: np.ndarray, like: sitk.Image) -> np.ndarray:
    """A morphological closing of radius R_CLOSE by two distance maps at 2 mm, back on ``like``'s grid."""
    coarse_grid = _coarse_grid(like)
    d = _distance(_distance(_coarse(mask), coarse_grid) <= R_CLOSE, coarse_grid)
    img = sitk.GetImageFromArray(d)
    img.CopyInformation(coarse_grid)
    ref = sitk.Image(like.GetSize(), sitk.sitkFloat32)
    ref.CopyInformation(like)
    back = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 1e3, sitk.sitkFloat32)
    return sitk.GetArrayViewFromImage(back) <= -R_CLOSE


def _ramp(x: np.ndarray) -> np.ndarray:
    """1 where x <= -0.5, 0 where x >= 0.5: a one-voxel partial-volume edge at x = 0."""
    return np.clip(0.5 - x, 0.0, 1.0)


def _model_bounds(t1_img: sitk.Image, t1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index bounds (zyx, on the template's index lattice) of the model box."""
    top_idx = np.argwhere(t1 > 0)[:, 0].max()
    (lo_r, lo_a, lo_s), (hi_r, hi_a, _) = MODEL_BOX_RAS
    top = t1_img.TransformIndexToPhysicalPoint([0, 0, int(top_idx)])[2] + TOP_PAD_MM
    corners = [(-r, -a, z) for r in (lo_r, hi_r) for a in (lo_a, hi_a) for z in (lo_s, top)]
    idx = np.array([t1_img.TransformPhysicalPointToContinuousIndex(c) for c in corners])[:, ::-1]
    return np.floor(idx.min(0)).astype(int), np.ceil(idx.max(0)).astype(int) + 1


def _surface_points(mask: np.ndarray, depth: np.ndarray) -> np.ndarray:
    pts = np.argwhere(mask & (depth < 2.0))
    return pts[:: max(1, len(pts) // MAX_POINTS)]


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = [], []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        lo.append(hit[0])
        hi.append(hit[-1])
    return np.array(lo), np.array(hi)


def _build_model(template: Template) -> TissueModel:
    t1_img = template.image
    gm_img = _on_grid(nilearn_data_file("gm"), t1_img)
    wm_img = _on_grid(nilearn_data_file("wm"), t1_img)
    t1 = sitk.GetArrayFromImage(t1_img).astype(np.float32)
    lo, hi = _model_bounds(t1_img, t1)
    before = np.maximum(-lo, 0)
    after = np.maximum(hi - np.array(t1.shape), 0)
    lo_c = np.maximum(lo, 0)
    hi_c = np.minimum(hi, t1.shape)

    def crop(a: np.ndarray) -> np.ndarray:
        a = a[lo_c[0]:hi_c[0], lo_c[1]:hi_c[1], lo_c[2]:hi_c[2]]
        return np.pad(a, list(zip(before, after)))

    t1 = crop(t1)
    tmask = crop(sitk.GetArrayFromImage(template.mask)).astype(bool)
    grid = sitk.Image([int(v) for v in t1.shape[::-1]], sitk.sitkFloat32)
    grid.SetSpacing(t1_img.GetSpacing())
    grid.SetDirection(t1_img.GetDirection())
    grid.SetOrigin(t1_img.TransformIndexToPhysicalPoint([int(v) for v in (lo[::-1])]))

    # the brain's box: where gm, wm and the brain fraction are kept
    nz = np.argwhere(t1 > 0)
    b_lo, b_hi = np.maximum(nz.min(0) - 4, 0), np.minimum(nz.max(0) + 5, t1.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(b_lo, b_hi))
    gm = crop(sitk.GetArrayFromImage(gm_img) / np.float32(255.0)).astype(np.float32)[box]
    wm = crop(sitk.GetArrayFromImage(wm_img) / np.float32(255.0)).astype(np.float32)[box]

    # the intracranial space: the brain closed by distance maps (radius R_CLOSE) so the skull wraps the whole brain,
    # not each lobe; the closing is computed at 2 mm on the brain's box (it only fills concavities)
    c_lo, c_hi = np.maximum(b_lo - 16, 0), np.minimum(b_hi + 16, t1.shape)
    cbox = tuple(slice(int(a), int(b)) for a, b in zip(c_lo, c_hi))
    intracranial = ndimage.binary_fill_holes(ndimage.binary_closing(t1[cbox] > 0, iterations=2))
    intracranial |= _closed(intracranial, model_box_grid(grid, cbox))
    full = np.zeros(t1.shape, bool)
    full[cbox] = intracranial
    del intracranial
    d_out = np.clip(_distance(full, grid), 0.0, None)
    del full
    center = _index_to_physical(grid, np.argwhere(tmask).mean(0))
    head = hd.build_head(grid, d_out, center)

    t1b = t1[box]
    inside_brain = np.where(t1b > 0, 1.0, 0.0).astype(np.float32)
    tissue = np.clip(gm + wm, 0.0, 1.0) * inside_brain
    gm = gm * inside_brain
    wm = wm * inside_brain
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    f_in = head.intracranial[box]
    contrasts: dict[str, np.ndarray] = {}
    for name in CONTRASTS:
        v = _VALUES[name]
        img = tissue_values(name)[head.labels]
        if name == "t1c":
            intra = np.where(t1b > 0, t1b * T1_SCALE, v["csf"])
        else:
            intra = gm * v["gm"] + wm * v["wm"] + csf * v["csf"]
        img[box] = f_in * intra + (1.0 - f_in) * img[box]
        contrasts[name] = img.astype(np.float32)
    del t1, t1b, csf, f_in

    # lesion sites: deep in white matter (28 mm inside the brain mask, found at 2 mm)
    coarse = _coarse(tmask[box])
    d_in = -_distance(coarse, _coarse_grid(model_box_grid(grid, box)))
    sites = np.argwhere((d_in > 28.0) & (wm[::2, ::2, ::2][tuple(slice(0, n) for n in d_in.shape)] > 0.6))
    sites = sites * 2 + np.array([s.start for s in box])
    del d_in, coarse
    sites = sites[:: max(1, len(sites) // 4000)]
    brain_idx = np.argwhere(tmask)
    brain_idx = brain_idx[:: max(1, len(brain_idx) // MAX_POINTS)]
    hlo, hhi = _bbox(head.body)
    corners = np.array([[z, y, x] for z in (hlo[0], hhi[0]) for y in (hlo[1], hhi[1]) for x in (hlo[2], hhi[2])])

    model = TissueModel(grid=grid, contrasts=contrasts, labels=head.labels, brain_box=box, brain=tissue, gm=gm, wm=wm,
                        head=head.body, lesion_sites=np.zeros((0, 3)), brain_points=np.zeros((0, 3)),
                        center=center, head_corners=np.zeros((8, 3)), head_points=np.zeros((0, 3)),
                        body_points=np.zeros((0, 3)), landmarks=head.landmarks, levels=hd.levels(),
                        template_sha256=template.sha256)
    model.lesion_sites = model.index_to_physical(sites.astype(float))
    model.brain_points = model.index_to_physical(brain_idx.astype(float))
    model.head_corners = model.index_to_physical(corners.astype(float))
    cranium = np.argwhere(head.cranium)
    model.head_points = model.index_to_physical(cranium[:: max(1, len(cranium) // MAX_POINTS)].astype(float))
    model.body_points = model.index_to_physical(_surface_points(head.body, head.depth).astype(float))
    log.debug("tissue model on %s grid", grid.GetSize())
    return model


def model_box_grid(grid: sitk.Image, box: tuple[slice, slice, slice]) -> sitk.Image:
    """The geometry of a (z, y, x) box of the grid."""
    img = sitk.Image([s.stop - s.start for s in box[::-1]], sitk.sitkUInt8)
    img.SetSpacing(grid.GetSpacing())
    img.SetDirection(grid.GetDirection())
    img.SetOrigin(grid.TransformIndexToPhysicalPoint([int(s.start) for s in box[::-1]]))
    return img


def _index_to_physical(grid: sitk.Image, idx_zyx: np.ndarray) -> np.ndarray:
    d = np.array(grid.GetDirection()).reshape(3, 3)
    return np.asarray(grid.GetOrigin()) + (np.asarray(idx_zyx)[..., ::-1] * np.array(grid.GetSpacing())) @ d.T


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

    def to_template(self, anatomy_points: np.ndarray) -> np.ndarray:
        """Where anatomy points (of the model) lie in this patient's template frame: y = d^-1(a)."""
        return invert_displacement(self.field, anatomy_points)

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
            img.CopyInformation(self.model.brain_grid())
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


def displacement_at(field_img: sitk.Image, points: np.ndarray) -> np.ndarray:
    """The displacement field at physical points (trilinear, as SimpleITK's DisplacementFieldTransform; zero outside
    the field)."""
    arr = sitk.GetArrayViewFromImage(field_img)  # (z, y, x, 3)
    d = np.array(field_img.GetDirection()).reshape(3, 3) * np.array(field_img.GetSpacing())[None, :]
    idx = np.linalg.solve(d, (np.atleast_2d(points) - np.array(field_img.GetOrigin())).T)  # (3, N): x, y, z
    return np.stack([ndimage.map_coordinates(arr[..., c], idx[::-1], order=1, mode="constant", cval=0.0)
                     for c in range(3)], axis=1)


def invert_displacement(field_img: sitk.Image, anatomy_points: np.ndarray, tol: float = 1e-4) -> np.ndarray:
    """y with y + u(y) = a for each anatomy point a (fixed-point iteration: the field is smooth and small)."""
    a = np.atleast_2d(np.asarray(anatomy_points, float))
    y = a.copy()
    for _ in range(100):
        nxt = a - displacement_at(field_img, y)
        if np.abs(nxt - y).max() < tol:
            return nxt
        y = nxt
    return y


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
    brain = model.brain_fraction(sl)
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
