"""Drift and performance monitoring per site and window (design notes: docs/monitoring.md).

Modules, one job each: `windows` (ISO weeks / days), `reference` (what the
model was trained on, site baselines, clock-driven features), `statistics`
(drift tests and realized performance, from scipy.stats and Evidently),
`judging` (one window's verdict and status), `outputs` (reports, summary,
Prometheus gauges), `run` (the run over a prediction log).
"""

from chronorisk.serving.monitoring.judging import STATUSES, WindowInput, WindowResult, evaluate_window, judge_feature
from chronorisk.serving.monitoring.outputs import (
    MonitoringCollector,
    load_summary,
    metric_families,
    metrics_text,
    save_window_html,
    summarize_task,
    write_metrics,
    write_summary,
)
from chronorisk.serving.monitoring.reference import (
    FeatureBaseline,
    Reference,
    SiteBaseline,
    build_reference,
    clock_driven,
    load_or_build_reference,
    reference_from_frame,
    site_baseline,
)
from chronorisk.serving.monitoring.run import MONITOR_VERSION, MonitorOptions, run_monitor
from chronorisk.serving.monitoring.statistics import drift_scorer, screen_features
from chronorisk.serving.monitoring.windows import Window, window_of, windows_for_days

__all__ = [
    "MONITOR_VERSION", "STATUSES", "FeatureBaseline", "MonitorOptions", "MonitoringCollector", "Reference",
    "SiteBaseline", "Window", "WindowInput", "WindowResult", "build_reference", "clock_driven", "drift_scorer",
    "evaluate_window",
    "judge_feature", "load_or_build_reference", "load_summary", "metric_families", "metrics_text",
    "reference_from_frame", "run_monitor", "save_window_html", "screen_features", "site_baseline",
    "summarize_task", "window_of", "windows_for_days", "write_metrics", "write_summary",
]
