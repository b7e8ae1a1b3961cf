"""The clinical vocabulary shared by the generator, FHIR ingestion and features.

Every event code is `VOCAB//value` (MEDS convention). Measurements are stored
in one canonical unit per code; `Measurement.to_canonical` converts the units
sites actually send. Conversion factors are the standard ones:

- glucose: 1 mmol/L = 18.016 mg/dL (molar mass of glucose 180.16 g/mol)
- HbA1c: NGSP % = 0.09148 * IFCC mmol/mol + 2.152 (IFCC-NGSP master equation)
- cholesterol (total, LDL, HDL): 1 mmol/L = 38.67 mg/dL; triglycerides: 1 mmol/L = 88.57 mg/dL
- creatinine: 1 mg/dL = 88.42 umol/L
- weight: 1 lb = 0.45359237 kg; height: 1 in = 2.54 cm
- eGFR: "mL/min" as sent by some systems is taken as mL/min/1.73m2 (factor 1)

`plausible` bounds reject physiologically impossible values (systolic BP 1200)
at ingestion and at the API; they are wide on purpose: rare is not impossible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

BIRTH = "MEDS_BIRTH"
DEATH = "MEDS_DEATH"
SEX_FEMALE = "GENDER//F"
SEX_MALE = "GENDER//M"
ENCOUNTER_PREFIX = "ENCOUNTER//"
ENCOUNTER_CLASSES = ("AMB", "EMER", "IMP")


def _scale(factor: float) -> Callable[[float], float]:
    return lambda v: v * factor


def _ifcc_to_ngsp(v: float) -> float:
    return 0.09148 * v + 2.152


@dataclass(frozen=True)
class Measurement:
    """One numeric measurement: its canonical code, unit and accepted units."""

    name: str
    code: str
    display: str
    unit: str
    plausible: tuple[float, float]
    conversions: dict[str, Callable[[float], float]] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    def accepts(self, unit: str | None) -> bool:
        return unit_of_spelling(unit) in self.units()

    def units(self) -> tuple[str, ...]:
        return (self.unit, *self.conversions)

    def to_canonical(self, value: float, unit: str | None) -> float:
        """Value in the canonical unit (from any spelling in `UNIT_SPELLINGS`); ValueError naming an unknown unit."""
        unit = unit_of_spelling(unit) or unit
        if unit == self.unit:
            return float(value)
        if unit in self.conversions:
            return float(self.conversions[unit](value))
        raise ValueError(
            f"unit {unit!r} for {self.display} cannot be converted; accepted: {accepted_spellings(self)}"
        )


MEASUREMENTS: dict[str, Measurement] = {
    m.name: m
    for m in (
        Measurement("sbp", "LOINC//8480-6", "Systolic blood pressure", "mm[Hg]", (40, 300),
                    {"mmHg": _scale(1.0)}),
        Measurement("dbp", "LOINC//8462-4", "Diastolic blood pressure", "mm[Hg]", (20, 200),
                    {"mmHg": _scale(1.0)}),
        Measurement("hba1c", "LOINC//4548-4", "HbA1c", "%", (3, 20), {"mmol/mol": _ifcc_to_ngsp}),
        Measurement("glucose", "LOINC//2339-0", "Fasting glucose", "mg/dL", (10, 1500),
                    {"mmol/L": _scale(18.016)}),
        Measurement("bmi", "LOINC//39156-5", "BMI", "kg/m2", (8, 100)),
        Measurement("weight", "LOINC//29463-7", "Body weight", "kg", (0.3, 400),
                    {"[lb_av]": _scale(0.45359237), "lb": _scale(0.45359237)}),
        Measurement("height", "LOINC//8302-2", "Body height", "cm", (20, 260), {"[in_i]": _scale(2.54)}),
        Measurement("total_chol", "LOINC//2093-3", "Total cholesterol", "mg/dL", (30, 1000),
                    {"mmol/L": _scale(38.67)}),
        Measurement("ldl", "LOINC//18262-6", "LDL cholesterol", "mg/dL", (5, 800), {"mmol/L": _scale(38.67)}),
        Measurement("hdl", "LOINC//2085-9", "HDL cholesterol", "mg/dL", (3, 250), {"mmol/L": _scale(38.67)}),
        Measurement("triglycerides", "LOINC//2571-8", "Triglycerides", "mg/dL", (10, 5000),
                    {"mmol/L": _scale(88.57)}),
        Measurement("creatinine", "LOINC//38483-4", "Creatinine", "mg/dL", (0.05, 30),
                    {"umol/L": _scale(1 / 88.42)}, aliases=("LOINC//2160-0",)),
        Measurement("egfr", "LOINC//33914-3", "eGFR", "mL/min/{1.73_m2}", (1, 250),
                    {"mL/min": _scale(1.0), "mL/min/1.73m2": _scale(1.0)}),
    )
}

# The spellings sites send for each unit above, all accepted (the UCUM code first). Matching also
# ignores case (UCUM's case-insensitive form: `MG/DL`) and white space; `str.casefold` maps the micro
# sign U+00B5 to the Greek mu U+03BC, listed here both. Every unit of MEASUREMENTS must appear here.
UNIT_SPELLINGS: dict[str, tuple[str, ...]] = {
    "mm[Hg]": ("mm[Hg]",),
    "mmHg": ("mmHg", "mm Hg"),
    "%": ("%",),
    "mmol/mol": ("mmol/mol",),
    "mg/dL": ("mg/dL", "mg/dl"),
    "mmol/L": ("mmol/L", "mmol/l"),
    "kg/m2": ("kg/m2", "kg/m^2", "kg/m\u00b2"),
    "kg": ("kg",),
    "[lb_av]": ("[lb_av]",),
    "lb": ("lb", "lbs"),
    "cm": ("cm",),
    "[in_i]": ("[in_i]", "in"),
    "umol/L": ("umol/L", "umol/l", "\u00b5mol/L", "\u00b5mol/l", "\u03bcmol/L", "\u03bcmol/l"),
    "mL/min/{1.73_m2}": ("mL/min/{1.73_m2}", "ml/min/{1.73_m2}"),
    "mL/min": ("mL/min", "ml/min"),
    "mL/min/1.73m2": ("mL/min/1.73m2", "ml/min/1.73m2", "mL/min/1.73 m2", "mL/min/{1.73m2}"),
}


def _spelling_key(spelling: str) -> str:
    return "".join(spelling.split()).casefold()


_UNIT_BY_SPELLING: dict[str, str] = {
    key: unit for unit, spellings in UNIT_SPELLINGS.items() for s in spellings for key in (s, _spelling_key(s))
}


def unit_of_spelling(spelling: object) -> str | None:
    """The unit of MEASUREMENTS a spelling stands for (`mg/dl` -> `mg/dL`, `\u00b5mol/L` -> `umol/L`); None if none."""
    if not isinstance(spelling, str):
        return None
    unit = _UNIT_BY_SPELLING.get(spelling)
    return unit if unit is not None else _UNIT_BY_SPELLING.get(_spelling_key(spelling))


def accepted_spellings(measurement: Measurement) -> str:
    """`mg/dL (mg/dl), mmol/L (mmol/l)`: a measurement's units and their other accepted spellings."""
    parts = []
    for unit in measurement.units():
        others = [s for s in UNIT_SPELLINGS.get(unit, ()) if s != unit]
        parts.append(f"{unit} ({', '.join(others)})" if others else unit)
    return ", ".join(parts)


