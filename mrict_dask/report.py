"""The run report: report.json (machine-readable) and report.html (for people), beside the store.

Only pseudonyms, pair ids, counts, reasons, timings and QA numbers go in: no source identifiers or dates.
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter
from typing import Any

from .io import Location
from .stacks import series_label
from .store import pair_state
from .types import QA_KEYS

REPORT_SUFFIX = "-report"


def default_report_url(output_url: str) -> str:
    """Where the report of a store goes: beside it, ``<store>-report``."""
    return output_url.rstrip("/") + REPORT_SUFFIX


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def build_report(plan: Any, pairs: list, markers: dict[int, dict], summary: Any, config: Any,
                 template: Any) -> dict[str, Any]:
    rows = []
    for p in pairs:
        m = markers.get(p.index, {})
        status = pair_state(m) if m else "missing"
        rows.append({
            "index": p.index,
            "pair_id": p.pair_id,
            "patient": p.patient,
            "split": p.split,
            "days_apart": p.days_apart if status != "withdrawn" else None,
            "status": status,
            "qa": {k: _num((m.get("qa") or {}).get(k)) for k in QA_KEYS},
            "timings": {k: round(float(v), 3) for k, v in (m.get("timings") or {}).items()},
            "figure": f"figures/{p.pair_id}.png" if m.get("figure") and status != "withdrawn" else None,
        })
    exclusions = [{"patient": e.get("patient"), "reason": e.get("reason")} for e in plan.exclusions]
    # no SeriesDescription: free text a site typed in (names, record numbers, dates) stays in the private plan
    series = [{**{k: s.get(k) for k in ("patient", "session", "modality", "decision", "rank", "reason", "evidence",
                                        "volumes")},
               "series": series_label(s.get("series_number"))}
              for s in getattr(plan, "series", [])]
    file_errors = Counter(str(f.get("reason", f.get("read_error", ""))).split(":")[0]
                          for f in getattr(plan, "files_with_errors", []))
    return {
        "counts": {
            "pairs_planned": summary.n_pairs,
            "pairs_ok": summary.ok,
            "pairs_failed": sum(summary.failed.values()),
            "pairs_computed_this_run": summary.processed,
            "pairs_already_complete": summary.skipped,
            **{f"pairs_{k}": len(getattr(summary, k, []) or []) for k in ("added", "changed", "retired", "absent")},
            "pairs_withdrawn": sum(r["status"] == "withdrawn" for r in rows),
            "patients_excluded": len(exclusions),
            "files_with_errors": sum(file_errors.values()),
        },
        "failures_by_reason": summary.failed,
        "exclusions_by_reason": summary.exclusions,
        "file_errors_by_reason": dict(file_errors),
        "stage_seconds": {k: round(v, 2) for k, v in summary.stage_seconds.items()},
        "exclusions": exclusions,
        "series_decisions": series,
        "pairs": rows,
        "template": {"name": template.name, "sha256": template.sha256, "grid": template.grid},
        "config": config.to_dict(),
    }


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    return "" if v is None else (f"{v:.3f}" if isinstance(v, float) else html.escape(str(v)))


_STYLE = ("<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
          "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#eee}"
          ".fail{color:#b00}img{max-width:900px;display:block;margin:.5em 0 2em}</style>")
PAGES = {"pairs": "pairs.html", "series": "series.html"}
"""The detail pages beside report.html (the summary): one row per pair (QA, status, figure link), and every
series decision and patient exclusion."""


def _page(title: str, body: list[str]) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{_STYLE}"
            f"</head><body><h1>{html.escape(title)}</h1>" + "".join(body) + "</body></html>")


def _qa_summary(pairs: list[dict]) -> list[list[Any]]:
    """min / median / max of each QA metric over the ok pairs."""
    import numpy as np

    rows = []
    for k in QA_KEYS:
        v = np.array([r["qa"][k] for r in pairs if r["status"] == "ok" and r["qa"][k] is not None], float)
        rows.append([html.escape(k), *(_fmt(float(f(v))) if v.size else "" for f in (np.min, np.median, np.max))])
    return rows


def _session_order(s: dict) -> tuple:
    """Patient, then session, then candidates by rank (chosen first), the rest after them."""
    rank = s.get("rank")
    return (str(s.get("patient")), str(s.get("session") or "~"), rank is None, rank or 0, str(s.get("series")))


def render_html(rep: dict[str, Any]) -> dict[str, str]:
    """The report's pages: ``report.html`` (a summary that stays small at any number of pairs) and the detail
    pages of :data:`PAGES`, by file name."""
    e = html.escape
    links = " | ".join(f"<a href='{name}'>{e(what)}</a>" for what, name in
                       (("every pair: QA, status, overlay figure", PAGES["pairs"]),
                        ("every series decision and excluded patient", PAGES["series"])))
    summary = [f"<p>{links}</p>",
               "<h2>Counts</h2>" + _table(["what", "n"], [[e(k), v] for k, v in rep["counts"].items()]),
               "<h2>Time by stage (s)</h2>" + _table(["stage", "seconds"],
                                                       [[e(k), v] for k, v in rep["stage_seconds"].items()])]
    for title, key in (("Failed pairs by reason", "failures_by_reason"),
                       ("Patients without a pair, by reason", "exclusions_by_reason"),
                       ("Files not usable, by reason", "file_errors_by_reason")):
        if rep[key]:
            summary.append(f"<h2>{title}</h2>" + _table(["reason", "n"], [[e(k), v] for k, v in rep[key].items()]))
    summary.append("<h2>QA metrics over the ok pairs</h2>" + _table(["metric", "min", "median", "max"],
                                                                    _qa_summary(rep["pairs"])))
    t = rep["template"]
    summary.append(f"<h2>Template</h2><p>{e(t['name'])} (sha256 {e(t['sha256'])}), grid size {t['grid']['size']}, "
                   f"spacing {t['grid']['spacing']}</p>")
    summary.append("<h2>Configuration</h2><pre>" + e(json.dumps(rep["config"], indent=2)) + "</pre>")

    qa_rows = []
    for r in rep["pairs"]:
        cls = "" if r["status"] == "ok" else " class='fail'"
        figure = f"<a href='{e(r['figure'])}'>overlay</a>" if r["figure"] else ""
        qa_rows.append([r["index"], e(r["pair_id"]), e(r["split"]), r["days_apart"],
                        f"<span{cls}>{e(r['status'])}</span>"] + [_fmt(r["qa"][k]) for k in QA_KEYS]
                       + [_fmt(r["timings"].get("total")), figure])
    pairs = ["<p><a href='report.html'>summary</a>; figures: CT edges on MR in template space</p>",
             _table(["#", "pair", "split", "days apart", "status", *QA_KEYS, "seconds", "figure"], qa_rows)]

    series = ["<p><a href='report.html'>summary</a></p>"]
    if rep["exclusions"]:
        series.append("<h2>Patients without a pair</h2>" + _table(
            ["patient", "reason"], [[e(str(x["patient"])), e(str(x["reason"]))] for x in rep["exclusions"]]))
    if rep["series_decisions"]:
        series.append("<h2>Series decisions, by patient and imaging session</h2><p>Candidates of a session are "
                      "ranked on the evidence shown (most important first); rank 1 is chosen unless the patient "
                      "has no pair.</p>")
        series.append(_table(["patient", "session", "modality", "series", "volumes", "decision", "rank", "reason"],
                             [[_fmt(s.get(k)) for k in ("patient", "session", "modality", "series", "volumes",
                                                        "decision", "rank", "reason")]
                              for s in sorted(rep["series_decisions"], key=_session_order)]))
    return {"report.html": _page("mrict-dask run report", summary),
            PAGES["pairs"]: _page("mrict-dask run report: pairs", pairs),
            PAGES["series"]: _page("mrict-dask run report: series and exclusions", series)}


def write_report(report_url: str | Location, plan: Any, pairs: list, markers: dict[int, dict], summary: Any,
                 config: Any, template: Any, storage_options: dict | None = None) -> dict[str, Any]:
    rep = build_report(plan, pairs, markers, summary, config, template)
    _write(Location.of(report_url, storage_options), rep)
    return rep


def _write(where: Location, rep: dict[str, Any]) -> None:
    where.join("report.json").write_json(rep, indent=1)
    for name, page in render_html(rep).items():
        where.join(name).write_text(page)


def forget_in_report(where: Location, patients: list[str], pair_ids: list[str]) -> bool:
    """The report after a withdrawal: the patients' pairs stay as rows with status ``withdrawn`` and nothing else
    (no QA, timings, days or figure), their figures are deleted, their series decisions and exclusions go, and
    they are listed as withdrawn. False when there is no report yet."""
    for pid in pair_ids:
        where.join("figures", f"{pid}.png").remove()
    loc = where.join("report.json")
    if not loc.exists():
        return False
    rep = loc.read_json()
    gone, who = set(pair_ids), set(patients)
    for r in rep.get("pairs", []):
        if r["pair_id"] in gone or r["patient"] in who:
            r.update(status="withdrawn", qa=dict.fromkeys(QA_KEYS), timings={}, days_apart=None, figure=None)
    rep["series_decisions"] = [s for s in rep.get("series_decisions", []) if s.get("patient") not in who]
    rep["exclusions"] = [e for e in rep.get("exclusions", []) if e.get("patient") not in who]
    rep["exclusions"] += [{"patient": p, "reason": "withdrawn: the patient withdrew; no pair is made"}
                          for p in sorted(who)]
    rows = rep.get("pairs", [])
    counts = rep.setdefault("counts", {})
    counts.update(pairs_ok=sum(r["status"] == "ok" for r in rows),
                  pairs_failed=sum(str(r["status"]).startswith("failed") for r in rows),
                  pairs_withdrawn=sum(r["status"] == "withdrawn" for r in rows),
                  patients_excluded=len(rep["exclusions"]))
    reasons = Counter(str(e.get("reason", "")).split(":")[0] for e in rep["exclusions"])
    rep["exclusions_by_reason"] = dict(reasons)
    _write(where, rep)
    return True
