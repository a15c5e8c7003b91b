"""Shared fixtures: template, generated corpora, a real S3 endpoint (moto server), a real PACS (Orthanc), a real
LocalCluster.

Sections: [config] [template] [corpora] [stores] [s3] [dicomweb] [dask]. Everything is generated and seeded; nothing
is downloaded.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass

import pytest

# Threads: tests run on 2 cores next to LocalCluster workers; keep every native pool at one thread.
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


# --------------------------------------------------------------------------------------------- [config]
# End-to-end tests of orchestration, S3, storage faults, resume and privacy (not of accuracy) run the same
# pipeline cheaper: a 2 mm output grid, and registration on a 3 mm working grid without the last levels (at
# the template's resolution, on thick slices) (~4 s per pair instead of ~9 s; every plausibility check still applies).
# Accuracy is asserted at the defaults: test_register.py, test_pair.py and the 1 mm end-to-end run in
# test_run.py (TRE against the generator's transforms).
FAST_SETTINGS = {"grid.spacing": 2.0, "registration.working_spacing_mm": 3.0,
                 "registration.refine_at_template_resolution": False, "registration.ct_refine_mm": 0.0,
                 "registration.thick_slice_mm": 0.0, "native.spacing_mm": 2.0}


NATIVE_BOX = (6, 5, 4)  # x, y, z voxels at 1 mm


def _small_native():
    from mrict_dask.config import load_config

    return load_config(None, {"native.box_mm": [float(v) for v in NATIVE_BOX]})


# stores of synthetic results (tests of the store, the loader, the report): native space on a small box
SMALL_NATIVE = _small_native()


def native_arrays(rng, affine, box=NATIVE_BOX) -> dict:
    """Random native-space arrays of one pair on a small box (x, y, z voxels)."""
    import numpy as np

    nz, ny, nx = box[::-1]
    return {"mr": rng.random((nz, ny, nx), dtype=np.float32), "ct": rng.random((nz, ny, nx), dtype=np.float32),
            "valid": rng.random((nz, ny, nx)) > 0.2, "head": rng.random((nz, ny, nx)) > 0.5,
            "face": rng.random((nz, ny, nx)) > 0.9, "slice_ok": rng.random(nz) > 0.5, "affine": affine}


def fast_config(**overrides):
    from mrict_dask.config import load_config

    return load_config(None, {**FAST_SETTINGS, **overrides})


def fast_config_file(path) -> str:
    """The fast configuration as a YAML file, for the CLI's --config."""
    import yaml

    with open(path, "w") as fh:
        yaml.safe_dump(fast_config().to_dict(), fh)
    return str(path)


def readme_block(section: str, language: str) -> str:
    """The first ``language`` code block of the README's ``## section``, as written there."""
    import re

    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")) as fh:
        readme = fh.read()
    text = readme.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    match = re.search(rf"```{language}\n(.*?)```", text, re.S)
    assert match, f"no {language} block in the README's section {section!r}"
    return match.group(1)


# --------------------------------------------------------------------------------------------- [template]
@pytest.fixture(scope="session")
def template():
    from mrict_dask.template import load_template

    return load_template()


# --------------------------------------------------------------------------------------------- [corpora]
@dataclass
class Corpus:
    url: str  # where the DICOM files are
    manifest: dict  # the generator's ground truth (parsed manifest JSON)
    manifest_url: str


