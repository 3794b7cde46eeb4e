"""deploy/: every file parses, and every command, option and entry point it names exists.

No container engine or Helm runs here, so the checks are static: Dockerfiles through
dockerfile-parse, compose files and Helm values through PyYAML, Helm templates after
their template actions are blanked out, and each `fedcommons ...` command line is
resolved against the real typer command tree (subcommands and options).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
import typer
import yaml
from dockerfile_parse import DockerfileParser

from fedcommons.cli import app

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "fedcommons-coordinator"
DOCKERFILES = {
    "coordinator": DEPLOY / "coordinator" / "Dockerfile",
    "client": DEPLOY / "client" / "Dockerfile",
}
COMPOSE = [DEPLOY / "compose" / "compose.yaml", DEPLOY / "compose" / "compose.tls.yaml"]


def resolve_command(argv: list[str]) -> click.Command:
    """Walk ``fedcommons <group> <command> [options]``; fail on anything unknown."""
    assert argv and argv[0] == "fedcommons", argv
    command: click.Command = typer.main.get_command(app)
    tokens = list(argv[1:])
    while isinstance(command, click.Group) and tokens and not tokens[0].startswith("-"):
        name = tokens.pop(0)
        sub = command.commands.get(name)
        assert sub is not None, f"no command {name!r} in {argv}"
        command = sub
    assert not isinstance(command, click.Group), f"{argv} names a group, not a command"
    options = {opt for p in command.params for opt in getattr(p, "opts", [])}
    flags = {
        opt
        for p in command.params
        if isinstance(p, click.Option) and (p.is_flag or p.count)
        for opt in p.opts
    }
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("-"):
            name = token.split("=", 1)[0]
            assert name in options or name == "--help", f"{argv}: {name} is not an option"
            if "=" not in token and name not in flags and name != "--help":
                i += 1  # its value
        i += 1
    return command


def _exec_form(value: str | None) -> list[str]:
    import json

    assert value, "ENTRYPOINT/CMD missing"
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"use the exec form: {value}"
    return parsed


def _dockerfile(path: Path) -> DockerfileParser:
    parser = DockerfileParser(path=str(path), cache_content=True)
    assert parser.structure, f"{path} has no instructions"
    return parser


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_is_multi_stage_non_root_and_runs_a_real_command(name: str) -> None:
    parser = _dockerfile(DOCKERFILES[name])
    instructions = [i["instruction"] for i in parser.structure]
    froms = [i["value"] for i in parser.structure if i["instruction"] == "FROM"]
    assert len(froms) >= 2 and any(" AS build" in f for f in froms)
    assert any(
        i["instruction"] == "COPY" and "--from=build" in i["value"] for i in parser.structure
    )
    user = [i["value"] for i in parser.structure if i["instruction"] == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert instructions.index("USER") > max(n for n, i in enumerate(instructions) if i == "FROM"), (
        "USER must apply to the final stage"
    )
    entry = _exec_form(parser.structure[instructions.index("ENTRYPOINT")]["value"])
    cmd = _exec_form([i for i in parser.structure if i["instruction"] == "CMD"][-1]["value"])
    resolve_command(entry + cmd)


def test_client_image_is_built_on_a_cuda_base() -> None:
    parser = _dockerfile(DOCKERFILES["client"])
    args = dict(
        i["value"].split("=", 1)
        for i in parser.structure
        if i["instruction"] == "ARG" and "=" in i["value"]
    )
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert "download.pytorch.org/whl/cu" in args["TORCH_INDEX"]
    froms = [i["value"] for i in parser.structure if i["instruction"] == "FROM"]
    assert all(f.startswith("${CUDA_IMAGE}") for f in froms)


def test_dockerfiles_install_the_package_whose_console_script_they_call() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fedcommons"] == "fedcommons.cli:main"
    for path in DOCKERFILES.values():
        text = path.read_text()
        assert "COPY src ./src" in text and "pip install ." in text


def _compose_entrypoint(service: dict[str, Any], base: dict[str, Any]) -> list[str]:
    if "entrypoint" in service:
        return list(service["entrypoint"])
    build = service.get("build") or base.get("build")
    image = service.get("image") or base.get("image", "")
    if build:
        dockerfile = ROOT / "deploy" / "compose" / build["context"] / build["dockerfile"]
    else:
        dockerfile = DOCKERFILES["coordinator" if "coordinator" in image else "client"]
    parser = _dockerfile(dockerfile.resolve())
    entry = [i for i in parser.structure if i["instruction"] == "ENTRYPOINT"][-1]
    return _exec_form(entry["value"])


def test_compose_files_parse_and_every_service_command_exists() -> None:
    base = yaml.safe_load(COMPOSE[0].read_text())
    overlay = yaml.safe_load(COMPOSE[1].read_text())
    assert {"coordinator", "client-1", "client-2", "client-3"} <= set(base["services"])
    checked = 0
    for doc in (base, overlay):
        for name, service in doc["services"].items():
            merged = {**base["services"].get(name, {}), **service}
            entry = _compose_entrypoint(merged, merged)
            resolve_command(entry + list(merged.get("command", [])))
            checked += 1
    assert checked >= 11


def test_tls_overlay_turns_on_tls_and_node_auth_for_every_node() -> None:
    overlay = yaml.safe_load(COMPOSE[1].read_text())["services"]
    coordinator = overlay["coordinator"]["command"]
    assert "--insecure" not in coordinator
    assert any(a.startswith("--allowlist=") for a in coordinator)
    for n in (1, 2, 3):
        command = overlay[f"client-{n}"]["command"]
        assert "--insecure" not in command
        assert f"--key=/pki/nodes/node-{n}.key" in command
        assert "--root-cert=/pki/ca.pem" in command
    assert "--host=coordinator" in overlay["certs"]["command"]


_ACTION_LINE = re.compile(r"^\s*\{\{-?\s*(if|else|end|with|range|define)\b.*\}\}\s*$")
_INCLUDE_LINE = re.compile(r"^\s*\{\{-?\s*(include|toYaml)\b.*\}\}\s*$")


def _blank_template(text: str) -> str:
    """Drop lines that are only template actions; replace inline actions by a scalar."""
    out = []
    for line in text.splitlines():
        if _ACTION_LINE.match(line):
            continue
        if _INCLUDE_LINE.match(line):
            indent = len(line) - len(line.lstrip())
            out.append(" " * indent + "placeholder: x")
            continue
        out.append(re.sub(r"\{\{.*?\}\}", "x", line))
    return "\n".join(out) + "\n"


def _value_paths(values: dict[str, Any], prefix: str = "") -> set[str]:
    paths = set()
    for key, value in values.items():
        paths.add(prefix + key)
        if isinstance(value, dict):
            paths |= _value_paths(value, f"{prefix}{key}.")
    return paths


def test_helm_chart_parses_and_templates_only_reference_defined_values() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == CHART.name
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    known = _value_paths(values)
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    defined = set(re.findall(r'define "([^"]+)"', helpers))
    kinds = set()
    for path in sorted((CHART / "templates").glob("*.yaml")):
        text = path.read_text()
        for ref in re.findall(r"\.Values\.([A-Za-z0-9_.]+)", text):
            assert ref in known, f"{path.name}: .Values.{ref} is not in values.yaml"
        for name in re.findall(r'include "([^"]+)"', text):
            assert name in defined, f"{path.name}: template {name!r} is not defined"
        docs = [d for d in yaml.safe_load_all(_blank_template(text)) if d]
        assert docs, f"{path.name} renders nothing"
        kinds |= {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim"} <= kinds


def test_helm_deployment_runs_a_real_command_as_non_root() -> None:
    text = (CHART / "templates" / "deployment.yaml").read_text()
    doc = yaml.safe_load(_blank_template(text))
    pod = doc["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    resolve_command(container["command"] + container["args"])


def test_helm_config_map_renders_settings_the_coordinator_accepts(tmp_path: Path) -> None:
    """The chart's coordinator.toml, with its values filled in, loads as settings."""
    from fedcommons.engines.superlink import CoordinatorSettings

    text = (CHART / "templates" / "configmap.yaml").read_text()
    body = text.split("coordinator.toml: |\n", 1)[1]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    body = re.sub(
        r"\{\{ if \.Values\.metrics\.enabled \}\}\{\{ \.Values\.metrics\.port \}\}"
        r"\{\{ else \}\}0\{\{ end \}\}",
        str(values["metrics"]["port"]),
        body,
    )

    def fill(match: re.Match[str]) -> str:
        node: Any = values
        for part in match.group(1).split("."):
            node = node[part]
        return str(node).lower() if isinstance(node, bool) else str(node)

    rendered = re.sub(r"\{\{ \.Values\.([A-Za-z0-9_.]+) \}\}", fill, body)
    assert "{{" not in rendered
    toml = "\n".join(line.strip() for line in rendered.splitlines())
    settings = CoordinatorSettings(**tomllib.loads(toml))
    assert settings.node_auth and not settings.insecure
    assert settings.metrics_port == values["metrics"]["port"]


def test_resolver_rejects_an_unknown_command_and_option() -> None:
    """Input tried: `fedcommons coordinator launch` and `coordinator start --tls-cert x`."""
    with pytest.raises(AssertionError, match="no command 'launch'"):
        resolve_command(["fedcommons", "coordinator", "launch"])
    with pytest.raises(AssertionError, match="--tls-cert is not an option"):
        resolve_command(["fedcommons", "coordinator", "start", "--tls-cert", "x"])
