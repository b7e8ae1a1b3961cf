"""The device registry through the real CLI (admin, audited) and the reading converter's verdicts."""

from __future__ import annotations

from datetime import datetime, timedelta

import orjson
import pytest
from devices_support import cli, rows

from chronorisk.devices.fhir import observation
from chronorisk.devices.readings import Message, Quarantined, Reading, convert_message
from chronorisk.devices.registry import Registration


def test_register_list_revoke_through_the_cli_are_audited(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    work = tmp_path / "w"
    ok = cli(work, "devices", "--store", url, "register", "--device", "bp-001", "--subject", "42", "--site", "chc_a",
             "--kind", "bp")
    assert ok.returncode == 0, ok.stderr
    taken = cli(work, "devices", "--store", url, "register", "--device", "bp-001", "--subject", "43", "--site",
                "chc_a")
    assert taken.returncode == 2 and "--device" in taken.stderr and "revoke it first" in taken.stderr
    bad = cli(work, "devices", "--store", url, "register", "--device", "bp/1", "--subject", "1", "--site", "chc_a")
    assert bad.returncode == 2 and "'bp/1' is not a device id" in bad.stderr
    listed = cli(work, "devices", "--store", url, "list")
    assert "bp-001" in listed.stdout and "active" in listed.stdout
    assert cli(work, "devices", "--store", url, "revoke", "bp-001").returncode == 0
    again = cli(work, "devices", "--store", url, "revoke", "bp-001")
    assert again.returncode == 2 and "no active device" in again.stderr
    assert "revoked" in cli(work, "devices", "--store", url, "list").stdout
    rebind = cli(work, "devices", "--store", url, "register", "--device", "bp-001", "--subject", "43", "--site",
                 "chc_a")
    assert rebind.returncode == 0
    actions = [r["action"] for r in rows(url, "SELECT action FROM audit_log ORDER BY seq")]
    assert actions == ["device_register", "device_revoke", "device_register"]
    verify = cli(work, "audit", "--store", url, "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.parametrize(("tamper", "words"), [
    ("DELETE FROM devices WHERE device_id = 'bp-002'", "devices row device_id=bp-002: recorded by audit entry"),
    ("INSERT INTO devices VALUES ('bp-evil', 'chc_a', 42, 'bp', '2026-01-01 00:00:00.000000', NULL)",
     "devices row device_id=bp-evil: not recorded in the audit log"),
    ("UPDATE devices SET subject_id = 99 WHERE device_id = 'bp-001'", "devices row device_id=bp-001: subject_id"),
    ("UPDATE devices SET revoked_at = NULL WHERE device_id = 'bp-002'", "device_id=bp-002: revoked_at differ"),
])
def test_audit_verify_replays_device_bindings(tmp_path, tamper, words):
    """A binding inserted, deleted or edited in the database behind the registry is named by verify."""
    import sqlite3

    url = f"sqlite:///{tmp_path / 'store.db'}"
    work = tmp_path / "w"
    for device, subject in (("bp-001", "42"), ("bp-002", "43")):
        ok = cli(work, "devices", "--store", url, "register", "--device", device, "--subject", subject, "--site",
                 "chc_a", "--kind", "bp")
        assert ok.returncode == 0, ok.stderr
    assert cli(work, "devices", "--store", url, "revoke", "bp-002").returncode == 0
    clean = cli(work, "audit", "--store", url, "verify")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    db = sqlite3.connect(tmp_path / "store.db")
    db.executescript(tamper)
    db.commit()
    db.close()
    out = cli(work, "audit", "--store", url, "verify")
    assert out.returncode == 1 and words in out.stdout, out.stdout + out.stderr


NOW = datetime(2026, 1, 10, 8, 0)
REG = {
    "bp-1": Registration("bp-1", "chc_a", 7, "bp", NOW - timedelta(days=30), None),
    "bp-old": Registration("bp-old", "chc_a", 8, "bp", NOW - timedelta(days=30), NOW - timedelta(days=1)),
}


def _msg(payload, device="bp-1", site="chc_a") -> Message:
    data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return Message(f"chronorisk/{site}/devices/{device}/observations", data, NOW)


def _bp(sys_value=150, dia_value=95, unit="mm[Hg]", rid="r1", device="bp-1"):
    return observation(rid, device, "bp", NOW - timedelta(hours=1), sys_value, dia_value, unit)


def test_a_blood_pressure_panel_becomes_two_events_of_the_registered_patient():
    out = convert_message("chronorisk", _msg(_bp()), REG)
    assert isinstance(out, Reading)
    assert out.subject_id == 7 and out.reading_id == "r1"
    assert sorted((code, value) for _, code, value, _ in out.events) == [("LOINC//8462-4", 95.0),
                                                                          ("LOINC//8480-6", 150.0)]


def test_glucose_in_mmol_per_litre_is_converted_to_the_canonical_unit():
    obs = observation("g1", "bp-1", "glucose", NOW - timedelta(hours=1), 7.0, unit="mmol/L")
    out = convert_message("chronorisk", _msg(obs), REG)
    assert isinstance(out, Reading)
    (_, code, value, _), = out.events
    assert code == "LOINC//2339-0" and value == pytest.approx(7.0 * 18.0, rel=0.01)


def test_a_panel_with_one_implausible_component_keeps_the_other_and_quarantines_it_alone():
    out = convert_message("chronorisk", _msg(_bp(sys_value=1200)), REG)
    assert isinstance(out, Reading)
    assert [code for _, code, _, _ in out.events] == ["LOINC//8462-4"]  # the diastolic value is kept
    (part,) = out.left_out
    assert part.category == "implausible_value" and "plausible range" in part.reason and "1200" in part.reason
    assert part.part and part.part in part.reason
    again = convert_message("chronorisk", _msg(_bp(sys_value=1200)), REG)
    assert again.left_out[0].key == part.key  # a redelivery is the same quarantine row


@pytest.mark.parametrize(("message", "category", "words"), [
    (_msg(b"{oops"), "malformed_json", "not valid JSON"),
    (_msg(_bp(device="nobody"), device="nobody"), "unknown_device", "not registered"),
    (_msg(_bp(device="bp-old"), device="bp-old"), "revoked_device", "revoked"),
    (_msg(_bp(), site="chc_b"), "wrong_site", "another site"),
    (_msg(_bp(unit="kPa-ish")), "unit_not_convertible", "kPa-ish"),
    (_msg({**_bp(), "id": None}), "no_id", "Observation.id"),
    (_msg({"resourceType": "Patient"}), "not_observation", "not a FHIR Observation"),
    (Message("chronorisk/chc_a/devices/bp-1/other", b"{}", NOW), "bad_topic", "topic"),
])
def test_bad_readings_are_quarantined_with_a_reason(message, category, words):
    out = convert_message("chronorisk", message, REG)
    assert isinstance(out, Quarantined)
    assert out.category == category and words in out.reason
    assert out.key and out.payload == message.payload[:65536]
