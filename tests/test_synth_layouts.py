"""Clinical layouts (LAYOUT_QUIRKS) write what they say, and the manifest tells the truth about them.

Every check reads the written files back (pydicom, SimpleITK's GDCM reader, dciodvfy, the catalog's header reader)
and compares them with the manifest or the template. The corpus is the session fixture ``clinical_corpus``.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from collections import defaultdict

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from mrict_dask.errors import ConfigError
from mrict_dask.synth import LAYOUT_QUIRKS, QUIRKS, parse_quirks
from mrict_dask.synth import dicom_writer as dw

from .truth import (
    assert_read_back_equals_manifest,
    brain_points,
    dciodvfy_errors,
    manifest_series,
    ncc_in_template,
    read_series,
)

# Words a reader takes for contrast in a series description (as tokens: "t1post1" is not one).
CONTRAST_WORDS = re.compile(r"(^|[^a-z0-9])(post|gd|gad|gado|contrast|kontrast|km|ce|c)([^a-z0-9]|$)|\+c|c\+",
                            re.IGNORECASE)


# ------------------------------------------------------------------------------------------------ helpers
def _entry(manifest: dict, quirk: str) -> dict:
    (e,) = [e for e in manifest["quirks"] if e["quirk"] == quirk]
    return e


def _by_uid(manifest: dict) -> dict[str, tuple[dict, dict, dict]]:
    return {s["series_uid"]: (p, st, s) for p, st, s in manifest_series(manifest)}


def _header(root: str, rel: str) -> pydicom.Dataset:
    return pydicom.dcmread(os.path.join(root, rel), stop_before_pixels=True)


def _iop(ds) -> tuple[np.ndarray, np.ndarray]:
    v = np.array([float(x) for x in ds.ImageOrientationPatient])
    return v[:3], v[3:]


def _mean_apart(a, b, points: np.ndarray) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm((points @ a[:3, :3].T + a[:3, 3]) - (points @ b[:3, :3].T + b[:3, 3]), axis=1).mean())


@pytest.fixture(scope="module")
def brain(template):
    return brain_points(template, step=6)


# ------------------------------------------------------------------------------------------------ names
def test_layout_quirks_are_named_and_parsed():
    assert set(LAYOUT_QUIRKS) == {"study_per_sequence", "sagittal_t1", "coronal_t1", "contrast_tag_only",
                                  "perfusion", "dti", "secondary_capture", "rtstruct", "ct_reformat", "ct_bone",
                                  "ct_thick", "ct_scout", "sagittal_t1_neck", "axial_t1_brain", "off_centre_t1",
                                  "ct_face_neck"}
    assert not set(LAYOUT_QUIRKS) & set(QUIRKS)
    assert parse_quirks("all") == QUIRKS + LAYOUT_QUIRKS
    assert parse_quirks("ct_bone, missing_slice,perfusion") == ("missing_slice", "perfusion", "ct_bone")
    with pytest.raises(ConfigError, match="sagital_t1") as err:
        parse_quirks("sagital_t1")
    assert "\n" not in str(err.value) and "sagittal_t1" in str(err.value)


def test_cli_help_names_every_layout():
    from click.testing import CliRunner

    from mrict_dask.cli import main

    out = CliRunner().invoke(main, ["synth", "--help"], terminal_width=400).output
    assert all(q in out for q in LAYOUT_QUIRKS), out


# ------------------------------------------------------------------------------------------------ manifest
def test_every_layout_is_logged_with_its_files(clinical_corpus):
    m = clinical_corpus.manifest
    assert [e["quirk"] for e in m["quirks"]] == list(LAYOUT_QUIRKS)
    on_disk = {os.path.relpath(os.path.join(d, f), clinical_corpus.url) for d, _, fs in os.walk(clinical_corpus.url)
               for f in fs}
    assert on_disk == {f["path"] for f in m["files"]}
    in_series = [f for _, _, s in manifest_series(m) for f in s["files"]]
    assert sorted(in_series) == sorted(on_disk)  # every file in exactly one series
    series = _by_uid(m)
    pairs = {p["patient_id"]: p for p in m["expected_pairs"]}
    assert len(pairs) == 3 and not m["expected_exclusions"]
    for e in m["quirks"]:
        assert e["expected"] and e["files"] and e["patient_id"] in pairs
        assert set(e["files"]) == {f for uid in e["series_uids"] for f in series[uid][2]["files"]}
        chosen = pairs[e["patient_id"]]["mr_series_uid" if series[e["series_uid"]][2]["modality"] == "MR"
                                        else "ct_series_uid"]
        assert e["chosen_series_uid"] == chosen
        for uid in e["series_uids"]:
            assert e["quirk"] in series[uid][2]["quirks"]
    # the T1 layouts decide a session's T1s: never two on one patient
    t1_layouts = [e["patient_id"] for e in m["quirks"] if e["quirk"] in ("sagittal_t1", "coronal_t1",
                                                                         "contrast_tag_only")]
    assert len(set(t1_layouts)) == 3


def test_expected_choices_follow_the_truth(clinical_corpus):
    """The expected pair takes the neuroradiologist's series: post-contrast T1 before pre, 3D before 2D, finer, whole
    head, ORIGINAL; CT: ORIGINAL before reformats, soft tissue before bone, thinnest. A session: a date's studies."""
    m = clinical_corpus.manifest
    series = _by_uid(m)
    for pair in m["expected_pairs"]:
        p, mst, mr = series[pair["mr_series_uid"]]
        _, cst, ct = series[pair["ct_series_uid"]]
        assert (mr["role"], ct["role"]) == ("t1c", "ct")
        assert mst["study_uid"] == pair["mr_study_uid"] and cst["study_uid"] == pair["ct_study_uid"]
        for s in (mr, ct):
            assert s["usable"] and s["candidate"] and not s["derived"]
            # the whole cranium and brain, unless a field-of-view layout cut them (brain only, or off centre)
            cut = set(s["quirks"]) & {"axial_t1_brain", "off_centre_t1"}
            assert s["whole_head"] or cut
            assert s["holds_brain"] or "axial_t1_brain" in cut
        assert mr["weighting"] == "T1" and mr["post_contrast"] and ct["kernel"] == "soft"
        for key, study in (("mr", mst), ("ct", cst)):
            session = [st for st in p["studies"] if st["study_uid"] in pair[f"{key}_session_study_uids"]]
            assert {st["session_id"] for st in session} == {pair[f"{key}_session_id"]} == {study["session_id"]}
            assert {st["study_date"] for st in session} == {study["study_date"]}
            assert {st["study_uid"] for st in p["studies"] if st["session_id"] == study["session_id"]} == \
                set(pair[f"{key}_session_study_uids"])
            # every other candidate of the session is listed with why it lost, and it truly ranks lower
            chosen = mr if key == "mr" else ct
            others = {a["series_uid"]: a["why_not"] for a in pair[f"{key}_alternatives"]}
            cands = {s["series_uid"] for st in session for s in st["series"] if s["candidate"]} - {chosen["series_uid"]}
            assert set(others) == cands
            for uid, why in others.items():
                s = series[uid][2]
                if key == "mr":
                    assert s["weighting"] == "T1"
                    assert (why == "pre-contrast") == (not s["post_contrast"])
                else:
                    assert why == {"ct_thick": "thicker slices", "ct_bone": "bone kernel (soft tissue preferred)",
                                   "ct_reformat": "DERIVED (reformatted)"}[s["role"]]
        # no candidate elsewhere: perfusion, diffusion, screenshots, scouts, structure sets are never candidates
    for _, _, s in manifest_series(m):
        if s["role"] in ("perfusion", "dti", "secondary_capture", "rtstruct", "scout", "localizer", "sr", "t2",
                         "flair"):
            assert not s["candidate"] and s["candidate_reason"]


