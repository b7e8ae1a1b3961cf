"""The findings of the attack review (issue 16), each replayed against the real `chronorisk serve`.

One server over a seeded SQLite store (200 patients at two sites, 12 at a third). The rate-limit test
runs last: it locks the loopback address out for a minute.
"""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter

import httpx
import polars as pl
import pytest
from serving_support import REPO, SECRET, Server, make_keys, seed_store, subject_id, write_params

from chronorisk.serving.store import ScoreStore

K = 10


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from types import SimpleNamespace

    root = tmp_path_factory.mktemp("security")
    url = f"sqlite:///{root / 'store.db'}"
    params = write_params(root / "params.yaml", k_anonymity=K, dp_epsilon=0.5, dp_budget=10.0,
                          auth_failures_per_minute=8, key_lockout_failures=3)
    store = ScoreStore.open(url)
    seeded = seed_store(store, n_per_site=200)
    keys = make_keys(store)
    store.dispose()
    server = Server(work=root / "w", store_url=url, params=params).start()
    yield SimpleNamespace(server=server, keys=keys, seeded=seeded, url=url, root=root, params=params)
    server.stop()


def client(world, key: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=world.server.url, headers=headers, timeout=30)


def cli(world, *argv, work=None, secret=True) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", **({"CHRONORISK_SERVE_SECRET": SECRET} if secret else {})}
    return subprocess.run([sys.executable, "-m", "chronorisk.cli", "--work", str(work or world.server.work),
                           "--params", str(world.params), *argv], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=120)


# -- 1: record-level exports -------------------------------------------------------------------


def test_exports_are_k_anonymous_with_per_export_ids(world):
    with client(world, world.keys["public_health"]) as c:
        first = c.post("/cohort/export", json={"task": "complication_1y", "format": "csv"})
        second = c.post("/cohort/export", json={"task": "complication_1y", "format": "csv"})
        narrow = c.post("/cohort", json={"task": "complication_1y", "sites": ["chc_a"], "tiers": ["high"],
                                         "sex": "F"}).json()
    a, b = (pl.read_csv(io.BytesIO(r.content)) for r in (first, second))
    assert "subject_id" not in a.columns and a.height > 0
    assert not set(a["record_id"]) & set(b["record_id"])  # two exports cannot be joined
    assert not set(a["record_id"].cast(pl.String)) & {str(s) for s in world.seeded["subjects"]}
    groups = Counter(zip(a["site"], a["age_band"], a["sex"], a["conditions"], strict=True))
    assert min(groups.values()) >= K
    meta = json.loads(first.headers["x-chronorisk-export"])["deidentification"]
    assert meta["k"] == K and isinstance(meta["generalized"], list)
    # the filter that returned one patient before: no group under k in what it returns
    rows = narrow["rows"]
    assert all(n >= K for n in Counter((r["site"], r["age_band"], r["sex"], r["conditions"]) for r in rows).values())


# -- 2: differencing of aggregates ---------------------------------------------------------------


def true_counts_by_sex(world, site: str) -> dict[str, int]:
    store = ScoreStore.open(world.url)
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT p.sex, count(*) FROM scores s JOIN patients p ON p.site = s.site AND p.subject_id = s.subject_id "
            "WHERE s.task = 'complication_1y' AND s.prediction_time >= '2024-07-01' AND s.site = ? "
            "GROUP BY p.sex", (site,)).all()
    store.dispose()
    return {sex: n for sex, n in rows}


