"""The synthetic head around the template brain: scalp, skull, face, ears, neck and the top of the shoulders.

Everything outside the brain is a tissue label on the model grid (uint8, ``TISSUES``), painted structure by structure
from signed distance functions in template space. Numbers below are template MNI RAS mm (R = -x, A = -y, S = z of the
template's physical LPS frame); the nilearn MNI152 2009a template is ~3 % larger than Colin27.

Where the numbers come from (both heads were affinely registered into this template: Colin27's brain onto the
template brain, then pydeface's average head onto Colin27's whole head, by Mattes mutual information):

- Colin27 (``/usr/share/mricron/templates/ch2.nii.gz``, a real single-subject 1 mm T1, Debian mricron-data): eye
  globe centres (+-35, 61.5, -42) and globe radius 12 mm (its vitreous spans 22-24 mm on each axis), corneal apex
  A ~ 74, eyelid skin A ~ 80; soft-tissue glabella (0, 92, -10) and nasion (0, 85.5, -45); the front of the face
  (table ``FACE_FRONT``, rows S -10 to -70: where its skin ends along +A for R = 0..80); brain-mask-to-skin distances
  (25 mm at the vertex, front and back, 19 mm at the sides: ``_scalp_radii``). Its field of view ends at A ~ 92 in
  template space, so it cuts the nose; its mouth and chin are cut below S ~ -75.
- pydeface's average head (``pydeface/data/mean_reg2mean.nii.gz``, PyPI pydeface, MIT; shifted by (A -2.5, S +4) so
  its nasion meets Colin27's): the lower face (``FACE_FRONT`` rows S -80 to -140), the neck's back (A ~ -117 from S
  -100 to -140) and width (+-72 at A = -40 from S -100 to -130, ``NECK``), the sphenoid sinus (0, 14, -40), the
  maxillary sinuses (+-29, 52, -66), the pharyngeal airway (centre A ~ -20 at S -110) and the spinal cord (A ~ -55 at
  S -90 to -110). Being an average, it blurs the nose and lips: the nose tip is placed 4 mm beyond its blurred maximum
  (A 97 at S -77 after the shift), where Colin27's nose also passes its field-of-view edge (A > 92 from S -62 to -75).
- Textbook proportions, scaled by 1.1 to this template, where neither head shows a structure sharply: vertebral
  levels (body 15 mm + disc 4 mm a level), canal and cord diameters, teeth and dental arches, lens, extraocular
  muscles, ear canal length, mandible thickness, shoulder line (trapezius from the neck root at S ~ -153 down to
  S ~ -167 at R = 100).

The skull base is closed under the brain: no structure below it may change a voxel within ``MIN_FLOOR_MM`` of the
intracranial space, except the spinal canal through the foramen magnum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

TISSUES = ("air", "skin", "fat", "muscle", "cortical", "cancellous", "enamel", "dentin", "vitreous", "lens",
           "sclera", "cartilage", "csf", "cord", "disc", "gland", "tongue", "nerve", "mucosa")
(AIR, SKIN, FAT, MUSCLE, CORTICAL, CANCELLOUS, ENAMEL, DENTIN, VITREOUS, LENS, SCLERA, CARTILAGE, CSF, CORD, DISC,
 GLAND, TONGUE, NERVE, MUCOSA) = range(len(TISSUES))
BONE = (CORTICAL, CANCELLOUS)
SOFT = (FAT, MUSCLE, GLAND, SKIN)

MIN_FLOOR_MM = 1.5  # bone kept between the intracranial space and anything below the skull base
SKIN_MM = 2.0
EYE = (35.0, 61.5, -42.0)  # Colin27
GLOBE_MM = 12.0
SPINE_S = (-60.0, -72.0, -95.0, -120.0, -150.0, -195.0)  # cord centre line: S ...
SPINE_A = (-44.0, -45.0, -51.0, -55.0, -57.0, -58.0)  # ... and A (template medulla; average head at C2-C3)

# Front of the face: A where the skin ends, by S (rows) and |R| (columns 0, 10, ..., 80), nose excluded (added as its
# own shape). Rows -10..-70: Colin27; -80..-140: the average head (shifted, lips and chin sharpened); below: the neck.
FACE_R = (0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0)
FACE_FRONT = {
    -5.0: (91, 90, 89, 86, 82, 77, 67, 53, 34),
    -10.0: (92, 91, 90, 87, 83, 78, 68, 54, 34),
    -20.0: (92, 91, 91, 89, 85, 80, 69, 52, 34),
    -30.0: (90, 88, 86, 83, 80, 76, 67, 49, 35),
    -40.0: (86, 82, 77, 78, 78, 70, 55, 45, 35),
    -50.0: (84, 79, 71, 75, 74, 65, 53, 45, 34),
    -60.0: (82, 78, 72, 68, 65, 61, 56, 48, 33),
    -70.0: (82, 79, 76, 69, 67, 64, 59, 49, 33),
    -80.0: (83, 81, 76, 69, 67, 63, 57, 45, 29),
    -90.0: (86, 84, 75, 67, 66, 62, 54, 42, 22),
    -100.0: (84, 79, 70, 65, 63, 57, 49, 36, 12),
    -110.0: (79, 76, 69, 63, 58, 51, 41, 27, -30),
    -120.0: (79, 75, 66, 60, 53, 44, 32, 17, -40),
    -130.0: (66, 64, 59, 54, 47, 36, 21, -20, -40),
    -140.0: (50, 49, 47, 44, 37, 22, -3, -40, -40),
    -150.0: (38, 38, 36, 32, 25, 10, -20, -40, -40),
    -165.0: (34, 34, 32, 28, 20, 5, -20, -40, -40),
    -200.0: (32, 32, 30, 26, 18, 3, -20, -40, -40),
}
# The neck as a superellipse by S: (back A, front A, half width R), from the average head down to S -140, then
# narrowing to a neck of 130 x 128 mm at C4-C5.
NECK = ((-60.0, -121.0, 0.0, 88.0), (-80.0, -120.0, 2.0, 84.0), (-100.0, -117.0, 10.0, 76.0),
        (-120.0, -116.0, 20.0, 72.0), (-140.0, -114.0, 32.0, 68.0), (-160.0, -110.0, 30.0, 64.0),
        (-200.0, -108.0, 28.0, 64.0))
# Vertebral bodies (C2..C6): S range of each body; a disc below each.
VERTEBRAE = (("C2", -92.0, -114.0), ("C3", -118.0, -133.0), ("C4", -137.0, -152.0), ("C5", -156.0, -171.0),
             ("C6", -175.0, -190.0))

Sdf = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


# ------------------------------------------------------------------------------------------------ shapes
def ellipsoid(c, r) -> Sdf:
    """Signed distance (approximate, exact on the axes) to an axis-aligned ellipsoid."""
    c, r = np.asarray(c, np.float32), np.asarray(r, np.float32)

    def f(R, A, S):
        x, y, z = (R - c[0]) / r[0], (A - c[1]) / r[1], (S - c[2]) / r[2]
        k0 = np.sqrt(x * x + y * y + z * z)
        k1 = np.sqrt((x / r[0]) ** 2 + (y / r[1]) ** 2 + (z / r[2]) ** 2)
        return k0 * (k0 - 1.0) / np.maximum(k1, np.float32(1e-6))
    return f


def capsule(a, b, ra: float, rb: float | None = None, squash=(1.0, 1.0, 1.0)) -> Sdf:
    """A segment a-b with a radius going from ra to rb; ``squash`` stretches the cross-section along R, A, S."""
    q = np.asarray(squash, np.float32)
    a, b = np.asarray(a, np.float32) / q, np.asarray(b, np.float32) / q
    rb = ra if rb is None else rb
    ba = b - a
    n2 = float(ba @ ba) or 1e-6
    s = np.float32(q.min())

    def f(R, A, S):
        p = (R / q[0] - a[0], A / q[1] - a[1], S / q[2] - a[2])
        t = np.clip((p[0] * ba[0] + p[1] * ba[1] + p[2] * ba[2]) / np.float32(n2), 0.0, 1.0)
        d = np.sqrt((p[0] - t * ba[0]) ** 2 + (p[1] - t * ba[1]) ** 2 + (p[2] - t * ba[2]) ** 2)
        return (d - (np.float32(ra) + np.float32(rb - ra) * t)) * s
    return f


def tube(points, radii, squash=(1.0, 1.0, 1.0)) -> Sdf:
    """A polyline with a radius at each point (union of tapered capsules)."""
    parts = [capsule(points[i], points[i + 1], radii[i], radii[i + 1], squash) for i in range(len(points) - 1)]
    return union(*parts)


def union(*fs: Sdf) -> Sdf:
    def f(R, A, S):
        out = fs[0](R, A, S)
        for g in fs[1:]:
            out = np.minimum(out, g(R, A, S))
        return out
    return f


def smooth_union(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    h = np.clip(np.float32(k) - np.abs(a - b), 0.0, None) / np.float32(k)
    return np.minimum(a, b) - h * h * np.float32(k / 4.0)


def spine_a(S) -> np.ndarray:
    """A of the spinal cord's centre at height S (the cervical curve)."""
    return np.interp(S, SPINE_S[::-1], SPINE_A[::-1]).astype(np.float32)


