"""DICOMweb benchmark: what the scan and a whole run move over the network from a PACS, and how long they take.

A real PACS (see ``mrict_dask.testing``) is filled with a generated corpus; a byte-counting reverse proxy in front
of it (optionally adding first-byte latency, as remote services have) counts every response body. Printed, not
asserted:

- the scan (QIDO-RS + series metadata): bytes moved vs the corpus bytes, and its time next to a folder scan;
- the run (``run_pipeline`` on a LocalCluster): instance bytes moved vs the bytes of the series the plan chose,
  and its time.

    python benchmarks/bench_dicomweb.py --patients 4
    python benchmarks/bench_dicomweb.py --patients 4 --latency-ms 20 --fast

Targets (issue 17): the scan moves <= 10 % of the corpus bytes; the run moves about the chosen series' bytes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=None, help="an existing local folder of DICOM (default: generate one)")
    ap.add_argument("--patients", type=int, default=4, help="patients to generate when no --corpus")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--latency-ms", type=float, default=0.0, help="added before each response (default 0)")
    ap.add_argument("--fast", action="store_true", help="the cheaper registration settings of the test suite")
    ap.add_argument("--workdir", default=None, help="where to put corpus, PACS storage and stores")
    args = ap.parse_args()

    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
    from mrict_dask.config import Config, load_config
    from mrict_dask.orchestrate import ClusterSpec, run_pipeline
    from mrict_dask.plan import Plan, make_plan
    from mrict_dask.scan import scan
    from mrict_dask.synth import generate_corpus
    from mrict_dask.testing import CountingProxy, orthanc_missing, orthanc_server

    why = orthanc_missing()
    if why:
        raise SystemExit(f"no PACS to benchmark against: {why}")
    work = args.workdir or tempfile.mkdtemp(prefix="bench-dicomweb-")
    corpus = args.corpus or os.path.join(work, "dicom")
    if not args.corpus and not os.path.exists(corpus):
        t = time.perf_counter()
        generate_corpus(corpus, patients=args.patients, seed=args.seed, progress=False)
        print(f"generated {args.patients} patients in {time.perf_counter() - t:.1f} s")
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(corpus) for f in names)
    size_of = {f: os.path.getsize(f) for f in files}
    corpus_bytes = sum(size_of.values())
    config = load_config(None, {"grid.spacing": 2.0, "registration.working_spacing_mm": 3.0,
                                "registration.refine_at_template_resolution": False}) if args.fast else Config()
    user, password = "bench", "bench-password"
    os.environ["MRICT_DICOMWEB_USER"], os.environ["MRICT_DICOMWEB_PASSWORD"] = user, password

    with orthanc_server(os.path.join(work, "pacs"), user, password) as pacs:
        t = time.perf_counter()
        stored = pacs.upload(files)
        print(f"PACS filled: {stored:,} of {len(files):,} files ({_mib(corpus_bytes)}) in "
              f"{time.perf_counter() - t:.1f} s")
        with CountingProxy(pacs.url, latency_s=args.latency_ms / 1000) as proxy:
            url = f"dicomweb+{proxy.url}/dicom-web"

            t = time.perf_counter()
            scan(corpus)
            folder_s = time.perf_counter() - t
            t = time.perf_counter()
            web = scan(url)
            scan_s = time.perf_counter() - t
            scan_bytes = proxy.bytes()
            print(f"\nscan: {len(web):,} instances in {scan_s:.1f} s (folder scan {folder_s:.1f} s); "
                  f"moved {_mib(scan_bytes)} = {100 * scan_bytes / corpus_bytes:.2f} % of the corpus "
                  f"({_mib(proxy.bytes('qido'))} QIDO-RS, {_mib(proxy.bytes('metadata'))} metadata, "
                  f"{proxy.bytes('instance')} B instances)")

            proxy.reset()
            out = os.path.join(tempfile.mkdtemp(prefix="run-", dir=work), "store.zarr")  # a fresh store, not a resume
            t = time.perf_counter()
            summary = run_pipeline(url, out, config=config, cluster=ClusterSpec(workers=args.workers),
                                   pseudonym_key="bench-key")
            run_s = time.perf_counter() - t
            counts = {k: list(v) for k, v in proxy.counts.items()}
    with open(out + ".work/plan.json") as fh:
        plan = Plan.from_json(fh.read())
    # the same series, as files: the plan of the folder names them by path
    folder_plan = make_plan(scan(corpus), config, b"bench-key")
    chosen = sum(size_of[f] for p in folder_plan.pairs for f in (*p.mr_files, *p.ct_files))
    n_chosen = sum(len(p.mr_files) + len(p.ct_files) for p in plan.pairs)
    inst_requests, inst_bytes = counts.get("instance", [0, 0])
    print(f"run: {summary.ok} of {summary.n_pairs} pairs ok in {run_s:.1f} s "
          f"({', '.join(f'{k} {v:.1f}s' for k, v in summary.stage_seconds.items())})")
    print(f"  instances: {inst_requests:,} requests for the {n_chosen:,} instances of the chosen series; "
          f"moved {_mib(inst_bytes)} vs the chosen series' files {_mib(chosen)} "
          f"({100 * inst_bytes / chosen:.1f} %) and the corpus {_mib(corpus_bytes)} "
          f"({100 * inst_bytes / corpus_bytes:.1f} %)")
    meta = sum(v[1] for k, v in counts.items() if k != "instance")
    print(f"  the run's own scan: {_mib(meta)} of QIDO-RS and metadata")
    print(f"\n(work folder: {work})")


if __name__ == "__main__":
    main()
