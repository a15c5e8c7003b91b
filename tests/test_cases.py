"""`mrict-dask export` and `mrict-dask evaluate` on stores the pipeline made from the generated corpus.

Export: the case layout, geometry and HU read back with SimpleITK and nibabel against the store's own arrays and
attributes, in native space (each pair's affine; the exported MR lies on its source MR series) and template space,
an oblique left-handed native grid (tests/native_contract.py), re-runs that skip finished cases and redo half-written
ones, object storage to object storage on the Dask cluster, and no identifier in any file. Versions (a grown store of
synthetic results): a pinned version exported and scored, retired and withdrawn pairs never exported and taken out of
an earlier export, a version that held a withdrawn patient refused in one line. Evaluate: scores against
computations made here from the exported files (by hand, scikit-image), one error per bad pair while the other is
scored, Zarr and folder predictions alike. The README's worked example runs as written.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import zarr
from click.testing import CliRunner

from mrict_dask.cli import main

from .conftest import readme_block, upload_tree

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _cli(*args: str):
    return CliRunner().invoke(main, ["-q", *[str(a) for a in args]])


def _one_error(result, *needles: str) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error")]
    assert len(lines) == 1, result.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


class Store:
    """The store read with zarr directly (the test's own view, not the code under test)."""

    def __init__(self, url: str):
        self.g = zarr.open_group(url, mode="r", use_consolidated=False)
        self.ids = [str(v) for v in self.g["pair"][:]]
        self.split = [str(v) for v in self.g["split"][:]]
        self.days = [int(v) for v in self.g["days_apart"][:]]
        self.ct_lo, self.ct_hi = self.g["ct_lo"][:].astype(float), self.g["ct_hi"][:].astype(float)
        self.mr_lo, self.mr_hi = self.g["mr_lo"][:].astype(float), self.g["mr_hi"][:].astype(float)

    def hu(self, i: int, group: str = "") -> np.ndarray:
        ct = np.asarray(self.g[f"{group}ct"][i], dtype=np.float64)
        return np.rint(ct * (self.ct_hi[i] - self.ct_lo[i]) + self.ct_lo[i])

    def matrix(self, i: int, group: str = "") -> np.ndarray:
        """Voxel index (x, y, z, 1) -> LPS mm, from the attributes (template) or the stored affine (native)."""
        if group:
            return np.asarray(self.g["native/affine"][i])
        grid = self.g.attrs["grid"]
        m = np.eye(4)
        m[:3, :3] = np.asarray(grid["direction"]).reshape(3, 3) * np.asarray(grid["spacing"])
        m[:3, 3] = grid["origin"]
        return m


def _sitk_matrix(img) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing())
    m[:3, 3] = img.GetOrigin()
    return m


def _check_case(folder, st: Store, i: int, group: str = "", ext: str = "nii.gz") -> None:
    """A case's files agree with the store to the voxel: geometry (SimpleITK, and nibabel for NIfTI), CT in HU,
    MR in its clipped scanner units, the mask."""
    want = st.matrix(i, group)
    mask = np.asarray(st.g[f"{group}valid"][i], bool)
    if f"{group}head" in st.g:
        mask &= np.asarray(st.g[f"{group}head"][i], bool)
    images = {name: sitk.ReadImage(os.path.join(folder, f"{name}.{ext}")) for name in ("mr", "ct", "mask")}
    for name, img in images.items():
        np.testing.assert_allclose(_sitk_matrix(img), want, atol=1e-4, err_msg=name)
        assert img.GetSize()[::-1] == mask.shape, name
    assert images["ct"].GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(images["ct"]), st.hu(i, group))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(images["mask"]), mask.astype(np.uint8))
    mr = np.asarray(st.g[f"{group}mr"][i], np.float64) * (st.mr_hi[i] - st.mr_lo[i]) + st.mr_lo[i]
    np.testing.assert_allclose(sitk.GetArrayFromImage(images["mr"]), mr, rtol=1e-6, atol=1e-3)
    if ext == "nii.gz":
        nimg = nib.load(os.path.join(folder, "ct.nii.gz"))
        np.testing.assert_allclose(nimg.affine, RAS_FROM_LPS @ want, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(nimg.dataobj).transpose(2, 1, 0), st.hu(i, group))


@pytest.fixture(scope="module")
def native_export(pipeline_store, tmp_path_factory):
    """The pipeline store exported with the defaults: native space, .nii.gz."""
    out = tmp_path_factory.mktemp("export") / "cases"
    result = _cli("export", pipeline_store, out)
    assert result.exit_code == 0, result.output
    return str(out), result


