"""Training-side reading of the store: random (MR, CT) slice pairs, 3D patches and whole volumes, local or remote.

Never imports torch: :class:`SlicePairs`, :class:`VolumePatches` and :class:`VolumePairs` have ``__len__``,
``__getitem__`` and ``__getitems__``, so they work as PyTorch map-style datasets directly (a DataLoader that makes
batches hands a batch's indices to ``__getitems__``), and they pickle without their store handles (each DataLoader
worker process opens its own; a forked worker notices the new process id and reopens too).

Reads skip zarr's per-call machinery (~3 ms a call): the store's layout is fixed by the contract (one axial slice per
inner chunk, one volume per shard, ``bytes`` + ``blosc``/``zstd`` inside a ``sharding_indexed`` codec with its index
at the end), so a slice is one ranged read of a shard plus one decompression. Shard indexes (crc32c-checked) are
cached. Object storage takes tens of milliseconds to start answering any read, small or not, so a batch is read in
about one round trip, not one per sample: the shard indexes the batch still needs go out together, then every slice
of every sample (MR, CT, mask) at once, with byte ranges that touch inside one shard merged into one read. An array
whose metadata is not exactly that layout is read through zarr instead.

``cache_dir`` keeps a local copy of each shard a dataset touches (whole shards, downloaded once, shared by all worker
processes), so epochs after the first read local disk.

``space``: ``"template"`` (the store's root: every pair on the template grid) or ``"native"`` (the group ``native``:
each pair in its MR's own patient frame, on one box size; ``affine(pair)`` maps a voxel index to the MR's LPS mm).
``masks``: which masks follow MR and CT in each sample, in order: ``"valid"`` (both had data), ``"head"``,
``"face"`` (what defacing emptied), and ``"loss"`` = head & valid, the mask losses and metrics are meant for
(``valid`` in stores written before head masks).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import operator
import os
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from .normalize import ct_to_hu  # noqa: F401  (re-exported: training code maps CT back to HU from here)

log = logging.getLogger(__name__)

_EMPTY = 2**64 - 1  # sharding index entry of a chunk that was never written (reads as the fill value)
_DTYPES = {"float32": np.dtype("<f4"), "bool": np.dtype("bool")}
# A batch's reads go out at once; botocore's default pool (10 connections) would queue them in waves of ten.
S3_CONNECTIONS = 64

Read = tuple[str, int, int | None]  # (key below the store root, start, end): start < 0 reads the last -start bytes
ShardIndex = list[tuple[int, int]]  # per z: (offset, length) of the slice's chunk in its shard; offset _EMPTY: none


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


def plan_reads(reads: Sequence[Read]) -> tuple[list[Read], list[tuple[int, int, int | None]]]:
    """Merge byte ranges of one object that touch or overlap into one read (a 3D patch's slices lie end to end).

    Returns the reads to make and, for each read asked for, ``(which of them, offset in it, length)``; a length of
    None stands for the whole answer (suffix and to-the-end reads are never merged).
    """
    merged: list[Read] = []
    where: list[tuple[int, int, int | None] | None] = [None] * len(reads)
    ranged = sorted((i for i, (_, s, e) in enumerate(reads) if s >= 0 and e is not None),
                    key=lambda i: (reads[i][0], reads[i][1]))
    for i in ranged:
        key, start, end = reads[i]
        last = merged[-1] if merged else None
        if last is not None and last[0] == key and start <= last[2]:
            merged[-1] = (key, last[1], max(last[2], end))
        else:
            merged.append((key, start, end))
        where[i] = (len(merged) - 1, start - merged[-1][1], end - start)
    for i, r in enumerate(reads):
        if where[i] is None:
            merged.append(r)
            where[i] = (len(merged) - 1, 0, None)
    return merged, where  # type: ignore[return-value]


def patch_corner(grid_zyx: Sequence[int], patch_zyx: Sequence[int], slice_ok: np.ndarray,
                 rng: np.random.Generator) -> tuple[int, int, int]:
    """Lower (z, y, x) corner of a random patch that fits in the grid, centred in z on a ``slice_ok`` slice.

    Informative slices hold enough brain with both images present; a pair without any gets a uniform z.
    """
    (nz, ny, nx), (dz, dy, dx) = grid_zyx, patch_zyx
    ok = np.flatnonzero(slice_ok)
    zc = int(rng.choice(ok)) if ok.size else int(rng.integers(nz))
    z0 = min(max(zc - dz // 2, 0), nz - dz)
    return z0, int(rng.integers(ny - dy + 1)), int(rng.integers(nx - dx + 1))


# ----------------------------------------------------------------------------------------------- byte sources
class _LocalFiles:
    """Reads from files below a local folder; keeps the most recently used shards open."""

    def __init__(self, root: str, max_open: int = 64):
        self.root = root
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._max_open = max_open
        # descriptors close with the dataset that dropped this reader, not only with the process
        self._finalizer = weakref.finalize(self, _close_fds, self._fds)

    def _fd(self, key: str) -> int:
        fd = self._fds.get(key)
        if fd is None:
            fd = os.open(f"{self.root}/{key}", os.O_RDONLY)
            self._fds[key] = fd
            if len(self._fds) > self._max_open:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(key)
        return fd

    def read(self, reads: Sequence[Read]) -> Iterator[bytes | Exception]:
        """Each read as it is made: lazily, so the caller decodes one before the next is read (cache-warm)."""
        for key, start, end in reads:
            try:
                fd = self._fd(key)
                lo, hi = start, end
                if lo < 0 or hi is None:
                    size = os.fstat(fd).st_size
                    lo, hi = (max(size + lo, 0), size) if lo < 0 else (lo, size)
                yield os.pread(fd, hi - lo, lo)
            except OSError as exc:  # FileNotFoundError above all: a shard never written
                yield exc

    def is_open(self, key: str) -> bool:
        return key in self._fds

    def forget(self, key: str) -> None:
        """Close ``key``'s descriptor, if open (its file is about to be replaced)."""
        fd = self._fds.pop(key, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        _close_fds(self._fds)


def _close_fds(fds: OrderedDict[str, int]) -> None:
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.popitem()[1])


class _Objects:
    """Reads from an fsspec filesystem (object storage): all reads of one call go out concurrently."""

    def __init__(self, fs, root: str):
        self.fs, self.root = fs, root

    def read(self, reads: Sequence[Read]) -> Iterable[bytes | Exception]:
        if not reads:
            return []
        return self.fs.cat_ranges([f"{self.root}/{k}" for k, _, _ in reads], [s for _, s, _ in reads],
                                  [e for _, _, e in reads], on_error="return")

    def close(self) -> None:
        pass


class _ShardCache:
    """Whole objects copied once to a local folder, then read from there.

    Each download lands under a unique temporary name and is renamed into place, so the DataLoader's worker
    processes can share one folder: a reader sees a complete copy or none (two workers may both download a
    shard once; the second rename replaces identical bytes). A copy deleted meanwhile is downloaded again; one
    that fails its checks (a shard index whose crc32c does not match) is replaced once by :meth:`refresh`.
    """

    def __init__(self, objects: _Objects, folder: str, place: Callable[[str], str] | None = None):
        self.objects, self.folder = objects, folder
        self.files = _LocalFiles(folder)
        self.place = place or (lambda key: key)  # object key -> path of its copy below the folder

    def _local(self, key: str) -> str:
        return os.path.join(self.folder, self.place(key))

    def _download(self, keys: Sequence[str]) -> None:
        """Copy objects here, all at once, each under a unique temporary name renamed into place when complete."""
        tmp = [f"{self._local(k)}.{uuid.uuid4().hex}.part" for k in keys]
        for t in tmp:
            os.makedirs(os.path.dirname(t), exist_ok=True)
        try:
            self.objects.fs.get([f"{self.objects.root}/{k}" for k in keys], tmp)
            for k, t in zip(keys, tmp):
                with open(t, "rb+") as fh:  # on disk before it has its name: a crash leaves no torn copy
                    os.fsync(fh.fileno())
                self.files.forget(self.place(k))
                os.replace(t, self._local(k))
        except FileNotFoundError:
            if len(keys) > 1:  # an object never written (it reads as the fill value): copy the others alone
                for k in keys:
                    self._download([k])
        finally:
            for t in tmp:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(t)

    def _fetch(self, keys: Sequence[str]) -> None:
        missing = sorted(k for k in set(keys)
                         if not self.files.is_open(self.place(k)) and not os.path.exists(self._local(k)))
        if missing:
            self._download(missing)
            log.debug("cached %d shards in %s", len(missing), self.folder)

    def read(self, reads: Sequence[Read]) -> Iterator[bytes | Exception]:
        self._fetch([k for k, _, _ in reads])
        return self.files.read([(self.place(k), start, end) for k, start, end in reads])

    def refresh(self, key: str) -> None:
        """Download ``key`` again over a local copy that failed its checks."""
        log.warning("the cached copy of %s in %s is damaged; downloading it again", key, self.folder)
        self._download([key])

    def close(self) -> None:
        self.files.close()


def _reader_storage_options(url: str, storage_options: dict | None) -> dict:
    """The storage options the datasets read with: on S3, a connection pool as large as a batch's concurrent reads,
    unless the caller chose one (``config_kwargs.max_pool_connections``)."""
    import fsspec.core

    so = dict(storage_options or {})
    if fsspec.core.split_protocol(url)[0] in ("s3", "s3a"):
        so["config_kwargs"] = {"max_pool_connections": S3_CONNECTIONS, **(so.get("config_kwargs") or {})}
    return so


def pair_cache_dir(pair_id: str, digest: str) -> str:
    """The folder of a pair's copies in a shard cache: named by the pair and the digest of its bytes, so a pair
    redone with other bytes never meets its old copies, and a withdrawn pair's copies can be found and deleted."""
    return f"{pair_id}-{digest[:16]}"


def _cache_tag(url: str, attrs: dict, extra: str = "") -> str:
    return hashlib.sha256("\n".join([url, attrs.get("fingerprint", ""), extra]).encode()).hexdigest()[:16]


def _pair_of_key(key: str) -> int:
    """The pair index of a per-pair object key (``mr/c/5/0/0/0``, ``native/mr/c/5/0/0/0``: after ``/c/``)."""
    return int(key.split("/c/", 1)[1].split("/", 1)[0])


def _shard_cache(origin: _Objects, url: str, attrs: dict, cache_dir: str,
                 pair_dirs: dict[int, str] | None) -> _ShardCache:
    """The local copies of a store: one folder per store (its URL and fingerprint), and in it one folder per pair
    and digest of its bytes (the store's versions give them); a store without versions gets one folder per
    ``content_digest`` (a store finalized again with other bytes gets a fresh folder, never the old copies)."""
    root = os.path.abspath(cache_dir)
    if pair_dirs:
        return _ShardCache(origin, os.path.join(root, _cache_tag(url, attrs)),
                           lambda key: os.path.join(pair_dirs[_pair_of_key(key)], key))
    return _ShardCache(origin, os.path.join(root, _cache_tag(url, attrs, attrs.get("content_digest", ""))))


def forget_cached(cache_dir: str, url: str, attrs: dict, pair_ids: Iterable[str]) -> int:
    """Delete the local copies of ``pair_ids`` (withdrawn pairs) from a shard cache folder; the number of folders."""
    import shutil

    folder = os.path.join(os.path.abspath(cache_dir), _cache_tag(url, attrs))
    if not os.path.isdir(folder):
        return 0
    gone = {f"{pid}-" for pid in pair_ids}
    n = 0
    for name in os.listdir(folder):
        if any(name.startswith(g) for g in gone):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
            n += 1
    return n


# ----------------------------------------------------------------------------------------------- arrays
class _VolumeArray:
    """One (pair, z, y, x) array of the store: its layout, shard indexes, and decoding."""

    def __init__(self, name: str, meta: dict, zarr_array_factory: Callable[[], Any], index_cache: int = 4096):
        self.name, self.meta = name, meta
        self.shape = tuple(meta["shape"])
        self.dtype = _DTYPES.get(meta.get("data_type"))
        self.fill = _fill(meta)
        self.decompress = _decompressor(meta)
        self.fast = self.decompress is not None
        self._zarr_factory = zarr_array_factory
        self._zarr = None
        self._index: OrderedDict[int, ShardIndex | None] = OrderedDict()  # None: shard never written
        self._index_cache = index_cache
        self.index_bytes = self.shape[1] * 16 + 4

    def key(self, p: int) -> str:
        return f"{self.name}/c/{p}/0/0/0"

    def cached_index(self, p: int) -> tuple[bool, ShardIndex | None]:
        if p not in self._index:
            return False, None
        self._index.move_to_end(p)
        return True, self._index[p]

    def set_index(self, p: int, tail: bytes | None) -> ShardIndex | None:
        """Parse (crc32c-checked) and cache the index at the end of pair ``p``'s shard; None: never written."""
        idx = None
        if tail is not None:
            import google_crc32c

            tail = bytes(tail[-self.index_bytes:])
            if len(tail) != self.index_bytes or \
                    np.uint32(google_crc32c.value(tail[:-4])).tobytes() != tail[-4:]:
                raise OSError(f"{self.name}: shard index of pair {p} is corrupt (crc32c mismatch)")
            # Python ints: looked up once per slice read, where numpy scalars would cost more than the lookup
            idx = [tuple(row) for row in np.frombuffer(tail[:-4], dtype="<u8").reshape(self.shape[1], 2).tolist()]
        self._index[p] = idx
        if len(self._index) > self._index_cache:
            self._index.popitem(last=False)
        return idx

    def empty(self, nz: int) -> np.ndarray:
        return np.empty((nz, *self.shape[2:]), dtype=self.dtype)

    def zarr_slab(self, p: int, z0: int, z1: int) -> np.ndarray:
        if self._zarr is None:
            self._zarr = self._zarr_factory()
        return np.array(self._zarr[p, z0:z1], dtype=self.dtype)


class _Store:
    """Per-process handle: where the bytes come from, the store's metadata, and the volume arrays."""

    def __init__(self, url: str, storage_options: dict | None, cache_dir: str | None = None,
                 pair_dirs: dict[int, str] | None = None):
        from .io import Location

        self.url = url
        self.storage_options = _reader_storage_options(url, storage_options)
        loc = Location.of(url, self.storage_options)
        self.pid = os.getpid()
        self._arrays: dict[str, _VolumeArray] = {}
        self._root_meta: dict | None = None
        self.origin: _LocalFiles | _Objects = _LocalFiles(loc.local_path) if loc.is_local else \
            _Objects(loc.fs, loc.path.rstrip("/"))
        self.source: _LocalFiles | _Objects | _ShardCache = self.origin
        if cache_dir is not None and isinstance(self.origin, _Objects):
            self.source = _shard_cache(self.origin, url, self.root_meta().get("attributes", {}), cache_dir, pair_dirs)

    def _json(self, rel: str) -> dict:
        (blob,) = self.origin.read([(rel, 0, None)])
        if isinstance(blob, Exception):
            raise blob
        return json.loads(blob)

    def root_meta(self) -> dict:
        if self._root_meta is None:
            self._root_meta = self._json("zarr.json")
        return self._root_meta

    def array_meta(self, name: str) -> dict:
        # consolidated metadata holds every array's zarr.json: one read for all (matters on object storage)
        cm = self.root_meta().get("consolidated_metadata") or {}
        return (cm.get("metadata") or {}).get(name) or self._json(f"{name}/zarr.json")

    def zarr_array(self, name: str):
        import warnings

        import zarr

        from .store import zarr_store

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return zarr.open_array(zarr_store(self.url, self.storage_options, read_only=True), path=name, mode="r")

    def array(self, name: str) -> _VolumeArray:
        a = self._arrays.get(name)
        if a is None:
            a = self._arrays[name] = _VolumeArray(name, self.array_meta(name), lambda: self.zarr_array(name))
        return a

    def close(self) -> None:
        self.source.close()
        self.origin.close()

    def read(self, reads: Sequence[Read]) -> Iterator[tuple[int, bytes | memoryview | Exception]]:
        """``(number of the read, its bytes or error)`` for each read, in the order they arrive.

        Object storage: all in one round trip (ranges of one object that touch merged into one request). Local
        files: each read just before its bytes are used, so they are still in the CPU cache when decoded.
        """
        if len({key for key, _, _ in reads}) == len(reads):  # one read per object: nothing to merge
            yield from enumerate(self.source.read(reads))
            return
        merged, where = plan_reads(reads)
        parts: list[list[tuple[int, int, int | None]]] = [[] for _ in merged]
        for j, (i, offset, length) in enumerate(where):
            parts[i].append((j, offset, length))
        for blob, wanted in zip(self.source.read(merged), parts):
            for j, offset, length in wanted:
                yield j, (blob if length is None or isinstance(blob, Exception)
                          else memoryview(blob)[offset:offset + length])

    def indexes(self, arrays: Sequence[_VolumeArray], pairs: Sequence[int]) -> dict[tuple[str, int], ShardIndex | None]:
        """Shard index of each (array, pair): cached ones, and the others read together."""
        out: dict[tuple[str, int], ShardIndex | None] = {}
        need = []
        for p in dict.fromkeys(pairs):
            for a in arrays:
                known, idx = a.cached_index(p)
                if known:
                    out[a.name, p] = idx
                else:
                    need.append((a, p))
        if need:
            for j, tail in self.read([(a.key(p), -a.index_bytes, None) for a, p in need]):
                a, p = need[j]
                out[a.name, p] = self._set_index(a, p, tail, (a.key(p), -a.index_bytes, None))[0]
        return out

    def _set_index(self, a: _VolumeArray, p: int, blob: bytes | memoryview | Exception,
                   read: Read) -> tuple[ShardIndex, bytes | memoryview]:
        """Pair ``p``'s parsed shard index from ``blob`` (the answer to ``read``: its shard's tail, or the whole
        shard), and the bytes it was parsed from.

        The datasets read only pairs the store lists as ok, whose shards all exist: a missing one is a damaged
        store, never fill values. A cached copy whose index fails its crc32c is downloaded again, once.
        """
        if isinstance(blob, FileNotFoundError):
            raise OSError(f"{a.name}: the shard of pair {p} is missing although the store listed the pair as ok when "
                          "this dataset opened: its patient withdrew since (open the dataset again), or the store "
                          "is damaged (`mrict-dask verify` checks every pair)") from blob
        if isinstance(blob, Exception):
            raise blob
        try:
            return a.set_index(p, blob), blob  # type: ignore[return-value]
        except OSError:
            if not isinstance(self.source, _ShardCache):
                raise
            self.source.refresh(a.key(p))
            (again,) = self.source.read([read])
            if isinstance(again, Exception):
                raise again from None
            return a.set_index(p, again), again  # type: ignore[return-value]

    def slabs(self, names: Sequence[str], items: Sequence[tuple[int, int, int]]) -> list[list[np.ndarray]]:
        """Slices z0..z1-1 of pair p, for each (p, z0, z1) of ``items`` and each array: (z1 - z0, y, x) each."""
        arrays = [self.array(n) for n in names]
        if not all(a.fast for a in arrays):
            return [[a.zarr_slab(p, z0, z1) for a in arrays] for p, z0, z1 in items]
        idx = self.indexes(arrays, [p for p, _, _ in items])
        out, reads, dests = [], [], []
        for p, z0, z1 in items:
            row = []
            for a in arrays:
                buf, ix, key = a.empty(z1 - z0), idx[a.name, p], a.key(p)
                for k, (off, nbytes) in enumerate(ix[z0:z1]):
                    if off == _EMPTY:
                        buf[k] = a.fill
                    else:
                        reads.append((key, off, off + nbytes))
                        dests.append((a, buf[k]))
                row.append(buf)
            out.append(row)
        for j, blob in self.read(reads):
            if isinstance(blob, Exception):
                raise blob
            a, dest = dests[j]
            a.decompress(blob, dest)
        return out

    def volumes(self, names: Sequence[str], pairs: Sequence[int]) -> list[list[np.ndarray]]:
        """Whole (z, y, x) volumes of each array for each pair: one read per shard, all at once."""
        arrays = [self.array(n) for n in names]
        if not all(a.fast for a in arrays):
            return [[a.zarr_slab(p, 0, a.shape[1]) for a in arrays] for p in pairs]
        wanted = [(p, a) for p in pairs for a in arrays]
        vols = [a.empty(a.shape[1]) for _, a in wanted]
        reads: list[Read] = [(a.key(p), 0, None) for p, a in wanted]
        for j, answer in self.read(reads):
            (p, a), vol = wanted[j], vols[j]
            ix, blob = self._set_index(a, p, answer, reads[j])
            for z, (off, nbytes) in enumerate(ix):
                if off == _EMPTY:
                    vol[z] = a.fill
                else:
                    a.decompress(memoryview(blob)[off:off + nbytes], vol[z])
        return [vols[k:k + len(arrays)] for k in range(0, len(vols), len(arrays))]


def read_volumes(url: str, names: Sequence[str], pair: int, storage_options: dict | None = None) -> list[np.ndarray]:
    """Pair ``pair``'s whole (z, y, x) volumes of the (pair, z, y, x) arrays ``names`` (paths below the store root,
    e.g. ``"ct"`` or ``"native/ct"``): one read per shard, all at once, decoded as the datasets decode them."""
    handle = _Store(url, storage_options)
    try:
        return handle.volumes(names, [pair])[0]
    finally:
        handle.close()


# ----------------------------------------------------------------------------------------------- datasets
SPACES = ("template", "native")
MASKS = ("valid", "head", "face", "loss")


class _PairsBase:
    """Selection shared by the datasets: status == "ok" pairs of one split (or all with split=None), of the store's
    latest version or of the pinned ``version``.

    A dataset reads one version of the store from one manifest (:func:`mrict_dask.store.resolve_version`): pairs
    appended, retired or withdrawn after it opened do not change what it serves (a withdrawn pair's bytes are
    deleted, though: reading it fails). ``version_id`` names the version read (None: a store from before
    versions), for a training job to record; a version that held a patient who withdrew since raises
    :class:`~mrict_dask.errors.VersionUnavailable` (one line).
    """

    def __init__(self, url: str, split: str | None = "train", transform: Callable | None = None,
                 storage_options: dict | None = None, cache_dir: str | None = None, with_pair: bool = False,
                 version: int | None = None, space: str = "template", masks: Sequence[str] = ()):
        if space not in SPACES:
            raise ValueError(f"space must be one of {', '.join(SPACES)}, not {space!r}")
        unknown = [m for m in masks if m not in MASKS]
        if unknown:
            raise ValueError(f"unknown mask(s) {', '.join(map(repr, unknown))} (known: {', '.join(MASKS)})")
        self.url = url
        self.split = split
        self.transform = transform
        self.storage_options = dict(storage_options or {})
        self.cache_dir = cache_dir
        self.with_pair = with_pair
        self.version = version
        self.space = space
        self.masks = tuple(masks)
        self._prefix = "native/" if space == "native" else ""
        self._store: _Store | None = None
        meta = self._load_pair_table()
        self.version_id: int | None = meta["version"]
        self._pair_dirs: dict[int, str] | None = meta["pair_dirs"]
        self._has_head = meta["has_head"]
        self._affines = meta["affine"]
        keep = meta["status"] == "ok"
        if split is not None:
            keep &= meta["split"] == split
        self.pair_indices = np.flatnonzero(keep).astype(np.int64)
        self.pair_ids = [meta["pair"][i] for i in self.pair_indices]
        self.grid_zyx: tuple[int, int, int] = meta["grid_zyx"]
        self._ct_bounds = np.stack([meta["ct_lo"], meta["ct_hi"]], axis=1) if len(meta["status"]) else np.zeros((0, 2))
        self._slice_ok = meta["slice_ok"]
        n_pending = int((meta["status"] == "pending").sum())
        if not len(self.pair_indices) and n_pending:
            log.warning("%s: no finished pairs for split %r; %d pairs are pending (run not finalized?)",
                        url, split, n_pending)

    def _load_pair_table(self) -> dict[str, Any]:
        """The per-pair variables, read once through zarr (small: one value per pair plus slice_ok).

        Strings come back as numpy unicode (stores since fixed-width strings) or StringDType (stores written
        before): ``str()`` of each value reads both.
        """
        import warnings

        import zarr

        from .store import resolve_version, zarr_store

        view = resolve_version(self.url, self.version, self.storage_options)
        n = len(view.pairs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = zarr.open_group(zarr_store(self.url, self.storage_options, read_only=True), mode="r")
            if self.space == "native":
                if "native" not in g:
                    raise ValueError(f"{self.url} has no native space (written before mrict-dask store format 2, "
                                     "or with native.enabled off): use space='template'")
                sg = g["native"]
            else:
                sg = g
            out: dict[str, Any] = {"grid_zyx": tuple(int(v) for v in sg["mr"].shape[1:]), "version": view.id,
                                   "has_head": "head" in sg}
            out["status"] = np.array([p.status for p in view.pairs], dtype=object)
            out["split"] = np.array([p.split for p in view.pairs], dtype=object)
            out["pair"] = np.array([p.pair_id for p in view.pairs], dtype=object)
            for name in ("ct_lo", "ct_hi"):
                out[name] = np.asarray(g[name][:n], dtype=np.float64) if n else np.zeros(0)
            out["slice_ok"] = np.asarray(sg["slice_ok"][:n], dtype=bool) if n else np.zeros((0, 0), bool)
            out["affine"] = np.asarray(sg["affine"][:n], dtype=np.float64) if "affine" in sg and n else None
            attrs = dict(g.attrs)
        if not out["has_head"] and any(m in ("head", "face") for m in self.masks):
            raise ValueError(f"{self.url} has no head or face masks (written before mrict-dask store format 2): "
                             "ask for 'valid' or 'loss' (which is valid there)")
        ok = view.ok_pairs()
        out["pair_dirs"] = {p.index: pair_cache_dir(p.pair_id, p.digest) for p in ok} \
            if ok and all(p.digest for p in ok) else None
        withdrawn = [p.pair_id for p in view.pairs if p.status == "withdrawn"]
        if self.cache_dir is not None and withdrawn:
            gone = forget_cached(self.cache_dir, self.url, attrs, withdrawn)
            if gone:
                log.warning("deleted the local copies of %d withdrawn pair(s) from %s", gone, self.cache_dir)
        return out

    def _names(self, with_valid: bool = False) -> tuple[str, ...]:
        """The arrays a sample reads (paths below the store root)."""
        wanted = ["mr", "ct"]
        for m in self.masks + (("valid",) if with_valid else ()):
            wanted += ["valid", "head"] if m == "loss" and self._has_head else ["valid"] if m == "loss" else [m]
        return tuple(self._prefix + n for n in dict.fromkeys(wanted))

    def _arrange(self, names: Sequence[str], arrays: Sequence[np.ndarray], with_valid: bool = False) -> list:
        """MR, CT, then the masks asked for, in their order, from the arrays read for ``names``."""
        got = {n[len(self._prefix):]: a for n, a in zip(names, arrays)}
        out = [got["mr"], got["ct"]]
        for m in (("valid",) if with_valid else ()) + self.masks:
            out.append(got["valid"] & got["head"] if m == "loss" and self._has_head else
                       got["valid"] if m == "loss" else got[m])
        return out

    def affine(self, pair_index: int) -> np.ndarray:
        """Native space: the 4x4 voxel index (x, y, z, 1) -> source MR patient LPS mm of a store pair index."""
        if self._affines is None:
            raise ValueError("affine() is for space='native'; the template space's grid is the store's attrs 'grid'")
        return self._affines[pair_index].copy()

    def _handle(self) -> _Store:
        store = self._store
        if store is None or store.pid != os.getpid():  # new, unpickled, or inherited through fork
            store = self._store = _Store(self.url, self.storage_options, self.cache_dir, self._pair_dirs)
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

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list:
        raise NotImplementedError

    def _checked(self, i: int) -> int:
        i = operator.index(i)  # ints and numpy integers; 1.5 is a TypeError, as for a list
        n = len(self)  # type: ignore[arg-type]
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples of {type(self).__name__}")
        return int(i) % n

    def _sample(self, arrays: Sequence[np.ndarray], p: int):
        items = (*arrays, p) if self.with_pair else tuple(arrays)
        return self.transform(*items) if self.transform is not None else items

    def ct_bounds(self, pair_index: int) -> tuple[float, float]:
        """(ct_lo, ct_hi) of a store pair index, for :func:`ct_to_hu`."""
        lo, hi = self._ct_bounds[pair_index]
        return float(lo), float(hi)


class SlicePairs(_PairsBase):
    """Random-access (mr_slice, ct_slice) float32 (y, x) pairs over ``slice_ok`` slices of ok pairs of a split.

    Meant for a finished store: the sample list and shard indexes are read once (``close()`` to drop them).

    ``with_valid=True`` adds the slice's ``valid`` mask as a third element, ``with_pair=True`` the store pair index
    (an int: ``ct_bounds(pair)`` gives that pair's HU window) last. ``transform(mr, ct[, valid][, pair])``, if
    given, is applied to each sample and its result returned. ``cache_dir``: see the module docstring.

    ``ds[i]`` reads one sample; ``ds.__getitems__(indices)`` (what a batching DataLoader calls) reads a batch
    concurrently and returns the same samples as ``[ds[i] for i in indices]``. ``version``: read that version of
    the store (``ds.version_id`` says which one a dataset reads; see the store's versions).
    """

    def __init__(self, url: str, split: str | None = "train", transform: Callable | None = None,
                 storage_options: dict | None = None, with_valid: bool = False, cache_dir: str | None = None,
                 with_pair: bool = False, version: int | None = None, space: str = "template",
                 masks: Sequence[str] = ()):
        super().__init__(url, split, transform, storage_options, cache_dir, with_pair, version, space, masks)
        self.with_valid = with_valid
        rows = [(int(p), int(z)) for p in self.pair_indices for z in np.flatnonzero(self._slice_ok[p])]
        self.index = np.array(rows, dtype=np.int64).reshape(-1, 2)  # (pair index in the store, z)
        self._rows = rows  # the same as Python ints, for the per-sample lookup

    def __len__(self) -> int:
        return len(self.index)

    def locate(self, i: int) -> tuple[int, int]:
        """(store pair index, z) of sample ``i``."""
        return self._rows[i]

    def __getitems__(self, indices: Sequence[int]) -> list:
        rows = [self.locate(self._checked(i)) for i in indices]
        names = self._names(self.with_valid)
        slabs = self._handle().slabs(names, [(p, z, z + 1) for p, z in rows])
        return [self._sample(self._arrange(names, [s[0] for s in slab], self.with_valid), p)
                for slab, (p, _) in zip(slabs, rows)]


class VolumePairs(_PairsBase):
    """Per pair (mr, ct, valid) volumes (z, y, x) of ok pairs of a split, for 3D training (``masks`` other than
    the default ``("valid",)`` for other masks after MR and CT).

    ``with_pair``, ``transform``, ``space`` and ``cache_dir`` as for :class:`SlicePairs`; ``__getitems__`` reads
    the pairs of a batch concurrently.
    """

    def __init__(self, url: str, split: str | None = "train", transform: Callable | None = None,
                 storage_options: dict | None = None, cache_dir: str | None = None, with_pair: bool = False,
                 version: int | None = None, space: str = "template", masks: Sequence[str] = ("valid",)):
        super().__init__(url, split, transform, storage_options, cache_dir, with_pair, version, space, masks)

    def __len__(self) -> int:
        return len(self.pair_indices)

    def __getitems__(self, indices: Sequence[int]) -> list:
        pairs = [int(self.pair_indices[self._checked(i)]) for i in indices]
        names = self._names()
        vols = self._handle().volumes(names, pairs)
        return [self._sample(self._arrange(names, v), p) for v, p in zip(vols, pairs)]


class VolumePatches(_PairsBase):
    """Random (mr, ct, valid) patches of ``patch_size`` (z, y, x) from the ok pairs of a split, for 3D networks.

    ``patches_per_pair`` samples per pair and epoch: sample ``i`` is a patch of pair ``i // patches_per_pair``
    whose centre slice is informative (``slice_ok``), at a position drawn from ``(seed, epoch, i)``: the same
    index gives the same patch until :meth:`set_epoch` (call it before each epoch, as with a
    ``DistributedSampler``; with ``persistent_workers=True`` the workers keep the epoch they started with).
    The masks (``masks``, default ``("valid",)``) follow MR and CT. Only the slices a patch spans are read (one
    merged read per array on object storage). ``with_pair``, ``transform``, ``space``, ``cache_dir`` as for
    :class:`SlicePairs`.
    """

    def __init__(self, url: str, split: str | None = "train", patch_size: Sequence[int] = (32, 64, 64),
                 patches_per_pair: int = 1, seed: int = 0, transform: Callable | None = None,
                 storage_options: dict | None = None, cache_dir: str | None = None, with_pair: bool = False,
                 version: int | None = None, space: str = "template", masks: Sequence[str] = ("valid",)):
        super().__init__(url, split, transform, storage_options, cache_dir, with_pair, version, space, masks)
        self.patch_size = tuple(int(v) for v in patch_size)
        if len(self.patch_size) != 3 or not all(1 <= d <= g for d, g in zip(self.patch_size, self.grid_zyx)):
            raise ValueError(f"patch_size {self.patch_size} must be 3 sizes (z, y, x), each from 1 to the store's "
                             f"grid {self.grid_zyx}")
        if patches_per_pair < 1:
            raise ValueError(f"patches_per_pair must be at least 1, not {patches_per_pair}")
        self.patches_per_pair = int(patches_per_pair)
        if int(seed) < 0:
            raise ValueError(f"seed must be 0 or more, not {seed}")
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw other patch positions (for the next epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.pair_indices) * self.patches_per_pair

    def locate(self, i: int) -> tuple[int, int, int, int]:
        """(store pair index, z0, y0, x0) of sample ``i``: its pair and the patch's lower corner."""
        i = self._checked(i)
        p = int(self.pair_indices[i // self.patches_per_pair])
        rng = np.random.default_rng([self.seed, self.epoch, i])
        return (p, *patch_corner(self.grid_zyx, self.patch_size, self._slice_ok[p], rng))

    def __getitems__(self, indices: Sequence[int]) -> list:
        corners = [self.locate(i) for i in indices]
        dz, dy, dx = self.patch_size
        names = self._names()
        slabs = self._handle().slabs(names, [(p, z0, z0 + dz) for p, z0, _, _ in corners])
        return [self._sample(self._arrange(names, [np.ascontiguousarray(s[:, y0:y0 + dy, x0:x0 + dx]) for s in slab]),
                             p) for slab, (p, _, y0, x0) in zip(slabs, corners)]
