"""Clinical layouts: sessions spanning studies, any orientation, contrast evidence, 4D series, non-image objects,
CT reconstructions. Catalogs are built row by row as a scan writes them (header facts only); each test states the
layout a real export has and what a neuroradiologist preparing training data would choose."""

from __future__ import annotations

import numpy as np

from mrict_dask.config import Config, PlanConfig
from mrict_dask.plan import make_plan

from .test_plan import KEY, catalog, series_rows, uid

AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
SAGITTAL = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
CORONAL = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
HEAD_CT = dict(step=2.5, n=64, kernel="STANDARD")


def entry(plan, desc: str) -> dict:
    (e,) = [s for s in plan.series if s["description"] == desc]
    return e


def chosen(plan, modality: str) -> list[str]:
    return [s["description"] for s in plan.series if s["decision"] == "chosen" and s["modality"] == modality]


def four_d(patient: str, study: str, date: str, desc: str, volumes: list[dict], *, n=12, step=5.0, number=10,
           series_uid=None, **kw) -> list[dict]:
    """One series holding several volumes at the same positions; ``volumes[k]`` are the tags of volume k."""
    series_uid = series_uid or uid()
    out = []
    for k, tags in enumerate(volumes):
        rows = series_rows(patient, study, date, "MR", desc, n=n, step=step, number=number, series_uid=series_uid,
                           **kw)
        for r in rows:
            r.update(tags)
            r["url"] = r["url"].replace(".dcm", f"-v{k:03d}.dcm")
        out += rows
    return out


# --------------------------------------------------------------------------------------------- sessions
def test_one_study_per_sequence_is_one_session_and_candidates_are_compared_across_it():
    date = "20210305"
    cat = catalog(
        series_rows("A", uid(), date, "MR", "AX T1 pre", step=5.0, n=30, number=2, study_time="101500"),
        series_rows("A", uid(), date, "MR", "AX FLAIR", step=5.0, n=30, number=3, study_time="102000",
                    te=120, tr=9000, ti=2500),
        series_rows("A", uid(), date, "MR", "AX T1 POST GD", step=1.0, n=150, number=4, study_time="103500"),
        series_rows("A", uid(), "20210306", "CT", "HEAD", **HEAD_CT),
    )
    plan = make_plan(cat, Config(), KEY)
    assert {entry(plan, d)["session"] for d in ("AX T1 pre", "AX FLAIR", "AX T1 POST GD")} == {"MR session 1"}
    assert chosen(plan, "MR") == ["AX T1 POST GD"]
    pre = entry(plan, "AX T1 pre")
    assert pre["rank"] == 2 and "ranked 2 of 2 in MR session 1" in pre["reason"]
    assert len(plan.pairs) == 1 and plan.pairs[0].days_apart == 1


def test_sessions_are_split_by_date_and_joined_within_the_configured_hours():
    cat = catalog(
        series_rows("A", uid(), "20210305", "MR", "T1 POST day one", step=1.0, n=150, number=2, study_time="233000"),
        series_rows("A", uid(), "20210306", "MR", "T1 POST after midnight", step=1.0, n=150, number=3,
                    study_time="004500"),
        series_rows("A", uid(), "20210601", "MR", "T1 POST months later", step=1.0, n=150, number=4),
        series_rows("A", uid(), "20210306", "CT", "HEAD", **HEAD_CT),
    )
    plan = make_plan(cat, Config(), KEY)
    sessions = {s["description"]: s["session"] for s in plan.series if s["modality"] == "MR"}
    assert sessions == {"T1 POST day one": "MR session 1", "T1 POST after midnight": "MR session 1",
                        "T1 POST months later": "MR session 2"}
    strict = make_plan(cat, Config(plan=PlanConfig(session_hours=0.5)), KEY)
    assert len({s["session"] for s in strict.series if s["modality"] == "MR"}) == 3


# --------------------------------------------------------------------------------------------- orientation, contrast
def test_a_coronal_or_sagittal_t1_is_a_candidate_like_an_axial_one():
    cat = catalog(
        series_rows("A", uid(), "20200101", "MR", "COR T1 POST", step=4.0, n=40, number=5, iop=CORONAL),
        series_rows("A", uid(), "20200101", "MR", "AX T2", step=5.0, n=30, number=3, te=100, tr=4000),
        series_rows("A", uid(), "20200102", "CT", "HEAD", **HEAD_CT),
    )
    plan = make_plan(cat, Config(), KEY)
    assert chosen(plan, "MR") == ["COR T1 POST"] and len(plan.pairs) == 1
    assert "coronal" in entry(plan, "COR T1 POST")["reason"]


