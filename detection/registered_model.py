"""The code of every registered version, logged from this file (MLflow's models from code): a version
holds this file, its config (YAML) and its weights (state_dicts), and loading it runs this and the
installed package, nothing that came with the version. `tracking.load_model` checks that a version
is in this form, with this file unchanged, before MLflow loads it."""

import mlflow

from detection.predict import Detector

mlflow.models.set_model(Detector())
