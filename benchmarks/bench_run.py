"""End-to-end benchmark: DICOM -> Zarr with the Dask executor on 1 and 2 workers, beside the serial loop.

Prints pairs/minute, files/s, time by stage and by step inside the pair task, scaling efficiency, Dask overhead
against the serial loop, the peak resident memory of each worker process, and (``--ceiling-pairs``) the same pure
pair function in 1 and 2 plain processes as a reference for what two processes get on this machine at all.

    python benchmarks/bench_run.py --patients 40            # the seed-size corpus (~16k files)
    python benchmarks/bench_run.py --corpus DIR --keep       # an existing corpus
    python benchmarks/bench_run.py --patients 6 --spaces 4   # the pair task with and without native space and
                                                            # defacing, and the store's bytes per pair per space
    python benchmarks/bench_run.py --grow --patients 40      # a store grown by 10 % more patients

``--grow``: a store made from ``--patients`` patients is grown by ``--grow-percent`` more (copied into the same input
folder, the same work area). Prints the grown run's wall time against the new pairs' registration floor (the pure
pair function over exactly the new pairs, in this process, no Dask, no store; target <= 1.2x), and the bytes of the
old pairs' objects that the grown run wrote (modification time or content changed; target 0).
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
               "native, no defacing": load_config(None, {"deface.enabled": False}),
               "template only": load_config(None, {"native.enabled": False, "deface.enabled": False})}
    template = template_from_config(Config().grid)
    process_pair(pairs[0], Config(), template)  # warm: template caches, face region
    times: dict[str, list[float]] = {k: [] for k in configs}
    for k, pair in enumerate(pairs):
        order = list(configs) if k % 2 == 0 else list(configs)[::-1]  # no order favoured
        for name in order:
            t = time.perf_counter()
            process_pair(pair, configs[name], template)
            times[name].append(time.perf_counter() - t)
    on, bare, off = (statistics.median(times[k]) for k in configs)
    # defacing's own cost, pair by pair (the two runs of a pair differ only in it)
    deface = statistics.median(a - b for a, b in zip(times["native + defacing"], times["native, no defacing"]))
    print(f"\npair task over {len(pairs)} pairs, 1 ITK thread (median s/pair): with native space and defacing "
          f"{on:.2f}, native space without defacing {bare:.2f}, template space only {off:.2f}: "
          f"{on / off:.2f}x (target <= 1.15x); load {os.getloadavg()[0]:.1f}")
    print(f"defacing, median over pairs of (with - without): {deface:.2f} s/pair (target <= 0.5)")
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


# ------------------------------------------------------------------ growth
def _link_patients(corpus: str, patients: list[str], into: str) -> None:
    """Hard links of the patients' files (the same bytes, no copy) below ``into``."""
    for name in patients:
        for d, _, files in os.walk(os.path.join(corpus, name)):
            target = os.path.join(into, os.path.relpath(d, corpus))
            os.makedirs(target, exist_ok=True)
            for f in files:
                os.link(os.path.join(d, f), os.path.join(target, f))


def _old_objects(store: str) -> dict[str, tuple[int, int, str]]:
    """(size, mtime_ns, sha256) of every object of every pair the store holds: its per-pair variables' objects
    (the store's registry), its marker and its figure."""
    import hashlib

    from mrict_dask.io import Location
    from mrict_dask.store import _pair_keys, pair_table

    loc = Location(store)
    out = {}
    for i in range(len(pair_table(store, ("pair",))["pair"])):
        for key in [*_pair_keys(loc, i).values(), f"_pairs/{i}.json", f"_pairs/{i}.png"]:
            path = os.path.join(store, key)
            if os.path.exists(path):
                st = os.stat(path)
                with open(path, "rb") as fh:
                    out[key] = (st.st_size, st.st_mtime_ns, hashlib.sha256(fh.read()).hexdigest())
    return out


