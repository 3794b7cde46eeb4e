"""A BERT-sized model with random weights and a tiny synthetic batch: a transport load.

``benchmarks.large_model`` (and the large-update deployment test) push whole updates of a
110M-parameter model through Flower's deployment engine. What they measure is transport,
update encoding, decoding and aggregation, not learning: the weights are random (seeded),
and a site's "training" is one SGD step on ``examples`` synthetic token sequences, so a
round costs the same compute everywhere and every byte of the update is a real, dense,
changed float.

The model is a BERT encoder built from plain torch layers (no ``transformers``): token,
position and segment embeddings with LayerNorm, ``layers`` post-norm
``nn.TransformerEncoderLayer`` blocks (GELU), a tanh pooler on the first token and a
``num-labels`` classifier. Preset ``bert-base`` (the default) has BERT-base's shapes:
109,483,778 parameters (BERT-base's 109,482,240 plus the 2-label head).

Options (flat, as in Flower's run/node config): ``preset`` (see :data:`PRESETS`) and any
of its shapes to override, named as in Hugging Face's ``BertConfig`` (``vocab-size``,
``hidden-size``, ``num-hidden-layers``, ``num-attention-heads``, ``intermediate-size``,
``max-position-embeddings``, ``num-labels``), ``examples`` and ``seq-len`` (the synthetic
batch), ``partition-id``, ``seed``. The optimiser is plain SGD (no momentum
buffer: one model-sized tensor less on each site).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedcommons.errors import ConfigError
from fedcommons.tasks import Task, TaskOptions


@dataclass(frozen=True)
class EncoderConfig:
    """Shapes of a BERT-style encoder."""

    vocab_size: int = 30522
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_positions: int = 512
    num_labels: int = 2

    def num_parameters(self) -> int:
        """Parameters of :class:`Encoder` with these shapes (no model needed)."""
        h, i = self.hidden, self.intermediate
        embeddings = (self.vocab_size + self.max_positions + 2) * h + 2 * h
        layer = (3 * h * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
        head = (h * h + h) + (h * self.num_labels + self.num_labels)
        return embeddings + self.layers * layer + head


#: ``bert-base``: BERT-base's shapes (110M). ``bert-small``: a 4-layer, 512-wide encoder
#: with the same vocabulary (28.8M), for quick runs. ``bert-mini``: 2 layers (22.4M).
PRESETS: dict[str, EncoderConfig] = {
    "bert-base": EncoderConfig(),
    "bert-small": EncoderConfig(hidden=512, layers=4, heads=8, intermediate=2048),
    "bert-mini": EncoderConfig(hidden=512, layers=2, heads=8, intermediate=2048),
}


class Encoder(nn.Module):
    """Embeddings, a post-norm transformer stack, a tanh pooler and a classifier."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        h = config.hidden
        self.word = nn.Embedding(config.vocab_size, h)
        self.position = nn.Embedding(config.max_positions, h)
        self.segment = nn.Embedding(2, h)
        self.norm = nn.LayerNorm(h, eps=1e-12)
        layer = nn.TransformerEncoderLayer(
            h,
            config.heads,
            dim_feedforward=config.intermediate,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            layer_norm_eps=1e-12,
        )
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.pooler = nn.Linear(h, h)
        self.classifier = nn.Linear(h, config.num_labels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, num_labels)`` for token ids ``(batch, seq_len)``."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.word(tokens) + self.position(positions) + self.segment(torch.zeros_like(tokens))
        x = self.encoder(self.norm(x))
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


#: Task option -> :class:`EncoderConfig` field (option names as in ``BertConfig``).
_OPTION_FIELDS = {
    "vocab-size": "vocab_size",
    "hidden-size": "hidden",
    "num-hidden-layers": "layers",
    "num-attention-heads": "heads",
    "intermediate-size": "intermediate",
    "max-position-embeddings": "max_positions",
    "num-labels": "num_labels",
}


def encoder_config(options: TaskOptions) -> EncoderConfig:
    """The preset ``options`` name, with any shape field the options override."""
    name = str(options.get("preset", "bert-base"))
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    overrides = {
        field: int(options[key]) for key, field in _OPTION_FIELDS.items() if key in options
    }
    config = replace(PRESETS[name], **overrides)
    if min(vars(config).values()) < 1 or config.hidden % config.heads:
        raise ConfigError(f"bad encoder shapes {config} (all >= 1, heads must divide hidden)")
    return config


class SyntheticEncoderTask(Task):
    """A BERT-sized encoder on ``examples`` random token sequences per site (no real data)."""

    name = "synthetic-encoder"

    def __init__(self, options: TaskOptions | None = None) -> None:
        super().__init__(options)
        self.config = encoder_config(self.options)
        self.examples = int(self.options.get("examples", 4))
        self.seq_len = int(self.options.get("seq-len", 16))
        if not 1 <= self.seq_len <= self.config.max_positions or self.examples < 1:
            raise ConfigError(f"need examples >= 1 and 1 <= seq-len <= {self.config.max_positions}")

    def build_model(self) -> nn.Module:
        """A freshly initialised encoder, the same for the same ``seed`` option."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.options.get("seed", 0)))
            return Encoder(self.config)

    def train_loader(self, batch_size: int, seed: int) -> DataLoader:
        """``examples`` random sequences and labels, fixed per ``partition-id``."""
        generator = torch.Generator().manual_seed(1_000 + int(self.options.get("partition-id", 0)))
        tokens = torch.randint(
            self.config.vocab_size, (self.examples, self.seq_len), generator=generator
        )
        labels = torch.randint(self.config.num_labels, (self.examples,), generator=generator)
        order = torch.Generator().manual_seed(seed)
        return DataLoader(
            TensorDataset(tokens, labels), batch_size=batch_size, shuffle=True, generator=order
        )

    def num_train_examples(self) -> int:
        """The synthetic batch's size."""
        return self.examples

    def optimizer(self, params: Any, lr: float) -> torch.optim.Optimizer:
        """Plain SGD: no momentum buffer (a model-sized tensor) on the site."""
        return torch.optim.SGD(params, lr=lr)
