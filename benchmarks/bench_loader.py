"""Random slice-pair reads/s of the training loader: one at a time vs batches, local disk and object storage.

Rows: the Zarr store read locally (one at a time, batches of 32) beside a monolithic float32 .npy; a local S3
server (moto) directly; the same server behind a reverse proxy that holds every answer back 50 ms before its
first byte, as object storage does (one at a time, batches of 32, the local shard cache's first and second
pass, 3D patches); and the S3 server's own ceiling for slice-sized ranged reads, which bounds any reader here.

Content is realistic and compressible, as the pipeline writes it: the MNI152 template moved by a small random
affine, with a bias field and noise, percentile-normalized MR (background clipped to 0); CT synthesized in HU
(brain from the T1, a skull shell, noisy air), stored as int16 HU like DICOM, resampled by a rigid transform and
normalized through the fixed [-1024, 3071] HU window; outside the CT field of view air.

    python benchmarks/bench_loader.py [--pairs 6] [--reads 3000] [--s3-reads 300] [--batches 20] [--latency-ms 50]

Targets (issue 18): through 50 ms latency, batches of 32 >= 3x the pairs/s of one-at-a-time reads (goal 10x),
identical arrays; local random pairs/s one at a time >= 2,500. The read loops run in this process pinned to one
core; the S3 server and the proxy are separate processes started before that (free to run on any core). The
machine's load average is printed before and after. Checks that batches and single reads return identical
arrays (equal to the .npy copy); otherwise prints, and asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import numpy as np
import SimpleITK as sitk

from mrict_dask import store
from mrict_dask.config import load_config
from mrict_dask.loader import SlicePairs, VolumePatches
from mrict_dask.template import load_template
from mrict_dask.types import QA_KEYS, PairResult, PairSpec

WINDOW = (-1024.0, 3071.0)


def _random_affine(rng, rot_deg: float, shift_mm: float, scale: float, center) -> sitk.AffineTransform:
    tx = sitk.AffineTransform(3)
    tx.SetCenter(center)
    a = np.radians(rng.uniform(-rot_deg, rot_deg, 3))
    rz = np.array([[np.cos(a[2]), -np.sin(a[2]), 0], [np.sin(a[2]), np.cos(a[2]), 0], [0, 0, 1]])
    ry = np.array([[np.cos(a[1]), 0, np.sin(a[1])], [0, 1, 0], [-np.sin(a[1]), 0, np.cos(a[1])]])
    rx = np.array([[1, 0, 0], [0, np.cos(a[0]), -np.sin(a[0])], [0, np.sin(a[0]), np.cos(a[0])]])
    m = rz @ ry @ rx @ np.diag(1 + rng.uniform(-scale, scale, 3))
    tx.SetMatrix(m.ravel().tolist())
    tx.SetTranslation(rng.uniform(-shift_mm, shift_mm, 3).tolist())
    return tx


# template space only: what these readers' numbers are about
TEMPLATE_ONLY = load_config(None, {"native.enabled": False})


def synth_pair(template, index: int, seed: int = 0) -> PairResult:
    rng = np.random.default_rng(seed * 100 + index)
    t1 = template.image
    center = t1.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in t1.GetSize()])
    def dilate(r):
        return sitk.GetArrayFromImage(sitk.BinaryDilate(template.mask, [r, r, r])).astype(bool)

    brain = sitk.GetArrayFromImage(template.mask).astype(bool)
    csf, inner, head = dilate(3), dilate(7), dilate(11)
    skull = inner & ~csf
    scalp = head & ~inner
    csf &= ~brain

    # MR: the anatomy moved a little (T1: dark CSF and skull, bright scalp fat), a smooth bias field, noise;
    # magnitude images (Rician-like floor in the air); normalized at its 1/99th percentiles inside the head
    t1a = sitk.GetArrayFromImage(t1)
    anat = np.where(brain, t1a, 0) + 20 * csf + 10 * skull + 150 * scalp
    anat_img = sitk.GetImageFromArray(anat.astype(np.float32))
    anat_img.CopyInformation(t1)
    moved = sitk.GetArrayFromImage(sitk.Resample(anat_img, t1, _random_affine(rng, 3, 3, 0.03, center),
                                                 sitk.sitkLinear, 0))
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in moved.shape], indexing="ij")
    bias = 1 + 0.15 * (rng.uniform(-1, 1) * xx + rng.uniform(-1, 1) * yy + rng.uniform(-1, 1) * zz * xx)
    mr = np.abs(moved * bias + rng.normal(0, 4, moved.shape))
    lo, hi = np.percentile(mr[head], [1, 99])
    mr_n = ((np.clip(mr, lo, hi) - lo) / (hi - lo)).astype(np.float32)

    # CT in HU: brain from the T1 (CSF ~5, GM ~38, WM ~28 HU), skull 700-1500 HU, scalp, noisy air; int16 as in DICOM
    tissue = np.interp(t1a / max(float(t1a.max()), 1), [0, 0.25, 0.6, 1.0], [5, 10, 38, 28])
    hu = np.full(t1a.shape, -1000.0)
    hu[scalp] = -60.0
    hu[csf] = 8.0
    hu[brain] = tissue[brain]
    hu[skull] = rng.uniform(700, 1500) + 200 * rng.standard_normal(skull.sum())
    hu = np.round(hu + rng.normal(0, 8, hu.shape)).astype(np.int16)
    ct_img = sitk.GetImageFromArray(hu)
    ct_img.CopyInformation(t1)
    ct_moved = sitk.Resample(sitk.Cast(ct_img, sitk.sitkFloat32), t1, _random_affine(rng, 4, 4, 0.0, center),
                             sitk.sitkLinear, -1000.0)
    ct_hu = sitk.GetArrayFromImage(ct_moved)
    fov = np.ones(ct_hu.shape, bool)
    fov[: rng.integers(5, 20)] = False  # the CT stack starts above the skull base
    ct_hu[~fov] = -1000.0
    ct_n = ((np.clip(ct_hu.astype(np.float64), *WINDOW) - WINDOW[0]) / (WINDOW[1] - WINDOW[0])).astype(np.float32)
    valid = fov & head
    slice_ok = (brain & valid).sum(axis=(1, 2)) > 0.05 * brain.shape[1] * brain.shape[2]
    return PairResult(pair_id=f"P{index:016x}-bench", status="ok", mr=mr_n, ct=ct_n, valid=valid, slice_ok=slice_ok,
                      head=head, face=np.zeros(head.shape, bool), mr_lo=float(lo), mr_hi=float(hi),
                      ct_lo=WINDOW[0], ct_hi=WINDOW[1],
                      mr_affine=np.eye(4), ct_affine=np.eye(4), qa=dict.fromkeys(QA_KEYS, 0.0))


def _ct_quantization_gain(ct_npy: str) -> tuple[float, float]:
    """Compressed/raw of pair 0's CT as stored, and if normalize rounded CT to integer HU first (same codec)."""
    import numcodecs

    codec = numcodecs.Blosc(cname=store.VOLUME_CODEC["cname"], clevel=store.VOLUME_CODEC["clevel"],
                            shuffle=numcodecs.Blosc.SHUFFLE)
    ct = np.ascontiguousarray(np.load(ct_npy, mmap_mode="r")[0])
    hu = np.round(ct.astype(np.float64) * (WINDOW[1] - WINDOW[0]) + WINDOW[0])
    ct_int = ((hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0])).astype(np.float32)

    def ratio(a):
        return sum(len(codec.encode(a[k])) for k in range(a.shape[0])) / a.nbytes

    return ratio(ct), ratio(ct_int)


