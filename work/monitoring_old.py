"""Drift and performance monitoring: per site and window, scores against two baselines and outcomes.

Every (site, window) of the prediction log (ISO week or day, by
`prediction_time`) is compared with two baselines:

1. the *training reference*: a seeded sample of the model's train split at
   that site (features, and the risk the model gives them), from the latest
   `reference_recent_times` prediction times of the split (closest in time to
   what is scored now). A site the model never saw is compared with all
   sites pooled (said in the JSON).
2. the site's *recent windows*: its previous `recent_windows` windows in the
   log, pooled. This is what catches a sudden change in the first window
   after it happens, whatever the scoring protocol, and it is immune to the
   calendar: a few weeks apart, the clock has not moved anything. Ages and
   times since a first event are aligned to the window's start on both sides.

Why two baselines (the choice, and what each misses). The training reference
alone cannot judge a batch scored long after training: every age, "years
since first diagnosis" and count on record is larger for the clock alone, and
visit scores differ from the training grid by design. The recent windows
alone miss a gradual drift (each week looks like the one before) and have
nothing to compare the first window with (the demo's single batch). So: the
training reference judges every feature the clock does not move, the recent
windows judge everything (ages and times since a first event aligned to the
window's start), and a window is as bad as the worse of the two. Four
windows pooled (`recent_windows`) hold enough rows for the tails (at least
2 x `min_window_rows`, `recent_min_windows` windows) while the clock barely
moves between them. A persisting change enters the recent baseline after
`recent_windows` windows, so that comparison is a change detector: its alert
clears then; against training a batch-scored window keeps alerting on the
moved features until the model is retrained. A window without earlier ones
(the demo's one batch at `<end year>-07-01`) is judged against training
only: features that moved with the calendar are listed (`moved_with_calendar`)
but do not raise the status.

Like with like. The training rows are scored on the task's calendar grid (1
January, 1 July) over everyone eligible; batch scores (`chronorisk score`)
follow the same protocol, so for a window of mostly batch scores
(`min_batch_share`) every training finding counts. Scores requested at visits
(`source` api) describe the patients seen that week, who differ from
"everyone eligible on 1 January" by design (days since the last visit is 1 for
all of them): for such windows only a unit change counts against the training
reference, and the recent windows carry the status. Features that grow with
the clock (age, counts on record, time since a first event, and any feature
whose mean moved `calendar_trend_sd_per_year` SDs a year inside the training
data) are reported against the training reference but judged against the
recent windows only: a window a year after training is not "drifted" for
being later.

How a feature is judged (each test needs an effect size AND significance,
so that neither tiny shifts in large windows nor noise in small ones raise an
alarm):

- distribution: Evidently's normed Wasserstein distance (W1 / baseline SD,
  method `stattest`; the same formula computed on sorted samples, see
  `drift_scorer`) >= `feature_drift_threshold`, and the two-sample KS
  p-value < `significance`;
- out of range: the share of values outside the baseline's
  [`out_of_range_quantile`, 1 - q] quantiles widened by `out_of_range_margin`
  SDs is >= `out_of_range_share` and binomially significant against the share
  expected there (a unit change of a part of the values, e.g. glucose in mmol/L,
  shows here first; values at a known conversion factor of data/codes.py are
  named as a probable unit change);
- missingness: the missing share moved by >= `missing_share_change`,
  significant by a two-proportion z-test.

Which features are tested: the `top_features` most important ones (LightGBM
gain) plus every feature that a cheap vectorized screen over all features
flags (mean shift, out-of-range share or missing share moved beyond chance);
the tests run on a seeded sample of at most `sample_rows` rows. This bounds a
window's cost however wide the feature table (benchmarks/monitor_bench.py)
and still names every drifted feature.

Status of a (site, window): `alert` when the drifted share of the tested
features reaches `drift_share_alert` in a comparison that counts, when one
feature drifts severely (normed Wasserstein >= `severe_drift_threshold` or
out-of-range share >= `severe_out_of_range_share`, with p <
`severe_significance`) or looks like a unit change, when the risk distribution
drifted and `prediction_drift_alert` is on, or when realized performance fell
past the alert thresholds beyond chance; `warning` at the warning thresholds;
else `ok`. A window with fewer than `min_window_rows` rows is not tested
(status ok, `tested` false, said in the reasons); a site's status is that of
its latest tested window. Every status comes with reasons naming the features.

Delayed labels: outcomes joined by the log's one-way join key (see
prediction_log) give per window the realized AUROC (with its standard error),
calibration slope and intercept, ECE (with its p-value if calibrated) and
Brier score (training/metrics.py definitions), beside the reference's
(held-out rows of the site), once `min_outcomes` outcomes with
`min_positive_outcomes` positives have arrived.

Outputs under `<work>/monitoring/`: `reports/<task>/<site>/<window>.json`
for every window, `<window>.html` (Evidently's report) for windows whose
status is not ok and the latest window of each site (`html: all` for every
window), `summary.json` and `metrics.prom`. A window whose inputs (log files,
outcomes, its baseline windows, reference, thresholds) are unchanged is not
read again: re-running leaves its files untouched, and the outputs hold no run
timestamps, so a re-run is idempotent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from chronorisk.data.files import atomic_output, write_text_atomic
from chronorisk.errors import ChronoriskError, InputError

log = logging.getLogger(__name__)

MONITOR_VERSION = 2  # bump when the meaning of the outputs changes: forces recomputation
STATUSES = ("ok", "warning", "alert")
_STATUS_RANK = {s: i for i, s in enumerate(STATUSES)}
_REFERENCE_FILE = "reference.parquet"
_REFERENCE_META = "reference.json"


# --------------------------------------------------------------------------- windows
@dataclass(frozen=True, order=True)
class Window:
    """A half-open time window [start, end) of prediction times."""

    start: datetime
    end: datetime
    kind: str

    @property
    def label(self) -> str:
        if self.kind == "week":
            year, week, _ = self.start.isocalendar()
            return f"{year}-W{week:02d}"
        return self.start.date().isoformat()


def window_of(moment: datetime | date, kind: str) -> Window:
    """The day or ISO week (Monday to Monday) holding `moment`."""
    if kind not in ("day", "week"):
        raise InputError("window", f"{kind!r} is not a window; use 'day' or 'week'")
    day = moment.date() if isinstance(moment, datetime) else moment
    if kind == "week":
        day = day - timedelta(days=day.weekday())
    start = datetime(day.year, day.month, day.day)
    return Window(start, start + timedelta(days=7 if kind == "week" else 1), kind)


def windows_for_days(days: Iterable[date], kind: str) -> list[Window]:
    return sorted({window_of(d, kind) for d in days})


# ------------------------------------------------------------------------- reference
@dataclass
class Reference:
    """What a model was trained on, per site: features, risk and (held-out) outcomes.

    `drift` rows: site, risk, tier?, features (the train split sample);
    `performance` rows: site, risk, outcome (held-out rows, for realized-vs-expected).
    """

    task: str
    model_version: str
    feature_names: list[str]
    importance: dict[str, float]
    infos: dict[str, dict[str, str]]
    drift: pl.DataFrame
    performance: pl.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def sites(self) -> list[str]:
        return sorted(self.drift["site"].unique().to_list())

    @property
    def fingerprint(self) -> str:
        """Identity of the reference, fixed when it is built (stored with it, so a reload keeps it)."""
        if not self.meta.get("fingerprint"):
            self.meta["fingerprint"] = self._content_hash()
        return self.meta["fingerprint"]

    def _content_hash(self) -> str:
        digest = hashlib.blake2b(digest_size=12)
        meta = {k: v for k, v in self.meta.items() if k != "fingerprint"}
        digest.update(json.dumps([self.task, self.model_version, self.feature_names, meta],
                                 sort_keys=True, default=str).encode())
        digest.update(str(self.drift.height).encode())
        if self.drift.height:
            digest.update(str(int(self.drift.hash_rows(seed=0).sum())).encode())
        return digest.hexdigest()

    def ranked_features(self) -> list[str]:
        """Features by importance, most important first (ties by name)."""
        return sorted(self.feature_names, key=lambda f: (-self.importance.get(f, 0.0), f))

    @property
    def rank(self) -> dict[str, int]:
        """Importance rank of each feature, 1 = most important (computed once)."""
        if getattr(self, "_rank", None) is None:
            self._rank = {f: i + 1 for i, f in enumerate(self.ranked_features())}
        return self._rank

    @property
    def elapsed(self) -> dict[str, float]:
        """Days per unit of each feature only the clock moves (see `_elapsed_days`), computed once."""
        if getattr(self, "_elapsed", None) is None:
            self._elapsed = {f: d for f in self.feature_names if (d := _elapsed_days(f, self.infos.get(f)))}
        return self._elapsed

    def display(self, feature: str) -> str:
        info = self.infos.get(feature) or {}
        text = info.get("display") or feature
        return f"{text} ({info['unit']})" if info.get("unit") else text

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.fingerprint  # noqa: B018 - fix the identity before writing it
        frame = pl.concat(
            [self.drift.with_columns(pl.lit("drift").alias("_role")),
             self.performance.with_columns(pl.lit("performance").alias("_role"))],
            how="diagonal_relaxed",
        )
        with atomic_output(folder / _REFERENCE_FILE) as tmp:
            frame.write_parquet(tmp, compression="zstd")
        meta = {
            "task": self.task, "model_version": self.model_version, "feature_names": self.feature_names,
            "importance": self.importance, "infos": self.infos, "meta": self.meta,
        }
        write_text_atomic(folder / _REFERENCE_META, json.dumps(meta, indent=1, sort_keys=True))

    @classmethod
    def load(cls, folder: Path) -> Reference:
        try:
            meta = json.loads((folder / _REFERENCE_META).read_text())
            frame = pl.read_parquet(folder / _REFERENCE_FILE)
        except (OSError, json.JSONDecodeError) as exc:
            raise ChronoriskError(
                f"{folder}: cannot read the monitoring reference ({exc.__class__.__name__})"
            ) from None
        drift = frame.filter(pl.col("_role") == "drift").drop("_role")
        perf = frame.filter(pl.col("_role") == "performance").select("site", "risk", "outcome")
        return cls(meta["task"], meta["model_version"], meta["feature_names"], meta["importance"],
                   meta["infos"], drift, perf, meta.get("meta", {}))


def reference_from_frame(
    frame: pl.DataFrame,
    risk: np.ndarray | Sequence[float],
    *,
    task: str,
    model_version: str | int,
    feature_names: Sequence[str],
    importance: dict[str, float] | None = None,
    infos: dict[str, dict[str, str]] | None = None,
    rows_per_site: int = 5000,
    recent_times: int = 2,
    seed: int = 0,
    trends: dict[str, dict[str, float]] | None = None,
) -> Reference:
    """The reference from a scored feature table (site, split, prediction_time, boolean_value, features).

    Drift rows: train split, latest `recent_times` prediction times (0 = all),
    at most `rows_per_site` per site (seeded). Performance rows: the other
    splits (held out from training) with their outcome; the train split when
    there is no other. `trends` (per site, feature: change of the mean per
    year over the train split's prediction times) default to the frame's own.
    """
    if frame.height != len(risk):
        raise InputError("risk", f"has {len(risk)} values for {frame.height} feature rows")
    present = set(frame.columns)
    missing = [f for f in ("site", *feature_names) if f not in present]
    if missing:
        raise InputError("features", f"the reference table lacks columns {missing[:5]}")
    scored = frame.with_columns(pl.Series("risk", np.asarray(risk, dtype=float)))
    split = pl.col("split") if "split" in scored.columns else pl.lit("train")
    train = scored.filter(split == "train")
    if train.height == 0:
        train = scored
    if recent_times > 0 and "prediction_time" in train.columns:
        latest = (train.select("site", "prediction_time").unique()
                  .with_columns(pl.col("prediction_time").rank("dense", descending=True).over("site").alias("_r"))
                  .filter(pl.col("_r") <= recent_times).drop("_r"))
        train = train.join(latest, on=["site", "prediction_time"], how="semi")
    keep = ["site", "risk", *(["tier"] if "tier" in train.columns else []), *feature_names]
    drift = _sample_per_site(train.select(keep), rows_per_site, seed)
    held = scored.filter(split != "train") if "split" in scored.columns else scored.head(0)
    if held.height == 0:
        held = scored
    perf = pl.DataFrame(schema={"site": pl.String, "risk": pl.Float64, "outcome": pl.Boolean})
    if "boolean_value" in held.columns:
        perf = _sample_per_site(
            held.select("site", "risk", pl.col("boolean_value").cast(pl.Boolean).alias("outcome"))
            .drop_nulls("outcome"),
            max(rows_per_site, 20000), seed,
        )
    meta = {"rows_per_site": rows_per_site, "recent_times": recent_times, "seed": seed,
            "train_times": sorted({str(t) for t in train["prediction_time"].unique().to_list()})
            if "prediction_time" in train.columns else [],
            "reference_time": _mean_time(train), "trends": trends if trends is not None else calendar_trends(
                scored.filter(split == "train").lazy(), feature_names)}
    return Reference(
        task=task, model_version=str(model_version), feature_names=list(feature_names),
        importance={k: float(v) for k, v in (importance or {}).items()},
        infos={k: dict(v) for k, v in (infos or {}).items()},
        drift=drift.with_columns(pl.col("site").cast(pl.String)),
        performance=perf.with_columns(pl.col("site").cast(pl.String)),
        meta=meta,
    )


def calendar_trends(train: pl.LazyFrame, feature_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per site and feature, the change of the mean per year across the train split's prediction times.

    Features such as "measurements on record", "years since first diagnosis"
    or age grow with calendar time in any cohort followed from a fixed start:
    a feature whose mean moved `calendar_trend_sd_per_year` SDs a year here
    is judged against the site's recent windows only (see
    `calendar_features`), so that a window a year after training is not
    "drifted" for being later.
    Needs at least 3 prediction times; a feature without is left out.
    """
    cols = train.collect_schema().names()
    if "prediction_time" not in cols or "site" not in cols:
        return {}
    names = [f for f in feature_names if f in cols]
    means = (train.group_by("site", "prediction_time")
             .agg([pl.col(f).cast(pl.Float64).fill_nan(None).mean() for f in names])
             .sort("site", "prediction_time").collect())
    out: dict[str, dict[str, float]] = {}
    for (site,), part in means.group_by("site", maintain_order=True):
        if part.height < 3:
            continue
        years = (part["prediction_time"].dt.epoch("s").to_numpy() / (365.25 * 86400)).astype(float)
        slopes = {}
        for f in names:
            y = part[f].to_numpy().astype(float)
            ok = ~np.isnan(y)
            if ok.sum() >= 3 and np.ptp(years[ok]) > 0:
                x = years[ok] - years[ok].mean()
                slopes[f] = round(float((x * (y[ok] - y[ok].mean())).sum() / (x * x).sum()), 6)
        out[str(site)] = slopes
    return out


def _mean_time(frame: pl.DataFrame) -> str | None:
    if "prediction_time" not in frame.columns or frame.height == 0:
        return None
    return str(frame["prediction_time"].cast(pl.Datetime("us")).mean())


def build_reference(features_dir: Path, bundle, model_version: str | int, config, *, task: str) -> Reference:
    """The reference of a served model from its feature tables (`<work>/features/<task>/<site>.parquet`).

    Reads only what it keeps: per site the latest train-split prediction
    times and the held-out rows, sampled; scores them with the bundle.
    """
    files = sorted(Path(features_dir).glob("*.parquet"))
    if not files:
        raise ChronoriskError(f"no feature tables under {features_dir}: run `chronorisk features` first")
    names = list(bundle.spec.feature_names)
    frames = []
    for path in files:
        frame = pl.scan_parquet(path)
        cols = frame.collect_schema().names()
        if "site" not in cols:
            frame = frame.with_columns(pl.lit(path.stem).alias("site"))
        frames.append(_reference_rows(frame, cols, config))
    table = pl.concat(frames, how="diagonal_relaxed")
    trends: dict[str, dict[str, float]] = {}
    for path in files:
        lazy = pl.scan_parquet(path)
        cols = lazy.collect_schema().names()
        if "site" not in cols:
            lazy = lazy.with_columns(pl.lit(path.stem).alias("site"))
        if "split" in cols:
            lazy = lazy.filter(pl.col("split") == "train")
        trends.update(calendar_trends(lazy, names))
    risk = np.asarray(bundle.predict_risk(table), dtype=float) if table.height else np.array([])
    tiers = [str(t) for t in bundle.tier(risk)] if table.height else []
    table = table.with_columns(pl.Series("tier", tiers, dtype=pl.String))
    infos = {n: {"display": i.display, "unit": i.unit} for n, i in bundle.spec.features.items()}
    ref = reference_from_frame(table, risk, task=task, model_version=model_version, feature_names=names,
                               importance=_importance(bundle, names), infos=infos,
                               rows_per_site=config.reference_rows, recent_times=config.reference_recent_times,
                               seed=config.seed, trends=trends)
    return ref


def _reference_rows(frame: pl.LazyFrame, cols: list[str], config) -> pl.DataFrame:
    """Train rows of the latest prediction times, and the held-out rows (each capped, seeded)."""
    split = pl.col("split") if "split" in cols else pl.lit("train")
    train = frame.filter(split == "train")
    if config.reference_recent_times > 0 and "prediction_time" in cols:
        times = (train.select("prediction_time").unique().sort("prediction_time", descending=True)
                 .head(config.reference_recent_times).collect()["prediction_time"])
        train = train.filter(pl.col("prediction_time").is_in(times.implode()))
    held = frame.filter(split != "train")
    parts = []
    for part, cap in ((train, config.reference_rows), (held, max(config.reference_rows, 20000))):
        rows = part.collect()
        if rows.height > cap:
            rows = rows.sample(cap, seed=_seed(config.seed, "reference-rows"))
        parts.append(rows)
    return pl.concat(parts, how="diagonal_relaxed")


def _importance(bundle, names: list[str]) -> dict[str, float]:
    """LightGBM gain per feature (the bundle's own method first); empty when the model says nothing."""
    for attr in ("feature_importance", "importance"):
        fn = getattr(bundle, attr, None)
        if callable(fn):
            try:
                found = fn()
                if isinstance(found, dict):
                    return {str(k): float(v) for k, v in found.items()}
            except TypeError:
                pass
    booster = getattr(bundle, "booster", None)
    if booster is not None and hasattr(booster, "feature_importance"):
        gains = booster.feature_importance(importance_type="gain")
        return {str(n): float(g) for n, g in zip(booster.feature_name(), gains, strict=True)}
    return {n: 0.0 for n in names}


def load_or_build_reference(monitoring_dir: Path, features_dir: Path, model, config, *, task: str,
                            rebuild: bool = False) -> Reference:
    """The cached reference of `model` (a ServedModel: bundle + version), built on first use."""
    folder = Path(monitoring_dir) / "reference" / task / _safe(str(model.version))
    if not rebuild and (folder / _REFERENCE_META).is_file():
        return Reference.load(folder)
    ref = build_reference(features_dir, model.bundle, model.version, config, task=task)
    ref.save(folder)
    return ref


def _sample_per_site(frame: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
    parts = []
    for (site,), part in frame.sort("site").group_by("site", maintain_order=True):
        if part.height > n:
            part = part.sample(n, seed=_seed(seed, "reference", site))
        parts.append(part)
    return pl.concat(parts) if parts else frame


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=4).digest(), "big")


