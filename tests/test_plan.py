"""Plan: series selection, MR/CT pairing, exclusions with reasons, patient-level split, plan JSON and CLI.

Catalogs here are built row by row as the scan writes them (header facts only: planning never reads pixels);
the synthetic corpus tests compare the plan with the generator's manifest.
"""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from mrict_dask.config import Config, PlanConfig
from mrict_dask.plan import EXCLUSION_REASONS, Plan, make_plan, plan_to_json, split_of
from mrict_dask.pseudonym import pseudonym, short_hash

KEY = b"test-key"
_uid = itertools.count(1)


def uid() -> str:
    return f"1.2.826.0.1.3680043.9.7.{next(_uid)}"


AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
SAGITTAL = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]


def series_rows(patient: str, study: str, date: str, modality: str, desc: str, *, n=40, step=4.0, number=1,
                iop=AXIAL, rows=256, cols=256, ps=(0.9, 0.9), image_type=r"ORIGINAL\PRIMARY\AXIAL", kernel="",
                te=None, tr=None, ti=None, contrast="", series_uid=None, folder=None, **extra) -> list[dict]:
    series_uid = series_uid or uid()
    r, c = np.array(iop[:3]), np.array(iop[3:])
    nrm = np.cross(r, c)
    out = []
    for k in range(n):
        pos = np.array([-115.0, -115.0, -60.0]) + k * step * nrm
        out.append({
            "url": f"/data/{folder or patient}/{study[-4:]}/{series_uid[-6:]}/{k:04d}.dcm", "size": 1000,
            "read_error": "", "is_dicomdir": False, "sop_class_uid": "1.2.840.10008.5.1.4.1.1." +
            ("2" if modality == "CT" else "4"), "sop_instance_uid": uid(), "series_uid": series_uid,
            "study_uid": study, "patient_id": patient, "modality": modality, "study_date": date,
            "series_description": desc, "series_number": number, "image_type": image_type,
            "instance_number": k + 1, "image_position": list(pos), "image_orientation": list(iop),
            "pixel_spacing": list(ps), "slice_thickness": step, "rows": rows, "columns": cols,
            "number_of_frames": None, "acquisition_number": 1, "echo_time": te, "echo_numbers": None,
            "repetition_time": tr, "inversion_time": ti, "contrast_agent": contrast, "convolution_kernel": kernel,
            "body_part": "HEAD", "frame_positions": None, "pixel_data_ok": True, **extra,
        })
    return out


