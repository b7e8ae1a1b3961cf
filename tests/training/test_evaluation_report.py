"""HTML report: self-contained, with the four plots and the per-site table."""

from __future__ import annotations

import base64
import re

import numpy as np
import polars as pl

from chronorisk.training import evaluation as E
from chronorisk.training.report import TaskReport, render_report, shap_importance, write_report


def _task(name: str = "onset_2y", n: int = 1500, seed: int = 0) -> TaskReport:
    rng = np.random.default_rng(seed)
    true = 1 / (1 + np.exp(-rng.normal(-2, 1.2, n)))
    y = rng.random(n) < true
    site = rng.choice(["north", "south"], n)
    df = pl.DataFrame({"y": y, "risk": true, "site": site, "sex": rng.choice(["F", "M"], n),
                       "age": rng.uniform(20, 90, n), "true_risk": true})
    recs = E.evaluate(df, task=name, threshold=0.25, mode="ideal", n_boot=20)
    contrib = rng.normal(size=(n, 4)) * np.array([0.1, 1.0, 0.5, 0.01])
    return TaskReport(name, recs, y, true, site, true, shap_importance(contrib, ["A", "B <b>", "C", "D"]),
                      {"name": f"chronorisk-{name}", "version": "2"})


def test_report_is_self_contained_with_plots_and_table(tmp_path):
    html = render_report([_task(), _task("complication_1y", seed=1)], notes=["demo cohort"])
    pngs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(pngs) == 8  # ROC, calibration, decision curve, SHAP summary, per task
    assert all(base64.b64decode(p).startswith(b"\x89PNG") for p in pngs)
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert html.count("<table>") == 2 and ">north<" in html and ">south<" in html
    assert "B &lt;b&gt;" not in html  # names only appear inside the PNG, never as raw HTML
    assert "demo cohort" in html and "chronorisk-onset_2y" in html
    path = write_report(tmp_path / "reports" / "evaluation.html", [_task()])
    assert path.read_text().startswith("<!doctype html>")


def test_shap_importance_orders_by_mean_absolute_contribution():
    contrib = np.array([[0.1, -2.0, 0.5, 9.9], [-0.3, 1.0, -0.5, 9.9]])  # last column: expected value
    imp = shap_importance(contrib, ["a", "b", "c"])
    assert list(imp) == ["b", "c", "a"]
    assert imp["b"] == 1.5 and imp["a"] == 0.2


def test_report_without_both_outcomes_says_so():
    t = _task()
    t.y = np.zeros_like(t.y)
    html = render_report([t])
    assert "Both outcomes are needed" in html
