"""The only module that knows Dask: clients, the pair executors, the end-to-end run, and the demo.

Everything it maps is a pure function of the library (scan batches, `process_pair`, `write_pair`); a serial
executor runs the very same task function in a plain loop, so a difference between the two is an
orchestration bug.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .config import Config
from .executor import Executor, Outcome, error_reason, guarded
from .io import Location, RedactedOptions, join, redact
from .progress import Progress
from .report import default_report_url
from .sources import Source
from .types import PairResult, PairSpec

__all__ = ["ClusterSpec", "DaskExecutor", "RunSummary", "as_executor", "client_for", "default_report_url",
           "execute_pairs", "run_demo", "run_pipeline"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- clients
# Workers we start ourselves: the statistical profiler samples the running task every 100 ms instead of
# Dask's 10 ms (switching it off made one worker's pairs up to ~6 % faster); the image sets the same for
# Kubernetes workers.
WORKER_CONFIG = {"distributed.worker.profile.interval": "100ms"}
SCHEDULER_TIMEOUT_S = 15
"""How long to try to connect to a given scheduler before the run stops with a one-line error."""


@contextlib.contextmanager
def client_for(scheduler: str | None = None, workers: int | None = None, threads_per_worker: int = 1,
               memory_limit: str = "auto", processes: bool = True) -> Iterator[Any]:
    """A `distributed.Client` to an existing scheduler, or to a LocalCluster sized to the machine."""
    from distributed import Client, LocalCluster

    if scheduler:
        from distributed.comm import parse_address
        from distributed.comm.registry import get_backend

        from .errors import InputError

        try:
            scheme = parse_address(scheduler)[0]
            get_backend(scheme)
        except (ValueError, TypeError) as exc:
            raise InputError(f"not a Dask scheduler address: {scheduler} ({exc})") from None
        if scheme in ("tls", "wss"):
            from distributed.security import Security

            if Security().get_connection_args("client").get("ssl_context") is None:
                raise InputError(f"{scheduler}: a {scheme}:// scheduler needs the client's TLS settings (Dask config "
                                 "distributed.comm.tls.*, e.g. DASK_DISTRIBUTED__COMM__TLS__CA_FILE)")
        try:
            client = Client(scheduler, set_as_default=False, timeout=SCHEDULER_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError, TypeError) as exc:  # TypeError: tls:// without a TLS context
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise InputError(f"cannot reach the Dask scheduler at {scheduler} within {SCHEDULER_TIMEOUT_S} s "
                             f"({reason})") from None
        with client:
            log.info("connected to scheduler %s (dashboard: %s)", scheduler, client.dashboard_link)
            yield client
        return
    import dask

    n = workers or max(1, (os.cpu_count() or 1) // max(1, threads_per_worker))
    with dask.config.set(WORKER_CONFIG), \
            LocalCluster(n_workers=n, threads_per_worker=threads_per_worker, memory_limit=memory_limit,
                         processes=processes, dashboard_address=":0") as cluster, \
            Client(cluster, set_as_default=False) as client:
        log.info("LocalCluster: %d workers x %d threads (dashboard: %s)", n, threads_per_worker,
                 client.dashboard_link)
        yield client


# ----------------------------------------------------------------------------------------------- pair task
_malloc_set: int | None = None


MMAP_THRESHOLD_CEILING_MIB = 32  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
RETAIN_MIB = 1024  # at the ceiling: free heap a worker keeps for the next pair (one pair's peak is ~1.5 GiB)


def tune_malloc(threshold_mib: int) -> bool:
    """Set glibc's mmap/trim thresholds for this process (once); False where there is no glibc.

    A pair allocates and frees volume-sized buffers (4-130 MB) hundreds of times. With glibc's defaults a
    process raises its mmap threshold as it goes and reuses freed heap memory; a Dask nanny's
    ``MALLOC_TRIM_THRESHOLD_=65536`` turns that off, so every buffer is a fresh mmap that is page-faulted
    in and unmapped again. Setting the thresholds explicitly restores the reuse in any worker, however it
    was started. At glibc's ceiling (32 MiB, the default) no buffer is mapped at all and the freed heap is kept
    for the next pair: the 1 mm volumes (35-90 MB) are then reused too. Memory stays bounded by one pair's peak.
    """
    global _malloc_set
    if threshold_mib <= 0 or _malloc_set == threshold_mib:
        return _malloc_set == threshold_mib
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold, m_mmap_max, m_arena_max = -1, -3, -4, -8  # <malloc.h>
    size = int(threshold_mib) << 20
    ok = bool(mallopt(m_mmap_threshold, size)) and bool(mallopt(m_trim_threshold, 2 * size))
    if ok and threshold_mib >= MMAP_THRESHOLD_CEILING_MIB:
        # at the ceiling, buffers above it (a 1 mm volume: 35-90 MB) would still be fresh mappings: none at all,
        # one arena for every thread, and the heap kept between pairs (up to RETAIN_MIB above its top in use)
        ok = (bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_arena_max, 1))
              and bool(mallopt(m_trim_threshold, RETAIN_MIB << 20)))
    if ok:
        _malloc_set = threshold_mib
        log.debug("malloc: buffers up to %d MiB from the heap%s", threshold_mib,
                  " (all, at the ceiling)" if threshold_mib >= MMAP_THRESHOLD_CEILING_MIB else "")
    return ok


def run_pair_task(pair: PairSpec, config: Config, store: Location, report: Location,
                  source_options: dict | None = None) -> dict:
    """Process one pair and write it: runs on a worker (or in the serial loop). Returns the small marker.

    Deterministic failures (bad volume, implausible registration) come back as a failed marker; transient
    errors (storage, network) raise so the executor can retry.
    """
    from .pair import process_pair
    from .store import write_pair
    from .template import template_from_config

    t0 = time.perf_counter()
    tune_malloc(config.run.malloc_mmap_threshold_mib)
    template = template_from_config(config.grid)  # cached per worker process
    result = process_pair(pair, config, template, source_options)
    if result.figure_png:
        report.join("figures", f"{pair.pair_id}.png").write_bytes(result.figure_png)
    t1 = time.perf_counter()
    marker = write_pair(store, pair.index, result)
    marker = dict(marker)
    marker.setdefault("timings", {})
    timings = dict(result.timings)
    timings["write"] = time.perf_counter() - t1
    timings["total"] = time.perf_counter() - t0
    marker["timings"] = timings
    return marker


def failed_result(pair: PairSpec, reason: str) -> PairResult:
    return PairResult(pair_id=pair.pair_id, status=f"failed: {reason}")


# ----------------------------------------------------------------------------------------------- executors
class DaskExecutor:
    """The :class:`~mrict_dask.executor.Executor` on a Dask cluster: futures in a bounded window,
    ``as_completed``, task retries; lost workers are rescheduled by Dask.

    Items are taken from the iterable only as the window has room, so a lazy iterable is built one item at a
    time and the scheduler never holds a huge collection's task list.
    """

    name = "dask"

    def __init__(self, client: Any, window: int = 0, retries: int = 2):
        self.client = client
        self.retries = retries
        if window <= 0:
            threads = sum(self.client.nthreads().values()) or 1
            window = 2 * threads
        self.window = window

    def run(self, fn: Callable[[Any], Any], items: Iterable[Any],
            key: Callable[[Any], str] | None = None) -> Iterator[Outcome]:
        from distributed import as_completed

        todo = iter(items)
        item_of: dict[str, Any] = {}
        token = os.urandom(4).hex()
        count = 0

        def submit(item: Any):
            nonlocal count
            count += 1
            k = f"{key(item) if key else 'task'}-{count}-{token}"
            item_of[k] = item
            return self.client.submit(guarded, fn, item, key=k, retries=self.retries, pure=False)

        first = [submit(item) for _, item in zip(range(self.window), todo)]
        ac = as_completed(first, loop=self.client.loop)  # this client, not whichever is the default
        for fut in ac:
            item = item_of.pop(fut.key)
            try:
                yield Outcome(item, fut.result())
            except Exception as exc:
                yield Outcome(item, None, error_reason(exc))
            finally:
                fut.release()
            nxt = next(todo, None)
            if nxt is not None:
                ac.add(submit(nxt))


def as_executor(executor: Any = None, retries: int = 2, window: int = 0) -> Executor:
    """An :class:`~mrict_dask.executor.Executor` for ``executor``: a Dask client becomes a :class:`DaskExecutor`;
    an executor is kept; None runs serially in this process."""
    if hasattr(executor, "submit") and hasattr(executor, "nthreads"):  # a distributed.Client
        return DaskExecutor(executor, window=window, retries=retries)
    from .executor import as_executor as plain

    return plain(executor, retries=retries, window=window)


# ----------------------------------------------------------------------------------------------- the run
@dataclass
class RunSummary:
    output_url: str
    report_url: str
    n_pairs: int = 0  # pairs of the plan this run works on (kept and new)
    processed: int = 0  # pairs computed in this run
    skipped: int = 0  # pairs already complete in the store (resume)
    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # reason -> count
    exclusions: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    exit_code: int = 0
    messages: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)  # pair ids new to the store (new patients, new sessions)
    changed: list[str] = field(default_factory=list)  # new pair ids replacing a retired pair of their patient
    retired: list[str] = field(default_factory=list)  # pair ids retired by this run
    absent: list[str] = field(default_factory=list)  # pair ids kept although their patient left the input
    withdrawn: int = 0  # patients of the input on the withdrawal list (never planned)
    version: int | None = None  # the version this run's finalize recorded (None: the store did not change)
    scan: str = ""  # what the scan read

    def describe(self) -> str:
        lines = [
            f"store:   {self.output_url}",
            f"report:  {join(self.report_url, 'report.html')}",
            f"pairs:   {self.n_pairs} planned, {self.ok} ok, {sum(self.failed.values())} failed "
            f"({self.processed} computed now, {self.skipped} already complete)",
        ]
        growth = [f"{len(v)} {k}" for k, v in (("added", self.added), ("changed", self.changed),
                                                 ("retired", self.retired)) if v]
        if self.withdrawn:
            growth.append(f"{self.withdrawn} withdrawn patient(s) left out")
        if self.absent:
            growth.append(f"{len(self.absent)} kept although their patient is no longer in the input")
        if growth:
            lines.append("changes: " + ", ".join(growth))
        if self.version is not None:
            lines.append(f"version: {self.version} recorded (pin it: SlicePairs(url, version={self.version}))")
        for reason, n in sorted(self.failed.items(), key=lambda kv: -kv[1]):
            lines.append(f"  failed x{n}: {reason}")
        if self.exclusions:
            lines.append("patients without a pair:")
            for reason, n in sorted(self.exclusions.items(), key=lambda kv: -kv[1]):
                lines.append(f"  x{n}: {reason}")
        if self.scan:
            lines.append(self.scan)
        lines.append("time by stage: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.stage_seconds.items()))
        lines.extend(self.messages)
        return "\n".join(lines)


def _reason_class(status: str) -> str:
    """Group failure statuses by their reason's leading words (details after ':' vary per pair)."""
    text = status.removeprefix("failed: ")
    return text.split(":")[0].strip()[:120]


