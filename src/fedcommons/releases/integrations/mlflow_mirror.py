"""Mirror federation runs and published releases into MLflow (optional extra ``mlflow``).

The registry stays the source of truth; MLflow is a mirror for the people who already
work there:

- a federation run becomes an MLflow run (experiment ``mlflow-experiment``, default: the
  release line): its run config as parameters, per-round metrics (validation accuracy and
  loss, sampled / accepted / rejected / timed-out replies, upload bytes, compression
  ratio, the line's cumulative central-DP ε), and at the end the release's model card
  (the run's description and ``release/README.md``);
- every published release becomes a model version of the registered model named after
  the line, tagged with its fedcommons version, manifest and weights SHA-256, with the
  release files under the run's ``release/`` artifacts (weights, manifest, signature,
  card: verifiable with the registry's public key), and the line's aliases
  (``@candidate``, ``@stable``) set on the matching versions.

A tracking server that is down never fails a round or loses a release: each failed call
is logged as a warning and recorded in the run's audit log (``mlflow.mirror``
``not-mirrored``, naming what was not mirrored); round metrics wait in memory and are
sent with the next call that succeeds, and ``fedcommons release mlflow-sync`` mirrors
every release (and alias) MLflow lacks, from the registry, at any later time. After a
failure, live calls pause (:attr:`MlflowMirror.retry_after_s`, doubling per further
failure) so that an unreachable server costs one timeout now and then, not one per round.

Privacy: only aggregates leave the coordinator. Per-round upload bytes are summed; a
manifest that still holds per-institution fields (upload bytes or DP spends keyed by
node) is not uploaded on a DP line (its card, weights and metrics are).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedcommons.errors import ConfigError, VerificationError
from fedcommons.logs import get_logger

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from fedcommons.releases.registry import Registry, Release
    from fedcommons.wire.manifest import ReleaseManifest

log = get_logger("fedcommons.mlflow")

#: Run-config keys never sent to MLflow (a key path; the tracking URI itself).
PRIVATE_PARAMS = frozenset({"signing-key", "mlflow-tracking-uri"})
#: MLflow's REST client retries 7 times with backoff 2 by default (minutes on a dead
#: server); the mirror lowers these unless the operator set them.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
TAG = "fedcommons."
#: Metrics logged once per round (step = round number).
ROUND_METRICS = frozenset(
    {
        "val_accuracy",
        "val_loss",
        "train_loss",
        "sampled",
        "accepted",
        "rejected",
        "timed_out",
        "upload_bytes",
        "ratio_vs_dense",
        "round_seconds",
        "epsilon",
    }
)
RELEASE_ARTIFACTS = "release"
_BATCH = 100  # MLflow's limit of params (and tags) per log_batch call


def check_available() -> None:
    """Raise :class:`ConfigError` unless MLflow is installed (checked before round 1)."""
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(
            "mlflow-tracking-uri is set but MLflow is not installed: "
            "pip install 'fedcommons[mlflow]'"
        )


def check_tracking_uri(uri: str) -> None:
    """Refuse a tracking URI with credentials in it (it is recorded in the run config)."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.password is not None or (parts.username and parts.scheme in {"http", "https"}):
        raise ConfigError(
            "mlflow-tracking-uri must not carry credentials (it is recorded in the release "
            "manifest): set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or "
            "MLFLOW_TRACKING_TOKEN instead"
        )


