"""Reading params.yaml: its raw content, and one section validated alone.

`chronorisk.config.load_params` validates the whole file (`Params`); a command that reads one section only
(`PARAMS_SECTION` of its module: `chronorisk ingest`) gets `load_section`, which imports and builds that
section's model only (not `chronorisk.config`, which builds them all: ~0.03 s of a command's start-up) and
still refuses an unknown top-level key, naming it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from chronorisk.errors import ConfigError

# section of params.yaml -> (module, model) of its typed model, for `load_section` (which imports only the one
# it reads); tests/test_skeleton.py checks that it names every field of `chronorisk.config.Params` with its model.
SECTIONS: dict[str, tuple[str, str]] = {
    "generate": ("chronorisk.data.config", "GenerateConfig"),
    "ingest": ("chronorisk.data.config", "IngestConfig"),
    "labels": ("chronorisk.features.config", "LabelConfig"),
    "features": ("chronorisk.features.config", "FeatureConfig"),
    "model": ("chronorisk.models.config", "ModelConfig"),
    "train": ("chronorisk.training.config", "TrainConfig"),
    "evaluate": ("chronorisk.training.config", "EvaluateConfig"),
    "promote": ("chronorisk.training.config", "PromoteConfig"),
    "federated": ("chronorisk.federated.config", "FederatedConfig"),
    "serve": ("chronorisk.serving.config", "ServeConfig"),
    "monitor": ("chronorisk.serving.config", "MonitorConfig"),
    "stream": ("chronorisk.devices.config", "StreamConfig"),
}


def raw_params(path: Path) -> dict:
    """The content of params.yaml as parsed YAML (ConfigError naming the file if it is not YAML)."""
    try:
        # the C parser when PyYAML has it (the same safe constructors, ~10x faster than the pure-Python one)
        return yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None


def problems(exc: ValidationError, prefix: tuple = ()) -> str:
    """A validation error's problems on one line, each naming its key (`section.key: message`)."""
    return "; ".join(f"{'.'.join(str(p) for p in (*prefix, *err['loc']))}: {err['msg']}" for err in exc.errors())


def load_section(path: Path | None, name: str) -> BaseModel:
    """One section of params.yaml (its defaults when `path` is None or missing, or the section absent), validated
    alone, as `load_params(path).<name>` would be; an unknown top-level key is refused as by `load_params`, and
    errors name the key."""
    module, model_name = SECTIONS[name]
    model = getattr(importlib.import_module(module), model_name)
    if path is None or not Path(path).is_file():
        return model()
    raw = raw_params(path)
    if not isinstance(raw, dict):  # (Params says what is wrong)
        from chronorisk.config import load_params

        return getattr(load_params(path), name)
    unknown = [key for key in raw if key not in SECTIONS]
    if unknown:
        raise ConfigError(f"{path}: " + "; ".join(f"{key}: Extra inputs are not permitted" for key in unknown))
    if name not in raw:
        return model()
    try:
        return model.model_validate(raw[name])
    except ValidationError as exc:
        raise ConfigError(f"{path}: {problems(exc, (name,))}") from None


class SectionParams:
    """What a command that reads one section of params.yaml gets as `ctx.params`: that section, as
    `params.<section>`."""

    def __init__(self, name: str, section: BaseModel):
        self.section_name = name
        setattr(self, name, section)
