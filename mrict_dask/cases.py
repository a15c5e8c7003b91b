"""``mrict-dask export``: the store as one folder per case, the layout the field's training code reads (SynthRAD's).

::

    OUT/<pair_id>/mr.nii.gz      MR, float32: the store's [0, 1] MR scaled back by its clip bounds (mr_lo, mr_hi)
    OUT/<pair_id>/ct.nii.gz      CT in HU, int16: round(ct * (ct_hi - ct_lo) + ct_lo)
    OUT/<pair_id>/mask.nii.gz    metric mask, uint8 (head & valid; valid in stores without 'head')
    OUT/overview/<pair_id>.png   MR and CT through the mask's centre, three planes, mask outline
    OUT/overview.csv             one row per exported case: pair, patient, split, days apart, QA, mask
    OUT/.mrict-export/<pair_id>.json   completion marker (written last)

(``.mha`` instead of ``.nii.gz`` with ``fmt="mha"``.) Geometry is the space's exactly: one grid for every pair in
template space, each pair's own grid (its MR's patient frame) in native space. Files hold image data and geometry
only: no identifiers, UIDs or dates (the header fields a writer could fill, NIfTI ``descrip``/``aux_file``, stay
empty).

A case is finished when its marker names this space, format and the pair's content in the store (the checksums the
store recorded when the pair was written) and its files are there with the sizes it records. A re-run skips
finished cases; anything else is written again, each file atomically, marker last, so a killed export never leaves a
case counted as finished. Files a user added to a case folder (``sct.nii.gz``) are never touched.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError
from .executor import Executor, SerialExecutor
from .io import Location
from .progress import Progress
from .spaces import Geometry, PairTable, StoreSpace, ct_hu, current_status, open_space, pair_table, select_pairs

log = logging.getLogger(__name__)

FORMATS = ("nii.gz", "mha")
CASE_IMAGES = ("mr", "ct", "mask")
MARKER_DIR = ".mrict-export"
OVERVIEW_DIR = "overview"
OVERVIEW_TABLE = "overview.csv"
CT_WINDOW_PNG = (-150.0, 250.0)  # HU shown black..white in the overview: brain grey, bone white


@dataclass(frozen=True)
class CaseTask:
    """One case to write (what a task carries: small, no identifiers)."""

    index: int
    pair_id: str
    geometry: Geometry
    mr_bounds: tuple[float, float]
    ct_bounds: tuple[float, float]
    source: str  # digest of the pair's checksums in the store


def pair_sources(store: Location) -> dict[int, str]:
    """Per completed pair: a digest of the checksums its store marker records (changes when the pair is rewritten)."""
    from .store import completed_pairs

    return {i: hashlib.sha256(json.dumps(m.get("checksum"), sort_keys=True).encode()).hexdigest()[:32]
            for i, m in completed_pairs(store, check=False).items()}


def case_files(pair_id: str, fmt: str) -> dict[str, str]:
    """Image name -> path of the file below OUT."""
    return {name: f"{pair_id}/{name}.{fmt}" for name in CASE_IMAGES}


# ----------------------------------------------------------------------------------------------- one case
def export_case(task: CaseTask, space: StoreSpace, out: Location, fmt: str) -> dict:
    """Read one pair of ``space``, write its case folder and overview, then its marker; return the marker."""
    from .export import write_image

    vols = space.read(task.index, ("mr", "ct", *space.mask_vars))
    g = task.geometry
    lo, hi = task.mr_bounds
    mr = (vols["mr"].astype(np.float64) * (hi - lo) + lo).astype(np.float32)
    ct = ct_hu(vols["ct"], *task.ct_bounds)
    mask = space.mask(vols)
    images = {"mr": mr, "ct": ct, "mask": mask.astype(np.uint8)}
    marker_loc = out.join(MARKER_DIR, f"{task.pair_id}.json")
    marker_loc.remove()  # an old marker must not vouch for files about to be rewritten
    files = {}
    for name, path in case_files(task.pair_id, fmt).items():
        for other in FORMATS:  # a case written before in another format: its files go
            if other != fmt:
                out.join(f"{task.pair_id}/{name}.{other}").remove()
        target = out.join(path)
        write_image(g.image(images[name]), target)
        files[name] = {"path": path, "size": target.size()}
    png = f"{OVERVIEW_DIR}/{task.pair_id}.png"
    out.join(png).write_bytes(overview_png(vols["mr"], ct, mask, g))
    marker = {"pair_id": task.pair_id, "space": space.name, "format": fmt, "source": task.source,
              "files": files, "overview": png, "geometry": g.to_dict(), "mask": space.mask_name,
              "mask_voxels": int(mask.sum())}
    marker_loc.write_bytes(json.dumps(marker, indent=1).encode(), durable=True)
    return marker


def overview_png(mr01: np.ndarray, ct: np.ndarray, mask: np.ndarray, geometry: Geometry) -> bytes:
    """MR (its [0, 1] scale) and CT (a brain window) through the mask's centre in three planes, the
    mask's outline in red; radiological view (patient's left on the right, anterior and superior up)."""
    from PIL import Image
    from scipy.ndimage import binary_erosion

    mr_l, ct_l, mask_l = (_lps_view(v, geometry) for v in (mr01, ct, mask))
    spacing = _lps_spacing(geometry)
    pts = np.argwhere(mask_l)
    cz, cy, cx = (pts.mean(axis=0).round().astype(int) if len(pts) else np.array(mask_l.shape) // 2)
    lo, hi = CT_WINDOW_PNG
    # (z, y, x) arrays in LPS index order: x to the patient's left, y to posterior, z to superior
    planes = [(lambda a: a[cz], (spacing[1], spacing[0])),  # axial: rows anterior->posterior, columns right->left
              (lambda a: a[::-1, cy, :], (spacing[2], spacing[0])),  # coronal: superior up
              (lambda a: a[::-1, :, cx], (spacing[2], spacing[1]))]  # sagittal: superior up, anterior left
    rows = []
    for img, scale in ((mr_l, (0.0, 1.0)), (ct_l, (lo, hi))):
        tiles = []
        for cut, (sr, sc) in planes:
            gray = np.clip((cut(img).astype(np.float64) - scale[0]) / (scale[1] - scale[0]), 0, 1)
            rgb = np.repeat((gray * 255).astype(np.uint8)[..., None], 3, axis=2)
            m = cut(mask_l).astype(bool)
            rgb[m & ~binary_erosion(m)] = (255, 40, 40)
            tile = Image.fromarray(rgb)
            h, w = rgb.shape[:2]
            tiles.append(tile.resize((max(1, round(w * sc)), max(1, round(h * sr))), Image.NEAREST))
        rows.append(tiles)
    width = sum(t.width for t in rows[0]) + 2 * 4
    height = sum(max(t.height for t in r) for r in rows) + 4
    canvas = Image.new("RGB", (width, height))
    y = 0
    for r in rows:
        x = 0
        for t in r:
            canvas.paste(t, (x, y))
            x += t.width + 4
        y += max(t.height for t in r) + 4
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _lps_axes(geometry: Geometry) -> list[tuple[int, bool]]:
    """For L, P and S in turn: the index axis (0 x, 1 y, 2 z) closest to it and whether it runs the other way."""
    d = np.abs(np.asarray(geometry.direction).reshape(3, 3))  # rows: L, P, S; columns: index axes
    axes: dict[int, int] = {}
    for flat in np.argsort(-d, axis=None):  # greedy on the largest cosines: a permutation even at 45 degrees
        row, col = divmod(int(flat), 3)
        if row not in axes and col not in axes.values():
            axes[row] = col
    sign = np.asarray(geometry.direction).reshape(3, 3)
    return [(axes[r], bool(sign[r, axes[r]] < 0)) for r in range(3)]


def _lps_view(arr: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The (z, y, x) array turned so its axes run superior, posterior, left (the closest of LPS), as a view."""
    axes = _lps_axes(geometry)[::-1]  # S, P, L: the array's axis k holds index axis 2 - k
    out = np.transpose(arr, [2 - j for j, _ in axes])
    return out[tuple(slice(None, None, -1) if flip else slice(None) for _, flip in axes)]


