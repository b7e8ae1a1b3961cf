"""Fixtures of the model tests: one small model trained once per session on hand-made data."""

from __future__ import annotations

import pytest
from models_support import NAMES, make_data, make_spec, small_config

from chronorisk.models.risk_model import RiskModel


@pytest.fixture(scope="session")
def data():
    return {"train": make_data(6000, 0), "valid": make_data(3000, 1), "test": make_data(3000, 2)}


@pytest.fixture(scope="session")
def fitted(data) -> RiskModel:
    X, y, _ = data["train"]
    Xv, yv, _ = data["valid"]
    return RiskModel(small_config()).fit(X, y, Xv, yv, NAMES)


@pytest.fixture(scope="session")
def spec():
    return make_spec()


@pytest.fixture(scope="session")
def task():
    from chronorisk.features.tasks import load_task

    return load_task("complication_1y")
