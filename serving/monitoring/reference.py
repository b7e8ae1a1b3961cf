"""What a model was trained on, per site (`Reference`), the baselines windows are judged against,
and which features the clock moves (`clock_driven`)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from chronorisk.data.files import atomic_output, write_text_atomic
from chronorisk.errors import ChronoriskError, InputError
from chronorisk.features.families import DAYS_PER_YEAR
from chronorisk.serving.monitoring.inputs import input_code_reference
from chronorisk.serving.monitoring.statistics import realized_performance, seed_of, shares
from chronorisk.serving.monitoring.windows import safe_name

if TYPE_CHECKING:
    from chronorisk.serving.config import MonitorConfig


_REFERENCE_FILE = "reference.parquet"


REFERENCE_META = "reference.json"


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
        """Days per unit of each feature only the clock moves (see `clock_driven`), computed once."""
        return self.clock.elapsed

    @property
    def clock(self) -> ClockDriven:
        """The clock-driven features of this reference's infos (`clock_driven`), computed once."""
        if getattr(self, "_clock", None) is None:
            names = set(self.feature_names)
            self._clock = clock_driven({f: i for f, i in self.infos.items() if f in names})
        return self._clock

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
        write_text_atomic(folder / REFERENCE_META, json.dumps(meta, indent=1, sort_keys=True))

    @classmethod
    def load(cls, folder: Path) -> Reference:
        try:
            meta = json.loads((folder / REFERENCE_META).read_text())
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
    tiers: Mapping[str, float] | None = None,
) -> Reference:
    """The reference from a scored feature table (site, split, prediction_time, boolean_value, features).

    Drift rows: train split, latest `recent_times` prediction times (0 = all),
    at most `rows_per_site` per site (seeded). Performance rows: the other
    splits (held out from training) with their outcome; the train split when
    there is no other. `trends` (per site, feature: change of the mean per
    year over the train split's prediction times) default to the frame's own.
    `tiers` are the model's tier thresholds (name: lowest risk of the tier), for
    the label-free sensitivity and PPV at each.
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
                  .with_columns(pl.col("prediction_time").rank("dense", descending=True).over("site").alias("_rank"))
                  .filter(pl.col("_rank") <= recent_times).drop("_rank"))
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
            "tiers": {str(k): float(v) for k, v in (tiers or {}).items()},
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


def build_reference(features_dir: Path, bundle, model_version: str | int, config: MonitorConfig, *,
                    task: str) -> Reference:
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
    infos = feature_infos(bundle.spec)
    ref = reference_from_frame(table, risk, task=task, model_version=model_version, feature_names=names,
                               importance=_importance(bundle, names), infos=infos,
                               rows_per_site=config.reference_rows, recent_times=config.reference_recent_times,
                               seed=config.seed, trends=trends, tiers=bundle.tiers.model_dump())
    ref.meta["input_codes"] = input_code_reference(bundle.spec)
    return ref


def feature_infos(spec) -> dict[str, dict[str, Any]]:
    """What the reference keeps of each feature's meaning: display, unit, kind, aggregate, window, clock."""
    clock = set(spec.clock_features())
    return {
        n: {"display": i.display, "unit": i.unit, "kind": i.kind, "aggregate": i.aggregate,
            "window_days": i.window_days, "grows_with_clock": n in clock}
        for n, i in spec.features.items()
    }


def _reference_rows(frame: pl.LazyFrame, cols: list[str], config: MonitorConfig) -> pl.DataFrame:
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
            rows = rows.sample(cap, seed=seed_of(config.seed, "reference-rows"))
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


def load_or_build_reference(monitoring_dir: Path, features_dir: Path, model, config: MonitorConfig, *, task: str,
                            rebuild: bool = False) -> Reference:
    """The cached reference of `model` (a ServedModel: bundle + version), built on first use."""
    folder = Path(monitoring_dir) / "reference" / task / safe_name(str(model.version))
    if not rebuild and (folder / REFERENCE_META).is_file():
        ref = Reference.load(folder)
        if "input_codes" not in ref.meta:  # cached before impossible values were monitored: add them
            ref.meta["input_codes"] = input_code_reference(model.bundle.spec)
        return ref
    ref = build_reference(features_dir, model.bundle, model.version, config, task=task)
    ref.save(folder)
    return ref


