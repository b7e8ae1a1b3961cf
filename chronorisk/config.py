"""Typed project configuration: params.yaml parsed once, at the entry point.

Each stage owns its section's model (in its own package); this module only
composes them, so a typo in params.yaml fails at start-up naming the key.
A command that reads one section only (`chronorisk ingest`) validates that
section alone (`chronorisk.params_file.load_section`, which does not import
this module: the other sections' models are not built, ~0.03 s of its
start-up) and still refuses an unknown section; a typo inside another section
is then named by the commands that read it.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chronorisk.data.config import GenerateConfig, IngestConfig
from chronorisk.devices.config import StreamConfig
from chronorisk.errors import ConfigError
from chronorisk.features.config import FeatureConfig, LabelConfig
from chronorisk.federated.config import FederatedConfig
from chronorisk.models.config import ModelConfig
from chronorisk.params_file import problems, raw_params
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
    raw = raw_params(path)
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {problems(exc)}") from None
