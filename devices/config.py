"""Typed configuration of the device stream (`stream:` in params.yaml)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StreamConfig(BaseModel):
    """The MQTT broker, the consumer's micro-batches and alert damping."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    topic_prefix: str = Field("chronorisk", description="topics: <prefix>/<site>/devices/<device-id>/observations")
    client_id: str = Field("chronorisk-stream", description="the consumer's persistent MQTT session")
    username: str | None = Field(None, description="MQTT user (password from password_env)")
    password_env: str = Field("CHRONORISK_MQTT_PASSWORD", description="env var holding the MQTT password")
    tls_ca: str | None = Field(None, description="CA file: connect with TLS")
    tls_cert: str | None = Field(None, description="client certificate (TLS client-certificate auth)")
    tls_key: str | None = Field(None, description="client certificate's key")
    session_expiry_s: int = Field(7 * 86_400, ge=60, description="how long the broker keeps the session offline")
    batch_max: int = Field(1000, ge=1, le=20_000, description="readings per micro-batch at most")
    batch_ms: int = Field(500, ge=1, le=60_000, description="a micro-batch closes this long after its first reading")
    alert_damping_hours: float = Field(24.0, ge=0, description="one alert per patient and task in this period")
    metrics_port: int = Field(9108, ge=0, le=65535, description="the consumer's /metrics port (0: none)")
    metrics_host: str = "127.0.0.1"