def _quote(value: str) -> str:
    """``value`` as a quoted MLflow search-filter literal."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ConfigError(f"cannot search MLflow for {value!r}: it holds both quote characters")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def round_metrics(report: Mapping[str, Any], epsilon: float | None = None) -> dict[str, float]:
    """The aggregate metrics of one round (a ``RoundReport`` as a dict); never per node."""
    rejected = report.get("rejected") or {}
    upload = report.get("upload_bytes") or {}
    values: dict[str, Any] = {
        "val_accuracy": report.get("val_accuracy"),
        "val_loss": report.get("val_loss"),
        "train_loss": report.get("train_loss"),
        "sampled": report.get("sampled"),
        "accepted": report.get("accepted"),
        "rejected": sum(int(v) for v in rejected.values()),
        "timed_out": report.get("timed_out"),
        "upload_bytes": sum(int(v) for v in upload.values()) if upload else None,
        "ratio_vs_dense": report.get("ratio_vs_dense") if upload else None,
        "round_seconds": report.get("seconds"),
        "epsilon": epsilon,
    }
    values.update({f"rejected.{reason}": n for reason, n in rejected.items()})
    return {k: v for k, v in ((k, _finite(v)) for k, v in values.items()) if v is not None}


def per_node_fields(manifest: ReleaseManifest) -> list[str]:
    """Manifest fields that hold per-institution data (keyed by node)."""
    found = []
    if any(r.get("upload_bytes") for r in manifest.round_metrics):
        found.append("round_metrics[].upload_bytes")
    if (manifest.privacy or {}).get("client_dp", {}).get("latest"):
        found.append("privacy.client_dp.latest")
    return found


def is_dp_line(manifest: ReleaseManifest) -> bool:
    """Whether the release was trained under central or client DP."""
    privacy = manifest.privacy or {}
    return bool(privacy.get("central") or privacy.get("client_dp")) or any(
        k.startswith("dp.") for k in manifest.config
    )


class MlflowMirror:
    """Mirrors one federation run into MLflow; a run sink of :mod:`..observability.events`.

    Nothing here raises into the round engine: every MLflow call goes through
    :meth:`_attempt`, which logs, audits and remembers what it could not send.
    """

    #: Seconds live calls pause after a failed one, doubling with each further failure up
    #: to :attr:`max_retry_after_s` (the release and the run's end are always attempted).
    retry_after_s: float = 60.0
    max_retry_after_s: float = 900.0

    def __init__(
        self,
        tracking_uri: str,
        *,
        line: str,
        experiment: str = "",
        audit: Callable[..., None] | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.line = line
        self.experiment = experiment or line
        self._audit = audit
        self._client: MlflowClient | None = None
        self.run_id: str | None = None
        self._run_name = ""
        self._params: dict[str, Any] = {}
        self._pending: list[tuple[int, int, dict[str, float]]] = []  # (step, ms, metrics)
        self._down_until = 0.0
        self._failures = 0
        #: What could not be mirrored (also in the audit log), for tests and operators.
        self.not_mirrored: list[str] = []

    @property
    def pending_rounds(self) -> list[int]:
        """Rounds whose metrics wait for the server (sent with the next call that works)."""
        return [step for step, _, _ in self._pending]

    @property
    def paused_until(self) -> float:
        """``time.monotonic()`` before which live calls are skipped (0: not paused)."""
        return self._down_until

    # -- plumbing ---------------------------------------------------------------------
    @property
    def client(self) -> MlflowClient:
        """The MLflow client (created on first use, with bounded HTTP retries)."""
        if self._client is None:
            for key, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
            from mlflow import MlflowClient

            self._client = MlflowClient(
                tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri
            )
        return self._client

    def _attempt(self, what: str, action: Callable[[], Any], *, force: bool = False) -> bool:
        """Run ``action``; on failure log, audit, remember ``what`` and pause live calls."""
        if not force and time.monotonic() < self._down_until:
            self._missed(what, "tracking server marked down after an earlier failure")
            return False
        try:
            action()
        except Exception as exc:  # MLflow raises many types (HTTP, SQL, REST); none may escape
            pause = min(self.retry_after_s * 2**self._failures, self.max_retry_after_s)
            self._failures += 1
            self._down_until = time.monotonic() + pause
            self._missed(what, f"{type(exc).__name__}: {exc}")
            return False
        self._down_until, self._failures = 0.0, 0
        return True

    def _missed(self, what: str, error: str) -> None:
        self.not_mirrored.append(what)
        log.warning("mlflow.not_mirrored", what=what, error=error[:500], uri=self.tracking_uri)
        if self._audit is not None:
            self._audit(
                "mlflow.mirror", "not-mirrored", details={"what": what, "error": error[:500]}
            )

    # -- run sink ---------------------------------------------------------------------
    def run_started(self, run_id: int, details: Mapping[str, Any]) -> None:
        """Open (or, for a resumed run, find again) the MLflow run; log the run config."""
        self._run_name = str(details.get("run_name", ""))
        config = details.get("config") or {}
        self._params = {k: v for k, v in config.items() if k not in PRIVATE_PARAMS}
        tags = {f"{TAG}flower_run_id": str(run_id)}
        self._attempt("run start and parameters", lambda: self._open_run(tags))

    def round_finished(self, report: Any, *, epsilon: float | None = None) -> None:
        """Log the round's aggregate metrics (queued while the server is unreachable)."""
        from dataclasses import asdict, is_dataclass

        data = asdict(report) if is_dataclass(report) else dict(report)
        now = int(time.time() * 1000)
        self._pending.append((int(data["round"]), now, round_metrics(data, epsilon)))
        self._attempt(f"round {data['round']} metrics", self._flush)

    def release_published(self, release: Release) -> None:
        """Mirror the release: final metrics, card, files, model version, aliases."""
        manifest = release.manifest()
        card = release.card_path.read_text() if release.card_path.exists() else ""
        what = f"release {release.name} {release.version}"

        def mirror() -> None:
            self._open_run({})
            self._flush()
            self.mirror_release(release, manifest, card, run_id=self.run_id)

        self._attempt(what, mirror, force=True)

    def run_ended(self, outcome: str, detail: str) -> None:
        """Mark the MLflow run finished, failed or killed."""
        status = {"finished": "FINISHED", "cancelled": "KILLED"}.get(outcome, "FAILED")

        def end() -> None:
            if self.run_id is None:
                self._open_run({})
            self._flush()
            self.client.set_tag(self.run_id, f"{TAG}outcome", f"{outcome}: {detail}"[:5000])
            self.client.set_terminated(self.run_id, status=status)

        if not self._attempt(f"run end ({outcome})", end, force=True) and self._pending:
            steps = ", ".join(str(s) for s, _, _ in self._pending)
            self._missed(f"round metrics of round(s) {steps}", "never reached the server")

    # -- MLflow operations ------------------------------------------------------------
    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        return self.client.create_experiment(self.experiment, tags={f"{TAG}line": self.line})

    def _open_run(self, tags: Mapping[str, str]) -> None:
        """Find the run by its durable name (a resumed run continues), else create it."""
        from mlflow.entities import Param

        if self.run_id is None:
            exp = self._experiment_id()
            runs = []
            if self._run_name:
                runs = self.client.search_runs(
                    [exp],
                    filter_string=f"tags.`{TAG}run_name` = {_quote(self._run_name)}",
                    max_results=1,
                )
            if runs:
                self.run_id = runs[0].info.run_id
            else:
                run = self.client.create_run(
                    exp,
                    run_name=self._run_name or None,
                    tags={f"{TAG}run_name": self._run_name, f"{TAG}line": self.line, **tags},
                )
                self.run_id = run.info.run_id
        if self._params:
            have = self.client.get_run(self.run_id).data.params
            new = [
                Param(k, str(v)[:6000]) for k, v in sorted(self._params.items()) if k not in have
            ]
            for start in range(0, len(new), _BATCH):
                self.client.log_batch(self.run_id, params=new[start : start + _BATCH])
            self._params = {}

    def _flush(self) -> None:
        """Send queued round metrics (oldest first); keep them queued on failure."""
        from mlflow.entities import Metric

        if self.run_id is None:
            self._open_run({})
        while self._pending:
            step, stamp, values = self._pending[0]
            metrics = [Metric(k, v, stamp, step) for k, v in sorted(values.items())]
            self.client.log_batch(self.run_id, metrics=metrics)
            self._pending.pop(0)

    def mirror_release(
        self,
        release: Release,
        manifest: ReleaseManifest,
        card: str,
        *,
        run_id: str | None,
        aliases: Iterable[str] | None = None,
    ) -> str:
        """Mirror one release into run ``run_id`` (created if ``None``); return the version.

        Idempotent: a release whose manifest hash MLflow already holds as a model version
        only gets its aliases set again.
        """
        from mlflow.entities import Metric

        client = self.client
        existing = self.model_version(release.manifest_sha256)
        if existing is not None:
            self.set_aliases({a: existing for a in (aliases or release.aliases)})
            return existing
        if run_id is None:
            run = client.create_run(
                self._experiment_id(),
                run_name=f"{release.name} {release.version}",
                tags={f"{TAG}line": release.name, f"{TAG}mirrored_from": "registry"},
            )
            run_id = run.info.run_id
            self._backfill_rounds(run_id, manifest)
        stamp = int(time.time() * 1000)
        final = [  # the last round's val_* are per-round points already
            Metric(k, float(v), stamp, manifest.rounds)
            for k, v in sorted(manifest.metrics.items())
            if _finite(v) is not None and k not in ROUND_METRICS
        ]
        central = (manifest.privacy or {}).get("central") or {}
        if _finite(central.get("epsilon")) is not None:
            final.append(Metric("epsilon", float(central["epsilon"]), stamp, manifest.rounds))
        if final:
            client.log_batch(run_id, metrics=final)
        self._backfill_rounds(run_id, manifest)
        tags = self.release_tags(release, manifest)
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        if card:
            client.set_tag(run_id, "mlflow.note.content", card[:50000])
        self._log_release_files(run_id, release, manifest, card)
        source = f"{client.get_run(run_id).info.artifact_uri}/{RELEASE_ARTIFACTS}"
        try:
            client.get_registered_model(release.name)
        except Exception:  # RESOURCE_DOES_NOT_EXIST
            client.create_registered_model(
                release.name,
                tags={f"{TAG}line": release.name},
                description=f"fedcommons release line {release.name!r}",
            )
        version = client.create_model_version(
            release.name,
            source=source,
            run_id=run_id,
            tags=tags,
            description=f"fedcommons {release.name} {release.version}: "
            f"{manifest.version_bump.get('bump', '-')} release, strategy {manifest.strategy}, "
            f"{manifest.contributors} contributor(s), {manifest.rounds} round(s)",
        ).version
        self.set_aliases({a: str(version) for a in (aliases or release.aliases)})
        log.info("mlflow.mirrored", release=f"{release.name} {release.version}", version=version)
        return str(version)

    def _backfill_rounds(self, run_id: str, manifest: ReleaseManifest) -> None:
        """Log the manifest's per-round metrics for rounds the run has no points for."""
        from mlflow.entities import Metric

        have = {m.step for m in self.client.get_metric_history(run_id, "val_accuracy")}
        stamp = int(time.time() * 1000)
        metrics = [
            Metric(k, v, stamp, int(r["round"]))
            for r in manifest.round_metrics
            if int(r["round"]) not in have
            for k, v in sorted(round_metrics(r).items())
        ]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[start : start + 1000])

    @staticmethod
    def release_tags(release: Release, manifest: ReleaseManifest) -> dict[str, str]:
        """Tags linking an MLflow model version to its fedcommons release."""
        return {
            f"{TAG}name": release.name,
            f"{TAG}version": release.version,
            f"{TAG}manifest_sha256": release.manifest_sha256,
            f"{TAG}weights_sha256": manifest.weights_sha256,
            f"{TAG}parent_version": manifest.parent_version or "",
            f"{TAG}bump": (manifest.version_bump or {}).get("bump", release.bump or ""),
            f"{TAG}signing_key_id": manifest.signing_key_id,
            f"{TAG}strategy": manifest.strategy,
        }

    def _log_release_files(
        self, run_id: str, release: Release, manifest: ReleaseManifest, card: str
    ) -> None:
        files: dict[str, Path | str] = {"model.safetensors": release.weights_path}
        if card:
            files["README.md"] = card
        held = per_node_fields(manifest)
        if held and is_dp_line(manifest):
            self._missed(
                f"manifest of {release.name} {release.version}",
                f"DP line: the manifest holds per-institution fields ({', '.join(held)})",
            )
        else:
            files["manifest.json"] = release.manifest_path
            if release.signature_path.exists():
                files["manifest.sig"] = release.signature_path
        with tempfile.TemporaryDirectory(prefix="fedcommons-mlflow-") as tmp:
            folder = Path(tmp) / RELEASE_ARTIFACTS
            folder.mkdir()
            for name, src in files.items():
                target = folder / name
                if isinstance(src, str):
                    target.write_text(src)
                    continue
                shutil.copyfile(src, target)
                if name == "model.safetensors" and _sha256(target) != release.weights_sha256:
                    raise VerificationError(
                        f"weights file {src} does not match its hash: not mirrored", str(src)
                    )
            self.client.log_artifacts(run_id, str(folder), RELEASE_ARTIFACTS)

    def model_version(self, manifest_sha256: str) -> str | None:
        """The MLflow model version mirroring the release with this manifest hash."""
        hits = self.client.search_model_versions(
            f"name = {_quote(self.line)} and tags.`{TAG}manifest_sha256` = '{manifest_sha256}'"
        )
        return str(hits[0].version) if hits else None

    def set_aliases(self, aliases: Mapping[str, str]) -> None:
        """Point each MLflow alias at its model version (MLflow-only aliases are left)."""
        for alias, version in aliases.items():
            self.client.set_registered_model_alias(self.line, alias, version)