def _du(path: str) -> int:
    total = 0
    for d, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(d, f)) for f in files)
    return total


def _rate(read, batches: list[list[int]]) -> tuple[float, float, int]:
    """(slice pairs per wall second, per CPU second of this process, samples read) for ``read(batch)`` over
    ``batches``; the first batch warms up (handles, shard indexes) and is not timed. The machine may be shared."""
    read(batches[0])
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for b in batches[1:]:
        read(b)
        n += len(b)
    return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9), n


def _one_at_a_time(ds):
    return lambda batch: [ds[i] for i in batch]


def _batched(ds):
    return ds.__getitems__


def _chunks(picks: list[int], size: int, count: int) -> list[list[int]]:
    """``count`` + 1 batches of ``size`` picks (the first for warming up)."""
    return [picks[k * size:(k + 1) * size] for k in range(count + 1)]


def _check_identical(ds, batches: list[list[int]], mm_mr, mm_ct) -> int:
    """Batches and single reads give the same bytes, equal to the .npy copy; returns the samples compared."""
    n = 0
    for b in batches:
        for i, (mr, ct), (mr1, ct1) in zip(b, ds.__getitems__(b), [ds[i] for i in b]):
            p, zz = ds.locate(i)
            assert mr.tobytes() == mr1.tobytes() == mm_mr[p, zz].tobytes(), (i, p, zz)
            assert ct.tobytes() == ct1.tobytes() == mm_ct[p, zz].tobytes(), (i, p, zz)
            n += 1
    return n


