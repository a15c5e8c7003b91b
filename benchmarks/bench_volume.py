"""Series -> volume: our read_volume beside dcm2niix on the same series of a synthetic corpus, one core each.

    python benchmarks/bench_volume.py --patients 40              # generate the seed-size corpus (~16k files)
    python benchmarks/bench_volume.py --corpus DIR [--catalog CATALOG.parquet]

Every usable stack of the corpus (as the plan sees it: T1c, T2, FLAIR, CT) is assembled by
``read_volume`` (pixels in memory), by ``read_volume`` + writing an uncompressed NIfTI, and by the dcm2niix
binary (``-z n -b n``, one process per series, given a folder holding exactly that stack's files). The page
cache is warmed first; everything runs pinned to CPU 0. A sample of series is checked for agreement (geometry
and voxels) between the two tools. Runs are interleaved and repeated (``--repeat``), the best of each
shown. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import SimpleITK as sitk

from mrict_dask.config import PlanConfig
from mrict_dask.stacks import stacks_from_catalog
from mrict_dask.volume import read_volume


def usable_stacks(catalog) -> list:
    out = []
    for _, rows in catalog[catalog["series_uid"].notna() & (catalog["series_uid"] != "")].groupby("series_uid"):
        out.extend(s for s in stacks_from_catalog(rows, PlanConfig()) if s.usable)
    return out


def time_ours(stacks, write_dir: str | None) -> float:
    t = time.perf_counter()
    for i, st in enumerate(stacks):
        img = read_volume(st.urls)
        if write_dir:
            sitk.WriteImage(img, os.path.join(write_dir, f"{i}.nii"), useCompression=False)
    return time.perf_counter() - t


def time_dcm2niix(stacks, work: str) -> float:
    src_dirs = []
    for i, st in enumerate(stacks):  # a folder with exactly this stack's files (symlinks: no copy)
        d = os.path.join(work, "src", str(i))
        os.makedirs(d)
        for k, u in enumerate(st.urls):
            os.symlink(u, os.path.join(d, f"{k:05d}.dcm"))
        src_dirs.append(d)
    t = time.perf_counter()
    for i, d in enumerate(src_dirs):
        out = os.path.join(work, "out", str(i))
        os.makedirs(out)
        subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-f", "vol", "-o", out, d], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def agree(stacks, work: str, sample: int) -> tuple[int, int]:
    ok = 0
    idx = np.linspace(0, len(stacks) - 1, min(sample, len(stacks))).astype(int)
    for i in idx:
        niis = glob.glob(os.path.join(work, "out", str(i), "*.nii"))
        if len(niis) != 1:
            continue
        ours = read_volume(stacks[i].urls)
        ref = sitk.ReadImage(niis[0], sitk.sitkFloat32)
        rs = sitk.Resample(ref, ours, sitk.Transform(), sitk.sitkNearestNeighbor, -99999.0, sitk.sitkFloat32)
        a, b = sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(rs)
        # dcm2niix keeps raw padding (-3024 HU); we write air there: compare where neither is padding/air-fill
        mask = (b != -99999.0) & (a != -1000.0) & (b > -3000)
        if sorted(ours.GetSize()) == sorted(ref.GetSize()) and mask.mean() > 0.5 and np.array_equal(a[mask], b[mask]):
            ok += 1
    return ok, len(idx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=8, help="patients to generate when --corpus is not given")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", default=None, help="an existing corpus folder")
    ap.add_argument("--catalog", default=None, help="its catalog (Parquet), to skip the scan")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the generated corpus and outputs")
    ap.add_argument("--sample", type=int, default=6, help="series checked for agreement with dcm2niix")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved repeats; the best time of each is shown")
    args = ap.parse_args()

    if shutil.which("dcm2niix") is None:
        sys.exit("dcm2niix is not installed (apt-get install dcm2niix)")
    work = args.workdir or tempfile.mkdtemp(prefix="bench-volume-")
    os.makedirs(work, exist_ok=True)
    try:
        import pandas as pd

        corpus = args.corpus
        if corpus is None:
            from mrict_dask.synth import generate_corpus

            corpus = os.path.join(work, "corpus")
            t = time.perf_counter()
            s = generate_corpus(corpus, patients=args.patients, seed=args.seed,
                                manifest_url=os.path.join(work, "manifest.json"))
            print(f"generated {s.n_files} files in {time.perf_counter() - t:.0f} s")
        if args.catalog:
            catalog = pd.read_parquet(args.catalog)
        else:
            from mrict_dask.scan import scan

            catalog = scan(corpus)
        stacks = usable_stacks(catalog)
        n_files = sum(len(s.urls) for s in stacks)
        total_bytes = sum(os.path.getsize(u) for s in stacks for u in s.urls)
        for s in stacks:  # warm the page cache for both tools
            for u in s.urls:
                with open(u, "rb") as fh:
                    fh.read()
        os.sched_setaffinity(0, {0})
        # interleaved repeats, best of each: the machine may be shared
        t_ours, t_ours_w, t_d2n = [], [], []
        for r in range(args.repeat):
            t_ours.append(time_ours(stacks, None))
            nii_dir = os.path.join(work, f"ours-nii-{r}")
            os.makedirs(nii_dir)
            t_ours_w.append(time_ours(stacks, nii_dir))
            shutil.rmtree(os.path.join(work, "d2n"), ignore_errors=True)
            t_d2n.append(time_dcm2niix(stacks, os.path.join(work, "d2n")))
            shutil.rmtree(nii_dir, ignore_errors=True)
        t_ours, t_ours_w, t_d2n = min(t_ours), min(t_ours_w), min(t_d2n)
        ok, n_checked = agree(stacks, os.path.join(work, "d2n"), args.sample)

        print(f"\ncorpus: {corpus}  ({len(stacks)} usable series, {n_files} files, {total_bytes / 1e9:.2f} GB); "
              f"one core (CPU 0), warm page cache")
        print(f"{'tool':34s} {'seconds':>9s} {'series/s':>9s} {'files/s':>9s} {'x dcm2niix':>11s}")
        for name, sec in (("read_volume (in memory)", t_ours), ("read_volume + write .nii", t_ours_w),
                          ("dcm2niix -z n -b n", t_d2n)):
            print(f"{name:34s} {sec:9.1f} {len(stacks) / sec:9.2f} {n_files / sec:9.0f} {sec / t_d2n:11.2f}")
        print(f"\nagreement with dcm2niix (geometry and voxels, outside CT padding): {ok}/{n_checked} series")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
