"""``mrict-dask export-series``: write one series, or every usable stack, as NIfTI/NRRD/MHA for inspection."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .errors import VolumeError
from .io import Location
from .progress import Progress
from .sources import Source, open_source
from .stacks import stacks_from_catalog
from .values import text
from .volume import plan_config, read_volume


# ------------------------------------------------------------------------------------------- export
@dataclass
class ExportSummary:
    written: list[tuple[str, str]] = field(default_factory=list)  # (output URL, series label + stack note)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (series label, reason)
    files_with_errors: int = 0

    def describe(self) -> str:
        lines = [f"exported {len(self.written)} volume(s); refused {len(self.refused)} stack(s)"
                 + (f"; {self.files_with_errors} unreadable file(s) skipped" if self.files_with_errors else "")]
        for out, what in self.written:
            lines.append(f"  wrote {out}  <- {what}")
        by_reason = Counter(reason for _, reason in self.refused)
        for what, reason in self.refused:
            lines.append(f"  refused {what}: {reason}")
        if len(self.refused) > 20:
            lines = lines[:1] + [f"  wrote {o}  <- {w}" for o, w in self.written] + \
                [f"  refused {n}: {r}" for r, n in by_reason.most_common()]
        return "\n".join(lines)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:40] or "series"


def _write_image(img: Any, target: Location) -> None:
    """Write a SimpleITK image to a local path or object storage (through a temporary local file)."""
    import os
    import tempfile

    import SimpleITK as sitk

    if target.is_local:
        path = target.local_path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        sitk.WriteImage(img, path, useCompression=path.endswith(".gz"))
        return
    url = target.url
    suffix = ".nii.gz" if url.endswith(".nii.gz") else os.path.splitext(url)[1] or ".nii.gz"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "volume" + suffix)
        sitk.WriteImage(img, path, useCompression=suffix.endswith(".gz"))
        with open(path, "rb") as fh:
            target.write_bytes(fh.read())


def _load_catalog(source: Source, catalog: str | None, progress: bool) -> Any:
    if catalog:
        from .catalog import read_catalog

        return read_catalog(Location.of(catalog, source.storage_options))
    from .scan import scan

    return scan(source, progress=progress)


def export_series_command(input_url: str, series_uid: str | None = None, out: str | None = None,
                          all_dir: str | None = None, catalog: str | None = None,
                          storage_options: dict | None = None, progress: bool = False,
                          config: Any = None) -> ExportSummary:
    """Write one series (``series_uid`` -> ``out``) or every usable stack (-> ``all_dir``) as NIfTI/NRRD/MHA.

    Geometry is kept in physical space (the writer converts LPS to the file format's convention). A series that
    splits into several usable stacks is written once per stack (``name_2.nii.gz``...). File names under
    ``all_dir`` use modality, series number, description and a short hash of the series UID, never patient data.
    """
    import hashlib

    if not all_dir and not (series_uid and out):
        from .errors import ConfigError

        raise ConfigError("give a series UID and an output file, or an output folder for every usable series")
    cfg = plan_config(config)
    source = open_source(input_url, storage_options)
    cat = _load_catalog(source, catalog, progress)
    summary = ExportSummary()
    if "read_error" in cat.columns:
        summary.files_with_errors = int(cat["read_error"].map(lambda x: bool(text(x))).sum())
    if series_uid:
        cat = cat[cat["series_uid"].map(text) == series_uid]
        if len(cat) == 0:
            from .errors import InputError

            raise InputError("no file of the requested series was found under the input")
    cat = cat[cat["series_uid"].map(lambda x: bool(text(x)))]
    groups = list(cat.groupby("series_uid", sort=True))
    bar = Progress("export", len(groups), progress, unit="series", transient=True)
    for uid, rows in groups:
        stacks = stacks_from_catalog(rows, cfg)
        usable = [s for s in stacks if s.usable]
        for st in stacks:
            if not st.usable:
                summary.refused.append((f"{st.info.get('modality', '')} {st.label}".strip(), str(st.refused)))
        for i, st in enumerate(usable):
            what = f"{st.info.get('modality', '')} {st.label}".strip()
            if st.notes:
                what += f" ({'; '.join(st.notes)})"
            if series_uid:
                target = Location.of(out if i == 0 else _numbered(out, i + 1), storage_options)
            else:
                tag = hashlib.sha256(str(uid).encode()).hexdigest()[:8]
                num = st.info.get("series_number")
                name = f"{st.info.get('modality') or 'XX'}_{int(num) if num is not None else 0}_" \
                       f"{_safe_name(st.info.get('description') or '')}_{tag}" + (f"_{i + 1}" if i else "")
                target = Location.of(all_dir, storage_options).join(name + ".nii.gz")
            try:
                img = read_volume(st.urls, source.storage_options, cfg)
            except VolumeError as err:
                summary.refused.append((what, str(err).split(": ", 1)[-1]))
                continue
            _write_image(img, target)
            summary.written.append((target.url, what))
        bar.advance()
    bar.close()
    if series_uid and not summary.written:
        reasons = "; ".join(sorted({r for _, r in summary.refused})) or "no image stack"
        raise VolumeError(f"the requested series cannot be exported: {reasons}")
    return summary


def _numbered(url: str, k: int) -> str:
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if url.endswith(ext):
            return f"{url[:-len(ext)]}_{k}{ext}"
    return f"{url}_{k}"