def test_contrast_from_the_tag_when_the_description_says_nothing_and_lookalike_words_do_not_count():
    st = uid()
    cat = catalog(
        # a decoy: finer voxels, and "post" inside a word naming a phantom position; no contrast agent
        series_rows("A", st, "20200101", "MR", "t1post1", step=0.9, n=180, number=3, ps=(0.9, 0.9),
                    mr_acquisition_type="3D"),
        series_rows("A", st, "20200101", "MR", "t1_fl3d_tra_v1", step=1.0, n=160, number=4,
                    mr_acquisition_type="3D"),
        series_rows("A", st, "20200101", "MR", "t1_fl3d_tra_v1", step=1.0, n=160, number=7, contrast="Gadavist",
                    mr_acquisition_type="3D"),
        series_rows("A", st, "20200101", "MR", "AX T1 WO CONTRAST", step=0.8, n=200, number=2),
        series_rows("A", uid(), "20200102", "CT", "HEAD", **HEAD_CT),
    )
    plan = make_plan(cat, Config(), KEY)
    mr = [s for s in plan.series if s["modality"] == "MR"]
    best = next(s for s in mr if s["decision"] == "chosen")
    assert best["series_number"] == 7 and "post-contrast (ContrastBolusAgent set)" in best["evidence"]
    for s in mr:
        if s["series_number"] != 7:
            assert "no contrast agent (tags and description)" in s["evidence"], s


def test_a_description_saying_post_counts_without_the_tag_and_pre_words_win():
    st = uid()
    cat = catalog(
        series_rows("A", st, "20200101", "MR", "T1 pre contrast", step=1.0, n=150, number=3),
        series_rows("A", st, "20200101", "MR", "T1_POST_GAD", step=3.0, n=50, number=4),
        series_rows("A", uid(), "20200102", "CT", "HEAD", **HEAD_CT),
    )
    plan = make_plan(cat, Config(), KEY)
    assert chosen(plan, "MR") == ["T1_POST_GAD"]
    assert "post-contrast (its description)" in entry(plan, "T1_POST_GAD")["evidence"]


def test_whole_head_3d_and_original_outrank_partial_2d_and_derived():
    st = uid()
    cat = catalog(
        series_rows("A", st, "20200101", "MR", "T1 POST slab", step=1.0, n=70, number=2, contrast="GD",
                    mr_acquisition_type="3D"),
        series_rows("A", st, "20200101", "MR", "T1 POST 2D", step=1.0, n=150, number=3, contrast="GD"),
        series_rows("A", st, "20200101", "MR", "T1 POST MPR", step=1.0, n=150, number=4, contrast="GD",
                    mr_acquisition_type="3D", image_type=r"DERIVED\SECONDARY\MPR"),
        series_rows("A", st, "20200101", "MR", "T1 POST 3D", step=1.2, n=130, number=5, contrast="GD",
                    mr_acquisition_type="3D"),
        series_rows("A", uid(), "20200102", "CT", "HEAD", **HEAD_CT),
    )
    plan = make_plan(cat, Config(), KEY)
    ranks = {s["description"]: s["rank"] for s in plan.series if s["modality"] == "MR"}
    assert ranks == {"T1 POST 3D": 1, "T1 POST 2D": 2, "T1 POST MPR": 3, "T1 POST slab": 4}
    assert "partial head coverage" in entry(plan, "T1 POST slab")["reason"]
    assert "DERIVED (a reformat)" in entry(plan, "T1 POST MPR")["evidence"]


# --------------------------------------------------------------------------------------------- 4D series
def _dsc(tag: str, n_time: int = 20) -> list[dict]:
    if tag == "TemporalPositionIdentifier":
        return [{"temporal_position": t + 1} for t in range(n_time)]
    if tag == "AcquisitionNumber":
        return [{"acquisition_number": t + 1} for t in range(n_time)]
    return [{"acquisition_number": None, "acquisition_time": f"1015{t:02d}.500"} for t in range(n_time)]