def test_differencing_attack_no_longer_recovers_a_suppressed_count(world):
    """Every site minus the two large ones, by sex: before, exactly the small site's counts (under 10,
    suppressed when asked for directly). Now each release is noisy and the budget runs out first."""
    truth = true_counts_by_sex(world, "hosp_c")
    assert truth and all(n < 10 for n in truth.values())  # cells the small-cell rule hides
    everywhere = {"task": "complication_1y", "group_by": ["sex"]}
    large = {**everywhere, "sites": ["chc_a", "chc_b"]}
    estimates, lefts = [], []
    with client(world, world.keys["data_scientist"]) as c:
        for _ in range(20):
            a, b = c.post("/cohort/aggregate", json=everywhere), c.post("/cohort/aggregate", json=large)
            if 429 in (a.status_code, b.status_code):
                break
            a, b = a.json(), b.json()
            assert a["privacy"]["noise_scale"] == 2.0 and b["privacy"]["epsilon"] == 0.5
            lefts.append(b["privacy"]["budget_left"])
            counts_a = {cell["group"]["sex"]: cell["count"] for cell in a["cells"]}
            counts_b = {cell["group"]["sex"]: cell["count"] for cell in b["cells"]}
            estimates += [(sex, counts_a[sex] - counts_b[sex]) for sex in truth]
        else:
            pytest.fail("the privacy budget never ran out")
        refused = c.post("/cohort/aggregate", json=everywhere)
        assert refused.status_code == 429 and "privacy budget" in refused.json()["error"]
    assert lefts == sorted(lefts, reverse=True) and len(lefts) == 10
    # each difference carries the noise of two releases (sd about 4): one pair is exact 13% of the time,
    # all twenty estimates about 1e-18 of the time
    assert len(estimates) == 20 and not all(d == truth[sex] for sex, d in estimates)


# -- 3 and 14: the audit log -----------------------------------------------------------------------


def copy_world(world, tmp_path):
    """The server's store (a consistent SQLite copy) and its audit checkpoints, to tamper with."""
    work = tmp_path / "w"
    shutil.copytree(world.server.work / "audit", work / "audit")
    db = tmp_path / "store.db"
    src = sqlite3.connect(world.url.removeprefix("sqlite:///"))
    dst = sqlite3.connect(db)
    src.backup(dst)
    src.close()
    return work, dst, f"sqlite:///{db}"


def verify(world, work, url):
    return cli(world, "audit", "--store", url, "verify", work=work)


@pytest.mark.parametrize("tamper,words", [
    ("DELETE FROM audit_log; DELETE FROM audit_head", "checkpoint"),
    ("ROLLBACK_HEAD", "checkpoint"),
    ("DELETE FROM consent", "consent row"),
    ("INSERT INTO api_keys VALUES ('feedbeef0000', 'x', 'admin', NULL, NULL, '2024-01-01 00:00:00', NULL)",
     "api_keys row key_id=feedbeef0000"),
    ("UPDATE scores SET risk = 0.01, tier = 'low' WHERE site = 'chc_a' AND risk > 0.39", "(edited)"),
    ("DELETE FROM scores WHERE site = 'hosp_c'", "scores of hosp_c"),
])
def test_audit_verify_catches_wipes_rollbacks_and_state_edits(world, tmp_path, tamper, words):
    from chronorisk.serving.audit import head_mac

    with client(world, world.keys["gp"]) as c:
        c.get(f"/patients/{subject_id(0, 3)}")
        assert c.post("/consent/withdraw", json={"subject_id": subject_id(0, 150)}).status_code == 200
        c.get(f"/patients/{subject_id(0, 4)}")
    work, db, url = copy_world(world, tmp_path)
    assert verify(world, work, url).returncode == 0
    if tamper == "ROLLBACK_HEAD":  # delete the last entries and sign an older head again
        seq, digest = db.execute("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1 OFFSET 2").fetchone()
        db.execute("DELETE FROM audit_log WHERE seq > ?", (seq,))
        db.execute("UPDATE audit_head SET seq = ?, hash = ?, mac = ?", (seq, digest,
                                                                        head_mac(SECRET.encode(), seq, digest)))
    else:
        db.executescript(tamper)
    db.commit()
    db.close()
    out = verify(world, work, url)
    assert out.returncode == 1 and words in out.stdout, out.stdout + out.stderr


def test_audit_verify_without_a_secret_says_how_to_give_one(world):
    out = cli(world, "audit", "--store", world.url, "verify", secret=False)
    assert out.returncode != 0
    assert "CHRONORISK_SERVE_SECRET=" in out.stderr + out.stdout and "--demo" in out.stderr + out.stdout


# -- 4, 5, 6: consent ------------------------------------------------------------------------------