def _source_mr(store: str, pair_id: str):
    """The MR series the plan chose for the pair, read from the corpus by SimpleITK (not by the code under test)."""
    from mrict_dask.plan import Plan

    plan = Plan.from_json(open(store + ".work/plan.json").read())
    files = next(p.mr_files for p in plan.pairs if p.pair_id == pair_id)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(os.path.dirname(files[0])))
    return reader.Execute()


# ----------------------------------------------------------------------------------------------- export
def test_export_writes_each_ok_pair_in_native_space_with_its_geometry_and_hu(pipeline_store, native_export):
    """The pipeline's own native space: each case on its pair's affine, in the MR series' patient frame."""
    out, result = native_export
    st = Store(pipeline_store)
    assert "native space" in result.stdout and "2 case(s) written" in result.stdout
    assert "head & valid" in result.stdout
    cases = sorted(n for n in os.listdir(out) if os.path.isdir(os.path.join(out, n)) and not n.startswith("."))
    assert cases == sorted([*st.ids, "overview"])
    for i, pid in enumerate(st.ids):
        assert sorted(os.listdir(os.path.join(out, pid))) == ["ct.nii.gz", "mask.nii.gz", "mr.nii.gz"]
        _check_case(os.path.join(out, pid), st, i, group="native/")
        with open(os.path.join(out, "overview", f"{pid}.png"), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
        # the exported MR lies on its source series: the scanner's MR resampled onto the case's grid matches it
        mr = sitk.ReadImage(os.path.join(out, pid, "mr.nii.gz"))
        mask = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, pid, "mask.nii.gz"))).astype(bool)
        source = sitk.Resample(sitk.Cast(_source_mr(pipeline_store, pid), sitk.sitkFloat32), mr, sitk.Transform(),
                               sitk.sitkLinear, 0.0)
        r = np.corrcoef(sitk.GetArrayFromImage(source)[mask], sitk.GetArrayFromImage(mr)[mask])[0, 1]
        assert r > 0.98, (pid, r)
    with open(os.path.join(out, "overview.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["pair"] for r in rows] == st.ids
    assert [r["split"] for r in rows] == st.split and sorted(st.split) == ["train", "val"]
    assert [int(r["days_apart"]) for r in rows] == st.days
    for r, i in zip(rows, range(len(rows))):
        assert r["space"] == "native" and r["mask"] == "head & valid"
        assert float(r["brain_dice"]) == pytest.approx(float(st.g["brain_dice"][i]), rel=1e-5)
        mask = np.asarray(st.g["native/valid"][i]) & np.asarray(st.g["native/head"][i])
        assert int(r["mask_voxels"]) == int(mask.sum())
        assert not (mask & np.asarray(st.g["native/face"][i])).any()  # no defaced voxel is in the metric mask


def test_nothing_identifying_leaves_the_export(native_export, corpus):
    out, _ = native_export
    phi = [s for s in corpus.manifest["phi_strings"] if len(s) >= 4]
    uid = re.compile(rb"\d+(?:\.\d+){4,}")
    date = re.compile(rb"(?<!\d)(?:19|20)\d{2}-?[01]\d-?[0-3]\d(?!\d)")
    for root, _, files in os.walk(out):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                blob = fh.read()
            if f.endswith(".nii.gz"):
                blob = gzip.decompress(blob)
                header = nib.load(path).header
                for field in ("descrip", "aux_file", "intent_name", "db_name"):
                    assert bytes(header[field]).strip(b"\0 ") == b"", (path, field)
            if f.endswith((".csv", ".json")):
                assert not uid.search(blob) and not date.search(blob), path
            for s in phi:
                assert s.encode() not in blob, (path, s)


def test_export_rerun_skips_finished_cases_and_redoes_half_written_ones(pipeline_store, native_export, tmp_path):
    out = str(tmp_path / "cases")
    shutil.copytree(native_export[0], out)
    st = Store(pipeline_store)
    a, b = st.ids
    with open(os.path.join(out, a, "sct.nii.gz"), "wb") as fh:  # a user's prediction beside the CT
        fh.write(b"the user's own file")
    again = _cli("export", pipeline_store, out)
    assert again.exit_code == 0 and "0 case(s) written, 2 already finished" in again.stdout, again.output
    # what a kill leaves: case a's files written (one cut short), its marker never; case b's mask lost afterwards
    os.remove(os.path.join(out, ".mrict-export", f"{a}.json"))
    ct = os.path.join(out, a, "ct.nii.gz")
    with open(ct, "rb") as fh:
        head = fh.read(200)
    with open(ct, "wb") as fh:
        fh.write(head)
    os.remove(os.path.join(out, b, "mask.nii.gz"))
    redo = _cli("export", pipeline_store, out)
    assert redo.exit_code == 0 and "2 case(s) written, 0 already finished" in redo.stdout, redo.output
    for i, pid in enumerate(st.ids):
        _check_case(os.path.join(out, pid), st, i, group="native/")
    with open(os.path.join(out, a, "sct.nii.gz"), "rb") as fh:
        assert fh.read() == b"the user's own file"
    with open(os.path.join(out, "overview.csv")) as fh:
        assert [r["pair"] for r in csv.DictReader(fh)] == st.ids


def test_export_template_space_by_split_or_pair_list_as_metaimage(pipeline_store, tmp_path):
    st = Store(pipeline_store)
    val = st.split.index("val")
    result = _cli("export", pipeline_store, tmp_path / "val", "--space", "template", "--split", "val",
                  "--format", "mha")
    assert result.exit_code == 0 and "template space" in result.stdout, result.output
    assert sorted(os.listdir(tmp_path / "val" / st.ids[val])) == ["ct.mha", "mask.mha", "mr.mha"]
    assert not os.path.exists(tmp_path / "val" / st.ids[1 - val])
    _check_case(tmp_path / "val" / st.ids[val], st, val, ext="mha")
    with open(tmp_path / "val" / st.ids[val] / "ct.mha", "rb") as fh:
        header = fh.read().split(b"ElementDataFile")[0].decode()
    keys = {line.split("=")[0].strip() for line in header.splitlines() if "=" in line}
    assert keys <= {"ObjectType", "NDims", "BinaryData", "BinaryDataByteOrderMSB", "CompressedData",
                    "CompressedDataSize", "TransformMatrix", "Offset", "CenterOfRotation", "AnatomicalOrientation",
                    "ElementSpacing", "DimSize", "ElementType"}, header
    one = _cli("export", pipeline_store, tmp_path / "one", "--space", "template", "--pairs", st.ids[0])
    assert one.exit_code == 0 and os.listdir(tmp_path / "one" / ".mrict-export") == [f"{st.ids[0]}.json"]
    _check_case(tmp_path / "one" / st.ids[0], st, 0)
    unknown = _cli("export", pipeline_store, tmp_path / "x", "--pairs", f"{st.ids[0]},Pnot-a-pair")
    assert unknown.exit_code == 2
    _one_error(unknown, "Pnot-a-pair")


def test_a_store_written_before_native_space_and_head_masks(old_store, tmp_path):
    """Template space only, no 'head': the default is template space, the mask falls back to 'valid' and says so."""
    url, ids = old_store
    st = Store(url)
    result = _cli("export", url, tmp_path / "cases")
    assert result.exit_code == 0 and "template space" in result.stdout and "valid only" in result.stdout
    for i, pid in enumerate(ids):
        _check_case(tmp_path / "cases" / pid, st, i)  # the mask is 'valid' (the store has no 'head')
    native = _cli("export", url, tmp_path / "y", "--space", "native")
    assert native.exit_code == 2
    _one_error(native, "no native space")


def test_export_an_oblique_left_handed_native_grid(oblique_store, tmp_path):
    """Pair 1 of the oblique copy (tests/native_contract.py): NIfTI, nibabel and MetaImage keep its direction."""
    st = Store(oblique_store)
    assert np.linalg.det(st.matrix(1, "native/")[:3, :3]) < 0
    assert not np.allclose(np.abs(st.matrix(1, "native/")[:3, :3]), np.diag([2.0, 2.0, 2.0]))
    for fmt in ("nii.gz", "mha"):
        result = _cli("export", oblique_store, tmp_path / fmt, "--pairs", st.ids[1], "--format", fmt)
        assert result.exit_code == 0, result.output
        _check_case(tmp_path / fmt / st.ids[1], st, 1, group="native/", ext=fmt)


# ----------------------------------------------------------------------------------------------- versions
def _case_ids(out) -> list[str]:
    return sorted(n for n in os.listdir(out) if n.startswith("P"))


def test_export_and_evaluate_a_version_never_a_retired_or_withdrawn_pair(tmp_path):
    """A grown store (tests/test_growth.py): version 1 holds pairs 0-3; version 2 retires pair 1 for pair 6 and adds
    4 and 5; then the patient of pairs 0, 1 and 6 withdraws (version 3). Template space (the synthetic results'
    native affines are not orthonormal grids)."""
    from mrict_dask.growth import forget

    from .test_growth import grown_store

    url = str(tmp_path / "store.zarr")
    pairs, results, _, _ = grown_store(url)
    ids = [p.pair_id for p in pairs]
    st = Store(url)
    latest, v1 = tmp_path / "latest", tmp_path / "v1"

    now = _cli("export", url, latest, "--space", "template")
    assert now.exit_code == 0 and "version 2" in now.stdout, now.output
    assert _case_ids(latest) == sorted(ids[i] for i in (0, 2, 3, 4, 5, 6))
    assert f"{ids[1]}: retired" in now.stdout

    old = _cli("export", url, v1, "--space", "template", "--version", "1")
    assert old.exit_code == 0 and "version 1" in old.stdout, old.output
    assert _case_ids(v1) == sorted(ids[:4])
    _check_case(v1 / ids[1], st, 1)  # the retired pair, as version 1 holds it
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(v1 / ids[1] / "ct.nii.gz"))),
                          np.rint(results[1].ct.astype(np.float64) * (3071 + 1024) - 1024))
    for i in range(4):
        shutil.copy(v1 / ids[i] / "ct.nii.gz", v1 / ids[i] / "sct.nii.gz")
    scored = _cli("evaluate", url, v1, "--space", "template", "--version", "1", "--out", tmp_path / "ev1")
    assert scored.exit_code == 0 and "version 1" in scored.stdout, scored.output
    with open(tmp_path / "ev1" / "metrics.json") as fh:
        report = json.load(fh)
    assert report["version"] == 1 and [p["pair"] for p in report["pairs"]] == ids[:4]
    assert all(p["mae"] == 0.0 for p in report["pairs"])

    # the same folder brought to the latest version: the retired pair's case goes, the user's file in it stays
    again = _cli("export", url, v1, "--space", "template")
    assert again.exit_code == 0 and f"{ids[1]}: retired" in again.stdout, again.output
    assert os.listdir(v1 / ids[1]) == ["sct.nii.gz"] and not os.path.exists(v1 / "overview" / f"{ids[1]}.png")
    with open(v1 / "overview.csv") as fh:
        assert [r["pair"] for r in csv.DictReader(fh)] == [ids[i] for i in (0, 2, 3, 4, 5, 6)]

    # a patient withdraws: a version that held them is refused, and their cases leave every export
    forget(url, [pairs[0].patient], work_url=str(tmp_path / "work"))
    for cmd in (["export", url, tmp_path / "x", "--version", "1"], ["evaluate", url, v1, "--version", "2"]):
        refused = _cli(*cmd)
        assert refused.exit_code == 2
        _one_error(refused, "withdrew", pairs[0].patient)
    assert not os.path.exists(tmp_path / "x")
    after = _cli("export", url, latest, "--space", "template")
    assert after.exit_code == 0 and "version 3" in after.stdout, after.output
    assert "0 case(s) written, 4 already finished" in after.stdout
    assert _case_ids(latest) == sorted(ids[i] for i in (2, 3, 4, 5))
    for i in (0, 6):
        assert f"{ids[i]}: withdrawn" in after.stdout
        assert not os.path.exists(latest / "overview" / f"{ids[i]}.png")
        assert not os.path.exists(latest / ".mrict-export" / f"{ids[i]}.json")
    assert _cli("export", url, v1, "--space", "template").exit_code == 0
    assert _case_ids(v1) == sorted(ids[i] for i in (2, 3, 4, 5))  # pair 0's and 1's folders, sct.nii.gz too


