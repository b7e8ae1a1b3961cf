"""What a monitor run leaves behind: Evidently HTML reports, window JSON, summary.json, Prometheus gauges."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from chronorisk.data.files import atomic_output, write_text_atomic
from chronorisk.serving.monitoring.judging import STATUS_RANK, STATUSES, WindowInput, worst_status
from chronorisk.serving.monitoring.reference import Reference, SiteBaseline, align_elapsed
from chronorisk.serving.monitoring.statistics import rounded, sample_index, seed_of

if TYPE_CHECKING:
    from chronorisk.serving.config import MonitorConfig


def save_window_html(path: Path, inp: WindowInput, result: dict, reference: Reference, baseline: SiteBaseline,
                     config: MonitorConfig) -> str:
    """Evidently's report of the window: the risk, every drifted feature and the most important others.

    Against the comparison that raised the status (the recent windows when
    they did, else the training reference); same methods
    and thresholds as the JSON; at most `html_features` columns besides the
    drifted ones (rendering costs about 0.1-0.5 s a column). Returns which
    baseline the report used.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import MissingValueCount, OutRangeValueCount, RowCount, ValueDrift

    section, against = result.get("data_drift") or {"features": []}, "training reference"
    change = result.get("change")
    if change and change["n_drifted"] and not (section.get("n_drifted") and section.get("counts") == "all"):
        section, against = change, f"previous {len(change['baseline_windows'])} windows"
    drifted = [v for v in section["features"] if v["drifted"]][: config.html_features]
    others = [v for v in section["features"] if not v["drifted"]][: max(config.html_features - len(drifted), 0)]
    shown = drifted + others
    cols = [*(v["feature"] for v in shown), "risk"]
    if against == "training reference":
        ref_frame = reference.drift.filter(pl.col("site") == inp.site) if not baseline.pooled else reference.drift
        current_rows = inp.rows
    else:  # both aligned to the window's start, as in the JSON
        elapsed = {f: d for f, d in reference.elapsed.items() if f in cols}
        ref_frame = align_elapsed(inp.recent, elapsed, inp.window.start)
        current_rows = align_elapsed(inp.rows, elapsed, inp.window.start)
    index = sample_index(inp.rows.height, config.sample_rows,
                          seed_of(config.seed, inp.task, inp.site, inp.window.label))
    sample = current_rows[index] if index is not None else current_rows
    current = sample.select([pl.col(c).cast(pl.Float64) for c in cols]).fill_nan(None).to_pandas()
    ref = ref_frame.select([pl.col(c).cast(pl.Float64) for c in cols]).fill_nan(None).to_pandas()
    definition = DataDefinition(numerical_columns=cols)
    metrics: list = [RowCount()]
    metrics.append(ValueDrift(column="risk", method=config.stattest, threshold=config.prediction_drift_threshold))
    for v in shown:
        metrics.append(ValueDrift(column=v["feature"], method=config.stattest,
                                  threshold=config.feature_drift_threshold))
        if "out_of_range" in v["kinds"]:
            lo, hi = v["reference_range"]
            metrics.append(OutRangeValueCount(column=v["feature"], left=lo, right=hi))
        if "missingness" in v["kinds"]:
            metrics.append(MissingValueCount(column=v["feature"]))
    report = Report(metrics, metadata={"task": inp.task, "site": inp.site, "window": inp.window.label,
                                       "status": result["status"], "against": against})
    snapshot = report.run(Dataset.from_pandas(current, data_definition=definition),
                          Dataset.from_pandas(ref, data_definition=definition))
    with atomic_output(path) as tmp:
        snapshot.save_html(str(tmp))
    return against


def dump_result(result: dict) -> str:
    """A window's JSON: compact (hundreds of windows, each listing every tested feature), keys sorted."""
    return json.dumps(result, sort_keys=True, separators=(",", ":")) + "\n"


def summarize_task(reports: Path, kind: str) -> dict:
    """Per site: the latest window's status and reasons, and the history of every window on disk."""
    sites: dict[str, dict] = {}
    if reports.is_dir():
        for folder in sorted(p for p in reports.iterdir() if p.is_dir()):
            results = []
            for path in sorted(folder.glob("*.json")):
                try:
                    r = json.loads(path.read_text())
                except (OSError, json.JSONDecodeError):
                    continue
                if r.get("window_kind") == kind:
                    results.append(r)
            if not results:
                continue
            results.sort(key=lambda r: r["window_start"])
            tested = [r for r in results if r.get("tested")]
            last = tested[-1] if tested else results[-1]  # a window still filling up does not hide the status
            site = last["site"]
            shares = shares_of(last)
            sites[site] = {
                "status": last["status"], "window": last["window"], "reasons": last["reasons"],
                "n_rows": last["n_rows"], "tested": last.get("tested", False), **shares,
                "report_json": f"reports/{folder.parent.name}/{folder.name}/{last['window']}.json",
                "report_html": (f"reports/{folder.parent.name}/{folder.name}/{last['html']}"
                                if last.get("html") else None),
                "last_not_ok": next((r["window"] for r in reversed(results) if r["status"] != "ok"), None),
                "history": [_history_row(r, folder) for r in results],
                "performance_to_date": _performance_to_date(results),
                "estimated_performance": _estimate_brief(last.get("estimated_performance")),
                "impossible_values": impossible_values(last),
            }
    counts = {s: sum(1 for v in sites.values() if v["status"] == s) for s in STATUSES}
    return {"window_kind": kind, "sites": sites, "status_counts": counts}


