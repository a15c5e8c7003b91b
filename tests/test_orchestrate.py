"""Worker process settings the pair task makes for itself: glibc's allocator thresholds, the profiler interval."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from mrict_dask.config import config_from_dict
from mrict_dask.errors import ConfigError

# In a fresh process started the way a Dask nanny starts its workers (MALLOC_TRIM_THRESHOLD_=65536 in the
# environment): is a live 8 MiB buffer a separate mmap (glibc's mallinfo2 `hblkhd`, bytes in mmapped chunks),
# before and after tune_malloc?
_PROBE = textwrap.dedent("""
    import ctypes, sys
    import numpy as np
    from mrict_dask.orchestrate import tune_malloc

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def mapped_for_a_buffer():
        before = libc.mallinfo2().hblkhd
        a = np.ones(int(sys.argv[2]) << 17)  # argv[2] MiB of float64
        during = libc.mallinfo2().hblkhd
        del a
        return during - before

    untuned = mapped_for_a_buffer()
    ok = tune_malloc(int(sys.argv[1]))
    mapped_for_a_buffer()  # the first one after tuning grows the heap; the next ones reuse it
    print(untuned, mapped_for_a_buffer(), ok)
""")
MIB = 1 << 20


def _probe(threshold_mib: int, buffer_mib: int = 8) -> tuple[int, int, bool]:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(threshold_mib), str(buffer_mib)], capture_output=True,
                         text=True, check=True, env={**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"})
    a, b, ok = out.stdout.split()
    return int(a), int(b), ok == "True"


glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or "glibc" not in " ".join(platform.libc_ver()),
                           reason="glibc only")


@glibc
def test_tune_malloc_serves_volume_buffers_from_the_heap():
    untuned, tuned, ok = _probe(32)
    assert ok
    assert untuned >= 8 * MIB  # as a Dask worker starts: each buffer its own fresh mapping
    assert tuned == 0  # tuned: from the heap, reused


@glibc
def test_tune_malloc_at_the_ceiling_serves_volumes_above_it_from_the_heap_too():
    """A 1 mm volume (35-90 MB) is above glibc's 32 MiB mmap ceiling: at the ceiling nothing is mapped; below it,
    such a buffer still is."""
    untuned, tuned, ok = _probe(32, 80)
    assert ok and untuned >= 80 * MIB and tuned == 0
    _, below, ok = _probe(16, 80)
    assert ok and below >= 80 * MIB


@glibc
def test_tune_malloc_zero_leaves_the_allocator_alone():
    untuned, tuned, ok = _probe(0)
    assert not ok
    assert untuned >= 8 * MIB and tuned >= 8 * MIB


@pytest.mark.parametrize("value", [-1, 33])
def test_malloc_threshold_range(value):
    with pytest.raises(ConfigError, match="malloc_mmap_threshold_mib"):
        config_from_dict({"run": {"malloc_mmap_threshold_mib": value}})


def test_workers_we_start_sample_the_profile_every_100ms():
    import dask
    import distributed  # noqa: F401 - registers distributed's config defaults

    from mrict_dask.orchestrate import client_for

    before = dask.config.get("distributed.worker.profile.interval")
    with client_for(workers=1) as client:
        got = client.run(lambda dask_worker: dask_worker.periodic_callbacks["profile"].callback_time)
    assert list(got.values()) == [100.0]
    # the driver's own configuration is left as it was
    assert dask.config.get("distributed.worker.profile.interval") == before


# --------------------------------------------------------------------------------------------- worker logs
def _fail_naming(item):
    pair, batch = item
    raise FileNotFoundError(f"{pair.mr_files[0]} is gone")


def test_a_failed_task_logged_by_a_dask_worker_names_no_file_or_uid(capfd):
    """Dask workers log a failed task (its exception, in some versions its arguments): neither a pair, a scan
    batch nor the exception of a task run by the executor may print a file URL (paths name patients) or a UID;
    the reason the run records masks paths too."""
    from distributed import Client, LocalCluster

    from mrict_dask.executor import error_reason
    from mrict_dask.orchestrate import DaskExecutor
    from mrict_dask.scan import Batch
    from mrict_dask.types import PairSpec

    url = "s3://bucket/dicom/SYN-0007-QWERT/mr/1-001.dcm"
    pair = PairSpec(index=0, pair_id="P00000000000000aa-1234abcd", patient="P00000000000000aa", split="train",
                    days_apart=3, mr_files=(url,), ct_files=(url.replace("mr", "ct"),),
                    mr_series_uid="1.2.826.0.1.3680043.9.7.123456", ct_series_uid="1.2.826.0.1.3680043.9.7.654321")
    batch = Batch(4, [(url, 1234)])
    # a cluster started inside the test: its worker processes write to the captured stderr
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster, set_as_default=False) as client:
        (outcome,) = list(DaskExecutor(client, retries=0).run(_fail_naming, [(pair, batch)], key=lambda i: "task"))
    out, err = capfd.readouterr()
    assert "Compute Failed" in err  # the worker did log the failure
    assert outcome.error == "FileNotFoundError: <path> is gone"
    for secret in ("SYN-0007-QWERT", "s3://bucket", "1.2.826.0.1.3680043.9.7"):
        assert secret not in out + err + repr(pair) + repr(batch), secret
    assert "P00000000000000aa" in repr(pair) and "index=4" in repr(batch)
    assert "SYN-0007" not in error_reason(OSError("cannot read /data/SYN-0007-QWERT/ct/1-002.dcm: EIO"))
