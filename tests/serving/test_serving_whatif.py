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


def test_a_value_in_the_sites_unit_is_converted_and_refused_in_it(tiny_world):
    """LDL in mmol/L and HbA1c in mmol/mol go into the record in the model's units (data/codes.py's
    conversions); an implausible one is refused with the range in the unit the GP used."""
    from polars.testing import assert_frame_equal

    from chronorisk.data.codes import MEASUREMENTS
    from chronorisk.data.meds_io import scan_site, site_ids
    from chronorisk.errors import InputError

    model = scoring.load_models(["complication_1y"], source="folder", model_dir=tiny_world.models)["complication_1y"]
    events = scan_site(tiny_world.meds, site_ids(tiny_world.meds)[0]).collect()
    events = events.filter(pl.col("subject_id") == events["subject_id"][0])
    spec = model.spec
    units = {"ldl": "mmol/l", "hba1c": "mmol/mol"}  # as a GP may spell them
    in_mmol, said = whatif.changed_events(events, spec, WHEN, {"ldl": 3.0, "hba1c": 53}, units)
    ldl_mg = MEASUREMENTS["ldl"].to_canonical(3.0, "mmol/L")
    hba1c_pct = MEASUREMENTS["hba1c"].to_canonical(53, "mmol/mol")
    assert ldl_mg == pytest.approx(116.0, abs=0.1) and hba1c_pct == pytest.approx(7.0, abs=0.01)
    in_model_units, _ = whatif.changed_events(events, spec, WHEN, {"ldl": ldl_mg, "hba1c": hba1c_pct})
    assert_frame_equal(in_mmol, in_model_units)
    assert said == ["LDL cholesterol 3 mmol/L on 2023-12-31", "HbA1c 53 mmol/mol on 2023-12-31"]
    refusals = [
        ({"ldl": 30.0}, {"ldl": "mmol/L"}, "changes.ldl",
         "30 mmol/L is outside the plausible range 0.129 to 20.7 mmol/L"),
        ({"hba1c": 250}, {"hba1c": "mmol/mol"}, "changes.hba1c",
         "250 mmol/mol is outside the plausible range 9.27 to 195 mmol/mol"),
        ({"ldl": 3.0}, {"ldl": "furlongs"}, "units.ldl", None),
        ({"ldl": 3.0}, {"sbp": "mmHg"}, "units.sbp", "names the unit of a value that is not changed"),
        ({"statin": 1}, {"statin": "mmol/L"}, "units.statin", "a yes/no change has no unit"),
    ]
    for changes, units, field, problem in refusals:
        with pytest.raises(InputError) as refused:
            whatif.changed_events(events, spec, WHEN, changes, units)
        assert refused.value.field == field and (problem is None or refused.value.problem == problem), refused.value
    # the model's own unit named explicitly is the same as no unit
    same, _ = whatif.changed_events(events, spec, WHEN, {"sbp": 150}, {"sbp": "mmHg"})
    assert_frame_equal(same, whatif.changed_events(events, spec, WHEN, {"sbp": 150})[0])


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
        # the same HbA1c in mmol/mol: the same estimate, described in the unit given
        ifcc = c.post(path, json={"task": "complication_1y", "changes": {"hba1c": 107.65, "sbp": 165},
                                  "units": {"hba1c": "mmol/mol"}}).json()
        assert ifcc["changes"][0] == "HbA1c 107.65 mmol/mol on 2023-12-31"  # 12.0 %
        assert ifcc["what_if"]["risk"] == pytest.approx(body["what_if"]["risk"], abs=0.02)
        r = c.post(path, json={"task": "complication_1y", "changes": {"ldl": 30}, "units": {"ldl": "mmol/L"}})
        assert r.status_code == 422 and r.json()["fields"][0] == {
            "field": "changes.ldl", "problem": "30 mmol/L is outside the plausible range 0.129 to 20.7 mmol/L"}
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


def test_the_page_takes_values_in_the_sites_units(scored_server, tmp_path):
    """With `serve.display_units` (LDL in mmol/L), the page's what-if form shows and takes LDL in mmol/L,
    and refuses an implausible one with the range in mmol/L."""
    from serving_support import Server, write_params

    row = stored_patient(scored_server)
    params = write_params(tmp_path / "params.yaml", display_units={"ldl": "mmol/L"})
    server = Server(work=tmp_path / "w", store_url=scored_server.url, params=params,
                    model_dir=scored_server.server.model_dir, meds_root=scored_server.meds).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60,
                          headers={"Authorization": f"Bearer {scored_server.keys['gp']}"}) as c:
            page = f"/ui/patients/{row['subject_id']}"
            r = c.get(page)
            assert r.status_code == 200, r.text[-500:]
            form = r.text.split('id="whatif-complication_1y"')[1].split("</form>")[0]
            ldl = form.split('name="ldl"')[1].split("</label>")[0]
            assert "mmol/L" in ldl and "mg/dL" not in ldl
            r = c.get(page, params={"whatif": "complication_1y", "ldl": "30"})
            assert r.status_code == 422
            assert "30 mmol/L is outside the plausible range 0.129 to 20.7 mmol/L" in r.text
            r = c.get(page, params={"whatif": "complication_1y", "ldl": "3"})
            assert r.status_code == 200 and "LDL cholesterol 3 mmol/L on 2023-12-31" in r.text
    finally:
        server.stop()
