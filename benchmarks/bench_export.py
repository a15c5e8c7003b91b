"""Export and evaluate at the default 1 mm grids: seconds per pair per worker (export) and per core (evaluate).

A store of realistic 1 mm pairs, written through the store's own API with the default settings (both spaces): in
template space on the MNI152 grid (197x233x189), made as benchmarks/bench_loader.py makes them (the template moved,
a bias field, noise; CT in HU with skull, scalp and air; the metric mask ``head & valid``, a third of the grid); in
native space on the default box (192x240x224 at 1 mm), the same volumes placed in the middle of the box (an
identity-direction grid, as the pipeline's native grids are). A few distinct pairs are synthesized and written under
every pair index (content repeats; each case is still read, converted and written whole).

- export, template space: the whole store, once in this process (one worker) and once on a LocalCluster of
  ``--workers`` workers; s/pair/worker = wall time x workers / pairs. Native space: once in this process.
- evaluate, each space: each case's CT smoothed (sigma 2 mm) as its prediction, scored in this process; s/pair/core,
  and the metrics alone (MAE, PSNR, SSIM, MS-SSIM, MAE by tissue) on arrays already in memory.

    python benchmarks/bench_export.py [--pairs 40] [--distinct 4] [--workers 2] [--workdir DIR] [--reuse-store]

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

import SimpleITK as sitk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np
from bench_loader import WINDOW, _load, synth_pair

from mrict_dask import metrics, store
from mrict_dask.cases import export_store
from mrict_dask.config import load_config
from mrict_dask.evaluate import evaluate_store
from mrict_dask.io import Location
from mrict_dask.native import box_size
from mrict_dask.orchestrate import ClusterSpec, open_executor
from mrict_dask.spaces import has_native
from mrict_dask.template import load_template
from mrict_dask.types import PairResult, PairSpec

TARGET_EXPORT_S = 1.5
TARGET_EVALUATE_S = 1.0


CONFIG = load_config(None, {})  # the defaults: both spaces at 1 mm


def _centred(a: np.ndarray, shape: tuple[int, ...], fill) -> np.ndarray:
    """``a`` cropped or padded (with ``fill``) to ``shape``, centre on centre."""
    out = np.full(shape, fill, dtype=a.dtype)
    src, dst = [], []
    for n, m in zip(a.shape, shape):
        k = min(n, m)
        src.append(slice((n - k) // 2, (n - k) // 2 + k))
        dst.append(slice((m - k) // 2, (m - k) // 2 + k))
    out[tuple(dst)] = a[tuple(src)]
    return out


def with_native(r: PairResult) -> PairResult:
    """The pair's template-space volumes placed in the middle of the native box (1 mm, identity direction)."""
    x, y, z = box_size(CONFIG.native)
    shape = (z, y, x)
    air = np.float32((-1024.0 - WINDOW[0]) / (WINDOW[1] - WINDOW[0]))  # the CT's normalized -1024 HU
    vols = {"mr": _centred(r.mr, shape, np.float32(0)), "ct": _centred(r.ct, shape, air),
            **{k: _centred(getattr(r, k), shape, False) for k in ("valid", "head", "face")}}
    affine = np.eye(4) * CONFIG.native.spacing_mm
    affine[3, 3] = 1.0
    affine[:3, 3] = [-(x - 1) / 2, -(y - 1) / 2 - 20.0, -(z - 1) / 2 - 30.0]
    r.native = {**vols, "slice_ok": (vols["head"] & vols["valid"]).mean(axis=(1, 2)) > 0.05, "affine": affine}
    return r


def build_store(url: str, n: int, distinct: int) -> tuple[float, float]:
    """The store (both spaces): (seconds synthesizing, seconds writing)."""
    template = load_template()
    pairs = [PairSpec(index=i, pair_id=f"P{i:016x}-bench", patient=f"P{i:016x}", split=("train", "val", "test")[i % 3],
                      days_apart=i, mr_files=(), ct_files=()) for i in range(n)]
    store.open_or_create_store(url, pairs, template, CONFIG)
    t0 = time.perf_counter()
    results = [with_native(synth_pair(template, k, seed=7)) for k in range(distinct)]
    t_synth = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in pairs:
        r = results[p.index % distinct]
        r.pair_id = p.pair_id
        store.write_pair(url, p.index, r)
    store.finalize_store(url)
    return t_synth, time.perf_counter() - t0


def _predict(cases: str) -> None:
    """Each case's CT smoothed (sigma 2 mm), written beside it as its prediction."""
    for ct in glob.glob(os.path.join(cases, "*", "ct.nii.gz")):
        img = sitk.SmoothingRecursiveGaussian(sitk.Cast(sitk.ReadImage(ct), sitk.sitkFloat32), 2.0)
        sitk.WriteImage(img, ct.replace("ct.nii.gz", "sct.nii.gz"))


