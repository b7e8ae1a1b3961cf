"""Scoring with a real (tiny) model: batch into the store, per request over HTTP, explanations."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime

import httpx
import polars as pl
import pytest
from serving_support import REPO, SECRET, TIMES

from chronorisk.data import codes as vocab
from chronorisk.data.meds_io import scan_site, site_ids
from chronorisk.serving import scoring
from chronorisk.serving.store import ScoreStore, scores

WHEN = datetime(2024, 1, 1)


def api(server, key):
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def eligible_subject(tiny_world, task: str, site: str | None = None) -> tuple[str, int, pl.DataFrame]:
    from chronorisk.features.labels import eligible_index
    from chronorisk.features.tasks import load_task

    for s in [site] if site else site_ids(tiny_world.meds):
        events = scan_site(tiny_world.meds, s).collect()
        idx = eligible_index(events.lazy(), load_task(task), [WHEN]).collect()
        if idx.height:
            sid = int(idx["subject_id"][0])
            return s, sid, events.filter(pl.col("subject_id") == sid)
    raise AssertionError("no eligible subject")


# -- batch ----------------------------------------------------------------------------------


def test_batch_scoring_filled_the_store(scored_server, tiny_world):
    assert "scored" in scored_server.score_output
    store = ScoreStore.open(scored_server.url)
    try:
        with store.engine.connect() as conn:
            rows = conn.execute(scores.select()).mappings().all()
        assert rows
        assert {r["site"] for r in rows} <= set(site_ids(tiny_world.meds))
        assert {r["task"] for r in rows} == {"complication_1y", "onset_2y"}
        assert all(r["prediction_time"] == WHEN and 0 <= r["risk"] <= 1 for r in rows)
        # factors stored for medium and high tiers only
        for r in rows:
            assert (r["factors"] is not None) == (r["tier"] in ("medium", "high"))
        explained = [json.loads(r["factors"]) for r in rows if r["factors"]]
        assert explained and all(f and {"display", "direction", "text"} <= set(f[0]) for f in explained)
        assert all(r["model_version"] == "1" for r in rows)
        n = len(rows)
    finally:
        store.dispose()
    # a re-run skips every shard and changes nothing (idempotent)
    out = subprocess.run(scored_server.cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                         env={**os.environ, "CHRONORISK_SERVE_SECRET": SECRET})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "0 new" in out.stdout and "scored 0 " in out.stdout
    store = ScoreStore.open(scored_server.url)
    assert store.count_scores() == n
    store.dispose()


def test_batch_scoring_resumes_and_matches_a_full_run(tiny_world, any_store):
    from serving_support import REPO as _  # noqa: F401

    models = scoring.load_models(["complication_1y", "onset_2y"], source="folder",
                                 model_dir=tiny_world.models, required=True)
    sites = site_ids(tiny_world.meds)[:2]
    first = scoring.batch_score(any_store, models, tiny_world.meds, WHEN, sites=sites, max_shards=1)
    assert first.scored_chunks == 1
    partial = any_store.count_scores()
    rest = scoring.batch_score(any_store, models, tiny_world.meds, WHEN, sites=sites)
    assert rest.skipped_chunks == 1 and rest.scored_chunks >= 1
    assert any_store.count_scores() > partial
    with any_store.engine.connect() as conn:
        resumed = {(r.site, r.subject_id, r.task): r.risk for r in conn.execute(scores.select())}
    # the same rows as one uninterrupted run into a fresh store
    fresh = ScoreStore.open("sqlite://")
    scoring.batch_score(fresh, models, tiny_world.meds, WHEN, sites=sites)
    with fresh.engine.connect() as conn:
        full = {(r.site, r.subject_id, r.task): r.risk for r in conn.execute(scores.select())}
    fresh.dispose()
    assert resumed.keys() == full.keys()
    assert all(abs(resumed[k] - full[k]) < 1e-9 for k in full)


def test_batch_scoring_skips_withdrawn_patients(tiny_world, sqlite_store):
    models = scoring.load_models(["complication_1y"], source="folder", model_dir=tiny_world.models)
    site, sid, _ = eligible_subject(tiny_world, "complication_1y")
    sqlite_store.withdraw_consent(sid, allow_unknown=True)  # not scored yet: the store holds nothing of them
    scoring.batch_score(sqlite_store, models, tiny_world.meds, WHEN, sites=[site])
    assert sqlite_store.count_scores() > 0
    assert sqlite_store.patient_record(sid, None) is None


def test_batch_and_request_scores_agree(scored_server, tiny_world):
    """The same patient scored by the batch and by POST /score with its events: the same risk."""
    site, sid, events = eligible_subject(tiny_world, "complication_1y", scored_server.site)
    store = ScoreStore.open(scored_server.url)
    record = store.patient_record(sid, [site])
    store.dispose()
    stored = next(s for s in record["scores"] if s["task"] == "complication_1y")
    body = {"events": [_event(r) for r in events.iter_rows(named=True)], "prediction_time": WHEN.isoformat(),
            "tasks": ["complication_1y"]}
    with api(scored_server.server, scored_server.keys["gp"]) as c:
        r = c.post("/score", json=body)
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert result["eligible"] and abs(result["risk"] - stored["risk"]) < 1e-6
    assert result["tier"] == stored["tier"]
    assert result["model_name"] == "chronorisk-complication_1y" and result["model_version"] == "1"
    assert 1 <= len(result["factors"]) <= 5 and result["factors"][0]["text"].endswith("risk")


def _event(row: dict) -> dict:
    out = {"code": row["code"]}
    if row["time"] is not None:
        out["time"] = row["time"].isoformat()
    if row["numeric_value"] is not None:
        out["numeric_value"] = float(row["numeric_value"])
    if row["text_value"] is not None:
        out["text_value"] = row["text_value"]
    return out


# -- requests -------------------------------------------------------------------------------


def test_score_from_ready_made_features(scored_server, tiny_world):
    from chronorisk.models.bundle import ModelBundle

    bundle = ModelBundle.load(tiny_world.models / "onset_2y")
    names = list(bundle.spec.feature_names)
    feats = {n: None for n in names}
    feats.update({"demo_age_years": 61.0, "demo_sex_female": 1.0, "meas_hba1c_last": 6.3,
                  "meas_hba1c_days_since_last": 40.0, "meas_bmi_last": 33.0})
    with api(scored_server.server, scored_server.keys["data_scientist"]) as c:
        r = c.post("/score", json={"features": feats, "tasks": ["onset_2y"], "prediction_time": "2024-01-01"})
        assert r.status_code == 200, r.text
        res = r.json()["results"][0]
        assert res["eligible"] and 0 <= res["risk"] <= 1 and res["tier"] in ("low", "medium", "high")
        hba1c = [f for f in res["factors"] if f["feature"] == "meas_hba1c_last"]
        if hba1c:  # dated from days-since-last: 2024-01-01 minus 40 days
            assert hba1c[0]["date"] == "2023-11-22"
        # impossible and unknown features are named
        bad = c.post("/score", json={"features": {"meas_sbp_last": 1200}, "tasks": ["onset_2y"]})
        assert bad.status_code == 422 and "features.meas_sbp_last" in bad.json()["error"]
        bad = c.post("/score", json={"features": {"demo_age_years": -3}, "tasks": ["onset_2y"]})
        assert bad.status_code == 422 and "demo_age_years" in bad.json()["error"]
        bad = c.post("/score", json={"features": {"no_such_feature": 1}, "tasks": ["onset_2y"]})
        assert bad.status_code == 422 and "features.no_such_feature" in bad.json()["error"]
        # explain off: no factors
        r = c.post("/score", json={"features": feats, "tasks": ["onset_2y"], "explain": False})
        assert r.json()["results"][0]["factors"] is None


def test_score_from_a_fhir_bundle(scored_server):
    bundle = {
        "resourceType": "Bundle", "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:p1", "resource": {"resourceType": "Patient", "id": "p1", "gender": "female",
                                                    "birthDate": "1958-04-02", "name": [{"family": "Doe"}]}},
            {"resource": {"resourceType": "Condition", "subject": {"reference": "urn:uuid:p1"},
                          "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
                          "onsetDateTime": "2019-03-01"}},
            {"resource": {"resourceType": "Encounter", "subject": {"reference": "urn:uuid:p1"},
                          "class": {"code": "AMB"}, "period": {"start": "2023-05-01T09:00:00Z"}}},
            {"resource": {"resourceType": "Observation", "status": "final",
                          "subject": {"reference": "urn:uuid:p1"},
                          "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
                          "effectiveDateTime": "2023-05-01T09:00:00Z",
                          "valueQuantity": {"value": 9.1, "unit": "%", "code": "%"}}},
            {"resource": {"resourceType": "Observation", "status": "final",
                          "subject": {"reference": "urn:uuid:p1"},
                          "code": {"coding": [{"system": "http://loinc.org", "code": "55284-4"}]},
                          "effectiveDateTime": "2023-05-01T09:00:00Z",
                          "component": [
                              {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                               "valueQuantity": {"value": 151, "unit": "mm[Hg]", "code": "mm[Hg]"}},
                              {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
                               "valueQuantity": {"value": 92, "unit": "mm[Hg]", "code": "mm[Hg]"}}]}},
        ],
    }
    with api(scored_server.server, scored_server.keys["gp"]) as c:
        r = c.post("/score", json={"fhir": bundle, "prediction_time": "2024-01-01"})
        assert r.status_code == 200, r.text
        results = {x["task"]: x for x in r.json()["results"]}
        assert results["complication_1y"]["eligible"] and results["complication_1y"]["risk"] is not None
        assert not results["onset_2y"]["eligible"]  # diabetic: not in the onset population
        texts = " ".join(f["text"] for f in results["complication_1y"]["factors"])
        assert texts
        # an observation whose unit cannot be converted: 4xx naming the entry
        bad = json.loads(json.dumps(bundle))
        bad["entry"][3]["resource"]["valueQuantity"] = {"value": 9.1, "unit": "furlongs", "code": "furlongs"}
        r = c.post("/score", json={"fhir": bad})
        assert r.status_code == 422 and "fhir.entry[3]" in r.json()["error"], r.text
        # a birth date in the future: a negative age
        bad = json.loads(json.dumps(bundle))
        bad["entry"][0]["resource"]["birthDate"] = "2030-01-01"
        r = c.post("/score", json={"fhir": bad, "prediction_time": "2024-01-01"})
        assert r.status_code == 422, r.text


def test_negative_age_from_events_is_refused(scored_server):
    body = {"events": [{"code": "MEDS_BIRTH", "time": "2024-06-01"}, {"code": "GENDER//F"}],
            "prediction_time": "2024-01-01"}
    with api(scored_server.server, scored_server.keys["gp"]) as c:
        r = c.post("/score", json=body)
    assert r.status_code == 422 and "negative age" in r.json()["error"]


def test_not_eligible_is_said(scored_server):
    body = {"events": [{"code": "MEDS_BIRTH", "time": "1970-06-01"}, {"code": vocab.SEX_MALE},
                       {"code": "ENCOUNTER//AMB", "time": "2023-02-01"}],
            "prediction_time": "2024-01-01", "tasks": ["complication_1y"]}
    with api(scored_server.server, scored_server.keys["gp"]) as c:
        r = c.post("/score", json=body)
    res = r.json()["results"][0]
    assert r.status_code == 200 and not res["eligible"] and "population" in res["reason"] and res["risk"] is None


def test_explanation_on_demand_for_a_low_tier_score(scored_server):
    store = ScoreStore.open(scored_server.url)
    with store.engine.connect() as conn:
        row = conn.execute(
            scores.select().where(scores.c.site == scored_server.site).where(scores.c.tier == "low").limit(1)
        ).mappings().first()
    store.dispose()
    assert row is not None and row["factors"] is None
    with api(scored_server.server, scored_server.keys["gp"]) as c:
        r = c.get(f"/patients/{row['subject_id']}/factors", params={"task": row["task"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["computed"] == "on demand" and body["factors"] and body["model_version"] == "1"
        page = c.get(f"/ui/patients/{row['subject_id']}", params={"explain": row["task"]})
        assert page.status_code == 200 and "Explained on request" in page.text


def test_monitoring_log_receives_batch_rows_without_ids(scored_server):
    log_dir = scored_server.server.work / "monitoring" / "log"
    files = list(log_dir.rglob("*.parquet"))
    assert files, "batch scoring wrote nothing to the monitoring log"
    frame = pl.read_parquet(files[0])
    assert "subject_id" not in frame.columns and {"risk", "tier", "site", "model_version"} <= set(frame.columns)


def test_schema_fuzzing_finds_no_server_error(scored_server, tmp_path):
    """schemathesis over /docs.json with an admin key and every check: no 5xx, and the API does what its
    OpenAPI document says (statuses, bodies, content types, refusing schema-violating input). The few rules
    JSON Schema cannot state are listed, with their reasons, in tests/serving/schemathesis.toml."""
    server = scored_server.server
    cmd = [
        str(REPO / ".venv" / "bin" / "schemathesis"), "--config-file", str(REPO / "tests" / "serving" /
                                                                        "schemathesis.toml"),
        "run", f"{server.url}/docs.json",
        "--checks", "all", "--max-examples", os.environ.get("CHRONORISK_FUZZ_EXAMPLES", "12"),
        "--seed", "5", "--workers", "1", "--request-timeout", "60",
        "--header", f"Authorization: Bearer {scored_server.keys['admin']}",
        "--exclude-path", "/metrics",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    tail = out.stdout[-6000:]
    assert out.returncode == 0, tail
    assert "Server error" not in tail


@pytest.mark.postgres
def test_batch_scoring_into_postgres(tiny_world, pg_store):
    models = scoring.load_models(["onset_2y"], source="folder", model_dir=tiny_world.models)
    site = site_ids(tiny_world.meds)[0]
    report = scoring.batch_score(pg_store, models, tiny_world.meds, WHEN, sites=[site])
    assert report.total() == pg_store.count_scores() > 0
    again = scoring.batch_score(pg_store, models, tiny_world.meds, WHEN, sites=[site])
    assert again.scored_chunks == 0 and pg_store.count_scores() == report.total()
    assert TIMES  # the seeded times are unrelated to this store


def test_eligibility_from_first_and_last_times_equals_full_events(tiny_world):
    """Batch scoring decides eligibility from two rows per (subject, code): the same index as from
    every event (guards the assumption on `features.labels.eligible_index`)."""
    from chronorisk.features.labels import eligible_index
    from chronorisk.features.tasks import load_task

    for site in site_ids(tiny_world.meds)[:3]:
        events = scan_site(tiny_world.meds, site).collect().lazy()
        reduced = scoring.eligibility_events(events)
        for task in ("complication_1y", "onset_2y"):
            for when in (datetime(2022, 1, 1), WHEN):
                full = eligible_index(events, load_task(task), [when]).collect()
                fast = eligible_index(reduced, load_task(task), [when]).collect()
                assert full.equals(fast), (site, task, when)


def test_models_load_from_the_mlflow_registry_champion(tiny_world, tmp_path):
    """The service's default source: each task's `champion` in the MLflow registry of the work folder."""
    from chronorisk.paths import WorkPaths
    from chronorisk.training import registry, tracking

    work = tmp_path / "w"
    paths = WorkPaths(work)
    paths.mlflow_dir.mkdir(parents=True)
    track = tracking.configure_tracking(paths, uri=tracking.default_tracking_uri(paths))
    registry.register_bundle(track, tiny_world.models / "onset_2y", task="onset_2y", alias="champion")
    models = scoring.load_models(["complication_1y", "onset_2y"], source="registry", work=work)
    assert list(models) == ["onset_2y"]  # no champion for complication_1y: skipped, not fatal
    assert models["onset_2y"].name == "chronorisk-onset_2y" and models["onset_2y"].version == "1"
    with pytest.raises(Exception, match="complication_1y"):
        scoring.load_models(["complication_1y"], source="registry", work=work, required=True)


def test_live_requests_reach_the_monitoring_log_in_batches(tiny_world, tmp_path):
    import numpy as np

    from chronorisk.serving.state import MonitoringSink

    model = scoring.load_models(["onset_2y"], source="folder", model_dir=tiny_world.models)["onset_2y"]
    sink = MonitoringSink(tmp_path, flush_rows=10**6, flush_seconds=3600)
    width = len(model.feature_names)
    for i in range(30):
        sink.live(model, np.full((1, width), 1.0), np.array([0.2]), ["medium"], "chc_a" if i % 2 else None, WHEN)
    assert not list(tmp_path.rglob("*.parquet"))  # buffered: no file per request
    sink.close()
    files = list((tmp_path / "monitoring" / "log").rglob("*.parquet"))
    assert len(files) == 1
    logged = pl.read_parquet(files[0])
    assert logged.height == 30 and "subject_id" not in logged.columns
    assert set(logged["site"]) == {"chc_a", "unknown"} and set(logged["source"]) == {"api"}
    assert set(model.feature_names) <= set(logged.columns)


def test_feature_check_at_once_agrees_with_the_rule_per_feature(tiny_world):
    """Ready-made features are checked against bounds arrays; they refuse exactly what
    `impossible_feature_value` refuses, naming the same feature."""
    from chronorisk.errors import InputError

    chosen = list(scoring.load_models(["complication_1y", "onset_2y"], source="folder",
                                      model_dir=tiny_world.models).values())
    infos: dict = {}
    for m in chosen:
        infos.update(m.spec.features)
    refused_some = accepted_some = False
    for name, info in infos.items():
        lo, hi, _ = scoring.feature_range(name, info)
        edges = [v for v in (lo, hi, lo - 0.01, hi + 0.01) if abs(v) < 1e12]
        for value in (-5.0, -0.5, 0.0, 0.5, 1.0, 2.0, 150.0, 1e6, None, *edges):
            expected = value is not None and bool(scoring.impossible_feature_value(name, value, info))
            try:
                scoring.check_feature_names(chosen, {"demo_age_years": 50.0, name: value})
                refused = False
            except InputError as exc:
                refused = True
                assert exc.field == f"features.{name}"
            assert refused == expected, (name, value)
            refused_some |= refused
            accepted_some |= not refused
    assert refused_some and accepted_some
    with pytest.raises(InputError, match="unknown feature"):
        scoring.check_feature_names(chosen, {"demo_age_years": 50.0, "no_such_feature": 1.0})


def test_batch_monitoring_log_has_keyed_ids_only_and_a_rerun_replaces_it(tiny_world, tmp_path):
    """Batch scores reach the prediction log with a keyed hash of the subject id (never the id), one
    fixed part per chunk: scoring the same chunks again replaces the files instead of adding rows."""
    from chronorisk.serving.prediction_log import join_keys, monitoring_key
    from chronorisk.serving.state import MonitoringSink

    models = scoring.load_models(["complication_1y", "onset_2y"], source="folder", model_dir=tiny_world.models)
    site = site_ids(tiny_world.meds)[0]
    work = tmp_path / "w"
    log_dir = work / "monitoring" / "log"
    first = ScoreStore.open(f"sqlite:///{tmp_path / 'first.db'}")
    report = scoring.batch_score(first, models, tiny_world.meds, WHEN, sites=[site], monitor=MonitoringSink(work))
    files = sorted(log_dir.rglob("*.parquet"))
    assert files and all(f.name.startswith(f"part-batch-20240101-{site}-") for f in files)
    logged = pl.read_parquet(files)
    assert logged.height == report.total() > 0
    assert "subject_id" not in logged.columns
    with first.engine.connect() as conn:
        ids = [r[0] for r in conn.execute(scores.select().with_only_columns(scores.c.subject_id))]
    first.dispose()
    keys = join_keys(pl.Series(ids), pl.Series([WHEN] * len(ids)), monitoring_key(work))
    assert set(logged["join_key"]) == set(keys)
    raw = {str(i) for i in ids}
    for col, dtype in logged.schema.items():
        if dtype == pl.String:
            assert not raw & set(logged[col].drop_nulls()), col
    # a fresh store skips nothing: every chunk is scored and logged again, under the same part names
    again = ScoreStore.open(f"sqlite:///{tmp_path / 'again.db'}")
    scoring.batch_score(again, models, tiny_world.meds, WHEN, sites=[site], monitor=MonitoringSink(work))
    again.dispose()
    assert sorted(log_dir.rglob("*.parquet")) == files
    assert pl.read_parquet(files).height == report.total()


def _patients_with_edge_cases(tiny_world, n: int = 60) -> list[tuple[pl.DataFrame, datetime]]:
    """(one patient's events, prediction time) for `n` generated patients at three dates, plus edge cases:
    a record of a birth only, a record entirely after the prediction time, an empty value column, a
    same-time duplicate, and a patient under a large real subject id."""
    events = scan_site(tiny_world.meds, site_ids(tiny_world.meds)[0]).collect()
    subjects = events["subject_id"].unique().sort().to_list()[:n]
    times = (datetime(2024, 1, 1), datetime(2021, 6, 15, 9, 30), datetime(2019, 3, 3))
    out = [(events.filter(pl.col("subject_id") == s), times[i % 3]) for i, s in enumerate(subjects)]
    first = out[0][0]
    out.append((first.filter(pl.col("code") == vocab.BIRTH), WHEN))
    out.append((first.with_columns(pl.lit(datetime(2030, 1, 1)).cast(first.schema["time"]).alias("time")), WHEN))
    out.append((out[1][0].with_columns(pl.lit(None).cast(first.schema["numeric_value"]).alias("numeric_value")), WHEN))
    out.append((pl.concat([out[2][0], out[2][0].tail(5)]).sort("time", nulls_last=False), out[2][1]))
    out.append((out[3][0].with_columns(pl.lit(9_123_456_789, dtype=pl.Int64).alias("subject_id")), out[3][1]))
    return out


def test_patients_run_together_get_the_features_of_a_run_alone(tiny_world):
    """The shared run of concurrent requests (`patient_batch.features_together`) gives each patient exactly
    the feature rows (and eligibility) of a run of their own, edge cases included, for every task at once."""
    from polars.testing import assert_frame_equal

    from chronorisk.serving.patient_batch import features_together

    models = list(scoring.load_models(["onset_2y", "complication_1y"], source="folder",
                                      model_dir=tiny_world.models, required=True).values())
    patients = _patients_with_edge_cases(tiny_world)
    alone = [features_together(models, [e], [t])[0] for e, t in patients]
    together = []
    for lo in range(0, len(patients), 7):  # batches of several sizes, mixed prediction times
        chunk = patients[lo: lo + 7]
        together += features_together(models, [e for e, _ in chunk], [t for _, t in chunk])
    scored = 0
    for (events, _), one, many in zip(patients, alone, together, strict=True):
        for a, b in zip(one, many, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert_frame_equal(a, b, check_exact=True)
                assert b["subject_id"].to_list() == [events["subject_id"][0]]
                scored += 1
    assert scored >= 20 and any(x is None for row in alone for x in row)


def test_concurrent_requests_share_runs_and_get_their_own_answers(tiny_world):
    """Requests arriving at once through `score_one` from many threads: fewer pipeline runs than requests,
    and each request's risks are those of scoring it alone."""
    from concurrent.futures import ThreadPoolExecutor

    from chronorisk.serving.patient_batch import PatientBatcher

    models = scoring.load_models(["onset_2y", "complication_1y"], source="folder", model_dir=tiny_world.models,
                                 required=True)
    patients = _patients_with_edge_cases(tiny_world, 40)[:40]

    def score(p):
        return [(r.task, r.eligible, r.risk, r.factors) for r in scoring.score_one(
            models, list(models), events=p[0], prediction_time=p[1], explain=True)]

    expected = [score(p) for p in patients]  # one at a time: each alone in its run
    batcher = scoring.PATIENTS
    scoring.PATIENTS = PatientBatcher()
    try:
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(score, patients))
        runs, served = scoring.PATIENTS.runs, scoring.PATIENTS.patients
    finally:
        scoring.PATIENTS = batcher
    assert got == expected
    assert served == len(patients) and runs < len(patients)