def superellipse_cylinder(center: Callable, semi, s_lo: float, s_hi: float, power: float = 2.0) -> Sdf:
    """A vertical cylinder of superellipse cross-section (centre (R, A) a function of S) from s_lo to s_hi."""
    r0, r1 = (np.float32(v) for v in semi)

    def f(R, A, S):
        c = center(S)
        u = (np.abs(R - c[0]) / r0) ** power + (np.abs(A - c[1]) / r1) ** power
        side = (u ** np.float32(1.0 / power) - 1.0) * min(r0, r1)
        return np.maximum(side, np.maximum(np.float32(s_lo) - S, S - np.float32(s_hi)))
    return f


# ------------------------------------------------------------------------------------------------ canvas
class Canvas:
    """Tissue labels on the model grid, painted in template RAS mm; ``locked`` voxels (the intracranial space and
    the inner ``MIN_FLOOR_MM`` of the skull) only change where a painter forces it."""

    def __init__(self, grid: sitk.Image):
        self.shape = tuple(int(v) for v in grid.GetSize()[::-1])
        self.m = np.array(grid.GetDirection()).reshape(3, 3) * np.array(grid.GetSpacing())[None, :]
        self.minv = np.linalg.inv(self.m)
        self.o = np.array(grid.GetOrigin())
        self.labels = np.zeros(self.shape, np.uint8)
        self.locked = np.zeros(self.shape, bool)
        self.depth = np.zeros(self.shape, np.float32)  # mm under the skin, set once the body is known

    def region(self, lo, hi):
        """(index slices, (R, A, S) broadcastable over them) of the RAS box lo..hi, or None if off the grid."""
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        ijk = (corners * [-1.0, -1.0, 1.0] - self.o) @ self.minv.T
        size = np.array(self.shape[::-1])
        a = np.clip(np.floor(ijk.min(0)).astype(int), 0, size)
        b = np.clip(np.ceil(ijk.max(0)).astype(int) + 1, 0, size)
        if np.any(b <= a):
            return None
        idx = [np.arange(a[n], b[n], dtype=np.float32).reshape([-1 if m == 2 - n else 1 for m in range(3)])
               for n in range(3)]
        coords = []
        for c, sign in ((0, -1.0), (1, -1.0), (2, 1.0)):
            v: np.ndarray | np.float32 = np.float32(self.o[c])
            for n in range(3):
                if abs(self.m[c, n]) > 1e-9:
                    v = v + np.float32(self.m[c, n]) * idx[n]
            coords.append(np.float32(sign) * v)
        return (slice(a[2], b[2]), slice(a[1], b[1]), slice(a[0], b[0])), coords

    def mask(self, fn: Sdf, lo, hi, *, only=None, min_depth: float | None = None, force: bool = False,
             offset: float = 0.0):
        """(slices, where fn < -offset and painting is allowed) or None."""
        r = self.region(lo, hi)
        if r is None:
            return None
        sl, (R, A, S) = r
        inside = np.broadcast_to(fn(R, A, S) < -np.float32(offset), self.labels[sl].shape)
        if not force:
            inside = inside & ~self.locked[sl]
        if only is not None:
            inside = inside & np.isin(self.labels[sl], only)
        if min_depth is not None:
            inside = inside & (self.depth[sl] >= min_depth)
        return sl, inside

    def paint(self, tissue: int, fn: Sdf, lo, hi, *, both: bool = False, **kw) -> None:
        """Set ``tissue`` where fn < 0 inside the RAS box (and its mirror image across R = 0 with ``both``)."""
        for side in ((1.0, -1.0) if both else (1.0,)):
            g = fn if side > 0 else _mirror(fn)
            box = (lo, hi) if side > 0 else ((-hi[0], lo[1], lo[2]), (-lo[0], hi[1], hi[2]))
            got = self.mask(g, *box, **kw)
            if got is not None:
                sl, m = got
                self.labels[sl][m] = tissue

    def bone(self, fn: Sdf, lo, hi, cortex: float = 1.5, **kw) -> None:
        """Cortical bone ``cortex`` mm thick around a cancellous core."""
        self.paint(CORTICAL, fn, lo, hi, **kw)
        self.paint(CANCELLOUS, _shrink(fn, cortex), lo, hi, **kw)


