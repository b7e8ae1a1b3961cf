"""chronorisk: chronic-disease risk prediction across sites.

The code lives in the top-level folders of the repository (data, features,
models, training, federated, serving), installed as subpackages of this one.
"""

__version__ = "0.1.0"
