"""What travels between the server and the sites, and how it maps onto Flower records.

A `Payload` is what the plain modules produce and consume: a JSON-able
`config` dict, named byte `blobs` (models, feature specs: zlib-compressed on
the wire), named numpy `arrays` (binned statistics) and flat `metrics`. It
maps one to one onto a Flower `RecordDict`:

    config  -> ConfigRecord "config" {"json": <text>}
    blobs   -> ConfigRecord "blobs"  {name: zlib(bytes)}
    arrays  -> ArrayRecord  "arrays" {name: Array}
    metrics -> MetricRecord "metrics"

so `client_app.py` and `server_app.py` only call `to_records` /
`from_records`. Message kinds (the Flower message type):

- `query`    "summary": the site's code counts, measurement sketches, row
  counts and data span (for the federated feature fit);
- `train`    one round: feature spec + global model in, new trees out;
- `evaluate` calibration and evaluation statistics of the final models.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from flwr.app import RecordDict

PROTOCOL_VERSION = 1
SUMMARY = "summary"
TRAIN = "train"
EVALUATE = "evaluate"
KINDS = (SUMMARY, TRAIN, EVALUATE)


class ProtocolError(ValueError):
    """A message whose content does not follow this protocol."""


@dataclass
class Payload:
    config: dict[str, Any] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def blob_text(self, name: str) -> str:
        try:
            return self.blobs[name].decode("utf-8")
        except KeyError:
            raise ProtocolError(f"message has no {name!r} blob") from None

    def nbytes(self) -> int:
        """Size of the content on the wire (compressed blobs, raw arrays, JSON text)."""
        size = len(json.dumps(self.config, separators=(",", ":")))
        size += sum(len(zlib.compress(b, 6)) for b in self.blobs.values())
        size += sum(a.nbytes for a in self.arrays.values())
        size += 16 * len(self.metrics)
        return size


def to_records(payload: Payload) -> RecordDict:
    """A Payload as a Flower RecordDict (blobs compressed)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    config = {"protocol": PROTOCOL_VERSION, **payload.config}
    records: dict[str, Any] = {
        "config": ConfigRecord({"json": json.dumps(config, separators=(",", ":"))}),
    }
    if payload.blobs:
        records["blobs"] = ConfigRecord({k: zlib.compress(v, 6) for k, v in payload.blobs.items()})
    if payload.arrays:
        records["arrays"] = ArrayRecord(
            array_dict={k: Array(np.ascontiguousarray(v)) for k, v in payload.arrays.items()}
        )
    if payload.metrics:
        records["metrics"] = MetricRecord({k: float(v) for k, v in payload.metrics.items()})
    return RecordDict(records)


def from_records(content: RecordDict) -> Payload:
    """The Payload carried by a RecordDict (raises ProtocolError if it is not one of ours)."""
    try:
        config = json.loads(content["config"]["json"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ProtocolError("message carries no chronorisk config record") from None
    if config.pop("protocol", None) != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version differs (expected {PROTOCOL_VERSION})")
    blobs: dict[str, bytes] = {}
    if "blobs" in content:
        try:
            blobs = {k: zlib.decompress(v) for k, v in content["blobs"].items()}
        except zlib.error:
            raise ProtocolError("a blob is not zlib-compressed") from None
    arrays = {k: v.numpy() for k, v in content["arrays"].items()} if "arrays" in content else {}
    metrics = {k: float(v) for k, v in content["metrics"].items()} if "metrics" in content else {}
    return Payload(config=config, blobs=blobs, arrays=arrays, metrics=metrics)