def _shared_dir(tmp_path_factory, name: str, build) -> os.PathLike:
    """A read-only input built once per test session: the first xdist worker to ask builds it (``build(folder)``)
    under a lock in the session's shared temporary folder, the others wait and reuse it."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # every worker's folder sits in the session's one
    root = base / f"shared-{name}"
    with open(base / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".complete").exists():
            shutil.rmtree(root, ignore_errors=True)  # a build cut short
            root.mkdir()
            build(root)
            (root / ".complete").touch()
    return root


def _make_corpus(tmp_path_factory, name: str, **kwargs) -> Corpus:
    import json

    from mrict_dask.synth import generate_corpus

    def build(root):
        generate_corpus(str(root / "dicom"), manifest_url=str(root / "manifest.json"), progress=False, **kwargs)

    root = _shared_dir(tmp_path_factory, name, build)
    url, manifest_url = str(root / "dicom"), str(root / "manifest.json")
    with open(manifest_url) as fh:
        manifest = json.load(fh)
    return Corpus(url=url, manifest=manifest, manifest_url=manifest_url)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Corpus:
    """A clean corpus: 4 patients, no quirks."""
    return _make_corpus(tmp_path_factory, "corpus", patients=4, seed=11)


@pytest.fixture(scope="session")
def quirky_corpus(tmp_path_factory) -> Corpus:
    """Every quirk switch on."""
    from mrict_dask.synth import QUIRKS

    return _make_corpus(tmp_path_factory, "quirky", patients=4, seed=23, quirks=tuple(QUIRKS))


@pytest.fixture(scope="session")
def clinical_corpus(tmp_path_factory) -> Corpus:
    """Every clinical layout (LAYOUT_QUIRKS) on three paired patients (pair, two_ct, two_mr): 3 expected pairs.

    Seed 5 draws the harder variants: DSC time points told apart only by AcquisitionTime, Siemens
    private diffusion tags, a CT scout whose ImageType does not say LOCALIZER. Patient 0's CT study is untouched
    (byte-identical to the clean corpus of seed 5). About 2,500 files, 470 MB, 40 s to generate."""
    from mrict_dask.synth import LAYOUT_QUIRKS

    return _make_corpus(tmp_path_factory, "clinical", patients=3, seed=5, quirks=LAYOUT_QUIRKS,
                        scenarios=("pair", "two_ct", "two_mr"))


@pytest.fixture(scope="session")
def one_patient(corpus, tmp_path_factory):
    """The first patient of the shared synthetic corpus (one expected pair), as its own input folder."""
    pid = corpus.manifest["expected_pairs"][0]["patient_id"]
    expected = [(p["mr_series_uid"], p["ct_series_uid"]) for p in corpus.manifest["expected_pairs"]
                if p["patient_id"] == pid]
    root = tmp_path_factory.mktemp("one_patient")
    shutil.copytree(os.path.join(corpus.url, pid), root / pid)
    return str(root), expected


# --------------------------------------------------------------------------------------------- [stores]
STORE_KEY = "test-key"


@pytest.fixture(scope="session")
def pipeline_store(corpus, local_cluster, tmp_path_factory) -> str:
    """The shared corpus through the whole job (fast settings) on the LocalCluster: a store of 2 ok pairs in template
    and native space (2 mm), one patient in train and one in val (split ratios 1:1:0 under the test key), its work
    area beside it."""
    from distributed import Client

    from mrict_dask.orchestrate import run_pipeline

    def build(root):
        with Client(local_cluster, set_as_default=False) as client:
            summary = run_pipeline(corpus.url, str(root / "store.zarr"),
                                   config=fast_config(**{"plan.split_ratios": [0.5, 0.5, 0.0]}), executor=client,
                                   pseudonym_key=STORE_KEY)
        assert summary.ok == summary.n_pairs == 2, summary.describe()

    return str(_shared_dir(tmp_path_factory, "pipeline", build) / "store.zarr")  # tests only read it


@pytest.fixture(scope="session")
def oblique_store(pipeline_store, tmp_path_factory) -> str:
    """A copy of ``pipeline_store`` whose pair 1 lies on an oblique, left-handed native grid (tests/native_contract.py):
    for testing how readers handle any native geometry; pair 0 is the pipeline's own."""
    from .native_contract import make_oblique_copy

    out = str(tmp_path_factory.mktemp("oblique") / "store.zarr")
    make_oblique_copy(pipeline_store, out)
    return out


@pytest.fixture(scope="session")
def old_store(tmp_path_factory) -> tuple[str, list[str]]:
    """A store as format 1 wrote them, template space only and without head or face masks: synthetic results through
    the store's own API (native space off), the masks taken out. Returns its URL and pair ids."""
    import json
    import warnings

    import zarr

    from mrict_dask import store
    from mrict_dask.config import load_config

    from .test_store import make_pairs, make_result, small_template

    url = str(tmp_path_factory.mktemp("format1") / "store.zarr")
    t = small_template()
    pairs = make_pairs(2)
    store.open_or_create_store(url, pairs, t, load_config(None, {"native.enabled": False}))
    for p in pairs:
        store.write_pair(url, p.index, make_result(p, t.shape_zyx))
    store.finalize_store(url)
    for name in ("head", "face"):
        shutil.rmtree(os.path.join(url, name))
    with open(os.path.join(url, "zarr.json")) as fh:
        node = json.load(fh)
    node["attributes"].pop("pair_arrays")
    node["attributes"]["mrict_dask_store"] = 1
    with open(os.path.join(url, "zarr.json"), "w") as fh:
        json.dump(node, fh)
    with warnings.catch_warnings():  # zarr: consolidated metadata is not in the Zarr v3 specification yet
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(url)
    return url, [p.pair_id for p in pairs]


