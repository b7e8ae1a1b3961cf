"""`ModelBundle`: what is saved, registered and served for one task.

A bundle folder holds five files, written together (a temporary folder
renamed into place, so a reader never sees half a bundle):

| file | content |
|---|---|
| `booster.txt` | LightGBM model (text format); a logistic model has `linear.json` instead |
| `calibrator.json` | calibrator (Platt coefficients or isotonic thresholds) |
| `spec.json` | fitted `FeatureSpec`: which columns, in which order, how to show them |
| `task.yaml` | `TaskDefinition` the model predicts |
| `bundle.json` | metadata (name, version, trained_at, data fingerprint, feature names, tiers, |
| | library versions, metrics) and the SHA-256 of the other four files |

`load` checks every file and its checksum, and says which part is missing or
corrupt. `kind` (bundle.json `model_kind`) is `lightgbm` or `logistic`; the
logistic model (`models/logistic.py`) answers the booster methods used here,
so scoring and explanations are the same code for both.
Serving needs only this module (no training code): `predict_risk`,
`tier` and `explain` take a feature table (polars or pandas, extra columns
ignored, `spec.feature_names` selected in order).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from chronorisk.errors import ChronoriskError, InputError
from chronorisk.models.calibration import Calibrator, as_calibrator, calibrator_from_dict
from chronorisk.models.config import TierThresholds
from chronorisk.models.explain import Explainer
from chronorisk.models.site_calibration import SiteLayer, site_column
from chronorisk.models.tiers import tier_of

if TYPE_CHECKING:
    from chronorisk.features.spec import FeatureSpec
    from chronorisk.features.tasks import TaskDefinition
    from chronorisk.models.risk_model import RiskModel

BUNDLE_FORMAT = 1
FILES = ("booster.txt", "calibrator.json", "spec.json", "task.yaml")  # a lightgbm bundle's
MODEL_FILES = {"lightgbm": "booster.txt", "logistic": "linear.json"}
METADATA_FILE = "bundle.json"
SMALL_FRAME_ROWS = 16  # up to this many rows, a polars frame is read row-wise (one patient's request)


class BundleError(ChronoriskError):
    """A bundle folder that cannot be loaded: names the folder, the part and the problem."""


@dataclass
class ModelBundle:
    booster: object  # lightgbm.Booster
    calibrator: Calibrator
    spec: FeatureSpec
    task: TaskDefinition
    tiers: TierThresholds
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            self.calibrator = as_calibrator(self.calibrator)
        except ValueError as exc:
            raise BundleError(f"calibrator: {exc}") from None
        names = tuple(self.spec.feature_names)
        if self.booster.num_feature() != len(names):
            raise BundleError(
                f"booster has {self.booster.num_feature()} features, the feature spec has {len(names)}"
            )
        self.metadata.setdefault("feature_names", list(names))
        self.metadata.setdefault("model_kind", "logistic" if _is_linear(self.booster) else "lightgbm")
        self._explainer: Explainer | None = None
        self._layouts: dict = {}

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def from_model(
        cls,
        model: RiskModel,
        spec: FeatureSpec,
        task: TaskDefinition,
        tiers: TierThresholds,
        *,
        version: str | int = "0",
        name: str | None = None,
        data_fingerprint: str | None = None,
        metrics: Mapping | None = None,
        extra: Mapping | None = None,
    ) -> ModelBundle:
        """A bundle from a fitted, calibrated `RiskModel` whose feature names are the spec's."""
        if tuple(model.feature_names_) != tuple(spec.feature_names):
            raise BundleError("the model was trained on other columns than the feature spec lists")
        if not hasattr(model, "calibrator_"):
            raise BundleError("the model has no calibrator: fit it (or fit_calibration) before bundling")
        metadata = {
            "name": name or f"chronorisk-{task.name}",
            "version": str(version),
            "task": task.name,
            "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "data_fingerprint": data_fingerprint,
            "model_kind": getattr(model, "kind_", "lightgbm"),
            "model_selection": getattr(model, "selection_", None),
            "n_trees": int(model.booster_.num_trees()),
            "best_iteration": int(getattr(model, "best_iteration_", 0) or 0),
            f"{getattr(model, 'kind_', 'lightgbm')}_params": {
                k: v for k, v in getattr(model, "params_", {}).items() if _jsonable(v)
            },
            "calibration": getattr(model.calibrator_, "info", {}),
            "tuning_trials": list(getattr(model, "tuning_trials_", []) or []),
            "metrics": dict(metrics or {}),
            **dict(extra or {}),
        }
        return cls(model.booster_, model.calibrator_, spec, task, tiers, metadata)

    # ---- scoring -----------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """`lightgbm` or `logistic`: what `booster` is."""
        return str(self.metadata.get("model_kind") or "lightgbm")

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(self.spec.feature_names)

    @property
    def name(self) -> str:
        return str(self.metadata.get("name") or f"chronorisk-{self.task.name}")

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", "0"))

    def matrix(self, features: object) -> np.ndarray:
        """The model's columns of `features` (polars, pandas or an ordered numpy array) as float64."""
        names = self.feature_names
        if isinstance(features, np.ndarray):
            M = features
        elif hasattr(features, "rows") and hasattr(features, "height") and 0 < features.height <= SMALL_FRAME_ROWS:
            M = self._small_polars_matrix(features)
        elif hasattr(features, "columns") and hasattr(features, "to_numpy"):
            present = set(features.columns)
            missing = [n for n in names if n not in present]
            if missing:
                shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
                raise InputError("features", f"{len(missing)} column(s) the model needs are missing: {shown}")
            if hasattr(features, "select"):  # polars
                M = features.select(list(names)).to_numpy()
            else:  # pandas
                M = features[list(names)].to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            raise InputError("features", f"expected a polars or pandas DataFrame, got {type(features).__name__}")
        try:
            M = np.ascontiguousarray(M, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError("features", "every model column must be numeric (null for not recorded)") from None
        if M.ndim != 2 or M.shape[1] != len(names):
            raise InputError("features", f"expected {len(names)} columns, got shape {M.shape}")
        if np.isinf(M).any():
            raise InputError("features", "infinite values (use null for not recorded)")
        return M

    def _small_polars_matrix(self, features: object) -> np.ndarray:
        """A few rows of a polars frame, read row-wise: selecting 400 columns costs more than scoring.

        The model columns' positions are cached per column layout, so one
        patient's request does no per-column work after the first; a value
        that is not a number fails the float conversion.
        """
        import operator

        key = tuple(features.columns)
        getter = self._layouts.get(key)
        if getter is None:
            position = {c: i for i, c in enumerate(key)}
            missing = [n for n in self.feature_names if n not in position]
            if missing:
                shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
                raise InputError("features", f"{len(missing)} column(s) the model needs are missing: {shown}")
            getter = operator.itemgetter(*(position[n] for n in self.feature_names))
            if len(self.feature_names) == 1:
                single = getter
                getter = lambda row: (single(row),)  # noqa: E731
            if len(self._layouts) > 32:
                self._layouts.clear()
            self._layouts[key] = getter
        try:
            return np.array([getter(row) for row in features.rows()], dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError("features", "every model column must be numeric (null for not recorded)") from None

    def predict_raw(self, features: object) -> np.ndarray:
        M = self.matrix(features)
        if M.shape[0] == 0:
            return np.zeros(0)
        if M.shape[0] < 256:  # a few rows: one thread, no OpenMP start-up
            return self.booster.predict(M, raw_score=True, num_threads=1)
        return self.booster.predict(M, raw_score=True)

    def predict_risk(self, features: object, site: object = None) -> np.ndarray:
        """Calibrated risk of every row, recalibrated for its site when the bundle has a site layer.

        `site`: one site for every row, or one per row; by default the table's own `site` column (none:
        the global calibration). See `models/site_calibration.py`.
        """
        risk = self.calibrator.predict(self.predict_raw(features))
        layer = self.site_layer
        if not layer.sites:
            return risk
        return layer.apply(risk, site if site is not None else site_column(features))

    @property
    def site_layer(self) -> SiteLayer:
        """The per-site recalibrations stored with the model (metadata `site_calibration`), read once."""
        raw = self.metadata.get("site_calibration")
        if getattr(self, "_site_layer_of", self) is not raw:  # the bundle itself: never read yet
            self._site_layer, self._site_layer_of = SiteLayer.from_dict(raw), raw
        return self._site_layer

    def with_site_layer(self, layer: SiteLayer, *, version: str | int) -> ModelBundle:
        """The same model with `layer` as its per-site recalibration: a new version, to promote like any."""
        metadata = {**self.metadata, "site_calibration": layer.to_dict(), "version": str(version)}
        return ModelBundle(self.booster, self.calibrator, self.spec, self.task, self.tiers, metadata)

    def tier(self, risk: object) -> np.ndarray:
        """'low' / 'medium' / 'high' for each risk, from the bundle's thresholds."""
        return tier_of(risk, self.tiers)

    @property
    def explainer(self) -> Explainer:
        if self._explainer is None:
            self._explainer = Explainer(self.booster, self.feature_names, self.spec.features)
        return self._explainer

    def explain(self, features: object, top_k: int = 5, prediction_time: object = None) -> list[list[dict]]:
        """Per row the top-k factors (see `chronorisk.models.explain`).

        Dates need the prediction time: the frame's `prediction_time` column,
        else `prediction_time` (one value or one per row); without either the
        factors carry no dates.
        """
        M = self.matrix(features)
        if M.shape[0] == 0:
            return []
        when = prediction_time
        columns = getattr(features, "columns", None)
        if when is None and columns is not None and "prediction_time" in columns:
            when = features["prediction_time"]
        return self.explainer.factors(M, when, top_k)

    def contributions(self, features: object) -> np.ndarray:
        """(n, p + 1) TreeSHAP contributions in log-odds (last column: expected value)."""
        return self.explainer.contributions(self.matrix(features))

    # ---- persistence -------------------------------------------------------------------
    def save(self, directory: Path | str) -> Path:
        """Write the bundle folder atomically (replacing an older bundle at `directory`)."""
        import lightgbm as lgb

        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        contents = {
            MODEL_FILES[self.kind]: self.booster.model_to_string(),
            "calibrator.json": json.dumps(self.calibrator.to_dict(), indent=1),
            "spec.json": self.spec.to_json(),
            "task.yaml": self.task.to_yaml(),
        }
        metadata = {
            **self.metadata,
            "bundle_format": BUNDLE_FORMAT,
            "name": self.name,
            "version": self.version,
            "task": self.task.name,
            "feature_names": list(self.feature_names),
            "tiers": self.tiers.model_dump(),
            "calibration_method": self.calibrator.method,
            "versions": {
                **dict(self.metadata.get("versions") or {}),
                **({"lightgbm": lgb.__version__} if self.kind == "lightgbm" else {}),
                "numpy": np.__version__,
                "chronorisk": _package_version(),
                "python": platform.python_version(),
            },
            "checksums": {name: _sha256(text.encode()) for name, text in contents.items()},
        }
        contents[METADATA_FILE] = json.dumps(metadata, indent=1, default=str)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            for name, text in contents.items():
                (tmp / name).write_text(text, encoding="utf-8")
            _replace_dir(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self.metadata = {k: v for k, v in metadata.items() if k != "checksums"}
        return target

    @classmethod
    def load(cls, directory: Path | str) -> ModelBundle:
        """Read a bundle folder; `BundleError` names the part that is missing or corrupt."""
        import lightgbm as lgb

        from chronorisk.features.spec import FeatureSpec
        from chronorisk.features.tasks import TaskDefinition

        folder = Path(directory)
        if not folder.is_dir():
            raise BundleError(f"model bundle {folder}: no such folder")
        kind = _kind_on_disk(folder)
        files = (MODEL_FILES[kind], *FILES[1:])
        missing = [n for n in (*files, METADATA_FILE) if not (folder / n).is_file()]
        if missing:
            raise BundleError(f"model bundle {folder}: missing {', '.join(missing)}")
        texts = {}
        for name in (*files, METADATA_FILE):
            try:
                texts[name] = (folder / name).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise BundleError(f"model bundle {folder}: {name} cannot be read ({type(exc).__name__})") from None
        try:
            metadata = json.loads(texts[METADATA_FILE])
        except json.JSONDecodeError as exc:
            raise BundleError(f"model bundle {folder}: {METADATA_FILE} is not valid JSON ({exc.msg})") from None
        if not isinstance(metadata, dict):
            raise BundleError(f"model bundle {folder}: {METADATA_FILE} must be a JSON object")
        if metadata.get("bundle_format") != BUNDLE_FORMAT:
            raise BundleError(
                f"model bundle {folder}: bundle_format {metadata.get('bundle_format')!r} is not supported "
                f"(expected {BUNDLE_FORMAT})"
            )
        checksums = metadata.pop("checksums", None) or {}
        for name in files:
            expected = checksums.get(name)
            if expected is None:
                raise BundleError(f"model bundle {folder}: {METADATA_FILE} has no checksum for {name}")
            if _sha256(texts[name].encode()) != expected:
                raise BundleError(f"model bundle {folder}: {name} is corrupt (checksum mismatch)")
        booster = _read_model(folder, kind, texts[MODEL_FILES[kind]], lgb)
        try:
            calibrator = calibrator_from_dict(json.loads(texts["calibrator.json"]))
        except (json.JSONDecodeError, ValueError) as exc:
            raise BundleError(f"model bundle {folder}: calibrator.json: {exc}") from None
        try:
            spec = FeatureSpec.from_json(texts["spec.json"], source="spec.json")
            task = TaskDefinition.from_yaml(texts["task.yaml"], source="task.yaml")
        except InputError as exc:
            raise BundleError(f"model bundle {folder}: {exc}") from None
        try:
            tiers = TierThresholds.model_validate(metadata.get("tiers") or {})
        except ValueError as exc:
            raise BundleError(f"model bundle {folder}: {METADATA_FILE} tiers: {exc}") from None
        if list(metadata.get("feature_names") or []) != list(spec.feature_names):
            raise BundleError(f"model bundle {folder}: feature names in {METADATA_FILE} differ from spec.json")
        try:
            SiteLayer.from_dict(metadata.get("site_calibration"))
        except ValueError as exc:
            raise BundleError(f"model bundle {folder}: {METADATA_FILE} site_calibration: {exc}") from None
        return cls(booster, calibrator, spec, task, tiers, metadata)


def _is_linear(model: object) -> bool:
    from chronorisk.models.logistic import LinearModel

    return isinstance(model, LinearModel)


def _kind_on_disk(folder: Path) -> str:
    """`logistic` when the folder holds the logistic model's file and no booster, else `lightgbm`."""
    if (folder / MODEL_FILES["logistic"]).is_file() and not (folder / MODEL_FILES["lightgbm"]).is_file():
        return "logistic"
    return "lightgbm"


def _read_model(folder: Path, kind: str, text: str, lgb) -> object:
    if kind == "logistic":
        from chronorisk.models.logistic import LinearModel

        try:
            return LinearModel.from_string(text)
        except (ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"model bundle {folder}: linear.json is not a logistic model ({exc})") from None
    try:
        return lgb.Booster(model_str=text)
    except Exception as exc:  # lightgbm.basic.LightGBMError and parse failures
        raise BundleError(f"model bundle {folder}: booster.txt is not a LightGBM model ({exc})") from None


def data_fingerprint(frame: object, columns: list[str] | None = None) -> str:
    """SHA-256 of a table's column names, types and values (row order matters), as 'sha256:<hex>'.

    Identifies the training data in the bundle and MLflow without storing it;
    no value can be read back from it.
    """
    import polars as pl

    df = frame if isinstance(frame, pl.DataFrame) else pl.from_pandas(frame)
    if columns is not None:
        df = df.select(columns)
    h = hashlib.sha256()
    h.update(json.dumps([[c, str(t)] for c, t in df.schema.items()] + [df.height]).encode())
    for name in df.columns:
        s = df[name]
        if s.dtype.is_numeric() or s.dtype == pl.Boolean:
            arr = s.cast(pl.Float64).fill_null(np.nan).to_numpy()
            h.update(np.ascontiguousarray(arr).tobytes())
        elif s.dtype.is_temporal():
            arr = s.to_physical().cast(pl.Int64).fill_null(-(2**63)).to_numpy()
            h.update(np.ascontiguousarray(arr).tobytes())
        else:
            h.update("\x1f".join("\x00" if v is None else str(v) for v in s.to_list()).encode())
    return "sha256:" + h.hexdigest()


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move `tmp` to `target`; an existing `target` is swapped out first and removed after."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _jsonable(value: object) -> bool:
    return isinstance(value, str | int | float | bool) or value is None


def _package_version() -> str:
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        return version("chronorisk")
    return "unknown"