def test_perfusion_and_diffusion_series_are_split_listed_once_and_never_a_t1():
    for tag in ("TemporalPositionIdentifier", "AcquisitionNumber", "AcquisitionTime"):
        st = uid()
        perf = four_d("A", st, "20200101", "ep2d_perf", _dsc(tag), contrast="GADOVIST", te=30.0, tr=1500.0,
                      scanning_sequence="EP", number=8)
        dirs = [(0, 0, 0)] + [tuple(v) for v in np.eye(3)] + [(0.707, 0.707, 0.0), (0.0, 0.707, 0.707)]
        dti = four_d("A", st, "20200101", "DTI 6 dir",
                     [{"diffusion_b_value": 0.0 if k == 0 else 1000.0, "diffusion_direction": list(d)}
                      for k, d in enumerate(dirs)], te=90.0, tr=8000.0, scanning_sequence="EP", number=9)
        cat = catalog(perf, dti, series_rows("A", st, "20200101", "MR", "T1 MPRAGE", step=1.0, n=160, number=4,
                                             te=3.0, tr=2300.0, ti=900.0, scanning_sequence="GR"),
                      series_rows("A", uid(), "20200102", "CT", "HEAD", **HEAD_CT))
        plan = make_plan(cat, Config(), KEY)
        p, d = entry(plan, "ep2d_perf"), entry(plan, "DTI 6 dir")  # one entry each
        assert p["volumes"] == 20 and p["split_by"] == tag and p["volume_kind"] == "dynamic", (tag, p)
        assert p["decision"] == "not chosen" and "never a T1 candidate" in p["reason"], p
        assert d["volumes"] == 6 and d["volume_kind"] == "diffusion" and "never a T1 candidate" in d["reason"]
        assert chosen(plan, "MR") == ["T1 MPRAGE"] and len(plan.pairs) == 1


def test_repeated_positions_that_no_tag_tells_apart_are_refused_not_guessed():
    cat = catalog(four_d("A", uid(), "20200101", "T1 repeated", [{}, {}], step=1.0, n=80),
                  series_rows("A", uid(), "20200102", "CT", "HEAD", **HEAD_CT))
    plan = make_plan(cat, Config(), KEY)
    e = entry(plan, "T1 repeated")
    assert e["decision"] == "refused" and e["reason"].startswith("duplicate slice positions")
    assert plan.exclusions[0]["reason"].startswith("no usable MR series")


def test_multi_echo_t1_is_one_entry_and_its_best_echo_is_chosen():
    su, st = uid(), uid()
    rows = []
    for echo, te in ((1, 2.5), (2, 6.0)):
        part = series_rows("A", st, "20200101", "MR", "T1 ME MPRAGE", step=1.0, n=160, number=6, te=te, tr=2500.0,
                           ti=1000.0, series_uid=su, echo_numbers=echo, scanning_sequence="GR",
                           mr_acquisition_type="3D")
        for r in part:
            r["url"] = r["url"].replace(".dcm", f"-e{echo}.dcm")
        rows += part
    plan = make_plan(catalog(rows, series_rows("A", uid(), "20200102", "CT", "HEAD", **HEAD_CT)), Config(), KEY)
    e = entry(plan, "T1 ME MPRAGE")
    assert e["volumes"] == 2 and e["volume_kind"] == "echo" and e["decision"] == "chosen"
    assert e["volume"] == "echo 1 (TE 2.5 ms)"
    assert all(u.endswith("-e1.dcm") for u in plan.pairs[0].mr_files)


