"""The validation gate: suites, policy, fingerprints, devices."""

from __future__ import annotations

import pytest
import torch

from fedcommons.errors import ConfigError
from fedcommons.releases.gate import (
    ValidationSuite,
    ValidationTask,
    default_suite,
    fingerprint_loader,
    load_suite,
    run_gate,
)
from fedcommons.tasks.digits import DigitsTask


def impossible_suite(task: DigitsTask) -> ValidationSuite:
    """A suite no model passes: accuracy must exceed 1 (used by the pipeline tests)."""
    return ValidationSuite(
        "impossible",
        (
            ValidationTask(
                "accuracy", "digits/validation", task.validation_loader, "accuracy", floor=1.01
            ),
        ),
    )


@pytest.fixture(scope="module")
def trained() -> dict[str, torch.Tensor]:
    """Digits MLP trained centrally for a few epochs (about a second)."""
    task = DigitsTask()
    model = task.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):
        for x, y in task.train_loader(32, seed=0):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _broken(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in w.items()}
    out["net.2.weight"].zero_()
    return out


def test_builtin_digits_suite_scores_the_validation_split() -> None:
    task = DigitsTask()
    suite = load_suite(task)
    assert suite.name == "digits-builtin"
    assert [t.name for t in suite.tasks] == ["accuracy", "loss", "worst-class-accuracy"]
    assert [t.target for t in suite.tasks] == [True, False, False]


def test_candidate_equal_to_parent_passes_with_results_per_task(
    trained: dict[str, torch.Tensor],
) -> None:
    task = DigitsTask()
    report = run_gate(task, default_suite(task), trained, parent=trained, parent_version="1.0.0")
    assert report.passed and report.parent_source == "recomputed"
    acc = report.tasks[0]
    assert acc.candidate > 0.8 and acc.worse_by == 0
    assert acc.device == "cpu" and acc.seconds > 0 and acc.examples == 359


def test_degraded_candidate_is_rejected_with_reasons(trained: dict[str, torch.Tensor]) -> None:
    """Input: the trained model with its output layer zeroed."""
    task = DigitsTask()
    report = run_gate(task, default_suite(task), _broken(trained), parent=trained)
    assert not report.passed
    assert any("accuracy: target task got worse" in r for r in report.reasons)
    assert any(r.startswith("loss: degraded") for r in report.reasons)


def test_target_policy_no_worse_versus_tolerance(trained: dict[str, torch.Tensor]) -> None:
    task = DigitsTask()
    loader = task.validation_loader
    tasks = (ValidationTask("acc", "v", loader, "accuracy", tolerance=1.0, target=True),)
    strict = run_gate(task, ValidationSuite("s", tasks), _broken(trained), parent=trained)
    loose = run_gate(
        task, ValidationSuite("s", tasks, "tolerance"), _broken(trained), parent=trained
    )
    assert not strict.passed and loose.passed
    assert loose.degraded_tasks == ["acc"]


def test_first_release_without_parent_is_recorded_not_compared(
    trained: dict[str, torch.Tensor],
) -> None:
    task = DigitsTask()
    report = run_gate(task, default_suite(task), _broken(trained))
    assert report.passed and report.parent_source == "none"
    assert all(t.parent is None for t in report.tasks)


def test_first_release_must_beat_its_starting_weights(trained: dict[str, torch.Tensor]) -> None:
    """Input: a candidate equal to the starting weights (chance level), then a trained one."""
    task = DigitsTask()
    start = {k: v.detach().clone() for k, v in task.build_model().state_dict().items()}
    same = run_gate(task, default_suite(task), start, start=start)
    assert not same.passed and same.parent_source == "start"
    assert any("accuracy: does not beat the starting weights" in r for r in same.reasons)
    better = run_gate(task, default_suite(task), trained, start=start)
    assert better.passed and better.parent_source == "start"
    acc = better.tasks[0]
    assert acc.parent == pytest.approx(same.tasks[0].candidate)
    assert acc.candidate - acc.parent > acc.tolerance
    assert better.degraded_tasks == []  # the starting weights are no parent to regress from


def test_parent_with_other_architecture_uses_its_recorded_values(
    trained: dict[str, torch.Tensor],
) -> None:
    """Parent weights that do not load (different hidden size) fall back to its manifest."""
    task = DigitsTask()
    suite = default_suite(task)
    recorded = run_gate(task, suite, trained).to_dict()
    other = DigitsTask({"hidden": "32"}).build_model().state_dict()
    report = run_gate(task, suite, trained, parent=other, parent_validation=recorded)
    assert report.parent_source == "manifest" and report.passed
    assert report.tasks[0].parent == pytest.approx(report.tasks[0].candidate)


def test_floor_rejects_even_without_parent(trained: dict[str, torch.Tensor]) -> None:
    report = run_gate(DigitsTask(), impossible_suite(DigitsTask()), trained)
    assert not report.passed and "beyond the floor" in report.reasons[0]


def test_fingerprints_name_the_exact_data() -> None:
    task = DigitsTask()
    val = fingerprint_loader(task.validation_loader())
    assert val == fingerprint_loader(task.validation_loader())
    assert val != fingerprint_loader(task.test_loader())
    report = run_gate(task, default_suite(task), task.build_model().state_dict())
    assert report.fingerprints == {"digits/validation": val}
    rebatched = torch.utils.data.DataLoader(task.validation_loader().dataset, batch_size=7)
    assert fingerprint_loader(rebatched) == val


def test_bad_suite_definitions_are_config_errors() -> None:
    """Input: unknown metric, repeated task names, unknown policy, unimportable reference."""
    task = DigitsTask()
    loader = task.validation_loader
    with pytest.raises(ConfigError, match="unknown metric"):
        ValidationSuite("s", (ValidationTask("a", "v", loader, "f1-score"),))
    with pytest.raises(ConfigError, match="repeat"):
        ValidationSuite("s", (ValidationTask("a", "v", loader), ValidationTask("a", "v", loader)))
    with pytest.raises(ConfigError, match="target policy"):
        ValidationSuite("s", (), "maybe")
    with pytest.raises(ConfigError, match="cannot be imported"):
        load_suite(task, "no_such_module:suite")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gate_runs_on_cuda_when_present(trained: dict[str, torch.Tensor]) -> None:
    task = DigitsTask()
    report = run_gate(task, default_suite(task), trained, parent=trained)
    assert report.device.startswith("cuda") and report.passed
