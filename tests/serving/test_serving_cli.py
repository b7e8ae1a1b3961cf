"""The serving subcommands through the real CLI: keys, consent, cohort export, audit verify and tamper."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import polars as pl
import pytest
from serving_support import REPO, SECRET, seed_store, subject_id
from sqlalchemy import update

from chronorisk.serving.audit import audit_log
from chronorisk.serving.store import ScoreStore


def cli(work, *args, secret: bool = True, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CHRONORISK_SERVE_SECRET", "CHRONORISK_DEMO")}
    if secret:
        env["CHRONORISK_SERVE_SECRET"] = SECRET
    return subprocess.run([sys.executable, "-m", "chronorisk.cli", "--work", str(work), *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


@pytest.fixture
def seeded(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = ScoreStore.open(url)
    seed_store(store)
    store.dispose()
    return tmp_path / "w", url


def test_keys_consent_export_and_audit_through_the_cli(seeded, tmp_path):
    work, url = seeded
    out = cli(work, "access", "--store", url, "create-key", "--role", "gp", "--site", "chc_a", "--label", "dr x")
    assert out.returncode == 0, out.stderr
    key_line = [line for line in out.stdout.splitlines() if line.startswith("crk_")]
    assert len(key_line) == 1
    key_id = key_line[0].split("_")[1]
    listed = cli(work, "access", "--store", url, "list")
    assert key_id in listed.stdout and key_line[0] not in listed.stdout  # never the secret
    assert cli(work, "access", "--store", url, "revoke", key_id).returncode == 0
    assert "revoked" in cli(work, "access", "--store", url, "list").stdout
    again = cli(work, "access", "--store", url, "revoke", key_id)
    assert again.returncode == 2 and "key_id" in again.stderr

    sid = subject_id(0, 29)
    out = cli(work, "access", "--store", url, "withdraw-consent", "--subject", str(sid))
    assert out.returncode == 0 and str(sid) not in out.stdout  # the id is not echoed

    target = tmp_path / "cohort.csv"
    out = cli(work, "cohort", "--store", url, "--task", "complication_1y", "--sites", "chc_a", "--out", str(target))
    assert out.returncode == 0, out.stderr
    frame = pl.read_csv(target)
    assert sid not in frame["subject_id"].to_list() and frame.height == 29
    meta = json.loads((tmp_path / "cohort.csv.meta.json").read_text())
    assert meta["query"]["sites"] == ["chc_a"] and meta["model_versions"] == ["chronorisk-complication_1y:2"]
    assert meta["audit_entry"] >= 1

    agg = cli(work, "cohort", "--store", url, "--task", "complication_1y", "--aggregate", "--group-by", "site,tier")
    assert agg.returncode == 0 and "site=hosp_c" in agg.stdout and "<10" in agg.stdout

    ok = cli(work, "audit", "--store", url, "verify")
    assert ok.returncode == 0 and "audit log ok" in ok.stdout
    shown = cli(work, "audit", "--store", url, "show", "--last", "10")
    assert "export" in shown.stdout and "consent_withdraw" in shown.stdout and str(sid) not in shown.stdout


def test_audit_verify_names_an_edited_and_a_deleted_entry(seeded):
    work, url = seeded
    for i in range(3):
        cli(work, "access", "--store", url, "create-key", "--role", "public_health", "--label", f"k{i}")
    assert cli(work, "audit", "--store", url, "verify").returncode == 0
    store = ScoreStore.open(url)
    with store.engine.begin() as conn:
        conn.execute(update(audit_log).where(audit_log.c.seq == 2).values(role="gp"))
    edited = cli(work, "audit", "--store", url, "verify")
    assert edited.returncode == 1 and "entry 2" in edited.stdout and "edited" in edited.stdout
    with store.engine.begin() as conn:
        conn.execute(audit_log.delete().where(audit_log.c.seq == 2))
    deleted = cli(work, "audit", "--store", url, "verify")
    store.dispose()
    assert deleted.returncode == 1 and "entry 2 deleted" in deleted.stdout


def test_cli_errors_are_one_line(seeded, tmp_path):
    work, url = seeded
    out = cli(work, "access", "--store", url, "create-key", "--role", "gp")
    assert out.returncode == 2 and "site" in out.stderr and "Traceback" not in out.stderr
    out = cli(work, "audit", "--store", url, "verify", secret=False)
    assert out.returncode == 2 and "no service secret" in out.stderr
    out = cli(work, "cohort", "--store", url, "--task", "complication_1y", "--min-risk", "3")
    assert out.returncode == 2 and "--min-risk" in out.stderr
    out = cli(work, "cohort", "--store", url, "--task", "complication_1y", "--out", str(tmp_path / "x.xlsx"))
    assert out.returncode == 2 and "--out" in out.stderr
    out = cli(work, "score", "--date", "2024-13-01", "--store", url)
    assert out.returncode == 2 and "--date" in out.stderr
    out = cli(work, "score", "--date", "2999-01-01", "--store", url)
    assert out.returncode == 2 and "future" in out.stderr
    out = cli(work, "cohort", "--store", "nonsense://x", "--task", "complication_1y")
    assert out.returncode == 2 and "store_url" in out.stderr


def test_demo_mode_creates_the_secret_and_one_key_per_role(tmp_path):
    from chronorisk.serving.cli_common import ensure_demo_keys

    store = ScoreStore.open(f"sqlite:///{tmp_path / 'store.db'}")
    keys = ensure_demo_keys(store, tmp_path / "secrets", ["chc_a"])
    assert set(keys) == {"gp", "public_health", "data_scientist", "mlops", "admin"}
    assert keys["gp"]["site"] == "chc_a"
    assert (tmp_path / "secrets" / "demo-keys.json").stat().st_mode & 0o077 == 0
    assert ensure_demo_keys(store, tmp_path / "secrets", ["chc_a"]) == keys  # created once
    store.dispose()
    out = cli(tmp_path / "w", "audit", "--demo", "--store", f"sqlite:///{tmp_path / 'store.db'}", "verify",
              secret=False)
    assert out.returncode == 0 and (tmp_path / "w" / "secrets" / "serve.key").is_file()
