"""`chronorisk generate`: MEDS validity, site heterogeneity, FHIR contract, ground truth, CLI.

One realistic cohort (with FHIR) is generated once per module and read by most tests.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections import Counter
from datetime import date, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import slow_scale
from sklearn.metrics import roc_auc_score

from chronorisk.data import meds_io
from chronorisk.data.codes import DIAGNOSES, MEASUREMENT_BY_CODE, SYSTEM_BY_VOCAB, VOCAB_BY_SYSTEM
from chronorisk.data.config import GenerateConfig
from chronorisk.data.synth.checks import diagnosis_codes, missing_share, realized_outcomes
from chronorisk.data.synth.runner import generate

SEED = 11


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    generate(GenerateConfig(patients=1800, seed=SEED, chunk_size=600, fhir=True), out, workers=1)
    return out


@pytest.fixture(scope="module")
def bundles(cohort) -> dict[str, list[dict]]:
    return {site: [json.loads(gzip.decompress(p.read_bytes()))
                   for p in sorted((cohort / "fhir" / site).glob("*.json.gz"))]
            for site in ("hosp_east", "chc_hillview")}


@pytest.fixture(scope="module")
def events(cohort) -> pl.DataFrame:
    return meds_io.scan_sites(cohort / "meds").collect()


def _cli(work: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chronorisk.cli", "--work", str(work), "generate", *args],
                          capture_output=True, text=True, timeout=600)


# ------------------------------------------------------------------ MEDS output
def test_every_site_is_valid_meds(cohort):
    sites = meds_io.site_ids(cohort / "meds")
    assert sites == sorted(s.site_id for s in GenerateConfig().sites)
    for site in sites:
        meds_io.validate_site(cohort / "meds", site)
        shards = sorted((cohort / "meds" / "sites" / site / "data").glob("*.parquet"))
        assert [p.name for p in shards] == ["0000.parquet", "0001.parquet", "0002.parquet"]


def test_shards_are_sorted_subject_time_code_with_statics_first(cohort):
    shard = pl.read_parquet(cohort / "meds" / "sites" / "hosp_central" / "data" / "0001.parquet")
    resorted = meds_io.conform_events(shard)
    assert shard.equals(resorted)
    first = shard.group_by("subject_id", maintain_order=True).first()
    assert first["time"].null_count() == first.height  # GENDER row first for everyone


def test_subject_ids_are_unique_across_sites_and_match_splits(cohort, events):
    per_site = events.group_by("subject_id").agg(pl.col("site").n_unique())
    assert per_site["site"].max() == 1
    assert events["subject_id"].n_unique() == 1800
    for site in meds_io.site_ids(cohort / "meds"):
        splits = meds_io.read_splits(cohort / "meds", site)
        assert set(splits["subject_id"]) == set(events.filter(pl.col("site") == site)["subject_id"])


def test_codes_come_from_the_shared_vocabulary_with_descriptions(cohort, events):
    codes = set(events["code"].unique())
    known = {c for d in DIAGNOSES.values() for c in (d.snomed, d.icd10)} | set(MEASUREMENT_BY_CODE)
    other = {c for c in codes if c not in known}
    assert all(c.split("//")[0] in ("GENDER", "ENCOUNTER", "RXNORM", "LOINC") or c.startswith("MEDS_")
               for c in other), other
    meta = pl.read_parquet(cohort / "meds" / "sites" / "hosp_central" / "metadata" / "codes.parquet")
    assert meta["description"].null_count() == 0
    assert set(meta["code"]) == set(events.filter(pl.col("site") == "hosp_central")["code"])


def test_at_least_five_years_of_longitudinal_measurements(events):
    hba1c = events.filter(pl.col("code") == "LOINC//4548-4")
    span = hba1c["time"].max() - hba1c["time"].min()
    assert span.days >= 5 * 365
    per_subject = hba1c.group_by("subject_id").len()
    assert per_subject["len"].median() >= 5
    for code in ("ENCOUNTER//AMB", "ENCOUNTER//EMER", "ENCOUNTER//IMP", "LOINC//72166-2", "MEDS_DEATH",
                 "LOINC//8480-6", "LOINC//39156-5", "LOINC//18262-6", "LOINC//2085-9", "LOINC//2093-3",
                 "LOINC//38483-4", "LOINC//33914-3", "LOINC//2339-0"):
        assert events.filter(pl.col("code") == code).height > 0, code


def test_medication_requests_carry_days_supplied_and_adherence_varies(events):
    meds = events.filter(pl.col("code").str.starts_with("RXNORM//"))
    assert set(meds["numeric_value"].unique()) == {30.0, 90.0}
    assert {"RXNORM//860975", "RXNORM//106892", "RXNORM//314076", "RXNORM//259255"} <= set(meds["code"])
    metformin = meds.filter((pl.col("code") == "RXNORM//860975") & (pl.col("site") == "hosp_central"))
    # proportion of days covered between first and last request, per patient
    pdc = (metformin.group_by("subject_id").agg(
        (pl.col("numeric_value").sum() - pl.col("numeric_value").last()).alias("days"),
        ((pl.col("time").max() - pl.col("time").min()).dt.total_days()).alias("span"))
        .filter(pl.col("span") > 365).with_columns((pl.col("days") / pl.col("span")).alias("pdc")))
    assert 0.6 < pdc["pdc"].mean() < 0.9
    assert pdc["pdc"].std() > 0.08


def test_death_is_absorbing(events):
    death = events.filter(pl.col("code") == "MEDS_DEATH").select("subject_id", pl.col("time").alias("death"))
    assert death["subject_id"].is_unique().all()
    after = events.join(death, on="subject_id").filter(pl.col("time") > pl.col("death"))
    assert after.height == 0


# ------------------------------------------------------------- heterogeneity
def test_sites_differ_in_population_visits_and_missingness(cohort, events):
    births = events.filter(pl.col("code") == "MEDS_BIRTH").with_columns(
        ((pl.datetime(2019, 1, 1) - pl.col("time")).dt.total_days() / 365.25).alias("age"))
    ages = dict(births.group_by("site").agg(pl.col("age").mean()).iter_rows())
    assert ages["chc_harbour"] - ages["chc_hillview"] > 8
    visits = events.filter(pl.col("code") == "ENCOUNTER//AMB").group_by("site").len()
    patients = events.filter(pl.col("code") == "MEDS_BIRTH").group_by("site").len()
    rate = dict(visits.join(patients, on="site").select("site", pl.col("len") / pl.col("len_right")).iter_rows())
    assert rate["hosp_central"] > 1.5 * rate["chc_hillview"]
    for site in ("chc_riverside", "chc_hillview", "chc_harbour"):
        assert missing_share(cohort / "meds", site) > 0.45, site
    for site in ("hosp_central", "hosp_east"):
        assert missing_share(cohort / "meds", site) < 0.3, site


def test_one_site_codes_diagnoses_in_icd10cm(events):
    dx_codes = {c for d in DIAGNOSES.values() for c in (d.snomed, d.icd10)}
    dx = events.filter(pl.col("code").is_in(list(dx_codes)))
    vocab = dx.with_columns(pl.col("code").str.split("//").list.first().alias("vocab"))
    by_site = {s: set(g["vocab"]) for (s,), g in vocab.group_by("site")}
    assert by_site["chc_hillview"] == {"ICD10CM"}
    assert all(v == {"SNOMED"} for s, v in by_site.items() if s != "chc_hillview")


def test_meds_values_are_canonical_at_every_site(events):
    glucose = events.filter(pl.col("code") == "LOINC//2339-0").group_by("site").agg(pl.col("numeric_value").median())
    assert all(80 < v < 130 for v in glucose["numeric_value"])  # mg/dL everywhere, mmol/L site included
    hba1c = events.filter(pl.col("code") == "LOINC//4548-4").group_by("site").agg(pl.col("numeric_value").median())
    assert all(5.0 < v < 6.5 for v in hba1c["numeric_value"])


# --------------------------------------------------------------------- FHIR
def _vocab_code(coding: dict) -> str:
    return f"{VOCAB_BY_SYSTEM[coding['system']]}//{coding['code']}"


def _fhir_events(bundle: dict) -> list[tuple]:
    """A minimal, independent reading of the bundle: (code, time, value in canonical unit, text)."""
    out = []
    for entry in bundle["entry"]:
        r = entry["resource"]
        kind = r["resourceType"]
        if kind == "Patient":
            out.append(("MEDS_BIRTH", r["birthDate"] + "T00:00:00", None, None))
            out.append(("GENDER//" + r["gender"][0].upper(), None, None, None))
            if "deceasedDateTime" in r:
                out.append(("MEDS_DEATH", r["deceasedDateTime"][:19], None, None))
        elif kind == "Encounter":
            out.append(("ENCOUNTER//" + r["class"]["code"], r["period"]["start"][:19], None, None))
        elif kind == "Condition":
            out.append((_vocab_code(r["code"]["coding"][0]), r["onsetDateTime"][:19], None, None))
        elif kind == "MedicationRequest":
            days = float(r["dispenseRequest"]["expectedSupplyDuration"]["value"])
            out.append((_vocab_code(r["medicationCodeableConcept"]["coding"][0]), r["authoredOn"][:19], days, None))
        elif kind == "Observation":
            when = r["effectiveDateTime"][:19]
            parts = r.get("component", [r])
            for part in parts:
                code = _vocab_code(part["code"]["coding"][0])
                if "valueCodeableConcept" in part:
                    out.append((code, when, None, _vocab_code(part["valueCodeableConcept"]["coding"][0])))
                else:
                    q = part["valueQuantity"]
                    value = MEASUREMENT_BY_CODE[code].to_canonical(q["value"], q["unit"])
                    out.append((code, when, float(np.float32(value)), None))
    return out


def test_fhir_bundles_hold_exactly_the_meds_events(bundles, events):
    for site in ("hosp_east", "chc_hillview"):
        expected = Counter()
        for code, t, v, text in events.filter(pl.col("site") == site).select(
                "code", "time", "numeric_value", "text_value").iter_rows():
            expected[(code, t.isoformat() if t else None, None if v is None else float(v), text)] += 1
        got = Counter()
        for bundle in bundles[site]:
            got.update(_fhir_events(bundle))
        assert got == expected, site


def test_fhir_bundles_are_synthea_shaped_transactions(cohort, bundles):
    assert len(list((cohort / "fhir").rglob("*.json.gz"))) == 1800
    bundle = bundles["hosp_east"][0]
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    for entry in bundle["entry"]:
        assert entry["fullUrl"] == "urn:uuid:" + entry["resource"]["id"]
        assert entry["request"] == {"method": "POST", "url": entry["resource"]["resourceType"]}
    kinds = Counter(e["resource"]["resourceType"] for e in bundle["entry"])
    assert kinds["Patient"] == 1 and kinds["Organization"] == 1 and kinds["Encounter"] > 3
    patient = bundle["entry"][0]["resource"]
    assert patient["name"][0]["family"] and patient["telecom"][0]["value"] and patient["address"][0]["line"]
    assert patient["identifier"][0]["value"].startswith("MRN")
    org = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Organization")
    assert org["resource"]["identifier"] == [{"system": "urn:chronorisk:site", "value": "hosp_east"}]
    for e in bundle["entry"]:
        if e["resource"]["resourceType"] == "Encounter":
            assert e["resource"]["serviceProvider"]["reference"] == org["fullUrl"]
    bp = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"
          and e["resource"]["code"]["coding"][0]["code"] == "55284-4"]
    assert bp and all({c["code"]["coding"][0]["code"] for c in r["component"]} == {"8480-6", "8462-4"} for r in bp)


def test_fhir_uses_the_sites_units_and_vocabulary(bundles):
    units = Counter()
    for bundle in bundles["hosp_east"][:60]:
        for e in bundle["entry"]:
            r = e["resource"]
            if r["resourceType"] == "Observation" and "valueQuantity" in r:
                units[(r["code"]["coding"][0]["code"], r["valueQuantity"]["unit"])] += 1
                if r["code"]["coding"][0]["code"] == "2339-0":
                    assert 2.5 < r["valueQuantity"]["value"] < 30  # mmol/L
    assert {("2339-0", "mmol/L"), ("4548-4", "mmol/mol"), ("38483-4", "umol/L"), ("18262-6", "mmol/L")} <= set(units)
    assert not any(u in ("mg/dL", "%") for (_, u) in units)
    systems = {e["resource"]["code"]["coding"][0]["system"] for b in bundles["chc_hillview"][:60]
               for e in b["entry"] if e["resource"]["resourceType"] == "Condition"}
    assert systems == {SYSTEM_BY_VOCAB["ICD10CM"]}


# -------------------------------------------------------------------- truth
def test_truth_files_have_the_contract_columns_and_grid(cohort):
    for task, last in (("complication_1y", date(2024, 7, 1)), ("onset_2y", date(2024, 1, 1))):
        table = pq.read_table(cohort / "truth" / f"{task}.parquet")
        assert [(f.name, str(f.type)) for f in table.schema] == [
            ("subject_id", "int64"), ("prediction_time", "timestamp[us]"), ("site", "string"),
            ("true_risk", "double")]
        df = pl.from_arrow(table)
        times = sorted(df["prediction_time"].unique())
        assert times[0] == datetime(2021, 1, 1) and times[-1] == datetime(*last.timetuple()[:3])
        assert all(t.day == 1 and t.month in (1, 7) for t in times)
        assert df.select(pl.struct("subject_id", "prediction_time").is_unique().all()).item()
        assert df["true_risk"].min() >= 0.0 and df["true_risk"].max() <= 1.0
        assert df["true_risk"].null_count() == 0


def test_truth_rows_are_the_recorded_population(cohort, events):
    """A truth row exists exactly for subjects alive and in the task's population by their records."""
    dm_htn = diagnosis_codes(["diabetes", "hypertension"])
    outcomes = diagnosis_codes(["ckd3", "ckd4", "nephropathy", "retinopathy", "neuropathy", "mi", "stroke",
                                "heart_failure"])
    subjects = events.select("subject_id").unique()
    for task in ("onset_2y", "complication_1y"):
        truth = pl.read_parquet(cohort / "truth" / f"{task}.parquet")
        for t in truth["prediction_time"].unique().to_list()[::3]:
            before = events.filter(pl.col("time") < t)
            dead = set(before.filter(pl.col("code") == "MEDS_DEATH")["subject_id"])
            diag = set(before.filter(pl.col("code").is_in(dm_htn))["subject_id"])
            compl = set(before.filter(pl.col("code").is_in(outcomes))["subject_id"])
            alive = set(subjects["subject_id"]) - dead
            want = alive - diag if task == "onset_2y" else (alive & diag) - compl
            got = set(truth.filter(pl.col("prediction_time") == t)["subject_id"])
            assert got == want, (task, t)


