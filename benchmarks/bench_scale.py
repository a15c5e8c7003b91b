"""Scale benchmark: the driver's work at 1x, 10x and 100x the seed collection (16k, 160k, 1.6M catalog rows).

Makes a catalog of N rows by replicating a real scan's catalog (of a generated corpus) with fresh identifiers
per replica (patients, UIDs, file URLs), then times each driver-side stage in its own process and prints its
seconds and peak RSS:

- scan-gather: the per-batch Arrow tables the scan tasks return (256 rows each, through Arrow IPC as they arrive
  from workers) concatenated and written as the catalog;
- plan: ``mrict-dask plan catalog.parquet --out plan.json`` (the CLI, as a user runs it);
- store: creating the Zarr store for the plan's pairs on the template grid;
- finalize+report: one completion marker per pair (failed pairs: no pixel data), then finalizing the store and
  writing the run report, as the end of a run does.

    python benchmarks/bench_scale.py                       # N = 16k, 160k, 1.6M
    python benchmarks/bench_scale.py --rows 160000         # one size
    python benchmarks/bench_scale.py --scan-files 160000   # plus: scan 160k files (hard links) with 2 workers

Targets (from the scale issue): plan on 1.6M rows <= 60 s and <= 1.5 GiB peak RSS; the scan of 160k files with
2 workers keeps the driver's peak RSS <= 600 MiB; store creation, finalize and report stay linear in pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

SIZES = (16_000, 160_000, 1_600_000)
_UID_COLUMNS = ("sop_instance_uid", "series_uid", "study_uid", "frame_of_reference_uid")


# ------------------------------------------------------------------------------------------- catalogs
def base_catalog(work: str, corpus: str | None, patients: int) -> str:
    """A real scan's catalog (Parquet) of ``corpus`` or of a generated corpus of ``patients`` patients."""
    from mrict_dask.catalog import write_catalog
    from mrict_dask.io import Location
    from mrict_dask.scan import scan_table

    out = os.path.join(work, "base.parquet")
    if os.path.exists(out):
        return out
    if corpus is None:
        from mrict_dask.synth import generate_corpus

        corpus = os.path.join(work, "dicom")
        if not os.path.exists(corpus):
            generate_corpus(corpus, patients=patients, seed=0)
    write_catalog(scan_table(corpus), Location(out))
    return out


def replicate(base_path: str, n_rows: int, out_path: str) -> None:
    """Write a catalog of ``n_rows`` rows: copies of the base catalog, each with its own patients, UIDs and URLs."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    base = pq.read_table(base_path)
    writer = pq.ParquetWriter(out_path, base.schema)
    done, r = 0, 0
    while done < n_rows:
        part = base.slice(0, min(base.num_rows, n_rows - done))
        cols = {}
        for name in part.column_names:
            col = part.column(name)
            if name in _UID_COLUMNS:
                col = pc.if_else(pc.is_null(col), col, pc.binary_join_element_wise(col, pa.scalar(str(r + 1)), "."))
            elif name == "patient_id":
                col = pc.if_else(pc.is_null(col), col, pc.binary_join_element_wise(col, pa.scalar(f"R{r}"), "-"))
            elif name == "url":
                col = pc.binary_join_element_wise(pa.scalar(f"/replica/{r:05d}"), col, "")
            cols[name] = col
        writer.write_table(pa.table(cols, schema=base.schema))
        done += part.num_rows
        r += 1
    writer.close()


# ------------------------------------------------------------------------------------------- stages
def stage_gather(catalog: str, work: str) -> dict:
    """What the scan's driver does with the tasks' results: receive Arrow batches, concatenate, write."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mrict_dask.catalog import as_catalog_table, concat_tables, encoded, write_catalog
    from mrict_dask.io import Location

    seconds, tables = 0.0, []
    for batch in pq.ParquetFile(catalog).iter_batches(batch_size=256):
        part = encoded(as_catalog_table(pa.Table.from_batches([batch])))  # as a scan task returns it
        sink = pa.BufferOutputStream()  # the bytes a worker sends back for one batch (not timed)
        with pa.ipc.new_stream(sink, part.schema) as w:
            w.write_table(part)
        blob = sink.getvalue()
        t = time.perf_counter()
        tables.append(pa.ipc.open_stream(blob).read_all())
        seconds += time.perf_counter() - t
    t = time.perf_counter()
    table = concat_tables(tables)
    del tables
    write_catalog(table, Location(os.path.join(work, "gathered.parquet")))
    return {"seconds": seconds + time.perf_counter() - t, "rows": table.num_rows}


