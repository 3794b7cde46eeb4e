"""Institutions never import code the coordinator chose: the task is the site's decision."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedcommons.client_sdk.client_app import app as client_app
from fedcommons.client_sdk.site_tasks import site_task_ref
from fedcommons.coordinator.config import RunConfig
from fedcommons.engines.inprocess import run_in_process
from fedcommons.errors import TaskRefusedError

SIDE_EFFECT = """
from pathlib import Path
Path(__file__).with_name("IMPORTED").write_text("the coordinator ran code here")
from fedcommons.tasks.digits import DigitsTask as Task
"""


@pytest.fixture
def planted_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable module that leaves a marker file when imported."""
    (tmp_path / "planted_task.py").write_text(SIDE_EFFECT)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / "IMPORTED"


def test_a_round_naming_a_module_the_site_did_not_allow_is_refused_before_import(
    planted_module: Path,
) -> None:
    """Input tried: round task 'planted_task:Task' at a site with no task configured."""
    with pytest.raises(TaskRefusedError, match="planted_task:Task"):
        site_task_ref("planted_task:Task", {"partition-id": 0})
    assert not planted_module.exists() and "planted_task" not in sys.modules


def test_a_site_with_its_own_task_refuses_another_module_reference(planted_module: Path) -> None:
    """Input tried: round task 'planted_task:Task' at a site pinned to tests.slow_site."""
    site = {"task": "tests.slow_site:SlowDigitsTask"}
    with pytest.raises(TaskRefusedError, match="trains its own task"):
        site_task_ref("planted_task:Task", site)
    assert not planted_module.exists()


def test_a_site_with_its_own_task_serves_rounds_of_a_built_in_task_with_it() -> None:
    """Input tried: round task 'digits' (or none) at a site pinned to its own digits variant."""
    site = {"task": "tests.slow_site:SlowDigitsTask"}
    assert site_task_ref("digits", site) == "tests.slow_site:SlowDigitsTask"
    assert site_task_ref(None, site) == "tests.slow_site:SlowDigitsTask"


def test_the_site_allowlist_admits_a_module_reference_it_names() -> None:
    """Input tried: allowed-tasks = 'tests.slow_site:SlowDigitsTask, other' in the node config."""
    site = {"allowed-tasks": "tests.slow_site:SlowDigitsTask, other"}
    assert site_task_ref("tests.slow_site:SlowDigitsTask", site) == (
        "tests.slow_site:SlowDigitsTask"
    )
    assert site_task_ref(None, {}) == "digits"


def test_a_refusing_site_gets_counted_as_task_refused_and_the_round_goes_on(
    tmp_path: Path,
) -> None:
    """Input tried: a run of tests.slow_site:SlowDigitsTask; 1 of 3 sites allows only digits."""
    config = RunConfig(
        task="tests.slow_site:SlowDigitsTask",
        rounds=1,
        local_epochs=1,
        registry=str(tmp_path / "reg"),
    )
    sites = [{}, {}, {"allowed-tasks": "digits"}]
    result = run_in_process(config, [client_app] * 3, node_configs=sites)
    report = result.reports[0]
    assert report.rejected == {"task-refused": 1} and report.accepted == 2
