"""What-if for the GP: the model's risk if a modifiable recent value were different.

A change is made to the patient's record, not to feature columns: a new
measurement (HbA1c, systolic BP, LDL, BMI) or smoking status recorded the day
before the prediction time, or a drug class (statin, antihypertensive) started
(a 90-day prescription that day) or stopped (its prescriptions of the last
`pdc_days` removed). The features are then rebuilt by the same pipeline, so
the new value enters every aggregate that would see it (latest, means,
highest, trend, days since last), and the same model scores both records.

The answer is the model's estimate for a record with that value: an
association learned from data, not the effect of a treatment. Values outside
a measurement's plausible range (the feature spec's `bounds`) are refused,
naming the range.

A value may be given in another unit than the model's (`units`, e.g. LDL in
mmol/L or HbA1c in mmol/mol where the site writes them so): it is converted
with the ingestion's conversions (`data/codes.py`, the one units table), and a
refusal names the range in the unit the GP used.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import polars as pl

from chronorisk.data import codes as vocab
from chronorisk.data.meds_io import EVENT_SCHEMA
from chronorisk.errors import InputError
from chronorisk.serving.explanations import display_unit, site_units

MEASURED = ("hba1c", "sbp", "ldl", "bmi")
DRUGS = {"statin": ("statin",),
         "antihypertensive": ("ace_inhibitor", "calcium_channel_blocker", "thiazide", "beta_blocker")}
LABEL = ("The model's estimate for a record with these values: a pattern learned from data, "
         "not the effect of a treatment.")
SUPPLY_DAYS = 90.0


@dataclass(frozen=True)
class Modifiable:
    """One value the GP may change: its words, unit and accepted range."""

    name: str
    display: str
    unit: str
    low: float
    high: float

    def check(self, value: float, unit: str | None = None) -> float:
        """The value in the model's unit, given in `unit` (None: the model's); InputError naming the range
        in the unit given when it is implausible."""
        if self.unit == "1 = yes" and value not in (0, 1):
            raise InputError(f"changes.{self.name}", f"{value:g} is not 0 (no) or 1 (yes)")
        given = vocab.unit_of_spelling(unit) or unit
        if given is None or given == self.unit or self.unit == "1 = yes":
            if unit is not None and self.unit == "1 = yes":
                raise InputError(f"units.{self.name}", "a yes/no change has no unit")
            if not self.low <= value <= self.high:
                raise InputError(f"changes.{self.name}", f"{value:g} is outside the plausible range "
                                 f"{self.low:g} to {self.high:g} {self.unit}")
            return float(value)
        try:
            canonical = vocab.MEASUREMENTS[self.name].to_canonical(value, given)
        except ValueError as exc:
            raise InputError(f"units.{self.name}", str(exc)) from None
        if not self.low <= canonical <= self.high:
            shown = site_units({self.name: given})[self.name]
            low, high = sorted(x * shown.scale + shown.offset for x in (self.low, self.high))
            raise InputError(f"changes.{self.name}", f"{value:g} {display_unit(given)} is outside the plausible "
                             f"range {low:.3g} to {high:.3g} {display_unit(given)}")
        return canonical


def modifiables(spec) -> dict[str, Modifiable]:
    """The values of this model's spec that the GP may change, with their ranges (from the spec)."""
    found: dict[str, Modifiable] = {}
    for name in MEASURED:
        last = spec.features_where(concept=name, aggregate="last")
        if last:
            info = spec.info(last[0])
            low, high = info.bounds or vocab.MEASUREMENTS[name].plausible
            found[name] = Modifiable(name, info.concept_display or name, info.unit, float(low), float(high))
    if spec.features_where(concept="smoking"):
        found["smoking"] = Modifiable("smoking", "Smoking (1 = smokes, 0 = stopped)", "1 = yes", 0, 1)
    for name, classes in DRUGS.items():
        if any(spec.features_where(concept=c) for c in classes):
            found[name] = Modifiable(name, f"{name.capitalize()} (1 = on, 0 = off)", "1 = yes", 0, 1)
    return found


