"""Registration benchmark: seconds per pair and accuracy, ours (SimpleITK) vs ANTsPy, at 1 and 2 ITK threads.

Per pair: MR -> template (affine) + CT -> MR (rigid) + resampling MR and CT onto the template grid (the CT
once, through the composed transform). Accuracy: target registration error (mean / max mm over template
brain voxels) of the recovered template -> MR and template -> CT transforms against the synthetic
generator's ground truth.

Both engines get the same inputs: the MR as simulated; the CT clamped to [-1024, 3071] HU with the couch
cut away by our head mask (done outside ANTs' timing, inside ours), and the same fixed-image masks (the
dilated template brain; the dilated MR head). ANTs runs with its defaults for ``type_of_transform``
'Affine' and 'Rigid'. Each (engine, threads) runs in its own process, ITK's thread count set before import.

    python benchmarks/bench_register.py                 # 5 patients, ours and ANTs, 1 and 2 threads
    python benchmarks/bench_register.py --seeds 1,2 --no-ants

Realistic heads and the gate (``--realistic``): generated heads and the real heads packages install
(mrict_dask.synth.realheads: Colin27, pydeface's average head, in four scanner poses and fields of view), each
through the whole pair task (``process_images``, 1 ITK thread) of this checkout and of ``--baseline`` (a git
revision, run from a temporary worktree: "today's" code; timed before and after this checkout, the mean taken),
one process at a time. Reports per case the status,
s/pair of both, and the accuracy against the truth (generated: TRE of MR -> template and CT -> template over the
template brain; real: share of deep brain points inside the template brain + 3 mm, CT -> MR error over them).
Then the gate's labelled set: every right registration of this checkout, and the same made wrong (shifted
10-40 mm, rotated 15-30 degrees, flipped left-right, scaled by 15 %, and another patient's CT registered to the
MR): false rejects among the right ones, false accepts among the wrong ones whose error is >= 5 mm.

    python benchmarks/bench_register.py --realistic --seeds 1,2,3 --baseline 19f322f
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

# benchmark the checkout this script is in, whatever copy of the package is installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------------------------------ inputs
def prepare(work: str, seeds: list[int]) -> None:
    """Simulate the patients and write what both engines read (NIfTI + ground truth), once per work dir."""
    import SimpleITK as sitk
    from scipy import ndimage as ndi

    from mrict_dask import register as R
    from mrict_dask.config import RegistrationConfig
    from mrict_dask.synth import simulate_patient
    from mrict_dask.template import load_template

    template = load_template()
    cfg = RegistrationConfig()
    if not os.path.exists(f"{work}/template.nii"):
        sitk.WriteImage(template.image, f"{work}/template.nii")
        wt = R.work_template(template, cfg.working_spacing_mm)
        mask = sitk.Resample(wt.fixed_mask, template.image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        sitk.WriteImage(mask, f"{work}/template_mask.nii")
        sitk.WriteImage(template.mask, f"{work}/brain.nii")
    for seed in seeds:
        if os.path.exists(f"{work}/truth{seed}.npz"):
            continue
        t = time.perf_counter()
        p = simulate_patient(seed, template)
        sitk.WriteImage(p.mr, f"{work}/mr{seed}.nii")
        sitk.WriteImage(p.ct, f"{work}/ct{seed}.nii")
        # ANTs' inputs: clamped, couch-free CT on its own grid; the dilated MR head as its fixed mask
        ctc = R.prepare_ct(p.ct)
        ct_head = R.head_mask_ct(R.resample_iso(ctc, cfg.working_spacing_mm, default=R.CT_CLAMP[0]))
        head_full = sitk.Resample(ct_head, ctc, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        sitk.WriteImage(sitk.Mask(ctc, head_full, outsideValue=R.CT_CLAMP[0]), f"{work}/ct_masked{seed}.nii")
        mr_head = R.head_mask_mr(R.work_image(p.mr, cfg))
        dil = ndi.binary_dilation(sitk.GetArrayFromImage(mr_head) > 0, iterations=3).astype(np.uint8)
        m = sitk.GetImageFromArray(dil)
        m.CopyInformation(mr_head)
        m = sitk.Resample(m, p.mr, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        sitk.WriteImage(m, f"{work}/mr_mask{seed}.nii")
        np.savez(f"{work}/truth{seed}.npz", mr=p.mr_transform, ct=p.ct_transform)
        print(f"  simulated patient {seed} in {time.perf_counter() - t:.1f} s", file=sys.stderr)


def brain_points(work: str, step: int = 3) -> np.ndarray:
    import SimpleITK as sitk

    brain = sitk.ReadImage(f"{work}/brain.nii")
    zyx = np.argwhere(sitk.GetArrayFromImage(brain)[::step, ::step, ::step] > 0) * step
    d = np.array(brain.GetDirection()).reshape(3, 3) * np.array(brain.GetSpacing())
    return np.array(brain.GetOrigin()) + zyx[:, ::-1].astype(float) @ d.T


def tre(true: np.ndarray, got: np.ndarray, pts: np.ndarray) -> tuple[float, float]:
    d = np.linalg.norm(pts @ true[:3, :3].T + true[:3, 3] - (pts @ got[:3, :3].T + got[:3, 3]), axis=1)
    return float(d.mean()), float(d.max())


# ------------------------------------------------------------------------------------------------ engines
def run_ours(work: str, seed: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    from mrict_dask import register as R
    from mrict_dask.config import RegistrationConfig
    from mrict_dask.template import load_template

    template = load_template()
    cfg = RegistrationConfig(threads=threads)
    R.work_template(template, cfg.working_spacing_mm)  # per-process cache: built once per worker, not per pair
    mr, ct = sitk.ReadImage(f"{work}/mr{seed}.nii"), sitk.ReadImage(f"{work}/ct{seed}.nii")
    global _t0, _c0
    _t0, _c0 = time.perf_counter(), time.process_time()
    mr_w = R.work_image(mr, cfg)
    mr_head = R.head_mask_mr(mr_w)
    ctc = R.prepare_ct(ct)
    mr_tx, _ = R.register_mr_to_template(mr, template, cfg, mr_work=mr_w, mr_head=mr_head)
    ct_tx, _ = R.register_ct_to_mr(ct, mr, cfg, mr_work=mr_w, mr_head=mr_head, ct_clamped=ctc)
    mr_a = R.to_matrix(mr_tx)
    ct_a = R.to_matrix(ct_tx) @ mr_a
    for img, a, fill in ((mr, mr_a, 0.0), (ctc, ct_a, -1000.0)):
        sitk.Resample(img, template.image, R.affine_from_matrix(a), sitk.sitkLinear, fill, sitk.sitkFloat32)
    return mr_a, ct_a


def _ants_matrix(tx) -> np.ndarray:
    probes = np.array([[0, 0, 0], [100, 0, 0], [0, 100, 0], [0, 0, 100]], dtype=float)
    out = np.array([tx.apply_to_point(tuple(p)) for p in probes])
    m = np.eye(4)
    m[:3, 3] = out[0]
    m[:3, :3] = (out[1:] - out[0]).T / 100.0
    return m


def run_ants(work: str, seed: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    import ants

    template = ants.image_read(f"{work}/template.nii")
    tmask = ants.image_read(f"{work}/template_mask.nii")
    mr = ants.image_read(f"{work}/mr{seed}.nii")
    mr_mask = ants.image_read(f"{work}/mr_mask{seed}.nii")
    ct = ants.image_read(f"{work}/ct_masked{seed}.nii")
    global _t0, _c0
    _t0, _c0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        # fixed = template: ANTs' forward transform maps template points to MR points (ITK convention, LPS)
        r_mr = ants.registration(template, mr, type_of_transform="Affine", mask=tmask, outprefix=f"{tmp}/mr_")
        r_ct = ants.registration(mr, ct, type_of_transform="Rigid", mask=mr_mask, outprefix=f"{tmp}/ct_")
        ants.apply_transforms(template, mr, r_mr["fwdtransforms"])
        # template -> MR -> CT: antsApplyTransforms applies the list's last transform first
        ants.apply_transforms(template, ct, r_ct["fwdtransforms"] + r_mr["fwdtransforms"], defaultvalue=-1000)
        mr_a = _ants_matrix(ants.read_transform(r_mr["fwdtransforms"][0]))
        ct_a = _ants_matrix(ants.read_transform(r_ct["fwdtransforms"][0])) @ mr_a
    return mr_a, ct_a


def worker(engine: str, threads: int, work: str, seeds: list[int]) -> None:
    """One (engine, threads) configuration over every seed; prints one JSON line per pair."""
    pts = brain_points(work)
    for seed in seeds:
        fn = run_ours if engine == "ours" else run_ants
        mr_a, ct_a = fn(work, seed, threads)
        wall, cpu = time.perf_counter() - _t0, time.process_time() - _c0
        truth = np.load(f"{work}/truth{seed}.npz")
        print(json.dumps({"engine": engine, "threads": threads, "seed": seed, "wall": wall, "cpu": cpu,
                          "mr_tre": tre(truth["mr"], mr_a, pts), "ct_tre": tre(truth["ct"], ct_a, pts)}), flush=True)


# ------------------------------------------------------------------------------------------------ realistic heads
REAL_CASES = {  # as tests/test_real_heads.py
    "colin27-sagittal": ("colin27", "sagittal_3d_neck", (12, 4, -6), (5, -10, 0), "ct_head"),
    "colin27-axial-2d": ("colin27", "axial_2d_brain", (-8, 0, 10), (0, 10, -5), "ct_head"),
    "mean-sagittal-ct5mm": ("pydeface_mean", "sagittal_3d_neck", (-15, 5, 8), (0, 15, 0), "ct_head_5mm"),
    "mean-off-centre": ("pydeface_mean", "axial_3d_off_centre", (20, -6, -12), (0, 0, 0), "ct_head"),
}


def prepare_realistic(work: str, seeds: list[int]) -> list[str]:
    """Write every case's MR, CT (NIfTI) and truth once; returns the case names."""
    import SimpleITK as sitk

    from mrict_dask.synth import realheads as RH
    from mrict_dask.synth import simulate_patient
    from mrict_dask.template import load_template

    names = []
    for seed in seeds:
        name = f"generated-{seed}"
        names.append(name)
        if not os.path.exists(f"{work}/{name}.json"):
            p = simulate_patient(seed, load_template())
            sitk.WriteImage(p.mr, f"{work}/{name}.mr.nii")
            sitk.WriteImage(p.ct, f"{work}/{name}.ct.nii")
            with open(f"{work}/{name}.json", "w") as fh:
                json.dump({"mr": p.mr_transform.tolist(), "ct": p.ct_transform.tolist()}, fh)
    have = RH.available()
    for name, (head, fov, angles, shift, ct_fov) in REAL_CASES.items():
        if not have[head]:
            print(f"  {name}: {head} is not installed here, left out", file=sys.stderr)
            continue
        names.append(name)
        if not os.path.exists(f"{work}/{name}.json"):
            p = RH.posed_pair(RH.load(head), fov, angles, shift, ct_fov=ct_fov)
            sitk.WriteImage(p.mr, f"{work}/{name}.mr.nii")
            sitk.WriteImage(p.ct, f"{work}/{name}.ct.nii")
            with open(f"{work}/{name}.json", "w") as fh:
                json.dump({"deep_brain_mr": p.deep_brain_mr.tolist(), "mr_to_ct": p.mr_to_ct.tolist()}, fh)
    return names