def _sample_per_site(frame: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
    parts = []
    for (site,), part in frame.sort("site").group_by("site", maintain_order=True):
        if part.height > n:
            part = part.sample(n, seed=seed_of(seed, "reference", site))
        parts.append(part)
    return pl.concat(parts) if parts else frame


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


def baseline_from_frame(frame: pl.DataFrame, features: Sequence[str], config: MonitorConfig, *, site: str,
                        pooled: bool = False,
                        performance: dict[str, Any] | None = None) -> SiteBaseline:
    """Per-feature statistics of a baseline sample (training rows, or a site's recent windows).

    One column-wise sort gives every quantile, median and the sorted values
    the tests need (NaN sorts last; each column's valid prefix is used).
    """
    q = config.out_of_range_quantile
    have = set(frame.columns)
    present = [f for f in features if f in have]
    ordered = np.sort(feature_matrix(frame, present), axis=0)
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
    tiers = shares(frame["tier"]) if "tier" in frame.columns else {}
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


def site_baseline(reference: Reference, site: str, config: MonitorConfig) -> SiteBaseline:
    """The training baseline of one site (all sites pooled if the model never saw the site)."""
    drift = reference.drift.filter(pl.col("site") == site)
    pooled = drift.height == 0
    if pooled:
        drift = reference.drift
    perf_rows = reference.performance.filter(pl.col("site") == site)
    if perf_rows.height == 0:
        perf_rows = reference.performance
    performance = realized_performance(perf_rows["outcome"].to_numpy(), perf_rows["risk"].to_numpy(), config)
    return baseline_from_frame(drift, reference.feature_names, config, site=site, pooled=pooled,
                               performance=performance)


def calendar_features(baseline: SiteBaseline, reference: Reference, config: MonitorConfig) -> set[str]:
    """Features whose mean moved with the calendar inside the training data itself.

    Counts of records, times since first events, 1095-day windows filling up
    after the start of the data, age in a followed cohort: these drift with
    the passage of time, not because something went wrong. Against the
    training reference they are reported but do not count toward the status;
    against the site's recent windows (weeks apart) they count like any other.
    """
    trends = reference.meta.get("trends", {})
    slopes = trends.get(baseline.site) or (_pooled_trends(trends) if baseline.pooled else {})
    out = {f for f in baseline.features if f in reference.clock.accumulating}
    for f, slope in slopes.items():
        b = baseline.features.get(f)
        if b is not None and b.std > 0 and abs(slope) >= config.calendar_trend_sd_per_year * b.std:
            out.add(f)
    return out


def _pooled_trends(trends: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean slope over sites, for a site the model never saw."""
    merged: dict[str, list[float]] = {}
    for slopes in trends.values():
        for f, v in slopes.items():
            merged.setdefault(f, []).append(v)
    return {f: float(np.mean(v)) for f, v in merged.items()}


def clock_driven(infos: Mapping[str, Mapping[str, Any]]) -> ClockDriven:
    """The features the clock moves with no new event, from the FeatureSpec's meaning of each feature.

    The one place monitoring decides it. `grows_with_clock` (FeatureSpec's
    `clock_features()`) marks ages and times since an event; of those, a
    time since the *last* event (`aggregate` days_since_last) is reset by
    every new event, and scores at visits are exactly the rows where it was
    just reset, so only ages and times since a *first* event are aligned to
    the window's start (`elapsed`, days per unit). Counts of everything on
    record (kind `count`, no look-back window) also only grow: with the
    elapsed ones they are `accumulating`, reported against the training
    reference but not counted toward its status. Infos without these fields
    (references built before spec version 2) mark nothing.
    """
    elapsed: dict[str, float] = {}
    accumulating = set()
    for name, info in infos.items():
        if info.get("grows_with_clock") and info.get("aggregate") != "days_since_last":
            elapsed[name] = DAYS_PER_YEAR if str(info.get("unit", "")).lower() in ("years", "year") else 1.0
            accumulating.add(name)
        elif info.get("kind") == "count" and info.get("window_days") is None:
            accumulating.add(name)
    return ClockDriven(elapsed, frozenset(accumulating))


@dataclass(frozen=True)
class ClockDriven:
    """What `clock_driven` found: features aligned to a window's start, and features that only accumulate."""

    elapsed: dict[str, float]  # days per unit: ages (years) and times since a first event
    accumulating: frozenset[str]


def align_elapsed(frame: pl.DataFrame, elapsed: dict[str, float], when: datetime) -> pl.DataFrame:
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


def aligned_matrix(matrix: np.ndarray, rows: pl.DataFrame, features: Sequence[str], elapsed: dict[str, float],
                    when: datetime) -> np.ndarray:
    """`align_elapsed` on a window's feature matrix: only the elapsed-time columns move (no second conversion)."""
    cols = [j for j, f in enumerate(features) if f in elapsed]
    if not cols or "prediction_time" not in rows.columns:
        return matrix
    days = (when - rows["prediction_time"].cast(pl.Datetime("us"))).dt.total_microseconds().to_numpy() / 86_400e6
    aligned = matrix.copy()
    for j in cols:
        aligned[:, j] += days / elapsed[features[j]]
    return aligned


def feature_matrix(rows: pl.DataFrame, features: Sequence[str]) -> np.ndarray:
    """Rows x features as float64, missing (null or NaN) as NaN."""
    if not features:
        return np.empty((rows.height, 0))
    return rows.select(pl.col(list(features)).cast(pl.Float64)).to_numpy()  # one expression, not one per column
