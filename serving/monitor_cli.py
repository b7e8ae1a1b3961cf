"""`chronorisk monitor`: drift and performance per site and window, against the training reference.

Reads the prediction log (`<work>/monitoring/log/`), adds delayed outcomes
given with `--outcomes` (MEDS label parquet: stored by one-way join key
only), compares every (site, window) with the served model's training
reference, and writes `<work>/monitoring/reports/<task>/<site>/<window>.{json,html}`,
`summary.json` and `metrics.prom`. Re-running is idempotent: windows whose
inputs did not change are left as they are.
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", action="append", default=None,
                        help="task to monitor (repeatable; default: every task with logged scores)")
    parser.add_argument("--window", choices=("week", "day"), default=None, help="window (default: monitor.window)")
    parser.add_argument("--start", default=None, help="first prediction date, YYYY-MM-DD (default: the log's first)")
    parser.add_argument("--end", default=None,
                        help="last prediction date, YYYY-MM-DD, inclusive (default: the log's last)")
    parser.add_argument("--as-of", default=None,
                        help="count only outcomes known by this date, YYYY-MM-DD (default: all stored outcomes)")
    parser.add_argument("--outcomes", type=Path, action="append", default=None,
                        help="MEDS label parquet file or folder of delayed outcomes to add first (repeatable)")
    parser.add_argument("--html", choices=("flagged", "all", "none"), default=None,
                        help="Evidently HTML for: windows not ok + latest per site (flagged), every window, none")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="exported models <dir>/<task>/ instead of the registry's champions")
    parser.add_argument("--features", type=Path, default=None,
                        help="feature tables <dir>/<task>/<site>.parquet of the reference (default: <work>/features)")
    parser.add_argument("--rebuild-reference", action="store_true", help="rebuild the cached training reference")
    parser.add_argument("--force", action="store_true", help="recompute every window, changed or not")
    parser.add_argument("--store", default=None, metavar="URL",
                        help="score store whose consent withdrawals are purged from the log first (default: "
                        "serve.store_url, else SQLite in the work folder when it exists)")


def run(args, ctx) -> int:
    from chronorisk.errors import InputError
    from chronorisk.serving import monitoring as M
    from chronorisk.serving.prediction_log import PredictionLog

    cfg = ctx.params.monitor
    start, end, as_of = _day(args.start, "--start"), _day(args.end, "--end"), _day(args.as_of, "--as-of")
    if start and end and end < start:
        raise InputError("--end", f"{args.end} is before --start {args.start}")
    end_exclusive = end + timedelta(days=1) if end else None
    plog = PredictionLog.for_work(ctx.paths.root)
    tasks = args.task or plog.tasks()
    if not tasks:
        raise InputError("--task", f"no logged scores under {plog.root / 'log'}: score first (chronorisk score)")
    _purge_withdrawn(args, ctx)
    monitoring_dir = ctx.paths.monitoring
    summary: dict = {}
    for task in tasks:
        model = _served_model(task, args, ctx)
        if args.outcomes:
            _add_outcomes(plog, task, args.outcomes, model)
        reference = M.load_or_build_reference(
            monitoring_dir, (args.features or ctx.paths.features) / task, model, cfg, task=task,
            rebuild=args.rebuild_reference,
        )
        opts = M.MonitorOptions(task=task, kind=args.window or cfg.window, start=start, end=end_exclusive,
                                as_of=as_of, html=args.html or cfg.html, force=args.force)
        section = M.run_monitor(plog, reference, monitoring_dir, cfg, opts)
        summary = M.write_summary(monitoring_dir, task, section)
        _print_section(task, section)
    M.write_metrics(monitoring_dir, summary)
    print(f"overall status: {summary.get('overall_status', 'ok')}; summary {monitoring_dir / 'summary.json'}")
    return 0


def _purge_withdrawn(args, ctx) -> None:
    """Rows of patients whose withdrawal is in effect leave the log before anything reads it (audited when
    the service secret is at hand)."""
    from chronorisk.errors import ChronoriskError
    from chronorisk.paths import WorkPaths
    from chronorisk.serving.cli_common import audit_log, cli_actor, open_store
    from chronorisk.serving.config import resolve_store_url
    from chronorisk.serving.consent_files import purge_monitoring

    url = resolve_store_url(ctx.params, ctx.paths.root, args.store)
    if url == WorkPaths(ctx.paths.root).store_url and not Path(url.removeprefix("sqlite:///")).is_file():
        return  # no store: no consent recorded
    store = open_store(args, ctx)
    try:
        try:
            audit = audit_log(args, ctx, store)
        except ChronoriskError:
            audit = None
        purged = purge_monitoring(store, ctx.paths.root, audit, actor=cli_actor(), role="admin")
    finally:
        store.dispose()
    if purged.rows:
        print(f"consent: {purged.rows} logged row(s) of withdrawn patients removed first"
              + ("" if audit else " (not audited: no service secret)"))


def _day(text: str | None, field: str):
    from datetime import datetime

    from chronorisk.errors import InputError

    if text is None:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise InputError(field, f"{text!r} is not a date YYYY-MM-DD") from None


def _served_model(task: str, args, ctx):
    """The model whose reference the windows are compared with: the served champion (or --model-dir)."""
    from chronorisk.serving import scoring

    cfg = ctx.params.serve
    model_dir = args.model_dir or (Path(cfg.model_dir) if cfg.model_dir else None)
    models = scoring.load_models([task], source="folder" if model_dir else cfg.model_source, model_dir=model_dir,
                                 alias=cfg.model_alias, required=True)
    return models[task]


def _add_outcomes(plog, task: str, sources: list[Path], model) -> None:
    """Store label rows by join key; an outcome counts from prediction_time + the task's horizon."""
    import polars as pl

    from chronorisk.errors import InputError

    horizon_days = getattr(getattr(model.bundle, "task", None), "horizon_days", None)
    horizon = timedelta(days=int(horizon_days)) if horizon_days else None
    files: list[Path] = []
    for src in sources:
        if src.is_dir():
            files += sorted(src.glob("*.parquet"))
        elif src.is_file():
            files.append(src)
        else:
            raise InputError("--outcomes", f"{src} is neither a parquet file nor a folder")
    if not files:
        raise InputError("--outcomes", "no parquet label files found")
    added = 0
    for path in files:
        try:
            labels = pl.read_parquet(path, columns=["subject_id", "prediction_time", "boolean_value"])
        except Exception:
            raise InputError("--outcomes", f"{path} is not MEDS label parquet "
                             "(subject_id, prediction_time, boolean_value)") from None
        if plog.append_outcomes(labels, task, horizon=horizon) is not None:
            added += labels.height
    print(f"{task}: {added:,} outcome labels stored by join key from {len(files)} file(s)")


def _print_section(task: str, section: dict) -> None:
    sites = section.get("sites", {})
    print(f"{task} ({section.get('window_kind')}ly windows): "
          + ", ".join(f"{n} {s}" for s, n in section.get("status_counts", {}).items()))
    for site, s in sorted(sites.items()):
        share = s.get("drift_share")
        share_text = f"drift share {share:.2f}" if share is not None else "not tested (too few rows)"
        est = s.get("estimated_performance") or {}
        if est.get("auroc") is not None:
            share_text += f", estimated AUROC {est['auroc']:.3f} without labels"
            if est.get("realized_auroc") is not None:
                share_text += f" (realized {est['realized_auroc']:.3f})"
        print(f"  {site:<16} {s['status']:<8} {s['window']:<10} rows {s['n_rows']:>7,}  {share_text}")
        impossible = s.get("impossible_values") or []
        if impossible:
            print("      impossible values dropped: " + "; ".join(
                f"{v['display']} {v['n_dropped']:,}/{v['n_values']:,} ({100 * v['share']:.1f}%"
                + (", alert" if v.get("flagged") else "") + ")" for v in impossible[:6]))
        if s["status"] != "ok" or not s.get("tested", True):
            for reason in s["reasons"][:3]:
                print(f"      - {reason}")
