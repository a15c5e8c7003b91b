"""Training-side reading of the store: random (MR, CT) slice pairs and whole volumes, local or object storage.

Never imports torch: :class:`SlicePairs` and :class:`VolumePairs` have ``__len__`` and ``__getitem__``, so they
work as a PyTorch map-style ``Dataset`` directly, and they pickle without their store handles (each DataLoader
worker process opens its own; a forked worker notices the new process id and reopens too).

Random slice reads skip zarr's per-call machinery (~3 ms a call): the store's layout is fixed by the contract
(one axial slice per inner chunk, one volume per shard, ``bytes`` + ``blosc``/``zstd`` inside a
``sharding_indexed`` codec with its index at the end), so a slice is one ranged read of a shard plus one
decompression. The shard index (crc32c-checked) is cached per shard; on object storage the MR and CT reads of a
sample go out concurrently. An array whose metadata is not exactly that layout is read through zarr instead.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from .normalize import ct_to_hu  # noqa: F401  (re-exported: training code maps CT back to HU from here)

log = logging.getLogger(__name__)

_EMPTY = 2**64 - 1  # sharding index entry of a chunk that was never written (reads as the fill value)
_DTYPES = {"float32": np.dtype("<f4"), "bool": np.dtype("bool")}


def _fill(meta: dict) -> Any:
    v = meta.get("fill_value")
    if isinstance(v, str):
        return {"NaN": np.nan, "Infinity": np.inf, "-Infinity": -np.inf}.get(v, np.nan)
    return v


def _decompressor(meta: dict) -> Callable | None:
    """``decompress(src, dest)`` for one inner chunk if ``meta`` is the contract's layout, else None (use zarr)."""
    try:
        if meta.get("data_type") not in _DTYPES or meta["chunk_key_encoding"] != {
                "name": "default", "configuration": {"separator": "/"}}:
            return None
        (codec,) = meta["codecs"]
        if codec["name"] != "sharding_indexed":
            return None
        cfg = codec["configuration"]
        inner = [c["name"] for c in cfg["codecs"]]
        if len(inner) != 2 or inner[0] != "bytes" or \
                cfg["codecs"][0].get("configuration", {}).get("endian", "little") != "little":
            return None
        if [c["name"] for c in cfg["index_codecs"]] != ["bytes", "crc32c"] or cfg.get("index_location", "end") != "end":
            return None
        shape = meta["shape"]
        shard = meta["chunk_grid"]["configuration"]["chunk_shape"]
        chunk = cfg["chunk_shape"]
        if len(shape) != 4 or shard != [1, *shape[1:]] or chunk != [1, 1, *shape[2:]]:
            return None
        if inner[1] == "zstd":
            import numcodecs.zstd

            return numcodecs.zstd.decompress
        if inner[1] == "blosc":  # self-describing frames: shuffle and cname are read from each chunk's header
            import numcodecs.blosc

            # blosc's own threads only oversubscribe: DataLoader worker processes are the parallelism
            numcodecs.blosc.use_threads = False
            return numcodecs.blosc.decompress
        return None
    except (KeyError, TypeError, ValueError):
        return None


