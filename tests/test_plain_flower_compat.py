"""A genuine Flower-quickstart ClientApp contributes to a fedcommons round (issue #8).

The quickstart app (benchmarks/plain_flower_app.py, also the plain-Flower baseline of
the latency benchmark) trains with torch and replies with its full weights under
``arrays`` and a ``num-examples`` metric; it knows nothing of fedcommons' wire format.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.plain_flower_app import clientapp as quickstart_client

from fedcommons.client_sdk.client_app import app as fedcommons_client
from fedcommons.coordinator.config import RunConfig
from fedcommons.engines.inprocess import run_in_process


def test_quickstart_clients_train_the_model_as_dense_updates(tmp_path: Path) -> None:
    config = RunConfig(rounds=2, local_epochs=1, registry=str(tmp_path / "reg"))
    result = run_in_process(config, [quickstart_client, fedcommons_client, quickstart_client])
    assert [(r.accepted, r.rejected, r.timed_out) for r in result.reports] == [(3, {}, 0)] * 2
    # the quickstart replies weigh in with their num-examples, like fedcommons' own
    assert result.reports[0].examples == result.reports[1].examples > 0
    assert result.release.manifest().contributors == 3
    assert result.reports[-1].val_accuracy > 0.5  # from a 0.1-accuracy random start