RETRYABLE_FAILURE = "error after retries: "
"""How the failure reason of a pair whose task kept failing (not its data: storage, PACS, workers) begins."""


def execute_pairs(executor: Executor, pairs: Iterable[PairSpec], total: int, config: Config, source: Source,
                  store: Location, report: Location, progress: bool = False,
                  check: Callable[[], None] | None = None) -> list[dict]:
    """Run the pair task over ``pairs`` (possibly lazy) with ``executor``; every pair ends with a marker.
    ``check`` is called as each pair ends (the lease: it raises when another run took the store over)."""
    import functools

    from .store import write_pair

    fn = functools.partial(run_pair_task, config=config, store=store, report=report,
                           source_options=RedactedOptions(source.storage_options))
    markers: list[dict] = []
    with Progress("pairs", total, progress, show_failed=True) as bar:
        for outcome in executor.run(fn, pairs, key=lambda p: f"pair-{p.index}-{p.pair_id}"):
            if check is not None:
                check()
            pair = outcome.item
            marker = outcome.value
            if not outcome.ok:
                # retries exhausted: record the failure in the store so the pair is accounted for
                log.warning("pair %s failed after retries: %s", pair.pair_id, outcome.error)
                try:
                    marker = write_pair(store, pair.index, failed_result(pair, f"{RETRYABLE_FAILURE}{outcome.error}"))
                except Exception as exc:
                    log.warning("pair %s: the failure could not be recorded either (%s)", pair.pair_id,
                                error_reason(exc))
                    bar.advance(failed=True)
                    continue
            markers.append(marker)
            ok = marker.get("status") == "ok"
            if not ok:
                log.info("pair %s: %s", pair.pair_id, marker.get("status"))
            bar.advance(failed=not ok)
    return markers


