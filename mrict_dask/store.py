"""The Zarr v3 output store: created once by the driver, then one region (whole shards) per pair task.

Layout (the contract in ARCHITECTURE.md "Output store"):

- ``mr``, ``ct`` (pair, z, y, x) float32 and ``valid`` (pair, z, y, x) bool: chunks of one axial slice
  ``(1, 1, y, x)`` inside shards of one volume ``(1, z, y, x)``; ``slice_ok`` (pair, z) bool, one chunk per pair.
  A pair's task writes exactly these four objects, whole, so no two tasks ever touch the same object.
- ``pair`` (coordinate: the PHI-free pair_id), ``patient``, ``split``, ``days_apart``: written from the plan
  when the store is created.
- ``status``, clip bounds, ``mr_affine``/``ct_affine`` and one float32 variable per ``QA_KEYS``: written only by
  the driver in :func:`finalize_store`, from the completion markers, with the root attribute ``content_digest``
  (sha256 of every finalized pair's index, status and array checksums: it changes exactly when what a reader of
  the ok pairs sees changes; the loader's local cache is keyed by it).

Completion: a pair is complete once its marker ``<store>/_pairs/<index>.json`` exists. The marker is written
last, holds the store's fingerprint (a marker left by a different store is never trusted), the pair's scalars,
the sha256 of each array's bytes as written, and the size of each object written (the cheap resume check).

Growth (the store is append-only along ``pair``):

- :func:`append_pairs` resizes every array whose first dimension is ``pair`` (in any group) and writes the new
  pairs' plan variables; objects of pairs already there are never touched. The settings that change the numbers
  (grid, template, content config) are the store's ``settings`` fingerprint: an append needs the same.
- A pair is *retired* (:func:`retire_pair`: its inputs changed, or a better series is selected now) by noting it in
  its marker; its objects stay, so readers opened before and pinned versions keep their bytes, and the ``status``
  ``retired`` keeps it out of every reader of the current version. A pair is *withdrawn*
  (:func:`withdraw_pair`: its patient withdrew consent): its marker becomes a tombstone and every object of the pair
  is deleted (volumes, ``slice_ok``, its figure), its scalars are cleared at the next finalize.
- Every :func:`finalize_store` that changes what the store holds records a version (:mod:`mrict_dask.versions`);
  :func:`resolve_version` gives a version's pairs and their objects to any reader.

A store's pair variables (:func:`pair_arrays`: ``PAIR_VARS`` in the root and, with native space, under ``native/``;
by path from the root) are the one registry: markers' objects and checksums, retire and withdraw, verify, versions'
digests iterate it (the resize on append covers every ``pair`` array of every group anyway).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import threading
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import __version__
from .errors import StoreMismatchError, VersionUnavailable
from .io import Location, join
from .lease import LEASE_DIR
from .types import QA_KEYS, PairResult, PairSpec
from .versions import describe_versions, latest_version, pair_digest, read_version, record_version

log = logging.getLogger(__name__)

STORE_FORMAT = 2  # 2: head and face masks, the native group; format 1 stores still read
MARKER_DIR = "_pairs"
NATIVE = "native"  # the group of native patient space
VOLUME_VARS = ("mr", "ct", "valid", "head", "face")
PAIR_VARS: tuple[str, ...] = VOLUME_VARS + ("slice_ok",)
"""The per-pair variables of one space: each pair's region of each is ONE object, written whole by that pair's task.
A store's own list (:func:`pair_arrays`: these, and with native space the same under ``native/``, by path below the
store root) is what every mechanism that handles a pair's objects iterates: the marker's objects and checksums, the
resume check, verify, the versions' digests, retire and withdraw (deletion)."""
PAIR_VARS_FORMAT_1 = ("mr", "ct", "valid", "slice_ok")
CLIP_VARS = ("mr_lo", "mr_hi", "ct_lo", "ct_hi")
AFFINE_VARS = ("mr_affine", "ct_affine")
PLAN_STRINGS = ("pair", "patient", "split", "inputs")
"""Per-pair strings the driver writes from the plan when a pair enters the store (and ``days_apart``)."""
STATUS_PENDING = "pending"
STATUS_RETIRED = "retired"
STATUS_WITHDRAWN = "withdrawn"
PAIR_TABLE_CHUNK = 1024
"""Pairs per chunk of the driver's (pair,) and (pair, 4, 4) variables in a new store: appends write into the same
chunk (one object per variable) instead of adding one small object per append."""
# Characters the ``status`` variable holds, fixed when the store is created: finalize never has to widen (delete and
# recreate) the variable under a reader's feet. Longer failure reasons are cut to fit, in the markers too.
STATUS_WIDTH = 256
ZSTD_LEVEL = 5
# Volumes: lz4hc inside blosc with byte shuffle. Random slice reads for training are bound by decompression:
# measured on normalized 1 mm volumes (benchmarks/bench_loader.py), lz4hc level 3 decodes a slice ~2.7x faster
# than zstd level 1 (local random pairs 4,650/s against 1,760/s) for a store ~7 % larger, at ~0.4 s more CPU
# per pair when written. Shuffle puts the sign/exponent/high bytes together, which is what compresses.
VOLUME_CODEC = {"cname": "lz4hc", "clevel": 3, "shuffle": "shuffle"}

_DESCRIPTIONS = {
    "pair": "pair id: patient pseudonym + keyed hash of the two series (PHI-free)",
    "mr": "MR in template space, clipped at its percentiles (mr_lo, mr_hi) and scaled to [0, 1]",
    "ct": "CT in template space, clipped to [ct_lo, ct_hi] HU and scaled to [0, 1]; hu = ct * (ct_hi - ct_lo) + ct_lo",
    "valid": "voxels where both MR and CT had data (field of view)",
    "slice_ok": "axial slice is informative (enough brain and valid coverage): the 2D sample list",
    "mr_lo": "MR intensity mapped to 0", "mr_hi": "MR intensity mapped to 1",
    "ct_lo": "HU mapped to 0", "ct_hi": "HU mapped to 1",
    "patient": "keyed pseudonym of the patient",
    "split": "train / val / test, by patient",
    "days_apart": "CT study date minus MR study date, in days",
    "status": "ok, failed: <reason>, pending (not processed yet), retired (replaced: its inputs changed or a better "
              "series is selected; bytes kept for pinned versions) or withdrawn (the patient withdrew: data deleted)",
    "inputs": "keyed digest of the pair's input instances (changes when a series is re-sent with other instances)",
    "head": "the head and neck with the air inside it filled, couch, headrest and pillow left out; the face region "
            "is not part of it (loss and metric mask: head & valid)",
    "face": "the face region defacing emptied (MR 0, CT -1024 HU); all false when defacing is off",
    "affine": "voxel index (x, y, z, 1) -> source MR series physical LPS mm (4x4), as SimpleITK's "
              "TransformIndexToPhysicalPoint does for this pair's box",
    "mr_affine": "template physical LPS mm -> source MR series physical LPS mm (4x4)",
    "ct_affine": "template physical LPS mm -> source CT series physical LPS mm (4x4)",
    "mr_metric": "final Mattes MI of MR -> template", "ct_metric": "final Mattes MI of CT -> MR",
    "brain_dice": "Dice of the template brain mask vs the brain found in the registered MR",
    "mr_det": "determinant of the MR affine's linear part",
    "valid_fraction": "share of template brain with MR and CT data",
    "mr_corr": "correlation of the T1 template and the MR over the template brain",
    "mr_gain": "relative MI gain of the best nearby MR -> template transform (<= 0: a local optimum)",
    "ct_gain": "relative MI gain of the best nearby CT -> MR transform (<= 0: a local optimum)",
    "skin_mm": "spread of the MR-to-CT skin distance, mm",
    "head_overlap": "Dice of the MR and CT heads over the slab both cover",
    "face_ml": "head tissue in the face region, mL (native space): what defacing removed",
    "native_cut_ml": "the MR's head outside the native box, mL",
    "mr_face_ml": "the MR's own head tissue in the face region, mL (near 0 when the MR was defaced at the source)",
}


