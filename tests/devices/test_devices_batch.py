"""A micro-batch without a broker: stored once, re-scored with the batch scorer's features, alerts on a
rising tier (damped per patient and task), the GP worklist shows them once ("new since last visit")."""

from __future__ import annotations

from datetime import timedelta

import httpx
import orjson
import polars as pl
import pytest
from devices_support import SECRET, count, readings, rows

from chronorisk.config import Params
from chronorisk.devices.batch import StreamContext, process_batch
from chronorisk.devices.fhir import observation
from chronorisk.devices.readings import Message, observation_topic
from chronorisk.devices.rescore import BaseEvents
from chronorisk.serving import access, scoring
from chronorisk.serving.store import ScoreStore, scores, utcnow, writer


def _messages(frame: pl.DataFrame) -> list[Message]:
    now = utcnow()
    return [Message(observation_topic("chronorisk", r["site"], r["device_id"]),
                    orjson.dumps(observation(r["reading_id"], r["device_id"], r["kind"], r["time"], r["value"],
                                             r["value2"], r["unit"])), now)
            for r in frame.iter_rows(named=True)]


def _context(world, url, damping_hours=24.0):
    store = ScoreStore.open(url)
    models = scoring.load_models(["complication_1y", "onset_2y"], source="folder", model_dir=world.models,
                                 required=True)
    return StreamContext(store, models, BaseEvents(world.meds), damping=timedelta(hours=damping_hours))


def _run(ctx, frame, size=400):
    results = [process_batch(ctx, _messages(frame[i:i + size])) for i in range(0, frame.height, size)]
    return results


def test_batch_stores_once_rescoring_matches_batch_features_and_alerts(device_world, scored_store):
    frame = readings(device_world, 1600)
    ctx = _context(device_world, scored_store)
    results = _run(ctx, frame)
    assert sum(r.stored for r in results) == frame.height
    again = process_batch(ctx, _messages(frame[:300]))  # redelivered: nothing stored or scored twice
    assert (again.stored, again.redelivered, again.scored, again.alerts) == (0, 300, 0, [])
    alerts = [a for r in results for a in r.alerts]
    assert alerts, "deteriorating patients' readings raise at least one tier"
    # the stream's score of an alerted patient is what batch scoring gives on the same events and time
    a = alerts[0]
    events = _events_of(ctx, a["site"], a["subject_id"])
    expected = scoring.score_one(ctx.models, [a["task"]], events=events, prediction_time=a["prediction_time"],
                                 explain=False)[0]
    assert expected.tier == a["to_tier"]
    assert abs(expected.risk - a["risk"]) < 1e-9
    ctx.store.dispose()


def _events_of(ctx, site, subject):
    stored = rows(ctx.store.engine.url.render_as_string(hide_password=False),
                  f"SELECT subject_id, time, code, numeric_value, text_value FROM device_readings "
                  f"WHERE subject_id = {int(subject)}")
    from chronorisk.devices.rescore import readings_frame

    stored_frame = readings_frame([(r["subject_id"], _as_dt(r["time"]), r["code"], r["numeric_value"],
                                    r["text_value"]) for r in stored])
    return pl.concat([*ctx.base.frames(site, [subject]), stored_frame]).with_columns(pl.lit(0, pl.Int64)
                                                                                    .alias("subject_id"))


