"""`chronorisk stream`: consume home-device readings from MQTT, store them once, re-score, alert."""

from __future__ import annotations

import argparse
from pathlib import Path

from chronorisk.devices.cli import add_broker_arguments, broker_config
from chronorisk.serving.cli_common import add_store_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_argument(parser)
    add_broker_arguments(parser)
    parser.add_argument("--sites", default=None, help="comma-separated sites to consume (default: every site)")
    parser.add_argument("--meds", type=Path, default=None, help="MEDS root of the patients' events (default: "
                                                                 "<work>/meds)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="exported models <dir>/<task>/ instead of the registry's champions")
    parser.add_argument("--metrics-port", type=int, default=None, help="/metrics port (default: stream.metrics_port;"
                                                                       " 0: none)")
    parser.add_argument("--client-id", default=None, help="MQTT client id, i.e. the persistent session (default: "
                                                          "stream.client_id; one per consumer)")
    parser.add_argument("--idle-exit", type=float, default=None, help="stop after this many seconds without a reading")
    parser.add_argument("--demo", action="store_true",
                        help="demo: accept a broker without authentication (anonymous clients allowed)")


def run(args, ctx) -> int:
    from chronorisk.devices.batch import StreamContext
    from chronorisk.devices.consumer import Consumer
    from chronorisk.devices.metrics import StreamMetrics
    from chronorisk.devices.mqtt import allows_anonymous, check_auth
    from chronorisk.devices.rescore import BaseEvents
    from chronorisk.devices.tables import ensure_tables
    from chronorisk.errors import ChronoriskError
    from chronorisk.serving import scoring
    from chronorisk.serving.access import is_demo
    from chronorisk.serving.cli_common import open_store

    cfg = broker_config(args, ctx)
    if args.metrics_port is not None:
        cfg = cfg.model_copy(update={"metrics_port": args.metrics_port})
    if args.client_id is not None:
        cfg = cfg.model_copy(update={"client_id": args.client_id})
    demo = is_demo(args.demo)
    if not demo:
        check_auth(cfg)
        if allows_anonymous(cfg):
            raise ChronoriskError(f"the MQTT broker {cfg.host}:{cfg.port} accepts anonymous clients, who could "
                                  "publish readings: require authentication there (or run with --demo)")
    serve = ctx.params.serve
    model_dir = args.model_dir or (Path(serve.model_dir) if serve.model_dir else None)
    models = scoring.load_models(serve.tasks, source="folder" if model_dir else serve.model_source,
                                 model_dir=model_dir, alias=serve.model_alias, required=True, work=ctx.paths.root,
                                 tracking_uri=ctx.params.train.tracking_uri)
    store = open_store(args, ctx)
    ensure_tables(store)
    from datetime import timedelta

    stream_ctx = StreamContext(store, models, BaseEvents(args.meds or ctx.paths.meds), cfg.topic_prefix,
                               timedelta(hours=cfg.alert_damping_hours), serve.explain_tiers,
                               ctx.params.model.top_k_factors)
    metrics = StreamMetrics()
    if cfg.metrics_port:
        metrics.serve(cfg.metrics_host, cfg.metrics_port)
    sites = [s.strip() for s in args.sites.split(",") if s.strip()] if args.sites else None
    print(f"consuming {cfg.topic_prefix}/{'+' if not sites else ','.join(sites)}/devices/+/observations from "
          f"{cfg.host}:{cfg.port}; models {', '.join(f'{m.task}:{m.version}' for m in models.values())}", flush=True)
    try:
        totals = Consumer(cfg, stream_ctx, metrics, sites=sites, idle_exit=args.idle_exit).run()
    finally:
        store.dispose()
    quarantined = sum(totals.quarantined.values())
    print(f"received {totals.received:,}, stored {totals.stored:,}, quarantined {quarantined:,}, redelivered "
          f"{totals.redelivered:,}; {totals.scored:,} scores, {len(totals.alerts):,} alerts", flush=True)
    return 0
