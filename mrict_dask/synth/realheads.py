"""Real heads that packages install, written as scanner series in chosen poses, each with a partner CT.

Registration tuned on synthetic heads fails on real ones (necks, faces, fat, shoulders, fields of view off the
brain's centre), so tests and benchmarks also run on heads that nobody here drew:

- ``colin27``: Debian's ``mricron-data`` ``templates/ch2.nii.gz``, a real single-subject 1 mm T1 (Colin Holmes,
  27 averaged scans; MNI space; scalp, skull, eyes, most of the nose; mouth and chin cut). Its brain-extracted
  twin ``ch2bet.nii.gz`` gives the truth of where the brain is. Licence: the MNI templates' permissive notice
  (free use, copy and distribution with the copyright notice).
- ``pydeface_mean``: PyPI ``pydeface``'s ``data/mean_reg2mean.nii.gz``, an average head with its face and upper
  neck, blurred by the averaging (MIT licence). It has no brain mask: the truth of where its brain is, is an
  ellipsoid drawn by hand deep inside its brain, checked on its slices (:data:`MEAN_HEAD_DEEP_BRAIN`).

A head is posed into a scanner by a rigid transform and sampled on a series grid as a scanner would
(:func:`render`). The partner CT is derived from the T1 by tissue class (:func:`derived_ct`: air, fat, soft
tissue, CSF, and bone for the dark band under the scalp), with a headrest, and posed by its own rigid transform:
so the true CT -> MR transform is known exactly. Nothing here reads the pipeline's code: it is ground truth.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from ..errors import ConfigError
from . import dicom_writer as dw
from .anatomy import affine_about, rotation_matrix

COLIN27 = "/usr/share/mricron/templates/ch2.nii.gz"
COLIN27_BRAIN = "/usr/share/mricron/templates/ch2bet.nii.gz"
# centre and semi-axes (x, y, z) in mm, in the mean head's own physical LPS frame (its NIfTI read by SimpleITK)
MEAN_HEAD_DEEP_BRAIN = ((0.0, -5.0, 5.0), (38.0, 55.0, 30.0))
DEEP_MM = 10.0  # deep brain points: at least this far inside the brain


@dataclass
class RealHead:
    name: str
    t1: sitk.Image  # float32, the head's own physical frame
    deep_brain: np.ndarray  # (N, 3) points deep inside its brain, same frame
    source: str


def _pydeface_file(name: str) -> str:
    spec = importlib.util.find_spec("pydeface")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the pydeface average head needs the 'pydeface' package (pip install --no-deps pydeface)")
    return os.path.join(next(iter(spec.submodule_search_locations)), "data", name)


def available() -> dict[str, bool]:
    """Which real heads are installed here."""
    try:
        mean = os.path.exists(_pydeface_file("mean_reg2mean.nii.gz"))
    except ConfigError:
        mean = False
    return {"colin27": os.path.exists(COLIN27) and os.path.exists(COLIN27_BRAIN), "pydeface_mean": mean}


def _mask_points(mask: np.ndarray, like: sitk.Image, step: int) -> np.ndarray:
    idx = np.argwhere(mask)[::step][:, ::-1].astype(np.float64)
    d = np.array(like.GetDirection()).reshape(3, 3) * np.array(like.GetSpacing())
    return np.array(like.GetOrigin()) + idx @ d.T


def load(name: str, step: int = 29) -> RealHead:
    """One installed real head with its deep brain points (every ``step``-th)."""
    if name == "colin27":
        if not available()["colin27"]:
            raise ConfigError(f"Colin27 needs Debian's mricron-data ({COLIN27})")
        t1 = sitk.Cast(sitk.ReadImage(COLIN27), sitk.sitkFloat32)
        brain = sitk.GetArrayFromImage(sitk.ReadImage(COLIN27_BRAIN)) > 0
        depth = ndi.distance_transform_edt(ndi.binary_fill_holes(brain), sampling=t1.GetSpacing()[::-1])
        return RealHead(name, t1, _mask_points(depth >= DEEP_MM, t1, step), "mricron-data ch2.nii.gz")
    if name == "pydeface_mean":
        t1 = sitk.Cast(sitk.ReadImage(_pydeface_file("mean_reg2mean.nii.gz")), sitk.sitkFloat32)
        c, r = (np.array(v) for v in MEAN_HEAD_DEEP_BRAIN)
        g = np.mgrid[-r[0]:r[0]:3.0, -r[1]:r[1]:3.0, -r[2]:r[2]:3.0].reshape(3, -1).T
        return RealHead(name, t1, g[((g / r) ** 2).sum(1) <= 1] + c, "pydeface data/mean_reg2mean.nii.gz")
    raise ConfigError(f"unknown real head {name!r} (colin27, pydeface_mean)")


# ------------------------------------------------------------------------------------------------ CT from T1
def head_mask(t1: sitk.Image) -> np.ndarray:
    """The head in a T1 (smoothed intensity above 12 % of its bright tissue, closed, filled, largest)."""
    a = sitk.GetArrayFromImage(t1)
    sm = ndi.gaussian_filter(a, 1.0)
    bright = float(np.percentile(a[a > np.percentile(a, 50)], 99))
    head = ndi.binary_closing(sm > 0.12 * bright, iterations=3)
    lab, n = ndi.label(head)
    if n:
        counts = np.bincount(lab.ravel())
        counts[0] = 0
        head = lab == int(np.argmax(counts))
    for axis in range(3):
        head = np.moveaxis(np.stack([ndi.binary_fill_holes(s) for s in np.moveaxis(head, axis, 0)]), 0, axis)
    return head


def derived_ct(t1: sitk.Image) -> sitk.Image:
    """A CT (HU) by tissue class of a T1: air -1000 outside the head; inside, fat (brightest) -100, soft tissue
    40, dark deep (CSF) 10, and the dark band 3-16 mm under the skin (the skull, and sinus walls) 1200 HU."""
    a = sitk.GetArrayFromImage(t1)
    sm = ndi.gaussian_filter(a, 1.0)
    bright = float(np.percentile(a[a > np.percentile(a, 50)], 99))
    head = head_mask(t1)
    depth = ndi.distance_transform_edt(head, sampling=t1.GetSpacing()[::-1])
    dark = sm < 0.35 * bright
    hu = np.full(a.shape, -1000.0, np.float32)
    hu[head] = 40.0
    hu[head & dark & (depth >= 16)] = 10.0
    hu[head & (sm > 0.8 * bright) & (depth < 16)] = -100.0
    hu[head & dark & (depth > 3) & (depth < 16)] = 1200.0
    out = sitk.GetImageFromArray(hu)
    out.CopyInformation(t1)
    return out


# ------------------------------------------------------------------------------------------------ scanner frames
@dataclass
class Fov:
    """A series grid relative to the posed head's centre: axes (columns: row, column, slice directions)."""

    axes: np.ndarray
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)  # grid centre - head centre, scanner LPS mm
    modality: str = "MR"
    thickness: float | None = None

    def image(self, head_centre: np.ndarray) -> sitk.Image:
        centre = np.asarray(head_centre, float) + np.asarray(self.offset, float)
        origin = centre - self.axes @ (np.asarray(self.spacing) * (np.asarray(self.size) - 1) / 2)
        ref = sitk.Image([int(s) for s in self.size], sitk.sitkFloat32)
        ref.SetSpacing([float(s) for s in self.spacing])
        ref.SetOrigin([float(v) for v in origin])
        ref.SetDirection([float(v) for v in self.axes.ravel()])
        return ref


