"""MLflow tracking and registry on the embedded SQLite backend (PostgreSQL: test_registry_postgres.py).

A tiny LightGBM booster and a hand-built bundle folder stand in for a
trained model: what is tested is where things go, which version an alias
points at, and that a registered version gives back the same bundle files.
"""

from __future__ import annotations

import math

import lightgbm as lgb
import mlflow
import numpy as np
import pytest

from chronorisk.errors import ChronoriskError
from chronorisk.paths import WorkPaths
from chronorisk.training import registry, tracking


def tiny_booster(seed: int = 0) -> lgb.Booster:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, 3))
    y = (x[:, 0] + 0.5 * rng.normal(size=300) > 0).astype(int)
    return lgb.train(
        {"objective": "binary", "verbose": -1, "num_threads": 1, "min_data_in_leaf": 5},
        lgb.Dataset(x, y),
        num_boost_round=5,
    )


def bundle_folder(root, tag: str):
    """A stand-in bundle: a few files, one in a sub-folder, with content that identifies it."""
    folder = root / f"bundle-{tag}"
    (folder / "sub").mkdir(parents=True)
    tiny_booster().save_model(str(folder / "booster.txt"))
    (folder / "metadata.json").write_text(f'{{"tag": "{tag}"}}')
    (folder / "sub" / "spec.json").write_text('{"features": []}')
    return folder


