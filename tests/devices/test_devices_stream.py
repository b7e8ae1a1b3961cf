"""`chronorisk stream` against a private Mosquitto: exactly once across SIGKILL and broker restarts,
quarantine with reasons while the stream goes on, authentication required, /metrics."""

from __future__ import annotations

import threading
import time

import httpx
import orjson
import pytest
from devices_support import (
    ConsumerProcess,
    broker_args,
    broker_config,
    cli,
    count,
    expected_events,
    readings,
    rows,
    wait_for,
)

from chronorisk.devices.broker import PrivateBroker, free_port
from chronorisk.devices.replay import publish_readings

N = 600
STORED = "SELECT count(*) FROM (SELECT DISTINCT device_id, reading_id FROM device_readings) AS r"


def _publisher(broker, frame, rate):
    result = {}
    thread = threading.Thread(target=lambda: result.update(acked=publish_readings(broker_config(broker), frame, rate)))
    thread.start()
    return thread, result


def _check_exactly_once(url, frame):
    assert count(url, STORED) == frame.height  # every reading, none lost
    assert count(url, "SELECT count(*) FROM device_readings") == expected_events(frame)  # each stored once
    published = {(d, r) for d, r in frame.select("device_id", "reading_id").iter_rows()}
    stored = {(r["device_id"], r["reading_id"]) for r in rows(url, "SELECT device_id, reading_id FROM device_readings")}
    assert stored == published


