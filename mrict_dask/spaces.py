"""The store's spaces as readers outside training need them: each pair's SimpleITK geometry, where each variable
lives, the metric mask, and CT in HU. Export, evaluate and to-dicom all go through here.

Two spaces (README, "Output store"):

- **template**: the root group. One grid for every pair, the root attribute ``grid`` (size, spacing, origin,
  direction exactly as SimpleITK reports them); arrays ``(pair, z, y, x)`` in ``GetArrayFromImage`` order.
- **native**: the group ``native``, each pair in its source MR's patient frame. The group's attribute ``grid`` gives
  the size ``[X, Y, Z]`` and spacing ``[s, s, s]`` shared by all pairs; ``affine`` (pair, 4, 4) maps a voxel index
  ``(x, y, z, 1)`` to the source MR's LPS mm, as ``TransformIndexToPhysicalPoint`` does: origin ``affine[:3, 3]``,
  direction ``affine[:3, :3]`` with each column divided by its spacing.

Both spaces normalize CT with the root's per-pair clip bounds: ``hu = ct * (ct_hi - ct_lo) + ct_lo``. The metric
(and loss) mask is ``head & valid``; a store written before ``head`` existed falls back to ``valid`` and says so.

Which pairs: those of one version of the store (:func:`pair_table`, through ``store.resolve_version``), of which only
the ``ok`` ones are read (:func:`select_pairs`); ``retired`` and ``withdrawn`` pairs never are.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError
from .io import Location

log = logging.getLogger(__name__)

SPACES = ("native", "template")
NATIVE_GROUP = "native"
PAIR_TABLE_VARS = ("pair", "patient", "split", "status", "days_apart", "mr_lo", "mr_hi", "ct_lo", "ct_hi")
MASK_HEAD_VALID = "head & valid (the head, inside both images' field of view)"
MASK_VALID_ONLY = ("valid only: this store has no 'head' mask (it was written before there was one), so the mask "
                   "is the field of view both images cover, air around the head included")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():  # zarr's notes on consolidated metadata and `_pairs/` (see store._quiet)
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Geometry:
    """A SimpleITK image grid: ``size`` (x, y, z), ``spacing`` and ``origin`` in mm, ``direction`` as 9 numbers
    row by row (column j: the LPS direction of index axis j)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, size: Sequence[int], spacing: Sequence[float], origin: Sequence[float],
           direction: Sequence[float]) -> Geometry:
        return cls(tuple(int(v) for v in size), tuple(float(v) for v in spacing),  # type: ignore[arg-type]
                   tuple(float(v) for v in origin), tuple(float(v) for v in direction))  # type: ignore[arg-type]

    @classmethod
    def of_grid(cls, grid: dict) -> Geometry:
        """From a store's ``grid`` attribute (size, spacing, origin, direction)."""
        return cls.of(grid["size"], grid["spacing"], grid["origin"], grid["direction"])

    @classmethod
    def of_affine(cls, affine: np.ndarray, size: Sequence[int], spacing: Sequence[float]) -> Geometry:
        """From an index -> LPS matrix (4x4) and the grid's size and spacing."""
        a = np.asarray(affine, dtype=np.float64)
        if a.shape != (4, 4) or not np.isfinite(a).all():
            raise ValueError("no finite 4x4 affine")
        direction = a[:3, :3] / np.asarray(spacing, dtype=np.float64)[None, :]
        return cls.of(size, spacing, a[:3, 3], direction.ravel())

    @classmethod
    def of_image(cls, img: Any) -> Geometry:
        return cls.of(img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection())

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        x, y, z = self.size
        return z, y, x

    def matrix(self) -> np.ndarray:
        """Voxel index (x, y, z, 1) -> LPS mm (4x4)."""
        m = np.eye(4)
        m[:3, :3] = np.asarray(self.direction).reshape(3, 3) * np.asarray(self.spacing)[None, :]
        m[:3, 3] = self.origin
        return m

    def image(self, array_zyx: np.ndarray) -> Any:
        """A SimpleITK image of ``array_zyx`` on this grid."""
        import SimpleITK as sitk

        arr = np.asarray(array_zyx)
        if arr.shape != self.shape_zyx:
            raise ValueError(f"array of shape {arr.shape} is not on this grid (z, y, x) = {self.shape_zyx}")
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    def mismatch(self, other: Geometry, tol_mm: float = 0.01, tol_direction: float = 1e-4) -> str:
        """Why ``other`` is not this grid ('' when it is): size exactly; spacing and origin within ``tol_mm``;
        direction cosines within ``tol_direction`` (NIfTI keeps spacing, origin and rotation in float32)."""
        if tuple(other.size) != tuple(self.size):
            return f"size {list(other.size)} instead of {list(self.size)} (x, y, z)"
        for what, a, b, tol in (("spacing", other.spacing, self.spacing, tol_mm),
                                ("origin", other.origin, self.origin, tol_mm),
                                ("direction", other.direction, self.direction, tol_direction)):
            if np.max(np.abs(np.subtract(a, b))) > tol:
                return f"{what} {_fmt(a)} instead of {_fmt(b)}"
        return ""

    def to_dict(self) -> dict:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


