"""`chronorisk cohort`: query a cohort from the score store; export it or print suppressed counts.

An export (`--out cohort.csv|.parquet`) is written atomically with a
`<file>.meta.json` beside it holding the query, the score date and the model
versions, and is recorded in the audit log. Patients who withdrew consent
are never included.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from chronorisk.serving.cli_common import add_demo_argument, add_store_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True)
    parser.add_argument("--date", default=None, help="scores of this date (default: the latest)")
    parser.add_argument("--sites", default=None, help="comma-separated sites (default: all)")
    parser.add_argument("--tiers", default=None, help="comma-separated: low,medium,high")
    parser.add_argument("--min-risk", type=float, default=None, help="risk threshold, 0-1")
    parser.add_argument("--age-bands", default=None, help="comma-separated, e.g. 60-69,70-79")
    parser.add_argument("--sex", default=None, choices=["F", "M"])
    parser.add_argument("--conditions", default=None, help="comma-separated concept names, all required")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--out", type=Path, default=None, help="export file (.csv or .parquet)")
    out.add_argument("--aggregate", action="store_true", help="print counts (small cells suppressed)")
    parser.add_argument("--group-by", default="site,tier", help="aggregate dimensions: site,tier,age_band,sex")
    add_store_argument(parser)
    add_demo_argument(parser)


def run(args, ctx) -> int:
    import json

    from pydantic import ValidationError

    from chronorisk.data.files import atomic_output, write_text_atomic
    from chronorisk.errors import InputError
    from chronorisk.serving import cohort
    from chronorisk.serving.cli_common import audit_log, cli_actor, open_store
    from chronorisk.serving.privacy import PrivacyBudget
    from chronorisk.serving.schemas import AggregateQuery, CohortQuery, field_path

    raw = {
        "task": args.task, "prediction_time": args.date, "sites": _split(args.sites), "tiers": _split(args.tiers),
        "min_risk": args.min_risk, "age_bands": _split(args.age_bands), "sex": args.sex,
        "conditions": _split(args.conditions),
    }
    raw = {k: v for k, v in raw.items() if v is not None}
    try:
        if args.aggregate:
            query = AggregateQuery.model_validate({**raw, "group_by": _split(args.group_by)})
        else:
            query = CohortQuery.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InputError(f"--{field_path(err['loc']).replace('_', '-')}", str(err["msg"])) from None
    fmt = None
    if args.out is not None:
        fmt = {".csv": "csv", ".parquet": "parquet"}.get(args.out.suffix.lower())
        if fmt is None:
            raise InputError("--out", "the export file must end in .csv or .parquet")
    store = open_store(args, ctx)
    try:
        audit = audit_log(args, ctx, store)
        if args.aggregate:
            cfg = ctx.params.serve
            result = cohort.aggregate(store, query, small_cell=cfg.small_cell, analyst=cli_actor(),
                                      budget=PrivacyBudget(cfg.dp_epsilon, cfg.dp_budget, cfg.dp_budget_days))
            audit.append(actor=cli_actor(), role="admin", action="cohort_aggregate",
                         detail={"query": result["query"], "via": "cli", "epsilon": cfg.dp_epsilon})
            for cell in result["cells"]:
                group = "  ".join(f"{k}={v}" for k, v in cell["group"].items())
                shown = f"<{result['small_cell']}" if cell["suppressed"] else str(cell["count"])
                print(f"{group:<50} {shown:>8}")
            total = result["total"]
            privacy = result["privacy"]
            print(f"total {total}; models {', '.join(result['model_versions']) or 'none'}")
            print(f"differentially private: epsilon {privacy['epsilon']:g}, noise scale {privacy['noise_scale']:g}, "
                  f"budget left {privacy['budget_left']:g} of {privacy['budget']:g} ({privacy['budget_days']} days)")
            return 0
        cfg = ctx.params.serve
        result = cohort.cohort(store, query, k=cfg.k_anonymity, max_suppressed_share=cfg.export_max_suppressed_share,
                               limit=None if args.out else 20)
        deid = result.deidentification
        print(f"de-identified: k={deid['k']}, generalized: {', '.join(deid['generalized']) or 'nothing'}, "
              f"rows suppressed: {deid['suppressed_rows']}")
        if args.out is None:
            for r in result.rows:
                print(f"{r['record_id']:>16} {r['site']:<16} {r['risk']:.2f} {r['tier']:<6} "
                      f"{r['age_band'] or '-':<6} {r['sex'] or '-'}")
            print(f"{result.n} patients (showing {len(result.rows)}); use --out FILE to export")
            return 0
        data = cohort.export_bytes(result, fmt)
        meta = cohort.export_metadata(result)
        seq = audit.append(actor=cli_actor(), role="admin", action="export",
                           detail={"format": fmt, "via": "cli", "file": args.out.name, **meta})
        with atomic_output(args.out) as tmp:
            tmp.write_bytes(data)
        write_text_atomic(args.out.with_name(args.out.name + ".meta.json"),
                          json.dumps({**meta, "audit_entry": seq}, indent=1))
        print(f"exported {result.n} patients to {args.out} (+ .meta.json); "
              f"models {', '.join(result.model_versions) or 'none'}")
        return 0
    finally:
        store.dispose()


def _split(text: str | None) -> list[str] | None:
    if not text:
        return None
    return [p.strip() for p in text.split(",") if p.strip()]
