"""End-to-end benchmark: DICOM -> Zarr with the Dask executor on 1 and 2 workers, beside the serial loop.

Prints pairs/minute, files/s, time by stage and by step inside the pair task, scaling efficiency, Dask overhead
against the serial loop, the peak resident memory of each worker process, and (``--ceiling-pairs``) the same pure
pair function in 1 and 2 plain processes as a reference for what two processes get on this machine at all.

    python benchmarks/bench_run.py --patients 40            # the seed-size corpus (~16k files)
    python benchmarks/bench_run.py --corpus DIR --keep       # an existing corpus
    python benchmarks/bench_run.py --patients 6 --spaces 4   # the pair task with and without native space and
                                                            # defacing, and the store's bytes per pair per space
"""

from __future__ import annotations

import argparse
import glob
import os
import resource
import shutil
import tempfile
import time


def _peak_rss_mib() -> float:
    """This process's own peak resident memory (VmHWM). Not ru_maxrss: a spawned worker inherits the
    high-water mark of the process that spawned it (Linux keeps it across exec)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_once(corpus: str, out: str, executor: str, workers: int | None, limit: int | None = None) -> dict:
    from mrict_dask.orchestrate import client_for, run_pipeline

    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out + ".work", ignore_errors=True)
    shutil.rmtree(out + "-report", ignore_errors=True)
    peaks: list[float] = []
    t = time.perf_counter()
    if executor == "serial":
        summary = run_pipeline(corpus, out, executor="serial", pseudonym_key="bench", limit=limit)
        peaks = [_peak_rss_mib()]
    else:
        # the cluster `mrict-dask run --workers N` starts (client_for), memory limit raised out of the way
        with client_for(workers=workers, threads_per_worker=1, memory_limit="8GiB") as client:
            summary = run_pipeline(corpus, out, executor=client, pseudonym_key="bench", limit=limit)
            peaks = list(client.run(_peak_rss_mib).values())
    wall = time.perf_counter() - t
    return {"summary": summary, "wall": wall, "peaks": peaks, "steps": _pair_steps(out)}


def _pair_steps(store: str) -> dict[str, float]:
    """Seconds per step summed over the pairs, from the timings in the store's pair markers."""
    import json

    steps: dict[str, float] = {}
    for f in glob.glob(os.path.join(store, "_pairs", "*.json")):
        with open(f) as fh:
            for k, v in json.load(fh).get("timings", {}).items():
                steps[k] = steps.get(k, 0.0) + float(v)
    return steps


# ------------------------------------------------------------------ a reference without Dask
def _pool_init() -> None:
    from mrict_dask.config import Config
    from mrict_dask.orchestrate import tune_malloc
    from mrict_dask.template import template_from_config

    tune_malloc(Config().run.malloc_mmap_threshold_mib)
    template_from_config(Config().grid)  # loaded before the clock matters, as a warm worker has it


def _pool_pair(pair) -> float:
    from mrict_dask.config import Config
    from mrict_dask.pair import process_pair
    from mrict_dask.template import template_from_config

    config = Config()
    t = time.perf_counter()
    process_pair(pair, config, template_from_config(config.grid))
    return time.perf_counter() - t


def ceiling(plan_url: str, n_pairs: int) -> tuple[float, float]:
    """The same pure pair function over the same pairs in 1 and in 2 plain processes (multiprocessing, no
    Dask, no store writes): how far two pair computations scale on this machine at all."""
    import multiprocessing as mp

    from mrict_dask.plan import Plan

    with open(plan_url) as fh:
        pairs = list(Plan.from_json(fh.read()).pairs)[:n_pairs]
    walls = []
    for procs in (1, 2):
        with mp.get_context("spawn").Pool(procs, initializer=_pool_init) as pool:
            pool.map(_pool_pair, pairs[:procs], chunksize=1)  # warm every process
            t = time.perf_counter()
            pool.map(_pool_pair, pairs, chunksize=1)
            walls.append(time.perf_counter() - t)
    return walls[0], walls[1]


