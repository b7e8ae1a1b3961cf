"""Typed configuration of scoring, serving and monitoring, parsed from params.yaml."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = 3000
    store_url: str | None = None
    max_payload_mb: float = 5.0
    small_cell: int = Field(10, ge=1)


class MonitorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    window: str = "week"
    drift_share_warning: float = Field(0.15, ge=0, le=1)
    drift_share_alert: float = Field(0.30, ge=0, le=1)
    prediction_drift_alert: bool = True
    min_window_rows: int = Field(200, ge=1)