def _mirror(fn: Sdf) -> Sdf:
    return lambda R, A, S: fn(-R, A, S)


def _shrink(fn: Sdf, by: float) -> Sdf:
    return lambda R, A, S: fn(R, A, S) + np.float32(by)


def _sym(lo, hi):
    """A box symmetric about R = 0 from one side's box."""
    r = max(abs(lo[0]), abs(hi[0]))
    return (-r, lo[1], lo[2]), (r, hi[1], hi[2])


# ------------------------------------------------------------------------------------------------ the head
@dataclass
class Head:
    labels: np.ndarray  # uint8 TISSUES codes (intracranial voxels: CSF, painted over by the brain image)
    body: np.ndarray  # bool: inside the skin
    depth: np.ndarray  # float32 mm under the skin (<= 0 outside)
    cranium: np.ndarray  # bool: the surface a technologist plans a head scan on: the skull's outer surface and the
    # cranial scalp (brain, skull and scalp above the skull base; not the face, not the neck)
    intracranial: np.ndarray  # float32 fraction of the intracranial space (brain + CSF), partial at its edge
    landmarks: dict[str, np.ndarray]  # template LPS mm


def build_head(grid: sitk.Image, d_out: np.ndarray, center_lps: np.ndarray) -> Head:
    """The head around an intracranial space (``d_out``: mm from it, 0 inside) on ``grid``."""
    cv = Canvas(grid)
    full = cv.region(*_grid_box(cv))
    assert full is not None
    _, (R, A, S) = full
    c = np.asarray(center_lps, np.float32) * np.float32([-1, -1, 1])
    r_csf, r_skull, r_muscle, r_skin = _scalp_radii(R, A, S, c)
    cv.locked = d_out < r_csf + np.float32(MIN_FLOOR_MM)
    f_in = np.clip(np.float32(0.5) - (d_out - r_csf), 0.0, 1.0)

    # the outer surface: cranium, face, nose, lips, chin, ears, neck, shoulders
    body = d_out - r_skin
    cranial = body < 0
    for part, lo, hi, k in ((_face, (-100, -45, -205), (100, 120, 5), 6.0),
                            (_neck, (-100, -140, -205), (100, 45, -20), 14.0),
                            (_shoulders, (-100, -90, -205), (100, 30, -135), 12.0),
                            (_nose, (-28, 65, -95), (28, 112, -36), 3.0),
                            (_mouth_and_chin, (-32, 50, -138), (32, 100, -84), 3.0),
                            (_ears, (-101, -75, -90), (101, 20, 0), 2.0)):
        _join(cv, body, part, lo, hi, k)
    inside = body < 0
    del body
    cv.depth = _depth(inside, grid)
    cv.labels[inside] = MUSCLE
    cv.labels[d_out < r_csf] = CSF

    # calvarium: a shell around the intracranial space; the temporalis muscle over its sides
    skull = d_out < r_skull
    cranium = (skull & ~ndimage.binary_erosion(skull)) | (cranial & (cv.depth < SKIN_MM))
    del skull, cranial
    shell = inside & (d_out >= r_csf) & (d_out < r_skull)
    pos = (d_out - r_csf) / (r_skull - r_csf)  # 0 inner table .. 1 outer table
    cv.labels[shell] = CANCELLOUS
    cv.labels[shell & (np.abs(2.0 * pos - 1.0) > 0.45)] = CORTICAL
    del shell, pos, r_csf, r_skull, r_muscle, r_skin
    _fat_layer(cv)

    _skull_base(cv)
    _spine(cv)
    _airway_and_sinuses(cv)
    _jaws_and_teeth(cv)
    _orbits_and_eyes(cv)
    _nose_inside(cv)
    _soft_tissue(cv)
    _ears_inside(cv)
    # skin over everything, then the openings through it
    cv.labels[inside & (cv.depth < SKIN_MM) & (cv.labels != AIR)] = SKIN
    _openings(cv)
    cv.labels[~inside] = AIR
    f_in[_canal(cv, d_out)] = 0.0  # the cord and its sac continue the medulla through the foramen magnum
    return Head(labels=cv.labels, body=inside, depth=cv.depth, cranium=cranium & inside, intracranial=f_in,
                landmarks=_landmarks(cv, grid))


def _join(cv: Canvas, body: np.ndarray, part: Sdf, lo, hi, k: float) -> None:
    """body = smooth union of body and part, evaluated inside the RAS box lo..hi only."""
    r = cv.region(lo, hi)
    if r is not None:
        sl, (R, A, S) = r
        body[sl] = smooth_union(body[sl], part(R, A, S), k)


def _grid_box(cv: Canvas):
    size = np.array(cv.shape[::-1]) - 1
    corners = np.array([[x, y, z] for x in (0, size[0]) for y in (0, size[1]) for z in (0, size[2])], float)
    ras = (cv.o + corners @ cv.m.T) * [-1.0, -1.0, 1.0]
    return ras.min(0), ras.max(0)


def _depth(inside: np.ndarray, grid: sitk.Image) -> np.ndarray:
    img = sitk.GetImageFromArray(inside.astype(np.uint8))
    img.CopyInformation(grid)
    dist = sitk.SignedMaurerDistanceMap(img, insideIsPositive=True, squaredDistance=False, useImageSpacing=True)
    return sitk.GetArrayViewFromImage(dist).astype(np.float32)


def _scalp_radii(R, A, S, c):
    """Distances from the intracranial space (mm) of the skull's inner and outer surfaces, the temporalis and the
    skin, by direction from the brain centre (Colin27: 25 mm brain-to-skin above, in front and behind, 19 mm at the
    sides)."""
    dx, dy, dz = R - c[0], A - c[1], S - c[2]
    inv = dx * dx + dy * dy + dz * dz  # the only full-size temporaries below are inv, a, b and the radii
    np.sqrt(inv, out=inv)
    inv += np.float32(1e-3)
    np.reciprocal(inv, out=inv)
    a = dz * inv  # cos of the angle from straight up
    b = np.minimum(a, np.float32(0.0))
    a -= b  # a = up = max(cos, 0)
    b += np.float32(1.0)  # b = min(cos + 1, 1)
    b *= np.abs(dy * inv)  # fore_aft
    r_csf = np.float32(3.0) + np.float32(2.0) * a
    r_csf += np.float32(0.5) * b
    r_skull = r_csf + np.float32(7.5)
    r_skull += np.float32(3.5) * a
    r_skull += b
    r_skin = np.float32(7.0) + np.float32(2.0) * b
    del a, b
    side = np.abs(dx * inv)  # |sin| toward the side
    del inv
    r_skull -= np.float32(3.0) * side
    # the temporalis: over the temporal squama, between the zygomatic arch and the temporal lines
    band = np.maximum(1.0 - np.abs(S + 10.0) / 45.0, 0.0) * np.maximum(1.0 - np.abs(A - 5.0) / 55.0, 0.0)
    r_muscle = r_skull + np.float32(7.0) * band * side
    r_skin -= np.float32(1.5) * side
    r_skin += r_muscle
    return r_csf, r_skull, r_muscle, r_skin


