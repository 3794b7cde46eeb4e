"""Export a text-task patch release for ``peft`` and ``transformers`` users.

- :func:`export_peft` — a LoRA patch as a PEFT adapter folder (``adapter_config.json``,
  ``adapter_model.safetensors`` with the LoRA factors and the classification head as
  ``modules_to_save``): ``PeftModel.from_pretrained(base, folder)`` on the pinned base
  (``AutoModelForSequenceClassification.from_pretrained(<base>, num_labels=N)``) gives the
  same logits as the fedcommons model.
- :func:`export_hf` — any patch merged into the base and written with
  ``save_pretrained`` (model, config with the label names, tokenizer): a plain
  ``transformers`` folder.

Both folders carry ``fedcommons.json``: the release, the base's name and SHA-256 (check
it against your copy of the base: the adapter is only meaningful on that exact base).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedcommons.errors import ConfigError
from fedcommons.tasks.base import Task


def _patched(task: Task, weights: Mapping[str, torch.Tensor]) -> Any:
    # a text task (duck-typed: fedcommons.tasks.text calls these from its export hooks,
    # so importing it here would be an import circle)
    if not (callable(getattr(task, "base_info", None)) and hasattr(task, "adapter")):
        raise ConfigError(
            f"task {task.name!r} is not a Hugging Face text task: export it as safetensors"
        )
    return task


def _loaded(task: Any, weights: Mapping[str, torch.Tensor]) -> Any:
    model = task.build_model()
    try:
        model.load_state_dict(dict(weights), strict=True)
    except RuntimeError as exc:
        raise ConfigError(
            f"the release's weights do not fit task {task.name!r} as configured: {exc}"
        ) from exc
    return model.eval()


def _write_provenance(folder: Path, task: Any, release: dict[str, Any]) -> None:
    doc = {"release": release, "base": task.base_info()}
    (folder / "fedcommons.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _label_config(net: Any, task: Any) -> None:
    names = task.split.train.label_names
    net.config.id2label = dict(enumerate(names))
    net.config.label2id = {name: i for i, name in enumerate(names)}


def export_peft(
    task: Task,
    weights: Mapping[str, torch.Tensor],
    folder: Path,
    *,
    release: dict[str, Any] | None = None,
) -> Path:
    """Write the LoRA patch ``weights`` as a PEFT adapter folder; return the folder."""
    text = _patched(task, weights)
    if text.adapter != "lora":
        raise ConfigError(
            f"--format peft needs a LoRA patch; this release's adapter is {text.adapter!r}: "
            "use --format hf (the merged model)"
        )
    model = _loaded(text, weights)
    folder.mkdir(parents=True, exist_ok=True)
    peft_model = model.net
    peft_model.peft_config["default"].base_model_name_or_path = text.base.name
    peft_model.save_pretrained(str(folder))
    text.tokenizer.save_pretrained(str(folder))
    _write_provenance(folder, text, release or {})
    return folder


def export_hf(
    task: Task,
    weights: Mapping[str, torch.Tensor],
    folder: Path,
    *,
    release: dict[str, Any] | None = None,
) -> Path:
    """Write the base with ``weights`` merged in as a ``save_pretrained`` folder."""
    text = _patched(task, weights)
    net = _loaded(text, weights).net
    if text.adapter == "lora":
        net = net.merge_and_unload()
    for param in net.parameters():
        param.requires_grad_(True)
    _label_config(net, text)
    folder.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(str(folder))
    text.tokenizer.save_pretrained(str(folder))
    _write_provenance(folder, text, release or {})
    return folder