AXIAL = np.eye(3)
SAGITTAL = np.stack([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]], axis=1)
FOVS: dict[str, Fov] = {
    # 3D T1, sagittal, 256 mm, down to the neck
    "sagittal_3d_neck": Fov(SAGITTAL, (256, 256, 176), (1.0, 1.0, 1.0), (0.0, 0.0, -20.0)),
    # 2D T1, axial, the brain only: 5 mm slices with 1 mm gaps
    "axial_2d_brain": Fov(AXIAL, (256, 256, 24), (0.9, 0.9, 6.0), (0.0, 0.0, 10.0), thickness=5.0),
    # 3D T1, axial, the head 30 mm off the field of view's centre
    "axial_3d_off_centre": Fov(AXIAL, (256, 256, 180), (1.0, 1.0, 1.0), (30.0, -25.0, 0.0)),
    # head CT, axial, from the upper neck to the vertex (a 256 mm reconstruction, 1.5 mm slices)
    "ct_head": Fov(AXIAL, (320, 320, 130), (0.8, 0.8, 1.5), (0.0, 0.0, -20.0), modality="CT"),
    # head CT, axial, 5 mm slices (a routine reconstruction)
    "ct_head_5mm": Fov(AXIAL, (512, 512, 40), (0.5, 0.5, 5.0), (0.0, 0.0, -20.0), modality="CT"),
}