def grow(args, corpus: str, work: str) -> None:
    from mrict_dask.config import Config, load_config
    from mrict_dask.orchestrate import client_for, run_pipeline
    from mrict_dask.plan import Plan
    from mrict_dask.store import pair_table

    config = load_config(None, {"grid.spacing": 2.0, "registration.working_spacing_mm": 3.0,
                                "registration.refine_at_template_resolution": False}) if args.fast else Config()
    names = sorted(n for n in os.listdir(corpus) if os.path.isdir(os.path.join(corpus, n)))
    extra = max(1, round(len(names) * args.grow_percent / (100 + args.grow_percent)))
    base, later = names[:-extra], names[-extra:]
    inp, store, area = os.path.join(work, "in"), os.path.join(work, "store.zarr"), os.path.join(work, "store.work")
    for path in (inp, store, area, store + "-report"):
        shutil.rmtree(path, ignore_errors=True)
    _link_patients(corpus, base, inp)
    t = time.perf_counter()
    with client_for(workers=args.workers, threads_per_worker=1, memory_limit="8GiB") as client:
        first = run_pipeline(inp, store, work_url=area, config=config, executor=client, pseudonym_key="bench")
    print(f"[base] {len(base)} patients in {time.perf_counter() - t:.0f} s\n{first.describe()}")
    before = _old_objects(store)

    _link_patients(corpus, later, inp)
    _warm_pair_task(config)  # as a worker that has run pairs is, and as the floor below is measured
    t = time.perf_counter()
    second = run_pipeline(inp, store, work_url=area, config=config, executor="serial", pseudonym_key="bench")
    wall = time.perf_counter() - t
    print(f"\n[grown, serial] {len(later)} patients more in {wall:.1f} s\n{second.describe()}")
    after = _old_objects(store)
    touched = {k: v for k, v in before.items() if after.get(k, v)[:2] != v[:2] or after.get(k, v)[2] != v[2]}
    rewritten = sum(after.get(k, v)[0] for k, v in touched.items())

    with open(os.path.join(area, "plan.json")) as fh:
        plan = Plan.from_json(fh.read())
    appended = set(pair_table(store, ("inputs",))["inputs"][first.n_pairs:])  # the new pairs, by their inputs
    new = [p for p in plan.pairs if p.inputs in appended]
    assert len(new) == len(second.added) + len(second.changed), (len(new), second.added, second.changed)
    t = time.perf_counter()
    results = [_pool_pair_with(p, config) for p in new]
    floor = time.perf_counter() - t
    writes = _write_time(results, new, config, os.path.join(work, "scratch.zarr"))
    ratio = wall / floor if floor else float("nan")
    print(f"\nold pairs: {len(before)} objects; rewritten by the grown run: {len(touched)} objects, "
          f"{rewritten} bytes (target 0)")
    print(f"grown run {wall:.1f} s for {len(new)} new pair(s) ({len(second.added)} added, {len(second.changed)} "
          f"changed); their registration floor (the pure pair function, same process, no Dask, no store) "
          f"{floor:.1f} s: {ratio:.2f}x (target <= 1.2x)")
    print(f"the same pairs' store writes (write_pair into a scratch store) {writes:.1f} s: the grown run is "
          f"{wall / (floor + writes):.2f}x their computation and writing together (what growing adds on top: "
          "listing, scanning the new files, planning, finalizing, the report)")
    print("grown run by stage: " + ", ".join(f"{k} {v:.1f}s" for k, v in second.stage_seconds.items())
          + f"; report and the rest {wall - sum(second.stage_seconds.values()):.1f}s")


def _warm_pair_task(config) -> None:
    """Imports and caches a pair task needs (SimpleITK, matplotlib for the QA figure, the template), done once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    from mrict_dask import pair, qa  # noqa: F401
    from mrict_dask.orchestrate import tune_malloc
    from mrict_dask.template import template_from_config

    tune_malloc(config.run.malloc_mmap_threshold_mib)
    template_from_config(config.grid)


def _pool_pair_with(pair, config):
    from mrict_dask.pair import process_pair
    from mrict_dask.template import template_from_config

    return process_pair(pair, config, template_from_config(config.grid))


def _write_time(results: list, pairs: list, config, scratch: str) -> float:
    """Seconds to write ``results`` into a new store of the same settings (as the pair task writes them)."""
    import dataclasses

    from mrict_dask.store import open_or_create_store, write_pair
    from mrict_dask.template import template_from_config

    shutil.rmtree(scratch, ignore_errors=True)
    specs = [dataclasses.replace(p, index=k) for k, p in enumerate(pairs)]
    open_or_create_store(scratch, specs, template_from_config(config.grid), config)
    t = time.perf_counter()
    for spec, result in zip(specs, results):
        write_pair(scratch, spec.index, result)
    took = time.perf_counter() - t
    shutil.rmtree(scratch, ignore_errors=True)
    return took


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
    ap.add_argument("--grow", action="store_true", help="measure growing a store (see above)")
    ap.add_argument("--grow-percent", type=float, default=10.0, help="--grow: patients added, in %% of --patients")
    ap.add_argument("--workers", type=int, default=2, help="--grow: workers of the first run")
    ap.add_argument("--fast", action="store_true", help="--grow: the test suite's cheaper grid and registration")
    args = ap.parse_args()

    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
    work = args.workdir or tempfile.mkdtemp(prefix="bench-run-")
    corpus = args.corpus
    if corpus is None:
        from mrict_dask.synth import generate_corpus

        corpus = os.path.join(work, "dicom")
        if not os.path.exists(corpus + ".manifest.json"):
            t = time.perf_counter()
            n = args.patients + (max(1, round(args.patients * args.grow_percent / 100)) if args.grow else 0)
            s = generate_corpus(corpus, patients=n, seed=args.seed, progress=True)
            print(f"generated {s.n_files} files, {s.n_bytes / 2**20:.0f} MiB in {time.perf_counter() - t:.0f} s")
    n_files = sum(len(f) for _, _, f in os.walk(corpus))
    if args.spaces:
        spaces(corpus, work, args.spaces)
        return
    if args.grow:
        grow(args, corpus, work)
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
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
