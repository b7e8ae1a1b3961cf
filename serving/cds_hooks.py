"""CDS Hooks 2.0: the discovery document, the EHR client's JWT, and risk cards.

One `patient-view` service. Its prefetch asks the EHR for the Patient and the
last 3 years of Observations, Conditions and MedicationRequests, and for the
active problem list (`problems`: active Conditions whatever their date, so that
a chronic diagnosis recorded years ago still puts the patient in a task's
population). The two Condition searches overlap; `prefetch_bundle` merges them,
each resource once (by type and id). With prefetch the patient is scored from it (the same
converter and models as `$score`); without, the service falls back to the
latest scores stored for the patient. The EHR's patient id becomes the
pseudonymous subject id with the ingestion's key, so that consent and the
store are looked up as everywhere else; a withdrawn consent gives no card.

Authentication (CDS Hooks 2.0, "Trusting CDS Clients"): each call carries a
JWT signed by the client, verified with PyJWT against the public key
configured for its issuer (`serve.cds_clients`): `iss` known, `aud` the URL of
the endpoint called, `exp` in the future, `jti` never seen before (kept until
the token expires in the score store, so a token replayed to another worker is
refused too). Each client acts with one role at one site.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from chronorisk.errors import InputError
from chronorisk.serving.explanations import group_factors
from chronorisk.serving.fhir_risk import lower_first, outcome_concept

SERVICE_ID = "chronorisk-risk"
INDICATOR = {"low": "info", "medium": "warning", "high": "critical"}
MAX_SUMMARY = 139
PREFETCH = {
    "patient": "Patient/{{context.patientId}}",
    "observations": "Observation?patient={{context.patientId}}&date=ge{{today() - 3 years}}",
    "conditions": "Condition?patient={{context.patientId}}&recorded-date=ge{{today() - 3 years}}",
    "problems": "Condition?patient={{context.patientId}}&clinical-status=active",
    "medications": "MedicationRequest?patient={{context.patientId}}&authoredon=ge{{today() - 3 years}}",
}

PREFETCH_SEARCHES = tuple(k for k in PREFETCH if k != "patient")  # searchset Bundles, merged in this order


def discovery() -> dict:
    return {"services": [{
        "hook": "patient-view",
        "id": SERVICE_ID,
        "title": "Chronic-disease risk",
        "description": "The model's risk of diabetes or hypertension onset, or of a first complication, with the "
                       "factors behind it (the last 3 years of observations, diagnoses and prescriptions, and the "
                       "active problem list).",
        "prefetch": PREFETCH,
        "usageRequirements": "The client signs each call with its registered key and is bound to one site.",
    }]}


# -- authentication ---------------------------------------------------------------------------


class AuthProblem(Exception):
    """The call's JWT is missing or invalid (401) or its client may not do this (403)."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


@dataclass(frozen=True)
class Client:
    iss: str
    key: object  # a cryptography public key
    algorithms: tuple[str, ...]
    role: str
    site: str | None


