"""MLflow tracking: where runs go, and how chronorisk logs to them.

Embedded by default (a SQLite file and local artifacts under the work
folder), so nothing has to be installed; `--tracking-uri` (or
`train.tracking_uri` in params.yaml) points at a tracking server or a
database such as PostgreSQL when a team outgrows the file. Telemetry stays
off and nothing logged carries a patient identifier: runs hold parameters,
aggregate metrics, the HTML report, the model card and the fitted feature
spec (code vocabulary and display names), never feature rows.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from chronorisk.errors import ChronoriskError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from chronorisk.paths import WorkPaths

log = logging.getLogger(__name__)

SERVER_SCHEMES = ("http", "https")
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
TAG_PREFIX = "chronorisk."
_PARAM_VALUE_MAX = 6000  # MLflow's limit on a parameter value


def default_tracking_uri(paths: WorkPaths) -> str:
    """The embedded backend: `sqlite:///<work>/mlflow/mlflow.db`."""
    return f"sqlite:///{paths.mlflow_dir.resolve() / 'mlflow.db'}"


def resolve_tracking_uri(paths: WorkPaths, override: str | None = None, configured: str | None = None) -> str:
    """`--tracking-uri` wins, then params.yaml's `train.tracking_uri`, then the embedded default.

    `MLFLOW_TRACKING_URI` is deliberately not read: `configure_environment`
    sets it for the tools chronorisk starts, and a value inherited from
    another work folder must not send runs there.
    """
    for source, uri in (("--tracking-uri", override), ("train.tracking_uri", configured)):
        if uri is None:
            continue
        uri = uri.strip()
        scheme = _scheme(uri)
        if scheme not in SERVER_SCHEMES + DATABASE_SCHEMES + ("file",):
            raise ChronoriskError(
                f"{source}: scheme {scheme or '(none)'!r} is not supported; use http(s)://host:port for a "
                "tracking server, or a database URL (sqlite:///..., postgresql+psycopg://user@host/db)"
            )
        return uri
    return default_tracking_uri(paths)


def redact(uri: str) -> str:
    """The URI without a password, for messages and tags."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else "***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def _scheme(uri: str) -> str:
    return urlsplit(uri).scheme.split("+", 1)[0].lower()


def is_server(uri: str) -> bool:
    """True when the URI names a tracking server (artifacts are then the server's business)."""
    return _scheme(uri) in SERVER_SCHEMES


@dataclass(frozen=True)
class Tracking:
    """A configured MLflow backend and the experiment chronorisk's runs go to."""

    uri: str
    experiment_id: str
    experiment_name: str
    artifact_location: str | None

    def client(self) -> MlflowClient:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


def quiet_mlflow() -> None:
    """Telemetry and progress bars off; MLflow's info chatter down to warnings."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def configure_tracking(
    paths: WorkPaths, *, uri: str | None = None, experiment: str = "chronorisk"
) -> Tracking:
    """Point MLflow at the backend and make sure the experiment exists.

    With the embedded SQLite backend (or any database URL) the experiment's
    artifacts live under `<work>/mlflow/artifacts`; with a server they are
    wherever the server keeps them. Sets the process-wide tracking and
    registry URIs, so call it once, at the entry point.
    """
    import mlflow

    quiet_mlflow()
    uri = uri or default_tracking_uri(paths)
    if _scheme(uri) == "sqlite":
        Path(paths.mlflow_dir).mkdir(parents=True, exist_ok=True)
    artifact_location = None if is_server(uri) else Path(paths.mlflow_artifacts).resolve().as_uri()
    check_database(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # tools started from here agree
    try:
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            experiment_id = client.create_experiment(experiment, artifact_location=artifact_location)
            found = client.get_experiment(experiment_id)
        elif found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
    except Exception as exc:  # connection refused, bad credentials, missing database...
        raise ChronoriskError(
            f"MLflow tracking URI {redact(uri)}: cannot open the experiment {experiment!r} "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    return Tracking(
        uri=uri,
        experiment_id=found.experiment_id,
        experiment_name=experiment,
        artifact_location=found.artifact_location,
    )


def connect(uri: str) -> Tracking:
    """A read-only handle on a backend (registry look-ups, downloads): no experiment, no globals.

    Refuses an embedded SQLite file that does not exist rather than creating
    an empty registry in the wrong place.
    """
    quiet_mlflow()
    check_database(uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise ChronoriskError(
                f"MLflow tracking URI {redact(uri)}: no registry there yet (run `chronorisk train` first)"
            )
    return Tracking(uri=uri, experiment_id="", experiment_name="", artifact_location=None)


def check_database(uri: str, timeout_s: int = 5) -> None:
    """Fail fast on a database backend that cannot be reached.

    MLflow itself retries a failed connection ten times with back-off
    (about 100 s) before it gives up; a typo in `--tracking-uri` should not
    cost that.
    """
    scheme = _scheme(uri)
    if scheme not in DATABASE_SCHEMES or scheme == "sqlite":
        return
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": timeout_s})
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as exc:
        raise ChronoriskError(
            f"MLflow tracking URI {redact(uri)}: cannot connect to the database "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


@contextlib.contextmanager
def start_run(
    tracking: Tracking, *, name: str, tags: Mapping[str, str] | None = None, run_id: str | None = None
) -> Iterator[Run]:
    """A run in the chronorisk experiment (or the existing `run_id`, reopened), ended on exit.

    A failure inside marks the run FAILED, so an aborted training never
    looks like a finished one.
    """
    import mlflow

    kwargs: dict[str, Any] = {"run_id": run_id} if run_id else {
        "experiment_id": tracking.experiment_id,
        "run_name": name,
    }
    all_tags = {f"{TAG_PREFIX}{k}" if not k.startswith(("mlflow.", TAG_PREFIX)) else k: str(v)
                for k, v in (tags or {}).items()}
    with mlflow.start_run(tags=all_tags or None, **kwargs) as run:
        yield run


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def log_params(values: Mapping[str, Any], prefix: str = "") -> None:
    """Log (nested) parameters as dotted keys; long values are cut to MLflow's limit."""
    import mlflow

    flat = {k: _param_text(v) for k, v in flatten(values, prefix).items()}
    items = sorted(flat.items())
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        mlflow.log_params(dict(items[start : start + 100]))


def _param_text(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= _PARAM_VALUE_MAX else text[: _PARAM_VALUE_MAX - 3] + "..."


def finite_metrics(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) mapping as dotted metric names; the rest dropped."""
    out: dict[str, float] = {}
    for key, value in flatten(values, prefix).items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(float(value)):
            out[_metric_name(key)] = float(value)
    return out


def _metric_name(key: str) -> str:
    """MLflow accepts letters, digits, `_ - . / :` and spaces in names; map anything else to `_`."""
    return "".join(ch if ch.isalnum() or ch in "_-./: " else "_" for ch in key)


def log_metrics(values: Mapping[str, Any], prefix: str = "", step: int | None = None) -> dict[str, float]:
    """Log the finite numbers of a (nested) mapping; returns what was logged."""
    import mlflow

    metrics = finite_metrics(values, prefix)
    if metrics:
        mlflow.log_metrics(metrics, step=step)
    return metrics


def log_files(files: Iterable[tuple[Path | None, str | None]]) -> None:
    """Log each existing `(file, artifact folder)`; missing files (an optional report) are skipped."""
    import mlflow

    for path, artifact_path in files:
        if path is not None and Path(path).is_file():
            mlflow.log_artifact(str(path), artifact_path=artifact_path or None)
