"""Typed configuration of the data stages (`generate`, `ingest`), parsed from params.yaml."""

from __future__ import annotations

from datetime import date
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SiteConfig(_Strict):
    """One site of the synthetic federation; the fields make sites non-IID.

    `risk_shift` moves the site's risk-factor distributions (BMI, HbA1c, BP,
    smoking: observable) and, in realistic mode only, adds a hidden log-hazard
    shift to diabetes and hypertension onset; `outcome_shift` is the hidden
    log-hazard shift of complications (realistic mode only).
    `visits_per_year` is the routine-visit rate of patients without recorded
    diabetes or hypertension (those with either come 1.5x as often).
    """

    site_id: str = Field(pattern=r"^[a-z][a-z0-9_]{0,39}$")
    kind: Literal["hospital", "community"]
    share: float = Field(gt=0, description="relative share of patients")
    mean_age: float = Field(ge=18, le=90)
    female_share: float = Field(ge=0, le=1)
    risk_shift: float = Field(0.0, ge=-2, le=2, description="log-odds shift of disease hazards (prevalence)")
    outcome_shift: float = Field(0.0, ge=-2, le=2, description="log-odds shift of complication hazards")
    visits_per_year: float = Field(gt=0, le=12)
    missing_rate: float = Field(ge=0, lt=1, description="share of scheduled measurements not recorded")
    diagnosis_vocab: Literal["SNOMED", "ICD10CM"] = "SNOMED"
    glucose_unit: Literal["mg/dL", "mmol/L"] = "mg/dL"
    hba1c_unit: Literal["%", "mmol/mol"] = "%"
    creatinine_unit: Literal["mg/dL", "umol/L"] = "mg/dL"
    cholesterol_unit: Literal["mg/dL", "mmol/L"] = "mg/dL"
    bp_unit: Literal["mm[Hg]", "mmHg"] = "mm[Hg]"
    days_supply: int = Field(90, ge=28, le=180, description="days supplied per medication request")


class DriftConfig(_Strict):
    """Drift injected into one site from a date: see chronorisk.data.synth.drift."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    site: str
    start: date = Field(alias="from")
    kind: Literal["units", "population", "lab_bias"]


def default_sites() -> list[SiteConfig]:
    return [
        SiteConfig(site_id="hosp_central", kind="hospital", share=0.30, mean_age=58, female_share=0.48,
                   risk_shift=0.3, outcome_shift=0.2, visits_per_year=4.0, missing_rate=0.15),
        SiteConfig(site_id="hosp_east", kind="hospital", share=0.22, mean_age=55, female_share=0.50,
                   risk_shift=0.1, outcome_shift=0.0, visits_per_year=3.5, missing_rate=0.20,
                   glucose_unit="mmol/L", hba1c_unit="mmol/mol", creatinine_unit="umol/L",
                   cholesterol_unit="mmol/L"),
        SiteConfig(site_id="chc_riverside", kind="community", share=0.22, mean_age=50, female_share=0.55,
                   risk_shift=0.0, outcome_shift=-0.1, visits_per_year=2.5, missing_rate=0.50,
                   days_supply=30),
        SiteConfig(site_id="chc_hillview", kind="community", share=0.16, mean_age=47, female_share=0.52,
                   risk_shift=-0.2, outcome_shift=-0.2, visits_per_year=2.0, missing_rate=0.55,
                   diagnosis_vocab="ICD10CM", bp_unit="mmHg"),
        SiteConfig(site_id="chc_harbour", kind="community", share=0.10, mean_age=62, female_share=0.58,
                   risk_shift=0.4, outcome_shift=0.3, visits_per_year=2.0, missing_rate=0.50,
                   days_supply=30),
    ]


class GenerateConfig(_Strict):
    """`chronorisk generate`: the synthetic multi-site cohort (docs/generator.md)."""

    seed: int = Field(42, ge=0)
    patients: int = Field(20_000, gt=0)
    start: date = date(2019, 1, 1)
    end: date = date(2025, 12, 31)
    ideal: bool = False
    fhir: bool = False
    realistic_codes: bool = Field(False, description="messy records as real ones (data/synth/messy.py)")
    chunk_size: int = Field(50_000, gt=0, le=1_000_000)
    workers: int = Field(2, ge=1, le=64, description="processes simulating chunks in parallel")
    sites: list[SiteConfig] = Field(default_factory=default_sites, min_length=1)
    drift: list[DriftConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> GenerateConfig:
        if self.start.day != 1:
            raise ValueError(f"start must be the first day of a month, got {self.start}")
        if self.end < date(self.start.year + 3, self.start.month, 1):
            raise ValueError(f"end {self.end} must be at least 3 years after start {self.start}")
        ids = [s.site_id for s in self.sites]
        if len(set(ids)) != len(ids):
            raise ValueError(f"site_id values must be unique, got {ids}")
        for d in self.drift:
            if d.site not in ids:
                raise ValueError(f"drift site {d.site!r} is not one of the sites {ids}")
            if not self.start < d.start <= self.end:
                raise ValueError(f"drift date {d.start} must fall after start {self.start} and by end {self.end}")
        return self


class IngestConfig(_Strict):
    """`chronorisk ingest`: FHIR R4 bundles / NDJSON -> MEDS per site (see data/fhir/)."""

    source: Literal["fhir"] = "fhir"
    secret_env: str = Field("CHRONORISK_PSEUDONYM_KEY", description="env var holding the pseudonymization key")
    secret_file: str | None = Field(None, description="file holding the key (outside the repository)")
    max_file_mb: float = Field(64.0, gt=0, description="largest bundle (decompressed) or NDJSON line read")
    workers: int = Field(2, ge=1, le=64, description="worker processes")
    task_mb: float = Field(8.0, gt=0, description="input bytes per worker task (smaller for small inputs)")
    inline_below_mb: float = Field(
        2.0, ge=0, description="inputs smaller than this run in-process (a pool costs ~1 s to start)"
    )
    flush_rows: int = Field(250_000, gt=0, description="rows a worker holds before spilling to staging")
    light_workers_below_mb: float = Field(
        16.0, ge=0, description="inputs smaller than this: workers hand their rows to the parent, which keeps "
        "them in memory (a worker then never imports polars: ~0.15 s of CPU each)"
    )
    max_text_kib: float = Field(
        64.0, gt=0, description="largest text value written to MEDS (KiB, UTF-8); a record over it is quarantined"
    )
    shard_input_mb: float = Field(
        64.0, gt=0, description="input MB per output shard (subjects are hashed into shards)"
    )
    unassigned_site: str = Field(
        "unassigned", pattern=r"^[A-Za-z0-9_.-]+$",
        description="site of patients none of whose encounters name a known organization",
    )