def _lps_spacing(geometry: Geometry) -> tuple[float, float, float]:
    """Spacing along the turned array's axes (x along L, y along P, z along S)."""
    return tuple(geometry.spacing[j] for j, _ in _lps_axes(geometry))  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- the export
@dataclass
class ExportSummary:
    out: str
    space: str
    mask: str
    version: int | None = None  # the store version exported (None: a store from before versions)
    written: int = 0
    skipped: int = 0  # finished before
    not_ok: list[tuple[str, str]] = field(default_factory=list)  # (pair id, status) of pairs asked for, not ok
    removed: list[tuple[str, str]] = field(default_factory=list)  # (pair id, status) of cases taken out of OUT
    failed: list[tuple[str, str]] = field(default_factory=list)  # (pair id, reason)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def describe(self) -> str:
        version = f"version {self.version}" if self.version is not None else "a store without versions"
        lines = [f"export {self.out} ({self.space} space, {version}): {self.written} case(s) written, "
                 f"{self.skipped} already finished, {len(self.failed)} failed",
                 f"  mask: {self.mask}",
                 f"  overview: {self.out.rstrip('/')}/{OVERVIEW_TABLE} and {OVERVIEW_DIR}/<pair>.png"]
        if self.not_ok:
            lines.append(f"  {len(self.not_ok)} pair(s) asked for are not ok in the store (no case written):")
            lines += [f"    {p}: {s}" for p, s in self.not_ok[:20]]
            lines += [f"    ... and {len(self.not_ok) - 20} more"] if len(self.not_ok) > 20 else []
        if self.removed:
            lines.append(f"  {len(self.removed)} case(s) removed from OUT, their pairs now retired or withdrawn "
                         "(a withdrawn pair's whole folder, files you added too):")
            lines += [f"    {p}: {s}" for p, s in self.removed]
        return "\n".join(lines)

    def errors(self) -> list[str]:
        """One line per case that could not be written."""
        return [f"pair {p}: {reason}" for p, reason in self.failed]


