"""Drift injection: a site changes how it measures, or whom it sees, from a date on.

Three kinds, each applied to one site from `from` (inclusive) to the end:

- `units`: the site starts sending fasting glucose in mmol/L without saying
  so. MEDS stores the raw mmol/L numbers under the canonical glucose code
  (mg/dL), and FHIR labels them mg/dL: exactly what an unannounced interface
  change looks like downstream.
- `lab_bias`: a new lab analyser reads HbA1c +0.6 percentage points and
  fasting glucose +15 mg/dL high (the patient is unchanged; the true risk too).
- `population`: a new catchment. 40% of the site's patients are *arrivals*
  whose records start within 90 days after the date; they are 10 years older,
  about 4 kg/m2 heavier and markedly more diabetic than the site's usual
  patients, and arrive with their conditions undiagnosed and untreated (they
  are alive when they register; their history is taken at that first visit,
  and their ground truth starts after it).

`parse_drift("site=hosp_east,from=2024-01-01,kind=units")` reads the CLI form.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from pydantic import ValidationError

from chronorisk.data.config import DriftConfig
from chronorisk.errors import InputError

LAB_BIAS = {"hba1c": 0.6, "glucose": 15.0}  # canonical units: %, mg/dL
ARRIVAL_SHARE = 0.4
ARRIVAL_WINDOW_DAYS = 90
ARRIVAL_AGE_YEARS = 10.0
ARRIVAL_BMI = 4.0
ARRIVAL_RISK_SHIFT = 1.0


def parse_drift(text: str) -> DriftConfig:
    """`site=<id>,from=YYYY-MM-DD,kind=units|population|lab_bias` -> DriftConfig (InputError otherwise)."""
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise InputError("--drift", f"expected site=<id>,from=YYYY-MM-DD,kind=<kind>, got {text!r}")
        if key in fields:
            raise InputError("--drift", f"{key!r} given twice in {text!r}")
        fields[key] = value.strip()
    unknown = set(fields) - {"site", "from", "kind"}
    if unknown:
        raise InputError("--drift", f"unknown key(s) {sorted(unknown)}; accepted: site, from, kind")
    missing = {"site", "from", "kind"} - set(fields)
    if missing:
        raise InputError("--drift", f"missing {sorted(missing)} in {text!r}")
    try:
        return DriftConfig.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise InputError("--drift", f"{where}: {err['msg']}") from None


@dataclass(frozen=True)
class SiteDrift:
    """The drift dates that apply to one site (None when that kind is absent)."""

    units_from: date | None = None
    lab_bias_from: date | None = None
    population_from: date | None = None


def drift_by_site(drift: list[DriftConfig] | tuple[DriftConfig, ...], site_ids: list[str]) -> dict[str, SiteDrift]:
    """Resolve drift entries per site; the earliest date wins when a kind repeats."""
    out = {s: SiteDrift() for s in site_ids}
    for d in drift:
        if d.site not in out:
            raise InputError("--drift", f"unknown site {d.site!r}; sites: {', '.join(site_ids)}")
        current = out[d.site]
        attr = {"units": "units_from", "lab_bias": "lab_bias_from", "population": "population_from"}[d.kind]
        old = getattr(current, attr)
        new = d.start if old is None else min(old, d.start)
        out[d.site] = SiteDrift(**{**current.__dict__, attr: new})
    return out