def folder_contents(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> WorkPaths:
    return WorkPaths(tmp_path_factory.mktemp("registry-work"))


@pytest.fixture(scope="module")
def track(paths) -> tracking.Tracking:
    return tracking.configure_tracking(paths, experiment="registry-test")


# ---- tracking ---------------------------------------------------------------------------------


def test_embedded_backend_lives_in_the_work_folder(paths, track):
    assert track.uri == f"sqlite:///{paths.mlflow_dir.resolve() / 'mlflow.db'}"
    assert (paths.mlflow_dir / "mlflow.db").is_file()
    assert track.artifact_location == paths.mlflow_artifacts.resolve().as_uri()
    assert mlflow.get_tracking_uri() == track.uri


def test_tracking_uri_precedence(paths):
    default = tracking.default_tracking_uri(paths)
    assert tracking.resolve_tracking_uri(paths) == default
    assert tracking.resolve_tracking_uri(paths, None, "http://mlflow:5000") == "http://mlflow:5000"
    assert tracking.resolve_tracking_uri(paths, "http://a:1", "http://b:2") == "http://a:1"


@pytest.mark.parametrize("bad", ["ftp://host/x", "mlruns", "s3://bucket/x"])
def test_unsupported_tracking_uri_is_refused_naming_the_flag(paths, bad):
    with pytest.raises(ChronoriskError, match="--tracking-uri"):
        tracking.resolve_tracking_uri(paths, bad)


def test_redact_hides_the_password_only():
    assert tracking.redact("postgresql+psycopg://u:secret@db:5432/x") == "postgresql+psycopg://u:***@db:5432/x"
    assert tracking.redact("postgresql+psycopg://postgres@127.0.0.1/x") == "postgresql+psycopg://postgres@127.0.0.1/x"
    assert "secret" not in tracking.redact("https://:secret@host/")


def test_unreachable_server_is_a_clear_error(paths):
    with pytest.raises(ChronoriskError, match="cannot connect to the database"):
        tracking.configure_tracking(paths, uri="postgresql+psycopg://postgres@127.0.0.1:1/nothing")
    tracking.configure_tracking(paths, experiment="registry-test")  # back to the module's backend


def test_connect_refuses_a_missing_embedded_registry(tmp_path):
    with pytest.raises(ChronoriskError, match="no registry there yet"):
        tracking.connect(f"sqlite:///{tmp_path / 'none.db'}")


def test_metrics_keep_finite_numbers_under_dotted_names():
    got = tracking.finite_metrics(
        {"all": {"auroc": 0.8, "ece": math.nan, "n": 10, "ok": True}, "site A": {"auroc": 0.7}, "x": "text"}
    )
    assert got == {"all.auroc": 0.8, "all.n": 10.0, "site A.auroc": 0.7}


def test_run_logs_nested_params_metrics_and_files(track, tmp_path):
    report = tmp_path / "report.html"
    report.write_text("<html></html>")
    with tracking.start_run(track, name="logging", tags={"task": "t"}) as run:
        tracking.log_params({"model": {"num_leaves": 31, "objective": "binary"}, "long": "x" * 7000})
        tracking.log_metrics({"held_out": {"auroc": 0.81, "ece": float("inf")}})
        tracking.log_files([(report, "reports"), (tmp_path / "missing.md", "reports")])
    got = track.client().get_run(run.info.run_id)
    assert got.data.params["model.num_leaves"] == "31"
    assert len(got.data.params["long"]) == 6000
    assert got.data.metrics == {"held_out.auroc": 0.81}
    assert got.data.tags["chronorisk.task"] == "t"
    assert [a.path for a in track.client().list_artifacts(run.info.run_id, "reports")] == ["reports/report.html"]


def test_failed_run_is_marked_failed(track):
    with pytest.raises(RuntimeError), tracking.start_run(track, name="boom") as run:
        raise RuntimeError("x")
    assert track.client().get_run(run.info.run_id).info.status == "FAILED"


# ---- registry ---------------------------------------------------------------------------------


def test_register_download_round_trip_and_challenger_alias(paths, track, tmp_path):
    folder = bundle_folder(tmp_path, "one")
    with tracking.start_run(track, name="train-alpha") as run:
        reg = registry.register_bundle(track, folder, task="alpha", booster=tiny_booster(), tags={"fp": "abc"})
    assert (reg.name, reg.version, reg.run_id, reg.aliases) == ("chronorisk-alpha", 1, run.info.run_id, ("challenger",))
    assert registry.get_version_by_alias(track, "alpha", "challenger").version == 1
    assert registry.get_version_by_alias(track, "alpha", "champion") is None

    local, found = registry.fetch_bundle("alpha", "challenger", paths=paths, tracking=track)
    assert found.version == 1
    assert folder_contents(local) == folder_contents(folder)
    assert str(local).startswith(str(paths.mlflow_dir / "cache"))

    # the plain booster is logged beside the bundle and loads with MLflow's LightGBM flavour
    booster = mlflow.lightgbm.load_model(reg.booster_uri)
    x = np.zeros((2, 3))
    assert np.allclose(booster.predict(x), tiny_booster().predict(x))

    mv = track.client().get_model_version("chronorisk-alpha", "1")
    assert mv.tags["chronorisk.task"] == "alpha" and mv.tags["fp"] == "abc"


def test_cached_download_is_reused(paths, track, tmp_path):
    folder = bundle_folder(tmp_path, "cache")
    registry.register_bundle(track, folder, task="beta")  # no active run: opens its own
    first, _ = registry.fetch_bundle("beta", "challenger", paths=paths, tracking=track)
    marker = first / "touched"
    marker.write_text("kept")
    second, _ = registry.fetch_bundle("beta", "challenger", paths=paths, tracking=track)
    assert second == first and marker.read_text() == "kept"


def test_new_version_moves_challenger_and_set_alias_moves_champion(paths, track, tmp_path):
    v1 = registry.register_bundle(track, bundle_folder(tmp_path, "g1"), task="gamma")
    v2 = registry.register_bundle(track, bundle_folder(tmp_path, "g2"), task="gamma")
    assert (v1.version, v2.version) == (1, 2)
    assert registry.get_version_by_alias(track, "gamma", "challenger").version == 2
    registry.set_alias(track, "gamma", "champion", 1)
    assert registry.get_version_by_alias(track, "gamma", "champion").version == 1
    registry.set_alias(track, "gamma", "champion", 2)
    assert registry.get_version_by_alias(track, "gamma", "champion").version == 2
    assert [v.version for v in registry.list_versions(track, "gamma")] == [1, 2]

    local, found = registry.fetch_bundle("gamma", version=1, paths=paths, tracking=track)
    assert found.version == 1 and (local / "metadata.json").read_text() == '{"tag": "g1"}'


def test_missing_champion_and_version_are_clear_errors(paths, track, tmp_path):
    registry.register_bundle(track, bundle_folder(tmp_path, "d"), task="delta")
    with pytest.raises(ChronoriskError, match=r"no version with alias 'champion'.*promote"):
        registry.fetch_bundle("delta", paths=paths, tracking=track)
    with pytest.raises(ChronoriskError, match="has no version 7"):
        registry.fetch_bundle("delta", version=7, paths=paths, tracking=track)
    with pytest.raises(ChronoriskError, match="no version with alias"):
        registry.fetch_bundle("never-trained", paths=paths, tracking=track)


def test_missing_bundle_folder_is_refused(track, tmp_path):
    with pytest.raises(ChronoriskError, match="does not exist"):
        registry.register_bundle(track, tmp_path / "nope", task="epsilon")


def test_fetch_from_a_fresh_process_reads_the_work_folder_default(paths, track, tmp_path):
    """Serving gives only the work folder: the default backend there must find the version."""
    registry.register_bundle(track, bundle_folder(tmp_path, "z"), task="zeta")
    local, found = registry.fetch_bundle("zeta", "challenger", paths=paths)
    assert found.version == 1 and (local / "metadata.json").is_file()
