"""The local release registry: content-addressed weights, JSON manifests, a SQLite index.

Layout under the registry root::

    index.sqlite                          # one row per release (the commit point)
    blobs/sha256/<hh>/<sha256>.safetensors
    releases/<name>/<version>/manifest.json

A publish writes the weights blob and the manifest (each to a temporary file, fsynced,
then renamed) inside an ``IMMEDIATE`` SQLite transaction that also allocates the version;
the index row is the commit point. A crash before the commit leaves at most an orphan
blob or manifest file that no index row names; concurrent publishers are serialised by
SQLite's write lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedcommons.errors import RegistryError, RegistryNotWritableError, ReleaseNotFoundError
from fedcommons.wire.manifest import ReleaseManifest

INDEX_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS releases (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    major INTEGER NOT NULL,
    minor INTEGER NOT NULL,
    patch INTEGER NOT NULL,
    parent_version TEXT,
    created TEXT NOT NULL,
    weights_sha256 TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    manifest_path TEXT NOT NULL,
    metrics_json TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
"""


@dataclass(frozen=True)
class Release:
    """One published release as the index records it."""

    name: str
    version: str
    parent_version: str | None
    created: str
    weights_sha256: str
    manifest_sha256: str
    manifest_path: Path
    weights_path: Path
    metrics: dict[str, float]

    def manifest(self) -> ReleaseManifest:
        """Read and parse this release's manifest."""
        return ReleaseManifest.from_json(self.manifest_path.read_bytes())


def parse_version(version: str) -> tuple[int, int, int]:
    """Parse ``MAJOR.MINOR.PATCH``."""
    parts = version.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise RegistryError(f"version {version!r} is not MAJOR.MINOR.PATCH")
    major, minor, patch = (int(p) for p in parts)
    return major, minor, patch


def _fsync_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_writable(root: Path) -> None:
    """Raise :class:`RegistryNotWritableError` unless ``root`` can hold a registry.

    Creates nothing that stays: probes the directory (or its nearest existing ancestor)
    with a temporary file.
    """
    probe = root
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise RegistryNotWritableError(
            f"registry path {str(root)!r} is not usable: {str(probe)!r} is not a directory"
        )
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise RegistryNotWritableError(
            f"registry path {str(root)!r} is not writable ({probe}: {exc.strerror})"
        ) from exc