# --------------------------------------------------------------------------------------------- non-image objects
def test_non_image_objects_are_left_out_with_a_reason_and_never_cost_the_pair():
    st = uid()
    cat = catalog(
        series_rows("A", st, "20200101", "MR", "T1 POST", step=1.0, n=150, number=3),
        series_rows("A", st, "20200101", "MR", "Screen Save", n=1, number=99, photometric="RGB",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.7", image_position=None, image_orientation=None),
        series_rows("A", st, "20200101", "SEG", "tumour seg", n=1, number=300,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4"),
        series_rows("A", st, "20200101", "MR", "colour map", n=40, step=3.0, number=98, photometric="PALETTE COLOR"),
        series_rows("A", st, "20200101", "MR", "ADC", n=30, step=5.0, number=97, image_type=r"DERIVED\PRIMARY\ADC"),
        series_rows("A", st, "20200101", "MR", "T1 SUB", n=150, step=1.0, number=96,
                    image_type=r"DERIVED\SECONDARY\SUBTRACTION"),
        series_rows("A", uid(), "20200102", "CT", "HEAD", **HEAD_CT),
        series_rows("A", uid(), "20200102", "RTSTRUCT", "RS", n=1, number=1, rows=None, columns=None,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.481.3"),
    )
    plan = make_plan(cat, Config(), KEY)
    reasons = {s["description"]: s["reason"] for s in plan.series if s["decision"] == "refused"}
    assert reasons["Screen Save"].startswith("secondary capture")
    assert reasons["tumour seg"].startswith("not a CT/MR image: segmentation (SEG)")
    assert reasons["RS"].startswith("not a CT/MR image: RT structure set")
    assert reasons["colour map"].startswith("colour image (PhotometricInterpretation PALETTE COLOR)")
    assert reasons["ADC"].startswith("derived map") and reasons["T1 SUB"].startswith("subtraction image")
    assert chosen(plan, "MR") == ["T1 POST"] and len(plan.pairs) == 1 and not plan.exclusions


# --------------------------------------------------------------------------------------------- CT reconstructions
def test_ct_original_soft_tissue_before_reformats_bone_and_mips_and_scouts_of_any_count():
    st = uid()
    cat = catalog(
        series_rows("A", uid(), "20200101", "MR", "T1 POST", step=1.0, n=150, number=1),
        series_rows("A", st, "20200102", "CT", "Topogram 0.6 T20f", n=1, step=1.0, number=1, iop=CORONAL),
        series_rows("A", st, "20200102", "CT", "Ref", n=1, step=1.0, number=2, iop=SAGITTAL,
                    series_uid=None, image_type=r"ORIGINAL\PRIMARY"),
        series_rows("A", st, "20200102", "CT", "Head 2.5 STND", **HEAD_CT, number=3),
        series_rows("A", st, "20200102", "CT", "Head 1.25 BONEPLUS", step=1.25, n=128, number=4, kernel="BONEPLUS"),
        series_rows("A", st, "20200102", "CT", "Head 5 STND", step=5.0, n=32, number=5, kernel="STANDARD"),
        series_rows("A", st, "20200102", "CT", "COR reformat", step=2.0, n=90, number=6, iop=CORONAL,
                    kernel="STANDARD", image_type=r"DERIVED\SECONDARY\REFORMATTED\AVERAGE"),
        series_rows("A", st, "20200102", "CT", "MIP", step=5.0, n=30, number=7,
                    image_type=r"DERIVED\SECONDARY\MIP"),
    )
    two_plane = series_rows("A", st, "20200102", "CT", "Surview", n=1, step=1.0, number=8, iop=CORONAL) + \
        series_rows("A", st, "20200102", "CT", "Surview", n=1, step=1.0, number=8, iop=SAGITTAL)
    for r in two_plane:
        r["series_uid"] = two_plane[0]["series_uid"]
        r["image_type"] = r"ORIGINAL\PRIMARY"  # nothing in the tags says scout
    cat = catalog(cat.to_dict("records"), two_plane)
    plan = make_plan(cat, Config(), KEY)
    ranks = {s["description"]: s["rank"] for s in plan.series if s["modality"] == "CT"}
    assert chosen(plan, "CT") == ["Head 2.5 STND"]
    assert ranks["Head 2.5 STND"] == 1 and ranks["Head 5 STND"] == 2  # soft tissue: thinnest first
    assert ranks["Head 1.25 BONEPLUS"] == 3 and ranks["COR reformat"] == 4  # then bone; reformats last
    refused = {s["description"]: s["reason"] for s in plan.series if s["decision"] == "refused"}
    assert refused["MIP"].startswith("projection image")
    assert refused["Topogram 0.6 T20f"].startswith("localizer/scout")
    assert refused["Surview"].startswith("localizer/scout")


def test_a_time_series_whose_slices_carry_their_own_times_is_split_by_turn_at_each_position():
    st, n_time, n_slices = uid(), 15, 12
    perf = four_d("A", st, "20200101", "ep2d_perf", [{} for _ in range(n_time)], n=n_slices, te=30.0, tr=1500.0,
                  scanning_sequence="EP", number=8, acquisition_number=None, instance_number=None)
    for j, r in enumerate(perf):  # interleaved slices: each image its own time, within its time point's window
        k, s = divmod(j, n_slices)
        seconds = 10 * 3600 + 15 * 60 + k * 1.5 + ((s * 5) % n_slices) * 0.1
        hh, rem = divmod(seconds, 3600)
        r["acquisition_time"] = f"{int(hh):02d}{int(rem // 60):02d}{rem % 60:09.6f}"
    plan = make_plan(catalog(perf, series_rows("A", st, "20200101", "MR", "T1 POST", step=1.0, n=150, number=4),
                             series_rows("A", uid(), "20200102", "CT", "HEAD", **HEAD_CT)), Config(), KEY)
    e = entry(plan, "ep2d_perf")
    assert e["volumes"] == n_time and e["volume_kind"] == "dynamic"
    assert e["split_by"] == "AcquisitionTime order at each position"
    # shuffled times that do not make consecutive windows are no order to trust: refused
    rng = np.random.default_rng(3)
    for r in perf:
        r["acquisition_time"] = f"1015{rng.uniform(0, 59):09.6f}"
    plan = make_plan(catalog(perf, series_rows("A", st, "20200101", "MR", "T1 POST", step=1.0, n=150, number=4),
                             series_rows("A", uid(), "20200102", "CT", "HEAD", **HEAD_CT)), Config(), KEY)
    assert entry(plan, "ep2d_perf")["reason"].startswith("duplicate slice positions")


def test_an_angiography_is_never_a_t1_even_with_contrast_and_a_fast_3d_gradient_echo():
    st = uid()
    cat = catalog(
        series_rows("A", st, "20200101", "MR", "tof_3d_multi-slab", step=0.5, n=160, number=5, te=3.6, tr=21.0,
                    sequence_name="*fl3d3r_t70", mr_acquisition_type="3D"),
        series_rows("A", st, "20200101", "MR", "CE-MRA head", step=0.8, n=150, number=6, te=1.4, tr=3.5,
                    sequence_name="*fl3d1", contrast="Gadovist", mr_acquisition_type="3D"),
        series_rows("A", st, "20200101", "MR", "t1_mprage_sag", step=1.0, n=176, number=3, te=2.3, tr=2300.0,
                    ti=900.0, iop=SAGITTAL, mr_acquisition_type="3D"),
        series_rows("A", uid(), "20200102", "CT", "HEAD", **HEAD_CT),
    )
    plan = make_plan(cat, Config(), KEY)
    assert chosen(plan, "MR") == ["t1_mprage_sag"]
    for desc in ("tof_3d_multi-slab", "CE-MRA head"):
        assert entry(plan, desc)["reason"].startswith("not T1-weighted"), entry(plan, desc)


def test_a_scout_image_inside_a_ct_series_is_its_own_refused_entry():
    rows = series_rows("A", uid(), "20200102", "CT", "HEAD", **HEAD_CT, number=2)
    scout = series_rows("A", rows[0]["study_uid"], "20200102", "CT", "HEAD", n=1, step=1.0, iop=CORONAL, number=2,
                        series_uid=rows[0]["series_uid"], image_type=r"ORIGINAL\PRIMARY\LOCALIZER")
    scout[0]["url"] = scout[0]["url"].replace(".dcm", "-scout.dcm")
    plan = make_plan(catalog(series_rows("A", uid(), "20200101", "MR", "T1 POST", step=1.0, n=150, number=1),
                             rows, scout), Config(), KEY)
    ct = [s for s in plan.series if s["modality"] == "CT"]
    assert sorted((s["decision"], s["n_files"]) for s in ct) == [("chosen", HEAD_CT["n"]), ("refused", 1)]
    assert len({s["stack"] for s in ct}) == 2 and len(plan.pairs[0].ct_files) == HEAD_CT["n"]


def test_volume_file_names_stay_unique_when_labels_share_a_long_prefix():
    from mrict_dask.stacks import Split

    label = "b=1000 direction (0.71, 0.71, 0.00) (AcquisitionNumber {})"
    names = {Split(0, i, 3, "diffusion", "x", label.format(i + 12)).name for i in range(3)}
    assert len(names) == 3 and all(n.startswith(("v001_", "v002_", "v003_")) for n in names)


# --------------------------------------------------------------------------------------------- vendor habits
def test_calibration_and_t2_star_gradient_echoes_are_never_the_t1():
    """Short-TR gradient echoes that are not structural T1: a coil calibration (8 x 8 x 10 mm), a susceptibility
    series with contrast agent set (GE sets it on every series after injection), a steady-state sequence."""
    st = uid()
    cat = catalog(
        series_rows("A", st, "20200101", "MR", "SenseRefScan", step=10.0, n=25, number=1, ps=(8.0, 8.0), rows=64,
                    cols=64, tr=4.0, te=0.7, scanning_sequence="GR", mr_acquisition_type="3D"),
        series_rows("A", st, "20200101", "MR", "Ax SWAN", step=2.0, n=70, number=2, tr=45.0, te=24.0,
                    scanning_sequence="GR", mr_acquisition_type="3D", contrast="GADAVIST"),
        series_rows("A", st, "20200101", "MR", "Ax 3D FIESTA-C", step=0.8, n=120, number=3, tr=5.6, te=2.3,
                    scanning_sequence="GR", mr_acquisition_type="3D"),
        series_rows("A", st, "20200101", "MR", "AX GRE", step=5.0, n=30, number=4, tr=650.0, te=18.0,
                    scanning_sequence="GR"),
        series_rows("A", st, "20200101", "MR", "AX T1 SE +C", step=5.0, n=30, number=5, tr=500.0, te=10.0,
                    scanning_sequence="SE", contrast="GADAVIST"),
        series_rows("A", uid(), "20200102", "CT", "HEAD", **HEAD_CT),
    )
    plan = make_plan(cat, Config(), KEY)
    assert chosen(plan, "MR") == ["AX T1 SE +C"]
    assert "rejected by rule" in entry(plan, "SenseRefScan")["reason"]
    for desc in ("Ax SWAN", "Ax 3D FIESTA-C", "AX GRE"):
        assert "not T1-weighted" in entry(plan, desc)["reason"], desc
    coarse = series_rows("A", st, "20200101", "MR", "3D coarse", step=10.0, n=25, number=6, ps=(8.0, 8.0),
                         rows=64, cols=64, tr=4.0, te=0.7, scanning_sequence="GR", mr_acquisition_type="3D")
    plan = make_plan(catalog(coarse, series_rows("A", uid(), "20200102", "CT", "HEAD", **HEAD_CT)), Config(), KEY)
    assert "voxel too coarse" in entry(plan, "3D coarse")["reason"]


def test_b0_on_every_image_does_not_make_a_series_diffusion():
    """GE and Philips write b = 0 on their MR images: a T1 with two dynamics stays a T1 (split by time)."""
    rows = four_d("A", uid(), "20200101", "sT1W_3D_TFE", [{"temporal_position": 1, "diffusion_b_value": 0.0},
                                                           {"temporal_position": 2, "diffusion_b_value": 0.0}],
                  n=150, step=1.0, mr_acquisition_type="3D", contrast="GD")
    plan = make_plan(catalog(rows, series_rows("A", uid(), "20200102", "CT", "HEAD", **HEAD_CT)), Config(), KEY)
    (e,) = [s for s in plan.series if s["modality"] == "MR"]
    assert e["decision"] == "chosen" and e["volume_kind"] != "diffusion", e


def test_a_contrast_agent_saying_none_or_a_pre_description_is_not_post_contrast():
    st = uid()
    cat = catalog(
        series_rows("A", st, "20200101", "MR", "Ax T1 3D FSPGR", step=1.0, n=160, number=3, contrast="NONE",
                    mr_acquisition_type="3D"),
        series_rows("A", st, "20200101", "MR", "AX T1 PRE", step=1.0, n=160, number=4, contrast="GADAVIST",
                    mr_acquisition_type="3D"),
        series_rows("A", st, "20200101", "MR", "AX T1 SE", step=5.0, n=30, number=5, contrast="GADAVIST"),
        series_rows("A", st, "20200101", "MR", "T1 AX POST-OP", step=0.9, n=180, number=6,
                    mr_acquisition_type="3D"),
        series_rows("A", uid(), "20200102", "CT", "HEAD", **HEAD_CT),
    )
    plan = make_plan(cat, Config(), KEY)
    assert chosen(plan, "MR") == ["AX T1 SE"]
    for desc in ("Ax T1 3D FSPGR", "AX T1 PRE", "T1 AX POST-OP"):
        assert not any(ev.startswith("post-contrast") for ev in entry(plan, desc)["evidence"]), desc


def test_bone_kernels_of_other_vendors_and_low_dose_head_ct():
    st = uid()
    cat = catalog(
        series_rows("A", uid(), "20200101", "MR", "AX T1 POST GD", step=1.0, n=150, number=2),
        series_rows("A", st, "20200102", "CT", "Head Bone 0.5", step=0.5, n=300, number=2, kernel="FC30"),
        series_rows("A", st, "20200102", "CT", "Head Sharp", step=0.6, n=250, number=3, kernel="Hr68"),
        series_rows("A", st, "20200102", "CT", "Head", step=0.8, n=190, number=4, kernel="YD"),
        series_rows("A", st, "20200102", "CT", "HEAD LOW DOSE 5mm", step=5.0, n=30, number=5, kernel="FC21"),
    )
    plan = make_plan(cat, Config(), KEY)
    assert chosen(plan, "CT") == ["HEAD LOW DOSE 5mm"]
    for desc in ("Head Bone 0.5", "Head Sharp", "Head"):
        assert any(ev.startswith("bone/sharp kernel") for ev in entry(plan, desc)["evidence"]), desc


def test_phase_and_fat_images_are_refused_and_a_blank_patient_id_is_never_paired():
    st = uid()
    dixon = [series_rows("A", st, "20200101", "MR", "T1W_mDIXON_GD", step=1.0, n=150, number=9, contrast="GD",
                         series_uid=st + ".9", image_type=rf"ORIGINAL\PRIMARY\{t}\DIXON", folder=f"A{t}")
             for t in ("F", "W", "P")]
    for rows, t in zip(dixon, ("F", "W", "P")):
        for r in rows:
            r["url"] = r["url"].replace(".dcm", f"-{t}.dcm")
            r["instance_number"] += 1000 * "FWP".index(t)
    cat = catalog(*dixon, series_rows("A", uid(), "20200102", "CT", "HEAD", **HEAD_CT),
                  series_rows("", uid(), "20200101", "MR", "AX T1 POST", step=1.0, n=150, number=2),
                  series_rows("", uid(), "20200102", "CT", "HEAD", **HEAD_CT))
    plan = make_plan(cat, Config(), KEY)
    a = [s for s in plan.series if s["modality"] == "MR" and s["description"] == "T1W_mDIXON_GD"]
    refused = [s["reason"] for s in a if s["decision"] == "refused"]
    assert len(refused) == 2 and all("not a magnitude image" in r for r in refused), a
    assert [s["decision"] for s in a].count("chosen") == 1
    assert len(plan.pairs) == 1
    assert any("no PatientID" in e["reason"] for e in plan.exclusions), plan.exclusions


def test_dti_with_several_b0_volumes_is_split_by_instance_order():
    """GE writes several b = 0 volumes into a DTI series with nothing but InstanceNumber telling them apart: each
    repeat is its own volume (InstanceNumber order at each position), not a refusal; without unique
    InstanceNumbers the series is refused, not guessed."""
    dirs = [(0, 0, 0), (0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]
    vols = [{"diffusion_b_value": 0.0 if k < 2 else 1000.0, "diffusion_direction": list(d)}
            for k, d in enumerate(dirs)]
    rows = four_d("A", uid(), "20200101", "DTI", vols, te=90.0, tr=8000.0, scanning_sequence="EP", number=9,
                  acquisition_number=None)
    n = len(rows) // len(dirs)
    for k, r in enumerate(rows):
        r["instance_number"] = k + 1  # volume after volume, as the scanner numbers them
    ct = series_rows("A", uid(), "20200102", "CT", "HEAD", **HEAD_CT)
    d = entry(make_plan(catalog(rows, ct), Config(), KEY), "DTI")
    assert d["volumes"] == 5 and d["volume_kind"] == "diffusion" and "InstanceNumber" in d["split_by"], d
    for r in rows:
        r["instance_number"] = (r["instance_number"] - 1) % n + 1  # numbers repeat: nothing tells the b0s apart
    d = entry(make_plan(catalog(rows, ct), Config(), KEY), "DTI")
    assert d["decision"] == "refused" and not d.get("volumes"), d