# ----------------------------------------------------------------- site baselines
@dataclass
class FeatureBaseline:
    values: np.ndarray  # non-null reference values (float64), sorted
    n: int  # reference rows (null included)
    missing: float
    lo: float
    hi: float
    outside: float  # reference share outside [lo, hi]
    mean: float
    std: float
    median: float
    presorted: bool = field(default=False, repr=False)

    def __post_init__(self):
        if not self.presorted:
            self.values = np.sort(np.asarray(self.values, dtype=float))


@dataclass
class SiteBaseline:
    site: str
    pooled: bool
    n: int
    features: dict[str, FeatureBaseline]
    risk: np.ndarray
    tiers: dict[str, float]
    performance: dict[str, Any] | None
    calendar: set[str] | None = field(default=None, repr=False)  # calendar_features, once per run


def baseline_from_frame(frame: pl.DataFrame, features: Sequence[str], config, *, site: str, pooled: bool = False,
                        performance: dict[str, Any] | None = None) -> SiteBaseline:
    """Per-feature statistics of a baseline sample (training rows, or a site's recent windows).

    One column-wise sort gives every quantile, median and the sorted values
    the tests need (NaN sorts last; each column's valid prefix is used).
    """
    q = config.out_of_range_quantile
    have = set(frame.columns)
    present = [f for f in features if f in have]
    ordered = np.sort(_feature_matrix(frame, present), axis=0)
    n = ordered.shape[0]
    feats = {}
    if present and n:
        valid = ~np.isnan(ordered)
        count = valid.sum(axis=0)
        # a tail quantile needs a few values beyond it to be estimated at all: widen it for small baselines
        q = np.minimum(np.maximum(q, config.out_of_range_min_tail / np.maximum(count, 1)), 0.25)
        lo, median, hi = (_sorted_quantile(ordered, count, x) for x in (q, 0.5, 1 - q))
        with np.errstate(invalid="ignore", divide="ignore"):  # all-missing columns give NaN, as they should
            mean = np.sum(ordered, axis=0, where=valid) / count  # nanmean / nanstd without their copies
            std = np.sqrt(np.sum(np.square(ordered - mean), axis=0, where=valid) / count)
        margin = config.out_of_range_margin * std  # beyond the quantile by a material distance
        lo, hi = lo - margin, hi + margin
        with np.errstate(invalid="ignore"):
            outside_n = ((ordered < lo) | (ordered > hi)).sum(axis=0)
        for j, f in enumerate(present):
            c = int(count[j])
            feats[f] = FeatureBaseline(ordered[:c, j], n, 1.0 - c / n, float(lo[j]), float(hi[j]),
                                       float(outside_n[j] / c) if c else math.nan,
                                       float(mean[j]), float(std[j]), float(median[j]), presorted=True)
    risk = np.sort(frame["risk"].cast(pl.Float64).to_numpy()) if "risk" in frame.columns else np.array([])
    tiers = _shares(frame["tier"]) if "tier" in frame.columns else {}
    return SiteBaseline(site, pooled, n, feats, risk, tiers, performance)


