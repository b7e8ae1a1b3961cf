"""One MQTT message -> the MEDS events of a reading, or a quarantine entry with the reason.

A device (or its gateway) publishes one FHIR R4 Observation per message on
`<prefix>/<site>/devices/<device-id>/observations`: a blood-pressure panel (LOINC 85354-9 or
55284-4) with systolic 8480-6 and diastolic 8462-4 components, glucose, weight or heart rate,
Personal Health Device style. The Observation goes through the same converter as
`chronorisk ingest` (`data/fhir/convert.py`): units converted to the canonical unit, plausible
ranges checked, a reading converted whole or quarantined with its category and reason. The
patient comes from the device registry, never from the payload: a reading from an unknown or
revoked device, or from a device registered at another site, is quarantined and attached to
no one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import orjson

from chronorisk.data.fhir import convert
from chronorisk.devices.registry import DEVICE_ID, Registration

MAX_PAYLOAD = 64 * 1024
_EPOCH = datetime(1970, 1, 1)
_CONTEXT = None


@dataclass
class Message:
    """An MQTT message as the consumer received it."""

    topic: str
    payload: bytes
    received_at: datetime  # naive UTC
    mid: int = 0
    generation: int = 0
    dup: bool = False
    received_clock: float = 0.0  # time.monotonic() at receipt


@dataclass
class Reading:
    """A converted reading: its key, the patient it belongs to, and its MEDS events."""

    device_id: str
    reading_id: str
    site: str
    subject_id: int
    events: list[tuple[datetime, str, float | None, str | None]]
    received_at: datetime
    sent_at: datetime | None = None  # meta.lastUpdated: when the gateway sent it
    left_out: list[Quarantined] = field(default_factory=list)  # components quarantined on their own

    @property
    def time(self) -> datetime:
        return max(e[0] for e in self.events)


@dataclass
class Quarantined:
    topic: str
    device_id: str | None
    category: str
    reason: str
    payload: bytes
    received_at: datetime
    part: str | None = None  # the component left out of a reading that was stored (its other parts)
    key: str = field(init=False)

    def __post_init__(self) -> None:
        self.key = message_key(self.topic, self.payload + (b"\0" + self.part.encode() if self.part else b""))


def message_key(topic: str, payload: bytes) -> str:
    return hashlib.sha256(topic.encode() + b"\0" + payload).hexdigest()


def subscription(prefix: str, sites: list[str] | None = None) -> list[str]:
    """The topic filters of the consumer: every site's devices, or the listed sites'."""
    if not sites:
        return [f"{prefix}/+/devices/+/observations"]
    return [f"{prefix}/{s}/devices/+/observations" for s in sites]


def observation_topic(prefix: str, site: str, device_id: str) -> str:
    return f"{prefix}/{site}/devices/{device_id}/observations"


def alert_topic(prefix: str, site: str) -> str:
    return f"{prefix}/{site}/alerts"


def parse_topic(prefix: str, topic: str) -> tuple[str, str] | None:
    """(site, device id) of an observations topic; None when the topic is not one."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[0] != prefix or parts[2] != "devices" or parts[4] != "observations":
        return None
    if not parts[1] or not DEVICE_ID.match(parts[3]):
        return None
    return parts[1], parts[3]


def convert_message(prefix: str, msg: Message, registry: dict[str, Registration]) -> Reading | Quarantined:
    """The reading of one message, or why it is quarantined (never an exception)."""

    def bad(category: str, reason: str, device: str | None = None, part: str | None = None) -> Quarantined:
        return Quarantined(msg.topic, device, category, reason, msg.payload[:MAX_PAYLOAD], msg.received_at, part)

    where = parse_topic(prefix, msg.topic)
    if where is None:
        return bad("bad_topic", f"topic is not {prefix}/<site>/devices/<device-id>/observations")
    site, device_id = where
    if len(msg.payload) > MAX_PAYLOAD:
        return bad("oversize", f"payload of {len(msg.payload)} bytes; at most {MAX_PAYLOAD}", device_id)
    try:
        resource = orjson.loads(msg.payload)
    except orjson.JSONDecodeError:
        return bad("malformed_json", "payload is not valid JSON", device_id)
    if not isinstance(resource, dict) or resource.get("resourceType") != "Observation":
        return bad("not_observation", "payload is not a FHIR Observation (resourceType must be 'Observation')",
                   device_id)
    reading_id = resource.get("id")
    if not isinstance(reading_id, str) or not 0 < len(reading_id) <= 128:
        return bad("no_id", "Observation.id (the reading's id, 1-128 characters) is missing", device_id)
    reg = registry.get(device_id)
    if reg is None:
        return bad("unknown_device", "device is not registered", device_id)
    if reg.revoked_at is not None and msg.received_at >= reg.revoked_at:
        return bad("revoked_device", f"device registration was revoked on {reg.revoked_at:%Y-%m-%d}", device_id)
    if reg.site != site:
        return bad("wrong_site", f"device is registered at another site than {site!r}", device_id)
    ctx = _context()
    try:
        rows = convert.observation_rows({**resource, "subject": {"reference": "Patient/device"}}, ctx)
    except convert.Rejected as exc:
        return bad(exc.category, exc.detail, device_id)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return bad("unreadable", f"Observation cannot be read ({type(exc).__name__})", device_id)
    events = [(_EPOCH + timedelta(microseconds=r[1]), r[2], r[3], r[4]) for r in rows]
    # a panel's bad component is quarantined alone, as ingestion does; its good components are stored
    left_out = [bad(p.category, f"{p.part}: {p.detail}" if p.part else p.detail, device_id, p.part or "value")
                for p in ctx.partial]
    return Reading(device_id, reading_id, site, reg.subject_id, events, msg.received_at, _sent_at(resource),
                   left_out)


def _context() -> convert.BundleContext:
    """A converter context; the payload's patient is never read (the registry names the patient)."""
    global _CONTEXT
    if _CONTEXT is None:
        import secrets

        from chronorisk.data.pseudonym import Pseudonymizer

        _CONTEXT = convert.BundleContext(Pseudonymizer(secrets.token_bytes(32)), {}, {})
    _CONTEXT.reset_bundle()
    _CONTEXT.partial = []
    return _CONTEXT


def _sent_at(resource: dict) -> datetime | None:
    meta = resource.get("meta")
    value = meta.get("lastUpdated") if isinstance(meta, dict) else None
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is not None:
        when = when.astimezone(UTC).replace(tzinfo=None)
    return when