def _table(rows: dict[float, tuple], cols: tuple[float, ...], s_range=(-205, 5), r_max: float = 110.0):
    """A smooth 1 mm lookup of a table by (S, |R|): (array[s_index, r_index], S of row 0)."""
    s_keys = sorted(rows)
    s_axis = np.arange(s_range[0], s_range[1] + 1, dtype=float)
    r_axis = np.arange(0.0, r_max + 1.0)
    vals = np.array([rows[s] for s in s_keys], float)
    cols_ext = np.r_[np.asarray(cols), cols[-1] + 12.0, r_max]
    vals = np.c_[vals, np.full((len(s_keys), 2), -60.0)]
    by_r = np.array([np.interp(r_axis, cols_ext, row) for row in vals])
    out = np.array([np.interp(s_axis, s_keys, by_r[:, i]) for i in range(len(r_axis))]).T
    return ndimage.gaussian_filter(out, 2.0).astype(np.float32), float(s_range[0])


_FRONT = None


def _face(R, A, S) -> np.ndarray:
    """The face in front of the ears: behind the measured front surface, from the brow to under the chin."""
    global _FRONT
    if _FRONT is None:
        _FRONT = _table(FACE_FRONT, FACE_R)
    table, s0 = _FRONT
    si = np.clip(np.rint(S - s0).astype(np.int32), 0, table.shape[0] - 1)
    ri = np.clip(np.rint(np.abs(R)).astype(np.int32), 0, table.shape[1] - 1)
    front = table[si, ri]
    return np.maximum(np.maximum(A - front, np.float32(-30.0) - A), np.maximum(S - np.float32(-5.0), -205.0 - S))


def _neck(R, A, S) -> np.ndarray:
    s = np.array([n[0] for n in NECK])[::-1]
    back, front, half = (np.array([n[i] for n in NECK])[::-1] for i in (1, 2, 3))
    Sv = np.asarray(S, np.float32)
    b, f_, h = (np.interp(Sv, s, v).astype(np.float32) for v in (back, front, half))
    ca, ra = (b + f_) / 2, (f_ - b) / 2
    u = (np.abs(R) / h) ** 2.5 + (np.abs(A - ca) / ra) ** 2.5
    side = (u ** np.float32(0.4) - 1.0) * np.minimum(h, ra)
    top = np.float32(-55.0) + np.float32(20.0) * np.clip((-A - 60.0) / 60.0, 0.0, 1.0)
    return np.maximum(side, S - top)


def _shoulders(R, A, S) -> np.ndarray:
    """The top of the shoulders: from the neck root (S ~ -153) sloping down to the acromion."""
    f = capsule((55.0, -32.0, -188.0), (170.0, -32.0, -222.0), 35.0, 30.0, squash=(1.0, 1.25, 1.0))
    return np.minimum(f(R, A, S), f(-R, A, S))


def _nose(R, A, S) -> np.ndarray:
    """Dorsum from the nasion to the tip (0, 101, -76), the alae at +-15 and the columella to the subnasale."""
    parts = [capsule((0.0, 81.0, -46.0), (0.0, 89.0, -72.0), 4.5, 5.5, squash=(1.3, 1.0, 1.0)),
             ellipsoid((0.0, 94.5, -77.0), (9.0, 6.5, 6.5)),
             ellipsoid((14.0, 83.0, -82.0), (6.0, 7.0, 5.5)), ellipsoid((-14.0, 83.0, -82.0), (6.0, 7.0, 5.5)),
             capsule((0.0, 92.0, -80.0), (0.0, 84.0, -86.0), 4.0)]
    out = parts[0](R, A, S)
    for p in parts[1:]:
        out = smooth_union(out, p(R, A, S), 3.0)
    return out


def _mouth_and_chin(R, A, S) -> np.ndarray:
    """Upper lip (front A 92 at S -94), lower lip (A 90 at S -105), chin (soft pogonion A 83 at S -119)."""
    parts = [ellipsoid((0.0, 86.0, -93.5), (24.0, 6.0, 5.0)), ellipsoid((0.0, 84.0, -105.0), (22.0, 6.0, 5.5)),
             ellipsoid((0.0, 71.0, -119.0), (21.0, 12.0, 12.0))]
    out = parts[0](R, A, S)
    for p in parts[1:]:
        out = smooth_union(out, p(R, A, S), 3.0)
    return out


def _pinna(R, A, S) -> np.ndarray:
    # a plate 70 x 38 mm standing 15-20 mm off the side of the head, its top leaning back
    tilt = np.float32(math.tan(math.radians(15.0)))
    return ellipsoid((90.0, -28.0, -46.0), (7.0, 19.0, 33.0))(R, A + tilt * (S + 46.0), S)


def _ears(R, A, S) -> np.ndarray:
    return np.minimum(_pinna(R, A, S), _pinna(-R, A, S))


def _fat_layer(cv: Canvas) -> None:
    """Subcutaneous fat under the skin: 4.5 mm on the scalp, more over the cheeks and the nape, little over the nose,
    eyelids and lips."""
    width = np.full(cv.shape, 4.5, np.float32)
    for gain, c, r in ((6.0, (45, 55, -80), (20, 25, 22)), (6.0, (-45, 55, -80), (20, 25, 22)),
                       (6.0, (0, -105, -120), (60, 25, 45)), (3.0, (0, 40, -140), (40, 30, 15)),
                       (4.0, (0, -30, -190), (150, 60, 30)), (-3.5, (0, 92, -70), (14, 12, 26)),
                       (-3.0, (35, 72, -42), (16, 10, 10)), (-3.0, (-35, 72, -42), (16, 10, 10)),
                       (-2.5, (0, 88, -100), (26, 10, 10))):
        mid, half = np.asarray(c, np.float32), np.asarray(r, np.float32)
        got = cv.region(mid - 2.5 * half, mid + 2.5 * half)
        if got is None:
            continue
        sl, (R, A, S) = got
        width[sl] += np.float32(gain) * (np.exp(-((R - mid[0]) / half[0]) ** 2) * np.exp(-((A - mid[1]) / half[1]) ** 2)
                                         * np.exp(-((S - mid[2]) / half[2]) ** 2))
    fat = (cv.depth >= SKIN_MM) & (cv.depth < width + SKIN_MM) & (cv.labels == MUSCLE)
    cv.labels[fat] = FAT


