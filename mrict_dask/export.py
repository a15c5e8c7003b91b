"""``mrict-dask export-series``: write one series, or every usable stack, as NIfTI/NRRD/MHA for inspection."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import plan_config
from .errors import VolumeError
from .io import Location
from .progress import Progress
from .sources import Source, open_source
from .stacks import CatalogStacks
from .volume import read_volume


# ------------------------------------------------------------------------------------------- export
@dataclass
class ExportSummary:
    written: list[tuple[str, str]] = field(default_factory=list)  # (output URL, series label + stack note)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (series label, reason)
    files_with_errors: int = 0

    def describe(self) -> str:
        lines = [f"exported {len(self.written)} volume(s); refused {len(self.refused)} stack(s)"
                 + (f"; {self.files_with_errors} unreadable file(s) skipped" if self.files_with_errors else "")]
        lines += [f"  wrote {out}  <- {what}" for out, what in self.written]
        if len(self.refused) > 20:  # many: one line per reason
            lines += [f"  refused {n}: {r}" for r, n in Counter(r for _, r in self.refused).most_common()]
        else:
            lines += [f"  refused {what}: {reason}" for what, reason in self.refused]
        return "\n".join(lines)


def _what(st) -> str:
    """A stack as the export's summary names it: modality, series number and description (the user's own
    terminal, like the output file names; the run's public outputs never quote descriptions)."""
    desc = st.info.get("description") or ""
    return " ".join(x for x in (st.info.get("modality", ""), st.label, f"'{desc}'" if desc else "") if x)

def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:40] or "series"


def write_image(img: Any, target: Location) -> None:
    """Write a SimpleITK image as NIfTI (``.nii``, ``.nii.gz``), MetaImage (``.mha``) or NRRD (``.nrrd``) to a local
    path or object storage, atomically: readers see the whole file or none (:meth:`Location.write_bytes`).

    ``.nii.gz`` is ITK's ``.nii`` gzipped with ISA-L at level 1: ITK's NIfTI writer ignores the compression level
    and takes ~10x longer for files a few percent smaller. MetaImage and NRRD are compressed by ITK.
    """
    import os
    import tempfile

    import SimpleITK as sitk

    url = target.url
    gz = url.endswith(".nii.gz")
    suffix = ".nii" if gz else os.path.splitext(url)[1] or ".nii"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "volume" + suffix)
        sitk.WriteImage(img, path, useCompression=suffix in (".mha", ".nrrd"))
        with open(path, "rb") as fh:
            data = fh.read()
    if gz:
        from isal import igzip

        data = igzip.compress(data, compresslevel=1, mtime=0)
    target.write_bytes(data)


def read_image(source: Location) -> Any:
    """A SimpleITK image (NIfTI, MetaImage, NRRD, ...) from a local path or object storage.

    ``.nii.gz`` is unzipped with ISA-L first (several times faster than ITK's zlib). ITK 5's NIfTI reader turns NaN
    and infinite voxels into 0 without a word (fixed in ITK 6, ITK pull request 6683): a floating-point NIfTI file
    is also mapped with nibabel, and one holding such voxels raises ValueError.
    """
    import os
    import tempfile

    gz = source.url.endswith(".nii.gz")
    if source.is_local and not gz:
        return _read_local_image(source.local_path)
    suffix = ".nii" if gz else os.path.splitext(source.url)[1]
    data = source.read_bytes()
    if gz:
        from isal import igzip

        data = igzip.decompress(data)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "image" + suffix)
        with open(path, "wb") as fh:
            fh.write(data)
        del data
        return _read_local_image(path)


def _read_local_image(path: str) -> Any:
    import SimpleITK as sitk

    img = sitk.ReadImage(path)
    if path.endswith((".nii", ".nii.gz")) and img.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        import nibabel

        data = np.asarray(nibabel.load(path, mmap=True).dataobj)
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        del data
        if bad:
            raise ValueError(f"{bad} voxel(s) are NaN or infinite")
    return img


