"""Real records from a tool nobody here wrote: the Synthea sample, ingested, goes through `chronorisk features`
and every code and text value either reaches a feature or is counted in what the command prints."""

from __future__ import annotations

import subprocess
import sys

import polars as pl
import pytest

from chronorisk.data.config import IngestConfig
from chronorisk.data.fhir.ingest import IngestOptions, ingest
from chronorisk.data.meds_io import scan_sites
from chronorisk.features.spec import FeatureSpec
from chronorisk.features.vocabulary import code_summary, read_as_concept

KEY = b"chronorisk-test-key-0123456789"


@pytest.fixture(scope="module")
def featurized(synthea_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("synthea-features")
    options = IngestOptions(input=synthea_dir, out=work / "ingested", quarantine_root=work / "quarantine", workers=1)
    ingest(options, IngestConfig(inline_below_mb=0), KEY, "test")
    out = subprocess.run([sys.executable, "-m", "chronorisk.cli", "--work", str(work), "features", "--meds",
                          str(work / "ingested"), "--task", "onset_2y"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    spec = FeatureSpec.load(work / "features" / "onset_2y" / "spec.json")
    return spec, out.stdout, scan_sites(work / "ingested").collect()


def test_every_code_and_text_value_is_a_feature_or_counted(featurized):
    spec, printed, events = featurized
    info = spec.fit_info
    summary = code_summary(events)  # every subject (the fit saw the TRAIN subjects only)
    assert info["codes_in_summary"] == info["codes_frequent"] + info["codes_under_min_subjects"]
    assert info["codes_in_summary"] <= summary.filter(pl.col("text").is_null()).height
    texts = summary.filter(pl.col("text").is_not_null())
    unread = sum(1 for code, text in texts.select("code", "text").iter_rows() if not read_as_concept(code, text))
    assert sum(len(c.texts) for c in spec.codes) + info["text_values_without_feature"] <= unread
    assert f"{info['codes_under_min_subjects']} codes seen in fewer than" in printed
    assert f"{info['text_values_without_feature']} text values" in printed
    assert f"dropped {info['dropped']['count']} features" in printed


def test_synthea_numbers_outside_the_map_reach_the_model_as_values(featurized):
    spec, _, _ = featurized
    valued = [c for c in spec.codes if c.values]
    assert len(valued) >= 10  # heart rate, respiratory rate, pain score, ... outside the concept map
    assert any(spec.info(n).kind == "value" and spec.info(n).code == valued[0].code for n in spec.feature_names)
    # Synthea's smoking answers are SNOMED codes: read by the smoking concept, not left as categories
    smoking_texts = [c for c in spec.codes if c.code == "LOINC//72166-2"]
    assert not smoking_texts or not smoking_texts[0].texts