def sync_registry(
    registry: Registry,
    tracking_uri: str,
    *,
    name: str | None = None,
    experiment: str = "",
    on_release: Callable[[Release, str], None] | None = None,
) -> dict[str, list[str]]:
    """Mirror every release of ``registry`` (line ``name``) MLflow lacks, then every alias.

    Returns ``{"mirrored": [...], "present": [...]}`` ("line version" strings). MLflow
    errors propagate (this is an operator command, not the round engine).
    """
    out: dict[str, list[str]] = {"mirrored": [], "present": []}
    releases = registry.releases(name)
    for line in sorted({r.name for r in releases}):
        mirror = MlflowMirror(tracking_uri, line=line, experiment=experiment)
        versions: dict[str, str] = {}
        for rel in (r for r in releases if r.name == line):
            label = f"{rel.name} {rel.version}"
            found = mirror.model_version(rel.manifest_sha256)
            if found is None:
                card = rel.card_path.read_text() if rel.card_path.exists() else ""
                found = mirror.mirror_release(rel, rel.manifest(), card, run_id=None, aliases=())
                out["mirrored"].append(label)
            else:
                out["present"].append(label)
            versions[rel.version] = found
            if on_release is not None:
                on_release(rel, found)
        mirror.set_aliases(
            {alias: versions[version] for ln, alias, version, _ in registry.aliases(line)}
        )
    return out
