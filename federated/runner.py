"""The server's round loop: summaries -> feature spec -> boosting rounds -> calibration.

The loop talks to the sites through a `Transport`: `FlowerTransport` wraps a
Flower `Grid` (deployment engine and Flower's simulation), `LocalTransport`
(simulation.py) calls the ClientApp's handlers in-process. Either way:

- node IDs are re-read before every exchange, so a restarted SuperNode (same
  key, same node ID) or a newly joined one takes part in the next round;
- every exchange has a deadline; once `min_sites` sites have answered, the
  others get as long again as that took (at least `straggler_wait_s`: a big
  site building its features in round 1 is slow, not gone); a node that
  drops out of the node list, answers with an error, or misses the deadline
  is logged by site name and left out of that round;
- fewer than `min_sites` answers stops the run with an error naming them.

Messages are pushed with `grid.push_messages` and collected with a short
`pull_messages` loop (`poll_interval_s`, default 0.2 s) instead of
`send_and_receive`, whose fixed 3 s poll would dominate a round.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from chronorisk.errors import ChronoriskError
from chronorisk.federated import strategies
from chronorisk.federated.calibration import (
    BinnedScores,
    binned_metrics,
    fit_from_tables,
    site_layer_from_tables,
    sum_binned,
)
from chronorisk.federated.protocol import EVALUATE, SUMMARY, TRAIN, Payload

if TYPE_CHECKING:
    from chronorisk.federated.config import FederatedConfig
    from chronorisk.models.calibration import Calibrator
    from chronorisk.models.site_calibration import SiteLayer

log = logging.getLogger("chronorisk.federated")


class FederatedError(ChronoriskError):
    """The federation could not complete a phase (too few sites answered, inconsistent replies)."""


# ---- transport -------------------------------------------------------------------------


@dataclass
class Exchange:
    """What came back from one exchange: replies and failures by node, and its cost."""

    replies: dict[int, Payload] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    wall_s: float = 0.0
    bytes_out: int = 0
    bytes_in: int = 0


def encoded_requests(requests: dict[int, Payload], result: Exchange) -> dict[int, Any]:
    """Each node's request as Flower records, adding their size to `result.bytes_out`.

    One request payload is often shared by every node (the global model): it is encoded once."""
    from chronorisk.federated.protocol import record_bytes, to_records

    by_payload: dict[int, Any] = {}
    out: dict[int, Any] = {}
    for node, payload in requests.items():
        if id(payload) not in by_payload:
            by_payload[id(payload)] = to_records(payload)
        out[node] = by_payload[id(payload)]
        result.bytes_out += record_bytes(out[node])
    return out


class Transport(Protocol):
    def node_ids(self) -> list[int]: ...

    def exchange(
        self,
        kind: str,
        requests: dict[int, Payload],
        *,
        label: str,
        timeout_s: float,
        min_replies: int,
        straggler_wait_s: float,
    ) -> Exchange: ...


_MESSAGE_TYPES = {SUMMARY: "query", TRAIN: "train", EVALUATE: "evaluate"}


class FlowerTransport:
    """Exchanges over a Flower Grid: push_messages, then a short pull loop with a deadline."""

    def __init__(self, grid: Any, poll_interval_s: float = 0.2, node_check_s: float = 2.0):
        self.grid = grid
        self.poll_interval_s = poll_interval_s
        self.node_check_s = node_check_s

    def node_ids(self) -> list[int]:
        return sorted(int(n) for n in self.grid.get_node_ids())

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
        from flwr.app import Message

        from chronorisk.federated.protocol import ProtocolError, from_records, record_bytes

        result = Exchange()
        start = time.monotonic()
        messages = []
        for node, records in encoded_requests(requests, result).items():
            messages.append(
                Message(
                    records,
                    dst_node_id=int(node),
                    message_type=_MESSAGE_TYPES[kind],
                    group_id=label,
                    ttl=timeout_s + 5.0,
                )
            )
        ids = list(self.grid.push_messages(messages))
        if len(ids) != len(messages):  # Flower returns [] when the request as a whole was refused
            log.warning("%s: the SuperLink accepted none of %d messages", label, len(messages))
            ids = [None] * len(messages)
        pending: dict[str, int] = {}
        for msg_id, node in zip(ids, requests, strict=True):
            if msg_id:
                pending[msg_id] = node
            else:
                result.failures[node] = "the SuperLink did not accept the message"
        deadline = start + timeout_s
        next_node_check = start + self.node_check_s
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                if reply.has_error():
                    result.failures[node] = f"error reply: {reply.error.reason}"[:300]
                    continue
                try:
                    payload = from_records(reply.content)
                except ProtocolError as exc:
                    result.failures[node] = f"unreadable reply: {exc}"
                    continue
                result.bytes_in += record_bytes(reply.content)
                result.replies[node] = payload
                if len(result.replies) == min_replies:
                    now = time.monotonic()
                    deadline = min(deadline, now + max(straggler_wait_s, now - start))
            now = time.monotonic()
            if pending and now >= next_node_check:
                listed = set(self.node_ids())
                for msg_id, node in list(pending.items()):
                    if node not in listed:
                        result.failures[node] = "node left the federation"
                        pending.pop(msg_id)
                next_node_check = now + self.node_check_s
            if pending:
                time.sleep(self.poll_interval_s)
        waited = time.monotonic() - start
        for node in pending.values():
            result.failures[node] = f"no reply within {waited:.0f} s"
        result.wall_s = waited
        return result


# ---- results ---------------------------------------------------------------------------


@dataclass
class RoundLog:
    """One exchange: who answered, how long it took and where the time went."""

    phase: str
    round: int
    wall_s: float
    bytes_out: int
    bytes_in: int
    sites: list[str]
    missing: dict[str, str]
    site_seconds: dict[str, float] = field(default_factory=dict)
    site_startup_seconds: dict[str, float] = field(default_factory=dict)
    site_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    site_cpu_seconds: dict[str, float] = field(default_factory=dict)
    site_startup_cpu_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def local_s(self) -> float:
        """Critical path of local work: the slowest site's handler time."""
        return max(self.site_seconds.values(), default=0.0)

    @property
    def overhead_s(self) -> float:
        """Everything else: Flower's delivery, ClientApp process start-up, polling, aggregation."""
        return max(self.wall_s - self.local_s, 0.0)

    def to_dict(self) -> dict:
        return {
            "phase": self.phase,
            "round": self.round,
            "wall_s": round(self.wall_s, 3),
            "local_s": round(self.local_s, 3),
            "overhead_s": round(self.overhead_s, 3),
            "bytes_out": self.bytes_out,
            "bytes_in": self.bytes_in,
            "sites": self.sites,
            "missing": self.missing,
            "site_seconds": {k: round(v, 3) for k, v in self.site_seconds.items()},
            "site_startup_seconds": {k: round(v, 3) for k, v in self.site_startup_seconds.items()},
            "site_cpu_seconds": {k: round(v, 3) for k, v in self.site_cpu_seconds.items()},
            "site_startup_cpu_seconds": {k: round(v, 3) for k, v in self.site_startup_cpu_seconds.items()},
            "site_metrics": self.site_metrics,
        }


