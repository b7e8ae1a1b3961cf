"""Real data: the 123 Synthea bundles of ../shared/data/synthea-r4 (a tool nobody here wrote).

Every Patient, Encounter, Condition, Observation and MedicationRequest in the files is
either converted or quarantined with a reason, and the counts add up exactly to what the
files hold (counted here independently, with the standard library). Two patients were
checked by hand against their bundles; their values are pinned below.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest

from chronorisk.data.config import IngestConfig
from chronorisk.data.fhir.convert import CORE_TYPES
from chronorisk.data.fhir.ingest import IngestOptions, ingest
from chronorisk.data.fhir.quarantine import read_quarantine
from chronorisk.data.meds_io import scan_sites, site_ids, validate_site
from chronorisk.data.pseudonym import Pseudonymizer

KEY = b"chronorisk-test-key-0123456789"
PSEUDO = Pseudonymizer(KEY)
CLARINE = "b2eeab29-a67d-4941-8540-6372911cfc17"  # Clarine O'Keefe: type 2 diabetes, 11 HbA1c values
DOUGLAS = "6c1a94c7-5d69-4041-8785-96f2c563ce82"  # Douglas Walsh: died 2019, 97 BP panels without units


@pytest.fixture(scope="module")
def synthea(synthea_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("synthea")
    options = IngestOptions(input=synthea_dir, out=work / "ingested", quarantine_root=work / "quarantine", workers=2)
    report = ingest(options, IngestConfig(inline_below_mb=0), KEY, "test")
    events = scan_sites(work / "ingested").collect()
    return report, events, read_quarantine(Path(report["quarantine_file"])), work


@pytest.fixture(scope="module")
def in_files(synthea_dir):
    """Resource counts and identifying strings read straight from the files (stdlib json)."""
    counts: Counter = Counter()
    identifying: set[str] = set()
    for path in sorted(synthea_dir.glob("*.json.gz")):
        bundle = json.loads(gzip.decompress(path.read_bytes()))
        identifying.add(path.name.removesuffix(".json.gz"))
        for entry in bundle["entry"]:
            resource = entry["resource"]
            counts[resource["resourceType"]] += 1
            if resource["resourceType"] == "Patient":
                identifying.add(resource["id"])
                identifying.update(ident["value"] for ident in resource.get("identifier", []))
    return counts, identifying


def test_every_core_resource_is_converted_or_quarantined(synthea, in_files):
    report, _, quarantine, _ = synthea
    counts, _ = in_files
    assert report["files"] == {"read": 125, "inputs": 125, "ignored_other_files": 1,
                               "megabytes": pytest.approx(6.949, abs=0.01), "unreadable": {}, "empty_bundles": 0}
    assert {t: r["read"] for t, r in report["resources"].items()} == dict(counts)
    for rtype in CORE_TYPES:
        row = report["resources"][rtype]
        assert row["converted"] + row["quarantined"] == row["read"] == counts[rtype], rtype
        assert row["skipped"] == row["duplicate"] == 0
        in_quarantine = [line for line in quarantine if line["resource_type"] == rtype]
        assert len(in_quarantine) == row["quarantined"]
        assert all(line["reason"] and line["resource"]["resourceType"] == rtype for line in in_quarantine)
    assert sum(r["skipped"] for r in report["resources"].values()) == sum(
        n for t, n in counts.items() if t not in CORE_TYPES)
    # pinned: what this sample holds and what is wrong with it
    assert {t: (r["converted"], r["quarantined"]) for t, r in report["resources"].items() if t in CORE_TYPES} == {
        "Patient": (123, 0), "Encounter": (3320, 0), "Condition": (868, 0), "Observation": (17049, 105),
        "MedicationRequest": (804, 0)}
    # 97 BP panels whose components carry no unit; 8 HbA1c values below the plausible 3 %
    assert report["quarantine_categories"] == {"Observation": {"implausible_value": 8, "no_unit": 97}}
    assert report["quarantined_components"] == {} and report["duplicates"] == {}
    # events = 123 births + 123 sexes + 29 deaths + 3320 encounters + 868 conditions + 804 medication requests
    #   + observations: 14697 quantities + 1181 coded + 75 strings + 2 x 1095 BP components + 5 KOOS components
    assert report["events_written"] == 23415


def test_no_good_component_of_a_panel_is_quarantined(synthea):
    """Every quarantined resource with components has no component that could convert: each one
    is named in the reason, and none of them carries a unit (read here from the raw resource)."""
    _, _, quarantine, _ = synthea
    panels = [line for line in quarantine if line["resource"].get("component")]
    assert len(panels) == 97 and not any("component" in line for line in quarantine)
    for line in panels:
        for i, component in enumerate(line["resource"]["component"]):
            assert f"component[{i}] (" in line["reason"]
            quantity = component["valueQuantity"]
            assert "unit" not in quantity and "code" not in quantity


def test_sites_come_from_the_service_provider_and_validate(synthea):
    report, events, _, work = synthea
    sites = site_ids(work / "ingested")
    assert len(sites) == 47 and "unassigned" not in sites
    assert sum(report["sites"][s]["subjects"] for s in sites) == 123
    assert events.group_by("subject_id").agg(pl.col("site").n_unique()).get_column("site").max() == 1
    for site in sites:
        validate_site(work / "ingested", site)


def _patient(events: pl.DataFrame, source_id: str) -> pl.DataFrame:
    return events.filter(pl.col("subject_id") == PSEUDO.subject_id(source_id))


def _values(frame: pl.DataFrame, code: str) -> list[tuple[str, float]]:
    rows = frame.filter(pl.col("code") == code).sort("time")
    return [(t.isoformat(), round(v, 4)) for t, v in zip(rows["time"], rows["numeric_value"], strict=True)]


def test_clarine_by_hand(synthea):
    _, events, _, _ = synthea
    clarine = _patient(events, CLARINE)
    assert clarine.height == 314 and clarine.get_column("site").unique().to_list() == ["winchester_hospital"]
    assert clarine.filter(pl.col("time").is_null()).get_column("code").to_list() == ["GENDER//F"]
    assert clarine.filter(pl.col("code") == "MEDS_BIRTH").get_column("time").to_list() == [datetime(1951, 11, 25)]
    assert clarine.filter(pl.col("code") == "MEDS_DEATH").height == 0
    assert _values(clarine, "LOINC//4548-4") == [
        ("2012-01-29T21:42:54", 5.5705), ("2013-02-03T21:42:54", 5.7279), ("2014-02-09T21:42:54", 5.8853),
        ("2015-02-15T21:42:54", 6.0427), ("2016-02-14T21:42:54", 5.4975), ("2017-02-19T21:42:54", 5.4248),
        ("2018-01-14T21:42:54", 5.4248), ("2018-03-11T21:42:54", 5.4248), ("2019-03-17T21:42:54", 5.4248),
        ("2020-03-22T21:42:54", 5.4248), ("2021-03-28T21:42:54", 5.4248),
    ]
    systolic, diastolic = _values(clarine, "LOINC//8480-6"), _values(clarine, "LOINC//8462-4")
    assert len(systolic) == len(diastolic) == 11
    assert systolic[:3] == [("2012-01-29T21:42:54", 109.7282), ("2013-02-03T21:42:54", 110.6026),
                            ("2014-02-09T21:42:54", 133.6044)]
    assert diastolic[0] == ("2012-01-29T21:42:54", 79.2967) and systolic[-1] == ("2021-03-28T21:42:54", 109.088)
    smoking = clarine.filter(pl.col("code") == "LOINC//72166-2")
    assert smoking.height == 11 and smoking.get_column("text_value").unique().to_list() == ["SNOMED//266919005"]
    assert clarine.filter(pl.col("code") == "ENCOUNTER//AMB").height == 25
    conditions = clarine.filter(pl.col("code").str.starts_with("SNOMED//"))
    assert conditions.height == 14
    assert conditions.filter(pl.col("code") == "SNOMED//44054006").get_column("time").to_list() == [
        datetime(2002, 12, 1, 21, 42, 54)]
    medications = clarine.filter(pl.col("code").str.starts_with("RXNORM//")).sort("time")
    assert medications.height == 7 and medications.get_column("numeric_value").null_count() == 7  # no supply sent
    assert medications.row(0)[1:3] == (datetime(2002, 12, 1, 21, 42, 54), "RXNORM//860975")  # metformin


def test_douglas_by_hand(synthea):
    _, events, quarantine, _ = synthea
    douglas = _patient(events, DOUGLAS)
    assert douglas.height == 410 and douglas.get_column("site").unique().to_list() == ["st_vincent_hospital"]
    assert douglas.filter(pl.col("code") == "MEDS_DEATH").get_column("time").to_list() == [
        datetime(2019, 12, 20, 2, 43, 19)]
    encounters = dict(douglas.filter(pl.col("code").str.starts_with("ENCOUNTER//")).group_by("code").len().iter_rows())
    assert encounters == {"ENCOUNTER//AMB": 125, "ENCOUNTER//EMER": 6, "ENCOUNTER//IMP": 2}
    # 107 BP panels: 10 with units -> 10 systolic + 10 diastolic events; 97 without -> quarantined
    assert _values(douglas, "LOINC//8480-6")[:2] == [("2010-09-22T02:43:19", 102.7524),
                                                    ("2011-09-28T02:43:19", 127.0739)]
    assert _values(douglas, "LOINC//8462-4")[0] == ("2010-09-22T02:43:19", 84.0941)
    assert douglas.filter(pl.col("code") == "LOINC//8480-6").height == 10
    his = [line for line in quarantine if line["resource"]["subject"]["reference"] == f"urn:uuid:{DOUGLAS}"]
    assert len(his) == 97 and {line["category"] for line in his} == {"no_unit"}
    assert his[0]["reason"] == (
        "component[0] (LOINC//8462-4): Diastolic blood pressure has no unit; accepted: mm[Hg], mmHg (mm Hg); "
        "component[1] (LOINC//8480-6): Systolic blood pressure has no unit; accepted: mm[Hg], mmHg (mm Hg)")
    assert his[0]["file"].startswith("Douglas_Walsh_") and his[0]["location"].startswith("entry ")
    assert _values(douglas, "LOINC//4548-4")[-1] == ("2019-11-13T02:43:19", 5.8796)


def test_no_identifier_leaves_the_quarantine(synthea, in_files):
    report, events, _, work = synthea
    _, identifying = in_files
    blob = json.dumps(report) + "\n".join(
        p.read_text() for p in (work / "ingested").rglob("dataset.json"))
    texts = set(events.get_column("text_value").drop_nulls().unique().to_list())
    codes = set(events.get_column("code").unique().to_list())
    for secret in identifying:
        assert secret not in blob
        assert not any(secret in value for value in texts | codes)