def changed_events(events: pl.DataFrame, spec, prediction_time: datetime, changes: dict[str, float],
                   units: dict[str, str] | None = None) -> tuple:
    """(the record with the changes, their descriptions); InputError for a value out of range. `units`
    names the unit of a measured value given in another unit than the model's."""
    allowed = modifiables(spec)
    units = units or {}
    for name in units:
        if name not in changes:
            raise InputError(f"units.{name}", "names the unit of a value that is not changed")
    day_before = prediction_time - timedelta(days=1)
    added: list[dict] = []
    described: list[str] = []
    drop = pl.lit(False)
    for name, value in changes.items():
        if name not in allowed:
            raise InputError(f"changes.{name}", f"this model does not use it; it uses: {', '.join(allowed)}")
        m = allowed[name]
        given, value = value, m.check(value, units.get(name))
        if name in MEASURED:
            added.append(_event(day_before, vocab.MEASUREMENTS[name].code, numeric=value))
            unit = units.get(name) or m.unit
            described.append(f"{m.display} {given:g} {display_unit(vocab.unit_of_spelling(unit) or unit)} "
                             f"on {day_before:%Y-%m-%d}")
        elif name == "smoking":
            answer = vocab.SMOKING_CURRENT[0] if value else vocab.SMOKING_FORMER[0]
            added.append(_event(day_before, vocab.SMOKING_STATUS, text=answer))
            described.append(f"{'current smoker' if value else 'stopped smoking (former smoker)'} "
                             f"recorded on {day_before:%Y-%m-%d}")
        else:
            classes = [d for d in spec.drug_classes if d.name in DRUGS[name]]
            codes = [c for d in classes for c in d.codes]
            if value:
                added.append(_event(day_before, classes[0].codes[0], numeric=SUPPLY_DAYS))
                described.append(f"{classes[0].display} prescribed for {SUPPLY_DAYS:g} days on {day_before:%Y-%m-%d}")
            else:
                since = prediction_time - timedelta(days=spec.pdc_days)
                drop = drop | (pl.col("code").is_in(codes) & (pl.col("time") >= since))
                described.append(f"no {name} prescription in the {spec.pdc_days} days before")
    kept = events.select(list(EVENT_SCHEMA)).filter(~drop)
    extra = pl.DataFrame(added, schema=EVENT_SCHEMA) if added else None
    if extra is not None:
        extra = extra.with_columns(pl.lit(events["subject_id"][0] if events.height else 0, dtype=pl.Int64)
                                   .alias("subject_id"))
        kept = pl.concat([kept, extra.select(kept.columns).cast(kept.schema)], how="vertical")
    return kept.sort("time", nulls_last=False), described


def _event(when: datetime, code: str, *, numeric: float | None = None, text: str | None = None) -> dict:
    return {"subject_id": 0, "time": when, "code": code, "numeric_value": numeric, "text_value": text}


def what_if(model, events: pl.DataFrame, prediction_time: datetime, changes: dict[str, float],
            units: dict[str, str] | None = None) -> dict:
    """Current and changed risk of one patient's record by one model, with the changes in words (values
    in `units` where given, else the model's units)."""
    from chronorisk.serving import scoring

    changed, described = changed_events(events, model.spec, prediction_time, changes, units)
    risks = []
    for record in (events, changed):
        feats, reason = scoring.features_from_events(model, record, prediction_time)
        if feats is None:
            raise InputError("changes", f"the changed record is {reason}")
        risk, tiers, _ = scoring.predict(model, feats, explain=False, top_k=1)
        risks.append({"risk": float(risk[0]), "tier": str(tiers[0])})
    return {"task": model.task, "prediction_time": prediction_time, "current": risks[0], "what_if": risks[1],
            "changes": described, "label": LABEL, "model_name": model.name, "model_version": model.version}


def recent_values(model, feats: pl.DataFrame, prediction_time: datetime, concepts, units=None) -> list[dict]:
    """The patient's latest value (and its date) of each concept that has a 'last' feature, in the
    site's unit where `units` (`explanations.site_units`) names one."""
    spec = model.spec
    out = []
    for concept in dict.fromkeys(concepts):
        last = spec.features_where(concept=concept, aggregate="last", kind="value")
        if not last or last[0] not in feats.columns:
            continue
        info = spec.info(last[0])
        value = feats[last[0]][0]
        when = None
        if info.date_feature and info.date_feature in feats.columns and feats[info.date_feature][0] is not None:
            when = (prediction_time - timedelta(days=float(feats[info.date_feature][0]))).date().isoformat()
        choice = (units or {}).get(concept)
        shown = None if value is None else float(value)
        if choice is not None and shown is not None:
            shown = shown * choice.scale + choice.offset
        out.append({"concept": concept, "display": info.concept_display or concept, "date": when, "value": shown,
                    "unit": choice.unit if choice is not None else display_unit(info.unit)})
    return out