@dataclass
class TaskResult:
    task: str
    spec_json: str
    model_text: str
    calibrator: Calibrator
    calibration_info: dict
    site_metrics: dict[str, dict[str, float]]
    overall: dict[str, float]
    site_sizes: dict[str, int]
    times: list[str] = field(default_factory=list)
    early_stopping: dict = field(default_factory=dict)
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    site_layer: SiteLayer | None = None  # each site's recalibration from its tuning bins (applied if configured)
    site_metrics_recalibrated: dict[str, dict[str, float]] = field(default_factory=dict)  # held out, with it

    @property
    def num_trees(self) -> int:
        return strategies.parse_model(self.model_text).num_trees


@dataclass
class FederatedResult:
    strategy: str
    tasks: dict[str, TaskResult]
    rounds: list[RoundLog]
    sites: list[str]
    events: list[str]
    wall_s: float

    def summary(self) -> dict:
        return {
            "strategy": self.strategy,
            "sites": self.sites,
            "wall_s": round(self.wall_s, 3),
            "events": self.events,
            "tasks": {
                name: {
                    "num_trees": r.num_trees,
                    "calibration": r.calibration_info,
                    "overall": r.overall,
                    "sites": r.site_metrics,
                    "site_sizes": r.site_sizes,
                    "times": r.times,
                    "early_stopping": r.early_stopping,
                    "site_recalibration": r.site_layer.to_dict() if r.site_layer else {},
                    "sites_recalibrated": r.site_metrics_recalibrated,
                }
                for name, r in self.tasks.items()
            },
            "rounds": [r.to_dict() for r in self.rounds],
        }