def test_export_object_storage_to_object_storage_on_the_dask_cluster(pipeline_store, s3, client, tmp_path):
    from mrict_dask.cases import export_store
    from mrict_dask.orchestrate import open_executor

    src = upload_tree(pipeline_store, s3, "store.zarr")
    out = s3.url("cases")
    with open_executor(client) as ex:
        assert ex.name == "dask"
        first = export_store(src, out, executor=ex, storage_options=s3.storage_options)
        second = export_store(src, out, executor=ex, storage_options=s3.storage_options)
    assert (first.written, first.skipped, first.failed) == (2, 0, [])
    assert (second.written, second.skipped) == (0, 2)
    st = Store(pipeline_store)
    fs = s3.fs()
    for i, pid in enumerate(st.ids):
        local = tmp_path / pid
        local.mkdir()
        for name in ("mr", "ct", "mask"):
            fs.get(f"{out}/{pid}/{name}.nii.gz", str(local / f"{name}.nii.gz"))
        _check_case(local, st, i, group="native/")
        assert fs.exists(f"{out}/overview/{pid}.png")
    assert fs.cat(f"{out}/overview.csv").decode().count("\n") == 3


# ----------------------------------------------------------------------------------------------- evaluate
def _blurred(ct_path: str, out_path: str, origin_shift: float = 0.0, crop_z: int = 0, nan: bool = False) -> np.ndarray:
    """A stand-in prediction: the exported CT smoothed (float32), optionally spoiled; returns its array."""
    img = sitk.SmoothingRecursiveGaussian(sitk.Cast(sitk.ReadImage(ct_path), sitk.sitkFloat32), 3.0)
    if crop_z:
        img = img[:, :, crop_z:]
    if origin_shift:
        img.SetOrigin([v + origin_shift for v in img.GetOrigin()])
    arr = sitk.GetArrayFromImage(img)
    if nan:
        arr[arr.shape[0] // 2, 10, 10] = np.nan
        spoiled = sitk.GetImageFromArray(arr)
        spoiled.CopyInformation(img)
        img = spoiled
    sitk.WriteImage(img, out_path)
    return arr


def _read_csv(path) -> dict[str, dict]:
    with open(path) as fh:
        return {r["pair"]: r for r in csv.DictReader(fh)}


@pytest.mark.parametrize("defect", ["missing", "nan", "off_grid", "mis_shaped"])
def test_evaluate_scores_each_pair_and_gives_one_error_per_bad_prediction(native_export, pipeline_store, tmp_path,
                                                                          defect):
    out = str(tmp_path / "cases")
    shutil.copytree(native_export[0], out)
    a, b = Store(pipeline_store).ids
    pred = _blurred(f"{out}/{a}/ct.nii.gz", f"{out}/{a}/sct.nii.gz")
    if defect != "missing":
        _blurred(f"{out}/{b}/ct.nii.gz", f"{out}/{b}/sct.nii.gz", nan=defect == "nan",
                 origin_shift=1.0 if defect == "off_grid" else 0.0, crop_z=1 if defect == "mis_shaped" else 0)
    result = _cli("evaluate", pipeline_store, out, "--out", tmp_path / "ev")
    assert result.exit_code == 1, result.output
    reason = {"missing": "no prediction", "nan": "NaN", "off_grid": "origin", "mis_shaped": "size"}[defect]
    _one_error(result, b, reason)
    rows = _read_csv(tmp_path / "ev" / "metrics.csv")
    assert rows[b]["error"] and not rows[b]["mae"]
    # pair a, from the exported files: the reference HU and the mask as written, the prediction as read back
    ref = sitk.GetArrayFromImage(sitk.ReadImage(f"{out}/{a}/ct.nii.gz")).astype(np.float64)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(f"{out}/{a}/mask.nii.gz")).astype(bool)
    diff = ref[mask] - pred[mask]
    assert float(rows[a]["mae"]) == pytest.approx(np.abs(diff).mean(), rel=1e-6)
    clipped = np.clip(ref[mask], -1024, 3000) - np.clip(pred[mask].astype(np.float64), -1024, 3000)
    assert float(rows[a]["psnr"]) == pytest.approx(10 * np.log10(4024**2 / np.mean(clipped**2)), rel=1e-6)
    bone = ref[mask] >= 300
    assert float(rows[a]["mae_bone"]) == pytest.approx(np.abs(diff[bone]).mean(), rel=1e-6)
    if defect == "missing":  # SSIM once, with scikit-image directly
        from skimage.metrics import structural_similarity
        from skimage.util import crop

        x, y = (np.where(mask, np.clip(v, -1024, 3000), -1024) + 1024.0 for v in (ref, pred.astype(np.float64)))
        _, ssim_map = structural_similarity(x, y, data_range=4024, full=True)
        assert float(rows[a]["ssim"]) == pytest.approx(crop(ssim_map, 3)[crop(mask, 3)].mean(), rel=1e-6)
    with open(tmp_path / "ev" / "metrics.json") as fh:
        report = json.load(fh)
    assert [e["pair"] for e in report["errors"]] == [b]
    assert report["splits"]["all"]["scored"] == 1 and report["splits"]["all"]["errors"] == 1


