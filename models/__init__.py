"""Models: LightGBM wrapper, calibration, SHAP explanations, model bundle and card."""
