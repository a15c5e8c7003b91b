"""The synthetic corpus tells the truth: geometry, transforms, HU, PHI, pairs, quirks, determinism, dciodvfy, S3.

Every check measures the written files independently (SimpleITK / pydicom / dciodvfy reading them back) and
compares against the manifest or the template, never against the generator's own in-memory arrays.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from mrict_dask.errors import ConfigError
from mrict_dask.synth import LAYOUT_QUIRKS, QUIRKS, generate_corpus, parse_quirks, simulate_patient

from .truth import (
    apply,
    assert_read_back_equals_manifest,
    dciodvfy_errors,
    deep_brain_in_series,
    landmarks_in_series,
    manifest_series,
    ncc_in_template,
    read_series,
    series_by_uid,
    share_inside_brain,
    sitk_affine,
)

ROLES = {"t1c", "t2", "flair", "localizer", "ct", "scout", "sr"}


def days(a: str, b: str) -> int:
    """b - a in days, for DICOM dates."""
    return int((np.datetime64(f"{b[:4]}-{b[4:6]}-{b[6:]}") - np.datetime64(f"{a[:4]}-{a[4:6]}-{a[6:]}")).astype(int))


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
    assert parse_quirks("all") == QUIRKS + LAYOUT_QUIRKS
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
    assert {s["role"] for _, _, s in manifest_series(m)} == ROLES
    in_series = [p for _, _, s in manifest_series(m) for p in s["files"]]
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
        _, _, s = next(manifest_series(corpus.manifest, role))
        assert_read_back_equals_manifest(corpus.url, s)


def test_manifest_transform_places_the_anatomy(corpus, template):
    """The T1c read back, pulled into template space through the manifest transform, lines up with the template:
    the correlation peaks at the manifest transform (sub-voxel) and drops clearly for a 2 mm error."""
    _, _, s = next(manifest_series(corpus.manifest, "t1c"))
    img, _ = read_series(corpus.url, s)
    truth = np.array(s["transform"])
    base = ncc_in_template(img, truth, template)
    assert base > 0.85
    for axis in range(3):
        scores = {}
        for d in (-1.0, 0.0, 1.0):
            shift = np.eye(4)
            shift[axis, 3] = d
            scores[d] = base if d == 0 else ncc_in_template(img, truth @ shift, template)
        # parabola through the three samples: its vertex is where the anatomy really is (relative to the truth)
        denom = scores[-1.0] - 2 * scores[0.0] + scores[1.0]
        assert denom < 0, f"axis {axis}: correlation does not peak near the manifest transform"
        vertex = 0.5 * (scores[-1.0] - scores[1.0]) / denom
        assert abs(vertex) < 0.5, f"axis {axis}: anatomy {vertex:.2f} mm off the manifest transform"
        shift = np.eye(4)
        shift[axis, 3] = 2.0
        assert ncc_in_template(img, truth @ shift, template) < base - 0.03


# ------------------------------------------------------------------------------------------------ values
def test_ct_hounsfield_units_by_tissue(corpus, template):
    _, _, s = next(manifest_series(corpus.manifest, "ct"))
    ds = pydicom.dcmread(os.path.join(corpus.url, s["files"][len(s["files"]) // 2]))
    assert float(ds.RescaleSlope) == s["rescale"]["slope"] == 1
    assert float(ds.RescaleIntercept) == s["rescale"]["intercept"] == -1024
    img, _ = read_series(corpus.url, s)  # GDCM applies the rescale: HU
    hu = sitk.GetArrayFromImage(img)
    padding = s["rescale"]["intercept"] + s["rescale"]["padding_value"]
    assert (hu == padding).any()
    real = hu[hu > padding]
    assert real.min() >= -1100 and 1200 <= real.max() <= 3071  # cortical bone up to ~1800 HU, enamel up to ~2800
    # anything denser than cortical bone is a tooth: behind the upper lip
    k, j, i = np.nonzero(hu > 2100)
    dense = np.array([img.TransformIndexToPhysicalPoint([int(a), int(b), int(c)]) for a, b, c in zip(i, j, k)])
    if len(dense):
        assert np.linalg.norm(dense - s["landmarks"]["upper_lip"], axis=1).max() < 70.0  # molars ~60 mm back
    # tissue classes through the ground-truth transform: brain centre, a point in air far from the head
    warped = sitk.GetArrayFromImage(sitk.Resample(img, template.image, sitk_affine(np.array(s["transform"])),
                                                  sitk.sitkLinear, -2000.0))
    brain = sitk.GetArrayViewFromImage(template.mask) > 0
    assert 15 <= float(np.median(warped[brain])) <= 45
    air = hu[(hu > padding)]
    assert np.percentile(air, 5) < -950  # air around the head is about -1000


def test_phi_tags_equal_the_manifest(corpus):
    m = corpus.manifest
    for p, st, s in manifest_series(m):
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
    img, _ = read_series(corpus.url, mr)
    assert list(sim.mr.GetSize()) == mr["geometry"]["size"]
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(sim.mr), sitk.GetArrayViewFromImage(img))
    r = sim.ct_to_mr[:3, :3]
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-9)  # CT -> MR is rigid


# ------------------------------------------------------------------------------------------------ anatomy
# The face CT (ct_face_neck) and the neck T1 (sagittal_t1_neck) of the clinical corpus, read back as a user would;
# where a landmark or a structure should be comes from the manifest (landmarks, transforms), what is there from the
# voxels.
@pytest.fixture(scope="module")
def face_series(clinical_corpus):
    m = clinical_corpus.manifest
    out = {}
    for quirk, key in (("ct_face_neck", "ct"), ("sagittal_t1_neck", "mr")):
        (e,) = [e for e in m["quirks"] if e["quirk"] == quirk]
        s = series_by_uid(m)[e["series_uid"]]
        img, _ = read_series(clinical_corpus.url, s)
        p = next(p for p in m["patients"] if p["patient_id"] == e["patient_id"])
        img = sitk.Cast(img, sitk.sitkFloat32)
        _, deep = deep_brain_in_series(p, s, depth_mm=10.0, max_points=300)
        brain = float(np.nanmedian([_at(img, q) for q in deep]))  # the brain's typical value in this series
        out[key] = (s, img, brain)
    return out


def _at(img: sitk.Image, point, outside: float = np.nan) -> float:
    idx = np.array(img.TransformPhysicalPointToContinuousIndex([float(v) for v in point]))
    if np.any(idx < 0) or np.any(idx > np.array(img.GetSize()) - 1):
        return outside
    return float(img.EvaluateAtPhysicalPoint([float(v) for v in point], sitk.sitkLinear))


def _toward(s: dict, template_direction) -> np.ndarray:
    """A template direction (LPS) as a unit vector in the series' frame."""
    d = np.asarray(s["transform"])[:3, :3] @ np.asarray(template_direction, float)
    return d / np.linalg.norm(d)


