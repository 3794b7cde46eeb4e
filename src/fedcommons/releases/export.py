"""Exports of a release's weights into the formats other tools load."""

from __future__ import annotations

import io
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports ExportFormat at start-up: keep that import light
    from fedcommons.releases.registry import Registry, Release


class ExportFormat(StrEnum):
    """Export formats."""

    safetensors = "safetensors"
    torch = "torch"
    peft = "peft"
    hf = "hf"


#: Formats written as a folder, for text-task patch releases (#15).
FOLDER_FORMATS = (ExportFormat.peft, ExportFormat.hf)


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


def export_folder(registry: Registry, release: Release, fmt: ExportFormat, output: Path) -> Path:
    """Write a text-task patch release as a PEFT adapter (``peft``) or merged model (``hf``).

    The release's task is rebuilt from its manifest (task name and ``task.*`` options);
    the base installed here must hash to the one the manifest pins
    (:class:`~fedcommons.errors.VerificationError` otherwise), so the adapter is never
    applied to a different base.
    """
    from safetensors.torch import load as st_load

    from fedcommons.errors import VerificationError
    from fedcommons.tasks import load_task
    from fedcommons.tasks.hf_export import export_hf, export_peft
    from fedcommons.wire import keys

    weights = st_load(registry.weights_bytes(release))
    manifest = release.manifest()
    prefix = keys.TASK_OPTION_PREFIX
    options = {
        k.removeprefix(prefix): v
        for k, v in (manifest.config or {}).items()
        if k.startswith(prefix) and k != f"{prefix}partition-id"
    }
    task = load_task(manifest.task, options)
    pinned = (manifest.base or {}).get("sha256")
    base_info = getattr(task, "base_info", None)
    actual = base_info().get("sha256") if callable(base_info) else None
    if pinned and actual != pinned:
        raise VerificationError(
            f"release {release.version} is a patch of base {pinned[:16]}…, but the base "
            f"installed here hashes to {str(actual)[:16]}…: install the pinned base"
        )
    provenance = {
        "name": release.name,
        "version": release.version,
        "weights_sha256": release.weights_sha256,
    }
    writer = export_peft if fmt is ExportFormat.peft else export_hf
    return writer(task, weights, output, release=provenance)
