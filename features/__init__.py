"""Features: tasks and labels, and the fit-once / transform-everywhere polars pipeline."""