def test_withdrawal_needs_the_exact_site_and_a_known_patient(world):
    sid = subject_id(0, 160)
    with client(world, world.keys["admin"]) as c:
        assert c.post("/consent/withdraw", json={"subject_id": sid, "site": "chc_b"}).status_code == 422
        assert c.post("/consent/withdraw", json={"subject_id": sid, "site": "chc_a\n"}).status_code == 422
        assert c.post("/consent/withdraw", json={"subject_id": 5}).status_code == 404
        assert c.get(f"/patients/{sid}").json()["consent_withdrawn_at"] is None


def test_withdrawal_applies_everywhere_and_an_admin_can_renew(world):
    sid = subject_id(0, 199)  # the highest risk at chc_a
    with client(world, world.keys["gp"]) as gp, client(world, world.keys["admin"]) as admin:
        assert gp.get("/worklist", params={"limit": 1}).json()["rows"][0]["subject_id"] == sid
        assert admin.post("/consent/withdraw", json={"subject_id": sid, "site": "chc_a"}).status_code == 200
        page = gp.get(f"/patients/{sid}").json()
        assert page["consent_withdrawn_at"] and page["tasks"] == []
        assert gp.get(f"/patients/{sid}/factors", params={"task": "complication_1y"}).status_code == 410
        scored = gp.post("/score", json={"events": [{"subject_id": sid, "code": "LOINC//4548-4",
                                                     "numeric_value": 7.0, "time": "2024-01-01T00:00:00Z"}]})
        assert scored.status_code == 409
        assert sid not in {r["subject_id"] for r in gp.get("/worklist", params={"limit": 1000}).json()["rows"]}
        assert gp.post("/consent/renew", json={"subject_id": sid}).status_code == 403
        assert admin.post("/consent/renew", json={"subject_id": sid, "site": "chc_a"}).status_code == 200
        assert gp.get("/worklist", params={"limit": 1}).json()["rows"][0]["subject_id"] == sid
        assert gp.get(f"/patients/{sid}").json()["tasks"]


# -- 7: sessions -------------------------------------------------------------------------------------


def sign_in(world, key: str, **headers) -> httpx.Client:
    c = httpx.Client(base_url=world.server.url, timeout=30, headers=headers)
    page = c.get("/ui/login")
    csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
    r = c.post("/ui/login", data={"api_key": key, "csrf": csrf})
    assert r.status_code == 303, r.text
    return c


def test_logout_revokes_the_session_and_cookies_can_be_secure(world):
    c = sign_in(world, world.keys["gp"])
    cookie = c.cookies.get("chronorisk_session")
    assert c.get("/ui/worklist").status_code == 200
    token = c.get("/ui/worklist").text.split('name="csrf" value="')[1].split('"')[0]
    assert c.post("/ui/logout", data={"csrf": token}).status_code == 303
    replay = httpx.get(f"{world.server.url}/ui/worklist", cookies={"chronorisk_session": cookie})
    assert replay.status_code == 303 and replay.headers["location"] == "/ui/login"
    c.close()
    secure = httpx.Client(base_url=world.server.url, timeout=30, headers={"X-Forwarded-Proto": "https"})
    page = secure.get("/ui/login")
    assert "secure" in page.headers["set-cookie"].lower()
    secure.close()


def test_login_form_needs_its_csrf_token(world):
    r = httpx.post(f"{world.server.url}/ui/login", data={"api_key": world.keys["gp"]})
    assert r.status_code == 403 and "chronorisk_session" not in r.headers.get("set-cookie", "")


# -- 10, 11, 12: metrics, not-yours, strict inputs ------------------------------------------------


def test_metrics_need_an_ops_key(world):
    assert httpx.get(f"{world.server.url}/metrics").status_code == 401
    with client(world, world.keys["gp"]) as c:
        assert c.get("/metrics").status_code == 403
    with client(world, world.keys["mlops"]) as c:
        assert c.get("/metrics").status_code == 200


def test_another_sites_patient_is_the_same_404_and_audited(world):
    with client(world, world.keys["gp"]) as c:
        other = c.get(f"/patients/{subject_id(1, 5)}")
        unknown = c.get(f"/patients/{subject_id(1, 5000)}")
    assert other.status_code == unknown.status_code == 404 and other.json() == unknown.json()
    from chronorisk.serving.audit import AuditLog

    store = ScoreStore.open(world.url)
    entries = list(AuditLog(store.engine, SECRET.encode()).entries())
    store.dispose()
    assert any(e["action"] == "access_denied" and e["subject_id"] == subject_id(1, 5) for e in entries)
    listed = [json.loads(e["detail"]) for e in entries if e["action"] == "worklist_read"]
    assert listed and all("subjects" in d for d in listed)


