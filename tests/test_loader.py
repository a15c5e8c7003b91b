"""The training loader: which slices it yields, bit-exact content, pickling, batches read at once (locally and
through a real S3 server behind a latency proxy), the local shard cache, 3D patches, real torch DataLoader
workers, and the README's training example run as written.

Every slice the tests write carries its own identity in two voxels (pair, z, split), so what the loader
returns is checked against what was written, not against the loader's own bookkeeping.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from mrict_dask import store
from mrict_dask.loader import SlicePairs, VolumePairs, VolumePatches, ct_to_hu, patch_corner, plan_reads
from mrict_dask.template import Template
from mrict_dask.types import QA_KEYS, PairResult, PairSpec
from tests.conftest import SMALL_NATIVE, native_arrays, readme_block, upload_tree

SPLITS = ("train", "val", "test")
SHAPE = (9, 11, 13)  # z, y, x


def tiny_template() -> Template:
    x, y, z = SHAPE[::-1]
    img = sitk.GetImageFromArray(np.ones(SHAPE, np.float32))
    img.SetSpacing([1.0, 1.2, 2.0])
    img.SetDirection([-1, 0, 0, 0, -1, 0, 0, 0, 1])
    return Template(image=img, mask=sitk.Cast(img > 0, sitk.sitkUInt8), name="tiny", sha256="0f" * 32)


def pairs_for(n: int) -> list[PairSpec]:
    return [PairSpec(index=i, pair_id=f"P{i:016x}-0001", patient=f"P{i:016x}", split=SPLITS[i % 3], days_apart=i,
                     mr_files=(), ct_files=()) for i in range(n)]


def tagged_result(p: PairSpec, seed: int = 0) -> PairResult:
    """Random volumes whose voxel (z, 0, 0) encodes (pair, z) in MR and the split in CT."""
    rng = np.random.default_rng(seed + p.index)
    mr = rng.random(SHAPE, dtype=np.float32)
    ct = rng.random(SHAPE, dtype=np.float32)
    for z in range(SHAPE[0]):
        mr[z, 0, 0] = (p.index * 256 + z) / 65536
        ct[z, 0, 0] = SPLITS.index(p.split) / 4
    slice_ok = np.zeros(SHAPE[0], bool)
    slice_ok[rng.choice(SHAPE[0], size=1 + p.index % 5, replace=False)] = True
    valid = rng.random(SHAPE) > 0.2
    return PairResult(pair_id=p.pair_id, status="ok", mr=mr, ct=ct, valid=valid, slice_ok=slice_ok,
                      head=valid & (mr > 0.3), face=~valid & (ct > 0.5), native=native_arrays(rng, np.eye(4)),
                      mr_lo=0.0, mr_hi=900.0, ct_lo=-1024.0, ct_hi=3071.0, mr_affine=np.eye(4), ct_affine=np.eye(4),
                      qa=dict.fromkeys(QA_KEYS, 0.5))


def decode(mr: np.ndarray, ct: np.ndarray) -> tuple[int, int, str]:
    code = int(round(float(mr[0, 0]) * 65536))
    return code // 256, code % 256, SPLITS[int(round(float(ct[0, 0]) * 4))]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """9 pairs: 2 fails on a re-run after a good write; 6 never written; 7 written after finalize (still pending)."""
    url = str(tmp_path_factory.mktemp("loader") / "store.zarr")
    pairs = pairs_for(9)
    store.open_or_create_store(url, pairs, tiny_template(), SMALL_NATIVE)
    results = {}
    for p in pairs:
        if p.index in (6, 7):
            continue
        results[p.index] = tagged_result(p)
        store.write_pair(url, p.index, results[p.index])
    store.write_pair(url, 2, PairResult(pair_id=pairs[2].pair_id, status="failed: CT does not cover the brain"))
    del results[2]
    store.finalize_store(url)
    store.write_pair(url, 7, tagged_result(pairs[7]))
    return url, pairs, results


def expected_slices(pairs, results, split) -> set[tuple[int, int]]:
    return {(i, int(z)) for i, r in results.items() if split in (None, pairs[i].split)
            for z in np.flatnonzero(r.slice_ok)}


@pytest.mark.parametrize("split", ["train", "val", "test", None])
def test_only_slice_ok_slices_of_ok_pairs_of_the_split(built, split):
    url, pairs, results = built
    sp = SlicePairs(url, split=split)
    want = expected_slices(pairs, results, split)
    assert len(sp) == len(want)
    got = set()
    for i in range(len(sp)):
        mr, ct = sp[i]
        p, z, s = decode(mr, ct)
        assert split in (None, s) and p not in (2, 6, 7)
        assert mr.tobytes() == results[p].mr[z].tobytes() and ct.tobytes() == results[p].ct[z].tobytes()
        got.add((p, z))
    assert got == want
    with pytest.raises(IndexError):
        sp[len(sp)]
    if len(sp):
        assert np.array_equal(sp[-1][0], sp[len(sp) - 1][0])


def test_volume_pairs(built):
    url, pairs, results = built
    vp = VolumePairs(url, split="val")
    want = sorted(i for i in results if pairs[i].split == "val")
    assert len(vp) == len(want)
    for i in range(len(vp)):
        mr, ct, valid = vp[i]
        p = decode(mr[0], ct[0])[0]
        assert p == want[i] and mr.shape == SHAPE and valid.dtype == bool
        assert mr.tobytes() == results[p].mr.tobytes() and ct.tobytes() == results[p].ct.tobytes()
        assert np.array_equal(valid, results[p].valid)


def test_transform_and_valid_mask(built):
    url, pairs, results = built
    sp = SlicePairs(url, split="train", with_valid=True, transform=lambda mr, ct, valid: (mr * valid, ct.sum()))
    masked, total = sp[0]
    p, z = sp.locate(0)
    r = results[p]
    assert np.array_equal(masked, r.mr[z] * r.valid[z]) and total == pytest.approx(float(r.ct[z].sum()))


def test_zarr_fallback_reads_the_same(built):
    """Arrays not in the contract's exact layout are read through zarr; both paths agree bit for bit."""
    url, pairs, results = built
    fast = SlicePairs(url, split=None)
    slow = SlicePairs(url, split=None)
    for name in ("mr", "ct"):
        slow._handle().array(name).fast = False
    assert fast._handle().array("mr").fast
    for i in range(len(fast)):
        assert all(a.tobytes() == b.tobytes() for a, b in zip(fast[i], slow[i]))
    vslow = VolumePairs(url, split=None)
    for name in ("mr", "ct", "valid"):
        vslow._handle().array(name).fast = False
    assert all(np.array_equal(a, b) for a, b in zip(VolumePairs(url, split=None)[1], vslow[1]))