def test_evaluate_zarr_predictions_like_the_folder_and_prints_each_split(native_export, pipeline_store, tmp_path):
    out = str(tmp_path / "cases")
    shutil.copytree(native_export[0], out)
    st = Store(pipeline_store)
    preds = [_blurred(f"{out}/{pid}/ct.nii.gz", f"{out}/{pid}/sct.nii.gz") for pid in st.ids]
    folder = _cli("evaluate", pipeline_store, out, "--out", tmp_path / "ev_folder")
    assert folder.exit_code == 0, folder.output
    g = zarr.open_group(str(tmp_path / "preds.zarr"), mode="w")  # rows in the other order, matched by 'pair'
    g.create_array("sct", data=np.stack(preds[::-1]))
    with warnings.catch_warnings():  # zarr: fixed-length strings have no finished specification yet
        warnings.simplefilter("ignore")
        g.create_array("pair", data=np.array(st.ids[::-1]))
    from_zarr = _cli("evaluate", pipeline_store, tmp_path / "preds.zarr")
    assert from_zarr.exit_code == 0, from_zarr.output
    a = _read_csv(tmp_path / "ev_folder" / "metrics.csv")
    b = _read_csv(tmp_path / "preds.zarr-evaluation" / "metrics.csv")
    for pid in st.ids:
        for k in ("mae", "psnr", "ssim", "ms_ssim", "mae_air", "mae_soft_tissue", "mae_bone", "mask_voxels"):
            assert float(a[pid][k]) == pytest.approx(float(b[pid][k]), rel=1e-9), k
    lines = from_zarr.stdout.splitlines()
    mae = np.array([float(a[pid]["mae"]) for pid in st.ids])
    for split in ("train", "val"):
        (row,) = [ln for ln in lines if ln.startswith(split)]
        assert f"{float(a[st.ids[st.split.index(split)]]['mae']):.1f}" in row
    (all_row,) = [ln for ln in lines if ln.startswith("all")]
    assert f"{mae.mean():.1f} ± {mae.std(ddof=1):.1f}" in all_row
    unaligned = zarr.open_group(str(tmp_path / "bad.zarr"), mode="w")
    unaligned.create_array("sct", data=np.stack(preds[:1]))
    bad = _cli("evaluate", pipeline_store, tmp_path / "bad.zarr")
    assert bad.exit_code == 2
    _one_error(bad, "rows")


