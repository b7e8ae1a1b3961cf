"""A monitor run: every (site, window) of the prediction log in time order, skipping unchanged ones."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from chronorisk.data.files import write_text_atomic
from chronorisk.errors import InputError
from chronorisk.serving.monitoring.judging import WindowInput, evaluate_window
from chronorisk.serving.monitoring.outputs import dump_result, save_window_html, summarize_task
from chronorisk.serving.monitoring.reference import Reference, SiteBaseline, site_baseline
from chronorisk.serving.monitoring.statistics import sample_index, seed_of
from chronorisk.serving.monitoring.windows import Window, safe_name, window_of

if TYPE_CHECKING:
    from chronorisk.serving.config import MonitorConfig
    from chronorisk.serving.prediction_log import PredictionLog

log = logging.getLogger("chronorisk.serving.monitoring")


MONITOR_VERSION = 4  # bump when the meaning of the outputs changes: forces recomputation


@dataclass
class MonitorOptions:
    task: str
    kind: str = "week"
    start: datetime | None = None
    end: datetime | None = None
    as_of: datetime | None = None
    html: str = "flagged"  # flagged | all | none
    force: bool = False


@dataclass(eq=False)
class _WindowData:
    """A window's rows per site, read once and kept while later windows need them as their recent baseline."""

    window: Window
    start: datetime
    end: datetime
    files_key: str
    sites: dict[str, pl.DataFrame] | None = None


def run_monitor(prediction_log: PredictionLog, reference: Reference, monitoring_dir: Path, config: MonitorConfig,
                opts: MonitorOptions) -> dict:
    """Judge every (site, window) of the log in the range; write reports; return the task's summary section.

    Windows go in time order: each site's recent baseline is its previous
    `recent_windows` windows. A (site, window) whose inputs are unchanged
    (same log files, outcomes, baseline windows, reference and thresholds)
    is not read again, let alone recomputed.
    """
    if opts.html not in ("flagged", "all", "none"):
        raise InputError("--html", f"{opts.html!r}: use flagged, all or none")
    windows = _windows(prediction_log, opts)
    outcomes = prediction_log.scan_outcomes(opts.task, opts.as_of).collect()
    reports = monitoring_dir / "reports" / opts.task
    config_key = _config_fingerprint(config) + reference.fingerprint
    baselines: dict[str, SiteBaseline] = {}
    history: dict[str, list[tuple[str, str]]] = {}  # site -> [(window label, fingerprint)]
    latest: dict[str, tuple[_WindowData, str]] = {}
    computed = skipped = 0
    k = config.recent_windows
    for i, data in enumerate(windows):
        previous_windows = windows[max(0, i - k):i]
        keys = _site_keys(prediction_log, opts.task, data, outcomes)
        for site, outcome_key in sorted(keys.items()):
            previous = history.setdefault(site, [])[-k:] if k else []
            fingerprint = digest_of(config_key, data.window.label, data.files_key, outcome_key,
                                *(fp for _, fp in previous))
            history[site].append((data.window.label, fingerprint))
            latest[site] = (data, fingerprint)
            json_path = reports / safe_name(site) / f"{data.window.label}.json"
            if not opts.force and _unchanged(json_path, fingerprint, opts.html):
                skipped += 1
                continue
            if site not in baselines:
                baselines[site] = site_baseline(reference, site, config)
            inp = _window_input(prediction_log, opts.task, site, data, previous_windows, outcomes, config)
            result = evaluate_window(inp, reference, baselines[site], config).to_dict()
            result["fingerprint"] = fingerprint
            result["html"] = None
            if opts.html == "all" or (opts.html == "flagged" and result["status"] != "ok"):
                result["html_against"] = save_window_html(json_path.with_suffix(".html"), inp, result, reference,
                                                          baselines[site], config)
                result["html"] = json_path.with_suffix(".html").name
            write_text_atomic(json_path, dump_result(result))
            computed += 1
        if i - k >= 0:
            windows[i - k].sites = None  # rows no later window needs
    if opts.html == "flagged":
        _ensure_latest_html(prediction_log, reference, reports, latest, windows, outcomes, baselines, config, opts)
    log.info("monitor %s: %d windows computed, %d unchanged", opts.task, computed, skipped)
    return summarize_task(reports, opts.kind)