def test_ids_and_times_are_strict(world):
    with client(world, world.keys["admin"]) as c:
        assert c.get(f"/patients/{subject_id(0, 1):_}").status_code == 422
        assert c.get(f"/patients/+{subject_id(0, 1)}").status_code == 422
        for bad in ("-1", 1700000000):
            r = c.post("/score", json={"features": {"x": 1}, "prediction_time": bad})
            assert r.status_code == 422 and "prediction_time" in r.json()["error"]
        r = c.post("/cohort", json={"task": "onset_2y", "prediction_time": 20240101})
        assert r.status_code == 422
        bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
            {"resource": {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1960-01-01"}},
            {"resource": {"resourceType": "Observation", "status": "final", "subject": {"reference": "Patient/p1"},
                          "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
                          "effectiveDateTime": "9999-01-01T00:00:00Z",
                          "valueQuantity": {"value": 7.0, "unit": "%"}}}]}
        r = c.post("/score", json={"fhir": bundle})
        assert r.status_code == 422 and "fhir" in r.json()["error"], r.text
        r = c.post("/fhir/RiskAssessment/$score", json=bundle)  # the FHIR operation: the same bounds
        assert r.status_code == 422 and "9999" in r.json()["error"], r.text
        assert c.get("/fhir/RiskAssessment", params={"subject": f"Patient/{subject_id(0, 1)}\n"}).status_code == 422


# -- 8: demo keys ------------------------------------------------------------------------------------


def test_demo_keys_go_to_a_private_file_not_the_log(world, tmp_path):
    import os
    import signal
    import time

    from serving_support import free_port

    url = f"sqlite:///{tmp_path / 'demo.db'}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "chronorisk.cli", "--work", str(tmp_path / "w"), "--params", str(world.params),
         "serve", "--demo", "--store", url, "--port", str(free_port())],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        env={k: v for k, v in os.environ.items() if k not in ("CHRONORISK_SERVE_SECRET", "CHRONORISK_DEMO")})
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("demo keys" in line for line in lines):
            lines.append(proc.stdout.readline().decode(errors="replace"))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    text = "".join(lines)
    keys_file = tmp_path / "w" / "secrets" / "demo-keys.json"
    assert "demo keys" in text and "crk_" not in text
    assert keys_file.stat().st_mode & 0o777 == 0o600
    assert all(v["key"].startswith("crk_") for v in json.loads(keys_file.read_text()).values())


# -- 9: lockout shared by every server process on the store ------------------------------------------


def test_a_key_locks_out_after_n_failures_across_two_server_processes(world):
    """Two `chronorisk serve` processes on the same store (as two workers or replicas are): failures
    alternate between them, and the third (key_lockout_failures) locks the key id on both. With counters
    in each process's memory each had seen fewer than three, and the right secret still got in."""
    other = Server(work=world.root / "w2", store_url=world.url, params=world.params).start()
    try:
        key_id = world.keys["data_scientist"].split("_")[1]
        wrong = f"crk_{key_id}_wrongsecret"
        statuses = []
        for server in (world.server, other, world.server):
            r = httpx.post(f"{server.url}/cohort", json={"task": "onset_2y"},
                           headers={"Authorization": f"Bearer {wrong}"}, timeout=30)
            statuses.append(r.status_code)
        assert statuses == [401, 401, 401]
        right = {"Authorization": f"Bearer {world.keys['data_scientist']}"}
        for server in (other, world.server):
            r = httpx.post(f"{server.url}/cohort", json={"task": "onset_2y"}, headers=right, timeout=30)
            assert r.status_code == 429 and int(r.headers["retry-after"]) > 0, (server.url, r.status_code)
    finally:
        other.stop()


