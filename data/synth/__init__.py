"""The synthetic multi-site cohort behind `chronorisk generate` (docs/generator.md).

`hazards` holds the documented hazard model, `dynamics` the latent risk-factor
trajectories, `simulate` the monthly simulation of a chunk of patients,
`truth` the ground-truth risks, `meds_writer` / `fhir_writer` the outputs,
`drift` the drift injection and `runner` the chunked, parallel orchestration.
"""
