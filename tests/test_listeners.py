"""The path gate in front of each SuperLink listener: what passes, what is a 404."""

from __future__ import annotations

import asyncio

import pytest

from fedcommons.engines.listeners import CONTROL_PREFIX, FLEET_PREFIX, PathGate, is_loopback


async def _app(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"app"})


def _call(gate: PathGate, path: str) -> int:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(gate({"type": "http", "path": path}, receive, send))
    return sent[0]["status"]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/control/list-nodes",
        "/v1/runtime/get-run",
        "/v1/fleet/../control/list-nodes",
        "/v1/fleet//../control/start-run",
        "/v1/fleet/./push-messages",
        "/docs",
        "/v1/fleet",
    ],
)
def test_the_fleet_listener_answers_404_to_anything_but_a_normal_fleet_path(path: str) -> None:
    """Input tried: Control, runtime, traversal, dot and docs paths on the fleet listener."""
    assert _call(PathGate(_app, (FLEET_PREFIX,), "fleet"), path) == 404


def test_the_fleet_listener_passes_fleet_calls_to_the_app() -> None:
    """Input tried: /v1/fleet/pull-messages."""
    assert _call(PathGate(_app, (FLEET_PREFIX,), "fleet"), "/v1/fleet/pull-messages") == 200


def test_the_operator_listener_passes_only_the_control_api() -> None:
    """Input tried: a Control call and a runtime call on the operator listener."""
    gate = PathGate(_app, (CONTROL_PREFIX,), "operator")
    assert _call(gate, "/v1/control/list-nodes") == 200
    assert _call(gate, "/v1/runtime/get-run") == 404


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True),
     ("0.0.0.0", False), ("10.0.0.5", False), ("coord.example.org", False)],
)  # fmt: skip
def test_loopback_addresses_are_recognised(host: str, loopback: bool) -> None:
    """Input tried: loopback, wildcard, private and DNS addresses."""
    assert is_loopback(host) is loopback
