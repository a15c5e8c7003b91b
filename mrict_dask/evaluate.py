"""``mrict-dask evaluate``: score synthetic CTs against the store's CT with the field's metrics, pair by pair.

PREDICTIONS is one of:

- a Zarr group holding ``sct`` (pair, z, y, x) in HU on the grid of the chosen space; with a ``pair`` variable
  (pair ids) its rows are matched by id, without one they follow the store's pair order (same number of rows);
- a folder laid out like the export: ``<pair_id>/sct.nii.gz`` or ``<pair_id>/sct.mha`` on the pair's grid.

Every ok pair of the store (or of a split, or the pairs listed) is scored over the store's metric mask against its
CT in whole HU (the values the export writes): MAE, PSNR, SSIM (SynthRAD 2023), MS-SSIM (SynthRAD 2025) and MAE by
tissue class (:mod:`mrict_dask.metrics`). A pair whose prediction is missing, mis-shaped, off the pair's grid or not
finite gets one error line; the others are scored. Results: ``metrics.csv`` (one row per pair) and
``metrics.json`` (pairs, per-split mean and sd, errors, and what was computed how).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import metrics
from .errors import InputError
from .executor import Executor, SerialExecutor
from .io import Location
from .progress import Progress
from .spaces import Geometry, StoreSpace, hu_values, open_group, open_space, pair_table, select_pairs

log = logging.getLogger(__name__)

PREDICTION_NAMES = ("sct.nii.gz", "sct.mha")
METRICS = ("mae", "psnr", "ssim", "ms_ssim", *(f"mae_{k}" for k in metrics.TISSUE_CLASSES))
LABELS = {"mae": "MAE (HU)", "psnr": "PSNR (dB)", "ssim": "SSIM", "ms_ssim": "MS-SSIM", "mae_air": "MAE air",
          "mae_soft_tissue": "MAE soft", "mae_bone": "MAE bone"}


class PredictionError(Exception):
    """A pair's prediction cannot be scored; ``str(err)`` says why (one line)."""


@dataclass(frozen=True)
class PairTask:
    index: int
    pair_id: str
    split: str
    geometry: Geometry
    ct_bounds: tuple[float, float]
    row: int | None = None  # the pair's row in a Zarr of predictions (None: not there)


# ----------------------------------------------------------------------------------------------- predictions
@dataclass(frozen=True)
class ZarrPredictions:
    """``sct`` (pair, z, y, x) of a Zarr group; each task carries its row."""

    location: Location

    def load(self, task: PairTask, shape_zyx: tuple[int, int, int]) -> np.ndarray:
        if task.row is None:
            raise PredictionError("no prediction: the Zarr's 'pair' variable does not list this pair")
        sct = open_group(self.location)["sct"]
        if tuple(sct.shape[1:]) != tuple(shape_zyx):
            raise PredictionError(f"prediction grid (z, y, x) {tuple(sct.shape[1:])} instead of {tuple(shape_zyx)}")
        return np.asarray(sct[task.row])


@dataclass(frozen=True)
class FolderPredictions:
    """``<pair_id>/sct.nii.gz`` or ``<pair_id>/sct.mha`` under a folder (local or object storage)."""

    location: Location

    def load(self, task: PairTask, shape_zyx: tuple[int, int, int]) -> np.ndarray:
        import SimpleITK as sitk

        from .export import read_image

        found = [self.location.join(task.pair_id, n) for n in PREDICTION_NAMES]
        found = [loc for loc in found if loc.exists()]
        if not found:
            raise PredictionError(f"no prediction ({task.pair_id}/{' or '.join(PREDICTION_NAMES)})")
        if len(found) > 1:
            raise PredictionError(f"two predictions ({' and '.join(loc.name for loc in found)}): keep one")
        try:
            img = read_image(found[0])
        except ValueError as exc:  # NaN or infinite voxels
            raise PredictionError(f"{found[0].name}: {exc}") from None
        except RuntimeError as exc:  # SimpleITK: not an image it can read
            raise PredictionError(f"{found[0].name} cannot be read as an image "
                                  f"({str(exc).strip().splitlines()[-1][:120]})") from None
        if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
            raise PredictionError(f"{found[0].name} is not a 3D single-channel image")
        why = task.geometry.mismatch(Geometry.of_image(img))
        if why:
            raise PredictionError(f"{found[0].name} is not on the pair's grid: {why}")
        return sitk.GetArrayFromImage(img)


