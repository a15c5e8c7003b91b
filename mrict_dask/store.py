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
from .errors import StoreMismatchError
from .io import Location, join
from .types import QA_KEYS, PairResult, PairSpec

log = logging.getLogger(__name__)

STORE_FORMAT = 2  # 2: head and face masks, the native group; format 1 stores still read
MARKER_DIR = "_pairs"
NATIVE = "native"  # the group of native patient space
VOLUME_VARS = ("mr", "ct", "valid", "head", "face")
PAIR_VARS = VOLUME_VARS + ("slice_ok",)  # written by the pair's own task, in each space
PAIR_VARS_FORMAT_1 = ("mr", "ct", "valid", "slice_ok")
CLIP_VARS = ("mr_lo", "mr_hi", "ct_lo", "ct_hi")
AFFINE_VARS = ("mr_affine", "ct_affine")
STATUS_PENDING = "pending"
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
    "status": "ok, failed: <reason>, or pending (not processed yet)",
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
    """What makes two runs write the same store: pairs in order, grid, template bytes, content config."""
    return _digest({"pair_ids": list(pair_ids), "grid": grid, "template_sha256": template_sha256,
                    "config": _fingerprint_config(config)})


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


def _pair_arrays(native: bool) -> tuple[str, ...]:
    return PAIR_VARS + (tuple(f"{NATIVE}/{v}" for v in PAIR_VARS) if native else ())


def _result_array(result: PairResult, path: str):
    if path.startswith(NATIVE + "/"):
        return None if result.native is None else result.native.get(path.split("/", 1)[1])
    return getattr(result, path)


# ----------------------------------------------------------------------------------------------- create
def _string_dtype(values: Sequence[str], width: int = 1) -> np.dtype:
    """Fixed-width unicode wide enough for every value (at least ``width`` characters)."""
    return np.dtype(f"<U{max([len(v) for v in values] + [width])}")


def _write_strings(g, name: str, values: Sequence[str], width: int = 1) -> None:
    """(Re)create the per-pair string variable ``name`` as fixed-width unicode holding ``values``.

    Zarr v3 ``fixed_length_utf32`` (numpy ``<U``): xarray and zarr both read it back as a plain numpy unicode
    array (``.astype(str)``, ``==``, pandas all work), where the variable-length ``string`` type reads back as
    numpy's ``StringDType``, which ``.astype(str)`` cannot cast. Only the driver writes these variables, whole.
    """
    from zarr.codecs import ZstdCodec

    dtype = _string_dtype(values, width)
    a = g.create_array(name, shape=(len(values),), dtype=dtype, fill_value="", dimension_names=("pair",),
                       chunks=(max(len(values), 1),), compressors=ZstdCodec(level=ZSTD_LEVEL),
                       attributes={"description": _DESCRIPTIONS.get(name, name)}, overwrite=True)
    if len(values):
        a[:] = np.asarray(values, dtype=dtype)


def _describe_differences(attrs: dict, stored_ids: list[str], pair_ids: list[str], grid: dict,
                          template_sha: str, config) -> list[str]:
    diffs = []
    if stored_ids != pair_ids:
        if len(stored_ids) != len(pair_ids):
            diffs.append(f"pairs: the store holds {len(stored_ids)}, the plan has {len(pair_ids)}")
        else:
            first = next(i for i, (a, b) in enumerate(zip(stored_ids, pair_ids)) if a != b)
            diffs.append(f"pairs: pair_id at index {first} is {stored_ids[first]} in the store, {pair_ids[first]} "
                         "in the plan")
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
    """Create the store's metadata and plan-derived variables once (driver side), or accept an identical one.

    An existing store with the same fingerprint is reused (resume). Anything else at ``url`` raises
    :class:`StoreMismatchError` naming what differs: a different store is never overwritten. A store whose
    creation was interrupted (no fingerprint yet, so no pair can have been written) is created anew.
    """
    import zarr
    from zarr.codecs import BloscCodec, ZstdCodec

    pairs = sorted(pairs, key=lambda p: p.index)
    if [p.index for p in pairs] != list(range(len(pairs))):
        raise ValueError("pair indices must be 0..n-1 without gaps")
    pair_ids = [p.pair_id for p in pairs]
    if len(set(pair_ids)) != len(pair_ids):
        raise ValueError("pair_ids must be unique")
    grid = template.grid
    fingerprint = store_fingerprint(pair_ids, grid, template.sha256, config)
    store = Location.of(url, storage_options)
    url = store.url
    store.fs.invalidate_cache()
    node = _read_json(store.join("zarr.json"))
    if node is not None:
        old = node.get("attributes", {})
        if "mrict_dask_store" not in old:
            raise StoreMismatchError(f"{url} already holds a Zarr hierarchy that is not an mrict-dask store; "
                                     "choose another output URL")
        if "fingerprint" in old:
            if old["fingerprint"] == fingerprint:
                log.info("resuming the existing store at %s (same pairs, grid, template and config)", url)
                return
            stored_ids = _read_pair_ids(store)
            diffs = _describe_differences(old, stored_ids, pair_ids, grid, template.sha256, config)
            raise StoreMismatchError(f"{url} holds a different store ({'; '.join(diffs)}); use a new output URL "
                                     "or delete the old store")
        log.warning("the store at %s was not completely created; creating it again", url)
    elif store.exists() and store.fs.ls(store.path):
        raise StoreMismatchError(f"{url} exists and is not empty, and is not an mrict-dask store; "
                                 "choose another output URL")

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
        "grid": grid,
        "axes": "arrays are (z, y, x) = SimpleITK GetArrayFromImage order of the grid; "
                "TransformIndexToPhysicalPoint((x, y, z)) gives LPS mm",
        "percentiles": _percentiles_attr(config),
        "config": config.to_dict(),
        "deface": {"enabled": bool(config.deface.enabled),
                   "note": "the face region (below and in front of the template brain) is emptied in both spaces"
                           if config.deface.enabled else
                           "DEFACING OFF: faces are in the volumes; for in-house use only, never share this store"},
        "native": {"group": NATIVE, "size": native_size, "spacing": [native_spacing] * 3} if native else None,
        "pair_arrays": list(_pair_arrays(native)),
        **(attrs or {}),
    }
    zstd = ZstdCodec(level=ZSTD_LEVEL)
    c1 = max(n, 1)
    with _quiet():
        g = zarr.open_group(zarr_store(store), mode="w", zarr_format=3, attributes=root_attrs)

        def arr(name, shape, dims, dtype, fill, compressor=zstd, **kw):
            return g.create_array(name, shape=shape, dtype=dtype, fill_value=fill, dimension_names=dims,
                                  compressors=compressor, attributes={"description": _DESCRIPTIONS.get(name, name)},
                                  **kw)

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
        strings = {"pair": pair_ids, "patient": [p.patient for p in pairs], "split": [p.split for p in pairs],
                   "status": [STATUS_PENDING] * n}
        for name, values in strings.items():
            _write_strings(g, name, values, STATUS_WIDTH if name == "status" else 1)
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
            for name, values in strings.items():
                if name in ("pair", "split", "status"):
                    _write_strings(ng, name, values, STATUS_WIDTH if name == "status" else 1)
        # the fingerprint goes in last: a store without it was interrupted while being created
        g.update_attributes({"fingerprint": fingerprint, "n_pairs": n})
        zarr.consolidate_metadata(g.store)
    log.info("created store %s: %d pairs on a %dx%dx%d grid", url, n, x, y, z)