def test_pickles_without_its_handle(built):
    url, pairs, results = built
    sp = SlicePairs(url, split="test")
    first = sp[0]
    assert sp._store is not None
    clone = pickle.loads(pickle.dumps(sp))
    assert clone._store is None and len(clone) == len(sp)
    assert all(np.array_equal(a, b) for a, b in zip(clone[0], first))


def three_pairs(tmp_path) -> str:
    """A finished local store of three ok pairs."""
    url = str(tmp_path / "s.zarr")
    pairs = pairs_for(3)
    store.open_or_create_store(url, pairs, tiny_template(), SMALL_NATIVE)
    for p in pairs:
        store.write_pair(url, p.index, tagged_result(p))
    store.finalize_store(url)
    return url


def test_corrupt_shard_index_is_an_error_not_garbage(tmp_path):
    url = three_pairs(tmp_path)
    shard = os.path.join(url, "mr", "c", "0", "0", "0", "0")
    with open(shard, "r+b") as fh:  # flip bits inside the shard index (before its crc32c)
        fh.seek(-12, os.SEEK_END)
        block = fh.read(4)
        fh.seek(-12, os.SEEK_END)
        fh.write(bytes(b ^ 0xFF for b in block))
    sp = SlicePairs(url, split="train")
    assert len(sp)
    with pytest.raises(OSError, match="corrupt"):
        sp[0]


def test_ct_to_hu_inverts_the_window():
    lo, hi = -1024.0, 3071.0
    hu = np.arange(-1024, 3072, dtype=np.float64)
    scaled = ((hu - lo) / (hi - lo)).astype(np.float32)
    back = ct_to_hu(scaled, lo, hi)
    assert back.dtype == np.float32
    # float32 carries ~7 significant digits: 4095 HU of range -> < 1e-3 HU error
    assert np.abs(back - hu).max() < 1e-3
    assert ct_to_hu(np.float32(0), lo, hi) == lo and ct_to_hu(np.float32(1), lo, hi) == hi


