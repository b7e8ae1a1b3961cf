"""Model code MLflow runs when it loads a registered chronorisk model (models from code).

Logged by `registry.register_bundle`; never imported by chronorisk itself.
"""

from mlflow.models import set_model

from chronorisk.training.pyfunc import BundleModel

set_model(BundleModel())