# ----------------------------------------------------------------------------------------------- helpers
def zarr_store(url: str | Location, storage_options: dict | None = None, read_only: bool = False):
    """A zarr v3 store object for a local path or any fsspec URL."""
    import zarr.storage

    loc = Location.of(url, storage_options)
    if loc.is_local:
        return zarr.storage.LocalStore(loc.local_path, read_only=read_only)
    from .io import install_storage_retries

    store = zarr.storage.FsspecStore.from_url(loc.url, storage_options=dict(loc.storage_options), read_only=read_only)
    install_storage_retries(store.fs)  # zarr itself never retries a failed request
    return store


@contextlib.contextmanager
def _quiet():
    """zarr warns that consolidated metadata and `_pairs/` are outside the v3 spec: both are deliberate."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy.*")
        # zarr-python 3.1 still calls fixed_length_utf32 unspecified; zarr-extensions (data-types/) specifies it
        warnings.filterwarnings("ignore", message=r".*FixedLengthUTF32.*does not have a Zarr V3 specification.*")
        yield


def _sha256(data: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(data)).cast("B")).hexdigest()


def _json_float(v: float) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


def _from_json_float(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _fingerprint_config(config) -> dict:
    """The config that shapes the store's content; `run` (scheduling: window, retries) does not."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    data.pop("run", None)
    return data


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def store_fingerprint(pair_ids: Sequence[str], grid: dict, template_sha256: str, config) -> str:
    """The fingerprint of stores made before they could grow: pairs in order, grid, template bytes, content config
    (such a store's markers carry it; :func:`open_or_create_store` recognises its settings by it)."""
    return _digest({"pair_ids": list(pair_ids), "grid": grid, "template_sha256": template_sha256,
                    "config": _fingerprint_config(config)})


def settings_fingerprint(grid: dict, template_sha256: str, config) -> str:
    """What makes two runs compute the same numbers for a pair: grid, template bytes, content config. A store
    grows only under the same settings."""
    return _digest({"grid": grid, "template_sha256": template_sha256, "config": _fingerprint_config(config)})


def _same_settings(attrs: dict, stored_ids: list[str], settings: str, grid: dict, template_sha: str, config) -> bool:
    if "settings" in attrs:
        return attrs["settings"] == settings
    return attrs["fingerprint"] == store_fingerprint(stored_ids, grid, template_sha, config)


def _read_json(loc: Location) -> dict | None:
    # zarr.json and markers are rewritten in place: a cached listing's ETag would fail `open` (FileExpired)
    loc.fs.invalidate_cache(loc.path)
    try:
        return loc.read_json()
    except (FileNotFoundError, NotADirectoryError):  # NotADirectoryError: the URL names a file
        return None


def _root_attrs(store: Location) -> dict:
    """The root group's attributes, straight from its zarr.json (one small read)."""
    node = _read_json(store.join("zarr.json"))
    if node is None:
        raise FileNotFoundError(store.join("zarr.json").url)
    attrs = node.get("attributes", {})
    if "mrict_dask_store" not in attrs or "fingerprint" not in attrs:
        raise StoreMismatchError(f"{store.url} is not a (completely created) mrict-dask store")
    return attrs


def _percentiles_attr(config) -> dict:
    n = config.normalize
    return {"mr": list(n.mr_percentiles), "ct_mode": n.ct_mode,
            "ct": list(n.ct_window) if n.ct_mode == "window" else list(n.ct_percentiles),
            "ct_unit": "HU" if n.ct_mode == "window" else "percentile"}


def pair_arrays(attrs: dict) -> tuple[str, ...]:
    """The arrays each pair's task writes in this store (paths from the root: ``native/mr`` in the group)."""
    return tuple(attrs.get("pair_arrays") or PAIR_VARS_FORMAT_1)


def _pair_paths(native: bool) -> tuple[str, ...]:
    return PAIR_VARS + (tuple(f"{NATIVE}/{v}" for v in PAIR_VARS) if native else ())


def _result_array(result: PairResult, path: str):
    if path.startswith(NATIVE + "/"):
        return None if result.native is None else result.native.get(path.split("/", 1)[1])
    return getattr(result, path)


# ----------------------------------------------------------------------------------------------- create
def _string_dtype(values: Sequence[str], width: int = 1) -> np.dtype:
    """Fixed-width unicode wide enough for every value (at least ``width`` characters)."""
    return np.dtype(f"<U{max([len(v) for v in values] + [width])}")


def _write_strings(g, name: str, values: Sequence[str], width: int = 1, chunk: int = 0) -> None:
    """(Re)create the per-pair string variable ``name`` as fixed-width unicode holding ``values``.

    Zarr v3 ``fixed_length_utf32`` (numpy ``<U``): xarray and zarr both read it back as a plain numpy unicode
    array (``.astype(str)``, ``==``, pandas all work), where the variable-length ``string`` type reads back as
    numpy's ``StringDType``, which ``.astype(str)`` cannot cast. Only the driver writes these variables, whole.
    """
    from zarr.codecs import ZstdCodec

    dtype = _string_dtype(values, width)
    a = g.create_array(name, shape=(len(values),), dtype=dtype, fill_value="", dimension_names=("pair",),
                       chunks=(max(len(values), chunk, 1),), compressors=ZstdCodec(level=ZSTD_LEVEL),
                       attributes={"description": _DESCRIPTIONS.get(name, name)}, overwrite=True)
    if len(values):
        a[:] = np.asarray(values, dtype=dtype)


def _describe_differences(attrs: dict, grid: dict, template_sha: str, config) -> list[str]:
    """The settings that differ between a store and a run (grid, template, content config keys)."""
    diffs = []
    if attrs.get("grid") != grid:
        diffs.append(f"grid: store {attrs.get('grid')} vs {grid}")
    if attrs.get("template", {}).get("sha256") != template_sha:
        diffs.append(f"template: sha256 {attrs.get('template', {}).get('sha256', '?')[:12]}... in the store, "
                     f"{template_sha[:12]}... now")
    old_cfg = dict(attrs.get("config") or {})
    old_cfg.pop("run", None)
    new_cfg = _fingerprint_config(config)
    if old_cfg != new_cfg:
        keys = []
        for section in sorted(set(old_cfg) | set(new_cfg)):
            a, b = old_cfg.get(section, {}), new_cfg.get(section, {})
            if not isinstance(a, dict) or not isinstance(b, dict):
                if a != b:
                    keys.append(section)
                continue
            keys += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        diffs.append("config: " + ", ".join(keys))
    return diffs or ["fingerprint"]