def test_ct_bounds_come_from_the_store(built):
    url, pairs, results = built
    sp = SlicePairs(url, split="train")
    p, z = sp.locate(0)
    lo, hi = sp.ct_bounds(p)
    assert (lo, hi) == (results[p].ct_lo, results[p].ct_hi)
    assert math.isnan(sp.ct_bounds(2)[0])  # the failed pair has no bounds


# --------------------------------------------------------------------------------------------- torch
def _with_worker(mr, ct):
    import torch.utils.data

    info = torch.utils.data.get_worker_info()
    return mr, ct, -1 if info is None else info.id


@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_torch_dataloader_with_two_workers(built, context):
    import torch
    from torch.utils.data import DataLoader

    url, pairs, results = built
    sp = SlicePairs(url, split=None, transform=_with_worker)
    direct = [sp[i] for i in range(len(sp))]  # the parent has read through its own handle before forking
    loader = DataLoader(sp, batch_size=3, shuffle=False, num_workers=2, multiprocessing_context=context)
    mrs, cts, workers = [], [], set()
    for mr, ct, wid in loader:
        assert isinstance(mr, torch.Tensor) and mr.dtype == torch.float32 and mr.shape[1:] == SHAPE[1:]
        mrs.append(mr.numpy())
        cts.append(ct.numpy())
        workers.update(int(w) for w in wid)
    assert workers == {0, 1}
    mrs, cts = np.concatenate(mrs), np.concatenate(cts)
    assert len(mrs) == len(direct)
    for i, (mr, ct, _) in enumerate(direct):
        assert mrs[i].tobytes() == mr.tobytes() and cts[i].tobytes() == ct.tobytes()


# --------------------------------------------------------------------------------------------- batches
def test_plan_reads_merges_ranges_that_touch_and_gives_each_read_its_bytes():
    rng = np.random.default_rng(0)
    objects = {k: rng.integers(0, 256, 100, dtype=np.uint8).tobytes() for k in ("a", "b")}

    def fetch(key, start, end):  # what a filesystem's cat_file(key, start, end) answers
        data = objects[key]
        return data[start:] if end is None else data[start:end]

    reads = [("a", 10, 25), ("b", 0, 10), ("a", 0, 10), ("a", 20, 30), ("a", 40, 50), ("b", -8, None),
             ("a", 0, None), ("b", 10, 25), ("a", 50, 60), ("b", 30, 31)]
    merged, where = plan_reads(reads)
    assert len(merged) == 6 and set(merged) == {("a", 0, 30), ("a", 40, 60), ("b", 0, 25), ("b", 30, 31),
                                                 ("b", -8, None), ("a", 0, None)}
    got = [fetch(*m) for m in merged]
    for read, (i, offset, length) in zip(reads, where):
        blob = got[i] if length is None else got[i][offset:offset + length]
        assert blob == fetch(*read), read
    assert plan_reads([("a", -4, None)]) == ([("a", -4, None)], [(0, 0, None)])


def test_getitems_returns_what_getitem_returns(built):
    url, pairs, results = built
    sp = SlicePairs(url, split=None, with_valid=True, with_pair=True)
    idx = [int(i) for i in np.random.default_rng(3).integers(-len(sp), len(sp), 40)]  # repeats, negatives
    batch = sp.__getitems__(idx)
    one_by_one = SlicePairs(url, split=None, with_valid=True, with_pair=True)
    assert len(batch) == len(idx)
    for i, (mr, ct, valid, p) in zip(idx, batch):
        single = one_by_one[i]
        assert [a.tobytes() for a in single[:3]] == [mr.tobytes(), ct.tobytes(), valid.tobytes()] and single[3] == p
        dp, z, split = decode(mr, ct)
        assert dp == p and split == pairs[p].split
        assert mr.tobytes() == results[p].mr[z].tobytes() and ct.tobytes() == results[p].ct[z].tobytes()
        assert np.array_equal(valid, results[p].valid[z])
    assert sp.__getitems__([]) == []
    with pytest.raises(IndexError):
        sp.__getitems__([0, len(sp)])


