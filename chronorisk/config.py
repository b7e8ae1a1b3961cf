"""Typed project configuration: params.yaml parsed once, at the entry point.

Each stage owns its section's model (in its own package); this module only
composes them, so a typo in params.yaml fails at start-up naming the key.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chronorisk.data.config import GenerateConfig, IngestConfig
from chronorisk.devices.config import StreamConfig
from chronorisk.errors import ConfigError
from chronorisk.features.config import FeatureConfig, LabelConfig
from chronorisk.federated.config import FederatedConfig
from chronorisk.models.config import ModelConfig
from chronorisk.serving.config import MonitorConfig, ServeConfig
from chronorisk.training.config import EvaluateConfig, PromoteConfig, TrainConfig


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    labels: LabelConfig = Field(default_factory=LabelConfig)
    features: FeatureConfig = Field(default_factory=FeatureConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    federated: FederatedConfig = Field(default_factory=FederatedConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)


def load_params(path: Path | None) -> Params:
    """Parse params.yaml (defaults when `path` is None or missing); errors name the key."""
    if path is None or not Path(path).is_file():
        return Params()
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None
