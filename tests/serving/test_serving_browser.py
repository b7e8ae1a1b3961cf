"""Headless Chromium opens the GP worklist, a patient page and the cohort export: what a person sees."""

from __future__ import annotations

import io
import json
import re
import time

import polars as pl
import pytest
from serving_support import subject_id

pytestmark = pytest.mark.browser


def sign_in(page, base: str, key: str, landing: str) -> None:
    page.goto(f"{base}/ui/login")
    assert "Sign in" in page.text()
    page.eval(
        f"document.querySelector('#api_key').value = {json.dumps(key)};"
        "document.querySelector('form[action=\"/ui/login\"]').submit(); true"
    )
    page.loaded(landing)


@pytest.mark.parametrize("served", ["sqlite"], indirect=True)
def test_gp_worklist_and_patient_page(served, browser):
    server, keys, seeded, _ = served
    page = browser.new_page()
    sign_in(page, server.url, keys["gp"], "/ui/worklist")
    text = page.text()
    assert "Signed in as gp at chc_a" in text
    assert "Patients at chc_a, highest risk first" in text
    rows = page.eval(
        "[...document.querySelectorAll('#worklist tbody tr')].map(tr => [...tr.cells].map(td => td.innerText))"
    )
    assert len(rows) > 10
    ids = [int(r[0]) for r in rows]
    assert all(seeded["subjects"][i] == "chc_a" for i in ids)
    risks = [float(r[2].rstrip("%")) for r in rows]
    assert risks == sorted(risks, reverse=True)
    assert rows[0][3] == "HIGH"

    # filter: high tier, complication task
    page.eval("document.querySelector('select[name=task]').value = 'complication_1y';"
              "document.querySelector('input[name=tier][value=high]').checked = true;"
              "document.querySelector('form[action=\"/ui/worklist\"]').submit(); true")
    page.wait_for("location.search.includes('tier=high') && document.readyState === 'complete'")
    tiers = page.eval("[...document.querySelectorAll('#worklist tbody tr')].map(tr => tr.cells[3].innerText)")
    assert tiers and set(tiers) == {"HIGH"}

    # open the top patient
    top = page.eval("document.querySelector('#worklist tbody a').innerText")
    page.eval("document.querySelector('#worklist tbody a').click(); true")
    page.loaded(f"/ui/patients/{top}")
    text = page.text()
    assert f"Patient {top}" in text
    assert "Complication within 1 year" in text and "New diabetes or hypertension within 2 years" in text
    assert re.search(r"Risk \d+\.\d% HIGH · prediction date 2024-07-01 · scored on 2024-07-01", text), text[:800]
    assert "HbA1c: 9.1 %, last 2024-03-02 - raises risk (moderately)" in text
    assert "Model chronorisk-complication_1y version 2." in text
    history = page.eval("[...document.querySelectorAll('#task-complication_1y .trend-table tr')]"
                        ".map(tr => [...tr.cells].map(td => td.innerText))")
    assert history[0][:2] == ["Prediction date", "Scored on"] and [r[0] for r in history[1:]] == [
        "2024-07-01", "2024-01-01"]
    points = page.eval("document.querySelectorAll('#task-complication_1y svg.trend circle').length")
    assert points == 2
    assert page.eval("document.querySelector('#task-complication_1y svg.trend').getAttribute('aria-label')")

    # another site's patient: the same "not found" as an unknown patient (ids elsewhere are not revealed)
    page.goto(f"{server.url}/ui/patients/{subject_id(1, 3)}")
    assert "Not found" in page.text() and "no such patient" in page.text()

    # sign out
    page.eval("window.__leaving = true; document.querySelector('form[action=\"/ui/logout\"]').submit(); true")
    page.loaded("/ui/login")
    page.goto(f"{server.url}/ui/worklist")
    page.loaded("/ui/login")
    page.close()


@pytest.mark.parametrize("served", ["sqlite"], indirect=True)
def test_public_health_cohort_counts_and_export(served, browser, tmp_path):
    server, keys, _seeded, _ = served
    downloads = tmp_path / "downloads"
    browser.allow_downloads(downloads)
    page = browser.new_page()
    sign_in(page, server.url, keys["public_health"], "/ui/cohort")
    assert "Cohort builder" in page.text()
    page.eval("document.querySelector('select[name=task]').value = 'complication_1y';"
              "document.querySelector('form[action=\"/ui/cohort\"]').submit(); true")
    page.wait_for("location.search.includes('task=') && document.readyState === 'complete'")
    text = page.text()
    assert "Patients by site and tier" in text and "Counts under 10 are hidden" in text
    table = page.eval(
        "[...document.querySelectorAll('#counts tbody tr')].map(tr => [...tr.cells].map(td => td.innerText))"
    )
    by_site = {r[0]: r[1:] for r in table}
    assert set(by_site) == {"chc_a", "chc_b", "hosp_c"}
    assert all(v == "<10" or int(v) >= 10 for v in by_site["hosp_c"])
    assert "<10" in by_site["hosp_c"]
    total = int(re.search(r"Total: (\d+) patients", text).group(1))
    assert abs(total - 72) <= 40  # 72 seeded; nine noisy cells (scale 2, sd about 8.5 in all)
    assert "differential privacy" in text and "budget left" in text
    # the export button downloads a CSV with pseudonymous rows
    page.eval("[...document.querySelectorAll('form[action=\"/ui/cohort/export\"] button')]"
              ".find(b => b.innerText.includes('CSV')).click(); true")
    deadline = time.monotonic() + 20
    files = []
    while time.monotonic() < deadline:
        files = [p for p in downloads.glob("*.csv")]
        if files:
            break
        time.sleep(0.2)
    assert files, "no CSV was downloaded"
    frame = pl.read_csv(io.BytesIO(files[0].read_bytes()))
    assert {"record_id", "site", "risk", "tier", "age_band", "sex", "model_version"} <= set(frame.columns)
    assert "birth_year" not in frame.columns and "subject_id" not in frame.columns
    assert set(frame["task"]) <= {"complication_1y"}  # 72 seeded rows: k=10 may suppress most of them
    page.close()