def pose(angles_deg, shift_mm, centre: np.ndarray) -> np.ndarray:
    """4x4 rigid: head frame -> scanner frame, rotating about ``centre`` (x, y, z angles) then shifting."""
    return affine_about(rotation_matrix(angles_deg), centre, shift_mm)


def head_centre(img: sitk.Image) -> np.ndarray:
    return np.array(img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()]))


def render(img: sitk.Image, ref: sitk.Image, to_scanner: np.ndarray, default: float) -> sitk.Image:
    """``img`` (head frame) seen on the grid ``ref`` (scanner frame): value at x = img(to_scanner^-1 x)."""
    inv = np.linalg.inv(to_scanner)
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(tuple(float(v) for v in inv[:3, :3].ravel()))
    tx.SetTranslation(tuple(float(v) for v in inv[:3, 3]))
    return sitk.Resample(img, ref, tx, sitk.sitkLinear, default, sitk.sitkFloat32)


def add_headrest(ct: sitk.Image, head: np.ndarray | None = None) -> sitk.Image:
    """A 6 mm carbon-fibre headrest (+300 HU) 8 mm behind the CT head's back, across the whole grid."""
    a = sitk.GetArrayFromImage(ct)
    inside = a > -400 if head is None else head
    if not inside.any():
        return ct
    d = np.array(ct.GetDirection()).reshape(3, 3)
    ky = int(np.argmax(np.abs(d[1])))  # index axis closest to posterior (y)
    axis = 2 - ky  # numpy axis
    sign = 1 if d[1, ky] > 0 else -1
    prof = np.any(inside, axis=tuple(i for i in range(3) if i != axis))
    idx = np.nonzero(prof)[0]
    back = idx.max() if sign > 0 else idx.min()
    step = 8.0 / ct.GetSpacing()[ky]
    lo = int(round(back + sign * step))
    hi = int(round(lo + sign * 6.0 / ct.GetSpacing()[ky]))
    lo, hi = sorted((lo, hi))
    sl = [slice(None)] * 3
    sl[axis] = slice(max(lo, 0), max(min(hi, a.shape[axis]), 0))
    a[tuple(sl)] = 300.0
    out = sitk.GetImageFromArray(a)
    out.CopyInformation(ct)
    return out


@dataclass
class Posed:
    """A real head as a scanner series pair, with the truth."""

    mr: sitk.Image
    ct: sitk.Image  # HU
    mr_pose: np.ndarray  # head frame -> MR scanner frame
    ct_pose: np.ndarray  # head frame -> CT scanner frame
    deep_brain_mr: np.ndarray  # deep brain points in the MR scanner frame
    info: dict = field(default_factory=dict)

    @property
    def mr_to_ct(self) -> np.ndarray:
        """The true MR -> CT transform (the store's ct_affine @ inv(mr_affine))."""
        return self.ct_pose @ np.linalg.inv(self.mr_pose)


def posed_pair(head: RealHead, mr_fov: str, mr_angles=(0, 0, 0), mr_shift=(0, 0, 0),
               ct_angles=(6, -4, 9), ct_shift=(12, -8, 20), noise: float = 4.0, seed: int = 0,
               ct_fov: str = "ct_head") -> Posed:
    """The head as an MR series (``mr_fov``, posed) and a derived CT (``ct_fov`` grid, posed apart, headrest)."""
    c = head_centre(head.t1)
    mr_pose = pose(mr_angles, mr_shift, c)
    ct_pose = pose(ct_angles, ct_shift, c) @ mr_pose
    fov = FOVS[mr_fov]
    mr = render(head.t1, fov.image((mr_pose @ np.r_[c, 1])[:3]), mr_pose, 0.0)
    if noise:
        rng = np.random.default_rng(seed)
        a = sitk.GetArrayFromImage(mr)
        a = np.sqrt((a + rng.normal(0, noise, a.shape)) ** 2 + rng.normal(0, noise, a.shape) ** 2)
        noisy = sitk.GetImageFromArray(a.astype(np.float32))
        noisy.CopyInformation(mr)
        mr = noisy
    ct = render(derived_ct(head.t1), FOVS[ct_fov].image((ct_pose @ np.r_[c, 1])[:3]), ct_pose, -1000.0)
    ct = add_headrest(ct)
    deep = head.deep_brain @ mr_pose[:3, :3].T + mr_pose[:3, 3]
    return Posed(mr, ct, mr_pose, ct_pose, deep, {"head": head.name, "mr_fov": mr_fov})