def test_truth_is_calibrated_against_recorded_outcomes(cohort):
    sites = meds_io.site_ids(cohort / "meds")
    for task in ("onset_2y", "complication_1y"):
        df = realized_outcomes(cohort / "meds", cohort / "truth" / f"{task}.parquet", task, sites)
        rate, mean = df["outcome"].mean(), df["true_risk"].mean()
        assert 0.03 < rate < 0.15, (task, rate)
        assert abs(rate - mean) < 0.015, (task, rate, mean)
        assert roc_auc_score(df["outcome"].to_numpy(), df["true_risk"].to_numpy()) > 0.75


@pytest.mark.slow
def test_truth_is_calibrated_by_decile_at_scale(tmp_path):
    n = max(3000, round(20_000 * slow_scale()))
    generate(GenerateConfig(patients=n, seed=13, chunk_size=10_000), tmp_path, workers=2)
    sites = meds_io.site_ids(tmp_path / "meds")
    for task in ("onset_2y", "complication_1y"):
        df = realized_outcomes(tmp_path / "meds", tmp_path / "truth" / f"{task}.parquet", task, sites)
        assert abs(df["outcome"].mean() - df["true_risk"].mean()) < 0.01, task
        deciles = (df.with_columns(pl.col("true_risk").qcut(10, labels=[str(i) for i in range(10)]).alias("bin"))
                   .group_by("bin").agg(pl.col("true_risk").mean().alias("p"), pl.col("outcome").mean().alias("y"),
                                        pl.len().alias("n")))
        for p, y, count in deciles.select("p", "y", "n").iter_rows():
            assert abs(p - y) <= max(0.02, 5 * (p * (1 - p) / count) ** 0.5), (task, p, y, count)