class Registry:
    """A registry directory: publish, list and read releases."""

    def __init__(self, root: Path | str, *, create: bool = True) -> None:
        self.root = Path(root).expanduser()
        self.index_path = self.root / "index.sqlite"
        if not self.index_path.exists():
            if not create:
                raise RegistryError(f"no registry at {str(self.root)!r} (no index.sqlite)")
            check_writable(self.root)
            self.root.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            current = db.execute("PRAGMA user_version").fetchone()[0]
            if current > INDEX_SCHEMA_VERSION:
                raise RegistryError(
                    f"registry index schema {current} is newer than this fedcommons "
                    f"understands ({INDEX_SCHEMA_VERSION}); upgrade fedcommons"
                )
            if current < INDEX_SCHEMA_VERSION:
                db.executescript(_SCHEMA)
                db.execute(f"PRAGMA user_version = {INDEX_SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.index_path, timeout=30.0, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            yield db
        finally:
            db.close()

    # -- paths ------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        """Where the weights with this SHA-256 live."""
        return self.root / "blobs" / "sha256" / sha256[:2] / f"{sha256}.safetensors"

    def release_dir(self, name: str, version: str) -> Path:
        """Directory of one release's manifest."""
        return self.root / "releases" / name / version

    # -- writing ----------------------------------------------------------------------
    def store_weights(self, weights: Mapping[str, torch.Tensor]) -> tuple[str, int]:
        """Store ``weights`` as safetensors under their SHA-256; return (hash, bytes)."""
        data = st_save({k: v.detach().cpu().contiguous() for k, v in weights.items()})
        digest = hashlib.sha256(data).hexdigest()
        path = self.blob_path(digest)
        if not path.exists():
            _fsync_write(path, data)
        return digest, len(data)

    def publish(
        self,
        name: str,
        weights: Mapping[str, torch.Tensor],
        build_manifest: Callable[[str, str, int], ReleaseManifest],
        *,
        parent: Release | None = None,
    ) -> Release:
        """Publish ``weights`` as the next version of line ``name``.

        ``build_manifest(version, weights_sha256, weights_bytes)`` returns the manifest;
        it is called inside the transaction that reserves the version.
        """
        digest, size = self.store_weights(weights)
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                version = self._next_version(db, name, parent)
                manifest = build_manifest(version, digest, size)
                if manifest.version != version or manifest.weights_sha256 != digest:
                    raise RegistryError("manifest does not match the version/weights published")
                data = manifest.to_json()
                manifest_sha = hashlib.sha256(data).hexdigest()
                manifest_path = self.release_dir(name, version) / "manifest.json"
                _fsync_write(manifest_path, data)
                major, minor, patch = parse_version(version)
                db.execute(
                    "INSERT INTO releases VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        name,
                        version,
                        major,
                        minor,
                        patch,
                        manifest.parent_version,
                        manifest.created,
                        digest,
                        manifest_sha,
                        str(manifest_path.relative_to(self.root)),
                        json.dumps(manifest.metrics),
                    ),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return self.get(version, name=name)

    def _next_version(self, db: sqlite3.Connection, name: str, parent: Release | None) -> str:
        """Next version of ``name``: PATCH after the parent, else the next MAJOR.

        A run from a parent release changes its parameters in place (PATCH); a run
        without one replaces the line's model (MAJOR; the first release is 1.0.0).
        Issue #5 refines this with the architecture/parameter-change rules.
        """
        if parent is not None:
            major, minor, _ = parse_version(parent.version)
            row = db.execute(
                "SELECT MAX(patch) FROM releases WHERE name=? AND major=? AND minor=?",
                (name, major, minor),
            ).fetchone()
            return f"{major}.{minor}.{(row[0] or 0) + 1}"
        row = db.execute("SELECT MAX(major) FROM releases WHERE name=?", (name,)).fetchone()
        return f"{(row[0] or 0) + 1}.0.0"

    # -- reading ----------------------------------------------------------------------
    def _row_to_release(self, row: tuple) -> Release:
        name, version, parent, created, digest, manifest_sha, manifest_path, metrics = row
        return Release(
            name=name,
            version=version,
            parent_version=parent,
            created=created,
            weights_sha256=digest,
            manifest_sha256=manifest_sha,
            manifest_path=self.root / manifest_path,
            weights_path=self.blob_path(digest),
            metrics=json.loads(metrics),
        )

    _COLUMNS = (
        "name, version, parent_version, created, weights_sha256, manifest_sha256, "
        "manifest_path, metrics_json"
    )

    def releases(self, name: str | None = None) -> list[Release]:
        """All releases (of line ``name`` if given), oldest version first."""
        query = f"SELECT {self._COLUMNS} FROM releases"
        args: tuple = ()
        if name:
            query += " WHERE name=?"
            args = (name,)
        query += " ORDER BY name, major, minor, patch"
        with self._connect() as db:
            return [self._row_to_release(r) for r in db.execute(query, args).fetchall()]

    def get(self, version: str, *, name: str | None = None) -> Release:
        """The release ``version`` (of line ``name``; required if several lines have it)."""
        if version == "latest":
            candidates = self.releases(name)
            if not candidates:
                raise ReleaseNotFoundError(f"no releases in {name or 'the registry'}")
            if len({r.name for r in candidates}) > 1:
                raise ReleaseNotFoundError("several release lines: pass --name with 'latest'")
            return candidates[-1]
        query = f"SELECT {self._COLUMNS} FROM releases WHERE version=?"
        args: tuple = (version,)
        if name:
            query += " AND name=?"
            args += (name,)
        with self._connect() as db:
            rows = db.execute(query, args).fetchall()
        if not rows:
            raise ReleaseNotFoundError(
                f"no release {version!r}"
                + (f" in line {name!r}" if name else "")
                + f" in registry {str(self.root)!r}"
            )
        if len(rows) > 1:
            lines = ", ".join(sorted(r[0] for r in rows))
            raise ReleaseNotFoundError(f"version {version!r} exists in lines {lines}: pass --name")
        return self._row_to_release(rows[0])

    def load_weights(self, release: Release) -> dict[str, torch.Tensor]:
        """Load a release's weights, checking their SHA-256 first."""
        data = release.weights_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != release.weights_sha256:
            raise RegistryError(f"weights file {release.weights_path} does not match its hash")
        return st_load(data)