def open_or_create_store(url: str | Location, pairs: Sequence[PairSpec], template, config,
                         storage_options: dict | None = None, attrs: dict | None = None) -> None:
    """Create the store's metadata and plan-derived variables once (driver side), or accept and grow an existing one.

    An existing store made with the same settings (grid, template, content config) is reused: the given pairs
    whose index it already holds must be its pairs (same pair_id at the same index), and pairs beyond its last
    index are appended (:func:`append_pairs`). Anything else at ``url`` raises :class:`StoreMismatchError` naming
    what differs: a different store is never overwritten. A store whose creation was interrupted (no fingerprint
    yet, so no pair can have been written) is created anew.
    """
    pairs = sorted(pairs, key=lambda p: p.index)
    if [p.index for p in pairs] != list(range(len(pairs))):
        raise ValueError("pair indices must be 0..n-1 without gaps")
    pair_ids = [p.pair_id for p in pairs]
    if len(set(pair_ids)) != len(pair_ids):
        raise ValueError("pair_ids must be unique")
    grid = template.grid
    settings = settings_fingerprint(grid, template.sha256, config)
    store = Location.of(url, storage_options)
    url = store.url
    store.fs.invalidate_cache()
    node = check_output(store)
    if node is not None:
        old = node.get("attributes", {})
        if "fingerprint" in old:
            stored_ids = _read_pair_ids(store)
            if not _same_settings(old, stored_ids, settings, grid, template.sha256, config):
                diffs = _describe_differences(old, grid, template.sha256, config)
                raise StoreMismatchError(f"{url} holds a different store, made with other settings "
                                         f"({'; '.join(diffs)}); use a new output URL or delete the old store")
            for p in pairs[:len(stored_ids)]:
                if p.pair_id != stored_ids[p.index]:
                    raise StoreMismatchError(f"{url} holds a different store (pairs: pair_id at index {p.index} is "
                                             f"{stored_ids[p.index]} in the store, {p.pair_id} in the plan); use a "
                                             "new output URL or delete the old store")
            if "settings" not in old:  # a store from before stores could grow: its settings are known now
                _update_root_attrs(store, {"settings": settings})
            if len(pairs) > len(stored_ids):
                append_pairs(store, pairs[len(stored_ids):])
            else:
                log.info("resuming the existing store at %s (same grid, template and config)", url)
            return
        log.warning("the store at %s was not completely created; creating it again", url)
    _create(store, pairs, template, config, settings, attrs or {})


def check_output(store: Location) -> dict | None:
    """The root node (zarr.json) of the mrict-dask store at ``store``, or None when nothing (or only a writer's
    lease) is there; :class:`StoreMismatchError` when the URL holds anything else."""
    node = _read_json(store.join("zarr.json"))
    if node is not None:
        if "mrict_dask_store" not in node.get("attributes", {}):
            raise StoreMismatchError(f"{store.url} already holds a Zarr hierarchy that is not an mrict-dask store; "
                                     "choose another output URL")
        return node
    if store.exists():
        entries = [p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(store.path, detail=False)]
        if [e for e in entries if e != LEASE_DIR]:
            raise StoreMismatchError(f"{store.url} exists and is not empty, and is not an mrict-dask store; "
                                     "choose another output URL")
    return None


def _create(store: Location, pairs: Sequence[PairSpec], template, config, settings: str, attrs: dict) -> None:
    import uuid

    import zarr
    from zarr.codecs import BloscCodec, ZstdCodec

    n = len(pairs)
    z, y, x = template.shape_zyx
    native = bool(config.native.enabled)
    native_spacing = float(config.native.spacing_mm)
    native_size = [int(round(v / native_spacing)) for v in config.native.box_mm]
    root_attrs = {
        "mrict_dask_store": STORE_FORMAT,
        "title": "Paired brain MR/CT in template space (mrict-dask)",
        "mrict_dask_version": __version__,
        "template": {"name": template.name, "sha256": template.sha256},
        "grid": template.grid,
        "axes": "arrays are (z, y, x) = SimpleITK GetArrayFromImage order of the grid; "
                "TransformIndexToPhysicalPoint((x, y, z)) gives LPS mm",
        "percentiles": _percentiles_attr(config),
        "config": config.to_dict(),
        "deface": {"enabled": bool(config.deface.enabled),
                   "note": "the face region (below and in front of the template brain) is emptied in both spaces"
                           if config.deface.enabled else
                           "DEFACING OFF: faces are in the volumes; for in-house use only, never share this store"},
        "native": {"group": NATIVE, "size": native_size, "spacing": [native_spacing] * 3} if native else None,
        "pair_arrays": list(_pair_paths(native)),
        **attrs,
    }
    # markers are trusted by this store only: its settings plus a token of its own
    fingerprint = _digest({"settings": settings, "store": uuid.uuid4().hex})
    zstd = ZstdCodec(level=ZSTD_LEVEL)
    c1 = max(n, PAIR_TABLE_CHUNK)
    _clear(store)
    with _quiet():
        g = zarr.open_group(zarr_store(store), mode="a", zarr_format=3, attributes=root_attrs)

        def arr(name, shape, dims, dtype, fill, compressor=zstd, **kw):
            return g.create_array(name, shape=shape, dtype=dtype, fill_value=fill, dimension_names=dims,
                                  compressors=compressor, attributes={"description": _DESCRIPTIONS.get(name, name)},
                                  overwrite=True, **kw)

        def volumes(group, prefix: str, shape_zyx) -> None:
            nz, ny, nx = shape_zyx
            for name in VOLUME_VARS:
                dtype, fill = ("float32", np.nan) if name in ("mr", "ct") else ("bool", False)
                codec = BloscCodec(typesize=np.dtype(dtype).itemsize, **VOLUME_CODEC)
                group.create_array(name, shape=(n, nz, ny, nx), dtype=dtype, fill_value=fill,
                                   dimension_names=("pair", "z", "y", "x"), compressors=codec,
                                   attributes={"description": _DESCRIPTIONS.get(name, name) + prefix},
                                   chunks=(1, 1, ny, nx), shards=(1, nz, ny, nx))
            group.create_array("slice_ok", shape=(n, nz), dtype="bool", fill_value=False, dimension_names=("pair", "z"),
                               compressors=zstd, chunks=(1, nz),
                               attributes={"description": _DESCRIPTIONS["slice_ok"] + prefix})

        volumes(g, "", (z, y, x))
        for name in CLIP_VARS + tuple(QA_KEYS):
            arr(name, (n,), ("pair",), "float32", np.nan, chunks=(c1,))
        for name in AFFINE_VARS:
            arr(name, (n, 4, 4), ("pair", "row", "col"), "float64", np.nan, chunks=(c1, 4, 4))
        for name, values in _plan_strings(pairs).items():
            _write_strings(g, name, values, _STRING_WIDTH[name], c1)
        _write_strings(g, "status", [STATUS_PENDING] * n, STATUS_WIDTH, c1)
        days = arr("days_apart", (n,), ("pair",), "int32", 0, chunks=(c1,))
        if n:
            days[:] = np.array([p.days_apart for p in pairs], dtype=np.int32)
        if native:
            nx, ny, nz = native_size
            ng = g.create_group(NATIVE, attributes={
                "title": "Paired MR/CT in each MR's own patient frame (mrict-dask native space)",
                "grid": {"size": [nx, ny, nz], "spacing": [native_spacing] * 3},
                "axes": "arrays are (z, y, x); a pair's `affine` maps a voxel index (x, y, z, 1) to its source MR "
                        "series' patient LPS mm; mr, ct use the pair's clip bounds (mr_lo, ... here and in the root)",
            })
            volumes(ng, " (native space: head-slice coverage)", (nz, ny, nx))
            ng.create_array("affine", shape=(n, 4, 4), dtype="float64", fill_value=np.nan,
                            dimension_names=("pair", "row", "col"), compressors=zstd, chunks=(c1, 4, 4),
                            attributes={"description": _DESCRIPTIONS["affine"]})
            for name in CLIP_VARS:
                ng.create_array(name, shape=(n,), dtype="float32", fill_value=np.nan, dimension_names=("pair",),
                                compressors=zstd, chunks=(c1,), attributes={"description": _DESCRIPTIONS[name]})
            # finalize copies the status here: xr.open_zarr(url, group="native") tells ok pairs on its own
            _write_strings(ng, "status", [STATUS_PENDING] * n, STATUS_WIDTH, c1)
        # the fingerprint goes in last: a store without it was interrupted while being created
        g.update_attributes({"fingerprint": fingerprint, "settings": settings, "n_pairs": n})
        zarr.consolidate_metadata(g.store)
    log.info("created store %s: %d pairs on a %dx%dx%d grid", store.url, n, x, y, z)


