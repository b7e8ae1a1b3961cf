"""`chronorisk ingest` end to end through the real CLI: sites from the service provider,
a worker pool, pseudonymous ids, nothing identifying in any output, clean refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from chronorisk.data.meds_io import read_dataset_metadata, scan_site, site_ids, validate_site
from chronorisk.data.pseudonym import Pseudonymizer

KEY = "chronorisk-test-key-0123456789"
SECRETS = ["Zebedee", "Quillfeather", "42 Secret Lane", "555-0199", "MRN-777", "alice-src-id", "bob-src-id",
           "carol-src-id"]


def _patient(pid: str, given: str, gender: str) -> dict:
    return {"resourceType": "Patient", "id": pid, "birthDate": "1955-03-04", "gender": gender,
            "name": [{"family": "Quillfeather", "given": [given]}], "address": [{"line": ["42 Secret Lane"]}],
            "telecom": [{"system": "phone", "value": "555-0199"}],
            "identifier": [{"system": "urn:mrn", "value": "MRN-777"}]}


def _encounter(pid: str, n: int, org_ref: str) -> dict:
    return {"resourceType": "Encounter", "id": f"{pid}-e{n}", "status": "finished",
            "class": {"code": "AMB"}, "subject": {"reference": f"urn:uuid:{pid}"},
            "period": {"start": f"2021-0{n + 1}-01T09:00:00+02:00"}, "serviceProvider": {"reference": org_ref}}


def _org(oid: str, site: str) -> dict:
    return {"resourceType": "Organization", "id": oid, "name": f"Clinic {oid}",
            "identifier": [{"system": "https://github.com/synthetichealth/synthea", "value": oid},
                           {"system": "urn:chronorisk:site", "value": site}]}


def _write_bundle(path: Path, *resources: dict) -> None:
    entries = [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r, "request": {"method": "POST"}} for r in resources]
    path.write_text(json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries}))


@pytest.fixture
def fhir_folder(tmp_path) -> Path:
    """Alice at chc_north; Bob with 1 encounter at chc_north and 2 at hosp_south (-> hosp_south);
    Carol's encounters name an organization only in the companion hospital bundle (Synthea style)."""
    folder = tmp_path / "fhir"
    folder.mkdir()
    _write_bundle(folder / "Zebedee_Quillfeather_alice-src-id.json", _patient("alice-src-id", "Zebedee", "female"),
                  _org("org-n", "chc_north"), _encounter("alice-src-id", 1, "urn:uuid:org-n"))
    _write_bundle(folder / "bob.json", _patient("bob-src-id", "Bob", "male"), _org("org-n", "chc_north"),
                  _org("org-s", "hosp_south"), _encounter("bob-src-id", 1, "urn:uuid:org-n"),
                  _encounter("bob-src-id", 2, "Organization/org-s"), _encounter("bob-src-id", 3, "urn:uuid:org-s"))
    _write_bundle(folder / "carol.json", _patient("carol-src-id", "Carol", "female"),
                  _encounter("carol-src-id", 1,
                             "Organization?identifier=https://github.com/synthetichealth/synthea|org-s"))
    _write_bundle(folder / "hospitalInformation1.json", _org("org-s", "hosp_south"))
    return folder


def _cli(*args: str, work: Path, key: str | None = KEY, params: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CHRONORISK_PSEUDONYM_KEY"}
    if key is not None:
        env["CHRONORISK_PSEUDONYM_KEY"] = key
    pre = ["--params", str(params)] if params else []
    return subprocess.run([sys.executable, "-m", "chronorisk.cli", *pre, "--work", str(work), "ingest", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_ingests_to_sites_with_a_pool_and_leaks_nothing(fhir_folder, work, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("ingest:\n  workers: 2\n  inline_below_mb: 0\n")  # force the process pool
    out = _cli("--input", str(fhir_folder), work=work, params=params)
    assert out.returncode == 0, out.stderr
    root = work / "ingested"
    assert site_ids(root) == ["chc_north", "hosp_south"]
    pseudo = Pseudonymizer(KEY.encode())
    north = scan_site(root, "chc_north").collect()
    south = scan_site(root, "hosp_south").collect()
    assert north.get_column("subject_id").unique().to_list() == [pseudo.subject_id("alice-src-id")]
    assert sorted(south.get_column("subject_id").unique().to_list()) == sorted(
        [pseudo.subject_id("bob-src-id"), pseudo.subject_id("carol-src-id")])
    alice = north.filter(pl.col("code") == "ENCOUNTER//AMB")
    assert alice.get_column("time").to_list()[0].isoformat() == "2021-02-01T07:00:00"  # +02:00 -> UTC
    for site in ("chc_north", "hosp_south"):
        validate_site(root, site)
        assert read_dataset_metadata(root, site)["site_id"] == site

    report = json.loads((root / "ingest_report.json").read_text())
    assert report["sites"]["hosp_south"]["subjects"] == 2
    assert report["sites"]["hosp_south"]["resources"]["Encounter"]["converted"] == 4
    assert report["resources"]["Organization"]["skipped"] == 4
    assert report["throughput"]["workers"] == 2
    assert report["throughput"]["pool"] == "fork (light workers)"  # a CLI process runs no thread: forked
    assert "chc_north" in out.stdout and "hosp_south" in out.stdout

    # nothing identifying anywhere: MEDS (decoded), metadata, report, stdout, stderr
    texts = [out.stdout, out.stderr, (root / "ingest_report.json").read_text()]
    for site in ("chc_north", "hosp_south"):
        frame = scan_site(root, site).collect()
        texts.append(frame.write_csv())
        for meta in (root / "sites" / site / "metadata").iterdir():
            texts.append(str(pl.read_parquet(meta).to_dicts()) if meta.suffix == ".parquet" else meta.read_text())
    blob = "\n".join(texts)
    for secret in SECRETS:
        assert secret not in blob, secret


def test_cli_site_override_and_rerun(fhir_folder, work):
    assert _cli(str(fhir_folder), "--site", "pilot_1", work=work).returncode == 0  # positional input
    assert site_ids(work / "ingested") == ["pilot_1"]
    assert _cli("--input", str(fhir_folder), work=work).returncode == 0  # replaces the earlier output
    assert site_ids(work / "ingested") == ["chc_north", "hosp_south"]
    bad = _cli("--input", str(fhir_folder), "--site", "../etc", work=work)
    assert bad.returncode == 2 and "--site" in bad.stderr


def test_cli_refuses_without_a_key_and_demo_creates_one(fhir_folder, work):
    out = _cli("--input", str(fhir_folder), work=work, key=None)
    assert out.returncode == 2
    assert "no pseudonymization key" in out.stderr and "Traceback" not in out.stderr
    assert not (work / "ingested").exists()
    demo = _cli("--input", str(fhir_folder), "--demo", work=work, key=None)
    assert demo.returncode == 0, demo.stderr
    key_file = work / "secrets" / "pseudonym.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    report = json.loads((work / "ingested" / "ingest_report.json").read_text())
    assert report["pseudonym_key_source"] == "demo"
    assert key_file.read_text().strip() not in json.dumps(report)


def test_cli_empty_folder_and_secret_file(tmp_path, work):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = _cli("--input", str(empty), work=work)
    assert out.returncode == 2 and str(empty) in out.stderr and "no FHIR files" in out.stderr
    missing = _cli("--input", str(empty), "--secret-file", str(tmp_path / "nope.key"), work=work, key=None)
    assert missing.returncode == 2 and "--secret-file" in missing.stderr and "does not exist" in missing.stderr