@pytest.mark.parametrize("storage", ["store", "memory://"])
def test_lockout_counts_in_either_storage(storage, tmp_path):
    """The same rule whichever storage counts: the third failure of a key id locks it (from any address) for
    its window, another key id is not locked; two guards on one store share the count, two in memory do not
    (there the failures all go to the first)."""
    from chronorisk.serving.access import AuthGuard, AuthLimits, TooManyAttempts

    store = ScoreStore.open(f"sqlite:///{tmp_path / 'store.db'}")
    limits = AuthLimits(failures_per_minute=100, lockout_failures=3, lockout_minutes=15, storage=storage)
    first, second = AuthGuard(limits, engine=store.engine), AuthGuard(limits, engine=store.engine)
    for guard in (first, second, first) if storage == "store" else (first, first, first):
        guard.check("10.0.0.1", "k1")
        guard.failed("10.0.0.1", "k1", "api")
    with pytest.raises(TooManyAttempts) as locked:
        first.check("10.0.0.2", "k1")
    assert 890 <= locked.value.retry_after <= 901
    first.check("10.0.0.2", "k2")
    if storage == "store":
        with pytest.raises(TooManyAttempts):
            second.check("10.0.0.3", "k1")
    else:
        second.check("10.0.0.3", "k1")  # per process: this one saw none
    store.dispose()


# -- 9: rate limits (last: it locks the loopback address out for a minute) --------------------------


