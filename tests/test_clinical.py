"""Acceptance on real clinical layouts: a corpus with every layout the generator knows (study per sequence,
sagittal 3D and coronal 2D T1, contrast only in a tag beside a "t1post" decoy, DSC perfusion and DTI in one series
each, a secondary capture, an RT structure set, CT reformats, bone, thick and scout series) is planned as the
manifest says a neuroradiologist would, and the run's store passes the same ground-truth checks as the clean
corpus: registration error against the manifest's transform of the series that should have been chosen (each
series of a session carries its own head motion, so the wrong series shows as millimetres), every pair ok, no
identifier in the store."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import xarray as xr

from mrict_dask.config import Config
from mrict_dask.plan import EXCLUSION_REASONS, make_plan

from .truth import brain_points, series_by_uid, tre_mm

pytestmark = pytest.mark.slow
KEY = b"clinical-key"


@pytest.fixture(scope="module")
def clinical_plan(clinical_corpus):
    from mrict_dask.scan import scan_table

    return make_plan(scan_table(clinical_corpus.url), Config(), KEY)


def test_every_patient_gets_the_manifests_series(clinical_plan, clinical_corpus):
    m, plan = clinical_corpus.manifest, clinical_plan
    assert sorted((p.mr_series_uid, p.ct_series_uid, p.days_apart) for p in plan.pairs) == sorted(
        (p["mr_series_uid"], p["ct_series_uid"], p["days_apart"]) for p in m["expected_pairs"])
    assert sorted((plan.patients[e["patient"]], e["reason"].split(":")[0]) for e in plan.exclusions) == sorted(
        (e["patient_id"], next(r for r in EXCLUSION_REASONS if e["reason"].startswith(r)))
        for e in m["expected_exclusions"])
    truth = series_by_uid(m)
    entries: dict[str, list[dict]] = {}
    for s in plan.series:
        entries.setdefault(s["series_uid"], []).append(s)
    for uid, s in truth.items():
        got = entries[uid]
        assert all(e["reason"] for e in got), got
        if not s.get("candidate", s["usable"]):
            assert all(e["decision"] != "chosen" for e in got), (s["description"], got)
        if s.get("volumes"):  # a 4D series: listed once, with its volume count, never chosen
            (e,) = got
            assert e["volumes"] == s["volumes"] and e["decision"] != "chosen", (s["description"], e)
    # one session per date, whether a site stored it as one study or one per sequence
    for p in m["expected_pairs"]:
        studies = set(p["mr_session_study_uids"])
        sessions = {s["session"] for s in plan.series if s["study_uid"] in studies}
        assert len(sessions) == 1, sessions


def test_export_writes_each_volume_of_a_4d_series_named_by_what_tells_it_apart(clinical_corpus, tmp_path):
    from mrict_dask.export import export_series_command

    truth = series_by_uid(clinical_corpus.manifest)
    four_d = [s for s in truth.values() if s.get("volumes")]
    assert {s["role"] for s in four_d} >= {"perfusion", "dti"}
    for s in four_d:
        out = tmp_path / s["role"]
        summary = export_series_command(clinical_corpus.url, s["series_uid"], str(out / "v.nii.gz"))
        files = sorted(glob.glob(str(out / "*.nii.gz")))
        assert len(files) == len(summary.written) == s["volumes"], (s["role"], summary.describe())
        names = [os.path.basename(f) for f in files]
        assert len(set(names)) == len(names) and all(n.startswith("v_") for n in names), names


def test_run_passes_the_ground_truth_checks(clinical_plan, clinical_corpus, local_cluster, template, tmp_path):
    from distributed import Client

    from mrict_dask.orchestrate import run_pipeline

    out = str(tmp_path / "store.zarr")
    with Client(local_cluster, set_as_default=False) as client:
        summary = run_pipeline(clinical_corpus.url, out, config=Config(), executor=client,
                               pseudonym_key=KEY.decode())
    assert summary.ok == summary.n_pairs == len(clinical_plan.pairs) > 0, summary.describe()
    ds = xr.open_zarr(out)
    assert list(ds["status"].values) == ["ok"] * summary.n_pairs
    truth = series_by_uid(clinical_corpus.manifest)
    pts = brain_points(template, step=6)
    index = {str(pid): i for i, pid in enumerate(ds["pair"].values)}
    for p in clinical_plan.pairs:
        i = index[p.pair_id]
        for var, uid in (("mr_affine", p.mr_series_uid), ("ct_affine", p.ct_series_uid)):
            mean, worst = tre_mm(np.array(truth[uid]["transform"]), ds[var].values[i], pts)
            assert mean <= 1.0 and worst <= 2.0, (truth[uid]["description"], var, mean, worst)
    blob = b"".join(open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(out) for f in fs)
    for marker in clinical_corpus.manifest["phi_strings"]:
        assert marker.encode() not in blob, marker