def _sorted_quantile(ordered: np.ndarray, count: np.ndarray, q) -> np.ndarray:
    """Quantile q (a number or one per column) of each column of a column-sorted matrix.

    Each column has `count` valid (non-NaN) leading values.

    Linear interpolation between order statistics, as numpy's default.
    """
    pos = q * np.maximum(count - 1, 0)
    below = np.floor(pos).astype(np.int64)
    above = np.minimum(below + 1, np.maximum(count - 1, 0))
    cols = np.arange(ordered.shape[1])
    low, high = ordered[below, cols], ordered[above, cols]
    out = low + (high - low) * (pos - below)
    return np.where(count > 0, out, np.nan)


def site_baseline(reference: Reference, site: str, config) -> SiteBaseline:
    """The training baseline of one site (all sites pooled if the model never saw the site)."""
    drift = reference.drift.filter(pl.col("site") == site)
    pooled = drift.height == 0
    if pooled:
        drift = reference.drift
    perf_rows = reference.performance.filter(pl.col("site") == site)
    if perf_rows.height == 0:
        perf_rows = reference.performance
    performance = _performance(perf_rows["outcome"].to_numpy(), perf_rows["risk"].to_numpy(), config)
    return baseline_from_frame(drift, reference.feature_names, config, site=site, pooled=pooled,
                               performance=performance)


def calendar_features(baseline: SiteBaseline, reference: Reference, config) -> set[str]:
    """Features whose mean moved with the calendar inside the training data itself.

    Counts of records, times since first events, 1095-day windows filling up
    after the start of the data, age in a followed cohort: these drift with
    the passage of time, not because something went wrong. Against the
    training reference they are reported but do not count toward the status;
    against the site's recent windows (weeks apart) they count like any other.
    """
    trends = reference.meta.get("trends", {})
    slopes = trends.get(baseline.site) or (_pooled_trends(trends) if baseline.pooled else {})
    out = {f for f in baseline.features if _accumulates(f, reference.infos.get(f))}
    for f, slope in slopes.items():
        b = baseline.features.get(f)
        if b is not None and b.std > 0 and abs(slope) >= config.calendar_trend_sd_per_year * b.std:
            out.add(f)
    return out


def _accumulates(name: str, info: dict | None) -> bool:
    """Grows with the clock by definition: age, time since a first event, counts of everything on record."""
    text = f"{name} {(info or {}).get('display', '')}".lower()
    return _elapsed_days(name, info) is not None or "on record" in text or "on_record" in text