def test_rebuilt_series_read_back_to_the_manifest_geometry(clinical_corpus):
    """GDCM assembles every rebuilt 3D series (sagittal, coronal, oblique, reformats, recons) to the manifest grid, in
    the manifest's file order."""
    m, root = clinical_corpus.manifest, clinical_corpus.url
    checked = 0
    for _, _, s in manifest_series(m):
        if not s["quirks"] or s["geometry"] is None or s.get("volumes"):
            continue
        assert_read_back_equals_manifest(root, s)
        checked += 1
    assert checked >= 15


# ------------------------------------------------------------------------------------------------ motion
def test_each_series_has_its_own_small_motion(clinical_corpus, template, brain):
    """Series of a rebuilt MR session differ by a small head motion (2.5 mm mean apart at least, a few mm at most);
    reconstructions of one CT acquisition share its pose exactly; so the wrong series shows as a registration error:
    the chosen T1 lines up with the template through its own transform and clearly worse through a neighbour's."""
    m, root = clinical_corpus.manifest, clinical_corpus.url
    series = _by_uid(m)
    rebuilt = defaultdict(list)
    for p, st, s in manifest_series(m):
        if s["quirks"] and st["modality"] == "MR" and s["role"] != "secondary_capture":
            rebuilt[(p["patient_id"], st["session_id"])].append(s)
    assert len(rebuilt) == 3
    for group in rebuilt.values():
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                apart = _mean_apart(a["transform"], b["transform"], brain)
                tilted = "off_centre_t1" in a["quirks"] and "t1c" in (a["role"], b["role"])  # 15-25 degrees more
                assert 2.5 <= apart <= (40.0 if tilted else 16.0)
    for _, _, s in manifest_series(m):
        if s.get("acquisition_series_uid"):
            assert s["transform"] == series[s["acquisition_series_uid"]][2]["transform"]
    for pair in m["expected_pairs"]:
        p, st, t1c = series[pair["mr_series_uid"]]
        if not t1c["quirks"]:
            continue
        img, _ = read_series(root, t1c)
        own = ncc_in_template(img, t1c["transform"], template)
        neighbours = [s for s in rebuilt[(p["patient_id"], st["session_id"])] if s is not t1c and s["geometry"]]
        worst_other = max(ncc_in_template(img, s["transform"], template) for s in neighbours[:2])
        floor = 0.8 if t1c["holds_brain"] else 0.5  # a slab above the orbits leaves the lower brain out
        assert own > floor and worst_other < own - 0.1, (t1c["description"], own, worst_other)