def open_predictions(url: str | Location, pair_ids: Sequence[str], storage_options: dict | None = None
                     ) -> tuple[ZarrPredictions | FolderPredictions, dict[str, int] | None]:
    """What PREDICTIONS holds, and for a Zarr the row of each pair id it has: a Zarr group (``zarr.json`` at its
    root; rows matched by its ``pair`` variable, else in the store's order) or a folder of cases (rows None)."""
    loc = Location.of(url, storage_options)
    if loc.join("zarr.json").exists():
        g = open_group(loc)
        if "sct" not in g:
            raise InputError(f"{loc.url} is a Zarr without an 'sct' variable (pair, z, y, x) of predicted HU")
        sct = g["sct"]
        if sct.ndim != 4:
            raise InputError(f"{loc.url}: 'sct' has {sct.ndim} dimensions, not 4 (pair, z, y, x)")
        if "pair" in g:
            ids = [str(v) for v in g["pair"][:]]
            if len(ids) != sct.shape[0]:
                raise InputError(f"{loc.url}: 'pair' lists {len(ids)} ids for {sct.shape[0]} rows of 'sct'")
        elif sct.shape[0] == len(pair_ids):
            ids = [str(p) for p in pair_ids]
        else:
            raise InputError(f"{loc.url}: 'sct' has {sct.shape[0]} rows and no 'pair' variable, so its rows must "
                             f"follow the store's {len(pair_ids)} pairs")
        return ZarrPredictions(loc), {p: i for i, p in enumerate(ids)}
    if not loc.exists():
        raise InputError(f"predictions not found: {loc.url}")
    return FolderPredictions(loc), None


# ----------------------------------------------------------------------------------------------- one pair
def evaluate_pair(task: PairTask, space: StoreSpace, predictions: ZarrPredictions | FolderPredictions,
                  tissue_hu: Sequence[float] = metrics.TISSUE_HU) -> dict:
    """Scores of one pair, or its error: ``{"pair", "split", metrics..., "mask_voxels"}`` / ``{..., "error"}``."""
    row: dict[str, Any] = {"pair": task.pair_id, "split": task.split}
    try:
        pred = predictions.load(task, space.shape_zyx)
        if not np.isfinite(np.sum(pred, dtype=np.float64)):  # one pass; count the culprits only when there are
            bad = int(np.size(pred) - np.count_nonzero(np.isfinite(pred)))
            raise PredictionError(f"{bad} voxel(s) of the prediction are NaN or infinite")
    except PredictionError as err:
        return {**row, "error": str(err)}
    vols = space.read(task.index, ("ct", *space.mask_vars))
    mask = space.mask(vols)
    if not mask.any():
        return {**row, "error": "the pair's metric mask is empty"}
    row.update(metrics.score(hu_values(vols["ct"], *task.ct_bounds), pred, mask, tissue_hu))
    return row


# ----------------------------------------------------------------------------------------------- the evaluation
@dataclass
class Evaluation:
    store: str
    predictions: str
    space: str
    mask: str
    tissue_hu: tuple[float, float]
    version: int | None = None  # the store version scored against (None: a store from before versions)
    rows: list[dict] = field(default_factory=list)  # scored pairs and errors, in store order
    not_ok: list[tuple[str, str]] = field(default_factory=list)
    out: str = ""

    @property
    def errors(self) -> list[dict]:
        return [r for r in self.rows if "error" in r]

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 0

    def splits(self) -> dict[str, dict]:
        """Per split (and "all"): scored and error counts, and mean / sd (n - 1) / n of each metric's finite values."""
        out = {}
        names = sorted({r["split"] for r in self.rows}, key=lambda s: (s not in ("train", "val", "test"), s))
        for name in [*names, "all"]:
            rows = [r for r in self.rows if name == "all" or r["split"] == name]
            scored = [r for r in rows if "error" not in r]
            stats = {}
            for k in METRICS:
                v = np.array([r[k] for r in scored], dtype=np.float64)
                v = v[np.isfinite(v)]
                stats[k] = {"mean": float(v.mean()) if v.size else None,
                            "sd": float(v.std(ddof=1)) if v.size > 1 else None, "n": int(v.size)}
            out[name] = {"scored": len(scored), "errors": len(rows) - len(scored), "metrics": stats}
        return out

    def table(self) -> str:
        """Mean ± sd per split, one line each."""
        head = f"{'split':<8}{'scored':>7}{'errors':>7}  " + "".join(f"{LABELS[k]:>17}" for k in METRICS)
        lines = [head]
        for name, s in self.splits().items():
            cells = []
            for k in METRICS:
                m = s["metrics"][k]
                digits = 4 if "ssim" in k else 1
                cell = "n/a" if m["mean"] is None else f"{m['mean']:.{digits}f}" + (
                    f" ± {m['sd']:.{digits}f}" if m["sd"] is not None else "")
                cells.append(f"{cell:>17}")
            lines.append(f"{name:<8}{s['scored']:>7}{s['errors']:>7}  " + "".join(cells))
        return "\n".join(lines)

    def describe(self) -> str:
        version = f"version {self.version}" if self.version is not None else "a store without versions"
        lines = [f"evaluated {self.predictions} against {self.store} ({self.space} space, {version})",
                 f"  mask: {self.mask}", self.table()]
        if self.not_ok:
            lines.append(f"  {len(self.not_ok)} pair(s) asked for are not ok in the store (nothing to score against)")
        if self.out:
            lines.append(f"results: {self.out.rstrip('/')}/metrics.csv, metrics.json")
        return "\n".join(lines)

    def error_lines(self) -> list[str]:
        """One line per pair that could not be scored."""
        return [f"pair {r['pair']}: {r['error']}" for r in self.errors]

    def to_json(self) -> dict:
        return {"store": self.store, "version": self.version, "predictions": self.predictions, "space": self.space,
                "mask": self.mask,
                "definitions": definitions(self.tissue_hu), "pairs": [_jsonable(r) for r in self.rows],
                "splits": _jsonable(self.splits()), "errors": [{"pair": r["pair"], "error": r["error"]}
                                                                for r in self.errors]}

    def write(self, out: Location) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["pair", "split", *METRICS, "mask_voxels", "error"])
        for r in self.rows:
            w.writerow([r["pair"], r["split"], *[_cell(r.get(k)) for k in METRICS], r.get("mask_voxels", ""),
                        r.get("error", "")])
        out.join("metrics.csv").write_text(buf.getvalue())
        out.join("metrics.json").write_text(json.dumps(self.to_json(), indent=1))
        self.out = out.url


