"""What-if: a changed recent value goes into the record, the same pipeline and model score it.

Through the real HTTP server with the tiny model (the batch-scored world), and in headless Chromium:
the patient page's grouped explanation and its what-if control.
"""

from __future__ import annotations

import json
from datetime import datetime

import httpx
import polars as pl
import pytest
from cdp import Chromium, chromium_path

from chronorisk.serving import scoring, whatif
from chronorisk.serving.store import ScoreStore, scores

WHEN = datetime(2024, 1, 1)


def stored_patient(scored_server, tiers=("medium", "high")) -> dict:
    """A batch-scored complication_1y patient at the GP's site whose factors are stored."""
    store = ScoreStore.open(scored_server.url)
    try:
        with store.engine.connect() as conn:
            row = conn.execute(
                scores.select().where(scores.c.site == scored_server.site).where(scores.c.task == "complication_1y")
                .where(scores.c.tier.in_(tiers)).order_by(scores.c.risk.desc()).limit(1)
            ).mappings().first()
    finally:
        store.dispose()
    assert row is not None
    return dict(row)


def api(scored_server, role: str = "gp") -> httpx.Client:
    return httpx.Client(base_url=scored_server.server.url, timeout=60,
                        headers={"Authorization": f"Bearer {scored_server.keys[role]}"})


def test_a_changed_value_enters_every_aggregate_that_sees_it(tiny_world):
    from chronorisk.data.meds_io import scan_site, site_ids

    model = scoring.load_models(["complication_1y"], source="folder", model_dir=tiny_world.models)["complication_1y"]
    events = scan_site(tiny_world.meds, site_ids(tiny_world.meds)[0]).collect()
    sid = events.filter(pl.col("code").str.starts_with("LOINC//4548-4"))["subject_id"][0]
    events = events.filter(pl.col("subject_id") == sid)
    changed, described = whatif.changed_events(events, model.spec, WHEN, {"hba1c": 13.5})
    assert changed.height == events.height + 1 and described == ["HbA1c 13.5 % on 2023-12-31"]
    feats = model.spec.features_where(concept="hba1c", aggregate="last")
    index = pl.DataFrame({"subject_id": [sid], "prediction_time": [WHEN]})
    from chronorisk.features.pipeline import transform

    after = transform(model.spec, changed.lazy(), index.lazy()).collect()
    assert after[feats[0]][0] == pytest.approx(13.5)
    assert after["meas_hba1c_days_since_last"][0] == pytest.approx(1.0)
    # stopping a drug class removes its recent prescriptions only
    stopped, _ = whatif.changed_events(events, model.spec, WHEN, {"statin": 0})
    statin_codes = [c for d in model.spec.drug_classes if d.name == "statin" for c in d.codes]
    recent = pl.col("code").is_in(statin_codes) & (pl.col("time") >= datetime(2023, 1, 1))
    assert stopped.filter(recent).height == 0
    assert stopped.filter(~recent).height == events.filter(~recent).height


def test_whatif_over_http(scored_server):
    row = stored_patient(scored_server)
    sid = row["subject_id"]
    path = f"/patients/{sid}/whatif"
    with api(scored_server) as c:
        r = c.post(path, json={"task": "complication_1y", "changes": {"hba1c": 12.0, "sbp": 165}})
        assert r.status_code == 200, r.text
        body = r.json()
        # the current risk is the stored one (same model, same record, same prediction time)
        assert body["current"]["risk"] == pytest.approx(row["risk"], abs=1e-6)
        assert 0 <= body["what_if"]["risk"] <= 1 and body["what_if"]["tier"] in ("low", "medium", "high")
        assert "not the effect of a treatment" in body["label"]
        assert body["changes"] == ["HbA1c 12 % on 2023-12-31", "Systolic blood pressure 165 mmHg on 2023-12-31"]
        # the same value again: the same risk (nothing else moved)
        again = c.post(path, json={"task": "complication_1y", "changes": {"hba1c": 12.0, "sbp": 165}}).json()
        assert again["what_if"] == body["what_if"]
        r = c.post(path, json={"task": "complication_1y", "changes": {"hba1c": 45}})
        assert r.status_code == 422 and r.json()["fields"][0] == {
            "field": "changes.hba1c", "problem": "45 is outside the plausible range 3 to 20 %"}
        r = c.post(path, json={"task": "complication_1y", "changes": {"statin": 0.5}})
        assert r.status_code == 422 and "0 (no) or 1 (yes)" in r.json()["error"]
        r = c.post(path, json={"task": "complication_1y", "changes": {"cholesterol": 5}})
        assert r.status_code == 422 and r.json()["fields"][0]["field"].startswith("changes.cholesterol")
        assert c.post(f"/patients/{sid + 1_000_000_000}/whatif",
                      json={"task": "complication_1y", "changes": {"hba1c": 7}}).status_code == 404
    with api(scored_server, "public_health") as c:
        assert c.post(path, json={"task": "complication_1y", "changes": {"hba1c": 7}}).status_code == 403
    with httpx.Client(base_url=scored_server.server.url) as c:
        assert c.post(path, json={"task": "complication_1y", "changes": {"hba1c": 7}}).status_code == 401


@pytest.fixture
def browser(tmp_path):
    if chromium_path() is None:
        pytest.fail("chromium is not installed: apt-get install chromium (the test set-up installs it)")
    chrome = Chromium(tmp_path / "profile")
    yield chrome
    chrome.close()


@pytest.mark.browser
def test_patient_page_groups_factors_and_answers_what_if(scored_server, browser):
    row = stored_patient(scored_server)
    sid = row["subject_id"]
    page = browser.new_page()
    base = scored_server.server.url
    page.goto(f"{base}/ui/login")
    page.eval(f"document.querySelector('#api_key').value = {json.dumps(scored_server.keys['gp'])};"
              "document.querySelector('form[action=\"/ui/login\"]').submit(); true")
    page.loaded("/ui/")
    page.goto(f"{base}/ui/patients/{sid}")
    page.loaded(f"/ui/patients/{sid}")
    lines = page.eval("[...document.querySelectorAll('#task-complication_1y ul.factors li')].map(li => li.innerText)")
    stored = json.loads(row["factors"])
    assert lines and len(lines) <= len(stored)
    titles = [line.split(":")[0] for line in lines]
    assert len(titles) == len(set(titles))  # one line per concept
    assert all(" - raises risk (" in line or " - lowers risk (" in line for line in lines)
    assert not any("mm[Hg]" in line or " over 1095 days" in line for line in lines)
    # what-if: change HbA1c, see the model's new risk beside the current one
    page.eval("const f = document.querySelector('#whatif-complication_1y');"
              "f.querySelector('input[name=hba1c]').value = '12'; f.submit(); true")
    page.wait_for("location.search.includes('whatif=') && document.readyState === 'complete'")
    result = page.eval("document.querySelector('#task-complication_1y .whatif-result').innerText")
    assert "Current risk" in result and "HbA1c 12 % on 2023-12-31" in result
    assert "not the effect of a treatment" in result
    current = page.eval("document.querySelector('#task-complication_1y .whatif-current').innerText")
    assert current == f"{row['risk'] * 100:.1f}%"
    # an implausible value: refused with the range, in words
    page.eval("const g = document.querySelector('#whatif-complication_1y');"
              "g.querySelector('input[name=hba1c]').value = '45'; g.submit(); true")
    page.wait_for("location.search.includes('hba1c=45') && document.readyState === 'complete'")
    error = page.eval("document.querySelector('#task-complication_1y .whatif-error').innerText")
    assert "outside the plausible range 3 to 20 %" in error
    page.close()