def _windows(prediction_log, opts: MonitorOptions) -> list[_WindowData]:
    """The windows with logged rows in the range, with the identity of their part files."""
    last_day = (opts.end - timedelta(microseconds=1)).date() if opts.end else None  # `end` is exclusive
    files = prediction_log.partitions(opts.task, opts.start.date() if opts.start else None, last_day)
    by_window: dict[Window, list[Path]] = {}
    for path in files:
        day = _day_of(path)
        if day is not None:
            by_window.setdefault(window_of(day, opts.kind), []).append(path)
    out = []
    for window, paths in sorted(by_window.items()):
        start = max(window.start, opts.start) if opts.start else window.start
        end = min(window.end, opts.end) if opts.end else window.end
        checks = prediction_log.check_files(opts.task, start, end)  # impossible values: part of the inputs
        ident = [f"{p.parent.parent.name}/{p.parent.name}/{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                 for p in [*sorted(paths), *checks]]
        out.append(_WindowData(window, start, end, digest_of(str(start), str(end), *ident)))
    return out


def _site_keys(prediction_log, task: str, data: _WindowData, outcomes: pl.DataFrame) -> dict[str, str]:
    """Per site in the window: a key of the outcomes known for its rows (read: site and join key only)."""
    keys = (prediction_log.scan(task, data.start, data.end).select("site", "join_key").collect())
    out = {}
    for (site,), part in keys.group_by("site"):
        known = "-"
        if outcomes.height and part["join_key"].null_count() < part.height:
            matched = outcomes.join(part.select("join_key").drop_nulls().unique(), on="join_key", how="semi")
            if matched.height:
                known = f"{matched.height}:{int(matched.select('join_key', 'outcome').hash_rows(seed=2).sum())}"
        out[str(site)] = known
    return out


def _rows(prediction_log, task: str, data: _WindowData) -> dict[str, pl.DataFrame]:
    if data.sites is None:
        rows = dedupe(prediction_log.scan(task, data.start, data.end).collect())
        data.sites = {str(s): part for (s,), part in rows.group_by("site")} if rows.height else {}
    return data.sites


def _window_input(prediction_log, task: str, site: str, data: _WindowData, previous: list[_WindowData],
                  outcomes: pl.DataFrame, config: MonitorConfig) -> WindowInput:
    rows = _rows(prediction_log, task, data).get(site, pl.DataFrame())
    recent_parts, labels = [], []
    per_window = -(-config.recent_rows // max(len(previous), 1))  # the recent baseline holds <= recent_rows rows
    for old in previous:
        part = _rows(prediction_log, task, old).get(site)
        if part is not None and part.height:
            index = sample_index(part.height, per_window, seed_of(config.seed, "recent", site, old.window.label))
            recent_parts.append(part[index] if index is not None else part)
            labels.append(old.window.label)
    recent = pl.concat(recent_parts, how="diagonal_relaxed") if recent_parts else None
    checks = prediction_log.scan_input_checks(task, data.start, data.end).filter(pl.col("site") == site).collect()
    return WindowInput(task, site, Window(data.start, data.end, data.window.kind), rows,
                       _window_outcomes(rows, outcomes), recent, tuple(labels), checks)


def _ensure_latest_html(prediction_log, reference, reports, latest, windows, outcomes, baselines, config: MonitorConfig,
                        opts) -> None:
    """The window that gives each site its status (its latest tested one) always has its HTML report."""
    by_label = {w.window.label: i for i, w in enumerate(windows)}
    for site in latest:
        results = []
        for path in (reports / safe_name(site)).glob("*.json"):
            r = json.loads(path.read_text())
            if r.get("window_kind") == opts.kind and r["window"] in by_label:
                results.append(r)
        if not results:
            continue
        results.sort(key=lambda r: r["window_start"])
        tested = [r for r in results if r.get("tested")]
        result = tested[-1] if tested else results[-1]
        json_path = reports / safe_name(site) / f"{result['window']}.json"
        if result.get("html") and json_path.with_suffix(".html").is_file():
            continue
        i = by_label[result["window"]]
        previous = windows[max(0, i - config.recent_windows):i] if config.recent_windows else []
        if site not in baselines:
            baselines[site] = site_baseline(reference, site, config)
        inp = _window_input(prediction_log, opts.task, site, windows[i], previous, outcomes, config)
        result["html_against"] = save_window_html(json_path.with_suffix(".html"), inp, result, reference,
                                                  baselines[site], config)
        result["html"] = json_path.with_suffix(".html").name
        write_text_atomic(json_path, dump_result(result))


def _day_of(path: Path) -> date | None:
    try:
        return date.fromisoformat(path.parent.name.removeprefix("date="))
    except ValueError:
        return None


def dedupe(rows: pl.DataFrame) -> pl.DataFrame:
    """One row per (join key, model version): a re-scored patient counts once (latest score)."""
    if rows.height == 0 or "join_key" not in rows.columns:
        return rows
    keys = rows.select("join_key", "model_version").filter(pl.col("join_key").is_not_null())
    if keys.height == 0 or not keys.select(pl.struct("join_key", "model_version").is_duplicated().any()).item():
        return rows  # nothing re-scored (the usual case): no wide sort of hundreds of feature columns
    keyed = rows.filter(pl.col("join_key").is_not_null())
    unkeyed = rows.filter(pl.col("join_key").is_null())
    keyed = keyed.sort("scored_at").unique(["join_key", "model_version"], keep="last", maintain_order=True)
    return pl.concat([keyed, unkeyed], how="diagonal_relaxed").sort(["site", "prediction_time", "scored_at"])


def _window_outcomes(rows: pl.DataFrame, outcomes: pl.DataFrame) -> pl.DataFrame | None:
    if outcomes.height == 0 or "join_key" not in rows.columns:
        return None
    return outcomes.join(rows.select("join_key").drop_nulls().unique(), on="join_key", how="semi").sort("join_key")


def _config_fingerprint(config: MonitorConfig) -> str:
    dump = config.model_dump(mode="json") if hasattr(config, "model_dump") else vars(config)
    return json.dumps({"v": MONITOR_VERSION, **dump}, sort_keys=True, default=str)


def digest_of(*parts: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\x00")
    return digest.hexdigest()


def _unchanged(json_path: Path, fingerprint: str, html_mode: str) -> bool:
    """True when the window's stored result has this fingerprint and every HTML it should have."""
    if not json_path.is_file():
        return False
    try:
        old = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if old.get("fingerprint") != fingerprint:
        return False
    wants_html = html_mode == "all" or (html_mode == "flagged" and old.get("status") != "ok")
    if wants_html and not old.get("html"):
        return False
    return not old.get("html") or (json_path.parent / old["html"]).is_file()
