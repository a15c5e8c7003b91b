"""Faults against real `dask scheduler` / `dask worker` processes: a worker killed mid-run loses no pair."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from mrict_dask.config import Config, GridConfig
from mrict_dask.orchestrate import run_pipeline
from mrict_dask.testing import free_port as _free_port

pytestmark = pytest.mark.slow

FAST = Config(grid=GridConfig(spacing=2.0))


def _dask_exe() -> str:
    return shutil.which("dask") or os.path.join(os.path.dirname(sys.executable), "dask")


class RealCluster:
    """`dask scheduler` and N `dask worker` processes, each in its own process group so it can be killed whole."""

    def __init__(self, n_workers: int = 2):
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS="1", OMP_NUM_THREADS="1")
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True, "env": env}
        self.scheduler = subprocess.Popen([_dask_exe(), "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                                           "--no-dashboard"], **quiet)
        self.workers = [subprocess.Popen([_dask_exe(), "worker", self.address, "--nthreads", "1", "--nworkers", "1",
                                          "--memory-limit", "4GiB", "--no-dashboard"], **quiet)
                        for _ in range(n_workers)]
        self._wait_for_workers(n_workers)

    def _wait_for_workers(self, n: int) -> None:
        from distributed import Client

        with Client(self.address, timeout=60, set_as_default=False) as c:
            c.wait_for_workers(n, timeout=120)

    def kill_worker_with_pid(self, pid: int) -> None:
        """Kill the `dask worker` process group (nanny and worker) holding the worker process ``pid``."""
        group = os.getpgid(pid)
        (proc,) = [p for p in self.workers if p.pid == group]
        os.killpg(group, signal.SIGKILL)
        proc.wait()

    def close(self) -> None:
        for p in [*self.workers, self.scheduler]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in [*self.workers, self.scheduler]:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def test_worker_killed_mid_run_loses_nothing(corpus, tmp_path):
    from distributed import Client

    from mrict_dask.store import completed_pairs, verify_store

    cluster = RealCluster(2)
    out = str(tmp_path / "store.zarr")
    killed = threading.Event()

    def killer():
        # kill the worker that is computing a pair, a few seconds into it, so the kill lands mid-pair
        from distributed import Client

        with Client(cluster.address, set_as_default=False) as c:
            deadline = time.time() + 300
            while time.time() < deadline:
                busy = [w for w, keys in c.processing().items() if keys]
                if busy:
                    time.sleep(3)
                    pid = c.run(os.getpid, workers=[busy[0]])[busy[0]]
                    cluster.kill_worker_with_pid(pid)
                    killed.set()
                    return
                time.sleep(0.2)

    try:
        t = threading.Thread(target=killer, daemon=True)
        t.start()
        with Client(cluster.address, set_as_default=False) as client:
            summary = run_pipeline(corpus.url, out, config=FAST, executor=client, pseudonym_key="k")
        t.join(5)
        assert killed.is_set()
        markers = completed_pairs(out)
        assert sorted(markers) == list(range(summary.n_pairs))
        assert all(m["status"] == "ok" for m in markers.values()), markers
        assert verify_store(out).ok
    finally:
        cluster.close()