# ------------------------------------------------------------------------------------------------ MR layouts
def test_study_per_sequence(clinical_corpus):
    m, root = clinical_corpus.manifest, clinical_corpus.url
    e = _entry(m, "study_per_sequence")
    p = next(p for p in m["patients"] if p["patient_id"] == e["patient_id"])
    studies = [st for st in p["studies"] if st["study_uid"] in e["study_uids"]]
    assert len(studies) == len(e["study_uids"]) == len(e["series_uids"]) >= 6
    assert all(len(st["series"]) == 1 for st in studies)
    assert len({st["session_id"] for st in studies}) == 1 and len({st["study_date"] for st in studies}) == 1
    assert len({st["frame_of_reference_uid"] for st in studies}) == len(studies)
    times = sorted(int(st["study_time"][:2]) * 60 + int(st["study_time"][2:4]) for st in studies)
    assert all(1 <= b - a <= 30 for a, b in itertools.pairwise(times))  # minutes apart
    for st in studies:
        ds = _header(root, st["series"][0]["files"][0])
        assert (ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime) == (st["study_uid"], st["study_date"],
                                                                     st["study_time"])
        assert ds.AccessionNumber == st["accession_number"]
    assert len({st["accession_number"] for st in studies}) == len(studies)
    # the thick pre-contrast axial 2D T1 it adds
    t1 = [s for st in studies for s in st["series"] if s["role"] == "t1" and s["mr_acquisition"] == "2D"]
    assert t1 and all(not s["post_contrast"] and s["geometry"]["spacing"][2] >= 5 for s in t1)
    ds = _header(root, t1[0]["files"][0])
    assert ds.MRAcquisitionType == "2D" and float(ds.SliceThickness) >= 4.0 and "ContrastBolusAgent" not in ds
    np.testing.assert_allclose(np.cross(*_iop(ds)), [0, 0, 1], atol=1e-6)


def test_sagittal_t1(clinical_corpus):
    m, root = clinical_corpus.manifest, clinical_corpus.url
    e = _entry(m, "sagittal_t1")
    series = _by_uid(m)
    t1c = series[e["series_uid"]][2]
    assert t1c["role"] == "t1c" and t1c["mr_acquisition"] == "3D"
    ds = _header(root, t1c["files"][0])
    row, col = _iop(ds)
    assert abs(row[0]) < 1e-6 and abs(col[0]) < 1e-6  # a sagittal plane, possibly turned about left-right
    assert abs(abs(np.cross(row, col)[0]) - 1.0) < 1e-6
    assert ds.MRAcquisitionType == "3D" and len(t1c["files"]) >= 100
    sp = [float(v) for v in ds.PixelSpacing] + [float(ds.SliceThickness)]
    assert all(0.9 <= v <= 1.1 for v in sp)
    (distractor,) = [series[u][2] for u in e["series_uids"] if u != t1c["series_uid"]]
    d = _header(root, distractor["files"][0])
    assert distractor["role"] == "t1" and d.MRAcquisitionType == "2D" and float(d.SliceThickness) == 5.0
    assert "ContrastBolusAgent" not in d and not distractor["post_contrast"]
    np.testing.assert_allclose(np.cross(*_iop(d)), [0, 0, 1], atol=1e-6)


def test_coronal_t1(clinical_corpus):
    m, root = clinical_corpus.manifest, clinical_corpus.url
    e = _entry(m, "coronal_t1")
    p, st, t1c = _by_uid(m)[e["series_uid"]]
    session_t1 = [s for s2 in p["studies"] if s2["session_id"] == st["session_id"] for s in s2["series"]
                  if s["weighting"] == "T1"]
    assert session_t1 == [t1c]  # the only T1 of its session
    ds = _header(root, t1c["files"][0])
    np.testing.assert_allclose(np.cross(*_iop(ds)), [0, 1, 0], atol=1e-6)  # coronal
    assert ds.MRAcquisitionType == "2D" and 4.0 <= float(ds.SliceThickness) <= 5.0
    assert t1c["post_contrast"] and (t1c["whole_head"] or "off_centre_t1" in t1c["quirks"])
    agent = ds.get("ContrastBolusAgent", "")
    assert agent == t1c["contrast_agent"]
    assert agent or CONTRAST_WORDS.search(ds.SeriesDescription)  # told by the tag or by the description