def load_clients(configs: Sequence) -> dict[str, Client]:
    """The configured clients by issuer, their public keys read once; InputError naming the bad entry."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    clients: dict[str, Client] = {}
    for i, c in enumerate(configs):
        field = f"serve.cds_clients[{i}].public_key_file"
        try:
            key = load_pem_public_key(Path(c.public_key_file).read_bytes())
        except OSError as exc:
            raise InputError(field, f"cannot be read ({exc.strerror})") from None
        except ValueError:
            raise InputError(field, "is not a PEM public key") from None
        if c.iss in clients:
            raise InputError(f"serve.cds_clients[{i}].iss", f"{c.iss!r} is configured twice")
        clients[c.iss] = Client(c.iss, key, tuple(c.algorithms), c.role, c.site)
    return clients


class SeenTokens:
    """`jti` values of accepted tokens until they expire: a token is accepted once, by any worker.

    This worker's own recent ids answer a replay at once; the ledger table in the score store
    (`cds_token_ids`, primary key issuer + jti) makes the first use win across workers and
    processes. Expired ids are pruned now and then."""

    PRUNE_EVERY = 500

    def __init__(self, engine=None):
        self._seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self.engine = engine
        self._accepted = 0
        if engine is not None:
            TOKEN_IDS.create(engine, checkfirst=True)

    def first_use(self, iss: str, jti: str, exp: float) -> bool:
        now = time.time()
        with self._lock:
            if len(self._seen) > 10_000:
                self._seen = {k: v for k, v in self._seen.items() if v > now}
            if (iss, jti) in self._seen:
                return False
            self._seen[(iss, jti)] = exp
            self._accepted += 1
            prune = self._accepted % self.PRUNE_EVERY == 0
        return self.engine is None or self._record(iss, jti, exp, now if prune else None)

    def _record(self, iss: str, jti: str, exp: float, prune_before: float | None) -> bool:
        from sqlalchemy.exc import IntegrityError

        from chronorisk.serving.store import writer

        try:
            with writer(self.engine) as conn, conn.begin():
                if prune_before is not None:
                    conn.execute(TOKEN_IDS.delete().where(TOKEN_IDS.c.expires < prune_before))
                conn.execute(_INSERT_TOKEN_ID, {"issuer": iss[:255], "jti": jti[:255], "expires": exp})
        except IntegrityError:
            return False
        return True


def _token_ids_table():
    from sqlalchemy import Column, Float, MetaData, String, Table

    return Table("cds_token_ids", MetaData(), Column("issuer", String(255), primary_key=True),
                 Column("jti", String(255), primary_key=True), Column("expires", Float, nullable=False, index=True))


TOKEN_IDS = _token_ids_table()
_INSERT_TOKEN_ID = TOKEN_IDS.insert()  # one statement object: SQLAlchemy compiles it once, not per call


def unverified_issuer(token: str) -> object:
    """The `iss` claim of a JWT before its signature is checked (which key to check it with); AuthProblem(401)
    for a token that is not three base64url parts with a JSON object in the middle."""
    import base64
    import binascii

    import orjson

    parts = token.split(".")
    try:
        if len(parts) != 3:
            raise ValueError
        payload = orjson.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        raise AuthProblem(401, "the JWT cannot be read") from None
    return payload.get("iss") if isinstance(payload, dict) else None


def verify_token(authorization: str | None, clients: Mapping[str, Client], audience: str,
                 seen: SeenTokens) -> Client:
    """The client whose valid, unused JWT the `Authorization: Bearer` header carries; AuthProblem(401)."""
    import jwt

    if not authorization or not authorization.lower().startswith("bearer "):
        raise AuthProblem(401, "a JWT signed by a registered CDS client is required (Authorization: Bearer)")
    token = authorization[7:].strip()
    iss = unverified_issuer(token)
    client = clients.get(iss) if isinstance(iss, str) else None
    if client is None:
        raise AuthProblem(401, "the JWT's issuer is not a registered CDS client")
    try:
        claims = jwt.decode(token, client.key, algorithms=list(client.algorithms), audience=audience,
                            issuer=client.iss, options={"require": ["iss", "aud", "exp", "iat", "jti"]},
                            leeway=30)
    except jwt.ExpiredSignatureError:
        raise AuthProblem(401, "the JWT has expired") from None
    except jwt.InvalidAudienceError:
        raise AuthProblem(401, "the JWT's audience is not this endpoint") from None
    except jwt.MissingRequiredClaimError as exc:
        raise AuthProblem(401, f"the JWT lacks the {exc.claim} claim") from None
    except jwt.PyJWTError:
        raise AuthProblem(401, "the JWT's signature or claims are invalid") from None
    if not seen.first_use(client.iss, str(claims["jti"]), float(claims["exp"])):
        raise AuthProblem(401, "the JWT's jti was already used")
    return client


# -- scores of records seen today ----------------------------------------------------------------


def record_key(bundle: dict, day, site: str | None, models: list[tuple[str, str]]) -> str:
    """A digest of everything a prefetch's scores depend on: the record, the day, the site, the models."""
    import hashlib

    import orjson

    digest = hashlib.sha256(orjson.dumps(bundle, option=orjson.OPT_SORT_KEYS))
    digest.update(f"|{day:%Y-%m-%d}|{site}|{sorted(models)}".encode())
    return digest.hexdigest()


