"""MLflow pyfunc face of a model bundle: `mlflow.pyfunc.load_model(...).predict(features)` gives risks.

The registry stores the bundle folder itself as the pyfunc model's
`bundle` artifact; this wrapper only loads it with `ModelBundle.load` and
returns the calibrated risk, so MLflow tooling (and anyone without
chronorisk's serving code) can score a registered version. The model is
logged "from code" (`training/mlflow_model.py`), not pickled.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from mlflow.pyfunc import PythonModel

BUNDLE_ARTIFACT = "bundle"


class BundleModel(PythonModel):
    """Calibrated risk of a chronorisk model bundle, one value per input row of features."""

    def load_context(self, context) -> None:
        from chronorisk.models.bundle import ModelBundle

        self.bundle = ModelBundle.load(Path(context.artifacts[BUNDLE_ARTIFACT]))

    def predict(self, context, model_input: pd.DataFrame, params=None):
        return self.bundle.predict_risk(model_input)
