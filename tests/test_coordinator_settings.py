"""`coordinator start` settings: TOML, environment, options; TLS and node auth by default."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcommons.cli import app
from fedcommons.engines import certs
from fedcommons.engines.superlink import (
    load_coordinator_settings,
    service_argv,
    service_env,
    superlink_argv,
)
from fedcommons.errors import CertificateError, ConfigError


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    certs.create_ca(tmp_path)
    certs.create_server_cert(tmp_path)
    for name in ("n1", "n2"):
        certs.create_node_keys(tmp_path / "nodes", name)
    return tmp_path


def _toml(path: Path, pki: Path, **extra: object) -> Path:
    lines = [
        f'ssl_certfile = "{pki / "server.pem"}"',
        f'ssl_keyfile = "{pki / "server.key"}"',
        f'ssl_ca_certfile = "{pki / "ca.pem"}"',
        f'allowlist = ["{pki / "nodes"}"]',
    ]
    for key, value in extra.items():
        lines.append(f"{key} = {value!r}" if not isinstance(value, str) else f'{key} = "{value}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def test_defaults_are_tls_and_node_auth_on_loopback(pki: Path, tmp_path: Path) -> None:
    settings = load_coordinator_settings(_toml(tmp_path / "c.toml", pki))
    assert settings.check() == []
    argv = superlink_argv(settings)
    assert argv[:5] == ["flower-superlink", "--host", "127.0.0.1", "--port", "9091"]
    assert "--enable-supernode-auth" in argv and "--insecure" not in argv
    assert argv[argv.index("--ssl-ca-certfile") + 1] == str(pki / "ca.pem")
    assert argv[argv.index("--isolation") + 1] == "process"  # our supervised SuperExec
    assert settings.metrics_host == "127.0.0.1"


def test_environment_beats_toml_and_options_beat_environment(
    pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _toml(tmp_path / "c.toml", pki, port=9100, metrics_port=9200)
    monkeypatch.setenv("FEDCOMMONS_PORT", "9101")
    monkeypatch.setenv("FEDCOMMONS_METRICS_PORT", "9201")
    settings = load_coordinator_settings(config, metrics_port=9202)
    assert (settings.port, settings.metrics_port) == (9101, 9202)


def test_service_env_hands_metrics_and_audit_settings_to_the_serverapp(
    pki: Path, tmp_path: Path
) -> None:
    settings = load_coordinator_settings(
        _toml(tmp_path / "c.toml", pki),
        metrics_host="0.0.0.0",
        metrics_port=9300,
        audit_log=tmp_path / "a.jsonl",
    )
    env = service_env(settings, {})
    assert env == {
        "FEDCOMMONS_METRICS_HOST": "0.0.0.0",
        "FEDCOMMONS_METRICS_PORT": "9300",
        "FEDCOMMONS_AUDIT_LOG": str(tmp_path / "a.jsonl"),
    }


def test_tls_without_certificates_is_a_config_error_naming_the_options(tmp_path: Path) -> None:
    """Input tried: no settings at all (TLS on by default, no certificate given)."""
    settings = load_coordinator_settings()
    with pytest.raises(ConfigError, match="--ssl-certfile, --ssl-keyfile, --ssl-ca-certfile"):
        settings.check()


def test_insecure_turns_off_tls_and_node_auth_with_warnings() -> None:
    settings = load_coordinator_settings(insecure=True)
    warnings = settings.check()
    assert any("TLS is off" in w for w in warnings)
    assert any("authentication" in w for w in warnings)
    argv = superlink_argv(settings)
    assert "--insecure" in argv and "--enable-supernode-auth" not in argv


def test_unknown_toml_key_is_a_config_error(tmp_path: Path) -> None:
    """Input tried: coordinator.toml with the misspelt key `prot = 9093`."""
    path = tmp_path / "c.toml"
    path.write_text("prot = 9093\n")
    with pytest.raises(ConfigError, match="prot: Extra inputs are not permitted"):
        load_coordinator_settings(path)


def test_invalid_toml_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    """Input tried: coordinator.toml containing `port = ` (no value)."""
    path = tmp_path / "c.toml"
    path.write_text("port = \n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_coordinator_settings(path)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    """Input tried: --config pointing at a file that does not exist."""
    with pytest.raises(ConfigError, match="not found"):
        load_coordinator_settings(tmp_path / "nope.toml")


def test_a_certificate_file_that_is_not_pem_is_a_certificate_error(
    pki: Path, tmp_path: Path
) -> None:
    """Input tried: ssl_ca_certfile pointing at a node's OpenSSH public key."""
    settings = load_coordinator_settings(
        _toml(tmp_path / "c.toml", pki), ssl_ca_certfile=pki / "nodes" / "n1.pub"
    )
    with pytest.raises(CertificateError, match="not a PEM certificate"):
        settings.check()


