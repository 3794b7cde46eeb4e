"""The coordinator as a service over loopback: TLS, SuperNode authentication, audit log.

`fedcommons coordinator start` (SuperLink with TLS and an allowlist of three node keys),
three `fedcommons client join` SuperNodes (warm ClientApp workers, the default mode),
three rounds submitted with `fedcommons coordinator submit`; a node with an unlisted key
and a node that does not trust the coordinator's CA are turned away; one SuperNode is
SIGKILLed mid-round 3, which closes at its deadline with the other two (min-clients 2)
and the release is published. Every process is stopped by PID.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fedcommons.engines import certs
from fedcommons.observability import audit_log
from fedcommons.releases.registry import Registry
from tests.conftest import BIN
from tests.processes import (
    ProcessGroup,
    _descendants,
    free_port,
    tail,
    wait_for_coordinator_ready,
    wait_for_port,
)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
#: Seconds the doomed site's training waits: the kill lands inside this window.
TRAIN_DELAY = 4
ROUND_TIMEOUT = 30


def _scrape_while_running(proc: subprocess.Popen, port: int, timeout: float) -> dict[str, float]:
    """The last successful scrape of 127.0.0.1:port/metrics before ``proc`` exits."""
    import urllib.error
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    last: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
            continue
        last = {
            s.name: s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
            if not s.labels
        }
        time.sleep(0.3)
    return last


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _kill_supernode_in_round(
    join: subprocess.Popen, log: Path, round_no: int, timeout: float, killed: dict
) -> None:
    """SIGKILL (by PID) the SuperNode of ``join`` once it received round ``round_no``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and join.poll() is None:
        if f"ROUND {round_no}]" in log.read_text(errors="replace"):
            for pid in _descendants(join.pid):
                if "flower-supernode" in _cmdline(pid):
                    os.kill(pid, signal.SIGKILL)
                    killed["supernode"] = pid
                elif "fedcommons.client_sdk.warm" in _cmdline(pid):
                    killed["worker"] = pid
            return
        time.sleep(0.05)


def _wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return -999


