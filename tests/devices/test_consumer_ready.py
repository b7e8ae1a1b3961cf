"""The consumer is ready (and says so) only once the broker has granted its subscription.

Between CONNACK and SUBACK of a first session, a reading published matches no subscription and the
broker drops it for this consumer: announcing readiness at CONNACK lost the first readings of a
stream under load (seen as 1,484 of 1,500 stored). The paho callbacks are driven here with the
broker's answers, so the rule is checked without racing a real broker.
"""

from __future__ import annotations

from types import SimpleNamespace

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from chronorisk.devices.config import StreamConfig
from chronorisk.devices.consumer import Consumer
from chronorisk.devices.metrics import StreamMetrics


def consumer() -> Consumer:
    return Consumer(StreamConfig(), ctx=None, metrics=StreamMetrics())


def connack(session_present: bool):
    return SimpleNamespace(session_present=session_present), ReasonCode(PacketTypes.CONNACK, "Success")


def test_ready_only_after_the_subscription_is_granted(caplog):
    c = consumer()
    flags, ok = connack(session_present=False)
    with caplog.at_level("INFO", logger="chronorisk.devices.consumer"):
        c._on_connect(c.client, None, flags, ok, None)  # sends SUBSCRIBE (not connected here: nothing goes out)
        assert not c.connected.is_set()
        assert "connected" not in caplog.text
        c._on_subscribe(c.client, None, 1, [ReasonCode(PacketTypes.SUBACK, "Granted QoS 1")], None)
    assert c.connected.is_set()
    assert "connected (session present: False), subscribed" in caplog.text
    assert c.generation == 1


def test_a_refused_subscription_is_not_ready(caplog):
    c = consumer()
    flags, ok = connack(session_present=True)
    c._on_connect(c.client, None, flags, ok, None)
    with caplog.at_level("ERROR", logger="chronorisk.devices.consumer"):
        c._on_subscribe(c.client, None, 1, [ReasonCode(PacketTypes.SUBACK, "Not authorized")], None)
    assert not c.connected.is_set()
    assert "MQTT subscription refused: Not authorized" in caplog.text
