"""`chronorisk devices`: the device registry (admin, audited), replaying generated readings, export to MEDS.

Registry changes are admin operations like `chronorisk access`: run on the server by its
operator, each written to the audit log with the operating-system user as the actor.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from chronorisk.serving.cli_common import add_demo_argument, add_store_argument


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="MQTT broker host (default: stream.host)")
    parser.add_argument("--port", type=int, default=None, help="MQTT broker port (default: stream.port)")
    parser.add_argument("--username", default=None, help="MQTT user (default: stream.username; password from "
                                                         "stream.password_env)")


def broker_config(args, ctx):
    values = ctx.params.stream.model_dump()
    for key in ("host", "port", "username"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    from chronorisk.devices.config import StreamConfig

    return StreamConfig.model_validate(values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_store_argument(parser)
    add_demo_argument(parser)
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    reg = sub.add_parser("register", help="bind a device to a pseudonymous patient at a site (admin)")
    reg.add_argument("--device", default=None, help="device id")
    reg.add_argument("--subject", type=int, default=None, help="pseudonymous subject id")
    reg.add_argument("--site", default=None, help="the patient's site")
    reg.add_argument("--kind", default=None, help="bp, glucose, weight or multi")
    reg.add_argument("--file", type=Path, default=None,
                     help="register many: a parquet or CSV with device_id, site, subject_id[, kind] "
                          "(what `chronorisk generate --devices` writes)")
    lst = sub.add_parser("list", help="list registered devices")
    lst.add_argument("--site", default=None)
    rev = sub.add_parser("revoke", help="revoke a device: its later readings are quarantined (admin)")
    rev.add_argument("device")
    rep = sub.add_parser("replay", help="publish generated readings to the broker in time order")
    rep.add_argument("--rate", type=float, required=True, help="readings per second")
    rep.add_argument("--readings", type=Path, default=None, help="default: <work>/devices/readings.parquet")
    rep.add_argument("--limit", type=int, default=None, help="publish only the first N readings")
    add_broker_arguments(rep)
    demo = sub.add_parser("demo", help="demo: replay a few minutes of readings through a private broker and the "
                                       "stream")
    demo.add_argument("--minutes", type=float, default=3.0, help="minutes of replay (default 3)")
    demo.add_argument("--rate", type=float, default=100.0, help="readings per second (default 100)")
    demo.add_argument("--site", default=None, help="the site to replay (default: the demo GP's, the first scored)")
    demo.add_argument("--meds", type=Path, default=None, help="MEDS root (default: <work>/meds)")
    demo.add_argument("--model-dir", type=Path, default=None, help="exported models instead of the champions")
    exp = sub.add_parser("export", help="write stored readings into each site's MEDS data (next batch run)")
    exp.add_argument("--meds", type=Path, default=None, help="MEDS root (default: <work>/meds)")


def run(args, ctx) -> int:
    if args.action == "replay":
        return _replay(args, ctx)
    from chronorisk.devices import registry
    from chronorisk.devices.tables import ensure_tables
    from chronorisk.errors import InputError
    from chronorisk.serving.cli_common import audit_log, cli_actor, open_store

    store = open_store(args, ctx)
    try:
        ensure_tables(store)
        if args.action == "register":
            rows = _registrations(args)
            n = registry.register(store, rows, audit_log(args, ctx, store), cli_actor())
            print(f"registered {n} device(s)")
        elif args.action == "revoke":
            if not registry.revoke(store, args.device, audit_log(args, ctx, store), cli_actor()):
                raise InputError("device", "no active device with that id")
            print(f"revoked {args.device}")
        elif args.action == "list":
            for r in registry.list_devices(store, args.site):
                state = f"revoked {r.revoked_at:%Y-%m-%d}" if r.revoked_at else "active"
                print(f"{r.device_id:<24} {r.site:<16} {r.subject_id:>20} {r.kind or '-':<8} {state}")
        elif args.action == "demo":
            from chronorisk.devices.demo_step import run_demo

            return run_demo(args, ctx, store, audit_log(args, ctx, store), cli_actor())
        elif args.action == "export":
            from chronorisk.devices.export import export_readings

            written = export_readings(store, args.meds or ctx.paths.meds)
            for site, n in written.items():
                print(f"{site:<16} {n:>9,} reading events")
    finally:
        store.dispose()
    return 0


def _registrations(args) -> list[dict]:
    from chronorisk.errors import InputError

    if args.file is not None:
        if any(v is not None for v in (args.device, args.subject, args.site)):
            raise InputError("--file", "give either --file or --device/--subject/--site")
        return _read_registrations(args.file)
    if args.device is None or args.subject is None or args.site is None:
        raise InputError("--device", "register needs --device, --subject and --site (or --file)")
    return [{"device_id": args.device, "subject_id": args.subject, "site": args.site, "kind": args.kind}]


def _read_registrations(path: Path) -> list[dict]:
    import polars as pl

    from chronorisk.errors import InputError

    if not path.is_file():
        raise InputError("--file", f"{path} does not exist")
    try:
        frame = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path)
    except Exception:
        raise InputError("--file", f"{path} is not a readable parquet or CSV file") from None
    missing = [c for c in ("device_id", "site", "subject_id") if c not in frame.columns]
    if missing:
        raise InputError("--file", f"missing column(s) {', '.join(missing)}; needed: device_id, site, subject_id")
    if "kind" not in frame.columns:
        frame = frame.with_columns(pl.lit(None, dtype=pl.String).alias("kind"))
    return frame.select("device_id", "site", "subject_id", "kind").to_dicts()


def _replay(args, ctx) -> int:
    from chronorisk.devices.replay import load_readings, publish_readings

    cfg = broker_config(args, ctx)
    readings = load_readings(args.readings or ctx.paths.root / "devices" / "readings.parquet", args.limit)
    print(f"publishing {readings.height:,} readings at {args.rate:g}/s to {cfg.host}:{cfg.port}", flush=True)
    acked = publish_readings(cfg, readings, args.rate)
    print(f"published {acked:,} readings (acknowledged by the broker)")
    return 0 if acked == readings.height else 1
