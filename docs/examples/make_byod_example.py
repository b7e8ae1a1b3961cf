"""Make the bring-your-own-data example of docs/byod.md: a small cohort study as MEDS plus supplied labels.

    python docs/examples/make_byod_example.py --out byod        # then follow docs/byod.md

Writes, under --out:
- `meds/sites/<site>/`: MEDS data of two sites (one baseline exam per subject in 2015: systolic BP,
  total and HDL cholesterol, BMI and fasting glucose as LOINC measurements, smoking status as TEXT
  ("Current every day smoker"), type 2 diabetes as ICD-10-CM, a blood-pressure medication as
  RxNorm, birth date and sex), with metadata and subject splits;
- `labels/cvd_10y/labels.parquet`: the supplied 10-year outcome at prediction time 2016-01-01,
  drawn from a logistic truth model of the ten factors (coefficients below, of the size of
  classic cardiovascular risk equations; invented for this example, not fitted to any cohort);
- `cvd_10y.yaml`: the task, `labels: supplied`;
- `reference.json`: the 5-fold cross-validated AUROC of a logistic regression on the ten raw
  factors (what a model of the MEDS data should reach) and the prevalence.

`--signal 0` makes the outcome independent of every factor (a cohort no model should be fitted to).
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from chronorisk.data import codes
from chronorisk.data.files import write_text_atomic
from chronorisk.data.meds_io import conform_events, write_events, write_labels, write_metadata

TASK = "cvd_10y"
PREDICTION_TIME = datetime(2016, 1, 1)
SMOKING_TEXT = {0: "Never smoker", 1: "Former smoker", 2: "Current every day smoker"}
BP_MEDICATION = codes.MEDICATIONS["lisinopril"].code
DIABETES = codes.DIAGNOSES["diabetes"].icd10
# log-odds per unit of each factor around the cohort's typical values (invented, see the docstring)
TRUTH = {"age": 0.065, "male": 0.55, "sbp": 0.018, "total_chol": 0.005, "hdl": -0.02, "bmi": 0.03,
         "glucose": 0.006, "current_smoker": 0.6, "diabetes": 0.6, "bp_medication": 0.35}
CENTER = {"age": 50, "sbp": 130, "total_chol": 210, "hdl": 50, "bmi": 26, "glucose": 85}
MEASURED = {"sbp": "sbp", "total_chol": "total_chol", "hdl": "hdl", "bmi": "bmi", "glucose": "glucose"}
TASK_YAML = f"""# A task whose labels come from elsewhere (docs/byod.md).
name: {TASK}
description: >-
  Cardiovascular event within 10 years of the baseline exam, as recorded by the cohort study
  (labels supplied with --labels; no outcome concept is defined here).
labels: supplied
horizon_days: 3652
"""


def factors(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The ten risk factors of n subjects (correlated the way they usually are)."""
    age = rng.uniform(32, 70, n)
    male = rng.random(n) < 0.45
    bmi = np.clip(rng.normal(26 + 0.03 * (age - 50), 4.2), 15, 55)
    sbp = np.clip(rng.normal(118 + 0.55 * (age - 32) + 0.8 * (bmi - 26) + 4 * male, 17), 85, 240)
    total_chol = np.clip(rng.normal(205 + 0.9 * (age - 50), 42), 110, 450)
    hdl = np.clip(rng.normal(52 - 7 * male - 0.5 * (bmi - 26), 13), 20, 110)
    diabetes = rng.random(n) < 0.03 + 0.004 * np.clip(bmi - 22, 0, None) + 0.001 * (age - 32)
    glucose = np.clip(rng.normal(np.where(diabetes, 165, 82 + 0.2 * (bmi - 26)), np.where(diabetes, 45, 11)),
                      45, 400)
    smoking = rng.choice(3, n, p=[0.45, 0.12, 0.43])
    bp_medication = (sbp > 150) & (rng.random(n) < 0.35) | (rng.random(n) < 0.02)
    return {"age": age, "male": male.astype(float), "sbp": sbp, "total_chol": total_chol, "hdl": hdl, "bmi": bmi,
            "glucose": glucose, "smoking": smoking, "current_smoker": (smoking == 2).astype(float),
            "diabetes": diabetes.astype(float), "bp_medication": bp_medication.astype(float)}


