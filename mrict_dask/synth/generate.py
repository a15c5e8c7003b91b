"""``generate_corpus``: plan patients, break files (QUIRKS) and arrange sessions as clinical exports do (layouts), write
the DICOM files and the ground-truth manifest (its format: mrict_dask/synth/corpus.py). The one module that uses both
the corpus's planning and rendering (corpus.py) and the clinical layouts built on them (layouts.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from ..errors import ConfigError
from ..io import Location
from ..progress import Progress
from ..template import Template
from .anatomy import tissue_model
from .corpus import (
    GENERATOR_VERSION,
    LAYOUTS,
    MANIFEST_FORMAT,
    SCENARIOS,
    SynthSummary,
    _add_quirk_files,
    _check_quirks,
    _expected,
    _Namer,
    _Out,
    _phi,
    _point,
    _write_non_dicom,
    _write_patient,
    assign_quirks,
    covers_head,
    patient_seed,
    plan_patient,
)
from .layouts import apply_layouts

log = logging.getLogger(__name__)


def generate_corpus(out_url: str, patients: int = 3, seed: int = 0, quirks: Sequence[str] = (), layout: str = "tcia",
                    manifest_url: str | None = None, storage_options: dict | None = None,
                    progress: bool = False, template: Template | None = None,
                    scenarios: Sequence[str] | None = None) -> SynthSummary:
    """Write a synthetic DICOM corpus to ``out_url`` (any fsspec URL) and its ground-truth manifest beside it.

    Patient i has scenario ``scenarios[i % len(scenarios)]`` (default: every scenario in turn, SCENARIOS)."""
    t0 = time.perf_counter()
    quirks = tuple(quirks)
    _check_quirks(quirks)
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if patients < 1:
        raise ConfigError("--patients must be at least 1")
    scenarios = tuple(scenarios or SCENARIOS)
    if not set(scenarios) <= set(SCENARIOS):
        raise ConfigError(f"unknown scenario(s) {', '.join(sorted(set(scenarios) - set(SCENARIOS)))}; "
                          f"choose from {', '.join(SCENARIOS)}")
    where = Location.of(out_url, storage_options)
    fs, root = where.fs, where.path.rstrip("/")
    if fs.exists(root) and fs.ls(root):
        raise ConfigError(f"{out_url} is not empty: choose a new location for the corpus")
    out = _Out(fs=fs, root=root, local=where.is_local)
    manifest_url = manifest_url or out_url.rstrip("/") + ".manifest.json"

    model = tissue_model(template)
    taken: set[str] = set()
    counts: dict[str, int] = {}
    plans = []
    for i in range(patients):
        sc = scenarios[i % len(scenarios)]
        plans.append(plan_patient(patient_seed(seed, i), sc, i, model, counts.get(sc, 0), seed, taken))
        counts[sc] = counts.get(sc, 0) + 1

    layout_log = apply_layouts(plans, quirks, model, seed, taken)
    quirk_log = assign_quirks(plans, quirks, model, seed) + layout_log
    for p in plans:
        for st in p.studies:
            for s in st.series:
                s.whole_head = covers_head(s, model)
    namer = _Namer(layout, seed)
    patient_entries = []
    with Progress("synth", patients, progress, unit="patients", transient=True) as bar:
        for plan in plans:
            patient_entries.append(_write_patient(plan, model, out, seed, namer))
            bar.advance()
    if "non_dicom_file" in quirks:
        quirk_log += _write_non_dicom(patient_entries, out, seed, namer)
    _add_quirk_files(quirk_log, patient_entries, out)

    pairs, exclusions = _expected(plans)
    phi = _phi(plans)
    manifest = {
        "format": MANIFEST_FORMAT,
        "generator": {"version": GENERATOR_VERSION, "seed": int(seed), "patients": int(patients),
                      "quirks": list(quirks), "layout": layout, "template_sha256": model.template_sha256,
                      "scenarios": list(scenarios),
                      "anatomy_landmarks": {k: _point(v) for k, v in model.landmarks.items()}},
        "n_files": len(out.files), "n_bytes": int(out.n_bytes),
        "files": out.files,
        "patients": patient_entries,
        "expected_pairs": pairs,
        "expected_exclusions": exclusions,
        "quirks": quirk_log,
        "phi": phi,
        "phi_strings": sorted({s for v in phi.values() for s in v}),
    }
    Location.of(manifest_url, storage_options).write_json(manifest, indent=1)
    seconds = time.perf_counter() - t0
    log.info("synthetic corpus: %d files, %d bytes, %.1f s", len(out.files), out.n_bytes, seconds)
    return SynthSummary(manifest=manifest, n_files=len(out.files), n_bytes=int(out.n_bytes), seconds=seconds,
                        out_url=out_url, manifest_url=manifest_url)