# ---------------------------------------------------------------------- CLI
def test_cli_end_to_end_prints_counts_not_identifiers(tmp_path):
    work = tmp_path / "w"
    out = _cli(work, "--patients", "300", "--seed", "3", "--chunk-size", "150")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("generated 300 patients (realistic, seed 3)")
    assert any("hosp_east" in line and "patients" in line for line in lines)
    assert "truth rows" in out.stdout and "subject" not in out.stdout
    for site in meds_io.site_ids(work / "meds"):
        meds_io.validate_site(work / "meds", site)
    assert (work / "truth" / "onset_2y.parquet").is_file() and not (work / "fhir").exists()
    assert not list(work.glob(".generate-staging-*"))


@pytest.mark.parametrize(("args", "field"), [
    (["--patients", "0"], "--patients"),
    (["--drift", "site=nowhere,from=2024-01-01,kind=units"], "--drift"),
    (["--drift", "site=hosp_east,from=2024-13-01,kind=units"], "--drift"),
    (["--drift", "site=hosp_east,kind=units"], "--drift"),
    (["--drift", "site=hosp_east,from=2024-01-01,kind=weather"], "--drift"),
])
def test_cli_bad_input_is_one_line_naming_the_field(tmp_path, args, field):
    out = _cli(tmp_path / "w", *args)
    assert out.returncode == 2
    assert field in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_failed_run_keeps_the_previous_cohort(tmp_path, monkeypatch):
    out = tmp_path / "w"
    generate(GenerateConfig(patients=60, seed=1, chunk_size=60), out, workers=1)
    before = sorted(p.read_bytes() for p in (out / "meds").rglob("*.parquet"))

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("chronorisk.data.synth.runner.run_chunk", boom)
    with pytest.raises(RuntimeError):
        generate(GenerateConfig(patients=60, seed=2, chunk_size=60), out, workers=1)
    assert sorted(p.read_bytes() for p in (out / "meds").rglob("*.parquet")) == before
    assert not list(out.glob(".generate-staging-*"))


def test_same_seed_gives_byte_identical_files_whatever_the_workers(tmp_path):
    cfg = GenerateConfig(patients=300, seed=5, chunk_size=120, fhir=True)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(cfg, a, workers=1)
    generate(cfg, b, workers=2)
    generate(cfg.model_copy(update={"seed": 6, "fhir": False}), c, workers=1)

    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and p.suffix in (".parquet", ".gz")}

    fa, fb, fc = files(a), files(b), files(c)
    assert fa.keys() == fb.keys() and len(fa) > 300
    assert all(fa[k] == fb[k] for k in fa)
    data = [k for k in fa if k.parts[0] == "meds" and "data" in k.parts]
    assert all(fa[k] != fc.get(k) for k in data)
