"""Simulation mode: the whole federation in one process, for development, tests and `compare`.

`LocalTransport` plays the SuperLink and the SuperNodes: each exchange
encodes the request into Flower records (`protocol.to_records`), decodes it
at the site, runs the same `site.handle` the ClientApp runs, and sends the
reply back through Flower records, site by site. It has the deployment
engine's failure modes on demand: `drop(site, phase, round)` makes a site
miss a reply (as a killed process would), `offline` removes a site from the
node list (as the SuperLink does once its heartbeat lapses).

`run_simulation` is `chronorisk federated sim`: every site under
`<work>/meds/sites/` becomes a simulated SuperNode with its cache under
`<work>/federated/nodes/<site>/cache` (the same folder a SuperNode of `up` uses).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from chronorisk.federated.protocol import Payload, from_records, record_bytes, to_records
from chronorisk.federated.runner import Exchange, encoded_requests
from chronorisk.federated.site import SiteContext, handle

if TYPE_CHECKING:
    from chronorisk.config import Params
    from chronorisk.paths import WorkPaths

log = logging.getLogger("chronorisk.federated.sim")

DropRule = Callable[[str, str, int], bool]
"""(site, phase, round) -> True when that site's reply is lost."""


class LocalTransport:
    """In-process SuperLink + SuperNodes over real Flower records (one site after another)."""

    def __init__(
        self,
        sites: list[SiteContext],
        *,
        drop: DropRule | None = None,
        first_node_id: int = 1001,
        handler: Callable[[str, Payload, SiteContext], Payload] = handle,
    ):
        self.sites = {first_node_id + i: s for i, s in enumerate(sorted(sites, key=lambda s: s.site))}
        self.drop = drop or (lambda _s, _p, _r: False)
        self.handler = handler
        self.offline: set[str] = set()

    def node_ids(self) -> list[int]:
        return [n for n, s in self.sites.items() if s.site not in self.offline]

    def exchange(
        self,
        kind: str,
        requests: dict[int, Payload],
        *,
        label: str,
        timeout_s: float,
        min_replies: int,
        straggler_wait_s: float,
    ) -> Exchange:
        result = Exchange()
        start = time.monotonic()
        round_index = int(label.rsplit("-", 1)[-1]) if "-" in label else 0
        for node, records in encoded_requests(requests, result).items():
            ctx = self.sites.get(node)
            if ctx is None or ctx.site in self.offline:
                result.failures[node] = "node left the federation"
                continue
            if self.drop(ctx.site, kind, round_index):
                result.failures[node] = f"no reply within {timeout_s:.0f} s"
                continue
            request = from_records(records)
            try:
                reply = self.handler(kind, request, ctx)
            except Exception as exc:  # the ClientApp would send an error reply
                result.failures[node] = f"error reply: {type(exc).__name__}: {exc}"[:300]
                continue
            reply_records = to_records(reply)
            back = from_records(reply_records)
            result.bytes_in += record_bytes(reply_records)
            result.replies[node] = back
        result.wall_s = time.monotonic() - start
        return result


def site_contexts(
    meds_root: Path, cache_root: Path, sites: list[str] | None = None, threads: int = 1,
    labels: Path | None = None,
) -> list[SiteContext]:
    """One context per site; `labels` (supplied labels, `--labels` semantics) is shared: each site keeps
    the rows of its own subjects (in a deployment each site's node config names its own)."""
    from chronorisk.data.meds_io import site_ids

    chosen = sites or site_ids(meds_root)
    return [SiteContext(site=s, meds_root=meds_root, cache_dir=cache_root / s / "cache", threads=threads,
                        labels=labels) for s in chosen]


def run_simulation(
    params: Params,
    paths: WorkPaths,
    *,
    meds_root: Path | None = None,
    sites: list[str] | None = None,
    strategy: str | None = None,
    rounds: int | None = None,
    tasks: list[str] | None = None,
    drop: DropRule | None = None,
    out_dir: Path | None = None,
    register: bool | None = None,
    labels: Path | None = None,
) -> dict:
    """Train in simulation; write bundles and result.json like a deployment run; log to MLflow."""
    from datetime import datetime

    from chronorisk.errors import ChronoriskError
    from chronorisk.federated.pipeline import finish, open_tracking, train_federated

    meds_root = meds_root or paths.meds
    contexts = site_contexts(meds_root, paths.federated / "nodes", sites, threads=params.federated.site_threads,
                             labels=labels)
    if not contexts:
        raise ChronoriskError(f"no MEDS site under {meds_root}/sites (run `chronorisk generate` first)")
    transport = LocalTransport(contexts, drop=drop)
    strategy = strategy or params.federated.strategy
    tracking = round_logger = None
    if params.federated.mlflow:
        tracking, round_logger = open_tracking(params, paths, list(tasks or params.labels.tasks), strategy,
                                               "simulation")
    try:
        result = train_federated(transport, params, tasks=tasks, strategy=strategy, rounds=rounds,
                                 on_round=round_logger)
    except Exception:
        if round_logger is not None:
            round_logger.fail()
        raise
    out = out_dir or paths.federated / "runs" / f"sim-{strategy}-{datetime.now():%Y%m%d-%H%M%S}"
    return finish(
        result, params, paths, out_dir=out, tracking=tracking, round_logger=round_logger,
        register=params.federated.register_model if register is None else register,
    )