def _as_dt(value):
    from datetime import datetime

    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def test_alerts_are_damped_per_patient_and_task(device_world, scored_store):
    frame = readings(device_world, 1600)
    ctx = _context(device_world, scored_store, damping_hours=24.0)
    alert = next(a for r in _run(ctx, frame) for a in r.alerts)
    later = (readings(device_world, None).filter(pl.col("device_id").is_in(_devices_of(ctx, alert)))
             .filter(pl.col("time") > frame["time"].max()).sort("time"))  # not yet sent
    assert later.height >= 2

    def lower_then_read(row_index):
        # the patient's latest score drops to low again, then a new reading raises it
        with writer(ctx.store.engine) as conn, conn.begin():
            conn.execute(scores.update().where(scores.c.subject_id == alert["subject_id"])
                         .where(scores.c.task == alert["task"]).values(tier="low"))
        return process_batch(ctx, _messages(later[row_index:row_index + 1])).alerts

    assert [a for a in lower_then_read(0) if a["task"] == alert["task"]] == []  # within the day: damped
    url = ctx.store.engine.url.render_as_string(hide_password=False)
    latest = rows(url, f"SELECT tier FROM scores WHERE subject_id = {int(alert['subject_id'])} AND task = "
                       f"'{alert['task']}' ORDER BY prediction_time DESC LIMIT 1")[0]["tier"]
    assert latest != "low"  # the tier did rise from low: only the damping kept the alert back
    ctx.damping = timedelta(0)
    assert [a["task"] for a in lower_then_read(1) if a["task"] == alert["task"]] == [alert["task"]]
    ctx.store.dispose()


def _devices_of(ctx, alert) -> list[str]:
    url = ctx.store.engine.url.render_as_string(hide_password=False)
    return [r["device_id"] for r in rows(url, f"SELECT device_id FROM devices WHERE subject_id = "
                                              f"{int(alert['subject_id'])}")]


def test_gp_worklist_shows_new_alerts_once(device_world, scored_store, tmp_path, monkeypatch):
    monkeypatch.setenv("CHRONORISK_SERVE_SECRET", SECRET)
    ctx = _context(device_world, scored_store)
    alert = next(a for r in _run(ctx, readings(device_world, 1600)) for a in r.alerts)
    ctx.store.dispose()
    from chronorisk.serving.api import create_app
    from chronorisk.serving.state import build_state

    state = build_state(Params(), tmp_path / "w", store_url=scored_store, models={})
    app = create_app()
    app.state.serving = state
    _, key = access.create_key(state.store.engine, "gp", alert["site"], label="test")
    first = _get(app, "/ui/worklist", key)
    assert first.status_code == 200
    assert "New home-device alerts" in first.text and f"/ui/patients/{alert['subject_id']}" in first.text
    second = _get(app, "/ui/worklist", key)
    assert "New home-device alerts" not in second.text  # seen: not new any more
    assert count(scored_store, "SELECT count(*) FROM audit_log WHERE action = 'worklist_read'") == 2
    state.store.dispose()


def _get(app, path, key):
    import asyncio

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.get(path, headers={"Authorization": f"Bearer {key}"})

    return asyncio.run(go())


@pytest.mark.postgres
def test_batch_on_postgresql_stores_once_and_alerts(device_world, tmp_path, monkeypatch):
    from devices_support import cli
    from serving_support import pg_schema

    monkeypatch.setenv("CHRONORISK_SERVE_SECRET", SECRET)
    with pg_schema() as url:
        work = tmp_path / "w"
        for argv in (["score", "--date", "2025-07-01", "--meds", str(device_world.meds), "--model-dir",
                      str(device_world.models), "--store", url],
                     ["devices", "--store", url, "register", "--file", str(device_world.devices / "devices.parquet")]):
            out = cli(work, *argv)
            assert out.returncode == 0, out.stderr[-2000:]
        ctx = _context(device_world, url)
        frame = readings(device_world, 1600)
        results = _run(ctx, frame)
        assert sum(r.stored for r in results) == frame.height
        again = process_batch(ctx, _messages(frame[:200]))
        assert (again.stored, again.redelivered) == (0, 200)
        assert any(r.alerts for r in results)
        from chronorisk.devices.alerts import worklist_alerts

        site = next(a for r in results for a in r.alerts)["site"]
        shown, _ = worklist_alerts(ctx.store.engine, site, "key:test")
        assert shown and worklist_alerts(ctx.store.engine, site, "key:test")[0] == []
        ctx.store.dispose()
