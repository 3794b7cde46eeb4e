"""The SuperLink with its APIs split across listeners: only the Fleet API faces the network.

Flower 1.41's ``flower-superlink`` serves its Fleet API (what SuperNodes call), Control
API (list, register and unregister nodes, start runs: ``flwr`` and our allowlist sync)
and runtime API (the ServerApp processes) from one FastAPI app on one ``--host:--port``.
Whoever can reach that port can use the Control API without any credential.

``python -m fedcommons.engines.listeners`` runs the same Flower app (Flower's own argument
parsing, lifespan, routers and middlewares) behind separate sockets:

- the *local* listener, on a loopback address (``--host``/``--port`` of the Flower
  arguments): every API; the SuperLink's own ServerApp processes and the coordinator
  host's operator tools use it;
- the *fleet* listener (``--fleet-address``, the address SuperNodes dial, e.g.
  ``0.0.0.0:9093``): only ``/v1/fleet/...``; everything else is answered 404;
- optionally an *operator* listener (``--operator-address``): only ``/v1/control/...``,
  and only for clients presenting a certificate signed by ``--operator-client-ca``
  (TLS client authentication; the handshake fails without one).

All listeners share one process, one app, one state and the TLS server certificate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import posixpath
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

FLEET_PREFIX = "/v1/fleet/"
CONTROL_PREFIX = "/v1/control/"


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); raises ValueError."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PathGate:
    """An ASGI wrapper that serves only paths under ``prefixes``; anything else is a 404.

    Paths that are not in normal form (``..``, ``.``, ``//`` segments) are refused too, so
    nothing behind the gate ever sees a path that could be read as another API's.
    """

    def __init__(self, app: ASGIApp, prefixes: tuple[str, ...], listener: str) -> None:
        self.app, self.prefixes, self.listener = app, prefixes, listener

    def allows(self, path: str) -> bool:
        """Whether ``path`` may pass the gate."""
        normal = posixpath.normpath(path) == path and "//" not in path
        return normal and path.startswith(self.prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass allowed requests to the app; answer everything else 404 (close websockets)."""
        if scope["type"] in ("http", "websocket") and not self.allows(scope.get("path", "")):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            body = f'{{"detail": "not served on the {self.listener} address"}}'.encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 404,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def _server_class() -> type:
    import uvicorn

    class Listener(uvicorn.Server):
        """A uvicorn server that leaves signals to :func:`serve` (several share a process)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Listener


async def serve(servers: list[Any]) -> None:
    """Run ``servers`` (the first owns the app's lifespan) until a signal or one exits.

    The others start once the first has started, so the app's lifespan has run before
    any SuperNode is served. SIGTERM/SIGINT stop every server gracefully.
    """
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server in servers:
            server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    first = asyncio.create_task(servers[0].serve())
    while not servers[0].started and not first.done():
        await asyncio.sleep(0.05)
    tasks = [first] + [asyncio.create_task(s.serve()) for s in servers[1:]]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    stop()
    await asyncio.gather(*tasks)


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m fedcommons.engines.listeners",
        description="flower-superlink with only the Fleet API on the public address.",
    )
    parser.add_argument("--fleet-address", required=True, help="HOST:PORT SuperNodes dial")
    parser.add_argument("--operator-address", help="HOST:PORT of the mTLS Control API")
    parser.add_argument("--operator-client-ca", help="CA that signs operator certificates")
    args, flower_args = parser.parse_known_args(argv)
    if flower_args and flower_args[0] == "--":
        flower_args = flower_args[1:]
    return args, flower_args


def main(argv: list[str] | None = None) -> None:
    """Parse our options and Flower's (``--`` then ``flower-superlink`` options); serve."""
    args, flower_args = _parse(sys.argv[1:] if argv is None else argv)
    # Flower's own parser, defaults and checks (TLS, node auth, database, isolation)
    sys.argv = ["flower-superlink", *flower_args]
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.cli.flower_superlink import (
        SuperLinkLifespan,
        _parse_superlink_lifespan_config,
    )
    from flwr.superlink.main import create_app

    config = _parse_superlink_lifespan_config()
    if not is_loopback(config.host):
        sys.exit(f"error: the local listener {config.host} must be a loopback address")
    fleet_host, fleet_port = split_address(args.fleet_address)
    app = create_app(config, SuperLinkLifespan)
    tls = {"ssl_keyfile": config.ssl_keyfile, "ssl_certfile": config.ssl_certfile}
    log_config = get_uvicorn_log_config(console_handler.level)

    import uvicorn

    def listener(asgi: Any, host: str, port: int, lifespan: str, **extra: Any) -> Any:
        cfg = uvicorn.Config(
            asgi,
            host=host,
            port=port,
            lifespan=lifespan,
            access_log=True,
            log_config=log_config,
            workers=1,
            **tls,
            **extra,
        )
        return _server_class()(cfg)

    servers = [
        listener(app, config.host, config.port, "on"),
        listener(PathGate(app, (FLEET_PREFIX,), "fleet"), fleet_host, fleet_port, "off"),
    ]
    if args.operator_address:
        if config.ssl_certfile is None or not args.operator_client_ca:
            sys.exit("error: --operator-address needs TLS and --operator-client-ca")
        host, port = split_address(args.operator_address)
        servers.append(
            listener(
                PathGate(app, (CONTROL_PREFIX,), "operator"),
                host,
                port,
                "off",
                ssl_ca_certs=args.operator_client_ca,
                ssl_cert_reqs=ssl.CERT_REQUIRED,
            )
        )
    asyncio.run(serve(servers))


if __name__ == "__main__":
    main()