def test_evaluate_native_space_of_an_identical_prediction(pipeline_store, native_export, tmp_path):
    st = Store(pipeline_store)
    shutil.copytree(native_export[0], tmp_path / "cases")
    for pid in st.ids:
        shutil.copy(tmp_path / "cases" / pid / "ct.nii.gz", tmp_path / "cases" / pid / "sct.nii.gz")
    result = _cli("evaluate", pipeline_store, tmp_path / "cases", "--out", tmp_path / "ev")
    assert result.exit_code == 0 and "head & valid" in result.stdout, result.output
    with open(tmp_path / "ev" / "metrics.json") as fh:
        pairs = {p["pair"]: p for p in json.load(fh)["pairs"]}
    for i, pid in enumerate(st.ids):
        p = pairs[pid]
        assert (p["mae"], p["psnr"], p["ssim"], p["ms_ssim"]) == (0.0, "inf", 1.0, 1.0)
        head = np.asarray(st.g["native/head"][i], bool) & np.asarray(st.g["native/valid"][i], bool)
        assert p["mask_voxels"] == int(head.sum())
        assert math.isfinite(p["mae_bone"])


# ----------------------------------------------------------------------------------------------- README
def test_readme_worked_example_runs_as_written(pipeline_store, tmp_path):
    """The README's commands, on the pipeline's store (native space by default)."""
    env = {**os.environ, "STORE": pipeline_store, "PATH": os.path.dirname(sys.executable) + os.pathsep +
           os.environ.get("PATH", "")}
    example = readme_block("Export, evaluate, back to DICOM", "bash")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", example], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    pair = Store(pipeline_store).ids[0]
    assert os.path.exists(tmp_path / "cases" / pair / "sct.nii.gz")
    assert os.path.exists(tmp_path / "cases-evaluation" / "metrics.csv")
    assert len(os.listdir(tmp_path / "dicom")) == Store(pipeline_store).g["native/ct"].shape[1]  # one per slice
