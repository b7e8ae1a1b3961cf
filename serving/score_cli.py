"""`chronorisk score --date YYYY-MM-DD`: every eligible patient of every site into the score store.

Idempotent (rows are replaced by key) and resumable (a shard already scored
at that date by the same model version is skipped). Explanations are stored
for the tiers in `serve.explain_tiers` (medium and high by default). With
the service secret (or `--demo`) every chunk's rows are recorded in the audit
log, so that `chronorisk audit verify` finds score rows edited later.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from chronorisk.serving.cli_common import add_demo_argument, add_store_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--date", required=True, help="prediction date, YYYY-MM-DD (scores use events before it)")
    add_store_argument(parser)
    parser.add_argument("--meds", type=Path, default=None, help="MEDS root with sites/<site>/ (default: <work>/meds)")
    parser.add_argument("--sites", default=None, help="comma-separated sites (default: every site)")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks (default: serve.tasks)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="exported models <dir>/<task>/ instead of the registry's champions")
    parser.add_argument("--no-explain", action="store_true", help="store no factors (computed on demand later)")
    parser.add_argument("--max-shards", type=int, default=None, help=argparse.SUPPRESS)
    add_demo_argument(parser)


def run(args, ctx) -> int:
    from datetime import datetime

    from chronorisk.errors import InputError
    from chronorisk.serving import scoring
    from chronorisk.serving.cli_common import audit_if_possible, open_store
    from chronorisk.serving.state import monitoring_sink

    try:
        when = datetime.strptime(args.date, "%Y-%m-%d")
    except ValueError:
        raise InputError("--date", f"{args.date!r} is not a date YYYY-MM-DD") from None
    if when > datetime.now():
        raise InputError("--date", "is in the future: scores use the events recorded before the date")
    cfg = ctx.params.serve
    tasks = _split(args.tasks) or list(cfg.tasks)
    unknown = [t for t in tasks if t not in cfg.tasks]
    if unknown:
        raise InputError("--tasks", f"unknown task {unknown[0]!r}; served: {', '.join(cfg.tasks)}")
    model_dir = args.model_dir or (Path(cfg.model_dir) if cfg.model_dir else None)
    models = scoring.load_models(
        tasks, source="folder" if model_dir else cfg.model_source, model_dir=model_dir,
        alias=cfg.model_alias, required=True, work=ctx.paths.root, tracking_uri=ctx.params.train.tracking_uri,
    )
    meds = args.meds or ctx.paths.meds
    store = open_store(args, ctx)
    store.audit = audit_if_possible(args, ctx, store)  # each chunk's rows are recorded (audit verify)
    try:
        report = scoring.batch_score(
            store, models, meds, when, sites=_split(args.sites),
            explain_tiers=[] if args.no_explain else cfg.explain_tiers,
            top_k=ctx.params.model.top_k_factors,
            monitor=monitoring_sink(ctx.paths.root),
            max_shards=args.max_shards,
        )
    finally:
        store.dispose()
    for site, s in report.sites.items():
        print(f"{site:<16} scored {s['scored']:>9,}  explained {s['explained']:>8,}  "
              f"shards {s['chunks']} new, {s['skipped']} already done")
    total = report.total()
    rate = total / report.seconds if report.seconds > 0 else 0.0
    versions = ", ".join(f"{m.task}={m.name}:{m.version}" for m in models.values())
    print(f"scored {total:,} (patient, task) rows at {when:%Y-%m-%d} in {report.seconds:.1f} s "
          f"({rate:,.0f}/s); models {versions}; store {store.info().url_safe}")
    return 0


def _split(text: str | None) -> list[str] | None:
    if not text:
        return None
    return [p.strip() for p in text.split(",") if p.strip()]
