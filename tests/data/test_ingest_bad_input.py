"""Bad input: every bad file or record is quarantined (or refused) naming the file and the
problem, and the rest of the batch completes."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import polars as pl
import pytest

from chronorisk.data.config import IngestConfig
from chronorisk.data.fhir.ingest import IngestOptions, ingest
from chronorisk.data.fhir.quarantine import read_quarantine
from chronorisk.data.meds_io import scan_site, site_ids, validate_site
from chronorisk.data.pseudonym import Pseudonymizer
from chronorisk.errors import InputError

KEY = b"chronorisk-test-key-0123456789"


def patient(pid: str) -> dict:
    return {"resourceType": "Patient", "id": pid, "birthDate": "1970-01-01", "gender": "male",
            "name": [{"family": "Doe"}]}


def observation(pid: str, code: str, value, unit: str, when: str = "2020-01-01T00:00:00Z") -> dict:
    return {"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
            "subject": {"reference": f"urn:uuid:{pid}"}, "effectiveDateTime": when,
            "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}}


def bundle(*resources: dict) -> dict:
    return {"resourceType": "Bundle", "type": "transaction",
            "entry": [{"fullUrl": f"urn:uuid:{r['id']}" if "id" in r else None, "resource": r} for r in resources]}


def good_bundle(pid: str) -> dict:
    return bundle(patient(pid), observation(pid, "4548-4", 6.5, "%"), observation(pid, "8480-6", 128, "mm[Hg]"))


def run(folder: Path, work: Path, **config) -> dict:
    options = IngestOptions(input=folder, out=work / "ingested", quarantine_root=work / "quarantine",
                            site="site_a", workers=config.pop("workers", 1))
    return ingest(options, IngestConfig(**config), KEY, "test")


@pytest.fixture
def bad_folder(tmp_path) -> Path:
    """Two good bundles and one of each kind of bad input."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good1.json").write_bytes(json.dumps(good_bundle("g1")).encode())
    (folder / "good2.json.gz").write_bytes(gzip.compress(json.dumps(good_bundle("g2")).encode()))
    (folder / "truncated.json").write_text(json.dumps(good_bundle("t1"))[:150])
    (folder / "not_bundle.json").write_text(json.dumps({"resourceType": "Patient", "id": "x"}))
    (folder / "array.json").write_text("[1, 2, 3]")
    no_subject = observation("r1", "8480-6", 120, "mm[Hg]")
    del no_subject["subject"]
    (folder / "records.json").write_text(json.dumps(bundle(
        patient("r1"),
        no_subject,
        observation("r1", "2339-0", 5.5, "g/L"),  # unit cannot be converted
        observation("r1", "4548-4", 6.1, "%", when="2020-02-31T00:00:00Z"),  # no such date
        observation("r1", "4548-4", 6.2, "%", when="last tuesday"),  # not a date at all
    )))
    with open(folder / "random.json", "wb") as fh:  # 50 MB of random bytes
        fh.write(os.urandom(50 * 1024 * 1024))
    (folder / "random_small.json.gz").write_bytes(os.urandom(4096))  # not gzip
    (folder / "notes.txt").write_text("not FHIR: ignored and counted")
    return folder


def test_bad_files_and_records_are_quarantined_and_the_rest_completes(bad_folder, work):
    report = run(bad_folder, work)
    lines = read_quarantine(Path(report["quarantine_file"]))
    by_file = {}
    for line in lines:
        by_file.setdefault(line["file"], []).append(line)

    # whole files: named, with the problem; their content is not copied
    assert by_file["truncated.json"][0]["category"] == "not_json"
    assert "not valid JSON" in by_file["truncated.json"][0]["reason"]
    assert by_file["not_bundle.json"][0]["category"] == "not_a_bundle"
    assert "'Patient'" in by_file["not_bundle.json"][0]["reason"]
    assert by_file["array.json"][0]["category"] == "not_a_bundle"
    assert by_file["random.json"][0]["category"] == "not_json"
    assert by_file["random_small.json.gz"][0]["category"] == "bad_gzip"
    assert all("resource" not in line for f in ("truncated.json", "random.json") for line in by_file[f])

    # records: named by file and entry, with the reason and the raw resource to fix it
    records = {line["category"]: line for line in by_file["records.json"]}
    assert set(records) == {"no_subject", "unit_not_convertible", "bad_date"}
    assert sum(line["category"] == "bad_date" for line in by_file["records.json"]) == 2
    assert records["no_subject"]["location"] == "entry 1" and records["no_subject"]["resource_type"] == "Observation"
    assert "'g/L'" in records["unit_not_convertible"]["reason"] and "mg/dL" in records["unit_not_convertible"]["reason"]
    assert records["unit_not_convertible"]["resource"]["valueQuantity"]["unit"] == "g/L"
    assert "2020-02-31" in by_file["records.json"][2]["reason"] or "2020-02-31" in by_file["records.json"][3]["reason"]

    # the report counts it all; the good data is there
    assert report["files"]["read"] == 8 and report["files"]["ignored_other_files"] == 1
    assert report["files"]["unreadable"] == {"bad_gzip": 1, "not_a_bundle": 2, "not_json": 2}
    assert report["resources"]["Observation"] == {"read": 8, "converted": 4, "quarantined": 4, "skipped": 0,
                                                     "duplicate": 0}
    assert report["resources"]["Patient"]["converted"] == 3
    assert report["quarantine_categories"]["Observation"] == {"bad_date": 2, "no_subject": 1,
                                                               "unit_not_convertible": 1}
    assert report["quarantine_lines"] == len(lines) == 5 + 4
    events = scan_site(work / "ingested", "site_a").collect()
    pseudo = Pseudonymizer(KEY)
    g1 = events.filter(pl.col("subject_id") == pseudo.subject_id("g1"))
    assert g1.get_column("code").to_list() == ["GENDER//M", "MEDS_BIRTH", "LOINC//4548-4", "LOINC//8480-6"]
    assert events.get_column("subject_id").n_unique() == 3
    validate_site(work / "ingested", "site_a")