def _load_catalog(source: Source, catalog: str | None, progress: bool) -> Any:
    """The catalog as an Arrow table: the given Parquet file, or a scan of the input."""
    if catalog:
        from .catalog import read_catalog_table

        return read_catalog_table(Location.of(catalog, source.storage_options))
    from .scan import scan_table

    return scan_table(source, progress=progress)


def export_series_command(input_url: str, series_uid: str | None = None, out: str | None = None,
                          all_dir: str | None = None, catalog: str | None = None,
                          storage_options: dict | None = None, progress: bool = False,
                          config: Any = None) -> ExportSummary:
    """Write one series (``series_uid`` -> ``out``) or every usable stack (-> ``all_dir``) as NIfTI/NRRD/MHA.

    Geometry is kept in physical space (the writer converts LPS to the file format's convention). A series that
    splits into several usable stacks is written once per stack (``name_2.nii.gz``...). File names under
    ``all_dir`` use modality, series number, description and a short hash of the series UID, never patient data.
    """

    if not all_dir and not (series_uid and out):
        from .errors import ConfigError

        raise ConfigError("give a series UID and an output file, or an output folder for every usable series")
    cfg = plan_config(config)
    source = open_source(input_url, storage_options)
    catalog_stacks = CatalogStacks(_load_catalog(source, catalog, progress), cfg)
    summary = ExportSummary(files_with_errors=int((catalog_stacks.c["read_error"].codes >= 0).sum()))
    uids = catalog_stacks.c["series_uid"]
    if series_uid and series_uid not in uids.values:
        from .errors import InputError

        raise InputError("no file of the requested series was found under the input")
    n_series = 1 if series_uid else len(np.unique(uids.codes[uids.codes >= 0]))
    with Progress("export", n_series, progress, unit="series", transient=True) as bar:
        for uid, stacks in catalog_stacks.series(only=series_uid):
            _export_series(uid, stacks, summary, source, cfg, out, all_dir, storage_options)
            bar.advance()
    if series_uid and not summary.written:
        reasons = "; ".join(sorted({r for _, r in summary.refused})) or "no image stack"
        raise VolumeError(f"the requested series cannot be exported: {reasons}")
    return summary


def _export_series(uid: str, stacks: list, summary: ExportSummary, source: Source, cfg: Any, out: str | None,
                   all_dir: str | None, storage_options: dict | None) -> None:
    """Write every usable stack (volume) of one series: to ``out`` (numbered) if given, else into ``all_dir``."""
    import hashlib

    usable = [s for s in stacks if s.usable]
    for st in stacks:
        if not st.usable:
            summary.refused.append((_what(st), str(st.refused)))
    for i, st in enumerate(usable):
        what = _what(st)
        if st.split is not None:
            what += f" volume {st.split.index + 1} of {st.split.count}: {st.split.label}"
        if st.notes:
            what += f" ({'; '.join(st.notes)})"
        # a volume of a 4D series is named by what tells it apart (b-value, time point, echo...)
        tag = st.split.name if st.split is not None else (str(i + 1) if i else "")
        if out:
            target = Location.of(_numbered(out, tag) if tag else out, storage_options)
        else:
            uid_tag = hashlib.sha256(str(uid).encode()).hexdigest()[:8]
            num = st.info.get("series_number")
            name = f"{st.info.get('modality') or 'XX'}_{int(num) if num is not None else 0}_" \
                   f"{_safe_name(st.info.get('description') or '')}_{uid_tag}" + (f"_{tag}" if tag else "")
            target = Location.of(all_dir, storage_options).join(name + ".nii.gz")
        try:
            img = read_volume(st.urls, source.storage_options, cfg)
        except VolumeError as err:
            summary.refused.append((what, str(err).split(": ", 1)[-1]))
            continue
        write_image(img, target)
        summary.written.append((target.url, what))


def _numbered(url: str, k: int | str) -> str:
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if url.endswith(ext):
            return f"{url[:-len(ext)]}_{k}{ext}"
    return f"{url}_{k}"
