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


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="1,2,3,4,5")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--no-ants", action="store_true")
    ap.add_argument("--work", default=None, help="folder for the simulated inputs (kept; default: a temp dir)")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
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
