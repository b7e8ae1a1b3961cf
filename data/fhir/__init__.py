"""FHIR R4 ingestion: bundles (`.json`, `.json.gz`) and bulk-export NDJSON -> MEDS per site.

`sources` finds and reads files, `convert` maps resources to MEDS rows (pure
functions), `worker` runs a task in a worker process, `ingest` orchestrates,
`quarantine` and `report` write what could not be converted and the counts.
"""
