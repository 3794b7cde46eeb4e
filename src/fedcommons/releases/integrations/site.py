"""A static release site: ``fedcommons release site -o DIR``.

Renders every line and version of a registry as plain HTML (Jinja2, autoescaped: every
string in a registry is untrusted) that works from ``file://`` with no server and no
script: the lineage (parent chain, bump and its reasons), validation scores across
versions as an inline SVG chart drawn here, the privacy budget spent, compression,
contributor counts, the verification status of each release against the trusted key
(:class:`~fedcommons.releases.verification.Verifier`; pin the key with ``--trust``) and
download links for the weights, model cards and sparse patches from the parent. A
release that fails verification is shown failing, with none of its figures (they may be
forged: it is left out of the chart) and none of its files.

Layout of ``DIR``: ``index.html``, ``<line>/<version>.html``, and
``files/<line>/<version>/`` (``model.safetensors``, ``README.md``, ``manifest.json``,
``patch-from-<parent>.fcpatch``).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcommons.errors import ConfigError, FedcommonsError
from fedcommons.fileio import atomic_write
from fedcommons.releases.registry import Registry, Release, parse_version
from fedcommons.releases.verification import HeadResult, Verifier, VerifyResult
from fedcommons.wire.manifest import ReleaseManifest

_SLUG = re.compile(r"[^A-Za-z0-9._-]+")
TEMPLATES = Path(__file__).with_name("site_templates")


def slug(text: str) -> str:
    """A file-name-safe form of a line name or version."""
    cleaned = _SLUG.sub("-", text).strip(".-")
    return cleaned or "_"


@dataclass
class ReleasePage:
    """What the site shows of one release."""

    release: Release
    manifest: ReleaseManifest | None
    verify: VerifyResult
    page: str  # relative to the site root
    files: dict[str, str] = field(default_factory=dict)  # label -> relative path
    error: str = ""

    @property
    def ok(self) -> bool:
        """Verified, and its manifest parsed with fields of the expected types."""
        return self.verify.ok and self.manifest is not None


@dataclass
class SiteSummary:
    """What was rendered: pages, and how many releases verified."""

    root: Path
    releases: int
    verified: int
    failed: list[str]
    key_id: str
    pinned: bool


def _svg_chart(points: Sequence[tuple[str, dict[str, float]]], *, title: str) -> str:
    """An inline SVG line chart: x = versions in order, one polyline per series."""
    series = sorted({name for _, values in points for name in values})
    values = [v for _, vals in points for v in vals.values()]
    width, height, left, right, top, bottom = 700, 260, 56, 190, 28, 44
    if not points or not values:
        return '<p class="muted">No validation scores recorded.</p>'
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.1 or 0.05
    lo, hi = (lo - pad if lo < 0 or lo - pad >= 0 else 0.0), hi + pad  # scores: no axis below 0
    n = len(points)
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(i: int) -> float:
        return left + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    def y(v: float) -> float:
        return top + plot_h * (1 - (v - lo) / (hi - lo))

    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"]
    out = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{html.escape(title)}</title>",
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" '
        'stroke="#ccc"/>',
    ]
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        out.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
            f'stroke="#e5e5e5"/><text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end" '
            f'font-size="11">{v:.3f}</text>'
        )
    for i, (version, _) in enumerate(points):
        out.append(
            f'<text x="{x(i):.1f}" y="{top + plot_h + 18}" text-anchor="middle" '
            f'font-size="11">{html.escape(version)}</text>'
        )
    for s_i, name in enumerate(series):
        color = colors[s_i % len(colors)]
        coords = [(x(i), y(vals[name])) for i, (_, vals) in enumerate(points) if name in vals]
        path = " ".join(f"{a:.1f},{b:.1f}" for a, b in coords)
        out.append(
            f'<polyline class="series" data-series="{html.escape(name)}" points="{path}" '
            f'fill="none" stroke="{color}" stroke-width="2"/>'
        )
        for (a, b), (version, vals) in zip(
            coords, [p for p in points if name in p[1]], strict=True
        ):
            out.append(
                f'<circle class="point" cx="{a:.1f}" cy="{b:.1f}" r="3.5" fill="{color}">'
                f"<title>{html.escape(name)} {html.escape(version)}: {vals[name]:.4f}</title>"
                "</circle>"
            )
        ly = top + 14 + 18 * s_i
        out.append(
            f'<line x1="{left + plot_w + 12}" x2="{left + plot_w + 32}" y1="{ly - 4}" '
            f'y2="{ly - 4}" stroke="{color}" stroke-width="2"/><text x="{left + plot_w + 38}" '
            f'y="{ly}" font-size="12">{html.escape(name)}</text>'
        )
    out.append("</svg>")
    return "\n".join(out)


def _scores(manifest: ReleaseManifest | None) -> dict[str, float]:
    """Validation values of the tasks to maximise (what the chart shows)."""
    if manifest is None:
        return {}
    out = {}
    for t in (manifest.validation or {}).get("tasks", []):
        value = t.get("candidate")
        if t.get("direction") == "max" and isinstance(value, int | float) and value == value:
            out[str(t.get("name"))] = float(value)
    return out


def _privacy(manifest: ReleaseManifest) -> dict[str, Any]:
    privacy = manifest.privacy or {}
    central = privacy.get("central") or {}
    return {
        "epsilon": central.get("epsilon"),
        "delta": central.get("delta"),
        "budget": (central.get("budget") or {}).get("epsilon"),
        "guarantee": privacy.get("guarantee", ""),
        "client_institutions": (privacy.get("client_dp") or {}).get("institutions"),
    }


_FIELD_TYPES = {
    "metrics": dict,
    "validation": dict,
    "privacy": dict,
    "version_bump": dict,
    "strategy_params": dict,
    "strategy_code": dict,
    "round_metrics": list,
    "config": dict,
}


def _malformed(manifest: ReleaseManifest) -> str:
    """Why a (signed) manifest cannot be shown, or ``""``: fields of the wrong type."""
    wrong = [k for k, kind in _FIELD_TYPES.items() if not isinstance(getattr(manifest, k), kind)]
    tasks = manifest.validation.get("tasks", []) if isinstance(manifest.validation, dict) else []
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        wrong.append("validation.tasks")
    return f"manifest fields of the wrong type: {', '.join(wrong)}" if wrong else ""


def _copy(src: Path, dst: Path) -> None:
    """Hard-link when possible (same file system), else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class _SiteBuilder:
    def __init__(self, registry: Registry, out: Path, verifier: Verifier) -> None:
        self.registry, self.out, self.verifier = registry, out, verifier

    def release_page(self, rel: Release, pages: dict[tuple[str, str], ReleasePage]) -> ReleasePage:
        result = self.verifier.verify(rel)
        page = ReleasePage(rel, None, result, f"{slug(rel.name)}/{slug(rel.version)}.html")
        if not result.ok:  # its figures may be forged: show none of them, offer no file
            return page
        try:
            manifest = rel.manifest()
        except (OSError, ValueError, TypeError) as exc:
            page.error = f"manifest unreadable: {exc}"
            return page
        page.error = _malformed(manifest)
        if not page.error:
            page.manifest = manifest
            self._files(page, pages)
        return page

    def _files(self, page: ReleasePage, pages: dict[tuple[str, str], ReleasePage]) -> None:
        rel = page.release
        base = f"files/{slug(rel.name)}/{slug(rel.version)}"
        _copy(rel.weights_path, self.out / base / "model.safetensors")
        page.files["weights (safetensors)"] = f"{base}/model.safetensors"
        _copy(rel.manifest_path, self.out / base / "manifest.json")
        page.files["manifest"] = f"{base}/manifest.json"
        if rel.signature_path.exists():
            _copy(rel.signature_path, self.out / base / "manifest.sig")
            page.files["signature"] = f"{base}/manifest.sig"
        if rel.card_path.exists():
            _copy(rel.card_path, self.out / base / "README.md")
            page.files["model card"] = f"{base}/README.md"
        parent = pages.get((rel.name, rel.parent_version or ""))
        if parent is not None and parent.ok:
            from fedcommons.releases.patches import make_patch

            try:
                patch = make_patch(
                    self.registry.weights_bytes(parent.release), self.registry.weights_bytes(rel)
                )
            except FedcommonsError as exc:
                page.error = f"no patch from {parent.release.version}: {exc}"
                return
            name = f"patch-from-{slug(parent.release.version)}.fcpatch"
            atomic_write(self.out / base / name, patch.data, mode=0o644)
            page.files[f"patch from {parent.release.version} ({patch.size:,} bytes)"] = (
                f"{base}/{name}"
            )