# ------------------------------------------------------------------------------------------------ structures
def _skull_base(cv: Canvas) -> None:
    """Sphenoid body with its sinus, clivus, petrous ridges, occipital condyles, glabella with the frontal sinus."""
    cv.bone(ellipsoid((0.0, 13.0, -42.0), (17.0, 16.0, 13.0)), (-18, -4, -56), (18, 30, -28))
    cv.bone(capsule((0.0, -10.0, -38.0), (0.0, -28.0, -64.0), 7.5), (-9, -37, -73), (9, -1, -29))
    cv.bone(capsule((20.0, -20.0, -44.0), (60.0, -36.0, -50.0), 8.0, 10.0), (10, -48, -62), (72, -10, -33),
            both=True)
    cv.bone(ellipsoid((16.0, -34.0, -71.0), (8.0, 11.0, 6.0)), (7, -46, -78), (25, -22, -64), both=True)
    # the glabella: a thick frontal bone behind the brow, the frontal sinus inside it
    cv.bone(ellipsoid((0.0, 78.0, -20.0), (30.0, 8.0, 17.0)), (-31, 69, -38), (31, 87, -2), min_depth=4.0)
    cv.paint(AIR, ellipsoid((0.0, 77.5, -17.0), (14.0, 4.0, 9.0)), (-15, 73, -27), (15, 82, -7))
    cv.paint(AIR, ellipsoid((0.0, 14.0, -41.0), (12.0, 10.0, 9.0)), (-13, 3, -51), (13, 25, -31))


def _spine(cv: Canvas) -> None:
    """C1 ring, C2 with the dens, C3-C6 bodies and arches, discs; the canal (epidural fat, CSF, cord) goes with the
    foramen magnum in ``_canal``."""

    def body_centre(offset: float):
        return lambda S: (np.float32(0.0), spine_a(S) + np.float32(offset))

    for i, (_, s_hi, s_lo) in enumerate(VERTEBRAE):
        semi = (10.0 + 1.2 * i, 8.5 + 0.3 * i)
        cyl = superellipse_cylinder(body_centre(20.0), semi, s_lo, s_hi, power=2.5)
        cv.bone(cyl, (-16, -50, s_lo - 1), (16, -15, s_hi + 1))
        if i + 1 < len(VERTEBRAE):
            cv.paint(DISC, superellipse_cylinder(body_centre(20.0), semi, VERTEBRAE[i + 1][1] + 0.5, s_lo - 0.5, 2.5),
                     (-16, -50, VERTEBRAE[i + 1][1]), (16, -15, s_lo))
        # posterior arch: a ring around the canal with a spinous process and transverse processes
        mid = (s_hi + s_lo) / 2
        ring = _arch(mid, 4.5 if i else 5.5)
        cv.bone(ring, (-28, -100, mid - 8), (28, -30, mid + 8), cortex=1.2)
        a = float(spine_a(mid))
        spinous = capsule((0.0, a - 12.0, mid), (0.0, a - (40.0 if i == 0 else 30.0 - 2.0 * i), mid - 6.0),
                          5.0 if i == 0 else 3.5, 3.0)
        cv.bone(spinous, (-8, a - 45, mid - 12), (8, a - 8, mid + 6), cortex=1.2)
        cv.bone(capsule((8.0, a + 14.0, mid), (28.0, a + 10.0, mid), 3.5), (4, a + 4, mid - 5), (33, a + 19, mid + 5),
                both=True, cortex=1.2)
    # C1: anterior arch before the dens, lateral masses, posterior arch; the dens standing up from C2
    s1 = -82.0
    a1 = float(spine_a(s1))
    cv.bone(capsule((-11.0, a1 + 24.0, s1), (11.0, a1 + 24.0, s1), 4.0, squash=(1.0, 1.0, 1.4)),
            (-16, a1 + 18, s1 - 7), (16, a1 + 30, s1 + 7), cortex=1.2)
    cv.bone(ellipsoid((19.0, a1 + 9.0, s1), (8.0, 11.0, 7.0)), (10, a1 - 3, s1 - 8), (28, a1 + 21, s1 + 8),
            both=True)
    cv.bone(_arch(s1, 4.0, half_width=21.0), (-30, a1 - 30, s1 - 7), (30, a1, s1 + 7), cortex=1.2)
    cv.bone(capsule((30.0, a1 + 8.0, s1), (40.0, a1 + 6.0, s1 - 2.0), 4.5), (24, a1, s1 - 8), (46, a1 + 14, s1 + 6),
            both=True, cortex=1.2)
    cv.bone(capsule((0.0, a1 + 15.0, -75.0), (0.0, a1 + 16.0, -94.0), 5.0), (-7, a1 + 8, -96), (7, a1 + 23, -69))


def _arch(s: float, radius: float, half_width: float = 17.0) -> Sdf:
    """The vertebral arch at height s: pedicles and laminae behind the canal as a bent tube."""
    a = float(spine_a(s))
    pts = [(half_width, a + 8.0, s), (half_width, a - 4.0, s), (half_width * 0.55, a - 12.0, s), (0.0, a - 14.0, s),
           (-half_width * 0.55, a - 12.0, s), (-half_width, a - 4.0, s), (-half_width, a + 8.0, s)]
    return tube(pts, [radius * 0.9, radius, radius * 0.8, radius * 0.8, radius * 0.8, radius, radius * 0.9],
                squash=(1.0, 1.0, 1.6))


def _canal(cv: Canvas, d_out: np.ndarray) -> np.ndarray:
    """The spinal canal from the foramen magnum down: epidural fat, the CSF-filled thecal sac, the cord. It may open
    the skull base (forced), never the brain."""
    painted = np.zeros(cv.shape, bool)
    lo, hi = (-20, -80, -205), (20, -30, -58)

    def canal(semi, offset=0.0):
        return superellipse_cylinder(lambda S: (np.float32(0.0), spine_a(S) + np.float32(offset)), semi, -205.0,
                                     -58.0, power=2.0)

    for tissue, semi in ((FAT, (12.0, 10.5)), (CSF, (10.0, 8.0)), (CORD, (6.5, 5.0))):
        got = cv.mask(canal(semi), lo, hi, force=True)
        if got is None:
            continue
        sl, m = got
        m = m & (d_out[sl] > 0.5) & (cv.labels[sl] != AIR)
        if tissue == FAT:  # the fat is behind and beside the sac, never opening the skull base
            m = m & ~cv.locked[sl]
        cv.labels[sl][m] = tissue
        painted[sl] |= m
    return painted


