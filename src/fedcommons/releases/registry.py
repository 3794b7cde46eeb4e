"""The release registry: content-addressed weights, signed manifests, model cards, an index.

Layout under the registry root::

    index.sqlite                                  # the index: the commit point
    keys/ed25519.pub                              # public half of the signing key
    HEAD.json                                     # signed list of every release (see below)
    blobs/sha256/<hh>/<sha256>.safetensors        # weights, content-addressed
    releases/<name>/<version>/manifest.json       # the manifest (canonical JSON)
    releases/<name>/<version>/manifest.sig        # Ed25519 signature of manifest.json
    releases/<name>/<version>/README.md           # the model card

Metadata lives behind a small repository layer (:class:`IndexStore`); SQLite is the
embedded default (:class:`SqliteIndexStore`). Its schema is versioned with
``PRAGMA user_version`` and migrated forward when an older registry is opened.

A publish is atomic. Inside one exclusive index transaction (which serialises
publishers, also across processes) the registry allocates the version, writes manifest,
signature and card into a hidden staging directory (each file fsynced), renames the
directory to ``releases/<name>/<version>`` and inserts the index row; the commit is the
commit point. A crash before it leaves the previous state: an orphan blob or directory
that no index row names, which the next publish of that version replaces.

After the commit, still holding the registry's publish lock (``.publish.lock``), the
publisher rewrites ``HEAD.json`` (:mod:`fedcommons.releases.head`): the signed, numbered
list of every release with its manifest hash, and the line aliases. Verification checks
it, so deleting or replacing any attested release (also the newest of a line, which no
child's chain names) is detected. A crash between the commit and the rewrite leaves the
new release unattested until the next publish rewrites the head.

What readers see comes from signed files only: aliases from ``HEAD.json``, weights
checked against the signed manifest's hash (:meth:`Registry.verified_manifest`). The
index is the writer's working copy and a pointer to files; editing it changes nothing a
reader resolves. Reads check signatures with ``trusted_key`` when one is given (a
user's pinned signer, :mod:`fedcommons.releases.trust`), else with the key the registry
publishes. Names from the index become paths only after :func:`fedcommons.names.check_name`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedcommons.errors import (
    InvalidNameError,
    RegistryError,
    RegistryNotWritableError,
    ReleaseNotFoundError,
    SignatureError,
    SigningKeyError,
    VerificationError,
)
from fedcommons.fileio import atomic_write, fsync_dir
from fedcommons.names import NameKind, check_name
from fedcommons.releases.head import SignedHead, build_attestation, read_head, sign_head
from fedcommons.releases.signing import Signer, load_public_key, public_pem, verify_signature
from fedcommons.releases.versioning import next_version
from fedcommons.wire.manifest import ReleaseManifest

INDEX_SCHEMA_VERSION = 3
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
CARD_FILE = "README.md"
PUBLIC_KEY_FILE = Path("keys") / "ed25519.pub"
HEAD_FILE = "HEAD.json"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")

# Schema 1 is the foundation's; each migration moves the index one version forward.
_SCHEMA_V1 = """
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
_MIGRATE_V1_TO_V2 = """
ALTER TABLE releases ADD COLUMN bump TEXT NOT NULL DEFAULT '';
ALTER TABLE releases ADD COLUMN card_sha256 TEXT NOT NULL DEFAULT '';
ALTER TABLE releases ADD COLUMN signing_key_id TEXT NOT NULL DEFAULT '';
CREATE TABLE aliases (
    name TEXT NOT NULL,
    alias TEXT NOT NULL,
    version TEXT NOT NULL,
    updated TEXT NOT NULL,
    PRIMARY KEY (name, alias),
    FOREIGN KEY (name, version) REFERENCES releases (name, version)
);
CREATE TABLE release_tags (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (name, version, key)
);
CREATE TABLE rejected (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    created TEXT NOT NULL,
    parent_version TEXT,
    weights_sha256 TEXT NOT NULL,
    reasons_json TEXT NOT NULL,
    report_json TEXT NOT NULL
);
"""
# Schema 3 (#8): durable runs. ``runs`` holds scheduled and started runs, ``run_rounds``
# one row per committed round (see fedcommons.coordinator.runs).
_MIGRATE_V2_TO_V3 = """
CREATE TABLE runs (
    name TEXT PRIMARY KEY,
    line TEXT NOT NULL,
    state TEXT NOT NULL,
    config_json TEXT NOT NULL,
    run_tag TEXT NOT NULL,
    rounds INTEGER NOT NULL,
    committed_round INTEGER NOT NULL DEFAULT 0,
    not_before TEXT NOT NULL DEFAULT '',
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    heartbeat TEXT NOT NULL DEFAULT '',
    flower_run_id TEXT NOT NULL DEFAULT '0',  -- Flower run ids are unsigned 64-bit
    starts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    release_version TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT ''
);
CREATE TABLE run_rounds (
    run TEXT NOT NULL REFERENCES runs (name),
    round INTEGER NOT NULL,
    committed TEXT NOT NULL,
    checkpoint_path TEXT NOT NULL,
    checkpoint_sha256 TEXT NOT NULL,
    report_json TEXT NOT NULL,
    contributors_json TEXT NOT NULL,
    state_json TEXT NOT NULL,
    ledger_seq INTEGER,
    ledger_sha256 TEXT,
    ledger_entry_json TEXT,
    flower_run_id TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (run, round)
);
CREATE INDEX runs_by_state ON runs (state);
"""
MIGRATIONS: dict[int, str] = {0: _SCHEMA_V1, 1: _MIGRATE_V1_TO_V2, 2: _MIGRATE_V2_TO_V3}