def _export_serial(url: str, out: str, space: str, n: int) -> tuple[float, float]:
    """(wall, CPU) seconds per pair of an export in this process."""
    shutil.rmtree(out, ignore_errors=True)
    t0, c0 = time.perf_counter(), time.process_time()
    s = export_store(url, out, space=space)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert s.written == n and not s.failed, s.describe()
    return wall / n, cpu / n


def _evaluate(url: str, cases: str, space: str, n: int) -> tuple[list[tuple], object]:
    """Rows of an evaluation in this process (wall and CPU seconds per pair, the metrics alone), and the evaluation."""
    _predict(cases)
    t0, c0 = time.perf_counter(), time.process_time()
    ev = evaluate_store(url, cases, space=space)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert not ev.errors, ev.error_lines()
    best, share = _metrics_alone(cases)
    return [(f"evaluate {space} (read store + prediction, all metrics), wall", wall / n, TARGET_EVALUATE_S,
             "s/pair/core"),
            ("  the same, CPU time", cpu / n, TARGET_EVALUATE_S, "s/pair/core"),
            (f"  metrics alone, mask {share:.0%} of the grid (CPU, best of 3)", best, None, "s/pair/core")], ev


def _metrics_alone(cases: str) -> tuple[float, float]:
    """Best of 3 CPU seconds of the metrics on one case's arrays in memory, and the mask's share of the grid."""
    pid = sorted(p for p in os.listdir(cases) if p.startswith("P"))[0]
    ref, pred, mask = (sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(cases, pid, f"{name}.nii.gz")))
                       for name in ("ct", "sct", "mask"))
    mask = mask.astype(bool)
    times = []
    for _ in range(3):
        c0 = time.process_time()
        metrics.score(ref, pred, mask)
        times.append(time.process_time() - c0)
    return min(times), float(mask.mean())


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
    n = args.pairs
    if not (args.reuse_store and os.path.exists(url)):
        shutil.rmtree(url, ignore_errors=True)  # (the work folder itself is made by open_or_create_store)
        t_synth, t_write = build_store(url, n, min(args.distinct, n))
        print(f"store: {n} pairs at 1 mm, template 197x233x189 and native {'x'.join(map(str, box_size(CONFIG.native)))}"
              f", {args.distinct} distinct: synthesized {t_synth:.0f} s, written {t_write:.0f} s")

    rows = []
    out1 = os.path.join(work, "cases-serial")
    wall, cpu = _export_serial(url, out1, "template", n)
    rows.append(("export template, 1 worker (this process), wall", wall, TARGET_EXPORT_S, "s/pair/worker"))
    rows.append(("  the same, CPU time of this process", cpu, TARGET_EXPORT_S, "s/pair/worker"))

    out2 = os.path.join(work, "cases-cluster")
    shutil.rmtree(out2, ignore_errors=True)
    with open_executor("dask", ClusterSpec(workers=args.workers)) as ex:
        ex.client.run(lambda: __import__("mrict_dask.cases"))  # workers import the package before the clock starts
        cpu0 = ex.client.run(time.process_time)
        t0 = time.perf_counter()
        s = export_store(url, out2, space="template", executor=ex)
        t_cluster = time.perf_counter() - t0
        cpu = sum(ex.client.run(time.process_time).values()) - sum(cpu0.values())
    assert s.written == n and not s.failed, s.describe()
    rows.append((f"export template, LocalCluster of {args.workers} (wall {t_cluster:.1f} s): wall x workers / pairs",
                 t_cluster * args.workers / n, TARGET_EXPORT_S, "s/pair/worker"))
    rows.append(("  the same, CPU time of the workers", cpu / n, TARGET_EXPORT_S, "s/pair/worker"))
    t0 = time.perf_counter()
    again = export_store(url, out2, space="template")
    rows.append(("export re-run, every case finished", (time.perf_counter() - t0) / n, None, "s/pair"))
    assert again.skipped == n

    more, ev = _evaluate(url, out1, "template", n)
    rows += more

    if has_native(Location(url)):
        out3 = os.path.join(work, "cases-native")
        wall, cpu = _export_serial(url, out3, "native", n)
        rows.append(("export native, 1 worker (this process), wall", wall, TARGET_EXPORT_S, "s/pair/worker"))
        rows.append(("  the same, CPU time of this process", cpu, TARGET_EXPORT_S, "s/pair/worker"))
        rows += _evaluate(url, out3, "native", n)[0]
    else:
        print("(the reused store has no native space: native rows skipped; run without --reuse-store)")

    print(f"{'what':<66}{'measured':>10}{'target':>10}  unit")
    for what, value, target, unit in rows:
        print(f"{what:<66}{value:>10.2f}{'<= ' + format(target, '.1f') if target else '':>10}  {unit}")
    print(f"scores, template space: {ev.table().splitlines()[-1]}")
    print(f"machine after: {_load()}")


if __name__ == "__main__":
    main()