def _markers(out: Location) -> dict[str, dict]:
    """pair id -> marker of every case OUT holds a readable marker for (any space or format)."""
    fs = out.fs
    fs.invalidate_cache()
    root = out.path.rstrip("/")
    try:
        names = [p for p in fs.ls(f"{root}/{MARKER_DIR}", detail=False) if p.endswith(".json")]
    except FileNotFoundError:
        return {}
    markers = {}
    for name, blob in (fs.cat(names, on_error="return") if names else {}).items():
        try:
            if isinstance(blob, Exception):
                raise blob
            m = json.loads(blob)
            if not isinstance(m.get("files"), dict):
                raise ValueError("no files listed")
        except Exception as exc:  # a marker torn by hand: the case is written again
            log.warning("%s: unreadable export marker (%s); the case will be written again", name.rsplit("/")[-1], exc)
            continue
        markers[str(m["pair_id"])] = m
    return markers


def _finished(out: Location, markers: dict[str, dict], space: str, fmt: str) -> dict[str, dict]:
    """The markers of ``markers`` whose case is in ``space`` and ``fmt`` with all its files there as recorded."""
    root = out.path.rstrip("/")
    try:
        sizes = {p[len(root) + 1:]: int(info.get("size") or 0) for p, info in out.fs.find(root, detail=True).items()}
    except FileNotFoundError:
        sizes = {}
    return {pid: m for pid, m in markers.items() if m.get("space") == space and m.get("format") == fmt
            and all(sizes.get(f["path"]) == f["size"] for f in m["files"].values())}


def remove_stale_cases(out: Location, table: PairTable, now: dict[str, str], markers: dict[str, dict],
                       ) -> list[tuple[str, str]]:
    """Take out of OUT the cases of pairs the exported version holds as retired, or the store now holds as withdrawn
    (a patient who withdrew consent): the files export wrote, the overview and the marker; for a withdrawn pair the
    whole case folder, files a user added included (a prediction made from the patient's MR is the patient's data).
    Returns (pair id, status) of each case removed."""
    status = {pid: "withdrawn" for pid, s in now.items() if s == "withdrawn"}
    status.update({pid: s for pid, s in zip(table.ids, table["status"]) if s == "retired"})
    try:
        held = {p.rstrip("/").rsplit("/", 1)[-1] for p in out.fs.ls(out.path, detail=False)}
    except FileNotFoundError:
        return []
    removed = []
    for pid, s in status.items():
        if pid not in held and pid not in markers:
            continue
        out.join(MARKER_DIR, f"{pid}.json").remove()  # first: the case is no longer counted finished
        out.join(OVERVIEW_DIR, f"{pid}.png").remove()
        if s == "withdrawn":
            with contextlib.suppress(FileNotFoundError):
                out.fs.rm(out.join(pid).path, recursive=True)
        else:
            for name in CASE_IMAGES:
                for fmt in FORMATS:
                    out.join(pid, f"{name}.{fmt}").remove()
        removed.append((pid, s))
    if removed:
        out.fs.invalidate_cache()
    return removed