@dataclass(frozen=True)
class ClusterSpec:
    """Where the Dask work runs when the caller gives no client: an existing scheduler, or a LocalCluster."""

    scheduler: str | None = None
    workers: int | None = None
    threads_per_worker: int = 1
    memory_limit: str = "auto"


@contextlib.contextmanager
def open_executor(executor: Any = "dask", cluster: ClusterSpec | None = None, retries: int = 2,
                  window: int = 0) -> Iterator[Executor]:
    """The executor a command fans its tasks out with: "serial" (a loop in this process), "dask" (a cluster from
    ``cluster``: a scheduler address or a LocalCluster, closed on exit), a Dask client, or an Executor."""
    from .executor import SerialExecutor

    if executor == "serial":
        yield SerialExecutor(retries)
    elif executor == "dask":
        c = cluster or ClusterSpec()
        with client_for(c.scheduler, c.workers, c.threads_per_worker, c.memory_limit) as client:
            yield DaskExecutor(client, window, retries)
    else:
        yield as_executor(executor, retries=retries, window=window)


def run_pipeline(input_url: str | Location | Source, output_url: str | Location, *, work_url: str | None = None,
                 config: Config | None = None, executor: Any = "dask", cluster: ClusterSpec | None = None,
                 limit: int | None = None, pseudonym_key: str | None = None, storage_options: dict | None = None,
                 progress: bool = False) -> RunSummary:
    """Scan -> plan -> per-pair processing on the workers -> region writes -> finalize -> report.

    Over an existing store (same settings) the run grows it: only what the input has new or changed is scanned,
    planned pairs the store holds are neither computed nor written again, new ones are appended, and pairs whose
    inputs changed are retired (see :mod:`mrict_dask.growth`). One run writes a store at a time: the run holds the
    store's lease (:mod:`mrict_dask.lease`) from before the scan to the report.

    ``executor``: "dask" (a cluster from ``cluster``: a scheduler address or a LocalCluster), "serial" (this
    process), a Dask client, or an :class:`~mrict_dask.executor.Executor`. ``storage_options`` apply to every
    URL given as a string.
    """
    from .lease import holding
    from .sources import open_source
    from .store import check_output

    config = config or Config()
    if limit is not None and limit < 0:
        from .errors import ConfigError

        raise ConfigError(f"limit must be at least 0, got {limit}")
    source = open_source(input_url, storage_options)
    store = Location.of(output_url, storage_options)
    work = Location.of(work_url, store.storage_options) if work_url else store.sibling(".work")
    report = Location.of(default_report_url(store.url), store.storage_options)
    summary = RunSummary(output_url=store.url, report_url=report.url)
    log.info("run: input=%s output=%s work=%s storage_options=%s", source.url, store.url, work.url,
             redact(store.storage_options))
    if not work_url and not store.is_local:
        summary.messages.append(f"the private work area (catalog with identifiers, the pseudonym map) is {work.url}, "
                                "beside the store: pass --work to keep it where readers of the store have no access")
    if not config.deface.enabled:
        warning = ("defacing is off (deface.enabled: false): the store's volumes hold faces, which identify "
                   "patients; for in-house use only, never share this store")
        log.warning(warning)
        summary.messages.append(warning)
    check_output(store)  # a foreign folder gets no lease written into it
    listing = source.listing()  # and nothing is written for an input that cannot be read
    with holding(store, config.run.lease_seconds) as lease:
        _run(source, listing, store, work, report, config, executor, cluster, limit, pseudonym_key, progress, lease,
             summary)
    return summary


