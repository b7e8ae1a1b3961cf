"""The model registry: one registered model per task, versions carrying the whole bundle.

`chronorisk-<task>` holds every registered version of a task's model; the
aliases `challenger` (the latest trained) and `champion` (what serving
loads) point at versions. MLflow 3 uses aliases, not stages. Each version is
a pyfunc model whose `bundle` artifact is the model bundle folder (booster,
calibrator, feature spec, task, metadata), so serving and federated code
load it with `ModelBundle.load` and no training code; the run that logged it
also holds the plain LightGBM booster (`booster`) for MLflow's own tooling.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chronorisk.errors import ChronoriskError
from chronorisk.training.pyfunc import BUNDLE_ARTIFACT
from chronorisk.training.tracking import Tracking, connect, redact, resolve_tracking_uri

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from chronorisk.models.bundle import ModelBundle
    from chronorisk.paths import WorkPaths

log = logging.getLogger(__name__)

MODEL_PREFIX = "chronorisk-"
CHAMPION = "champion"
CHALLENGER = "challenger"
_MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
_RUNTIME_PACKAGES = ("lightgbm", "numpy", "pandas", "polars", "pyarrow", "scikit-learn", "pydantic", "mlflow")
_COMPLETE = ".complete"


def registered_name(task: str) -> str:
    """`chronorisk-<task>`: the registered model of a task."""
    return f"{MODEL_PREFIX}{task}"


@dataclass(frozen=True)
class RegisteredBundle:
    """One registered version of a task's model."""

    task: str
    name: str
    version: int
    run_id: str | None
    model_uri: str
    aliases: tuple[str, ...] = ()
    booster_uri: str | None = None

    @classmethod
    def from_version(cls, task: str, mv: ModelVersion) -> RegisteredBundle:
        return cls(
            task=task,
            name=mv.name,
            version=int(mv.version),
            run_id=mv.run_id,
            model_uri=mv.source,
            aliases=tuple(mv.aliases or ()),
        )


def _requirements() -> list[str]:
    """Pinned runtime packages of the pyfunc model (given, so MLflow need not infer them)."""
    pins = []
    for package in _RUNTIME_PACKAGES:
        try:
            pins.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def register_bundle(
    tracking: Tracking,
    bundle_dir: Path,
    *,
    task: str,
    booster: Any | None = None,
    alias: str | None = CHALLENGER,
    tags: dict[str, Any] | None = None,
    description: str | None = None,
) -> RegisteredBundle:
    """Log the bundle folder (and the booster) in the active run and register it as a new version.

    Opens a run of its own when none is active. `alias` (default
    `challenger`) is moved to the new version; `champion` only moves through
    `promote`.
    """
    import mlflow

    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise ChronoriskError(f"bundle folder {bundle_dir} does not exist")
    _point_at(tracking)
    name = registered_name(task)
    version_tags = {"chronorisk.task": task, **{k: str(v) for k, v in (tags or {}).items()}}
    own_run = mlflow.active_run() is None
    run = mlflow.start_run(experiment_id=tracking.experiment_id, run_name=f"register-{task}") if own_run else None
    try:
        active = mlflow.active_run()
        with warnings.catch_warnings():
            # no input example on purpose: an example row would be a patient's features
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            info = _log_pyfunc(bundle_dir, task)
        booster_uri = None
        if booster is not None:
            booster_uri = mlflow.lightgbm.log_model(
                booster, name="booster", pip_requirements=_requirements()
            ).model_uri
        client = tracking.client()
        _ensure_registered_model(client, name, task)
        mv = client.create_model_version(
            name,
            source=info.model_uri,
            run_id=active.info.run_id,
            tags=version_tags,
            description=description,
            model_id=info.model_id,
        )
    except BaseException:
        if run is not None:
            mlflow.end_run("FAILED")
        raise
    if run is not None:
        mlflow.end_run()
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    log.info("registered %s version %s%s", name, mv.version, f" as {alias}" if alias else "")
    found = RegisteredBundle.from_version(task, client.get_model_version(name, mv.version))
    return dataclasses.replace(found, booster_uri=booster_uri)


def _log_pyfunc(bundle_dir: Path, task: str):
    import mlflow

    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(_MODEL_CODE),
        artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
        pip_requirements=_requirements(),
        metadata={"task": task},
        signature=_signature(bundle_dir),
    )


def _signature(bundle_dir: Path):
    """Input: the bundle's feature columns (float, nullable: null = not recorded); output: the risk.

    Read from the bundle's `bundle.json`; None (no signature) when it lists no feature names.
    """
    import json

    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    try:
        names = json.loads((bundle_dir / "bundle.json").read_text()).get("feature_names") or []
    except (OSError, ValueError, AttributeError):
        return None
    if not names:
        return None
    return ModelSignature(
        inputs=Schema([ColSpec("double", str(n), required=False) for n in names]),
        outputs=Schema([ColSpec("double")]),
    )


def _point_at(tracking: Tracking) -> None:
    import mlflow

    if mlflow.get_tracking_uri() != tracking.uri:
        mlflow.set_tracking_uri(tracking.uri)
    mlflow.set_registry_uri(tracking.uri)


def _ensure_registered_model(client, name: str, task: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name,
            tags={"chronorisk.task": task},
            description=f"chronorisk risk model for task {task}; aliases: champion (served), challenger (latest)",
        )