def test_volume_pairs_getitems(built):
    url, pairs, results = built
    vp = VolumePairs(url, split=None, with_pair=True, transform=lambda mr, ct, valid, p: (mr.sum(), ct, valid, p))
    got = vp.__getitems__([2, 0, -1, 2])
    for i, (total, ct, valid, p) in zip([2, 0, -1, 2], got):
        assert p == vp.pair_indices[i] and decode(results[p].mr[0], ct[0])[0] == p
        assert total == results[p].mr.sum(dtype=np.float32) and ct.tobytes() == results[p].ct.tobytes()
        assert np.array_equal(valid, results[p].valid)
        assert vp[i][1].tobytes() == ct.tobytes()


# --------------------------------------------------------------------------------------------- object storage
@pytest.fixture
def on_s3(built, s3):
    """The built store copied to the local S3 server."""
    url, pairs, results = built
    return upload_tree(url, s3, "store.zarr"), pairs, results


def _shard_gets(requests: list) -> list:
    """The proxy's GETs of shards (not of metadata)."""
    return [r for r in requests if r[0] == "GET" and "/c/" in r[1]]


def _slice_gets(requests: list) -> list:
    """GETs of slice data: byte ranges of shards, not the suffix reads of shard indexes."""
    return [r for r in _shard_gets(requests) if r[2].startswith("bytes=") and not r[2].startswith("bytes=-")]


def _index_gets(requests: list) -> list:
    return [r for r in _shard_gets(requests) if r[2].startswith("bytes=-")]


def test_a_batch_goes_out_at_once_on_object_storage(on_s3, s3):
    """Through a proxy holding each answer 300 ms: the batch's shard indexes go out together, then every slice
    (MR and CT) together; the second time the indexes come from the cache. Samples equal the written data and a
    one-at-a-time read."""
    from mrict_dask.testing import latency_proxy, proxy_log, s3_options

    url, pairs, results = on_s3
    with latency_proxy(s3.endpoint, latency_ms=300) as proxy:
        sp = SlicePairs(url, split=None, with_pair=True, storage_options=s3_options(proxy))
        # one slice of each pair: no two reads of a batch touch, so each is one request
        first = {}
        for i in range(len(sp)):
            first.setdefault(sp.locate(i)[0], i)
        idx = list(first.values())
        proxy_log(proxy, reset=True)
        batch = sp.__getitems__(idx)
        log = proxy_log(proxy, reset=True)
        n = len(idx)
        assert len(_index_gets(log["requests"])) == 2 * n and len(_slice_gets(log["requests"])) == 2 * n
        assert log["peak_in_flight"] == 2 * n  # all index reads at once, then all slice reads at once
        again = sp.__getitems__(idx)
        log = proxy_log(proxy, reset=True)
        assert _index_gets(log["requests"]) == [] and len(_slice_gets(log["requests"])) == 2 * n
        single = sp[idx[0]]
        assert proxy_log(proxy)["peak_in_flight"] == 2  # one sample: its MR and CT reads together
    for i, (mr, ct, p), (mr2, ct2, _) in zip(idx, batch, again):
        q, z = sp.locate(i)
        assert p == q and decode(mr, ct)[:2] == (p, z)
        assert mr.tobytes() == mr2.tobytes() == results[p].mr[z].tobytes()
        assert ct.tobytes() == ct2.tobytes() == results[p].ct[z].tobytes()
    assert [a.tobytes() for a in single[:2]] == [batch[0][0].tobytes(), batch[0][1].tobytes()]


def test_shard_cache_serves_later_epochs_without_requests(on_s3, s3, tmp_path):
    """cache_dir: the first pass copies whole shards (one GET each); later passes, in this process or a new one
    (a DataLoader worker), read the local copies and read no shard from object storage."""
    from mrict_dask.testing import latency_proxy, proxy_log, s3_options

    url, pairs, results = on_s3
    cache = tmp_path / "cache"
    with latency_proxy(s3.endpoint, latency_ms=0) as proxy:
        so = s3_options(proxy)
        sp = SlicePairs(url, split=None, with_valid=True, storage_options=so, cache_dir=str(cache))
        vp = VolumePairs(url, split=None, storage_options=so, cache_dir=str(cache))
        proxy_log(proxy, reset=True)
        idx = list(range(len(sp)))
        epoch1 = sp.__getitems__(idx)
        gets = _shard_gets(proxy_log(proxy, reset=True)["requests"])
        n_pairs = len(vp)
        assert len(gets) == 3 * n_pairs and len({r[1] for r in gets}) == 3 * n_pairs  # each shard once
        epoch2 = pickle.loads(pickle.dumps(sp)).__getitems__(idx[::-1])[::-1]
        volumes = vp.__getitems__(list(range(n_pairs)))
        requests = proxy_log(proxy)["requests"]
        # no shard is read again; a new handle (the unpickled copy, the volume dataset) reads the store's zarr.json
        assert _shard_gets(requests) == [] and {r[1].rsplit("/", 1)[-1] for r in requests} <= {"zarr.json"}
    for i, a, b in zip(idx, epoch1, epoch2):
        p, z = sp.locate(i)
        r = results[p]
        assert [x.tobytes() for x in a] == [x.tobytes() for x in b] == [r.mr[z].tobytes(), r.ct[z].tobytes(),
                                                                        r.valid[z].tobytes()]
    for p, (mr, ct, valid) in zip(vp.pair_indices, volumes):
        assert mr.tobytes() == results[p].mr.tobytes() and ct.tobytes() == results[p].ct.tobytes()
        assert np.array_equal(valid, results[p].valid)
    assert not [f for f in cache.rglob("*") if f.name.endswith(".part")]


