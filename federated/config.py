"""Typed configuration of federated training, parsed from params.yaml."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class FederatedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strategy: Literal["bagging", "cyclic"] = "bagging"
    rounds: int = Field(5, ge=1)
    trees_per_round: int = Field(40, ge=1)
    min_sites: int = Field(3, ge=1)
    round_timeout_s: float = Field(120.0, gt=0)
    superlink_port: int = 9092