# -- records ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReleaseRow:
    """One release as the index stores it."""

    name: str
    version: str
    parent_version: str | None
    created: str
    weights_sha256: str
    manifest_sha256: str
    manifest_path: str  # relative to the registry root
    metrics: dict[str, float]
    bump: str = ""
    card_sha256: str = ""
    signing_key_id: str = ""


@dataclass(frozen=True)
class Rejection:
    """A candidate the validation gate turned down."""

    id: int
    name: str
    created: str
    parent_version: str | None
    weights_sha256: str
    reasons: list[str]
    report: dict[str, Any]


@dataclass(frozen=True)
class Release:
    """One published release, with the paths of its files."""

    name: str
    version: str
    parent_version: str | None
    created: str
    weights_sha256: str
    manifest_sha256: str
    manifest_path: Path
    weights_path: Path
    metrics: dict[str, float]
    bump: str = ""
    card_sha256: str = ""
    aliases: tuple[str, ...] = field(default=())

    @property
    def release_dir(self) -> Path:
        """Directory holding manifest, signature and card."""
        return self.manifest_path.parent

    @property
    def signature_path(self) -> Path:
        """The manifest's signature file."""
        return self.release_dir / SIGNATURE_FILE

    @property
    def card_path(self) -> Path:
        """The model card."""
        return self.release_dir / CARD_FILE

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


def is_version(text: str) -> bool:
    """True for ``MAJOR.MINOR.PATCH``."""
    return bool(re.fullmatch(r"\d+\.\d+\.\d+", text))


def check_key_outside(key_path: Path | None, root: Path) -> None:
    """Refuse a signing key file that lies inside the registry directory ``root``.

    Everything under a registry is meant to be served (``rsync``, a static site): a
    private key there is one careless copy away from being published.
    """
    if key_path is None:
        return
    key = Path(key_path).expanduser().resolve()
    served = Path(root).expanduser().resolve()
    if key == served or key.is_relative_to(served):
        raise SigningKeyError(
            f"signing key {str(key)!r} lies inside the registry {str(served)!r}, whose files "
            "are served: move it out (e.g. to the default under ~/.config/fedcommons) and "
            "point signing-key or $FEDCOMMONS_SIGNING_KEY at it"
        )


# -- the repository layer -----------------------------------------------------------------
class IndexWriter(Protocol):
    """Writes inside one exclusive transaction of an :class:`IndexStore`."""

    def versions(self, name: str) -> list[tuple[int, int, int]]:
        """Every version of line ``name``."""

    def has_release(self, name: str, version: str) -> bool:
        """Whether the release exists."""

    def insert_release(self, row: ReleaseRow) -> None:
        """Add a release."""

    def set_alias(self, name: str, alias: str, version: str, updated: str) -> None:
        """Point ``alias`` of line ``name`` at ``version``."""

    def delete_alias(self, name: str, alias: str) -> bool:
        """Remove an alias; return whether it existed."""

    def set_tag(self, name: str, version: str, key: str, value: str | None) -> None:
        """Set (or with ``None`` delete) a key/value tag of a release."""

    def insert_rejection(
        self,
        name: str,
        created: str,
        parent_version: str | None,
        weights_sha256: str,
        reasons: list[str],
        report: Mapping[str, Any],
    ) -> int:
        """Record a rejected candidate; return its id."""


