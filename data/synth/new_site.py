"""A new region joining late: one site unlike the founding five (`chronorisk generate --new-site`).

The programme's warning case: a model with AUROC 0.85 in one region fell to
0.62 in another. The new site differs from every founding site at once:

- population: older (mean age 64), more women, more disease (risk shift
  +0.5) and, hidden from every recorded feature, more complications for the
  same recorded risk (outcome shift +0.7): the founding sites' model ranks
  its patients but under-predicts their risk, the miscalibration a site
  recalibration has to correct;
- code system: ICD-10-CM diagnoses (the founding hospitals use SNOMED);
- units: SI throughout (glucose and cholesterol mmol/L, HbA1c mmol/mol,
  creatinine umol/L, blood pressure "mmHg");
- care pattern: a community service seen 1.5 times a year, 60% of scheduled
  measurements missing, 30-day prescriptions.

It joins late: its scores and outcomes reach the federation from `JOINS`
on, after the global model was trained on the founding sites (the
new-region benchmark, benchmarks/new_region_bench.py, splits its rows there).
"""

from __future__ import annotations

from datetime import date

from chronorisk.data.config import SiteConfig

NEW_SITE_ID = "chc_newregion"
JOINS = date(2022, 1, 1)  # first prediction time at which the new site's scores and outcomes count
NEW_SITE_SHARE = 0.22  # relative share of patients beside the founding sites' shares (which sum to 1)


def new_site_config() -> SiteConfig:
    """The new region's site: unlike the founding sites in population, code system, units and care pattern."""
    return SiteConfig(
        site_id=NEW_SITE_ID, kind="community", share=NEW_SITE_SHARE, mean_age=64, female_share=0.58,
        risk_shift=0.5, outcome_shift=0.7, visits_per_year=1.5, missing_rate=0.6, diagnosis_vocab="ICD10CM",
        glucose_unit="mmol/L", hba1c_unit="mmol/mol", creatinine_unit="umol/L", cholesterol_unit="mmol/L",
        bp_unit="mmHg", days_supply=30,
    )


def with_new_site(sites: list[dict]) -> list[dict]:
    """The configured sites (as dicts) plus the new region's; an InputError if a site already has its id."""
    from chronorisk.errors import InputError

    if any(s["site_id"] == NEW_SITE_ID for s in sites):
        raise InputError("--new-site", f"site {NEW_SITE_ID} is already configured")
    return [*sites, new_site_config().model_dump()]
