"""Export and evaluate at the default 1 mm grid: seconds per pair per worker (export) and per core (evaluate).

A store of realistic 1 mm pairs on the MNI152 grid (197x233x189), made as benchmarks/bench_loader.py makes them (the
template moved, a bias field, noise; CT in HU with skull, scalp and air), with the contract's ``head`` mask added
(the head inside the field of view), so the metric mask is ``head & valid`` as in stores that have it. A few distinct
pairs are synthesized and written under every pair index (content repeats; each case is still read, converted and
written whole).

- export: the whole store, once in this process (one worker) and once on a LocalCluster of ``--workers`` workers;
  s/pair/worker = wall time x workers / pairs.
- evaluate: each case's CT smoothed (sigma 2 mm) as its prediction, scored in this process; s/pair/core, and the
  metrics alone (MAE, PSNR, SSIM, MS-SSIM, MAE by tissue) on arrays already in memory.

    python benchmarks/bench_export.py [--pairs 40] [--distinct 4] [--workers 2] [--workdir DIR]

Targets: export <= 1.5 s per pair per worker; evaluate <= 1 s per pair per core at 1 mm. Prints wall and CPU
seconds beside them and the machine's load average (on a shared machine wall time includes waiting for a core);
asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import SimpleITK as sitk
import zarr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_loader import _load, synth_pair

from mrict_dask import metrics, store
from mrict_dask.cases import export_store
from mrict_dask.config import Config
from mrict_dask.evaluate import evaluate_store
from mrict_dask.orchestrate import ClusterSpec, open_executor
from mrict_dask.template import load_template
from mrict_dask.types import PairSpec

TARGET_EXPORT_S = 1.5
TARGET_EVALUATE_S = 1.0


def build_store(url: str, n: int, distinct: int) -> tuple[float, float]:
    """The store, with a root ``head`` mask: (seconds synthesizing, seconds writing)."""
    template = load_template()
    pairs = [PairSpec(index=i, pair_id=f"P{i:016x}-bench", patient=f"P{i:016x}", split=("train", "val", "test")[i % 3],
                      days_apart=i, mr_files=(), ct_files=()) for i in range(n)]
    store.open_or_create_store(url, pairs, template, Config())
    t0 = time.perf_counter()
    results = [synth_pair(template, k, seed=7) for k in range(distinct)]
    t_synth = time.perf_counter() - t0
    head = sitk.GetArrayFromImage(sitk.BinaryDilate(template.mask, [11, 11, 11])).astype(bool)
    t0 = time.perf_counter()
    for p in pairs:
        r = results[p.index % distinct]
        r.pair_id = p.pair_id
        store.write_pair(url, p.index, r)
    store.finalize_store(url)
    g = zarr.open_group(url, mode="r+", use_consolidated=False)
    z, y, x = template.shape_zyx
    heads = g.create_array("head", shape=(n, z, y, x), dtype=bool, chunks=(1, 1, y, x), shards=(1, z, y, x),
                           fill_value=False, dimension_names=("pair", "z", "y", "x"))
    for i in range(n):
        heads[i] = head & np.asarray(g["valid"][i])
    zarr.consolidate_metadata(url)
    return t_synth, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--distinct", type=int, default=4, help="distinct synthetic pairs (repeated over the indices)")
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster workers for the cluster export")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--reuse-store", action="store_true", help="keep a store an earlier run left in --workdir")
    args = ap.parse_args()
    print(f"machine before: {_load()}")
    work = args.workdir or tempfile.mkdtemp(prefix="bench-export-")
    url = os.path.join(work, "store.zarr")
    if not (args.reuse_store and os.path.exists(url)):
        shutil.rmtree(url, ignore_errors=True)  # (the work folder itself is made by open_or_create_store)
        t_synth, t_write = build_store(url, args.pairs, min(args.distinct, args.pairs))
        print(f"store: {args.pairs} pairs at 1 mm (197x233x189), {args.distinct} distinct: synthesized "
              f"{t_synth:.0f} s, written {t_write:.0f} s")

    rows = []
    out1 = os.path.join(work, "cases-serial")
    shutil.rmtree(out1, ignore_errors=True)
    t0, c0 = time.perf_counter(), time.process_time()
    s = export_store(url, out1)
    t_serial, c_serial = time.perf_counter() - t0, time.process_time() - c0
    assert s.written == args.pairs and not s.failed, s.describe()
    rows.append(("export, 1 worker (this process), wall", t_serial / args.pairs, TARGET_EXPORT_S, "s/pair/worker"))
    rows.append(("  the same, CPU time of this process", c_serial / args.pairs, TARGET_EXPORT_S, "s/pair/worker"))

    out2 = os.path.join(work, "cases-cluster")
    shutil.rmtree(out2, ignore_errors=True)
    with open_executor("dask", ClusterSpec(workers=args.workers)) as ex:
        ex.client.run(lambda: __import__("mrict_dask.cases"))  # workers import the package before the clock starts
        cpu0 = ex.client.run(time.process_time)
        t0 = time.perf_counter()
        s = export_store(url, out2, executor=ex)
        t_cluster = time.perf_counter() - t0
        cpu = sum(ex.client.run(time.process_time).values()) - sum(cpu0.values())
    assert s.written == args.pairs and not s.failed, s.describe()
    rows.append((f"export, LocalCluster of {args.workers} (wall {t_cluster:.1f} s): wall x workers / pairs",
                 t_cluster * args.workers / args.pairs, TARGET_EXPORT_S, "s/pair/worker"))
    rows.append(("  the same, CPU time of the workers", cpu / args.pairs, TARGET_EXPORT_S, "s/pair/worker"))
    t0 = time.perf_counter()
    again = export_store(url, out2)
    rows.append(("export re-run, every case finished", (time.perf_counter() - t0) / args.pairs, None, "s/pair"))
    assert again.skipped == args.pairs

    for ct in glob.glob(os.path.join(out1, "*", "ct.nii.gz")):
        img = sitk.SmoothingRecursiveGaussian(sitk.Cast(sitk.ReadImage(ct), sitk.sitkFloat32), 2.0)
        sitk.WriteImage(img, ct.replace("ct.nii.gz", "sct.nii.gz"))
    t0, c0 = time.perf_counter(), time.process_time()
    ev = evaluate_store(url, out1)
    t_eval, c_eval = time.perf_counter() - t0, time.process_time() - c0
    assert not ev.errors, ev.error_lines()
    rows.append(("evaluate (read store + prediction, all metrics), wall", t_eval / args.pairs, TARGET_EVALUATE_S,
                 "s/pair/core"))
    rows.append(("  the same, CPU time", c_eval / args.pairs, TARGET_EVALUATE_S, "s/pair/core"))

    pid = sorted(p for p in os.listdir(out1) if p.startswith("P"))[0]
    ref = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out1, pid, "ct.nii.gz")))
    pred = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out1, pid, "sct.nii.gz")))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out1, pid, "mask.nii.gz"))).astype(bool)
    times = []
    for _ in range(3):
        c0 = time.process_time()
        metrics.score(ref, pred, mask)
        times.append(time.process_time() - c0)
    rows.append((f"metrics alone, mask {mask.mean():.0%} of the grid (CPU, best of 3)", min(times), None,
                 "s/pair/core"))

    print(f"{'what':<62}{'measured':>10}{'target':>10}  unit")
    for what, value, target, unit in rows:
        print(f"{what:<62}{value:>10.2f}{'<= ' + format(target, '.1f') if target else '':>10}  {unit}")
    print(f"scores of the last run: {ev.table().splitlines()[-1]}")
    print(f"machine after: {_load()}")


if __name__ == "__main__":
    main()