def test_a_redone_pair_is_never_served_from_an_old_cache(on_s3, s3, tmp_path):
    """A pair rewritten with other bytes and finalized again changes the store's content_digest, so a dataset
    opened afterwards with the same cache_dir reads the new bytes, never the copies the old content left."""
    url, pairs, results = on_s3
    cache = str(tmp_path / "cache")
    before = VolumePairs(url, split=None, storage_options=s3.storage_options, cache_dir=cache)
    p = int(before.pair_indices[0])
    assert before[0][0].tobytes() == results[p].mr.tobytes()  # now cached
    redone = tagged_result(pairs[p], seed=99)
    store.write_pair(url, p, redone, s3.storage_options)
    store.finalize_store(url, s3.storage_options)
    after = VolumePairs(url, split=None, storage_options=s3.storage_options, cache_dir=cache)
    mr, ct, valid = after[0]
    assert mr.tobytes() == redone.mr.tobytes() and ct.tobytes() == redone.ct.tobytes()
    assert mr.tobytes() != results[p].mr.tobytes()


def test_a_damaged_or_deleted_cached_copy_is_downloaded_again(on_s3, s3, tmp_path):
    url, pairs, results = on_s3
    cache = tmp_path / "cache"
    first = SlicePairs(url, split=None, storage_options=s3.storage_options, cache_dir=str(cache))
    want = [[a.tobytes() for a in sample] for sample in first.__getitems__(list(range(len(first))))]
    first.close()
    copies = sorted(f for f in cache.rglob("*") if f.is_file())
    assert copies
    copies[0].write_bytes(b"")  # what a node crash can leave
    copies[1].write_bytes(copies[1].read_bytes()[:-7])  # cut
    shutil.rmtree(copies[2].parent)  # deleted to free space
    again = SlicePairs(url, split=None, storage_options=s3.storage_options, cache_dir=str(cache))
    got = [[a.tobytes() for a in sample] for sample in again.__getitems__(list(range(len(again))))]
    assert got == want


def test_a_missing_shard_of_an_ok_pair_is_an_error_not_fill_values(tmp_path):
    url = three_pairs(tmp_path)
    os.remove(os.path.join(url, "ct", "c", "0", "0", "0", "0"))
    with pytest.raises(OSError, match="shard of pair 0 is missing"):
        SlicePairs(url, split="train")[0]
    with pytest.raises(OSError, match="shard of pair 0 is missing"):
        VolumePairs(url, split="train")[0]


def test_datasets_let_go_of_their_files(built):
    """Open shard files close when a dataset is dropped, not only when the process ends (a validation dataset
    built every epoch must not run the process out of file descriptors)."""
    import gc

    url, _, _ = built
    root = os.path.realpath(url)

    def fds() -> int:  # this process's descriptors open on the store's files (others come and go meanwhile)
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                n += os.readlink(f"/proc/self/fd/{fd}").startswith(root)
        return n

    start = fds()
    for _ in range(5):
        sp = SlicePairs(url, split=None)
        sp.__getitems__(list(range(len(sp))))
        assert fds() > start
        del sp
        gc.collect()
    assert fds() <= start