def _history_row(r: dict, folder: Path) -> dict:
    perf = r.get("performance") or {}
    return {
        "window": r["window"], "window_start": r["window_start"], "status": r["status"], "n_rows": r["n_rows"],
        "tested": r.get("tested", False), **shares_of(r),
        "mean_risk": (r.get("prediction_drift") or {}).get("mean_risk"),
        "n_outcomes": perf.get("n_outcomes", 0), "auroc": perf.get("auroc"), "ece": perf.get("ece"),
        "calibration_slope": perf.get("calibration_slope"),
        "reference_auroc": (perf.get("reference") or {}).get("auroc"),
        "estimated_auroc": (r.get("estimated_performance") or {}).get("auroc"),
        "estimated_auroc_low": ((r.get("estimated_performance") or {}).get("auroc_spread") or {}).get("low"),
        "estimated_auroc_high": ((r.get("estimated_performance") or {}).get("auroc_spread") or {}).get("high"),
        "html": f"reports/{folder.parent.name}/{folder.name}/{r['html']}" if r.get("html") else None,
        "json": f"reports/{folder.parent.name}/{folder.name}/{r['window']}.json",
        "reasons": r["reasons"][:3],
    }


def impossible_values(r: dict) -> list[dict]:
    """A window's codes with values dropped as impossible: display, counts, share, flagged, probable unit."""
    keep = ("code", "display", "n_values", "n_dropped", "share", "reference_share", "flagged", "probable_unit")
    return [{k: v.get(k) for k in keep} for v in (r.get("input_checks") or {}).get("codes", []) if v["n_dropped"]]


def shares_of(r: dict) -> dict[str, Any]:
    """The figures the page, the summary and the gauges show of one window.

    `drift_share` is the larger of the comparisons that count toward the
    status (training when the window's scores follow the training schedule,
    and the recent windows); `drifted_features` are the features they found.
    """
    dd, ch = r.get("data_drift") or {}, r.get("change") or {}
    counting = [x for x in (dd if dd.get("counts", "all") == "all" else {}, ch) if x]
    hinted = [v["feature"] for v in dd.get("features", []) if v.get("hint")] if dd.get("counts") != "all" else []
    inputs = (r.get("input_checks") or {}).get("affected_features", [])  # of codes with impossible values
    drifted = list(dict.fromkeys([*(f for x in counting for f in x.get("drifted_features", [])), *hinted,
                                  *inputs]))
    shares = [x["drift_share"] for x in counting if x.get("drift_share") is not None]
    pdrift = [x["prediction_drift"]["wasserstein"] for x in counting if x.get("prediction_drift")]
    return {
        "drift_share": max(shares) if shares else (0.0 if r.get("tested") else None),
        "drifted_features": drifted,
        "training_drift_share": dd.get("drift_share"), "change_share": ch.get("drift_share"),
        "prediction_drift": max(pdrift) if pdrift else None,
    }


def _estimate_brief(est: dict | None) -> dict | None:
    """What the summary, page and gauges show of a window's label-free estimate."""
    if not est:
        return None
    return {
        "n": est["n"], "auroc": est["auroc"], "auroc_sd": est["auroc_spread"]["sd"],
        "auroc_low": est["auroc_spread"]["low"], "auroc_high": est["auroc_spread"]["high"],
        "prevalence": est["prevalence"], "n_outcomes": est["n_outcomes"], "realized_auroc": est["realized_auroc"],
        "realized_prevalence": est["realized_prevalence"], "floor": est["floor"], "below_floor": est["below_floor"],
        "thresholds": [{k: t[k] for k in ("tier", "threshold", "sensitivity", "ppv", "realized_sensitivity",
                                          "realized_ppv")} for t in est["thresholds"]],
    }


def _performance_to_date(results: list[dict]) -> dict | None:
    evaluated = [r["performance"] for r in results if (r.get("performance") or {}).get("status") == "evaluated"]
    if not evaluated:
        return None
    n = sum(p["n"] for p in evaluated)
    return {
        "windows": len(evaluated), "n": n,
        "auroc_weighted": rounded(sum(p["auroc"] * p["n"] for p in evaluated) / n),
        "ece_weighted": rounded(sum(p["ece"] * p["n"] for p in evaluated) / n),
        "reference_auroc": (evaluated[-1].get("reference") or {}).get("auroc"),
    }


def write_summary(monitoring_dir: Path, task: str, section: dict) -> dict:
    """Merge one task's section into `<monitoring>/summary.json` (other tasks kept) and return it."""
    path = monitoring_dir / "summary.json"
    summary: dict = {"tasks": {}}
    if path.is_file():
        try:
            summary = json.loads(path.read_text())
        except json.JSONDecodeError:
            summary = {"tasks": {}}
    summary.setdefault("tasks", {}).setdefault(task, {})[section["window_kind"]] = section
    summary["overall_status"] = _overall(summary)
    write_text_atomic(path, json.dumps(summary, indent=1, sort_keys=True))
    return summary