_STRING_WIDTH = {"pair": 32, "patient": 24, "split": 8, "inputs": 16}
"""Characters the plan's string variables hold when created (wider values widen the variable once)."""


def _plan_strings(pairs: Sequence[PairSpec]) -> dict[str, list[str]]:
    return {"pair": [p.pair_id for p in pairs], "patient": [p.patient for p in pairs],
            "split": [p.split for p in pairs], "inputs": [getattr(p, "inputs", "") or "" for p in pairs]}


def _clear(store: Location) -> None:
    """Remove everything a store creation left behind, except the lease of the writer creating it."""
    if not store.exists():
        return
    for path in store.fs.ls(store.path, detail=False):
        if path.rstrip("/").rsplit("/", 1)[-1] != LEASE_DIR:
            store.fs.rm(path, recursive=True)
    store.fs.invalidate_cache()


def _update_root_attrs(store: Location, values: dict) -> None:
    import zarr

    with _quiet():
        g = zarr.open_group(zarr_store(store), mode="r+", use_consolidated=False)
        g.update_attributes(values)
        zarr.consolidate_metadata(g.store)


def _read_pair_ids(store: Location) -> list[str]:
    return pair_table(store, ("pair",))["pair"]


def pair_table(url: str | Location, names: Sequence[str] = ("pair", "patient", "split", "inputs", "status"),
               storage_options: dict | None = None) -> dict[str, list[str]]:
    """The store's per-pair strings, read straight from the arrays (not the consolidated metadata: a driver's
    view just after it changed them). An absent variable (``inputs`` in a store from before growth) reads as ""."""
    import zarr

    store = Location.of(url, storage_options)
    out: dict[str, list[str]] = {}
    with _quiet():
        g = zarr.open_group(zarr_store(store, read_only=True), mode="r", use_consolidated=False)
        n = int(g.attrs.get("n_pairs", g["pair"].shape[0]))
        for name in names:
            if name not in g:
                out[name] = [""] * n
                continue
            a = g[name]
            out[name] = [str(v) for v in a[:n]] if n else []
    return out


# ----------------------------------------------------------------------------------------------- append
def _pair_arrays(g) -> list:
    """Every array of the hierarchy whose first dimension is ``pair`` (sub-groups included)."""
    import zarr

    out = []
    for _, node in g.members(max_depth=None):
        if isinstance(node, zarr.Array) and (node.metadata.dimension_names or (None,))[0] == "pair":
            out.append(node)
    return out