def _holds(img: sitk.Image, point, margin_mm: float = 5.0) -> bool:
    idx = np.array(img.TransformPhysicalPointToContinuousIndex([float(v) for v in point]))
    m = margin_mm / np.array(img.GetSpacing())
    return bool(np.all((idx >= m) & (idx <= np.array(img.GetSize()) - 1 - m)))


def test_landmarks_sit_on_their_tissue(face_series):
    """Eye centres in vitreous (CT ~10 HU; darker than the brain on T1); nose tip, upper lip and chin on the skin:
    tissue at the landmark, air 4 mm in front of it."""
    for key, (s, img, brain) in face_series.items():
        lm = landmarks_in_series(s)
        forward = _toward(s, (0.0, -1.0, 0.0))  # template -y: anterior
        for eye in ("right_eye", "left_eye"):
            v = np.mean([_at(img, lm[eye] + d) for d in np.eye(3) * 2.0])
            assert (-30.0 <= v <= 50.0) if key == "ct" else (v < 0.5 * brain), (key, eye, v, brain)
        for name in ("nose_tip", "upper_lip", "chin"):
            if not _holds(img, lm[name]):
                continue
            tissue, air = _at(img, lm[name]), _at(img, lm[name] + 4.0 * forward)
            if key == "ct":
                assert tissue > -400.0 and air < -850.0, (name, tissue, air)
            else:
                assert tissue > 0.3 * brain and air < 0.08 * brain, (name, tissue, air, brain)