class RecentResults:
    """The last `size` records' scores (an EHR fires patient-view at every opening of a chart): least
    recently used out first; 0 keeps nothing."""

    def __init__(self, size: int):
        from collections import OrderedDict

        self.size = size
        self._items: OrderedDict[str, list] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> list | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: str, value: list) -> list:
        if self.size:
            with self._lock:
                self._items[key] = value
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
        return value


# -- cards ------------------------------------------------------------------------------------


def task_title(task_def, condition_names: Mapping[str, str]) -> str:
    """'Risk of type 2 diabetes or hypertension within 2 years' (short enough for a summary)."""
    names = [lower_first(condition_names.get(c, c.replace("_", " "))) for c in task_def.outcome.concepts]
    what = " or ".join(names) if len(names) <= 2 else "a first complication"
    years = task_def.horizon_days / 365
    within = f"{years:g} year{'s' if years != 1 else ''}" if task_def.horizon_days % 365 == 0 else (
        f"{task_def.horizon_days} days")
    return f"Risk of {what} within {within}"


def card(*, task_def, spec, risk: float, tier: str | None, factors: Sequence[dict] | None, model_name: str,
         model_version: str, prediction_time, page_url: str, source_url: str | None = None,
         units: Mapping | None = None) -> dict:
    """One CDS card of one task's score: summary, indicator by tier, grouped factors in Markdown."""
    names = {c.name: c.display for c in spec.conditions} if spec is not None else {}
    title = task_title(task_def, names)
    summary = f"{title}: {risk:.0%}" + (f" ({tier})" if tier else "")
    if len(summary) > MAX_SUMMARY:
        summary = summary[: MAX_SUMMARY - 1] + "…"
    lines = group_factors(factors, spec.features if spec is not None else None, units)
    raises = [line for line in lines if line.direction == "raises"]
    lowers = [line for line in lines if line.direction == "lowers"]
    detail = [f"**{risk:.0%}** estimated risk ({tier or 'no'} tier) at {prediction_time:%Y-%m-%d}: "
              f"{lower_first(outcome_concept(task_def, names)['text'])}.", ""]
    for heading, group in (("Raising the risk", raises), ("Lowering the risk", lowers)):
        if group:
            detail.append(f"**{heading}**")
            detail += [f"- {line.text}" for line in group]
            detail.append("")
    detail.append("_The model's estimate from the recorded data, not a diagnosis or a treatment effect._")
    source = {"label": f"chronorisk {model_name} v{model_version}"}
    if source_url:
        source["url"] = source_url
    return {
        "uuid": str(uuid.uuid4()),
        "summary": summary,
        "indicator": INDICATOR.get(tier or "", "info"),
        "detail": "\n".join(detail),
        "source": source,
        "links": [{"label": "Open the patient's risk page", "url": page_url, "type": "absolute"}],
    }


def prefetch_bundle(prefetch: Mapping[str, dict | None], patient_id: str) -> dict | None:
    """The prefetched resources as one collection Bundle (None without a prefetched Patient).

    `patient` is the Patient resource; `observations`, `conditions`, `problems` (the active problem list)
    and `medications` are searchset Bundles of resources about the patient in view, any of them absent.
    A resource found by two searches (a recent active Condition is in `conditions` and in `problems`)
    enters once, by resource type and id. InputError names a key holding something else."""
    patient = prefetch.get("patient")
    if not patient:
        return None
    if patient.get("resourceType") != "Patient":
        got = str(patient.get("resourceType"))[:40]
        raise InputError("prefetch.patient", f"expected a Patient resource, got {got}")
    if patient.get("id") != patient_id:
        raise InputError("prefetch.patient.id", "is not the context's patientId (the patient in view)")
    entries = [{"resource": patient}]
    seen: set[tuple] = set()
    for key in PREFETCH_SEARCHES:
        value = prefetch.get(key)
        if value is None:
            continue
        if value.get("resourceType") != "Bundle":
            raise InputError(f"prefetch.{key}", "expected a searchset Bundle")
        for i, entry in enumerate(value.get("entry") or []):
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict):
                raise InputError(f"prefetch.{key}.entry[{i}]", "an entry without a resource")
            rid = resource.get("id")
            if rid is not None:
                if (resource.get("resourceType"), rid) in seen:
                    continue
                seen.add((resource.get("resourceType"), rid))
            entries.append({"resource": resource})
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}
