"""deploy/grafana: the dashboard parses and queries only metrics the coordinator exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fedcommons.observability import metrics

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "fedcommons-dashboard.json"
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
}


def _exported() -> set[str]:
    """Every sample name the coordinator's registry exposes (as Prometheus scrapes it)."""
    names = set()
    for family in metrics.REGISTRY.collect():
        names.update(family.name + s for s in SUFFIXES.get(family.type, ("",)))
    return names


def _exprs(dash: dict) -> list[str]:
    return [t["expr"] for p in dash["panels"] for t in p["targets"]] + [
        v["definition"] for v in dash["templating"]["list"] if "definition" in v
    ]


def test_dashboard_queries_only_metric_names_the_coordinator_exports() -> None:
    dash = json.loads(DASHBOARD.read_text())
    used = {name for e in _exprs(dash) for name in re.findall(r"\bfedcommons_[a-z_]+", e)}
    assert used, "the dashboard queries no fedcommons metric"
    assert used <= _exported(), f"unknown metrics: {sorted(used - _exported())}"


def test_every_exported_metric_has_a_panel() -> None:
    dash = json.loads(DASHBOARD.read_text())
    text = " ".join(_exprs(dash))
    families = {f.name for f in metrics.REGISTRY.collect()}
    assert all(name in text for name in families), sorted(n for n in families if n not in text)


def test_panels_have_unique_ids_targets_and_grid_positions() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert panel["targets"] and set(panel["gridPos"]) == {"x", "y", "w", "h"}
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
