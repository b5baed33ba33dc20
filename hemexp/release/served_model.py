"""MLflow "models from code" entry point of a released model: MLflow runs this file when it loads the
model, instead of unpickling an object (no CloudPickle of HemExp classes inside the registry)."""

import mlflow

from hemexp.release.pyfunc import HemExpSimulator

mlflow.models.set_model(HemExpSimulator())