# ----------------------------------------------------------------------------------------------- the store
def open_group(store: Location) -> Any:
    """The store's root group, read-only, from the stored metadata itself (never a stale consolidated copy)."""
    import zarr

    from .store import zarr_store

    with _quiet():
        return zarr.open_group(zarr_store(store, read_only=True), mode="r", use_consolidated=False)


def _group_attrs(store: Location, group: str) -> dict | None:
    loc = store.join(group, "zarr.json") if group else store.join("zarr.json")
    loc.fs.invalidate_cache(loc.path)
    try:
        node = loc.read_json()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if node.get("node_type") != "group":
        return None
    return node.get("attributes", {})


def has_native(store: Location) -> bool:
    """Does the store hold the native-space group?"""
    return _group_attrs(store, NATIVE_GROUP) is not None


def root_attrs(store: Location) -> dict:
    """The root attributes of a completely created store (one clear error for anything else)."""
    attrs = _group_attrs(store, "")
    if attrs is None or "mrict_dask_store" not in attrs or "fingerprint" not in attrs:
        raise InputError(f"{store.url} is not a (completely created) mrict-dask store")
    return attrs


@dataclass(frozen=True)
class StoreSpace:
    """One space of one store: where its variables are, each pair's geometry, and the metric mask.

    Small and picklable (what a task carries); the per-pair native affines are read on demand by
    :meth:`geometries`.
    """

    store: Location
    name: str  # "native" or "template"
    group: str  # "" (root) or "native"
    size: tuple[int, int, int]  # (x, y, z), shared by all pairs of the space
    spacing: tuple[float, float, float]
    template: Geometry | None  # template space: the one grid of every pair
    has_head: bool

    def path(self, var: str) -> str:
        """Where variable ``var`` of this space lives below the store root."""
        return f"{self.group}/{var}" if self.group else var

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        x, y, z = self.size
        return z, y, x

    def geometries(self, indices: Sequence[int]) -> dict[int, Geometry]:
        """The SimpleITK grid of each pair of ``indices`` in this space."""
        if self.template is not None:
            return dict.fromkeys(indices, self.template)
        with _quiet():
            affines = np.asarray(open_group(self.store)[self.path("affine")][:], dtype=np.float64)
        out = {}
        for i in indices:
            try:
                out[i] = Geometry.of_affine(affines[i], self.size, self.spacing)
            except ValueError:
                raise InputError(f"pair {i} has no native geometry in the store (no finite affine)") from None
        return out

    def geometry(self, index: int) -> Geometry:
        return self.geometries([index])[index]

    @property
    def mask_note(self) -> str:
        return MASK_HEAD_VALID if self.has_head else MASK_VALID_ONLY

    @property
    def mask_name(self) -> str:
        return "head & valid" if self.has_head else "valid"

    @property
    def mask_vars(self) -> tuple[str, ...]:
        """The variables the metric mask is made of."""
        return ("valid", "head") if self.has_head else ("valid",)

    def mask(self, volumes: dict[str, np.ndarray]) -> np.ndarray:
        """The metric mask of one pair from its volumes (``valid`` and, when the store has it, ``head``)."""
        valid = np.asarray(volumes["valid"], dtype=bool)
        return valid & np.asarray(volumes["head"], dtype=bool) if self.has_head else valid

    def read(self, index: int, names: Sequence[str]) -> dict[str, np.ndarray]:
        """Pair ``index``'s (z, y, x) volumes of ``names`` (one read per shard, as the training loader reads)."""
        from .loader import read_volumes

        vols = read_volumes(self.store.url, [self.path(n) for n in names], index, self.store.storage_options)
        return dict(zip(names, vols))


def open_space(store: Location, space: str | None = None) -> StoreSpace:
    """``space`` of the store: "native", "template", or None for the default (native when the store has it)."""
    attrs = root_attrs(store)
    native = _group_attrs(store, NATIVE_GROUP)
    if space is None:
        space = "native" if native is not None else "template"
    if space not in SPACES:
        raise InputError(f"unknown space {space!r}: use one of {', '.join(SPACES)}")
    if space == "template":
        group, grid, template = "", attrs["grid"], Geometry.of_grid(attrs["grid"])
    else:
        if native is None:
            raise InputError(f"{store.url} has no native space (group '{NATIVE_GROUP}'): the store was written in "
                             "template space only; use --space template")
        group, grid, template = NATIVE_GROUP, native.get("grid") or {}, None
        if "size" not in grid or "spacing" not in grid:
            raise InputError(f"{store.url}: the native group's 'grid' attribute lacks its size or spacing")
    g = open_group(store)
    with _quiet():
        names = set((g[group] if group else g).array_keys())
    return StoreSpace(store=store, name=space, group=group, size=tuple(int(v) for v in grid["size"]),
                      spacing=tuple(float(v) for v in grid["spacing"]), template=template,
                      has_head="head" in names)


