import numpy as np
import pytest

from fedcommons.errors import ConfigError
from fedcommons.tasks.partition import dirichlet_partition, iid_partition

LABELS = np.repeat(np.arange(10), 100)


def test_dirichlet_partition_is_deterministic_for_a_seed() -> None:
    a = dirichlet_partition(LABELS, 10, alpha=0.5, seed=3)
    b = dirichlet_partition(LABELS, 10, alpha=0.5, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_dirichlet_partition_covers_every_example_exactly_once() -> None:
    parts = dirichlet_partition(LABELS, 7, alpha=0.3, seed=0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(LABELS)))


def test_small_alpha_skews_labels_more_than_large_alpha() -> None:
    def mean_classes_per_partition(alpha: float) -> float:
        parts = dirichlet_partition(LABELS, 10, alpha=alpha, seed=1, min_size=1)
        # classes holding at least 5% of the partition
        counts = [np.bincount(LABELS[p], minlength=10) / len(p) for p in parts]
        return float(np.mean([(c >= 0.05).sum() for c in counts]))

    assert mean_classes_per_partition(0.1) < mean_classes_per_partition(100.0) - 3


def test_dirichlet_partition_gives_every_partition_min_size() -> None:
    parts = dirichlet_partition(LABELS, 50, alpha=0.05, seed=0, min_size=5, max_draws=1)
    assert min(len(p) for p in parts) >= 5


def test_iid_partition_sizes_differ_by_at_most_one() -> None:
    parts = iid_partition(1003, 10, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1003


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_non_positive_alpha_is_a_config_error(alpha: float) -> None:
    """Input tried: alpha = 0 and alpha = -1."""
    with pytest.raises(ConfigError, match="alpha must be > 0"):
        dirichlet_partition(LABELS, 10, alpha=alpha, seed=0)


def test_more_partitions_than_examples_is_a_config_error() -> None:
    """Input tried: 11 institutions for 10 examples."""
    with pytest.raises(ConfigError, match="11 institutions but only 10"):
        iid_partition(10, 11, seed=0)
