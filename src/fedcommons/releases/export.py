"""Exports of a release's weights into the formats other tools load."""

from __future__ import annotations

import io
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports ExportFormat at start-up: keep that import light
    from fedcommons.releases.registry import Registry, Release


class ExportFormat(StrEnum):
    """Export formats."""

    safetensors = "safetensors"
    torch = "torch"


def export_release(registry: Registry, release: Release, fmt: ExportFormat) -> bytes:
    """The release's weights in ``fmt``, read through the registry's hash check.

    ``safetensors`` is the stored file itself; ``torch`` is a ``torch.save`` state dict.
    """
    data = registry.weights_bytes(release)
    if fmt is ExportFormat.torch:
        import torch
        from safetensors.torch import load as st_load

        buffer = io.BytesIO()
        torch.save(st_load(data), buffer)
        data = buffer.getvalue()
    return data
