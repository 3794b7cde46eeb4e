"""``fedcommons secagg plan``: the planner's figures are the protocol's real ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedcommons.coordinator.config import RunConfig
from fedcommons.coordinator.secure_round import _request, plan_round, ring_for_round
from fedcommons.privacy.secagg import ClientSession, RoundParams, ServerSession
from fedcommons.privacy.secagg.quantize import to_ring
from fedcommons.wire import keys
from fedcommons.wire.codec import CompressionSpec
from tests.cli_helpers import run_cli


def test_plan_reports_graph_threshold_and_ring(capsys: pytest.CaptureFixture[str]) -> None:
    """100 clients, num-shares 15: 14 neighbours, threshold 11, a 41-bit ring for fp32."""
    code, out, _ = run_cli(
        [
            "secagg",
            "plan",
            "--clients",
            "100",
            "--params",
            "100000",
            "-c",
            "secagg-num-shares=15",
            "--format",
            "json",
        ],
        capsys,
    )
    assert code == 0
    plan = json.loads(out)
    assert (plan["neighbours"], plan["threshold"], plan["ring_bits"]) == (14, 11, 41)
    assert 1.2 < plan["upload_vs_dense_fp32"] < 1.35


def test_plan_refuses_a_leaking_strategy(capsys: pytest.CaptureFixture[str]) -> None:
    """Input: -c strategy=median. Exit code 2 and the reason, on one line."""
    code, _, err = run_cli(
        ["secagg", "plan", "--clients", "10", "--params", "1000", "-c", "strategy=median"],
        capsys,
    )
    assert code == 2
    assert "SecAggIncompatibleError" in err and "individual update" in err


def test_plan_bytes_equal_the_real_messages_of_a_round() -> None:
    """A real 6-client round (complete graph): client 1's serialized messages, stage by stage."""
    config = RunConfig.from_flat({"secagg": True, "compression": "int8", "secagg-clip": 0.1})
    n, d = 6, 3000
    plan = plan_round(config, n, d)
    ring = ring_for_round(config, CompressionSpec.parse(config.compression), n)
    params = RoundParams("0123456789abcdef", 1, n, 0, plan["threshold"], 5, ring, d)
    clients = {i: ClientSession(params, i) for i in range(1, n + 1)}
    server = ServerSession(params)

    def size(rd: RecordDict) -> int:
        return recorddict_to_proto(rd).ByteSize()

    def reply(stage: str, payload: dict) -> RecordDict:
        return RecordDict({keys.SECAGG_RECORD: ConfigRecord({keys.SECAGG_STAGE: stage, **payload})})

    up: dict[str, int] = {}
    down: dict[str, int] = {}
    down["advertise-keys"] = size(
        _request("advertise-keys", {**params.to_record(), keys.SECAGG_INDEX: 1}, 1)
    )
    for i, c in clients.items():
        payload = c.advertise()
        up["advertise-keys"] = up.get("advertise-keys") or size(reply("advertise-keys", payload))
        server.add_advertise(i, payload)
    for i, req in server.share_keys_requests().items():
        payload = clients[i].share_keys(req)
        if i == 1:
            down["share-keys"] = size(_request("share-keys", req, 1))
            up["share-keys"] = size(reply("share-keys", payload))
        server.add_shares(i, payload)
    for i, req in server.masked_input_requests().items():
        vec = to_ring(np.zeros(d, dtype=np.int64), 1, [1, 0], ring)
        payload = clients[i].masked_input(req, vec)
        if i == 1:
            down["masked-input"] = size(
                _request(
                    "masked-input", {**req, keys.SECAGG_DP_CLIP: 0.0, keys.SECAGG_DP_NOISE: 0.0}, 1
                )
            )
            up["masked-input"] = size(reply("masked-input", payload))
        server.add_masked(i, payload)
    for i, req in server.unmask_requests().items():
        payload = clients[i].unmask(req)
        if i == 1:
            down["unmask"] = size(_request("unmask", req, 1))
            up["unmask"] = size(reply("unmask", payload))
    assert plan["upload_bytes"] == up
    assert plan["download_bytes"] == down


def test_keygen_and_signed_roster_from_the_installed_executable(tmp_path) -> None:
    """`fedcommons secagg keygen` (the consortium key) and `secagg roster --sign-with` as
    subprocesses: the roster file loads with the consortium key pinned; a second keygen onto
    an existing key exits non-zero and leaves the key as it was."""
    import subprocess

    from fedcommons.privacy.secagg.roster import Roster, new_signing_key
    from tests.conftest import BIN

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "fedcommons"), "secagg", *args],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    public = {n: new_signing_key(tmp_path / f"{n}.pem") for n in ("site-a", "site-b", "site-c")}
    run = cli("keygen", "--out", str(tmp_path / "consortium.pem"))
    assert run.returncode == 0, run.stderr
    public["consortium"] = run.stdout.strip()
    members = [f"-m{n}={public[n]}" for n in ("site-a", "site-b", "site-c")]
    run = cli(
        "roster",
        "--consortium",
        "test",
        *members,
        "--sign-with",
        str(tmp_path / "consortium.pem"),
        "--out",
        str(tmp_path / "roster.json"),
    )
    assert run.returncode == 0, run.stderr
    roster = Roster.load(tmp_path / "roster.json", public["consortium"])
    assert sorted(roster.members) == ["site-a", "site-b", "site-c"]
    before = (tmp_path / "site-a.pem").read_bytes()
    again = cli("keygen", "--out", str(tmp_path / "site-a.pem"))
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr
    assert (tmp_path / "site-a.pem").read_bytes() == before