def test_empty_folder_is_refused_naming_it(tmp_path, work):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("nothing here")
    with pytest.raises(InputError, match=r"--input: .*empty holds no FHIR files"):
        run(empty, work)
    with pytest.raises(InputError, match="does not exist"):
        run(tmp_path / "missing", work)
    assert not (work / "ingested").exists()


def test_oversize_file_and_gzip_bomb_are_refused(tmp_path, work):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.json").write_text(json.dumps(good_bundle("g1")))
    big = json.dumps(good_bundle("b1")) + " " * 2_000_000
    (folder / "big.json").write_text(big)
    (folder / "bomb.json.gz").write_bytes(gzip.compress(big.encode()))  # small on disk, large inflated
    report = run(folder, work, max_file_mb=1.0)
    lines = {line["file"]: line for line in read_quarantine(Path(report["quarantine_file"]))}
    assert lines["big.json"]["category"] == "oversize" and "max_file_mb" in lines["big.json"]["reason"]
    assert lines["bomb.json.gz"]["category"] == "oversize" and "decompresses" in lines["bomb.json.gz"]["reason"]
    assert report["resources"]["Patient"]["converted"] == 1


def test_ndjson_bad_lines_are_quarantined_with_their_offset(tmp_path, work):
    folder = tmp_path / "bulk"
    folder.mkdir()
    good = [patient("n1"), observation("n1", "4548-4", 6.0, "%"), observation("n1", "4548-4", 7.0, "%")]
    for r in good[1:]:
        r["subject"] = {"reference": "Patient/n1"}
    text = "\n".join(json.dumps(r) for r in good[:2]) + "\n{not json\n\n" + json.dumps(good[2]) + "\n[1]\n"
    (folder / "export.ndjson").write_text(text)
    report = run(folder, work)
    lines = read_quarantine(Path(report["quarantine_file"]))
    assert [(line["category"], line["location"]) for line in lines] == [
        ("not_json", f"byte {text.index('{not')}"), ("not_a_resource", f"byte {text.index('[1]')}")]
    assert lines[0]["raw_line"] == "{not json\n"
    assert report["ndjson_line_problems"] == {"not_a_resource": 1, "not_json": 1}
    assert report["resources"]["Observation"]["converted"] == 2


def test_ndjson_split_into_byte_ranges_reads_every_line_once(tmp_path, work):
    """A large NDJSON file is cut into ranges for several workers: no line lost or doubled."""
    folder = tmp_path / "bulk"
    folder.mkdir()
    with open(folder / "Patient.ndjson", "w") as fh:
        fh.writelines(json.dumps(patient(f"p{i}")) + "\n" for i in range(50))
    with open(folder / "Observation.ndjson", "w") as fh:
        for i in range(3000):
            r = observation(f"p{i % 50}", "8480-6", 100 + i % 80, "mm[Hg]")
            r["subject"] = {"reference": f"Patient/p{i % 50}"}
            fh.write(json.dumps(r) + "\n")
    report = run(folder, work, task_mb=0.05, workers=1)
    assert report["resources"]["Observation"] == {"read": 3000, "converted": 3000, "quarantined": 0, "skipped": 0,
                                                  "duplicate": 0}
    events = scan_site(work / "ingested", "site_a").collect().filter(pl.col("code") == "LOINC//8480-6")
    assert events.height == 3000 and events.get_column("subject_id").n_unique() == 50


def test_rerun_replaces_cleanly_and_refuses_foreign_folders(tmp_path, work):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps(good_bundle("g1")))
    run(folder, work)
    (folder / "a.json").unlink()
    (folder / "b.json").write_text(json.dumps(good_bundle("g2")))
    options = IngestOptions(input=folder, out=work / "ingested", quarantine_root=work / "quarantine", site="site_b")
    ingest(options, IngestConfig(), KEY)
    assert site_ids(work / "ingested") == ["site_b"]  # the old site is gone, not mixed in
    assert not [p for p in (work).iterdir() if p.name.startswith(".ingested")]  # no temp folders left
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(InputError, match="refusing to replace"):
        ingest(IngestOptions(input=folder, out=foreign, quarantine_root=work / "q"), IngestConfig(), KEY)
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_patients_without_a_known_organization_go_to_the_unassigned_site(tmp_path, work):
    folder = tmp_path / "in"
    folder.mkdir()
    stray = observation("u1", "8480-6", 120, "mm[Hg]")
    del stray["subject"]
    encounter = {"resourceType": "Encounter", "class": {"code": "AMB"}, "subject": {"reference": "urn:uuid:u2"},
                 "period": {"start": "2020-01-01"}, "serviceProvider": {"reference": "Organization/nowhere"}}
    (folder / "a.json").write_text(json.dumps(bundle(patient("u1"), stray)))
    (folder / "b.json").write_text(json.dumps(bundle(patient("u2"), encounter)))
    options = IngestOptions(input=folder, out=work / "ingested", quarantine_root=work / "quarantine")
    report = ingest(options, IngestConfig(unassigned_site="nowhere_known"), KEY)
    assert site_ids(work / "ingested") == ["nowhere_known"]
    assert report["sites"]["nowhere_known"]["subjects"] == 2
    assert report["sites"]["(no subject)"]["resources"]["Observation"]["quarantined"] == 1