def _run(source: Source, listing: list, store: Location, work: Location, report: Location, config: Config,
         executor: Any, cluster: ClusterSpec | None, limit: int | None, pseudonym_key: str | None, progress: bool,
         lease: Any, summary: RunSummary) -> None:
    """The run, holding the store's lease."""
    from . import __version__
    from .growth import apply_withdrawals, check_key, key_check, reconcile, store_pairs, with_inputs, withdrawn_patients
    from .plan import make_plan
    from .pseudonym import resolve_key
    from .report import write_report
    from .scan import update_catalog
    from .store import (
        STATUS_WITHDRAWN,
        append_pairs,
        check_output,
        completed_pairs,
        finalize_store,
        open_or_create_store,
        pair_table,
        purge_withdrawn,
        retire_pair,
    )
    from .template import template_from_config

    key, key_source = resolve_key(pseudonym_key, work)
    if key_source.startswith("random"):
        summary.messages.append(f"pseudonym key: {key_source}; pass --pseudonym-key or set MRICT_PSEUDONYM_KEY "
                                "to get the same pseudonyms across sites")

    with open_executor(executor, cluster, config.run.retries, config.run.window) as ex:
        client = getattr(ex, "client", None)
        if client is not None and progress:
            summary.messages.append(f"dask dashboard: {client.dashboard_link}")

        t = time.perf_counter()
        update = update_catalog(source, work, ex, config.run.scan_batch, progress, listing)
        catalog = update.where
        if update.scanned != update.units or update.removed:
            summary.scan = update.describe()
        summary.stage_seconds["scan"] = time.perf_counter() - t

        t = time.perf_counter()
        plan = make_plan(catalog, config, key)
        template = template_from_config(config.grid)
        node = check_output(store)
        exists = node is not None and "fingerprint" in node.get("attributes", {})
        stored = []
        if exists:
            open_or_create_store(store, [], template, config)  # other settings: refused, naming the difference
            check_key(store, key, [p.pair_id for p in plan.pairs])
            stored = store_pairs(store)
        withdrawn = withdrawn_patients(work, stored, key)
        summary.withdrawn = len(withdrawn & set(plan.patients))
        plan = apply_withdrawals(plan, withdrawn)
        plan.pairs = with_inputs(catalog, plan.pairs, key)
        work.join("plan.json").write_text(plan.to_json())
        rec = reconcile(stored, plan.pairs, key, set(plan.patients), limit)
        pairs = rec.pairs
        summary.n_pairs = len(pairs)
        summary.added, summary.changed = rec.added, rec.changed
        summary.retired = [stored[i].pair_id for i in sorted(rec.retire)]
        summary.absent = [stored[i].pair_id for i in rec.absent]
        for exc in plan.exclusions:
            reason = str(exc.get("reason", "")).split(":")[0]
            summary.exclusions[reason] = summary.exclusions.get(reason, 0) + 1
        summary.stage_seconds["plan"] = time.perf_counter() - t

        if not exists:
            attrs = {"mrict_dask_version": __version__, "pairs_limited_to": limit, "pseudonym_check": key_check(key)}
            open_or_create_store(store, rec.new, template, config, attrs=attrs)
        elif rec.new:
            append_pairs(store, rec.new)

        done = completed_pairs(store)
        complete_ok = {i for i, m in done.items() if m.get("status") == "ok"}
        todo = [p for p in pairs if p.index not in complete_ok]
        summary.skipped = len(pairs) - len(todo)
        if summary.skipped:
            log.info("%d of %d planned pairs already complete in the store", summary.skipped, len(pairs))

        t = time.perf_counter()
        markers = execute_pairs(ex, iter(todo), len(todo), config, source, store, report, progress, lease.check)
        summary.processed = len(markers)
        summary.stage_seconds["pairs"] = time.perf_counter() - t

    lease.check()
    t = time.perf_counter()
    for i, (reason, by) in sorted(rec.retire.items()):
        retire_pair(store, i, stored[i].pair_id, reason, by)
    purge_withdrawn(store, [s.index for s in stored if s.state == STATUS_WITHDRAWN])
    version = finalize_store(store)
    summary.version = version["id"] if version else None
    summary.stage_seconds["finalize"] = time.perf_counter() - t

    final = completed_pairs(store)
    planned = [final[p.index] for p in pairs if p.index in final]
    for m in planned:
        status = str(m.get("status", ""))
        if status == "ok":
            summary.ok += 1
        else:
            reason = _reason_class(status)
            summary.failed[reason] = summary.failed.get(reason, 0) + 1
    missing = len(pairs) - len(planned)
    retryable = sum(str(m.get("status", "")).startswith(f"failed: {RETRYABLE_FAILURE}") for m in planned)
    if missing:
        summary.messages.append(f"{missing} pairs have no marker: re-run to finish them")
        summary.exit_code = 1
    elif retryable:
        # the data may be fine: storage, the PACS or workers failed; a re-run computes these pairs again
        summary.messages.append(f"{retryable} pairs failed on errors that outlasted the retries (storage, PACS or "
                                "workers): re-run to retry them")
        summary.exit_code = 3
    table = pair_table(store, ("pair", "patient", "split", "days_apart"))
    every = [PairSpec(index=i, pair_id=pid, patient=table["patient"][i], split=table["split"][i],
                      days_apart=int(table["days_apart"][i] or 0), mr_files=(), ct_files=())
             for i, pid in enumerate(table["pair"])]
    write_report(report, plan, every, final, summary, config, template)


