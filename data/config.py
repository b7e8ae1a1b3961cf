"""Typed configuration of the data stages (`generate`, `ingest`), parsed from params.yaml."""

from __future__ import annotations

from datetime import date
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SiteConfig(_Strict):
    """One site of the synthetic federation; the fields make sites non-IID."""

    site_id: str
    kind: Literal["hospital", "community"]
    share: float = Field(gt=0, description="relative share of patients")
    mean_age: float = Field(ge=18, le=90)
    female_share: float = Field(ge=0, le=1)
    risk_shift: float = Field(0.0, description="log-odds shift of disease hazards (prevalence)")
    outcome_shift: float = Field(0.0, description="log-odds shift of complication hazards (base rate)")
    visits_per_year: float = Field(gt=0)
    missing_rate: float = Field(ge=0, lt=1, description="share of scheduled measurements not recorded")
    diagnosis_vocab: Literal["SNOMED", "ICD10CM"] = "SNOMED"
    glucose_unit: Literal["mg/dL", "mmol/L"] = "mg/dL"
    hba1c_unit: Literal["%", "mmol/mol"] = "%"


class DriftConfig(_Strict):
    site: str
    start: date = Field(alias="from")
    kind: Literal["units", "population", "lab_bias"]


def default_sites() -> list[SiteConfig]:
    return [
        SiteConfig(site_id="hosp_central", kind="hospital", share=0.30, mean_age=58, female_share=0.48,
                   risk_shift=0.3, outcome_shift=0.2, visits_per_year=4.0, missing_rate=0.15),
        SiteConfig(site_id="hosp_east", kind="hospital", share=0.22, mean_age=55, female_share=0.50,
                   risk_shift=0.1, outcome_shift=0.0, visits_per_year=3.5, missing_rate=0.20,
                   glucose_unit="mmol/L", hba1c_unit="mmol/mol"),
        SiteConfig(site_id="chc_riverside", kind="community", share=0.22, mean_age=50, female_share=0.55,
                   risk_shift=0.0, outcome_shift=-0.1, visits_per_year=2.5, missing_rate=0.50),
        SiteConfig(site_id="chc_hillview", kind="community", share=0.16, mean_age=47, female_share=0.52,
                   risk_shift=-0.2, outcome_shift=-0.2, visits_per_year=2.0, missing_rate=0.55,
                   diagnosis_vocab="ICD10CM"),
        SiteConfig(site_id="chc_harbour", kind="community", share=0.10, mean_age=62, female_share=0.58,
                   risk_shift=0.4, outcome_shift=0.3, visits_per_year=2.0, missing_rate=0.48),
    ]


class GenerateConfig(_Strict):
    seed: int = 42
    patients: int = Field(20_000, gt=0)
    start: date = date(2019, 1, 1)
    end: date = date(2025, 12, 31)
    ideal: bool = False
    fhir: bool = False
    chunk_size: int = Field(50_000, gt=0)
    sites: list[SiteConfig] = Field(default_factory=default_sites)
    drift: list[DriftConfig] = Field(default_factory=list)


class IngestConfig(_Strict):
    source: str = "fhir"
    secret_env: str = "CHRONORISK_PSEUDONYM_KEY"
    secret_file: str | None = None
    max_file_mb: float = 64.0