def _airway_and_sinuses(cv: Canvas) -> None:
    """Nasal cavity (two passages, turbinates, septum), maxillary sinuses, ethmoid cells, pharynx, larynx, trachea."""
    # maxilla bodies around the maxillary sinuses
    cv.bone(ellipsoid((27.0, 54.0, -66.0), (17.0, 19.0, 19.0)), (8, 33, -86), (45, 74, -46), both=True, min_depth=3.0)
    cv.paint(MUCOSA, ellipsoid((29.0, 52.0, -67.0), (12.0, 14.0, 15.5)), (16, 37, -83), (42, 67, -51), both=True)
    cv.paint(AIR, ellipsoid((29.0, 52.0, -67.0), (10.5, 12.5, 14.0)), (17, 38, -82), (41, 66, -52), both=True)
    # ethmoid air cells between the orbits: a honeycomb of 2.2 mm cells in thin bone
    cv.bone(ellipsoid((9.5, 52.0, -43.0), (6.0, 17.0, 10.0)), (2, 34, -54), (17, 70, -32), both=True, cortex=1.0)
    cells = np.array([(x, y, z) for x in (7.0, 12.0) for y in np.arange(39.0, 67.0, 5.0)
                      for z in (-48.0, -43.0, -38.0)])
    cells_fn = _lattice(cells, 2.2)
    cv.paint(AIR, cells_fn, (4, 35, -52), (15, 70, -34), both=True, only=(CANCELLOUS,))
    # nasal cavity: mucosa lining, then air, the septum left standing; turbinates on the lateral walls
    for tissue, grow in ((MUCOSA, 1.5), (AIR, 0.0)):
        passage = union(ellipsoid((7.5, 55.0, -62.0), (5.5 + grow, 32.0 + grow, 16.0 + grow)),
                        capsule((7.0, 28.0, -62.0), (7.0, 16.0, -58.0), 6.0 + grow))
        cv.paint(tissue, _off_septum(passage, 1.2), (0, 12, -80), (15, 90, -43), both=True)
    for s, a, semi in ((-72.0, 52.0, (3.5, 24.0, 4.5)), (-62.0, 55.0, (3.0, 20.0, 4.0)),
                       (-52.0, 50.0, (2.5, 12.0, 3.0))):
        cv.paint(MUCOSA, ellipsoid((12.0, a, s), semi), (7, a - 26, s - 6), (17, a + 26, s + 6), both=True)
    # pharynx (elliptical, wider than deep), larynx and trachea
    path = [(0.0, 24.0, -60.0), (0.0, 8.0, -62.0), (0.0, -5.0, -74.0), (0.0, -9.0, -90.0), (0.0, -15.0, -108.0),
            (0.0, -15.0, -124.0), (0.0, -8.0, -138.0), (0.0, 6.0, -152.0), (0.0, 10.0, -170.0), (0.0, 10.0, -205.0)]
    radii = [6.0, 7.5, 7.0, 6.5, 6.5, 6.0, 5.0, 5.0, 6.5, 6.5]
    cv.paint(MUCOSA, tube(path, [r + 1.5 for r in radii], squash=(1.5, 1.0, 1.0)), (-25, -30, -205), (25, 35, -50),
             only=SOFT + (MUSCLE,))
    cv.paint(AIR, tube(path, radii, squash=(1.5, 1.0, 1.0)), (-25, -30, -205), (25, 35, -50),
             only=(MUCOSA, MUSCLE, FAT))
    # thyroid cartilage around the larynx, the hyoid above it
    for sgn in (1.0, -1.0):
        shield = capsule((sgn * 4.0, 24.0, -146.0), (sgn * 20.0, 2.0, -146.0), 2.0, squash=(1.0, 1.0, 5.0))
        cv.paint(CARTILAGE, shield, (-25, -5, -162), (25, 30, -130))
    cv.bone(tube([(-20.0, 6.0, -127.0), (-9.0, 22.0, -129.0), (9.0, 22.0, -129.0), (20.0, 6.0, -127.0)],
                 [2.2, 2.8, 2.8, 2.2]), (-25, 0, -134), (25, 28, -122), cortex=1.0)


def _off_septum(fn: Sdf, half: float) -> Sdf:
    return lambda R, A, S: np.maximum(fn(R, A, S), np.float32(half) - R)


def _lattice(centres: np.ndarray, radius: float) -> Sdf:
    parts = [ellipsoid(c, (radius, radius, radius)) for c in centres]
    return union(*parts)


# Dental and mandibular arches in the horizontal plane, (|R|, A) from the midline back (mirrored across R = 0).
UPPER_ARCH = ((0.0, 77.0), (13.0, 70.0), (24.0, 55.0), (30.0, 39.0))
LOWER_TEETH_ARCH = ((0.0, 71.0), (13.0, 64.0), (23.0, 50.0), (28.0, 39.0))
MANDIBLE_ARCH = ((0.0, 68.0), (14.0, 61.0), (25.0, 47.0), (33.0, 30.0), (41.0, 10.0), (46.0, -6.0))


def _mirrored(half) -> np.ndarray:
    pts = np.array(half, np.float32)
    return np.r_[pts[::-1] * [-1.0, 1.0], pts[1:]]


def _along(poly: np.ndarray, step: float = 0.5) -> np.ndarray:
    """Points every ``step`` mm along a polyline."""
    seg = np.hypot(*np.diff(poly, axis=0).T)
    s = np.r_[0.0, np.cumsum(seg)]
    t = np.arange(0.0, s[-1] + 1e-6, step)
    return np.c_[np.interp(t, s, poly[:, 0]), np.interp(t, s, poly[:, 1])].astype(np.float32)


def _arch_distance(R, A, half) -> np.ndarray:
    """In-plane distance (mm) to an arch (a polyline mirrored across R = 0)."""
    best = None
    for r, a in _along(_mirrored(half)):
        d = (R - r) ** 2 + (A - a) ** 2
        best = d if best is None else np.minimum(best, d)
    return np.sqrt(best)


def _slab(dist_fn: Callable, half_width: float, s_lo: float, s_hi: float) -> Sdf:
    return lambda R, A, S: np.maximum(dist_fn(R, A) - np.float32(half_width),
                                      np.maximum(np.float32(s_lo) - S, S - np.float32(s_hi)))