# --------------------------------------------------------------------------------------------- [s3]
@dataclass
class S3:
    endpoint: str
    bucket: str
    storage_options: dict

    def url(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, *[p.strip("/") for p in parts]])

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint on 127.0.0.1: moto's standalone server as a subprocess."""
    from mrict_dask.testing import moto_server

    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_endpoint, monkeypatch) -> S3:
    """A fresh, empty bucket on the local S3 endpoint (the server is reset for each test)."""
    from mrict_dask.testing import reset_moto, s3_options

    reset_moto(s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    so = s3_options(s3_endpoint)
    s = S3(endpoint=s3_endpoint, bucket="mrict-test", storage_options=so)
    s.fs().mkdir("mrict-test")
    return s


def upload_tree(local_dir: str, s3: S3, prefix: str) -> str:
    """Copy a local folder to s3://bucket/prefix and return that URL."""
    fs = s3.fs()
    fs.put(local_dir.rstrip("/") + "/", s3.url(prefix) + "/", recursive=True)
    return s3.url(prefix)


# --------------------------------------------------------------------------------------------- [dicomweb]
PACS_USER, PACS_PASSWORD = "mrict-reader", "pacs-Secret-7xQ2"


def _orthanc(folder: str):
    from mrict_dask.testing import OrthancServer, orthanc_missing

    why = orthanc_missing()
    if why:
        pytest.skip(f"no Orthanc PACS here: {why}")
    return OrthancServer(folder, PACS_USER, PACS_PASSWORD)


@pytest.fixture(scope="session")
def orthanc(corpus, tmp_path_factory):
    """A real Orthanc PACS (DICOMweb plugin, basic auth) holding the shared corpus. Tests never change it."""
    with _orthanc(str(tmp_path_factory.mktemp("orthanc"))) as server:
        server.upload_tree(corpus.url)
        yield server


@pytest.fixture
def small_orthanc(one_patient, tmp_path):
    """A fresh Orthanc holding one patient (one pair), for tests that change, stop or restart the server."""
    with _orthanc(str(tmp_path / "orthanc")) as server:
        server.upload_tree(one_patient[0])
        yield server


@pytest.fixture
def pacs_credentials(monkeypatch):
    """The PACS user and password in the environment, as the CLI and its workers read them."""
    monkeypatch.setenv("MRICT_DICOMWEB_USER", PACS_USER)
    monkeypatch.setenv("MRICT_DICOMWEB_PASSWORD", PACS_PASSWORD)
    monkeypatch.delenv("MRICT_DICOMWEB_TOKEN", raising=False)
    return PACS_USER, PACS_PASSWORD


# --------------------------------------------------------------------------------------------- [summary]
# Counters that the fuzz and storage-fault modules fill as they run (each test asserts that nothing was lost):
# printed once at the end of the session, so the trust figures in the README come from a real run.
_COUNTERS = (("tests.test_fuzz", "COUNTS", "fuzz cases tried"),
             ("tests.test_storage_faults", "TOTAL", "storage faults injected"))


# Modules whose tests share nothing heavier than the session's fixtures: xdist spreads their tests over the workers;
# every other module runs whole on one worker (its module fixtures, e.g. a pipeline run, are built once). A test that
# must follow another one on the same worker names their shared group itself (pytest.mark.xdist_group).
SPREAD_MODULES = {"tests.test_storage_faults", "tests.test_privacy", "tests.test_fuzz"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__
        if item.get_closest_marker("xdist_group"):
            continue
        item.add_marker(pytest.mark.xdist_group(item.nodeid if module in SPREAD_MODULES else module))


def _counters() -> dict[str, dict[str, int]]:
    return {label: dict(getattr(sys.modules.get(module), name, None) or {}) for module, name, label in _COUNTERS}


def pytest_sessionfinish(session):
    if hasattr(session.config, "workeroutput"):  # an xdist worker: hand its counts to the controller
        session.config.workeroutput["counters"] = _counters()


_WORKER_COUNTS: list[dict[str, dict[str, int]]] = []


def pytest_testnodedown(node, error):  # the xdist controller, as each worker ends
    _WORKER_COUNTS.append(getattr(node, "workeroutput", {}).get("counters", {}))


def pytest_terminal_summary(terminalreporter):
    from collections import Counter

    totals: dict[str, Counter] = {}
    for counts in [_counters(), *_WORKER_COUNTS]:
        for label, by_kind in counts.items():
            totals.setdefault(label, Counter()).update(by_kind)
    for label, counts in totals.items():
        if counts:
            terminalreporter.write_line(f"{label}: {sum(counts.values())} ({dict(sorted(counts.items()))})")


# --------------------------------------------------------------------------------------------- [dask]
@pytest.fixture(autouse=True)
def _default_dask_scheduler():
    """Each test starts and ends with dask's default scheduler, whatever Client a test opened (xarray's
    `.values` on a store computes with it; a leftover 'dask.distributed' setting without a live Client fails)."""
    import dask

    before = dask.config.get("scheduler", None)
    yield
    dask.config.set(scheduler=before)


@pytest.fixture(scope="session")
def local_cluster():
    """A real LocalCluster: 2 worker processes, 1 thread each."""
    from distributed import LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                           memory_limit="4GiB")
    yield cluster
    cluster.close()


@pytest.fixture
def client(local_cluster):
    from distributed import Client

    with Client(local_cluster, set_as_default=False) as c:
        yield c