def spaces(corpus: str, work: str, n_pairs: int) -> None:
    """The pair task (read, register, resample, normalize, QA) with native space and defacing (the default) and
    without, alternating pair by pair in one warm process; then the bytes a stored pair takes in each space."""
    import statistics

    from mrict_dask.config import Config, load_config
    from mrict_dask.pair import process_pair
    from mrict_dask.plan import Plan
    from mrict_dask.template import template_from_config

    out = os.path.join(work, "store-spaces.zarr")
    r = run_once(corpus, out, "serial", None, n_pairs)
    with open(out + ".work/plan.json") as fh:
        pairs = list(Plan.from_json(fh.read()).pairs)[:n_pairs]
    configs = {"native + defacing": Config(),
               "template only": load_config(None, {"native.enabled": False, "deface.enabled": False})}
    template = template_from_config(Config().grid)
    process_pair(pairs[0], Config(), template)  # warm: template caches, face region
    times: dict[str, list[float]] = {k: [] for k in configs}
    for k, pair in enumerate(pairs):
        order = list(configs) if k % 2 == 0 else list(configs)[::-1]
        for name in order:
            t = time.perf_counter()
            process_pair(pair, configs[name], template)
            times[name].append(time.perf_counter() - t)
    on, off = (statistics.median(times[k]) for k in configs)
    print(f"\npair task over {len(pairs)} pairs, 1 ITK thread (median s/pair): with native space and defacing "
          f"{on:.2f}, template space only {off:.2f}: {on / off:.2f}x (target <= 1.15x); load {os.getloadavg()[0]:.1f}")
    ok = r["summary"].ok
    sizes: dict[str, int] = {"template": 0, "native": 0}
    for root, _, files in os.walk(out):
        rel = os.path.relpath(root, out)
        if "/c" not in "/" + rel.replace(os.sep, "/") + "/":
            continue  # chunk objects only (c/ under each array)
        space = "native" if rel.startswith("native") else "template"
        sizes[space] += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    for space, n in sizes.items():
        print(f"store bytes per ok pair, {space} space (MR, CT, masks, slice_ok): {n / max(ok, 1) / 2**20:.1f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", default=None, help="an existing corpus (default: generate one)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--modes", default="serial,dask1,dask2")
    ap.add_argument("--limit", type=int, default=None, help="only the first N pairs of the plan")
    ap.add_argument("--ceiling-pairs", type=int, default=8,
                    help="pairs for the no-Dask 1 vs 2 process comparison (0: skip)")
    ap.add_argument("--spaces", type=int, default=0,
                    help="only time the pair task with and without native space and defacing over N pairs")
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
    if args.spaces:
        spaces(corpus, work, args.spaces)
        return

    results = {}
    for mode in [m for m in args.modes.split(",") if m]:
        executor, workers = ("serial", None) if mode == "serial" else ("dask", int(mode.removeprefix("dask")))
        r = run_once(corpus, os.path.join(work, f"store-{mode}.zarr"), executor, workers, args.limit)
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
    print("\nseconds per step, summed over pairs (from the pair markers; 'total' = on the worker):")
    for mode, r in results.items():
        print(f"  {mode:8} " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["steps"].items())))
    if "dask1" in results and "dask2" in results:
        pairs_s = {k: results[k]["summary"].stage_seconds["pairs"] for k in ("dask1", "dask2")}
        print(f"scaling 1 -> 2 workers (pairs stage): {pairs_s['dask1'] / pairs_s['dask2']:.2f}x (target >= 1.8x)")
    if "dask1" in results and "serial" in results:
        a = results["dask1"]["summary"].stage_seconds["pairs"]
        b = results["serial"]["summary"].stage_seconds["pairs"]
        print(f"Dask overhead on one worker vs the serial loop (pairs stage): {100 * (a - b) / b:+.1f}% (target < 5%)")
    plans = sorted(glob.glob(os.path.join(work, "store-*.zarr.work", "plan.json")))
    if args.ceiling_pairs > 0 and plans:
        one, two = ceiling(plans[0], args.ceiling_pairs)
        print(f"reference without Dask: the pure pair function over {args.ceiling_pairs} pairs in 1 process "
              f"{one:.1f} s, in 2 processes {two:.1f} s: {one / two:.2f}x")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