MEASUREMENT_BY_CODE: dict[str, Measurement] = {
    code: m for m in MEASUREMENTS.values() for code in (m.code, *m.aliases)
}

BP_PANEL = "LOINC//55284-4"
SMOKING_STATUS = "LOINC//72166-2"
# Smoking status answers (SNOMED CT), stored as text_value of SMOKING_STATUS events.
SMOKING_CURRENT = ("SNOMED//449868002", "SNOMED//428041000124106", "SNOMED//77176002")
SMOKING_FORMER = ("SNOMED//8517006",)
SMOKING_NEVER = ("SNOMED//266919005",)
# Smoking status sent as words instead of an answer code (lower case, without a trailing
# "(finding)"): 2 current, 1 former, 0 never. The answer codes' display texts and the
# usual EHR wordings; any other text stays a text category of the smoking code.
SMOKING_TEXT_ANSWERS: dict[str, int] = {
    "current every day smoker": 2, "current some day smoker": 2, "smoker, current status unknown": 2,
    "heavy tobacco smoker": 2, "light tobacco smoker": 2, "current smoker": 2, "smoker": 2,
    "smokes tobacco daily": 2, "occasional tobacco smoker": 2,
    "former smoker": 1, "ex-smoker": 1, "ex smoker": 1, "past smoker": 1,
    "never smoker": 0, "never smoked tobacco": 0, "non-smoker": 0, "nonsmoker": 0, "never smoked": 0,
}


def smoking_status_of_text(text: str | None) -> int | None:
    """A smoking answer (code, with or without `SNOMED//`, or words) -> 2 current, 1 former, 0 never, else None."""
    if text is None:
        return None
    code = text if text.startswith("SNOMED//") else f"SNOMED//{text}"
    for status, codes in ((2, SMOKING_CURRENT), (1, SMOKING_FORMER), (0, SMOKING_NEVER)):
        if code in codes:
            return status
    return SMOKING_TEXT_ANSWERS.get(text.strip().lower().removesuffix("(finding)").strip())


