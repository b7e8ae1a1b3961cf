"""Known answers of the privacy and audit rules, below the HTTP layer: consent in effect, checkpoints,
k-anonymity, the privacy budget."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from serving_support import SECRET, seed_store, subject_id

from chronorisk.errors import InputError
from chronorisk.serving import cohort
from chronorisk.serving.audit import AuditLog
from chronorisk.serving.store import ConsentHistory, UnknownSubject, utcnow

T0 = datetime(2025, 1, 1)


def at(days: int) -> datetime:
    return T0 + timedelta(days=days)


@pytest.mark.parametrize("withdrawals,renewals,site,day,expected", [
    ([("a", 0)], [], "a", 1, 0),  # in effect at its site
    ([("a", 0)], [], "b", 1, None),  # not at another site
    ([("a", 0)], [], None, 1, 0),  # "at any site"
    ([("a", 5)], [], "a", 1, None),  # not yet
    ([(None, 0)], [], "b", 1, 0),  # every site
    ([("a", 0)], [("a", 2)], "a", 3, None),  # renewed
    ([("a", 0)], [("a", 2)], "a", 1, 0),  # renewal not yet in effect
    ([(None, 0)], [("a", 2)], "a", 3, None),  # a global withdrawal renewed at one site ...
    ([(None, 0)], [("a", 2)], "b", 3, 0),  # ... still holds at the others
    ([(None, 0)], [("a", 2)], None, 3, 0),  # ... so "at any site" still holds
    ([("a", 0)], [("b", 2)], "a", 3, 0),  # a renewal elsewhere changes nothing
    ([("a", 0), ("a", 4)], [("a", 2)], "a", 5, 4),  # withdrawn again after a renewal
])
def test_consent_in_effect_known_answers(withdrawals, renewals, site, day, expected):
    history = ConsentHistory([(s, at(d)) for s, d in withdrawals], [(s, at(d)) for s, d in renewals])
    assert history.withdrawn_at(site, at(day)) == (None if expected is None else at(expected))


def test_sql_rule_agrees_with_python_rule(sqlite_store):
    """Worklists and cohorts (SQL) and patient reads (Python) apply the same rule."""
    seed_store(sqlite_store)
    sid = subject_id(0, 29)
    now = utcnow()
    sqlite_store.withdraw_consent(sid, site=None, at=now - timedelta(days=2))
    sqlite_store.renew_consent(sid, site="chc_a", at=now - timedelta(days=1))
    listed = {r["subject_id"] for r in sqlite_store.worklist("chc_a", limit=1000)}
    assert sid in listed
    assert sqlite_store.patient_consent(sid).withdrawn_at("chc_a") is None
    assert sqlite_store.patient_consent(sid).withdrawn_at(None) is not None  # the global withdrawal elsewhere
    assert sid in sqlite_store.withdrawn_subjects()


def test_withdrawal_refuses_unknown_subjects_and_inexact_sites(sqlite_store):
    seed_store(sqlite_store)
    with pytest.raises(UnknownSubject):
        sqlite_store.withdraw_consent(12345)
    for bad in ("chc_b", "chc_a ", "CHC_A"):
        with pytest.raises(InputError, match="site"):
            sqlite_store.withdraw_consent(subject_id(0, 1), site=bad)
    with pytest.raises(InputError, match="no consent withdrawal"):
        sqlite_store.renew_consent(subject_id(0, 1), site="chc_a")


def test_checkpoints_catch_a_wipe_even_when_one_file_is_gone(sqlite_store, tmp_path):
    first, second = tmp_path / "a" / "checkpoints.jsonl", tmp_path / "b" / "checkpoints.jsonl"
    log = AuditLog(sqlite_store.engine, SECRET.encode(), [first, second])
    for i in range(4):
        log.append(actor="key:k", role="gp", action="patient_read", subject_id=i)
    assert log.verify().ok and log.verify().checkpoint == 4
    first.unlink()  # the attacker found one store
    with sqlite_store.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM audit_log")
        conn.exec_driver_sql("DELETE FROM audit_head")
    result = log.verify()
    assert not result.ok and any("checkpoint records entry 4" in p for p in result.problems)


def test_a_forged_checkpoint_line_is_named(sqlite_store, tmp_path):
    path = tmp_path / "checkpoints.jsonl"
    log = AuditLog(sqlite_store.engine, SECRET.encode(), [path])
    log.append(actor="key:k", role="gp", action="patient_read")
    with path.open("a") as fh:
        fh.write('{"seq": 99, "hash": "00", "mac": "not-a-mac"}\n')
    result = log.verify()
    assert any("signature invalid" in p for p in result.problems)


def test_a_rolled_back_transaction_leaves_no_checkpoint(sqlite_store, tmp_path):
    path = tmp_path / "checkpoints.jsonl"
    log = AuditLog(sqlite_store.engine, SECRET.encode(), [path])
    log.append(actor="key:k", role="gp", action="patient_read")
    with pytest.raises(RuntimeError), sqlite_store.engine.connect() as conn, conn.begin():
        log.append_in(conn, actor="key:k", role="gp", action="patient_read")
        raise RuntimeError("the read failed")
    assert len(path.read_text().splitlines()) == 1
    assert log.verify().ok


def test_deidentify_generalizes_then_suppresses_known_answer():
    rows = ([{"site": "a", "age_band": "60-69", "sex": "F", "conditions": "diabetes"}] * 6
            + [{"site": "a", "age_band": "70-79", "sex": "F", "conditions": "diabetes"}] * 6
            + [{"site": "b", "age_band": "30-39", "sex": "M", "conditions": "copd"}])
    released, report = cohort.deidentify(rows, k=10, max_suppressed_share=0.1)
    # 60-69 and 70-79 merge into 60-79 (12 rows); the lone row from site b is suppressed
    assert report["generalized"] == ["age bands widened to 20 years"] and report["suppressed_rows"] == "1-9"
    assert len(released) == 12 and {r["age_band"] for r in released} == {"60-79"}
    assert len({r["record_id"] for r in released}) == 12


def test_too_few_rows_are_all_suppressed():
    rows = [{"site": "a", "age_band": "60-69", "sex": "F", "conditions": ""}] * 3
    released, report = cohort.deidentify(rows, k=10, max_suppressed_share=0.05)
    assert released == [] and report["suppressed_rows"] == "1-9"


def test_withdrawn_file_for_training(sqlite_store, tmp_path):
    """`chronorisk access withdrawn --out F`: the pairs training leaves out (a global withdrawal covers
    every site; a renewed one is gone)."""
    import polars as pl

    from chronorisk.serving.access_cli import write_withdrawn

    seed_store(sqlite_store)
    now = utcnow()
    sqlite_store.withdraw_consent(subject_id(0, 1), site="chc_a", at=now - timedelta(hours=1))
    sqlite_store.withdraw_consent(subject_id(1, 2), site=None, at=now - timedelta(hours=1))
    sqlite_store.withdraw_consent(subject_id(0, 3), site="chc_a", at=now - timedelta(hours=2))
    sqlite_store.renew_consent(subject_id(0, 3), site="chc_a", at=now - timedelta(hours=1))
    assert write_withdrawn(sqlite_store, tmp_path / "w.parquet") == 1 + 3
    got = set(pl.read_parquet(tmp_path / "w.parquet").iter_rows())
    assert got == {("chc_a", subject_id(0, 1))} | {(s, subject_id(1, 2)) for s in ("chc_a", "chc_b", "hosp_c")}
