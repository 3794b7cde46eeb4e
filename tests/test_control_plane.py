"""Only the Fleet API faces the network: a real coordinator, SuperNodes and run, on loopback.

`fedcommons coordinator start` puts the Fleet API on 127.0.0.2 (standing in for the
public address), the Control and runtime APIs on 127.0.0.1, and the Control API for
certificate-holding operators on 127.0.0.3. From the public address an outsider with the
CA certificate (all a SuperNode has) tries what the issue showed working: list nodes,
register an unlisted key, unregister an institution, submit a run (`flwr run`), call the
runtime API. Each fails; two allowlisted SuperNodes still join through that address and
a round runs. Every process is stopped by PID; every wait is bounded.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest
from flwr.proto.control_pb2 import ListNodesRequest, RegisterNodeRequest, UnregisterNodeRequest
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from fedcommons.engines import certs
from fedcommons.engines.superlink import _control_client
from fedcommons.releases.registry import Registry
from tests.conftest import BIN
from tests.processes import ProcessGroup, free_port, tail, wait_for_coordinator_ready

pytestmark = pytest.mark.slow
PUBLIC, LOCAL, OPERATOR = "127.0.0.2", "127.0.0.1", "127.0.0.3"


def _refused(call) -> str:
    """Run ``call``; return how it failed (it must fail)."""
    try:
        call()
    except httpx.HTTPStatusError as exc:
        return f"HTTP {exc.response.status_code}"
    except (httpx.TransportError, OSError) as exc:
        return type(exc).__name__
    raise AssertionError("the call succeeded")


def test_from_the_public_address_control_fails_while_supernodes_join_and_a_round_runs(
    tmp_path: Path, flower_env: dict[str, str]
) -> None:
    pki = tmp_path / "pki"
    certs.create_ca(pki)
    certs.create_server_cert(pki, [PUBLIC, OPERATOR])
    sites = [certs.create_node_keys(pki / "allow", f"site-{i}") for i in range(2)]
    rogue = certs.create_node_keys(pki / "rogue", "rogue")
    op_cert, op_key = certs.create_operator_cert(pki, "alice")
    ca = pki / "ca.pem"
    fleet_port, control_port, operator_port = free_port(), free_port(), free_port()
    registry = tmp_path / "registry"
    fc = str(BIN / "fedcommons")
    group = ProcessGroup(tmp_path, flower_env)
    try:
        coord, coord_log = group.start(
            "coordinator",
            [
                fc, "coordinator", "start",
                "--host", PUBLIC, "--port", str(fleet_port),
                "--control-port", str(control_port),
                "--operator-address", f"{OPERATOR}:{operator_port}",
                "--database", str(tmp_path / "link.db"),
                "--ssl-certfile", str(pki / "server.pem"),
                "--ssl-keyfile", str(pki / "server.key"),
                "--ssl-ca-certfile", str(ca),
                "--allowlist", str(pki / "allow"),
                "--metrics-port", "0",
            ],
        )  # fmt: skip
        ready = wait_for_coordinator_ready(coord_log, coord, timeout=180)
        assert ready["fleet"] == f"{PUBLIC}:{fleet_port}"
        assert ready["address"] == f"{LOCAL}:{control_port}"
        assert len(ready["allowlist"]["registered"]) == 2

        # the Control API on loopback works (so the refusals below mean something)
        local = _control_client(f"{LOCAL}:{control_port}", ca, False)
        nodes = {n.node_id for n in local.ListNodes(ListNodesRequest()).nodes_info}
        assert len(nodes) == 2
        victim = sorted(nodes)[0]

        # an outsider on the public address: every Control API call is refused
        public = _control_client(f"{PUBLIC}:{fleet_port}", ca, False)
        rogue_key = public_key_to_bytes(certs.load_node_public_key(rogue.public_key))
        outcomes = {
            "list": _refused(lambda: public.ListNodes(ListNodesRequest())),
            "register": _refused(
                lambda: public.RegisterNode(RegisterNodeRequest(public_key=rogue_key, name="x"))
            ),
            "unregister": _refused(
                lambda: public.UnregisterNode(UnregisterNodeRequest(node_id=victim))
            ),
        }
        assert outcomes == dict.fromkeys(outcomes, "HTTP 404"), outcomes
        runtime = httpx.post(
            f"https://{PUBLIC}:{fleet_port}/v1/runtime/get-run", verify=str(ca), timeout=10
        )
        assert runtime.status_code == 404 and "fleet address" in runtime.text
        outsider_submit = subprocess.run(
            [fc, "coordinator", "submit", "--superlink", f"{PUBLIC}:{fleet_port}",
             "--root-cert", str(ca), "--connection", "outsider", "--no-wait",
             "-c", f"registry={tmp_path / 'outsider-registry'}"],
            env=flower_env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert outsider_submit.returncode != 0, outsider_submit.stdout
        assert "flwr run failed" in outsider_submit.stderr

        # the operator address: Control API only, and only with a client certificate
        with_cert = _control_client(f"{OPERATOR}:{operator_port}", ca, False, (op_cert, op_key))
        assert {n.node_id for n in with_cert.ListNodes(ListNodesRequest()).nodes_info} == nodes
        without = _control_client(f"{OPERATOR}:{operator_port}", ca, False)
        assert _refused(lambda: without.ListNodes(ListNodesRequest())) in {
            "ConnectError",
            "ReadError",
            "RemoteProtocolError",
        }
        for client in (local, public, with_cert, without):
            client.close()

        # the institutions still join through the public address, and a round runs
        for i, site in enumerate(sites):
            group.start(
                f"site-{i}",
                [
                    fc, "client", "join", "--coordinator", f"{PUBLIC}:{fleet_port}",
                    "--root-cert", str(ca), "--key", str(site.private_key),
                    "--port", str(free_port()), "--max-wait-time", "60",
                    "-n", f"partition-id={i}", "-n", "num-partitions=2",
                ],
            )  # fmt: skip
        submit = subprocess.run(
            [fc, "coordinator", "submit", "--superlink", f"{LOCAL}:{control_port}",
             "--root-cert", str(ca), "--timeout", "400",
             "-c", "rounds=1", "-c", "min-clients=2", "-c", "local-epochs=1",
             "-c", "task.num-partitions=2", "-c", "node-wait-timeout=120",
             "-c", f"registry={registry}"],
            env=flower_env, capture_output=True, text=True, timeout=480,
        )  # fmt: skip
        logs = "\n".join(tail(p) for p in sorted(tmp_path.glob("*.log")))
        assert submit.returncode == 0, f"{submit.stdout}\n{submit.stderr}\n{logs}"
        status = json.loads(submit.stdout[submit.stdout.index("{") :])
        assert status["status"] == "finished:completed"
        # nothing the outsider tried changed the registered nodes
        local = _control_client(f"{LOCAL}:{control_port}", ca, False)
        assert {n.node_id for n in local.ListNodes(ListNodesRequest()).nodes_info} == nodes
        local.close()
    finally:
        group.stop_all()
    assert group.alive() == []
    (release,) = Registry(registry, create=False).releases()
    assert release.manifest().round_metrics[0]["accepted"] == 2