def truth_logit(f: dict[str, np.ndarray], signal: float) -> np.ndarray:
    x = sum(TRUTH[k] * (f[k] - CENTER.get(k, 0.0)) for k in TRUTH)
    return -2.6 + signal * x


def events_of(ids: np.ndarray, f: dict[str, np.ndarray], rng: np.random.Generator) -> pl.DataFrame:
    """MEDS events: birth, sex, one exam with five measurements, smoking as text, diabetes, BP medication."""
    n = ids.size
    exam = [datetime(2015, 1, 1) + timedelta(days=int(d)) for d in rng.integers(0, 360, n)]
    birth = [e - timedelta(days=int(a * 365.25)) for e, a in zip(exam, f["age"], strict=True)]
    rows: list[tuple] = []
    for i in range(n):
        sid, t = int(ids[i]), exam[i]
        rows.append((sid, birth[i], codes.BIRTH, None, None))
        rows.append((sid, None, codes.SEX_MALE if f["male"][i] else codes.SEX_FEMALE, None, None))
        rows.append((sid, t, "ENCOUNTER//exam", None, None))
        for key, name in MEASURED.items():
            rows.append((sid, t, codes.MEASUREMENTS[name].code, float(round(f[key][i], 1)), None))
        rows.append((sid, t, codes.SMOKING_STATUS, None, SMOKING_TEXT[int(f["smoking"][i])]))
        if f["diabetes"][i]:
            rows.append((sid, t - timedelta(days=200), DIABETES, None, None))
        if f["bp_medication"][i]:
            rows.append((sid, t, BP_MEDICATION, None, None))
    frame = pl.DataFrame(rows, schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String,
                                       "numeric_value": pl.Float32, "text_value": pl.String}, orient="row")
    return conform_events(frame)


def reference_cv_auroc(f: dict[str, np.ndarray], y: np.ndarray, seed: int) -> float:
    """5-fold cross-validated AUROC of a logistic regression on the ten raw factors."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from chronorisk.training.metrics import auroc

    X = np.column_stack([f[k] for k in TRUTH])
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    score = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression()), X, y, cv=folds,
                              method="decision_function")
    return float(auroc(y, score))


def make_example(out: Path, subjects: int = 2000, seed: int = 0, signal: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)
    f = factors(subjects, rng)
    y = rng.random(subjects) < 1 / (1 + np.exp(-truth_logit(f, signal)))
    ids = np.arange(1, subjects + 1, dtype=np.int64) * 7919  # ids from elsewhere: not 0..n-1
    site_of = np.where(rng.random(subjects) < 0.6 + 0.1 * (f["age"] > 55), "site_a", "site_b")
    for site in ("site_a", "site_b"):
        mine = site_of == site
        sub = {k: v[mine] for k, v in f.items()}
        events = events_of(ids[mine], sub, rng)
        site_dir = out / "meds" / "sites" / site
        write_events(events, site_dir / "data" / "0.parquet")
        write_metadata(site_dir, dataset_name=f"byod-example-{site}", etl_name="make_byod_example",
                       subject_ids=ids[mine].tolist(), code_descriptions={c: None for c in events["code"].unique()})
    labels = pl.DataFrame({"subject_id": ids, "prediction_time": [PREDICTION_TIME] * subjects,
                           "boolean_value": y}).with_columns(pl.col("prediction_time").cast(pl.Datetime("us")))
    write_labels(labels, out / "labels" / TASK / "labels.parquet")
    write_text_atomic(out / f"{TASK}.yaml", TASK_YAML)
    reference = {"subjects": subjects, "cases": int(y.sum()), "prevalence": round(float(y.mean()), 4),
                 "logistic_cv_auroc_on_the_ten_factors": round(reference_cv_auroc(f, y.astype(float), seed), 4),
                 "seed": seed, "signal": signal}
    write_text_atomic(out / "reference.json", json.dumps(reference, indent=1))
    return reference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write meds/, labels/, the task YAML into")
    parser.add_argument("--subjects", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--signal", type=float, default=1.0, help="1 = the truth model; 0 = outcome is noise")
    args = parser.parse_args(argv)
    print(json.dumps(make_example(args.out, args.subjects, args.seed, args.signal), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
