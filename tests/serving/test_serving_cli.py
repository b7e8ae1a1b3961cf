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


@pytest.fixture
def inproc(monkeypatch):
    """`chronorisk.cli.main` in this process (the same entry point, without a start-up per call);
    the environment it sets is restored afterwards."""
    from chronorisk.cli import main

    saved = dict(os.environ)
    monkeypatch.setenv("CHRONORISK_SERVE_SECRET", SECRET)
    monkeypatch.delenv("CHRONORISK_DEMO", raising=False)

    def run(work, *args):
        return main(["--work", str(work), *args])

    yield run
    os.environ.clear()
    os.environ.update(saved)


def test_keys_consent_export_and_audit_through_the_cli(seeded, tmp_path, inproc, capsys):
    """Two commands in their own processes (a key, an export); the rest through the same entry point."""
    work, url = seeded
    out = cli(work, "access", "--store", url, "create-key", "--role", "gp", "--site", "chc_a", "--label", "dr x")
    assert out.returncode == 0, out.stderr
    key_line = [line for line in out.stdout.splitlines() if line.startswith("crk_")]
    assert len(key_line) == 1
    key_id = key_line[0].split("_")[1]
    capsys.readouterr()
    assert inproc(work, "access", "--store", url, "list") == 0
    listed = capsys.readouterr().out
    assert key_id in listed and key_line[0] not in listed  # never the secret
    assert inproc(work, "access", "--store", url, "revoke", key_id) == 0
    assert inproc(work, "access", "--store", url, "list") == 0 and "revoked" in capsys.readouterr().out
    assert inproc(work, "access", "--store", url, "revoke", key_id) == 2
    assert "key_id" in capsys.readouterr().err

    sid = subject_id(0, 29)
    assert inproc(work, "access", "--store", url, "withdraw-consent", "--subject", str(sid)) == 0
    assert str(sid) not in capsys.readouterr().out  # the id is not echoed

    target = tmp_path / "cohort.csv"
    out = cli(work, "cohort", "--store", url, "--task", "complication_1y", "--sites", "chc_a", "--out", str(target))
    assert out.returncode == 0, out.stderr
    frame = pl.read_csv(target)
    assert "subject_id" not in frame.columns and "record_id" in frame.columns and frame.height <= 29
    meta = json.loads((tmp_path / "cohort.csv.meta.json").read_text())
    assert meta["deidentification"]["k"] == 10
    assert meta["query"]["sites"] == ["chc_a"] and meta["model_versions"] == ["chronorisk-complication_1y:2"]
    assert meta["audit_entry"] >= 1

    capsys.readouterr()
    assert inproc(work, "cohort", "--store", url, "--task", "complication_1y", "--aggregate",
                  "--group-by", "site,tier") == 0
    agg = capsys.readouterr().out
    assert "site=hosp_c" in agg and "<10" in agg
    assert inproc(work, "audit", "--store", url, "verify") == 0 and "audit log ok" in capsys.readouterr().out
    assert inproc(work, "audit", "--store", url, "show", "--last", "10") == 0
    shown = capsys.readouterr().out
    assert "export" in shown and "consent_withdraw" in shown and str(sid) not in shown


def test_audit_verify_names_an_edited_and_a_deleted_entry(seeded, inproc, capsys):
    work, url = seeded
    for i in range(3):
        assert inproc(work, "access", "--store", url, "create-key", "--role", "public_health", "--label", f"k{i}") == 0
    assert inproc(work, "audit", "--store", url, "verify") == 0
    store = ScoreStore.open(url)
    with store.engine.begin() as conn:
        conn.execute(update(audit_log).where(audit_log.c.seq == 2).values(role="gp"))
    capsys.readouterr()
    assert inproc(work, "audit", "--store", url, "verify") == 1
    edited = capsys.readouterr().out
    assert "entry 2" in edited and "edited" in edited
    with store.engine.begin() as conn:
        conn.execute(audit_log.delete().where(audit_log.c.seq == 2))
    store.dispose()
    # the real command, in its own process, sees the deletion too
    deleted = cli(work, "audit", "--store", url, "verify")
    assert deleted.returncode == 1 and "entry 2 deleted" in deleted.stdout


def test_cli_errors_are_one_line(seeded, tmp_path, inproc, capsys):
    work, url = seeded

    def fails(*args, words: str) -> None:
        assert inproc(work, *args) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err

    fails("access", "--store", url, "create-key", "--role", "gp", words="site")
    fails("cohort", "--store", url, "--task", "complication_1y", "--min-risk", "3", words="--min-risk")
    fails("cohort", "--store", url, "--task", "complication_1y", "--out", str(tmp_path / "x.xlsx"), words="--out")
    fails("score", "--date", "2024-13-01", "--store", url, words="--date")
    fails("score", "--date", "2999-01-01", "--store", url, words="future")
    fails("cohort", "--store", "nonsense://x", "--task", "complication_1y", words="store_url")
    os.environ.pop("CHRONORISK_SERVE_SECRET")
    fails("audit", "--store", url, "verify", words="no service secret")


def test_demo_mode_creates_the_secret_and_one_key_per_role(tmp_path):
    from chronorisk.serving.access import load_secret
    from chronorisk.serving.audit import AuditLog
    from chronorisk.serving.cli_common import ensure_demo_keys

    store = ScoreStore.open(f"sqlite:///{tmp_path / 'store.db'}")
    audit = AuditLog(store.engine, load_secret("NO_SUCH_VARIABLE", None, tmp_path / "w", demo=True),
                     [tmp_path / "w" / "audit" / "checkpoints.jsonl"])
    path = ensure_demo_keys(store, tmp_path / "secrets", ["chc_a"], audit)
    keys = json.loads(path.read_text())
    assert set(keys) == {"gp", "public_health", "data_scientist", "mlops", "admin"}
    assert keys["gp"]["site"] == "chc_a"
    assert path.stat().st_mode & 0o077 == 0
    ensure_demo_keys(store, tmp_path / "secrets", ["chc_a"], audit)
    assert json.loads(path.read_text()) == keys  # created once
    store.dispose()
    out = cli(tmp_path / "w", "audit", "--demo", "--store", f"sqlite:///{tmp_path / 'store.db'}", "verify",
              secret=False)
    assert out.returncode == 0 and (tmp_path / "w" / "secrets" / "serve.key").is_file()


def test_each_worker_gets_its_share_of_the_cores_for_polars(tmp_path, monkeypatch):
    """`chronorisk serve` gives each worker's polars pool cores // workers threads (at least 1), unless
    the caller set POLARS_MAX_THREADS."""
    from types import SimpleNamespace

    from chronorisk.config import Params
    from chronorisk.serving.serve_cli import service_environment

    ctx = SimpleNamespace(params=Params(), params_path=None, paths=SimpleNamespace(root=tmp_path, meds=tmp_path))
    monkeypatch.delenv("POLARS_MAX_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    for workers, threads in ((1, "8"), (2, "4"), (3, "2"), (16, "1")):
        args = SimpleNamespace(workers=workers, store=None, model_dir=None, meds=None, demo=False)
        env = service_environment(args, ctx)
        assert env["POLARS_MAX_THREADS"] == threads
        assert json.loads(env["BENTOML_CONFIG_OVERRIDES"])["services"]["ChronoriskService"]["workers"] == workers
    monkeypatch.setenv("POLARS_MAX_THREADS", "3")
    assert service_environment(args, ctx)["POLARS_MAX_THREADS"] == "3"
