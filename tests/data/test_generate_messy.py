"""`chronorisk generate --realistic-codes`: messy records as real ones, and the unmapped lab's risk is learned.

One messy cohort is generated and featurized through the real CLI once per module.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightgbm as lgb
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from chronorisk.data import codes as vocab
from chronorisk.data.synth import messy
from chronorisk.features.concepts import load_concepts
from chronorisk.features.spec import FeatureSpec

TASK = "complication_1y"


def chronorisk(work: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chronorisk.cli", "--work", str(work), *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("messy")
    out = chronorisk(work, "generate", "--patients", "3000", "--seed", "11", "--realistic-codes", "--workers", "1")
    assert out.returncode == 0, out.stderr
    assert "realistic codes" in out.stdout
    out = chronorisk(work, "features", "--task", TASK)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    return work


def _site(work: Path, site: str) -> pl.DataFrame:
    return pl.read_parquet(work / "meds" / "sites" / site / "data")


def test_messy_records_as_described(work):
    sites = ["hosp_central", "hosp_east", "chc_riverside", "chc_hillview", "chc_harbour"]
    events = {s: _site(work, s) for s in sites}
    everything = pl.concat(events.values())
    tail = everything.filter(pl.col("code").str.starts_with("LOCAL//Z"))
    assert tail["code"].n_unique() > 1_000  # a long tail ...
    counts = tail["code"].value_counts().sort("count", descending=True)["count"]
    assert counts[0] > 20 * counts[500]  # ... Zipf-like
    local_glu = {s: e.filter(pl.col("code") == messy.LOCAL_GLUCOSE) for s, e in events.items()}
    assert local_glu["hosp_east"].height > 100 and sum(f.height for f in local_glu.values()) == local_glu[
        "hosp_east"].height
    assert 2 < local_glu["hosp_east"]["numeric_value"].median() < 12  # mmol/L, not mg/dL
    assert events["hosp_east"].filter(pl.col("code") == vocab.MEASUREMENTS["glucose"].code).height == 0
    smoking = events["chc_hillview"].filter(pl.col("code") == vocab.SMOKING_STATUS)["text_value"]
    assert {"Never smoker", "Former smoker", "Current every day smoker", messy.UNKNOWN_SMOKING} <= set(smoking)
    riverside = events["chc_riverside"]["code"]
    assert riverside.str.starts_with("ICD9CM//").any()
    assert not riverside.str.starts_with("ICD10CM//").any() and not riverside.is_in(
        [d.snomed for d in vocab.DIAGNOSES.values()]).any()
    assert everything.filter(pl.col("code") == messy.CRP)["numeric_value"].min() >= 0
    # the tail lies within each record's span of visits (never back to the birth or a diagnosis's onset date)
    tail_first = tail.group_by("subject_id").agg(pl.col("time").min().alias("tail_first"))
    record_first = everything.filter(pl.col("code").str.starts_with(vocab.ENCOUNTER_PREFIX)).group_by("subject_id").agg(
        pl.col("time").min().alias("record_first"))
    joined = tail_first.join(record_first, on="subject_id")
    assert joined.height == tail_first.height and (joined["tail_first"] >= joined["record_first"]).all()
    # the sorted MEDS order holds after the additions
    for e in events.values():
        assert e.select("subject_id").equals(e.sort("subject_id", maintain_order=True).select("subject_id"))


def test_icd9_codes_of_the_messy_site_mean_the_same_concepts():
    cmap = load_concepts()
    for source, icd9 in messy.icd9_codes().items():
        assert set(cmap.concepts_of(icd9)) == set(cmap.concepts_of(source)), (source, icd9)


def test_messy_codes_reach_the_model_as_values_and_categories(work):
    spec = FeatureSpec.load(work / "features" / TASK / "spec.json")
    codes = {c.code: c for c in spec.codes}
    assert codes[messy.LOCAL_GLUCOSE].values and codes[messy.CRP].values
    assert messy.UNKNOWN_SMOKING in codes[vocab.SMOKING_STATUS].texts
    assert spec.fit_info["codes_under_min_subjects"] > 1_000


def _held_out_auroc(frame: pl.DataFrame, names: list[str]) -> float:
    def part(split: str) -> pl.DataFrame:
        return frame.filter(pl.col("split") == split)

    train, tuning, test = part("train"), part("tuning"), part("held_out")
    fit = lgb.Dataset(train.select(names).to_numpy(), train["boolean_value"].to_numpy())
    valid = lgb.Dataset(tuning.select(names).to_numpy(), tuning["boolean_value"].to_numpy(), reference=fit)
    params = {"objective": "binary", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 50,
              "verbose": -1, "num_threads": 2, "seed": 0, "deterministic": True}
    booster = lgb.train(params, fit, 300, valid_sets=[valid], callbacks=[lgb.early_stopping(30, verbose=False)])
    return roc_auc_score(test["boolean_value"].to_numpy(), booster.predict(test.select(names).to_numpy()))


def test_the_unmapped_lab_signal_is_learned(work):
    spec = FeatureSpec.load(work / "features" / TASK / "spec.json")
    frame = pl.read_parquet(work / "features" / TASK / "*.parquet")
    crp = set(spec.features_of_concept(messy.CRP))
    assert crp and all(spec.info(n).code == messy.CRP for n in crp)
    with_crp = _held_out_auroc(frame, list(spec.feature_names))
    without = _held_out_auroc(frame, [n for n in spec.feature_names if n not in crp])
    assert with_crp > without + 0.01, (with_crp, without)