def build_site(
    registry: Registry,
    out: Path,
    *,
    public_key: Any = None,
    on_release: Callable[[Release], None] | None = None,
) -> SiteSummary:
    """Render the site of ``registry`` into ``out``; return what it shows.

    ``public_key`` (an ``Ed25519PublicKey``) is the trusted key; ``None`` verifies against
    the key the registry itself publishes, and the site says so.
    """
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    from fedcommons.releases.signing import key_id

    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"site output {str(out)!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    verifier = Verifier(registry, public_key)
    builder = _SiteBuilder(registry, out, verifier)
    env = Environment(
        loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]), trim_blocks=True
    )
    env.filters["fmt"] = _fmt
    pages: dict[tuple[str, str], ReleasePage] = {}
    lines: dict[str, list[ReleasePage]] = {}
    for rel in sorted(registry.releases(), key=lambda r: (r.name, parse_version(r.version))):
        page = builder.release_page(rel, pages)
        pages[(rel.name, rel.version)] = page
        lines.setdefault(rel.name, []).append(page)
        if on_release is not None:
            on_release(rel)
    head: HeadResult = verifier.verify_head()
    pinned = public_key is not None
    context = {
        "lines": lines,
        "charts": {
            name: _svg_chart(
                [(p.release.version, _scores(p.manifest)) for p in items],
                title=f"{name}: validation scores by version",
            )
            for name, items in lines.items()
        },
        "head": head,
        "key_id": key_id(verifier.public_key),
        "pinned": pinned,
        "privacy": _privacy,
    }
    index = env.get_template("index.html").render(root="", **context)
    atomic_write(out / "index.html", index.encode(), mode=0o644)
    for page in pages.values():
        text = env.get_template("release.html").render(
            root="../", p=page, chain=_chain(page, pages), **context
        )
        atomic_write(out / page.page, text.encode(), mode=0o644)
    failed = [f"{p.release.name} {p.release.version}" for p in pages.values() if not p.ok]
    return SiteSummary(out, len(pages), len(pages) - len(failed), failed, context["key_id"], pinned)


def _chain(page: ReleasePage, pages: dict[tuple[str, str], ReleasePage]) -> list[ReleasePage]:
    """``page`` and its ancestors, child first (stops at a missing or repeated parent)."""
    chain, seen = [page], {page.release.version}
    while True:
        parent_version = chain[-1].release.parent_version
        parent = pages.get((page.release.name, parent_version or ""))
        if parent is None or parent.release.version in seen:
            return chain
        seen.add(parent.release.version)
        chain.append(parent)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if value == value else "NaN"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)
