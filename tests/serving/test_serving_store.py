"""Score store, audit chain, access keys and cohorts on SQLite and PostgreSQL (known answers)."""

from __future__ import annotations

import io
import json
import threading
from datetime import date, datetime, timedelta

import polars as pl
import pyarrow.parquet as pq
import pytest
from serving_support import SECRET, SITES, TIMES, seed_store, subject_id
from sqlalchemy import select, text

from chronorisk.errors import ChronoriskError, InputError
from chronorisk.serving import access, cohort
from chronorisk.serving.audit import AuditLog, audit_log
from chronorisk.serving.schemas import AggregateQuery, CohortQuery
from chronorisk.serving.store import ScoreStore, age_band, scores, utcnow

# -- store ----------------------------------------------------------------------------------


def test_age_bands_known_answers():
    assert [age_band(a) for a in (None, -1, 5, 18, 29.9, 30, 45, 79.99, 80, 104)] == [
        None, None, "0-17", "18-29", "18-29", "30-39", "40-49", "70-79", "80+", "80+"
    ]


def test_seed_and_worklist_sorted_by_risk_own_site_only(any_store):
    seed_store(any_store)
    rows = any_store.worklist("chc_a", task="complication_1y")
    assert len(rows) == 30
    assert all(r["site"] == "chc_a" for r in rows)
    risks = [r["risk"] for r in rows]
    assert risks == sorted(risks, reverse=True)
    # latest score per subject only (2024-07-01)
    assert {r["prediction_time"] for r in rows} == {TIMES[-1]}
    high = any_store.worklist("chc_a", task="complication_1y", tiers=["high"])
    assert high and all(r["tier"] == "high" for r in high)
    assert all(r["risk"] >= 0.3 for r in any_store.worklist("chc_a", min_risk=0.3))


def test_rewriting_a_chunk_is_idempotent(any_store):
    seed_store(any_store)
    n = any_store.count_scores()
    seed_store(any_store)
    assert any_store.count_scores() == n


def test_a_failed_chunk_writes_nothing(any_store):
    """Scores and checkpoint commit together: a bad row rolls the whole chunk back."""
    good = {"site": "x", "subject_id": 1, "task": "t", "prediction_time": TIMES[0], "risk": 0.5, "tier": "high",
            "age_band": None, "model_name": "m", "model_version": "1", "scored_at": TIMES[0], "factors": None}
    bad = {**good, "subject_id": 2, "risk": None}  # NOT NULL violated
    checkpoint = {"prediction_time": TIMES[0], "site": "x", "chunk": "c", "task": "t", "model_version": "1",
                  "n_scored": 2, "finished_at": TIMES[0]}
    with pytest.raises(Exception):  # noqa: B017 - the driver's integrity error
        any_store.write_chunk([good, bad], [], [checkpoint])
    assert any_store.count_scores() == 0
    assert any_store.done_chunks(TIMES[0]) == {}


def test_consent_withdrawal_excludes_from_that_moment(any_store):
    seed_store(any_store)
    sid = subject_id(0, 29)  # the highest risk at chc_a
    assert any_store.worklist("chc_a", task="complication_1y")[0]["subject_id"] == sid
    before = utcnow()
    at = any_store.withdraw_consent(sid, at=before + timedelta(hours=1))
    # not yet in effect
    assert any_store.worklist("chc_a", task="complication_1y")[0]["subject_id"] == sid
    later = at + timedelta(seconds=1)
    assert sid not in {r["subject_id"] for r in any_store.worklist("chc_a", now=later)}
    q = CohortQuery(task="complication_1y")
    # cohort rows carry no subject id any more: the withdrawn patient is one row fewer (k=1: nothing suppressed)
    assert cohort.cohort(any_store, q, k=1, now=before).n - cohort.cohort(any_store, q, k=1, now=later).n == 1


def test_bad_store_url_is_named():
    with pytest.raises(InputError, match="store_url"):
        ScoreStore.open("nonsense://")
    with pytest.raises(InputError, match="store_url"):
        ScoreStore.open("mysql://root@localhost/test")


