"""Data layer: MEDS I/O, the shared clinical vocabulary, the synthetic cohort, FHIR ingestion."""
