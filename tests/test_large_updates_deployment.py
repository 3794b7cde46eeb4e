"""A 22.5M-parameter model's dense updates through Flower's deployment engine, intact."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from benchmarks.large_model_task import SyntheticEncoderTask

from fedcommons.client_sdk.training import train_local
from fedcommons.engines.submission import submit_run, write_connection, write_flower_app
from fedcommons.releases.registry import Registry
from tests.conftest import BIN
from tests.processes import ProcessGroup, free_port, start_superlink, tail, wait_for_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TASK = "benchmarks.large_model_task:SyntheticEncoderTask"
NODES = 2


def test_two_sites_dense_90_mb_updates_cross_the_deployment_engine_intact(
    tmp_path: Path, flower_env: dict[str, str]
) -> None:
    """One round, two warm sites, bert-mini (22,459,906 parameters: 90 MB per message each way).

    The published weights must be θ0 plus the mean of the two sites' deltas, recomputed
    here from the same seeds (to 1e-6: the sites train in other processes with their own
    thread counts): every byte went through Flower's 5 MB chunks, the coordinator's
    one-reply-at-a-time pull and its array assembly. A dropped, repeated or misplaced
    chunk, a reply assembled into the wrong array, or a site's reply counted twice
    changes whole tensors, far beyond that tolerance.
    """
    flower_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), flower_env.get("PYTHONPATH", "")) if p
    )
    registry = tmp_path / "registry"
    group = ProcessGroup(tmp_path, flower_env)
    try:
        link_port = start_superlink(group, BIN, ":flwr-in-memory:", timeout=120)
        for i in range(NODES):
            port = free_port()
            proc, log = group.start(
                f"site-{i}",
                [
                    str(BIN / "fedcommons"),
                    "client",
                    "join",
                    "--insecure",
                    "--coordinator",
                    f"127.0.0.1:{link_port}",
                    "--port",
                    str(port),
                    "--task",
                    TASK,
                    *("-n", f"partition-id={i}", "-n", "preset=bert-mini"),
                ],
            )
            wait_for_port(port, proc, log, timeout=180)
        write_connection("large", f"127.0.0.1:{link_port}", insecure=True)
        app = write_flower_app(
            tmp_path,
            {
                "rounds": 1,
                "min-clients": NODES,
                "task": TASK,
                "task.preset": "bert-mini",
                "task.num-partitions": NODES,
                "registry": str(registry),
                "node-wait-timeout": 180,
                "round-timeout": 900,
                "local-epochs": 1,
                "lr": 0.01,
                "batch-size": 4,
            },
        )
        status = submit_run(app, "large", timeout=1200)
        logs = "\n".join(tail(p) for p in sorted(tmp_path.glob("*.log")))
        assert status["status"] == "finished:completed", f"{status}\n{logs}"
    finally:
        group.stop_all()
    assert group.alive() == []

    release = Registry(registry, create=False).releases()[0]
    manifest = release.manifest()
    assert manifest.num_parameters == 22_459_906
    (round_one,) = manifest.round_metrics
    assert (round_one["accepted"], round_one["rejected"]) == (NODES, {})
    assert all(b > 89_000_000 for b in round_one["upload_bytes"].values())

    task = SyntheticEncoderTask({"preset": "bert-mini"})
    base = {k: v.detach().clone() for k, v in task.build_model().state_dict().items()}
    deltas = []
    for i in range(NODES):
        site = SyntheticEncoderTask({"preset": "bert-mini", "partition-id": i})
        seed = 0 * 1_000_003 + 1 * 7919 + i  # the ClientApp's seed for round 1
        deltas.append(train_local(site, base, epochs=1, lr=0.01, batch_size=4, seed=seed).delta)
    # the check below must be able to tell a lost or halved update from the right one
    assert all(max(d.abs().max().item() for d in delta.values()) > 1e-3 for delta in deltas)
    published = Registry(registry, create=False).load_weights(release)
    assert published.keys() == base.keys()
    for name, theta0 in base.items():
        expected = theta0 + (deltas[0][name] + deltas[1][name]) / 2
        assert torch.allclose(published[name], expected, rtol=0, atol=1e-6), name