def test_port_out_of_range_is_a_config_error() -> None:
    """Input tried: --port 70000."""
    with pytest.raises(ConfigError, match="port"):
        load_coordinator_settings(port=70000)


def test_start_dry_run_prints_the_superlink_command(pki: Path, tmp_path: Path) -> None:
    config = _toml(tmp_path / "c.toml", pki)
    result = CliRunner().invoke(
        app, ["coordinator", "start", "--config", str(config), "--port", "9444", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert "-m fedcommons.engines.listeners --fleet-address 127.0.0.1:9444 --" in result.output
    assert "--host 127.0.0.1 --port 9091" in result.output  # Control API: loopback
    assert "--enable-supernode-auth" in result.output


def test_the_control_api_must_stay_on_loopback(pki: Path, tmp_path: Path) -> None:
    """Input tried: control-host = 0.0.0.0 in coordinator.toml."""
    settings = load_coordinator_settings(_toml(tmp_path / "c.toml", pki, control_host="0.0.0.0"))
    with pytest.raises(ConfigError, match=r"control-host '0\.0\.0\.0' is not a loopback address"):
        settings.check()


def test_an_operator_address_needs_tls_and_serves_only_the_control_api(
    pki: Path, tmp_path: Path
) -> None:
    """Input tried: operator-address with --insecure, then with TLS."""
    with pytest.raises(ConfigError, match="operator-address needs TLS"):
        load_coordinator_settings(insecure=True, operator_address="10.0.0.5:9443").check()
    settings = load_coordinator_settings(
        _toml(tmp_path / "c.toml", pki), operator_address="10.0.0.5:9443"
    )
    assert any("10.0.0.5:9443" in w for w in settings.check())
    argv = service_argv(settings)
    assert argv[argv.index("--operator-address") + 1] == "10.0.0.5:9443"
    assert argv[argv.index("--operator-client-ca") + 1] == str(pki / "ca.pem")


def test_fleet_and_control_on_one_port_is_refused() -> None:
    """Input tried: --host 0.0.0.0 --port 9091 (the default Control port)."""
    with pytest.raises(ConfigError, match="both the Fleet port and the Control port"):
        load_coordinator_settings(insecure=True, host="0.0.0.0", port=9091).check()


def test_client_join_without_a_key_refuses_to_start(pki: Path) -> None:
    """Input tried: `client join --root-cert ca.pem` with neither --key nor --no-node-auth."""
    result = CliRunner().invoke(
        app,
        ["client", "join", "--coordinator", "127.0.0.1:9", "--root-cert", str(pki / "ca.pem")],
    )
    assert result.exit_code != 0
    assert "--key NODE.key" in str(result.exception)


def test_client_join_with_key_and_insecure_refuses_to_start(pki: Path) -> None:
    """Input tried: `client join --insecure --key n1.key` (auth needs TLS)."""
    result = CliRunner().invoke(
        app,
        [
            "client",
            "join",
            "--coordinator",
            "127.0.0.1:9",
            "--insecure",
            "--key",
            str(pki / "nodes" / "n1.key"),
        ],
    )
    assert result.exit_code != 0
    assert "needs TLS" in str(result.exception)


def test_certs_dev_writes_ca_server_and_node_keys(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    result = CliRunner().invoke(
        app, ["certs", "dev", "--dir", str(out), "--nodes", "2", "--host", "coord.lan"]
    )
    assert result.exit_code == 0, result.output
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == [
        "ca.key",
        "ca.pem",
        "nodes/node-1.key",
        "nodes/node-1.pub",
        "nodes/node-2.key",
        "nodes/node-2.pub",
        "server.key",
        "server.pem",
    ]
    assert "coord.lan" in certs.server_cert_hosts(out / "server.pem")


def test_relative_paths_in_the_toml_file_are_relative_to_the_file(
    pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = pki / "coordinator.toml"
    config.write_text(
        'ssl_certfile = "server.pem"\nssl_keyfile = "server.key"\n'
        'ssl_ca_certfile = "ca.pem"\nallowlist = ["nodes"]\n'
    )
    monkeypatch.chdir(tmp_path)
    settings = load_coordinator_settings(config, ssl_keyfile=Path("mine.key"))
    assert settings.ssl_certfile == pki / "server.pem"
    assert settings.allowlist == [pki / "nodes"]
    assert settings.ssl_keyfile == Path("mine.key")  # an option: relative to the cwd
    settings = load_coordinator_settings(config)
    assert settings.check() == []
