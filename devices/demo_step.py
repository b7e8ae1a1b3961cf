"""`chronorisk devices demo`: the demo's home-device stage, on a private broker.

Registers the generated devices (audited), starts a private Mosquitto (password auth,
persistence) and `chronorisk stream`, replays a few minutes of the demo GP's site's readings in
time order, waits for the consumer to store them all, exports the readings into the site's MEDS
data (the next batch run sees them) and says how many alerts the GP will find on the worklist.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
from sqlalchemy import func, select

from chronorisk.devices import registry
from chronorisk.devices.broker import PrivateBroker
from chronorisk.devices.config import StreamConfig
from chronorisk.devices.export import export_readings
from chronorisk.devices.replay import load_readings, publish_readings
from chronorisk.devices.tables import device_alerts, ensure_tables
from chronorisk.errors import ChronoriskError


def run_demo(args, ctx, store, audit, actor: str) -> int:
    folder = ctx.paths.root / "devices"
    if not (folder / "devices.parquet").is_file():
        raise ChronoriskError(f"no generated devices in {folder}: run `chronorisk generate --devices 0.1` first")
    ensure_tables(store)
    sites = store.sites()
    if not sites:
        raise ChronoriskError("no scores in the store: run `chronorisk score` first (alerts compare with them)")
    site = args.site or sites[0]  # the demo GP's site (serve --demo gives the first site's GP a key)
    devices = pl.read_parquet(folder / "devices.parquet")
    registry.register(store, devices.to_dicts(), audit, actor)
    readings = load_readings(folder / "readings.parquet").filter(pl.col("site") == site)
    readings = readings.head(int(args.rate * args.minutes * 60))
    print(f"{devices.height:,} devices registered; replaying {readings.height:,} readings of {site} at "
          f"{args.rate:g}/s", flush=True)
    with PrivateBroker(folder / "broker") as broker:
        os.environ.update(broker.env)
        cfg = StreamConfig(host="127.0.0.1", port=broker.port, username="chronorisk")
        consumer = _start_consumer(args, ctx, store, broker, folder / "stream.log")
        try:
            acked = publish_readings(cfg, readings, args.rate)
            code = consumer.wait(timeout=600)
        finally:
            if consumer.poll() is None:
                consumer.terminate()
                consumer.wait(30)
        print((folder / "stream.log").read_text(errors="replace").splitlines()[-1], flush=True)
    if code != 0 or acked != readings.height:
        raise ChronoriskError(f"the stream failed (exit {code}; {acked} of {readings.height} readings acknowledged); "
                              f"see {folder / 'stream.log'}")
    written = export_readings(store, args.meds or ctx.paths.meds)
    print("readings exported to MEDS for the next batch run: " + ", ".join(f"{s} {n:,}" for s, n in written.items()))
    with store.engine.connect() as conn:
        n_alerts = conn.execute(select(func.count()).select_from(device_alerts)
                                .where(device_alerts.c.site == site)).scalar() or 0
    if not n_alerts:
        raise ChronoriskError(f"no tier rose at {site} during the replay: replay more minutes (--minutes)")
    print(f"{n_alerts} alert(s) at {site}: its GP sees them on the worklist (/ui/worklist) as new", flush=True)
    return 0


def _start_consumer(args, ctx, store, broker, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "chronorisk.cli", "--work", str(ctx.paths.root)]
    if ctx.params_path is not None:
        cmd += ["--params", str(ctx.params_path)]
    cmd += ["stream", "--store", store.engine.url.render_as_string(hide_password=False), "--host", "127.0.0.1",
            "--port", str(broker.port), "--username", "chronorisk", "--metrics-port", "0", "--idle-exit", "5"]
    if args.meds is not None:
        cmd += ["--meds", str(args.meds)]
    if args.model_dir is not None:
        cmd += ["--model-dir", str(args.model_dir)]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **broker.env})
    deadline = time.monotonic() + 120
    while "connected (session present" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise ChronoriskError(f"the stream consumer did not start; see {log}")
        time.sleep(0.2)
    return proc
