"""The training loader: which slices it yields, bit-exact content, pickling, real torch DataLoader workers.

Every slice the tests write carries its own identity in two voxels (pair, z, split), so what the loader
returns is checked against what was written, not against the loader's own bookkeeping.
"""

from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest
import SimpleITK as sitk

from mrict_dask import store
from mrict_dask.config import Config
from mrict_dask.loader import SlicePairs, VolumePairs, ct_to_hu
from mrict_dask.template import Template
from mrict_dask.types import QA_KEYS, PairResult, PairSpec

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
    return PairResult(pair_id=p.pair_id, status="ok", mr=mr, ct=ct, valid=rng.random(SHAPE) > 0.2, slice_ok=slice_ok,
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
    store.open_or_create_store(url, pairs, tiny_template(), Config())
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


def test_corrupt_shard_index_is_an_error_not_garbage(tmp_path):
    url = str(tmp_path / "s.zarr")
    pairs = pairs_for(3)
    store.open_or_create_store(url, pairs, tiny_template(), Config())
    for p in pairs:
        store.write_pair(url, p.index, tagged_result(p))
    store.finalize_store(url)
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
