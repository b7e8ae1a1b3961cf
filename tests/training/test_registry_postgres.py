"""The same tracking and registry paths with PostgreSQL as MLflow's backend store.

Uses a database of its own (`chronorisk_mlflow_test`) on the local server,
created here and dropped at the end.
"""

from __future__ import annotations

import lightgbm as lgb
import mlflow
import numpy as np
import pytest

from chronorisk.paths import WorkPaths
from chronorisk.training import registry, tracking

pytestmark = pytest.mark.postgres

psycopg = pytest.importorskip("psycopg")

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"
DATABASE = "chronorisk_mlflow_test"
MLFLOW_URI = f"postgresql+psycopg://postgres@127.0.0.1:5432/{DATABASE}"


def tiny_booster() -> lgb.Booster:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3))
    y = (x[:, 0] > 0).astype(int)
    params = {"objective": "binary", "verbose": -1, "num_threads": 1, "min_data_in_leaf": 5}
    return lgb.train(params, lgb.Dataset(x, y), num_boost_round=5)


def bundle_folder(root, tag: str):
    folder = root / f"bundle-{tag}"
    (folder / "sub").mkdir(parents=True)
    (folder / "metadata.json").write_text(f'{{"tag": "{tag}"}}')
    (folder / "sub" / "spec.json").write_text("{}")
    return folder


def folder_contents(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _admin(sql: str) -> None:
    with psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql)


@pytest.fixture(scope="module")
def pg_uri():
    """A fresh database for MLflow; dropped (connections and all) afterwards."""
    try:
        _admin(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        _admin(f"CREATE DATABASE {DATABASE}")
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at 127.0.0.1:5432 is not reachable: {exc}")
    yield MLFLOW_URI
    _admin(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> WorkPaths:
    return WorkPaths(tmp_path_factory.mktemp("pg-work"))


def test_runs_and_registry_on_postgres(pg_uri, paths, tmp_path):
    uri = tracking.resolve_tracking_uri(paths, pg_uri)
    track = tracking.configure_tracking(paths, uri=uri, experiment="pg-test")
    assert track.uri == pg_uri
    # artifacts still go to the work folder: the database holds only the metadata
    assert track.artifact_location == paths.mlflow_artifacts.resolve().as_uri()
    assert not (paths.mlflow_dir / "mlflow.db").exists()

    folder = bundle_folder(tmp_path, "pg")
    with tracking.start_run(track, name="train-pg", tags={"task": "pg"}) as run:
        tracking.log_params({"model": {"num_leaves": 7}})
        tracking.log_metrics({"held_out": {"auroc": 0.75}})
        first = registry.register_bundle(track, folder, task="pg", booster=tiny_booster())
    second = registry.register_bundle(track, bundle_folder(tmp_path, "pg2"), task="pg")
    registry.set_alias(track, "pg", "champion", first.version)

    assert (first.version, second.version) == (1, 2)
    assert registry.get_version_by_alias(track, "pg", "challenger").version == 2
    assert registry.get_version_by_alias(track, "pg", "champion").version == 1
    got = track.client().get_run(run.info.run_id)
    assert got.data.metrics == {"held_out.auroc": 0.75} and got.data.params == {"model.num_leaves": "7"}

    # a reader that only has the URI (serving) finds the champion and its files
    local, found = registry.fetch_bundle("pg", paths=paths, tracking_uri=pg_uri)
    assert found.version == 1 and folder_contents(local) == folder_contents(folder)
    assert mlflow.lightgbm.load_model(first.booster_uri).num_trees() == 5

    # the rows are really in PostgreSQL
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{DATABASE}") as conn:
        rows = conn.execute(
            "SELECT alias, version FROM registered_model_aliases WHERE name = 'chronorisk-pg' ORDER BY alias"
        ).fetchall()
    assert rows == [("challenger", 2), ("champion", 1)]


def test_wrong_password_or_database_is_a_clear_error(pg_uri, paths):
    from chronorisk.errors import ChronoriskError

    with pytest.raises(ChronoriskError, match=r"cannot connect to the database") as info:
        tracking.configure_tracking(
            paths, uri="postgresql+psycopg://postgres:hunter2@127.0.0.1:5432/chronorisk_no_such_db"
        )
    assert "hunter2" not in str(info.value)
