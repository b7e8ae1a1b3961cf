"""What real feeds send, end to end through `chronorisk ingest` (issue 12), on hand-made inputs:

a panel with one bad component keeps its good one; every accepted spelling of every unit of
data/codes.py converts; a UTF-8 byte-order mark is ignored; a resource sent twice for one patient
is kept once; an over-long text value is quarantined; empty bundles are counted and named; a
subject that is not in the bundle (or, for a bulk export, in no Patient file) is quarantined; the
quarantine sits beside `--out` and the report gives its path; a small input runs in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from chronorisk.data.codes import MEASUREMENTS, UNIT_SPELLINGS, unit_of_spelling
from chronorisk.data.fhir.quarantine import read_quarantine
from chronorisk.data.meds_io import scan_site
from chronorisk.data.pseudonym import Pseudonymizer

KEY = "chronorisk-feeds-test-key-0123456789"
PSEUDO = Pseudonymizer(KEY.encode())
LOINC = "http://loinc.org"
MICRO_SIGN, GREEK_MU = "\u00b5", "\u03bc"


def patient(pid: str) -> dict:
    return {"resourceType": "Patient", "id": pid, "birthDate": "1961-07-08", "gender": "female"}


def quantity(value: float | None, unit: str | None) -> dict:
    q: dict = {} if value is None else {"value": value}
    if unit is not None:
        q.update(unit=unit, system="http://unitsofmeasure.org", code=unit)
    return q


def observation(pid: str, code: str, when: str, oid: str | None = None, **value) -> dict:
    obs = {"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": LOINC, "code": code}]},
           "subject": {"reference": f"urn:uuid:{pid}"}, "effectiveDateTime": when, **value}
    if oid is not None:
        obs["id"] = oid
    return obs


def component(code: str, value: float, unit: str | None) -> dict:
    return {"code": {"coding": [{"system": LOINC, "code": code}]}, "valueQuantity": quantity(value, unit)}


def bundle(*resources: dict) -> dict:
    entries = []
    for r in resources:
        url = f"urn:uuid:{r['id']}" if r["resourceType"] == "Patient" else None
        entries.append({"fullUrl": url, "resource": r} if url else {"resource": r})
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def write(path: Path, doc: dict, bom: bool = False) -> None:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + json.dumps(doc, ensure_ascii=False).encode())


def day(n: int) -> str:
    return f"2021-{1 + n // 28:02d}-{1 + n % 28:02d}T08:00:00Z"


def plausible_sent_value(measurement, unit: str) -> float:
    """A value in `unit` whose canonical value is inside the plausible range."""
    low, high = measurement.plausible
    for candidate in (1, 2, 5, 10, 20, 50, 60, 80, 100, 150, 200, 500, 1000, 0.5, 0.2, 0.1):
        if low <= measurement.to_canonical(candidate, unit) <= high:
            return float(candidate)
    raise AssertionError(f"no plausible test value for {measurement.name} in {unit}")


def spelling_cases() -> list[tuple[str, str, float, float]]:
    """(LOINC code, spelling, value sent, canonical value) for every spelling of every unit."""
    cases = []
    for m in MEASUREMENTS.values():
        for unit in m.units():
            value = plausible_sent_value(m, unit)
            for spelling in UNIT_SPELLINGS[unit]:
                cases.append((m.code.split("//")[1], spelling, value, m.to_canonical(value, unit)))
    return cases


def run_cli(input_path: Path, out: Path, work: Path, params: str = "ingest:\n  workers: 2\n",
            *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    work.mkdir(parents=True, exist_ok=True)
    params_file = work / "params.yaml"
    params_file.write_text(params)
    env = {**os.environ, "CHRONORISK_PSEUDONYM_KEY": KEY}
    done = subprocess.run([sys.executable, "-m", "chronorisk.cli", "--params", str(params_file), "--work", str(work),
                           "ingest", "--input", str(input_path), "--out", str(out), "--site", "pilot", *extra],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done, json.loads((out / "ingest_report.json").read_text())


def subject_events(events: pl.DataFrame, pid: str) -> pl.DataFrame:
    return events.filter(pl.col("subject_id") == PSEUDO.subject_id(pid))


# ------------------------------------------------------------------ bundles: one CLI run, every case


@pytest.fixture(scope="module")
def bundles_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("feeds")
    inp = root / "in"
    inp.mkdir()
    # a BP panel whose diastolic has no unit; another whose both components are fine; one all bad
    write(inp / "panel.json", bundle(
        patient("p-panel"),
        observation("p-panel", "55284-4", day(1), component=[component("8480-6", 132, "mm[Hg]"),
                                                             component("8462-4", 84, None)]),
        observation("p-panel", "55284-4", day(2), component=[component("8480-6", 120, "mmHg"),
                                                             component("8462-4", 80, "mm Hg")]),
        observation("p-panel", "55284-4", day(3), component=[component("8480-6", 125, "kPa"),
                                                             component("8462-4", 70, None)]),
    ))
    # every accepted spelling of every unit, one observation each (its day identifies it)
    cases = spelling_cases()
    write(inp / "spellings.json", bundle(patient("p-units"), *(
        observation("p-units", code, day(i), valueQuantity=quantity(value, spelling))
        for i, (code, spelling, value, _) in enumerate(cases))))
    # a byte-order mark before the JSON
    write(inp / "bom.json", bundle(patient("p-bom"), observation("p-bom", "4548-4", day(1),
                                                                  valueQuantity=quantity(6.1, "%"))), bom=True)
    # the same resource twice in one bundle (later lastUpdated wins), and again in another file (older: dropped);
    # a Condition twice without lastUpdated (the first wins); the Patient itself twice
    def glucose(value: float, updated: str | None) -> dict:
        obs = observation("p-dup", "2339-0", day(5), oid="glu-1", valueQuantity=quantity(value, "mg/dL"))
        if updated:
            obs["meta"] = {"lastUpdated": updated}
        return obs

    def condition(onset: str) -> dict:
        return {"resourceType": "Condition", "id": "cond-1", "subject": {"reference": "Patient/p-dup"},
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
                "onsetDateTime": onset}

    write(inp / "dup_a.json", bundle(patient("p-dup"), glucose(100, "2022-01-01T00:00:00Z"),
                                     glucose(120, "2022-06-01T00:00:00Z"), condition("2015-03-01"),
                                     condition("2016-03-01")))
    write(inp / "dup_b.json", bundle(patient("p-dup"), glucose(90, "2021-01-01T00:00:00Z")))
    # text values: exactly the 64 KiB cap (kept) and one byte over (quarantined)
    cap = 64 * 1024
    write(inp / "text.json", bundle(patient("p-text"),
                                    observation("p-text", "8251-1", day(1), valueString="a" * cap),
                                    observation("p-text", "8251-1", day(2), valueString="é" * (cap // 2) + "b")))
    # empty bundles: entry [] and no entry at all
    write(inp / "empty_list.json", {"resourceType": "Bundle", "type": "collection", "entry": []})
    write(inp / "no_entry.json", {"resourceType": "Bundle", "type": "collection"})
    # subjects that are not in the bundle: a dangling urn:uuid and a Patient/x of another bundle
    dangling = observation("nobody", "4548-4", day(1), valueQuantity=quantity(6.0, "%"))
    elsewhere = observation("p-bom", "4548-4", day(2), valueQuantity=quantity(6.2, "%"))
    elsewhere["subject"] = {"reference": "Patient/p-bom"}
    write(inp / "dangling.json", bundle(patient("p-own"), dangling, elsewhere,
                                        observation("p-own", "4548-4", day(3), valueQuantity=quantity(5.9, "%"))))
    out = root / "somewhere" / "meds"
    done, report = run_cli(inp, out, root / "work")
    events = scan_site(out, "pilot").collect()
    quarantine = read_quarantine(Path(report["quarantine_file"]))
    return {"out": out, "root": root, "report": report, "events": events, "quarantine": quarantine,
            "stdout": done.stdout, "cases": cases}


def test_a_panel_keeps_its_good_component_and_quarantines_the_bad_one_by_name(bundles_run):
    events, quarantine = subject_events(bundles_run["events"], "p-panel"), bundles_run["quarantine"]
    systolic = events.filter(pl.col("code") == "LOINC//8480-6").sort("time").get_column("numeric_value").to_list()
    diastolic = events.filter(pl.col("code") == "LOINC//8462-4").get_column("numeric_value").to_list()
    assert systolic == [132.0, 120.0] and diastolic == [80.0]  # panel 1: systolic kept; panel 2: both; 3: none
    [part] = [q for q in quarantine if q.get("component")]
    assert part["component"] == "component[1]" and part["category"] == "no_unit"
    assert part["reason"].startswith("component[1] (LOINC//8462-4): Diastolic blood pressure has no unit")
    assert part["resource"]["effectiveDateTime"] == day(1)  # the raw resource, to fix and resend
    [whole] = [q for q in quarantine if q.get("resource", {}).get("effectiveDateTime") == day(3)
               and q["resource"]["subject"]["reference"] == "urn:uuid:p-panel"]
    assert "component" not in whole and "component[0] (LOINC//8480-6): unit 'kPa'" in whole["reason"]
    assert "component[1] (LOINC//8462-4)" in whole["reason"]
    report = bundles_run["report"]
    assert report["quarantined_components"] == {"Observation": {"no_unit": 1}}
    assert "components quarantined (the rest of their resource converted): no_unit 1" in bundles_run["stdout"]


def test_every_spelling_of_every_unit_converts(bundles_run):
    events = subject_events(bundles_run["events"], "p-units").filter(pl.col("code").str.starts_with("LOINC//"))
    cases = bundles_run["cases"]
    assert events.height == len(cases)
    got = events.sort("time").get_column("numeric_value").to_list()
    for (code, spelling, sent, canonical), value in zip(cases, got, strict=True):
        assert value == pytest.approx(canonical, rel=1e-6), (code, spelling, sent)
    spellings = {s for _, s, _, _ in cases}
    assert {"mg/dl", "mmol/l", f"{MICRO_SIGN}mol/L", f"{GREEK_MU}mol/L", "umol/L"} <= spellings
    creatinine = {s: c for code, s, _, c in cases if code == "38483-4"}
    assert creatinine[f"{MICRO_SIGN}mol/L"] == creatinine[f"{GREEK_MU}mol/L"] == creatinine["umol/L"]


def test_units_table_lists_every_unit_and_spellings_do_not_collide():
    units = {u for m in MEASUREMENTS.values() for u in m.units()}
    assert units <= set(UNIT_SPELLINGS)
    for unit, spellings in UNIT_SPELLINGS.items():
        assert spellings[0] == unit
        for spelling in spellings:
            assert unit_of_spelling(spelling) == unit
            assert unit_of_spelling(spelling.upper()) == unit  # UCUM's case-insensitive form
    assert unit_of_spelling("g/L") is None and unit_of_spelling(None) is None


def test_a_byte_order_mark_is_ignored(bundles_run):
    events = subject_events(bundles_run["events"], "p-bom")
    assert events.filter(pl.col("code") == "LOINC//4548-4").get_column("numeric_value").to_list() == [
        pytest.approx(6.1)]
    assert bundles_run["report"]["files"]["unreadable"] == {}


def test_a_resource_sent_twice_is_kept_once_latest_update_else_first(bundles_run):
    events = subject_events(bundles_run["events"], "p-dup")
    assert events.filter(pl.col("code") == "LOINC//2339-0").get_column("numeric_value").to_list() == [120.0]
    onsets = events.filter(pl.col("code") == "SNOMED//44054006").get_column("time").to_list()
    assert [t.date().isoformat() for t in onsets] == ["2015-03-01"]
    assert events.filter(pl.col("code") == "MEDS_BIRTH").height == 1
    report = bundles_run["report"]
    assert report["duplicates"] == {"Patient": 1, "Condition": 1, "Observation": 2}
    for rtype, row in report["resources"].items():
        assert row["read"] == row["converted"] + row["quarantined"] + row["skipped"] + row["duplicate"], rtype
    assert report["sites"]["pilot"]["resources"]["Observation"]["duplicate"] == 2
    assert "duplicates kept once" in bundles_run["stdout"]


def test_a_text_value_over_the_cap_is_quarantined(bundles_run):
    events = subject_events(bundles_run["events"], "p-text").filter(pl.col("code") == "LOINC//8251-1")
    assert events.get_column("text_value").to_list() == ["a" * 64 * 1024]
    [line] = [q for q in bundles_run["quarantine"] if q["category"] == "text_too_long"]
    assert line["reason"] == "value.valueString is 65,537 bytes, over the 65,536-byte cap (ingest.max_text_kib)"
    assert len(line["resource"]["valueString"]) == 32 * 1024 + 1  # kept whole in the quarantine


def test_empty_bundles_are_counted_and_named(bundles_run):
    report = bundles_run["report"]
    assert report["files"]["empty_bundles"] == 2
    named = {q["file"] for q in bundles_run["quarantine"] if q["category"] == "empty_bundle"}
    assert named == {"empty_list.json", "no_entry.json"}
    assert "empty bundles (no entries): 2" in bundles_run["stdout"]


def test_a_subject_not_in_the_bundle_is_quarantined(bundles_run):
    lines = [q for q in bundles_run["quarantine"] if q["file"] == "dangling.json"]
    assert len(lines) == 2 and {q["category"] for q in lines} == {"subject_not_in_bundle"}
    assert all(q["reason"].startswith("subject not in bundle") for q in lines)
    events = bundles_run["events"]
    patients = ["p-panel", "p-units", "p-bom", "p-dup", "p-text", "p-own"]
    assert sorted(events.get_column("subject_id").unique().to_list()) == sorted(PSEUDO.subject_id(p) for p in patients)
    assert subject_events(events, "p-bom").height == 3  # birth, sex, its own HbA1c: not the one from dangling.json
    assert bundles_run["report"]["quarantine_categories"]["Observation"]["subject_not_in_bundle"] == 2


def test_the_quarantine_is_beside_the_output_and_in_the_report(bundles_run):
    out, report = bundles_run["out"], bundles_run["report"]
    path = Path(report["quarantine_file"])
    assert path.is_file() and path.parent.parent == out.parent / "meds_quarantine"
    assert path.name == "quarantine.ndjson" and path.parent.name == report["run_id"]
    assert not (bundles_run["root"] / "work" / "quarantine").exists()
    assert str(path) in bundles_run["stdout"] and str(out) in bundles_run["stdout"]
    assert len(path.read_text().splitlines()) == report["quarantine_lines"]


def test_a_small_input_runs_in_process(bundles_run):
    assert bundles_run["report"]["throughput"]["workers"] == 1  # params say 2; under inline_below_mb
    assert bundles_run["report"]["throughput"]["pool"] == "in-process"


# ------------------------------------------------------------------ bulk export (NDJSON)


def test_bulk_export_resolves_subjects_across_its_files(tmp_path):
    inp = tmp_path / "export"
    inp.mkdir()
    (inp / "Patient.ndjson").write_bytes(b"\xef\xbb\xbf" + b"\n".join(
        json.dumps(patient(p)).encode() for p in ("x1", "x2")) + b"\n")
    observations = []
    for pid in ("x1", "x2", "x3"):  # x3 is in no Patient file
        obs = observation(pid, "4548-4", day(1), oid=f"o-{pid}", valueQuantity=quantity(6.4, "%"))
        obs["subject"] = {"reference": f"Patient/{pid}"}
        observations.append(obs)
    (inp / "Observation.ndjson").write_text("".join(json.dumps(o) + "\n" for o in observations))
    out = tmp_path / "meds"
    _, report = run_cli(inp, out, tmp_path / "work")
    assert report["resources"]["Observation"] == {"read": 3, "converted": 2, "quarantined": 1, "skipped": 0,
                                                  "duplicate": 0}
    assert report["resources"]["Patient"]["converted"] == 2  # the byte-order mark did not cost a line
    [line] = read_quarantine(Path(report["quarantine_file"]))
    assert line["category"] == "subject_not_in_export" and line["resource"]["id"] == "o-x3"
    assert line["reason"].startswith("subject not in export")
    events = scan_site(out, "pilot").collect()
    assert sorted(events.get_column("subject_id").unique().to_list()) == sorted(
        PSEUDO.subject_id(p) for p in ("x1", "x2"))


def test_light_workers_and_parquet_workers_write_the_same(bundles_run, tmp_path):
    """Workers that hand their rows to the parent (small inputs) and workers that write staging parquet
    themselves produce the same MEDS and the same counts."""
    from chronorisk.data.config import IngestConfig
    from chronorisk.data.fhir.ingest import IngestOptions, ingest

    inp = bundles_run["root"] / "in"
    frames, reports = [], []
    for light_mb in (1000, 0):
        out = tmp_path / f"out{light_mb}"
        options = IngestOptions(input=inp, out=out, site="pilot", workers=2)
        reports.append(ingest(options, IngestConfig(inline_below_mb=0, light_workers_below_mb=light_mb), KEY.encode()))
        frames.append(scan_site(out, "pilot").collect().sort(pl.all()))
    assert frames[0].equals(frames[1]) and frames[0].height == bundles_run["events"].height
    assert reports[0]["resources"] == reports[1]["resources"] == bundles_run["report"]["resources"]


def test_dates_outside_1900_to_now_are_quarantined_and_comparators_are_counted(tmp_path):
    """The same date bounds as the API (data/time_bounds.py): a birth in 2090 or an observation in 9999 or
    1850 is quarantined `implausible_date`; a value sent as "<5.5" keeps its bound and is counted, not silent."""
    inp = tmp_path / "in"
    inp.mkdir()
    future_birth = patient("p-born-later")
    future_birth["birthDate"] = "2090-01-01"
    write(inp / "born_later.json", bundle(future_birth))
    bounded = quantity(5.5, "%")
    bounded["comparator"] = "<"
    write(inp / "dates.json", bundle(
        patient("p-dates"),
        observation("p-dates", "4548-4", "9999-01-01T00:00:00Z", valueQuantity=quantity(6.0, "%")),
        observation("p-dates", "4548-4", "1850-06-01", valueQuantity=quantity(6.1, "%")),
        observation("p-dates", "4548-4", day(1), valueQuantity=bounded),
        observation("p-dates", "4548-4", day(2), valueQuantity=quantity(6.3, "%")),
    ))
    out = tmp_path / "meds"
    done, report = run_cli(inp, out, tmp_path / "work")
    lines = [q for q in read_quarantine(Path(report["quarantine_file"])) if q["category"] == "implausible_date"]
    reasons = sorted(q["reason"] for q in lines)
    assert reasons == ["birthDate: '2090-01-01' is in the future; accepted 1900 to now",
                       "effectiveDateTime: '1850-06-01' is before 1900; accepted 1900 to now",
                       "effectiveDateTime: '9999-01-01T00:00:00Z' is in the future; accepted 1900 to now"]
    events = scan_site(out, "pilot").collect()
    assert subject_events(events, "p-born-later").height == 0
    hba1c = subject_events(events, "p-dates").filter(pl.col("code") == "LOINC//4548-4")
    assert sorted(hba1c.get_column("numeric_value").to_list()) == pytest.approx([5.5, 6.3])
    note = "valueQuantity.comparator '<': the bound kept as the value (LOINC//4548-4)"
    assert report["notes"][note] == 1
    assert "converted with a note: " in done.stdout and note in done.stdout


def test_text_that_is_not_utf8_and_integers_out_of_range_are_named(tmp_path):
    """UTF-16 and stray bytes are named as encodings (RFC 8259: JSON is UTF-8), not as a parser's guess;
    a valueInteger beyond FHIR's 32-bit range is quarantined saying so; the rest of the batch converts."""
    inp = tmp_path / "in"
    inp.mkdir()
    good = bundle(patient("p-good"), observation("p-good", "4548-4", day(1), valueQuantity=quantity(6.0, "%")))
    (inp / "utf16.json").write_bytes(json.dumps(good).encode("utf-16"))
    (inp / "latin1.json").write_bytes(json.dumps(good).replace("p-good", "p-caf\u00e9").encode("latin-1"))
    write(inp / "good.json", bundle(patient("p-good"), observation("p-good", "8251-1", day(1), valueInteger=12),
                                    observation("p-good", "8251-1", day(2), valueInteger=2**40)))
    out = tmp_path / "meds"
    _, report = run_cli(inp, out, tmp_path / "work")
    reasons = {q["file"]: q["reason"] for q in read_quarantine(Path(report["quarantine_file"]))}
    assert reasons["utf16.json"] == "UTF-16 text, not UTF-8: JSON must be sent as UTF-8 (RFC 8259 8.1)"
    assert reasons["latin1.json"].startswith("not UTF-8 text: byte 0xe9 at offset ")
    assert reasons["good.json"] == ("value: valueInteger 1.09951e+12 is outside FHIR's integer range "
                                    "(-2,147,483,648 to 2,147,483,647)")
    events = subject_events(scan_site(out, "pilot").collect(), "p-good").filter(pl.col("code") == "LOINC//8251-1")
    assert events.get_column("numeric_value").to_list() == [12.0]
