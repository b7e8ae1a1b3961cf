"""What travels between the server and the sites, and how it maps onto Flower records.

A `Payload` is what the plain modules produce and consume: a JSON-able
`config` dict, named byte `blobs` (models, feature specs: zlib-compressed on
the wire), named numpy `arrays` (binned statistics) and flat `metrics`. It
maps onto a Flower `RecordDict`:

    config  -> ConfigRecord "config" {"json": <text>}
    blobs   -> ConfigRecord "blobs"  {name: zlib(bytes)}
    arrays  -> ArrayRecord  "arrays" {"npz": one uint8 Array, a compressed .npz of all arrays}
    metrics -> MetricRecord "metrics"

so `client_app.py` and `server_app.py` only call `to_records` /
`from_records`. Every Flower `Array` travels as an object of its own (one
HTTP request each way), and the binned statistics are mostly empty bins:
one compressed archive makes a reply a handful of objects and a few kB. Message kinds (the Flower message type):

- `query`    "summary": the site's code counts, measurement sketches, row
  counts and data span (for the federated feature fit);
- `train`    one round: feature spec + global model in, new trees out;
- `evaluate` calibration and evaluation statistics of the final models.
"""

from __future__ import annotations

import io
import json
import zipfile
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
        """Size of the content as encoded for Flower (see `record_bytes`)."""
        return record_bytes(to_records(self))


def record_bytes(records: RecordDict) -> int:
    """Bytes of our content in a RecordDict: JSON text, compressed blobs, the array archive, metrics."""
    size = 0
    if "config" in records:
        size += len(records["config"]["json"])
    if "blobs" in records:
        size += sum(len(v) for v in records["blobs"].values())
    if "arrays" in records:
        size += sum(int(a.numpy().nbytes) for a in records["arrays"].values())
    if "metrics" in records:
        size += 8 * len(records["metrics"])
    return size


def _pack_arrays(arrays: dict[str, np.ndarray]) -> np.ndarray:
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def _unpack_arrays(packed: np.ndarray) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(np.asarray(packed, dtype=np.uint8).tobytes()), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile):
        raise ProtocolError("the arrays record is not a numpy archive") from None


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
        records["arrays"] = ArrayRecord(array_dict={"npz": Array(_pack_arrays(payload.arrays))})
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
    arrays = {}
    if "arrays" in content:
        if "npz" not in content["arrays"]:
            raise ProtocolError("the arrays record has no 'npz' archive")
        arrays = _unpack_arrays(content["arrays"]["npz"].numpy())
    metrics = {k: float(v) for k, v in content["metrics"].items()} if "metrics" in content else {}
    return Payload(config=config, blobs=blobs, arrays=arrays, metrics=metrics)