def _jaws_and_teeth(cv: Canvas) -> None:
    """Zygomas and arches, the upper alveolar ridge and hard palate, the mandible (body, rami, condyles, coronoid
    processes), 14 + 14 teeth (enamel crowns, dentin roots), the tongue and a thin layer of air above it."""
    cv.bone(ellipsoid((48.0, 56.0, -55.0), (9.0, 11.0, 12.0)), (38, 44, -68), (58, 68, -42), both=True, min_depth=3.0)
    cv.bone(capsule((50.0, 52.0, -56.0), (64.0, -14.0, -50.0), 4.5, squash=(1.0, 1.0, 1.3)), (42, -20, -63),
            (70, 58, -44), both=True, min_depth=2.5)
    # upper jaw: alveolar ridge along the dental arch, the hard palate inside it
    cv.bone(_slab(lambda R, A: _arch_distance(R, A, UPPER_ARCH), 6.5, -91.0, -76.0), (-38, 30, -92), (38, 86, -75),
            min_depth=3.0)
    inner = _mirrored(UPPER_ARCH)

    def palate(R, A, S):
        front = np.interp(R, inner[:, 0], inner[:, 1]).astype(np.float32) - np.float32(6.0)
        back = np.float32(22.0) + np.float32(0.02) * R * R  # the palate's free edge, bowed forward at the sides
        return np.maximum(np.maximum(A - front, back - A), np.abs(S + np.float32(80.0)) - np.float32(2.5))

    cv.bone(palate, (-30, 20, -84), (30, 80, -76), cortex=1.0)
    # mandible: body along its arch; rami up to the condyles in front of the ear canals
    cv.bone(_slab(lambda R, A: _arch_distance(R, A, MANDIBLE_ARCH), 5.5, -134.0, -106.0), (-53, -13, -136),
            (53, 75, -104), cortex=2.5, min_depth=2.5)
    cv.bone(tube([(46.0, -4.0, -126.0), (50.0, -12.0, -112.0), (52.0, -12.0, -80.0), (52.0, -10.0, -57.0)],
                 [5.5, 5.5, 5.0, 6.0], squash=(0.8, 1.6, 1.0)), (36, -25, -134), (64, 3, -49), both=True,
            cortex=2.0)
    cv.bone(capsule((48.0, -4.0, -95.0), (44.0, 8.0, -66.0), 3.5, squash=(0.8, 1.5, 1.0)), (36, -12, -100),
            (54, 16, -60), both=True, cortex=1.5)
    # teeth: 14 per arch, crowns meeting at the occlusal plane S -98
    for arch, s_root, s_crown, s_tip in ((UPPER_ARCH, -79.0, -90.0, -98.0), (LOWER_TEETH_ARCH, -118.0, -106.0,
                                                                              -98.5)):
        for i, (r, a) in enumerate(_teeth_along(arch)):
            size = 2.6 + 1.6 * abs(i - 6.5) / 6.5
            root = capsule((r, a, s_root), (r, a, s_crown), size * 0.6, size * 0.9)
            crown = capsule((r, a, s_crown), (r, a, s_tip - math.copysign(size, s_tip - s_crown)), size)
            lo = (r - 7, a - 7, min(s_root, s_tip) - 3)
            hi = (r + 7, a + 7, max(s_root, s_tip) + 3)
            cv.paint(DENTIN, root, lo, hi)
            cv.paint(ENAMEL, crown, lo, hi)
            cv.paint(DENTIN, _shrink(crown, 1.3), lo, hi)
    # tongue in the floor of the mouth, air between its dorsum and the palate
    cv.paint(TONGUE, ellipsoid((0.0, 36.0, -111.0), (22.0, 33.0, 14.0)), (-23, 2, -126), (23, 70, -96),
             only=(MUSCLE, FAT))
    cv.paint(AIR, ellipsoid((0.0, 42.0, -95.5), (15.0, 22.0, 1.6)), (-16, 19, -98), (16, 65, -93),
             only=(TONGUE, MUSCLE))


def _teeth_along(half) -> list[tuple[float, float]]:
    """14 tooth positions at equal arc length along an arch (both sides)."""
    pts = _along(_mirrored(half), 0.25)
    s = np.r_[0.0, np.cumsum(np.hypot(*np.diff(pts, axis=0).T))]
    targets = (np.arange(14) + 0.5) / 14 * s[-1]
    return [(float(np.interp(t, s, pts[:, 0])), float(np.interp(t, s, pts[:, 1]))) for t in targets]


def _orbits_and_eyes(cv: Canvas) -> None:
    """Bony orbit (a cone from the optic canal to the rim), orbital fat, four recti, the optic nerve, the globe
    (sclera, vitreous, lens)."""
    e = np.array(EYE, np.float32)
    apex = np.array((14.0, 24.0, -38.0), np.float32)
    rim = e + np.float32([1.0, 8.0, 0.0])
    cone = capsule(apex, rim, 4.0, 18.0, squash=(1.0, 1.0, 0.85))
    orbit = lambda R, A, S: np.maximum(cone(R, A, S), A - np.float32(rim[1]))  # noqa: E731  open at the rim
    lo, hi = (0, 18, -62), (60, 76, -20)
    cv.paint(CORTICAL, lambda R, A, S: np.maximum(cone(R, A, S) - np.float32(1.8), A - np.float32(rim[1] - 1.0)),
             lo, hi, both=True, only=(MUSCLE, FAT, CANCELLOUS, MUCOSA, AIR), min_depth=3.0)
    cv.paint(FAT, orbit, lo, hi, both=True)
    for dr, ds in ((0.0, 10.5), (0.0, -10.5), (10.5, 0.0), (-10.5, 0.0)):
        tip = e + np.float32([dr, -2.0, ds])
        cv.paint(MUSCLE, capsule(apex + np.float32([dr * 0.25, 2.0, ds * 0.25]), tip, 1.5, 2.6), lo, hi, both=True,
                 only=(FAT,))
    cv.paint(NERVE, capsule(apex + np.float32([0, 2, 0]), e + np.float32([0, -10, 0]), 2.2), lo, hi, both=True,
             only=(FAT, MUSCLE))
    glo, ghi = tuple(e - 13.0), tuple(e + 13.0)
    cv.paint(SCLERA, ellipsoid(e, (GLOBE_MM,) * 3), glo, ghi, both=True)
    cv.paint(VITREOUS, ellipsoid(e, (GLOBE_MM - 1.0,) * 3), glo, ghi, both=True)
    cv.paint(LENS, ellipsoid(e + np.float32([0.0, 8.5, 0.0]), (4.5, 2.0, 4.5)), glo, ghi, both=True)


def _grow(fn: Sdf, by: float) -> Sdf:
    return lambda R, A, S: fn(R, A, S) - np.float32(by)