def test_front_render_shows_a_face(face_series, clinical_corpus):
    """Looking at the head from the front (each series pulled into its patient's template frame), the first tissue
    lies at the nose tip, the upper lip and the chin, and nowhere in front of the nose tip."""
    patients = {st["study_uid"]: p for p in clinical_corpus.manifest["patients"] for st in p["studies"]}
    for key, (s, img, brain) in face_series.items():
        p = next(p for p in patients.values() if any(x["series_uid"] == s["series_uid"] for st in p["studies"]
                                                     for x in st["series"]))
        ref = sitk.Image([141, 100, 131], sitk.sitkFloat32)  # x -70..70, y -125..-26 (front to back), z -140..-10
        ref.SetOrigin((-70.0, -125.0, -140.0))
        air = -1000.0 if key == "ct" else 0.0
        front = sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk_affine(s["transform"]), sitk.sitkLinear, air))
        level = -400.0 if key == "ct" else 0.3 * brain
        tissue = front > level
        depth = np.where(tissue.any(axis=1), tissue.argmax(axis=1), 999)  # (z, x): first tissue along +y
        for name in ("nose_tip", "upper_lip", "chin"):
            x, y, z = p["landmarks"][name]
            if not _holds(img, s["landmarks"][name]):
                continue
            seen = depth[int(round(z + 140)), int(round(x + 70))] - 125.0  # y of the first tissue there
            assert abs(seen - y) <= 2.5, (key, name, seen, y)
        nose_y = p["landmarks"]["nose_tip"][1]
        assert depth.min() - 125.0 >= nose_y - 1.5  # nothing of the face stands in front of the nose


def test_neck_has_airway_in_front_of_a_vertebra(face_series):
    """At the upper lip's level (C1-C2), a line from the lip backwards meets a vertebra (bone, 60 mm behind the lip or
    more) with the pharynx (air) in the 40 mm before it; the CT holds teeth (enamel, denser than any bone)."""
    s, img, _ = face_series["ct"]
    lip = landmarks_in_series(s)["upper_lip"]
    back = _toward(s, (0.0, 1.0, 0.0))
    step = 0.5
    hu = np.array([_at(img, lip + t * back, -1000.0) for t in np.arange(0.0, 160.0, step)])
    bone = np.flatnonzero((hu > 400.0) & (np.arange(len(hu)) * step >= 60.0))  # behind the mouth: the spine
    assert len(bone) >= 4, "no vertebra behind the mouth"
    in_front = hu[max(0, bone[0] - int(40.0 / step)):bone[0]]
    assert (in_front < -850.0).sum() * step >= 3.0, "no airway in front of the vertebra"
    assert (sitk.GetArrayViewFromImage(img) > 2100.0).sum() > 50


def test_fat_is_bright_on_t1_and_dark_on_ct(face_series):
    """Behind the neck at the chin's level: subcutaneous fat brighter than the brain on T1, about -100 HU on CT."""
    for key, (s, img, brain) in face_series.items():
        lm = landmarks_in_series(s)
        start = lm["chin"] if _holds(img, lm["chin"], 1.0) else lm["upper_lip"]
        back = _toward(s, (0.0, 1.0, 0.0))
        line = np.array([_at(img, start + t * back) for t in np.arange(0.0, 240.0, 0.5)])
        inside = np.flatnonzero(line > (-400.0 if key == "ct" else 0.15 * brain))
        last = inside.max()  # the skin at the back of the neck
        assert last < len(line) - 1 and np.isfinite(line[last + 1]), "the back of the neck is outside the grid"
        under = line[max(0, last - 30):last - 4]  # 2 to 15 mm under the skin
        if key == "ct":
            assert -140.0 <= np.median(under) <= -60.0, under
        else:
            assert under.max() > 1.15 * brain, (under.max(), brain)