# ------------------------------------------------------------------------------------------------ DICOM
def write_dicom(posed: Posed, folder: str, patient_id: str, seed: int = 0) -> dict[str, list[str]]:
    """Write the pair as two DICOM series (MR and CT studies of one patient, 30 days apart), one file per slice.

    Returns {"MR": files, "CT": files}.
    """
    patient = dw.PatientInfo(patient_id=patient_id, name=f"REAL^HEAD^{patient_id}", birth_date="19600101", sex="O")
    out: dict[str, list[str]] = {}
    for k, (modality, img, date) in enumerate((("MR", posed.mr, "20200110"), ("CT", posed.ct, "20200209"))):
        parts = ("realhead", patient_id, seed, modality)
        study = dw.StudyInfo(uid=str(dw.make_uid(*parts, "study")), modality=modality, date=date, time="101500",
                             accession=f"R{seed}{k}", description=f"{modality} HEAD", study_id=str(100 + k),
                             institution="Real Head Site", referring="", manufacturer="SIEMENS",
                             model="Skyra" if modality == "MR" else "Definition AS",
                             station=f"{modality}1", frame_uid=str(dw.make_uid(*parts, "frame")), age="060Y")
        if modality == "MR":
            proto = {"scanning_sequence": "GR\\IR", "sequence_variant": "SK\\SP\\MP",
                     "acquisition_type": "2D" if max(img.GetSpacing()) > 3.0 else "3D",
                     "sequence_name": "*tfl3d1", "tr": 2300.0, "te": 2.98, "ti": 900.0, "flip": 9, "field": "3"}
            series = dw.SeriesInfo(uid=str(dw.make_uid(*parts, "series")), number=5, description="T1 MPRAGE",
                                   role="t1", time="102000", image_type=["ORIGINAL", "PRIMARY", "M", "NORM"],
                                   protocol=proto)
        else:
            series = dw.SeriesInfo(uid=str(dw.make_uid(*parts, "series")), number=2, description="HEAD 1.25 H30s",
                                   role="ct", time="101700", image_type=["ORIGINAL", "PRIMARY", "AXIAL"],
                                   protocol={"kernel": "H30s", "recon_diameter": 256.0})
        a = sitk.GetArrayFromImage(img)
        d = np.array(img.GetDirection()).reshape(3, 3)
        sp = img.GetSpacing()
        geo = dict(rows_cols=a.shape[1:], row=d[:, 0], col=d[:, 1], pixel_spacing=(sp[1], sp[0]),
                   thickness=float(sp[2]))
        if modality == "MR":
            stored = np.clip(np.round(a), 0, 4095).astype(np.uint16)
            header = dw.mr_header(patient, study, series, window=(300.0, 600.0), spacing_between=float(sp[2]),
                                  **geo)
        else:
            stored = np.clip(np.round(a + 1024.0), 0, 4095).astype(np.int16)
            header = dw.ct_header(patient, study, series, window=(40.0, 80.0), intercept=-1024.0, padding=None,
                                  **geo)
        files = []
        sub = os.path.join(folder, modality)
        os.makedirs(sub, exist_ok=True)
        encoder = dw.SeriesEncoder(header)
        for z in range(a.shape[0]):
            position = np.array(img.TransformIndexToPhysicalPoint([0, 0, z]))
            ds = dw.slice_dataset(header, sop_uid=str(dw.make_uid(*parts, "sop", z)), instance=z + 1,
                                  position=position, pixels=stored[z])
            path = os.path.join(sub, f"{z:04d}.dcm")
            with open(path, "wb") as fh:
                fh.write(encoder.encode(ds))
            files.append(path)
        out[modality] = files
    return out