def test_contrast_tag_only(clinical_corpus):
    m, root = clinical_corpus.manifest, clinical_corpus.url
    e = _entry(m, "contrast_tag_only")
    series = _by_uid(m)
    group = [series[u][2] for u in e["series_uids"]]
    post = series[e["series_uid"]][2]
    assert post["role"] == "t1c" and post["contrast_agent"] == e["contrast_agent"] != ""
    pre = [s for s in group if s is not post]
    assert len(pre) == 2 and all(s["role"] == "t1" and not s["post_contrast"] for s in pre)
    for s in group:
        ds = _header(root, s["files"][len(s["files"]) // 2])
        assert ds.MRAcquisitionType == "3D"
        assert ds.get("ContrastBolusAgent", "") == s["contrast_agent"]
        assert ("ContrastBolusAgent" in ds) == (s is post)
    decoy = [s for s in pre if re.search(r"post", s["description"], re.IGNORECASE)]
    (plain,) = [s for s in pre if s not in decoy]
    assert len(decoy) == 1
    for s in (post, plain, *decoy):
        assert not CONTRAST_WORDS.search(s["description"]), s["description"]
    voxel = {s["series_uid"]: np.prod(s["geometry"]["spacing"]) for s in group}
    assert voxel[decoy[0]["series_uid"]] < voxel[post["series_uid"]]  # the decoy is otherwise better


def test_perfusion(clinical_corpus):
    from mrict_dask.dicom_header import read_header

    m, root = clinical_corpus.manifest, clinical_corpus.url
    e = _entry(m, "perfusion")
    s = _by_uid(m)[e["series_uid"]][2]
    n_vol, n_slice = s["volumes"], s["geometry"]["size"][2]
    assert s["role"] == "perfusion" and not s["candidate"] and 12 <= n_slice <= 16 and n_vol == 20
    assert len(s["files"]) == n_vol * n_slice
    headers = [pydicom.dcmread(os.path.join(root, f)) for f in s["files"]]
    h0 = headers[0]
    assert "EP" in h0.ScanningSequence and h0.MRAcquisitionType == "2D" and float(h0.RepetitionTime) == 1500.0
    assert 30.0 <= float(h0.EchoTime) <= 45.0 and h0.ContrastBolusAgent and int(h0.Rows) == 128
    # each way the manifest says tells the time points apart does: one value per volume, the same positions in each
    habit = s["temporal"]["habit"]
    for option in s["split_by"]:
        keys = [tuple(str(h[int(t["tag"], 16)].value) for t in option) for h in headers]
        groups = defaultdict(list)
        for k, h in zip(keys, headers):
            groups[k].append(tuple(round(float(v), 3) for v in h.ImagePositionPatient))
        assert len(groups) == n_vol
        assert len({tuple(sorted(v)) for v in groups.values()}) == 1
    tpi = {h.get("TemporalPositionIdentifier") for h in headers}
    acq = {int(h.AcquisitionNumber) for h in headers}
    assert (len(tpi) == n_vol) == (habit == "temporal_position")
    assert (len(acq) == n_vol) == (habit == "acquisition_number")
    assert "TriggerTime" not in h0  # not a gated acquisition
    # the manifest's file order: volume by volume, slices in spatial order
    z = np.array([float(h.ImagePositionPatient[2]) for h in headers]).reshape(n_vol, n_slice)
    assert np.all(np.diff(z, axis=1) > 0) and np.allclose(z, z[0])
    # the bolus: the brain darkens at its first pass and recovers
    means = np.array([np.mean([h.pixel_array.mean() for h in headers[v * n_slice:(v + 1) * n_slice]])
                      for v in range(n_vol)])
    peak = int(np.argmin(means))
    assert means[peak] < 0.9 * means[:4].mean() and means[-1] > means[peak]
    temporal = s["temporal"]
    assert abs(temporal["times_s"][peak] - (temporal["bolus_arrival_s"] + temporal["bolus_time_to_peak_s"])) <= 3.0
    # the catalog reads what tells the volumes apart
    rows = [read_header(os.path.join(root, f)) for f in s["files"][::n_slice]]
    assert len({(r["acquisition_time"], r["temporal_position"], r["acquisition_number"]) for r in rows}) == n_vol


def _diffusion_from_header(ds, style: str) -> tuple[float, list[float] | None]:
    if style == "standard":
        g = ds.get((0x0018, 0x9089))
        return float(ds[0x00189087].value), None if g is None else [float(v) for v in g.value]
    if style == "siemens":
        block = ds.private_block(0x0019, "SIEMENS MR HEADER")
        g = block[0x0E].value if 0x0019100E in ds else None
        return float(block[0x0C].value), None if g is None else [float(v) for v in g]
    if style == "ge":
        parm = ds.private_block(0x0043, "GEMS_PARM_01")
        acq = ds.private_block(0x0019, "GEMS_ACQU_01")
        g = [float(acq[e].value) for e in (0xBB, 0xBC, 0xBD)]
        return float(parm[0x39].value[0]) % 1e9, (g if any(g) else None)
    dd = ds.private_block(0x2001, "Philips Imaging DD 001")
    mr = ds.private_block(0x2005, "Philips MR Imaging DD 001")
    g = [float(mr[e].value) for e in (0xB0, 0xB1, 0xB2)]
    return float(dd[0x03].value), (g if any(g) else None)


def test_dti(clinical_corpus):
    m, root = clinical_corpus.manifest, clinical_corpus.url
    e = _entry(m, "dti")
    s = _by_uid(m)[e["series_uid"]][2]
    d = s["diffusion"]
    n_vol, n_slice = s["volumes"], s["geometry"]["size"][2]
    assert d["style"] == e["diffusion_style"] and n_vol == len(d["b_values"]) in (7, 13)
    assert d["b_values"][0] == 0 and set(d["b_values"][1:]) == {1000.0} and d["directions"][0] is None
    assert len(s["files"]) == n_vol * n_slice and not s["candidate"]
    for v in range(n_vol):
        ds = _header(root, s["files"][v * n_slice + n_slice // 2])
        b, g = _diffusion_from_header(ds, d["style"])
        assert b == d["b_values"][v]
        if d["directions"][v] is None:
            assert g is None
        else:
            np.testing.assert_allclose(g, d["directions"][v], atol=1e-6)
            assert abs(np.linalg.norm(g) - 1.0) < 1e-5
    # every direction differs; positions repeat per volume
    dirs = np.array(d["directions"][1:])
    assert len({tuple(np.round(v, 4)) for v in dirs}) == len(dirs)
    z = np.array([float(_header(root, f).ImagePositionPatient[2]) for f in s["files"]]).reshape(n_vol, n_slice)
    assert np.allclose(z, z[0])


@pytest.mark.parametrize("style", dw.DIFFUSION_STYLES)
def test_diffusion_tags_of_every_vendor_read_back(style, tmp_path):
    """Each style is written under its private creator and read back by pydicom and by the catalog's reader."""
    from mrict_dask.dicom_header import read_header

    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = dw.MR_IMAGE_STORAGE, dw.make_uid("diffusion", style)
    ds.Modality = "MR"
    direction = np.array([0.267261, -0.534522, 0.801784])
    dw.set_diffusion(ds, style, 1000.0, direction)
    dw._file_meta(ds, pydicom.uid.ExplicitVRLittleEndian)
    path = tmp_path / "dwi.dcm"
    path.write_bytes(dw.encode(ds))
    back = pydicom.dcmread(path)
    b, g = _diffusion_from_header(back, style)
    assert b == 1000.0
    np.testing.assert_allclose(g, direction, atol=1e-6)
    row = read_header(str(path))
    assert row["diffusion_b_value"] == 1000.0
    np.testing.assert_allclose(row["diffusion_direction"], direction, atol=1e-6)


def _mr_header(**protocol) -> pydicom.Dataset:
    """A classic MR series header, everything a slice shares (for tag-level checks without a corpus)."""
    patient = dw.PatientInfo("P1", "DOE^JANE", "19700101", "F")
    study = dw.StudyInfo(uid=str(dw.make_uid("study")), modality="MR", date="20200101", time="101500",
                         accession="A1", description="MRI BRAIN", study_id="1", institution="X", referring="Y^Z",
                         manufacturer="SIEMENS", model="Skyra", station="MR1", frame_uid=str(dw.make_uid("frame")),
                         age="050Y")
    proto = dict(scanning_sequence="EP", sequence_variant=["SK", "SS"], acquisition_type="2D", tr=1500.0, te=35.0,
                 flip=90, **protocol)
    series = dw.SeriesInfo(uid=str(dw.make_uid("series")), number=1, description="x", role="perfusion",
                           time="101700", image_type=["ORIGINAL", "PRIMARY", "M", "ND"], protocol=proto)
    header = dw.mr_header(patient, study, series, rows_cols=(4, 4), row=np.array([1.0, 0, 0]),
                          col=np.array([0, 1.0, 0]), pixel_spacing=(2.0, 2.0), thickness=5.0, spacing_between=6.0,
                          window=(100.0, 200.0))
    return header


@pytest.mark.parametrize("variant", [("temporal", h) for h in dw.TEMPORAL_HABITS]
                         + [("diffusion", s) for s in dw.DIFFUSION_STYLES])
def test_every_4d_variant_is_a_valid_mr_image(variant, tmp_path):
    kind, name = variant
    header = _mr_header(body_part="")
    if kind == "temporal":
        dw.set_temporal(header, name, 3, 20, 4.5, 10 * 3600 + 17 * 60)
    else:
        dw.set_diffusion(header, name, 1000.0, np.array([0.0, 0.6, 0.8]))
    ds = dw.slice_dataset(header, sop_uid=str(dw.make_uid("sop", name)), instance=4, position=np.zeros(3),
                          pixels=np.arange(16, dtype=np.uint16).reshape(4, 4))
    path = tmp_path / "image.dcm"
    path.write_bytes(dw.encode(ds))
    assert dciodvfy_errors(str(path)) == []
    back = pydicom.dcmread(path)
    assert back.AcquisitionTime == ("101704.500000" if kind == "temporal" else "101700")
    assert back.Laterality == "" and back.BodyPartExamined == ""  # blank body part: laterality present, empty


def test_secondary_capture(clinical_corpus):
    m, root = clinical_corpus.manifest, clinical_corpus.url
    e = _entry(m, "secondary_capture")
    p, st, s = _by_uid(m)[e["series_uid"]]
    (f,) = s["files"]
    ds = pydicom.dcmread(os.path.join(root, f))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" == s["sop_class_uid"]
    assert ds.Modality == "MR" == st["modality"] and ds.PhotometricInterpretation == "RGB"
    assert int(ds.SamplesPerPixel) == 3 and ds.pixel_array.shape == (int(ds.Rows), int(ds.Columns), 3)
    assert ds.pixel_array.std() > 10
    for kw in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "FrameOfReferenceUID"):
        assert kw not in ds
    assert not s["usable"] and not s["candidate"] and s["geometry"] is None
    pair = next(q for q in m["expected_pairs"] if q["patient_id"] == p["patient_id"])
    assert st["session_id"] == pair["mr_session_id"]  # filed in the MR session


def test_rtstruct(clinical_corpus):
    m, root = clinical_corpus.manifest, clinical_corpus.url
    e = _entry(m, "rtstruct")
    series = _by_uid(m)
    p, st, s = series[e["series_uid"]]
    _, ct_st, ct = series[s["references"]["series_uid"]]
    assert ct_st is st and ct["role"] == "ct" and s["series_uid"] != ct["series_uid"]  # own series, CT study
    (f,) = s["files"]
    ds = pydicom.dcmread(os.path.join(root, f))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3" and ds.Modality == "RTSTRUCT"
    ct_sops = {}
    for rel in ct["files"]:
        h = _header(root, rel)
        ct_sops[h.SOPInstanceUID] = h
    ref = ds.ReferencedFrameOfReferenceSequence[0]
    assert ref.FrameOfReferenceUID == st["frame_of_reference_uid"] == next(iter(ct_sops.values())).FrameOfReferenceUID
    ref_series = ref.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == ct["series_uid"]
    assert {i.ReferencedSOPInstanceUID for i in ref_series.ContourImageSequence} == set(ct_sops)
    (roi,) = ds.StructureSetROISequence
    contours = ds.ROIContourSequence[0].ContourSequence
    assert roi.ROIName == s["rois"][0]["name"] and len(contours) == s["rois"][0]["contours"] >= 3
    lesion = np.array(p["lesion"]["center"])
    t = np.array(ct["transform"])
    points = []
    for c in contours:
        pts = np.array([float(v) for v in c.ContourData]).reshape(-1, 3)
        assert c.ContourGeometricType == "CLOSED_PLANAR" and int(c.NumberOfContourPoints) == len(pts)
        img = ct_sops[c.ContourImageSequence[0].ReferencedSOPInstanceUID]
        normal = np.cross(*_iop(img))
        offset = (pts - np.array([float(v) for v in img.ImagePositionPatient])) @ normal
        assert np.abs(offset).max() < 0.01  # on the plane of the image it references
        points.append(pts)
    centre = np.concatenate(points).mean(0)
    assert np.linalg.norm(centre - (t[:3, :3] @ lesion + t[:3, 3])) < 6.0  # the lesion, seen in the CT
    assert dciodvfy_errors(os.path.join(root, f)) == []


# ------------------------------------------------------------------------------------------------ CT layouts
def test_ct_reconstructions(clinical_corpus):
    """Thick and bone reconstructions and reformats: their tags, and the same anatomy as the CT in the same frame."""
    from scipy import ndimage

    m, root = clinical_corpus.manifest, clinical_corpus.url
    series = _by_uid(m)
    src = series[_entry(m, "ct_bone")["chosen_series_uid"]][2]
    src_h = _header(root, src["files"][0])
    src_img, _ = read_series(root, src)
    src_arr = sitk.GetArrayFromImage(src_img).astype(np.float32)
    src_dir = np.array(src_img.GetDirection()).reshape(3, 3) * np.array(src_img.GetSpacing())
    kinds = {}
    for quirk in ("ct_thick", "ct_bone", "ct_reformat"):
        for uid in _entry(m, quirk)["series_uids"]:
            s = series[uid][2]
            ds = _header(root, s["files"][len(s["files"]) // 2])
            assert s["acquisition_series_uid"] == src["series_uid"]
            assert ds.FrameOfReferenceUID == src_h.FrameOfReferenceUID and ds.StudyInstanceUID == src_h.StudyInstanceUID
            normal = tuple(np.round(np.cross(*_iop(ds)), 6))
            kinds.setdefault(quirk, []).append((s, ds, normal))
            # the same anatomy: sample the source CT where this series' pixels are
            pix = pydicom.dcmread(os.path.join(root, s["files"][len(s["files"]) // 2]))
            hu = pix.pixel_array.astype(np.float32) * float(pix.RescaleSlope) + float(pix.RescaleIntercept)
            row, col = _iop(pix)
            dr, dc = (float(v) for v in pix.PixelSpacing)
            j, i = np.mgrid[0:int(pix.Rows):4, 0:int(pix.Columns):4]
            pts = np.array([float(v) for v in pix.ImagePositionPatient]) + i[..., None] * dc * row + \
                j[..., None] * dr * col
            idx = np.linalg.solve(src_dir, (pts.reshape(-1, 3) - np.array(src_img.GetOrigin())).T)
            inside = np.all((idx > 0) & (idx < np.array(src_img.GetSize())[:, None] - 1), axis=0)
            ref = ndimage.map_coordinates(src_arr, idx[::-1], order=1)
            ours = hu[::4, ::4].ravel()
            keep = inside & (ours > -1100) & (ref > -1100)
            r = np.corrcoef(ours[keep], ref[keep])[0, 1]
            assert r > (0.75 if quirk == "ct_bone" else 0.9), (s["description"], r)
    (thick, th_ds, th_n), = kinds["ct_thick"]
    (bone, bo_ds, bo_n), = kinds["ct_bone"]
    assert float(th_ds.SliceThickness) == 5.0 and th_ds.ConvolutionKernel == src_h.ConvolutionKernel
    assert float(bo_ds.SliceThickness) < float(src_h.SliceThickness)
    assert bo_ds.ConvolutionKernel != src_h.ConvolutionKernel
    assert bone["kernel"] == "bone" and thick["kernel"] == src["kernel"] == "soft"
    for s, ds, _ in (kinds["ct_thick"] + kinds["ct_bone"]):
        assert ds.ImageType[0] == "ORIGINAL" and not s["derived"] and th_n == bo_n == (0.0, 0.0, 1.0)
    reformats = kinds["ct_reformat"]
    assert sorted(abs(np.array(n)).argmax() for _, _, n in reformats) == [0, 1]  # sagittal and coronal
    for s, ds, _ in reformats:
        assert ds.ImageType[0] == "DERIVED" and s["derived"] and 2.0 <= float(ds.SliceThickness) <= 3.0


def test_ct_scout(clinical_corpus):
    m, root = clinical_corpus.manifest, clinical_corpus.url
    e = _entry(m, "ct_scout")
    s = _by_uid(m)[e["series_uid"]][2]
    assert s["role"] == "scout" and len(s["files"]) == len(s["images"]) == 2 and not s["usable"]
    headers = [_header(root, f) for f in s["files"]]
    normals = [np.round(np.cross(*_iop(h)), 6) for h in headers]
    np.testing.assert_allclose(sorted(np.abs(n).argmax() for n in normals), [0, 1])  # AP and lateral
    assert len({h.SeriesInstanceUID for h in headers}) == 1
    for h in headers:
        assert ("LOCALIZER" in list(h.ImageType)) == e["says_localizer"]
    assert not e["says_localizer"] and "topogram" in headers[0].SeriesDescription.lower()  # this corpus' variant


def test_body_part_is_unreliable_on_rebuilt_mr(clinical_corpus):
    m, root = clinical_corpus.manifest, clinical_corpus.url
    seen = set()
    for _, st, s in manifest_series(m):
        if not s["quirks"] or st["modality"] != "MR" or s["role"] == "secondary_capture":
            continue
        ds = _header(root, s["files"][0])
        assert ds.get("BodyPartExamined") == s["body_part"]
        seen.add(s["body_part"])
    assert {"HEADNECK", "CSPINE"} & seen and ({"", None} & seen)
    for pair in m["expected_pairs"]:
        s = _by_uid(m)[pair["mr_series_uid"]][2]
        if s["quirks"]:
            assert s["body_part"] in ("HEADNECK", "CSPINE", "", None)


def test_dciodvfy_finds_no_errors_in_the_layouts(clinical_corpus):
    m, root = clinical_corpus.manifest, clinical_corpus.url
    kinds = {}
    for _, _, s in manifest_series(m):
        if s["quirks"]:
            kinds.setdefault((s["role"], s["mr_acquisition"], s["body_part"] in ("", None)), s)
    assert len(kinds) >= 12
    for s in kinds.values():
        assert dciodvfy_errors(os.path.join(root, s["files"][len(s["files"]) // 2])) == [], s["description"]


# ------------------------------------------------------------------------------------------------ fields of view
def _index(img: sitk.Image, point) -> np.ndarray:
    return np.array(img.TransformPhysicalPointToContinuousIndex([float(v) for v in point]))


def _inside(img: sitk.Image, point, margin_vox: float = 0.0) -> bool:
    idx = _index(img, point)
    return bool(np.all((idx >= -0.5 + margin_vox) & (idx <= np.array(img.GetSize()) - 0.5 - margin_vox)))


def _angle_deg(a, b) -> float:
    """The rotation between two transforms' (scaled) linear parts, in degrees."""
    r = np.linalg.solve(np.asarray(a)[:3, :3], np.asarray(b)[:3, :3])
    u, _, vt = np.linalg.svd(r)
    return float(np.degrees(np.arccos(np.clip((np.trace(u @ vt) - 1.0) / 2.0, -1.0, 1.0))))


def test_fov_layouts_land_where_their_t1_allows(clinical_corpus):
    m = clinical_corpus.manifest
    by_patient = defaultdict(set)
    for e in m["quirks"]:
        by_patient[e["patient_id"]].add(e["quirk"])
    allowed = {"sagittal_t1_neck": {"sagittal_t1"}, "axial_t1_brain": {"contrast_tag_only"},
               "off_centre_t1": {"sagittal_t1", "coronal_t1", "contrast_tag_only"}}
    for fov, t1_ok in allowed.items():
        (pid,) = [p for p, qs in by_patient.items() if fov in qs]
        t1 = by_patient[pid] & {"sagittal_t1", "coronal_t1", "contrast_tag_only"}
        assert t1 <= t1_ok, (fov, t1)


def test_sagittal_t1_neck(clinical_corpus):
    """A sagittal 3D T1 hung from the vertex: the brain high in the field of view, face and neck below it."""
    m, root = clinical_corpus.manifest, clinical_corpus.url
    e = _entry(m, "sagittal_t1_neck")
    s = _by_uid(m)[e["series_uid"]][2]
    assert e["chosen_series_uid"] == s["series_uid"] and s["role"] == "t1c"
    img = assert_read_back_equals_manifest(root, s)
    ds = _header(root, s["files"][0])
    row, col = _iop(ds)
    assert abs(np.cross(row, col)[0]) > 0.98 and ds.MRAcquisitionType == "3D"
    size, sp = np.array(img.GetSize()), np.array(img.GetSpacing())
    assert min(size[:2] * sp[:2]) >= 255.0
    brain = _index(img, s["brain_center"])[1]
    assert brain < 0.45 * size[1]  # columns run head to feet: the brain in the upper part
    assert s["holds_brain"] and s["holds_face"] and s["whole_head"]
    for name in ("nose_tip", "upper_lip", "chin"):
        assert _inside(img, s["landmarks"][name]) and _index(img, s["landmarks"][name])[1] > brain + 20.0, name
    mid = sitk.GetArrayViewFromImage(img)[size[2] // 2]  # the slice through the midline: (rows, columns)
    assert np.percentile(mid[-8:], 75) > 150.0  # the neck fills the bottom rows (air is Rician noise, ~15)


def test_axial_t1_brain(clinical_corpus):
    """The post-contrast T1 of the brain only: axial, no face; from below the cerebellum it holds the whole brain,
    from above the orbits it starts above the eyes."""
    m, root = clinical_corpus.manifest, clinical_corpus.url
    e = _entry(m, "axial_t1_brain")
    s = _by_uid(m)[e["series_uid"]][2]
    assert e["chosen_series_uid"] == s["series_uid"] and s["post_contrast"]
    img = assert_read_back_equals_manifest(root, s)
    ds = _header(root, s["files"][0])
    np.testing.assert_allclose(np.abs(np.cross(*_iop(ds))), [0, 0, 1], atol=1e-6)
    assert not s["holds_face"] and not s["whole_head"]
    assert not _inside(img, s["landmarks"]["nose_tip"]) and not _inside(img, s["landmarks"]["chin"])
    lowest = min(img.TransformIndexToPhysicalPoint([0, 0, 0])[2], img.TransformIndexToPhysicalPoint(
        [0, 0, img.GetSize()[2] - 1])[2])
    if e["variant"] == "skull_base":
        assert s["holds_brain"]
    else:
        assert e["variant"] == "orbits" and not s["holds_brain"]
        assert lowest > max(s["landmarks"]["right_eye"][2], s["landmarks"]["left_eye"][2])


def test_off_centre_t1(clinical_corpus):
    """The head tilted 15-25 degrees against the session's other series and moved off the field of view's centre,
    the face cut by its edge, the brain inside."""
    m, root = clinical_corpus.manifest, clinical_corpus.url
    e = _entry(m, "off_centre_t1")
    p, st, s = _by_uid(m)[e["series_uid"]]
    img = assert_read_back_equals_manifest(root, s)
    assert 12.0 <= max(abs(v) for v in e["tilt_deg"]) <= 28.0 and 20.0 <= e["offset_mm"] <= 40.0
    others = [o for st2 in p["studies"] if st2["session_id"] == st["session_id"] for o in st2["series"]
              if o["geometry"] and o["series_uid"] != s["series_uid"]]
    assert min(_angle_deg(s["transform"], o["transform"]) for o in others) >= 10.0
    assert s["holds_brain"] and not s["holds_face"]
    assert not all(_inside(img, s["landmarks"][n]) for n in ("nose_tip", "upper_lip", "chin"))
    centre = img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in img.GetSize()])
    assert np.linalg.norm(np.array(centre) - s["brain_center"]) >= 15.0


def test_ct_face_neck(clinical_corpus):
    """A head CT from C2 or below the mandible: eyes, nose and lips (and, from below the mandible, the chin) in its
    field of view, teeth in HU, the headrest behind the head."""
    m, root = clinical_corpus.manifest, clinical_corpus.url
    e = _entry(m, "ct_face_neck")
    s = _by_uid(m)[e["series_uid"]][2]
    assert e["chosen_series_uid"] == s["series_uid"] and s["role"] == "ct" and s["holds_brain"]
    img = assert_read_back_equals_manifest(root, s)
    names = ["right_eye", "left_eye", "nose_tip", "upper_lip"] + (["chin"] if e["down_to"] == "menton" else [])
    for name in names:
        assert _inside(img, s["landmarks"][name], 5.0 / img.GetSpacing()[0]), name
    assert s["holds_face"] == (e["down_to"] == "menton") or s["holds_face"]
    hu = sitk.GetArrayViewFromImage(img)
    assert (hu > 2100).sum() > 50  # enamel


# ------------------------------------------------------------------------------------------------ across corpora
def _plans(seed: int, quirks=LAYOUT_QUIRKS, scenarios=("pair", "two_ct", "two_mr")):
    """A corpus' plans after its layouts, without rendering or writing anything."""
    from mrict_dask.synth.anatomy import tissue_model
    from mrict_dask.synth.corpus import patient_seed, plan_patient
    from mrict_dask.synth.layouts import apply_layouts

    model = tissue_model()
    taken: set[str] = set()
    plans = [plan_patient(patient_seed(seed, i), sc, i, model, 0, seed, taken) for i, sc in enumerate(scenarios)]
    return plans, apply_layouts(plans, quirks, model, seed, taken)


def test_layout_variants_vary_between_corpora_and_repeat_within_a_seed():
    habits, styles, scouts, vendors = set(), set(), set(), set()
    for seed in range(16):
        plans, log = _plans(seed)
        series = [s for p in plans for st in p.studies for s in st.series]
        habits |= {s.manifest["temporal"]["habit"] for s in series if s.role == "perfusion"}
        styles |= {s.manifest["diffusion"]["style"] for s in series if s.role == "dti"}
        scouts |= {e["says_localizer"] for e in log if e["quirk"] == "ct_scout"}
        vendors |= {st.info.manufacturer for p in plans for st in p.studies if any(s.quirks for s in st.series)}
    assert habits == {"temporal_position", "acquisition_number", "acquisition_time"}
    assert styles == {"standard", "siemens", "ge", "philips"}
    assert scouts == {True, False}
    assert {"SIEMENS", "GE MEDICAL SYSTEMS", "Philips Medical Systems"} <= vendors

    def digest(plans):
        return [(st.info.uid, st.info.time, st.info.manufacturer, s.info.uid, s.info.description, s.info.number,
                 s.transform.tolist(), s.geometry.as_dict() if s.geometry else None, s.info.protocol.get("body_part"))
                for p in plans for st in p.studies for s in st.series]

    a, log_a = _plans(7)
    b, log_b = _plans(7)
    assert digest(a) == digest(b) and log_a == log_b


def test_layouts_change_only_the_sessions_they_name():
    """Plans of patients and sessions no layout touches are those of the clean corpus (the bytes follow from the
    plan; test_synth checks them for one session)."""
    clean, _ = _plans(5, quirks=())
    plans, log = _plans(5)
    touched = {e["patient_id"] for e in log}
    assert touched == {p.info.patient_id for p in plans}
    for before, after in zip(clean, plans):
        kept = [st for st in after.studies if not any(s.quirks for s in st.series)]
        assert kept, "every patient keeps at least one session as it was"
        by_uid = {st.info.uid: st for st in before.studies}
        for st in kept:
            old = by_uid[st.info.uid]
            assert st.info == old.info and st.folder_no == old.folder_no
            assert [(s.info, s.folder_no, s.transform.tolist()) for s in st.series] == \
                [(s.info, s.folder_no, s.transform.tolist()) for s in old.series]


@pytest.mark.slow
def test_layout_corpus_bytes_repeat_for_a_seed(tmp_path):
    """Rendering and writing the layouts is a function of the seed: the same corpus twice, byte for byte."""
    from mrict_dask.synth import generate_corpus

    quirks = ("coronal_t1", "perfusion", "dti", "secondary_capture", "ct_thick", "ct_reformat", "ct_scout", "rtstruct")
    digests = []
    for name in ("a", "b"):
        s = generate_corpus(str(tmp_path / name), patients=1, seed=3, quirks=quirks, layout="flat",
                            manifest_url=str(tmp_path / f"{name}.json"))
        assert {e["quirk"] for e in s.manifest["quirks"]} == set(quirks)
        digests.append({f: hashlib.sha256((tmp_path / name / f).read_bytes()).hexdigest() for f in
                        os.listdir(tmp_path / name)})
    assert digests[0] == digests[1] and len(digests[0]) > 500
