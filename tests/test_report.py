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
    for i, m in markers.items():  # every ok pair has its figure, and so has a refused registration (i % 6 == 0)
        if m["status"] == "ok" or i % 6 == 0:
            m["figure"] = f"_pairs/{i}.png"
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
    shown = [r for r in rep["pairs"] if r["status"] == "ok" or r["index"] % 6 == 0]
    linked = set(re.findall(r"href='(figures/[^']+\.png)'", pairs_page))
    assert linked == {r["figure"] for r in shown} and len(linked) == 2000 + 500
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


def test_free_text_a_site_typed_into_descriptions_reaches_no_public_output(tmp_path):
    """Sites type names, record numbers and dates into SeriesDescription and ContrastBolusAgent. The private plan
    keeps them; the report (pages and JSON), the reasons it quotes, and the store's status never do."""
    from mrict_dask import store
    from mrict_dask.plan import make_plan
    from mrict_dask.types import PairResult
    from mrict_dask.volume import VolumeError, read_volume

    from .test_loader import pairs_for
    from .test_plan import KEY, catalog, series_rows, uid
    from .test_volume import write_series

    typed = ("DOE^JOHN", "MRN88412", "03.04.2019", "Dr Who")
    st = uid()
    cat = catalog(
        series_rows("A", st, "20200101", "MR", "AX T1 POST DOE^JOHN MRN88412", step=1.0, n=150, number=3,
                    contrast="10ml given 03.04.2019 by Dr Who"),
        series_rows("A", st, "20200101", "MR", "AX T2 DOE^JOHN", step=5.0, n=30, number=4, te=100, tr=4000),
        series_rows("A", st, "20200101", "MR", "scout DOE^JOHN", step=5.0, n=3, number=1),
        series_rows("B", uid(), "20200101", "MR", "DWI DOE^JOHN MRN88412", step=5.0, n=30, number=5),
        series_rows("A", uid(), "20200102", "CT", "HEAD DOE^JOHN", step=2.5, n=64, number=2),
    )
    plan = make_plan(cat, Config(), KEY)
    assert len(plan.pairs) == 1 and any("DOE^JOHN" in s["description"] for s in plan.series)  # private plan
    # a series that cannot be read: its reason goes to the store's status
    w = write_series(tmp_path / "s", n=4, desc="AX T1 DOE^JOHN MRN88412", number=9)
    with open(w.files[2], "r+b") as fh:
        fh.truncate(os.path.getsize(w.files[2]) - 50)
    try:
        read_volume(w.files)
        raise AssertionError("a cut file must be refused")
    except VolumeError as exc:
        reason = str(exc)
    url = str(tmp_path / "store.zarr")
    pairs = pairs_for(1)
    store.open_or_create_store(url, pairs, tiny_template(), Config())
    store.write_pair(url, 0, PairResult(pair_id=pairs[0].pair_id, status=f"failed: MR: {reason}"))
    store.finalize_store(url)
    summary = RunSummary(output_url=url, report_url=str(tmp_path / "report"), n_pairs=1, failed={"MR": 1})
    write_report(str(tmp_path / "report"), plan, pairs, store.completed_pairs(url), summary, Config(),
                 tiny_template())
    import xarray as xr

    public = [str(xr.open_zarr(url)["status"].values)]
    public += [open(os.path.join(tmp_path, "report", f)).read() for f in os.listdir(tmp_path / "report")
               if f.endswith((".html", ".json"))]
    assert "series #9" in public[0]
    for text in public:
        for word in typed:
            assert word not in text, (word, text[:300])