def _server_ceiling(fs, root: str, sp, batches: list[list[int]]) -> float:
    """Ranged GETs/s the S3 server itself answers for the MR and CT slices of ``batches``, each batch's reads at
    once, straight to the server (no proxy) and without decoding: a bound for any reader on this machine."""
    h = sp._handle()
    groups = []
    for b in batches:
        reads = []
        for i in b:
            p, zz = sp.locate(i)
            for name in ("mr", "ct"):
                a = h.array(name)
                off, nbytes = a.cached_index(p)[1][zz]
                reads.append((f"{root}/{a.key(p)}", off, off + nbytes))
        groups.append([list(column) for column in zip(*reads)])
    t0 = time.perf_counter()
    for g in groups:
        fs.cat_ranges(*g)
    return sum(len(g[0]) for g in groups) / (time.perf_counter() - t0)


def _load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg()) + f" on {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--reads", type=int, default=3000, help="local reads per row")
    ap.add_argument("--s3-reads", type=int, default=300, help="one-at-a-time reads per object storage row")
    ap.add_argument("--batches", type=int, default=20, help="batches per object storage row")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"machine before: {_load()}")

    work = args.workdir or tempfile.mkdtemp(prefix="bench-loader-")
    os.makedirs(work, exist_ok=True)
    url = os.path.join(work, "store.zarr")
    shutil.rmtree(url, ignore_errors=True)
    template = load_template()
    z, y, x = template.shape_zyx
    pairs = [PairSpec(index=i, pair_id=f"P{i:016x}-bench", patient=f"P{i:016x}", split="train", days_apart=0,
                      mr_files=(), ct_files=()) for i in range(args.pairs)]
    store.open_or_create_store(url, pairs, template, TEMPLATE_ONLY)
    mr_npy = np.lib.format.open_memmap(os.path.join(work, "mr.npy"), "w+", np.float32, (args.pairs, z, y, x))
    ct_npy = np.lib.format.open_memmap(os.path.join(work, "ct.npy"), "w+", np.float32, (args.pairs, z, y, x))
    t_synth = t_write = 0.0
    for p in pairs:
        t0 = time.perf_counter()
        r = synth_pair(template, p.index, args.seed)
        t_synth += time.perf_counter() - t0
        t0 = time.perf_counter()
        store.write_pair(url, p.index, r)
        t_write += time.perf_counter() - t0
        mr_npy[p.index], ct_npy[p.index] = r.mr, r.ct
    mr_npy.flush()
    ct_npy.flush()
    del mr_npy, ct_npy
    store.finalize_store(url)
    print(f"{args.pairs} pairs on the {x}x{y}x{z} grid: synthesized in {t_synth:.1f} s, "
          f"store writes {t_write / args.pairs:.2f} s/pair (incl. checksums)")

    ct_ratio, ct_int_ratio = _ct_quantization_gain(os.path.join(work, "ct.npy"))
    npy_bytes = sum(os.path.getsize(os.path.join(work, f)) for f in ("mr.npy", "ct.npy"))
    store_bytes = _du(url)
    per_var = {v: _du(os.path.join(url, v)) for v in ("mr", "ct", "valid", "slice_ok")}

    from mrict_dask.testing import latency_proxy, moto_server, s3_options

    bs, rows = args.batch_size, []
    with contextlib.ExitStack() as servers:
        import s3fs

        endpoint = servers.enter_context(moto_server())
        proxy = servers.enter_context(latency_proxy(endpoint, args.latency_ms))
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core for every read loop

        sp = SlicePairs(url, split="train")
        rng = np.random.default_rng(1)
        picks = [int(i) for i in rng.integers(0, len(sp), max(args.reads, (args.batches + 1) * bs) + bs)]
        local_batches = _chunks(picks, bs, args.reads // bs)
        rows.append(("zarr store, local, one at a time (ds[i])",
                     _rate(_one_at_a_time(sp), [picks[:1]] + [picks[k:k + 1] for k in range(1, args.reads + 1)])))
        rows.append((f"zarr store, local, batches of {bs} (__getitems__)", _rate(_batched(sp), local_batches)))
        mm_mr = np.load(os.path.join(work, "mr.npy"), mmap_mode="r")
        mm_ct = np.load(os.path.join(work, "ct.npy"), mmap_mode="r")
        locs = [sp.locate(i) for i in picks]

        def npy_reader(mr_arr, ct_arr):
            return lambda batch: [(np.array(mr_arr[locs[k][0], locs[k][1]]), np.array(ct_arr[locs[k][0], locs[k][1]]))
                                  for k in batch]

        positions = [[k] for k in range(args.reads + 1)]
        rows.append((".npy, np.load(mmap_mode='r'), one at a time", _rate(npy_reader(mm_mr, mm_ct), positions)))
        t0 = time.perf_counter()
        full_mr = np.load(os.path.join(work, "mr.npy"))
        full_ct = np.load(os.path.join(work, "ct.npy"))
        t_load = time.perf_counter() - t0
        rows.append((f".npy, np.load() whole (+{t_load:.1f} s load, {npy_bytes / 2**30:.2f} GiB RAM)",
                     _rate(npy_reader(full_mr, full_ct), positions)))
        full_mr = full_ct = None  # free the RAM copies before the S3 rows
        compared = _check_identical(sp, local_batches[:8], mm_mr, mm_ct)

        fs = s3fs.S3FileSystem(**s3_options(endpoint))
        fs.mkdir("bench")
        t0 = time.perf_counter()
        fs.put(url.rstrip("/") + "/", "bench/store.zarr/", recursive=True)
        t_up = time.perf_counter() - t0
        s3url = "s3://bench/store.zarr"
        s3_batches = _chunks(picks, bs, args.batches)
        one_batches = [[i] for i in picks[:args.s3_reads + 1]]
        direct = SlicePairs(s3url, split="train", storage_options=s3_options(endpoint))
        rows.append((f"local S3 (upload {t_up:.1f} s), one at a time", _rate(_one_at_a_time(direct), one_batches)))
        rows.append((f"local S3, batches of {bs}", _rate(_batched(direct), s3_batches)))

        lat = f"local S3 + {args.latency_ms:.0f} ms"
        slow = SlicePairs(s3url, split="train", storage_options=s3_options(proxy))
        one_rate = _rate(_one_at_a_time(slow), one_batches)
        rows.append((f"{lat}, one at a time", one_rate))
        batch_rate = _rate(_batched(slow), s3_batches)
        rows.append((f"{lat}, batches of {bs}", batch_rate))
        ceiling = _server_ceiling(fs, "bench/store.zarr", slow, s3_batches[1:])  # right after, the same reads
        compared_s3 = _check_identical(slow, s3_batches[:4], mm_mr, mm_ct)
        cache = tempfile.mkdtemp(prefix="cache-", dir=work)
        cached = SlicePairs(s3url, split="train", storage_options=s3_options(proxy), cache_dir=cache)
        t0 = time.perf_counter()
        cached.__getitems__(s3_batches[0])
        t_first = time.perf_counter() - t0
        rows.append((f"{lat}, batches of {bs}, cache_dir (copied on batch 1: {t_first:.1f} s)",
                     _rate(_batched(cached), s3_batches)))
        compared_s3 += _check_identical(cached, s3_batches[:4], mm_mr, mm_ct)
        patch = (32, 96, 96)
        vp = VolumePatches(s3url, split="train", patch_size=patch, patches_per_pair=64,
                           storage_options=s3_options(proxy))
        patch_batches = _chunks([int(i) for i in rng.permutation(len(vp))], 4, args.batches // 2)
        patch_rate = _rate(_batched(vp), patch_batches)
        shutil.rmtree(cache, ignore_errors=True)

        t0 = time.perf_counter()
        fs.cat_file("bench/store.zarr/mr/c/0/0/0/0")
        t_shard = time.perf_counter() - t0

    print()
    print(f"{'reader':<66}{'pairs/s wall':>13}{'pairs/CPU-s':>13}{'pairs':>7}")
    for name, (rate, cpu_rate, n) in rows:
        print(f"{name:<66}{rate:>13,.0f}{cpu_rate:>13,.0f}{n:>7}")
    print(f"{f'{lat}, 3D patches {patch[0]}x{patch[1]}x{patch[2]}, batches of 4':<66}{patch_rate[0]:>13,.1f}"
          f"{patch_rate[1]:>13,.1f}{patch_rate[2]:>7}   (patches, not pairs)")
    print(f"local S3 server's own ceiling: {ceiling:,.0f} ranged GETs/s for the same slices, {2 * bs} at once, "
          f"no proxy = {ceiling / 2:,.0f} pairs/s (MR + CT); "
          f"a whole {per_var['mr'] / args.pairs / 2**20:.0f} MiB MR shard: {t_shard:.2f} s")
    print()
    speedup = batch_rate[0] / one_rate[0]
    print(f"{lat}: batches of {bs} / one at a time = {speedup:.1f}x   (target >= 3x, goal 10x: "
          f"{'met' if speedup >= 10 else 'target met, goal not' if speedup >= 3 else 'NOT met'}); batches reach "
          f"{batch_rate[0] / (ceiling / 2):.0%} of the server's ceiling")
    local_rate = rows[0][1][0]
    print(f"local, one at a time: {local_rate:,.0f} pairs/s   "
          f"(target >= 2,500: {'met' if local_rate >= 2500 else 'NOT met'})")
    print(f"identical arrays (batches = one at a time = .npy): {compared} local and {compared_s3} S3 samples, "
          "all equal")
    print(f"machine after: {_load()}")
    print()
    print(f"{'size on disk':<30}{'MiB':>10}{'x .npy':>10}")
    print(f"{'float32 .npy (mr + ct)':<30}{npy_bytes / 2**20:>10.1f}{1.0:>10.2f}")
    print(f"{'zarr store (all variables)':<30}{store_bytes / 2**20:>10.1f}{store_bytes / npy_bytes:>10.2f}")
    for v, b in per_var.items():
        print(f"{'  ' + v:<30}{b / 2**20:>10.1f}{b / npy_bytes:>10.3f}")
    print(f"{'  ct if rounded to integer HU':<30}{ct_int_ratio * per_var['ct'] / ct_ratio / 2**20:>10.1f}"
          f"{ct_int_ratio * per_var['ct'] / ct_ratio / npy_bytes:>10.3f}   (estimate: same codec, pair 0)")
    print(f"\nworkdir: {work}")


if __name__ == "__main__":
    main()
