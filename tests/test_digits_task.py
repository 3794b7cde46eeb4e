import numpy as np
import pytest
import torch

from fedcommons.errors import ConfigError, UnknownTaskError
from fedcommons.tasks import load_task, select_device
from fedcommons.tasks.digits import DigitsTask, digits_split


def test_split_is_stratified_and_fixed() -> None:
    split = digits_split()
    assert (len(split.y_train), len(split.y_val), len(split.y_test)) == (1078, 359, 360)
    # every class is present in each split in close to the same proportion
    for labels in (split.y_val, split.y_test):
        counts = np.bincount(labels, minlength=10)
        assert counts.min() >= 30
    digits_split.cache_clear()
    again = digits_split()
    assert np.array_equal(again.y_val, split.y_val) and np.array_equal(again.x_test, split.x_test)


def test_demo_model_has_4810_parameters() -> None:
    model = DigitsTask().build_model()
    assert sum(p.numel() for p in model.parameters()) == 4810


def test_same_seed_gives_same_initial_weights() -> None:
    a = DigitsTask({"seed": 5}).build_model().state_dict()
    b = DigitsTask({"seed": 5}).build_model().state_dict()
    c = DigitsTask({"seed": 6}).build_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_partitions_split_the_training_set_among_institutions() -> None:
    task = DigitsTask({"num-partitions": 10, "alpha": 0.5, "seed": 0})
    parts = task.partitions()
    assert len(parts) == 10
    assert sum(len(p) for p in parts) == len(digits_split().y_train)
    one = DigitsTask({"num-partitions": 10, "alpha": 0.5, "seed": 0, "partition-id": 3})
    assert one.num_train_examples() == len(parts[3])


def test_train_loader_order_is_fixed_by_its_seed() -> None:
    task = DigitsTask({"partition-id": 0})
    first = [y for _, y in task.train_loader(batch_size=8, seed=1)]
    second = [y for _, y in task.train_loader(batch_size=8, seed=1)]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_wider_hidden_layers_give_a_larger_model() -> None:
    model = DigitsTask({"hidden": "256,256"}).build_model()
    assert sum(p.numel() for p in model.parameters()) > 80_000


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"alpha": 0}, "alpha must be > 0"),
        ({"num-partitions": 5000}, "5000 institutions but only 1078"),
        ({"partition-id": 10, "num-partitions": 10}, "outside"),
        ({"partition": "zipf"}, "partition must be"),
        ({"hidden": "64,x"}, "comma-separated integers"),
    ],
)
def test_bad_digits_options_are_config_errors(options: dict, message: str) -> None:
    """Inputs tried: alpha 0, 5000 institutions, partition-id out of range, unknown
    partitioner, non-integer hidden width."""
    with pytest.raises(ConfigError, match=message):
        DigitsTask(options)


def test_unknown_task_name_lists_known_tasks() -> None:
    """Input tried: task 'cifar' (not registered)."""
    with pytest.raises(UnknownTaskError, match="known tasks: bbc-news, digits, rotten-tomatoes"):
        load_task("cifar")


def test_task_reference_to_a_non_task_is_rejected() -> None:
    """Input tried: 'collections:OrderedDict' (importable, but not a Task)."""
    with pytest.raises(UnknownTaskError, match="not a Task subclass"):
        load_task("collections:OrderedDict")


def test_device_is_cpu_without_cuda() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device().type == expected
