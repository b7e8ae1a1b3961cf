"""Training: centralized training, evaluation, MLflow tracking and registry."""