def test_sigkill_mid_stream_then_restart_stores_every_reading_once(device_world, scored_store, broker, tmp_path):
    frame = readings(device_world, N)
    consumer = ConsumerProcess(tmp_path / "w", device_world, scored_store, broker, "--metrics-port", "0").start()
    thread, result = _publisher(broker, frame, 400)
    wait_for(lambda: count(scored_store, STORED) >= N // 4, what="a quarter of the readings stored")
    consumer.kill()  # SIGKILL: no chance to finish its batch or acknowledge
    stored_at_kill = count(scored_store, STORED)
    assert stored_at_kill < N
    thread.join(60)
    assert result["acked"] == N
    again = ConsumerProcess(tmp_path / "w", device_world, scored_store, broker, "--metrics-port", "0",
                            "--idle-exit", "2").start()
    assert again.wait(120) == 0, again.output()[-3000:]
    _check_exactly_once(scored_store, frame)
    assert "session present: True" in again.output()
    # the touched patients were re-scored with the stream's readings (prediction times after the batch run)
    assert count(scored_store, "SELECT count(*) FROM scores WHERE prediction_time > '2025-07-01 00:00:00'") > 0


def test_broker_restart_mid_stream_loses_nothing(device_world, scored_store, broker, tmp_path):
    frame = readings(device_world, N)
    consumer = ConsumerProcess(tmp_path / "w", device_world, scored_store, broker, "--metrics-port", "0",
                               "--idle-exit", "6").start()
    thread, result = _publisher(broker, frame, 400)
    wait_for(lambda: count(scored_store, STORED) >= N // 4, what="a quarter of the readings stored")
    broker.stop()
    time.sleep(1.0)
    broker.start()
    thread.join(90)
    assert result["acked"] == N
    assert consumer.wait(120) == 0, consumer.output()[-3000:]
    _check_exactly_once(scored_store, frame)
    assert "connection lost" in consumer.output()


def _bad_messages(world, site, device, subject_device_site):
    good = readings(world, 1).to_dicts()[0]
    from chronorisk.devices.fhir import observation

    def obs(rid, **kw):
        o = observation(rid, device, "bp", good["time"], 130, 80)
        o.update(kw)
        return orjson.dumps(o)

    glucose_bad_unit = observation("bad-unit", device, "glucose", good["time"], 7.0, unit="mmol/mol")
    implausible = observation("too-high", device, "bp", good["time"], 1200, 900)  # no part of it converts
    return [
        (f"chronorisk/{site}/devices/{device}/observations", b"{not json", "malformed_json"),
        (f"chronorisk/{site}/devices/nobody-1/observations", obs("u1"), "unknown_device"),
        (f"chronorisk/{site}/devices/{device}/observations", orjson.dumps(implausible), "implausible_value"),
        (f"chronorisk/{site}/devices/{device}/observations", orjson.dumps(glucose_bad_unit), "unit_not_convertible"),
        (f"chronorisk/{subject_device_site}/devices/{device}/observations", obs("w1"), "wrong_site"),
    ]


def test_bad_readings_are_quarantined_with_reasons_and_the_stream_goes_on(device_world, scored_store, broker,
                                                                          tmp_path):
    import paho.mqtt.client as mqtt

    from chronorisk.devices.mqtt import make_client

    frame = readings(device_world, 200)
    first = frame.row(0, named=True)
    other_site = next(s for s in ("chc_harbour", "chc_hillside", "hosp_central", "chc_riverside")
                      if s != first["site"])
    bad = _bad_messages(device_world, first["site"], first["device_id"], other_site)
    consumer = ConsumerProcess(tmp_path / "w", device_world, scored_store, broker, "--metrics-port", "0",
                               "--idle-exit", "3").start()
    client = make_client(broker_config(broker), "bad-publisher")
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    infos = [client.publish(topic, payload, qos=1) for topic, payload, _ in bad]
    for info in infos:
        info.wait_for_publish(10)
    client.disconnect()
    client.loop_stop()
    assert publish_readings(broker_config(broker), frame, 400) == frame.height  # good readings after the bad ones
    assert consumer.wait(120) == 0, consumer.output()[-3000:]
    _check_exactly_once(scored_store, frame)
    found = {r["category"]: r for r in rows(scored_store, "SELECT * FROM device_quarantine")}
    assert set(found) == {category for _, _, category in bad}
    assert "1200" in found["implausible_value"]["reason"] and "plausible range" in found["implausible_value"]["reason"]
    assert "mmol/mol" in found["unit_not_convertible"]["reason"]
    assert found["unknown_device"]["device_id"] == "nobody-1"
    assert found["malformed_json"]["payload"] == "{not json"
    assert mqtt  # paho is the client library of the test publisher too


def test_refuses_a_broker_that_accepts_anonymous_clients_unless_demo(device_world, scored_store, tmp_path):
    with PrivateBroker(tmp_path / "anon", anonymous=True) as open_broker:
        out = cli(tmp_path / "w", "stream", "--store", scored_store, "--meds", str(device_world.meds), "--model-dir",
                  str(device_world.models), *broker_args(open_broker), broker=open_broker)
        assert out.returncode == 2
        assert "accepts anonymous clients" in out.stderr
        out = cli(tmp_path / "w", "stream", "--store", scored_store, "--meds", str(device_world.meds), "--model-dir",
                  str(device_world.models), "--host", "127.0.0.1", "--port", str(open_broker.port), "--demo",
                  "--metrics-port", "0", "--idle-exit", "1", broker=open_broker)
        assert out.returncode == 0, out.stderr[-2000:]
    out = cli(tmp_path / "w", "stream", "--store", scored_store, "--model-dir", str(device_world.models),
              "--port", str(free_port()))
    assert out.returncode == 2 and "no MQTT authentication configured" in out.stderr
    out = cli(tmp_path / "w", "stream", "--store", scored_store, "--model-dir", str(device_world.models),
              "--port", str(free_port()), "--username", "someone")
    assert out.returncode == 2 and "CHRONORISK_MQTT_PASSWORD" in out.stderr and "is not set" in out.stderr


@pytest.mark.parametrize("damping_hours", [24.0])
def test_metrics_alerts_published_and_damped(device_world, scored_store, broker, tmp_path, damping_hours):
    from chronorisk.devices.mqtt import make_client

    frame = readings(device_world, 1500)
    port = free_port()
    alerts_seen = []
    listener = make_client(broker_config(broker), "alert-listener")
    listener.on_message = lambda _c, _u, msg: alerts_seen.append(orjson.loads(msg.payload))
    listener.connect("127.0.0.1", broker.port)
    listener.subscribe("chronorisk/+/alerts", qos=1)
    listener.loop_start()
    consumer = ConsumerProcess(tmp_path / "w", device_world, scored_store, broker, "--metrics-port", str(port)).start()
    try:
        assert publish_readings(broker_config(broker), frame, 500) == frame.height
        wait_for(lambda: count(scored_store, STORED) == frame.height, what="every reading stored")
        wait_for(lambda: count(scored_store, "SELECT count(*) FROM device_alerts WHERE published_at IS NOT NULL")
                 == count(scored_store, "SELECT count(*) FROM device_alerts"), what="alerts published")
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        consumer.stop()
        listener.disconnect()
        listener.loop_stop()
    stored = rows(scored_store, "SELECT * FROM device_alerts")
    assert stored, "the deteriorating patients' readings raise at least one tier"
    assert all(["low", "medium", "high"].index(a["to_tier"]) > ["low", "medium", "high"].index(a["from_tier"])
               for a in stored)
    per_patient_task = {(a["site"], a["subject_id"], a["task"]) for a in stored}
    assert len(per_patient_task) == len(stored)  # damped: at most one alert per patient and task per day
    assert {a["alert_id"] for a in alerts_seen} == {a["alert_id"] for a in stored}
    assert f"chronorisk_stream_readings_stored_total {float(frame.height)}" in metrics
    assert "chronorisk_stream_readings_received_total" in metrics
    assert "chronorisk_stream_readings_redelivered_total" in metrics
    assert "chronorisk_stream_consumer_lag_seconds" in metrics
    assert "chronorisk_stream_reading_to_score_seconds_bucket" in metrics
    assert "chronorisk_stream_alerts_total{" in metrics


def test_tls_client_certificates_authenticate_the_consumer_and_the_gateway(device_world, scored_store, tmp_path):
    import yaml

    from chronorisk.devices.broker import client_certificate
    from chronorisk.devices.config import StreamConfig

    with PrivateBroker(tmp_path / "tls", tls=True) as tls_broker:
        certs = tls_broker.folder / "certs"
        consumer_cert, consumer_key = client_certificate(certs, "chronorisk-stream")
        gateway_cert, gateway_key = client_certificate(certs, "gateway-1")
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump({"stream": {
            "host": "127.0.0.1", "port": tls_broker.port, "tls_ca": str(certs / "ca.crt"),
            "tls_cert": str(consumer_cert), "tls_key": str(consumer_key), "metrics_port": 0}}))
        frame = readings(device_world, 100)
        out_path = tmp_path / "w"
        consumer = ConsumerProcess(out_path, device_world, scored_store, tls_broker, "--idle-exit", "2")
        consumer.cmd = [c for c in consumer.cmd if c not in ("--username", "chronorisk")]
        consumer.cmd[consumer.cmd.index("--work") + 2:consumer.cmd.index("--work") + 2] = ["--params", str(params)]
        consumer.start()  # no anonymous access (no certificate, no TLS session) and no password needed
        gateway = StreamConfig(host="127.0.0.1", port=tls_broker.port, tls_ca=str(certs / "ca.crt"),
                               tls_cert=str(gateway_cert), tls_key=str(gateway_key))
        assert publish_readings(gateway, frame, 400) == frame.height
        assert consumer.wait(120) == 0, consumer.output()[-3000:]
    _check_exactly_once(scored_store, frame)
