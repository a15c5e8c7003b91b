"""Smoke-run a built image the way the Helm chart runs it, without a Kubernetes cluster.

Renders helm/mrict-dask with the real Helm engine, builds the pods with the dask-kubernetes operator's own
functions, then starts the scheduler, one worker and the job runner as Docker containers on the host network,
with the rendered args, env and pipeline config (standing in for kubelet: `$(VAR)` expansion, the ConfigMap
mount, the Secret references). Storage is a moto S3 server on the host holding a synthetic corpus.

    python deploy/smoke_image.py IMAGE [--patients 2] [--limit 1]

Needs: a Docker daemon, the image built from deploy/Dockerfile, and the test extra (`pip install -e ".[test]"`).
Exit 0 when the run ends with a store and a report in S3.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SECRET_VALUES = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}  # moto accepts any


def _render(image: str, endpoint: str, limit: int) -> dict:
    import helm_python as helm

    repo, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "latest")
    values = {
        "image": {"repository": repo, "tag": tag, "pullPolicy": "Never"},
        "inputUrl": "s3://smoke-in/dicom", "outputUrl": "s3://smoke-out/store.zarr",
        "run": {"limit": limit, "connectTimeout": "120s"},
        "config": {"grid": {"spacing": 2.0}},
        "s3": {"endpoint": endpoint, "region": "us-east-1", "credentialsSecret": "smoke-s3"},
        "worker": {"replicas": 1, "threads": 1, "memoryLimit": "4GiB"},
        "securityContext": {"readOnlyRootFilesystem": True},
    }
    with helm.Chart.load(ROOT / "helm" / "mrict-dask") as chart:
        out = chart.render(values, name="smoke", namespace="default", is_install=True)
    docs = {}
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if isinstance(doc, dict) and "kind" in doc:
                docs[doc["kind"]] = doc
    return docs


def _docker_args(pod_spec: dict, env_overrides: dict[str, str], config_dir: str | None) -> list[str]:
    """`docker run` options and command for the pod's single container, as kubelet would start it."""
    (c,) = pod_spec["containers"]
    env: dict[str, str] = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            env[e["name"]] = SECRET_VALUES[e["name"]]
    env.update(env_overrides)
    # kubelet expands $(VAR) in args from the container's environment
    args = [re.sub(r"\$\(([A-Z_][A-Z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in c["args"]]
    opts = ["--network", "host", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
    if c.get("securityContext", {}).get("readOnlyRootFilesystem"):
        opts += ["--read-only"]
    opts += ["--tmpfs", "/tmp:rw,exec,size=4g,uid=10001,gid=10001"]
    if config_dir:
        opts += ["-v", f"{config_dir}:/etc/mrict-dask:ro"]
    for k, v in env.items():
        opts += ["-e", f"{k}={v}"]
    return [*opts, c["image"], *args]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image")
    ap.add_argument("--patients", type=int, default=2)
    ap.add_argument("--limit", type=int, default=1)
    opts = ap.parse_args()

    from dask_kubernetes.operator.controller import controller as op

    from mrict_dask.testing import moto_server

    sched_port = 8786
    containers: list[str] = []
    with contextlib.ExitStack() as stack:
        endpoint = stack.enter_context(moto_server())
        stack.callback(lambda: [subprocess.run(["docker", "rm", "-f", cid], capture_output=True)
                                for cid in containers])
        host_env = {**os.environ, **SECRET_VALUES, "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
        os.environ.update({k: v for k, v in host_env.items() if k.startswith("AWS_")})
        import s3fs

        fs = s3fs.S3FileSystem()
        for bucket in ("smoke-in", "smoke-out"):
            fs.mkdir(bucket)
        subprocess.run([sys.executable, "-m", "mrict_dask.cli", "synth", "s3://smoke-in/dicom",
                        "--patients", str(opts.patients), "--manifest", "/dev/null"], env=host_env, check=True)

        docs = _render(opts.image, endpoint, opts.limit)
        job = docs["DaskJob"]
        cluster = job["spec"]["cluster"]["spec"]
        address = {"DASK_SCHEDULER_ADDRESS": f"tcp://127.0.0.1:{sched_port}"}
        scheduler = op.build_scheduler_deployment_spec("smoke", cluster["scheduler"]["spec"], {}, {})
        worker = op.build_worker_deployment_spec("smoke-default", "default", "smoke", "0000000000",
                                                 cluster["worker"]["spec"], {}, {})
        runner = op.build_job_pod_spec("smoke", "smoke", "default", job["spec"]["job"]["spec"], {}, {})

        config_dir = tempfile.mkdtemp()
        Path(config_dir, "pipeline.yaml").write_text(docs["ConfigMap"]["data"]["pipeline.yaml"])
        os.chmod(config_dir, 0o755)

        def start(name: str, pod: dict, env: dict, cfg: str | None = None) -> str:
            cid = subprocess.run(["docker", "run", "-d", "--name", f"mrict-smoke-{name}",
                                  *_docker_args(pod, env, cfg)], check=True, capture_output=True,
                                 text=True).stdout.strip()
            containers.append(cid)
            return cid

        start("scheduler", scheduler["spec"]["template"]["spec"], address)
        start("worker", worker["spec"]["template"]["spec"], {**address, "DASK_WORKER_NAME": "smoke-worker-0"})
        t0 = time.time()
        runner_id = start("runner", runner["spec"], address, config_dir)
        code = int(subprocess.run(["docker", "wait", runner_id], capture_output=True, text=True).stdout.strip())
        print(f"runner exited {code} after {time.time() - t0:.0f} s")
        subprocess.run(["docker", "logs", "--tail", "40", runner_id])

        fs.invalidate_cache()
        have_report = fs.exists("smoke-out/store.zarr-report/report.html")
        import xarray as xr

        status = [str(s) for s in xr.open_zarr("s3://smoke-out/store.zarr")["status"].values]
        print(f"pair status in the store: {status}  report: {have_report}")
        return 0 if code == 0 and have_report and status and all(s == "ok" for s in status) else 1


if __name__ == "__main__":
    sys.exit(main())
