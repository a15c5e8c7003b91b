"""End-to-end benchmark: DICOM -> Zarr with the Dask executor on 1 and 2 workers, beside the serial loop.

Prints pairs/minute, files/s, time by stage, scaling efficiency, Dask overhead against the serial loop, and
the peak resident memory of each worker process.

    python benchmarks/bench_run.py --patients 40            # the seed-size corpus (~16k files)
    python benchmarks/bench_run.py --corpus DIR --keep       # an existing corpus
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_once(corpus: str, out: str, executor: str, workers: int | None) -> dict:
    from distributed import Client, LocalCluster

    from mrict_dask.orchestrate import run_pipeline

    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out + ".work", ignore_errors=True)
    shutil.rmtree(out + "-report", ignore_errors=True)
    peaks: list[float] = []
    t = time.perf_counter()
    if executor == "serial":
        summary = run_pipeline(corpus, out, executor="serial", pseudonym_key="bench")
        peaks = [_peak_rss_mib()]
    else:
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                          memory_limit="8GiB") as cluster, Client(cluster) as client:
            summary = run_pipeline(corpus, out, client=client, pseudonym_key="bench")
            peaks = list(client.run(_peak_rss_mib).values())
    wall = time.perf_counter() - t
    return {"summary": summary, "wall": wall, "peaks": peaks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", default=None, help="an existing corpus (default: generate one)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--modes", default="serial,dask1,dask2")
    args = ap.parse_args()

    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
    work = args.workdir or tempfile.mkdtemp(prefix="bench-run-")
    corpus = args.corpus
    if corpus is None:
        from mrict_dask.synth import generate_corpus

        corpus = os.path.join(work, "dicom")
        if not os.path.exists(corpus + ".manifest.json"):
            t = time.perf_counter()
            s = generate_corpus(corpus, patients=args.patients, seed=args.seed, progress=True)
            print(f"generated {s.n_files} files, {s.n_bytes / 2**20:.0f} MiB in {time.perf_counter() - t:.0f} s")
    n_files = sum(len(f) for _, _, f in os.walk(corpus))

    results = {}
    for mode in args.modes.split(","):
        executor, workers = ("serial", None) if mode == "serial" else ("dask", int(mode.removeprefix("dask")))
        r = run_once(corpus, os.path.join(work, f"store-{mode}.zarr"), executor, workers)
        results[mode] = r
        s = r["summary"]
        print(f"\n[{mode}] {s.describe()}\nwall {r['wall']:.1f} s, peak RSS per process (MiB): "
              + ", ".join(f"{p:.0f}" for p in r["peaks"]))

    print(f"\ncorpus: {n_files} files, {os.cpu_count()} cores")
    print(f"{'mode':8} {'pairs':>5} {'wall s':>8} {'pairs/min':>9} {'files/s':>8} {'scan s':>7} {'plan s':>7} "
          f"{'pairs s':>8} {'peak MiB':>9}")
    for mode, r in results.items():
        s = r["summary"]
        st = s.stage_seconds
        print(f"{mode:8} {s.n_pairs:5d} {r['wall']:8.1f} {60 * s.n_pairs / r['wall']:9.2f} {n_files / r['wall']:8.1f} "
              f"{st.get('scan', 0):7.1f} {st.get('plan', 0):7.1f} {st.get('pairs', 0):8.1f} {max(r['peaks']):9.0f}")
    if "dask1" in results and "dask2" in results:
        print(f"scaling 1 -> 2 workers (pairs stage): "
              f"{results['dask1']['summary'].stage_seconds['pairs'] / results['dask2']['summary'].stage_seconds['pairs']:.2f}x "
              f"(target >= 1.8x)")
    if "dask1" in results and "serial" in results:
        a = results["dask1"]["summary"].stage_seconds["pairs"]
        b = results["serial"]["summary"].stage_seconds["pairs"]
        print(f"Dask overhead on one worker vs the serial loop (pairs stage): {100 * (a - b) / b:+.1f}% (target < 5%)")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
