"""The ingestion report: counts only (`<out>/ingest_report.json` and a printed table).

For every resource type: read = converted + quarantined + skipped + duplicate,
where skipped means "not a type ingestion converts" (Procedure, Immunization,
Claim, ...: counted, never dropped silently) and duplicate a second copy of a
resource (same type and id) of one patient, not written again. Quarantined
records are further counted by category (`unit_not_convertible`, `bad_date`,
...), and components left out of a resource that was converted (one bad
component of a BP panel) by category under `quarantined_components`. Files
that could not be read at all are counted by problem, empty bundles apart.
The same counts per site. The report never holds a patient identifier, a
file name or a value from a record: those stay in the quarantine file, whose
path it gives (file names of empty bundles included).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson

from chronorisk.data.fhir.convert import CORE_TYPES

REPORT_FILE = "ingest_report.json"
OUTCOMES = ("converted", "quarantined", "skipped", "duplicate")


def _by_type(outcomes: dict[tuple[str, str], int]) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for (rtype, outcome), n in outcomes.items():
        table.setdefault(rtype, dict.fromkeys(OUTCOMES, 0))[outcome] += n
    for row in table.values():
        row["read"] = sum(row[o] for o in OUTCOMES)
    order = {t: i for i, t in enumerate(CORE_TYPES)}
    return {
        t: {"read": table[t]["read"], **{o: table[t][o] for o in OUTCOMES}}
        for t in sorted(table, key=lambda t: (order.get(t, len(order)), -table[t]["read"], t))
    }


def build_report(*, run_id: str, started_at: datetime, seconds: float, convert_seconds: float,
                 input_path: Path, out: Path, quarantine_file: Path, key_source: str, site: str | None,
                 workers: int, n_sources: int, ignored: int, merged: dict, sites: dict, per_site: dict,
                 quarantined_lines: int, parent_peak_rss_mb: float, pool: str = "in-process") -> dict:
    resources = _by_type(merged["outcomes"])
    totals = {k: sum(row[k] for row in resources.values()) for k in ("read", *OUTCOMES)}
    categories: dict[str, dict[str, int]] = {}
    for (rtype, category), n in sorted(merged["categories"].items()):
        categories.setdefault(rtype, {})[category] = n
    components: dict[str, dict[str, int]] = {}
    for (rtype, category), n in sorted(merged["part_categories"].items()):
        components.setdefault(rtype, {})[category] = n
    site_rows = {}
    for site_id in sorted(set(sites) | set(per_site)):
        per_type = per_site.get(site_id, {})
        site_rows[site_id] = {
            **sites.get(site_id, {"subjects": 0, "events": 0, "shards": 0}),
            "resources": _by_type({(t, o): n for t, row in per_type.items() for o, n in row.items()}),
        }
    mb = merged["bytes_in"] / 1e6
    return {
        "run_id": run_id,
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "input": str(input_path),
        "out": str(out),
        "quarantine_file": str(quarantine_file),
        "pseudonym_key_source": key_source,
        "site_rule": f"--site {site}" if site else "serviceProvider organization of most encounters",
        "files": {
            "read": merged["files"],
            "inputs": n_sources,
            "ignored_other_files": ignored,
            "megabytes": round(mb, 3),
            "unreadable": dict(sorted(merged["file_problems"].items())),
            "empty_bundles": merged["empty_bundles"],
        },
        "ndjson_line_problems": dict(sorted(merged["line_problems"].items())),
        "resources": resources,
        "totals": totals,
        "quarantine_categories": categories,
        "quarantined_components": components,
        "duplicates": {t: r["duplicate"] for t, r in resources.items() if r["duplicate"]},
        "quarantine_lines": quarantined_lines,
        "notes": dict(sorted(merged["notes"].items())),
        "organizations": {"read": merged["organizations"], "reference_keys": len(merged["orgs"])},
        "events_written": sum(s["events"] for s in sites.values()),
        "sites": site_rows,
        "throughput": {
            "workers": workers,
            "pool": pool,
            "seconds": round(seconds, 3),
            "convert_seconds": round(convert_seconds, 3),
            "resources_per_s": round(totals["read"] / seconds, 1) if seconds > 0 else None,
            "mb_per_s": round(mb / seconds, 2) if seconds > 0 else None,
        },
        "memory": {
            "worker_peak_rss_mb": round(merged["worker_peak_rss_mb"], 1),
            "parent_peak_rss_mb": round(parent_peak_rss_mb, 1),
        },
    }


def report_json(report: dict) -> str:
    return orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n"


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    return [fmt(cells[0]), "  ".join("-" * w for w in widths), *(fmt(r) for r in cells[1:])]


def format_report(report: dict) -> str:
    """The printed summary: per resource type, per site, file problems, where the quarantine is."""
    lines = [f"ingest run {report['run_id']}: {report['files']['read']} file(s), "
             f"{report['files']['megabytes']:.1f} MB in {report['throughput']['seconds']:.1f} s "
             f"({report['throughput']['resources_per_s'] or 0:,.0f} resources/s, "
             f"{report['throughput']['mb_per_s'] or 0:.1f} MB/s)", ""]
    res_rows = [[t, *(r[k] for k in ("read", *OUTCOMES))] for t, r in report["resources"].items()]
    tot = report["totals"]
    res_rows.append(["total", *(tot[k] for k in ("read", *OUTCOMES))])
    lines += _table(["resource type", "read", *OUTCOMES], res_rows)
    lines.append("")
    site_rows = []
    for site_id, s in report["sites"].items():
        r = s["resources"]
        site_rows.append([site_id, s["subjects"], s["events"],
                          *(sum(v[k] for v in r.values()) for k in ("read", *OUTCOMES))])
    lines += _table(["site", "subjects", "events", "read", *OUTCOMES], site_rows)
    unreadable = report["files"]["unreadable"]
    if unreadable:
        lines += ["", "files that could not be read: " + ", ".join(f"{k} {v}" for k, v in unreadable.items())]
    if report["files"]["empty_bundles"]:
        lines += [f"empty bundles (no entries): {report['files']['empty_bundles']}, named in the quarantine"]
    if report["duplicates"]:
        lines += ["duplicates kept once (same type and id, one patient): "
                  + ", ".join(f"{k} {v}" for k, v in report["duplicates"].items())]
    if report["notes"]:  # kept, or left out by design (gender other), but not silently
        lines += ["converted with a note: " + "; ".join(f"{k}: {v}" for k, v in report["notes"].items())]
    if report["ndjson_line_problems"]:
        lines += ["NDJSON lines that could not be read: "
                  + ", ".join(f"{k} {v}" for k, v in report["ndjson_line_problems"].items())]
    if report["quarantine_lines"]:
        cats: dict[str, int] = {}
        for per_type in report["quarantine_categories"].values():
            for k, v in per_type.items():
                cats[k] = cats.get(k, 0) + v
        if cats:
            lines += ["quarantined records by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(cats.items()))]
        parts: dict[str, int] = {}
        for per_type in report["quarantined_components"].values():
            for k, v in per_type.items():
                parts[k] = parts.get(k, 0) + v
        if parts:
            lines += ["components quarantined (the rest of their resource converted): "
                      + ", ".join(f"{k} {v}" for k, v in sorted(parts.items()))]
    lines += [f"quarantine ({report['quarantine_lines']} line(s), each naming the file and the problem): "
              f"{report['quarantine_file']}"]
    lines += [f"MEDS per site: {report['out']}/sites/<site>/  report: {report['out']}/{REPORT_FILE}"]
    return "\n".join(lines)
