"""The app in-process (no BentoML): bugs become a 500 without data in the log, streamed bodies are
limited, metrics use route templates, factors are worded, facts come from the feature table."""

from __future__ import annotations

import logging
from datetime import datetime

import httpx
import polars as pl
import pytest
from serving_support import SECRET, seed_store, subject_id

from chronorisk.config import Params
from chronorisk.serving import access
from chronorisk.serving.api import create_app
from chronorisk.serving.state import build_state
from chronorisk.serving.web.pages import factor_sentence


@pytest.fixture
def app_and_key(tmp_path, secret_env):
    state = build_state(Params(), tmp_path / "w", store_url=f"sqlite:///{tmp_path / 'store.db'}", models={})
    seed_store(state.store)
    app = create_app()
    app.state.serving = state
    _, key = access.create_key(state.store.engine, "admin")
    yield app, key, state
    state.store.dispose()


def call(app, method, path, key, **kw):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                     base_url="http://test") as c:
            return await c.request(method, path, headers={"Authorization": f"Bearer {key}"}, **kw)

    import asyncio

    return asyncio.run(go())


def test_a_bug_is_a_500_and_the_log_has_no_data(app_and_key, monkeypatch, caplog):
    app, key, state = app_and_key
    sid = subject_id(0, 4)

    def broken(conn, subject):
        raise RuntimeError(f"database row for subject {subject} is odd")

    monkeypatch.setattr(state.store, "read_patient", broken)
    with caplog.at_level(logging.DEBUG):
        r = call(app, "GET", f"/patients/{sid}", key)
    assert r.status_code == 500 and r.json() == {"error": "internal error", "fields": []}
    server_side = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("httpx"))
    assert "RuntimeError" in server_side and "/patients/{subject_id}" in server_side
    assert str(sid) not in server_side


def test_streamed_body_over_the_limit_is_413(app_and_key):
    """A body without a content-length is counted while it streams in."""
    import asyncio

    app, key, state = app_and_key
    state.params.serve.max_payload_mb = 0.001

    async def chunks():
        for _ in range(10):
            yield b"x" * 500

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.post("/cohort", content=chunks(),
                                headers={"Authorization": f"Bearer {key}", "content-type": "application/json"})

    r = asyncio.run(go())
    assert r.status_code == 413 and "body" in r.json()["error"]


def test_unknown_routes_and_methods_are_4xx(app_and_key):
    app, key, _ = app_and_key
    assert call(app, "GET", "/nope", key).status_code == 404
    assert call(app, "DELETE", "/score", key).status_code == 405
    assert call(app, "GET", "/patients/abc", key).status_code == 422
    assert call(app, "GET", "/worklist?site=chc_a&limit=0", key).status_code == 422
    assert call(app, "GET", "/ui/worklist?site=chc_a&min_risk=abc", key).status_code == 422
    assert call(app, "GET", "/ui/patients/123", key).status_code == 404


def test_score_without_models_is_503_naming_the_reason(app_and_key):
    app, key, _ = app_and_key
    r = call(app, "POST", "/score", key, json={"features": {"a": 1.0}})
    assert r.status_code == 503 and "no model" in r.json()["error"]


@pytest.mark.parametrize(
    ("factor", "words"),
    [
        ({"text": "HbA1c 9.1 %, last measured 2026-03-02, raises risk"},
         "HbA1c 9.1 %, last measured 2026-03-02, raises risk"),
        ({"display": "HbA1c", "value": 9.1, "unit": "%", "date": "2026-03-02", "direction": "raises"},
         "HbA1c 9.1 %, last measured 2026-03-02, raises risk"),
        ({"display": "eGFR", "value": 123.4, "unit": "mL/min", "direction": "lowers"}, "eGFR 123 mL/min, lowers risk"),
        ({"feature": "x"}, "x"),
    ],
)
def test_factor_sentences(factor, words):
    assert factor_sentence(factor) == words


def test_facts_from_features_known_answer():
    from types import SimpleNamespace

    from chronorisk.features.pipeline import fit_spec
    from chronorisk.serving.scoring import facts_from_features

    model = SimpleNamespace(spec=fit_spec(pl.DataFrame({"code": ["X//1"], "n_subjects": [1]})))
    feats = pl.DataFrame({
        "subject_id": [1, 2, 3],
        "demo_age_years": [45.5, 81.0, None],
        "demo_sex_female": [1.0, 0.0, None],
        "cond_hypertension_present": [1.0, 0.0, 1.0],
        "cond_diabetes_present": [1.0, None, 0.0],
    })
    facts = facts_from_features(model, feats, datetime(2024, 1, 1)).to_dicts()
    assert facts == [
        {"subject_id": 1, "sex": "F", "birth_year": 1978, "age_band": "40-49", "conditions": ",diabetes,hypertension,"},
        {"subject_id": 2, "sex": "M", "birth_year": 1942, "age_band": "80+", "conditions": ","},
        {"subject_id": 3, "sex": None, "birth_year": None, "age_band": None, "conditions": ",hypertension,"},
    ]
    assert SECRET  # the fixture module's secret is what the state was built with


def test_mlops_page_and_monitoring_gauges(app_and_key):
    import json

    app, key, state = app_and_key
    mon = state.work / "monitoring"
    mon.mkdir(parents=True, exist_ok=True)
    summary = {"tasks": {"complication_1y": {"week": {"sites": {
        "chc_a": {"status": "alert", "window": "2025-W10", "n_rows": 500, "drift_share": 0.4,
                  "prediction_drift": 0.2, "reasons": ["glucose drifted"], "history": []}}}}}}
    (mon / "summary.json").write_text(json.dumps(summary))
    _, ops_key = access.create_key(state.store.engine, "mlops")
    _, gp_key = access.create_key(state.store.engine, "gp", "chc_a")
    page = call(app, "GET", "/ui/mlops", ops_key)
    assert page.status_code == 200 and "Model monitoring" in page.text and "chc_a" in page.text
    assert call(app, "GET", "/ui/mlops", gp_key).status_code == 403
    assert call(app, "GET", "/ui/mlops/reports/../../secrets/serve.key", ops_key).status_code == 404
    text = call(app, "GET", "/metrics", key).text
    assert 'chronorisk_monitor_drifted_feature_share{site="chc_a",task="complication_1y",window="week"} 0.4' in text


def test_answers_are_not_cached_and_pages_allow_no_script(app_and_key):
    app, key, _ = app_and_key
    api_answer = call(app, "GET", f"/patients/{subject_id(0, 3)}", key)
    assert api_answer.headers["cache-control"] == "no-store"
    assert api_answer.headers["x-content-type-options"] == "nosniff"
    page = call(app, "GET", "/ui/login", key)
    assert "script-src" not in page.headers["content-security-policy"]
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