def _pooled_trends(trends: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean slope over sites, for a site the model never saw."""
    merged: dict[str, list[float]] = {}
    for slopes in trends.values():
        for f, v in slopes.items():
            merged.setdefault(f, []).append(v)
    return {f: float(np.mean(v)) for f, v in merged.items()}


def _shares(col: pl.Series) -> dict[str, float]:
    if col.len() == 0:
        return {}
    counts = col.value_counts()
    total = counts["count"].sum()
    return {str(k): round(float(c) / total, 4) for k, c in zip(counts[col.name], counts["count"], strict=True)}


# --------------------------------------------------------------------- the tests
def drift_scorer(method: str):
    """score(reference_sorted, current_sorted) -> drift score of Evidently's method `method`.

    "wasserstein" is Evidently's normed Wasserstein distance (W1 divided by
    the reference's standard deviation, at least 0.001), computed here on the
    sorted samples with the same formula, about ten times faster than through
    Evidently's pandas wrapper; the HTML reports show Evidently's own figure
    (a test checks they agree). Other methods go through Evidently's
    registered StatTest.
    """
    if method == "wasserstein":
        return _normed_wasserstein
    from evidently.legacy.calculations.stattests.registry import get_registered_stattest
    from evidently.legacy.core import ColumnType

    test = get_registered_stattest(method, ColumnType.Numerical)

    def score(reference: np.ndarray, current: np.ndarray) -> float:
        return float(test(_series(reference), _series(current), ColumnType.Numerical, None).drift_score)

    return score


def _normed_wasserstein(ref_sorted: np.ndarray, cur_sorted: np.ndarray) -> float:
    """W1(reference, current) / max(SD(reference), 0.001), both samples sorted."""
    return _wasserstein_and_ks(ref_sorted, cur_sorted)[0]


def _cdf_gap(ref_sorted: np.ndarray, cur_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pooled sorted values and |F_ref - F_cur| at each: what both W1 and the KS statistic are made of.

    The stable sort merges the two sorted runs in linear time (timsort).
    """
    grid = np.sort(np.concatenate([ref_sorted, cur_sorted]), kind="stable")
    gap = np.abs(np.searchsorted(ref_sorted, grid, side="right") / ref_sorted.size
                 - np.searchsorted(cur_sorted, grid, side="right") / cur_sorted.size)
    return grid, gap


def _wasserstein_and_ks(ref_sorted: np.ndarray, cur_sorted: np.ndarray) -> tuple[float, float]:
    """(normed W1, two-sample KS p-value) from one pass over the pooled values: they run thousands of times."""
    grid, gap = _cdf_gap(ref_sorted, cur_sorted)
    w = float(np.dot(gap[:-1], np.diff(grid)) / max(float(np.std(ref_sorted)), 0.001))
    return w, _ks_p_of_gap(float(gap.max()), ref_sorted.size, cur_sorted.size)


def _distance_and_p(wasserstein, ref_sorted: np.ndarray, cur_sorted: np.ndarray) -> tuple[float, float]:
    """The drift score of `wasserstein` (see `drift_scorer`) and the KS p-value; fused for the default method."""
    if wasserstein is _normed_wasserstein:
        return _wasserstein_and_ks(ref_sorted, cur_sorted)
    return wasserstein(ref_sorted, cur_sorted), _ks_p(ref_sorted, cur_sorted)


def screen_features(matrix: np.ndarray, features: Sequence[str], baseline: SiteBaseline) -> dict[str, dict]:
    """Cheap statistics of every feature over the whole window (rows x features, NaN = missing), vectorized."""
    if not features:
        return {}
    n = matrix.shape[0]
    valid = ~np.isnan(matrix)
    present = valid.sum(axis=0)
    with np.errstate(invalid="ignore"):
        sums = np.sum(matrix, axis=0, where=valid)  # nansum without its copy of the window
        lo = np.array([baseline.features[f].lo for f in features])
        hi = np.array([baseline.features[f].hi for f in features])
        out = ((matrix < lo) | (matrix > hi)).sum(axis=0)  # NaN compares False: never out of range
    stats = {}
    for j, f in enumerate(features):
        k = int(present[j])
        stats[f] = {
            "n": k, "missing_share": (n - k) / n if n else math.nan, "mean": float(sums[j] / k) if k else None,
            "out_of_range_share": int(out[j]) / k if k else 0.0, "out_of_range_count": int(out[j]),
        }
    return stats


def _screened(stats: dict[str, dict], baseline: SiteBaseline, config) -> list[str]:
    """Features whose cheap statistics moved by half a drift and beyond chance (p < 0.001): test them fully."""
    flagged = []
    for f, s in stats.items():
        b = baseline.features[f]
        if s["n"] and s["mean"] is not None and b.std > 0:
            z = abs(s["mean"] - b.mean) / (b.std / math.sqrt(s["n"]))
            if abs(s["mean"] - b.mean) / b.std >= config.screen_smd and _normal_sf(z) < 0.001:
                flagged.append(f)
                continue
        if s["n"] and not math.isnan(b.lo):
            p0 = expected_outside(b, config)
            if (s["out_of_range_share"] >= max(2 * p0, p0 + 0.01)
                    and _binomial_p(s["out_of_range_count"], s["n"], p0) < 0.001):
                flagged.append(f)
                continue
        if not math.isnan(b.missing) and abs(s["missing_share"] - b.missing) >= config.missing_share_change / 2:
            n = round(s["n"] / (1 - s["missing_share"])) if s["missing_share"] < 1 else s["n"]
            if _two_proportion_p(s["missing_share"], max(n, 1), b.missing, b.n) < 0.001:
                flagged.append(f)
    return flagged


def _binomial_p(k: int, n: int, p0: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p0)."""
    from scipy.special import bdtrc

    if n == 0 or k <= 0:
        return 1.0
    return float(bdtrc(k - 1, n, min(max(p0, 1e-12), 1 - 1e-12)))


def _normal_sf(z: float) -> float:
    from scipy.special import ndtr

    return float(ndtr(-z))


def _two_proportion_p(p1: float, n1: int, p2: float, n2: int) -> float:
    """Two-sided p-value of a difference of two proportions (pooled z-test)."""
    if n1 == 0 or n2 == 0:
        return 1.0
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    se = math.sqrt(max(pooled * (1 - pooled) * (1 / n1 + 1 / n2), 1e-12))
    return 2 * _normal_sf(abs(p1 - p2) / se)


def judge_feature(
    name: str,
    current: np.ndarray,
    n_rows: int,
    stats: dict,
    baseline: FeatureBaseline,
    config,
    wasserstein,
    values: np.ndarray | None = None,
) -> dict:
    """One feature's drift verdict: scores, which tests fired, and how strongly.

    `current` is the window's (sampled) values, `values` the same without
    missing values, sorted, when the caller has them already; `wasserstein`
    scores the distribution shift (see `drift_scorer`), the two-sample KS
    p-value (asymptotic) its significance, both on the sorted samples because
    they run thousands of times per monitor run.
    """
    if values is None:
        values = np.sort(current[~np.isnan(current)])
    out: dict[str, Any] = {
        "feature": name, "n": int(stats["n"]), "missing_share": _r(stats["missing_share"]),
        "reference_missing_share": _r(baseline.missing), "median": _r(_sorted_median(values)),
        "reference_median": _r(baseline.median), "mean": _r(stats["mean"]), "reference_mean": _r(baseline.mean),
        "reference_range": [_r(baseline.lo), _r(baseline.hi)],
        "out_of_range_share": _r(stats["out_of_range_share"]), "reference_out_of_range_share": _r(baseline.outside),
        "wasserstein": None, "ks_p": None, "kinds": [], "severe": False,
    }
    if values.size >= config.min_feature_rows and baseline.values.size >= config.min_feature_rows:
        w, p = _distance_and_p(wasserstein, baseline.values, values)
        out["wasserstein"], out["ks_p"] = _r(w), _p(p)
        if w >= config.feature_drift_threshold and p < config.significance:
            out["kinds"].append("distribution")
            out["severe"] |= bool(w >= config.severe_drift_threshold and p < config.severe_significance)
    if (stats["n"] >= config.min_feature_rows and not math.isnan(baseline.lo)
            and baseline.values.size >= config.min_feature_rows):
        share = stats["out_of_range_share"]
        outside = values[(values < baseline.lo) | (values > baseline.hi)]
        out["out_of_range_median"] = _r(_sorted_median(outside))
        p0 = expected_outside(baseline, config)
        p_oor = _binomial_p(stats["out_of_range_count"], stats["n"], p0)
        out["out_of_range_p"] = _p(p_oor)
        if share >= max(config.out_of_range_share, 3 * p0) and p_oor < config.significance:
            out["kinds"].append("out_of_range")
            out["severe"] |= bool(share >= config.severe_out_of_range_share and p_oor < config.severe_significance)
    if not math.isnan(baseline.missing):
        p_miss = _two_proportion_p(stats["missing_share"], n_rows, baseline.missing, baseline.n)
        out["missing_p"] = _p(p_miss)
        moved = abs(stats["missing_share"] - baseline.missing)
        if moved >= config.missing_share_change and p_miss < config.significance:
            out["kinds"].append("missingness")
    out["drifted"] = bool(out["kinds"])
    return out


def expected_outside(baseline: FeatureBaseline, config) -> float:
    """The share of new values expected outside the baseline's range if nothing changed.

    At least the baseline's own share, the two tails (each at least
    `out_of_range_min_tail` baseline values), and 2/(n+1): with n baseline
    values, a new one falls beyond their extremes that often (ties at a bound,
    or a small baseline, would otherwise make any value "rare").
    """
    tail = max(config.out_of_range_quantile, config.out_of_range_min_tail / max(baseline.values.size, 1))
    return max(baseline.outside, 2 * min(tail, 0.25), 2 / (baseline.values.size + 1))


def _sorted_median(values: np.ndarray) -> float | None:
    """Median of already sorted values (None when empty)."""
    n = values.size
    if n == 0:
        return None
    return float(values[n // 2]) if n % 2 else float((values[n // 2 - 1] + values[n // 2]) / 2)


def _series(values: np.ndarray):
    import pandas as pd

    return pd.Series(values, copy=False)


def _ks_p(ref_sorted: np.ndarray, cur_sorted: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov p-value (asymptotic distribution) of two sorted samples."""
    return _ks_p_of_gap(float(_cdf_gap(ref_sorted, cur_sorted)[1].max()), ref_sorted.size, cur_sorted.size)


