"""MQTT clients of the stream (paho-mqtt 2.x, MQTT 5): authentication, TLS and the anonymous check."""

from __future__ import annotations

import os
import secrets
import ssl
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from chronorisk.devices.config import StreamConfig
from chronorisk.errors import ChronoriskError, InputError


def password(cfg: StreamConfig) -> str | None:
    if cfg.username is None:
        return None
    value = os.environ.get(cfg.password_env)
    if not value:
        raise InputError(cfg.password_env, f"MQTT user {cfg.username!r} is configured but {cfg.password_env} "
                                           "(its password) is not set")
    return value


def check_auth(cfg: StreamConfig) -> None:
    """Username/password or a TLS client certificate must be configured (a demo may go without)."""
    if cfg.username is None and cfg.tls_cert is None:
        raise InputError("stream.username", "no MQTT authentication configured: set stream.username (password in "
                                            f"{cfg.password_env}) or stream.tls_cert/tls_key, or run with --demo")
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        raise InputError("stream.tls_key", "a TLS client certificate needs both tls_cert and tls_key")
    password(cfg)  # a configured user without its password fails here, before any connection


def make_client(cfg: StreamConfig, client_id: str, *, manual_ack: bool = False, anonymous: bool = False) -> mqtt.Client:
    """A paho client with the configured credentials (none when `anonymous`) and TLS."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                         manual_ack=manual_ack)
    if not anonymous and cfg.username is not None:
        client.username_pw_set(cfg.username, password(cfg))
    if cfg.tls_ca is not None:
        client.tls_set(ca_certs=cfg.tls_ca, certfile=None if anonymous else cfg.tls_cert,
                       keyfile=None if anonymous else cfg.tls_key)
    return client


def session_properties(cfg: StreamConfig, receive_maximum: int) -> Properties:
    """CONNECT properties of a persistent session: kept offline for a week, a window of unacked messages."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = cfg.session_expiry_s
    props.ReceiveMaximum = max(1, min(65535, receive_maximum))
    return props


def allows_anonymous(cfg: StreamConfig, timeout: float = 5.0) -> bool:
    """Whether the broker accepts a client without credentials (which could then publish readings)."""
    client = make_client(cfg, f"chronorisk-probe-{secrets.token_hex(4)}", anonymous=True)
    done = threading.Event()
    outcome: dict[str, bool] = {}

    def on_connect(_c, _u, _flags, reason_code, _props):
        outcome["accepted"] = not reason_code.is_failure
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = lambda *_: done.set()
    try:
        client.connect(cfg.host, cfg.port, keepalive=10)
    except ssl.SSLError:
        return False  # the TLS handshake refused a client without a certificate
    except OSError as exc:
        raise ChronoriskError(f"MQTT broker {cfg.host}:{cfg.port} unreachable ({type(exc).__name__})") from None
    client.loop_start()
    try:
        if not done.wait(timeout):
            return False
        return outcome.get("accepted", False)
    finally:
        client.disconnect()
        client.loop_stop()