def test_unreachable_postgres_is_one_clear_error():
    with pytest.raises(ChronoriskError, match="cannot connect"):
        ScoreStore.open("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2")


# -- audit ----------------------------------------------------------------------------------


def _filled_audit(store, n=6) -> AuditLog:
    log = AuditLog(store.engine, SECRET.encode())
    for i in range(n):
        log.append(actor=f"key:k{i % 2}", role="gp", site="chc_a", action="patient_read",
                   subject_id=subject_id(0, i), detail={"via": "test"})
    return log


def test_audit_chain_verifies(any_store):
    log = _filled_audit(any_store)
    result = log.verify()
    assert result.ok, result.problems
    assert result.n_entries == 6


def test_audit_edit_is_found_and_named(any_store):
    log = _filled_audit(any_store)
    with any_store.engine.begin() as conn:
        conn.execute(audit_log.update().where(audit_log.c.seq == 3).values(action="export"))
    result = log.verify()
    assert not result.ok
    assert any("entry 3" in p and "edited" in p for p in result.problems), result.problems


def test_audit_rehashed_edit_breaks_the_next_link(any_store):
    """An editor who recomputes the edited entry's hash still breaks the chain at the next entry."""
    from chronorisk.serving.audit import entry_hash

    log = _filled_audit(any_store)
    with any_store.engine.begin() as conn:
        row = dict(conn.execute(select(audit_log).where(audit_log.c.seq == 2)).mappings().one())
        row["site"] = "chc_b"
        new_hash = entry_hash(row)
        conn.execute(audit_log.update().where(audit_log.c.seq == 2).values(site="chc_b", hash=new_hash))
    problems = log.verify().problems
    assert any("entry 3" in p and "link" in p for p in problems), problems


def test_audit_deleted_entry_is_found_and_named(any_store):
    log = _filled_audit(any_store)
    with any_store.engine.begin() as conn:
        conn.execute(audit_log.delete().where(audit_log.c.seq == 4))
    problems = log.verify().problems
    assert any("entry 4 deleted" in p for p in problems), problems


def test_audit_truncated_tail_is_found(any_store):
    log = _filled_audit(any_store)
    with any_store.engine.begin() as conn:
        conn.execute(audit_log.delete().where(audit_log.c.seq >= 5))
    problems = log.verify().problems
    assert any("entries 5-6 deleted" in p for p in problems), problems


def test_audit_wrong_secret_fails(any_store):
    _filled_audit(any_store)
    assert not AuditLog(any_store.engine, b"another-secret-of-16+").verify().ok


def test_audit_concurrent_appends_keep_one_chain(any_store):
    log = AuditLog(any_store.engine, SECRET.encode())
    errors = []

    def worker(k):
        try:
            for i in range(15):
                log.append(actor=f"key:t{k}", role="admin", action="patient_read", subject_id=i)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    result = log.verify()
    assert result.ok, result.problems
    assert result.n_entries == 60


_HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(0.4)
released = time.time()
fcntl.flock(fd, fcntl.LOCK_UN)
print(released, flush=True)
"""


def test_sqlite_writers_of_other_processes_queue_on_the_lock_file(sqlite_store, tmp_path):
    """A writer waits while another process holds `<db>-writer.lock`, then writes (service workers
    queue there instead of sleeping in SQLite's busy handler)."""
    import subprocess
    import sys
    import time

    from chronorisk.serving.store import writer

    lock_file = f"{tmp_path / 'store.db'}-writer.lock"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, lock_file], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with writer(sqlite_store.engine) as conn, conn.begin():
        entered = time.time()
        conn.execute(text("CREATE TABLE lock_probe (k INTEGER)"))
    released = float(holder.stdout.readline())
    assert holder.wait(timeout=10) == 0
    assert entered >= released
    with sqlite_store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM lock_probe")).scalar() == 0


_PROBE_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("free")
except BlockingIOError:
    print("held")