def test_skull_base_closes_the_cranium():
    """Above the foramen magnum, whatever is not bone and connects to the brain's centre stays inside the skull: no
    path to the eyes, the nose, the sinuses or the air around the head."""
    from scipy import ndimage

    from mrict_dask.synth import head
    from mrict_dask.synth.anatomy import tissue_model

    model = tissue_model()
    z = model.index_to_physical(np.c_[np.arange(model.labels.shape[0]), np.zeros((model.labels.shape[0], 2))])[:, 2]
    above = (z >= model.brain_points[:, 2].min() + 3.0)[:, None, None]  # the medulla leaves the skull below this
    open_ = above & ~np.isin(model.labels, (head.CORTICAL, head.CANCELLOUS, head.ENAMEL, head.DENTIN))
    regions, _ = ndimage.label(open_)  # 6-connected: a bone wall one voxel thick closes it

    def region(point) -> int:
        idx = np.rint(model.grid.TransformPhysicalPointToContinuousIndex([float(v) for v in point])).astype(int)
        return int(regions[idx[2], idx[1], idx[0]])

    brain = region(model.center)
    assert brain > 0
    corner = model.index_to_physical(np.array([model.labels.shape[0] - 1, 0, 0], float))  # air above the head
    outside = [model.landmarks["right_eye"], model.landmarks["left_eye"], model.landmarks["nose_tip"] + [0, 3, 0],
               corner]
    assert all(region(p) != brain for p in outside)
    assert (model.labels[regions == brain] == head.AIR).sum() == 0


def test_points_helper_follows_the_manifest(corpus, template):
    """mrict_dask.synth.points agrees with the manifest's landmarks, and its deep-brain points sit in brain tissue of
    the rendered T1; the manifest transform takes them back inside the template brain."""
    m = corpus.manifest
    pair = m["expected_pairs"][0]
    p = next(p for p in m["patients"] if p["patient_id"] == pair["patient_id"])
    s = series_by_uid(m)[pair["mr_series_uid"]]
    from mrict_dask.synth.points import series_landmarks

    for name, v in series_landmarks(p, s).items():
        np.testing.assert_allclose(v, s["landmarks"][name], atol=1e-3)
    ref, pts = deep_brain_in_series(p, s, depth_mm=10.0, max_points=800)
    img, _ = read_series(corpus.url, s)
    img = sitk.Cast(img, sitk.sitkFloat32)
    values = np.array([_at(img, q) for q in pts])
    assert np.mean(values > 0.45 * np.median(values)) >= 0.95  # brain (a lesion's dark core may take a few)
    back = apply(np.linalg.inv(np.asarray(s["transform"])), pts)
    assert np.linalg.norm(back - ref, axis=1).max() <= 3.0  # only the small deformation between them
    assert share_inside_brain(template, back) >= 0.99
    shifted = back + np.array([0.0, 0.0, 25.0])
    assert share_inside_brain(template, shifted) < 0.9


