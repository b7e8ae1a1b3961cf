"""`chronorisk summary`: a per-site overview of a MEDS root (counts only, no identifiers)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--meds", type=Path, default=None, help="MEDS root with sites/<site>/ (default: <work>/meds)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary as JSON here")


def site_summary(root: Path) -> list[dict]:
    """One row per site: subjects, events, span, share with diabetes / hypertension, lab coverage."""
    import polars as pl

    from chronorisk.data import codes
    from chronorisk.data.meds_io import scan_site, site_ids

    diabetes = [codes.DIAGNOSES["diabetes"].snomed, codes.DIAGNOSES["diabetes"].icd10]
    hypertension = [codes.DIAGNOSES["hypertension"].snomed, codes.DIAGNOSES["hypertension"].icd10]
    hba1c = codes.MEASUREMENTS["hba1c"].code
    rows = []
    for site in site_ids(root):
        stats = (
            scan_site(root, site)
            .select(
                pl.col("subject_id").n_unique().alias("subjects"),
                pl.len().alias("events"),
                pl.col("time").min().alias("first"),
                pl.col("time").max().alias("last"),
                pl.col("subject_id").filter(pl.col("code").is_in(diabetes)).n_unique().alias("diabetes"),
                pl.col("subject_id").filter(pl.col("code").is_in(hypertension)).n_unique().alias("hypertension"),
                pl.col("subject_id").filter(pl.col("code") == hba1c).n_unique().alias("with_hba1c"),
                pl.col("code").n_unique().alias("codes"),
            )
            .collect()
            .row(0, named=True)
        )
        n = max(stats["subjects"], 1)
        rows.append(
            {
                "site": site,
                "subjects": stats["subjects"],
                "events": stats["events"],
                "events_per_subject": round(stats["events"] / n, 1),
                "codes": stats["codes"],
                "first": str(stats["first"].date()) if stats["first"] else None,
                "last": str(stats["last"].date()) if stats["last"] else None,
                "diabetes_pct": round(100 * stats["diabetes"] / n, 1),
                "hypertension_pct": round(100 * stats["hypertension"] / n, 1),
                "hba1c_measured_pct": round(100 * stats["with_hba1c"] / n, 1),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no sites)"
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    line = "  ".join(c.ljust(widths[c]) for c in cols)
    body = ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join([line, "  ".join("-" * widths[c] for c in cols), *body])


def run(args: argparse.Namespace, ctx) -> int:
    import json

    from chronorisk.data.files import write_text_atomic
    from chronorisk.errors import InputError

    root = args.meds or ctx.paths.meds
    rows = site_summary(root)
    if not rows:
        raise InputError("--meds", f"no MEDS site datasets under {root} (expected sites/<site>/data/*.parquet)")
    print(format_table(rows))
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=2))
    return 0