def _put_strings(g, name: str, start: int, values: Sequence[str], width: int) -> None:
    """Write ``values`` at ``start..`` of the string variable ``name`` (already as long as needed); a variable too
    narrow for them is widened once (created again with every value), a missing one is created ("" before)."""
    if name in g:
        a = g[name]
        if a.dtype.kind != "U" or _string_dtype(values).itemsize <= a.dtype.itemsize:
            if len(values):
                a[start:start + len(values)] = np.asarray(values, dtype=a.dtype if a.dtype.kind == "U" else object)
            return
        old = [str(v) for v in a[:start]] if start else []
        chunk = a.chunks[0]
        width = max(width, a.dtype.itemsize // 4)
    else:
        old, chunk = [""] * start, max(start + len(values), PAIR_TABLE_CHUNK)
    _write_strings(g, name, list(old) + list(values), width, chunk)


def append_pairs(url: str | Location, pairs: Sequence[PairSpec], storage_options: dict | None = None) -> None:
    """Append ``pairs`` (indices ``n_pairs``, ``n_pairs + 1``, ... of the store) along ``pair`` (driver only).

    Every array whose first dimension is ``pair`` is resized (metadata only: no object of an existing pair is
    read or written), the new pairs' plan variables are written (status ``pending``), then ``n_pairs``. Readers
    that opened the store before keep their view; a driver killed in between appends again the same way (a re-run
    plans the same pairs), or anew when the plan changed meanwhile (slots past ``n_pairs`` are not trusted).
    """
    import zarr

    store = Location.of(url, storage_options)
    attrs = _root_attrs(store)
    n = int(attrs["n_pairs"])
    pairs = sorted(pairs, key=lambda p: p.index)
    if [p.index for p in pairs] != list(range(n, n + len(pairs))):
        raise ValueError(f"appended pairs must take the indices {n}.. in order")
    taken = set(_read_pair_ids(store))
    clash = [p.pair_id for p in pairs if p.pair_id in taken]
    if clash or len({p.pair_id for p in pairs}) != len(pairs):
        raise ValueError(f"pair_ids must be new to the store: {', '.join(clash[:3])}")
    m = n + len(pairs)
    with _quiet():
        g = zarr.open_group(zarr_store(store), mode="r+", use_consolidated=False)
        for a in _pair_arrays(g):
            if a.shape[0] != m:
                a.resize((m, *a.shape[1:]))
        for name, values in _plan_strings(pairs).items():
            _put_strings(g, name, n, values, _STRING_WIDTH[name])
        _put_strings(g, "status", n, [STATUS_PENDING] * len(pairs), STATUS_WIDTH)
        g["days_apart"][n:m] = np.array([p.days_apart for p in pairs], dtype=np.int32)
        g.update_attributes({"n_pairs": m})
        zarr.consolidate_metadata(g.store)
    log.info("appended %d pairs to %s (%d -> %d)", len(pairs), store.url, n, m)


# ----------------------------------------------------------------------------------------------- write
@dataclass
class _Handle:
    fingerprint: str
    n_pairs: int
    pair_ids: list[str]
    arrays: dict  # name -> zarr.Array (write_empty_chunks on: every chunk of a shard is stored)
    keys: dict  # name -> function(index) -> object key relative to the store root


def _key_fn(name: str, array):
    """index -> key (relative to the store root) of the one object holding that pair's region of ``array``."""
    return lambda i: f"{name}/" + array.metadata.encode_chunk_key((i,) + (0,) * (array.ndim - 1))


_handles: dict[tuple, _Handle] = {}
_handles_lock = threading.Lock()


def _handle(store: Location) -> _Handle:
    """Arrays of the store, opened once per process and store (keyed by the fingerprint)."""
    import zarr

    attrs = _root_attrs(store)
    key = (store, attrs["fingerprint"], int(attrs["n_pairs"]), os.getpid())  # an append makes a new handle
    with _handles_lock:
        h = _handles.get(key)
        if h is not None:
            return h
        with _quiet():
            g = zarr.open_group(zarr_store(store), mode="r+", use_consolidated=False)
            arrays = {name: g[name].with_config({"write_empty_chunks": True}) for name in pair_arrays(attrs)}
            ids = g["pair"]
            pair_ids = [str(v) for v in ids[:]] if ids.shape[0] else []
        keys = {name: _key_fn(name, a) for name, a in arrays.items()}
        h = _Handle(attrs["fingerprint"], int(attrs["n_pairs"]), pair_ids, arrays, keys)
        _handles[key] = h
        return h


def _write_shard(array, index: int, data: np.ndarray) -> None:
    """Write one pair's whole region of one variable: exactly one object (shard or chunk)."""
    array[index:index + 1] = data


def _marker(store: Location, index: int) -> Location:
    return store.join(MARKER_DIR, f"{index}.json")


def _check_result(result: PairResult, arrays: dict) -> dict[str, np.ndarray]:
    """The result's array for each of the store's pair ``arrays`` (path -> zarr array), checked and typed."""
    out = {}
    for path, array in arrays.items():
        value = _result_array(result, path)
        if value is None:
            raise ValueError(f"pair {result.pair_id}: status ok but {path} is missing")
        value = np.asarray(value)
        want = tuple(array.shape[1:])
        if value.shape != want:
            raise ValueError(f"pair {result.pair_id}: {path} has shape {value.shape}, the store's grid needs {want}")
        out[path] = np.ascontiguousarray(value, dtype=array.dtype)
    return out


_UID = re.compile(r"\b\d+(?:\.\d+){3,}\b")
_DATE = re.compile(r"\b(?:19|20)\d{2}-?(?:0[1-9]|1[0-2])-?(?:0[1-9]|[12]\d|3[01])\b")


def clean_status(status: str) -> str:
    """The status as stored: one line, DICOM UIDs, dates, URLs and paths masked (failure reasons may quote them),
    at most :data:`STATUS_WIDTH` characters."""
    from .executor import mask_paths

    return _fit(_DATE.sub("<date>", _UID.sub("<uid>", mask_paths(" ".join(str(status).split())))))


def _fit(status: str) -> str:
    """``status`` cut to the ``status`` variable's width."""
    return status if len(status) <= STATUS_WIDTH else status[:STATUS_WIDTH - 3] + "..."


def write_pair(url: str | Location, index: int, result: PairResult, storage_options: dict | None = None) -> dict:
    """Write one pair (worker side): its shard of mr/ct/valid and its slice_ok chunk, then LAST its marker.

    A failed result removes any data a previous attempt left for this pair (arrays read as fill values) and
    writes only the marker. Returns the marker.
    """
    store = Location.of(url, storage_options)
    h = _handle(store)
    if not 0 <= index < h.n_pairs:
        raise IndexError(f"pair index {index} outside the store's {h.n_pairs} pairs")
    if h.pair_ids[index] != result.pair_id:
        raise ValueError(f"pair index {index} is {h.pair_ids[index]} in the store, not {result.pair_id}")
    marker_loc = _marker(store, index)
    # an old marker must not vouch for a half-rewritten pair
    marker_loc.remove()
    marker: dict[str, Any] = {
        "format": STORE_FORMAT, "index": index, "pair_id": result.pair_id, "status": clean_status(result.status),
        "fingerprint": h.fingerprint,
        **{k: _json_float(getattr(result, k)) for k in CLIP_VARS},
        **{k: [[_json_float(v) for v in row] for row in np.asarray(getattr(result, k), float).reshape(4, 4)]
           for k in AFFINE_VARS},
        "qa": {k: _json_float(result.qa.get(k, float("nan"))) for k in QA_KEYS},
        "notes": [clean_status(n) for n in result.notes],
        "timings": {k: float(v) for k, v in (result.timings or {}).items()},
    }
    if result.native is not None and result.native.get("affine") is not None:
        marker["native_affine"] = [[_json_float(v) for v in row] for row in np.asarray(result.native["affine"], float)]
    if result.ok:
        arrays = _check_result(result, h.arrays)
        for name, data in arrays.items():
            _write_shard(h.arrays[name], index, data[None])
        marker["checksum"] = {"algorithm": "sha256", **{name: _sha256(data) for name, data in arrays.items()}}
        store.fs.invalidate_cache()
        marker["objects"] = {name: {"key": h.keys[name](index), "size": store.join(h.keys[name](index)).size()}
                             for name in h.arrays}
    else:
        for name in h.arrays:
            store.join(h.keys[name](index)).remove()
    if result.figure_png:
        store.join(MARKER_DIR, f"{index}.png").write_bytes(bytes(result.figure_png))
        marker["figure"] = f"{MARKER_DIR}/{index}.png"
    # atomic (rename locally, one PUT on object storage): a reader sees the whole marker or none
    marker_loc.write_bytes(json.dumps(marker, sort_keys=True, indent=1).encode(), durable=True)
    return marker


# ----------------------------------------------------------------------------------------------- read markers
def _read_markers(store: Location) -> tuple[dict[int, dict], list[tuple[str, str]]]:
    """All parseable markers by index, and (name, reason) for the unreadable ones."""
    fs = store.fs
    mdir = store.join(MARKER_DIR).path
    fs.invalidate_cache()
    try:
        names = [p for p in fs.ls(mdir, detail=False)
                 if p.endswith(".json") and not p.rsplit("/", 1)[-1].startswith(".")]
    except FileNotFoundError:
        return {}, []
    blobs = fs.cat(names, on_error="return") if names else {}
    markers, bad = {}, []
    for name, blob in blobs.items():
        short = name.rsplit("/", 1)[-1]
        try:
            if isinstance(blob, Exception):
                raise blob
            m = json.loads(blob)
            idx = int(m["index"])
            if short != f"{idx}.json":
                raise ValueError(f"names index {idx}")
            markers[idx] = m
        except Exception as exc:  # a marker torn by hand or by a foreign writer
            bad.append((short, f"unreadable marker: {exc}"))
    return markers, bad


def _object_sizes(store: Location, names: Sequence[str]) -> dict[str, int]:
    """Size of every pair object (shards of the volumes, chunks of slice_ok), by key relative to the store."""
    fs = store.fs
    root = store.path.rstrip("/")
    out: dict[str, int] = {}
    for name in names:
        try:
            found = fs.find(join(root, name, "c"), detail=True)
        except FileNotFoundError:
            continue
        for p, info in found.items():
            out[p[len(root) + 1:]] = int(info.get("size") or 0)
    return out


def completed_pairs(url: str | Location, storage_options: dict | None = None, check: bool = True) -> dict[int, dict]:
    """index -> marker of every pair that is done (ok, failed, retired or withdrawn) in THIS store.

    Markers carrying another store's fingerprint, or naming another pair than the store holds at their index, are
    ignored. With ``check`` (the default, cheap: one listing per variable), an ok marker also needs each of its
    objects present with the size it recorded; otherwise the pair counts as not done and will be rewritten.
    :func:`verify_store` recomputes the checksums.
    """
    store = Location.of(url, storage_options)
    attrs = _root_attrs(store)
    markers, bad = _read_markers(store)
    for name, reason in bad:
        log.warning("%s: %s (the pair will be redone)", name, reason)
    names = pair_arrays(attrs)
    ids = _read_pair_ids(store) if markers else []
    sizes = _object_sizes(store, names) if check else {}
    out = {}
    for idx, m in markers.items():
        if m.get("fingerprint") != attrs["fingerprint"] or idx >= int(attrs["n_pairs"]):
            log.warning("marker %d belongs to a different store; the pair will be redone", idx)
            continue
        if m.get("pair_id") != ids[idx]:
            log.warning("marker %d names another pair than the store holds there; the pair will be redone", idx)
            continue
        if check and m.get("status") == "ok":
            objs = m.get("objects", {})
            wrong = [name for name in names
                     if name not in objs or sizes.get(objs[name]["key"]) != objs[name]["size"]]
            if wrong:
                log.warning("pair %d: marker present but %s not as written; the pair will be redone",
                            idx, ", ".join(wrong))
                continue
        out[idx] = m
    return out


def pair_state(marker: dict | None) -> str:
    """A pair's status as the store shows it, from its marker: ``pending`` (no marker), ``ok``, ``failed: ...``,
    ``retired`` or ``withdrawn``."""
    if marker is None:
        return STATUS_PENDING
    if marker.get("status") == STATUS_WITHDRAWN:
        return STATUS_WITHDRAWN
    if marker.get("retired"):
        return STATUS_RETIRED
    return _fit(str(marker.get("status")))


# ----------------------------------------------------------------------------------------------- retire, withdraw
def retire_pair(url: str | Location, index: int, pair_id: str, reason: str, by: Sequence[str] = (),
                storage_options: dict | None = None) -> None:
    """Retire pair ``index`` (driver only): its marker says so, its objects stay (readers opened before and
    versions that hold it keep their bytes); from the next finalize its status is ``retired``."""
    store = Location.of(url, storage_options)
    marker = _read_json(_marker(store, index))
    attrs = _root_attrs(store)
    if pair_state(marker) in (STATUS_RETIRED, STATUS_WITHDRAWN):
        return
    if marker is None or marker.get("fingerprint") != attrs["fingerprint"] or marker.get("pair_id") != pair_id:
        # never computed (or computed by nobody this store trusts): nothing of it is kept
        marker = {"format": STORE_FORMAT, "index": index, "pair_id": pair_id, "status": STATUS_PENDING,
                  "fingerprint": attrs["fingerprint"]}
        for key in _pair_keys(store, index).values():
            store.join(key).remove()
    marker["retired"] = {"reason": reason, "by": list(by)}
    _marker(store, index).write_bytes(json.dumps(marker, sort_keys=True, indent=1).encode(), durable=True)


def withdraw_pair(url: str | Location, index: int, pair_id: str, storage_options: dict | None = None) -> list[str]:
    """Withdraw pair ``index`` (driver only): its marker becomes a tombstone (status ``withdrawn``, no checksums,
    scalars or figure), then every object of the pair is deleted: each pair variable's object and its figure. Its
    scalars are cleared by the next finalize. Idempotent (a withdrawal cut short is completed by running it again).
    Returns the keys it deleted."""
    store = Location.of(url, storage_options)
    attrs = _root_attrs(store)
    tomb = {"format": STORE_FORMAT, "index": index, "pair_id": pair_id, "status": STATUS_WITHDRAWN,
            "fingerprint": attrs["fingerprint"]}
    _marker(store, index).write_bytes(json.dumps(tomb, sort_keys=True, indent=1).encode(), durable=True)
    store.fs.invalidate_cache()
    keys = [k for k in (*_pair_keys(store, index).values(), f"{MARKER_DIR}/{index}.png") if store.join(k).exists()]
    for key in keys:
        store.join(key).remove()
    store.fs.invalidate_cache()
    return keys


def purge_withdrawn(url: str | Location, indices: Sequence[int], storage_options: dict | None = None) -> int:
    """Delete whatever is left of withdrawn pairs ``indices`` (a withdrawal cut short); the number of objects."""
    store = Location.of(url, storage_options)
    if not indices:
        return 0
    sizes = _object_sizes(store, pair_arrays(_root_attrs(store)))
    figures = {p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(store.join(MARKER_DIR).path, detail=False)}
    n = 0
    for i in indices:
        left = [k for k in _pair_keys(store, i).values() if k in sizes]
        left += [f"{MARKER_DIR}/{i}.png"] if f"{i}.png" in figures else []
        for key in left:
            store.join(key).remove()
        n += len(left)
    if n:
        log.warning("deleted %d objects a cut-short withdrawal had left in %s", n, store.url)
    return n


def root_attrs(url: str | Location, storage_options: dict | None = None) -> dict:
    """The store's root attributes, read afresh."""
    return _root_attrs(Location.of(url, storage_options))


def update_root_attrs(url: str | Location, values: dict, storage_options: dict | None = None) -> None:
    _update_root_attrs(Location.of(url, storage_options), values)


def _pair_keys(store: Location, index: int) -> dict[str, str]:
    """The key (below the store root) of pair ``index``'s object of each of the store's pair variables."""
    import zarr

    names = pair_arrays(_root_attrs(store))
    with _quiet():
        g = zarr.open_group(zarr_store(store, read_only=True), mode="r", use_consolidated=False)
        return {name: _key_fn(name, g[name])(index) for name in names}


# ----------------------------------------------------------------------------------------------- finalize
def finalize_store(url: str | Location, storage_options: dict | None = None) -> dict | None:
    """Write status, clip bounds, affines and QA from the markers (driver only), record a version when what the
    store holds changed, then consolidate metadata. Returns the new version's manifest (None: nothing changed).

    Idempotent: pairs without a (trusted) marker are ``pending``; a withdrawn pair's scalars and ``days_apart``
    are cleared.
    """
    import zarr

    store = Location.of(url, storage_options)
    attrs = _root_attrs(store)
    n = int(attrs["n_pairs"])
    markers = completed_pairs(store)
    status = np.array([pair_state(markers.get(i)) for i in range(n)], dtype=object)
    scal = {k: np.full(n, np.nan, np.float32) for k in CLIP_VARS + tuple(QA_KEYS)}
    aff = {k: np.full((n, 4, 4), np.nan, np.float64) for k in AFFINE_VARS + ("native_affine",)}
    for i, m in markers.items():
        for k in CLIP_VARS:
            scal[k][i] = _from_json_float(m.get(k))
        for k in QA_KEYS:
            scal[k][i] = _from_json_float(m.get("qa", {}).get(k))
        for k in aff:
            if m.get(k) is not None:
                aff[k][i] = np.array([[_from_json_float(v) for v in row] for row in m[k]], np.float64)
    counts = Counter("failed" if s.startswith("failed") else s for s in status)
    content = hashlib.sha256(json.dumps([[i, pair_state(markers[i]), markers[i].get("checksum")]
                                         for i in sorted(markers)], sort_keys=True).encode()).hexdigest()
    table = pair_table(store, ("pair", "patient", "split", "inputs")) if n else \
        {"pair": [], "patient": [], "split": [], "inputs": []}
    with _quiet():
        g = zarr.open_group(zarr_store(store), mode="r+", use_consolidated=False)
        if n:
            old = g["status"]
            if old.dtype.kind == "U" and old.dtype.itemsize < _string_dtype(status).itemsize:
                # a store created before STATUS_WIDTH, narrower than a failure reason: widened once, for good
                _write_strings(g, "status", list(status), STATUS_WIDTH)
                zarr.consolidate_metadata(g.store)
            else:  # wide enough, or a store written before fixed-width strings (variable-length `string`)
                old[:n] = status
            for k, v in scal.items():
                g[k][:n] = v
            for k in AFFINE_VARS:
                g[k][:n] = aff[k]
            if attrs.get("native"):  # the native group's copies: it reads on its own (xr.open_zarr(group=...))
                ng = g[NATIVE]
                ng["status"][:n] = status
                ng["affine"][:n] = aff["native_affine"]
                for k in CLIP_VARS:
                    ng[k][:n] = scal[k]
            gone = np.flatnonzero(status == STATUS_WITHDRAWN)
            if gone.size:  # facts about the patient's studies and files go with the data
                days = np.asarray(g["days_apart"][:n])
                if days[gone].any():
                    days[gone] = 0
                    g["days_apart"][:n] = days
                if "inputs" in g and any(table["inputs"][i] for i in gone):
                    for i in gone:
                        g["inputs"][int(i)] = ""
        entries = [{"index": i, "pair_id": table["pair"][i], "patient": table["patient"][i],
                    "split": table["split"][i], "status": str(status[i]), "digest": pair_digest(markers.get(i))}
                   for i in range(n)]
        version = record_version(store, entries, content, attrs["fingerprint"])
        latest = version["id"] if version else (attrs.get("version") or _latest_id(store))
        g.update_attributes({"pairs_ok": counts["ok"], "pairs_failed": counts["failed"],
                             "pairs_pending": counts[STATUS_PENDING], "pairs_retired": counts[STATUS_RETIRED],
                             "pairs_withdrawn": counts[STATUS_WITHDRAWN], "content_digest": content,
                             "version": latest})
        zarr.consolidate_metadata(g.store)
    log.info("finalized %s: %d ok, %d failed, %d pending, %d retired, %d withdrawn", store.url, counts["ok"],
             counts["failed"], counts[STATUS_PENDING], counts[STATUS_RETIRED], counts[STATUS_WITHDRAWN])
    return version


def _latest_id(store: Location) -> int | None:
    m = latest_version(store)
    return m["id"] if m else None


# ----------------------------------------------------------------------------------------------- versions
@dataclass(frozen=True)
class VersionPair:
    """One pair of a store version: where it is, what it is, and (ok pairs) the objects holding its bytes."""

    index: int
    pair_id: str
    patient: str
    split: str
    status: str
    digest: str | None  # sha256 over the checksums of its arrays (None: no data)
    objects: dict[str, str] = field(default_factory=dict)  # pair variable path -> object key below the root


@dataclass
class StoreVersion:
    """What :func:`resolve_version` gives: a version's id and time, and its pairs in index order."""

    url: str
    id: int | None  # None: a store finalized before versions were kept (its current state)
    time: str | None
    pairs: list[VersionPair]
    changes: dict = field(default_factory=dict)

    def ok_pairs(self, split: str | None = None) -> list[VersionPair]:
        """The version's ok pairs (of ``split``, or all with None), in index order."""
        return [p for p in self.pairs if p.status == "ok" and (split is None or p.split == split)]


def resolve_version(url: str | Location, version: int | str | None = None,
                    storage_options: dict | None = None) -> StoreVersion:
    """The pairs of one version of the store (the latest with None) and the objects that hold their bytes.

    For any reader that pins what it trained on (the loader's and ``export``'s ``version=``): every ok pair of the
    version with its ``objects`` (one key per pair variable, below the store root; read them with the
    store's own filesystem or through zarr at the pair's ``index``). The bytes are those the version recorded: a
    pair's objects are never rewritten once finished, retired pairs keep theirs. Raises
    :class:`~mrict_dask.errors.VersionUnavailable` (one line) when the version does not exist, held a pair whose
    patient has withdrawn since (its bytes are deleted), or holds a pair whose bytes changed since (a damaged pair
    recomputed).
    """
    import zarr

    store = Location.of(url, storage_options)
    attrs = _root_attrs(store)
    latest = latest_version(store)
    if version is None:
        manifest = latest
    else:
        try:
            manifest = read_version(store, int(version))
        except (FileNotFoundError, ValueError):
            known = f"versions 1 to {latest['id']}" if latest else "no versions"
            raise VersionUnavailable(f"{store.url} has no version {version} ({known})") from None
    with _quiet():
        g = zarr.open_group(zarr_store(store, read_only=True), mode="r", use_consolidated=False)
        keys = {name: _key_fn(name, g[name]) for name in pair_arrays(attrs)}
    if manifest is None:  # finalized before versions were kept: the store as it is
        n = int(attrs["n_pairs"])
        table = pair_table(store, ("pair", "patient", "split", "status"))
        entries = [{"index": i, "pair_id": table["pair"][i], "patient": table["patient"][i],
                    "split": table["split"][i], "status": table["status"][i], "digest": None} for i in range(n)]
        manifest = {"id": None, "time": None, "pairs": entries, "changes": {}}
    gone = [e for e in manifest["pairs"] if e.get("withdrawn")]
    if gone:
        patients = sorted({e["patient"] for e in gone})
        raise VersionUnavailable(f"version {manifest['id']} of {store.url} can no longer be served: it held "
                                 f"{len(gone)} pair(s) of {len(patients)} patient(s) who withdrew since "
                                 f"({', '.join(patients[:3])}{' ...' if len(patients) > 3 else ''}); their data is "
                                 "deleted")
    if latest is not None and manifest is not latest:
        now = {e["index"]: e for e in latest["pairs"]}
        moved = [e["pair_id"] for e in manifest["pairs"]
                 if e["status"] == "ok" and now.get(e["index"], {}).get("digest") != e.get("digest")]
        if moved:
            raise VersionUnavailable(f"version {manifest['id']} of {store.url} can no longer be served: the bytes "
                                     f"of {len(moved)} of its pairs changed since ({', '.join(moved[:3])})")
    pairs = [VersionPair(index=e["index"], pair_id=e["pair_id"], patient=e["patient"], split=e["split"],
                         status=e["status"], digest=e.get("digest"),
                         objects={name: k(e["index"]) for name, k in keys.items()} if e["status"] == "ok" else {})
             for e in manifest["pairs"]]
    return StoreVersion(url=store.url, id=manifest["id"], time=manifest["time"], pairs=pairs,
                        changes=manifest.get("changes", {}))


# ----------------------------------------------------------------------------------------------- verify
@dataclass
class VerifyReport:
    url: str
    n_pairs: int = 0
    checked: int = 0  # pairs with a marker whose data was checked
    torn: list[tuple[int, str]] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)  # no completion marker: not written (yet)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.torn and not self.missing

    def describe(self) -> str:
        lines = [f"store {self.url}: {self.n_pairs} pairs, {self.checked} checked, {len(self.torn)} torn, "
                 f"{len(self.missing)} missing -> {'OK' if self.ok else 'NOT OK'}"]
        for i, reason in self.torn:
            lines.append(f"  torn pair {i}: {reason}")
        if self.missing:
            shown = ", ".join(str(i) for i in self.missing[:20]) + (" ..." if len(self.missing) > 20 else "")
            lines.append(f"  missing (no completion marker; a re-run writes them): {shown}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def verify_store(url: str | Location, storage_options: dict | None = None) -> VerifyReport:
    """Recompute every pair's checksums from the stored bytes (decoded by zarr) against its marker."""
    import zarr

    store = Location.of(url, storage_options)
    attrs = _root_attrs(store)
    n = int(attrs["n_pairs"])
    report = VerifyReport(url=store.url, n_pairs=n)
    markers, bad = _read_markers(store)
    for name, reason in bad:
        try:
            report.torn.append((int(name.split(".")[0]), reason))
        except ValueError:
            report.notes.append(f"{name}: {reason}")
    bad_idx = {i for i, _ in report.torn}
    names = pair_arrays(attrs)
    sizes = _object_sizes(store, names)
    with _quiet():
        g = zarr.open_group(zarr_store(store, read_only=True), mode="r", use_consolidated=False)
        arrays = {name: g[name] for name in names}
        pair_ids = [str(v) for v in g["pair"][:]] if n else []
        status = [str(v) for v in g["status"][:]] if n else []
    keys = {name: _key_fn(name, a) for name, a in arrays.items()}
    unfinalized = 0
    for i in range(n):
        if i in bad_idx:
            continue
        m = markers.get(i)
        if m is None:
            if status[i] != STATUS_PENDING:
                report.torn.append((i, f"status says {status[i]!r} but the pair has no completion marker"))
            else:
                report.missing.append(i)
            continue
        report.checked += 1
        if m.get("fingerprint") != attrs["fingerprint"]:
            report.torn.append((i, "completion marker belongs to a different store"))
            continue
        if m.get("pair_id") != pair_ids[i]:
            report.torn.append((i, f"marker names pair {m.get('pair_id')}, the store has {pair_ids[i]}"))
            continue
        state = pair_state(m)
        if status[i] == STATUS_PENDING and state != STATUS_PENDING:
            unfinalized += 1
        elif status[i] != state:
            report.torn.append((i, f"status variable {status[i]!r} disagrees with the marker {state!r}"))
            continue
        if m.get("status") != "ok":
            leftover = [name for name in names if keys[name](i) in sizes]
            if state == STATUS_WITHDRAWN and store.join(MARKER_DIR, f"{i}.png").exists():
                leftover.append("its figure")
            if leftover:
                what = "withdrawn" if state == STATUS_WITHDRAWN else "failed" if state.startswith("failed") else state
                report.torn.append((i, f"{what} pair still holds data in {', '.join(leftover)}"))
            continue
        problems = []
        for name in names:
            if keys[name](i) not in sizes:
                problems.append(f"{name}: object missing")
                continue
            try:
                data = np.asarray(arrays[name][i])
            except Exception as exc:  # undecodable bytes are exactly what verify looks for
                problems.append(f"{name}: cannot decode ({type(exc).__name__}: {str(exc)[:80]})")
                continue
            if _sha256(data) != m.get("checksum", {}).get(name):
                problems.append(f"{name}: checksum mismatch")
        if problems:
            report.torn.append((i, "; ".join(problems)))
    report.torn.sort()
    if unfinalized:
        report.notes.append(f"{unfinalized} completed pairs are not finalized yet (status 'pending' in the store)")
    return report


# ----------------------------------------------------------------------------------------------- inspect
def _display_flips(direction: Sequence[float]) -> tuple[bool, bool]:
    """Flip rows so anterior is up, columns so the patient's left is on the image's right (radiological)."""
    d = np.asarray(direction, float).reshape(3, 3)
    # column j of the direction matrix: physical direction of index axis j (x=0, y=1)
    flip_cols = d[0, 0] < 0 if abs(d[0, 0]) >= abs(d[1, 0]) else d[1, 0] < 0
    flip_rows = d[1, 1] > 0 if abs(d[1, 1]) >= abs(d[0, 1]) else d[0, 1] > 0
    return bool(flip_rows), bool(flip_cols)


def inspect_store(url: str | Location, png: str | None = None, storage_options: dict | None = None) -> str:
    """A human summary of a store: pairs, splits, usable slices, failures by reason, QA distribution."""
    import zarr

    store = Location.of(url, storage_options)
    url = store.url
    attrs = _root_attrs(store)
    n = int(attrs["n_pairs"])
    with _quiet():
        g = zarr.open_group(zarr_store(store, read_only=True), mode="r")
        status = np.array([str(v) for v in g["status"][:]]) if n else np.array([], str)
        split = np.array([str(v) for v in g["split"][:]]) if n else np.array([], str)
        patient = np.array([str(v) for v in g["patient"][:]]) if n else np.array([], str)
        slice_ok = np.asarray(g["slice_ok"][:]) if n else np.zeros((0, 0), bool)
        qa = {k: np.asarray(g[k][:]) for k in QA_KEYS} if n else {}
    markers, _ = _read_markers(store)
    ok = status == "ok"
    grid = attrs["grid"]
    lines = [
        f"store {url}",
        f"  format {attrs.get('mrict_dask_store')}, written by mrict-dask {attrs.get('mrict_dask_version')}",
        f"  template {attrs['template']['name']} (sha256 {attrs['template']['sha256'][:16]}...)",
        f"  grid {'x'.join(map(str, grid['size']))} voxels (x, y, z), spacing {grid['spacing']} mm, "
        f"origin {grid['origin']}",
        f"pairs: {n} (ok {int(ok.sum())}, failed {int(sum(s.startswith('failed') for s in status))}, "
        f"pending {int((status == STATUS_PENDING).sum())}"
        + "".join(f", {s} {int((status == s).sum())}" for s in (STATUS_RETIRED, STATUS_WITHDRAWN)
                  if (status == s).any()) + ")",
    ]
    pending_done = sum(1 for i, s in enumerate(status) if s == STATUS_PENDING and i in markers)
    if pending_done:
        lines.append(f"  note: {pending_done} pairs are written but not finalized (re-run to finalize)")
    lines.append(f"  {'split':<8}{'pairs':>7}{'ok':>6}{'patients':>10}{'usable slices':>15}")
    for s in ("train", "val", "test") + tuple(sorted(set(split) - {"train", "val", "test"})):
        sel = split == s
        if not sel.any() and s not in ("train", "val", "test"):
            continue
        usable = int(slice_ok[sel & ok].sum()) if n else 0
        lines.append(f"  {s:<8}{int(sel.sum()):>7}{int((sel & ok).sum()):>6}{len(set(patient[sel])):>10}{usable:>15}")
    failures = Counter(s[len("failed:"):].strip() for s in status if s.startswith("failed"))
    if failures:
        lines.append("failures by reason:")
        lines += [f"  {c:>4}  {reason}" for reason, c in failures.most_common()]
    if ok.any():
        lines.append(f"QA over {int(ok.sum())} ok pairs: {'metric':<16}{'min':>10}{'median':>10}{'max':>10}")
        for k in QA_KEYS:
            v = qa[k][ok]
            v = v[np.isfinite(v)]
            if v.size:
                lines.append(f"  {k:<16}{v.min():>10.4g}{np.median(v):>10.4g}{v.max():>10.4g}")
            else:
                lines.append(f"  {k:<16}{'n/a':>10}")
    lines += describe_versions(store)
    if png:
        shown = _montage(store, png, ok, slice_ok, split, grid)
        lines.append(f"montage of {shown} random slice pairs written to {png}" if shown
                     else "no usable slices: no montage written")
    return "\n".join(lines)


def _montage(store: Location, png: str, ok, slice_ok, split, grid, n_show: int = 6, seed: int = 0) -> int:
    """Random ok slices, template space (MR, CT) and, in stores with it, native space (MR, CT); then one pair's
    native head from the front and the side (a reviewer sees at a glance that the face is gone)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import zarr

    from .qa import depth_render

    cand = np.argwhere(slice_ok & ok[:, None]) if slice_ok.size else np.zeros((0, 2), int)
    if not len(cand):
        return 0
    rng = np.random.default_rng(seed)
    pick = cand[rng.choice(len(cand), size=min(n_show, len(cand)), replace=False)]
    flip_rows, flip_cols = _display_flips(grid["direction"])
    with _quiet():
        g = zarr.open_group(zarr_store(store, read_only=True), mode="r")
        native = g.get(NATIVE)
        mr, ct = g["mr"], g["ct"]
        ct_lo, ct_hi = np.asarray(g["ct_lo"][:]), np.asarray(g["ct_hi"][:])
        n_cols = 4 if native is not None else 2
        rows = len(pick) + (1 if native is not None else 0)
        fig, axes = plt.subplots(rows, n_cols, figsize=(2.5 * n_cols, 2.5 * rows), squeeze=False)
        for row, (p, z) in enumerate(pick):
            lo, hi = float(ct_lo[p]), float(ct_hi[p])
            # CT shown in a brain window (HU -100..200) when its clip bounds are known
            ct_range = ((-100 - lo) / (hi - lo), (200 - lo) / (hi - lo)) if np.isfinite(lo + hi) and hi > lo else (0, 1)
            panels = [("MR", np.asarray(mr[int(p), int(z)]), True), ("CT", np.asarray(ct[int(p), int(z)]), True)]
            if native is not None:
                nz = np.flatnonzero(np.asarray(native["slice_ok"][int(p)]))
                zn = int(nz[len(nz) // 2]) if len(nz) else 0
                panels += [("native MR", np.asarray(native["mr"][int(p), zn]), False),
                           ("native CT", np.asarray(native["ct"][int(p), zn]), False)]
            for col, (name, plane, template_grid) in enumerate(panels):
                if template_grid:
                    rows_up = plane[::-1] if flip_rows else plane
                    shown = rows_up[:, ::-1] if flip_cols else rows_up
                else:  # native: LPS, identity direction: anterior up, the patient's left on the right
                    shown = plane[:, ::-1]
                ax = axes[row, col]
                vmin, vmax = (0, 1) if "MR" in name else ct_range
                ax.imshow(shown, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
                ax.set_title(f"{name} pair {int(p)} ({split[int(p)]})", fontsize=7)
                ax.axis("off")
        if native is not None:
            p = int(pick[0][0])
            head = np.asarray(native["head"][p])
            for col, view in enumerate(("front", "side")):
                ax = axes[-1, col]
                ax.imshow(depth_render(head, view), cmap="bone", vmin=0, vmax=1, interpolation="nearest")
                ax.set_title(f"pair {p}: head from the {view}", fontsize=7)
            for ax in axes[-1]:
                ax.axis("off")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
    Location.of(png).write_bytes(buf.getvalue())
    return len(pick)