class _VolumeArray:
    """One (pair, z, y, x) array of the store: single slices and whole volumes as numpy."""

    def __init__(self, fs, root: str, name: str, meta: dict, zarr_array_factory: Callable[[], Any],
                 local: bool, index_cache: int = 4096):
        self.fs, self.root, self.name, self.meta, self.local = fs, root, name, meta, local
        self.shape = tuple(meta["shape"])
        self.dtype = _DTYPES.get(meta.get("data_type"))
        self.fill = _fill(meta)
        self._decompress = _decompressor(meta)
        self.fast = self._decompress is not None
        self._zarr_factory = zarr_array_factory
        self._zarr = None
        self._index: OrderedDict[int, np.ndarray] = OrderedDict()
        self._fds: OrderedDict[str, int] = OrderedDict()  # open shard files (local stores)
        self._index_cache = index_cache
        self._nidx = self.shape[1] * 16 + 4

    def _path(self, p: int) -> str:
        return f"{self.root}/{self.name}/c/{p}/0/0/0"

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            self._fds[path] = fd
            if len(self._fds) > 64:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(path)
        return fd

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def _read(self, path: str, start: int, length: int) -> bytes:
        if self.local:
            fd = self._fd(path)
            if start < 0:
                start = os.fstat(fd).st_size + start
            return os.pread(fd, length, start)
        if start < 0:
            return self.fs.cat_file(path, start=start)
        return self.fs.cat_file(path, start=start, end=start + length)

    def _shard_index(self, p: int) -> np.ndarray | None:
        idx = self._index.get(p)
        if idx is not None:
            self._index.move_to_end(p)
            return idx
        try:
            tail = self._read(self._path(p), -self._nidx, self._nidx)
        except FileNotFoundError:
            return None  # shard never written: all fill
        return self._set_index(p, tail)

    def _set_index(self, p: int, tail: bytes) -> np.ndarray:
        import google_crc32c

        if len(tail) != self._nidx or np.uint32(google_crc32c.value(tail[:-4])).tobytes() != tail[-4:]:
            raise OSError(f"{self.name}: shard index of pair {p} is corrupt (crc32c mismatch)")
        idx = np.frombuffer(tail[:-4], dtype="<u8").reshape(self.shape[1], 2)
        self._index[p] = idx
        if len(self._index) > self._index_cache:
            self._index.popitem(last=False)
        return idx

    def _zarr_array(self):
        if self._zarr is None:
            self._zarr = self._zarr_factory()
        return self._zarr

    def slice(self, p: int, z: int) -> np.ndarray:
        if not self.fast:
            return np.array(self._zarr_array()[p, z], dtype=self.dtype)
        loc = self.locate(p, z)
        return self.decode(self._read(self._path(p), *loc) if loc else None)

    def locate(self, p: int, z: int) -> tuple[int, int] | None:
        """(offset, nbytes) of slice z of pair p inside its shard, None if never written (fill value)."""
        idx = self._shard_index(p)
        if idx is None or int(idx[z, 0]) == _EMPTY:
            return None
        return int(idx[z, 0]), int(idx[z, 1])

    def decode(self, blob) -> np.ndarray:
        out = np.empty(self.shape[2:], dtype=self.dtype)
        if blob is None:
            out.fill(self.fill)
        else:
            self._decompress(blob, out)
        return out

    def volume(self, p: int) -> np.ndarray:
        if not self.fast:
            return np.array(self._zarr_array()[p], dtype=self.dtype)
        out = np.empty(self.shape[1:], dtype=self.dtype)
        try:
            if self.local:
                with open(self._path(p), "rb") as fh:
                    blob = fh.read()
            else:
                blob = self.fs.cat_file(self._path(p))
        except FileNotFoundError:
            out.fill(self.fill)
            return out
        import google_crc32c

        tail = blob[-self._nidx:]
        if np.uint32(google_crc32c.value(tail[:-4])).tobytes() != tail[-4:]:
            raise OSError(f"{self.name}: shard index of pair {p} is corrupt (crc32c mismatch)")
        idx = np.frombuffer(tail[:-4], dtype="<u8").reshape(self.shape[1], 2)
        view = memoryview(blob)
        for z in range(self.shape[1]):
            off, nbytes = int(idx[z, 0]), int(idx[z, 1])
            if off == _EMPTY:
                out[z].fill(self.fill)
            else:
                self._decompress(view[off:off + nbytes], out[z])
        return out


class _Store:
    """Per-process handle: filesystem, the store's metadata, and the volume arrays."""

    def __init__(self, url: str, storage_options: dict | None):
        from .io import Location

        loc = Location.of(url, storage_options)
        self.url = url
        self.local = loc.is_local
        if self.local:
            self.fs, self.root = None, loc.local_path
        else:
            self.fs, self.root = loc.fs, loc.path.rstrip("/")
        self.storage_options = storage_options
        self.pid = os.getpid()
        self._arrays: dict[str, _VolumeArray] = {}
        self._consolidated = None

    def _json(self, rel: str) -> dict:
        path = f"{self.root}/{rel}"
        if self.local:
            with open(path, "rb") as fh:
                return json.loads(fh.read())
        return json.loads(self.fs.cat_file(path))

    def root_meta(self) -> dict:
        return self._json("zarr.json")

    def array_meta(self, name: str) -> dict:
        # consolidated metadata holds every array's zarr.json: one read for all (matters on object storage)
        if self._consolidated is None:
            cm = self.root_meta().get("consolidated_metadata") or {}
            self._consolidated = cm.get("metadata") or {}
        return self._consolidated.get(name) or self._json(f"{name}/zarr.json")

    def zarr_array(self, name: str):
        import warnings

        import zarr

        from .store import zarr_store

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return zarr.open_array(zarr_store(self.url, self.storage_options, read_only=True), path=name, mode="r")

    def close(self) -> None:
        for a in self._arrays.values():
            a.close()

    def slices(self, names: tuple[str, ...], p: int, z: int) -> list[np.ndarray]:
        """Slice z of pair p of several arrays; on object storage the ranged reads go out concurrently."""
        arrays = [self.array(n) for n in names]
        if self.local or not all(a.fast for a in arrays):
            return [a.slice(p, z) for a in arrays]
        missing = [a for a in arrays if p not in a._index]
        if len(missing) > 1:  # fetch uncached shard indexes together
            tails = self.fs.cat_ranges([a._path(p) for a in missing], [-a._nidx for a in missing],
                                       [None] * len(missing), on_error="return")
            for a, tail in zip(missing, tails):
                if isinstance(tail, FileNotFoundError):
                    continue  # never written: reads as the fill value
                if isinstance(tail, Exception):
                    raise tail
                a._set_index(p, tail)
        locs = [a.locate(p, z) for a in arrays]
        want = [(a, loc) for a, loc in zip(arrays, locs) if loc]
        blobs = self.fs.cat_ranges([a._path(p) for a, _ in want], [off for _, (off, _) in want],
                                   [off + nb for _, (off, nb) in want]) if want else []
        got = {id(a): b for (a, _), b in zip(want, blobs)}
        return [a.decode(got.get(id(a))) for a in arrays]

    def array(self, name: str) -> _VolumeArray:
        a = self._arrays.get(name)
        if a is None:
            a = _VolumeArray(self.fs, self.root, name, self.array_meta(name), lambda: self.zarr_array(name),
                             self.local)
            self._arrays[name] = a
        return a


