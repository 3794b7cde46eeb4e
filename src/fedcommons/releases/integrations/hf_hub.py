"""Load a generic Hugging Face export of a release: ``FedcommonsModel.from_pretrained``.

``fedcommons release export VERSION --format hf -o DIR`` writes ``model.safetensors``,
``config.json`` and ``README.md`` (see :mod:`.export`); this class reads them back through
``huggingface_hub``'s ``PyTorchModelHubMixin``, from a local folder (offline) or from a
Hub repository the folder was uploaded to::

    from fedcommons.releases.integrations.hf_hub import FedcommonsModel

    model = FedcommonsModel.from_pretrained("digits-1.0.0-hf")
    logits = model(x)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin

from fedcommons.tasks import load_task


class FedcommonsModel(
    torch.nn.Module,
    PyTorchModelHubMixin,
    library_name="fedcommons",
    tags=["fedcommons", "federated-learning"],
):
    """A fedcommons release as a Hugging Face Hub model.

    The task's own model (``task`` with ``task_options``, as ``config.json`` records
    them) does the work; state dict keys are the release's, unprefixed, so
    ``model.safetensors`` is the release's weights file itself. ``release`` holds the
    provenance (name, version, weights and manifest SHA-256, signing key id).
    """

    def __init__(
        self,
        task: str,
        task_options: dict[str, Any] | None = None,
        fedcommons: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = load_task(task, task_options or {}).build_model()
        self.release = dict(fedcommons or {})

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The task model's forward."""
        return self.model(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """The task model's state dict (the release's tensor names)."""
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(  # type: ignore[override]
        self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load the release's tensors into the task model."""
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def _from_pretrained(cls, *, strict: bool = True, **kwargs: Any) -> Any:  # type: ignore[override]
        # the mixin loads non-strictly unless told: a release must load whole
        return super()._from_pretrained(strict=strict, **kwargs)
