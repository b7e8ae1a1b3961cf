"""Scores as FHIR R4 `RiskAssessment` resources (and searchset Bundles of them).

A score (stored, or computed from a FHIR bundle by `$score`) becomes:

- `status` final, `subject` the patient, `occurrenceDateTime` the prediction time;
- `method`: the model's name and version (a coding of the `urn:chronorisk:model` system);
- `prediction[0]`: `outcome` the task's outcome (coded by task name, with its conditions in words),
  `probabilityDecimal` the calibrated risk, `qualitativeRisk` the tier in the HL7 `risk-probability`
  code system (low -> low, medium -> moderate, high -> high), `whenPeriod` the horizon from the
  prediction time;
- `basis`: references to the input's Observations, Conditions and MedicationRequests that the top
  factors' concepts come from (only where the input resources had ids);
- `note`: the explanation in the clinician's words (`serving/explanations.py`), and the statement
  that it is a model's estimate.

Tests validate the output with the `fhir.resources` models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date, datetime, timedelta

from chronorisk.serving.explanations import clinician_text

RISK_PROBABILITY = "http://terminology.hl7.org/CodeSystem/risk-probability"
QUALITATIVE = {"low": ("low", "Low likelihood"), "medium": ("moderate", "Moderate likelihood"),
               "high": ("high", "High likelihood")}
TASK_SYSTEM = "urn:chronorisk:task"
MODEL_SYSTEM = "urn:chronorisk:model"
ESTIMATE_NOTE = "The model's estimate of risk from the recorded data; not a diagnosis."


def fhir_instant(value: datetime | date | str) -> str:
    """A FHIR dateTime with a time zone (naive times are UTC, as everywhere in the service)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%dT%H:%M:%S") + ("Z" if value.utcoffset() in (None, timedelta(0))
                                                      else value.strftime("%z")[:3] + ":" + value.strftime("%z")[3:])
    return value.isoformat()


def outcome_concept(task_def, condition_names: Mapping[str, str]) -> dict:
    """The task's outcome as a CodeableConcept: coded by task name, the outcome conditions in words."""
    names = [lower_first(condition_names.get(c, c.replace("_", " "))) for c in task_def.outcome.concepts]
    years = task_def.horizon_days / 365
    horizon = f"{years:g} year{'s' if years != 1 else ''}" if task_def.horizon_days % 365 == 0 else (
        f"{task_def.horizon_days} days")
    text = f"First recorded {', '.join(names[:-1]) + ' or ' + names[-1] if len(names) > 1 else names[0]} " \
           f"within {horizon}"
    return {"coding": [{"system": TASK_SYSTEM, "code": task_def.name, "display": text}], "text": text}


def lower_first(name: str) -> str:
    """'Heart failure' -> 'heart failure' inside a sentence; acronyms ('CKD stage 3') stay."""
    return name if name[1:2].isupper() else name[:1].lower() + name[1:]


def condition_names(spec) -> dict[str, str]:
    return {c.name: c.display for c in spec.conditions}


def risk_assessment(
    *,
    task_def,
    spec,
    subject: str,
    prediction_time: datetime,
    risk: float,
    tier: str | None,
    model_name: str,
    model_version: str,
    factors: Sequence[dict] | None,
    basis: Sequence[str] = (),
    resource_id: str | None = None,
    units: Mapping | None = None,
) -> dict:
    """One RiskAssessment (a plain dict in FHIR JSON) of one task's score."""
    start = prediction_time
    prediction: dict = {
        "outcome": outcome_concept(task_def, condition_names(spec)),
        "probabilityDecimal": round(float(risk), 6),
        "whenPeriod": {"start": fhir_instant(start),
                       "end": fhir_instant(start + timedelta(days=task_def.horizon_days))},
    }
    if tier in QUALITATIVE:
        code, display = QUALITATIVE[tier]
        prediction["qualitativeRisk"] = {"coding": [{"system": RISK_PROBABILITY, "code": code, "display": display}],
                                         "text": f"{tier} tier"}
    lines = clinician_text(factors, spec.features if spec is not None else None, units=units)
    note = ESTIMATE_NOTE + (" Why: " + "; ".join(lines) + "." if lines else "")
    resource: dict = {
        "resourceType": "RiskAssessment",
        "status": "final",
        "subject": {"reference": subject},
        "occurrenceDateTime": fhir_instant(prediction_time),
        "method": {"coding": [{"system": MODEL_SYSTEM, "code": model_name, "version": str(model_version),
                               "display": f"{model_name} version {model_version}"}],
                   "text": f"{model_name} version {model_version}"},
        "prediction": [prediction],
        "note": [{"text": note}],
    }
    if resource_id:
        resource["id"] = resource_id
    if basis:
        resource["basis"] = [{"reference": ref} for ref in basis]
    return resource


def basis_references(factors: Sequence[dict] | None, spec, sources: Mapping[str, list[tuple]],
                     prediction_time: datetime | None = None) -> list[str]:
    """'Observation/<id>' etc. of the input resources each factor was computed from, in factor order: the
    latest one for a 'last' or 'days since last' value, those inside the factor's window otherwise (all
    before the prediction time when it has none)."""
    if not factors or not sources:
        return []
    end = _us(prediction_time) if prediction_time is not None else None
    refs: dict[str, None] = {}
    for f in factors:
        info = spec.features.get(f.get("feature", "")) if spec is not None else None
        found = [s for code in concept_codes(spec, f.get("feature", "")) for source_code, hits in sources.items()
                 if source_code == code or (code.endswith("*") and source_code.startswith(code[:-1])) for s in hits]
        found = [s for s in found if end is None or s[2] is None or s[2] < end]
        window = getattr(info, "window_days", None)
        if window and end is not None:
            found = [s for s in found if s[2] is not None and s[2] >= end - window * 86_400_000_000]
        if getattr(info, "aggregate", None) in ("last", "days_since_last") and found:
            found = [max(found, key=lambda s: s[2] if s[2] is not None else -1)]
        for rtype, rid, _ in found:
            refs[f"{rtype}/{rid}"] = None
    return list(refs)


def _us(when: datetime) -> int:
    """Microseconds since 1970 of a naive-UTC (or aware) time, as the converter's rows hold them."""
    from datetime import UTC

    aware = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    return int(aware.timestamp() * 1_000_000)


def concept_codes(spec, feature: str) -> list[str]:
    """The MEDS codes a feature is computed from, read off the spec (a trailing * is a code prefix)."""
    info = spec.features.get(feature) if spec is not None else None
    if info is None:
        return []
    code = getattr(info, "code", None)
    if code:
        return [code]
    concept = getattr(info, "concept", None)
    if concept is None:
        return []
    for m in spec.measurements:
        if m.name == concept:
            return list(m.codes)
    for c in spec.conditions:
        if c.name == concept:
            return [*c.codes, *(f"{p}*" for p in c.prefixes)]
    for d in spec.drug_classes:
        if d.name == concept:
            return list(d.codes)
    if concept == "smoking":
        from chronorisk.data.codes import SMOKING_STATUS

        return [SMOKING_STATUS]
    return []


def searchset(resources: Sequence[dict], base_url: str) -> dict:
    """A searchset Bundle of RiskAssessments."""
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [{**({"fullUrl": f"{base_url}/fhir/RiskAssessment/{r['id']}"} if r.get("id") else {}),
                   "resource": r, "search": {"mode": "match"}} for r in resources],
    }