def definitions(tissue_hu: Sequence[float]) -> dict[str, str]:
    lo23, hi23 = metrics.HU_RANGE_2023
    lo25, hi25 = metrics.HU_RANGE_2025
    t0, t1 = tissue_hu
    return {
        "mae": "mean |reference - prediction| HU over the mask (SynthRAD 2023/2025)",
        "psnr": f"10 log10(R^2 / MSE) over the mask, both clipped to [{lo23:g}, {hi23:g}] HU, R = {hi23 - lo23:g} "
                "(SynthRAD 2023)",
        "ssim": f"scikit-image SSIM map (7-voxel uniform window) of both clipped to [{lo23:g}, {hi23:g}] HU, outside "
                "the mask set to the minimum, shifted to >= 0; mean over the mask with a 3-voxel border cropped "
                "(SynthRAD 2023)",
        "ms_ssim": f"masked multi-scale SSIM over 5 levels, range [{lo25:g}, {hi25:g}] HU (SynthRAD 2025)",
        "mae_air": f"MAE over mask voxels whose reference HU < {t0:g}",
        "mae_soft_tissue": f"MAE over mask voxels whose reference HU in [{t0:g}, {t1:g})",
        "mae_bone": f"MAE over mask voxels whose reference HU >= {t1:g}",
        "reference": "the store's CT in whole HU: round(ct * (ct_hi - ct_lo) + ct_lo)",
        "sd": "sample standard deviation (n - 1) over the pairs of a split; null below 2 pairs",
        "null": "a value that is undefined (empty mask or tissue class); PSNR of identical images is the string inf",
    }


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if np.isfinite(v) else (None if np.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, np.integer):
        return int(v)
    return v


def _cell(v: Any) -> str:
    if v is None:
        return ""
    v = float(v)
    return "" if np.isnan(v) else repr(v)


def evaluate_store(store_url: str | Location, predictions_url: str | Location, *, space: str | None = None,
                   split: str | None = None, pairs: Sequence[str] | None = None, version: int | None = None,
                   tissue_hu: Sequence[float] = metrics.TISSUE_HU, out_url: str | Location | None = None,
                   executor: Executor | None = None, storage_options: dict | None = None,
                   progress: bool = False) -> Evaluation:
    """Score the predictions of every selected ok pair of the store's ``version`` (None: the latest; see
    :func:`mrict_dask.spaces.pair_table`); write ``metrics.csv``/``metrics.json`` to ``out_url`` (default: beside
    the predictions, ``<PREDICTIONS>-evaluation``)."""
    t0, t1 = (float(v) for v in tissue_hu)
    if not t0 < t1:
        raise InputError(f"tissue thresholds must rise (air < soft tissue < bone), got {t0:g}, {t1:g}")
    store = Location.of(store_url, storage_options)
    sp = open_space(store, space)
    table = pair_table(store, version)
    chosen, not_ok = select_pairs(table, split, pairs)
    ids = table.ids
    preds, rows_of = open_predictions(predictions_url, ids, storage_options)
    result = Evaluation(store=store.url, predictions=preds.location.url, space=sp.name, mask=sp.mask_note,
                        tissue_hu=(t0, t1), version=table.version, not_ok=not_ok)
    geometries = sp.geometries(chosen)
    tasks = [PairTask(index=i, pair_id=ids[i], split=str(table["split"][i]), geometry=geometries[i],
                      ct_bounds=(float(table["ct_lo"][i]), float(table["ct_hi"][i])),
                      row=rows_of.get(ids[i]) if rows_of is not None else None) for i in chosen]
    fn = functools.partial(evaluate_pair, space=sp, predictions=preds, tissue_hu=(t0, t1))
    rows: dict[int, dict] = {}
    with Progress("evaluate", len(tasks), progress, unit="pairs", show_failed=True) as bar:
        for outcome in (executor or SerialExecutor(retries=1)).run(fn, tasks, key=lambda t: f"evaluate-{t.pair_id}"):
            t = outcome.item
            rows[t.index] = outcome.value if outcome.ok else {"pair": t.pair_id, "split": t.split,
                                                              "error": outcome.error}
            bar.advance(failed="error" in rows[t.index])
    result.rows = [rows[i] for i in chosen]
    default_out = preds.location.url.rstrip("/") + "-evaluation"
    result.write(Location.of(out_url or default_out, storage_options))
    return result