def _load_plan(plan_path: str, min_pairs: int):
    """The plan, its pairs repeated (fresh pair ids) up to ``min_pairs``: store and report sizes follow pairs."""
    import dataclasses

    from mrict_dask.plan import Plan

    with open(plan_path) as fh:
        plan = Plan.from_json(fh.read())
    base, k = list(plan.pairs), 0
    while base and len(plan.pairs) < min_pairs:
        k += 1
        for p in base[: min_pairs - len(plan.pairs)]:
            plan.pairs.append(dataclasses.replace(p, index=len(plan.pairs), pair_id=f"{p.pair_id}-{k}"))
    return plan


def stage_store(plan_path: str, work: str, min_pairs: str = "0") -> dict:
    from mrict_dask.config import Config
    from mrict_dask.store import open_or_create_store
    from mrict_dask.template import load_template

    plan = _load_plan(plan_path, int(min_pairs))
    template = load_template()
    t = time.perf_counter()
    open_or_create_store(os.path.join(work, "store.zarr"), plan.pairs, template, Config())
    return {"seconds": time.perf_counter() - t, "pairs": len(plan.pairs)}


def stage_finalize(plan_path: str, work: str, min_pairs: str = "0") -> dict:
    from mrict_dask.config import Config
    from mrict_dask.orchestrate import RunSummary, failed_result
    from mrict_dask.report import write_report
    from mrict_dask.store import completed_pairs, finalize_store, write_pair
    from mrict_dask.template import load_template

    plan = _load_plan(plan_path, int(min_pairs))
    store = os.path.join(work, "store.zarr")
    t = time.perf_counter()
    for p in plan.pairs:  # what the workers leave: one marker per pair (here: failed, so no pixel data)
        write_pair(store, p.index, failed_result(p, "benchmark: no pixel data"))
    t_markers = time.perf_counter() - t
    t = time.perf_counter()
    finalize_store(store)
    t_finalize = time.perf_counter() - t
    t = time.perf_counter()
    final = completed_pairs(store)
    summary = RunSummary(output_url=store, report_url=store + "-report", n_pairs=len(plan.pairs))
    for m in final.values():
        summary.failed["benchmark"] = summary.failed.get("benchmark", 0) + (m["status"] != "ok")
    write_report(store + "-report", plan, plan.pairs, final, summary, Config(), load_template())
    t_report = time.perf_counter() - t
    size = sum(os.path.getsize(os.path.join(store + "-report", f)) for f in os.listdir(store + "-report")
               if os.path.isfile(os.path.join(store + "-report", f)))
    return {"seconds": t_finalize + t_report, "markers_seconds": t_markers, "finalize_seconds": t_finalize,
            "report_seconds": t_report, "report_bytes": size}


def _measure(argv: list[str]) -> tuple[float, float, str]:
    """Run ``argv`` in its own process; (wall seconds, peak RSS in MiB of that process, its stdout)."""
    t = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv[:4])} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return wall, _peak_mib(proc.stdout), proc.stdout


def _peak_mib(out: str) -> float:
    for line in out.splitlines():
        if line.startswith("PEAK_RSS_MIB "):
            return float(line.split()[1])
    return float("nan")


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: per address space, so not inherited across exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child_entry() -> None:
    """``--stage NAME ARGS``: run one stage in this process and print its result and this process's peak RSS."""
    stage, *args = sys.argv[sys.argv.index("--stage") + 1:]
    if stage in ("plan", "cli"):  # exactly the CLI, in this process
        from mrict_dask.cli import main

        try:
            main(["-q", "plan", *args] if stage == "plan" else args, standalone_mode=False)
        finally:
            print(f"PEAK_RSS_MIB {peak_rss_mib():.0f}")
        return
    fn = {"gather": stage_gather, "store": stage_store, "finalize": stage_finalize}[stage]
    result = fn(*args)
    print(json.dumps(result))
    print(f"PEAK_RSS_MIB {peak_rss_mib():.0f}")


def _stage(name: str, *args: str) -> tuple[float, float, dict]:
    wall, peak, out = _measure([sys.executable, os.path.abspath(__file__), "--stage", name, *args])
    result = {}
    for line in out.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
    return wall, peak, result