def _ks_p_of_gap(d: float, n: int, m: int) -> float:
    """The asymptotic KS p-value of the largest CDF gap `d` between samples of `n` and `m` values."""
    from scipy.special import kolmogorov

    return float(kolmogorov(math.sqrt(n * m / (n + m)) * d))


def _r(value, digits: int = 4):
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else round(value, digits)


def _p(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else float(f"{value:.3g}")


# ----------------------------------------------------------------- performance
def _performance(outcome: np.ndarray, risk: np.ndarray, config) -> dict[str, Any] | None:
    """AUROC, calibration slope / intercept, ECE and Brier (training/metrics.py definitions); None if too few.

    Each figure carries what its significance test needs (AUROC standard
    error, slope standard error, the ECE's p-value if the model were
    calibrated): weekly windows hold a few hundred outcomes, so AUROC and ECE
    move by chance alone.
    """
    from chronorisk.training import metrics as tm

    y = np.asarray(outcome, dtype=float)
    p = np.clip(np.asarray(risk, dtype=float), 1e-6, 1 - 1e-6)
    positives = int(y.sum())
    if y.size < config.min_outcomes or positives < config.min_positive_outcomes or positives == y.size:
        return None
    auroc = float(tm.auroc(y, p))
    ece = float(tm.ece(y, p))
    return {
        "n": int(y.size), "positives": positives, "prevalence": _r(y.mean()), "mean_risk": _r(p.mean()),
        "auroc": _r(auroc), "auroc_se": _r(_auroc_se(auroc, positives, y.size - positives)),
        "calibration_slope": _r(tm.calibration_slope(y, p)), "calibration_slope_se": _r(_slope_se(y, p)),
        "calibration_intercept": _r(tm.calibration_intercept(y, p)),
        "ece": _r(ece), "ece_null_p": _p(_ece_null_p(ece, p, _seed(config.seed, "ece", y.size, positives))),
        "brier": _r(tm.brier(y, p)),
    }


def _auroc_se(auc: float, n1: int, n0: int) -> float:
    """Standard error of an AUROC (Hanley and McNeil, 1982)."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n1 - 1) * (q1 - auc * auc) + (n0 - 1) * (q2 - auc * auc)) / (n1 * n0)
    return math.sqrt(max(var, 0.0))


def _slope_se(y: np.ndarray, p: np.ndarray) -> float:
    """Standard error of the calibration slope b in logit P(y) = a + b logit(p) (Newton fit, Fisher information)."""
    x = np.log(p / (1 - p))
    design = np.column_stack([np.ones_like(x), x])
    beta = np.array([0.0, 1.0])
    for _ in range(50):  # starts at the identity, where a calibrated model sits
        mu = 1 / (1 + np.exp(-np.clip(design @ beta, -30, 30)))
        info = design.T @ (design * (mu * (1 - mu))[:, None])
        try:
            step = np.linalg.solve(info, design.T @ (y - mu))
        except np.linalg.LinAlgError:
            return math.nan
        beta = beta + step
        if np.max(np.abs(step)) < 1e-8:
            break
    mu = 1 / (1 + np.exp(-np.clip(design @ beta, -30, 30)))
    info = design.T @ (design * (mu * (1 - mu))[:, None])
    try:
        return math.sqrt(float(np.linalg.inv(info)[1, 1]))
    except (np.linalg.LinAlgError, ValueError):
        return math.nan


def _ece_null_p(ece: float, p: np.ndarray, seed: int, draws: int = 200) -> float:
    """P(ECE >= observed) if the model were perfectly calibrated: outcomes drawn from the risks themselves.

    Uses the same equal-mass bins as training/metrics.ece.
    """
    from chronorisk.training.metrics import ece_bins

    bins = ece_bins(p)
    n_bins = int(bins.max()) + 1
    rng = np.random.default_rng(seed)
    resid = (rng.random((draws, p.size)) < p) - p  # (draws, n)
    flat = bins[None, :] + n_bins * np.arange(draws)[:, None]
    per_bin = np.bincount(flat.ravel(), weights=resid.ravel(), minlength=draws * n_bins).reshape(draws, n_bins)
    null = np.abs(per_bin).sum(axis=1) / p.size
    return float((np.sum(null >= ece - 1e-12) + 1) / (draws + 1))


# ------------------------------------------------------------------- a window
@dataclass
class WindowInput:
    """One site's rows in one window, ready to judge."""

    task: str
    site: str
    window: Window
    rows: pl.DataFrame  # features, risk, tier, source, model_version, join_key
    outcomes: pl.DataFrame | None = None  # join_key, outcome (only those known by as_of)
    recent: pl.DataFrame | None = None  # the same site's rows of its previous windows (sampled)
    recent_labels: tuple[str, ...] = ()


def evaluate_window(inp: WindowInput, reference: Reference, baseline: SiteBaseline, config) -> dict[str, Any]:
    """The JSON result of one (site, window): drift vs training and vs recent windows, performance, status."""
    rows = inp.rows
    result: dict[str, Any] = {
        "task": inp.task, "site": inp.site, "window": inp.window.label, "window_kind": inp.window.kind,
        "window_start": inp.window.start.date().isoformat(), "window_end": inp.window.end.date().isoformat(),
        "n_rows": rows.height, "model_versions": _versions(rows), "sources": _sources(rows),
        "reference": {"model_version": reference.model_version, "n_rows": baseline.n,
                      "pooled_sites": baseline.pooled, "time": reference.meta.get("reference_time")},
    }
    performance = _window_performance(inp, baseline, config)
    result["performance"] = performance
    if rows.height < config.min_window_rows:
        result.update(tested=False, data_drift=None, prediction_drift=None, change=None)
        status, reasons = "ok", [f"not tested: {rows.height} rows < min_window_rows {config.min_window_rows}"]
        status, reasons = _merge_performance_status(status, reasons, performance, config)
        result.update(status=status, reasons=reasons)
        return result
    have = set(rows.columns)
    features = [f for f in reference.feature_names if f in have]
    matrix = _feature_matrix(rows, features)
    index = _sample_index(rows.height, config.sample_rows, _seed(config.seed, inp.task, inp.site, inp.window.label))
    sampled = matrix[index] if index is not None else matrix
    risk = rows["risk"].cast(pl.Float64).to_numpy()
    risk = risk[index] if index is not None else risk
    training = baseline
    if baseline.calendar is None:  # fixed per site for the run
        baseline.calendar = calendar_features(baseline, reference, config)
    calendar = baseline.calendar
    recent, aligned, elapsed, column_set = None, matrix, {}, set(features)
    if (inp.recent is not None and len(inp.recent_labels) >= config.recent_min_windows
            and inp.recent.height >= 2 * config.min_window_rows):
        elapsed = {f: d for f, d in reference.elapsed.items() if f in column_set}
        when = inp.window.start
        recent = baseline_from_frame(_align_elapsed(inp.recent, elapsed, when), features, config, site=inp.site)
        aligned = _aligned_matrix(matrix, rows, features, elapsed, when)
    stats = {"training": screen_features(matrix, features, training)}
    if recent is not None:
        stats["recent"] = screen_features(aligned, features, recent)
    rank = reference.rank
    top = sorted(stats["training"], key=rank.__getitem__)[: config.top_features]
    screened = set(_screened(stats["training"], training, config))
    if recent is not None:
        screened |= set(_screened(stats["recent"], recent, config))
    tested = top + sorted(screened - set(top), key=rank.__getitem__)
    column = {f: j for j, f in enumerate(features)}
    wasserstein = drift_scorer(config.stattest)
    batch_share = result["sources"].get("batch", 0.0)
    counts = "all" if batch_share >= config.min_batch_share else "unit changes"
    samples = {"training": sampled, "recent": aligned[index] if index is not None else aligned}
    sorted_values: dict[tuple[str, bool], np.ndarray] = {}  # both comparisons share all but the aligned columns

    def values_of(f: str, which: str) -> tuple[np.ndarray, np.ndarray]:
        current = samples[which][:, column[f]]
        key = (f, which == "recent" and f in elapsed)
        if key not in sorted_values:
            sorted_values[key] = np.sort(current[~np.isnan(current)])
        return current, sorted_values[key]

    def compare(base: SiteBaseline, which: str) -> dict[str, Any]:
        verdicts = []
        for f in tested:
            current, values = values_of(f, which)
            v = judge_feature(f, current, rows.height, stats[which][f], base.features[f], config, wasserstein,
                              values)
            v["display"] = reference.display(f)
            v["importance_rank"] = rank[f]
            hint = _unit_hint(f, v, reference)
            if hint and (v.get("out_of_range_p") or 1.0) < config.severe_significance:
                v["hint"], v["severe"] = hint, True  # values at a known unit factor: a unit change alerts alone
            if which == "training" and f in calendar and v["drifted"] and not v.get("hint"):
                v["calendar"], v["kinds"] = v["kinds"], []  # moved as the clock moves it: reported, not counted
                v["drifted"] = v["severe"] = False
            verdicts.append(v)
        drifted = [v for v in verdicts if v["drifted"]]
        return {
            "method": config.stattest, "threshold": config.feature_drift_threshold,
            "n_features": len(features), "n_tested": len(tested), "n_screened_in": len(set(tested) - set(top)),
            "n_drifted": len(drifted), "drift_share": _r(len(drifted) / len(tested)) if tested else 0.0,
            "drifted_features": [v["feature"] for v in drifted], "features": verdicts,
            "prediction_drift": _prediction_drift(risk, rows, base, config, wasserstein),
        }

    result["tested"] = True
    result["data_drift"] = compare(training, "training")
    result["data_drift"].update(counts=counts, batch_share=_r(batch_share),
                                calendar_features=sorted(calendar & set(tested)),
                                moved_with_calendar=[v["feature"] for v in result["data_drift"]["features"]
                                                     if v.get("calendar")])
    result["prediction_drift"] = result["data_drift"]["prediction_drift"]
    result["change"] = None
    if recent is not None:
        result["change"] = compare(recent, "recent")
        result["change"].update(baseline_windows=list(inp.recent_labels), baseline_rows=recent.n)
    status, reasons = _drift_status(result, config)
    status, reasons = _merge_performance_status(status, reasons, performance, config)
    result.update(status=status, reasons=reasons)
    return result


_AGE_NAME = re.compile(r"(^|_)age(_years)?$|(^|_)age_", re.IGNORECASE)


def _elapsed_days(name: str, info: dict | None) -> float | None:
    """Days per unit of a feature that only the clock moves (time since a first event, age); None otherwise.

    "Time since the last event" is not one: a new event resets it, and the
    scores at visits are exactly the rows where it was just reset.
    """
    info = info or {}
    unit = (info.get("unit") or "").lower()
    text = f"{name} {info.get('display', '')}".lower().replace(" ", "_")
    if "since_first" in text or _AGE_NAME.search(name):
        if unit in ("days", "day", "d") or name.endswith("_days") or "days_since" in name:
            return 1.0
        if unit in ("years", "year", "y") or name.endswith("_years") or "years_since" in name:
            return 365.25
    if "since_first" in text:  # no unit given: the name says
        return 1.0 if "days" in text else 365.25
    return None


def _align_elapsed(frame: pl.DataFrame, elapsed: dict[str, float], when: datetime) -> pl.DataFrame:
    """Elapsed-time features as they would read at `when` (the clock moved on, nothing else did).

    A row scored four weeks earlier had every "days since" four weeks
    shorter and every age four weeks younger: aligning both the window and its
    recent baseline to the window's start keeps the clock from looking like
    drift, while a real change (new patients, new events) still shows.
    """
    have = set(frame.columns)
    cols = [f for f in elapsed if f in have]
    if not cols or "prediction_time" not in frame.columns:
        return frame
    days = (pl.lit(when) - pl.col("prediction_time").cast(pl.Datetime("us"))).dt.total_microseconds() / 86_400e6
    return frame.with_columns([(pl.col(f).cast(pl.Float64) + days / elapsed[f]).alias(f) for f in cols])


def _aligned_matrix(matrix: np.ndarray, rows: pl.DataFrame, features: Sequence[str], elapsed: dict[str, float],
                    when: datetime) -> np.ndarray:
    """`_align_elapsed` on a window's feature matrix: only the elapsed-time columns move (no second conversion)."""
    cols = [j for j, f in enumerate(features) if f in elapsed]
    if not cols or "prediction_time" not in rows.columns:
        return matrix
    days = (when - rows["prediction_time"].cast(pl.Datetime("us"))).dt.total_microseconds().to_numpy() / 86_400e6
    aligned = matrix.copy()
    for j in cols:
        aligned[:, j] += days / elapsed[features[j]]
    return aligned


def _feature_matrix(rows: pl.DataFrame, features: Sequence[str]) -> np.ndarray:
    """Rows x features as float64, missing (null or NaN) as NaN."""
    if not features:
        return np.empty((rows.height, 0))
    return rows.select(pl.col(list(features)).cast(pl.Float64)).to_numpy()  # one expression, not one per column


def _sample_index(n: int, k: int, seed: int) -> np.ndarray | None:
    """Sorted row indices of a seeded sample of k of n rows (None = all rows)."""
    if n <= k:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def _versions(rows: pl.DataFrame) -> dict[str, int]:
    if "model_version" not in rows.columns or rows.height == 0:
        return {}
    counts = rows["model_version"].cast(pl.String).value_counts(sort=True)
    return {str(k): int(c) for k, c in zip(counts["model_version"], counts["count"], strict=True)}


def _sources(rows: pl.DataFrame) -> dict[str, float]:
    """Share of the window's rows per source (batch, api, ...)."""
    if "source" not in rows.columns or rows.height == 0:
        return {"batch": 1.0} if rows.height else {}
    return _shares(rows["source"].cast(pl.String).fill_null("unknown"))


def _prediction_drift(risk: np.ndarray, rows, baseline: SiteBaseline, config, wasserstein) -> dict[str, Any] | None:
    """The risk distribution vs the baseline's: the drift score, KS p-value, tier shares."""
    if baseline.risk.size < config.min_feature_rows:
        return None
    cur = np.sort(risk)
    w, p = _distance_and_p(wasserstein, baseline.risk, cur)
    drifted = bool(w >= config.prediction_drift_threshold and p < config.significance)
    return {
        "method": config.stattest, "threshold": config.prediction_drift_threshold, "wasserstein": _r(w),
        "ks_p": _p(p), "drifted": drifted, "mean_risk": _r(rows["risk"].mean()),
        "reference_mean_risk": _r(baseline.risk.mean()), "median_risk": _r(rows["risk"].median()),
        "reference_median_risk": _r(np.median(baseline.risk)),
        "tiers": _shares(rows["tier"]) if "tier" in rows.columns else {}, "reference_tiers": baseline.tiers,
    }


def _describe(v: dict) -> str:
    parts = []
    if "distribution" in v["kinds"]:
        parts.append(f"distribution shifted by {v['wasserstein']:.2f} SDs (normed Wasserstein)")
    if "out_of_range" in v["kinds"]:
        lo, hi = v["reference_range"]
        parts.append(f"{100 * v['out_of_range_share']:.1f}% of values outside [{_fmt(lo)}, {_fmt(hi)}] "
                     f"(baseline {100 * v['reference_out_of_range_share']:.1f}%)")
    if "missingness" in v["kinds"]:
        parts.append(f"missing {100 * v['missing_share']:.0f}% vs {100 * v['reference_missing_share']:.0f}%")
    if v.get("median") is not None and v.get("reference_median") is not None:
        parts.append(f"median {_fmt(v['median'])} vs {_fmt(v['reference_median'])}")
    text = f"{v['feature']} [{v['display']}]: " + "; ".join(parts)
    return text + (f"; {v['hint']}" if v.get("hint") else "")


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _section_status(section: dict, config, label: str, counts: str) -> tuple[str, list[str], list[dict]]:
    """Status, reasons and the findings that count, of one comparison (vs training or vs recent windows)."""
    drifted = [v for v in section["features"] if v["drifted"]]
    if counts != "all":  # scores at visits differ from the training schedule by design: only unit changes count
        hinted = [v for v in drifted if v.get("hint")]
        if not hinted:
            return "ok", [], []
        return "alert", [f"{label}: values in another unit in " + ", ".join(v["feature"] for v in hinted[:12])], hinted
    severe = [v for v in drifted if v["severe"]]
    share, pd_ = section["drift_share"], section["prediction_drift"]
    status, reasons = "ok", []
    names = ", ".join(v["feature"] for v in drifted[:12]) + (" ..." if len(drifted) > 12 else "")
    for level, limit in (("alert", config.drift_share_alert), ("warning", config.drift_share_warning)):
        if share >= limit:
            status = level
            reasons.append(f"{label}: {len(drifted)} of {section['n_tested']} tested features drifted "
                           f"(share {share:.2f} >= {level} {limit}): {names}")
            break
    if severe:
        status = "alert"
        reasons.append(f"{label}: severe drift in " + ", ".join(v["feature"] for v in severe[:12]))
    if pd_ and pd_["drifted"]:
        status = _worst(status, "alert" if config.prediction_drift_alert else "warning")
        reasons.append(f"{label}: prediction drift, risk distribution shifted by {pd_['wasserstein']:.2f} SDs; "
                       f"mean risk {pd_['mean_risk']:.3f} vs {pd_['reference_mean_risk']:.3f}")
    return status, reasons, (drifted if status != "ok" else [])


def _drift_status(result: dict, config) -> tuple[str, list[str]]:
    """The worse of the two comparisons, reasons first, then the features that made them."""
    dd, ch = result["data_drift"], result.get("change")
    status, reasons, findings = _section_status(dd, config, "vs training", dd.get("counts", "all"))
    summary = [f"vs training: {dd['n_drifted']} of {dd['n_tested']} tested features drifted"
               + ("" if dd.get("counts", "all") == "all" else " (scores at visits: only unit changes count)")]
    moved = dd.get("moved_with_calendar") or []
    if moved:  # say what the clock moved, so that "ok" a year after training is not read as "nothing moved"
        summary[0] += (f", {len(moved)} moved as the calendar moves them (reported, not counted): "
                       + ", ".join(moved[:4]) + (" ..." if len(moved) > 4 else ""))
    if ch is None and config.recent_windows:
        summary.append(f"no recent baseline (needs {config.recent_min_windows} earlier windows, "
                       f"{2 * config.min_window_rows} rows)")
    else:
        label = f"vs the previous {len(ch['baseline_windows'])} windows"
        s2, r2, f2 = _section_status(ch, config, label, "all")
        status, reasons, findings = _worst(status, s2), reasons + r2, findings + f2
        summary.append(f"{label}: {ch['n_drifted']} changed")
    if status == "ok":
        return status, [f"ok: {'; '.join(summary)}"]
    seen, details = set(), []
    for v in sorted(findings, key=lambda v: (not v["severe"], v["importance_rank"])):
        if v["feature"] not in seen:
            seen.add(v["feature"])
            details.append(_describe(v))
    return status, reasons + details[:15]


def _window_performance(inp: WindowInput, baseline: SiteBaseline, config) -> dict[str, Any]:
    keyed = inp.rows.filter(pl.col("join_key").is_not_null()) if "join_key" in inp.rows.columns else inp.rows.head(0)
    out: dict[str, Any] = {"n_scored_with_key": keyed.height, "n_outcomes": 0, "reference": baseline.performance}
    if inp.outcomes is None or inp.outcomes.height == 0 or keyed.height == 0:
        out["status"] = "pending"
        return out
    joined = keyed.select("join_key", "risk").join(inp.outcomes.select("join_key", "outcome"), on="join_key")
    out["n_outcomes"] = joined.height
    metrics = _performance(joined["outcome"].to_numpy(), joined["risk"].to_numpy(), config)
    if metrics is None:
        out["status"] = "pending"
        out["positives"] = int(joined["outcome"].sum()) if joined.height else 0
        return out
    out.update(metrics)
    out["status"] = "evaluated"
    return out


def _performance_findings(perf: dict, config) -> list[tuple[str, str]]:
    """(level, reason) for each performance figure past its threshold AND beyond chance."""
    found: list[tuple[str, str]] = []
    sig = config.performance_significance
    ref = perf.get("reference") or {}
    if ref.get("auroc") is not None:
        drop = ref["auroc"] - perf["auroc"]
        se = math.hypot(perf.get("auroc_se") or 0.0, ref.get("auroc_se") or 0.0)
        p = _normal_sf(drop / se) if se > 0 else (0.0 if drop > 0 else 1.0)
        text = (f"realized AUROC {perf['auroc']:.3f} is {drop:.3f} below the reference {ref['auroc']:.3f} "
                f"(p={p:.2g}, {perf['n']} outcomes)")
        if drop >= config.auroc_drop_alert and p < sig:
            found.append(("alert", text))
        elif drop >= config.auroc_drop_warning and p < sig:
            found.append(("warning", text))
    null_p = perf.get("ece_null_p")
    if null_p is not None and null_p < sig:
        text = f"calibration: ECE {perf['ece']:.3f} (p={null_p:.2g} if calibrated)"
        if perf["ece"] >= config.ece_alert:
            found.append(("alert", text))
        elif perf["ece"] >= config.ece_warning:
            found.append(("warning", text))
    lo, hi = config.calibration_slope_range
    slope, se = perf.get("calibration_slope"), perf.get("calibration_slope_se")
    if slope is not None and se and not lo <= slope <= hi:
        bound = lo if slope < lo else hi
        p = _normal_sf(abs(slope - bound) / se)
        if p < sig:
            found.append(("warning", f"calibration slope {slope:.2f} outside [{lo}, {hi}] (p={p:.2g})"))
    return found


def _merge_performance_status(status: str, reasons: list[str], perf: dict, config) -> tuple[str, list[str]]:
    if perf.get("status") != "evaluated":
        return status, reasons
    found = _performance_findings(perf, config)
    if not found:
        return status, [*reasons, f"performance ok on {perf['n']} outcomes: AUROC {perf['auroc']:.3f}, "
                                  f"ECE {perf['ece']:.3f}, calibration slope {perf['calibration_slope']:.2f}"]
    for level, _text in found:
        status = _worst(status, level)
    if status != "ok" and reasons and reasons[0].startswith("ok:"):
        reasons = reasons[1:]
    return status, [*(t for _, t in found), *reasons]


def _worst(a: str, b: str) -> str:
    return a if _STATUS_RANK[a] >= _STATUS_RANK[b] else b


_UNIT_FACTORS: list[tuple[str, str, str, float]] | None = None


def _unit_hint(feature: str, verdict: dict, reference: Reference) -> str | None:
    """'values look like mmol/L, not mg/dL' when the moved values sit at a known conversion factor.

    The ratio is taken on the values outside the reference range when those
    drifted (a part of the values changed unit), else on the medians.
    """
    if not verdict["drifted"] or not verdict.get("reference_median"):
        return None
    moved = verdict.get("out_of_range_median") if "out_of_range" in verdict["kinds"] else verdict.get("median")
    if moved is None or moved <= 0 or verdict["reference_median"] <= 0:
        return None
    ratio = moved / verdict["reference_median"]
    info = reference.infos.get(feature) or {}
    text = (info.get("display") or feature).lower()
    for keyword, canonical, sent, factor in _unit_factors():
        if keyword not in text or (info.get("unit") and info["unit"] != canonical):
            continue
        if abs(math.log(ratio * factor)) < math.log(1.25):
            return (f"values look like {sent} instead of {canonical} "
                    f"(about 1/{factor:g} of the reference): a unit change?")
    return None


def _unit_factors() -> list[tuple[str, str, str, float]]:
    """(keyword, canonical unit, other unit, factor) of every pure-scale unit conversion in data/codes.py."""
    global _UNIT_FACTORS
    if _UNIT_FACTORS is None:
        from chronorisk.data.codes import MEASUREMENTS

        found = []
        for m in MEASUREMENTS.values():
            for unit, conv in m.conversions.items():
                zero, one = conv(0.0), conv(1.0)
                if abs(zero) < 1e-9 and abs(one - 1.0) > 1e-6:  # a pure scale, not 1:1, not affine
                    found.append((m.display.split()[-1].lower(), m.unit, unit, one))
        _UNIT_FACTORS = found
    return _UNIT_FACTORS


# -------------------------------------------------------------------- HTML report
def save_window_html(path: Path, inp: WindowInput, result: dict, reference: Reference, baseline: SiteBaseline,
                     config) -> str:
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
        elapsed = {f: d for f in cols if (d := _elapsed_days(f, reference.infos.get(f)))}
        ref_frame = _align_elapsed(inp.recent, elapsed, inp.window.start)
        current_rows = _align_elapsed(inp.rows, elapsed, inp.window.start)
    index = _sample_index(inp.rows.height, config.sample_rows,
                          _seed(config.seed, inp.task, inp.site, inp.window.label))
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


# ----------------------------------------------------------------------- the run
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


def run_monitor(prediction_log, reference: Reference, monitoring_dir: Path, config, opts: MonitorOptions) -> dict:
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
            fingerprint = _hash(config_key, data.window.label, data.files_key, outcome_key,
                                *(fp for _, fp in previous))
            history[site].append((data.window.label, fingerprint))
            latest[site] = (data, fingerprint)
            json_path = reports / _safe(site) / f"{data.window.label}.json"
            if not opts.force and _unchanged(json_path, fingerprint, opts.html):
                skipped += 1
                continue
            if site not in baselines:
                baselines[site] = site_baseline(reference, site, config)
            inp = _window_input(prediction_log, opts.task, site, data, previous_windows, outcomes, config)
            result = evaluate_window(inp, reference, baselines[site], config)
            result["fingerprint"] = fingerprint
            result["html"] = None
            if opts.html == "all" or (opts.html == "flagged" and result["status"] != "ok"):
                result["html_against"] = save_window_html(json_path.with_suffix(".html"), inp, result, reference,
                                                          baselines[site], config)
                result["html"] = json_path.with_suffix(".html").name
            write_text_atomic(json_path, _dump(result))
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
        ident = [f"{p.parent.name}/{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(paths)]
        out.append(_WindowData(window, start, end, _hash(str(start), str(end), *ident)))
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
        rows = _dedupe(prediction_log.scan(task, data.start, data.end).collect())
        data.sites = {str(s): part for (s,), part in rows.group_by("site")} if rows.height else {}
    return data.sites


def _window_input(prediction_log, task: str, site: str, data: _WindowData, previous: list[_WindowData],
                  outcomes: pl.DataFrame, config) -> WindowInput:
    rows = _rows(prediction_log, task, data).get(site, pl.DataFrame())
    recent_parts, labels = [], []
    per_window = -(-config.recent_rows // max(len(previous), 1))  # the recent baseline holds <= recent_rows rows
    for old in previous:
        part = _rows(prediction_log, task, old).get(site)
        if part is not None and part.height:
            index = _sample_index(part.height, per_window, _seed(config.seed, "recent", site, old.window.label))
            recent_parts.append(part[index] if index is not None else part)
            labels.append(old.window.label)
    recent = pl.concat(recent_parts, how="diagonal_relaxed") if recent_parts else None
    return WindowInput(task, site, Window(data.start, data.end, data.window.kind), rows,
                       _window_outcomes(rows, outcomes), recent, tuple(labels))


def _ensure_latest_html(prediction_log, reference, reports, latest, windows, outcomes, baselines, config,
                        opts) -> None:
    """The window that gives each site its status (its latest tested one) always has its HTML report."""
    by_label = {w.window.label: i for i, w in enumerate(windows)}
    for site in latest:
        results = []
        for path in (reports / _safe(site)).glob("*.json"):
            r = json.loads(path.read_text())
            if r.get("window_kind") == opts.kind and r["window"] in by_label:
                results.append(r)
        if not results:
            continue
        results.sort(key=lambda r: r["window_start"])
        tested = [r for r in results if r.get("tested")]
        result = tested[-1] if tested else results[-1]
        json_path = reports / _safe(site) / f"{result['window']}.json"
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
        write_text_atomic(json_path, _dump(result))


def _dump(result: dict) -> str:
    """A window's JSON: compact (hundreds of windows, each listing every tested feature), keys sorted."""
    return json.dumps(result, sort_keys=True, separators=(",", ":")) + "\n"


def _day_of(path: Path) -> date | None:
    try:
        return date.fromisoformat(path.parent.name.removeprefix("date="))
    except ValueError:
        return None


def _dedupe(rows: pl.DataFrame) -> pl.DataFrame:
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


def _config_fingerprint(config) -> str:
    dump = config.model_dump(mode="json") if hasattr(config, "model_dump") else vars(config)
    return json.dumps({"v": MONITOR_VERSION, **dump}, sort_keys=True, default=str)


def _hash(*parts: str) -> str:
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


def _safe(site: str) -> str:
    text = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in site)
    if not text or text.startswith("."):
        raise InputError("site", f"{site!r} cannot name a report folder")
    return text


# ----------------------------------------------------------------------- summary
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
            shares = _shares_of(last)
            sites[site] = {
                "status": last["status"], "window": last["window"], "reasons": last["reasons"],
                "n_rows": last["n_rows"], "tested": last.get("tested", False), **shares,
                "report_json": f"reports/{folder.parent.name}/{folder.name}/{last['window']}.json",
                "report_html": (f"reports/{folder.parent.name}/{folder.name}/{last['html']}"
                                if last.get("html") else None),
                "last_not_ok": next((r["window"] for r in reversed(results) if r["status"] != "ok"), None),
                "history": [_history_row(r, folder) for r in results],
                "performance_to_date": _performance_to_date(results),
            }
    counts = {s: sum(1 for v in sites.values() if v["status"] == s) for s in STATUSES}
    return {"window_kind": kind, "sites": sites, "status_counts": counts}


def _history_row(r: dict, folder: Path) -> dict:
    perf = r.get("performance") or {}
    return {
        "window": r["window"], "window_start": r["window_start"], "status": r["status"], "n_rows": r["n_rows"],
        "tested": r.get("tested", False), **_shares_of(r),
        "mean_risk": (r.get("prediction_drift") or {}).get("mean_risk"),
        "n_outcomes": perf.get("n_outcomes", 0), "auroc": perf.get("auroc"), "ece": perf.get("ece"),
        "calibration_slope": perf.get("calibration_slope"),
        "reference_auroc": (perf.get("reference") or {}).get("auroc"),
        "html": f"reports/{folder.parent.name}/{folder.name}/{r['html']}" if r.get("html") else None,
        "json": f"reports/{folder.parent.name}/{folder.name}/{r['window']}.json",
        "reasons": r["reasons"][:3],
    }


def _shares_of(r: dict) -> dict[str, Any]:
    """The figures the page, the summary and the gauges show of one window.

    `drift_share` is the larger of the comparisons that count toward the
    status (training when the window's scores follow the training schedule,
    and the recent windows); `drifted_features` are the features they found.
    """
    dd, ch = r.get("data_drift") or {}, r.get("change") or {}
    counting = [x for x in (dd if dd.get("counts", "all") == "all" else {}, ch) if x]
    hinted = [v["feature"] for v in dd.get("features", []) if v.get("hint")] if dd.get("counts") != "all" else []
    drifted = list(dict.fromkeys([*(f for x in counting for f in x.get("drifted_features", [])), *hinted]))
    shares = [x["drift_share"] for x in counting if x.get("drift_share") is not None]
    pdrift = [x["prediction_drift"]["wasserstein"] for x in counting if x.get("prediction_drift")]
    return {
        "drift_share": max(shares) if shares else (0.0 if r.get("tested") else None),
        "drifted_features": drifted,
        "training_drift_share": dd.get("drift_share"), "change_share": ch.get("drift_share"),
        "prediction_drift": max(pdrift) if pdrift else None,
    }


def _performance_to_date(results: list[dict]) -> dict | None:
    evaluated = [r["performance"] for r in results if (r.get("performance") or {}).get("status") == "evaluated"]
    if not evaluated:
        return None
    n = sum(p["n"] for p in evaluated)
    return {
        "windows": len(evaluated), "n": n,
        "auroc_weighted": _r(sum(p["auroc"] * p["n"] for p in evaluated) / n),
        "ece_weighted": _r(sum(p["ece"] * p["n"] for p in evaluated) / n),
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
                status = _worst(status, site["status"])
    return status


def load_summary(monitoring_dir: Path) -> dict:
    path = Path(monitoring_dir) / "summary.json"
    if not path.is_file():
        return {"tasks": {}}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {"tasks": {}}


# ---------------------------------------------------------------------- Prometheus
_GAUGES = {
    "chronorisk_monitor_drifted_feature_share": "Share of tested features that drifted, latest window per site",
    "chronorisk_monitor_status": "Monitoring status of the latest window per site: 0 ok, 1 warning, 2 alert",
    "chronorisk_monitor_prediction_drift": "Normed Wasserstein distance of the risk distribution vs the reference",
    "chronorisk_monitor_realized_auroc": "Realized AUROC of the latest window with enough outcomes",
}


def metric_families(summary: dict) -> list:
    """Prometheus gauge families from a summary (latest window of each task, kind and site)."""
    from prometheus_client.core import GaugeMetricFamily

    fams = {name: GaugeMetricFamily(name, doc, labels=["task", "site", "window"]) for name, doc in _GAUGES.items()}
    for task, kinds in sorted(summary.get("tasks", {}).items()):
        for kind, section in sorted(kinds.items()):
            for site, s in sorted(section.get("sites", {}).items()):
                labels = [task, site, kind]
                fams["chronorisk_monitor_status"].add_metric(labels, _STATUS_RANK[s["status"]])
                if s.get("drift_share") is not None:
                    fams["chronorisk_monitor_drifted_feature_share"].add_metric(labels, s["drift_share"])
                if s.get("prediction_drift") is not None:
                    fams["chronorisk_monitor_prediction_drift"].add_metric(labels, s["prediction_drift"])
                aurocs = [h["auroc"] for h in s.get("history", []) if h.get("auroc") is not None]
                if aurocs:
                    fams["chronorisk_monitor_realized_auroc"].add_metric(labels, aurocs[-1])
    return list(fams.values())


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