def pair_worker(work: str, names: list[str], settings: dict[str, object]) -> None:
    """The whole pair task on each case, with the package found first on sys.path; one JSON line per case.
    ``settings``: configuration overrides (none for a baseline checkout, which may not know them)."""
    import SimpleITK as sitk

    from mrict_dask.config import load_config
    from mrict_dask.pair import process_images
    from mrict_dask.template import load_template

    template = load_template()
    config = load_config(None, settings)
    for name in names:
        mr, ct = sitk.ReadImage(f"{work}/{name}.mr.nii"), sitk.ReadImage(f"{work}/{name}.ct.nii")
        t, c = time.perf_counter(), time.process_time()
        r = process_images(mr, ct, config, template, name)
        print(json.dumps({"name": name, "status": r.status, "wall": time.perf_counter() - t,
                          "cpu": time.process_time() - c, "mr_affine": np.asarray(r.mr_affine).tolist(),
                          "ct_affine": np.asarray(r.ct_affine).tolist()}), flush=True)


def _run_pairs(work: str, names: list[str], root: str, script: str, settings: dict | None = None) -> dict[str, dict]:
    """The pair task of the checkout at ``root`` (``script``: this file, inside that checkout's benchmarks/)."""
    env = {**os.environ, "PYTHONPATH": root, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"}
    cmd = [sys.executable, script, "--_pairs", "--work", work, "--cases", ",".join(names),
           "--_settings", json.dumps(settings or {})]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
    if out.returncode:
        raise SystemExit(f"the pair task failed under {root}:\n{out.stderr[-2000:]}")
    return {g["name"]: g for g in (json.loads(x) for x in out.stdout.splitlines() if x.startswith("{"))}


def accuracy(work: str, name: str, mr_a: np.ndarray, ct_a: np.ndarray, template) -> str:
    """Accuracy against the case's truth, as text."""
    import SimpleITK as sitk
    from scipy import ndimage as ndi

    if not np.isfinite(mr_a).all():
        return "-"
    truth = json.load(open(f"{work}/{name}.json"))
    if "mr" in truth:
        pts = _template_brain_points(template)
        mr_t, ct_t = tre(np.array(truth["mr"]), mr_a, pts), tre(np.array(truth["ct"]), ct_a, pts)
        return f"TRE MR {mr_t[0]:.2f}/{mr_t[1]:.2f}, CT {ct_t[0]:.2f}/{ct_t[1]:.2f} mm"
    deep = np.array(truth["deep_brain_mr"])
    tpl = (deep - mr_a[:3, 3]) @ np.linalg.inv(mr_a[:3, :3]).T
    near = ndi.binary_dilation(sitk.GetArrayFromImage(template.mask) > 0, iterations=3)
    idx = np.array([template.image.TransformPhysicalPointToIndex(tuple(v)) for v in tpl])
    ok = ((idx >= 0) & (idx < np.array(template.image.GetSize()))).all(1)
    inside = np.zeros(len(idx), bool)
    inside[ok] = near[idx[ok, 2], idx[ok, 1], idx[ok, 0]]
    if not np.isfinite(ct_a).all():
        return f"deep brain in template brain {100 * inside.mean():.1f} %"
    got = ct_a @ np.linalg.inv(mr_a)
    err = tre(np.array(truth["mr_to_ct"]), got, deep)
    return f"deep brain in template brain {100 * inside.mean():.1f} %, CT -> MR {err[0]:.2f}/{err[1]:.2f} mm"


def _template_brain_points(template, step: int = 3) -> np.ndarray:
    import SimpleITK as sitk

    zyx = np.argwhere(sitk.GetArrayFromImage(template.mask)[::step, ::step, ::step] > 0) * step
    d = np.array(template.image.GetDirection()).reshape(3, 3) * np.array(template.image.GetSpacing())
    return np.array(template.image.GetOrigin()) + zyx[:, ::-1].astype(float) @ d.T


def _about(matrix3: np.ndarray, centre: np.ndarray, shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = matrix3
    m[:3, 3] = centre - matrix3 @ centre + np.asarray(shift)
    return m


def wrong_variants(centre: np.ndarray, rng: np.random.Generator, scaled: bool) -> list[tuple[str, np.ndarray]]:
    """Deliberately wrong versions (applied in the fixed image's space, about ``centre``)."""
    out = []
    for d in (10, 20, 30, 40):
        v = rng.normal(size=3)
        out.append((f"shift {d} mm", _about(np.eye(3), centre, d * v / np.linalg.norm(v))))
    for deg in (15, 20, 25, 30):
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        th = np.radians(deg)
        out.append((f"rotation {deg} deg", _about(np.eye(3) + np.sin(th) * k + (1 - np.cos(th)) * k @ k, centre)))
    out.append(("left-right flip", _about(np.diag([-1.0, 1.0, 1.0]), centre)))
    if scaled:
        out += [(f"scale x{s:.2f}", _about(s * np.eye(3), centre)) for s in (1.15, 1 / 1.15)]
    return out


def gate_labelled_set(work: str, names: list[str], results: dict[str, dict], template) -> None:
    """False reject / false accept rates of the gate over right and deliberately wrong registrations."""
    import SimpleITK as sitk

    from mrict_dask import qa
    from mrict_dask import register as R
    from mrict_dask.config import RegistrationConfig
    from mrict_dask.errors import RegistrationError

    cfg = RegistrationConfig()
    wt = R.work_template(template, cfg.working_spacing_mm)
    rng = np.random.default_rng(0)
    rows = []  # (which, case, variant, error mm, refused, failed checks)
    prepared = {}
    for name in names:
        mr, ct = sitk.ReadImage(f"{work}/{name}.mr.nii"), sitk.ReadImage(f"{work}/{name}.ct.nii")
        mr_w = R.work_image(mr, cfg)
        mr_head = R.head_mask_mr(mr_w)
        ct_w = R.resample_iso(R.prepare_ct(ct), cfg.working_spacing_mm, default=R.CT_CLAMP[0])
        prepared[name] = (mr, ct, mr_w, mr_head, ct_w, R.head_mask_ct(ct_w))
    brain_pts = _template_brain_points(template, 5)
    for k, name in enumerate(names):
        g = results[name]
        if g["status"] != "ok":
            rows.append(("MR -> template", name, "right", 0.0, True, [g["status"]]))
            continue
        mr, ct, mr_w, mr_head, ct_w, ct_head = prepared[name]
        mr_a = np.array(g["mr_affine"])
        mr_to_ct = np.array(g["ct_affine"]) @ np.linalg.inv(mr_a)
        head_pts = R._mask_points(mr_head)[::20]

        def judge(which: str, case: str, variant: str, err: float, measures: dict) -> None:
            failed = (qa.mr_failures if which == "MR -> template" else qa.ct_failures)(measures, cfg)
            rows.append((which, case, variant, err, bool(failed), failed))

        judge("MR -> template", name, "right", 0.0, qa.mr_measures(mr_w, wt, mr_a))
        judge("CT -> MR", name, "right", 0.0, qa.ct_measures(mr_w, mr_head, ct_w, ct_head, mr_to_ct))
        for variant, w in wrong_variants(wt.centroid, rng, scaled=True):
            judge("MR -> template", name, variant, tre(mr_a, mr_a @ w, brain_pts)[0],
                  qa.mr_measures(mr_w, wt, mr_a @ w))
        for variant, w in wrong_variants(R._centroid(mr_head), rng, scaled=True):
            judge("CT -> MR", name, variant, tre(mr_to_ct, mr_to_ct @ w, head_pts)[0],
                  qa.ct_measures(mr_w, mr_head, ct_w, ct_head, mr_to_ct @ w))
        # another patient: the next case of another head (the real heads are each posed several ways)
        other = next(o for o in names[k + 1:] + names[:k] if _head_of(o) != _head_of(name))
        o_ct, o_ct_w, o_head = prepared[other][1], prepared[other][4], prepared[other][5]
        try:
            tx, _ = R.register_ct_to_mr(o_ct, mr, cfg, mr_work=mr_w, mr_head=mr_head, ct_work=o_ct_w, ct_head=o_head)
            judge("CT -> MR", name, f"CT of {other}", float("inf"),
                  qa.ct_measures(mr_w, mr_head, o_ct_w, o_head, R.to_matrix(tx)))
        except RegistrationError as exc:
            rows.append(("CT -> MR", name, f"CT of {other}", float("inf"), True, [str(exc)]))
    print(f"\ngate over {len(names)} cases ({', '.join(names)}); limits: {_limits(cfg)}")
    print(f"{'registration':16}{'right':>7}{'refused':>9}{'wrong >= 5 mm':>15}{'accepted':>10}")
    for which in ("MR -> template", "CT -> MR"):
        right = [r for r in rows if r[0] == which and r[2] == "right"]
        wrong = [r for r in rows if r[0] == which and r[2] != "right" and r[3] >= 5.0]
        print(f"{which:16}{len(right):>7}{sum(r[4] for r in right):>9}{len(wrong):>15}"
              f"{sum(not r[4] for r in wrong):>10}")
        for r in right:
            if r[4]:
                print(f"    false reject: {r[1]}: {'; '.join(r[5])[:200]}")
        for r in wrong:
            if not r[4]:
                print(f"    false accept: {r[1]}, {r[2]} (error {r[3]:.1f} mm)")
    small = [r for r in rows if r[2] != "right" and r[3] < 5.0]
    if small:
        print(f"  ({len(small)} wrong variants moved the points < 5 mm and are not counted)")


def _head_of(case: str) -> str:
    return REAL_CASES[case][0] if case in REAL_CASES else case


def _limits(cfg) -> str:
    return (f"determinant in {list(cfg.det_range)}, brain Dice >= {cfg.min_brain_overlap}, template correlation >= "
            f"{cfg.min_template_correlation}, local gain <= {cfg.max_local_gain}, skin spread <= {cfg.max_skin_mm} mm, "
            f"head Dice >= {cfg.min_brain_overlap}")


def realistic(args) -> None:
    from mrict_dask.template import load_template

    seeds = [int(s) for s in args.seeds.split(",")]
    work = args.work or tempfile.mkdtemp(prefix="bench_register_real_")
    os.makedirs(work, exist_ok=True)
    print(f"inputs in {work}", file=sys.stderr)
    names = prepare_realistic(work, seeds)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # the baseline wrote template space only: this checkout times that task, and the default one (native space and
    # defacing on, issue 25's work) beside it
    # the baseline runs once before and once after this checkout's two runs, and its time per case is the mean of
    # both: the machine's speed drifts by 10-15 % over an hour, and a drift then cancels to first order
    base_runs: list[dict[str, dict]] = []
    tree = tempfile.mkdtemp(prefix="bench_register_baseline_") if args.baseline else None
    if tree:
        import shutil

        subprocess.run(["git", "-C", here, "worktree", "add", "--detach", tree, args.baseline], check=True,
                       capture_output=True)
        script = os.path.join(tree, "benchmarks", "bench_pairs_now.py")
        shutil.copy(os.path.abspath(__file__), script)
    try:
        if tree:
            base_runs.append(_run_pairs(work, names, tree, script))
        results = _run_pairs(work, names, here, os.path.abspath(__file__), TEMPLATE_ONLY)
        default = _run_pairs(work, names, here, os.path.abspath(__file__))
        if tree:
            base_runs.append(_run_pairs(work, names, tree, script))
    finally:
        if tree:
            subprocess.run(["git", "-C", here, "worktree", "remove", "--force", tree], capture_output=True)
    base = {n: {**base_runs[0][n], "wall": float(np.mean([r[n]["wall"] for r in base_runs]))}
            for n in names if base_runs and all(n in r for r in base_runs)}
    template = load_template()
    print(f"\ns/pair: this checkout, template space only (the baseline's task) | with native space and defacing | "
          f"{args.baseline or 'no baseline'} (mean of a run before and one after); accuracy: this checkout | the "
          "baseline")
    for name in names:
        g, d, b = results[name], default[name], base.get(name)
        status = "ok" if g["status"] == "ok" else "refused"
        bs = "" if b is None else f"{b['wall']:.1f} ({'ok' if b['status'] == 'ok' else 'refused'})"
        print(f"{name:20}{status:9}{g['wall']:>6.1f}{d['wall']:>6.1f} {bs:>13}  "
              f"{accuracy(work, name, np.array(g['mr_affine']), np.array(g['ct_affine']), template)}"
              + ("" if b is None else " | " + accuracy(work, name, np.array(b["mr_affine"]),
                                                         np.array(b["ct_affine"]), template)))
        if g["status"] != "ok":
            print(f"    {g['status'][:300]}")
    generated = [n for n in names if "mr" in json.load(open(f"{work}/{n}.json"))]
    pts = _template_brain_points(template)
    for label, runs in (("this checkout", results), (args.baseline, base)):
        if runs and all(n in runs for n in generated):
            means = [tre(np.array(json.load(open(f"{work}/{n}.json"))["mr"]), np.array(runs[n]["mr_affine"]), pts)[0]
                     for n in generated]
            print(f"MR -> template TRE, mean over the {len(generated)} generated heads' brains, {label}: "
                  f"{np.mean(means):.2f} mm (target <= 0.25)")
    both = [n for n in names if base.get(n, {}).get("status") == "ok" and results[n]["status"] == "ok"]
    if both:  # a refusal stops early: only pairs both complete compare
        ratio = np.median([results[n]["wall"] / base[n]["wall"] for n in both])
        whole = np.median([default[n]["wall"] / base[n]["wall"] for n in both])
        print(f"median s/pair ratio over the {len(both)} pairs both complete, this checkout / {args.baseline}: "
              f"{ratio:.2f} for the same task (target <= 1.2), {whole:.2f} with native space and defacing; "
              f"1-min load average {os.getloadavg()[0]:.1f}")
    gate_labelled_set(work, names, results, template)


TEMPLATE_ONLY = {"native.enabled": False, "deface.enabled": False}


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="1,2,3,4,5")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--no-ants", action="store_true")
    ap.add_argument("--work", default=None, help="folder for the simulated inputs (kept; default: a temp dir)")
    ap.add_argument("--realistic", action="store_true", help="realistic and real heads, s/pair vs --baseline, the gate")
    ap.add_argument("--baseline", default=None, help="git revision whose pair task --realistic times beside this one")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_pairs", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cases", default="", help=argparse.SUPPRESS)
    ap.add_argument("--_settings", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._pairs:
        pair_worker(args.work, args.cases.split(","), json.loads(args._settings))
        return
    if args.realistic:
        realistic(args)
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    if args._worker:
        worker(args._worker, int(args.threads), args.work, seeds)
        return
    work = args.work or tempfile.mkdtemp(prefix="bench_register_")
    os.makedirs(work, exist_ok=True)
    print(f"inputs in {work}", file=sys.stderr)
    prepare(work, seeds)
    engines = ["ours"] + ([] if args.no_ants else ["ants"])
    rows = []
    for engine in engines:
        for n in [int(t) for t in args.threads.split(",")]:
            env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(n), "OMP_NUM_THREADS": str(n),
                   "ANTS_RANDOM_SEED": "1"}
            load = os.getloadavg()[0]
            cmd = [sys.executable, __file__, "--_worker", engine, "--threads", str(n), "--work", work,
                   "--seeds", args.seeds]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            got = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
            for g in got:
                mr_t, ct_t = g["mr_tre"], g["ct_tre"]
                print(f"  {engine} x{n} seed {g['seed']}: {g['wall']:.1f} s wall, {g['cpu']:.1f} s cpu, "
                      f"TRE MR {mr_t[0]:.2f}/{mr_t[1]:.2f} CT {ct_t[0]:.2f}/{ct_t[1]:.2f} mm", file=sys.stderr)
            rows.append((engine, n, got, load))
    print(f"\n{'engine':8} {'threads':>7} {'s/pair wall':>12} {'s/pair cpu':>11} {'MR TRE mean/max':>16} "
          f"{'CT TRE mean/max':>16} {'load':>5}")
    for engine, n, got, load in rows:
        wall = np.median([g["wall"] for g in got])
        cpu = np.median([g["cpu"] for g in got])
        mr_mean = np.mean([g["mr_tre"][0] for g in got])
        mr_max = max(g["mr_tre"][1] for g in got)
        ct_mean = np.mean([g["ct_tre"][0] for g in got])
        ct_max = max(g["ct_tre"][1] for g in got)
        print(f"{engine:8} {n:>7} {wall:>12.1f} {cpu:>11.1f} {mr_mean:>9.3f}/{mr_max:<6.3f} "
              f"{ct_mean:>9.3f}/{ct_max:<6.3f} {load:>5.1f}")
    print(f"\n{len(seeds)} synthetic pairs (seeds {args.seeds}); medians over pairs; TRE: mean over pairs of the "
          f"per-pair mean / worst per-pair max; load: 1-min load average when the configuration started")


if __name__ == "__main__":
    main()
