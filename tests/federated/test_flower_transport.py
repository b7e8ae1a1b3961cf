"""FlowerTransport over a stand-in Grid: push, short pull loop, deadlines, nodes that leave, error replies."""

from __future__ import annotations

import time
import uuid

import pytest
from flwr.app import Error, Message
from flwr.serverapp import Grid

from chronorisk.federated.protocol import Payload, from_records, to_records
from chronorisk.federated.runner import FlowerTransport


class StandInGrid(Grid):
    """Answers pushed messages in-process: `behaviour[node]` is 'ok', 'silent', 'error' or 'slow'."""

    def __init__(self, behaviour: dict[int, str]):
        self.behaviour = behaviour
        self.nodes = set(behaviour)
        self.pushed: dict[str, Message] = {}
        self.pulls = 0

    def set_run(self, run):  # pragma: no cover - not used
        pass

    @property
    def run(self):  # pragma: no cover - not used
        return None

    def create_message(self, *a, **k):  # pragma: no cover - deprecated in Flower, not used
        raise NotImplementedError

    def get_node_ids(self):
        return sorted(self.nodes)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg_id = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = msg_id
            self.pushed[msg_id] = (msg, time.monotonic())
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        out = []
        for msg_id in message_ids:
            msg, at = self.pushed[msg_id]
            mode = self.behaviour[msg.metadata.dst_node_id]
            if mode == "ok" or (mode == "slow" and time.monotonic() - at > 0.3):
                payload = from_records(msg.content)
                reply = Payload(config={"site": f"s{msg.metadata.dst_node_id}", "echo": payload.config["x"]})
                out.append(Message(to_records(reply), reply_to=msg))
            elif mode == "error":
                out.append(Message(Error(code=0, reason="ClientApp raised"), reply_to=msg))
        return out

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover - not used by chronorisk
        raise NotImplementedError


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages are created inside a ServerApp process in Flower; give this test process an identity."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)


def _exchange(grid, min_replies=2, timeout=5.0, straggler=0.5):
    transport = FlowerTransport(grid, poll_interval_s=0.01, node_check_s=0.1)
    request = Payload(config={"x": 7})
    return transport.exchange("train", {n: request for n in grid.get_node_ids()}, label="train-1",
                              timeout_s=timeout, min_replies=min_replies, straggler_wait_s=straggler)


def test_all_sites_answer():
    ex = _exchange(StandInGrid({1: "ok", 2: "ok", 3: "slow"}))
    assert sorted(ex.replies) == [1, 2, 3] and not ex.failures
    assert ex.replies[3].config == {"site": "s3", "echo": 7}
    assert ex.bytes_out > 0 and ex.bytes_in > 0


def test_a_silent_site_is_given_up_after_the_straggler_wait():
    start = time.monotonic()
    ex = _exchange(StandInGrid({1: "ok", 2: "ok", 3: "silent"}), timeout=30, straggler=0.5)
    assert time.monotonic() - start < 5  # not the 30 s deadline: min_sites had answered
    assert sorted(ex.replies) == [1, 2]
    assert "no reply within" in ex.failures[3]


def test_error_replies_and_departed_nodes_are_failures():
    grid = StandInGrid({1: "ok", 2: "error", 3: "silent", 4: "silent"})
    grid.nodes.discard(4)  # the SuperLink no longer lists it (heartbeat lapsed)
    transport = FlowerTransport(grid, poll_interval_s=0.01, node_check_s=0.05)
    request = Payload(config={"x": 1})
    ex = transport.exchange("evaluate", {n: request for n in (1, 2, 3, 4)}, label="evaluate-0",
                            timeout_s=1.0, min_replies=3, straggler_wait_s=0.1)
    assert list(ex.replies) == [1]
    assert ex.failures[2].startswith("error reply") and "ClientApp raised" in ex.failures[2]
    assert ex.failures[4] == "node left the federation"
    assert "no reply" in ex.failures[3]
