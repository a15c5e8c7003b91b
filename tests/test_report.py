"""The run report stays usable at any size: a small summary page, detail pages that link every pair's figure."""

from __future__ import annotations

import json
import os
import re

import numpy as np

from mrict_dask.config import Config
from mrict_dask.orchestrate import RunSummary
from mrict_dask.plan import Plan
from mrict_dask.report import PAGES, write_report
from mrict_dask.types import QA_KEYS, PairSpec

from .test_loader import tiny_template


def _run(n_pairs: int, n_series: int, tmp_path) -> tuple[str, dict]:
    pairs = [PairSpec(index=i, pair_id=f"P{i:016x}-0001", patient=f"P{i:016x}", split="train", days_apart=i,
                      mr_files=(), ct_files=()) for i in range(n_pairs)]
    markers = {i: {"status": "ok" if i % 3 else "failed: MR: too few slices",
                   "qa": dict.fromkeys(QA_KEYS, 0.5 + i / (2 * n_pairs)), "timings": {"total": 9.5}}
               for i in range(n_pairs)}
    plan = Plan(pairs=pairs, exclusions=[{"patient": f"P{i:016x}", "reason": "no CT study"} for i in range(7)],
                series=[{"patient": f"P{i % n_pairs:016x}", "modality": "MR", "description": f"series {i}",
                         "decision": "not chosen", "reason": "not T1-weighted"} for i in range(n_series)])
    summary = RunSummary(output_url="store.zarr", report_url="store.zarr-report", n_pairs=n_pairs,
                         ok=sum(m["status"] == "ok" for m in markers.values()),
                         failed={"MR": sum(m["status"] != "ok" for m in markers.values())})
    out = str(tmp_path / f"report-{n_pairs}")
    rep = write_report(out, plan, pairs, markers, summary, Config(), tiny_template())
    return out, rep


def test_summary_page_does_not_grow_with_pairs_and_details_link_every_figure(tmp_path):
    small, _ = _run(10, 40, tmp_path)
    large, rep = _run(3000, 30_000, tmp_path)
    size = {d: os.path.getsize(os.path.join(d, "report.html")) for d in (small, large)}
    assert abs(size[large] - size[small]) < 200, size  # only the counts' digits differ
    summary = open(os.path.join(large, "report.html")).read()
    for page in PAGES.values():
        assert f"href='{page}'" in summary and os.path.exists(os.path.join(large, page))
    pairs_page = open(os.path.join(large, PAGES["pairs"])).read()
    ok = [r for r in rep["pairs"] if r["status"] == "ok"]
    linked = set(re.findall(r"href='(figures/[^']+\.png)'", pairs_page))
    assert linked == {r["figure"] for r in ok} and len(linked) == 2000
    assert "<img" not in pairs_page  # figures are linked, never inlined in one huge page
    series_page = open(os.path.join(large, PAGES["series"])).read()
    assert series_page.count("<tr>") == 30_000 + 7 + 2  # every decision and exclusion, plus two header rows
    # the QA summary is over the ok pairs only (the failed ones are every third pair)
    ok_values = np.array([0.5 + i / 6000 for i in range(3000) if i % 3])
    row = re.search(r"<tr><td>brain_dice</td><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td></tr>", summary)
    assert row is not None
    np.testing.assert_allclose([float(x) for x in row.groups()],
                               [ok_values.min(), np.median(ok_values), ok_values.max()], atol=5e-4)
    back = json.load(open(os.path.join(large, "report.json")))
    assert len(back["pairs"]) == 3000 and len(back["series_decisions"]) == 30_000