def test_failed_keys_are_rate_limited_and_audited(world):
    key_id = world.keys["public_health"].split("_")[1]
    statuses = []
    for _ in range(4):  # a locked key id: even its right secret is refused for the lockout
        with client(world, f"crk_{key_id}_wrongsecret") as c:
            statuses.append(c.post("/cohort", json={"task": "onset_2y"}).status_code)
    assert statuses[:3] == [401, 401, 401] and statuses[3] == 429
    with client(world, world.keys["public_health"]) as c:
        r = c.post("/cohort", json={"task": "onset_2y"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    statuses = [httpx.get(f"{world.server.url}/worklist", headers={"Authorization": f"Bearer crk_x{i}_y"}).status_code
                for i in range(10)]
    assert 429 in statuses and statuses[0] == 401
    from chronorisk.serving.audit import AuditLog

    store = ScoreStore.open(world.url)
    actions = Counter(e["action"] for e in AuditLog(store.engine, SECRET.encode()).entries())
    store.dispose()
    assert actions["auth_failed"] >= 3 and actions["auth_locked"] >= 1


# -- 3 again: batch scores written by `chronorisk score` are replayed -------------------------------


def test_batch_scores_are_replayed_by_audit_verify(scored_server, tmp_path):
    """The real batch run (scored_server) recorded its chunks: verify passes, then an edited risk is named."""
    def verify_cmd(url, work):
        return subprocess.run([sys.executable, "-m", "chronorisk.cli", "--work", str(work), "--params",
                               str(scored_server.params), "audit", "--store", url, "verify"],
                              capture_output=True, text=True, cwd=REPO, timeout=120,
                              env={"PATH": "/usr/bin:/bin", "CHRONORISK_SERVE_SECRET": SECRET})

    work = tmp_path / "w"
    shutil.copytree(scored_server.server.work / "audit", work / "audit")
    src = sqlite3.connect(scored_server.url.removeprefix("sqlite:///"))
    db = sqlite3.connect(tmp_path / "store.db")
    src.backup(db)
    src.close()
    url = f"sqlite:///{tmp_path / 'store.db'}"
    ok = verify_cmd(url, work)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    db.execute("UPDATE scores SET risk = risk / 2 WHERE rowid = (SELECT min(rowid) FROM scores)")
    db.commit()
    db.close()
    edited = verify_cmd(url, work)
    assert edited.returncode == 1 and "(edited)" in edited.stdout, edited.stdout


def test_score_requests_are_audited(scored_server):
    """Finding 9: /score was not audited. A scored request now leaves an entry (who, where, which tasks)."""
    from chronorisk.serving.audit import AuditLog

    def scores_logged() -> int:
        store = ScoreStore.open(scored_server.url)
        n = sum(e["action"] == "score" for e in AuditLog(store.engine, SECRET.encode()).entries())
        store.dispose()
        return n

    before = scores_logged()
    with httpx.Client(base_url=scored_server.server.url, timeout=30,
                      headers={"Authorization": f"Bearer {scored_server.keys['gp']}"}) as c:
        r = c.post("/score", json={"features": {}, "tasks": ["complication_1y"]})
    assert r.status_code == 200, r.text
    assert scores_logged() == before + 1


# -- 3 again: model promotions are replayed against the registry -----------------------------------


def test_audit_verify_replays_promotions_against_the_registry(tiny_world, tmp_path):
    """`chronorisk promote` records each champion move; a champion moved directly in MLflow is named by
    verify, and so is the gap it leaves once a later promotion through the CLI hides it in the end state."""
    import warnings

    from chronorisk.paths import WorkPaths
    from chronorisk.training import registry, tracking

    work = tmp_path / "w"
    url = f"sqlite:///{tmp_path / 'store.db'}"
    params = write_params(tmp_path / "params.yaml")
    paths = WorkPaths(work)
    paths.mlflow_dir.mkdir(parents=True)
    track = tracking.configure_tracking(paths, uri=tracking.default_tracking_uri(paths))
    for _ in range(2):
        registry.register_bundle(track, tiny_world.models / "onset_2y", task="onset_2y")  # versions 1, 2

    def run(*argv):
        return subprocess.run([sys.executable, "-m", "chronorisk.cli", "--work", str(work), "--params", str(params),
                               *argv], capture_output=True, text=True, cwd=REPO, timeout=600,
                              env={"PATH": "/usr/bin:/bin", "CHRONORISK_SERVE_SECRET": SECRET})

    registry.set_alias(track, "onset_2y", "champion", 1)  # before promotions were audited (or behind them)
    unrecorded = run("audit", "--store", url, "verify")
    assert unrecorded.returncode == 1 and "no promotion is recorded" in unrecorded.stdout, unrecorded.stdout
    assert run("audit", "--store", url, "record-champions").returncode == 0  # an admin acknowledges it
    assert run("audit", "--store", url, "verify").returncode == 0
    promoted = run("promote", "--task", "onset_2y", "--version", "2", "--meds", str(tiny_world.meds), "--store", url)
    assert promoted.returncode == 0 and "champion moves of onset_2y recorded" in promoted.stdout, promoted.stderr
    ok = run("audit", "--store", url, "verify")
    assert ok.returncode == 0 and "champions of" in ok.stdout, ok.stdout + ok.stderr
    registry.set_alias(track, "onset_2y", "champion", 1)  # behind the audit's back
    behind = run("audit", "--store", url, "verify")
    assert behind.returncode == 1, behind.stdout + behind.stderr
    assert "chronorisk-onset_2y in the registry: champion" in behind.stdout
    assert "differ from audit entry" in behind.stdout
    again = run("promote", "--task", "onset_2y", "--version", "2", "--meds", str(tiny_world.meds), "--store", url)
    assert again.returncode == 0, again.stderr
    hidden = run("audit", "--store", url, "verify")  # the end state matches again: the gap is still named
    assert hidden.returncode == 1 and "moved it from version 1, but entry" in hidden.stdout, hidden.stdout
    with warnings.catch_warnings():  # stages are deprecated in MLflow: chronorisk sets none, so one is named
        warnings.simplefilter("ignore")
        track.client().transition_model_version_stage(registry.registered_name("onset_2y"), "1", "Production")
    staged = run("audit", "--store", url, "verify")
    assert "version 1 is in MLflow stage 'Production'" in staged.stdout, staged.stdout


# -- 4 again: a withdrawal purges the patient's earlier monitoring rows -------------------------------


def test_withdrawal_purges_the_patients_monitoring_rows(scored_server, tiny_world, tmp_path):
    """The batch run logged every patient's scores for monitoring (keyed, no id). After a withdrawal through
    the real server no part file holds a row of that patient, the purge is audited, and `chronorisk monitor`
    (which purges again first: a row a worker flushed late) counts exactly the other patients' rows."""
    from datetime import datetime

    from chronorisk.serving.audit import AuditLog
    from chronorisk.serving.prediction_log import PredictionLog, join_keys

    work = tmp_path / "w"  # a copy of the scored world: its store, monitoring log and keys
    shutil.copytree(scored_server.server.work, work, ignore=shutil.ignore_patterns("server-*.log"))
    src = sqlite3.connect(scored_server.url.removeprefix("sqlite:///"))
    db = sqlite3.connect(tmp_path / "store.db")
    src.backup(db)
    src.close()
    url = f"sqlite:///{tmp_path / 'store.db'}"
    site, when, task = scored_server.site, datetime(2024, 1, 1), "onset_2y"
    (sid,) = db.execute("SELECT subject_id FROM scores WHERE site = ? AND task = ? ORDER BY risk DESC LIMIT 1",
                        (site, task)).fetchone()
    db.close()
    plog = PredictionLog.for_work(work)
    key = join_keys(pl.Series([sid]), pl.Series([when]), plog.key)[0]

    def rows_of_patient() -> int:
        files = [*(work / "monitoring" / "log").rglob("part-*.parquet"),
                 *(work / "monitoring" / "outcomes").rglob("part-*.parquet")]
        return sum(pl.read_parquet(f)["join_key"].eq(key).sum() for f in files)

    def site_rows() -> int:
        return plog.scan(task).filter(pl.col("site") == site).collect().height

    before, mine = site_rows(), rows_of_patient()
    assert mine >= 1  # the batch run logged this patient's score
    logged = plog.scan(task).collect()
    features = tmp_path / "features" / task
    features.mkdir(parents=True)
    for (name,), part in logged.group_by("site"):  # the monitor's reference: any rows of the model's features
        part.write_parquet(features / f"{name}.parquet")
    server = Server(work=work, store_url=url, params=scored_server.params, model_dir=tiny_world.models).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60,
                          headers={"Authorization": f"Bearer {scored_server.keys['admin']}"}) as admin:
            r = admin.post("/consent/withdraw", json={"subject_id": sid, "site": site})
            assert r.status_code == 200, r.text
    finally:
        server.stop()
    assert rows_of_patient() == 0 and site_rows() == before - mine
    store = ScoreStore.open(url)
    entries = [e for e in AuditLog(store.engine, SECRET.encode()).entries() if e["action"] == "monitoring_purge"]
    store.dispose()
    assert len(entries) == 1 and entries[0]["subject_id"] == sid and json.loads(entries[0]["detail"])["rows"] == mine
    # a row of the patient that a worker had still buffered, written after the purge
    late = logged.filter(pl.col("join_key") == key).drop("join_key").with_columns(pl.lit(sid).alias("subject_id"))
    plog.append(late.drop("task", "model_version", "model_name", "source", "scored_at"), task,
                late["model_version"][0], feature_names=[c for c in late.columns if c not in (
                    "site", "prediction_time", "risk", "tier", "subject_id", "task", "model_version",
                    "model_name", "source", "scored_at")])
    assert rows_of_patient() == mine
    out = subprocess.run([sys.executable, "-m", "chronorisk.cli", "--work", str(work), "--params",
                          str(scored_server.params), "monitor", "--task", task, "--model-dir", str(tiny_world.models),
                          "--features", str(tmp_path / "features"), "--html", "none", "--store", url],
                         capture_output=True, text=True, cwd=REPO, timeout=600,
                         env={"PATH": "/usr/bin:/bin", "CHRONORISK_SERVE_SECRET": SECRET})
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{mine} logged row(s) of withdrawn patients removed first" in out.stdout
    assert rows_of_patient() == 0
    summary = json.loads((work / "monitoring" / "summary.json").read_text())
    counted = summary["tasks"][task]
    sites = next(iter(v for k, v in counted.items() if isinstance(v, dict) and "sites" in v))["sites"]
    assert sites[site]["n_rows"] == before - mine, sites[site]
    # the next sweep under the same withdrawals reads only the parts written since, and still finds a late row
    from chronorisk.serving.consent_files import purge_monitoring

    plog.append(late.drop("task", "model_version", "model_name", "source", "scored_at"), task,
                late["model_version"][0], feature_names=[c for c in late.columns if c not in (
                    "site", "prediction_time", "risk", "tier", "subject_id", "task", "model_version",
                    "model_name", "source", "scored_at")])
    store = ScoreStore.open(url)
    assert purge_monitoring(store, work, None, actor="test", role="admin").rows == mine
    store.dispose()
    assert rows_of_patient() == 0
