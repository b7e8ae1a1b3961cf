"""The same FHIR input gives the same MEDS bytes whatever the order of its files and however it runs
(worker pool or in-process), through the real `chronorisk ingest` on hand-made bundles:

- two readings of one code at one instant (equal subject, time and code) come out in one order;
- a code whose files give it different displays (Synthea's vary, e.g. by a zero-width space) is
  described by the first in sort order;
- resources of types ingestion only counts (Claim, ExplanationOfBenefit: read lean) are counted
  per patient as skipped, in bundles mostly made of them and in bundles without them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from chronorisk.data.meds_io import site_root

KEY = "chronorisk-order-test-key-0123456789"
LOINC = "http://loinc.org"
DISPLAYS = ["Globulin [Mass/volume] in Serum", "Globulin [Mass/\u200bvolume] in Serum", "Globulin"]


def _bundle(n: int, with_claims: bool) -> dict:
    pid = f"p{n:03d}"
    ref = {"reference": f"urn:uuid:{pid}"}
    when = f"2022-03-{1 + n % 28:02d}T09:30:00Z"

    def obs(code: str, value: float, display: str | None = None) -> dict:
        coding = {"system": LOINC, "code": code, **({"display": display} if display else {})}
        return {"resourceType": "Observation", "status": "final", "code": {"coding": [coding]}, "subject": ref,
                "effectiveDateTime": when, "valueQuantity": {"value": value, "unit": "mg/dL",
                                                             "system": "http://unitsofmeasure.org", "code": "mg/dL"}}

    resources = [
        {"resourceType": "Patient", "id": pid, "birthDate": "1958-01-02", "gender": "male"},
        obs("10834-0", 2.0 + n / 10, DISPLAYS[n % len(DISPLAYS)]),  # globulin (not in data/codes.py): displays vary
        obs("2093-3", 180.0 + n),  # total cholesterol twice at one instant: a tie on subject, time and code
        obs("2093-3", 150.0 + n),
    ]
    if with_claims:
        resources += [{"resourceType": t, "id": f"{t}-{pid}-{k}", "patient": ref, "status": "active",
                       "item": [{"sequence": i, "net": {"value": 10.0 * i}} for i in range(1, 40)]}
                      for t in ("Claim", "ExplanationOfBenefit") for k in range(3)]
    entries = [{"fullUrl": f"urn:uuid:{r['id']}" if r["resourceType"] == "Patient" else f"urn:uuid:x{n}-{i}",
                "resource": r} for i, r in enumerate(resources)]
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def _write_corpus(folder: Path, reverse: bool) -> None:
    folder.mkdir(parents=True)
    for n in range(12):
        name = f"{(99 - n) if reverse else n:03d}.json"
        (folder / name).write_text(json.dumps(_bundle(n, with_claims=n % 3 != 0)))


def _ingest(input_path: Path, out: Path, work: Path, params: str) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(params)
    done = subprocess.run(
        [sys.executable, "-m", "chronorisk.cli", "--params", str(work / "params.yaml"), "--work", str(work),
         "ingest", "--input", str(input_path), "--out", str(out), "--site", "pilot"],
        capture_output=True, text=True, env={**os.environ, "CHRONORISK_PSEUDONYM_KEY": KEY}, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads((out / "ingest_report.json").read_text())


def _parquet_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.parquet"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("order")
    _write_corpus(root / "forward", reverse=False)
    _write_corpus(root / "reverse", reverse=True)
    pool = "ingest:\n  workers: 2\n  inline_below_mb: 0\n"  # a pool of light workers even for this small input
    inline = "ingest:\n  workers: 2\n"  # small: in-process
    reports = {
        "forward_pool": _ingest(root / "forward", root / "out_fp", root / "w1", pool),
        "reverse_pool": _ingest(root / "reverse", root / "out_rp", root / "w2", pool),
        "reverse_inline": _ingest(root / "reverse", root / "out_ri", root / "w3", inline),
    }
    return root, reports


def test_runs_took_both_paths(runs):
    _, reports = runs
    assert reports["forward_pool"]["throughput"]["pool"].endswith("(light workers)")
    assert reports["reverse_inline"]["throughput"]["pool"] == "in-process"


def test_same_bytes_whatever_the_file_order_and_the_path(runs):
    root, _ = runs
    reference = _parquet_bytes(root / "out_fp")
    assert reference and any(k.endswith("codes.parquet") for k in reference)
    assert _parquet_bytes(root / "out_rp") == reference
    assert _parquet_bytes(root / "out_ri") == reference


def test_equal_subject_time_and_code_ordered_by_value(runs):
    root, _ = runs
    events = pl.read_parquet(site_root(root / "out_fp", "pilot") / "data")
    chol = events.filter(pl.col("code") == "LOINC//2093-3")
    assert chol.height == 24
    assert chol.group_by("subject_id", maintain_order=True).agg(pl.col("numeric_value"))["numeric_value"].map_elements(
        lambda v: list(v) == sorted(v), return_dtype=pl.Boolean).all()


def test_description_is_the_first_display_in_sort_order(runs):
    root, _ = runs
    codes = pl.read_parquet(site_root(root / "out_fp", "pilot") / "metadata" / "codes.parquet")
    globulin = codes.filter(pl.col("code") == "LOINC//10834-0")["description"].to_list()
    assert globulin == ["Globulin"]


def test_counted_types_are_skipped_per_patient(runs):
    _, reports = runs
    for report in reports.values():
        resources = report["resources"]
        assert resources["Claim"]["skipped"] == 8 * 3 and resources["ExplanationOfBenefit"]["skipped"] == 8 * 3
        assert resources["Observation"]["converted"] == 36 and resources["Patient"]["converted"] == 12
