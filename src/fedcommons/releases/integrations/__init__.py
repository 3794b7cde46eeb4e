"""Where releases reach people outside the registry: Hugging Face folders, MLflow, a site.

- :mod:`~fedcommons.releases.integrations.hf_hub`: ``FedcommonsModel``, the
  huggingface_hub mixin that loads an ``hf`` export of a non-transformer task.
- :mod:`~fedcommons.releases.integrations.mlflow_mirror`: runs and releases mirrored into
  an MLflow tracking server and model registry (optional extra ``mlflow``).
- :mod:`~fedcommons.releases.integrations.site`: the static release site
  (``fedcommons release site``).

Each reads the registry through its signature checks and never writes to it.
"""
