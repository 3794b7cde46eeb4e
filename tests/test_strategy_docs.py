"""The strategy docs and the example plugin stay true: their code runs and passes the kit."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from fedcommons.strategies import testing
from tests.plugin_env import EXAMPLE_PLUGIN_SRC

ROOT = Path(__file__).resolve().parents[1]


def test_write_a_strategy_examples_pass_the_conformance_kit() -> None:
    text = (ROOT / "docs" / "write-a-strategy.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    namespace: dict[str, object] = {}
    source = "\n".join(b for b in blocks if "def majority_sign" in b or "class SignMajority" in b)
    exec(compile(source, "write-a-strategy.md", "exec"), namespace)
    streaming = testing.run_conformance(namespace["SignMajority"])
    assert "check_state_is_o_model" in streaming
    buffered = testing.run_conformance(namespace["majority_sign"])
    assert "streaming = False" in buffered.skipped["check_state_is_o_model"]


def test_example_plugin_own_tests_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLE_PLUGIN_SRC))
    path = EXAMPLE_PLUGIN_SRC.parent / "tests" / "test_geomed.py"
    spec = importlib.util.spec_from_file_location("example_plugin_tests", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = [getattr(module, n) for n in dir(module) if n.startswith("test_")]
    assert len(tests) >= 2
    for test in tests:
        test()


def test_the_documented_parameter_check_refuses_a_bad_value_at_creation() -> None:
    import pytest

    from fedcommons.errors import ConfigError

    text = (ROOT / "docs" / "write-a-strategy.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "check=_check" in b]
    namespace: dict[str, object] = {}
    exec(
        compile(
            "import torch\nfrom fedcommons.strategies import strategy\n" + block, "doc", "exec"
        ),
        namespace,
    )
    with pytest.raises(ConfigError, match="must be >= 0"):
        namespace["multi_krum"].aggregator(f=-1)  # type: ignore[attr-defined]
    assert namespace["multi_krum"].aggregator(f=2).params() == {"f": 2}  # type: ignore[attr-defined]