def catalog(*series: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([r for s in series for r in s])


def decisions(plan: Plan) -> dict[str, tuple[str, str]]:
    return {s["description"]: (s["decision"], s["reason"]) for s in plan.series}


# --------------------------------------------------------------------------------------------- selection
def test_mr_selection_prefers_t1_post_contrast_then_thin_slices_any_orientation_and_says_why():
    st = uid()
    cat = catalog(
        series_rows("A", st, "20200101", "MR", "AX T1 POST GD", step=3.0, n=50, number=5),
        series_rows("A", st, "20200101", "MR", "AX T1 POST GD thin", step=1.0, n=150, number=6),
        series_rows("A", st, "20200101", "MR", "AX T1 pre", step=1.0, n=150, number=3),
        series_rows("A", st, "20200101", "MR", "AX T2 FSE", step=5.0, n=30, number=4, te=100, tr=4000),
        series_rows("A", st, "20200101", "MR", "AX FLAIR", step=5.0, n=30, number=7, ti=2500, te=120, tr=9000),
        series_rows("A", st, "20200101", "MR", "3-pl loc", step=10.0, n=3, number=1,
                    image_type=r"ORIGINAL\PRIMARY\LOCALIZER"),
        series_rows("A", st, "20200101", "MR", "SAG T1 POST", step=1.0, n=150, number=8, iop=SAGITTAL),
        series_rows("A", uid(), "20200110", "CT", "HEAD STD", step=2.5, n=60, number=2, kernel="STANDARD"),
    )
    plan = make_plan(cat, Config(), KEY)
    d = decisions(plan)
    assert d["AX T1 POST GD thin"][0] == "chosen"
    # every T1 is ranked in the session, whatever its orientation: post-contrast, then the finer voxel
    ranks = {s["description"]: s["rank"] for s in plan.series}
    assert [ranks[k] for k in ("AX T1 POST GD thin", "SAG T1 POST", "AX T1 POST GD", "AX T1 pre")] == [1, 2, 3, 4]
    assert d["AX T1 POST GD"][0] == "not chosen"
    assert "ranked 3 of 4 in MR session 1, below series #6" in d["AX T1 POST GD"][1]
    assert "voxel 0.90x0.90x3.00 mm" in d["AX T1 POST GD"][1]
    assert d["AX T1 pre"][0] == "not chosen" and "no contrast agent" in d["AX T1 pre"][1]
    assert d["SAG T1 POST"][0] == "not chosen" and "sagittal" in d["SAG T1 POST"][1]
    assert d["AX T2 FSE"] == ("not chosen", "not T1-weighted by the selection rules (description and sequence tags)")
    assert d["AX FLAIR"][0] == "not chosen"
    assert d["3-pl loc"][0] == "refused" and d["3-pl loc"][1].startswith("localizer")
    assert all(s["reason"] for s in plan.series)
    assert {s["session"] for s in plan.series} == {"MR session 1", "CT session 1"}
    assert len(plan.pairs) == 1 and len(plan.pairs[0].mr_files) == 150


def test_mr_weighting_and_contrast_from_sequence_tags():
    st = uid()
    cat = catalog(
        series_rows("A", st, "20200101", "MR", "AX 3D", step=1.0, n=150, number=3, te=3.0, tr=8.0),
        series_rows("A", st, "20200101", "MR", "AX 3D", step=1.2, n=140, number=9, te=3.0, tr=8.0, contrast="GADAVIST"),
        series_rows("A", st, "20200101", "MR", "AX SE", step=5.0, n=30, number=4, te=90.0, tr=3000.0),
        series_rows("A", uid(), "20200102", "CT", "HEAD", step=5.0, n=30, number=2),
    )
    plan = make_plan(cat, Config(), KEY)
    chosen = [s for s in plan.series if s["decision"] == "chosen" and s["modality"] == "MR"]
    assert [s["series_number"] for s in chosen] == [9]  # post-contrast by tag outranks thinner pre-contrast
    assert "T1-weighted by its sequence tags (TR 8 ms, TE 3 ms)" in chosen[0]["reason"]
    assert "post-contrast (ContrastBolusAgent set)" in chosen[0]["evidence"]
    se = next(s for s in plan.series if s["series_number"] == 4)
    assert se["reason"].startswith("not T1-weighted")


def test_ct_selection_soft_kernel_thinnest_no_scout():
    st = uid()
    cat = catalog(
        series_rows("A", uid(), "20200101", "MR", "T1 post", step=1.0, n=150, number=1),
        series_rows("A", st, "20200105", "CT", "Topogram", step=1.0, n=1, number=1, iop=[1, 0, 0, 0, 0, -1],
                    image_type=r"ORIGINAL\PRIMARY\LOCALIZER"),
        series_rows("A", st, "20200105", "CT", "Head 5mm", step=5.0, n=30, number=2, kernel="H30s"),
        series_rows("A", st, "20200105", "CT", "Head 1mm bone recon", step=1.0, n=150, number=3, kernel="H70h"),
        series_rows("A", st, "20200105", "CT", "Head 1mm sharp", step=1.0, n=150, number=4, kernel="BONEPLUS"),
        series_rows("A", st, "20200105", "CT", "Head 2mm", step=2.0, n=75, number=5, kernel="STANDARD"),
        series_rows("A", st, "20200105", "CT", "Dose Report", step=1.0, n=1, number=999,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.88.67", rows=None, columns=None),
    )
    plan = make_plan(cat, Config(), KEY)
    d = decisions(plan)
    assert d["Head 2mm"][0] == "chosen"
    assert d["Head 5mm"][0] == "not chosen" and "below series #5" in d["Head 5mm"][1]
    # soft tissue before thinness: the thinner bone-kernel reconstructions rank after both soft-tissue ones
    ranks = {s["description"]: s["rank"] for s in plan.series}
    assert ranks["Head 2mm"] == 1 and ranks["Head 5mm"] == 2
    assert {ranks["Head 1mm bone recon"], ranks["Head 1mm sharp"]} == {3, 4}
    assert "bone/sharp kernel 'H70h'" in d["Head 1mm bone recon"][1]
    assert "bone/sharp kernel 'BONEPLUS'" in d["Head 1mm sharp"][1]
    assert d["Topogram"][0] == "refused" and d["Topogram"][1].startswith("localizer")
    assert d["Dose Report"][0] == "refused"
    assert plan.pairs[0].ct_files[0].startswith("/data/A/")


# --------------------------------------------------------------------------------------------- pairing
def _patient(pid: str, mr_dates=(), ct_dates=(), mr_desc="AX T1 POST", ct_desc="HEAD"):
    out = []
    for d in mr_dates:
        out.append(series_rows(pid, uid(), d, "MR", mr_desc, step=2.0, n=40, number=3))
    for d in ct_dates:
        out.append(series_rows(pid, uid(), d, "CT", ct_desc, step=4.0, n=20, number=2))
    return out


def test_pairing_closest_studies_and_every_exclusion_reason():
    cat = catalog(
        *_patient("pair-close", mr_dates=["20200101", "20200301"], ct_dates=["20200310"]),
        *_patient("too-far", mr_dates=["20200101"], ct_dates=["20210101"]),
        *_patient("mr-only", mr_dates=["20200101"]),
        *_patient("ct-only", ct_dates=["20200101"]),
        *_patient("no-t1", mr_dates=["20200101"], ct_dates=["20200102"], mr_desc="AX FLAIR"),
        *_patient("scout-only", mr_dates=["20200101"], ct_dates=[]),
        series_rows("scout-only", uid(), "20200102", "CT", "Scout", n=2, step=1.0, iop=[1, 0, 0, 0, 0, -1],
                    image_type=r"ORIGINAL\PRIMARY\LOCALIZER"),
        *_patient("ct-before-mr", mr_dates=["20200601"], ct_dates=["20200520"]),
    )
    plan = make_plan(cat, Config(), KEY)
    ps = {pid: pseudonym(KEY, pid) for pid in cat["patient_id"].unique()}
    exc = {e["patient"]: e["reason"] for e in plan.exclusions}
    assert exc[ps["too-far"]].startswith("too far apart: ") and "366 days" in exc[ps["too-far"]]
    assert exc[ps["mr-only"]] == "no CT study"
    assert exc[ps["ct-only"]] == "no MR study"
    assert exc[ps["no-t1"]].startswith("no usable MR series: ")
    assert exc[ps["scout-only"]].startswith("no usable CT series: ")
    assert all(r.split(":")[0] in EXCLUSION_REASONS for r in exc.values())
    pairs = {p.patient: p for p in plan.pairs}
    assert set(pairs) == {ps["pair-close"], ps["ct-before-mr"]}
    assert pairs[ps["pair-close"]].days_apart == 9  # the later MR study is the closer one
    assert pairs[ps["ct-before-mr"]].days_apart == -12  # CT date minus MR date
    # every patient is accounted for exactly once: a pair or an exclusion
    assert set(pairs) | set(exc) == set(ps.values()) and not set(pairs) & set(exc)
    # the other MR study of the paired patient says why it was not used
    mr = [s for s in plan.series if s["patient"] == ps["pair-close"] and s["modality"] == "MR"]
    assert sorted(s["decision"] for s in mr) == ["chosen", "not chosen"]
    assert "another session pairs closer in time" in next(s["reason"] for s in mr if s["decision"] == "not chosen")


def test_max_days_and_pair_all_options():
    cat = catalog(*_patient("p", mr_dates=["20200101", "20200201"], ct_dates=["20200110", "20200401"]))
    assert len(make_plan(cat, Config(), KEY).pairs) == 1
    everything = make_plan(cat, Config(plan=PlanConfig(pair_all=True)), KEY)
    assert sorted(p.days_apart for p in everything.pairs) == [-22, 9, 60, 91]
    assert len({p.pair_id for p in everything.pairs}) == 4
    assert len({p.split for p in everything.pairs}) == 1  # one patient, one split
    strict = make_plan(cat, Config(plan=PlanConfig(max_days=5)), KEY)
    assert strict.pairs == [] and strict.exclusions[0]["reason"].startswith("too far apart")


def test_pair_ids_indices_and_plan_json_round_trip(tmp_path):
    cat = catalog(*itertools.chain.from_iterable(
        _patient(f"PAT{i:03d}", mr_dates=["20190101"], ct_dates=["20190115"]) for i in range(12)))
    plan = make_plan(cat, Config(), KEY)
    assert [p.index for p in plan.pairs] == list(range(12))
    assert [p.pair_id for p in plan.pairs] == sorted(p.pair_id for p in plan.pairs)
    for p in plan.pairs:
        assert p.pair_id == p.patient + "-" + short_hash(KEY, p.mr_series_uid, p.ct_series_uid)
        assert p.patient == pseudonym(KEY, plan.patients[p.patient])
        assert "PAT" not in p.pair_id
        assert list(p.mr_files) == sorted(p.mr_files)  # here file names follow position: spatial order
    again = Plan.from_json(plan.to_json())
    assert again.pairs == plan.pairs and again.exclusions == plan.exclusions and again.series == plan.series
    assert make_plan(cat.sample(frac=1.0, random_state=3), Config(), KEY).to_json() == plan.to_json()


def test_summary_holds_no_patient_ids_dates_or_uids():
    cat = catalog(*_patient("SECRET-ID-42", mr_dates=["20200101"], ct_dates=["20200115"]),
                  *_patient("OTHER-ID-7", mr_dates=["20200101"]))
    plan = make_plan(cat, Config(), KEY)
    text = plan.summary()
    for secret in ("SECRET-ID-42", "OTHER-ID-7", "2020", "1.2.826.0.1"):
        assert secret not in text
    assert "1 pair(s)" in text and "no CT study" in text
    for s in plan.series:  # what the report shows of each series decision
        for k in ("patient", "modality", "description", "decision", "reason"):
            assert "SECRET" not in str(s[k]) and "1.2.826.0.1" not in str(s[k])


def test_files_with_errors_reported_and_never_used():
    rows = series_rows("A", uid(), "20200101", "MR", "T1 post", step=1.0, n=150)
    rows[0]["read_error"] = "truncated: pixel data has 10 of 131072 bytes"
    junk = {"url": "/data/A/readme.txt", "read_error": "not DICOM: no DICM preamble and no valid dataset",
            "series_uid": None, "patient_id": None}
    cat = catalog(rows, series_rows("A", uid(), "20200102", "CT", "HEAD", step=2.5, n=60), [junk])
    plan = make_plan(cat, Config(), KEY)
    assert sorted(f["reason"].split(":")[0] for f in plan.files_with_errors) == ["not DICOM", "truncated"]
    assert plan.pairs == []  # the MR stack with an unreadable slice is refused, not assembled around the hole
    assert plan.exclusions[0]["reason"].startswith("no usable MR series: ")
    assert "unreadable" in plan.exclusions[0]["reason"]
    assert "files with errors (never used): 2" in plan.summary()


# --------------------------------------------------------------------------------------------- split
def test_split_by_patient_ratios_stable_and_keyed():
    ids = [f"TCGA-{i:02d}-{i * 7919 % 10000:04d}" for i in range(1000)]
    ratios = (0.70, 0.15, 0.15)
    a = [split_of(KEY, p, ratios) for p in ids]
    assert a == [split_of(KEY, p, ratios) for p in ids]  # stable across runs
    counts = pd.Series(a).value_counts(normalize=True)
    for name, r in zip(("train", "val", "test"), ratios):
        assert abs(counts[name] - r) < 0.04, counts.to_dict()
    other = [split_of(b"another-key", p, ratios) for p in ids]
    assert sum(x != y for x, y in zip(a, other)) > 300  # the key, not the ID alone, decides
    b = [split_of(KEY, p, (0.8, 0.1, 0.1)) for p in ids]
    assert abs(pd.Series(b).value_counts(normalize=True)["train"] - 0.8) < 0.04


def test_no_patient_in_two_splits_with_many_pairs_each():
    series = []
    for i in range(60):
        series += _patient(f"P{i}", mr_dates=["20200101", "20200105"], ct_dates=["20200103", "20200104"])
    plan = make_plan(catalog(*series), Config(plan=PlanConfig(pair_all=True)), KEY)
    assert len(plan.pairs) == 240
    per_patient = pd.DataFrame([(p.patient, p.split) for p in plan.pairs]).groupby(0)[1].nunique()
    assert (per_patient == 1).all()
    assert {p.split for p in plan.pairs} == {"train", "val", "test"}


# --------------------------------------------------------------------------------------------- CLI
def test_cli_plan_writes_private_json_and_prints_a_phi_free_summary(tmp_path):
    from mrict_dask.cli import main

    cat = catalog(*_patient("SECRET-9", mr_dates=["20200101"], ct_dates=["20200115"]),
                  *_patient("SECRET-10", ct_dates=["20200115"]))
    cat_url = str(tmp_path / "work" / "catalog.parquet")
    os.makedirs(os.path.dirname(cat_url))
    cat.to_parquet(cat_url)
    out = str(tmp_path / "work" / "plan.json")
    res = CliRunner().invoke(main, ["plan", cat_url, "--out", out, "--pseudonym-key", "k1", "--max-days", "30"])
    assert res.exit_code == 0, res.output
    assert "SECRET" not in res.output and "2020" not in res.output
    assert "1 pair(s)" in res.output and "no MR study" in res.output
    data = json.loads(open(out).read())
    assert data["config"]["max_days"] == 30
    assert data["pairs"][0]["patient"] == pseudonym(b"k1", "SECRET-9")
    assert data["patients"][pseudonym(b"k1", "SECRET-9")] == "SECRET-9"  # private map, in the work area only
    # without a key: a random one is made, kept in the work area, and reused
    res2 = CliRunner().invoke(main, ["plan", cat_url, "--out", out], env={"MRICT_PSEUDONYM_KEY": ""})
    assert res2.exit_code == 0 and "random" in res2.output
    assert os.path.exists(tmp_path / "work" / "pseudonym.key")
    first = json.loads(open(out).read())["pairs"][0]["patient"]
    CliRunner().invoke(main, ["plan", cat_url, "--out", out], env={"MRICT_PSEUDONYM_KEY": ""})
    assert json.loads(open(out).read())["pairs"][0]["patient"] == first


def test_cli_plan_missing_catalog_is_one_clear_error(tmp_path):
    from mrict_dask.cli import main

    res = CliRunner().invoke(main, ["plan", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "p.json")])
    assert res.exit_code == 2 and "catalog not found" in res.output and "Traceback" not in res.output


# --------------------------------------------------------------------------------------------- synthetic corpus
# the generator's words for why a series is unusable -> how our reasons begin
MANIFEST_REASONS = {
    "localizer": ("localizer/scout",),
    "scout": ("localizer/scout",),
    "not an image": ("not a CT/MR image", "no image pixels"),
    "missing slice": ("missing slice",),
}


@pytest.fixture(scope="module")
def clean_plan(corpus):
    from mrict_dask.scan import scan

    cat = scan(corpus.url)
    return corpus, cat, make_plan(cat, Config(), KEY)


@pytest.fixture(scope="module")
def quirky_plan(quirky_corpus):
    from mrict_dask.scan import scan

    cat = scan(quirky_corpus.url)
    return quirky_corpus, cat, make_plan(cat, Config(), KEY)


def _check_against_manifest(c, cat, plan) -> None:
    m = c.manifest
    to_pid = plan.patients
    got_pairs = sorted((to_pid[p.patient], p.mr_series_uid, p.ct_series_uid, p.days_apart) for p in plan.pairs)
    want_pairs = sorted((p["patient_id"], p["mr_series_uid"], p["ct_series_uid"], p["days_apart"])
                        for p in m["expected_pairs"])
    assert got_pairs == want_pairs
    got_exc = sorted((to_pid[e["patient"]], e["reason"].split(":")[0]) for e in plan.exclusions)
    want_exc = sorted((e["patient_id"], next(r for r in EXCLUSION_REASONS if e["reason"].startswith(r)))
                      for e in m["expected_exclusions"])
    assert got_exc == want_exc
    # the chosen stacks hold exactly the manifest's files, in its true spatial order
    series = {s["series_uid"]: s for p in m["patients"] for st in p["studies"] for s in st["series"]}
    for p in plan.pairs:
        for uid, files in ((p.mr_series_uid, p.mr_files), (p.ct_series_uid, p.ct_files)):
            assert [os.path.relpath(f, c.url) for f in files] == series[uid]["files"]
    # every series the generator calls unusable is refused or passed over, with a reason of the same kind
    decided = {}
    for s in plan.series:
        decided.setdefault(s["series_uid"], []).append(s)
    for uid, s in series.items():
        entries = decided[uid]
        assert all(e["reason"] for e in entries)
        if s["usable"]:
            assert any(e["decision"] != "refused" for e in entries), (s["description"], entries)
        else:
            assert all(e["decision"] == "refused" for e in entries), (s["description"], entries)
            kind = next(k for k in MANIFEST_REASONS if s["reason"].startswith(k))
            assert all(e["reason"].startswith(MANIFEST_REASONS[kind]) for e in entries), (s["reason"], entries)
    # every file that is not usable DICOM is reported, and no reported file is in a pair
    bad = {os.path.join(c.url, f["path"]) for f in m["files"] if f["kind"] != "dicom"}
    reported = {f["url"] for f in plan.files_with_errors}
    assert bad <= reported
    used = {f for p in plan.pairs for f in p.mr_files + p.ct_files}
    assert not used & reported


def test_clean_corpus_plan_equals_manifest(clean_plan):
    _check_against_manifest(*clean_plan)


def test_quirky_corpus_plan_equals_manifest(quirky_plan):
    _check_against_manifest(*quirky_plan)


def test_plan_json_from_corpus_is_private_and_summary_is_not(clean_plan, tmp_path):
    c, cat, _ = clean_plan
    cat_url = str(tmp_path / "catalog.parquet")
    cat.to_parquet(cat_url)
    summary = plan_to_json(cat_url, str(tmp_path / "plan.json"), Config(), pseudonym_key="k")
    text = summary.describe()
    phi = c.manifest["phi"]
    for k in ("patient_names", "patient_ids", "birth_dates", "accession_numbers", "institutions",
              "referring_physicians", "study_dates", "uids"):
        for v in phi.get(k, []):
            assert str(v) not in text, k
    data = json.loads(open(tmp_path / "plan.json").read())
    assert {p["patient_id"] for p in c.manifest["expected_pairs"]} <= set(data["patients"].values())


def test_a_study_whose_files_are_all_unreadable_is_named_in_the_exclusion():
    mr = series_rows("A", uid(), "20200101", "MR", "AX T1 POST", step=1.0, n=20, number=2)
    for r in mr:
        r.update(read_error="unreadable: truncated header", series_uid=None)
    plan = make_plan(catalog(mr, series_rows("A", uid(), "20200102", "CT", "HEAD", step=2.5, n=64)), Config(), KEY)
    (e,) = plan.exclusions
    assert e["reason"].startswith("no MR study (20 of the patient's files could not be read"), e
    assert plan.summary().count("no MR study") == 1