# ------------------------------------------------------------------------------------------------ dciodvfy
@pytest.mark.parametrize("role", ["t1c", "t2", "flair", "localizer", "ct", "scout", "sr"])
def test_dciodvfy_finds_no_errors(corpus, role):
    _, _, s = next(manifest_series(corpus.manifest, role))
    assert dciodvfy_errors(os.path.join(corpus.url, s["files"][len(s["files"]) // 2])) == []


# ------------------------------------------------------------------------------------------------ quirks
@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One clean patient; every single-quirk corpus below uses the same seed and differs only by its quirk."""
    root = tmp_path_factory.mktemp("baseline")
    summary = generate_corpus(str(root / "dicom"), patients=1, seed=5, manifest_url=str(root / "m.json"))
    return str(root / "dicom"), summary.manifest


def _single_quirk(tmp_path, quirk):
    summary = generate_corpus(str(tmp_path / "dicom"), patients=1, seed=5, quirks=(quirk,),
                              manifest_url=str(tmp_path / "m.json"))
    return str(tmp_path / "dicom"), summary.manifest


def _pixels(path: str) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array


@pytest.mark.parametrize("quirk", QUIRKS)
def test_each_quirk_alone_changes_only_what_it_says(baseline, tmp_path, quirk):
    base_root, base_m = baseline
    root, m = _single_quirk(tmp_path, quirk)
    (entry, *more) = m["quirks"]
    assert entry["quirk"] == quirk and all(e["quirk"] == quirk for e in more)
    base = _tree_digest(base_root)
    now = _tree_digest(root)
    touched_series = {e["series_uid"] for e in m["quirks"] if "series_uid" in e}
    base_files_of = {s["series_uid"]: s["files"] for _, _, s in manifest_series(base_m)}
    # outside the touched series, the corpus is byte-identical to the clean one
    untouched = {p for uid, files in base_files_of.items() if uid not in touched_series for p in files}
    assert all(now.get(p) == base[p] for p in untouched)
    assert m["expected_pairs"] == base_m["expected_pairs"]
    series_now = {s["series_uid"]: s for _, _, s in manifest_series(m)}

    if quirk == "missing_slice":
        s = series_now[entry["series_uid"]]
        assert set(base) - set(now) == {entry["missing_path"]} and set(now) <= set(base)
        assert not s["usable"] and "missing slice" in s["reason"]
        assert len(s["files"]) == s["geometry"]["size"][2] - 1
    elif quirk == "duplicate_instance":
        (dup,), (orig,) = entry["files"], entry["duplicate_of"]
        assert set(now) - set(base) == {dup} and now[dup] == now[orig] == base[orig]
        assert series_now[entry["series_uid"]]["usable"]
        assert {f["path"]: f["duplicate_of"] for f in m["files"]}[dup] == orig
    elif quirk == "truncated_file":
        (bad,) = entry["files"]
        assert set(now) == set(base) and {p for p in now if now[p] != base[p]} == {bad}
        data = open(os.path.join(root, bad), "rb").read()
        assert open(os.path.join(base_root, bad), "rb").read().startswith(data)
        ds = pydicom.dcmread(os.path.join(root, bad))  # the header is intact; the pixel data is cut short
        with pytest.raises((ValueError, EOFError)):
            _ = ds.pixel_array
        assert not series_now[entry["series_uid"]]["usable"]
        assert {f["path"]: f["kind"] for f in m["files"]}[bad] == "truncated"
    elif quirk == "non_dicom_file":
        assert set(now) - set(base) == set(entry["files"]) and set(base) <= set(now)
        for p in entry["files"]:
            with pytest.raises(pydicom.errors.InvalidDicomError):
                pydicom.dcmread(os.path.join(root, p))
        assert {f["path"]: f["kind"] for f in m["files"]}.keys() >= set(entry["files"])
    elif quirk == "gantry_tilt":
        _check_tilt(root, series_now[entry["series_uid"]], base_root, base_files_of[entry["series_uid"]],
                    entry["tilt_deg"])
    elif quirk == "compressed":
        syntaxes = {e["transfer_syntax"] for e in m["quirks"]}
        assert str(pydicom.uid.RLELossless) in syntaxes
        for e in m["quirks"]:
            for p in series_now[e["series_uid"]]["files"]:
                ds = pydicom.dcmread(os.path.join(root, p))
                assert ds.file_meta.TransferSyntaxUID == e["transfer_syntax"]
                np.testing.assert_array_equal(ds.pixel_array, _pixels(os.path.join(base_root, p)))
    elif quirk == "shuffled_instance_numbers":
        s = series_now[entry["series_uid"]]
        headers = [pydicom.dcmread(os.path.join(root, p), stop_before_pixels=True) for p in s["files"]]
        numbers = [int(h.InstanceNumber) for h in headers]
        assert sorted(numbers) == list(range(1, len(numbers) + 1)) and numbers != sorted(numbers)
        assert numbers != sorted(numbers, reverse=True)
        z = [float(h.ImagePositionPatient[2]) for h in headers]
        assert z == sorted(z)  # the manifest lists files in true spatial order
        img, names = read_series(root, s)
        assert names == s["files"] and s["usable"]
    elif quirk == "multiframe_mr":
        s = series_now[entry["series_uid"]]
        (path,) = s["files"]
        ds = pydicom.dcmread(os.path.join(root, path))
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4.1" and int(ds.NumberOfFrames) == len(
            base_files_of[s["series_uid"]])
        frames = ds.pixel_array
        for k, p in enumerate(base_files_of[s["series_uid"]]):
            b = pydicom.dcmread(os.path.join(base_root, p))
            pos = ds.PerFrameFunctionalGroupsSequence[k].PlanePositionSequence[0].ImagePositionPatient
            np.testing.assert_allclose([float(v) for v in pos], [float(v) for v in b.ImagePositionPatient])
            np.testing.assert_array_equal(frames[k], b.pixel_array)
        img = sitk.ReadImage(os.path.join(root, path))
        np.testing.assert_allclose(img.GetOrigin(), s["geometry"]["origin"], atol=0.01)
        np.testing.assert_allclose(img.GetSpacing(), s["geometry"]["spacing"], atol=0.01)
        assert dciodvfy_errors(os.path.join(root, path)) == []


def _check_tilt(root, s, base_root, base_files, tilt_deg):
    """Tilted slices, placed by their own IPP/IOP/PixelSpacing, sample the same anatomy as the untilted CT."""
    from scipy import ndimage

    assert s["usable"] and s["tilt_deg"] == tilt_deg and 14 <= abs(tilt_deg) <= 21
    headers = [pydicom.dcmread(os.path.join(root, p)) for p in s["files"]]
    iop = np.array([float(v) for v in headers[0].ImageOrientationPatient])
    row, col = iop[:3], iop[3:]
    assert np.degrees(np.arccos(abs(np.cross(row, col)[2]))) == pytest.approx(abs(tilt_deg), abs=0.01)
    assert float(headers[0].GantryDetectorTilt) == pytest.approx(tilt_deg)
    ipp = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    assert np.allclose(ipp[:, :2], ipp[0, :2]) and np.all(np.diff(ipp[:, 2]) > 0)  # slices step along z only
    ref, _ = read_series(base_root, {"files": base_files, "series_uid": headers[0].SeriesInstanceUID})
    ref_arr = sitk.GetArrayFromImage(ref).astype(np.float32)
    ref_origin, ref_sp = np.array(ref.GetOrigin()), np.array(ref.GetSpacing())
    ref_dir = np.array(ref.GetDirection()).reshape(3, 3)

    def agreement(positions, row, col):
        ours, theirs = [], []
        for h, pos in list(zip(headers, positions))[5:-5:3]:
            dr, dc = (float(v) for v in h.PixelSpacing)
            j, i = np.mgrid[0:int(h.Rows):8, 0:int(h.Columns):8]
            pts = pos + i[..., None] * dc * row + j[..., None] * dr * col
            idx = np.linalg.solve(ref_dir * ref_sp, (pts - ref_origin).reshape(-1, 3).T)  # continuous x, y, z
            sampled = ndimage.map_coordinates(ref_arr, idx[::-1], order=1, cval=-1000.0)
            hu = h.pixel_array[::8, ::8].astype(np.float32).ravel() * float(h.RescaleSlope) + float(h.RescaleIntercept)
            keep = (hu > -1100) & (sampled > -1100)
            ours.append(hu[keep])
            theirs.append(sampled[keep])
        return float(np.corrcoef(np.concatenate(ours), np.concatenate(theirs))[0, 1])

    good = agreement(ipp, row, col)
    ignoring_tilt = agreement(ipp, row, np.array([0.0, 1.0, 0.0]))
    assert good > 0.85 and ignoring_tilt < good - 0.2  # good is limited by the 2.5 mm slices of the reference


def test_layouts_leave_untouched_sessions_byte_identical(baseline, clinical_corpus):
    """The clinical corpus (seed 5) rebuilds patient 0's MR session only: its CT study is the clean corpus' own."""
    base_root, base_m = baseline
    (base_p,), p = base_m["patients"], clinical_corpus.manifest["patients"][0]
    assert p["patient_id"] == base_p["patient_id"]
    now = {st["study_uid"]: st for st in p["studies"]}
    kept = [st for st in base_p["studies"] if st["study_uid"] in now and not any(s["quirks"] for s in
                                                                                 now[st["study_uid"]]["series"])]
    assert [st["modality"] for st in kept] == ["CT"]
    files = [f for st in kept for s in st["series"] for f in s["files"]]
    assert files == [f for s in now[kept[0]["study_uid"]]["series"] for f in s["files"]]
    for f in files:
        with open(os.path.join(base_root, f), "rb") as a, open(os.path.join(clinical_corpus.url, f), "rb") as b:
            assert a.read() == b.read(), f


def test_quirky_corpus_records_every_quirk_and_keeps_pairs(quirky_corpus):
    m = quirky_corpus.manifest
    assert {e["quirk"] for e in m["quirks"]} == set(QUIRKS)
    assert len(m["expected_pairs"]) >= 2
    kinds = {f["path"]: f["kind"] for f in m["files"]}
    assert set(_tree_digest(quirky_corpus.url)) == set(kinds)
    quirked = [s for _, _, s in manifest_series(m) if s["quirks"]]
    assert all(len(s["quirks"]) == 1 for s in quirked)  # spread out: one quirk per series
    pair_series = {p["mr_series_uid"] for p in m["expected_pairs"]} | {p["ct_series_uid"] for p in m["expected_pairs"]}
    for _, _, s in manifest_series(m):
        if s["series_uid"] in pair_series:
            assert s["usable"]
    for e in m["quirks"]:
        assert e["expected"] and e["files"]


# ------------------------------------------------------------------------------------------------ determinism
def test_same_seed_same_bytes_other_seed_other_bytes(baseline, tmp_path):
    base_root, base_m = baseline
    again = generate_corpus(str(tmp_path / "a"), patients=1, seed=5, manifest_url=str(tmp_path / "a.json"))
    assert _tree_digest(str(tmp_path / "a")) == _tree_digest(base_root)
    assert json.dumps(again.manifest, sort_keys=True) == json.dumps(base_m, sort_keys=True)
    other = generate_corpus(str(tmp_path / "b"), patients=1, seed=6, manifest_url=str(tmp_path / "b.json"))
    digests = set(_tree_digest(str(tmp_path / "b")).values())
    assert not digests & set(_tree_digest(base_root).values())
    assert other.manifest["phi_strings"] != base_m["phi_strings"]


@pytest.mark.parametrize("syntax", [pydicom.uid.RLELossless, pydicom.uid.JPEG2000Lossless])
def test_compressed_files_keep_their_uid_and_bytes(syntax):
    """Compressing is deterministic: the SOP Instance UID stays the one the seed gave, and so do the bytes."""
    from mrict_dask.synth import dicom_writer as dw

    def compressed() -> bytes:
        ds = pydicom.Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = dw.CT_IMAGE_STORAGE, dw.make_uid("compressed", "sop")
        ds.Rows = ds.Columns = 64
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.arange(64 * 64, dtype="<i2").tobytes()
        dw._file_meta(ds, pydicom.uid.ExplicitVRLittleEndian)
        return dw.encode(ds, syntax)

    first = compressed()
    assert first == compressed()
    back = pydicom.dcmread(pydicom.filebase.DicomBytesIO(first))
    assert back.SOPInstanceUID == back.file_meta.MediaStorageSOPInstanceUID == dw.make_uid("compressed", "sop")
    np.testing.assert_array_equal(back.pixel_array.ravel(), np.arange(64 * 64))


def test_refuses_a_non_empty_target(baseline):
    with pytest.raises(ConfigError, match="not empty"):
        generate_corpus(baseline[0], patients=1)


# ------------------------------------------------------------------------------------------------ CLI + S3
def test_cli_writes_a_flat_corpus_to_s3(s3):
    from click.testing import CliRunner

    from mrict_dask.cli import main

    url = s3.url("corpus")
    result = CliRunner().invoke(main, ["synth", url, "--patients", "1", "--seed", "3", "--layout", "flat",
                                       "--quirks", "non_dicom_file",
                                       "--storage-options", json.dumps(s3.storage_options)])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "manifest" in result.output
    fs = s3.fs()
    manifest = json.loads(fs.cat(url + ".manifest.json"))
    keys = fs.find(url)
    names = [k.rsplit("/", 1)[1] for k in keys]
    assert len(keys) == manifest["n_files"] and sorted(names) == sorted(f["path"] for f in manifest["files"])
    assert all("/" not in f["path"] and "." not in f["path"] for f in manifest["files"])  # one folder, no extensions
    assert sum(fs.size(k) for k in keys) == manifest["n_bytes"]
    # the flat names do not follow the series order
    _, _, s = next(manifest_series(manifest, "t1c"))
    assert s["files"] != sorted(s["files"])
    ds = pydicom.dcmread(fs.open(url + "/" + s["files"][0]))
    assert ds.SeriesInstanceUID == s["series_uid"]