def test_indices_are_integers_and_seeds_not_negative(built):
    url, _, _ = built
    sp = SlicePairs(url, split=None)
    assert [a.tobytes() for a in sp[np.int64(1)]] == [a.tobytes() for a in sp[1]]
    with pytest.raises(TypeError):
        sp[1.5]
    with pytest.raises(ValueError, match="seed"):
        VolumePatches(url, split=None, patch_size=(2, 2, 2), seed=-1)
    vp = VolumePatches(url, split=None, patch_size=(2, 2, 2))
    assert vp.locate(-1) == vp.locate(len(vp) - 1)


# --------------------------------------------------------------------------------------------- 3D patches
def test_patch_corner_fits_the_grid_and_covers_an_informative_slice():
    rng = np.random.default_rng(0)
    grid = (9, 11, 13)
    for k in range(300):
        patch = (1 + k % 9, 1 + k % 11, 1 + k % 13)
        ok = rng.random(9) < 0.3
        z0, y0, x0 = patch_corner(grid, patch, ok, rng)
        assert 0 <= z0 <= 9 - patch[0] and 0 <= y0 <= 11 - patch[1] and 0 <= x0 <= 13 - patch[2]
        assert not ok.any() or ok[z0:z0 + patch[0]].any()


def test_volume_patches_are_the_written_voxels(built):
    url, pairs, results = built
    vp = VolumePatches(url, split=None, patch_size=(3, 5, 7), patches_per_pair=4, seed=1, with_pair=True)
    assert len(vp) == 4 * len(vp.pair_indices)
    idx = list(range(len(vp)))
    batch = vp.__getitems__(idx)
    for i, (mr, ct, valid, p) in zip(idx, batch):
        q, z0, y0, x0 = vp.locate(i)
        assert q == p == vp.pair_indices[i // 4]
        box = np.s_[z0:z0 + 3, y0:y0 + 5, x0:x0 + 7]
        r = results[p]
        assert mr.shape == ct.shape == valid.shape == (3, 5, 7) and valid.dtype == bool
        assert mr.tobytes() == r.mr[box].tobytes() and ct.tobytes() == r.ct[box].tobytes()
        assert np.array_equal(valid, r.valid[box]) and r.slice_ok[z0:z0 + 3].any()
        assert all(a.tobytes() == b.tobytes() for a, b in zip(vp[i][:3], (mr, ct, valid)))
    same = VolumePatches(url, split=None, patch_size=(3, 5, 7), patches_per_pair=4, seed=1)
    assert [same.locate(i) for i in idx] == [vp.locate(i) for i in idx]
    vp.set_epoch(1)
    assert [vp.locate(i) for i in idx] != [same.locate(i) for i in idx]
    with pytest.raises(ValueError, match="patch_size"):
        VolumePatches(url, split=None, patch_size=(SHAPE[0] + 1, 5, 5))


def test_a_patch_is_one_read_per_array_on_object_storage(on_s3, s3):
    """A patch's slices lie end to end in its shard: one ranged GET per array, whatever the patch depth."""
    from mrict_dask.testing import latency_proxy, proxy_log, s3_options

    url, pairs, results = on_s3
    with latency_proxy(s3.endpoint, latency_ms=0) as proxy:
        vp = VolumePatches(url, split=None, patch_size=(6, 4, 4), storage_options=s3_options(proxy))
        idx = list(range(len(vp)))
        vp.__getitems__(idx)  # shard indexes
        proxy_log(proxy, reset=True)
        batch = vp.__getitems__(idx)
        assert len(_slice_gets(proxy_log(proxy)["requests"])) == 3 * len(idx)
    for i, (mr, ct, valid) in zip(idx, batch):
        p, z0, y0, x0 = vp.locate(i)
        box = np.s_[z0:z0 + 6, y0:y0 + 4, x0:x0 + 4]
        assert mr.tobytes() == results[p].mr[box].tobytes() and ct.tobytes() == results[p].ct[box].tobytes()
        assert np.array_equal(valid, results[p].valid[box])


# --------------------------------------------------------------------------------------------- torch batches
class BatchOnly(SlicePairs):
    """Fails if the DataLoader reads sample by sample instead of asking for whole batches."""

    def __getitem__(self, i):
        raise AssertionError("the DataLoader read one sample at a time")


def test_torch_dataloader_reads_whole_batches_in_workers(built):
    import torch
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    url, pairs, results = built
    sp = BatchOnly(url, split=None, with_valid=True, with_pair=True)
    sampler = BatchSampler(RandomSampler(range(len(sp)), generator=torch.Generator().manual_seed(0)), 4, False)
    batches = list(sampler)
    seen = []
    for idx, (mr, ct, valid, pair) in zip(batches, DataLoader(sp, batch_sampler=batches, num_workers=2), strict=True):
        assert mr.shape == (len(idx), *SHAPE[1:]) and valid.dtype == torch.bool
        for k, i in enumerate(idx):
            p, z = sp.locate(i)
            r = results[p]
            assert int(pair[k]) == p and decode(mr[k].numpy(), ct[k].numpy())[:2] == (p, z)
            assert mr[k].numpy().tobytes() == r.mr[z].tobytes() and ct[k].numpy().tobytes() == r.ct[z].tobytes()
            assert np.array_equal(valid[k].numpy(), r.valid[z])
            seen.append(i)
    assert sorted(seen) == list(range(len(sp)))


# --------------------------------------------------------------------------------------------- README
def _readme_training_example() -> str:
    """The first python block of the README's "Reading the store (training)" section, as written there."""
    return readme_block("Reading the store (training)", "python")


def test_readme_training_example_runs_as_written(built, tmp_path):
    url, pairs, results = built
    shutil.copytree(url, tmp_path / "out" / "store.zarr")
    (tmp_path / "train_example.py").write_text(_readme_training_example())
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "train_example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ok = sorted(i for i in results if pairs[i].split == "train")
    n_slices = sum(int(results[i].native["slice_ok"].sum()) for i in ok)  # the example trains in native space
    assert f"{n_slices} training slices from {len(ok)} pairs" in proc.stdout
    assert re.search(r"MAE [0-9.]+ HU", proc.stdout), proc.stdout


# --------------------------------------------------------------------------------------------- spaces and masks
def test_native_space_and_masks_read_what_was_written(built):
    """space="native" reads the native group; masks come after MR and CT in the order asked, "loss" is
    head & valid; affine(pair) is the pair's native affine; the template space's head and face read too."""
    url, pairs, results = built
    sp = SlicePairs(url, split=None, space="native", masks=("face", "loss", "valid", "head"), with_pair=True)
    assert len(sp) == sum(int(results[i].native["slice_ok"].sum()) for i in results)
    for i in range(len(sp)):
        mr, ct, face, loss, valid, head, p = sp[i]
        z = sp.locate(i)[1]
        nat = results[p].native
        for got, name in ((mr, "mr"), (ct, "ct"), (face, "face"), (valid, "valid"), (head, "head")):
            assert got.tobytes() == nat[name][z].tobytes(), (i, name)
        assert np.array_equal(loss, nat["head"][z] & nat["valid"][z])
        assert np.array_equal(sp.affine(p), nat["affine"])
    vp = VolumePairs(url, split=None, space="native", masks=("loss",))
    for k, p in enumerate(vp.pair_indices):
        mr, ct, loss = vp[k]
        nat = results[int(p)].native
        assert mr.tobytes() == nat["mr"].tobytes() and np.array_equal(loss, nat["head"] & nat["valid"])
    tp = VolumePairs(url, split=None, masks=("head", "face"))
    for k, p in enumerate(tp.pair_indices):
        _, _, head, face = tp[k]
        assert np.array_equal(head, results[int(p)].head) and np.array_equal(face, results[int(p)].face)
    patches = VolumePatches(url, split=None, space="native", patch_size=(2, 3, 3), masks=("loss",))
    assert all(a.shape == (2, 3, 3) for a in patches[0])


def test_a_store_without_native_space_says_so(tmp_path):
    from mrict_dask.config import load_config

    url = str(tmp_path / "template-only.zarr")
    pairs = pairs_for(2)
    store.open_or_create_store(url, pairs, tiny_template(), load_config(None, {"native.enabled": False}))
    r = tagged_result(pairs[0])
    r.native = None
    store.write_pair(url, 0, r)
    store.finalize_store(url)
    with pytest.raises(ValueError, match="no native space"):
        SlicePairs(url, split=None, space="native")
    with pytest.raises(ValueError, match="space must be one of"):
        SlicePairs(url, split=None, space="mni")
    with pytest.raises(ValueError, match="unknown mask"):
        SlicePairs(url, split=None, masks=("brain",))
    assert len(SlicePairs(url, split=None, masks=("loss",))[0]) == 3
