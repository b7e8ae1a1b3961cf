"""`chronorisk serve`: run the BentoML risk service (API and pages) on 127.0.0.1.

Checks what the workers will need first (the service secret, the score
store), then replaces itself with `bentoml serve` of the service module, so
signals reach BentoML directly. In demo mode it creates one key per role,
once, in `<work>/secrets/demo-keys.json` (mode 0600) and prints that file's
path, never the keys (a server's output ends up in log collectors).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from chronorisk.serving.cli_common import add_demo_argument, add_store_argument

SERVICE = "chronorisk.serving.service:ChronoriskService"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="address to listen on (default: serve.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: serve.port)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: serve.workers)")
    add_store_argument(parser)
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="exported models <dir>/<task>/ instead of the registry's champions")
    parser.add_argument("--meds", type=Path, default=None,
                        help="MEDS root for explanations on demand (default: <work>/meds)")
    add_demo_argument(parser)


def service_environment(args, ctx) -> dict[str, str]:
    """The variables the service workers read (see serving/state.py)."""
    import json
    import os

    from chronorisk.serving.config import resolve_store_url

    cfg = ctx.params.serve
    env = dict(os.environ)
    env["CHRONORISK_WORK"] = str(ctx.paths.root)
    if ctx.params_path is not None:
        env["CHRONORISK_PARAMS"] = str(Path(ctx.params_path).resolve())
    env["CHRONORISK_STORE_URL"] = resolve_store_url(ctx.params, ctx.paths.root, args.store)
    model_dir = args.model_dir or (Path(cfg.model_dir) if cfg.model_dir else None)
    if model_dir is not None:
        env["CHRONORISK_MODEL_DIR"] = str(model_dir.resolve())
        env["CHRONORISK_MODEL_SOURCE"] = "folder"
    env["CHRONORISK_MEDS_ROOT"] = str((args.meds or ctx.paths.meds).resolve())
    if args.demo:
        env["CHRONORISK_DEMO"] = "1"
    workers = args.workers or cfg.workers
    env["BENTOML_CONFIG_OVERRIDES"] = json.dumps({"services": {"ChronoriskService": {"workers": int(workers)}}})
    # each worker's polars pool gets its share of the cores (a request's frames are small: a pool per
    # worker as wide as the machine only adds threads waking and spinning; 0.9 -> 0.75 ms of pool CPU a
    # CDS call at concurrency 8 on 2 cores, benchmarks/cds_bench.py); a value set by the caller wins
    env.setdefault("POLARS_MAX_THREADS", str(max(1, (os.cpu_count() or 1) // int(workers))))
    return env


def run(args, ctx) -> int:
    import os
    import sys

    from chronorisk.errors import InputError
    from chronorisk.serving.cli_common import audit_log, ensure_demo_keys, open_store, service_secret

    cfg = ctx.params.serve
    host = args.host or cfg.host
    port = args.port or cfg.port
    if not 1 <= port <= 65535:
        raise InputError("--port", "must be 1-65535")
    if args.workers is not None and not 1 <= args.workers <= 64:
        raise InputError("--workers", "must be 1-64")
    env = service_environment(args, ctx)
    os.environ["CHRONORISK_DEMO"] = env.get("CHRONORISK_DEMO", os.environ.get("CHRONORISK_DEMO", ""))
    service_secret(args, ctx)  # fail now, with one line, rather than in every worker
    store = open_store(args, ctx)
    try:
        url = f"http://{host}:{port}"
        print(f"chronorisk serving at {url}/ui/  (API: {url}/docs.json, store: {store.info().url_safe})")
        if args.demo:
            path = ensure_demo_keys(store, ctx.paths.secrets, store.sites(), audit_log(args, ctx, store))
            # the keys themselves never go to a log stream: read them from the file (0600, owner only)
            print(f"demo keys (one per role): {path}  (sign in at /ui/login, or 'Authorization: Bearer <key>')")
        if host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: listening on {host}, not loopback: put TLS and a firewall in front", file=sys.stderr)
    finally:
        store.dispose()
    sys.stdout.flush()
    argv = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port)]
    os.execve(sys.executable, argv, env)
    return 0  # not reached
