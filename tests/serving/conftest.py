"""Fixtures of the serving tests: stores (SQLite, PostgreSQL), seeded data, real servers, a tiny model."""

from __future__ import annotations

import pytest
from cdp import Chromium, chromium_path
from serving_support import SECRET, SITES, Server, make_keys, pg_schema, seed_store, write_params

from chronorisk.serving.store import ScoreStore


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("CHRONORISK_SERVE_SECRET", SECRET)
    monkeypatch.delenv("CHRONORISK_DEMO", raising=False)
    return SECRET


@pytest.fixture
def sqlite_store(tmp_path):
    store = ScoreStore.open(f"sqlite:///{tmp_path / 'store.db'}")
    yield store
    store.dispose()


@pytest.fixture
def pg_store():
    with pg_schema() as url:
        store = ScoreStore.open(url)
        yield store
        store.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_store(request, tmp_path):
    """The same test against SQLite and against the local PostgreSQL."""
    if request.param == "sqlite":
        store = ScoreStore.open(f"sqlite:///{tmp_path / 'store.db'}")
        yield store
        store.dispose()
    else:
        with pg_schema() as url:
            store = ScoreStore.open(url)
            yield store
            store.dispose()


def _served(tmp_path_factory, backend: str, model_dir=None):
    work = tmp_path_factory.mktemp(f"serve-{backend}")
    params = write_params(work / "params.yaml")

    def run(url: str):
        store = ScoreStore.open(url)
        seeded = seed_store(store)
        keys = make_keys(store)
        store.dispose()
        meds = work / "meds"  # the seeded sites' MEDS folders: consent changes write their withdrawn lists here
        for site in SITES:
            (meds / "sites" / site / "data").mkdir(parents=True, exist_ok=True)
        server = Server(work=work / "w", store_url=url, params=params, model_dir=model_dir, meds_root=meds).start()
        return server, keys, seeded

    return run


@pytest.fixture(scope="session", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def served(request, tmp_path_factory):
    """A running server over a seeded store, with one key per role: (server, keys, seeded, url)."""
    run = _served(tmp_path_factory, request.param)
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite-store') / 'store.db'}"
        server, keys, seeded = run(url)
        yield server, keys, seeded, url
        server.stop()
    else:
        with pg_schema() as url:
            server, keys, seeded = run(url)
            yield server, keys, seeded, url
            server.stop()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A small generated cohort and a tiny model per task trained on it (exported-folder layout)."""
    from types import SimpleNamespace

    from serving_support import generate_cohort, train_bundles

    root = tmp_path_factory.mktemp("world")
    meds = generate_cohort(root, patients=1200)
    models = train_bundles(meds, root / "models")
    return SimpleNamespace(root=root, meds=meds, models=models)


@pytest.fixture(scope="session")
def scored_server(tiny_world, tmp_path_factory):
    """The tiny world batch-scored at 2024-01-01 by `chronorisk score`, served with its models."""
    import subprocess
    import sys
    from types import SimpleNamespace

    from serving_support import REPO, make_keys

    work = tmp_path_factory.mktemp("scored")
    url = f"sqlite:///{work / 'store.db'}"
    params = write_params(work / "params.yaml")
    cmd = [sys.executable, "-m", "chronorisk.cli", "--work", str(work / "w"), "--params", str(params), "score",
           "--date", "2024-01-01", "--meds", str(tiny_world.meds), "--model-dir", str(tiny_world.models),
           "--store", url]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900,
                         env={**__import__("os").environ, "CHRONORISK_SERVE_SECRET": SECRET})
    assert out.returncode == 0, out.stderr[-3000:]
    store = ScoreStore.open(url)
    keys = make_keys(store)
    site = store.sites()[0]
    from chronorisk.serving import access
    from chronorisk.serving.audit import AuditLog

    _, keys["gp"] = access.create_key(store.engine, "gp", site, label="test",
                                      audit=AuditLog(store.engine, SECRET.encode()), actor="test")
    store.dispose()
    # a copy: consent changes through this server write the sites' withdrawn lists into its MEDS root
    import shutil

    meds = work / "meds"
    shutil.copytree(tiny_world.meds, meds)
    server = Server(work=work / "w", store_url=url, params=params, model_dir=tiny_world.models,
                    meds_root=meds).start()
    yield SimpleNamespace(server=server, keys=keys, url=url, site=site, score_output=out.stdout, work=work,
                          params=params, cmd=cmd, meds=meds)
    server.stop()


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium (Debian's, driven over the DevTools protocol) for the page tests."""
    if chromium_path() is None:
        pytest.fail("chromium is not installed: apt-get install chromium (the test set-up installs it)")
    chrome = Chromium(tmp_path / "profile")
    yield chrome
    chrome.close()
