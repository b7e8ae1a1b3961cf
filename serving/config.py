"""Typed configuration of scoring, serving and monitoring, parsed from params.yaml."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class CdsClient(BaseModel):
    """An EHR calling the CDS Hooks service: it signs its JWTs with the private half of `public_key_file`."""

    model_config = ConfigDict(extra="forbid")

    iss: str = Field(min_length=1, description="the client's issuer (`iss` of its JWTs)")
    public_key_file: str = Field(description="PEM public key of the client (outside the repo)")
    algorithms: list[Literal["RS384", "ES384", "RS256", "ES256", "RS512", "ES512"]] = Field(
        default_factory=lambda: ["RS384", "ES384"], min_length=1, description="accepted JWT algorithms"
    )
    role: Literal["gp", "public_health", "data_scientist", "mlops", "admin"] = Field(
        "gp", description="the role the client's users act in (it must read patients: gp or admin)"
    )
    site: str | None = Field(None, description="the site whose patients it reads (required for gp)")

    @model_validator(mode="after")
    def _gp_has_site(self) -> CdsClient:
        if self.role == "gp" and not self.site:
            raise ValueError(f"client {self.iss!r}: a gp client needs a site")
        return self


class ServeConfig(BaseModel):
    """Scoring, the risk service and its pages (`serve:` in params.yaml)."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(3000, ge=1, le=65535)
    workers: int = Field(2, ge=1, le=64, description="BentoML worker processes")
    store_url: str | None = Field(None, description="score store URL; default SQLite in the work folder")
    tasks: list[str] = Field(default_factory=lambda: ["complication_1y", "onset_2y"])
    model_source: Literal["registry", "folder"] = Field(
        "registry", description="champion models from the MLflow registry, or an exported folder"
    )
    model_dir: str | None = Field(None, description="exported models: <model_dir>/<task>/ (model_source: folder)")
    model_alias: str = "champion"
    max_payload_mb: float = Field(5.0, gt=0)
    keepalive_max_requests: int = Field(
        25, ge=0, description="most answers on one keep-alive connection before the server closes it (each "
        "connection draws its quota between half this and this; 0: never); the client's next connection may go "
        "to another worker, which keeps the workers evenly loaded"
    )
    max_events: int = Field(200_000, ge=1, description="events per /score request")
    small_cell: int = Field(10, ge=1, description="aggregate counts below this are suppressed")
    cohort_row_limit: int = Field(5000, ge=1, description="rows in a JSON cohort answer (exports are complete)")
    explain_tiers: list[Literal["low", "medium", "high"]] = Field(
        default_factory=lambda: ["medium", "high"], description="tiers whose factors batch scoring stores"
    )
    secret_env: str = Field("CHRONORISK_SERVE_SECRET", description="env var holding the signing secret")
    secret_file: str | None = Field(None, description="file holding the signing secret (outside the repo)")
    session_hours: float = Field(8.0, gt=0, description="lifetime of a signed page session")
    key_cache_seconds: float = Field(2.0, ge=0, description="how long a worker trusts a key lookup")
    public_url: str | None = Field(
        None, description="the service's URL as clients see it (links, CDS Hooks audience); default: the request's"
    )
    pseudonym_key_env: str = Field(
        "CHRONORISK_PSEUDONYM_KEY", description="env var of the ingestion's pseudonymization key (CDS Hooks ids)"
    )
    cds_clients: list[CdsClient] = Field(default_factory=list, description="EHRs allowed to call the CDS Hooks service")
    display_units: dict[str, str] = Field(
        default_factory=dict, description="measurements shown in the site's unit, e.g. {glucose: mmol/L, "
        "hba1c: mmol/mol} (explanations, cards, RiskAssessment notes, recent values)"
    )
    cds_cache_records: int = Field(
        2000, ge=0, description="prefetched records whose scores a worker keeps for the day (0: score every call)"
    )

    @field_validator("rate_limit_storage")
    @classmethod
    def _counters_named(cls, value: str) -> str:
        if value != "store" and "://" not in value:
            raise ValueError(f"{value!r} is neither 'store' nor a `limits` storage URL (redis://..., memory://)")
        return value

    @model_validator(mode="after")
    def _units_shown(self) -> ServeConfig:
        _check_display_units(self)
        return self
    # security and privacy (README, security section)
    cookie_secure: Literal["auto", "always", "never"] = Field(
        "auto", description="Secure attribute of the session cookie: auto = when the request came over HTTPS")
    metrics_access: Literal["key", "open"] = Field(
        "key", description="/metrics needs an ops key (mlops, admin); open only behind a private bind or firewall")
    auth_failures_per_minute: int = Field(10, ge=1, description="failed keys or sign-ins per client address")
    key_lockout_failures: int = Field(5, ge=1, description="failures on one key id that lock it")
    key_lockout_minutes: int = Field(15, ge=1, description="window of those failures, and lockout length")
    rate_limit_storage: str = Field(
        "store", description="where failed-authentication counters live: store (the score store's database, "
        "shared by every worker), or a `limits` storage URL (redis://... shared, memory:// per worker)")
    audit_checkpoint_files: list[str] = Field(
        default_factory=list, description="more append-only checkpoint files beside <work>/audit/checkpoints.jsonl")
    k_anonymity: int = Field(10, ge=2, description="every quasi-identifier group of an export holds >= k rows")
    export_max_suppressed_share: float = Field(
        0.05, ge=0, le=1, description="generalize further while more rows than this would be suppressed")
    dp_epsilon: float = Field(0.5, gt=0, le=10, description="epsilon of one aggregate release")
    dp_budget: float = Field(5.0, gt=0, description="epsilon an analyst may spend per dp_budget_days")
    dp_budget_days: int = Field(30, ge=1, description="period of the privacy budget")