# ------------------------------------------------------------------------------------------- scan of files
def scan_files(work: str, n_files: int, corpus: str) -> None:
    """Hard links of a corpus up to ``n_files`` files, scanned by the CLI with 2 workers; the driver's peak RSS."""
    root = os.path.join(work, f"links-{n_files}")
    if not os.path.exists(root):
        files = [os.path.join(d, f) for d, _, fs in os.walk(corpus) for f in fs]
        made, r = 0, 0
        while made < n_files:
            for src in files[: n_files - made]:
                dst = os.path.join(root, f"r{r:03d}", os.path.relpath(src, corpus))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.link(src, dst)
            made += min(len(files), n_files - made)
            r += 1
    out = os.path.join(work, f"scan-{n_files}.parquet")
    wall, peak, _ = _measure([sys.executable, os.path.abspath(__file__), "--stage", "cli", "-q", "scan", root,
                              "--out", out, "--workers", "2"])
    print(f"\nscan of {n_files:,} files (hard links), CLI, 2 workers: {wall:.1f} s ({n_files / wall:,.0f} files/s); "
          f"driver peak RSS {peak:,.0f} MiB (target <= 600 MiB: {'met' if peak <= 600 else 'NOT met'})")


# ------------------------------------------------------------------------------------------- main
def main() -> None:
    if "--stage" in sys.argv:
        _child_entry()
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, action="append", help="catalog size(s) (default: 16k, 160k, 1.6M)")
    ap.add_argument("--corpus", default=None, help="a DICOM folder to scan for the base catalog")
    ap.add_argument("--patients", type=int, default=4, help="patients to generate when no --corpus")
    ap.add_argument("--workdir", default=None, help="default: a temporary folder, removed at the end")
    ap.add_argument("--scan-files", type=int, default=0, help="also scan this many files (hard links) with 2 workers")
    ap.add_argument("--min-pairs", type=int, default=5600,
                    help="at the largest size, also create/finalize/report a store of this many pairs")
    args = ap.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="bench-scale-")
    os.makedirs(work, exist_ok=True)
    base = base_catalog(work, args.corpus, args.patients)
    import pyarrow.parquet as pq

    n_base = pq.ParquetFile(base).metadata.num_rows
    print(f"base catalog: {n_base:,} rows (a real scan); {os.cpu_count()} cores; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'rows':>10} {'stage':<16} {'seconds':>9} {'peak RSS MiB':>13}  notes")
    for n in args.rows or SIZES:
        d = os.path.join(work, f"n{n}")
        os.makedirs(d, exist_ok=True)
        catalog = os.path.join(d, "catalog.parquet")
        replicate(base, n, catalog)
        size_mib = os.path.getsize(catalog) / 2**20
        wall, peak, res = _stage("gather", catalog, d)
        print(f"{n:>10,} {'scan-gather':<16} {res['seconds']:>9.1f} {peak:>13,.0f}  "
              f"{n // 256:,} batch tables; catalog {size_mib:.0f} MiB")
        plan_path = os.path.join(d, "plan.json")
        wall, peak, _ = _stage("plan", catalog, "--out", plan_path, "--pseudonym-key", "bench")
        with open(plan_path) as fh:
            plan = json.load(fh)
        n_pairs = len(plan["pairs"])
        note = f"{n_pairs:,} pairs, {len(plan['series']):,} stacks"
        if n >= 1_000_000:
            note += (f"; target <= 60 s: {'met' if wall <= 60 else 'NOT met'}, <= 1.5 GiB: "
                     f"{'met' if peak <= 1536 else 'NOT met'}")
        print(f"{n:>10,} {'plan (CLI)':<16} {wall:>9.1f} {peak:>13,.0f}  {note}")
        del plan
        for min_pairs in sorted({0, args.min_pairs if n == max(args.rows or SIZES) else 0}):
            if min_pairs and min_pairs <= n_pairs:
                continue
            shutil.rmtree(os.path.join(d, "store.zarr"), ignore_errors=True)
            shutil.rmtree(os.path.join(d, "store.zarr-report"), ignore_errors=True)
            wall, peak, res = _stage("store", plan_path, d, str(min_pairs))
            what = f"{res['pairs']:,} pairs" + (" (the plan's pairs repeated)" if min_pairs else "")
            print(f"{n:>10,} {'store creation':<16} {res['seconds']:>9.1f} {peak:>13,.0f}  {what}")
            wall, peak, res = _stage("finalize", plan_path, d, str(min_pairs))
            print(f"{n:>10,} {'finalize+report':<16} {res['seconds']:>9.1f} {peak:>13,.0f}  finalize "
                  f"{res['finalize_seconds']:.1f} s, report {res['report_seconds']:.1f} s "
                  f"({res['report_bytes'] / 2**20:.1f} MiB); writing the markers took {res['markers_seconds']:.1f} s")
        shutil.rmtree(os.path.join(d, "store.zarr"), ignore_errors=True)
    if args.scan_files:
        corpus = args.corpus or os.path.join(work, "dicom")
        scan_files(work, args.scan_files, corpus)
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
