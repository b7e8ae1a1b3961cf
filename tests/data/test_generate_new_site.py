"""`chronorisk generate --new-site`: a site unlike the founding ones (code system, care pattern, population)."""

from __future__ import annotations

import subprocess
import sys

import polars as pl

from chronorisk.data.synth.checks import missing_share
from chronorisk.data.synth.new_site import NEW_SITE_ID, new_site_config


def test_new_site_is_generated_unlike_the_others(tmp_path):
    run = subprocess.run([sys.executable, "-m", "chronorisk.cli", "--work", str(tmp_path), "generate", "--new-site",
                          "--patients", "1500", "--workers", "1", "--seed", "5"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert NEW_SITE_ID in run.stdout
    meds = tmp_path / "meds"
    events = pl.scan_parquet(str(meds / "sites" / NEW_SITE_ID / "data" / "*.parquet")).collect()
    systems = set(events["code"].str.split("//").list.first().unique().to_list())
    assert "ICD10CM" in systems and "SNOMED" not in systems  # another code system for diagnoses
    founding = pl.scan_parquet(str(meds / "sites" / "hosp_central" / "data" / "*.parquet")).collect()
    assert "SNOMED" in set(founding["code"].str.split("//").list.first().unique().to_list())
    assert missing_share(meds, NEW_SITE_ID) > missing_share(meds, "hosp_central") + 0.2  # another care pattern
    cfg = new_site_config()
    assert (cfg.glucose_unit, cfg.hba1c_unit, cfg.diagnosis_vocab) == ("mmol/L", "mmol/mol", "ICD10CM")


def test_new_site_twice_is_refused_by_name(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(f"generate:\n  sites:\n    - {{site_id: {NEW_SITE_ID}, kind: community, share: 1, mean_age: 50, "
                      "female_share: 0.5, visits_per_year: 2, missing_rate: 0.3}\n")
    run = subprocess.run([sys.executable, "-m", "chronorisk.cli", "--params", str(params), "--work", str(tmp_path),
                          "generate", "--new-site", "--patients", "100"], capture_output=True, text=True)
    assert run.returncode != 0 and "--new-site" in run.stderr and "already configured" in run.stderr
    assert "Traceback" not in run.stderr