def export_store(store_url: str | Location, out_url: str | Location, *, space: str | None = None, fmt: str = "nii.gz",
                 split: str | None = None, pairs: Sequence[str] | None = None, version: int | None = None,
                 executor: Executor | None = None, storage_options: dict | None = None,
                 progress: bool = False) -> ExportSummary:
    """Write the ok pairs of ``store_url`` (a split, a list of pair ids, or all) as case folders under ``out_url``.

    ``space``: "native", "template" or None (native when the store has it). ``version``: the store version whose
    ok pairs are exported (None: the latest), through :func:`mrict_dask.store.resolve_version`: a version that held
    a patient who withdrew since is refused in one line. Pairs not ok in it (failed, pending, retired, withdrawn)
    are never written, and cases OUT holds of pairs retired in it or withdrawn are removed
    (:func:`remove_stale_cases`). ``executor``: where the cases are written (default: a serial loop here); with a
    Dask executor each case is one task on the workers.
    """
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    store = Location.of(store_url, storage_options)
    out = Location.of(out_url, storage_options)
    sp = open_space(store, space)
    table = pair_table(store, version)
    chosen, not_ok = select_pairs(table, split, pairs)
    summary = ExportSummary(out=out.url, space=sp.name, mask=sp.mask_note, version=table.version, not_ok=not_ok)
    sources = pair_sources(store)
    markers = _markers(out)
    summary.removed = remove_stale_cases(out, table, current_status(store), markers)
    for pid, _ in summary.removed:
        markers.pop(pid, None)
    finished = _finished(out, markers, sp.name, fmt)
    ids = table.ids
    todo = [i for i in chosen if finished.get(ids[i], {}).get("source") != sources.get(i)]
    summary.skipped = len(chosen) - len(todo)
    geometries = sp.geometries(todo)
    tasks = [CaseTask(index=i, pair_id=ids[i], geometry=geometries[i],
                      mr_bounds=(float(table["mr_lo"][i]), float(table["mr_hi"][i])),
                      ct_bounds=(float(table["ct_lo"][i]), float(table["ct_hi"][i])), source=sources.get(i, ""))
             for i in todo]
    fn = functools.partial(export_case, space=sp, out=out, fmt=fmt)
    ex = executor or SerialExecutor(retries=1)
    markers = dict(finished)  # the table lists every finished case in OUT, this run's and earlier ones'
    with Progress("export", len(tasks), progress, unit="cases", show_failed=True) as bar:
        for outcome in ex.run(fn, tasks, key=lambda t: f"export-{t.pair_id}"):
            if outcome.ok:
                markers[outcome.item.pair_id] = outcome.value
                summary.written += 1
            else:
                summary.failed.append((outcome.item.pair_id, outcome.error))
            bar.advance(failed=not outcome.ok)
    write_overview_table(out, table, markers)
    return summary


def write_overview_table(out: Location, table: PairTable, markers: dict[str, dict]) -> None:
    """``overview.csv``: one row per finished case (this run's and earlier ones'), in store order."""
    from .types import QA_KEYS

    qa = [k for k in QA_KEYS if k in table]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["pair", "patient", "split", "days_apart", *qa, "space", "mask_voxels", "mask", "overview"])
    for i, pid in enumerate(str(v) for v in table["pair"]):
        m = markers.get(pid)
        if m is None:
            continue
        w.writerow([pid, table["patient"][i], table["split"][i], int(table["days_apart"][i]),
                    *[_num(table[k][i]) for k in qa], m["space"], m["mask_voxels"], m["mask"], m["overview"]])
    out.join(OVERVIEW_TABLE).write_text(buf.getvalue())


def _num(v: Any) -> str:
    v = float(v)
    return "" if not np.isfinite(v) else f"{v:.6g}"
