"""End to end over real HTTP, for each role, against SQLite and the local PostgreSQL.

The server is the real `chronorisk serve` (BentoML) in its own process on a
free loopback port, over a seeded score store.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys

import httpx
import polars as pl
import pyarrow.parquet as pq
from serving_support import BASE_ID, REPO, SECRET, subject_id


def client(server, key: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=30)


def test_health_and_openapi(served):
    server, *_ = served
    with client(server) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200
        spec = c.get("/docs.json").json()
        for path in ("/score", "/patients/{subject_id}", "/cohort", "/cohort/export", "/consent/withdraw"):
            assert path in spec["paths"]


def test_no_key_or_a_bad_key_is_401(served):
    server, keys, *_ = served
    with client(server) as c:
        assert c.get("/worklist").status_code == 401
        assert c.get(f"/patients/{subject_id(0, 1)}").status_code == 401
    with client(server, "crk_000000000000_wrong") as c:
        assert c.post("/cohort", json={"task": "complication_1y"}).status_code == 401
    with client(server, keys["gp"]) as c:
        assert c.get("/whoami").json() == {"key_id": keys["gp"].split("_")[1], "role": "gp", "site": "chc_a"}


def test_gp_reads_only_their_own_site(served):
    server, keys, seeded, _ = served
    with client(server, keys["gp"]) as c:
        wl = c.get("/worklist", params={"task": "complication_1y"})
        assert wl.status_code == 200
        rows = wl.json()["rows"]
        assert rows and all(seeded["subjects"][r["subject_id"]] == "chc_a" for r in rows)
        assert [r["risk"] for r in rows] == sorted((r["risk"] for r in rows), reverse=True)
        assert c.get("/worklist", params={"site": "chc_b"}).status_code == 403
        high = c.get("/worklist", params={"tier": "high"}).json()["rows"]
        assert high and {r["tier"] for r in high} == {"high"}

        own = subject_id(0, 29)
        r = c.get(f"/patients/{own}")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["site"] == "chc_a" and body["age"] is not None
        comp = next(t for t in body["tasks"] if t["task"] == "complication_1y")
        assert len(comp["trend"]) == 2 and comp["latest"]["prediction_time"].startswith("2024-07-01")
        assert comp["latest"]["tier"] == "high"
        assert comp["latest"]["factors"][0]["text"].startswith("HbA1c 9.1 %")
        assert comp["latest"]["model_version"] == "2"

        other = subject_id(1, 5)  # another site's patient: the same 404 as an unknown id
        assert c.get(f"/patients/{other}").json() == c.get(f"/patients/{BASE_ID - 1}").json()
        assert c.get(f"/patients/{other}").status_code == c.get(f"/patients/{BASE_ID - 1}").status_code == 404
        assert c.get("/patients/-5").status_code == 422
        assert c.get(f"/patients/{2**63}").status_code == 422
        assert c.post("/cohort", json={"task": "complication_1y"}).status_code == 403
        assert c.post("/cohort/export", json={"task": "complication_1y"}).status_code == 403


def test_public_health_gets_pseudonymous_cohorts_and_exports(served):
    server, keys, *_ = served
    with client(server, keys["public_health"]) as c:
        assert c.get(f"/patients/{subject_id(0, 1)}").status_code == 403
        assert c.get("/worklist", params={"site": "chc_a"}).status_code == 403
        r = c.post("/cohort", json={"task": "complication_1y", "tiers": ["high", "medium"], "limit": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["truncated"] and len(body["rows"]) == 5 and body["n"] > 5
        assert body["model_versions"] == ["chronorisk-complication_1y:2"]
        row = body["rows"][0]
        assert set(row) >= {"record_id", "age_band", "sex", "risk", "tier", "model_version"}
        assert "birth_year" not in row and "age" not in row and "subject_id" not in row

        agg = c.post("/cohort/aggregate", json={"task": "complication_1y", "group_by": ["site", "tier"]})
        assert agg.status_code == 200, agg.text
        agg = agg.json()
        assert agg["small_cell"] == 10 and agg["privacy"]["epsilon"] > 0
        assert all(cell["count"] is None or cell["count"] >= 10 for cell in agg["cells"])
        assert any(cell["suppressed"] for cell in agg["cells"])

        csv = c.post("/cohort/export", json={"task": "onset_2y", "sites": ["chc_b"], "format": "csv"})
        assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
        meta = json.loads(csv.headers["x-chronorisk-export"])
        assert meta["query"]["sites"] == ["chc_b"] and meta["model_versions"] == ["chronorisk-onset_2y:2"]
        frame = pl.read_csv(io.BytesIO(csv.content))
        assert frame.height <= 30 and "birth_year" not in frame.columns and "subject_id" not in frame.columns
        parquet = c.post("/cohort/export", json={"task": "onset_2y", "format": "parquet"})
        table = pq.read_table(io.BytesIO(parquet.content))
        assert b"chronorisk.export" in table.schema.metadata


def test_data_scientist_and_mlops_roles(served):
    server, keys, *_ = served
    with client(server, keys["data_scientist"]) as c:
        assert c.post("/cohort", json={"task": "onset_2y"}).status_code == 200
        assert c.get(f"/patients/{subject_id(0, 1)}").status_code == 403
    with client(server, keys["mlops"]) as c:
        assert c.post("/cohort", json={"task": "onset_2y"}).status_code == 403
        assert c.get(f"/patients/{subject_id(0, 1)}").status_code == 403
        page = c.get("/ui/ops")
        assert page.status_code == 200 and "Service" in page.text


def test_admin_reads_every_site(served):
    server, keys, *_ = served
    with client(server, keys["admin"]) as c:
        assert c.get(f"/patients/{subject_id(1, 5)}").status_code == 200
        assert c.get(f"/patients/{subject_id(2, 5)}", params={"site": "hosp_c"}).status_code == 200
        assert c.get(f"/patients/{subject_id(2, 5)}", params={"site": "chc_a"}).status_code == 404
        assert c.get("/worklist").status_code == 422  # an admin names the site
        rows = c.get("/worklist", params={"site": "chc_b"}).json()["rows"]
        assert rows and rows[0]["risk"] >= rows[-1]["risk"]


def test_consent_withdrawal_over_the_api(served):
    server, keys, *_ = served
    sid = subject_id(0, 7)
    with client(server, keys["gp_b"]) as c:  # another site's GP
        assert c.post("/consent/withdraw", json={"subject_id": sid}).status_code == 404
        assert c.post("/consent/withdraw", json={"subject_id": sid, "site": "chc_a"}).status_code == 403
    with client(server, keys["public_health"]) as c:
        assert c.post("/consent/withdraw", json={"subject_id": sid}).status_code == 403
    with client(server, keys["gp"]) as c:
        assert sid in {x["subject_id"] for x in c.get("/worklist", params={"limit": 1000}).json()["rows"]}
        r = c.post("/consent/withdraw", json={"subject_id": sid})
        assert r.status_code == 200 and r.json()["site"] == "chc_a"
        assert sid not in {x["subject_id"] for x in c.get("/worklist", params={"limit": 1000}).json()["rows"]}
    # the next training run leaves them out: the site's MEDS dataset carries its withdrawn list
    from chronorisk.data.consent import read_site_withdrawn

    assert sid in read_site_withdrawn(server.meds_root / "sites" / "chc_a")["subject_id"].to_list()
    assert sid not in read_site_withdrawn(server.meds_root / "sites" / "chc_b")["subject_id"].to_list()
    with client(server, keys["public_health"]) as c:
        export = c.post("/cohort/export", json={"task": "complication_1y", "sites": ["chc_a"]})
        assert str(sid) not in export.text


def test_revoked_key_stops_working(served):
    server, _keys, _seeded, url = served
    from chronorisk.serving import access
    from chronorisk.serving.audit import AuditLog
    from chronorisk.serving.store import ScoreStore

    store = ScoreStore.open(url)
    audit = AuditLog(store.engine, SECRET.encode())
    key_id, key = access.create_key(store.engine, "public_health", audit=audit, actor="test")
    try:
        with client(server, key) as c:
            assert c.post("/cohort", json={"task": "onset_2y"}).status_code == 200
            access.revoke_key(store.engine, key_id, audit=audit, actor="test")
            assert c.post("/cohort", json={"task": "onset_2y"}).status_code == 401
    finally:
        store.dispose()


def test_bad_input_is_a_4xx_naming_the_field(served):
    server, keys, *_ = served
    with client(server, keys["admin"]) as c:
        def check(body, field, status=422, **kw):
            r = c.post("/score", json=body, **kw) if body is not None else c.post("/score", **kw)
            assert r.status_code == status, (r.status_code, r.text)
            assert field in r.json()["error"], r.json()
            return r

        check({"events": [{"code": "LOINC//8480-6", "numeric_value": 1200, "time": "2024-01-01"}]},
              "events[0].numeric_value")
        check({"events": [{"code": "LOINC//4548-4", "numeric_value": 7.0, "time": "2099-01-01"}]},
              "events[0].time")
        check({"events": [{"code": "FOO//1", "time": "2024-01-01"}]}, "events[0].code")
        check({"events": [{"code": "LOINC//banana", "time": "2024-01-01"}]}, "events[0].code")
        check({"events": [{"code": "LOINC//4548-4", "numeric_value": "high"}]}, "events[0].numeric_value")
        check({"events": [], "features": {}}, "body")
        check({"features": {"x": 1}, "prediction_time": "2999-01-01T00:00:00"}, "prediction_time")
        check({"features": {"x": 1}, "tasks": ["no_such_task"]}, "tasks[0]")
        check({"features": {"x": 1}, "extra": 1}, "extra")
        r = c.post("/score", content=b'{"events": [', headers={"content-type": "application/json"})
        assert r.status_code == 422
        r = c.post("/cohort", json={"task": "complication_1y", "min_risk": 2})
        assert r.status_code == 422 and "min_risk" in r.json()["error"]
        r = c.post("/cohort", json={"task": "complication_1y", "conditions": ["dragonpox"]})
        assert r.status_code == 422 and "conditions[0]" in r.json()["error"]
        r = c.post("/cohort/aggregate", json={"task": "complication_1y", "group_by": ["sex", "sex"]})
        assert r.status_code == 422 and "group_by" in r.json()["error"]
        big = b'{"features": {"a": 1}, "pad": "' + b"x" * 6_000_000 + b'"}'
        r = c.post("/score", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "body" in r.json()["error"]


def test_metrics_label_routes_not_ids(served):
    server, keys, *_ = served
    with client(server, keys["admin"]) as c:
        c.get(f"/patients/{subject_id(0, 2)}")
        text = c.get("/metrics").text
    assert 'route="/patients/{subject_id}"' in text
    assert str(BASE_ID)[:6] not in text


def test_keep_alive_connection_is_closed_after_its_quota(served):
    """A keep-alive connection gets between half of `serve.keepalive_max_requests` and all of it, the last
    answer saying `Connection: close`; then the server closes it (the client's next connection may go to
    another worker). Quotas differ between connections (opened together, they must not all end together)."""
    import socket

    from chronorisk.serving.config import ServeConfig

    server, *_ = served
    limit = ServeConfig().keepalive_max_requests
    assert limit > 1
    request = b"GET /cds-services HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    quotas = []
    for _ in range(8):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            reader = sock.makefile("rb")
            for n in range(1, limit + 1):
                sock.sendall(request)
                status = reader.readline()
                headers = {}
                for line in iter(reader.readline, b"\r\n"):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip().lower()
                assert status.startswith(b"HTTP/1.1 200"), (n, status)
                reader.read(int(headers["content-length"]))
                if headers.get("connection") == "close":
                    quotas.append(n)
                    break
            assert reader.read(1) == b""  # closed by the server
    assert len(quotas) == 8 and all((limit + 1) // 2 <= q <= limit for q in quotas), quotas
    assert len(set(quotas)) > 1, quotas  # 8 equal draws from 13 values: 1 in 13**7
    with client(server) as c:  # a new connection is served as usual
        assert c.get("/cds-services").status_code == 200


def test_audit_log_holds_every_read_and_verifies(served):
    server, keys, _seeded, url = served
    with client(server, keys["gp"]) as c:
        c.get(f"/patients/{subject_id(0, 11)}")
    env = {"CHRONORISK_SERVE_SECRET": SECRET, "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "chronorisk.cli", "--work", str(server.work), "audit", "--store", url, "verify"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "audit log ok" in out.stdout
    from chronorisk.serving.audit import AuditLog
    from chronorisk.serving.store import ScoreStore

    store = ScoreStore.open(url)
    entries = list(AuditLog(store.engine, SECRET.encode()).entries())
    store.dispose()
    reads = [e for e in entries if e["action"] == "patient_read" and e["subject_id"] == subject_id(0, 11)]
    assert reads and reads[-1]["role"] == "gp" and reads[-1]["site"] == "chc_a"
    exports = [e for e in entries if e["action"] == "export"]
    assert exports and all(json.loads(e["detail"])["model_versions"] for e in exports)


def test_server_log_holds_no_identifiers(served):
    server, _keys, seeded, _ = served
    log = server.log()
    leaked = [sid for sid in seeded["subjects"] if str(sid) in log]
    assert not leaked, f"{len(leaked)} subject ids in the server log"