@dataclass(frozen=True)
class PairTable:
    """The pairs of one version of a store, as readers outside training select them.

    ``columns``: :data:`PAIR_TABLE_VARS` and the QA metrics the store has, one value per pair of the version
    (strings as ``str``). ``pair``, ``patient``, ``split`` and ``status`` are the version's own (a pair retired since
    is ``ok`` in a version that held it; a version from before an append has fewer pairs); the rest is read at the
    pairs' indices (a pair's clip bounds, affine and QA never change once it is written).
    """

    version: int | None  # None: a store finalized before versions were kept (its current state)
    columns: dict[str, np.ndarray]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    @property
    def ids(self) -> list[str]:
        return [str(v) for v in self.columns["pair"]]


def pair_table(store: Location, version: int | None = None) -> PairTable:
    """The pairs of ``version`` of the store (the latest with None), through :func:`mrict_dask.store.resolve_version`
    (:class:`~mrict_dask.errors.VersionUnavailable`, one line, for a version that held a patient who withdrew
    since, or whose bytes changed)."""
    from .store import resolve_version
    from .types import QA_KEYS

    view = resolve_version(store, version)
    n = len(view.pairs)
    out: dict[str, np.ndarray] = {
        "pair": np.array([p.pair_id for p in view.pairs], dtype=object),
        "patient": np.array([p.patient for p in view.pairs], dtype=object),
        "split": np.array([p.split for p in view.pairs], dtype=object),
        "status": np.array([p.status for p in view.pairs], dtype=object),
    }
    g = open_group(store)
    with _quiet():
        for name in PAIR_TABLE_VARS + tuple(QA_KEYS):
            if name in g and name not in out:
                values = np.asarray(g[name][:n]) if n else np.zeros(0)
                out[name] = np.array([str(v) for v in values], dtype=object) if values.dtype.kind in "USOT" \
                    else values
    return PairTable(version=view.id, columns=out)


def current_status(store: Location) -> dict[str, str]:
    """pair id -> status of every pair the store holds now (whatever version a reader pinned)."""
    g = open_group(store)
    with _quiet():
        return {str(p): str(s) for p, s in zip(g["pair"][:], g["status"][:])} if g["pair"].shape[0] else {}


def select_pairs(table: PairTable, split: str | None = None, pairs: Sequence[str] | None = None,
                 ) -> tuple[list[int], list[tuple[str, str]]]:
    """Indices of the ok pairs asked for (all, a split, and/or a list of pair ids), and (pair id, status) for each
    asked-for pair that is not ok (failed, pending, retired or withdrawn): never exported nor scored. An unknown pair
    id is an error."""
    ids = [str(v) for v in table["pair"]]
    status = [str(v) for v in table["status"]]
    splits = [str(v) for v in table["split"]]
    if pairs:
        where = {p: i for i, p in enumerate(ids)}
        unknown = [p for p in pairs if p not in where]
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            where_ = f"version {table.version} of the store" if table.version is not None else "the store"
            raise InputError(f"{len(unknown)} pair id(s) not in {where_}: {shown}")
        wanted = [where[p] for p in dict.fromkeys(pairs)]
    else:
        wanted = list(range(len(ids)))
    if split is not None:
        wanted = [i for i in wanted if splits[i] == split]
    chosen = [i for i in wanted if status[i] == "ok"]
    skipped = [(ids[i], status[i]) for i in wanted if status[i] != "ok"]
    return chosen, skipped


def hu_values(ct: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The store's normalized CT in whole HU as float64: ``round(ct * (hi - lo) + lo)`` (evaluate scores against
    these values; :func:`ct_hu` writes them as int16)."""
    hu = np.multiply(np.asarray(ct), float(hi) - float(lo), dtype=np.float64)
    hu += float(lo)
    np.rint(hu, out=hu)
    if not np.isfinite(hu.sum()):  # one pass: a NaN or an infinity anywhere makes the sum so
        raise ValueError("CT holds non-finite values")
    return hu


def ct_hu(ct: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The store's normalized CT in whole HU (int16): ``round(ct * (hi - lo) + lo)``, the values export writes and
    evaluate scores against."""
    hu = hu_values(ct, lo, hi)
    return np.clip(hu, -32768, 32767, out=hu).astype(np.int16)
