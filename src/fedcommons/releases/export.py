"""Exports of a release into the formats other tools load.

File formats (:func:`export_release`): ``safetensors`` (the stored file itself) and
``torch`` (a ``torch.save`` state dict).

Folder formats (:func:`export_folder`): ``hf``, a folder Hugging Face tools load. A task
may write its own (transformer tasks: the ``save_pretrained`` layout) by defining a
method named in :data:`TASK_HOOKS`::

    class MyTask(Task):
        def export_hf(self, weights, folder, *, release, card): ...

``weights`` is the release's state dict, ``release`` its provenance (name, version,
weights and manifest SHA-256) and ``card`` its model card (Markdown with YAML metadata).
Tasks without a hook get :func:`export_hf_generic`: ``model.safetensors`` (byte for byte
the release's weights file, so its SHA-256 is the signed manifest's ``weights_sha256``),
``config.json`` (the task and its model options) and ``README.md`` (the release's model
card, whose metadata ``huggingface_hub.ModelCard`` reads: license, tags, datasets,
``model-index`` with the validation results).
:class:`fedcommons.releases.integrations.hf_hub.FedcommonsModel` loads it with ``huggingface_hub``'s
``PyTorchModelHubMixin``: ``FedcommonsModel.from_pretrained(folder)``.
Nothing is pushed anywhere: export is offline.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports ExportFormat at start-up: keep that import light
    from fedcommons.releases.registry import Registry, Release


class ExportFormat(StrEnum):
    """Export formats."""

    safetensors = "safetensors"
    torch = "torch"
    peft = "peft"
    hf = "hf"


#: Formats written as a folder, and the Task method that writes each one. ``hf`` has a
#: generic writer for tasks without the method; ``peft`` only exists as a task's own
#: (text tasks: LoRA patches as PEFT adapters).
TASK_HOOKS: dict[ExportFormat, str] = {
    ExportFormat.hf: "export_hf",
    ExportFormat.peft: "export_peft",
}
FOLDER_FORMATS = tuple(TASK_HOOKS)
#: Task options that describe one site, not the model (left out of an export's config).
SITE_OPTIONS = frozenset({"partition-id", "device"})
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"


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


def task_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """The model's task options from a manifest's flat run config (site options dropped)."""
    from fedcommons.wire import keys

    prefix = keys.TASK_OPTION_PREFIX
    return {
        k.removeprefix(prefix): v
        for k, v in config.items()
        if k.startswith(prefix) and k.removeprefix(prefix) not in SITE_OPTIONS
    }


def _card(release: Release, card_sha256: str) -> str:
    """The release's model card, checked against the manifest's hash."""
    import hashlib

    from fedcommons.errors import VerificationError

    try:
        data = release.card_path.read_bytes()
    except FileNotFoundError as exc:
        raise VerificationError(f"model card {release.card_path} is missing") from exc
    if card_sha256 and hashlib.sha256(data).hexdigest() != card_sha256:
        raise VerificationError(
            f"model card {release.card_path} does not match its manifest's card_sha256",
            str(release.card_path),
        )
    return data.decode()


def export_folder(registry: Registry, release: Release, fmt: ExportFormat, output: Path) -> Path:
    """Write ``release`` as folder format ``fmt`` into ``output``; return the folder.

    The release's task is rebuilt from its manifest (task name and ``task.*`` options);
    its hook (:data:`TASK_HOOKS`) writes the folder if it has one, else the generic
    writer does (``hf`` only). A patch release's pinned base must be the one installed
    here (:class:`~fedcommons.errors.VerificationError` otherwise), so a patch is never
    applied to a different base. ``output`` must not exist or be an empty folder
    (:class:`~fedcommons.errors.ConfigError` otherwise: nothing is overwritten).
    """
    from safetensors.torch import load as st_load

    from fedcommons.errors import ConfigError, VerificationError
    from fedcommons.tasks import load_task

    output = Path(output).expanduser()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"export folder {str(output)!r} exists and is not empty")
    manifest = registry.verified_manifest(release)  # the signed word, not the index's
    data = registry.weights_bytes(release)
    card = _card(release, manifest.card_sha256)
    provenance = {
        "name": release.name,
        "version": release.version,
        "weights_sha256": manifest.weights_sha256,
        "manifest_sha256": release.manifest_sha256,
        "signing_key_id": manifest.signing_key_id,
    }
    options = task_options(manifest.config)
    task = load_task(manifest.task, options)
    pinned = (manifest.base or {}).get("sha256")
    base_info = getattr(task, "base_info", None)
    actual = base_info().get("sha256") if callable(base_info) else None
    if pinned and actual != pinned:
        raise VerificationError(
            f"release {release.version} is a patch of base {pinned[:16]}…, but the base "
            f"installed here hashes to {str(actual)[:16]}…: install the pinned base"
        )
    hook = getattr(task, TASK_HOOKS[fmt], None)
    if not callable(hook) and fmt is not ExportFormat.hf:
        raise ConfigError(
            f"task {manifest.task!r} cannot be exported as {fmt.value} (it has no "
            f"{TASK_HOOKS[fmt]} method): use --format hf or safetensors"
        )
    output.mkdir(parents=True, exist_ok=True)
    if callable(hook):
        hook(st_load(data), output, release=provenance, card=card)
    else:
        export_hf_generic(data, output, task=manifest.task, options=options,
                          release=provenance, card=card)  # fmt: skip
    return output


def export_hf_generic(
    weights: bytes,
    folder: Path,
    *,
    task: str,
    options: Mapping[str, Any],
    release: Mapping[str, Any],
    card: str,
) -> None:
    """Write ``model.safetensors`` + ``config.json`` + ``README.md`` into ``folder``."""
    from fedcommons.fileio import atomic_write

    config = {"task": task, "task_options": dict(options), "fedcommons": dict(release)}
    atomic_write(folder / WEIGHTS_FILE, weights, mode=0o644)
    atomic_write(
        folder / CONFIG_FILE, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
        mode=0o644,
    )  # fmt: skip
    atomic_write(folder / CARD_FILE, card.encode(), mode=0o644)