def _read_pair_ids(store: Location) -> list[str]:
    import zarr

    with _quiet():
        g = zarr.open_group(zarr_store(store, read_only=True), mode="r", use_consolidated=False)
        a = g["pair"]
        return [str(v) for v in a[:]] if a.shape[0] else []


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
    key = (store, attrs["fingerprint"], os.getpid())
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
    """index -> marker of every pair that is done (ok or failed) in THIS store.

    Markers carrying another store's fingerprint are ignored. With ``check`` (the default, cheap: one listing
    per variable), an ok marker also needs each of its objects present with the size it recorded; otherwise
    the pair counts as not done and will be rewritten. :func:`verify_store` recomputes the checksums.
    """
    store = Location.of(url, storage_options)
    attrs = _root_attrs(store)
    markers, bad = _read_markers(store)
    for name, reason in bad:
        log.warning("%s: %s (the pair will be redone)", name, reason)
    names = pair_arrays(attrs)
    sizes = _object_sizes(store, names) if check else {}
    out = {}
    for idx, m in markers.items():
        if m.get("fingerprint") != attrs["fingerprint"] or idx >= int(attrs["n_pairs"]):
            log.warning("marker %d belongs to a different store; the pair will be redone", idx)
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


# ----------------------------------------------------------------------------------------------- finalize
def finalize_store(url: str | Location, storage_options: dict | None = None) -> None:
    """Write status, clip bounds, affines and QA from the markers (driver only), then consolidate metadata.

    Idempotent: pairs without a (trusted) marker are ``pending``.
    """
    import zarr

    store = Location.of(url, storage_options)
    attrs = _root_attrs(store)
    n = int(attrs["n_pairs"])
    markers = completed_pairs(store)
    status = np.array([_fit(markers[i]["status"]) if i in markers else STATUS_PENDING for i in range(n)],
                      dtype=object)
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
    counts = Counter("ok" if s == "ok" else ("pending" if s == STATUS_PENDING else "failed") for s in status)
    content = hashlib.sha256(json.dumps([[i, markers[i].get("status"), markers[i].get("checksum")]
                                         for i in sorted(markers)], sort_keys=True).encode()).hexdigest()
    with _quiet():
        g = zarr.open_group(zarr_store(store), mode="r+", use_consolidated=False)
        if n:
            old = g["status"]
            if old.dtype.kind == "U" and old.dtype.itemsize < _string_dtype(status).itemsize:
                # a store created before STATUS_WIDTH, narrower than a failure reason: widened once, for good
                _write_strings(g, "status", list(status), STATUS_WIDTH)
                zarr.consolidate_metadata(g.store)
            else:  # wide enough, or a store written before fixed-width strings (variable-length `string`)
                old[:] = status
            for k, v in scal.items():
                g[k][:] = v
            for k in AFFINE_VARS:
                g[k][:] = aff[k]
            if attrs.get("native"):  # the native group's copies: it reads on its own (xr.open_zarr(group=...))
                ng = g[NATIVE]
                ng["status"][:] = status
                ng["affine"][:] = aff["native_affine"]
                for k in CLIP_VARS:
                    ng[k][:] = scal[k]
        g.update_attributes({"pairs_ok": counts["ok"], "pairs_failed": counts["failed"],
                             "pairs_pending": counts["pending"], "content_digest": content})
        zarr.consolidate_metadata(g.store)
    log.info("finalized %s: %d ok, %d failed, %d pending", store.url, counts["ok"], counts["failed"], counts["pending"])


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
        if status[i] == STATUS_PENDING:
            unfinalized += 1
        elif status[i] != _fit(str(m.get("status"))):
            report.torn.append((i, f"status variable {status[i]!r} disagrees with the marker {m.get('status')!r}"))
            continue
        if m.get("status") != "ok":
            leftover = [name for name in names if keys[name](i) in sizes]
            if leftover:
                report.torn.append((i, f"failed pair still holds data in {', '.join(leftover)}"))
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
        f"pending {int((status == STATUS_PENDING).sum())})",
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