# ----------------------------------------------------------------------------------------------- the demo
def run_demo(base: str, patients: int = 3, workers: int | None = None, progress: bool = True,
             echo: Callable[[str], None] = print) -> RunSummary:
    """Generate a small synthetic corpus, run the whole job on a LocalCluster, show a training batch."""
    import numpy as np

    from .loader import SlicePairs
    from .synth import generate_corpus

    base = os.path.abspath(base)
    corpus = os.path.join(base, "dicom")
    if not os.path.exists(corpus + ".manifest.json"):
        echo(f"generating a synthetic corpus of {patients} patients in {corpus} ...")
        s = generate_corpus(corpus, patients=patients, seed=0, progress=progress)
        echo(s.describe())
    else:
        echo(f"reusing the synthetic corpus in {corpus}")
    store = os.path.join(base, "store.zarr")
    summary = run_pipeline(corpus, store, config=Config(), cluster=ClusterSpec(workers=workers), progress=progress,
                           pseudonym_key="mrict-demo-key")
    echo(summary.describe())
    ds = SlicePairs(store, split="train")
    if len(ds) == 0:
        ds = SlicePairs(store, split=None)
    echo(f"\nreading a training batch: SlicePairs('{store}', split='train') has {len(ds)} slice pairs")
    if len(ds):
        idx = np.random.default_rng(0).choice(len(ds), size=min(8, len(ds)), replace=False)
        batch = ds.__getitems__([int(i) for i in idx])  # one batch's reads at once, as a DataLoader asks
        mr = np.stack([b[0] for b in batch])
        ct = np.stack([b[1] for b in batch])
        echo(f"  batch: mr {mr.shape} {mr.dtype} in [{mr.min():.2f}, {mr.max():.2f}], "
             f"ct {ct.shape} {ct.dtype} in [{ct.min():.2f}, {ct.max():.2f}]")
    echo("  in Python:  from mrict_dask.loader import SlicePairs; ds = SlicePairs(url, split='train'); mr, ct = ds[0]")
    return summary