class IndexStore(Protocol):
    """Where release metadata lives (SQLite by default; another database can replace it).

    ``write()`` must give an exclusive transaction across processes: everything done on
    the writer commits together when the block exits normally and not at all otherwise.
    """

    def write(self) -> contextlib.AbstractContextManager[IndexWriter]:
        """An exclusive write transaction."""

    def releases(self, name: str | None = None) -> list[ReleaseRow]:
        """All releases (of ``name``), oldest version first."""

    def find(self, version: str, name: str | None = None) -> list[ReleaseRow]:
        """Releases with ``version`` (in line ``name``)."""

    def aliases(self, name: str | None = None) -> list[tuple[str, str, str, str]]:
        """(name, alias, version, updated) rows."""

    def rejections(self, name: str | None = None) -> list[Rejection]:
        """Rejected candidates, oldest first."""

    def tags(self, name: str, version: str) -> dict[str, str]:
        """Key/value tags of one release."""


_RELEASE_COLUMNS = (
    "name, version, parent_version, created, weights_sha256, manifest_sha256, "
    "manifest_path, metrics_json, bump, card_sha256, signing_key_id"
)


def _row(r: tuple) -> ReleaseRow:
    return ReleaseRow(*r[:7], json.loads(r[7]), *r[8:])  # type: ignore[arg-type]


class _SqliteWriter:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def versions(self, name: str) -> list[tuple[int, int, int]]:
        rows = self.db.execute("SELECT major, minor, patch FROM releases WHERE name=?", (name,))
        return [tuple(r) for r in rows.fetchall()]  # type: ignore[misc]

    def has_release(self, name: str, version: str) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM releases WHERE name=? AND version=?", (name, version)
        ).fetchone()
        return row is not None

    def insert_release(self, row: ReleaseRow) -> None:
        major, minor, patch = parse_version(row.version)
        self.db.execute(
            "INSERT INTO releases (name, version, major, minor, patch, parent_version, created,"
            " weights_sha256, manifest_sha256, manifest_path, metrics_json, bump, card_sha256,"
            " signing_key_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                row.name,
                row.version,
                major,
                minor,
                patch,
                row.parent_version,
                row.created,
                row.weights_sha256,
                row.manifest_sha256,
                row.manifest_path,
                json.dumps(row.metrics),
                row.bump,
                row.card_sha256,
                row.signing_key_id,
            ),
        )

    def set_alias(self, name: str, alias: str, version: str, updated: str) -> None:
        self.db.execute(
            "INSERT INTO aliases VALUES (?,?,?,?) ON CONFLICT (name, alias) DO UPDATE "
            "SET version=excluded.version, updated=excluded.updated",
            (name, alias, version, updated),
        )

    def delete_alias(self, name: str, alias: str) -> bool:
        cur = self.db.execute("DELETE FROM aliases WHERE name=? AND alias=?", (name, alias))
        return cur.rowcount > 0

    def set_tag(self, name: str, version: str, key: str, value: str | None) -> None:
        if value is None:
            self.db.execute(
                "DELETE FROM release_tags WHERE name=? AND version=? AND key=?",
                (name, version, key),
            )
            return
        self.db.execute(
            "INSERT INTO release_tags VALUES (?,?,?,?) ON CONFLICT (name, version, key) "
            "DO UPDATE SET value=excluded.value",
            (name, version, key, value),
        )

    def insert_rejection(
        self,
        name: str,
        created: str,
        parent_version: str | None,
        weights_sha256: str,
        reasons: list[str],
        report: Mapping[str, Any],
    ) -> int:
        cur = self.db.execute(
            "INSERT INTO rejected (name, created, parent_version, weights_sha256, reasons_json,"
            " report_json) VALUES (?,?,?,?,?,?)",
            (
                name,
                created,
                parent_version,
                weights_sha256,
                json.dumps(reasons),
                json.dumps(report),
            ),
        )
        return int(cur.lastrowid or 0)


