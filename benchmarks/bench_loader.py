"""Random single slice-pair reads/s: the Zarr store (local, local S3 endpoint) vs a monolithic float32 .npy.

Content is realistic and compressible, as the pipeline writes it: the MNI152 template moved by a small random
affine, with a bias field and noise, percentile-normalized MR (background clipped to 0); CT synthesized in HU
(brain from the T1, a skull shell, noisy air), stored as int16 HU like DICOM, resampled by a rigid transform and
normalized through the fixed [-1024, 3071] HU window; outside the CT field of view air.

    python benchmarks/bench_loader.py [--pairs 6] [--reads 3000] [--s3-reads 300] [--workdir DIR]

The read loops run pinned to one core. The S3 endpoint is moto's standalone server on 127.0.0.1 (a separate
process, on the other core). Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
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
from mrict_dask.config import Config
from mrict_dask.loader import SlicePairs
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
                      mr_lo=float(lo), mr_hi=float(hi), ct_lo=WINDOW[0], ct_hi=WINDOW[1],
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


def _rate(fn, picks) -> tuple[float, float]:
    """(slice pairs per wall second, per CPU second of this process): the machine may be shared."""
    fn(*picks[0])  # warm: opens handles, first index reads
    t0, c0 = time.perf_counter(), time.process_time()
    for p, z in picks:
        fn(p, z)
    return len(picks) / (time.perf_counter() - t0), len(picks) / max(time.process_time() - c0, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--reads", type=int, default=3000)
    ap.add_argument("--s3-reads", type=int, default=300)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="bench-loader-")
    os.makedirs(work, exist_ok=True)
    url = os.path.join(work, "store.zarr")
    shutil.rmtree(url, ignore_errors=True)
    template = load_template()
    z, y, x = template.shape_zyx
    pairs = [PairSpec(index=i, pair_id=f"P{i:016x}-bench", patient=f"P{i:016x}", split="train", days_apart=0,
                      mr_files=(), ct_files=()) for i in range(args.pairs)]
    store.open_or_create_store(url, pairs, template, Config())
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

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core for every read loop
    sp = SlicePairs(url, split="train")
    rng = np.random.default_rng(1)
    picks = [tuple(int(v) for v in sp.index[i]) for i in rng.integers(0, len(sp), args.reads)]
    pos = {tuple(int(v) for v in row): i for i, row in enumerate(sp.index)}
    rows = []

    rows.append(("zarr store, local (SlicePairs)", _rate(lambda p, zz: sp[pos[(p, zz)]], picks), args.reads))
    mm_mr = np.load(os.path.join(work, "mr.npy"), mmap_mode="r")
    mm_ct = np.load(os.path.join(work, "ct.npy"), mmap_mode="r")
    rows.append((".npy, np.load(mmap_mode='r')", _rate(lambda p, zz: (np.array(mm_mr[p, zz]), np.array(mm_ct[p, zz])),
                                                         picks), args.reads))
    t0 = time.perf_counter()
    full_mr = np.load(os.path.join(work, "mr.npy"))
    full_ct = np.load(os.path.join(work, "ct.npy"))
    t_load = time.perf_counter() - t0
    rows.append((f".npy, np.load() whole (+{t_load:.1f} s load, {npy_bytes / 2**30:.2f} GiB RAM)",
                 _rate(lambda p, zz: (full_mr[p, zz].copy(), full_ct[p, zz].copy()), picks), args.reads))
    full_mr = full_ct = None  # free the RAM copies before the S3 rows
    # bit-exact spot check against the .npy
    for p, zz in picks[:50]:
        a, b = sp[pos[(p, zz)]]
        assert a.tobytes() == mm_mr[p, zz].tobytes() and b.tobytes() == mm_ct[p, zz].tobytes()

    from mrict_dask.testing import moto_server, s3_options

    with moto_server() as endpoint:
        import s3fs

        so = s3_options(endpoint)
        fs = s3fs.S3FileSystem(**so)
        fs.mkdir("bench")
        t0 = time.perf_counter()
        fs.put(url.rstrip("/") + "/", "bench/store.zarr/", recursive=True)
        t_up = time.perf_counter() - t0
        s3url = "s3://bench/store.zarr"
        sps = SlicePairs(s3url, split="train", storage_options=so)
        s3picks = picks[: args.s3_reads]
        rows.append((f"zarr store, local S3 endpoint (upload {t_up:.1f} s)",
                     _rate(lambda p, zz: sps[pos[(p, zz)]], s3picks), len(s3picks)))
        fs.put(os.path.join(work, "mr.npy"), "bench/mr.npy")
        fs.put(os.path.join(work, "ct.npy"), "bench/ct.npy")
        hdr = {}
        for name in ("mr", "ct"):
            with fs.open(f"bench/{name}.npy", "rb") as fh:
                np.lib.format.read_magic(fh)
                np.lib.format.read_array_header_1_0(fh)
                hdr[name] = fh.tell()
        nslice = y * x * 4

        def npy_s3(p, zz):
            off = ((p * z) + zz) * nslice
            return tuple(np.frombuffer(fs.cat_file(f"bench/{n}.npy", start=hdr[n] + off, end=hdr[n] + off + nslice),
                                       "<f4").reshape(y, x) for n in ("mr", "ct"))

        rows.append((".npy on local S3, one ranged GET per slice", _rate(npy_s3, s3picks), len(s3picks)))
        t0 = time.perf_counter()
        fs.cat_file("bench/mr.npy")
        fs.cat_file("bench/ct.npy")
        t_dl = time.perf_counter() - t0

    print()
    print(f"{'reader':<62}{'pairs/s wall':>13}{'pairs/CPU-s':>13}{'reads':>7}")
    for name, (rate, cpu_rate), n in rows:
        print(f"{name:<62}{rate:>13,.0f}{cpu_rate:>13,.0f}{n:>7}")
    print(f"(.npy from S3 needs the whole file for np.load: {npy_bytes / 2**20:.0f} MiB downloaded in {t_dl:.1f} s)")
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