def _check_display_units(config: ServeConfig) -> None:
    if not config.display_units:  # nothing to check: spares every command (ingest too) importing numpy here
        return
    from chronorisk.errors import InputError
    from chronorisk.serving.explanations import site_units

    try:
        site_units(config.display_units)
    except InputError as exc:
        raise ValueError(str(exc)) from None


def resolve_store_url(params, work, override: str | None = None) -> str:
    """The score store URL: an explicit one, else $CHRONORISK_STORE_URL, else serve.store_url, else
    SQLite in the work folder."""
    import os

    from chronorisk.paths import WorkPaths

    return override or os.environ.get("CHRONORISK_STORE_URL") or params.serve.store_url or WorkPaths(work).store_url


class MonitorConfig(BaseModel):
    """Drift and performance monitoring (`monitor:` in params.yaml); see docs/monitoring.md."""

    model_config = ConfigDict(extra="forbid")

    window: Literal["week", "day"] = Field("week", description="monitoring window of prediction times")
    html: Literal["flagged", "all", "none"] = Field(
        "flagged", description="Evidently HTML for windows not ok plus each site's latest (flagged), every window, none"
    )
    html_features: int = Field(
        8, ge=1, description="feature columns of an HTML report: drifted ones first (rendering costs ~0.3 s each)"
    )
    # status of a (site, window)
    drift_share_warning: float = Field(0.15, ge=0, le=1, description="drifted share of tested features: warning")
    drift_share_alert: float = Field(0.30, ge=0, le=1, description="drifted share of tested features: alert")
    prediction_drift_alert: bool = Field(True, description="a drifted risk distribution is an alert (else warning)")
    min_window_rows: int = Field(
        50, ge=1, description="windows with fewer rows are reported 'not tested' (each test also needs significance)"
    )
    # which features are tested, on how many rows
    top_features: int = Field(20, ge=1, description="most important features always tested with Evidently")
    screen_smd: float = Field(0.1, gt=0, description="polars screen: standardized mean shift that adds a feature")
    sample_rows: int = Field(5000, ge=100, description="current rows per window for the tests (seeded sample)")
    reference_rows: int = Field(5000, ge=100, description="training reference rows per site (seeded sample)")
    reference_recent_times: int = Field(
        2, ge=0, description="reference = latest N prediction times of the train split (0 = all)"
    )
    seed: int = Field(0, description="seed of the reference and window samples")
    calendar_trend_sd_per_year: float = Field(
        0.1, ge=0, description="features whose training mean moved this many SDs a year: judged vs recent windows only"
    )
    recent_windows: int = Field(
        4, ge=0, description="earlier windows of a site pooled as its recent baseline (0 = off)"
    )
    recent_rows: int = Field(2000, ge=100, description="rows of the recent baseline (seeded, spread over its windows)")
    recent_min_windows: int = Field(
        2, ge=1, description="earlier windows (and 2 x min_window_rows) a recent baseline needs"
    )
    min_batch_share: float = Field(
        0.5, ge=0, le=1, description="batch share of a window's rows for all its training-drift findings to count"
    )
    # per-feature tests: each needs an effect size and significance
    stattest: Literal["wasserstein", "psi", "jensenshannon", "hellinger", "kl_div", "ed"] = Field(
        "wasserstein", description="Evidently drift method for numeric columns (a distance: drift when >= threshold)"
    )
    feature_drift_threshold: float = Field(0.3, gt=0, description="normed Wasserstein (reference SDs) of a drift")
    severe_drift_threshold: float = Field(1.0, gt=0, description="normed Wasserstein that alerts on its own")
    prediction_drift_threshold: float = Field(0.25, gt=0, description="normed Wasserstein of the risk distribution")
    impossible_share: float = Field(
        0.05, gt=0, le=1, description="share of a code's values dropped as impossible (and significantly above "
        "training's) that alerts"
    )
    significance: float = Field(1e-4, gt=0, lt=1, description="p-value a shift must also reach (KS, binomial, z)")
    severe_significance: float = Field(
        1e-8, gt=0, lt=1, description="p-value a single feature needs to alert on its own (severe, unit change)"
    )
    out_of_range_quantile: float = Field(0.005, gt=0, lt=0.5, description="reference range = [q, 1 - q] quantiles")
    out_of_range_margin: float = Field(
        0.1, ge=0, description="the range reaches this many reference SDs beyond the quantiles (a minimum effect)"
    )
    out_of_range_min_tail: int = Field(
        5, ge=1, description="baseline values beyond each bound at least (small baselines get a wider range)"
    )
    out_of_range_share: float = Field(0.04, gt=0, le=1, description="share outside the reference range: drift")
    severe_out_of_range_share: float = Field(0.10, gt=0, le=1, description="share outside the range: alert alone")
    missing_share_change: float = Field(0.10, gt=0, le=1, description="absolute change of the missing share")
    min_feature_rows: int = Field(30, ge=5, description="non-missing values a distribution test needs")
    # realized performance once outcomes arrive
    min_outcomes: int = Field(200, ge=10, description="outcomes a window needs before its performance is judged")
    min_positive_outcomes: int = Field(10, ge=1, description="positive outcomes needed too")
    auroc_drop_warning: float = Field(0.05, ge=0, description="AUROC below the reference by this much: warning")
    auroc_drop_alert: float = Field(0.10, ge=0, description="AUROC below the reference by this much: alert")
    ece_warning: float = Field(0.05, ge=0, description="expected calibration error: warning")
    ece_alert: float = Field(0.10, ge=0, description="expected calibration error: alert")
    calibration_slope_range: tuple[float, float] = Field((0.7, 1.4), description="calibration slope outside: warning")
    performance_significance: float = Field(
        0.001, gt=0, lt=1, description="p-value a performance finding must reach (AUROC drop, ECE, slope)"
    )

    # performance estimated without labels (confidence-based, serving/monitoring/estimate.py)
    estimate_min_rows: int = Field(100, ge=10, description="rows a window needs for a label-free estimate")
    estimate_draws: int = Field(
        200, ge=20, le=5000, description="outcome draws from the risks for the estimate's spread (seeded)"
    )
    estimated_auroc_floor: float | None = Field(
        None, ge=0.5, le=1, description="label-free AUROC estimate below this: warning, below beyond chance: alert"
    )

    @model_validator(mode="after")
    def _ordered(self) -> MonitorConfig:
        pairs = [("drift_share_warning", "drift_share_alert"), ("auroc_drop_warning", "auroc_drop_alert"),
                 ("ece_warning", "ece_alert"), ("feature_drift_threshold", "severe_drift_threshold"),
                 ("out_of_range_share", "severe_out_of_range_share")]
        for low, high in pairs:
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low} ({getattr(self, low)}) must not exceed {high} ({getattr(self, high)})")
        lo, hi = self.calibration_slope_range
        if not 0 < lo < hi:
            raise ValueError(f"calibration_slope_range must be two increasing positive numbers, got {lo}, {hi}")
        return self