class _PairsBase:
    """Selection shared by the 2D and 3D datasets: status == "ok" pairs of one split (or all with split=None)."""

    def __init__(self, url: str, split: str | None = "train", transform: Callable | None = None,
                 storage_options: dict | None = None):
        self.url = url
        self.split = split
        self.transform = transform
        self.storage_options = dict(storage_options or {})
        self._store: _Store | None = None
        meta = self._load_pair_table()
        keep = meta["status"] == "ok"
        if split is not None:
            keep &= meta["split"] == split
        self.pair_indices = np.flatnonzero(keep).astype(np.int64)
        self.pair_ids = [meta["pair"][i] for i in self.pair_indices]
        self._ct_bounds = np.stack([meta["ct_lo"], meta["ct_hi"]], axis=1) if len(meta["status"]) else np.zeros((0, 2))
        self._slice_ok = meta["slice_ok"]
        n_pending = int((meta["status"] == "pending").sum())
        if not len(self.pair_indices) and n_pending:
            log.warning("%s: no finished pairs for split %r; %d pairs are pending (run not finalized?)",
                        url, split, n_pending)

    def _load_pair_table(self) -> dict[str, np.ndarray]:
        """The per-pair variables, read once through zarr (small: one value per pair plus slice_ok)."""
        import warnings

        import zarr

        from .store import zarr_store

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = zarr.open_group(zarr_store(self.url, self.storage_options, read_only=True), mode="r")
            n = g["status"].shape[0]
            out = {}
            for name in ("status", "split", "pair"):
                out[name] = np.array([str(v) for v in g[name][:]] if n else [], dtype=object)
            for name in ("ct_lo", "ct_hi"):
                out[name] = np.asarray(g[name][:], dtype=np.float64) if n else np.zeros(0)
            out["slice_ok"] = np.asarray(g["slice_ok"][:], dtype=bool) if n else np.zeros((0, 0), bool)
        return out

    def _handle(self) -> _Store:
        store = self._store
        if store is None or store.pid != os.getpid():  # new, unpickled, or inherited through fork
            store = self._store = _Store(self.url, self.storage_options)
        return store

    def close(self) -> None:
        """Close open shard files (local stores); the dataset reopens them on the next read."""
        if self._store is not None and self._store.pid == os.getpid():
            self._store.close()
        self._store = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_store"] = None
        return state

    def ct_bounds(self, pair_index: int) -> tuple[float, float]:
        """(ct_lo, ct_hi) of a store pair index, for :func:`ct_to_hu`."""
        lo, hi = self._ct_bounds[pair_index]
        return float(lo), float(hi)


class SlicePairs(_PairsBase):
    """Random-access (mr_slice, ct_slice) float32 (y, x) pairs over ``slice_ok`` slices of ok pairs of a split.

    Meant for a finished store: the sample list and shard indexes are read once (``close()`` to drop them).

    ``with_valid=True`` adds the slice's ``valid`` mask as a third element. ``transform(mr, ct[, valid])``, if
    given, is applied to each sample and its result returned.
    """

    def __init__(self, url: str, split: str | None = "train", transform: Callable | None = None,
                 storage_options: dict | None = None, with_valid: bool = False):
        super().__init__(url, split, transform, storage_options)
        self.with_valid = with_valid
        rows = [(p, z) for p in self.pair_indices for z in np.flatnonzero(self._slice_ok[p])]
        self.index = np.array(rows, dtype=np.int64).reshape(-1, 2)  # (pair index in the store, z)

    def __len__(self) -> int:
        return len(self.index)

    def locate(self, i: int) -> tuple[int, int]:
        """(store pair index, z) of sample ``i``."""
        p, z = self.index[i]
        return int(p), int(z)

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} slice pairs")
        p, z = (int(v) for v in self.index[i])
        h = self._handle()
        names = ("mr", "ct", "valid") if self.with_valid else ("mr", "ct")
        sample = h.slices(names, p, z)
        return self.transform(*sample) if self.transform is not None else tuple(sample)


class VolumePairs(_PairsBase):
    """Per pair (mr, ct, valid) volumes (z, y, x) of ok pairs of a split, for 3D training."""

    def __len__(self) -> int:
        return len(self.pair_indices)

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"pair {i} out of range for {len(self)} pairs")
        p = int(self.pair_indices[i])
        h = self._handle()
        sample = (h.array("mr").volume(p), h.array("ct").volume(p), h.array("valid").volume(p))
        return self.transform(*sample) if self.transform is not None else sample
