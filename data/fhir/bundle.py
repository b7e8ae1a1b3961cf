"""One FHIR bundle -> MEDS rows, all or nothing: what the risk service takes from a request.

The conversion itself is ingestion's (`convert.index_bundle`, `convert.convert_resource`):
ingestion quarantines what a converter rejects (and a panel's bad component alone), while
the service (`strict_bundle_entries`) refuses the whole bundle naming the first entry that
cannot be converted whole: a request is answered or refused, never half-read.
"""

from __future__ import annotations

from dataclasses import dataclass

from chronorisk.data.fhir.convert import CONVERTERS, BundleContext, Rejected, Row, convert_resource, index_bundle


@dataclass(frozen=True)
class EntryRows:
    """The rows of one converted bundle entry, with where they came from."""

    index: int  # position in `entry`
    resource_type: str
    resource_id: str | None  # the resource's logical id, when it had one
    rows: list[Row]


class EntryRejected(Exception):
    """A bundle entry that cannot be converted (`index` in `entry`)."""

    def __init__(self, index: int, category: str, detail: str):
        self.index = index
        self.category = category
        self.detail = detail
        super().__init__(f"entry {index}: {category}: {detail}")


def strict_bundle_entries(bundle: dict, ctx: BundleContext) -> list[EntryRows]:
    """Every convertible entry of one bundle, converted whole: the first entry that cannot be converted
    (or a panel with a component left out) raises `EntryRejected`."""
    entries = bundle.get("entry") or []
    index_bundle(entries, ctx)
    converted: list[EntryRows] = []
    for i, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or resource.get("resourceType") not in CONVERTERS:
            continue
        try:
            rows = convert_resource(resource, ctx, entry.get("fullUrl"))
        except Rejected as exc:
            raise EntryRejected(i, exc.category, exc.detail) from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EntryRejected(i, "malformed", f"cannot be read ({type(exc).__name__})") from None
        if ctx.partial:
            part = ctx.partial[0]
            raise EntryRejected(i, part.category, f"{part.part}: {part.detail}" if part.part else part.detail)
        rid = resource.get("id")
        converted.append(EntryRows(i, resource["resourceType"], rid if isinstance(rid, str) else None, rows))
    return converted
