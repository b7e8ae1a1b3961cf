"""FHIR R4 Observations of home-device readings, Personal Health Device style (what replay publishes)."""

from __future__ import annotations

from datetime import UTC, datetime

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
BP_PANEL = "85354-9"  # blood pressure panel with all children optional
KINDS = {
    # kind: (code, display, unit)
    "glucose": ("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL"),
    "weight": ("29463-7", "Body weight", "kg"),
    "heart_rate": ("8867-4", "Heart rate", "/min"),
}


def _coding(code: str, display: str) -> dict:
    return {"coding": [{"system": LOINC, "code": code, "display": display}]}


def _quantity(value: float, unit: str) -> dict:
    return {"value": round(float(value), 1), "unit": unit, "system": UCUM, "code": unit}


def observation(reading_id: str, device_id: str, kind: str, time: datetime, value: float,
                value2: float | None = None, unit: str | None = None, sent_at: datetime | None = None) -> dict:
    """One reading as an Observation: `bp` is a panel (value systolic, value2 diastolic, mm[Hg])."""
    obs: dict = {
        "resourceType": "Observation", "id": reading_id, "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "vital-signs"}]}],
        "device": {"identifier": {"system": "urn:chronorisk:device", "value": device_id}},
        "effectiveDateTime": time.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z"),
    }
    if sent_at is not None:
        obs["meta"] = {"lastUpdated": sent_at.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")}
    if kind == "bp":
        obs["code"] = _coding(BP_PANEL, "Blood pressure panel")
        obs["component"] = [
            {"code": _coding("8480-6", "Systolic blood pressure"), "valueQuantity": _quantity(value, unit or "mm[Hg]")},
            {"code": _coding("8462-4", "Diastolic blood pressure"),
             "valueQuantity": _quantity(value2, unit or "mm[Hg]")},
        ]
        return obs
    code, display, default_unit = KINDS[kind]
    obs["code"] = _coding(code, display)
    obs["valueQuantity"] = _quantity(value, unit or default_unit)
    return obs