def _nose_inside(cv: Canvas) -> None:
    """Nasal bones on the upper dorsum, cartilage below them and in the septum."""
    cv.bone(capsule((0.0, 81.5, -47.0), (0.0, 86.0, -60.0), 4.0, squash=(1.6, 1.0, 1.0)), (-9, 75, -64), (9, 92, -42),
            cortex=1.0, min_depth=1.5)
    cv.paint(CARTILAGE, capsule((0.0, 87.0, -60.0), (0.0, 93.0, -75.0), 3.5, 2.5, squash=(2.2, 1.0, 1.0)),
             (-12, 80, -80), (12, 99, -55), min_depth=1.5)
    septum = lambda R, A, S: np.maximum(np.abs(R) - np.float32(1.2),  # noqa: E731
                                        ellipsoid((0.0, 66.0, -63.0), (3.0, 24.0, 13.0))(np.float32(0.0), A, S))
    cv.paint(CARTILAGE, septum, (-2, 40, -78), (2, 92, -48), only=(MUSCLE, FAT, MUCOSA))


def _soft_tissue(cv: Canvas) -> None:
    """Fat pads and glands: buccal fat, parapharyngeal fat, parotid and submandibular glands, the posterior triangle
    of the neck, the nape's fat."""
    keep = (MUSCLE, FAT)
    cv.paint(FAT, ellipsoid((40.0, 45.0, -86.0), (9.0, 12.0, 13.0)), (30, 32, -100), (50, 58, -72), both=True,
             only=keep)
    cv.paint(FAT, ellipsoid((21.0, -4.0, -78.0), (6.0, 9.0, 16.0)), (14, -14, -95), (28, 6, -61), both=True, only=keep)
    cv.paint(GLAND, ellipsoid((57.0, -14.0, -82.0), (11.0, 15.0, 22.0)), (45, -30, -105), (69, 2, -59), both=True,
             only=keep)
    cv.paint(GLAND, ellipsoid((31.0, 18.0, -128.0), (9.0, 12.0, 8.0)), (21, 5, -137), (41, 31, -119), both=True,
             only=keep)
    cv.paint(FAT, ellipsoid((52.0, -48.0, -150.0), (9.0, 24.0, 28.0)), (42, -73, -180), (62, -23, -121), both=True,
             only=keep)
    # sternocleidomastoid: from the mastoid to the sternum, in a sleeve of fat
    scm = capsule((56.0, -44.0, -72.0), (14.0, 34.0, -205.0), 8.0, 9.0, squash=(0.7, 1.0, 1.0))
    cv.paint(FAT, _grow(scm, 2.0), (2, -58, -205), (68, 50, -60), both=True, only=keep)
    cv.paint(MUSCLE, scm, (2, -58, -205), (68, 50, -60), both=True, only=(FAT,))


def _ears_inside(cv: Canvas) -> None:
    """Cartilage in the pinna, the bony ear canal into the petrous bone, the middle ear, mastoid air cells."""
    cv.paint(CARTILAGE, _shrink(_pinna, 2.0), (80, -60, -82), (100, 5, -10), both=True, min_depth=1.0)
    cv.bone(ellipsoid((57.0, -44.0, -60.0), (11.0, 13.0, 16.0)), (45, -58, -77), (69, -30, -43), both=True)
    cells = np.array([(x, y, z) for x in (52.0, 57.0, 62.0) for y in (-50.0, -45.0, -40.0)
                      for z in (-66.0, -60.0, -54.0)])
    cv.paint(AIR, _lattice(cells, 2.0), (48, -54, -70), (66, -36, -50), both=True, only=(CANCELLOUS,))
    canal_bone = capsule((73.0, -24.0, -49.0), (54.0, -25.0, -47.0), 6.0)
    cv.paint(CORTICAL, canal_bone, (46, -32, -57), (80, -17, -40), both=True)
    cv.paint(AIR, ellipsoid((52.0, -25.0, -47.0), (3.0, 5.0, 6.0)), (48, -31, -54), (56, -19, -40), both=True)


def _openings(cv: Canvas) -> None:
    """Air through the skin: nostrils into the nasal cavity, the concha into the ear canal, the closed lips' slit."""
    for side in (1.0, -1.0):
        nostril = capsule((side * 7.0, 90.0, -84.0), (side * 7.5, 72.0, -68.0), 3.2, 4.0)
        cv.paint(AIR, nostril, (side * 7.0 - 6, 66, -90), (side * 7.0 + 6, 96, -62), force=True,
                 only=(SKIN, FAT, MUSCLE, CARTILAGE, MUCOSA))
    canal = union(capsule((92.0, -23.0, -50.0), (56.0, -25.0, -47.0), 3.6), ellipsoid((90.0, -23.0, -50.0),
                                                                                     (6.0, 7.0, 9.0)))
    cv.paint(AIR, canal, (50, -33, -61), (100, -14, -39), both=True, only=(SKIN, FAT, MUSCLE, CARTILAGE, CORTICAL))
    cv.paint(AIR, ellipsoid((0.0, 90.0, -99.5), (21.0, 7.0, 0.8)), (-22, 82, -101), (22, 98, -98),
             only=(SKIN, FAT, MUSCLE))


# ------------------------------------------------------------------------------------------------ landmarks
def _landmarks(cv: Canvas, grid: sitk.Image) -> dict[str, np.ndarray]:
    """Nose tip, upper lip and chin: the most anterior skin voxel of their regions; the eye centres."""
    out = {}
    for name, lo, hi in (("nose_tip", (-6, 80, -92), (6, 115, -60)), ("upper_lip", (-4, 75, -97), (4, 110, -89)),
                         ("chin", (-4, 65, -128), (4, 100, -113))):
        r = cv.region(lo, hi)
        assert r is not None, name
        sl, (R, A, S) = r
        skin = cv.labels[sl] == SKIN
        a_full = np.broadcast_to(A, skin.shape)
        score = np.where(skin, a_full - 0.01 * np.broadcast_to(np.abs(R), skin.shape), -np.inf)
        k = np.unravel_index(int(np.argmax(score)), skin.shape)
        idx = np.array([k[2] + sl[2].start, k[1] + sl[1].start, k[0] + sl[0].start], float)
        out[name] = cv.o + cv.m @ idx
    out["right_eye"] = np.array([-EYE[0], -EYE[1], EYE[2]])  # RAS (R, A, S) -> LPS (-R, -A, S)
    out["left_eye"] = np.array([EYE[0], -EYE[1], EYE[2]])
    return out


def levels() -> dict[str, np.ndarray]:
    """Points (template LPS mm) that scans are planned to: the atlas (C1) ring, the bottom of C2, the menton."""
    a1 = float(spine_a(-82.0))
    ras = {"c1": [(0.0, a1 + 24.0, -86.0), (0.0, a1 - 14.0, -86.0), (40.0, a1 + 6.0, -86.0), (-40.0, a1 + 6.0, -86.0)],
           "c2": [(0.0, float(spine_a(-114.0)) + 20.0, -114.0)],
           "menton": [(0.0, MANDIBLE_ARCH[0][1], -134.0)]}
    return {k: np.array(v) * [-1.0, -1.0, 1.0] for k, v in ras.items()}