def test_tls_and_node_auth_three_nodes_three_rounds_and_intruders_rejected(
    tmp_path: Path, flower_env: dict[str, str]
) -> None:
    pki = tmp_path / "pki"
    certs.create_ca(pki)
    certs.create_server_cert(pki)
    for i in range(3):
        certs.create_node_keys(pki / "allow", f"site-{i}")
    rogue = certs.create_node_keys(pki / "rogue", "rogue")
    other = tmp_path / "other-ca"
    certs.create_ca(other)

    registry = tmp_path / "registry"
    audit = tmp_path / "audit.jsonl"
    link_port = free_port()
    control_port = free_port()
    metrics_port = free_port()
    (tmp_path / "coordinator.toml").write_text(
        "\n".join(
            [
                'host = "127.0.0.1"',
                f"port = {link_port}",
                f"control_port = {control_port}",
                f'database = "{tmp_path / "link.db"}"',
                f'ssl_certfile = "{pki / "server.pem"}"',
                f'ssl_keyfile = "{pki / "server.key"}"',
                f'ssl_ca_certfile = "{pki / "ca.pem"}"',
                f'allowlist = ["{pki / "allow"}"]',
                f"metrics_port = {metrics_port}",
                f'audit_log = "{audit}"',
            ]
        )
        + "\n"
    )
    fc = str(BIN / "fedcommons")
    # the doomed site's Task (tests/slow_site.py) must be importable in its processes
    flower_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), flower_env.get("PYTHONPATH", "")) if p
    )
    group = ProcessGroup(tmp_path, flower_env)
    submit: subprocess.Popen | None = None
    killer: threading.Thread | None = None
    killed: dict[str, int] = {}
    try:
        coord, coord_log = group.start(
            "coordinator",
            [fc, "coordinator", "start", "--config", str(tmp_path / "coordinator.toml")],
        )
        ready = wait_for_coordinator_ready(coord_log, coord)
        assert ready["tls"] and ready["node_auth"]
        assert len(ready["allowlist"]["registered"]) == 3

        def join(name: str, key: Path, root: Path, *extra: str) -> tuple:
            port = free_port()
            proc, log = group.start(
                name,
                [
                    fc,
                    "client",
                    "join",
                    "--coordinator",
                    f"127.0.0.1:{link_port}",
                    "--root-cert",
                    str(root),
                    "--key",
                    str(key),
                    "--port",
                    str(port),
                    "--max-wait-time",
                    "30",
                    *extra,
                ],
            )
            return proc, log, port

        intruder, intruder_log, _ = join("intruder", rogue.private_key, pki / "ca.pem")
        stranger, stranger_log, _ = join("no-ca", pki / "allow" / "site-0.key", other / "ca.pem")
        sites = []
        for i in range(3):
            slow = ["--task", "tests.slow_site:SlowDigitsTask", "-n", f"train-delay={TRAIN_DELAY}"]
            proc, log, port = join(
                f"site-{i}",
                pki / "allow" / f"site-{i}.key",
                pki / "ca.pem",
                "-n",
                f"partition-id={i}",
                "-n",
                "num-partitions=3",
                *(slow if i == 2 else []),
            )
            wait_for_port(port, proc, log, timeout=180)  # 2 shared cores: imports are slow
            sites.append((proc, log))

        assert _wait_exit(intruder, 60) not in (0, -999), tail(intruder_log)
        assert "Failed to activate SuperNode" in intruder_log.read_text()
        assert _wait_exit(stranger, 60) not in (0, -999), tail(stranger_log)
        assert "CERTIFICATE_VERIFY_FAILED" in stranger_log.read_text()

        submit = subprocess.Popen(
            [
                fc,
                "coordinator",
                "submit",
                "--superlink",
                f"127.0.0.1:{control_port}",  # the Control API, on the coordinator host
                "--root-cert",
                str(pki / "ca.pem"),
                "--timeout",
                "400",
                "-c",
                "rounds=3",
                "-c",
                "min-clients=2",
                "-c",
                f"round-timeout={ROUND_TIMEOUT}",
                "-c",
                "local-epochs=1",
                "-c",
                "task.num-partitions=3",
                "-c",
                f"registry={registry}",
                "-c",
                "node-wait-timeout=60",
            ],
            env=flower_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # site-2 dies (SIGKILL by PID) while round 3 waits for its reply
        killer = threading.Thread(
            target=_kill_supernode_in_round, args=(*sites[2], 3, 400, killed), daemon=True
        )
        killer.start()
        # The ServerApp process serves /metrics while the run lasts: scrape it meanwhile.
        scraped = _scrape_while_running(submit, metrics_port, timeout=480)
        out, err = submit.communicate(timeout=60)
        logs = "\n".join(tail(p) for p in sorted(tmp_path.glob("*.log")))
        assert submit.returncode == 0, f"{out}\n{err}\n{logs}"
        status = json.loads(out[out.index("{") :])
        assert status["status"] == "finished:completed"
        killer.join(timeout=5)
        assert "supernode" in killed, tail(sites[2][1])
        # its `client join` noticed, stopped its warm worker and exited with an error
        assert _wait_exit(sites[2][0], 30) not in (0, -999), tail(sites[2][1])
        assert "worker" in killed and not _cmdline(killed["worker"])  # gone, not orphaned
        assert all(proc.poll() is None for proc, _ in sites[:2])  # the others serve on
    finally:
        if submit is not None and submit.poll() is None:
            submit.kill()  # by PID; it started no server of its own
            submit.wait(timeout=10)
        group.stop_all()
    assert group.alive() == []

    releases = Registry(registry, create=False).releases()
    assert [r.version for r in releases] == ["1.0.0"]
    manifest = releases[0].manifest()
    # round 3 closed at its deadline with the two surviving sites; the kill shows as
    # a missing reply
    assert [r["accepted"] for r in manifest.round_metrics] == [3, 3, 2]
    assert [r["timed_out"] for r in manifest.round_metrics] == [0, 0, 1]
    assert manifest.round_metrics[2]["seconds"] >= ROUND_TIMEOUT - 1
    assert manifest.contributors == 3

    assert scraped.get("fedcommons_updates_received_total", 0) >= 3, scraped
    assert scraped.get("fedcommons_upload_bytes_total", 0) > 0

    records = list(audit_log.read(audit))
    assert [(r["action"], r["round"]) for r in records] == [
        ("run.start", None),
        ("round.finish", 1),
        ("round.commit", 1),
        ("round.finish", 2),
        ("round.commit", 2),
        ("round.finish", 3),
        ("round.commit", 3),
        ("release.publish", None),
        ("run.end", None),
    ]
    assert records[-2]["release"] == "digits 1.0.0"
    assert audit_log.verify(audit) == 9
