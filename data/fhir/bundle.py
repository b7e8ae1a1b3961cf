"""One FHIR bundle -> MEDS rows: the conversion that ingestion and the risk service share.

`index_bundle` builds the per-bundle reference maps (a transaction bundle
references its Patient and Medications by entry `fullUrl`) and finds the
bundle's only Organization; `convert_resource` converts one resource with the
converters of `convert.py`. Ingestion (`worker.py`) quarantines what a
converter rejects; the service (`bundle_rows`) refuses the whole bundle,
naming the entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from chronorisk.data.fhir.convert import CONVERTERS, BundleContext, Rejected, Row, organization_site, patient_rows


def index_bundle(entries: list, ctx: BundleContext) -> None:
    """Reset `ctx` for a new bundle: fullUrl -> Patient id and Medication code maps (references resolve
    within the bundle), and the bundle's Organization when there is exactly one."""
    ctx.reset_bundle()
    org_keys: set[str] = set()
    for entry in entries:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            continue
        rtype = resource.get("resourceType")
        if rtype == "Patient":
            url, rid = entry.get("fullUrl"), resource.get("id")
            if isinstance(url, str) and url:
                ctx.patient_urls[url] = rid if isinstance(rid, str) and rid else url.rsplit(":", 1)[-1]
        elif rtype == "Medication":
            url, rid = entry.get("fullUrl"), resource.get("id")
            for key in (url, f"Medication/{rid}" if isinstance(rid, str) else None):
                if isinstance(key, str):
                    ctx.medications[key] = resource.get("code")
        elif rtype == "Organization":
            keys, _ = organization_site(resource, entry.get("fullUrl"))
            if keys:
                org_keys.add(keys[0])
    ctx.bundle_org = next(iter(org_keys)) if len(org_keys) == 1 else None


def convert_resource(resource: dict, ctx: BundleContext, full_url: object = None) -> list[Row] | None:
    """The rows of one resource; None for a type that is not converted; `Rejected` when it cannot be."""
    rtype = resource.get("resourceType")
    converter = CONVERTERS.get(rtype)
    if converter is None:
        return None
    if rtype == "Patient":
        return patient_rows(resource, ctx, full_url if isinstance(full_url, str) else None)
    return converter(resource, ctx)


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


def bundle_rows(bundle: dict, ctx: BundleContext) -> list[EntryRows]:
    """Every convertible entry of one bundle, converted whole: the first entry that cannot be converted
    raises `EntryRejected` (a request is answered or refused, never half-read)."""
    entries = bundle.get("entry") or []
    index_bundle(entries, ctx)
    converted: list[EntryRows] = []
    for i, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            continue
        try:
            rows = convert_resource(resource, ctx, entry.get("fullUrl"))
        except Rejected as exc:
            raise EntryRejected(i, exc.category, exc.detail) from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EntryRejected(i, "malformed", f"cannot be read ({type(exc).__name__})") from None
        if rows is not None:
            rid = resource.get("id")
            converted.append(EntryRows(i, resource["resourceType"], rid if isinstance(rid, str) else None, rows))
    return converted