def get_version_by_alias(tracking: Tracking, task: str, alias: str) -> RegisteredBundle | None:
    """The version the alias points at, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        mv = tracking.client().get_model_version_by_alias(registered_name(task), alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
    return RegisteredBundle.from_version(task, mv)


def get_version(tracking: Tracking, task: str, version: int) -> RegisteredBundle:
    """A version by number; a clear error when there is no such version."""
    from mlflow.exceptions import MlflowException

    try:
        mv = tracking.client().get_model_version(registered_name(task), str(version))
    except MlflowException:
        raise ChronoriskError(
            f"--version: model {registered_name(task)} has no version {version} in {redact(tracking.uri)}"
        ) from None
    return RegisteredBundle.from_version(task, mv)


def list_versions(tracking: Tracking, task: str) -> list[RegisteredBundle]:
    """Every version of the task's model, oldest first."""
    client = tracking.client()
    found = client.search_model_versions(f"name = '{registered_name(task)}'")
    return sorted((RegisteredBundle.from_version(task, mv) for mv in found), key=lambda r: r.version)


def set_alias(tracking: Tracking, task: str, alias: str, version: int) -> None:
    """Point `alias` at `version` of the task's model (moving it from wherever it was)."""
    tracking.client().set_registered_model_alias(registered_name(task), alias, str(version))


def resolve(tracking: Tracking, task: str, *, alias: str | None = None, version: int | None = None) -> RegisteredBundle:
    """A version by number, or else by alias; a clear error when neither finds one."""
    if version is not None:
        return get_version(tracking, task, version)
    alias = alias or CHAMPION
    found = get_version_by_alias(tracking, task, alias)
    if found is None:
        raise ChronoriskError(
            f"model {registered_name(task)} has no version with alias {alias!r} in {redact(tracking.uri)}"
            + ("; run `chronorisk promote` first" if alias == CHAMPION else "; run `chronorisk train` first")
        )
    return found


def download_bundle(tracking: Tracking, registered: RegisteredBundle, cache_dir: Path) -> Path:
    """The bundle folder of a registered version, downloaded once into `cache_dir` and reused.

    The cache key is the logged model (or run) behind the version, so two
    backends with the same version numbers never share a folder; a folder is
    used only once its download completed.
    """
    import mlflow

    key = registered.model_uri.rsplit("/", 1)[-1] or f"{registered.run_id}-{registered.version}"
    target = Path(cache_dir) / registered.name / _safe(key)
    if (target / _COMPLETE).is_file():
        return _bundle_dir(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        # the version's own artifact location: a `models:/` URI would be resolved against the
        # process-wide registry URI, whatever `tracking` says
        source = tracking.client().get_model_version_download_uri(registered.name, str(registered.version))
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=tracking.uri)
        )
        _bundle_dir(local, registered)
        (local / _COMPLETE).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        local.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _bundle_dir(target)


def _bundle_dir(model_dir: Path, registered: RegisteredBundle | None = None) -> Path:
    """The bundle folder inside a downloaded pyfunc model, as its MLmodel file names it."""
    from mlflow.models import Model

    try:
        flavor = Model.load(str(model_dir)).flavors.get("python_function", {})
        found = model_dir / flavor["artifacts"][BUNDLE_ARTIFACT]["path"]
    except Exception:
        found = None
    if found is None or not found.is_dir():
        what = f"model {registered.name} version {registered.version}" if registered else str(model_dir)
        raise ChronoriskError(f"{what} carries no bundle folder; was it registered by chronorisk?")
    return found


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def bundle_cache(paths: WorkPaths) -> Path:
    """Where registered bundles are downloaded: `<work>/mlflow/cache/`."""
    return Path(paths.mlflow_dir) / "cache"


def load_bundle(
    task: str,
    alias: str | None = CHAMPION,
    *,
    version: int | None = None,
    paths: WorkPaths | None = None,
    tracking_uri: str | None = None,
    tracking: Tracking | None = None,
) -> ModelBundle:
    """The `ModelBundle` of a registered version (by `version`, else by `alias`, default champion).

    Downloads the version's artifacts into the work folder's cache on first
    use. `tracking` (already configured) wins; else `tracking_uri`, else the
    work folder's embedded backend.
    """
    from chronorisk.models.bundle import ModelBundle

    bundle_dir, _ = fetch_bundle(task, alias, version=version, paths=paths, tracking_uri=tracking_uri,
                                 tracking=tracking)
    return ModelBundle.load(bundle_dir)


def fetch_bundle(
    task: str,
    alias: str | None = CHAMPION,
    *,
    version: int | None = None,
    paths: WorkPaths | None = None,
    tracking_uri: str | None = None,
    tracking: Tracking | None = None,
) -> tuple[Path, RegisteredBundle]:
    """The local bundle folder of a registered version and which version it is (see `load_bundle`)."""
    from chronorisk.paths import WorkPaths, default_work_dir

    paths = paths or WorkPaths(default_work_dir())
    if tracking is None:
        tracking = connect(resolve_tracking_uri(paths, tracking_uri))
    registered = resolve(tracking, task, alias=alias, version=version)
    return download_bundle(tracking, registered, bundle_cache(paths)), registered
