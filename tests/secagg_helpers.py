"""Shared pieces of the secure-aggregation tests (and benchmarks): sites that drop, the demo."""

from __future__ import annotations

import subprocess
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedcommons.client_sdk.client_app import app as client_app
from fedcommons.wire import keys


def dropping(stage: str, partitions: set[int]) -> ClientApp:
    """The real ClientApp, except that ``partitions`` crash when ``stage`` reaches them."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        record = msg.content.config_records.get(keys.SECAGG_RECORD)
        if (
            record is not None
            and record[keys.SECAGG_STAGE] == stage
            and int(context.node_config["partition-id"]) in partitions
        ):
            raise ConnectionError(f"site went offline during {stage}")
        return client_app(msg, context)

    return app


def run_secure_demo(
    tmp_path: Path, env: dict[str, str], institutions: int, rounds: int, *extra: str
) -> subprocess.CompletedProcess[str]:
    """``fedcommons demo --secagg`` (the installed executable) into ``tmp_path/registry``."""
    from tests.conftest import BIN

    return subprocess.run(
        [
            str(BIN / "fedcommons"),
            "demo",
            "--secagg",
            *extra,
            "--institutions",
            str(institutions),
            "--rounds",
            str(rounds),
            "--local-epochs",
            "1",
            "--registry",
            str(tmp_path / "registry"),
        ],
        env={**env, "FEDCOMMONS_STATE_DIR": str(tmp_path / "state")},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=tmp_path,
    )