# ---- the run ---------------------------------------------------------------------------


@dataclass
class _TaskState:
    spec_json: str
    spec_hash: str
    times: list[str]
    model: strategies.TreeModel | None = None
    sizes: dict[str, int] = field(default_factory=dict)
    checkpoints: list[int] = field(default_factory=list)  # tree counts to score on the next message
    stopped: bool = False
    stop_info: dict = field(default_factory=dict)
    loss_curve: list[tuple[int, float]] = field(default_factory=list)


SpecFitter = Callable[[str, dict[str, Payload]], str]
"""(task, summary payload by site) -> fitted feature spec as JSON."""

Scheduler = Callable[[str, datetime, datetime], list[str]]
"""(task, first event time, last event time over all sites) -> prediction times (ISO)."""


class FederatedTrainer:
    """Drives one federated training of several tasks over a Transport.

    `fit_spec` turns the sites' summaries into a feature spec per task (see
    site.py); `lgb_params` are the LightGBM parameters every site uses;
    `on_round(RoundLog)` is called after every exchange (MLflow logging).
    """

    def __init__(
        self,
        transport: Transport,
        config: FederatedConfig,
        *,
        tasks: list[str],
        lgb_params: dict,
        fit_spec: SpecFitter,
        schedule: Scheduler,
        calibration: str = "auto",
        on_round: Callable[[RoundLog], None] | None = None,
    ):
        if not tasks:
            raise FederatedError("no task to train")
        self.transport = transport
        self.config = config
        self.tasks = list(tasks)
        self.lgb_params = dict(lgb_params)
        self.fit_spec = fit_spec
        self.schedule = schedule
        self.calibration = calibration
        self.on_round = on_round or (lambda _r: None)
        self.site_of: dict[int, str] = {}
        self.rounds: list[RoundLog] = []
        self.events: list[str] = []

    # -- helpers ------------------------------------------------------------------------
    def _event(self, text: str) -> None:
        log.warning(text)
        self.events.append(f"{datetime.now().isoformat(timespec='seconds')} {text}")

    def _name(self, node: int) -> str:
        return self.site_of.get(node, f"node {node}")

    def wait_for_nodes(self) -> list[int]:
        """Block until at least `min_sites` nodes are connected (or `connect_timeout_s` passes)."""
        deadline = time.monotonic() + self.config.connect_timeout_s
        while True:
            nodes = self.transport.node_ids()
            if len(nodes) >= self.config.min_sites:
                return nodes
            if time.monotonic() >= deadline:
                raise FederatedError(
                    f"only {len(nodes)} site(s) connected after {self.config.connect_timeout_s:.0f} s; "
                    f"min_sites is {self.config.min_sites}"
                )
            time.sleep(0.5)

    def _exchange(
        self, phase: str, round_index: int, requests: dict[int, Payload], min_replies: int
    ) -> dict[str, Payload]:
        ex = self.transport.exchange(
            phase,
            requests,
            label=f"{phase}-{round_index}",
            timeout_s=self.config.round_timeout_s,
            min_replies=min_replies,
            straggler_wait_s=self.config.straggler_wait_s,
        )
        by_site: dict[str, Payload] = {}
        for node, payload in ex.replies.items():
            site = str(payload.config.get("site", ""))
            if not site:
                ex.failures[node] = "reply names no site"
                continue
            known = self.site_of.get(node)
            if known is not None and known != site:
                self._event(f"node {node} now serves site {site} (was {known})")
            if site in by_site:
                ex.failures[node] = f"a second node answered for site {site}"
                continue
            self.site_of[node] = site
            by_site[site] = payload
        missing = {self._name(n): why for n, why in ex.failures.items()}
        for site, why in sorted(missing.items()):
            self._event(f"{phase} round {round_index}: {site} left out ({why})")
        entry = RoundLog(
            phase=phase,
            round=round_index,
            wall_s=ex.wall_s,
            bytes_out=ex.bytes_out,
            bytes_in=ex.bytes_in,
            sites=sorted(by_site),
            missing=missing,
            site_seconds={s: float(p.config.get("seconds", 0.0)) for s, p in by_site.items()},
            site_startup_seconds={s: float(p.config.get("startup_s", 0.0)) for s, p in by_site.items()},
            site_cpu_seconds={s: float(p.config.get("cpu_seconds", 0.0)) for s, p in by_site.items()},
            site_startup_cpu_seconds={s: float(p.config.get("startup_cpu_s", 0.0)) for s, p in by_site.items()},
            site_metrics={s: dict(p.metrics) for s, p in by_site.items() if p.metrics},
        )
        self.rounds.append(entry)
        log.info(
            "%s round %d: %d site(s) in %.1f s (local %.1f s, overhead %.1f s), %d B out, %d B in",
            phase, round_index, len(by_site), entry.wall_s, entry.local_s, entry.overhead_s,
            entry.bytes_out, entry.bytes_in,
        )
        self.on_round(entry)
        if len(by_site) < min_replies:
            raise FederatedError(
                f"{phase} round {round_index}: {len(by_site)} site(s) answered, at least {min_replies} needed"
                + (f"; missing: {', '.join(sorted(missing))}" if missing else "")
            )
        return by_site

    # -- phases -------------------------------------------------------------------------
    def summaries(self) -> dict[str, Payload]:
        nodes = self.wait_for_nodes()
        request = Payload(config={"tasks": self.tasks, "min_count": self.config.summary_min_count})
        return self._exchange(SUMMARY, 0, {n: request for n in nodes}, self.config.min_sites)

    def _train_payload(
        self, round_index: int, states: dict[str, _TaskState], site: str | None, trees: int | None = None
    ) -> Payload:
        tasks_cfg = {}
        blobs = {}
        for task, st in states.items():
            if st.stopped:
                continue
            model_text = st.model.to_text() if st.model is not None else None
            tasks_cfg[task] = {
                "trees": trees or self.config.trees_per_round,
                "spec_hash": st.spec_hash,
                "times": st.times,
                "model_hash": strategies.model_hash(model_text) if model_text else None,
                "checkpoints": st.checkpoints,
            }
            blobs[f"spec:{task}"] = st.spec_json.encode()
            if model_text:
                blobs[f"model:{task}"] = model_text.encode()
        params = {**self.lgb_params, "seed": self.config.seed + round_index}
        return Payload(
            config={"round": round_index, "tasks": tasks_cfg, "params": params, "site_hint": site},
            blobs=blobs,
        )

    def _take_updates(self, replies: dict[str, Payload], states: dict[str, _TaskState]) -> dict[str, list]:
        updates: dict[str, list[tuple[str, strategies.TreeModel, int]]] = {}
        for task, st in states.items():
            if st.stopped:
                continue
            updates[task] = []
            for site, payload in sorted(replies.items()):
                info = payload.config.get("tasks", {}).get(task)
                if not info:
                    self._event(f"{site} sent nothing for {task}")
                    continue
                n_train = int(info.get("n_train", 0))
                if n_train <= 0 or f"trees:{task}" not in payload.blobs:
                    continue
                trees = strategies.parse_model(payload.blob_text(f"trees:{task}"))
                updates[task].append((site, trees, n_train))
                st.sizes[site] = n_train
        return updates

    def _early_stop(self, task: str, st: _TaskState, replies: dict[str, Payload], where: str) -> bool:
        """Pool the sites' checkpoint losses; cut the model at the best one. True if it was cut short."""
        if not st.checkpoints or st.model is None or not self.config.early_stopping:
            st.checkpoints = []
            return False
        sums = np.zeros(len(st.checkpoints))
        rows = 0
        for payload in replies.values():
            losses = payload.arrays.get(f"{task}:ckpt_loss")
            info = payload.config.get("tasks", {}).get(task, {})
            if losses is None or len(losses) != len(st.checkpoints) or not info.get("ckpt_rows"):
                continue
            sums += losses
            rows += int(info["ckpt_rows"])
        checkpoints, st.checkpoints = st.checkpoints, []
        if rows == 0:
            return False
        best, loss = strategies.best_checkpoint(checkpoints, sums, rows)
        st.loss_curve.extend((c, float(v) / rows) for c, v in zip(checkpoints, sums, strict=True))
        if best >= checkpoints[-1]:
            return False
        st.model = strategies.truncate(st.model, best)
        st.stopped = True
        st.stop_info = {"trees": best, "tuning_logloss": loss, "at": where, "tuning_rows": rows}
        log.info("%s: early stop at %d trees (pooled tuning log-loss %.5f, %s)", task, best, loss, where)
        return True

    def train_bagging(self, states: dict[str, _TaskState]) -> None:
        for r in range(1, self.config.rounds + 1):
            if all(st.stopped for st in states.values()):
                break
            nodes = self.transport.node_ids()
            replies = self._exchange(
                TRAIN, r, {n: self._train_payload(r, states, self.site_of.get(n)) for n in nodes},
                self.config.min_sites,
            )
            for task, ups in self._take_updates(replies, states).items():
                st = states[task]
                if self._early_stop(task, st, replies, f"round {r}"):
                    continue  # this round's trees grew from a model that had already overfitted
                if not ups:
                    raise FederatedError(f"round {r}: no site trained {task}")
                before = st.model.num_trees if st.model is not None else 0
                st.model = strategies.merge_bagging(st.model, [(m, n) for _, m, n in ups])
                counts = [m.num_trees for _, m, _ in ups]
                st.checkpoints = [c for c in strategies.bagging_checkpoints(before, counts) if c > 0]

    def train_cyclic(self, states: dict[str, _TaskState]) -> None:
        """Passes over the sites in turn; after each pass, a pooled check of every tree count of that pass."""
        step = 0
        for r in range(1, self.config.rounds + 1):
            if all(st.stopped for st in states.values()):
                break
            visited = 0
            before = {t: (st.model.num_trees if st.model is not None else 0) for t, st in states.items()}
            for site in strategies.cyclic_order(sorted(set(self.site_of.values())), r - 1):
                step += 1
                listed = set(self.transport.node_ids())
                node = next((n for n, s in self.site_of.items() if s == site and n in listed), None)
                if node is None:
                    self._event(f"train pass {r}: {site} is not connected; skipped")
                    continue
                try:
                    replies = self._exchange(
                        TRAIN, step, {node: self._train_payload(r, states, site, self.config.cyclic_trees)}, 1
                    )
                except FederatedError:
                    continue  # logged in _exchange; the model goes on to the next site
                for task, ups in self._take_updates(replies, states).items():
                    for _, trees, _ in ups:
                        states[task].model = strategies.append_cyclic(states[task].model, trees)
                visited += 1
            if visited < self.config.min_sites:
                raise FederatedError(
                    f"cyclic pass {r}: the model visited {visited} site(s), at least {self.config.min_sites} needed"
                )
            if self.config.early_stopping:
                for task, st in states.items():
                    if not st.stopped and st.model is not None:
                        first = max(before[task], 1)
                        st.checkpoints = list(range(first, st.model.num_trees + 1))
                self._check_pass(states, r)

    def _check_pass(self, states: dict[str, _TaskState], pass_index: int) -> None:
        """Pooled tuning loss at every tree count of the last pass (an evaluate message, checkpoints only)."""
        pending = {t: st for t, st in states.items() if st.checkpoints and not st.stopped}
        if not pending:
            return
        tasks_cfg = {t: {"spec_hash": st.spec_hash, "times": st.times, "checkpoints": st.checkpoints,
                         "only_checkpoints": True} for t, st in pending.items()}
        blobs = {}
        for task, st in pending.items():
            blobs[f"spec:{task}"] = st.spec_json.encode()
            blobs[f"model:{task}"] = st.model.to_text().encode()
        request = Payload(config={"tasks": tasks_cfg}, blobs=blobs)
        nodes = self.transport.node_ids()
        replies = self._exchange(EVALUATE, 100 + pass_index, {n: request for n in nodes}, self.config.min_sites)
        for task, st in pending.items():
            self._early_stop(task, st, replies, f"pass {pass_index}")

    def _evaluate_exchange(self, states: dict[str, _TaskState], round_index: int) -> dict[str, Payload]:
        tasks_cfg = {}
        blobs = {}
        for task, st in states.items():
            if st.model is None:
                raise FederatedError(f"{task}: no model was trained")
            tasks_cfg[task] = {"spec_hash": st.spec_hash, "times": st.times, "checkpoints": st.checkpoints}
            blobs[f"spec:{task}"] = st.spec_json.encode()
            blobs[f"model:{task}"] = st.model.to_text().encode()
        request = Payload(config={"tasks": tasks_cfg, "min_cell_rows": self.config.min_cell_rows}, blobs=blobs)
        nodes = self.transport.node_ids()
        return self._exchange(EVALUATE, round_index, {n: request for n in nodes}, self.config.min_sites)

    def evaluate(self, states: dict[str, _TaskState]) -> dict[str, TaskResult]:
        """Calibration and per-site evaluation; the final check of early stopping comes with it."""
        replies = self._evaluate_exchange(states, 0)
        cut = [task for task, st in states.items() if self._early_stop(task, st, replies, "final check")]
        if cut:  # the statistics were of the longer model: score the cut one
            replies = self._evaluate_exchange(states, 1)
        results = {}
        for task, st in states.items():
            tables = {
                site: {part: _table(p, task, part) for part in ("tune_a", "tune_b", "held_out")}
                for site, p in replies.items()
                if f"{task}:held_out:n" in p.arrays
            }
            if not tables:
                raise FederatedError(f"{task}: no site returned evaluation statistics")
            cal, info = fit_from_tables(
                [sum_binned([t[half] for t in tables.values()]) for half in ("tune_a", "tune_b")],
                self.calibration,
            )
            per_site = {site: binned_metrics(t["held_out"], cal) for site, t in sorted(tables.items())}
            site_layer = site_layer_from_tables(cal, {site: t["tune_a"] + t["tune_b"] for site, t in tables.items()})
            recalibrated = {site: binned_metrics(tables[site]["held_out"], cal, recal)
                            for site, recal in site_layer.sites.items()}
            overall = binned_metrics(sum_binned([t["held_out"] for t in tables.values()]), cal)
            results[task] = TaskResult(
                task=task,
                spec_json=st.spec_json,
                model_text=st.model.to_text(),
                calibrator=cal,
                calibration_info=info,
                site_metrics=per_site,
                overall=overall,
                site_sizes=dict(sorted(st.sizes.items())),
                times=list(st.times),
                early_stopping=st.stop_info or {"trees": st.model.num_trees, "at": "not stopped"},
                loss_curve=st.loss_curve,
                site_layer=site_layer,
                site_metrics_recalibrated=recalibrated,
            )
            log.info("%s: overall held-out AUROC %.4f over %d site(s)",
                     task, overall.get("auroc", float("nan")), len(per_site))
        return results

    def run(self) -> FederatedResult:
        start = time.monotonic()
        summaries = self.summaries()
        start_t, end_t = _data_span(summaries)
        states = {}
        for task in self.tasks:
            spec_json = self.fit_spec(task, summaries)
            states[task] = _TaskState(
                spec_json=spec_json,
                spec_hash=strategies.model_hash(spec_json),
                times=self.schedule(task, start_t, end_t),
            )
            if not states[task].times:
                raise FederatedError(f"{task}: the sites' data span leaves no prediction time")
        if self.config.strategy == "cyclic":
            self.train_cyclic(states)
        else:
            self.train_bagging(states)
        results = self.evaluate(states)
        return FederatedResult(
            strategy=self.config.strategy,
            tasks=results,
            rounds=self.rounds,
            sites=sorted(set(self.site_of.values())),
            events=self.events,
            wall_s=time.monotonic() - start,
        )


def _table(payload: Payload, task: str, part: str) -> BinnedScores:
    a = payload.arrays
    return BinnedScores.from_arrays(a[f"{task}:{part}:n"], a[f"{task}:{part}:pos"], a[f"{task}:{part}:sum"])


def _data_span(summaries: dict[str, Payload]) -> tuple[datetime, datetime]:
    """First and last event time over all sites (each site reports only its own two dates).

    The prediction-time schedule is derived from it exactly as for the pooled
    data, so federated and centralized models see the same prediction times.
    """
    starts, ends = [], []
    for payload in summaries.values():
        span = payload.config.get("span") or [None, None]
        if span[0] and span[1]:
            starts.append(datetime.fromisoformat(span[0]))
            ends.append(datetime.fromisoformat(span[1]))
    if not starts:
        raise FederatedError("no site reported a data span (empty datasets?)")
    return min(starts), max(ends)