@contextlib.contextmanager
def sqlite_connect(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection to the registry's SQLite index: WAL, full fsync, autocommit."""
    db = sqlite3.connect(path, timeout=60.0, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        yield db
    finally:
        db.close()


@contextlib.contextmanager
def sqlite_transaction(path: Path) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` on the index; rolled back on any exception."""
    with sqlite_connect(path) as db:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


class SqliteIndexStore:
    """The embedded index: one SQLite file in WAL mode, migrated on open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.migrate()

    def _connect(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return sqlite_connect(self.path)

    def _transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return sqlite_transaction(self.path)

    def schema_version(self) -> int:
        """The index's ``PRAGMA user_version``."""
        with self._connect() as db:
            return int(db.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        """Bring the schema to :data:`INDEX_SCHEMA_VERSION`, one step per transaction.

        An index already at the current version is only read: opening a registry never
        waits for a writer's transaction (a round being committed, a publish).
        """
        if self.path.exists() and self.schema_version() == INDEX_SCHEMA_VERSION:
            return
        while True:
            with self._transaction() as db:
                current = int(db.execute("PRAGMA user_version").fetchone()[0])
                if current > INDEX_SCHEMA_VERSION:
                    raise RegistryError(
                        f"registry index schema {current} is newer than this fedcommons "
                        f"understands ({INDEX_SCHEMA_VERSION}); upgrade fedcommons"
                    )
                if current == INDEX_SCHEMA_VERSION:
                    return
                for statement in MIGRATIONS[current].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {current + 1}")

    @contextlib.contextmanager
    def write(self) -> Iterator[IndexWriter]:
        """``BEGIN IMMEDIATE``: SQLite's write lock serialises writers across processes."""
        with self._transaction() as db:
            yield _SqliteWriter(db)

    def releases(self, name: str | None = None) -> list[ReleaseRow]:
        """All releases (of ``name``), oldest version first."""
        query = f"SELECT {_RELEASE_COLUMNS} FROM releases"
        args: tuple = ()
        if name:
            query += " WHERE name=?"
            args = (name,)
        query += " ORDER BY name, major, minor, patch"
        with self._connect() as db:
            return [_row(r) for r in db.execute(query, args).fetchall()]

    def find(self, version: str, name: str | None = None) -> list[ReleaseRow]:
        """Releases with ``version`` (in line ``name``)."""
        query = f"SELECT {_RELEASE_COLUMNS} FROM releases WHERE version=?"
        args: tuple = (version,)
        if name:
            query += " AND name=?"
            args += (name,)
        with self._connect() as db:
            return [_row(r) for r in db.execute(query, args).fetchall()]

    def aliases(self, name: str | None = None) -> list[tuple[str, str, str, str]]:
        """(name, alias, version, updated) rows."""
        query = "SELECT name, alias, version, updated FROM aliases"
        args: tuple = ()
        if name:
            query += " WHERE name=?"
            args = (name,)
        with self._connect() as db:
            return [tuple(r) for r in db.execute(query + " ORDER BY name, alias", args)]  # type: ignore[misc]

    def tags(self, name: str, version: str) -> dict[str, str]:
        """Key/value tags of one release."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT key, value FROM release_tags WHERE name=? AND version=? ORDER BY key",
                (name, version),
            ).fetchall()
        return dict(rows)

    def rejections(self, name: str | None = None) -> list[Rejection]:
        """Rejected candidates, oldest first."""
        query = (
            "SELECT id, name, created, parent_version, weights_sha256, reasons_json, "
            "report_json FROM rejected"
        )
        args: tuple = ()
        if name:
            query += " WHERE name=?"
            args = (name,)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY id", args).fetchall()
        return [Rejection(*r[:5], json.loads(r[5]), json.loads(r[6])) for r in rows]


# -- files --------------------------------------------------------------------------------
def _fsync_write(path: Path, data: bytes) -> None:
    """Write a registry file atomically; registry files are public (0644)."""
    atomic_write(path, data, mode=0o644)


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


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# -- the registry -------------------------------------------------------------------------
class Registry:
    """A registry directory: publish, list, resolve and read releases."""

    def __init__(
        self,
        root: Path | str,
        *,
        create: bool = True,
        store: IndexStore | None = None,
        trusted_key: Ed25519PublicKey | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        #: The key reads check signatures with; ``None``: the key the registry publishes.
        self.trusted_key = trusted_key
        self.index_path = self.root / "index.sqlite"
        if store is None:
            if not self.index_path.exists():
                if not create:
                    raise RegistryError(f"no registry at {str(self.root)!r} (no index.sqlite)")
                check_writable(self.root)
                self.root.mkdir(parents=True, exist_ok=True)
            store = SqliteIndexStore(self.index_path)
        self.store: IndexStore = store

    # -- paths ------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        """Where the weights with this SHA-256 live."""
        if not _SHA256_RE.fullmatch(sha256):
            raise RegistryError(f"weights hash {sha256!r} is not a lowercase hex SHA-256")
        return self.root / "blobs" / "sha256" / sha256[:2] / f"{sha256}.safetensors"

    def release_dir(self, name: str, version: str) -> Path:
        """Directory of one release's manifest, signature and card (names checked first)."""
        check_name(name, NameKind.line)
        check_name(version, NameKind.version)
        return self.root / "releases" / name / version

    @property
    def public_key_path(self) -> Path:
        """The published public key."""
        return self.root / PUBLIC_KEY_FILE

    # -- writing ----------------------------------------------------------------------
    def store_weights(self, weights: Mapping[str, torch.Tensor]) -> tuple[str, int]:
        """Store ``weights`` as safetensors under their SHA-256; return (hash, bytes)."""
        data = st_save({k: v.detach().cpu().contiguous() for k, v in weights.items()})
        digest = hashlib.sha256(data).hexdigest()
        path = self.blob_path(digest)
        if not path.exists():
            _fsync_write(path, data)
        return digest, len(data)

    @contextlib.contextmanager
    def _publish_lock(self) -> Iterator[None]:
        """Exclusive lock across processes for publish + head rewrite (POSIX flock)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".publish.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @property
    def head_path(self) -> Path:
        """The signed list of every release."""
        return self.root / HEAD_FILE

    def write_head(self, signer: Signer) -> None:
        """Sign and write the next ``HEAD.json``: releases, aliases, sequence number.

        The new head continues the one on disk (sequence number + 1, its hash as
        ``prev_head_sha256``); a head on disk that ``signer`` did not sign is refused
        rather than silently restarted, so nobody's rollback check is reset by it.
        """
        try:
            previous = read_head(self.head_path, signer.public_key)
        except VerificationError as exc:
            raise RegistryError(
                f"{self.head_path} does not verify with the signing key ({exc}); restore the "
                "registry's HEAD.json before publishing"
            ) from exc
        attestation = build_attestation(
            previous,
            ((r.name, r.version, r.manifest_sha256) for r in self.store.releases()),
            ((line, alias, version) for line, alias, version, _ in self.store.aliases()),
        )
        _fsync_write(self.head_path, sign_head(signer, attestation))

    # -- reading signed data ------------------------------------------------------------
    def published_key(self) -> Ed25519PublicKey | None:
        """The public key the registry publishes (``keys/ed25519.pub``), or ``None``."""
        path = self.public_key_path
        try:
            return load_public_key(path.read_bytes(), str(path))
        except FileNotFoundError:
            return None

    def reader_key(self) -> Ed25519PublicKey | None:
        """The key reads check signatures with: ``trusted_key``, else the published key."""
        return self.trusted_key if self.trusted_key is not None else self.published_key()

    def signed_head(self) -> SignedHead | None:
        """``HEAD.json`` checked against :meth:`reader_key` (``None``: none written yet).

        Raises :class:`~fedcommons.errors.VerificationError` when it does not verify.
        """
        key = self.reader_key()
        if key is None:
            return None
        return read_head(self.head_path, key)

    def verified_manifest(
        self,
        release: Release,
        *,
        key: Ed25519PublicKey | None = None,
        data: bytes | None = None,
    ) -> ReleaseManifest:
        """``release``'s manifest after checking its signature; never the index's word.

        ``key`` defaults to :meth:`reader_key`; ``data`` (the manifest's bytes, if read
        already) to the file. Raises :class:`~fedcommons.errors.SignatureError` naming the
        file when the manifest is unsigned, signed by another key or altered, and
        :class:`~fedcommons.errors.VerificationError` when it names another release.
        """
        key = key or self.reader_key()
        if key is None:
            raise SigningKeyError(
                f"registry {str(self.root)!r} publishes no key ({self.public_key_path}) and "
                "none is trusted: its releases cannot be checked"
            )
        if data is None:
            try:
                data = release.manifest_path.read_bytes()
            except FileNotFoundError as exc:
                raise VerificationError(
                    f"manifest {release.manifest_path} is missing", str(release.manifest_path)
                ) from exc
        try:
            sig = release.signature_path.read_bytes()
        except FileNotFoundError as exc:
            raise SignatureError(
                f"signature {release.signature_path} is missing (a release published before "
                "signing? run `fedcommons release sign-legacy`)",
                str(release.signature_path),
            ) from exc
        try:
            verify_signature(key, data, sig, where=str(release.signature_path))
        except SignatureError as exc:
            raise SignatureError(str(exc), str(release.signature_path)) from None
        try:
            manifest = ReleaseManifest.from_json(data)
        except (ValueError, TypeError) as exc:
            raise VerificationError(
                f"manifest {release.manifest_path} does not parse: {exc}",
                str(release.manifest_path),
            ) from exc
        if (manifest.name, manifest.version) != (release.name, release.version):
            raise VerificationError(
                f"manifest {release.manifest_path} is {manifest.name} {manifest.version}, "
                f"not {release.name} {release.version}",
                str(release.manifest_path),
            )
        return manifest

    def publish_key(self, signer: Signer) -> None:
        """Publish ``signer``'s public half, or check it matches the one published."""
        pem = public_pem(signer.public_key)
        path = self.public_key_path
        if path.exists():
            if path.read_bytes() != pem:
                raise SigningKeyError(
                    f"signing key {signer.key_id[:16]}… is not the key this registry "
                    f"publishes ({path}); use that key's private half"
                )
            return
        _fsync_write(path, pem)

    def publish(
        self,
        name: str,
        weights: Mapping[str, torch.Tensor],
        build_manifest: Callable[[str, str, int], ReleaseManifest],
        *,
        signer: Signer,
        parent: Release | None = None,
        bump: str = "",
        render_card: Callable[[ReleaseManifest], str] | None = None,
        candidate_alias: str | None = "candidate",
    ) -> Release:
        """Publish ``weights`` as the next ``bump`` version of line ``name``.

        ``build_manifest(version, weights_sha256, weights_bytes)`` returns the manifest;
        it is called inside the transaction that reserves the version. The registry adds
        the card's hash and the key id, signs the manifest and commits. ``bump`` is
        ``major``/``minor``/``patch`` ("" : patch with a parent, else major). The line's
        ``candidate_alias`` (``@candidate``; ``None``: none) moves to the new release in the
        same transaction; ``@stable`` moves only by :meth:`promote`.
        """
        check_name(name, NameKind.line)
        check_key_outside(signer.path, self.root)
        if parent is not None and parent.name != name:
            raise RegistryError(f"parent {parent.name} {parent.version} is not in line {name!r}")
        self.publish_key(signer)
        with self._publish_lock():
            release = self._publish_locked(
                name, weights, build_manifest, signer, parent, bump, render_card, candidate_alias
            )
            self.write_head(signer)
        return release

    def _publish_locked(
        self,
        name: str,
        weights: Mapping[str, torch.Tensor],
        build_manifest: Callable[[str, str, int], ReleaseManifest],
        signer: Signer,
        parent: Release | None,
        bump: str,
        render_card: Callable[[ReleaseManifest], str] | None,
        candidate_alias: str | None,
    ) -> Release:
        digest, size = self.store_weights(weights)
        bump = bump or ("patch" if parent else "major")
        release_root = self.root / "releases" / name
        with self.store.write() as writer:
            version = next_version(
                writer.versions(name), parse_version(parent.version) if parent else None, bump
            )
            manifest = build_manifest(version, digest, size)
            if manifest.version != version or manifest.weights_sha256 != digest:
                raise RegistryError("manifest does not match the version/weights published")
            if manifest.name != name:
                raise RegistryError(f"manifest names line {manifest.name!r}, not {name!r}")
            manifest.signing_key_id = signer.key_id
            card = render_card(manifest).encode() if render_card else b""
            manifest.card_sha256 = hashlib.sha256(card).hexdigest() if card else ""
            data = manifest.to_json()
            manifest_sha = hashlib.sha256(data).hexdigest()
            signature = (json.dumps(signer.sign(data), indent=2) + "\n").encode()
            staging = release_root / f".staging-{uuid.uuid4().hex}"
            final = self.release_dir(name, version)
            try:
                _fsync_write(staging / MANIFEST_FILE, data)
                _fsync_write(staging / SIGNATURE_FILE, signature)
                if card:
                    _fsync_write(staging / CARD_FILE, card)
                if final.exists():  # left by a publish that crashed before its commit
                    if writer.has_release(name, version):
                        raise RegistryError(f"release {name} {version} exists already")
                    shutil.rmtree(final)
                os.rename(staging, final)
                fsync_dir(release_root)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            try:
                writer.insert_release(
                    ReleaseRow(
                        name=name,
                        version=version,
                        parent_version=manifest.parent_version,
                        created=manifest.created,
                        weights_sha256=digest,
                        manifest_sha256=manifest_sha,
                        manifest_path=str((final / MANIFEST_FILE).relative_to(self.root)),
                        metrics=manifest.metrics,
                        bump=bump,
                        card_sha256=manifest.card_sha256,
                        signing_key_id=signer.key_id,
                    )
                )
                if candidate_alias:
                    writer.set_alias(name, candidate_alias, version, manifest.created)
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)
                raise
        return self.get(version, name=name)

    def sign_legacy(self, signer: Signer) -> list[Release]:
        """Sign the releases published before signing existed (schema-1 registries).

        Each unsigned release is checked first (manifest hash against the index, weights
        hash against the manifest); a corrupt one raises and nothing more is signed.
        Returns the releases signed; rewrites ``HEAD.json``.
        """
        check_key_outside(signer.path, self.root)
        self.publish_key(signer)
        signed: list[Release] = []
        with self._publish_lock():
            for rel in self.releases():
                if rel.signature_path.exists():
                    continue
                data = rel.manifest_path.read_bytes()
                if hashlib.sha256(data).hexdigest() != rel.manifest_sha256:
                    raise VerificationError(
                        f"manifest {rel.manifest_path} does not match the index: not signing it",
                        str(rel.manifest_path),
                    )
                manifest = ReleaseManifest.from_json(data)
                weights = rel.weights_path.read_bytes() if rel.weights_path.exists() else b""
                if hashlib.sha256(weights).hexdigest() != manifest.weights_sha256:
                    raise VerificationError(
                        f"weights file {rel.weights_path} is missing or does not match its "
                        "manifest: not signing it",
                        str(rel.weights_path),
                    )
                _fsync_write(
                    rel.signature_path, (json.dumps(signer.sign(data), indent=2) + "\n").encode()
                )
                signed.append(rel)
            self.write_head(signer)
        return signed

    def record_rejection(
        self,
        name: str,
        weights: Mapping[str, torch.Tensor],
        *,
        parent: Release | None,
        reasons: list[str],
        report: Mapping[str, Any],
    ) -> Rejection:
        """Record a candidate the gate turned down (its weights are kept for inspection)."""
        digest, _ = self.store_weights(weights)
        created = _now()
        parent_version = parent.version if parent else None
        with self.store.write() as writer:
            rid = writer.insert_rejection(name, created, parent_version, digest, reasons, report)
        return Rejection(rid, name, created, parent_version, digest, reasons, dict(report))

    def rejections(self, name: str | None = None) -> list[Rejection]:
        """Candidates the gate rejected."""
        return self.store.rejections(name)

    # -- aliases ----------------------------------------------------------------------
    def promote(self, ref: str, alias: str, *, signer: Signer, name: str | None = None) -> Release:
        """Point ``@alias`` of the release's line at the release ``ref`` resolves to.

        Aliases are part of the signed ``HEAD.json``: ``signer`` (the registry's key)
        re-signs it, so readers see the move and nobody can make it by editing the index.
        """
        alias = alias.removeprefix("@")
        try:
            check_name(alias, NameKind.alias)
        except InvalidNameError as exc:
            raise InvalidNameError(f"{exc}") from None
        if alias == "latest":
            raise InvalidNameError("alias 'latest' is reserved (it names the newest version)")
        check_key_outside(signer.path, self.root)
        self.publish_key(signer)
        release = self.get(ref, name=name)
        with self._publish_lock():
            with self.store.write() as writer:
                writer.set_alias(release.name, alias, release.version, _now())
            self.write_head(signer)
        return self.get(release.version, name=release.name)

    def set_tag(self, ref: str, key: str, value: str | None, *, name: str | None = None) -> Release:
        """Set tag ``key=value`` on a release (MLflow-style metadata); ``None`` deletes it."""
        if not key or len(key) > 250 or not key.isprintable():
            raise RegistryError(f"tag key {key!r} must be 1-250 printable characters")
        release = self.get(ref, name=name)
        with self.store.write() as writer:
            writer.set_tag(release.name, release.version, key, value)
        return release

    def tags(self, release: Release) -> dict[str, str]:
        """Key/value tags of ``release``."""
        return self.store.tags(release.name, release.version)

    def remove_alias(self, alias: str, *, name: str, signer: Signer) -> None:
        """Delete ``@alias`` of line ``name`` and re-sign ``HEAD.json`` with ``signer``."""
        self.publish_key(signer)
        with self._publish_lock():
            with self.store.write() as writer:
                if not writer.delete_alias(name, alias.removeprefix("@")):
                    raise ReleaseNotFoundError(f"line {name!r} has no alias @{alias}")
            self.write_head(signer)

    # -- reading ----------------------------------------------------------------------
    def _release(self, row: ReleaseRow, aliases: tuple[str, ...] = ()) -> Release:
        # The index is not trusted with paths: they follow from the checked names.
        return Release(
            name=row.name,
            version=row.version,
            parent_version=row.parent_version,
            created=row.created,
            weights_sha256=row.weights_sha256,
            manifest_sha256=row.manifest_sha256,
            manifest_path=self.release_dir(row.name, row.version) / MANIFEST_FILE,
            weights_path=self.blob_path(row.weights_sha256),
            metrics=row.metrics,
            bump=row.bump,
            card_sha256=row.card_sha256,
            aliases=aliases,
        )

    def _release_of(self, row: ReleaseRow) -> Release:
        """``row`` as a Release carrying its aliases."""
        return self._release(row, self._alias_map(row.name).get((row.name, row.version), ()))

    def _alias_map(self, name: str | None = None) -> dict[tuple[str, str], tuple[str, ...]]:
        """Aliases per release, for display (empty when ``HEAD.json`` does not verify)."""
        out: dict[tuple[str, str], list[str]] = {}
        try:
            rows = self.aliases(name)
        except VerificationError:
            rows = []
        for line, alias, version, _ in rows:
            out.setdefault((line, version), []).append(alias)
        return {k: tuple(v) for k, v in out.items()}

    def releases(self, name: str | None = None) -> list[Release]:
        """All releases (of line ``name`` if given), oldest version first."""
        aliases = self._alias_map(name)
        return [
            self._release(r, aliases.get((r.name, r.version), ()))
            for r in self.store.releases(name)
        ]

    def aliases(self, name: str | None = None) -> list[tuple[str, str, str, str]]:
        """(line, alias, version, updated) rows, as the signed ``HEAD.json`` states them.

        A format-1 head (written before aliases were signed) or a registry that never
        signed anything falls back to the index until the next publish, promote or
        ``release sign-legacy`` rewrites the head. Raises
        :class:`~fedcommons.errors.VerificationError` when the head does not verify.
        """
        head = self.signed_head()
        if head is None or not head.sequenced:
            return self.store.aliases(name)
        return [
            (line, alias, version, head.created)
            for line in sorted(head.aliases)
            if name is None or line == name
            for alias, version in sorted(head.aliases[line].items())
        ]

    def _what_exists(self, name: str | None) -> str:
        rows = self.store.releases(name)
        if not rows:
            return "the registry holds no releases" + (f" in line {name!r}" if name else "")
        lines: dict[str, list[str]] = {}
        for r in rows:
            lines.setdefault(r.name, []).append(r.version)
        aliases: dict[str, list[str]] = {}
        for (line, version), names in self._alias_map(name).items():
            aliases.setdefault(line, []).extend(f"@{a}={version}" for a in names)
        parts = []
        for line, versions in lines.items():
            text = f"line {line!r}: {', '.join(versions)}"
            if aliases.get(line):
                text += f" (aliases {', '.join(aliases[line])})"
            parts.append(text)
        return "existing: " + "; ".join(parts)

    def get(self, ref: str, *, name: str | None = None) -> Release:
        """The release ``ref`` names: a version, ``latest``, or an alias (``@stable``)."""
        ref = ref.strip()
        if ref == "latest":
            candidates = self.store.releases(name)
            if not candidates:
                raise ReleaseNotFoundError(f"no releases in {name or 'the registry'}")
            if len({r.name for r in candidates}) > 1:
                raise ReleaseNotFoundError(
                    f"several release lines: pass --name with 'latest' ({self._what_exists(None)})"
                )
            row = max(candidates, key=lambda r: parse_version(r.version))
            return self._release_of(row)
        if ref.startswith("@") or not is_version(ref):
            alias = ref.removeprefix("@")
            hits = [a for a in self.aliases(name) if a[1] == alias]
            if not hits:
                raise ReleaseNotFoundError(
                    f"no release or alias {ref!r}"
                    + (f" in line {name!r}" if name else "")
                    + f"; {self._what_exists(name)}"
                )
            if len(hits) > 1:
                lines = ", ".join(sorted(h[0] for h in hits))
                raise ReleaseNotFoundError(f"alias @{alias} exists in lines {lines}: pass --name")
            return self.get(hits[0][2], name=hits[0][0])
        rows = self.store.find(ref, name)
        if not rows:
            raise ReleaseNotFoundError(
                f"no release {ref!r}"
                + (f" in line {name!r}" if name else "")
                + f" in registry {str(self.root)!r}; {self._what_exists(name)}"
            )
        if len(rows) > 1:
            lines = ", ".join(sorted(r.name for r in rows))
            raise ReleaseNotFoundError(f"version {ref!r} exists in lines {lines}: pass --name")
        row = rows[0]
        return self._release_of(row)

    def weights_bytes(self, release: Release) -> bytes:
        """A release's weights, checked against the SHA-256 its *signed* manifest records.

        The blob is found by the manifest's hash, not the index's: an index pointed at
        other weights changes nothing. Raises
        :class:`~fedcommons.errors.VerificationError` naming the file that is wrong.
        """
        manifest = self.verified_manifest(release)
        path = self.blob_path(manifest.weights_sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise VerificationError(f"weights file {path} is missing", str(path)) from exc
        digest = hashlib.sha256(data).hexdigest()
        if digest != manifest.weights_sha256:
            raise VerificationError(
                f"weights file {path} has sha256 {digest}, the signed manifest of "
                f"{release.name} {release.version} says {manifest.weights_sha256}",
                str(path),
            )
        return data

    def load_weights(self, release: Release) -> dict[str, torch.Tensor]:
        """Load a release's weights, checking their SHA-256 first."""
        return st_load(self.weights_bytes(release))