"""


def test_a_nested_writer_keeps_the_lock_until_the_outer_one_ends(sqlite_store, tmp_path):
    import subprocess
    import sys

    from chronorisk.serving.store import _sqlite_write_lock

    lock_file = f"{tmp_path / 'store.db'}-writer.lock"

    def probe() -> str:
        return subprocess.run([sys.executable, "-c", _PROBE_LOCK, lock_file], capture_output=True, text=True,
                              check=True).stdout.strip()

    with _sqlite_write_lock(sqlite_store.engine):
        with _sqlite_write_lock(sqlite_store.engine):
            assert probe() == "held"
        assert probe() == "held"
    assert probe() == "free"


# -- access ---------------------------------------------------------------------------------


def test_keys_roles_and_revocation(any_store):
    ring = access.KeyRing(any_store.engine, SECRET.encode(), cache_seconds=0)
    key_id, key = access.create_key(any_store.engine, "gp", "chc_a")
    p = ring.authenticate_key(key)
    assert (p.role, p.site) == ("gp", "chc_a")
    assert p.may_read_site("chc_a") and not p.may_read_site("chc_b")
    assert not p.can("export")
    assert ring.authenticate_key(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert ring.authenticate_key("crk_nope_nope") is None and ring.authenticate_key("garbage") is None
    token = ring.issue_session(p)
    assert ring.authenticate_session(token).key_id == key_id
    assert ring.authenticate_session(token[:-2] + "xx") is None
    assert access.revoke_key(any_store.engine, key_id)
    assert ring.authenticate_key(key) is None
    assert ring.authenticate_session(token) is None
    # the stored hash is not the key
    with any_store.engine.connect() as conn:
        stored = conn.execute(text("SELECT secret_hash FROM api_keys")).scalar()
    assert key.split("_")[2] not in stored


def test_gp_key_needs_site_and_roles_are_checked(sqlite_store):
    with pytest.raises(InputError, match="site"):
        access.create_key(sqlite_store.engine, "gp", None)
    with pytest.raises(InputError, match="role"):
        access.create_key(sqlite_store.engine, "superuser", None)
    pub = access.Principal("k", "public_health", None)
    assert pub.can("export") and not pub.can("patient_read") and not pub.may_read_site("chc_a")
    admin = access.Principal("k", "admin", None)
    assert admin.may_read_site("anything")


def test_secret_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("CHRONORISK_SERVE_SECRET", raising=False)
    with pytest.raises(ChronoriskError, match="no service secret"):
        access.load_secret("CHRONORISK_SERVE_SECRET", None, tmp_path, demo=False)
    demo = access.load_secret("CHRONORISK_SERVE_SECRET", None, tmp_path, demo=True)
    assert (tmp_path / "secrets" / "serve.key").stat().st_mode & 0o077 == 0
    assert access.load_secret("CHRONORISK_SERVE_SECRET", None, tmp_path, demo=True) == demo
    monkeypatch.setenv("CHRONORISK_SERVE_SECRET", "short")
    with pytest.raises(InputError, match="16"):
        access.load_secret("CHRONORISK_SERVE_SECRET", None, tmp_path, demo=False)
    monkeypatch.delenv("CHRONORISK_SERVE_SECRET")
    outside = tmp_path / "outside.key"
    outside.write_text("x" * 32)
    assert access.load_secret("CHRONORISK_SERVE_SECRET", str(outside), None, demo=False) == b"x" * 32


def test_secret_file_inside_the_repo_is_refused(monkeypatch):
    from serving_support import REPO

    monkeypatch.delenv("CHRONORISK_SERVE_SECRET", raising=False)
    monkeypatch.delenv("CHRONORISK_WORK", raising=False)
    monkeypatch.chdir(REPO)
    with pytest.raises(InputError, match="outside the repository"):
        access.load_secret("CHRONORISK_SERVE_SECRET", str(REPO / "params.yaml"), None, demo=False)


# -- cohorts --------------------------------------------------------------------------------


def test_cohort_filters_known_answers(any_store):
    seed_store(any_store)
    q = CohortQuery(task="complication_1y", sites=["chc_a"], tiers=["high"], sex="F")
    result = cohort.cohort(any_store, q, k=1)  # filters' known answers: k=1 suppresses nothing
    assert result.n == len(result.rows) > 0
    assert all(r["site"] == "chc_a" and r["tier"] == "high" and r["sex"] == "F" for r in result.rows)
    assert result.prediction_time == TIMES[-1]
    assert result.model_versions == ["chronorisk-complication_1y:2"]
    # pseudonymous rows: no birth year, age band instead
    assert "birth_year" not in result.rows[0] and result.rows[0]["age_band"]
    # earlier date
    early = cohort.cohort(any_store, CohortQuery(task="complication_1y", prediction_time=date(2024, 1, 1)), k=1)
    assert early.prediction_time == TIMES[0] and early.model_versions == ["chronorisk-complication_1y:1"]
    # conditions: all required
    both = cohort.cohort(any_store, CohortQuery(task="complication_1y", conditions=["diabetes", "ckd"]), k=1)
    assert both.n > 0 and all({"diabetes", "ckd"} <= set(r["conditions"].split(";")) for r in both.rows)
    # threshold and age bands
    t = cohort.cohort(any_store, CohortQuery(task="complication_1y", min_risk=0.3, age_bands=["80+"]), k=1)
    assert all(r["risk"] >= 0.3 and r["age_band"] == "80+" for r in t.rows)


def test_cohort_unknown_condition_is_named(sqlite_store):
    with pytest.raises(InputError, match=r"conditions\[1\]"):
        cohort.cohort(sqlite_store, CohortQuery(task="complication_1y", conditions=["diabetes", "dragonpox"]), k=10)


def test_aggregate_suppresses_small_noisy_cells_and_charges_the_budget(any_store):
    from chronorisk.serving.privacy import PrivacyBudget

    seed_store(any_store)
    budget = PrivacyBudget(epsilon=0.5, budget=1.0, days=30)
    result = cohort.aggregate(any_store, AggregateQuery(task="complication_1y"), small_cell=10, budget=budget,
                              analyst="key:test")
    cells = {(c["group"]["site"], c["group"]["tier"]): c for c in result["cells"]}
    assert len(cells) == 3 * 3  # the full domain: every site and tier, empty cells too
    for c in result["cells"]:
        assert (c["count"] is None) == c["suppressed"]
        assert c["count"] is None or c["count"] >= 10
    assert result["privacy"]["noise_scale"] == 2.0 and result["privacy"]["budget_left"] == 0.5
    # noise: the total is near 72 (30 + 30 + 12; nine cells of scale-2 noise: sd about 8.5), rarely exactly it
    assert abs(result["total"] - 72) < 60
    cohort.aggregate(any_store, AggregateQuery(task="complication_1y"), small_cell=10, budget=budget,
                     analyst="key:test")
    with pytest.raises(ChronoriskError, match="privacy budget spent"):
        cohort.aggregate(any_store, AggregateQuery(task="complication_1y"), small_cell=10, budget=budget,
                         analyst="key:test")


def test_export_csv_and_parquet_carry_query_and_versions(any_store):
    seed_store(any_store)
    result = cohort.cohort(any_store, CohortQuery(task="onset_2y", sites=["chc_b"]), k=1)
    csv = pl.read_csv(io.BytesIO(cohort.export_bytes(result, "csv")))
    assert csv.height == 30 and "birth_year" not in csv.columns and "age_band" in csv.columns
    table = pq.read_table(io.BytesIO(cohort.export_bytes(result, "parquet")))
    meta = json.loads(table.schema.metadata[b"chronorisk.export"])
    assert meta["query"]["sites"] == ["chc_b"] and meta["model_versions"] == ["chronorisk-onset_2y:2"]
    assert table.num_rows == 30


def test_store_keeps_naive_utc_times(any_store):
    seed_store(any_store)
    with any_store.engine.connect() as conn:
        value = conn.execute(select(scores.c.prediction_time).limit(1)).scalar()
    assert isinstance(value, datetime) and value.tzinfo is None and value in TIMES
    assert set(any_store.sites()) == set(SITES)