@dataclass(frozen=True)
class Diagnosis:
    """A condition with its SNOMED CT and ICD-10-CM codes (sites use either)."""

    name: str
    display: str
    snomed: str
    icd10: str


DIAGNOSES: dict[str, Diagnosis] = {
    d.name: d
    for d in (
        Diagnosis("hypertension", "Hypertension", "SNOMED//38341003", "ICD10CM//I10"),
        Diagnosis("diabetes", "Type 2 diabetes", "SNOMED//44054006", "ICD10CM//E11.9"),
        Diagnosis("prediabetes", "Prediabetes", "SNOMED//15777000", "ICD10CM//R73.03"),
        Diagnosis("hyperlipidemia", "Hyperlipidemia", "SNOMED//55822004", "ICD10CM//E78.5"),
        Diagnosis("obesity", "Obesity", "SNOMED//162864005", "ICD10CM//E66.9"),
        Diagnosis("ckd3", "Chronic kidney disease stage 3", "SNOMED//433144002", "ICD10CM//N18.30"),
        Diagnosis("ckd4", "Chronic kidney disease stage 4", "SNOMED//431857002", "ICD10CM//N18.4"),
        Diagnosis("nephropathy", "Diabetic nephropathy", "SNOMED//127013003", "ICD10CM//E11.21"),
        Diagnosis("retinopathy", "Diabetic retinopathy", "SNOMED//1551000119108", "ICD10CM//E11.319"),
        Diagnosis("neuropathy", "Diabetic neuropathy", "SNOMED//368581000119106", "ICD10CM//E11.40"),
        Diagnosis("chd", "Coronary heart disease", "SNOMED//53741008", "ICD10CM//I25.10"),
        Diagnosis("mi", "Myocardial infarction", "SNOMED//22298006", "ICD10CM//I21.9"),
        Diagnosis("stroke", "Stroke", "SNOMED//230690007", "ICD10CM//I63.9"),
        Diagnosis("heart_failure", "Heart failure", "SNOMED//88805009", "ICD10CM//I50.9"),
    )
}


@dataclass(frozen=True)
class Medication:
    """A medication product (RxNorm) and the drug class features group it under."""

    name: str
    code: str
    display: str
    drug_class: str


MEDICATIONS: dict[str, Medication] = {
    m.name: m
    for m in (
        Medication("metformin", "RXNORM//860975", "Metformin 500 MG ER", "biguanide"),
        Medication("insulin", "RXNORM//106892", "Insulin isophane 70/30", "insulin"),
        Medication("lisinopril", "RXNORM//314076", "Lisinopril 10 MG", "ace_inhibitor"),
        Medication("amlodipine", "RXNORM//197361", "Amlodipine 5 MG", "calcium_channel_blocker"),
        Medication("hydrochlorothiazide", "RXNORM//316049", "Hydrochlorothiazide 25 MG", "thiazide"),
        Medication("metoprolol", "RXNORM//866414", "Metoprolol succinate 100 MG ER", "beta_blocker"),
        Medication("atorvastatin", "RXNORM//259255", "Atorvastatin 80 MG", "statin"),
        Medication("simvastatin", "RXNORM//316672", "Simvastatin 10 MG", "statin"),
    )
}

# MedicationRequest events carry the days supplied as numeric_value, so that
# features can compute proportion of days covered (adherence).
DEFAULT_DAYS_SUPPLY = 30.0

VOCAB_BY_SYSTEM: dict[str, str] = {
    "http://loinc.org": "LOINC",
    "http://snomed.info/sct": "SNOMED",
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD10CM",
    "http://hl7.org/fhir/sid/icd-10": "ICD10CM",
    "http://hl7.org/fhir/sid/icd-9-cm": "ICD9CM",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "RXNORM",
}
SYSTEM_BY_VOCAB: dict[str, str] = {
    "LOINC": "http://loinc.org",
    "SNOMED": "http://snomed.info/sct",
    "ICD10CM": "http://hl7.org/fhir/sid/icd-10-cm",
    "ICD9CM": "http://hl7.org/fhir/sid/icd-9-cm",
    "RXNORM": "http://www.nlm.nih.gov/research/umls/rxnorm",
}


def display_for(code: str) -> str | None:
    """Human-readable name of a known code, else None."""
    if code in MEASUREMENT_BY_CODE:
        return MEASUREMENT_BY_CODE[code].display
    for d in DIAGNOSES.values():
        if code in (d.snomed, d.icd10):
            return d.display
    for m in MEDICATIONS.values():
        if code == m.code:
            return m.display
    return None
