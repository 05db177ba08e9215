"""wsss-bench harness: configuration, datasets, evaluation, trial runner, backends,
MLflow tracking and reports. It knows nothing about any particular method."""

__version__ = "0.1.0"