def _overall(summary: dict) -> str:
    status = "ok"
    for kinds in summary.get("tasks", {}).values():
        for section in kinds.values():
            for site in section.get("sites", {}).values():
                status = worst_status(status, site["status"])
    return status


def load_summary(monitoring_dir: Path) -> dict:
    path = Path(monitoring_dir) / "summary.json"
    if not path.is_file():
        return {"tasks": {}}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {"tasks": {}}


_GAUGES = {
    "chronorisk_monitor_drifted_feature_share": "Share of tested features that drifted, latest window per site",
    "chronorisk_monitor_status": "Monitoring status of the latest window per site: 0 ok, 1 warning, 2 alert",
    "chronorisk_monitor_prediction_drift": "Normed Wasserstein distance of the risk distribution vs the reference",
    "chronorisk_monitor_realized_auroc": "Realized AUROC of the latest window with enough outcomes",
    "chronorisk_monitor_estimated_auroc": "AUROC expected from the calibrated risks without labels, latest window",
    "chronorisk_monitor_estimated_auroc_sd": "Standard deviation of the realized AUROC around the label-free estimate",
}
_TIER_GAUGES = {
    "chronorisk_monitor_estimated_sensitivity": "Sensitivity expected without labels at the tier's threshold",
    "chronorisk_monitor_estimated_ppv": "Positive predictive value expected without labels at the tier's threshold",
}


def metric_families(summary: dict) -> list:
    """Prometheus gauge families from a summary (latest window of each task, kind and site)."""
    from prometheus_client.core import GaugeMetricFamily

    fams = {name: GaugeMetricFamily(name, doc, labels=["task", "site", "window"]) for name, doc in _GAUGES.items()}
    fams |= {name: GaugeMetricFamily(name, doc, labels=["task", "site", "window", "tier"])
             for name, doc in _TIER_GAUGES.items()}
    fams["chronorisk_monitor_impossible_value_share"] = GaugeMetricFamily(
        "chronorisk_monitor_impossible_value_share",
        "Share of a code's values dropped as impossible (outside the plausible range), latest window per site",
        labels=["task", "site", "window", "code"])
    for task, kinds in sorted(summary.get("tasks", {}).items()):
        for kind, section in sorted(kinds.items()):
            for site, s in sorted(section.get("sites", {}).items()):
                labels = [task, site, kind]
                fams["chronorisk_monitor_status"].add_metric(labels, STATUS_RANK[s["status"]])
                if s.get("drift_share") is not None:
                    fams["chronorisk_monitor_drifted_feature_share"].add_metric(labels, s["drift_share"])
                if s.get("prediction_drift") is not None:
                    fams["chronorisk_monitor_prediction_drift"].add_metric(labels, s["prediction_drift"])
                aurocs = [h["auroc"] for h in s.get("history", []) if h.get("auroc") is not None]
                if aurocs:
                    fams["chronorisk_monitor_realized_auroc"].add_metric(labels, aurocs[-1])
                _add_estimate(fams, labels, s.get("estimated_performance"))
                for v in s.get("impossible_values") or []:
                    fams["chronorisk_monitor_impossible_value_share"].add_metric([*labels, v["code"]], v["share"])
    return list(fams.values())


def _add_estimate(fams: dict, labels: list[str], est: dict | None) -> None:
    if not est or est.get("auroc") is None:
        return
    fams["chronorisk_monitor_estimated_auroc"].add_metric(labels, est["auroc"])
    if est.get("auroc_sd") is not None:
        fams["chronorisk_monitor_estimated_auroc_sd"].add_metric(labels, est["auroc_sd"])
    for t in est.get("thresholds", []):
        for key in ("sensitivity", "ppv"):
            if t.get(key) is not None:
                fams[f"chronorisk_monitor_estimated_{key}"].add_metric([*labels, t["tier"]], t[key])


class MonitoringCollector:
    """A prometheus_client collector that re-reads summary.json at every scrape.

    Register it on the service's registry (`registry.register(MonitoringCollector(work / "monitoring"))`)
    so /metrics shows the latest monitor run without a restart.
    """

    def __init__(self, monitoring_dir: Path | str):
        self.monitoring_dir = Path(monitoring_dir)

    def collect(self):
        yield from metric_families(load_summary(self.monitoring_dir))

    def describe(self):
        return []


def metrics_text(summary: dict) -> str:
    """The gauges in Prometheus text format (what `metrics.prom` holds)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(_Static(metric_families(summary)))
    return generate_latest(registry).decode()


class _Static:
    def __init__(self, families):
        self.families = families

    def collect(self):
        return iter(self.families)

    def describe(self):
        return []


def write_metrics(monitoring_dir: Path, summary: dict) -> Path:
    """`<monitoring>/metrics.prom` for a node-exporter textfile collector (atomic)."""
    path = monitoring_dir / "metrics.prom"
    write_text_atomic(path, metrics_text(summary))
    return path
